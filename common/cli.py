"""Shared command-line flags and the one-line error contract of every script.

Every script builds its parser with ``argparse.ArgumentParser(parents=[cli.base_parser()])`` (DETR's
``get_args_parser(add_help=False)`` pattern) and runs ``cli.run(main, get_args_parser())``. A user
error (bad flag value, missing file, malformed annotation, wrong checkpoint) raises ``UserError``; ``run``
prints it as one line, ``error: <what is wrong and what was expected>``, and exits with status 2.
"""
import argparse
import os
import sys


class UserError(Exception):
    """An error in the user's input: printed as one line, no traceback."""


class Unavailable(UserError):
    """An external resource the run needs (e.g. downloadable weights) cannot be had here: the run is
    reported as skipped, with the reason, rather than as failed."""


def base_parser():
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("data (default: the embedded synthetic shapes set, generated on first use)")
    g.add_argument("--data-path", default=None,
                   help="COCO root (train2017/ val2017/ annotations/instances_*2017.json) or a folder with "
                        "images/ + annotations.json (then train = val)")
    g.add_argument("--train-images", default=None, help="custom COCO-format set: training image folder")
    g.add_argument("--train-ann", default=None, help="custom COCO-format set: training annotation JSON")
    g.add_argument("--val-images", default=None, help="custom COCO-format set: validation image folder")
    g.add_argument("--val-ann", default=None, help="custom COCO-format set: validation annotation JSON")
    g.add_argument("--data-cache", default="data", help="where generated data (synthetic set, caches) goes")
    g.add_argument("--workers", type=int, default=4, help="data-loading worker processes per GPU")
    g.add_argument("--skip-bad-images", action="store_true",
                   help="skip (and count) unreadable images instead of stopping with an error")

    g = p.add_argument_group("run")
    g.add_argument("--output-dir", default=None, help="run directory (default: runs/<script>/<tag>)")
    g.add_argument("--overwrite", action="store_true", help="start over in an existing run directory")
    g.add_argument("--resume", default=None, help="'auto' (newest checkpoint of --output-dir) or a checkpoint_*.pth")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                   help="mixed precision: auto = bf16 on GPUs that support it, else fp16; off on CPU")
    g.add_argument("--channels-last", action="store_true", help="channels_last memory format for the model")
    g.add_argument("--max-iters", type=int, default=None, help="stop after this many iterations (smoke runs)")
    g.add_argument("--print-freq", type=int, default=20, help="iterations between log lines")
    g.add_argument("--ckpt-every", type=int, default=1000, help="iterations between periodic checkpoints")
    g.add_argument("--keep-ckpts", type=int, default=2, help="periodic checkpoints to keep (checkpoint_last is extra)")
    g.add_argument("--skip-nonfinite", type=int, default=0,
                   help="tolerate up to N steps with a non-finite loss (skipped and counted); 0 = stop at the first")
    g.add_argument("--clip-grad", type=float, default=0.0, help="max gradient norm (0 = off)")
    g.add_argument("--dist-timeout", type=int, default=600, help="seconds before a stuck collective fails")
    g.add_argument("--no-tb", dest="tensorboard", action="store_false", help="disable TensorBoard logging")
    return p


def check_args(args):
    """Checks that are common to every script; raises UserError."""
    for flag in ("train_images", "train_ann", "val_images", "val_ann", "data_path"):
        path = getattr(args, flag, None)
        if path is not None and not os.path.exists(path):
            raise UserError(f"--{flag.replace('_', '-')} {path}: no such file or directory")
    if args.amp == "fp16" and (args.device == "cpu" or not _cuda()):
        raise UserError("--amp fp16 needs a CUDA device (fp16 autocast is not supported on the CPU); "
                        "use --amp bf16 or --amp off")
    if getattr(args, "batch_size", 1) < 1:
        raise UserError(f"--batch-size {args.batch_size}: expected a positive integer")
    if args.resume not in (None, "auto") and not os.path.isfile(args.resume):
        raise UserError(f"--resume {args.resume}: no such file (expected 'auto' or a checkpoint path)")


def _cuda():
    import torch
    return torch.cuda.is_available()


def user_message(exc):
    """The one-line message of an exception, also when it was re-raised from a DataLoader worker."""
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else type(exc).__name__
    if "Original Traceback" in str(exc) and ": " in last:
        last = last.split(": ", 1)[1]  # "common.data.BadImageError: path: reason" -> "path: reason"
    return last


def run(main, parser, argv=None):
    """Parses argv and runs main(args); user errors become one line on stderr and exit status 2. Every
    reason a run ends early, a crash included (its traceback is still printed), is left in error.txt."""
    args = parser.parse_args(argv)
    try:
        main(args)
    except UserError as e:
        print(f"error: {user_message(e)}", file=sys.stderr, flush=True)
        record_error(args, user_message(e), skipped=isinstance(e, Unavailable))
        sys.exit(2)
    except Exception as e:
        record_error(args, f"{type(e).__name__}: {user_message(e)} (a crash: see its traceback)")
        raise


def record_error(args, message, skipped=False):
    """Leaves the reason a run stopped in <output-dir>/error.txt, where the results table reads it."""
    out = getattr(args, "output_dir", None)
    if out and os.environ.get("RANK", "0") == "0":
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "error.txt"), "w") as f:
            f.write(("skipped: " if skipped else "") + message + "\n")
