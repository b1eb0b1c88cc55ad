"""The comparison table: every fine-tuning run of a runs directory -> results.md, results.csv, results.png.

    python -m common.results runs/demo                  # any directory holding finetune.py run directories
    python -m common.results runs/compare --expect ft-scratch-s0 ft-direct-p1x-s0 ... --claim "direct-p1x > scratch"

A fine-tuning run is a directory whose args.json was written by finetune.py. Its row comes from its
results.json (COCO stats, the fine-tune's compute and the meta of the checkpoint it started from). Compute is
training FLOPs (common.engine.Run.train_flops); a pre-training's is its checkpoint's plus those of the
checkpoints it started from (e.g. AlignDet's backbone); device-hours are shown beside, never compared. Runs of
one row (the Makefile's ft-<row>-s<seed> directories; any other directory is a row of its own) form one line:
mean ± sample std over the seeds, each seed's AP listed. A run without results.json appears as failed (its
error.txt) or incomplete (its last logged iteration), and an ``--expect``-ed fine-tune that never ran says
why (its own error, or its pre-training's): never zeros.

Every pre-training stage gets a learning check and the claims are judged as common.claims says.
"""
import argparse
import csv
import json
import math
import os
import re
import statistics
import sys

from common.claims import check_summary, evaluate_claims, pretext_checks, stages
from common.cli import HelpFormatter
from common.metrics import read_jsonl

AP_COLUMNS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
COLUMNS = ("row", "method", "detector", "backbone", "pre-train", "fine-tune", "recipe", *AP_COLUMNS, "mask AP",
           "AP by seed", "pre-train TFLOP", "total TFLOP", "pre-train h", "fine-tune h", "device", "seeds",
           "pretext check", "status")
NUMERIC = (*AP_COLUMNS, "mask AP", "pre-train TFLOP", "total TFLOP", "pre-train h", "fine-tune h")


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def pretrain_total(meta, key):
    """The sum of ``key`` (device_hours, train_flops) over a pre-training's stages; None when one is unknown."""
    values = [m.get(key) for m in stages(meta)]
    return None if not values or None in values else sum(values)


def _method(init, pretrain):
    if init in ("scratch", "imagenet"):
        return init
    return pretrain.get("method") or os.path.basename(os.path.dirname(os.path.abspath(init)))


def _pretrain_schedule(init, pretrain):
    if init == "scratch":
        return "none"
    if init == "imagenet":
        return "ImageNet-1k (torchvision)"
    return str(pretrain.get("schedule") or f"{pretrain.get('iterations', '?')} it")


def row_name(run_name):
    """ft-<row>-s<seed> -> <row>; any other run directory is a row of its own."""
    match = re.fullmatch(r"ft-(.+)-s\d+", run_name)
    return match[1] if match else run_name


def _recipe(recipe):
    """What the fine-tune applied (finetune.py's meta), in a few words."""
    if not recipe:
        return "?"
    bn = {"frozen": "BN frozen", "affine": "BN affine only", "bn": "BN trains", "syncbn": "SyncBN trains"}
    frozen = 5 - recipe["trainable_layers"]
    return (f"{recipe['protocol']}: {bn.get(recipe['bn'], recipe['bn'])}, "
            f"{f'{frozen} stages frozen' if frozen else 'nothing frozen'}, lr {recipe['lr']:.3g}, "
            f"wd {recipe['weight_decay']:.2g}")


def read_run(run_dir, learned_drop=0.2):
    """One fine-tuning run -> a dict of its row's fields (numbers as floats, None where unknown)."""
    args = _read_json(os.path.join(run_dir, "args.json"))
    name = os.path.basename(os.path.normpath(run_dir))
    results_path = os.path.join(run_dir, "results.json")
    row = {"run": name, "row": row_name(name), "detector": args.get("detector"), "backbone": args.get("backbone"),
           "seed": args.get("seed")}
    if os.path.exists(results_path) and not _read_json(results_path).get("eval_only"):
        res = _read_json(results_path)
        pre, ft = res.get("pretrain") or {}, res["finetune"]
        scratch = args["init"] == "scratch"
        pre_flops = 0.0 if scratch else pretrain_total(pre, "train_flops")
        total = None if pre_flops is None or ft.get("train_flops") is None else pre_flops + ft["train_flops"]
        row.update(method=_method(args["init"], pre), status="done", checks=pretext_checks(pre, learned_drop),
                   flops=total,
                   **{"pre-train": _pretrain_schedule(args["init"], pre), "fine-tune": str(ft.get("schedule")),
                      "recipe": _recipe(ft.get("recipe")),
                      "pre-train TFLOP": None if pre_flops is None else pre_flops / 1e12,
                      "total TFLOP": None if total is None else total / 1e12,
                      "pre-train h": 0.0 if scratch else pretrain_total(pre, "device_hours"),
                      "fine-tune h": ft["device_hours"], "device": ft.get("device_type")},
                   **{k: res["bbox"][k] for k in AP_COLUMNS},
                   **{"mask AP": res["segm"]["AP"] if "segm" in res else None})
        return row
    init = args.get("init", "?")
    known = init in ("scratch", "imagenet")
    row.update(method=init if known else os.path.basename(os.path.dirname(os.path.abspath(init))),
               **{"pre-train": _pretrain_schedule(init, {}) if known else "?", "fine-tune": "?"})
    row["status"] = stage_status(run_dir)
    return row


def stage_status(run_dir):
    """Why a run has no results: 'skipped: ...' or 'failed: ...' (its error.txt), else how far it got."""
    error = os.path.join(run_dir, "error.txt")
    if os.path.exists(error):
        with open(error) as f:
            reason = f.read().strip()
        return reason if reason.startswith("skipped: ") else "failed: " + reason
    last = max((r["iteration"] for r in read_jsonl(os.path.join(run_dir, "log.txt")) if "iteration" in r), default=None)
    return f"incomplete: stopped after iteration {last}" if last else "incomplete: no iteration logged"


def missing_row(runs_dir, name):
    """The row of an expected fine-tune that left no finetune.py run: what became of it, or of the
    pre-training it needed (the Makefile's names: ft-<row>-s<seed> starts from <row>-s<seed>/ or <row>/)."""
    match = re.fullmatch(r"ft-(.+)-s(\d+)", name)
    row = {"run": name, "row": row_name(name), "method": match[1] if match else name}
    if os.path.isdir(os.path.join(runs_dir, name)):  # it stopped before writing args.json
        return dict(row, status=stage_status(os.path.join(runs_dir, name)))
    stages = [f"{match[1]}-s{match[2]}", match[1]] if match else []
    stage = next((s for s in stages if os.path.isdir(os.path.join(runs_dir, s))), None)
    if stage is None:
        return dict(row, status="not run: neither it nor a pre-training stage of that name started (an "
                                "earlier stage failed? see make's output)")
    if os.path.exists(os.path.join(runs_dir, stage, "model_final.pth")):
        return dict(row, status=f"not run: its pre-training {stage} finished, the fine-tune never started")
    return dict(row, status=f"not run: its pre-training {stage} did not finish: "
                            f"{stage_status(os.path.join(runs_dir, stage))}")


def find_runs(runs_dir):
    """The finetune.py run directories under runs_dir (any depth), sorted."""
    found = []
    for root, _, files in os.walk(runs_dir):
        if "args.json" in files:
            try:
                if _read_json(os.path.join(root, "args.json")).get("script") == "finetune.py":
                    found.append(root)
            except json.JSONDecodeError:
                continue
    return sorted(found)


def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def aggregate(rows):
    """The runs of one row -> one line: mean and std of each number, the seeds, AP by seed. Runs that are
    not done share a line only when they stopped for the same reason (e.g. every seed skipped offline)."""
    groups = {}
    for r in rows:
        groups.setdefault((r["row"], r["status"]), []).append(r)
    out = []
    for members in groups.values():
        members.sort(key=lambda m: (m.get("seed") is None, m.get("seed")))
        first = members[0]
        row = {k: first.get(k) for k in COLUMNS if k not in NUMERIC}
        row["seeds"] = ",".join(str(m["seed"]) for m in members if m.get("seed") is not None) or "n/a"
        row["AP by seed"] = " ".join(f"{m['AP']:.3f}" for m in members if m.get("AP") is not None) or None
        row["pretext check"] = check_summary(members)
        for k in NUMERIC:
            row[k], row[k + " std"] = _mean_std([m.get(k) for m in members])
        out.append(row)
    return out


def claims_markdown(claims):
    lines = ["| claim | against | mean AP difference | sd | seeds | detectable (t x se) | verdict |",
             "|---|---|---|---|---|---|---|"]
    for claim, c in claims:
        lines.append(f"| {claim} | {c.get('baseline', '—')} | {_fmt(c.get('diff'), None, 3)} | "
                     f"{_fmt(c.get('sd'), None, 3)} | {c.get('n', '—')} | {_fmt(c.get('detectable'), None, 3)} | "
                     f"{c['verdict']} |")
    return "\n".join(lines) + "\n"


def _fmt(value, std, digits):
    if value is None:
        return "n/a"
    text = f"{value:.{digits}f}"
    return text + (f" ± {std:.{digits}f}" if std is not None else "")


def markdown(rows):
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = []
        for k in COLUMNS:
            if r["status"] != "done" and k in (*AP_COLUMNS, "mask AP", "AP by seed", "fine-tune h", "total TFLOP",
                                               "pretext check"):
                cells.append("—")
            elif k in (*AP_COLUMNS, "mask AP"):
                cells.append(_fmt(r[k] if r[k] is None or r[k] >= 0 else None, r[k + " std"], 3))
            elif k.endswith(" h"):
                cells.append(_fmt(r[k], r[k + " std"], 4))
            elif k.endswith("TFLOP"):
                cells.append(_fmt(r[k], r[k + " std"], 2))
            else:
                cells.append(str(r.get(k) if r.get(k) is not None else "n/a"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows, path):
    """AP against total training FLOPs: the scratch runs as a curve with a ±std band over seeds, every other
    row as a point with error bars (std over seeds)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    done = [r for r in rows if r["status"] == "done" and r["total TFLOP"] is not None]
    curve = sorted((r for r in done if r["method"] == "scratch"), key=lambda r: r["total TFLOP"])
    if curve:
        x = [r["total TFLOP"] for r in curve]
        y = [r["AP"] for r in curve]
        sd = [r["AP std"] or 0.0 for r in curve]
        ax.plot(x, y, "-o", color="0.3", label="scratch (1x, 2x, ... the fine-tune)")
        ax.fill_between(x, [a - d for a, d in zip(y, sd)], [a + d for a, d in zip(y, sd)], color="0.3", alpha=0.2)
    for r in done:
        if r["method"] != "scratch":
            ax.errorbar(r["total TFLOP"], r["AP"], yerr=r["AP std"] or 0, xerr=r["total TFLOP std"] or 0, fmt="o",
                        capsize=3, label=r["row"])
    ax.set_xscale("log")
    ax.set_xlabel("total training TFLOP (pre-training + fine-tuning)")
    ax.set_ylabel("box AP (mean ± std over seeds)")
    if done:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def write_results(runs_dir, expect=(), out_dir=None, claims=(), learned_drop=0.2, note=None):
    """Writes results.md (``note``, the table, then the claims), results.csv and results.png into out_dir
    (default runs_dir); returns (table rows, claims)."""
    out_dir = out_dir or runs_dir
    rows = [read_run(d, learned_drop) for d in find_runs(runs_dir)]
    present = {r["run"] for r in rows}
    rows += [missing_row(runs_dir, name) for name in expect if name not in present]
    table = aggregate(rows)
    verdicts = evaluate_claims(rows, table, claims)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write((note + "\n\n" if note else "") + markdown(table)
                + ("\n" + claims_markdown(verdicts) if verdicts else ""))
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        fields = [c for k in COLUMNS for c in ((k, k + " std") if k in NUMERIC else (k,))]
        writer = csv.DictWriter(f, fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows([{k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else v)
                           for k, v in r.items()} for r in table])
    plot(table, os.path.join(out_dir, "results.png"))
    return table, verdicts


def main(argv=None):
    parser = argparse.ArgumentParser(description="Collect fine-tuning runs into results.md/.csv/.png",
                                     formatter_class=HelpFormatter)
    parser.add_argument("runs_dir")
    parser.add_argument("--expect", nargs="*", default=[], help="run directory names that should exist")
    parser.add_argument("--out", default=None, help="where to write (default: runs_dir)")
    parser.add_argument("--claim", action="append", default=[], metavar='"A > B"',
                        help="a claim on two rows' box AP to test (repeatable)")
    parser.add_argument("--learned-drop", type=float, default=0.2,
                        help="a pretext learned when its loss fell by at least this fraction, first to last window")
    parser.add_argument("--note", default=None, help="a line written above the table (e.g. what it decides)")
    args = parser.parse_args(argv)
    if not 0 < args.learned_drop < 1:
        sys.exit(f"error: --learned-drop {args.learned_drop}: expected a fraction in (0, 1)")
    if not os.path.isdir(args.runs_dir):
        sys.exit(f"error: {args.runs_dir}: no such directory (expected a directory of finetune.py runs)")
    bad = [c for c in args.claim if c.count(">") != 1]
    if bad:
        sys.exit(f"error: --claim {bad[0]!r}: expected two row names around one '>', e.g. \"direct-p1x > scratch\"")
    table, verdicts = write_results(args.runs_dir, args.expect, args.out, args.claim, args.learned_drop, args.note)
    if args.note:
        print(args.note + "\n")
    print(markdown(table), end="")
    if verdicts:
        print("\n" + claims_markdown(verdicts), end="")
    print(f"wrote results.md, results.csv, results.png to {args.out or args.runs_dir}")


if __name__ == "__main__":
    main()
