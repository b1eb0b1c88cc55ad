"""Test-only launcher for tests/test_distributed.py: runs a training script unchanged and records what the
distributed tests compare; optionally first plays this process's rank in a plain 1-process run.

    [python -m torch.distributed.run --nproc_per_node=2] python tests/dist_harness.py [OPTIONS] SCRIPT.py ARGS...

Always recorded, per process: every batch of (index, sample seed) the training sampler yields, and at
``Run.finish`` the full training state of the process (the model's state dict, without DDP, and the method's
extra state: AlignDet's EMA teacher, Montage's ERF label weights), with the same state as it stood at the start
of every iteration after the first (``state_at[iteration]``), -> ``<output-dir>/rank<R>.pt``, R = this
process's rank (so that the tests see whether the ranks of one run agree); and the state every rank starts
from, rank 0's when the script hands it to ``Run.checkpoints_hold``, -> ``<output-dir>/initial.pt`` (the tests measure steps from it;
with --reference-first it is solo0/initial.pt).
``{run}`` in ARGS becomes "ddp".

--reference-first (under torchrun): before the distributed run, this process runs the script once more as a
    plain 1-process run (world size 1: no process group, no DDP, no collectives) that plays its rank r, with
    ``{run}`` -> "solo<r>" in ARGS (give it its own --output-dir). Played rank r sees what rank r of the
    distributed run sees until its first gradient: its loader yields rank r's shard (only the sampler is
    told the rank and the world size), its random streams are seeded as rank r's (seed + r,
    ``common.dist.seed_everything``) and, as DDP broadcasts rank 0's weights when it wraps the model, its
    model and the method's extra state start from rank 0's (passed through solo0/initial.pt, taken when
    the script hands them to ``Run.checkpoints_hold``). After one SGD step (no warm-up, no clipping) the distributed run's parameters must be
    the mean of the played ranks', its logged loss their mean, its BN running statistics rank 0's.
    --solo-args="..." adds arguments to the played runs only.
--ghost-bn N: BatchNorm2d in training mode normalises each consecutive group of N images of a batch with the
    group's own statistics and updates its running statistics from the first group only. That is per-GPU
    BatchNorm over a global batch of which each rank holds N images, with rank 0's running statistics kept
    (DDP broadcasts rank 0's buffers; Direct keeps rank 0's): a 1-process run with it must equal the
    multi-process run with plain BN, iteration after iteration.
"""
import argparse
import copy
import importlib
import os
import shlex
import sys
import time
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import cli, dist, engine, loader  # noqa: E402


def parse():
    """Harness options come before SCRIPT.py; everything after it is the script's."""
    argv = sys.argv[1:]
    at = next(i for i, a in enumerate(argv) if a.endswith(".py"))
    p = argparse.ArgumentParser(allow_abbrev=False)
    p.add_argument("--reference-first", action="store_true")
    p.add_argument("--solo-args", default="", help="arguments added to the played runs only (e.g. --no-eval)")
    p.add_argument("--ghost-bn", type=int, default=0)
    opts = p.parse_args(argv[:at])
    opts.script = argv[at]
    return opts, argv[at + 1:]


def install_ghost_bn(group):
    """BatchNorm2d (training mode) with per-group statistics; running statistics from group 0 only."""
    plain = torch.nn.BatchNorm2d.forward

    def forward(self, x):
        if not self.training or len(x) <= group:
            return plain(self, x)
        first, *others = x.split(group)
        out = [plain(self, first)]  # updates the running statistics (and num_batches_tracked) once
        out += [F.batch_norm(g, None, None, self.weight, self.bias, True, 0.0, self.eps) for g in others]
        return torch.cat(out)

    torch.nn.BatchNorm2d.forward = forward


def state_of(obj):
    """A detached copy of a state dict (None for an extra without a state yet, e.g. ERF weights before the
    first computation)."""
    try:
        return {k: v.detach().clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in obj.state_dict().items()}
    except (AttributeError, TypeError):
        return None


def output_dir(args):
    return args[args.index("--output-dir") + 1]


def main():
    opts, script_args = parse()
    module = importlib.import_module(os.path.splitext(os.path.basename(opts.script))[0])
    if opts.ghost_bn:
        install_ghost_bn(opts.ghost_bn)
    record = SimpleNamespace(batches=[], state_at={}, playing=None, initial_file=None)

    sampler_iter = loader.TrainBatchSampler.__iter__

    def recording_iter(self):
        for batch in sampler_iter(self):
            record.batches.append([list(item) for item in batch])
            yield batch

    loader.TrainBatchSampler.__iter__ = recording_iter
    run_hold, run_finish, run_batches = engine.Run.checkpoints_hold, engine.Run.finish, engine.Run.batches

    def batches(self, *args, **kwargs):
        for it, batch in run_batches(self, *args, **kwargs):
            if it > self.start_iter:  # the state the iterations before this one left
                record.state_at[it] = {"model": state_of(self.model),
                                       "extra": {k: state_of(v) for k, v in self.extra.items()}}
            yield it, batch

    def hold(self, model, optimizer, scaler, **extra):
        if record.playing == 0 or (record.playing is None and not opts.reference_first and dist.get_rank() == 0):
            # the state every rank starts from (DDP broadcasts rank 0's): the tests measure updates from it
            path = record.initial_file or os.path.join(self.args.output_dir, "initial.pt")
            torch.save({"model": state_of(model), "extra": {k: state_of(v) for k, v in extra.items()}}, path + ".tmp")
            os.replace(path + ".tmp", path)
        elif record.playing is not None:  # every played rank starts from rank 0's state, as DDP makes it
            deadline = time.time() + 300
            while not os.path.exists(record.initial_file) and time.time() < deadline:
                time.sleep(0.05)
            initial = torch.load(record.initial_file, weights_only=True)
            model.load_state_dict(initial["model"])
            for k, v in extra.items():
                if initial["extra"][k] is not None:
                    v.load_state_dict(initial["extra"][k])
        run_hold(self, model, optimizer, scaler, **extra)

    def finish(self, state_dict, meta):
        rank = dist.get_rank() if record.playing is None else record.playing
        torch.save({"model": state_of(self.model), "extra": {k: state_of(v) for k, v in self.extra.items()},
                    "batches": record.batches, "state_at": record.state_at, "iteration": self.iteration},
                   os.path.join(self.args.output_dir, f"rank{rank}.pt"))
        return run_finish(self, state_dict, meta)

    engine.Run.checkpoints_hold, engine.Run.finish, engine.Run.batches = hold, finish, batches

    if opts.reference_first:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        solo_args = [a.replace("{run}", f"solo{rank}") for a in script_args] + shlex.split(opts.solo_args)
        record.playing = rank
        record.initial_file = os.path.join(output_dir(script_args).replace("{run}", "solo0"), "initial.pt")
        os.makedirs(os.path.dirname(record.initial_file), exist_ok=True)
        hidden = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE")}  # init_distributed: one plain process
        plain_loader_dist, seed_everything = loader.dist, dist.seed_everything
        loader.dist = SimpleNamespace(get_rank=lambda: rank, get_world_size=lambda: world,
                                      all_gather_object=lambda obj: [obj])  # its skipped-image count: its own
        dist.seed_everything = lambda seed: seed_everything(seed + rank)
        try:
            cli.run(module.main, module.get_args_parser(), solo_args)
        finally:
            os.environ.update(hidden)
            loader.dist, dist.seed_everything = plain_loader_dist, seed_everything
            record.playing, record.batches, record.state_at = None, [], {}
    cli.run(module.main, module.get_args_parser(), [a.replace("{run}", "ddp") for a in script_args])


if __name__ == "__main__":
    main()
