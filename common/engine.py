"""The plumbing every training loop shares; the loop itself, every line that changes a weight, stays in the
script (see any of them: ``run = Run(...)``, ``run.checkpoints_hold(model, optimizer, scaler, ...)``,
``if args.resume: run.resume()``, then ``for it, batch in run.batches(loader):`` ... ``run.finite(loss,
losses)``, backward and step ... ``run.log_losses(...)``, and ``run.finish(...)``).

``Run`` yields the batches across epochs from one pass of the loader; checks that each step's loss is finite,
agreed over ranks; logs every --print-freq iterations and every epoch to log.txt (also across resumes) and
TensorBoard on rank 0; and stops cleanly on SIGTERM/SIGINT (a checkpoint at the next iteration boundary or
``stop_point``, exit status 128 + signal). Its checkpoints (when, what, ``resume``): common.train_state; its
wall clock, FLOPs and meta: common.accounting. Detection evaluation: common.coco_eval.
"""
import os
import signal
import sys
import time

import torch
from tqdm import tqdm

from common import checkpoint, dist, train_state
from common.accounting import Accounting
from common.errors import UserError
from common.loader import skipped_images
from common.metrics import Meter, RunLog, progress_text


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


class Stopped(SystemExit):
    """A stop signal honoured: exit status 128 + signal."""


class _Interrupted(BaseException):
    """Raised by the signal handler inside ``StopSignals.interruptible`` (a BaseException: no library's
    ``except Exception`` swallows it)."""


class StopSignals:
    """SIGTERM and SIGINT, taken for a clean stop: the first one received is kept in ``received`` until the run's
    next stop point (``Run.stop_point``) honours it; a second Ctrl-C stops at once."""

    def __init__(self):
        self.received, self._interrupt_now = None, False  # inside interruptible(): a signal ends it at once
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def interruptible(self, fn, *args, **kwargs):
        """Returns fn(*args, **kwargs), or None when a stop signal comes first or during it: a signal ends fn at
        once (rank 0's COCOeval, which no stop point reaches for minutes on a large set). Rank-local: fn must
        run no collective. The caller then lets every rank reach a ``stop_point``."""
        self._interrupt_now = True
        try:
            try:
                if self.received:
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
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = self.received or signum
        if self._interrupt_now:
            self._interrupt_now = False
            raise _Interrupted


class Run:
    """Training-loop plumbing shared by every script; see the module docstring.

    samples_per_iter: samples one iteration consumes on ONE rank (images; Montage: samples).
    amp: the autocast dtype (None: fp32); a script's GradScaler is enabled for fp16 only.
    """

    def __init__(self, args, *, method, device, iters_per_epoch, max_iters, samples_per_iter):
        self.args, self.device, self.method = args, device, method
        self.iters_per_epoch, self.max_iters = iters_per_epoch, max_iters
        self.amp = amp_dtype(args, device)
        set_cudnn_benchmark(args, device)
        self.model, self.optimizer, self.scaler, self.extra = None, None, None, {}  # checkpoints_hold
        self.ckpt = checkpoint.Checkpointer(args.output_dir, args.keep_ckpts)
        self.log = RunLog(args.output_dir, args.tensorboard)
        self.cost = Accounting(method, device, samples_per_iter * dist.get_world_size())
        self.meter, self.epoch_meter = Meter(), Meter()  # the logged window's losses, the epoch's
        self.iteration = self.start_iter = 0
        self.skipped_steps, self.lr = 0, 0.0
        self.skipped_images = 0  # bad images the training loader skipped (--skip-bad-images), this process on
        self.uncounted = lambda it: False  # iterations not to count FLOPs on (Montage's ERF pass: counted apart)
        self.finished = False  # model_final.pth written (finish)
        self.signals = StopSignals()

    def checkpoints_hold(self, model, optimizer, scaler, **extra):
        """What every checkpoint holds and ``resume`` loads (common.train_state): the model (without DDP), the
        optimizer, the AMP scaler and the method's own state (``extra``: {name: an object with
        state_dict()/load_state_dict()})."""
        self.model, self.optimizer, self.scaler, self.extra = model, optimizer, scaler, extra

    def resume(self):
        """--resume: continues the run from its newest checkpoint or the one given (common.train_state.resume)."""
        train_state.resume(self)

    # ---- loop ----
    def batches(self, loader, on_epoch_end=None):
        """Yields (iteration, batch) from ``start_iter`` to ``max_iters``, across epochs, from one pass of the
        loader.

        After each loop body it logs and honours a stop signal, at an epoch's end writes its record, then
        checkpoints every --ckpt-every iterations and at the last. ``on_epoch_end(epoch)`` may return a dict
        of extra fields (e.g. evaluation stats) for that epoch's log.txt line."""
        # the bar is closed on an error too, so the error's line starts a line of its own
        with tqdm(total=self.max_iters, initial=self.start_iter, disable=not dist.is_main_process(),
                  dynamic_ncols=True, mininterval=1 if sys.stderr.isatty() else 30, desc=self.method) as bar:
            it = self.start_iter
            self.cost.start(it, self.max_iters)
            if it >= self.max_iters:
                return
            # one pass over every epoch left: the workers keep loading across epoch ends
            epoch, skip = divmod(it, self.iters_per_epoch)
            loader.batch_sampler.set_epoch(epoch, skip, epochs=-(-self.max_iters // self.iters_per_epoch) - epoch)
            t = time.perf_counter()
            for batch in loader:
                self.cost.clock.seconds["data_wait"] += time.perf_counter() - t
                epoch = it // self.iters_per_epoch
                with self.cost.counting_flops(it, self.args.print_freq, self.uncounted(it)):
                    yield it, batch
                it = self.iteration = it + 1
                self.cost.done(it)
                bar.update(1)
                self._after_iteration(it, bar)
                if it % self.iters_per_epoch == 0 or it == self.max_iters:
                    self.skipped_images = skipped_images(loader)
                    losses, evaluated = self.epoch_meter.means(), {}
                    if on_epoch_end is not None:
                        with self.cost.clock.timing("eval"):
                            evaluated = on_epoch_end(epoch) or {}
                    self.log.jsonl({"epoch": epoch, "iteration": it, **self.cost.epoch_summary(
                        losses, self.lr, it, self.skipped_steps), "skipped_images": self.skipped_images, **evaluated})
                train_state.save_if_due(self, it)
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
        path = train_state.save_debug(self)
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
        log_now = it % self.args.print_freq == 0 or it == self.max_iters
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
            flag = torch.tensor([float(self.signals.received or 0)], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            self.signals.received = int(flag.item()) or None
        if self.signals.received:
            print(train_state.save_on_stop(self, self.signals.received), file=sys.stderr, flush=True)
            raise Stopped(128 + self.signals.received)

    # ---- the run's figures (common.accounting) ----
    def train_flops(self):
        return self.cost.train_flops(self.iteration)

    def compute_meta(self):
        return self.cost.meta(self.iteration, self.log.path, self.args.print_freq, self.skipped_images)

    def finish(self, state_dict, meta):
        """Writes model_final.pth ({model, meta}); returns the meta."""
        meta = checkpoint.save_final(os.path.join(self.args.output_dir, "model_final.pth"), state_dict,
                                     {**self.compute_meta(), **meta})
        self.log.close()
        dist.barrier()
        self.finished = True
        return meta


def targets_to(targets, device, keys=("boxes", "labels", "masks")):
    """Detection targets -> plain tensors on ``device`` (by default the keys torchvision's detectors read)."""
    return [{k: t[k].as_subclass(torch.Tensor).to(device, non_blocking=True) for k in keys if k in t}
            for t in targets]
