"""How the comparison judges its claims (common.results writes them into its table).

Every pre-training stage gets a learning check: its pretext's measure against chance (PRETEXT_MEASURE,
common.pretext) must fall from the first full logged window to the last by more than two windows of one network
differ, and end below chance; Direct's detection loss, which has no chance level, must fall by ``--learned-drop`` (a
fraction). A ``--claim "A > B"`` is judged on
the per-seed differences of box AP, paired by seed: against B = scratch, A's AP minus that of scratch at A's
total FLOPs, interpolated linearly in log FLOPs on the same seed's scratch curve (every scratch run of that
seed, of any length; beyond its longest run the claim is undecidable); otherwise A's AP minus B's. It holds
when the mean difference exceeds t(0.95, n - 1) x its standard error (a one-sided paired t-test at 5%), the
smallest difference detectable at the observed spread, which is printed with it. A claim on a row whose
pretext did not learn (any seed, any stage) is undecidable; one seed decides nothing.
"""
import math
import statistics

# The learning check, per pre-training stage, reads its pretext's measure against chance (common.pretext) in the
# first and last full logged windows: (the measure, the fall it must exceed, in nats). Learned when the measure
# falls by at least that much and ends below chance (< 0). The falls are protocol v4's, chosen on pilot seeds
# before its runs, at about 4 standard deviations of the difference between two windows of the same network
# (the stage run at lr 1e-12; RESULTS.md, protocol v4). PreDet's L_cls-only ablation logs no info_*: its cls_*.
PRETEXT_MEASURE = {"montage": ("cls_vs_chance", 0.10), "aligndet": ("contrast_vs_chance", 0.10),
                   "predet": ("info_vs_chance", 0.10), "predet-cls": ("cls_vs_chance", 0.10)}
# Direct's pretext is detection itself, whose loss has no chance level: its loss must fall by --learned-drop (a
# fraction). A stage logged before the measures existed (protocol v3 and earlier) is judged by that rule too, on
# the loss it was judged on then.
PRETEXT_LOSS = {"direct": "loss", "montage": "loss_cls", "aligndet": "loss_contrast", "predet": "loss_info"}
# one-sided 95% quantiles of Student's t by degrees of freedom; past 10 the 10's (a little conservative)
T95 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860, 9: 1.833, 10: 1.812}


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
    """{"diff": mean, "sd", "n", "detectable": t(0.95, n-1) x standard error, "verdict"} of per-seed differences."""
    n = len(diffs)
    mean = statistics.fmean(diffs)
    if n < 2:
        return {"diff": mean, "n": n, "verdict": "undecided: one seed gives no spread (3 seeds: make demo-claims)"}
    sd = statistics.stdev(diffs)
    detectable = T95[min(n - 1, 10)] * sd / math.sqrt(n)
    return {"diff": mean, "sd": sd, "n": n, "detectable": detectable,
            "verdict": "held" if mean > detectable else "not held"}


def evaluate_claims(runs, table, claims):
    """[(claim "A > B", {"diff", "sd", "n", "detectable", "baseline", "verdict"})]: module docstring."""
    done = [r for r in runs if r["status"] == "done"]
    by_row = {}
    for r in done:
        by_row.setdefault(r["row"], {})[r["seed"]] = r
    curves = {}  # seed -> [(FLOPs, AP)] of its scratch runs
    for r in done:
        if r["method"] == "scratch" and r["flops"] is not None:
            curves.setdefault(r["seed"], []).append((r["flops"], r["AP"]))
    checks = {t["row"]: t["pretext check"] for t in table if t["status"] == "done"}
    out = []
    for claim in claims:
        a, b = (side.strip() for side in claim.split(">"))
        if a not in by_row or b not in by_row:
            out.append((claim, {"verdict": "not evaluated: " + " and ".join(
                f"row {x} has no results" for x in (a, b) if x not in by_row)}))
            continue
        unlearned = [f"{x} {checks[x].split(':')[0]}" for x in (a, b) if checks[x].split(":")[0] in
                     ("did not learn", "not checked")]
        if unlearned:
            out.append((claim, {"verdict": "undecidable: the pretext of " + " and ".join(unlearned) +
                                " (its pretext check)"}))
            continue
        diffs, baseline = [], ""
        for seed, run in sorted(by_row[a].items()):
            if b == "scratch" and run["method"] != "scratch":
                if run["flops"] is None or seed not in curves:
                    out.append((claim, {"verdict": f"undecidable: no FLOPs count or no scratch curve for seed {seed}"}))
                    break
                matched = scratch_at(curves[seed], run["flops"])
                if matched is None:
                    out.append((claim, {"verdict": f"undecidable: {a} (seed {seed}, {run['flops'] / 1e12:.2f} "
                                                   f"TFLOP) costs more than the longest scratch run"}))
                    break
                diffs.append(run["AP"] - matched)
                baseline = "scratch at the same FLOPs (same seed's curve)"
            elif seed in by_row[b]:
                diffs.append(run["AP"] - by_row[b][seed]["AP"])
                ratio = (run["flops"] / by_row[b][seed]["flops"]) if run["flops"] and by_row[b][seed]["flops"] else None
                baseline = f"{b}, paired by seed" + (f" (compute ratio {ratio:.2f})" if ratio else "")
        else:
            if not diffs:
                out.append((claim, {"verdict": f"not evaluated: rows {a} and {b} share no seed"}))
            else:
                out.append((claim, dict(paired_test(diffs), baseline=baseline)))
    return out
