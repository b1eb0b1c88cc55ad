"""One checkpoint contract for every script, written atomically and read with ``weights_only=True``.

- ``checkpoint_last.pth`` and the periodic ``checkpoint_<iteration>.pth`` hold the full training state:
  ``{"kind": "train_state", "model", "optimizer", "scaler", "iteration", "elapsed", "rng" and "meters" (one
  entry per rank: its random streams, its loss sums of the logging interval and of the epoch), "extra" (method
  state: EMA teacher, ERF weights, ...), "args" (a plain dict), "meta"}``.
  ``--resume`` reads them; when they are written and what goes in: common.train_state.
- ``model_final.pth`` holds the weights to transfer: ``{"kind": "final", "model": state_dict, "meta":
  {method, detector, backbone, num_classes, parts, iterations, images_seen, wall_clock_s, world_size,
  device_type, device_hours, ...}}``. ``--init`` reads it through ``load_pretrained``.
Every file is written to a temporary name in the same directory and renamed, so a kill at any moment
leaves the previous file intact; its mode follows the umask, as every other file of a run does (a results
folder shared by a group). Nothing in a checkpoint is executable: only tensors and plain containers.
"""
import collections
import errno
import glob
import os
import pickle
import pickletools
import random
import re
import shutil
import sys

import numpy as np
import torch

from common import atomic, dist, formats
from common.detectors import PART_NAMES, part_of, parts_of
from common.errors import UserError


class _Writes:
    """A file as torch.save writes to it, keeping the OSError of a failed write (torch reports it as a
    RuntimeError without the errno); with ``f=None`` it only counts the bytes."""

    def __init__(self, f=None):
        self.f, self.size, self.error = f, 0, None

    def write(self, data):
        try:
            written = self.f.write(data) if self.f is not None else len(data)
        except OSError as e:
            self.error = e
            raise
        self.size += written
        return written

    def flush(self):
        if self.f is not None:
            self.f.flush()


def save(obj, path, dump=None):
    """``dump`` (default torch.save; pickle.dump for a .pkl) through common.atomic.replacing (temp file + fsync +
    rename): the file at ``path`` is always complete, its mode follows the umask. A full disk is one line
    (UserError) naming the directory, the space the state needs and what is free there."""
    dump = dump or torch.save
    writes = None
    try:
        with atomic.replacing(path, "wb") as f:
            writes = _Writes(f)
            dump(obj, writes)
    except BaseException as e:
        error = e if isinstance(e, OSError) else getattr(writes, "error", None)
        if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(_no_space(obj, path, dump)) from None
        raise


def _no_space(obj, path, dump):
    """The line of a save that found no space: the directory, the size of the state (serialised again, into
    nothing), the space free there, and that the previous file is intact."""
    counter = _Writes()
    dump(obj, counter)
    directory, name = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    left = f"the previous {name} is intact" if os.path.exists(path) else f"{name} was not written"
    return (f"{directory}: no space left on the device: {name} needs {_size(counter.size)} (the state being "
            f"written), {_size(shutil.disk_usage(directory).free)} free there; {left}: free space there and run "
            "the same command with --resume auto")


def _size(n):
    return f"{n / 2**10:.1f} KiB" if n < 2**20 else f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def load(path, kind=None):
    """Loads a checkpoint (weights_only=True, memory-mapped; a file in torch's legacy non-zip format, which
    cannot be, without) and checks it is of the expected kind ('final'/'train_state'). Weights of another
    framework (a torchvision / timm ResNet, a detectron2 .pkl, an MMDetection checkpoint) come as a 'final'
    checkpoint in this repository's names (common.formats)."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such checkpoint file")
    if path.endswith(".pkl"):  # detectron2's weights, told by the name as its DetectionCheckpointer does
        state, data = formats.read_pkl(path)
        obj = formats.import_state(state, "detectron2", data.get("meta"), f"a detectron2 .pkl (author: "
                                   f"{data['__author__']})")
    else:
        obj = _torch_load(path)
    if isinstance(obj, dict) and "kind" not in obj:
        obj = formats.read_foreign(obj) or obj
    if not isinstance(obj, dict) or obj.get("kind") not in ("final", "train_state"):
        raise UserError(f"{path}: not a checkpoint of this repository (no 'kind' entry)")
    if kind == "final" and obj["kind"] == "train_state":
        raise UserError(f"{path} is a training-state checkpoint (model + optimizer + RNG, for --resume of the "
                        "run that wrote it); --init expects the model_final.pth a finished run writes")
    if kind == "train_state" and obj["kind"] == "final":
        raise UserError(f"{path} is a model_final.pth (weights only, to start another run from with --init); "
                        "--resume expects a checkpoint_last.pth or checkpoint_<iteration>.pth")
    return obj


def _torch_load(path):
    legacy = _legacy_format(path)  # e.g. torch.save(..., _use_new_zipfile_serialization=False): valid
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=not legacy)
    except Exception as e:  # a damaged file raises nearly anything (EOFError, IndexError, struct.error...)
        if (isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in str(e)
                and (not legacy or _whole_pickles(path))):  # a cut legacy file can end in half a class name
            raise UserError(f"{path}: refused: the file holds Python objects other than tensors and plain "
                            "containers (checkpoints are loaded with weights_only=True, so no code in them "
                            "runs)") from None
        first_line = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise UserError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt: "
                        f"{first_line[:100]})") from None
    return obj


def _whole_pickles(path, count=5):
    """Whether a legacy-format file starts with its five pickles whole (magic number, protocol, system info,
    the object, its storages' keys), each ended by its STOP opcode; pickletools only parses them, runs nothing."""
    with open(path, "rb") as f:
        try:
            for _ in range(count):
                collections.deque(pickletools.genops(f), maxlen=0)
        except ValueError:  # "pickle exhausted before seeing STOP", an unknown opcode
            return False
    return True


def _legacy_format(path):
    """Whether the file starts as torch's legacy format does: a pickled magic number (pickle's LONG1 opcode,
    10 bytes), after the pickle protocol header (and a frame length from protocol 4 on)."""
    magic = b"\x8a\x0a" + torch.serialization.MAGIC_NUMBER.to_bytes(10, "little")
    with open(path, "rb") as f:
        return magic in f.read(32)


def rng_state(device):
    """This process' random states; the CUDA generator's only for a run on CUDA (on a GPU machine a CPU run, or
    a rank forked from a process that used CUDA, must not start CUDA to read a generator it never used)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    np_state = np.random.get_state()
    state["numpy"] = (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:])
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


class Checkpointer:
    """checkpoint_last.pth plus periodic checkpoint_<iteration>.pth files, of which the newest ``keep`` stay."""

    def __init__(self, output_dir, keep=2):
        self.output_dir, self.keep = output_dir, keep
        self.last = os.path.join(output_dir, "checkpoint_last.pth")
        for stale in glob.glob(os.path.join(output_dir, ".tmp-*.pth")):  # left by a kill during a save
            os.remove(stale)

    def periodic(self):
        files = glob.glob(os.path.join(self.output_dir, "checkpoint_[0-9]*.pth"))
        return sorted(files, key=lambda f: int(re.findall(r"(\d+)\.pth$", f)[0]))

    def save(self, state, periodic=False):
        save(state, self.last)
        if periodic:
            path = os.path.join(self.output_dir, f"checkpoint_{state['iteration']:08d}.pth")
            if os.path.exists(path):
                os.remove(path)
            os.link(self.last, path)  # the next save replaces checkpoint_last's inode; this link keeps it
            for old in self.periodic()[: -self.keep] if self.keep > 0 else self.periodic():
                os.remove(old)

    def latest(self):
        """Path of the newest readable checkpoint (by the iteration stored in it), or None when there is none. An
        unreadable one (truncated, corrupt) is passed over with a warning naming it and the one used instead;
        when no checkpoint is readable, UserError: a resume never silently starts over at iteration 0."""
        readable, unreadable = [], []
        for path in [self.last] + self.periodic()[::-1]:
            if os.path.exists(path):
                try:
                    readable.append((load(path, kind="train_state")["iteration"], path))
                except UserError as e:
                    unreadable.append(str(e))
        if unreadable and not readable:
            raise UserError(f"no readable checkpoint in {self.output_dir} to resume from: " + "; ".join(unreadable)
                            + "; start over with --overwrite instead of --resume")
        if not readable:
            return None
        iteration, best = max(readable)
        for reason in unreadable:
            print(f"warning: {reason}; resuming from {best} (iteration {iteration}) instead", file=sys.stderr)
        return best


def load_pretrained(model, path, parts=None, allow_partial=False):
    """Loads the weights of a model_final.pth into ``model``, part by part, and prints a transfer report.

    parts: load only these parts (names from ``common.detectors.PARTS``); None = every part.
    Refuses (UserError) when nothing matches, or when keys mismatch in shape or are unknown to the model
    (another detector, backbone or class count) unless ``allow_partial``, which loads the matching keys only.
    Returns (report, meta): report[part] = Counter(loaded, missing, shape_mismatch, unexpected, not_requested).
    """
    ckpt = load(path, kind="final")
    state, meta = ckpt["model"], ckpt.get("meta", {})
    own = model.state_dict()
    report = collections.defaultdict(collections.Counter)
    to_load, examples = {}, []
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue  # BatchNorm bookkeeping; FrozenBatchNorm2d has none
        part = part_of(key)
        if parts is not None and part not in parts:
            report[part]["not_requested"] += 1
        elif key not in own:
            report[part]["unexpected"] += 1
            examples.append(f"{key} (not in this model)")
        elif own[key].shape != value.shape:
            report[part]["shape_mismatch"] += 1
            examples.append(f"{key} {tuple(value.shape)} vs {tuple(own[key].shape)}")
        else:
            to_load[key] = value
            report[part]["loaded"] += 1
    for key in own:
        if key not in state and not key.endswith("num_batches_tracked"):
            report[part_of(key)]["missing"] += 1
    print_report(report, path, meta)
    if not to_load:
        raise UserError(f"{path}: no key of the checkpoint matches this model ({_describe(meta)}); "
                        "expected a checkpoint of this repository for the same backbone")
    if examples and not allow_partial:
        raise UserError(f"{path} does not fit this model ({_describe(meta)}): {len(examples)} keys differ, e.g. "
                        f"{examples[0]}; pass --init-partial to load the matching keys only")
    model.load_state_dict(to_load, strict=False)
    return dict(report), meta


def _describe(meta):
    keys = ("method", "detector", "backbone", "num_classes")
    return ", ".join(f"{k}={meta[k]}" for k in keys if k in meta) or "no meta"


def print_report(report, path, meta):
    cols = ("loaded", "missing", "shape_mismatch", "unexpected", "not_requested")
    print(f"transfer report for {path} ({_describe(meta)}):")
    if "imported" in meta:
        left_out = meta["imported"]["left_out"]
        print(f"  read as {meta['imported']['format']}: {meta['imported']['renamed']} tensors renamed to this "
              "repository's (torchvision's) names" + (f"; left out, a classifier: {', '.join(left_out)}" * bool(left_out)))
    print(f"  {'part':<16}" + "".join(f"{c:>15}" for c in cols))
    for part in sorted(report, key=PART_NAMES.index):
        print(f"  {part:<16}" + "".join(f"{report[part][c]:>15}" for c in cols))


def final_state(model, keep=None, drop=(), rename=None):
    """The state dict to export: only parts in ``keep`` (None = all), without parts in ``drop``; with
    ``rename`` ((source prefix, exported prefix), ...), only the keys under a source prefix, renamed."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()
             if (keep is None or part_of(k) in keep) and part_of(k) not in drop}
    if rename is None:
        return state
    return {dst + k[len(src):]: v for k, v in state.items() for src, dst in rename if k.startswith(src)}


def save_final(path, state_dict, meta):
    meta = dict(meta, parts=parts_of(state_dict))
    if dist.is_main_process():
        save({"kind": "final", "model": state_dict, "meta": meta}, path)
    return meta
