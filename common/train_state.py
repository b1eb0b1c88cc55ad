"""A training run's checkpoints: what each holds, when one is written, and ``resume``, which continues the run
from one. Functions of a ``common.engine.Run``, whose loop calls them; the file format, the atomic writes and
the loading are common.checkpoint's.

When: checkpoint_last.pth (+ a periodic checkpoint_<iteration>.pth, common.checkpoint.Checkpointer) every
--ckpt-every iterations and at the last iteration (not at epoch ends: on a small set an epoch is a few
iterations), and on a stop signal; the state before a non-finite step goes to checkpoint_debug_<iteration>.pth.
What: the objects ``Run.checkpoints_hold`` names, the iteration, the elapsed time, the skipped steps, the
FLOPs counted so far, and per rank its random streams and its loss sums (so that a resumed run's data order,
through common.loader, its random draws and its logged means are the uninterrupted run's).
"""
import os
import signal

from common import checkpoint, dist
from common.errors import UserError
from common.rundir import resume_changes


def state(run):
    """The full training state (collective: every rank must call it)."""
    return {"kind": "train_state", "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scaler": run.scaler.state_dict(), "iteration": run.iteration, "elapsed": run.cost.elapsed(),
            "skipped_steps": run.skipped_steps, "rng": dist.all_gather_object(checkpoint.rng_state(run.device)),
            "meters": dist.all_gather_object([run.meter.state_dict(), run.epoch_meter.state_dict()]),
            "extra": {k: v.state_dict() for k, v in run.extra.items()}, "args": vars(run.args),
            "flops_counted": run.cost.flops_counted, "meta": {"method": run.method}}


def save(run, periodic=False):
    """Writes checkpoint_last.pth (and, ``periodic``, checkpoint_<iteration>.pth) on rank 0; collective."""
    with run.cost.clock.timing("checkpoint"):
        train_state = state(run)
        if dist.is_main_process():
            run.ckpt.save(train_state, periodic)
        dist.barrier()


def save_if_due(run, iteration):
    """After ``iteration`` iterations: a checkpoint every --ckpt-every iterations and at the last."""
    if iteration == run.max_iters or (run.args.ckpt_every and iteration % run.args.ckpt_every == 0):
        save(run, periodic=iteration < run.max_iters)


def save_on_stop(run, signum):
    """What a run stopped by ``signum`` keeps: a checkpoint of the training state, unless the weights are already
    final (an evaluation after training, or --eval-only); returns the line that says how to go on."""
    name = signal.Signals(signum).name
    if getattr(run.args, "eval_only", False):
        return f"stopped by {name} during the evaluation (--eval-only): run the same command again"
    if run.finished:
        final = os.path.join(run.args.output_dir, "model_final.pth")
        return (f"stopped by {name} during the evaluation after training: the trained weights are in {final}; "
                f"evaluate them with the same command plus --resume auto (or with --eval-only --init {final})")
    save(run)
    return (f"stopped by {name} at iteration {run.iteration}: wrote {run.ckpt.last}; continue with the same "
            "command plus --resume auto")


def save_debug(run):
    """Writes the state before a non-finite step to checkpoint_debug_<iteration>.pth (collective); its path."""
    path = os.path.join(run.args.output_dir, f"checkpoint_debug_{run.iteration}.pth")
    debug_state = state(run)
    if dist.is_main_process():
        checkpoint.save(debug_state, path)
    return path


def resume(run):
    """--resume: continues the run from its newest checkpoint (--resume auto) or the one given: loads what
    ``checkpoints_hold`` named, the iteration, the elapsed time and this rank's random streams, after
    refusing (one line) flags that would not continue the same run; harmless changes are logged."""
    path = run.ckpt.latest() if run.args.resume == "auto" else run.args.resume
    if path is None:
        print(f"--resume auto: no checkpoint in {run.args.output_dir} yet, starting from iteration 0")
        return
    ck = checkpoint.load(path, kind="train_state")
    if ck["meta"].get("method") != run.method:
        raise UserError(f"{path} was written by {ck['meta'].get('method')}, not {run.method}")
    changed = resume_changes(path, ck.get("args", {}), run.args)
    try:
        run.model.load_state_dict(ck["model"])
        run.optimizer.load_state_dict(ck["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"{path} does not fit this model ({str(e).strip().splitlines()[0][:200]}); resume "
                        "with the flags of the run that wrote it") from None
    run.scaler.load_state_dict(ck["scaler"])
    for k, obj in run.extra.items():
        obj.load_state_dict(ck["extra"][k])
    run.iteration = run.start_iter = ck["iteration"]
    if not getattr(run.args, "eval_only", False):  # an evaluation leaves the run's log as it is
        run.log.truncate(run.start_iter)
        run.log.jsonl({"resumed": {"iteration": run.start_iter, "checkpoint": path, "changed": changed}})
    run.cost.elapsed_before, run.skipped_steps = ck["elapsed"], ck["skipped_steps"]
    run.cost.flops_counted = ck.get("flops_counted") or ([ck["flops_per_iter"], 1] if ck.get("flops_per_iter")
                                                         else [0, 0])  # (older checkpoints: one count)
    if len(ck["rng"]) == dist.get_world_size():
        checkpoint.set_rng_state(ck["rng"][dist.get_rank()], run.device)
        meters = ck["meters"][dist.get_rank()] if "meters" in ck else []  # (older checkpoints: none)
        for meter, meter_state in zip((run.meter, run.epoch_meter), meters):  # the sums of the cut interval, epoch
            meter.load_state_dict(meter_state, run.device)
    else:
        print(f"warning: {path} was written by {len(ck['rng'])} processes, this run has "
              f"{dist.get_world_size()}: the data order continues, random streams and the epoch's loss means "
              "do not match exactly")
    print(f"resumed from {path} at iteration {run.start_iter}")
