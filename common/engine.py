"""The plumbing every training loop shares; the loop itself, every line that changes a weight, stays in the
script (see any of them: ``run = Run(...)``, ``run.checkpoints_hold(model, optimizer, scaler, ...)``,
``if args.resume: run.resume()``, then ``for it, batch in run.batches(loader):`` ... ``run.finite(loss,
losses)``, backward and step ... ``run.log_losses(...)``, and ``run.finish(...)``).

``Run`` keeps checkpoint_last.pth (+ periodic ones) written atomically every --ckpt-every iterations, at the
last iteration and on a stop (not at epoch ends: on a small set an epoch is a few iterations); exact resume
(what ``checkpoints_hold`` names, the iteration, every rank's RNG and, through ``common.loader``, the data
order), refused when a flag that changes the run differs (``common.rundir``); log.txt (one record per
iteration, also across resumes) and TensorBoard on rank 0; the finiteness check of each step, agreed over ranks;
and a clean stop on SIGTERM/SIGINT (a checkpoint at the next iteration boundary or ``stop_point``, exit status
128 + signal). Detection evaluation: common.coco_eval.
"""
import contextlib
import os
import signal
import sys
import time

import torch
from tqdm import tqdm

from common import checkpoint, dist
from common.errors import UserError
from common.loader import skipped_images
from common.metrics import FlopCounter, Meter, RunLog, WallClock, peak_memory_mb, read_jsonl
from common.rundir import resume_changes


def set_cudnn_benchmark(args, device):
    """--cudnn-benchmark, on CUDA only (off by default, as in torch)."""
    torch.backends.cudnn.benchmark = bool(args.cudnn_benchmark) and device.type == "cuda"


def amp_dtype(args, device):
    """bf16 where the GPU supports it, else fp16 (with a GradScaler); off on the CPU unless asked."""
    if args.amp == "off" or (args.amp == "auto" and device.type != "cuda"):
        return None
    if args.amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]


# The first n/5 iterations a process runs, at most this many, are its warm-up (CUDA and cuDNN set-up, the
# FLOP-counted iteration, the loader's workers starting): the logged samples_per_s leaves them out.
SPEED_WARMUP_ITERS = 10


class Stopped(SystemExit):
    """A stop signal honoured: exit status 128 + signal."""


class _Interrupted(BaseException):
    """Raised by the signal handler inside ``Run.interruptible`` (a BaseException: no library's
    ``except Exception`` swallows it)."""


class Run:
    """Training-loop plumbing shared by every script; see the module docstring.

    samples_per_iter: samples one iteration consumes on ONE rank (images; Montage: samples).
    amp: the autocast dtype (None: fp32); a script's GradScaler is enabled for fp16 only.
    """

    def __init__(self, args, *, method, device, iters_per_epoch, max_iters, samples_per_iter):
        self.args, self.device, self.method = args, device, method
        self.iters_per_epoch, self.max_iters = iters_per_epoch, max_iters
        self.samples_per_iter = samples_per_iter * dist.get_world_size()
        self.model, self.optimizer, self.scaler, self.extra = None, None, None, {}
        self.amp = amp_dtype(args, device)
        set_cudnn_benchmark(args, device)
        self.ckpt = checkpoint.Checkpointer(args.output_dir, args.keep_ckpts)
        self.log = RunLog(args.output_dir, args.tensorboard)
        self.iteration = self.start_iter = 0
        self.elapsed_before, self.skipped_steps = 0.0, 0
        self.meter, self.epoch_meter = Meter(), Meter()
        self.clock = WallClock()  # the logged throughput: wall clock after the warm-up (common.metrics)
        self.stop_signal, self.lr = None, 0.0
        self.skipped_images = 0  # bad images the training loader skipped (--skip-bad-images), this process on
        self.flops_counted = [0, 0]  # [FLOPs, iterations] of the iterations counted on one rank (train_flops)
        self.uncounted = lambda it: False  # iterations not to count FLOPs on (Montage's ERF pass: counted apart)
        self.finished = False  # model_final.pth written (finish)
        self._interrupt_now = False  # inside interruptible(): a signal ends it at once
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        self.t0 = time.time()

    def checkpoints_hold(self, model, optimizer, scaler, **extra):
        """What every checkpoint holds and ``resume`` loads: the model (without DDP), the optimizer, the AMP scaler
        and the method's own state (``extra``: {name: an object with state_dict()/load_state_dict()})."""
        self.model, self.optimizer, self.scaler, self.extra = model, optimizer, scaler, extra

    # ---- loop ----
    def batches(self, loader, on_epoch_end=None):
        """Yields (iteration, batch) from ``start_iter`` to ``max_iters``, across epochs, from one pass of the
        loader.

        After each loop body it logs and honours a stop signal, at an epoch's end writes its record, then
        checkpoints every --ckpt-every iterations and at the last. ``on_epoch_end(epoch)`` may return a dict
        of extra fields (e.g. evaluation stats) for that epoch's log.txt line."""
        sampler = loader.batch_sampler
        main = dist.is_main_process()
        # the bar is closed on an error too, so the error's line starts a line of its own
        with tqdm(total=self.max_iters, initial=self.start_iter, disable=not main, dynamic_ncols=True,
                  mininterval=1 if sys.stderr.isatty() else 30, desc=self.method) as bar:
            it = self.start_iter
            warmup_end = it + min(SPEED_WARMUP_ITERS, (self.max_iters - it) // 5)
            if warmup_end == it:
                self.clock.open(it)
            if it < self.max_iters:  # one pass over every epoch left: the workers keep loading across epoch ends
                epoch, skip = divmod(it, self.iters_per_epoch)
                sampler.set_epoch(epoch, skip, epochs=-(-self.max_iters // self.iters_per_epoch) - epoch)
                t = time.perf_counter()
                for batch in loader:
                    self.clock.seconds["data_wait"] += time.perf_counter() - t
                    epoch = it // self.iters_per_epoch
                    count = (it % self.args.print_freq == 0 or not self.flops_counted[1]) and not self.uncounted(it)
                    with FlopCounter() if count else contextlib.nullcontext() as counter:
                        yield it, batch
                    if count:
                        self.flops_counted = [self.flops_counted[0] + counter.total, self.flops_counted[1] + 1]
                    it = self.iteration = it + 1
                    if it == warmup_end:
                        self.clock.open(it)
                    bar.update(1)
                    self._after_iteration(it, bar)
                    if it % self.iters_per_epoch == 0 or it == self.max_iters:
                        self.skipped_images = skipped_images(loader)
                        losses, evaluated = self.epoch_meter.means(), {}
                        if on_epoch_end is not None:
                            with self.clock.timing("eval"):
                                evaluated = on_epoch_end(epoch) or {}
                        self.log.jsonl({"epoch": epoch, "iteration": it, **self.epoch_summary(losses),
                                        "skipped_images": self.skipped_images, **evaluated})
                    if it == self.max_iters or (self.args.ckpt_every and it % self.args.ckpt_every == 0):
                        self.save(periodic=it < self.max_iters)
                    if it >= self.max_iters:
                        break
                    t = time.perf_counter()

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None)

    def finite(self, loss, losses):
        """Whether this step's loss is finite on every rank (one host sync per step, agreed over ranks so
        that DDP never diverges). A non-finite loss is skipped (False) up to --skip-nonfinite times, then stops
        the run with one line, after writing the state before the step to checkpoint_debug_<iteration>.pth."""
        finite = torch.isfinite(loss.detach()).float()
        if dist.get_world_size() > 1:
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        if finite.item():
            return True
        terms = " ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
        if self.skipped_steps < self.args.skip_nonfinite:
            self.skipped_steps += 1
            print(f"warning: non-finite loss at iteration {self.iteration} ({terms}); step skipped "
                  f"({self.skipped_steps}/{self.args.skip_nonfinite} allowed)")
            return False
        path = os.path.join(self.args.output_dir, f"checkpoint_debug_{self.iteration}.pth")
        state = self.state()
        if dist.is_main_process():
            checkpoint.save(state, path)
        group = self.optimizer.param_groups[0]
        lr = group["lr"] / group.get("lr_mult", 1.0)
        raise UserError(f"non-finite loss at iteration {self.iteration} (lr {lr:.4g}): {terms}; wrote the "
                        f"state before this step to {path}; lower the lr, set --clip-grad, or pass "
                        "--skip-nonfinite N to tolerate N such steps")

    def log_losses(self, losses, loss, lr, measures=None, grad_norm=None):
        """Adds a step's loss terms and total, its pretext's measures against chance (common.pretext) and whether
        its gradient was clipped (``grad_norm``: clip_grad_norm_'s result, None without --clip-grad) to the running
        means of the log (no host sync)."""
        values = dict(losses, loss=loss, **(measures or {}))
        if grad_norm is not None:  # the share of the window's steps whose gradient norm exceeded --clip-grad
            values["clipped"] = (~(grad_norm <= self.args.clip_grad)).float()  # a non-finite norm counts as clipped
        self.meter.update(values)
        self.epoch_meter.update(values)
        self.lr = lr

    def _after_iteration(self, it, bar):
        args = self.args
        log_now = it % args.print_freq == 0 or it == self.max_iters
        if log_now:
            window = self.meter.count  # iterations averaged: --print-freq, fewer in a run's last record
            values = self.meter.means()
            values["lr"] = self.lr
            self.log.scalars(it, values)
            self.log.jsonl({"iteration": it, "window": window, **{k: round(v, 6) for k, v in values.items()}})
            bar.set_postfix_str(progress_text(values), refresh=False)
        if dist.get_world_size() == 1 or log_now:  # under torchrun the ranks agree every --print-freq iterations
            self.stop_point()

    # ---- stopping ----
    def stop_point(self):
        """Honours a stop signal seen by any rank: checkpoints (unless training is over) and raises Stopped.

        A collective under torchrun: every rank must reach the same stop points in the same order (the end
        of every --print-freq-th iteration; within a long evaluation or Montage's ERF pass, at every batch or
        position all ranks have), so that all ranks leave together. Within an iteration's loop body it
        checkpoints the state before that iteration, which the resumed run redoes exactly."""
        if dist.get_world_size() > 1:  # agree on a stop signal seen by any rank
            flag = torch.tensor([float(self.stop_signal or 0)], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            self.stop_signal = int(flag.item()) or None
        if not self.stop_signal:
            return
        name = signal.Signals(self.stop_signal).name
        if getattr(self.args, "eval_only", False):
            message = f"stopped by {name} during the evaluation (--eval-only): run the same command again"
        elif self.finished:
            final = os.path.join(self.args.output_dir, "model_final.pth")
            message = (f"stopped by {name} during the evaluation after training: the trained weights are in "
                       f"{final}; evaluate them with the same command plus --resume auto (or with --eval-only "
                       f"--init {final})")
        else:
            self.save()
            message = (f"stopped by {name} at iteration {self.iteration}: wrote {self.ckpt.last}; continue with "
                       "the same command plus --resume auto")
        print(message, file=sys.stderr, flush=True)
        raise Stopped(128 + self.stop_signal)

    def interruptible(self, fn, *args, **kwargs):
        """Returns fn(*args, **kwargs), or None when a stop signal comes first or during it: a signal ends fn at
        once (rank 0's COCOeval, which no stop point reaches for minutes on a large set). Rank-local: fn must
        run no collective. The caller then lets every rank reach a ``stop_point``."""
        self._interrupt_now = True
        try:
            try:
                if self.stop_signal:
                    return None
                return fn(*args, **kwargs)
            finally:
                self._interrupt_now = False
        except _Interrupted:  # the handler raises it at most once per call (it clears _interrupt_now)
            return None

    def _on_signal(self, signum, frame):
        # A repeated SIGTERM is expected (a scheduler signals the whole process group and torchrun forwards
        # it again): the checkpoint still comes at the next stop point. A second Ctrl-C stops at once; the
        # previous checkpoint stays valid.
        if self.stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.stop_signal = self.stop_signal or signum
        if self._interrupt_now:
            self._interrupt_now = False
            raise _Interrupted

    # ---- state ----
    def elapsed(self):
        return self.elapsed_before + time.time() - self.t0

    def state(self):
        """The full training state (collective: every rank must call it)."""
        return {"kind": "train_state", "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "iteration": self.iteration, "elapsed": self.elapsed(),
                "skipped_steps": self.skipped_steps, "rng": dist.all_gather_object(checkpoint.rng_state(self.device)),
                "meters": dist.all_gather_object([self.meter.state_dict(), self.epoch_meter.state_dict()]),
                "extra": {k: v.state_dict() for k, v in self.extra.items()}, "args": vars(self.args),
                "flops_counted": self.flops_counted, "meta": {"method": self.method}}

    def save(self, periodic=False):
        with self.clock.timing("checkpoint"):
            state = self.state()
            if dist.is_main_process():
                self.ckpt.save(state, periodic)
            dist.barrier()

    def resume(self):
        """--resume: continues the run from its newest checkpoint (--resume auto) or the one given: loads what
        ``checkpoints_hold`` named, the iteration, the elapsed time and this rank's random streams, after
        refusing (one line) flags that would not continue the same run; harmless changes are logged."""
        path = self.ckpt.latest() if self.args.resume == "auto" else self.args.resume
        if path is None:
            print(f"--resume auto: no checkpoint in {self.args.output_dir} yet, starting from iteration 0")
            return
        ck = checkpoint.load(path, kind="train_state")
        if ck["meta"].get("method") != self.method:
            raise UserError(f"{path} was written by {ck['meta'].get('method')}, not {self.method}")
        changed = resume_changes(path, ck.get("args", {}), self.args)
        try:
            self.model.load_state_dict(ck["model"])
            self.optimizer.load_state_dict(ck["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise UserError(f"{path} does not fit this model ({str(e).strip().splitlines()[0][:200]}); resume "
                            "with the flags of the run that wrote it") from None
        self.scaler.load_state_dict(ck["scaler"])
        for k, obj in self.extra.items():
            obj.load_state_dict(ck["extra"][k])
        self.iteration = self.start_iter = ck["iteration"]
        if not getattr(self.args, "eval_only", False):  # an evaluation leaves the run's log as it is
            self.log.truncate(self.start_iter)
            self.log.jsonl({"resumed": {"iteration": self.start_iter, "checkpoint": path, "changed": changed}})
        self.elapsed_before, self.skipped_steps = ck["elapsed"], ck["skipped_steps"]
        self.flops_counted = ck.get("flops_counted") or ([ck["flops_per_iter"], 1] if ck.get("flops_per_iter")
                                                         else [0, 0])  # (older checkpoints: one count)
        if len(ck["rng"]) == dist.get_world_size():
            checkpoint.set_rng_state(ck["rng"][dist.get_rank()], self.device)
            meters = ck["meters"][dist.get_rank()] if "meters" in ck else []  # (older checkpoints: none)
            for meter, state in zip((self.meter, self.epoch_meter), meters):  # the sums of the cut interval, epoch
                meter.load_state_dict(state, self.device)
        else:
            print(f"warning: {path} was written by {len(ck['rng'])} processes, this run has "
                  f"{dist.get_world_size()}: the data order continues, random streams and the epoch's loss means "
                  "do not match exactly")
        print(f"resumed from {path} at iteration {self.start_iter}")

    # ---- summaries ----
    def epoch_summary(self, losses):
        """An epoch record's figures: the epoch's mean losses, the lr, and this process' throughput so far (wall
        clock over speed_window, after the warm-up; common.metrics.WallClock), with the seconds of it spent
        waiting for data, writing checkpoints and evaluating."""
        return {**{f"train_{k}": round(v, 5) for k, v in losses.items()}, "lr": self.lr, **self.speed(),
                "peak_mem_mb": round(peak_memory_mb(self.device)), "skipped_steps": self.skipped_steps}

    def speed(self):
        """This process' wall-clock throughput after its warm-up (common.metrics.WallClock)."""
        return self.clock.summary(self.iteration, self.samples_per_iter)

    def train_flops(self):
        """Training FLOPs of the whole run, all ranks: the convolutions and matrix products of an iteration,
        forward and backward, as torch.utils.flop_counter counts them (ops it does not know, e.g. RoIAlign and
        NMS, count 0), averaged over the counted iterations, times the iterations. Counted: the first iteration
        of every logged window (every --print-freq-th; counting costs host time per op, which a GPU step would
        feel), so that batches whose shapes or sample counts vary (AlignDet's RoIs, multi-scale images) enter
        as a sample of the run, not as its first batch. A machine-independent measure of compute, unlike
        device-hours."""
        flops, counted = self.flops_counted
        if not counted:
            return None
        return flops / counted * self.iteration * dist.get_world_size()

    def compute_meta(self):
        """Compute accounting for model_final.pth meta and results.json, the machine, the share of steps whose
        gradient was clipped, and the losses and pretext measures of the first and last full logged windows
        (--print-freq iterations each, from log.txt), which show whether a pretext learned (common.claims)."""
        wall, world = self.elapsed(), dist.get_world_size()
        logged = [r for r in read_jsonl(self.log.path) if "iteration" in r and "epoch" not in r and "loss" in r]
        full = full_windows(logged, self.args.print_freq)
        return {"method": self.method, "iterations": self.iteration, "images_seen": self.iteration
                * self.samples_per_iter, "wall_clock_s": round(wall, 1), "world_size": world,
                "device_type": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
                "machine": machine(self.device), "device_hours": round(wall * world / 3600, 5),
                "train_flops": self.train_flops(), "train_speed": self.speed(), "clipped_share": clipped_share(logged),
                "losses_first": _loss_window(full[0]) if full else None,
                "losses_last": _loss_window(full[-1]) if full else None, "skipped_images": self.skipped_images}

    def finish(self, state_dict, meta):
        """Writes model_final.pth ({model, meta}); returns the meta."""
        meta = checkpoint.save_final(os.path.join(self.args.output_dir, "model_final.pth"), state_dict,
                                     {**self.compute_meta(), **meta})
        self.log.close()
        dist.barrier()
        self.finished = True
        return meta


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
    import platform
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return {"cpu": cpu or platform.machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "torch": str(torch.__version__),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


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


def targets_to(targets, device, keys=("boxes", "labels", "masks")):
    """Detection targets -> plain tensors on ``device`` (by default the keys torchvision's detectors read)."""
    return [{k: t[k].as_subclass(torch.Tensor).to(device, non_blocking=True) for k in keys if k in t}
            for t in targets]
