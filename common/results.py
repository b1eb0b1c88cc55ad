"""The comparison table: every fine-tuning run of a runs directory -> results.md, results.csv, claims.csv and
results.png.

    python -m common.results runs/demo                  # any directory holding finetune.py run directories
    python -m common.results runs/compare --expect ft-scratch-s0 ft-direct-p1x-s0 ... --claim "direct-p1x > scratch"

Each run is read as common.runs says (one bad run is one row, never a crashed table). Compute is training FLOPs
(common.accounting: train_flops); device-hours are shown beside, never compared. Runs of one row form one line:
mean ± sample std over the seeds whose value is known, each seed's AP listed; runs that are not done share a
line only when they stopped for the same reason. Every pre-training stage gets a learning check and the claims
are judged as common.claims says. Every table names the machines its runs ran on. Each output is written
whole or not at all (common.atomic): a crash mid-write leaves the previous one.
"""
import argparse
import csv
import io
import math
import os
import statistics
import sys

from common import atomic
from common.claims import VERDICTS, check_summary, evaluate_claims, parse_claim
from common.cli import HelpFormatter
from common.errors import UserError
from common.runs import AP_COLUMNS, read_runs

COLUMNS = ("row", "method", "detector", "backbone", "pre-train", "fine-tune", "recipe", *AP_COLUMNS, "mask AP",
           "AP by seed", "pre-train TFLOP", "total TFLOP", "pre-train h", "fine-tune h", "device", "seeds",
           "pretext check", "status")
NUMERIC = (*AP_COLUMNS, "mask AP", "pre-train TFLOP", "total TFLOP", "pre-train h", "fine-tune h")
CLAIM_COLUMNS = ("claim", "against", "n", "seeds", "dropped seeds", "mean AP difference", "sd",
                 "5% threshold (t x se)", "detectable at 80% power", "verdict")
STATUSES = """\
a run's status: done; skipped: REASON (e.g. ImageNet weights offline); failed: REASON (its error.txt, or
"unreadable <run>/<file> (<reason>)"); incomplete: REASON (trained but never evaluated, or stopped after
iteration i of n); not run: REASON (an --expect-ed fine-tune, or its pre-training, never finished). APs that are
NaN or -1 (COCO's "no value") are missing (n/a), never averaged or paired.

exit status: 0 every run done or skipped; 1 a run failed or unreadable, or an --expect-ed one has no results
(the table is still written); 2 bad input (a flag, a malformed or unknown --claim, two runs of one row and
seed, no run at all), a line saying so and nothing written."""


def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _seed_order(record):
    return (record.get("seed") is None, record.get("seed") or 0)


def aggregate(records):
    """The runs of one row -> one line: mean and std of each number (over the seeds where it is known), the
    seeds, AP by seed. Runs that are not done share a line only when they stopped for the same reason (e.g.
    every seed skipped offline)."""
    groups = {}
    for r in records:
        groups.setdefault((r["row"], r["status"]), []).append(r)
    out = []
    for members in groups.values():
        members.sort(key=_seed_order)
        row = {k: members[0].get(k) for k in COLUMNS if k not in NUMERIC}
        row["seeds"] = ",".join(str(m["seed"]) for m in members if m.get("seed") is not None) or "n/a"
        row["AP by seed"] = (" ".join("n/a" if m["AP"] is None else f"{m['AP']:.3f}" for m in members)
                             if row["status"] == "done" else None)
        row["pretext check"] = check_summary(members)
        row["machines"] = sorted({d for m in members for d in _machines(m)})
        for k in NUMERIC:
            row[k], row[k + " std"] = _mean_std([m.get(k) for m in members])
        out.append(row)
    return out


def describe_machine(machine):
    """A meta's "machine" ({cpu, cpu_capability, threads, torch, gpu}) in words; 'unknown' where a run predates
    it or it is malformed."""
    if not isinstance(machine, dict) or not machine:
        return "unknown"
    known = {k: machine.get(k) if machine.get(k) not in (None, "") else "?" for k in ("cpu", "cpu_capability",
                                                                                      "threads", "torch")}
    threads = f"{known['threads']} thread" + ("" if known["threads"] == 1 else "s")
    return (f"{known['cpu']} ({known['cpu_capability']}, {threads}), torch {known['torch']}, "
            f"GPU: {machine.get('gpu') or 'none'}")


def _machines(record):
    """The machines of a run (its fine-tune's, then each pre-training stage's), in words."""
    if "machines" not in record:
        return []
    return [describe_machine(m) for m in (record["machines"]["fine-tune"], *record["machines"]["pre-training"])]


def machines_text(records):
    """The machines the table's runs ran on: one line when one machine (or none recorded), else one line per
    machine with the rows whose fine-tunes or pre-trainings ran on it."""
    on = {}
    for r in records:
        for i, desc in enumerate(_machines(r)):
            on.setdefault(desc, set()).add(r["row"] + (" (pre-training)" if i else ""))
    if not on:
        return "Machine: none (no run finished)."
    if len(on) == 1:
        return f"Machine: {_cell(next(iter(on)))} (every run of this table)."
    return "\n".join(["Machines: the runs of this table do not all come from one machine:"]
                     + [f"- {_cell(desc)}: {_cell(', '.join(sorted(rows)))}" for desc, rows in sorted(on.items())])


def _cell(value):
    """Text that cannot break a markdown table: backslashes and '|' escaped, line breaks as spaces."""
    text = str(value).replace("\\", "\\\\").replace("|", "\\|")
    return " ".join(text.split("\n")).replace("\r", " ")


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
                cells.append(_fmt(r[k], r[k + " std"], 3))
            elif k.endswith(" h"):
                cells.append(_fmt(r[k], r[k + " std"], 4))
            elif k.endswith("TFLOP"):
                cells.append(_fmt(r[k], r[k + " std"], 2))
            else:
                cells.append(_cell(r.get(k) if r.get(k) is not None else "n/a"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _claim_cells(claim, c):
    return (claim, c.get("baseline"), c.get("n"), ",".join(map(str, c.get("seeds", ()))) or None,
            "; ".join(c.get("dropped", ())) or None, c.get("diff"), c.get("sd"), c.get("threshold"),
            c.get("detectable"), c["verdict"])


def claims_markdown(claims):
    lines = ["| " + " | ".join(CLAIM_COLUMNS) + " |", "|" + "---|" * len(CLAIM_COLUMNS)]
    for claim, c in claims:
        cells = _claim_cells(claim, c)
        lines.append("| " + " | ".join([_cell(v if v is not None else "—") for v in cells[:5]]
                                       + [_fmt(v, None, 3) for v in cells[5:9]] + [_cell(cells[9])]) + " |")
    return "\n".join(lines) + "\n"


def _csv(header, rows):
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows([["" if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in row]
                      for row in rows])
    return buffer.getvalue()


def plot(rows, f):
    """AP against total training FLOPs into the file object ``f`` (PNG): the scratch runs as a curve with a ±std
    band over seeds, every other row as a point with error bars (std over seeds)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    done = [r for r in rows if r["status"] == "done" and r["total TFLOP"] is not None and r["AP"] is not None]
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
    fig.savefig(f, format="png")
    plt.close(fig)


def _check_claims(claims, records):
    """Each claim well formed and on rows of the table (UserError otherwise, one line)."""
    rows = sorted({r["row"] for r in records})
    for claim in claims:
        try:
            sides = parse_claim(claim)
        except ValueError as e:
            raise UserError(str(e)) from None
        unknown = [x for x in sides if x not in rows]
        if unknown:
            raise UserError(f"--claim {claim!r}: no row {' and no row '.join(unknown)} in the table (its rows: "
                            f"{', '.join(rows)}; names are case-sensitive)")


def write_results(runs_dir, expect=(), out_dir=None, claims=(), learned_drop=0.2, note=None):
    """Writes results.md (``note``, the machines, the table, then the claims), results.csv, claims.csv (its
    header alone without claims) and results.png into out_dir (default runs_dir), each atomically; returns
    (table rows, claims, run records). Bad input raises UserError before anything is written."""
    out_dir = out_dir or runs_dir
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out {out_dir}: a file; expected a directory to write the tables into")
    records = read_runs(runs_dir, expect, learned_drop)
    if not records:
        raise UserError(f"{runs_dir}: no fine-tuning run under it (a directory whose args.json finetune.py wrote) "
                        "and none --expect-ed; nothing written")
    _check_claims(claims, records)
    table = aggregate(records)
    verdicts = evaluate_claims(records, table, claims)
    md = ((note + "\n\n" if note else "") + machines_text(records) + "\n\n" + markdown(table)
          + ("\n" + claims_markdown(verdicts) if verdicts else ""))
    fields = [c for k in COLUMNS for c in ((k, k + " std") if k in NUMERIC else (k,))] + ["machine"]
    table_csv = _csv(fields, [[r.get(k) for k in fields[:-1]] + ["; ".join(r["machines"])]
                              for r in table])
    outputs = [("results.md", md), ("results.csv", table_csv),
               ("claims.csv", _csv(CLAIM_COLUMNS, [_claim_cells(claim, c) for claim, c in verdicts]))]
    for name, text in outputs:
        with atomic.replacing(os.path.join(out_dir, name), newline="") as f:
            f.write(text)
    with atomic.replacing(os.path.join(out_dir, "results.png"), "wb") as f:
        plot(table, f)
    return table, verdicts, records


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m common.results", formatter_class=HelpFormatter,
                                     description="Collect fine-tuning runs into results.md, results.csv, "
                                                 "claims.csv and results.png",
                                     epilog=f"{STATUSES}\n\n{VERDICTS}")
    parser.add_argument("runs_dir")
    parser.add_argument("--expect", nargs="*", default=[], metavar="RUN_DIR",
                        help="run directory names that should exist, e.g. ft-scratch-s0 (not row names)")
    parser.add_argument("--out", default=None, help="where to write (default: runs_dir)")
    parser.add_argument("--claim", action="append", default=[], metavar='"A > B"',
                        help="a claim on two rows' box AP to test (repeatable)")
    parser.add_argument("--learned-drop", type=float, default=0.2,
                        help="a pretext learned when its loss fell by at least this fraction, first to last window")
    parser.add_argument("--note", default=None, help="a line written above the table (e.g. what it decides)")
    args = parser.parse_args(argv)
    out = args.out or args.runs_dir
    try:
        if not 0 < args.learned_drop < 1:
            raise UserError(f"--learned-drop {args.learned_drop}: expected a fraction in (0, 1)")
        if not os.path.isdir(args.runs_dir):
            raise UserError(f"{args.runs_dir}: no such directory (expected a directory of finetune.py runs)")
        table, verdicts, records = write_results(args.runs_dir, args.expect, args.out, args.claim, args.learned_drop,
                                                 args.note)
    except UserError as e:
        _exit(2, f"error: {e}")
    except OSError as e:  # a write refused (full disk, file-size limit, read-only): each output is whole or old
        _exit(2, f"error: {e.filename or out}: {e.strerror} while writing the tables into {out}; every file there "
                 "holds its previous content or the new one in full")
    if args.note:
        print(args.note + "\n")
    print(machines_text(records) + "\n")
    print(markdown(table), end="")
    if verdicts:
        print("\n" + claims_markdown(verdicts), end="")
    print(f"wrote results.md, results.csv, claims.csv, results.png to {out}")
    bad = [r for r in records if r["status"].startswith(("failed", "not run"))
           or (r["run"] in args.expect and r["status"] != "done" and not r["status"].startswith("skipped"))]
    if bad:
        _exit(1, f"{len(bad)} of {len(records)} runs have no results: "
                 + "; ".join(f"{r['run']} {r['status'].split(':')[0]}" for r in bad) + " (the table says why)")


def _exit(status, line):
    print(line, file=sys.stderr, flush=True)
    sys.exit(status)


if __name__ == "__main__":
    main()
