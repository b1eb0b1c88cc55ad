"""Distributed helpers for torchrun (env://) that also run as one plain process.

Launch with ``torchrun --nproc_per_node=N script.py ...`` (multi-node: ``--nnodes --node_rank
--master_addr --master_port``). Without torchrun's environment variables everything runs as a single
process and every collective below returns its input, so the same code runs on one GPU or on the CPU.
Pattern from torchvision ``references/detection/utils.py`` and DETR ``util/misc.py``.
"""
import builtins
import datetime
import inspect
import os
import random

import numpy as np
import torch
import torch.distributed as dist

from common.errors import UserError


def is_dist():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_dist() else 0


def get_world_size():
    return dist.get_world_size() if is_dist() else 1


def is_main_process():
    return get_rank() == 0


def init_distributed(device="auto", timeout_s=600):
    """Initialises the process group from torchrun's env vars (NCCL on CUDA, gloo on CPU).

    Returns the torch.device of this rank. ``timeout_s`` bounds every collective, so that a rank that
    died makes the others fail within that time instead of hanging.
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible here (torch.cuda.is_available() is False); "
                        "use --device cpu, or auto")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo", init_method="env://",
                                timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=dev if use_cuda else None)
    _setup_printing(is_main_process())
    return dev


def cleanup():
    """Leaves the process group (at the end of a run; common.cli.run calls it)."""
    if is_dist():
        dist.destroy_process_group()


def _setup_printing(is_main):
    """Silences print() on every rank but 0; ``print(..., force=True)`` still prints."""
    builtin_print = builtins.print

    def rank_print(*args, **kwargs):
        force = kwargs.pop("force", False)
        if is_main or force:
            builtin_print(*args, **kwargs)

    builtins.print = rank_print


# DDP's keyword that leaves each rank's buffers (BN running statistics) its own at every forward:
# forward_sync_buffers from torch 2.13 on, where broadcast_buffers is deprecated; broadcast_buffers before. The
# one difference, forward_sync_buffers=False still copying rank 0's buffers when DDP wraps the model, changes
# nothing here: every rank builds its BN buffers at the same 0/1.
_DDP_KEYWORDS = inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
RANK_LOCAL_BUFFERS = ("forward_sync_buffers" if "forward_sync_buffers" in _DDP_KEYWORDS else "broadcast_buffers")


def data_parallel(model, device, sync_buffers=True):
    """``model`` in DistributedDataParallel under torchrun, the model itself in one process: gradients are
    averaged over ranks in backward. ``sync_buffers=False``: each rank keeps its own buffers (per-GPU BN
    statistics) instead of taking rank 0's at every forward."""
    if get_world_size() == 1:
        return model
    kwargs = {} if sync_buffers else {RANK_LOCAL_BUFFERS: False}
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                                     **kwargs)


def seed_everything(seed):
    """Seeds python, numpy and torch with ``seed + rank`` (each rank draws differently)."""
    seed = seed + get_rank()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def barrier():
    if is_dist():
        dist.barrier()


def broadcast_object(obj, src=0):
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj):
    """Returns the list of ``obj`` from every rank (``[obj]`` on one process)."""
    if not is_dist():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(tensor):
    """Sums a tensor over ranks, in place; identity on one process."""
    if is_dist():
        dist.all_reduce(tensor)
    return tensor


def reduce_dict(values):
    """Averages a dict of scalar tensors over ranks (for logging only)."""
    if not is_dist():
        return values
    names = sorted(values)
    stacked = torch.stack([values[k].detach().float() for k in names])
    dist.all_reduce(stacked)
    stacked /= get_world_size()
    return dict(zip(names, stacked))
