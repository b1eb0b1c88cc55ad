"""The run directory: one run at a time in it, args.json as the record of what the run is, and what a resumed
run may change.

``prepare_output_dir`` (every script, before anything is written) gives an --output-dir to one run at a time:
rank 0 holds a flock on ``<output-dir>/.lock`` for the run's life, which the kernel drops when the process
dies, however it dies. ``HARMLESS_ON_RESUME`` and ``changed_flags`` are what ``common.train_state.resume``
checks: a resume continues the run that wrote the checkpoint, or is refused.
"""
import fcntl
import json
import os
import shutil
import socket
import sys
import time

from common import dist
from common.errors import UserError

LOCK_FILE = ".lock"
_run_lock = None  # rank 0's open, locked <output-dir>/.lock: held for the life of the process


def _lock_run_dir(out):
    """Takes an exclusive flock on <out>/.lock for the rest of this process' life, or raises UserError naming
    the process that holds it. The kernel drops the lock when the process ends, however it ends (SIGKILL
    included), so a crashed run never leaves it stuck."""
    global _run_lock
    if _run_lock is not None:  # one run per process (a second main() in the same process)
        _run_lock.close()
        _run_lock = None
    try:  # the run's first write into its directory
        os.makedirs(out, exist_ok=True)
        f = open(os.path.join(out, LOCK_FILE), "a+")
    except OSError as e:  # read-only file system, no permission, a file of that name...
        raise UserError(f"--output-dir {out}: cannot write there ({e.strerror}); expected a directory this run "
                        "can write to") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "a process that has not written its id yet"
        f.close()
        raise UserError(f"{out} is in use by another run ({holder}); wait for it to end or stop it, or choose "
                        "another --output-dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    _run_lock = f


def _drop_lock_in_child():
    """A forked child (a DataLoader worker) closes its copy of the lock's descriptor: the lock stays with the
    main process (a flock belongs to the open file, which the parent keeps open) and dies with it, also while
    an orphaned worker is still shutting down."""
    global _run_lock
    if _run_lock is not None:
        _run_lock.close()
        _run_lock = None


os.register_at_fork(after_in_child=_drop_lock_in_child)


def prepare_output_dir(args, default):
    """Sets args.output_dir (default runs/<script>/<tag>), locks it for this run (rank 0, for the life of the
    process), refuses to silently reuse a finished or started run (resume it or pass --overwrite), and writes
    args.json: the record of what the run is, kept as it is when the run is resumed (or evaluated)."""
    args.output_dir = args.output_dir or default
    out = args.output_dir
    error = None
    if dist.is_main_process():
        try:
            _lock_run_dir(out)
        except UserError as e:
            error = str(e)
    started = any(os.path.exists(os.path.join(out, f)) for f in ("checkpoint_last.pth", "model_final.pth"))
    if error is None and started and not args.overwrite and not args.resume and not getattr(args, "eval_only", False):
        error = (f"{out} already holds a run; add --resume auto to continue it, --overwrite to start over, or "
                 "choose another --output-dir")
    error = dist.broadcast_object(error)  # every rank leaves the same way
    if error is not None:
        args.output_dir = None  # another run's directory: nothing of this attempt goes there (no error.txt)
        raise UserError(error)
    if started and args.overwrite and dist.is_main_process():
        for name in os.listdir(out):  # everything but the lock this run holds
            path = os.path.join(out, name)
            if name != LOCK_FILE:
                shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    dist.barrier()
    if dist.is_main_process():
        if os.path.exists(os.path.join(out, "error.txt")):
            os.remove(os.path.join(out, "error.txt"))  # a new attempt: the last one's error is stale
        log = os.path.join(out, "log.txt")
        if not started and not getattr(args, "eval_only", False) and os.path.exists(log):
            os.remove(log)  # an attempt killed before its first checkpoint: this one starts again at iteration 0
        record = os.path.join(out, "args.json")
        if not (started and not args.overwrite and os.path.exists(record)):
            with open(record, "w") as f:
                json.dump({"script": os.path.basename(sys.argv[0]), **vars(args)}, f, indent=1)
    return out


# Flags that leave the rest of a resumed run bit-identical (and its evaluation the same): a resume may change
# them (they are logged); any other difference is refused, since it would not continue the same run.
HARMLESS_ON_RESUME = {
    "resume": "how this attempt starts", "overwrite": "how this attempt starts",
    "output_dir": "where the files go", "data_cache": "where generated data goes (generated the same)",
    "print_freq": "logging only (and how often ranks agree on a stop)", "tensorboard": "logging only",
    "ckpt_every": "checkpoint files only", "keep_ckpts": "checkpoint files only",
    "dist_timeout": "how long a stuck collective waits",
    "workers": "the data are a function of (seed, epoch, position), not of the worker (common.loader)",
    "max_iters": "where this attempt stops; the schedule comes from the other flags",
    "skip_bad_images": "a bad image stops the run without it, is skipped with it: no run differs in its numbers",
    "no_eval": "whether the final evaluation runs", "eval_backend": "the same COCO stats either way",
}


def flag_change(dest, old, new):
    """'--flag old -> new' as on the command line."""
    if dest == "tensorboard":  # --no-tb stores False in args.tensorboard
        return f"--no-tb {old is False} -> {new is False}"
    return f"--{dest.replace('_', '-')} {old} -> {new}"


# Flags each script records as it resolved them (the lr scaled to the batch, the capped warm-up), so that a value
# given equal to the run's is no change; in a checkpoint written before the scripts did, None (the script's
# default then), which is not compared: such a run stays resumable.
RESOLVED_BY_THE_SCRIPT = ("lr", "warmup_iters")
# flags added after runs had been written: a checkpoint without one ran as this value does
ADDED_FLAGS = {"predet_color_strength": 1.0}


def changed_flags(old, new):
    """{dest: [old value, new value]} of the flags that differ (a flag missing on one side is None there)."""
    old = {**{k: v for k, v in ADDED_FLAGS.items() if k in new}, **old}
    return {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)
            and not (k in RESOLVED_BY_THE_SCRIPT and old.get(k) is None)}


def resume_changes(path, saved, args):
    """The flags of a resumed run that differ from those ``saved`` in its checkpoint at ``path``: one line
    refusing any that would not continue the same run (an --eval-only run needs the weights only), else
    {flag: [old, new]} of the harmless ones, printed (the run logs them)."""
    changed = changed_flags(saved, vars(args))
    if getattr(args, "eval_only", False):
        return {}
    refused = {k: v for k, v in changed.items() if k not in HARMLESS_ON_RESUME}
    if refused:
        raise UserError(f"{path} was written by a run with other flags: " + ", ".join(
            flag_change(k, *values) for k, values in refused.items()) + "; resuming with them would not continue "
            "that run: restore them, or start a new run in another --output-dir")
    logged = {k: v for k, v in changed.items() if k not in ("resume", "overwrite")}
    if logged:
        print("resuming with changed flags that leave the run as it was: " + ", ".join(
            flag_change(k, *values) for k, values in logged.items()))
    return logged
