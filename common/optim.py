"""Learning-rate schedules as pure functions of the iteration, the linear scaling rule, parameter groups.

Each script calls ``lr = lr_at(it, ...)`` every iteration and writes it into the optimizer
(``Run.set_lr``): no hidden scheduler objects, and resuming needs nothing but the iteration.
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
