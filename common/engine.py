"""What every training loop shares (detection evaluation: common.coco_eval.evaluate).

A script's loop reads (the schedule and the losses stay in the script):

    run = Run(args, model_without_ddp, optimizer, iters_per_epoch=len(loader), max_iters=..., ...)
    for it, batch in run.batches(loader):       # resumes mid-epoch, logs, checkpoints, handles SIGTERM
        run.set_lr(lr_at(it, ...))
        with run.autocast():
            losses = {...}                      # a dict of named loss terms
        run.step(losses)                        # backward (AMP scaler), non-finite check, clip, step
    run.finish(final_state, meta)               # model_final.pth, with compute in its meta

``Run`` owns the run directory contract: checkpoint_last.pth (+ periodic ones) written atomically,
exact resume (model, optimizer, scaler, iteration, every rank's RNG, the method's ``extra`` state and,
through ``common.loader``, the data order) refused when a flag that changes the run differs, log.txt (one
record per iteration, also across resumes) and TensorBoard on rank 0, and a clean stop on SIGTERM/SIGINT
(checkpoint at the next iteration boundary or ``stop_point``, exit status 128 + signal).
``prepare_output_dir`` gives a run directory to one run at a time (a lock the kernel drops with the process).
"""
import fcntl
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time

import torch
from tqdm import tqdm

from common import checkpoint, dist
from common.cli import UserError
from common.loader import skipped_images
from common.metrics import Meter, RunLog, peak_memory_mb


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
    os.makedirs(out, exist_ok=True)
    f = open(os.path.join(out, LOCK_FILE), "a+")
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
        record = os.path.join(out, "args.json")
        if not (started and not args.overwrite and os.path.exists(record)):
            with open(record, "w") as f:
                json.dump({"script": os.path.basename(sys.argv[0]), **vars(args)}, f, indent=1)
    return out


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
    """Raised by the signal handler inside ``Run.interruptible`` (a BaseException: no library's
    ``except Exception`` swallows it)."""


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


def _flag_change(dest, old, new):
    """'--flag old -> new' as on the command line."""
    if dest == "tensorboard":  # --no-tb stores False in args.tensorboard
        return f"--no-tb {old is False} -> {new is False}"
    return f"--{dest.replace('_', '-')} {old} -> {new}"


def _changes(old, new):
    """{dest: [old value, new value]} of the flags that differ (a flag missing on one side is None there)."""
    return {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


class Run:
    """Training-loop state shared by every script; see the module docstring.

    samples_per_iter: samples one iteration consumes on ONE rank (images; Montage: samples).
    extra: {name: object with state_dict()/load_state_dict()} saved with and restored from checkpoints.
    """

    def __init__(self, args, model, optimizer, *, iters_per_epoch, max_iters, samples_per_iter, device,
                 method, extra=None):
        self.args, self.model, self.optimizer, self.device, self.method = args, model, optimizer, device, method
        self.iters_per_epoch, self.max_iters = iters_per_epoch, max_iters
        self.samples_per_iter = samples_per_iter * dist.get_world_size()
        self.extra = extra or {}
        self.dtype = amp_dtype(args, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.ckpt = checkpoint.Checkpointer(args.output_dir, args.keep_ckpts)
        self.log = RunLog(args.output_dir, args.tensorboard)
        self.iteration = self.start_iter = 0
        self.elapsed_before, self.skipped_steps = 0.0, 0
        self.meter, self.epoch_meter = Meter(), Meter()
        self.data_time = self.compute_time = 0.0
        self.stop_signal, self.lr = None, 0.0
        self.skipped_images = 0  # bad images the training loader skipped (--skip-bad-images), this process on
        self.finished = False  # model_final.pth written (finish)
        self._interrupt_now = False  # inside interruptible(): a signal ends it at once
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        if args.resume:
            self._resume()
        self.t0 = time.time()

    # ---- loop ----
    def batches(self, loader, on_epoch_end=None):
        """Yields (iteration, batch) from ``start_iter`` to ``max_iters``, across epochs.

        After each loop body it logs, checkpoints and honours a stop signal. ``on_epoch_end(epoch)`` may
        return a dict of extra fields (e.g. evaluation stats) for that epoch's log.txt line."""
        sampler = loader.batch_sampler
        main = dist.is_main_process()
        bar = tqdm(total=self.max_iters, initial=self.start_iter, disable=not main, dynamic_ncols=True,
                   mininterval=1 if sys.stderr.isatty() else 30, desc=self.method)
        it = self.start_iter
        while it < self.max_iters:
            epoch, skip = divmod(it, self.iters_per_epoch)
            sampler.set_epoch(epoch, skip)
            t = time.perf_counter()
            for batch in loader:
                t_data = time.perf_counter()
                self.data_time += t_data - t
                yield it, batch
                it = self.iteration = it + 1
                self.compute_time += time.perf_counter() - t_data
                bar.update(1)
                self._after_iteration(it, bar)
                if it % self.iters_per_epoch == 0 or it == self.max_iters:
                    self.skipped_images = skipped_images(loader)
                    record = {"epoch": epoch, "iteration": it, **self.epoch_summary(self.epoch_meter.means()),
                              "skipped_images": self.skipped_images}
                    if on_epoch_end is not None:
                        record.update(on_epoch_end(epoch) or {})
                    self.log.jsonl(record)
                    self.save()
                if it >= self.max_iters:
                    break
                t = time.perf_counter()
        bar.close()

    def set_lr(self, lr):
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        self.lr = lr
        return lr

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    def step(self, losses):
        """Backward + optimizer step on sum(losses.values()). Returns False if the step was skipped
        because the loss was not finite (allowed ``--skip-nonfinite`` times, then a clear stop).
        The finiteness check is one host sync per step (agreed over ranks, so DDP never diverges)."""
        total = sum(losses.values())
        finite = torch.isfinite(total.detach()).float()
        if dist.get_world_size() > 1:
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        if not finite.item():
            self._nonfinite(losses)
            return False
        self.scaler.scale(total).backward()
        if self.args.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.args.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        values = dict(losses, loss=total)
        self.meter.update(values)
        self.epoch_meter.update(values)
        return True

    def _nonfinite(self, losses):
        self.optimizer.zero_grad(set_to_none=True)
        terms = " ".join(f"{k}={float(v):.4g}" for k, v in losses.items())
        if self.skipped_steps < self.args.skip_nonfinite:
            self.skipped_steps += 1
            print(f"warning: non-finite loss at iteration {self.iteration} ({terms}); step skipped "
                  f"({self.skipped_steps}/{self.args.skip_nonfinite} allowed)")
            return
        path = os.path.join(self.args.output_dir, f"checkpoint_debug_{self.iteration}.pth")
        state = self.state()
        if dist.is_main_process():
            checkpoint.save(state, path)
        raise UserError(f"non-finite loss at iteration {self.iteration} (lr {self.lr:.4g}): {terms}; wrote the "
                        f"state before this step to {path}; lower the lr, set --clip-grad, or pass "
                        "--skip-nonfinite N to tolerate N such steps")

    def _after_iteration(self, it, bar):
        args = self.args
        log_now = it % args.print_freq == 0 or it == self.max_iters
        if log_now:
            values = self.meter.means()
            values["lr"] = self.lr
            self.log.scalars(it, values)
            self.log.jsonl({"iteration": it, **{k: round(v, 6) for k, v in values.items()}})
            bar.set_postfix_str(" ".join(f"{k}={v:.3f}" for k, v in values.items() if k != "lr")
                                + f" lr={self.lr:.3g}", refresh=False)
        if dist.get_world_size() == 1 or log_now:  # under torchrun the ranks agree every --print-freq iterations
            self.stop_point()
        if args.ckpt_every and it % args.ckpt_every == 0 and it < self.max_iters:
            self.save(periodic=True)

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
                "skipped_steps": self.skipped_steps, "rng": dist.all_gather_object(checkpoint.rng_state()),
                "extra": {k: v.state_dict() for k, v in self.extra.items()}, "args": vars(self.args),
                "meta": {"method": self.method}}

    def save(self, periodic=False):
        state = self.state()
        if dist.is_main_process():
            self.ckpt.save(state, periodic)
        dist.barrier()

    def _resume(self):
        path = self.ckpt.latest() if self.args.resume == "auto" else self.args.resume
        if path is None:
            print(f"--resume auto: no checkpoint in {self.args.output_dir} yet, starting from iteration 0")
            return
        ck = checkpoint.load(path, kind="train_state")
        if ck["meta"].get("method") != self.method:
            raise UserError(f"{path} was written by {ck['meta'].get('method')}, not {self.method}")
        changed = _changes(ck.get("args", {}), vars(self.args))
        if not getattr(self.args, "eval_only", False):  # an evaluation needs the weights only
            refused = {k: v for k, v in changed.items() if k not in HARMLESS_ON_RESUME}
            if refused:
                raise UserError(f"{path} was written by a run with other flags: " + ", ".join(
                    _flag_change(k, *values) for k, values in refused.items()) + "; resuming with them "
                    "would not continue that run: restore them, or start a new run in another --output-dir")
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
        logged = {k: v for k, v in changed.items() if k not in ("resume", "overwrite")}
        if not getattr(self.args, "eval_only", False):  # an evaluation leaves the run's log as it is
            if logged:
                print("resuming with changed flags that leave the run as it was: " + ", ".join(
                    _flag_change(k, *values) for k, values in logged.items()))
            if dist.is_main_process():
                self._truncate_log(self.start_iter)
            self.log.jsonl({"resumed": {"iteration": self.start_iter, "checkpoint": path, "changed": logged}})
        self.elapsed_before, self.skipped_steps = ck["elapsed"], ck["skipped_steps"]
        if len(ck["rng"]) == dist.get_world_size():
            checkpoint.set_rng_state(ck["rng"][dist.get_rank()])
        else:
            print(f"warning: {path} was written by {len(ck['rng'])} processes, this run has "
                  f"{dist.get_world_size()}: the data order continues, random streams do not match exactly")
        print(f"resumed from {path} at iteration {self.start_iter}")

    def _truncate_log(self, iteration):
        """Drops the log.txt records past ``iteration`` (the resumed run writes them again) and a line cut by
        a kill, by writing the rest to a temporary file renamed over log.txt: a kill meanwhile leaves either."""
        path = self.log.path
        if not os.path.exists(path):
            return
        with open(path) as f:
            lines = f.readlines()
        kept = []
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("iteration", record.get("resumed", {}).get("iteration", 0)) <= iteration:
                kept.append(line if line.endswith("\n") else line + "\n")
        if kept == lines:
            return
        fd, tmp = tempfile.mkstemp(prefix=".tmp-log-", dir=os.path.dirname(path))
        try:
            with os.fdopen(fd, "w") as f:
                f.writelines(kept)
            os.chmod(tmp, os.stat(path).st_mode & 0o777)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    # ---- summaries ----
    def epoch_summary(self, losses):
        measured = self.data_time + self.compute_time
        return {**{f"train_{k}": round(v, 5) for k, v in losses.items()}, "lr": self.lr,
                "samples_per_s": round(self.samples_per_iter * (self.iteration - self.start_iter)
                                       / max(measured, 1e-9), 2),
                "data_time_share": round(self.data_time / max(measured, 1e-9), 4),
                "peak_mem_mb": round(peak_memory_mb(self.device)), "skipped_steps": self.skipped_steps}

    def compute_meta(self):
        """Compute accounting for model_final.pth meta and results.json."""
        wall = self.elapsed()
        world = dist.get_world_size()
        return {"method": self.method, "iterations": self.iteration, "images_seen": self.iteration
                * self.samples_per_iter, "wall_clock_s": round(wall, 1), "world_size": world,
                "device_type": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
                "device_hours": round(wall * world / 3600, 5), "skipped_images": self.skipped_images}

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
