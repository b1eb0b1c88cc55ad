"""Reading a directory of runs for the comparison (common.results): each fine-tuning run -> one record, whatever
it left behind.

A fine-tuning run is a directory whose args.json was written by finetune.py. Its record holds its row, seed,
COCO APs, compute (the fine-tune's training FLOPs plus those of every pre-training stage it started from;
device-hours beside), its pre-training's learning checks (common.claims) and the machines it ran on. Every file
is read defensively: one that cannot be read, does not parse or lacks what the table needs makes the run
"failed: unreadable <run>/<file> (<reason>)", never a crash, and a directory that cannot be listed (it may hold
a run) is "failed: unreadable directory". An AP that is NaN or negative (COCOeval's -1: no objects of that
size) is missing, None, never a number. A run without results.json is skipped or failed (its error.txt),
incomplete (trained but never evaluated, or how far it got), and an ``--expect``-ed fine-tune that never started
says why (its own error, or its pre-training's). The runs of one row are the Makefile's ft-<row>-s<seed>
directories (any other directory is a row of its own); two runs of one row and seed are refused, naming both,
since the table and the claims could not both know which one counts.
One module at ~300 lines: a record's status comes from every file of its run at once, each read with the same
defensive helpers (``_json``, ``_number``, ...).
"""
import json
import math
import os
import re

from common.claims import pretext_checks, stages
from common.errors import UserError
from common.metrics import read_jsonl

AP_COLUMNS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
BN_WORDS = {"frozen": "BN frozen", "affine": "BN affine only", "bn": "BN trains", "syncbn": "SyncBN trains"}


class Unreadable(Exception):
    """A run's file that the table cannot use; the message says why (its row: 'failed: unreadable ...')."""


def row_name(run_name):
    """ft-<row>-s<seed> -> <row>; any other run directory is a row of its own."""
    match = re.fullmatch(r"ft-(.+)-s\d+", run_name, re.S)
    return match[1] if match else run_name


def _seed_in_name(run_name):
    match = re.fullmatch(r"ft-.+-s(\d+)", run_name, re.S)
    return int(match[1]) if match else None


def _json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise Unreadable(e.strerror or str(e)) from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise Unreadable(str(e)) from None


def _short(value):
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _dict(value, what):
    if not isinstance(value, dict):
        raise Unreadable(f"{what} is {_short(value)}, expected an object")
    return value


def _key(obj, key, what):
    if key not in obj:
        raise Unreadable(f"{what} has no {key!r}")
    return obj[key]


def _number(value, what):
    """A number as a float, None where null or NaN."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Unreadable(f"{what} is {_short(value)}, expected a number")
    return None if math.isnan(value) else float(value)


def _ap(value, what):
    """A COCO AP; NaN and negative values (COCOeval's -1: nothing to measure) are missing."""
    value = _number(value, what)
    return None if value is None or value < 0 else value


def pretrain_total(meta, key):
    """The sum of ``key`` (device_hours, train_flops) over a pre-training's stages; None when one is unknown."""
    values = [_number(m.get(key), f"pretrain {key}") for m in stages(meta)]
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


def _recipe(recipe):
    """What the fine-tune applied (finetune.py's meta "recipe"), in a few words; '?' for runs that predate it."""
    if recipe is None:
        return "?"
    recipe = _dict(recipe, "finetune.recipe")
    protocol, bn, layers = (_key(recipe, k, "finetune.recipe") for k in ("protocol", "bn", "trainable_layers"))
    lr, wd = (_number(_key(recipe, k, "finetune.recipe"), f"finetune.recipe.{k}") for k in ("lr", "weight_decay"))
    if not (isinstance(protocol, str) and isinstance(bn, str) and type(layers) is int) or lr is None or wd is None:
        raise Unreadable(f"finetune.recipe is {_short(recipe)}, expected a protocol, bn, trainable_layers, lr and "
                         "weight_decay")
    frozen = 5 - layers
    return (f"{protocol}: {BN_WORDS.get(bn, bn)}, {f'{frozen} stages frozen' if frozen else 'nothing frozen'}, "
            f"lr {lr:.3g}, wd {wd:.2g}")


def _args(run_dir):
    args = _dict(_json(os.path.join(run_dir, "args.json")), "it")
    if not isinstance(_key(args, "init", "it"), str):
        raise Unreadable(f"init is {_short(args['init'])}, expected scratch, imagenet or a checkpoint's path")
    if args.get("seed") is not None and (isinstance(args["seed"], bool) or not isinstance(args["seed"], int)):
        raise Unreadable(f"seed is {_short(args['seed'])}, expected an integer")
    return args


def _finished(record, init, res, learned_drop):
    """The fields of a run with results (raises Unreadable where results.json lacks what they need)."""
    bbox = _dict(_key(res, "bbox", "it"), "bbox")
    aps = {k: _ap(_key(bbox, k, "bbox"), f"bbox.{k}") for k in AP_COLUMNS}
    mask = None if res.get("segm") is None else _ap(_key(_dict(res["segm"], "segm"), "AP", "segm"), "segm.AP")
    ft = _dict(_key(res, "finetune", "it"), "finetune")
    pre = _dict(res.get("pretrain") or {}, "pretrain")
    scratch = init == "scratch"
    try:  # every stage's meta as the learning checks read it
        checks = pretext_checks(pre, learned_drop)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise Unreadable(f"pretrain: {type(e).__name__}: {e}") from None
    pre_flops = 0.0 if scratch else pretrain_total(pre, "train_flops")
    ft_flops = _number(ft.get("train_flops"), "finetune.train_flops")
    total = None if pre_flops is None or ft_flops is None else pre_flops + ft_flops
    return dict(record, method=_method(init, pre), status="done", checks=checks, flops=total, **aps,
                machines={"fine-tune": ft.get("machine"), "pre-training": [m.get("machine") for m in stages(pre)]},
                **{"pre-train": _pretrain_schedule(init, pre), "fine-tune": str(ft.get("schedule")),
                   "recipe": _recipe(ft.get("recipe")), "mask AP": mask,
                   "pre-train TFLOP": None if pre_flops is None else pre_flops / 1e12,
                   "total TFLOP": None if total is None else total / 1e12,
                   "pre-train h": 0.0 if scratch else pretrain_total(pre, "device_hours"),
                   "fine-tune h": _number(ft.get("device_hours"), "finetune.device_hours"),
                   "device": ft.get("device_type")})


def read_run(run_dir, runs_dir, learned_drop=0.2):
    """One fine-tuning run -> the record of its row (numbers as floats, None where unknown), any status."""
    name, where = os.path.basename(os.path.normpath(run_dir)), os.path.relpath(run_dir, runs_dir)
    record = {"run": name, "dir": run_dir, "row": row_name(name), "seed": _seed_in_name(name), "method": "?"}
    try:
        args = _args(run_dir)
    except Unreadable as e:
        return dict(record, status=f"failed: unreadable {where}/args.json ({e})")
    init = args["init"]
    record.update(detector=args.get("detector"), backbone=args.get("backbone"),
                  seed=args.get("seed", record["seed"]))
    results = os.path.join(run_dir, "results.json")
    eval_only = False
    if os.path.lexists(results):
        try:
            res = _dict(_json(results), "it")
            eval_only = bool(res.get("eval_only"))
            if not eval_only:
                return _finished(record, init, res, learned_drop)
        except Unreadable as e:
            record["status"] = f"failed: unreadable {where}/results.json ({e})"
    known = init in ("scratch", "imagenet")
    record.update(method=init if known else os.path.basename(os.path.dirname(os.path.abspath(init))),
                  **{"pre-train": _pretrain_schedule(init, {}) if known else "?", "fine-tune": "?"})
    if "status" not in record:
        record["status"] = ("skipped: an evaluation without training (--eval-only)" if eval_only
                            else stage_status(run_dir, args))
    return record


def _progress(run_dir, args):
    """How far a run got: its last logged iteration, of how many (args.json's --iters / --max-iters)."""
    try:
        records = read_jsonl(os.path.join(run_dir, "log.txt"))
    except (OSError, ValueError) as e:
        return f"unreadable log.txt ({getattr(e, 'strerror', None) or e})"
    last = max((r["iteration"] for r in records if isinstance(r, dict) and type(r.get("iteration")) is int),
               default=None)
    if not last:
        return "no iteration logged"
    planned = [v for v in ((args or {}).get(k) for k in ("iters", "max_iters")) if type(v) is int and v > 0]
    return f"stopped after iteration {last}" + (f" of {min(planned)}" if planned else "")


def stage_status(run_dir, args=None):
    """Why a run has no results: 'skipped: ...' or 'failed: ...' (its error.txt), else 'incomplete: ...'
    (trained to its end but never evaluated, or how far it got)."""
    error = os.path.join(run_dir, "error.txt")
    if os.path.lexists(error):
        try:
            with open(error, errors="replace") as f:
                reason = f.read().strip()
        except OSError as e:
            return f"failed: unreadable error.txt ({e.strerror})"
        if not reason:
            return f"failed: no reason recorded (its error.txt is empty); {_progress(run_dir, args)}"
        return reason if reason.startswith("skipped: ") else "failed: " + reason
    if os.path.exists(os.path.join(run_dir, "model_final.pth")):
        return ("incomplete: trained to its end (model_final.pth), never evaluated (no results.json): the same "
                "command with --resume auto evaluates it")
    return "incomplete: " + _progress(run_dir, args)


def _args_or_none(run_dir):
    try:
        return _dict(_json(os.path.join(run_dir, "args.json")), "it")
    except Unreadable:
        return None


def missing_row(runs_dir, name):
    """The record of an expected fine-tune that left no finetune.py run: what became of it, or of the
    pre-training it needed (the Makefile's names: ft-<row>-s<seed> starts from <row>-s<seed>/ or <row>/)."""
    match = re.fullmatch(r"ft-(.+)-s(\d+)", name, re.S)
    row = {"run": name, "dir": os.path.join(runs_dir, name), "row": row_name(name), "seed": _seed_in_name(name),
           "method": match[1] if match else name}
    if os.path.isdir(row["dir"]):  # it stopped before writing args.json
        return dict(row, status=stage_status(row["dir"]))
    stage = next((s for s in ([f"{match[1]}-s{match[2]}", match[1]] if match else [])
                  if os.path.isdir(os.path.join(runs_dir, s))), None)
    if stage is None:
        return dict(row, status="not run: neither it nor a pre-training stage of that name started (an "
                                "earlier stage failed? see make's output)")
    stage_dir = os.path.join(runs_dir, stage)
    if os.path.exists(os.path.join(stage_dir, "model_final.pth")):
        return dict(row, status=f"not run: its pre-training {stage} finished, the fine-tune never started")
    return dict(row, status=f"not run: its pre-training {stage} did not finish: "
                            f"{stage_status(stage_dir, _args_or_none(stage_dir))}")


def find_runs(runs_dir):
    """The run directories under runs_dir (any depth, sorted): those whose args.json finetune.py wrote or that
    cannot be read (they may be fine-tunes: their rows say why not), and [(directory, reason)] of those that
    could not be listed."""
    found, unlisted = [], []
    for root, dirs, files in os.walk(runs_dir, onerror=lambda e: unlisted.append((e.filename, e.strerror))):
        dirs.sort()
        if "args.json" in files:
            args = _args_or_none(root)
            if args is None or args.get("script") == "finetune.py":
                found.append(root)
    return sorted(found), unlisted


def read_runs(runs_dir, expect=(), learned_drop=0.2):
    """Every run's record: the fine-tunes found, the directories that could not be listed and the expected
    runs that left no fine-tune. Refuses (UserError) an --expect name that is not a fine-tune's directory name
    and two runs of one row and seed."""
    found, unlisted = find_runs(runs_dir)
    if unlisted and unlisted[0][0] == runs_dir:
        raise UserError(f"{runs_dir}: cannot list it ({unlisted[0][1]})")
    records = [read_run(d, runs_dir, learned_drop) for d in found]
    for path, reason in unlisted:
        name = os.path.basename(os.path.normpath(path))
        records.append({"run": name, "dir": path, "row": row_name(name), "seed": _seed_in_name(name), "method": "?",
                        "status": f"failed: unreadable directory {os.path.relpath(path, runs_dir)} ({reason})"})
    _check_expect(runs_dir, expect, records)
    present = {r["run"] for r in records}
    records += [missing_row(runs_dir, name) for name in dict.fromkeys(expect) if name not in present]
    _refuse_duplicates(runs_dir, records)
    return records


def _check_expect(runs_dir, names, records):
    """--expect takes the fine-tunes' run directory names (ft-scratch-s0): a path, a row's name or a
    pre-training's directory is refused with one line."""
    present, rows = {r["run"] for r in records}, {}
    for r in records:
        rows.setdefault(r["row"], []).append(r["run"])
    for name in names:
        if name in present:
            continue
        if not name or os.sep in name or name in (".", ".."):
            raise UserError(f"--expect {name!r}: expected a run directory's name (e.g. ft-scratch-s0), not a path")
        if name in rows:
            raise UserError(f"--expect {name}: that is a row (its runs: {', '.join(sorted(rows[name]))}); --expect "
                            f"takes run directory names, e.g. {sorted(rows[name])[0]}")
        script = (_args_or_none(os.path.join(runs_dir, name)) or {}).get("script")
        if script not in (None, "finetune.py"):
            raise UserError(f"--expect {name}: {os.path.join(runs_dir, name)} is a {script} run, not a fine-tune; "
                            f"--expect takes the fine-tunes' run directory names (the one from it: ft-{name})")


def _refuse_duplicates(runs_dir, records):
    first = {}
    for r in records:
        other = first.setdefault((r["row"], r["seed"]), r)
        if other is not r:
            raise UserError(f"{other['dir']} and {r['dir']}: two runs of row {r['row']}, seed {r['seed']} (a copy? "
                            f"an older attempt?); the table and the claims would not know which one counts: move "
                            f"one out of {runs_dir}, or point at a directory that holds one")
