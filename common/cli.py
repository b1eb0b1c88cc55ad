"""Shared command-line flags and the one-line error contract of every script.

Every script builds its parser with ``argparse.ArgumentParser(parents=[cli.base_parser()])`` (DETR's
``get_args_parser(add_help=False)`` pattern) and runs ``cli.run(main, get_args_parser())``. A user
error (bad flag value, missing file, malformed annotation, wrong checkpoint) raises ``UserError`` (defined in
common.errors, below every module; a script raises it as ``cli.UserError``); ``run`` prints it as one line,
``error: <what is wrong and what was expected>``, and exits with status 2.
Every parser uses ``HelpFormatter``, so --help shows each flag's default.
"""
import argparse
import copy
import errno
import math
import os
import shutil
import sys

from common import dist
from common.errors import Unavailable, UserError


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows the default of every flag that has one, also of flags without a help text (argparse's
    ArgumentDefaultsHelpFormatter skips those); None and on/off switches show none (it would say nothing). A
    description or epilog keeps its lines as written (e.g. the table of words that common.results defines)."""

    def _shows_default(self, action):
        return (action.option_strings and action.default not in (None, argparse.SUPPRESS)
                and not isinstance(action.default, bool) and action.default != []
                and "%(default)" not in (action.help or ""))

    def _get_help_string(self, action):
        if not self._shows_default(action):
            return action.help
        return (action.help + " " if action.help else "") + "(default: %(default)s)"

    def _format_action(self, action):
        if not action.help and self._shows_default(action):
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)


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
    g.add_argument("--cudnn-benchmark", action="store_true", default=None,
                   help="on CUDA, let cuDNN time its algorithms for every new input shape of a convolution and keep "
                        "the fastest (torch.backends.cudnn.benchmark); pays when shapes repeat (--pad-multiple)")
    g.add_argument("--max-iters", type=int, default=None, help="stop after this many iterations (smoke runs)")
    g.add_argument("--print-freq", type=int, default=20, help="iterations between log lines")
    g.add_argument("--ckpt-every", type=int, default=1000,
                   help="iterations between checkpoints (checkpoint_last.pth, and checkpoint_<iteration>.pth of "
                        "which --keep-ckpts stay); one is also written at the last iteration and on a stop signal, "
                        "none at epoch ends; 0 = only those")
    g.add_argument("--keep-ckpts", type=int, default=2, help="periodic checkpoints to keep (checkpoint_last is extra)")
    g.add_argument("--skip-nonfinite", type=int, default=0,
                   help="tolerate up to N steps with a non-finite loss (skipped and counted); 0 = stop at the first")
    g.add_argument("--clip-grad", type=float, default=0.0, help="max gradient norm (0 = off)")
    g.add_argument("--dist-timeout", type=int, default=600, help="seconds before a stuck collective fails")
    g.add_argument("--no-tb", dest="tensorboard", action="store_false", help="disable TensorBoard logging")
    return p


# The numeric flags that several scripts share, and what each accepts; a flag a script lacks, or one left at
# None (the script's default then), is not checked. ``not (value > 0)`` also catches nan.
POSITIVE = ("batch_size", "eval_batch_size", "print_freq", "dist_timeout", "iters", "epochs", "max_iters")
POSITIVE_NUMBERS = ("lr", "base_lr", "mask_head_lr_mult")  # a value given replaces the default: 0 is no default
NON_NEGATIVE = ("workers", "warmup_iters", "ckpt_every", "keep_ckpts", "skip_nonfinite", "weight_decay",
                "eval_every")


def _flag(name):
    return "--" + name.replace("_", "-")


def _num(value):
    return f"{value:g}" if isinstance(value, float) else str(value)


def check_numbers(args):
    """The shared numeric checks (see POSITIVE...); raises UserError naming the flag and what it expects."""
    for name in POSITIVE:
        value = getattr(args, name, None)
        if value is not None and not value >= 1:
            raise UserError(f"{_flag(name)} {value}: expected a positive integer")
    for name in POSITIVE_NUMBERS:
        value = getattr(args, name, None)
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise UserError(f"{_flag(name)} {_num(value)}: expected a positive number (leave the flag out for "
                            "the default)")
    for name in NON_NEGATIVE:
        value = getattr(args, name, None)
        if value is not None and not (value >= 0 and math.isfinite(value)):
            raise UserError(f"{_flag(name)} {_num(value)}: expected 0 or more")
    clip = getattr(args, "clip_grad", None)
    if clip is not None and not (clip >= 0 and math.isfinite(clip)):
        raise UserError(f"--clip-grad {_num(clip)}: expected 0 (off) or a positive max gradient norm")
    momentum = getattr(args, "momentum", None)
    if momentum is not None and not 0 <= momentum < 1:
        raise UserError(f"--momentum {_num(momentum)}: expected a value in [0, 1)")
    steps = getattr(args, "lr_steps", None)
    if steps is not None and not (steps[0] >= 1 and all(a < b for a, b in zip(steps, steps[1:]))):
        raise UserError(f"--lr-steps {' '.join(map(str, steps))}: expected increasing positive epochs")


def check_args(args):
    """Checks that are common to every script; raises UserError."""
    for flag in ("train_images", "train_ann", "val_images", "val_ann", "data_path"):
        path = getattr(args, flag, None)
        if path is not None and not os.path.exists(path):
            raise UserError(f"--{flag.replace('_', '-')} {path}: no such file or directory")
    if args.amp == "fp16" and (args.device == "cpu" or not _cuda()):
        raise UserError("--amp fp16 needs a CUDA device (fp16 autocast is not supported on the CPU); "
                        "use --amp bf16 or --amp off")
    check_numbers(args)
    if args.resume not in (None, "auto") and not os.path.isfile(args.resume):
        raise UserError(f"--resume {args.resume}: no such file (expected 'auto' or a checkpoint path)")


# Measured: Mask R-CNN R50-FPN fine-tuning at 1333x800 on a 2-core CPU takes ~87 s per iteration of 2 images.
CPU_SECONDS_PER_IMAGE_AT_800 = 43


def warn_if_slow_on_cpu(device, iterations, images_per_iter, preset):
    """Warns (stderr) at start-up when a run on the CPU would take more than an hour, by a fixed rule: ~43 s
    per image at short side 800, scaling with the pixels (the short side squared). Returns the warning, or
    None. Cheap on purpose: nothing is timed."""
    from common.transforms import PRESETS  # noqa: PLC0415 (torchvision; not needed by the rest of cli)
    if device.type != "cpu":
        return None
    short_sides = PRESETS[preset][0]
    short = sum(short_sides) / len(short_sides)
    per_image = CPU_SECONDS_PER_IMAGE_AT_800 * (short / 800) ** 2
    hours = iterations * images_per_iter * per_image / 3600
    if hours < 1:
        return None
    advice = ("use fewer iterations (--iters N)" if preset == "cpu" else
              "the README's CPU configuration runs in minutes: --backbone resnet18 --preset cpu --anchor-scale 0.5 "
              "--rpn-batch-size 64 --roi-batch-size 64 --rpn-post-nms-train 300 --rpn-post-nms-test 100 "
              "--detector fasterrcnn --box-head 2fc --iters 60 (or run on a GPU)")
    message = (f"warning: on a CPU, {iterations} iterations of {images_per_iter} images at preset {preset} take "
               f"about {hours:.0f} h (~{per_image:.2g} s per image, measured with Mask R-CNN R50-FPN on 2 cores); "
               + advice)
    print(message, file=sys.stderr, flush=True)
    return message


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
    reason a run ends early, a crash included (its traceback is still printed), is left in error.txt.
    A run that ends normally leaves its process group (torchrun's) like nanoGPT's train.py does."""
    args = parser.parse_args(argv)
    try:
        main(args)
        dist.cleanup()
    except UserError as e:
        print(f"error: {user_message(e)}", file=sys.stderr, flush=True)
        record_error(args, user_message(e), skipped=isinstance(e, Unavailable))
        sys.exit(2)
    except OSError as e:
        if e.errno not in DISK_FAULTS:
            record_error(args, f"{type(e).__name__}: {user_message(e)} (a crash: see its traceback)")
            raise
        print(f"error: {disk_fault(e, args)}", file=sys.stderr, flush=True)
        record_error(args, disk_fault(e, args))  # usually impossible on that disk: then stderr is the record
        sys.exit(2)
    except Exception as e:
        record_error(args, f"{type(e).__name__}: {user_message(e)} (a crash: see its traceback)")
        raise


# a disk that cannot take a write (full, over quota, remounted read-only): the run stops at that write (checkpoint
# saves have a line of their own, with the size of the state: checkpoint.save)
DISK_FAULTS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def disk_fault(e, args):
    """The line of a write refused by the disk: the file (else the output directory), why, the space free."""
    where = e.filename or getattr(args, "output_dir", None) or os.getcwd()
    directory = where if os.path.isdir(where) else os.path.dirname(os.path.abspath(where))
    try:
        free = f", {shutil.disk_usage(directory).free / 2**20:.1f} MiB free there"
    except OSError:
        free = ""
    return (f"{where}: {e.strerror} while writing it{free}; the checkpoints written before are intact: free space "
            "there (or make it writable) and run the same command with --resume auto")


def record_error(args, message, skipped=False):
    """Leaves the reason a run stopped in <output-dir>/error.txt, where the results table reads it; where that
    cannot be written (a read-only or full disk), the line on stderr is the only record."""
    out = getattr(args, "output_dir", None)
    if out and os.environ.get("RANK", "0") == "0":
        try:
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "error.txt"), "w") as f:
                f.write(("skipped: " if skipped else "") + message + "\n")
        except OSError:
            pass
