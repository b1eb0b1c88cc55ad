"""PreDet pre-training: classification pre-training plus query-box lookup across two views.

PreDet (Ramanathan, Wang, Mahajan, "PreDet: Large-Scale Weakly Supervised Pre-Training for Detection",
ICCV 2021, openaccess.thecvf.com/content/ICCV2021, paper Ramanathan_PreDet_Large-Scale_Weakly_Supervised...)
trains a ResNet-FPN from scratch with L = L_cls + L_crpn + L_info + L_croi-reg, all weights 1:
- L_cls: multi-label cross-entropy (Mahajan et al. 2018: softmax against the k-hot target normalised to
  sum 1) from one classification head (global average pool + linear) shared by every FPN level, averaged
  over the levels P2-P6 and both views. On COCO the image's annotated category set stands in for the
  paper's noisy hashtags.
- Two MoCo-v2 views of each image (random resized crop 480x480, colour jitter, grayscale, blur, flip) and Q
  query boxes visible in both. View 2's RoI-pooled query features f_q look up the same boxes in view 1:
- CRPN: per-anchor D-dim features of view 1 dotted with A per-query vectors from f_q give a score and 4
  deltas for every (query, anchor) pair; trained like an RPN on each anchor's max-IoU query.
- CROI: proposals (CRPN's top boxes for any query, plus the queries) and the queries go through the same
  box head and FC; InfoNCE on cosine similarities (one positive per query against up to 512 proposals
  away from every query, tau 0.07) and a regression of the positive onto the query from b_q (4xD) . b_p (D).
There is no official code: this is a from-scratch reading of the paper (sec. 3.1-3.3, 4.1).

Transfer: model_final.pth holds the backbone, the FPN, the CRPN's 3x3 conv (as ``rpn.head.conv``, the
same module as torchvision's RPNHead conv) and the box head (as ``roi_heads.box_head``) in the keys of
common/detectors.py's Faster/Mask R-CNN; RPN objectness/deltas and the box predictor start fresh in
fine-tuning. A part whose losses were switched off is not exported.

Choices where the paper is silent (each a flag; defaults in --help):
- Queries: random boxes (sqrt-area 0.1-0.8 of the two crops' overlap, aspect 1/3..3) or a selective-search
  file (--proposals; the paper's EdgeBoxes need a model file we cannot get), clipped to the overlap of the
  two crops (redrawn up to 10 times until it holds a query) so both views show the same content, >= 8 px in
  both views, NMS 0.5, a random Q; an image with no visible proposal gets random queries. MoCo-v2's views on
  PIL images, hue and blur through OpenCV (10x faster; the hue equal within rounding, the blur a true
  Gaussian where PIL's approximates it with box filters).
- D = 256 for the CRPN features and the CROI projections. CRPN: detectron2's RPN defaults (256 anchors per
  image, half positive, low-quality matches, delta weights 1), proposals: top 2000 per level, NMS 0.7, 512
  per image, plus the queries. Both regressions L1 (d2's smooth-L1 beta 0), CROI box coder (10, 10, 5, 5).
  CROI: one positive drawn among proposals with IoU > 0.5 with the query, P_neg (512) among those under 0.5
  with every query of the image. --predet-no-crpn (Table 1): 4 jittered copies of each query and 512 random
  boxes instead of CRPN proposals.
- Schedule: the paper's 540k iterations at 1024 views do not fit COCO: 100 COCO epochs, lr 0.2 at 1024 views
  scaled linearly, x0.1 at 1/5..4/5, 1000-iteration warm-up, SGD momentum 0.9, weight decay 1e-4, from
  scratch with plain BN (SyncBN on several GPUs). meta "images_seen" counts images (2 views each).
- A toy strength of the views for short runs (--predet-crop-scale 0.5 1 --predet-color-strength 0.5: crop area
  0.5-1, colour ops at half strength): with the paper's, L_info stays near chance for hundreds of iterations at
  128 px from scratch (RESULTS.md, protocol v4's pilots). Progress is logged against chance (common.pretext):
  info_vs_chance (L_info minus ln(1 + negatives)), info_acc1 (top-1 lookup), cls_vs_chance (L_cls minus the loss
  of the label prior).
The paper's Fig. 5b (IoU vs feature similarity) for any checkpoint: python -m common.similarity CKPT.

    python predet.py                                 # synthetic set, defaults (slow on a CPU: use the next one)
    python predet.py --backbone resnet18 --preset cpu --anchor-scale 0.5 --predet-dim 64 --predet-num-queries 8 \\
        --predet-post-nms 64 --predet-neg 32 --batch-size 4 --iters 100 --warmup-iters 10 --lr 0.0015625 \\
        --predet-crop-scale 0.5 1 --predet-color-strength 0.5 --clip-grad 10 --device cpu --workers 1
                                                     # CPU demo (make demo's), ~3 min on 2 cores
    torchrun --nproc_per_node=8 predet.py --data-path /data/coco        # 8 GPUs x 4 images (8 views)
lr for other GPU counts: 0.2 x (2 x batch-size x NGPU) / 1024.
"""
import argparse
import os

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision import tv_tensors
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import MultiScaleRoIAlign, batched_nms, box_iou, clip_boxes_to_image, nms
from torchvision.ops.misc import Conv2dNormActivation
from torchvision.transforms import v2

from common import checkpoint, cli, dist
from common.coco import CocoDetection, resolve_data
from common.detectors import BACKBONES, BOX_HEADS, build_backbone, build_box_head, parts_of
from common.engine import Run
from common.loader import build_train_loader
from common.pretext import info_nce_measures, soft_target_measures
from common.proposals import load_proposals
from common.optim import lr_at, param_groups, scaled_lr, set_lr, warmup_help, warmup_iters
from common.rundir import prepare_output_dir
from common.transforms import normalize

SIZES = {"480": 480, "cpu": 128}  # view side in px: the paper's 480x480, or the CPU demo's
# what transfers, renamed into common/detectors.py's Faster/Mask R-CNN keys
EXPORT = (("backbone.", "backbone."), ("crpn.conv.", "rpn.head.conv."), ("croi.box_head.", "roi_heads.box_head."))
# How the paper fine-tunes (written into model_final.pth, applied by finetune.py --protocol paper)
FINETUNE_RECIPE = {"bn": "train", "trainable_layers": 5, "mask_head_lr_mult": 4.0, "preset": "multiscale",
                   "source": "paper (PreDet sec. 4.2): 'fine-tuned without freezing any layers', mask head lr x4, "
                             "short sides {640..800}. Inferred: BN trains (SyncBN on several GPUs); lr and decay x1 "
                             "(grid-searched, values not stated); its random crop, of unstated size, not applied"}


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser(description="PreDet pre-training", parents=[cli.base_parser()],
                                     add_help=add_help, formatter_class=cli.HelpFormatter)
    g = parser.add_argument_group("model")
    g.add_argument("--backbone", default="resnet50", help="|".join(BACKBONES))
    g.add_argument("--box-head", default="4conv1fc", choices=BOX_HEADS, help="CROI box head (transfers)")
    g.add_argument("--bn", default=None, choices=["bn", "syncbn", "frozen"],
                   help="backbone norm (default: syncbn on several GPUs, else bn)")
    g.add_argument("--trainable-layers", type=int, default=5, help="trainable ResNet stages from the top")
    g.add_argument("--init", default="scratch", choices=["scratch", "imagenet"], help="backbone start")
    g.add_argument("--anchor-scale", type=float, default=1.0, help="multiplies anchor sizes 32..512")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=4, help="images per GPU (2 views each); paper: 4")
    g.add_argument("--lr", type=float, default=None, help="default 0.2 at 1024 views, scaled linearly")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g.add_argument("--epochs", type=int, default=100)
    g.add_argument("--iters", type=int, default=None, help="train this many iterations instead of epochs")
    g.add_argument("--warmup-iters", type=int, default=None, help=warmup_help(1000))
    g.add_argument("--preset", default="480", choices=sorted(SIZES), help="view size: 480 or cpu (128)")
    # PreDet specific
    g = parser.add_argument_group("PreDet")
    g.add_argument("--predet-queries", default="random", choices=["random", "proposals"])
    g.add_argument("--proposals", default=None, help="proposal JSON of common/proposals.py")
    g.add_argument("--predet-num-queries", type=int, default=16, help="Q per image")
    g.add_argument("--predet-random-scale", type=float, nargs=2, default=(0.1, 0.8))
    g.add_argument("--predet-min-query", type=float, default=8.0, help="min query side in each view (px)")
    g.add_argument("--predet-query-nms", type=float, default=0.5)
    g.add_argument("--predet-crop-scale", type=float, nargs=2, default=(0.2, 1.0), help="MoCo-v2 crop area")
    g.add_argument("--predet-color-strength", type=float, default=1.0,
                   help="x MoCo-v2's jitter magnitudes, grayscale and blur probabilities (1: the paper's, 0: none)")
    g.add_argument("--predet-dim", type=int, default=256, help="D")
    g.add_argument("--predet-crpn-batch", type=int, default=256)
    g.add_argument("--predet-crpn-pos-fraction", type=float, default=0.5)
    g.add_argument("--predet-crpn-no-low-quality", action="store_true")
    g.add_argument("--predet-pre-nms", type=int, default=2000, help="top-K proposals per level")
    g.add_argument("--predet-nms", type=float, default=0.7)
    g.add_argument("--predet-post-nms", type=int, default=512, help="K_nms proposals per image")
    g.add_argument("--predet-neg", type=int, default=512, help="|P_neg| per image")
    g.add_argument("--predet-tau", type=float, default=0.07)
    g.add_argument("--predet-smooth-l1-beta", type=float, default=0.0)
    for term, what in (("cls", "L_cls"), ("det", "L_crpn, L_info and L_croi-reg (classification only)"),
                       ("crpn", "L_crpn (the CROI head then sees random boxes)"), ("croi", "L_info and L_croi-reg"),
                       ("croi-reg", "L_croi-reg")):
        g.add_argument(f"--predet-no-{term}", action="store_true", help=f"switch off {what} (Table 1)")
    return parser


# ---------------------------------------------------------------- data: two views with shared queries
def random_boxes(window, n, scale):
    """n random XYXY boxes inside ``window`` (x0, y0, x1, y1): side sqrt(w*h) a fraction in ``scale`` of the
    window's, aspect log-uniform in [1/3, 3]. Returns [n, 4]."""
    x0, y0, x1, y1 = window
    ww, wh = x1 - x0, y1 - y0
    side = torch.empty(n).uniform_(*scale) * (ww * wh) ** 0.5
    aspect = torch.exp(torch.empty(n).uniform_(-1.0986, 1.0986))  # ln 3
    w, h = (side * aspect.sqrt()).clamp(max=ww), (side / aspect.sqrt()).clamp(max=wh)
    bx, by = x0 + torch.rand(n) * (ww - w), y0 + torch.rand(n) * (wh - h)
    return torch.stack([bx, by, bx + w, by + h], 1)


class MocoColorJitter(v2.ColorJitter):
    """torchvision's ColorJitter (same factors, same random order of the four ops) on a PIL view, with the
    hue step run through OpenCV's 8-bit HSV: 0.8 ms instead of PIL's 8 ms per 480-px view. Both shift the
    8-bit hue by int(hue_factor x 255) modulo 256; the two HSV conversions differ by rounding only."""

    def _call_kernel(self, functional, inpt, *args, **kwargs):
        if functional is not v2.functional.adjust_hue or not isinstance(inpt, Image.Image):
            return super()._call_kernel(functional, inpt, *args, **kwargs)
        hsv = cv2.cvtColor(np.asarray(inpt), cv2.COLOR_RGB2HSV_FULL)  # [S, S, 3] uint8, hue in 0..255
        hsv[..., 0] += np.uint8(int(kwargs["hue_factor"] * 255) % 256)  # wraps around, as PIL's kernel
        return Image.fromarray(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL))


class MocoBlur(v2.Transform):
    """MoCo v2's blur: a Gaussian with sigma ~ U(lo, hi) on the PIL view (MoCo: PIL's GaussianBlur), run
    through OpenCV (a true Gaussian, kernel +-3 sigma): ~1 ms instead of PIL's ~10 ms per 480-px view. PIL's
    is a 3-pass box approximation: the two differ by ~0.5 grey levels on average, by up to ~40 at sharp
    edges. (torchvision's tensor GaussianBlur costs ~10-25 ms.)"""

    def __init__(self, sigma):
        super().__init__()
        self.sigma = sigma

    def make_params(self, flat_inputs):
        return {"sigma": self.sigma[0] + (self.sigma[1] - self.sigma[0]) * float(torch.rand(()))}

    def transform(self, inpt, params):  # inpt: a PIL image
        return Image.fromarray(cv2.GaussianBlur(np.asarray(inpt), (0, 0), params["sigma"]))


class TwoViewsWithQueries:
    """(image, target) -> (views [2, 3, S, S] uint8, info): two MoCo-v2 views and the queries in each.

    The queries are sampled inside the overlap of the two crop windows, so query i covers the same pixels
    of the original image in both views (identity = row index): info = {queries1 [Q, 4], queries2 [Q, 4]
    (XYXY in each view's pixels), cls_target [C] k-hot of the annotated categories}."""

    def __init__(self, size, num_classes, args, proposals=None):
        self.size, self.num_classes, self.args, self.proposals = size, num_classes, args, proposals
        self.crop = v2.RandomResizedCrop(size, scale=tuple(args.predet_crop_scale))
        s = args.predet_color_strength  # 1: MoCo v2's jitter (0.4, 0.4, 0.4, 0.1), grayscale p 0.2, blur p 0.5
        self.photometric = v2.Compose([v2.RandomApply([MocoColorJitter(0.4 * s, 0.4 * s, 0.4 * s, 0.1 * s)], p=0.8),
                                       v2.RandomGrayscale(0.2 * s), v2.RandomApply([MocoBlur((0.1, 2.0))], p=0.5 * s)])

    def __call__(self, image, target):
        crops = self.sample_crops(image)
        (t1, l1, h1, w1), (t2, l2, h2, w2) = crops
        overlap = (max(l1, l2), max(t1, t2), min(l1 + w1, l2 + w2), min(t1 + h1, t2 + h2))
        queries = self.sample_queries(target["image_id"], overlap, crops)
        (view1, q1), (view2, q2) = (self.view(image, queries, c) for c in crops)
        cls_target = torch.zeros(self.num_classes)
        cls_target[target["labels"] - 1] = 1.0
        return torch.stack([view1, view2]), {"queries1": q1, "queries2": q2, "cls_target": cls_target}

    def sample_crops(self, image, tries=10):
        """Two RandomResizedCrop windows (top, left, h, w) whose overlap fits a minimal query in both
        views; after ``tries`` failures both views use the first window."""
        min_side = self.args.predet_min_query
        for _ in range(tries):
            crops = [self.crop.make_params([image]) for _ in range(2)]
            crops = [(c["top"], c["left"], c["height"], c["width"]) for c in crops]
            (t1, l1, h1, w1), (t2, l2, h2, w2) = crops
            ow, oh = min(l1 + w1, l2 + w2) - max(l1, l2), min(t1 + h1, t2 + h2) - max(t1, t2)
            if min(ow / max(w1, w2), oh / max(h1, h2)) * self.size >= 2 * min_side:
                return crops
        return [crops[0], crops[0]]

    def sample_queries(self, image_id, overlap, crops):
        """Up to Q boxes [Q, 4] in original pixels inside the overlap, >= min-query px in both views: the
        image's proposals clipped to the overlap, else (none visible, or --predet-queries random) random
        boxes, else the overlap itself; NMS'd, then a random subset."""
        a = self.args
        candidates = [random_boxes(overlap, 4 * a.predet_num_queries, a.predet_random_scale),
                      torch.tensor([overlap], dtype=torch.float)]
        if self.proposals is not None:
            props = self.proposals.get(image_id, torch.zeros(0, 4))
            lo, hi = torch.tensor(overlap[:2], dtype=torch.float), torch.tensor(overlap[2:], dtype=torch.float)
            candidates.insert(0, torch.cat([props[:, :2].clamp(lo, hi), props[:, 2:].clamp(lo, hi)], 1))
        px_per_orig = torch.tensor([min(self.size / c[3] for c in crops), min(self.size / c[2] for c in crops)])
        for cand in candidates:
            visible = ((cand[:, 2:] - cand[:, :2]) * px_per_orig >= a.predet_min_query).all(1)
            if visible.any():
                break
        cand = cand[visible]
        keep = nms(cand, torch.rand(len(cand)), a.predet_query_nms)[: a.predet_num_queries]
        return cand[keep]

    def view(self, image, queries, crop):
        """image [3, H, W] uint8, queries [Q, 4] in its pixels, crop (top, left, h, w) -> (view [3, S, S]
        uint8, queries [Q, 4] in the view's pixels)."""
        size = [self.size, self.size]
        boxes = v2.functional.resized_crop(
            tv_tensors.BoundingBoxes(queries, format="XYXY", canvas_size=tuple(image.shape[-2:])), *crop, size=size)
        # the crop is resized in channels-last (HWC) layout, the decoder's: torch's uint8 antialiased resize
        # is fastest there and the result goes to PIL without a transpose (1 ms instead of 4, same pixels)
        image = v2.functional.crop(image, *crop).permute(1, 2, 0).contiguous().permute(2, 0, 1)
        image = v2.functional.resize(tv_tensors.Image(image), size, antialias=True)
        if torch.rand(()) < 0.5:
            image, boxes = v2.functional.horizontal_flip(image), v2.functional.horizontal_flip(boxes)
        # the colour ops run on a PIL image, as in MoCo: PIL's kernels are ~2x faster than the tensor ones
        image = v2.functional.pil_to_tensor(self.photometric(v2.functional.to_pil_image(image)))
        return image, boxes.as_subclass(torch.Tensor).clamp(0, self.size)


def collate_views(batch):
    """-> (views [B, 2, 3, S, S] uint8, list of info dicts); skipped bad images (None) are dropped."""
    views, info = zip(*[b for b in batch if b is not None])
    return torch.stack(views), list(info)


# ---------------------------------------------------------------- the PreDet model and its losses
def crpn_scores(anchor_feats, query_vecs):
    """Score of every (query, anchor) pair: <f_I^cls[b, a, :, y, x], f_q^cls[b, q, a, :]>.

    anchor_feats: [B, A, D, H, W]; query_vecs: [B, Q, A, D] -> [B, Q, A, H, W]. The paper's 1x1 group
    convolution (groups = A, the query vectors as weights [Q*A, D, 1, 1] reordered anchor-major) computes
    the same numbers; einsum does all queries at once without the reordering (tested equal)."""
    return torch.einsum("badhw,bqad->bqahw", anchor_feats, query_vecs)


def crpn_labels(anchors, queries, low_quality=True):
    """Anchor -> (query index [N], label [N]: 1 pos (IoU > 0.7), 0 neg (< 0.3), -1 ignored).

    Each anchor takes its max-IoU query (a random query when every IoU is 0). ``low_quality``: each
    query's best anchors are positives too (d2/torchvision RPN matcher)."""
    iou = box_iou(anchors, queries)  # [N, Q]
    best, matched = iou.max(1)
    zero = best == 0
    matched[zero] = torch.randint(len(queries), (int(zero.sum()),), device=anchors.device)
    labels = torch.full_like(best, -1.0)
    labels[best < 0.3] = 0.0
    labels[best > 0.7] = 1.0
    if low_quality:
        per_query = iou.max(0).values  # [Q]
        a_idx, q_idx = torch.nonzero((iou == per_query[None]) & (per_query[None] > 0), as_tuple=True)
        labels[a_idx], matched[a_idx] = 1.0, q_idx
    return matched, labels


def info_nce(s_pos, s_neg, tau):
    """L_info per query: -log(exp(s+/tau) / (exp(s+/tau) + sum_neg exp(s-/tau))). s_pos [Q], s_neg [Q, N]."""
    logits = torch.cat([s_pos[:, None], s_neg], 1) / tau  # [Q, 1 + N]
    return F.cross_entropy(logits, torch.zeros(len(s_pos), dtype=torch.long, device=s_pos.device),
                           reduction="none")


class ContrastiveRPN(nn.Module):
    """CRPN: a 3x3 conv (torchvision RPNHead's, so it transfers), then per anchor D-dim classification and
    regression features of view 1; from f_q [.., 256*7*7], A classification vectors and A x 4 regression
    vectors per query. Outputs scores [B, Q, N] and deltas [B, Q, N, 4], N = sum over levels of H*W*A
    in torchvision's anchor order (level, y, x, anchor)."""

    def __init__(self, num_anchors, dim, roi_dim=256 * 7 * 7):
        super().__init__()
        self.A, self.D = num_anchors, dim
        self.conv = nn.Sequential(Conv2dNormActivation(256, 256, kernel_size=3, norm_layer=None))
        self.anchor_cls = nn.Conv2d(256, num_anchors * dim, 1)
        self.anchor_reg = nn.Conv2d(256, num_anchors * dim, 1)
        self.query_cls = nn.Linear(roi_dim, num_anchors * dim)
        self.query_reg = nn.Linear(roi_dim, num_anchors * 4 * dim)
        for conv in (self.conv[0][0], self.anchor_cls, self.anchor_reg):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, features, fq):
        B, Q = fq.shape[:2]
        q_cls = self.query_cls(fq).view(B, Q, self.A, self.D)  # [B, Q, A, D]
        q_reg = self.query_reg(fq).view(B, Q, self.A, 4, self.D)  # [B, Q, A, 4, D]
        scores, deltas = [], []
        for x in features:
            t = self.conv(x)  # [B, 256, H, W]
            H, W = t.shape[-2:]
            a_cls = self.anchor_cls(t).view(B, self.A, self.D, H, W)
            a_reg = self.anchor_reg(t).view(B, self.A, self.D, H, W)
            s = crpn_scores(a_cls, q_cls)  # [B, Q, A, H, W]
            scores.append(s.permute(0, 1, 3, 4, 2).reshape(B, Q, -1))
            d = torch.einsum("badhw,bqacd->bqhwac", a_reg, q_reg)  # [B, Q, H, W, A, 4]
            deltas.append(d.reshape(B, Q, -1, 4))
        return torch.cat(scores, 2), torch.cat(deltas, 2)


class ContrastiveROIHead(nn.Module):
    """CROI: the box head (shared by proposals and queries) -> b [.., 1024]; one FC embeds b for the cosine
    similarity s_pq; FCs project b_q to 4 x D and b_p to D, whose product gives the 4 deltas of p onto q."""

    def __init__(self, box_head, dim, with_regression=True):
        super().__init__()
        self.box_head, self.D = box_head, dim
        self.embed = nn.Linear(1024, dim)
        if with_regression:  # small init: the product of two projections starts near 0 deltas
            self.reg_query = nn.Linear(1024, 4 * dim)
            self.reg_proposal = nn.Linear(1024, dim)
            for fc in (self.reg_query, self.reg_proposal):
                nn.init.normal_(fc.weight, std=0.01)
                nn.init.zeros_(fc.bias)

    def similarity_inputs(self, roi_feats):
        b = self.box_head(roi_feats)  # [n, 1024]
        return b, F.normalize(self.embed(b).float(), dim=1)  # [n, 1024], [n, D] unit length (fp32)

    def deltas(self, b_q, b_p):
        """[Q, 1024] x [Q, 1024] (matched rows) -> [Q, 4]."""
        return torch.einsum("qcd,qd->qc", self.reg_query(b_q).view(-1, 4, self.D), self.reg_proposal(b_p))


class PreDet(nn.Module):
    """Backbone + FPN, the shared classification head and the CRPN / CROI pretext heads (each built only
    when its losses are on). forward(view1, view2 [B, 3, S, S] normalised, queries1/2 lists of [Q_b, 4],
    cls_targets [B, C]) -> (losses {loss_cls, loss_crpn_cls, loss_crpn_reg, loss_info, loss_croi_reg}, measures
    {cls_chance, cls_floor, cls_vs_chance, info_chance, info_vs_chance, info_acc1, ...}: common.pretext).
    cls_prior [C]: the training set's mean normalised k-hot target, L_cls's chance level (default uniform)."""

    def __init__(self, args, num_classes, cls_prior=None):
        super().__init__()
        self.args = args
        prior = torch.full((num_classes,), 1 / num_classes) if cls_prior is None else cls_prior
        self.register_buffer("cls_prior", prior, persistent=False)  # not in the checkpoint
        self.backbone = build_backbone(args.backbone, args.bn, args.trainable_layers, args.init == "imagenet")
        self.cls_head = nn.Linear(256, num_classes) if args.use_cls else None
        sizes = tuple((round(s * args.anchor_scale),) for s in (32, 64, 128, 256, 512))  # = the detector's
        self.anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 5)  # A = 3 per location, P2-P6
        self.roi_pool = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)  # level by box size (FPN rule)
        self.crpn = ContrastiveRPN(3, args.predet_dim) if args.use_crpn else None
        self.croi = (ContrastiveROIHead(build_box_head(args.box_head), args.predet_dim, args.use_croi_reg)
                     if args.use_croi else None)
        self.crpn_coder = det_utils.BoxCoder((1.0, 1.0, 1.0, 1.0))
        self.croi_coder = det_utils.BoxCoder((10.0, 10.0, 5.0, 5.0))
        self.sampler = det_utils.BalancedPositiveNegativeSampler(args.predet_crpn_batch,
                                                                 args.predet_crpn_pos_fraction)

    def forward(self, view1, view2, queries1, queries2, cls_targets):
        B, size = len(view1), tuple(view1.shape[-2:])
        feats = self.backbone(torch.cat([view1, view2]))  # {'0'..'3', 'pool'}: [2B, 256, H_l, W_l]
        losses, measures = {}, {}
        if self.cls_head is not None:
            losses["loss_cls"] = self.cls_loss(list(feats.values()), cls_targets.repeat(2, 1))
            t = normalised_targets(cls_targets)  # [n, C]: the same targets at every level and in both views
            if len(t):
                measures.update(soft_target_measures("cls", losses["loss_cls"], t, self.cls_prior))
        if self.crpn is None and self.croi is None:
            return losses, measures
        f1 = {k: v[:B] for k, v in feats.items()}
        f2 = {k: v[B:] for k, v in feats.items()}
        fq = self.roi_pool(f2, queries2, [size] * B)  # f_q: [sum Q_b, 256, 7, 7], view 2
        if self.crpn is not None:
            proposals = self.crpn_step(view1, f1, fq, queries1, losses, with_proposals=self.croi is not None)
        else:
            proposals = [jittered_and_random(q, size, self.args.predet_post_nms) for q in queries1]
        if self.croi is not None:
            self.croi_step(f1, fq, queries1, [torch.cat([p, q]) for p, q in zip(proposals, queries1)],
                           size, losses, measures)
        return losses, measures

    def cls_loss(self, levels, targets):
        """Mahajan et al.: softmax CE against the k-hot target / its sum, per level, averaged over levels;
        images without labels are left out. levels: [2B, 256, H, W] each; targets [2B, C]."""
        has = targets.sum(1) > 0
        if not has.any():
            return levels[0].sum() * 0
        t = normalised_targets(targets)  # [n, C]
        per_level = [-(t * F.log_softmax(self.cls_head(x[has].mean((2, 3))), 1)).sum(1).mean() for x in levels]
        return torch.stack(per_level).mean()

    def view_anchors(self, view1, levels):
        """The anchors of view 1, B x [N, 4] XYXY in view pixels, in the CRPN's order (level, y, x, anchor).
        torchvision's AnchorGenerator takes each level's stride from the ImageList's tensor, which must
        therefore be the views themselves [B, 3, S, S], not a feature map."""
        return self.anchors(ImageList(view1, [tuple(view1.shape[-2:])] * len(view1)), levels)

    def crpn_step(self, view1, f1, fq, queries1, losses, with_proposals):
        """CRPN losses into ``losses``; returns the proposals (no gradient) per image [K_b, 4]."""
        a = self.args
        size = tuple(view1.shape[-2:])
        counts = [len(q) for q in queries1]
        fq_pad = torch.nn.utils.rnn.pad_sequence(fq.flatten(1).split(counts), batch_first=True)  # [B, Qm, 12544]
        levels = [f1[k] for k in ("0", "1", "2", "3", "pool")]
        scores, deltas = self.crpn(levels, fq_pad)  # [B, Qm, N], [B, Qm, N, 4]
        anchors = self.view_anchors(view1, levels)  # B x [N, 4]
        cls_l, reg_l, n_sampled, proposals = [], [], 0, []
        for b, (q, anc) in enumerate(zip(queries1, anchors)):
            matched, labels = crpn_labels(anc, q, not a.predet_crpn_no_low_quality)
            pos, neg = (m[0] for m in self.sampler([labels]))
            pos, neg = pos.nonzero()[:, 0], neg.nonzero()[:, 0]
            idx = torch.cat([pos, neg])
            logits = scores[b, matched[idx], idx].float()
            cls_l.append(F.binary_cross_entropy_with_logits(logits, labels[idx], reduction="sum"))
            target = self.crpn_coder.encode_single(q[matched[pos]], anc[pos])  # [n_pos, 4]
            reg_l.append(F.smooth_l1_loss(deltas[b, matched[pos], pos].float(), target,
                                          beta=a.predet_smooth_l1_beta, reduction="sum"))
            n_sampled += len(idx)
            if with_proposals:
                proposals.append(self.crpn_proposals(  # fp32: bf16 would move boxes by pixels
                    scores[b, :len(q)].detach().float(), deltas[b, :len(q)].detach().float(), anc,
                    [x.shape[-2] * x.shape[-1] * 3 for x in levels], size))
        losses["loss_crpn_cls"] = torch.stack(cls_l).sum() / max(n_sampled, 1)
        losses["loss_crpn_reg"] = torch.stack(reg_l).sum() / max(n_sampled, 1)
        return proposals

    def crpn_proposals(self, scores, deltas, anchors, per_level, size):
        """Per anchor: max score over queries, box = anchor moved by that query's deltas; top-K per level,
        NMS per level, K_nms kept. scores [Q, N], deltas [Q, N, 4] -> [K, 4]."""
        a = self.args
        best, q = scores.max(0)  # [N]
        boxes = self.crpn_coder.decode_single(deltas[q, torch.arange(len(q), device=q.device)], anchors)
        boxes = clip_boxes_to_image(boxes, size)
        top, level, start = [], [], 0
        for i, n in enumerate(per_level):
            top.append(best[start:start + n].topk(min(a.predet_pre_nms, n)).indices + start)
            level.append(torch.full((len(top[-1]),), i, device=boxes.device))
            start += n
        top, level = torch.cat(top), torch.cat(level)
        boxes, best = boxes[top], best[top]
        ok = ((boxes[:, 2:] - boxes[:, :2]) >= 1).all(1)
        keep = batched_nms(boxes[ok], best[ok], level[ok], a.predet_nms)[: a.predet_post_nms]
        return boxes[ok][keep]

    def croi_step(self, f1, fq, queries1, proposals, size, losses, measures):
        """L_info and L_croi-reg into ``losses``, L_info's progress against chance into ``measures``.
        proposals: per image [P_b, 4] (queries included)."""
        a = self.args
        pos_boxes, neg_boxes = [], []
        for q, p in zip(queries1, proposals):
            iou = box_iou(p, q)  # [P, Q]
            pos = torch.multinomial((iou.T > 0.5).float(), 1)[:, 0]  # [Q]: one of each row's IoU > 0.5
            neg = (iou.max(1).values < 0.5).nonzero()[:, 0]  # P_neg: IoU < 0.5 with every query
            neg = neg[torch.randperm(len(neg), device=neg.device)[: a.predet_neg]]
            pos_boxes.append(p[pos])
            neg_boxes.append(p[neg])
        n_pos, n_neg = [len(x) for x in pos_boxes], [len(x) for x in neg_boxes]
        rois = [torch.cat([pb, nb]) for pb, nb in zip(pos_boxes, neg_boxes)]
        fp = self.roi_pool(f1, rois, [size] * len(rois))  # [sum(Q_b + N_b), 256, 7, 7], view 1
        b_all, e_all = self.croi.similarity_inputs(torch.cat([fq, fp]))  # [n, 1024], [n, D]: queries, then rois
        nq = sum(n_pos)  # queries of the batch = positives of the batch
        b_q, e_q = b_all[:nq].split(n_pos), e_all[:nq].split(n_pos)
        b_p, e_p = b_all[nq:], e_all[nq:]
        per_image = [p + n for p, n in zip(n_pos, n_neg)]
        info, reg, cos = [], [], []
        for i, (bp, ep) in enumerate(zip(b_p.split(per_image), e_p.split(per_image))):
            s_pos = (e_q[i] * ep[: n_pos[i]]).sum(1)  # [Q]: cosine(q, p+_q)
            s_neg = e_q[i] @ ep[n_pos[i]:].T  # [Q, N_neg]
            info.append(info_nce(s_pos, s_neg, a.predet_tau))
            cos.append(torch.cat([s_pos[:, None], s_neg], 1).detach())  # [Q, 1 + N_neg]: the positive first
            if a.use_croi_reg:
                target = self.croi_coder.encode_single(queries1[i], pos_boxes[i])  # [Q, 4]: p+ -> q
                pred = self.croi.deltas(b_q[i], bp[: n_pos[i]])  # [Q, 4]
                reg.append(F.smooth_l1_loss(pred.float(), target, beta=a.predet_smooth_l1_beta,
                                            reduction="none").sum(1))
        losses["loss_info"] = torch.cat(info).mean()  # mean over the queries of the batch
        measures.update(info_nce_measures("info", losses["loss_info"], cos))
        if reg:
            losses["loss_croi_reg"] = torch.cat(reg).mean()


def normalised_targets(targets):
    """L_cls's targets: the k-hot rows of images with labels, divided by their sums (Mahajan et al.). [n, C]"""
    has = targets.sum(1) > 0
    return targets[has] / targets[has].sum(1, keepdim=True)


def jittered_and_random(queries, size, n):
    """--predet-no-crpn proposals: 4 copies of each query with centre and size jittered by up to 10%,
    plus n random boxes over the view. [4 Q + n, 4]."""
    wh = (queries[:, 2:] - queries[:, :2]).repeat(4, 1)
    centre = (queries[:, 2:] + queries[:, :2]).repeat(4, 1) / 2 + (torch.rand_like(wh) - 0.5) * 0.2 * wh
    wh = wh * (1 + (torch.rand_like(wh) - 0.5) * 0.2)
    jittered = torch.cat([centre - wh / 2, centre + wh / 2], 1)
    rand = random_boxes((0, 0, size[1], size[0]), n, (0.05, 0.8)).to(queries.device)
    return clip_boxes_to_image(torch.cat([jittered, rand]), size)


# ---------------------------------------------------------------- the script
def check_args(args, device):
    cli.check_args(args)
    if args.backbone not in BACKBONES:
        raise cli.UserError(f"--backbone {args.backbone}: unknown backbone (expected one of {', '.join(BACKBONES)})")
    if args.predet_queries == "proposals" and not args.proposals:
        raise cli.UserError("--predet-queries proposals needs --proposals FILE (python -m common.proposals)")
    if args.proposals and args.predet_queries != "proposals":
        raise cli.UserError("--proposals is read only with --predet-queries proposals")
    if args.proposals and not os.path.isfile(args.proposals):
        raise cli.UserError(f"--proposals {args.proposals}: no such file")
    if not 0 <= args.predet_color_strength <= 1:
        raise cli.UserError(f"--predet-color-strength {args.predet_color_strength:g}: expected a value in [0, 1]")
    if args.predet_num_queries < 1:
        raise cli.UserError(f"--predet-num-queries {args.predet_num_queries}: expected a positive integer")
    args.use_cls = not args.predet_no_cls
    args.use_crpn = not (args.predet_no_det or args.predet_no_crpn)
    args.use_croi = not (args.predet_no_det or args.predet_no_croi)
    args.use_croi_reg = args.use_croi and not args.predet_no_croi_reg
    if not (args.use_cls or args.use_crpn or args.use_croi):
        raise cli.UserError("every loss term is switched off (--predet-no-cls with --predet-no-det)")
    if args.bn is None:
        args.bn = "syncbn" if dist.get_world_size() > 1 and device.type == "cuda" else "bn"
    if args.bn == "frozen" and args.init == "scratch":
        raise cli.UserError("--bn frozen keeps a random network's norm statistics fixed; use it with --init imagenet")


def main(args):
    device = dist.init_distributed(args.device, args.dist_timeout)
    cv2.setNumThreads(1)  # OpenCV runs in the (forked) loader workers, one per core already
    check_args(args, device)
    dist.seed_everything(args.seed)
    data = resolve_data(args)
    prepare_output_dir(args, f"runs/predet/{args.backbone}_{data.name}")
    print(f"args: {vars(args)}")

    # data: two views + queries per image; the annotated categories as image-level labels
    train_set = CocoDetection(data.train_images, data.train_ann, keep_empty=True,
                              skip_bad_images=args.skip_bad_images)
    proposals = None
    if args.predet_queries == "proposals":
        proposals = load_proposals(args.proposals, [r["image_id"] for r in train_set.records])
    train_set.transforms = TwoViewsWithQueries(SIZES[args.preset], train_set.num_classes, args, proposals)
    print(f"train ({data.train_ann}): {train_set.summary()}")
    train_loader = build_train_loader(train_set, args.batch_size, args.workers, args.seed, device,
                                      collate_fn=collate_views)

    # model
    khot = torch.zeros(len(train_set.records), train_set.num_classes)  # the images' category sets
    for i, record in enumerate(train_set.records):
        khot[i, torch.as_tensor(record["labels"], dtype=torch.long) - 1] = 1.0
    targets = normalised_targets(khot)  # L_cls's chance: their mean, the best guess that ignores the image
    model = PreDet(args, train_set.num_classes, targets.mean(0) if len(targets) else None).to(device)
    if args.bn == "syncbn":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model_without_ddp = model
    model = dist.data_parallel(model, device)

    # optimisation: lr 0.2 at 1024 views, x0.1 at four uniform steps
    global_views = 2 * args.batch_size * dist.get_world_size()
    base_lr = args.lr or scaled_lr(0.2, 1024, global_views, "lr (per view)")
    optimizer = torch.optim.SGD(param_groups(model_without_ddp, args.weight_decay), lr=base_lr,
                                momentum=args.momentum)
    iters_per_epoch = train_loader.batch_sampler.batches_per_epoch
    total = args.iters or args.epochs * iters_per_epoch
    lr_steps = [round(total * k / 5) for k in range(1, 5)]
    max_iters = min(total, args.max_iters or total)
    # the lr and warm-up this run uses, given or not: what a resume compares (common.rundir)
    args.lr, args.warmup_iters = base_lr, warmup_iters(args.warmup_iters, 1000, total)
    print(f"schedule: {total} iterations ({iters_per_epoch}/epoch, {global_views} views), lr {base_lr:g} "
          f"x0.1 at {lr_steps}, warmup {args.warmup_iters}")
    run = Run(args, method="predet", device=device, iters_per_epoch=iters_per_epoch, max_iters=max_iters,
              samples_per_iter=args.batch_size)
    scaler = torch.amp.GradScaler(device.type, enabled=run.amp == torch.float16)  # loss scaling for fp16 only
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    run.checkpoints_hold(model_without_ddp, optimizer, scaler)
    if args.resume:  # model, optimizer, scaler, iteration and random streams from the newest checkpoint
        run.resume()

    model.train()
    for it, (views, info) in run.batches(train_loader):
        lr = set_lr(optimizer, lr_at(it, base_lr, "step", total, args.warmup_iters, 0.001, lr_steps))
        views = views.to(device, non_blocking=True).float().div_(255)
        view1, view2 = normalize(views[:, 0]), normalize(views[:, 1])
        q1, q2 = ([i[k].to(device) for i in info] for k in ("queries1", "queries2"))
        cls_targets = torch.stack([i["cls_target"] for i in info]).to(device)
        with run.autocast():
            losses, measures = model(view1, view2, q1, q2, cls_targets)  # loss_cls, ..., loss_info; vs chance
        loss = sum(losses.values())  # all weights 1 (Eq. 1, 2)
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
        run.log_losses(losses, loss, lr, measures, grad_norm)

    state = checkpoint.final_state(model_without_ddp, rename=EXPORT)  # in the detector's keys
    run.finish(state, {"method": "predet", "finetune_recipe": FINETUNE_RECIPE,
                       "detector": "fasterrcnn", "backbone": args.backbone,
                       "box_head": args.box_head, "num_classes": train_set.num_classes,
                       "losses": [k for k in ("cls", "crpn", "croi", "croi_reg") if getattr(args, f"use_{k}")],
                       "trained": "backbone, fpn" + ", rpn conv" * args.use_crpn + ", box_head" * args.use_croi})
    print(f"wrote {os.path.join(args.output_dir, 'model_final.pth')}: parts {parts_of(state)}")


if __name__ == "__main__":
    cli.run(main, get_args_parser())
