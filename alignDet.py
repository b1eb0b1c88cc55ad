"""AlignDet box-domain pre-training: everything but the (frozen) backbone, on unlabeled images.

AlignDet (Li et al., ICCV 2023, https://arxiv.org/abs/2307.11077) splits pre-training into an image-domain
stage (any pre-trained backbone) and this box-domain stage, which pre-trains the FPN and the detector's
own heads with unsupervised proposals as pseudo boxes. Each image gives two views (independent draws of
resize / flip / one colour op); each pseudo box keeps one instance id in both views. View 1 goes through
the online detector, view 2 through an EMA (momentum) teacher. The losses are a box-level contrastive
loss between the online and teacher embeddings of the boxes' samples (RoIs, anchors or points) and the
detector's own regression losses against the pseudo boxes:
  fasterrcnn/maskrcnn  RPN (cls + box) + RoI head 4conv1fc: classifier -> MLP projector, id-specific box regression
  retinanet            classification branch -> per-anchor embedding; L1 on box deltas
  fcos                 classification branch -> per-point embedding; GIoU (centerness-weighted) + centerness
model_final.pth holds the online detector in the fine-tune key space (backbone unchanged, FPN, RPN, RoI
box head or cls/reg towers) without its final class/box layers (official export); finetune.py loads it
and applies the AlignDet fine-tuning protocol (lr x1.5, weight decay x0.5).

    python alignDet.py --backbone-weights PATH   # synthetic set; proposals generated on first use
    python alignDet.py --backbone-weights scratch --align-proposal-method random --backbone resnet18 \
        --preset cpu --anchor-scale 0.5 --rpn-batch-size 64 --rpn-post-nms-train 300 \
        --rpn-post-nms-test 100 --batch-size 4 --iters 30 --warmup-iters 10 --workers 2 --device cpu   # CPU demo
    python -m common.proposals --data-path /data/coco --workers 16          # SS proposals, once
    torchrun --standalone --nproc_per_node=8 alignDet.py --data-path /data/coco --detector fasterrcnn
    python finetune.py --data-path /data/coco --detector fasterrcnn --init runs/aligndet/<run>/model_final.pth

Defaults are the official 8 GPUs x 2 images recipe (AlignDet's code, configs/selfsup/ and schedule_1x): SGD momentum 0.9, weight decay 1e-4,
lr 0.02 (R-CNN) / 0.01 (RetinaNet, FCOS) at global batch 16, scaled linearly (lr = 0.02 / 16 * NGPU *
batch-size), 500-iteration linear warmup, 12 epochs with lr x0.1 after epochs 8 and 11; views with short
side {640..800}, long side <= 1333; EMA momentum 0.996 -> 1 (cosine); temperature 0.5; 256-d embeddings.
Choices where the sources are silent or where torchvision differs from mmdet (each a flag or noted):
- proposals: `python -m common.proposals` (OpenCV fast selective search, AlignDet filter, NMS 0.5, top 50);
  at most --align-max-proposals (50) per image for every detector; images without one are skipped.
  The default file is <data-cache>/proposals/<set>_<method>.json, generated on first use (one process).
- Mask R-CNN shares Faster R-CNN's checkpoint (its mask head is not pre-trained, fact 8).
- RPN: torchvision's loss (BCE + smooth-L1 beta 1/9; mmdet: L1), sampler 4096 anchors, positive fraction 1.
  The teacher's RPN runs in eval mode (--rpn-post-nms-test proposals).
- RoIs: positives only (IoU >= 0.5, pseudo boxes added), at most --roi-batch-size (4096) per image.
- RetinaNet: torchvision's matcher (0.5 / 0.4, low-quality matches); --align-dense-samples anchors per image.
- FCOS: torchvision's structure (centerness on the regression branch), FCOS assignment without centre
  sampling (mmdet default); GIoU loss (torchvision FCOS's own) weighted by the centerness targets and
  averaged by their sum; all positives regress, --align-dense-samples points per view batch contrast.
- colour op magnitude m ~ randint(1, 10) on 0..10: solarize threshold 256(1 - m/10), posterize to
  8 - round(0.4m) bits, colour/contrast/brightness/sharpness factor 1 +- 0.09m (random sign).
- the contrastive loss is per GPU (no gather), as the official code.
Progress is logged against chance (common.pretext): the loss's chance ln(1 + negatives) moves with the number of
RoIs a view batch samples, so watch contrast_vs_chance (the loss minus it, nats), contrast_acc1 (top-1 retrieval
of the same box in the other view, beside its chance) and contrast_cos_gap, not the raw loss_contrast.
"""
import argparse
import copy
import math
import os

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import tv_tensors
from torchvision.ops import box_iou, generalized_box_iou_loss
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from common import checkpoint, cli, dist, proposals
from common.coco import CocoDetection, resolve_data
from common.detectors import (FINAL_LAYERS, add_detector_args, add_pad_multiple_arg, build_detector,
                              check_detector_args, detector_kwargs, pad_multiple_for)
from common.engine import Run, targets_to
from common.loader import aspect_groups, build_train_loader
from common.optim import LR_1X, lr_at, param_groups, scaled_lr, schedule_1x, set_lr, warmup_help, warmup_iters
from common.pretext import contrastive_measures
from common.rundir import prepare_output_dir
from common.transforms import PRESETS, to_float_batch, train_augment, train_resize

# How AlignDet fine-tunes (its official fine-tuning configs; written into model_final.pth, applied by
# finetune.py --protocol paper). Their FPN has SyncBN, which this repo's FPN (no norm) has no counterpart for.
FINETUNE_RECIPE = {"bn": "affine", "trainable_layers": 3, "lr_mult": 1.5, "wd_mult": 0.5,
                   "source": "paper: none stated. AlignDet's official fine-tuning configs: BN statistics fixed "
                             "with trainable affine (norm_eval), stem + res2 frozen, lr x1.5, weight decay x0.5"}


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser(description="AlignDet box-domain pre-training (neck and heads, frozen backbone)",
                                     parents=[cli.base_parser()], add_help=add_help,
                                     formatter_class=cli.HelpFormatter)
    add_detector_args(parser, detector="fasterrcnn", backbone="resnet50", bn="frozen", trainable_layers=0)
    parser.set_defaults(rpn_batch_size=4096, roi_batch_size=4096, rpn_post_nms_train=1000)  # official samplers
    g = parser.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=2, help="images per GPU (global batch = NGPU x this)")
    g.add_argument("--lr", type=float, default=None,
                   help="base lr (default: 0.02 R-CNN / 0.01 RetinaNet, FCOS at global batch 16, scaled)")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g.add_argument("--epochs", type=int, default=12)
    g.add_argument("--lr-steps", type=int, nargs="+", default=[8, 11], help="epochs after which lr x0.1")
    g.add_argument("--iters", type=int, default=None,
                   help="train this many iterations instead of epochs; lr steps at 8/12 and 11/12 of them")
    g.add_argument("--warmup-iters", type=int, default=None, help=warmup_help(500))
    g.add_argument("--preset", default="multiscale", choices=sorted(PRESETS), help="view sizes (transforms.py)")
    add_pad_multiple_arg(g)
    # aligndet specific
    g = parser.add_argument_group("aligndet specific")
    g.add_argument("--backbone-weights", default="imagenet",
                   help="the image-domain stage: imagenet | scratch | PATH (a checkpoint of this repo with a backbone)")
    g.add_argument("--align-proposals", default=None,
                   help="proposal JSON of the training images (default <data-cache>/proposals/<set>_<method>.json, "
                        "generated when absent)")
    g.add_argument("--align-proposal-method", default="ss", choices=["ss", "random"],
                   help="method of the default proposal file")
    g.add_argument("--align-max-proposals", type=int, default=50, help="pseudo boxes per image (first K by score)")
    g.add_argument("--align-dim", type=int, default=256, help="embedding dimension of the projector")
    g.add_argument("--align-num-ids", type=int, default=256,
                   help="R-CNN id-specific box regressor outputs; needs batch-size x max-proposals < this")
    g.add_argument("--align-temperature", type=float, default=0.5)
    g.add_argument("--align-contrast-weight", type=float, default=1.0)
    g.add_argument("--align-ema", type=float, default=0.996, help="base EMA momentum, cosine-ramped to 1")
    g.add_argument("--align-dense-samples", type=int, default=2048,
                   help="contrast samples: RetinaNet anchors per image, FCOS points per view batch")
    g.add_argument("--align-keep-heads", action="store_true",
                   help="also export the final class/box layers (finetune.py then needs --init-partial)")
    return parser


# ------------------------------------------------------------------------------------------------
# Data: two views of one image whose pseudo boxes keep their instance ids
# ------------------------------------------------------------------------------------------------
class RandomColorOp(v2.Transform):
    """One of AlignDet's 9 colour operations with magnitude m ~ randint(1, 10) (see the docstring).
    Only images change; boxes and ids pass through."""
    OPS = ("identity", "autocontrast", "equalize", "solarize", "color", "contrast", "brightness", "sharpness",
           "posterize")

    def make_params(self, flat_inputs):
        op = self.OPS[int(torch.randint(len(self.OPS), ()))]
        m = int(torch.randint(1, 10, ()))
        return {"op": op, "m": m, "factor": 1 + (0.09 * m if torch.rand(()) < 0.5 else -0.09 * m)}

    def transform(self, inpt, params):
        if not isinstance(inpt, tv_tensors.Image):
            return inpt
        op, m, factor = params["op"], params["m"], params["factor"]
        fns = {"identity": lambda x: x, "autocontrast": TF.autocontrast, "equalize": TF.equalize,
               "solarize": lambda x: TF.solarize(x, 256 * (1 - m / 10)),
               "posterize": lambda x: TF.posterize(x, 8 - round(0.4 * m)),
               "color": lambda x: TF.adjust_saturation(x, factor), "contrast": lambda x: TF.adjust_contrast(x, factor),
               "brightness": lambda x: TF.adjust_brightness(x, factor),
               "sharpness": lambda x: TF.adjust_sharpness(x, factor)}
        return tv_tensors.wrap(fns[op](inpt), like=inpt)


def build_view_transform(preset):
    """One view: the fine-tune's resize (short side from the preset, long side capped) and augmentation
    (flip; boxes under 1 px after resizing dropped with their ids), then one colour op. No crop, so every
    pseudo box stays in the view."""
    return v2.Compose([train_resize(preset), train_augment(), RandomColorOp()])


class TwoViews(torch.utils.data.Dataset):
    """images: a CocoDetection over the proposal JSON (its 'boxes' are the pseudo boxes, in score order).
    Item: ((image1, target1), (image2, target2)), targets = {boxes, ids 1..n, num_boxes n}: box k has id k
    in both views."""

    def __init__(self, images, view, max_boxes):
        self.images, self.view, self.max_boxes = images, view, max_boxes

    def __len__(self):
        return len(self.images)

    def __getitem__(self, idx):
        item = self.images[idx]
        if item is None:  # an unreadable image, skipped (--skip-bad-images)
            return None
        image, target = item
        n = min(len(target["boxes"]), self.max_boxes)
        target = {"boxes": tv_tensors.wrap(target["boxes"][:n], like=target["boxes"]),
                  "ids": torch.arange(1, n + 1), "num_boxes": n}
        return self.view(image, target), self.view(image, target)


def collate_views(batch):
    """-> (images1, targets1, images2, targets2). Ids are offset over the batch (image i: ids + number of
    pseudo boxes of images 0..i-1), so every pseudo box of the batch has its own id, the same in both views."""
    out, offset = ([], [], [], []), 0
    for (image1, target1), (image2, target2) in (b for b in batch if b is not None):
        for i, x in enumerate((image1, dict(target1, ids=target1["ids"] + offset),
                               image2, dict(target2, ids=target2["ids"] + offset))):
            out[i].append(x)
        offset += target1["num_boxes"]
    return out


# ------------------------------------------------------------------------------------------------
# The method core: per-detector box-domain forward, contrastive loss, EMA teacher
# ------------------------------------------------------------------------------------------------
def match_boxes(matcher, boxes, candidates):
    """Index of the pseudo box each candidate (RoI/anchor) is assigned to: [C] long, -1 background, -2 ignored."""
    if len(boxes) == 0:
        return torch.full((len(candidates),), -1, dtype=torch.long, device=candidates.device)
    return matcher(box_iou(boxes, candidates))  # quality matrix: [G, C]


def assigned_ids(matched, ids):
    """[C] instance id of each candidate's pseudo box (matched >= 0), 0 for background or ignored ones."""
    if len(ids) == 0:
        return torch.zeros_like(matched)
    return torch.where(matched >= 0, ids[matched.clamp(min=0)], 0)


def sample_positives_first(positive, negative, num):
    """Indices of up to ``num`` samples: all positives (a random ``num`` of them if more), then random
    negatives to fill (mmdet RandomSampler with pos_fraction 1, neg_pos_ub -1)."""
    pos, neg = positive.nonzero().squeeze(1), negative.nonzero().squeeze(1)
    pos = pos[torch.randperm(len(pos), device=pos.device)[:num]]
    neg = neg[torch.randperm(len(neg), device=neg.device)[:num - len(pos)]]
    return torch.cat([pos, neg])


def fcos_assign(anchors, boxes, num_per_level):
    """FCOS targets without centre sampling (mmdet FCOSHead defaults). anchors: [P, 4] stride-sized boxes
    centred on the points of all levels; boxes: [M, 4]. Returns [P]: index of the smallest box that contains
    the point and whose largest side distance lies in the point's level range (0-64, 64-128, ... 512-inf
    for strides 8..128), or -1 (background)."""
    if len(boxes) == 0:
        return torch.full((len(anchors),), -1, dtype=torch.long, device=anchors.device)
    x = ((anchors[:, 0] + anchors[:, 2]) / 2)[:, None]  # [P, 1]
    y = ((anchors[:, 1] + anchors[:, 3]) / 2)[:, None]
    ltrb = torch.stack([x - boxes[:, 0], y - boxes[:, 1], boxes[:, 2] - x, boxes[:, 3] - y], dim=2)  # [P, M, 4]
    stride_size = anchors[:, 2] - anchors[:, 0]  # [P]
    lower, upper = stride_size * 4, stride_size * 8
    lower[:num_per_level[0]], upper[-num_per_level[-1]:] = 0, float("inf")
    reach = ltrb.max(dim=2).values  # [P, M]
    inside = (ltrb.min(dim=2).values > 0) & (reach >= lower[:, None]) & (reach <= upper[:, None])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])  # [M]
    min_area, idx = torch.where(inside, areas[None, :], float("inf")).min(dim=1)  # [P]
    idx[min_area == float("inf")] = -1
    return idx


class BoxDomainModel(nn.Module):
    """A torchvision detector run the AlignDet way on one view.

    forward(images, targets) -> (embeddings [N, D], ids [N], losses): the projector outputs of the N
    contrast samples (RoIs, anchors or points), their instance ids (0 = background) and, in training mode
    (the online model), the detector's regression losses against the pseudo boxes. In eval mode (the
    teacher) the losses are {} and the RPN gives its test-time proposals. The backbone runs under no_grad.
    """

    def __init__(self, detector, kind, roi_samples, dense_samples):
        super().__init__()
        self.detector, self.kind = detector, kind
        self.roi_samples, self.dense_samples = roi_samples, dense_samples

    def forward(self, images, targets):
        images, targets = self.detector.transform(images, targets)  # normalise, pad to /32: ImageList
        with torch.no_grad():
            body = self.detector.backbone.body(images.tensors)  # frozen: C2..C5
        features = self.detector.backbone.fpn(body)  # {name: [B, 256, H_l, W_l]}
        return {"rcnn": self.rcnn, "retinanet": self.retinanet, "fcos": self.fcos}[self.kind](images, features, targets)

    def rcnn(self, images, features, targets):
        det, heads = self.detector, self.detector.roi_heads
        losses = {}
        if self.training:
            proposals, rpn = det.rpn(images, features, targets)  # RPN trained on the pseudo boxes
            losses = {"loss_rpn_cls": rpn["loss_objectness"], "loss_rpn_reg": rpn["loss_rpn_box_reg"]}
        else:
            proposals, _ = det.rpn(images, features)
        rois, ids, gt = [], [], []
        for props, t in zip(proposals, targets):
            props = torch.cat([props.detach(), t["boxes"]])  # pseudo boxes added as proposals: [P+G, 4]
            matched = match_boxes(heads.proposal_matcher, t["boxes"], props)  # IoU >= 0.5 -> box index
            keep = sample_positives_first(matched >= 0, torch.zeros_like(matched, dtype=torch.bool), self.roi_samples)
            rois.append(props[keep])
            ids.append(t["ids"][matched[keep]])
            gt.append(t["boxes"][matched[keep]])
        x = heads.box_head(heads.box_roi_pool(features, rois, images.image_sizes))  # [R, 1024]
        embeddings = heads.box_predictor.cls_score(x)  # the projector replaces the classifier: [R, D]
        ids = torch.cat(ids)  # [R]
        if self.training:  # regression specific to each RoI's instance id, stds (.1, .1, .2, .2)
            deltas = heads.box_predictor.bbox_pred(x).view(len(x), -1, 4)  # [R, num_ids, 4]
            deltas = deltas[torch.arange(len(x), device=x.device), ids]  # [R, 4]
            target = torch.cat(heads.box_coder.encode(gt, rois))  # [R, 4]
            losses["loss_roi_reg"] = F.l1_loss(deltas, target, reduction="sum") / max(len(x), 1)
        return embeddings, ids, losses

    def retinanet(self, images, features, targets):
        det = self.detector
        features = list(features.values())
        embeddings = det.head.classification_head(features)  # projector replaces cls_logits: [B, HWA, D]
        anchors = det.anchor_generator(images, features)  # B x [HWA, 4]
        deltas = det.head.regression_head(features) if self.training else None  # [B, HWA, 4]
        emb, ids, pred, target = [], [], [], []
        for b, t in enumerate(targets):
            matched = match_boxes(det.proposal_matcher, t["boxes"], anchors[b])  # >= 0.5 fg, < 0.4 bg
            keep = sample_positives_first(matched >= 0, matched == -1, self.dense_samples)  # [S]
            fg = matched[keep] >= 0
            emb.append(embeddings[b, keep])
            ids.append(assigned_ids(matched[keep], t["ids"]))  # background: id 0
            if self.training:
                pos = keep[fg]
                pred.append(deltas[b, pos])
                target.append(det.box_coder.encode_single(t["boxes"][matched[pos]], anchors[b][pos]))
        losses = {}
        if self.training:  # L1 on the deltas of the positives (stds 1), averaged over the batch's positives
            pred, target = torch.cat(pred), torch.cat(target)
            losses["loss_reg"] = F.l1_loss(pred, target, reduction="sum") / max(len(pred), 1)
        return torch.cat(emb), torch.cat(ids), losses

    def fcos(self, images, features, targets):
        det = self.detector
        features = list(features.values())
        num_per_level = [f.shape[-2] * f.shape[-1] for f in features]
        embeddings = det.head.classification_head(features).flatten(0, 1)  # [B*P, D]
        anchors = det.anchor_generator(images, features)  # B x [P, 4]
        matched = torch.stack([fcos_assign(a, t["boxes"], num_per_level) for a, t in zip(anchors, targets)])  # [B, P]
        ids = torch.stack([assigned_ids(m, t["ids"]) for m, t in zip(matched, targets)]).flatten()  # [B*P]
        keep = sample_positives_first(ids > 0, ids == 0, self.dense_samples)  # over the view batch
        losses = {}
        if self.training:
            ltrb, centerness = det.head.regression_head(features)  # [B, P, 4], [B, P, 1]
            fg = (matched >= 0).nonzero(as_tuple=True)  # (image, point) indices of the F positives: one sync
            anchors = torch.stack(anchors)  # [B, P, 4]
            gt = torch.stack([t["boxes"][m.clamp(min=0)] if len(t["boxes"]) else torch.zeros_like(a)
                              for m, t, a in zip(matched, targets, anchors)])  # [B, P, 4]
            pred_boxes = det.box_coder.decode(ltrb.float(), anchors)[fg]  # [F, 4] (fp32 under autocast)
            target_ltrb = det.box_coder.encode(anchors, gt)[fg]  # [F, 4] (l, t, r, b) / stride size
            lr, tb = target_ltrb[:, [0, 2]], target_ltrb[:, [1, 3]]
            ctr_target = torch.sqrt(lr.min(1).values / lr.max(1).values * tb.min(1).values / tb.max(1).values)  # [F]
            giou = generalized_box_iou_loss(pred_boxes, gt[fg], reduction="none")  # [F]
            losses["loss_reg"] = (giou * ctr_target).sum() / ctr_target.sum().clamp(min=1e-6)
            losses["loss_ctr"] = F.binary_cross_entropy_with_logits(
                centerness.squeeze(2)[fg], ctr_target, reduction="sum") / max(len(ctr_target), 1)
        return embeddings[keep], ids[keep], losses


def box_contrastive_loss(queries, query_ids, keys, key_ids, temperature=0.5):
    """AlignDet's box-level contrastive loss (its official ContrastiveLoss), per GPU.

    queries: [Nq, D] online embeddings (carry the gradient), query_ids: [Nq] instance ids (0 = background);
    keys: [Nk, D] teacher embeddings, key_ids: [Nk]. For each id L > 0 among the queries: Q = its m
    queries, K = its n keys (K = Q, detached, if the teacher has none), negatives = every online and
    teacher sample of another id (background included), detached. All L2-normalised; each (query, key)
    pair gives -log softmax([q.k, q.n_1, ..., q.n_N] / T)[0]; mean over the m*n pairs, then over the ids.
    Returns (loss, measures): the loss and its progress against chance (common.pretext: contrast_chance,
    contrast_vs_chance, contrast_acc1, ...), averaged over the pairs as the loss is.
    """
    q, k = F.normalize(queries.float(), dim=1), F.normalize(keys.float(), dim=1)
    is_query = query_ids > 0
    qp, qp_ids = q[is_query], query_ids[is_query]  # [M, D], [M]
    if len(qp_ids) == 0:
        return queries.sum() * 0.0, {}  # no pseudo-box sample in this batch: zero, but keeps the graph
    bank = torch.cat([q.detach(), k])  # [Nq+Nk, D]: online samples, then teacher samples
    bank_ids = torch.cat([query_ids, key_ids])  # [Nq+Nk]
    cos = qp @ bank.T  # [M, Nq+Nk]
    sims = cos / temperature
    same = qp_ids[:, None] == bank_ids[None, :]  # [M, Nq+Nk]
    lse_neg = torch.logsumexp(sims.masked_fill(same, float("-inf")), dim=1)  # [M]: log sum_n exp(q.n / T)
    from_teacher = torch.arange(len(bank_ids), device=sims.device) >= len(query_ids)  # [Nq+Nk]
    positive = same & from_teacher  # keys of the query's id
    has_key = positive.any(dim=1, keepdim=True)  # [M, 1]
    positive |= same & ~from_teacher & ~has_key  # no key for this id: its online queries serve as keys
    pair_loss = torch.logaddexp(sims, lse_neg[:, None]) - sims  # [M, Nq+Nk]: CE, target index 0
    uniq, inverse = torch.unique(qp_ids, return_inverse=True)  # per-id averaging: a pair's weight in the mean
    pairs = torch.zeros(len(uniq), device=sims.device).index_add_(0, inverse, positive.sum(1).float())  # [L]
    weight = positive / (pairs[inverse] * len(uniq))[:, None]  # [M, Nq+Nk]: 1 / (pairs of its id x ids)
    loss = (pair_loss * weight).sum()
    return loss, contrastive_measures("contrast", loss, cos, positive, ~same, weight)


def momentum_at(it, total_iters, base=0.996):
    """EMA momentum at iteration ``it``: cosine from ``base`` (it = 0) to 1 (it = total_iters)."""
    return 1 - (1 - base) * (math.cos(math.pi * it / total_iters) + 1) / 2


class EmaTeacher:
    """The momentum detector: a copy of the online model, always in eval mode, never trained.
    update(online, m): teacher = m * teacher + (1 - m) * online for every trainable parameter (the frozen
    backbone is identical in both and left alone). state_dict() leaves out the frozen backbone."""
    FROZEN = "detector.backbone.body."

    def __init__(self, online):
        self.model = copy.deepcopy(online).eval().requires_grad_(False)
        self.names = [n for n, p in online.named_parameters() if p.requires_grad]

    @torch.no_grad()
    def update(self, online, m):
        online_p, teacher_p = dict(online.named_parameters()), dict(self.model.named_parameters())
        teacher = [teacher_p[n] for n in self.names]
        torch._foreach_mul_(teacher, m)
        torch._foreach_add_(teacher, torch._foreach_mul([online_p[n].detach() for n in self.names], 1 - m))

    def state_dict(self):
        return {k: v for k, v in self.model.state_dict().items() if not k.startswith(self.FROZEN)}

    def load_state_dict(self, state):
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith(self.FROZEN) for k in missing):
            raise cli.UserError("the checkpoint's EMA teacher does not fit this model (e.g. "
                                f"{(unexpected or missing)[0]})")


# ------------------------------------------------------------------------------------------------
# Set-up helpers
# ------------------------------------------------------------------------------------------------
def check_aligndet_args(args):
    if args.bn != "frozen" or args.trainable_layers != 0:
        raise cli.UserError("--bn/--trainable-layers: the box-domain stage keeps the backbone frozen "
                            "(--bn frozen --trainable-layers 0)")
    if args.backbone_weights not in ("imagenet", "scratch") and not os.path.isfile(args.backbone_weights):
        raise cli.UserError(f"--backbone-weights {args.backbone_weights}: no such file (expected imagenet, scratch "
                            "or a checkpoint of this repository with a backbone)")
    if args.detector in ("fasterrcnn", "maskrcnn") and args.batch_size * args.align_max_proposals >= args.align_num_ids:
        raise cli.UserError(f"--batch-size {args.batch_size} x --align-max-proposals {args.align_max_proposals} "
                            f"instance ids do not fit the {args.align_num_ids} outputs of the id-specific box "
                            "regressor: lower one of them or raise --align-num-ids")
    if min(args.align_max_proposals, args.align_dim, args.align_dense_samples) < 1 or args.align_temperature <= 0:
        raise cli.UserError("--align-max-proposals, --align-dim, --align-dense-samples and --align-temperature "
                            "must be positive")
    if not 0 <= args.align_ema <= 1:
        raise cli.UserError(f"--align-ema {args.align_ema:g}: expected a value in [0, 1] (the base EMA momentum)")


def resolve_proposals(args, data):
    """Path of the proposal JSON; the default one is generated here (one process) when absent."""
    if args.align_proposals:
        if not os.path.isfile(args.align_proposals):
            raise cli.UserError(f"--align-proposals {args.align_proposals}: no such file; make it with python -m "
                                f"common.proposals <the same data flags> --out {args.align_proposals}")
        return args.align_proposals
    path = proposals.default_output(args.data_cache, data.name, args.align_proposal_method)
    if not os.path.isfile(path):
        if dist.get_world_size() > 1:
            raise cli.UserError(f"{path}: no proposals yet; make them first with python -m common.proposals --method "
                                f"{args.align_proposal_method} <the same data flags> --workers N")
        print(f"no proposals for this set yet: generating {path} (python -m common.proposals)")
        settings = {"method": args.align_proposal_method, "topk": args.align_max_proposals, "nms_iou": 0.5,
                    "ss_max_side": proposals.SS_MAX_SIDE if args.align_proposal_method == "ss" else None,
                    "seed": args.seed}
        proposals.generate(data.train_images, data.train_ann, path, settings, max(args.workers, 1))
    return path


def backbone_meta(weights):
    """The meta of the image-domain stage's checkpoint: its compute counts towards this pre-training."""
    return checkpoint.load(weights, kind="final")["meta"] if weights not in ("imagenet", "scratch") else {}


def build_box_domain_model(args, pad_multiple=32):
    """The detector with AlignDet's projectors in place of its classifiers, and its backbone loaded, frozen; it
    batches views on the canvases of ``pad_multiple`` (common.detectors.PresizedTransform)."""
    rcnn = args.detector in ("fasterrcnn", "maskrcnn")
    kwargs = dict(detector_kwargs(args), **({"rpn_positive_fraction": 1.0} if rcnn else {}))
    detector = build_detector("fasterrcnn" if rcnn else args.detector, args.align_num_ids - 1, args.backbone,
                              "frozen", args.box_head, trainable_layers=0,
                              imagenet=args.backbone_weights == "imagenet", pad_multiple=pad_multiple,
                              max_side=PRESETS[args.preset][1], **kwargs)
    if args.backbone_weights not in ("imagenet", "scratch"):
        checkpoint.load_pretrained(detector, args.backbone_weights, parts={"backbone"})
    d = args.align_dim
    if rcnn:  # MoCo-v2 style fc-relu-fc on the 1024-d RoI features
        detector.roi_heads.box_predictor.cls_score = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(inplace=True),
                                                                   nn.Linear(1024, d))
    else:  # RetinaNet: one d-dim embedding per anchor; FCOS: per point. The head's forward reshapes by num_classes.
        head = detector.head.classification_head
        first = nn.Conv2d(256, 256, 1) if args.detector == "retinanet" else nn.Conv2d(256, 256, 3, padding=1)
        head.cls_logits = nn.Sequential(first, nn.ReLU(inplace=True), nn.Conv2d(256, head.num_anchors * d, 1))
        head.num_classes = d
    assert not any(p.requires_grad for p in detector.backbone.body.parameters())
    return BoxDomainModel(detector, "rcnn" if rcnn else args.detector, args.roi_batch_size, args.align_dense_samples)


# ------------------------------------------------------------------------------------------------
def main(args):
    device = dist.init_distributed(args.device, args.dist_timeout)
    cli.check_args(args)
    check_detector_args(args, device)
    check_aligndet_args(args)
    dist.seed_everything(args.seed)
    data = resolve_data(args)
    weights_tag = args.backbone_weights if args.backbone_weights in ("imagenet", "scratch") else "path"
    prepare_output_dir(args, f"runs/aligndet/{args.detector}_{args.backbone}_{weights_tag}")
    print(f"args: {vars(args)}")

    # data: the proposal JSON is a COCO instances file whose boxes are the pseudo boxes (labels unused)
    proposal_file = resolve_proposals(args, data)
    proposals.check_coverage(proposal_file, data.train_ann)  # it lists the images trained on: all of the set
    images = CocoDetection(data.train_images, proposal_file, keep_empty=False, skip_bad_images=args.skip_bad_images)
    print(f"train images with proposals ({proposal_file}): {images.summary()} (images without one are skipped)")
    dataset = TwoViews(images, build_view_transform(args.preset), args.align_max_proposals)
    loader = build_train_loader(dataset, args.batch_size, args.workers, args.seed, device, collate_fn=collate_views,
                                group_ids=aspect_groups(images))

    # model: online detector (+ DDP), EMA teacher
    online = build_box_domain_model(args, pad_multiple_for(args, device)).to(device)
    model = dist.data_parallel(online, device)
    teacher = EmaTeacher(online)  # after DDP has broadcast rank 0's weights: every rank's teacher starts equal

    # optimisation: the 1x schedule, lr scaled linearly from global batch 16
    global_batch = args.batch_size * dist.get_world_size()
    base_lr = args.lr or scaled_lr(LR_1X[args.detector], 16, global_batch)
    optimizer = torch.optim.SGD(param_groups(online, args.weight_decay), lr=base_lr, momentum=args.momentum)
    iters_per_epoch = loader.batch_sampler.batches_per_epoch
    total, lr_steps = schedule_1x(args.iters, args.epochs, args.lr_steps, iters_per_epoch)
    max_iters = min(total, args.max_iters or total)
    # the lr and warm-up this run uses, given or not: what a resume compares (common.rundir)
    args.lr, args.warmup_iters = base_lr, warmup_iters(args.warmup_iters, 500, total)
    print(f"schedule: {total} iterations ({iters_per_epoch}/epoch, global batch {global_batch}), lr {base_lr:g} "
          f"x0.1 at {lr_steps}, warmup {args.warmup_iters}; EMA momentum {args.align_ema} -> 1"
          + (f"; stopping at {max_iters} (--max-iters)" if max_iters < total else ""))
    run = Run(args, method="aligndet", device=device, iters_per_epoch=iters_per_epoch, max_iters=max_iters,
              samples_per_iter=args.batch_size)
    scaler = torch.amp.GradScaler(device.type, enabled=run.amp == torch.float16)  # loss scaling for fp16 only
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    run.checkpoints_hold(online, optimizer, scaler, teacher=teacher)
    if args.resume:  # online model, optimizer, scaler, EMA teacher, iteration and random streams
        run.resume()

    model.train()
    for it, (images1, targets1, images2, targets2) in run.batches(loader):
        lr = set_lr(optimizer, lr_at(it, base_lr, "step", total, args.warmup_iters, 0.001, lr_steps))
        images1, targets1 = to_float_batch(images1, device), targets_to(targets1, device, keys=("boxes", "ids"))
        images2, targets2 = to_float_batch(images2, device), targets_to(targets2, device, keys=("boxes", "ids"))
        with run.autocast():
            queries, query_ids, losses = model(images1, targets1)  # view 1, online: [N, D], [N], regression
            with torch.no_grad():
                keys, key_ids, _ = teacher.model(images2, targets2)  # view 2, teacher: [N', D], [N']
            contrast, measures = box_contrastive_loss(queries, query_ids, keys, key_ids, args.align_temperature)
            losses["loss_contrast"] = args.align_contrast_weight * contrast
        loss = sum(losses.values())
        if not run.finite(loss, losses):  # agreed over ranks: skipped (--skip-nonfinite) or the run stops
            continue
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        grad_norm = None
        if args.clip_grad > 0:
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.clip_grad)  # the norm before clipping
        scaler.step(optimizer)
        scaler.update()
        teacher.update(online, momentum_at(it, total, args.align_ema))  # teacher = m teacher + (1 - m) online
        run.log_losses(losses, loss, lr, measures, grad_norm)

    # export the online detector in the fine-tune key space, without its final class/box layers
    meta = run.finish(checkpoint.final_state(online.detector, drop=() if args.align_keep_heads else FINAL_LAYERS),
                      {"method": "aligndet", "finetune_recipe": FINETUNE_RECIPE,
                       "detector": args.detector, "backbone": args.backbone,
                       "box_head": args.box_head, "backbone_weights": args.backbone_weights,
                       "backbone_meta": backbone_meta(args.backbone_weights), "proposals": proposal_file,
                       "trained": "fpn and heads (backbone frozen)"})
    print(f"wrote {os.path.join(args.output_dir, 'model_final.pth')}: parts {meta['parts']}; fine-tune it with "
          f"finetune.py --detector {args.detector} --backbone {args.backbone} --init <that file>")


if __name__ == "__main__":
    cli.run(main, get_args_parser())
