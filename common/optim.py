"""Learning-rate schedules as pure functions of the iteration, the linear scaling rule, parameter groups.

Each script calls ``lr = set_lr(optimizer, lr_at(it, ...))`` every iteration: no hidden scheduler objects,
and resuming needs nothing but the iteration.
"""
import math

from torch import nn


def lr_at(it, base_lr, schedule="step", total_iters=1, warmup_iters=0, warmup_ratio=0.001, steps=(), gamma=0.1):
    """Linear warmup from ``warmup_ratio * base_lr`` over ``warmup_iters``, then
    'fixed' (constant), 'step' (x ``gamma`` at each iteration in ``steps``) or 'cosine' (to 0 at ``total_iters``)."""
    if it < warmup_iters:
        return base_lr * (warmup_ratio + (1 - warmup_ratio) * it / warmup_iters)
    if schedule == "fixed":
        return base_lr
    if schedule == "step":
        return base_lr * gamma ** sum(it >= s for s in steps)
    if schedule == "cosine":
        progress = min(1.0, (it - warmup_iters) / max(1, total_iters - warmup_iters))
        return base_lr * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}")


# The 1x detection recipe (torchvision's references, detectron2, mmdet): the lr at global batch 16, 12 epochs with
# the lr x0.1 after epochs 8 and 11 (at 8/12 and 11/12 of a run given in iterations)
LR_1X = {"fasterrcnn": 0.02, "maskrcnn": 0.02, "retinanet": 0.01, "fcos": 0.01}


def schedule_1x(iters, epochs, lr_steps, iters_per_epoch):
    """(total iterations, lr step iterations) of a 1x-style schedule: ``iters`` with the steps at 8/12 and
    11/12 of it, else ``epochs`` x ``iters_per_epoch`` with the steps after the epochs in ``lr_steps``."""
    if iters:
        return iters, [round(iters * 8 / 12), round(iters * 11 / 12)]
    return epochs * iters_per_epoch, [s * iters_per_epoch for s in lr_steps]


WARMUP_SHARE = 0.1  # a default warm-up takes at most this share of the run's iterations


def warmup_help(default):
    """--warmup-iters' help: the recipe's default and its cap ('%%': argparse %-formats help texts)."""
    return (f"default {default}, at most {WARMUP_SHARE:.0%}% of the run's iterations (a short run reaches its lr); "
            "a value given is used as it is")


def warmup_iters(given, default, total_iters):
    """The warm-up length: --warmup-iters as given; else the recipe's ``default``, capped at WARMUP_SHARE of the
    run's ``total_iters`` (the schedule's length, not --max-iters) and the cap printed: a short run (e.g.
    --iters 10 under a 500-iteration default) would otherwise end inside its warm-up."""
    if given is not None:
        return given
    cap = int(WARMUP_SHARE * total_iters)
    if default <= cap:
        return default
    print(f"warm-up: {cap} iterations, {WARMUP_SHARE:.0%} of the run's {total_iters} (the recipe's {default} is "
          f"capped there; --warmup-iters N sets it)")
    return cap


def set_lr(optimizer, lr):
    """Writes ``lr`` into every parameter group, times the group's 'lr_mult' (``param_groups``); returns lr."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
    return lr


def scaled_lr(paper_lr, paper_batch, global_batch, what="lr"):
    """The linear scaling rule: lr proportional to the global batch; printed so runs are comparable."""
    lr = paper_lr * global_batch / paper_batch
    print(f"{what}: {paper_lr:g} at global batch {paper_batch} (paper) x {global_batch}/{paper_batch} = {lr:g}")
    return lr


NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def param_groups(model, weight_decay, norm_weight_decay=None, lr_mults=None):
    """SGD parameter groups: norm-layer parameters get ``norm_weight_decay`` (default = weight_decay), all
    other trainable parameters ``weight_decay``; a parameter whose name starts with a prefix of ``lr_mults``
    ({prefix: m}) trains at m x the lr (its group's 'lr_mult', read by ``Run.set_lr``). Frozen parameters
    are left out. Groups come in a fixed order (other before norm, then by multiplier), so that an
    optimizer's state dict fits the same model again."""
    groups = {}
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                full = f"{module_name}.{name}" if module_name else name
                mult = next((m for prefix, m in (lr_mults or {}).items() if full.startswith(prefix)), 1.0)
                groups.setdefault((isinstance(module, NORM_TYPES), mult), []).append(p)
    decay = {False: weight_decay, True: weight_decay if norm_weight_decay is None else norm_weight_decay}
    return [{"params": params, "weight_decay": decay[norm], "lr_mult": mult}
            for (norm, mult), params in sorted(groups.items())]
