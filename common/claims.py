"""How the comparison judges its claims (common.results writes them into its tables).

Every pre-training stage gets a learning check: its pretext's measure against chance (PRETEXT_MEASURE,
common.pretext) must fall from the first full logged window to the last by more than two windows of one network
differ, and end below chance; Direct's detection loss, which has no chance level, must fall by ``--learned-drop`` (a
fraction). A ``--claim "A > B"`` is judged on
the per-seed differences of box AP, paired by seed: against B = scratch, A's AP minus that of scratch at A's
total FLOPs, interpolated linearly in log FLOPs on the same seed's scratch curve (every scratch run of that
seed, of any length); otherwise A's AP minus B's. A seed without a usable AP on either side is dropped and
named. The verdict is one of three outcomes of a one-sided paired t-test at 5%, each printed with n, the 5%
threshold t(0.95, n-1) x se and the difference the test detects with 80% power, (t(0.95, n-1) + t(0.80, n-1))
x sd / sqrt(n): "held" (the mean difference exceeds the threshold), "opposite" (it is below minus the
threshold: A significantly worse) or "inconclusive" (neither). Where there is no verdict, the claim says why in
one of two words (VERDICTS): "undecidable: <reason>" when the protocol's rules cannot judge it (a pretext that
did not learn, a cost beyond the seed's longest scratch run, every paired difference equal: a degenerate test),
"not evaluated: <reason>" when an input is missing (a row without a finished run, fewer than 2 seeds).
"""
import math
import re
import statistics

# The learning check, per pre-training stage, reads its pretext's measure against chance (common.pretext) in the
# first and last full logged windows: (the measure, the fall it must exceed, in nats). Learned when the measure
# falls by at least that much and ends below chance (< 0). The falls are protocol v4's, chosen on a pilot seed
# (100) before its runs: 3 standard deviations of the difference between two 10-iteration windows of one network
# (each stage run 100 iterations at lr 1e-12 with the protocol's settings: AlignDet 0.056, PreDet L_info 0.125
# and L_cls 0.033, Montage 0.027 nats), rounded up to 0.05 (RESULTS.md, protocol v4). PreDet's L_cls-only
# ablation logs no info_*: its cls_*.
PRETEXT_MEASURE = {"montage": ("cls_vs_chance", 0.10), "aligndet": ("contrast_vs_chance", 0.20),
                   "predet": ("info_vs_chance", 0.40), "predet-cls": ("cls_vs_chance", 0.10)}
# Direct's pretext is detection itself, whose loss has no chance level: its loss must fall by --learned-drop (a
# fraction). A stage logged before the measures existed (protocol v3 and earlier) is judged by that rule too, on
# the loss it was judged on then.
PRETEXT_LOSS = {"direct": "loss", "montage": "loss_cls", "aligndet": "loss_contrast", "predet": "loss_info"}
# One-sided quantiles of Student's t by degrees of freedom, t(0.95, df) and t(0.80, df): the one-sided 95% and
# 80% columns of the usual table of Student's t (e.g. Wikipedia, "Student's t-distribution", table of selected
# values; the 95% column also in NIST/SEMATECH e-Handbook of Statistical Methods, 1.3.6.7.2), recomputed here from
# the distribution's CDF (mpmath's regularized incomplete beta) to the 3 decimals shown. Past 10 the 10's: a
# little conservative (threshold and detectable difference a little larger than exact).
T95 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860, 9: 1.833, 10: 1.812}
T80 = {1: 1.376, 2: 1.061, 3: 0.978, 4: 0.941, 5: 0.920, 6: 0.906, 7: 0.896, 8: 0.889, 9: 0.883, 10: 0.879}
# paired differences of APs (numbers <= 1, float64) carry rounding errors near 1e-16: a spread below this is
# rounding, not seeds, and a t-test on it is degenerate
SD_ZERO = 1e-12
# "A > B": two row names (no '<', '>' or '=' in them) around one '>'
CLAIM = re.compile(r"\s*([^<>=\s](?:[^<>=]*[^<>=\s])?)\s*>\s*([^<>=\s](?:[^<>=]*[^<>=\s])?)\s*")
VERDICTS = """\
verdicts of a --claim "A > B" (one-sided paired t-test at 5%, by seed; printed with n, the 5% threshold and
the difference detectable with 80% power):
  held                  A's mean AP difference exceeds the threshold t(0.95, n-1) x se
  opposite              it is below minus the threshold: A significantly worse than B
  inconclusive          neither: within what the seeds' spread can tell
  undecidable: REASON   the protocol's rules cannot judge it (a pretext that did not learn, a cost beyond the
                        longest scratch run, every paired difference equal: a degenerate test)
  not evaluated: REASON an input is missing (a row without a finished run, fewer than 2 seeds in both rows)"""


def stages(meta):
    """A checkpoint's meta, then those of the checkpoints it started from (AlignDet's backbone, ...)."""
    if not meta:
        return []
    return [meta] + [s for k in ("init_meta", "backbone_meta") if isinstance(meta.get(k), dict) and meta[k]
                     for s in stages(meta[k])]


def pretext_checks(meta, drop):
    """[(learned: True/False/None, text)] per stage: its pretext's measure against chance in its last full logged
    window against its first (PRETEXT_MEASURE), or, for Direct and for stages logged before the measures, its loss's
    relative fall (``drop``)."""
    out = []
    for m in stages(meta):
        method, first, last = m.get("method"), m.get("losses_first") or {}, m.get("losses_last") or {}
        if method == "predet" and "info_vs_chance" not in first and "cls_vs_chance" in first:
            method = "predet-cls"
        key, fall = PRETEXT_MEASURE.get(method, (None, None))
        if key in first and key in last:
            learned = last[key] <= first[key] - fall and last[key] < 0
            acc = key.replace("vs_chance", "acc1")
            acc_text = (f"; top-1 {first[acc]:.2f} -> {last[acc]:.2f}, chance {last[acc + '_chance']:.2f}"
                        if acc in first and acc in last and acc + "_chance" in last else "")
            out.append((learned, f"{method} {key} {first[key]:+.3f} -> {last[key]:+.3f} nats (learned if it falls by "
                                 f">= {fall:.2f} and ends below chance){acc_text}"))
            continue
        key = PRETEXT_LOSS.get(method)
        if method == "predet" and key not in first:
            key = "loss_cls"
        if key not in first or key not in last:
            out.append((None, f"{method}: {key or 'its pretext loss'} not logged"))
            continue
        bound = (1 - drop) * first[key]
        out.append((last[key] <= bound, f"{method} {key} {first[key]:.3f} -> {last[key]:.3f} "
                                        f"(learned if <= {bound:.3f})"))
    return out


def check_summary(members):
    """The pretext check of a row's runs: 'n/a' (no pre-training), 'did not learn: ...' (a stage of a seed
    failed), 'not checked: ...' (a stage logged no pretext loss) or 'learned: ...', with each stage's losses."""
    checks = [(m.get("seed"), learned, text) for m in members for learned, text in m.get("checks") or []]
    if not checks:
        return "n/a"
    for verdict, value in (("did not learn", False), ("not checked", None)):
        failed = [f"seed {seed}: {text}" for seed, learned, text in checks if learned is value]
        if failed:
            return f"{verdict}: " + "; ".join(failed)
    return "learned: " + "; ".join(f"seed {seed}: {text}" for seed, _, text in checks)


def scratch_at(curve, flops):
    """The AP of scratch at ``flops``, read off one seed's scratch curve [(flops, AP)]: linear in log FLOPs
    between the two runs around it, the cheapest run's AP below it (scratch then had more compute), None
    beyond the longest run."""
    curve = sorted(curve)
    if flops > curve[-1][0]:
        return None
    if flops <= curve[0][0]:
        return curve[0][1]
    for (c0, a0), (c1, a1) in zip(curve, curve[1:]):
        if c0 <= flops <= c1:
            return a0 + (a1 - a0) * (math.log(flops) - math.log(c0)) / (math.log(c1) - math.log(c0))


def paired_test(diffs):
    """The one-sided paired t-test at 5% of per-seed differences A - B, both ways: {"diff": their mean, "sd",
    "n", "threshold": t(0.95, n-1) x se, "detectable": (t(0.95, n-1) + t(0.80, n-1)) x se (the difference found
    with 80% power), "verdict"}; se = sd / sqrt(n)."""
    n = len(diffs)
    if n == 0:
        return {"n": 0, "verdict": "not evaluated: no seed gives an AP on both sides"}
    mean = statistics.fmean(diffs)
    if n < 2:
        return {"diff": mean, "n": n, "verdict": "not evaluated: one seed gives no spread (a paired test needs 2 "
                                                 "or more; make demo-claims runs 3)"}
    sd = statistics.stdev(diffs)
    if sd <= SD_ZERO:
        return {"diff": mean, "sd": sd, "n": n, "verdict": f"undecidable: every paired difference is {mean:.3f} "
                                                           "(sd 0): the t-test is degenerate"}
    se, df = sd / math.sqrt(n), min(n - 1, 10)
    threshold, detectable = T95[df] * se, (T95[df] + T80[df]) * se
    verdict = "held" if mean > threshold else "opposite" if mean < -threshold else "inconclusive"
    return {"diff": mean, "sd": sd, "n": n, "threshold": threshold, "detectable": detectable, "verdict": verdict}


def parse_claim(text):
    """'A > B' -> (A, B); ValueError for anything else ('A>', '>B', 'A >= B', 'A > A', ...)."""
    match = CLAIM.fullmatch(text)
    if not match or match[1] == match[2]:
        raise ValueError(f"--claim {text!r}: expected two different row names around one '>' (A better than B), "
                         "e.g. \"direct-p1x > scratch\"")
    return match[1], match[2]


def _unusable(row, run):
    """Why a seed of ``row`` gives no AP to pair, or None."""
    if run is None:
        return f"no {row} run"
    if run["status"] != "done":
        return f"{row} {run['status'].split(':')[0]}"
    return f"{row}'s AP n/a" if run["AP"] is None else None


def scratch_curves(runs):
    """seed -> its scratch curve [(FLOPs, AP)] (every finished scratch run of that seed), or why it is not
    usable (a scratch run of that seed without a result, an AP or a FLOPs count)."""
    curves = {}
    for r in runs:
        if r["method"] != "scratch" or isinstance(curves.get(r["seed"]), str):
            continue
        missing = _unusable(r["row"], r) or (None if r["flops"] is not None else f"{r['row']} has no FLOPs count")
        if missing:
            curves[r["seed"]] = f"scratch curve incomplete: {missing}"
        else:
            curves.setdefault(r["seed"], []).append((r["flops"], r["AP"]))
    return curves


def _seed_order(seed):
    return (seed is None, seed or 0)


def judge(claim, by_row, curves, checks):
    """One claim: the module docstring. ``by_row``: row -> seed -> run record (any status); ``checks``: row ->
    its pretext check, for the rows with a finished run."""
    a, b = parse_claim(claim)
    missing = [x for x in (a, b) if x not in checks]
    if missing:
        return {"verdict": "not evaluated: " + " and ".join(f"row {x} has no finished run" for x in missing)}
    unlearned = [f"{x} {checks[x].split(':')[0]}" for x in (a, b) if checks[x].split(":")[0] in
                 ("did not learn", "not checked")]
    if unlearned:
        return {"verdict": "undecidable: the pretext of " + " and ".join(unlearned) + " (its pretext check)"}
    on_curve = b == "scratch" and any(r["method"] != "scratch" for r in by_row[a].values() if r["status"] == "done")
    baseline = "scratch at the same FLOPs (same seed's curve)" if on_curve else f"{b}, paired by seed"
    diffs, seeds, dropped = [], [], []
    for seed in sorted(set(by_row[a]) | set(by_row[b]), key=_seed_order):
        run, other = by_row[a].get(seed), by_row[b].get(seed)
        lacks = _unusable(a, run)
        if lacks is None and on_curve:
            curve = curves.get(seed, "no scratch run")
            lacks = curve if isinstance(curve, str) else None if run["flops"] is not None else f"{a} has no FLOPs count"
        elif lacks is None:
            lacks = _unusable(b, other)
        if lacks:
            dropped.append(f"{seed}: {lacks}")
            continue
        if on_curve:
            matched = scratch_at(curves[seed], run["flops"])
            if matched is None:
                return {"baseline": baseline, "verdict": f"undecidable: {a} (seed {seed}, {run['flops'] / 1e12:.2f} "
                                                         "TFLOP) costs more than the longest scratch run"}
        else:
            matched = other["AP"]
            if run["flops"] and other["flops"]:
                baseline = f"{b}, paired by seed (compute ratio {run['flops'] / other['flops']:.2f})"
        diffs.append(run["AP"] - matched)
        seeds.append(seed)
    return dict(paired_test(diffs), baseline=baseline, seeds=seeds, dropped=dropped)


def evaluate_claims(runs, table, claims):
    """[(claim "A > B", {"diff", "sd", "n", "threshold", "detectable", "baseline", "seeds", "dropped",
    "verdict"})] in the order given; ``runs``: every run's record (common.runs), ``table``: the table's rows."""
    by_row = {}
    for r in runs:
        by_row.setdefault(r["row"], {})[r["seed"]] = r
    curves = scratch_curves(runs)
    checks = {t["row"]: t["pretext check"] for t in table if t["status"] == "done"}
    return [(claim, judge(claim, by_row, curves, checks)) for claim in claims]
