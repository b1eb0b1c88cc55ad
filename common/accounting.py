"""What a run cost and what it did, for its records: wall-clock throughput after the warm-up, training FLOPs, the
epoch records' figures and the meta that model_final.pth and results.json carry (common.results compares runs by
it). ``common.engine.Run`` keeps one ``Accounting``; the log channels and the counters it reads are
common.metrics'.
"""
import contextlib
import platform
import time

import torch

from common import dist
from common.metrics import FlopCounter, WallClock, peak_memory_mb, read_jsonl

# The first n/5 iterations a process runs, at most this many, are its warm-up (CUDA and cuDNN set-up, the
# FLOP-counted iteration, the loader's workers starting): the logged samples_per_s leaves them out.
SPEED_WARMUP_ITERS = 10


class Accounting:
    """One process' wall clock (this process' and the run's across resumes) and the run's FLOPs.

    method: the script's name, the meta's first entry. samples_per_iter: samples one iteration consumes on all
    ranks together (images; Montage: samples).
    """

    def __init__(self, method, device, samples_per_iter):
        self.method, self.device, self.samples_per_iter = method, device, samples_per_iter
        self.clock = WallClock()  # the logged throughput: wall clock after the warm-up (common.metrics)
        self.elapsed_before, self.t0 = 0.0, time.time()  # the run's seconds before this process; its start
        self.flops_counted = [0, 0]  # [FLOPs, iterations] of the iterations counted on one rank (train_flops)
        self.warmup_end = None

    def elapsed(self):
        """The run's wall-clock seconds, its earlier processes (a resumed run) included."""
        return self.elapsed_before + time.time() - self.t0

    def start(self, first, last):
        """This process trains iterations first .. last - 1: the first n/5 of them, at most SPEED_WARMUP_ITERS,
        are its warm-up."""
        self.warmup_end = first + min(SPEED_WARMUP_ITERS, (last - first) // 5)
        if self.warmup_end == first:
            self.clock.open(first)

    def done(self, iteration):
        """Iterations up to ``iteration`` are done: the throughput's window opens at the warm-up's end."""
        if iteration == self.warmup_end:
            self.clock.open(iteration)

    @contextlib.contextmanager
    def counting_flops(self, iteration, print_freq, uncounted):
        """Counts the FLOPs run inside it on the first iteration of every logged window (or until one was counted)
        unless ``uncounted`` (see train_flops)."""
        if not ((iteration % print_freq == 0 or not self.flops_counted[1]) and not uncounted):
            yield
            return
        with FlopCounter() as counter:
            yield
        self.flops_counted = [self.flops_counted[0] + counter.total, self.flops_counted[1] + 1]

    def train_flops(self, iteration):
        """Training FLOPs of the whole run to ``iteration``, all ranks: the convolutions and matrix products of an
        iteration, forward and backward, as torch.utils.flop_counter counts them (ops it does not know, e.g.
        RoIAlign and NMS, count 0), averaged over the counted iterations, times the iterations. Counted: the first
        iteration of every logged window (every --print-freq-th; counting costs host time per op, which a GPU step
        would feel), so that batches whose shapes or sample counts vary (AlignDet's RoIs, multi-scale images)
        enter as a sample of the run, not as its first batch. A machine-independent measure of compute, unlike
        device-hours."""
        flops, counted = self.flops_counted
        if not counted:
            return None
        return flops / counted * iteration * dist.get_world_size()

    def speed(self, iteration):
        """This process' wall-clock throughput after its warm-up (common.metrics.WallClock)."""
        return self.clock.summary(iteration, self.samples_per_iter)

    def epoch_summary(self, losses, lr, iteration, skipped_steps):
        """An epoch record's figures: the epoch's mean losses, the lr, and this process' throughput so far (wall
        clock over speed_window, after the warm-up; common.metrics.WallClock), with the seconds of it spent
        waiting for data, writing checkpoints and evaluating."""
        return {**{f"train_{k}": round(v, 5) for k, v in losses.items()}, "lr": lr, **self.speed(iteration),
                "peak_mem_mb": round(peak_memory_mb(self.device)), "skipped_steps": skipped_steps}

    def meta(self, iteration, log_path, print_freq, skipped_images):
        """Compute accounting for model_final.pth meta and results.json, the machine, the share of steps whose
        gradient was clipped, and the losses and pretext measures of the first and last full logged windows
        (--print-freq iterations each, from log.txt), which show whether a pretext learned (common.claims)."""
        wall, world, device = self.elapsed(), dist.get_world_size(), self.device
        logged = [r for r in read_jsonl(log_path) if "iteration" in r and "epoch" not in r and "loss" in r]
        full = full_windows(logged, print_freq)
        return {"method": self.method, "iterations": iteration, "images_seen": iteration * self.samples_per_iter,
                "wall_clock_s": round(wall, 1), "world_size": world,
                "device_type": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "machine": machine(device), "device_hours": round(wall * world / 3600, 5),
                "train_flops": self.train_flops(iteration), "train_speed": self.speed(iteration),
                "clipped_share": clipped_share(logged), "losses_first": _loss_window(full[0]) if full else None,
                "losses_last": _loss_window(full[-1]) if full else None, "skipped_images": skipped_images}


def full_windows(records, print_freq):
    """The iteration records of log.txt that average a whole --print-freq window (a run's last record averages
    only iterations % print_freq of them: AlignDet's 31 iterations would be judged on iteration 31 alone). A log
    written before records had "window" counts those ending at a multiple of print_freq."""
    return [r for r in records if r.get("window", print_freq if r["iteration"] % print_freq == 0 else 0) == print_freq]


def _loss_window(record):
    """A logged window's loss terms and pretext measures (means over its iterations) and its last iteration."""
    return {k: v for k, v in record.items() if k not in ("lr", "time", "window", "clipped")}


def clipped_share(records):
    """The share of a run's steps whose gradient norm exceeded --clip-grad (None without clipping), from the
    windows of log.txt, each weighted by its iterations."""
    windows = [(r["clipped"], r["iteration"] - prev["iteration"]) for prev, r in zip([{"iteration": 0}] + records,
                                                                                     records) if "clipped" in r]
    steps = sum(n for _, n in windows)
    return round(sum(c * n for c, n in windows) / steps, 4) if steps else None


def machine(device):
    """What a run's numbers depend on beyond its flags: the CPU and its kernel set, threads, torch, the GPU."""
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return {"cpu": cpu or platform.machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "torch": str(torch.__version__),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}

