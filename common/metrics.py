"""Two log channels, human and machine (DETR's habit): printed lines + TensorBoard scalars, and one
JSON line per logged iteration, per epoch and per evaluation in ``<output-dir>/log.txt`` (``read_jsonl``
reads it back). Only rank 0 writes.

``Meter`` accumulates named scalar tensors on their device, so that logging costs no host sync
except at the print interval; ``progress_text`` is the progress bar's line. ``WallClock`` gives the throughput
every record states: wall clock; ``FlopCounter`` the FLOPs of what runs inside it (a run's accounting of
both: common.accounting).
"""
import contextlib
import json
import os
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from common import dist


class Meter:
    """Running sums of named scalar tensors; ``means()`` syncs once and resets."""

    def __init__(self):
        self.sums, self.count = {}, 0

    def update(self, values):
        for k, v in values.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        self.count += 1

    def state_dict(self):
        """The running sums (on the CPU) and count: in a checkpoint, so that a resumed run's means are the
        uninterrupted run's."""
        return {"sums": {k: v.cpu() for k, v in self.sums.items()}, "count": self.count}

    def load_state_dict(self, state, device):
        self.sums = {k: v.to(device) for k, v in state["sums"].items()}
        self.count = state["count"]

    def means(self, reduce=True):
        if not self.count:
            return {}
        values = {k: v / self.count for k, v in self.sums.items()}
        if reduce:
            values = dist.reduce_dict(values)
        self.sums, self.count = {}, 0
        return {k: float(v) for k, v in values.items()}


class WallClock:
    """Wall-clock throughput of one process' training loop, and where its time went.

    ``summary`` covers the window from ``open`` (after the warm-up) to now: samples_per_s = samples x
    iterations / wall_s, everything in the window included (the steps, waiting for data, logging, checkpoints,
    evaluations between epochs); data_wait_s, checkpoint_s and eval_s are the seconds of it spent on each,
    data_time_share = data_wait_s / wall_s. speed_window = [first, last]: the window holds iterations
    first + 1 .. last. Before ``open`` every figure is None."""

    PARTS = ("data_wait", "checkpoint", "eval")

    def __init__(self):
        self.seconds = dict.fromkeys(self.PARTS, 0.0)  # since the process started
        self.start = None  # (iteration, time, seconds) where the window opened

    @contextlib.contextmanager
    def timing(self, part):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[part] += time.perf_counter() - t

    def open(self, iteration):
        self.start = (iteration, time.perf_counter(), dict(self.seconds))

    def summary(self, iteration, samples_per_iter):
        if self.start is None:
            return {"samples_per_s": None, "speed_window": None}
        first, t0, before = self.start
        wall = max(time.perf_counter() - t0, 1e-9)
        spent = {f"{k}_s": round(self.seconds[k] - before[k], 3) for k in self.PARTS}
        return {"samples_per_s": round(samples_per_iter * (iteration - first) / wall, 2),
                "speed_window": [first, iteration], "wall_s": round(wall, 3), **spent,
                "data_time_share": round(spent["data_wait_s"] / wall, 4)}


class RunLog:
    """TensorBoard writer (``<output-dir>/tb``) and the JSON-lines ``log.txt``, on rank 0 only."""

    def __init__(self, output_dir, tensorboard=True):
        self.path = os.path.join(output_dir, "log.txt")
        self.tb = None
        if dist.is_main_process() and tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(output_dir, "tb"))

    def scalars(self, step, values, prefix="train/"):
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(prefix + k, v, step)

    def jsonl(self, record):
        if dist.is_main_process():
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(dict(record, time=round(time.time(), 1))) + "\n")
            except OSError as e:  # a full disk: write(2)'s error names no file; cli.run's line names this one
                raise OSError(e.errno, e.strerror, self.path) from None

    def truncate(self, iteration):
        """Drops the records past ``iteration`` (a resumed run writes them again) and a line cut by a kill
        (rank 0): the rest is written to a temporary file renamed over log.txt, so a kill meanwhile leaves
        one or the other."""
        if not dist.is_main_process() or not os.path.exists(self.path):
            return
        records = read_jsonl(self.path)
        kept = [r for r in records if r.get("iteration", r.get("resumed", {}).get("iteration", 0)) <= iteration]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.chmod(tmp, os.stat(self.path).st_mode & 0o777)
        os.replace(tmp, self.path)

    def close(self):
        if self.tb is not None:
            self.tb.close()


class FlopCounter(TorchDispatchMode):
    """Counts the FLOPs of the convolutions and matrix products that run inside it, forward and backward, with
    torch.utils.flop_counter's formulas (2 per multiply-add; ops without one, e.g. RoIAlign and NMS, count 0).
    Unlike FlopCounterMode it tracks no modules, so it also counts around autograd.grad (Montage's ERF)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def read_jsonl(path):
    """The records of a log.txt (a truncated last line, from a kill mid-write, is ignored)."""
    records = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return records


def progress_text(values):
    """The progress bar's figures: the loss terms, each pretext's distance to its chance level (nats) and its
    top-1 retrieval against chance (common.pretext), the share of clipped steps and the lr."""
    parts = []
    for key, v in values.items():
        if key.startswith("loss"):
            parts.append(f"{key}={v:.3f}")
        elif key.endswith("_vs_chance"):
            parts.append(f"{key}={v:+.3f}")
        elif key.endswith("_acc1"):
            parts.append(f"{key}={v:.2f}/{values.get(key + '_chance', 0):.2f}")
    if "clipped" in values:
        parts.append(f"clipped={values['clipped']:.0%}")
    return " ".join(parts + [f"lr={values['lr']:.3g}"])


def peak_memory_mb(device):
    """GPU max_memory_allocated on CUDA, the process' peak RSS on CPU (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
