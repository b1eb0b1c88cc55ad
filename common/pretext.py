"""A pretext's progress against its chance level: the measures each pre-training logs beside its losses (log.txt,
TensorBoard, the progress bar) and that the comparison's learning check reads (common.claims).

A raw pretext loss does not show learning when its chance level moves from batch to batch. A contrastive loss's
chance is ln(1 + negatives), and the number of negatives changes with every batch (AlignDet samples 14-116 RoIs per
view batch at toy scale, more as its RPN learns to hit the pseudo boxes). A classification loss falls to its prior
without looking at the image. So each pretext loss ``loss_<name>`` is logged with:

- a contrastive (InfoNCE) loss: ``<name>_chance``, the loss when every similarity is equal, ln(1 + negatives),
  averaged over the (query, positive) pairs as the loss averages them; ``<name>_vs_chance`` = loss - chance, in nats
  (below 0: better than chance); ``<name>_acc1``, top-1 retrieval (the positive more similar than every negative,
  MoCo's acc@1), beside its chance ``<name>_acc1_chance`` = 1 / (1 + negatives); ``<name>_cos_gap``, the cosine to
  the positive minus the mean cosine to the negatives (0 at initialisation when the embedding ignores the content).
- a soft-target cross-entropy (PreDet's L_cls, Montage's dense loss): ``<name>_chance``, the loss of the best
  prediction that ignores the image (the label prior of the training set); ``<name>_floor``, the targets' entropy
  (the loss of a perfect prediction); and ``<name>_vs_chance``.

Every measure is a detached scalar tensor (no host sync); the engine averages them over each logged window as it
does the losses.
"""
import torch
import torch.nn.functional as F


@torch.no_grad()
def contrastive_measures(name, loss, cos, positive, negative, weight):
    """The measures of a contrastive loss ``loss_<name>`` (unweighted, as the pretext defines it).

    cos: [M, C] cosine similarity of query m with candidate c; positive, negative: [M, C] bool, which candidates
    are the query's positives and negatives (neither: not in its softmax); weight: [M, C] each (query, positive)
    pair's weight in the loss's mean (summing to 1 over the positive pairs). Returns {<name>_chance, _vs_chance,
    _acc1, _acc1_chance, _cos_gap}."""
    cos = cos.float()
    weight = weight.float() * positive  # [M, C]
    n_neg = negative.sum(1).float()  # [M]
    hardest = cos.masked_fill(~negative, float("-inf")).amax(1, keepdim=True)  # [M, 1] (-inf: no negative)
    mean_neg = (cos * negative).sum(1, keepdim=True) / n_neg.clamp(min=1)[:, None]  # [M, 1]
    chance = (weight * torch.log1p(n_neg)[:, None]).sum()
    return {f"{name}_chance": chance, f"{name}_vs_chance": loss.detach().float() - chance,
            f"{name}_acc1": (weight * (cos > hardest)).sum(),
            f"{name}_acc1_chance": (weight / (1 + n_neg)[:, None]).sum(),
            f"{name}_cos_gap": (weight * (cos - mean_neg)).sum()}


@torch.no_grad()
def soft_target_measures(name, loss, targets, prior, weight=None):
    """The measures of a soft-target cross-entropy ``loss_<name>``: -sum_c t_c log p_c per sample, averaged.

    targets: [n, C] target distributions (rows sum to 1); prior: [n, C] or [C], the best prediction that ignores
    the image (rows sum to 1); weight: [n], each sample's weight in the loss's mean (summing to 1; default: the
    plain mean). Returns {<name>_chance, _floor, _vs_chance}."""
    targets = targets.float()
    weight = torch.full((len(targets),), 1 / len(targets), device=targets.device) if weight is None else weight.float()
    chance = (weight * -(targets * prior.float().clamp(min=1e-12).log()).sum(1)).sum()
    floor = (weight * -(targets * targets.clamp(min=1e-12).log()).sum(1)).sum()  # 0 log 0 = 0
    return {f"{name}_chance": chance, f"{name}_floor": floor, f"{name}_vs_chance": loss.detach().float() - chance}


@torch.no_grad()
def info_nce_measures(name, loss, rows):
    """The measures of an InfoNCE loss averaged over all its queries, from the cosine rows of each group of queries
    (an image), the positive first, then that group's negatives (MoCo's logits layout, before the temperature):
    rows: a list of [Q_i, 1 + N_i]. The rows are padded to the widest; the padding is neither positive nor
    negative."""
    width = max(r.shape[1] for r in rows)
    cos = torch.cat([F.pad(r, (0, width - r.shape[1])) for r in rows])  # [sum Q_i, width]
    cols = torch.arange(width, device=cos.device)[None]  # [1, width]
    ends = torch.cat([torch.full((len(r),), r.shape[1], device=cos.device) for r in rows])[:, None]  # [sum Q_i, 1]
    return contrastive_measures(name, loss, cos, (cols == 0).expand_as(cos), (cols >= 1) & (cols < ends),
                                torch.full_like(cos, 1 / len(cos)))
