"""predet.py: L_cls, the CRPN and CROI losses and proposals on hand-made tensors against the paper's formulas, the
forward's view wiring, view geometry, the export, exact resume, transfer to finetune.py."""
import json
import math
import re
import statistics

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import tv_tensors

import numpy as np
import predet
from PIL import Image
from common import checkpoint, claims, cli, rundir
from common.coco import CocoDetection
from common.transforms import normalize
from conftest import TINY, content_match, iteration_losses, run_script

PD = ["--backbone", "resnet18", "--preset", "cpu", "--anchor-scale", "0.5", "--predet-dim", "32",
      "--predet-num-queries", "4", "--predet-post-nms", "32", "--predet-neg", "16", "--predet-pre-nms", "200",
      "--batch-size", "2", "--iters", "3", "--warmup-iters", "1", "--workers", "0", "--print-freq", "1",
      "--no-tb", "--device", "cpu"]


def parse(*flags):
    args = predet.get_args_parser().parse_args(list(flags))
    predet.check_args(args, torch.device("cpu"))
    return args


@pytest.fixture(scope="module")
def model():
    """A tiny PreDet with every loss on (3 classes); tests swap its parts and settings with ``swap``."""
    torch.manual_seed(0)
    return predet.PreDet(parse("--backbone", "resnet18", "--anchor-scale", "0.5", "--predet-dim", "8"), num_classes=3)


@pytest.fixture
def swap():
    """swap(obj, name, value): setattr undone after the test. (pytest's monkeypatch deletes, instead of
    restoring, an nn.Module's parameters and sub-modules, which live outside the instance's __dict__.)"""
    undo = []

    def set_value(obj, name, value):
        kept = isinstance(obj, nn.Module) and (name in obj._modules or name in obj._parameters)
        undo.append((obj, name, getattr(obj, name) if kept or name in vars(obj) else None))
        setattr(obj, name, value)
    yield set_value
    for obj, name, old in reversed(undo):
        if old is None:  # an instance attribute over a method of the class
            delattr(obj, name)
        else:
            setattr(obj, name, old)


# ---- independent re-derivations (plain Python) of the paper's box arithmetic
def iou(a, b):
    """IoU of two XYXY boxes."""
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def encode(target, ref, weights):
    """Faster R-CNN's Eq. 2: the deltas that move box ``ref`` onto box ``target``, times (wx, wy, ww, wh)."""
    (rw, rh), (tw, th) = (ref[2] - ref[0], ref[3] - ref[1]), (target[2] - target[0], target[3] - target[1])
    return [weights[0] * ((target[0] + tw / 2) - (ref[0] + rw / 2)) / rw,
            weights[1] * ((target[1] + th / 2) - (ref[1] + rh / 2)) / rh,
            weights[2] * math.log(tw / rw), weights[3] * math.log(th / rh)]


def softplus(x):
    return math.log1p(math.exp(x))


class Fixed(nn.Module):
    """Stands in for a sub-network: records its inputs, returns what ``fn`` makes of them."""

    def __init__(self, fn):
        super().__init__()
        self.fn, self.calls = fn, []

    def forward(self, *inputs, **named):
        self.calls.append(inputs + tuple(named.values()))
        return self.fn(*inputs, **named)


# ---- classification loss
@pytest.mark.numerics
def test_cls_loss_is_softmax_ce_on_the_normalised_k_hot_target_averaged_over_levels(model, swap):
    """PreDet sec. 3.1: multi-label CE of Mahajan et al. (softmax against the k-hot target / its sum) from one
    head shared by every FPN level, the average over levels; images without a label are left out."""
    torch.manual_seed(1)
    weight, bias = torch.randn(3, 256) * 0.3, torch.tensor([0.2, -0.4, 0.1])
    swap(model.cls_head, "weight", nn.Parameter(weight))
    swap(model.cls_head, "bias", nn.Parameter(bias))
    levels = [torch.randn(4, 256, h, w, requires_grad=True) for h, w in ((4, 6), (2, 3), (1, 2))]  # non-square
    targets = torch.tensor([[1., 0., 1.], [0., 1., 0.], [0., 0., 0.], [1., 1., 1.]])  # image 2: no label
    loss = model.cls_loss(levels, targets)

    per_level = []
    for x in levels:
        h, w = x.shape[-2:]
        ce = []
        for n, y in enumerate(targets.tolist()):
            if sum(y) == 0:
                continue
            pooled = [sum(row) / (h * w) for row in x[n].flatten(1).tolist()]  # global average pool, [256]
            logits = [sum(wc * p for wc, p in zip(wk, pooled)) + bk for wk, bk in zip(weight.tolist(), bias.tolist())]
            log_z = math.log(sum(math.exp(v) for v in logits))
            ce.append(-sum(yk / sum(y) * (v - log_z) for yk, v in zip(y, logits)))
        per_level.append(sum(ce) / len(ce))
    assert loss.item() == pytest.approx(sum(per_level) / len(per_level), rel=1e-5)
    loss.backward()
    for x in levels:  # the image without labels gets no gradient, the others do
        assert (x.grad[2] == 0).all() and all(x.grad[n].abs().sum() > 0 for n in (0, 1, 3))
    assert model.cls_loss(levels, torch.zeros(4, 3)).item() == 0  # a batch without labels: nothing to learn


# ---- CRPN
@pytest.mark.numerics
def test_crpn_scores_equal_explicit_loop_and_group_convolution():
    torch.manual_seed(0)
    B, A, D, H, W, Q = 2, 3, 5, 4, 6, 4
    feats, queries = torch.randn(B, A, D, H, W), torch.randn(B, Q, A, D)
    scores = predet.crpn_scores(feats, queries)
    loop = torch.zeros(B, Q, A, H, W)
    for b in range(B):
        for q in range(Q):
            for a in range(A):
                for y in range(H):
                    for x in range(W):
                        loop[b, q, a, y, x] = feats[b, a, :, y, x] @ queries[b, q, a]
    assert torch.allclose(scores, loop, atol=1e-5)
    for b in range(B):  # the paper's 1x1 group convolution: A groups, query vectors as weights
        weight = queries[b].permute(1, 0, 2).reshape(A * Q, D, 1, 1)
        out = F.conv2d(feats[b].reshape(1, A * D, H, W), weight, groups=A).view(A, Q, H, W)
        assert torch.allclose(out.permute(1, 0, 2, 3), scores[b], atol=1e-5)


def test_crpn_labels_follow_max_iou_and_thresholds():
    queries = torch.tensor([[0., 0., 10., 10.], [50., 50., 70., 70.]])
    anchors = torch.tensor([[0., 0., 10., 10.],     # IoU 1 with q0 -> positive, q0
                            [0., 0., 10., 12.],     # IoU 0.83 with q0 -> positive
                            [0., 0., 10., 20.],     # IoU 0.5 -> ignored
                            [50., 50., 60., 60.],   # IoU 0.25 with q1 -> negative, q1
                            [200., 200., 210., 210.]])  # IoU 0 with both -> negative, random query
    matched, labels = predet.crpn_labels(anchors, queries, low_quality=False)
    assert labels.tolist() == [1, 1, -1, 0, 0]
    assert matched[:4].tolist() == [0, 0, 0, 1] and 0 <= matched[4] < 2
    _, labels = predet.crpn_labels(anchors, queries, low_quality=True)
    assert labels.tolist() == [1, 1, -1, 1, 0]  # q1's best anchor becomes positive (d2 matcher)


def test_crpn_sampling_is_128_positives_and_128_negatives():
    args = parse()
    sampler = predet.det_utils.BalancedPositiveNegativeSampler(args.predet_crpn_batch, args.predet_crpn_pos_fraction)
    labels = torch.cat([torch.ones(300), torch.zeros(1000), -torch.ones(50)])
    pos, neg = (m[0] for m in sampler([labels]))
    assert pos.sum() == 128 and neg.sum() == 128 and (labels[pos.bool()] == 1).all()


# ---- CRPN anchors: on the view's grid, in the order of the CRPN's scores
def view_levels(model, h, w):
    """A [1, 3, h, w] view and its P2-P6 feature maps."""
    view = torch.zeros(1, 3, h, w)
    with torch.no_grad():
        feats = model.backbone(view)
    return view, [feats[k] for k in ("0", "1", "2", "3", "pool")]


def test_crpn_anchors_tile_the_whole_view_at_every_level():
    # anchor sides 16..256, ratios 0.5, 1, 2
    model = predet.PreDet(parse("--backbone", "resnet18", "--anchor-scale", "0.5", "--predet-dim", "8"), num_classes=5)
    h, w = 128, 192  # non-square, so that a swapped axis cannot pass
    view, levels = view_levels(model, h, w)
    anchors = model.view_anchors(view, levels)[0]
    start = 0
    for level, stride in enumerate((4, 8, 16, 32, 64)):  # P2..P6
        n = (h // stride) * (w // stride) * 3
        a = anchors[start:start + n]
        start += n
        centres = (a[:, :2] + a[:, 2:]) / 2
        assert sorted(set(centres[:, 0].tolist())) == [stride * k for k in range(w // stride)], level
        assert sorted(set(centres[:, 1].tolist())) == [stride * k for k in range(h // stride)], level
        areas = ((a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])).sqrt()
        assert torch.allclose(areas, torch.full_like(areas, 16.0 * 2 ** level), rtol=0.02), level
    assert start == len(anchors)


def test_a_query_anywhere_in_the_view_gets_positive_anchors_on_it():
    model = predet.PreDet(parse("--backbone", "resnet18", "--predet-dim", "8"), num_classes=5)
    view, levels = view_levels(model, 128, 192)
    anchors = model.view_anchors(view, levels)[0]
    for query in ([150., 90., 182., 122.], [4., 100., 36., 124.], [100., 8., 164., 72.], [60., 40., 124., 104.]):
        q = torch.tensor([query])
        _, labels = predet.crpn_labels(anchors, q, low_quality=False)  # strict IoU > 0.7
        pos = anchors[labels == 1]
        assert len(pos) > 0, query
        centres = (pos[:, :2] + pos[:, 2:]) / 2
        assert ((centres >= q[:, :2]) & (centres <= q[:, 2:])).all(), (query, pos)


def test_crpn_scores_are_ordered_like_the_anchors():
    """A feature that is non-zero at one place of one level scores exactly the anchors centred there."""
    torch.manual_seed(0)
    model = predet.PreDet(parse("--backbone", "resnet18", "--predet-dim", "4"), num_classes=5)
    crpn = model.crpn
    with torch.no_grad():  # the 3x3 conv passes channel 0 through, each anchor's D features = channel 0
        crpn.conv[0][0].weight.zero_()
        crpn.conv[0][0].weight[0, 0, 1, 1] = 1.0
        crpn.anchor_cls.weight.zero_()
        crpn.anchor_cls.weight[:, 0] = 1.0
        crpn.query_cls.weight.zero_()
        crpn.query_cls.bias.fill_(1.0)
    view, levels = view_levels(model, 128, 192)
    for level, (y, x) in ((0, (27, 41)), (2, (5, 9)), (4, (1, 2))):
        feats = [torch.zeros_like(f) for f in levels]
        feats[level][0, 0, y, x] = 1.0
        with torch.no_grad():
            scores, _ = crpn(feats, torch.zeros(1, 2, 256 * 7 * 7))  # [1, Q, N]
        anchors = model.view_anchors(view, feats)[0]
        hit = anchors[scores[0, 0] != 0]
        stride = 4 * 2 ** level
        assert len(hit) == 3, level  # the A = 3 anchors of that place
        centres = (hit[:, :2] + hit[:, 2:]) / 2
        assert centres.tolist() == [[x * stride, y * stride]] * 3, level


# ---- CRPN losses and proposals on controlled scores and deltas
def crpn_inputs(query_counts, h, w):
    """view 1 [B, 3, h, w], its P2-P6 features (zeros: only their sizes matter here) and f_q (zeros)."""
    B = len(query_counts)
    f1 = {k: torch.zeros(B, 256, h // s, w // s) for k, s in zip(("0", "1", "2", "3", "pool"), (4, 8, 16, 32, 64))}
    return torch.zeros(B, 3, h, w), f1, torch.zeros(sum(query_counts), 256, 7, 7)


def decode(d, ref):
    """Faster R-CNN's Eq. 2 inverted (weights 1): box ``ref`` moved by deltas ``d``."""
    w, h = ref[2] - ref[0], ref[3] - ref[1]
    cx, cy = ref[0] + w / 2 + d[0] * w, ref[1] + h / 2 + d[1] * h
    w, h = w * math.exp(d[2]), h * math.exp(d[3])
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


@pytest.mark.numerics
def test_crpn_loss_scores_each_anchor_for_its_max_iou_query(model, swap):
    """PreDet sec. 3.2.1: each anchor takes its max-IoU query; positive > 0.7, negative < 0.3; BCE on the score of
    the (anchor, that query) pair, L1 regression of positives onto that query (Faster R-CNN's Eq. 2, weights 1);
    both summed over the batch's sampled anchors and divided by their number (d2's RPN)."""
    queries = [torch.tensor([[10., 20., 50., 40.], [46., 10., 66., 70.]]), torch.tensor([[150., 78., 170., 92.]])]
    anchors = torch.tensor([[12., 20., 52., 40.],    # IoU .905 with q0 (.064 with q1): positive, q0
                            [16.5, 20., 56.5, 40.],  # .720 with q0: positive (just above 0.7)
                            [17.6, 20., 57.6, 40.],  # .681 with q0: ignored (just below 0.7)
                            [32.5, 20., 72.5, 40.],  # .280 with q0, .250 with q1: negative of q0 (just below 0.3)
                            [30.5, 20., 70.5, 40.],  # .322 with q0: ignored (just above 0.3)
                            [46., 14., 66., 74.],    # .875 with q1 (.042 with q0): positive, q1
                            [40., 30., 80., 90.],    # .286 with q1 (.032 with q0): negative of q1
                            [150., 80., 170., 90.]])  # image 0: no overlap, negative; image 1: .714, positive
    torch.manual_seed(0)
    scores, deltas = torch.randn(2, 2, 8), torch.randn(2, 2, 8, 4) * 0.3
    scores[0, :, 7] = 0.4  # overlaps no query of image 0: its random query must not change the loss
    scores[1, 1], deltas[1, 1] = 30.0, 30.0  # image 1 has one query: row 1 is padding and must never count
    scores.requires_grad_()
    deltas.requires_grad_()
    crpn = Fixed(lambda levels, fq: (scores, deltas))
    swap(model, "crpn", crpn)
    swap(model, "view_anchors", lambda view1, levels: [anchors, anchors])
    view1, f1, fq = crpn_inputs([2, 1], 96, 160)
    losses = {}
    assert model.crpn_step(view1, f1, fq, queries, losses, with_proposals=False) == []
    assert crpn.calls[0][1].shape == (2, 2, 256 * 7 * 7)  # f_q padded per image to the most queries

    labels, cls_sum, reg_sum, sampled, grad_at = [], 0.0, 0.0, 0, set()
    for b, qs in enumerate(queries):
        labels.append([])
        for n, a in enumerate(anchors.tolist()):
            ious = [iou(a, q) for q in qs.tolist()]
            m = ious.index(max(ious))
            label = 1 if max(ious) > 0.7 else 0 if max(ious) < 0.3 else -1
            labels[-1].append(label)
            if label < 0:
                continue
            sampled += 1
            s = scores[b, m, n].item()
            cls_sum += softplus(-s) if label else softplus(s)  # BCE with logits
            if max(ious) > 0 or len(qs) == 1:  # else a random query
                grad_at.add((b, m, n))
            if label:
                target = encode(qs[m].tolist(), a, (1, 1, 1, 1))
                reg_sum += sum(abs(d - t) for d, t in zip(deltas[b, m, n].tolist(), target))
    assert labels == [[1, 1, -1, 0, -1, 1, 0, 0], [0, 0, 0, 0, 0, 0, 0, 1]]  # the design above, both sides probed
    assert losses["loss_crpn_cls"].item() == pytest.approx(cls_sum / sampled, rel=1e-5)
    assert losses["loss_crpn_reg"].item() == pytest.approx(reg_sum / sampled, rel=1e-5)
    (losses["loss_crpn_cls"] + losses["loss_crpn_reg"]).backward()
    # the gradient reaches exactly the (image, matched query, anchor) pairs of the sampled anchors
    unambiguous = torch.ones(2, 2, 8, dtype=torch.bool)
    unambiguous[0, :, 7] = False
    assert {tuple(i) for i in (scores.grad != 0).nonzero().tolist() if unambiguous[tuple(i)]} == grad_at
    assert (scores.grad[0, :, 7] != 0).sum() == 1
    assert {tuple(i) for i in (deltas.grad != 0).any(3).nonzero().tolist()} == {(0, 0, 0), (0, 0, 1), (0, 1, 5),
                                                                                (1, 0, 7)}


@pytest.mark.numerics
def test_crpn_loss_samples_128_positives_128_negatives_and_divides_by_the_sampled(model, swap):
    """PreDet sec. 3.2.1: 128 positive and 128 negative anchors per image (negatives fill in for missing
    positives, d2); the losses are the sums over the sampled anchors of the batch / their number."""
    query, far = [10., 10., 50., 50.], [200., 200., 240., 240.]
    anchors = [torch.tensor([query] * 100 + [far] * 1200), torch.tensor([query] * 300 + [far] * 1000)]
    s, d = 0.3, [0.1, -0.2, 0.3, 0.05]  # the same score and deltas everywhere: which anchors are drawn cannot matter
    swap(model, "crpn", Fixed(lambda levels, fq: (torch.full((2, 1, 1300), s),
                                                                  torch.tensor(d).expand(2, 1, 1300, 4))))
    swap(model, "view_anchors", lambda view1, levels: anchors)
    view1, f1, fq = crpn_inputs([1, 1], 96, 160)
    losses = {}
    model.crpn_step(view1, f1, fq, [torch.tensor([query])] * 2, losses, with_proposals=False)
    n_pos, n_neg = 100 + 128, 156 + 128  # image 0: its 100 positives + 156 negatives; image 1: 128 + 128
    assert losses["loss_crpn_cls"].item() == pytest.approx((n_pos * softplus(-s) + n_neg * softplus(s)) / 512,
                                                           rel=1e-5)
    # positives sit on the query: target 0, L1 = sum |d|
    assert losses["loss_crpn_reg"].item() == pytest.approx(n_pos * sum(map(abs, d)) / 512, rel=1e-5)


@pytest.mark.numerics
def test_crpn_loss_keeps_each_querys_best_anchor_unless_told_not_to(model, swap):
    """Low-quality matches (d2's RPN, the default): a query whose best anchor reaches only IoU .606 still gets it
    as a positive; --predet-crpn-no-low-quality applies the paper's literal > 0.7 rule (that anchor ignored)."""
    query, anchors = [10., 10., 50., 50.], torch.tensor([[10., 10., 50., 76.], [200., 200., 240., 240.]])
    d = [0.1, -0.2, 0.3, 0.05]
    swap(model, "crpn", Fixed(lambda levels, fq: (torch.zeros(1, 1, 2), torch.tensor(d).expand(1, 1, 2, 4))))
    swap(model, "view_anchors", lambda view1, levels: [anchors])
    view1, f1, fq = crpn_inputs([1], 96, 160)
    losses = {}
    model.crpn_step(view1, f1, fq, [torch.tensor([query])], losses, with_proposals=False)
    target = encode(query, anchors[0].tolist(), (1, 1, 1, 1))
    assert losses["loss_crpn_reg"].item() == pytest.approx(sum(abs(a - b) for a, b in zip(d, target)) / 2, rel=1e-5)
    swap(model.args, "predet_crpn_no_low_quality", True)
    model.crpn_step(view1, f1, fq, [torch.tensor([query])], losses, with_proposals=False)
    assert losses["loss_crpn_reg"].item() == 0 and losses["loss_crpn_cls"].item() == pytest.approx(math.log(2))


@pytest.mark.numerics
def test_crpn_proposals_take_the_best_query_per_anchor_then_top_k_and_nms_per_level(model, swap):
    """PreDet sec. 3.2.1, proposal construction: per anchor the max score over queries and the box moved by THAT
    query's deltas; top-K per level, NMS per level, K_nms kept; clipped to the (non-square) view, tiny boxes
    dropped."""
    swap(model.args, "predet_pre_nms", 3)
    swap(model.args, "predet_post_nms", 4)
    assert model.args.predet_nms == 0.7
    anchors = torch.tensor([[10., 10., 30., 30.],    # level 0 | best q1 (5.0), its deltas -> [12, 10, 32, 30]
                            [15.4, 10., 35.4, 30.],  # best q0 (4.0): IoU .709 with the box above: suppressed
                            [15.9, 10., 35.9, 30.],  # best q1 (3.0): IoU .674: kept
                            [70., 40., 90., 58.],    # 1.0: 4th of its level, beyond top-3
                            [12., 10., 32., 30.],    # level 1 | 0.5: the same box as level 0's best, kept
                            [70., 45., 95., 75.],    # 0.4: clipped to the view's height 60 -> [70, 45, 95, 60]
                            [99.5, 10., 119.5, 30.],  # 0.45: clipped to the view's width 100: 0.5 px wide, dropped
                            [0., 40., 20., 60.],     # 0.05: 4th of its level
                            [0., 40., 20., 60.]])    # level 2 | 0.1: 5th overall, beyond K_nms = 4
    scores = torch.tensor([[2.0, 4.0, 2.5, 1.0, 0.5, 0.4, 0.45, 0.05, 0.1],
                           [5.0, -1., 3.0, 0.0, 0.2, 0.3, 0.1, 0.0, 0.0]])
    deltas = torch.zeros(2, 9, 4)
    deltas[1, 0] = torch.tensor([0.1, 0., 0., 0.])
    deltas[0, 0] = torch.tensor([0., 0., math.log(2), 0.])  # the losing query's deltas
    deltas[1, 1] = torch.tensor([0.5, 0., 0., 0.])
    deltas[0, 2] = torch.tensor([0.3, 0.3, 0.3, 0.3])
    boxes = model.crpn_proposals(scores, deltas, anchors, [4, 4, 1], (60, 100))  # view: H 60, W 100
    assert torch.allclose(boxes, torch.tensor([[12., 10., 32., 30.], [15.9, 10., 35.9, 30.], [12., 10., 32., 30.],
                                               [70., 45., 95., 60.]]), atol=1e-4), boxes


@pytest.mark.numerics
def test_crpn_step_proposals_are_each_levels_best_anchor_on_a_non_square_view(model, swap):
    """The step's proposals, with the real anchors of a 128 x 192 view: top-1 per level picks the one anchor
    each level scores high, moved by its best query's deltas and clipped to the view; image 1's padded query
    row never competes."""
    h, w = 128, 192
    swap(model.args, "predet_pre_nms", 1)
    grid = [(h // s, w // s) for s in (4, 8, 16, 32, 64)]
    offsets = [sum(3 * gh * gw for gh, gw in grid[:level]) for level in range(5)]
    n = sum(3 * gh * gw for gh, gw in grid)
    # (level, y, x, deltas): anchor 1 of the three at a place has aspect 1, side 16 x 2^level (anchor scale 0.5)
    picks = [(0, 5, 47, (0., 0., 0., 0.)), (1, 3, 20, (0.5, -0.25, math.log(2), 0.)), (2, 7, 3, (0., 0., 0., 0.)),
             (3, 1, 2, (0., 0., 0., 0.)), (4, 1, 1, (0.1, 0., -math.log(4), -math.log(4)))]
    scores, deltas = torch.full((2, 2, n), -5.0), torch.zeros(2, 2, n, 4)
    expected = []
    for level, y, x, d in picks:
        i = offsets[level] + (y * grid[level][1] + x) * 3 + 1
        stride, side = 4 * 2 ** level, 16 * 2 ** level
        anchor = [x * stride - side / 2, y * stride - side / 2, x * stride + side / 2, y * stride + side / 2]
        box = decode(d, anchor)
        expected.insert(0, [max(0, box[0]), max(0, box[1]), min(w, box[2]), min(h, box[3])])  # clipped
        for b, q in ((0, 1), (1, 0)):
            scores[b, q, i], deltas[b, q, i] = 10.0 + level, torch.tensor(d)
        scores[0, 0, i], deltas[0, 0, i] = 9.0 + level, 1.0  # image 0's other query: lower score, other deltas
    scores[1, 1, offsets[0] + (10 * grid[0][1] + 10) * 3] = 50.0  # image 1's padding row
    swap(model, "crpn", Fixed(lambda levels, fq: (scores, deltas)))
    view1, f1, fq = crpn_inputs([2, 1], h, w)
    queries = [torch.tensor([[20., 20., 60., 50.], [100., 30., 140., 90.]]), torch.tensor([[50., 60., 90., 120.]])]
    proposals = model.crpn_step(view1, f1, fq, queries, {}, with_proposals=True)
    assert expected[-1] == [180., 12., 192., 28.] and expected[-2] == [144., 0., 192., 32.]  # the right edge
    for b in range(2):  # highest level first (score 10 + level)
        assert torch.allclose(proposals[b], torch.tensor(expected), atol=1e-3), (b, proposals[b])


# ---- CROI
@pytest.mark.numerics
def test_info_nce_matches_the_paper_formula_and_pulls_the_positive_up():
    torch.manual_seed(0)
    s_pos = torch.rand(3, requires_grad=True)
    s_neg = torch.rand(3, 5) * 2 - 1
    tau = 0.07
    loss = predet.info_nce(s_pos, s_neg, tau)
    sp, sn = s_pos.tolist(), s_neg.tolist()
    by_hand = [-math.log(math.exp(sp[q] / tau) / (math.exp(sp[q] / tau) + sum(math.exp(v / tau) for v in sn[q])))
               for q in range(3)]
    assert torch.allclose(loss, torch.tensor(by_hand), rtol=1e-5)
    loss.mean().backward()
    assert (s_pos.grad < 0).all()  # descending the loss raises the positive's similarity
    sim = torch.eye(4)  # cosines of 4 orthogonal embeddings; query q's positive is box pos[q], the rest negatives

    def loss(pos):
        rest = torch.ones(4, 4, dtype=torch.bool)
        rest[torch.arange(4), pos] = False
        return predet.info_nce(sim[torch.arange(4), pos], sim[rest].view(4, 3), tau).mean()
    assert loss(torch.arange(4)) < 1e-4 and loss(torch.arange(4).roll(1)) > 10  # identical vs permuted


@pytest.mark.numerics
def test_croi_regression_targets_decode_back_to_the_query():
    model = predet.PreDet(parse("--backbone", "resnet18", "--predet-dim", "8"), num_classes=5)
    proposals = torch.tensor([[10., 12., 50., 40.], [0., 0., 30., 30.]])
    queries = torch.tensor([[12., 10., 48., 44.], [2., 1., 33., 25.]])
    targets = model.croi_coder.encode_single(queries, proposals)
    assert torch.allclose(model.croi_coder.decode_single(targets, proposals), queries, atol=1e-4)
    b_q, b_p = torch.randn(2, 1024), torch.randn(2, 1024)  # deltas = (4 x D projection of b_q) . (D of b_p)
    by_hand = torch.stack([model.croi.reg_query(b_q[i]).view(4, -1) @ model.croi.reg_proposal(b_p[i])
                           for i in range(2)])
    assert torch.allclose(model.croi.deltas(b_q, b_p), by_hand, atol=1e-6)


@pytest.mark.numerics
def test_croi_similarity_inputs_are_unit_length_embeddings_of_the_box_features():
    """s_pq is a cosine similarity: each box's embedding FC(b) divided by its own length (not by a norm over
    the boxes). 3 boxes, D = 8: any other normalisation axis gives other vectors."""
    model = predet.PreDet(parse("--backbone", "resnet18", "--predet-dim", "8"), num_classes=5).eval()
    roi_feats = torch.randn(3, 256, 7, 7, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        b, e = model.croi.similarity_inputs(roi_feats)
        v = b @ model.croi.embed.weight.T + model.croi.embed.bias  # [3, 8]
    assert b.shape == (3, 1024) and e.shape == (3, 8)
    assert torch.allclose(e, v / v.pow(2).sum(1, keepdim=True).sqrt(), atol=1e-5)
    assert torch.allclose((e @ e.T).diagonal(), torch.ones(3), atol=1e-5)  # cosine of a box with itself


class BoxFeatures(nn.Module):
    """Stands in for the CROI head: a box's 'feature' is its 4 coordinates (b = them, the embedding a fixed
    smooth function of them, unit length) and the deltas a fixed asymmetric function of (b_q, b_p)."""

    def __init__(self):
        super().__init__()
        self.projection = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))

    def similarity_inputs(self, x):
        return x, F.normalize(torch.tanh((x / 40 - 1) @ self.projection.T), dim=1)

    def deltas(self, b_q, b_p):
        return (b_q * torch.tensor([1., 2., 3., 4.]) - b_p) / 100


@pytest.mark.numerics
def test_croi_loss_one_positive_per_query_negatives_away_from_every_query(model, swap):
    """PreDet sec. 3.2.2: per query one positive with IoU > 0.5; P_neg = the image's proposals with IoU < 0.5 to
    EVERY query; L_info with tau 0.07 and L_croi-reg (smooth L1 of the deltas against the query encoded on the
    positive, weights (10, 10, 5, 5)), each the mean over the batch's queries."""
    queries = [torch.tensor([[10., 10., 50., 30.], [60., 20., 80., 80.]]), torch.tensor([[20., 40., 100., 90.]])]
    p0, p1 = [14., 10., 54., 30.], [60., 38.5, 80., 98.5]  # IoU .818 with q0, .529 with q1 (just above 0.5)
    p2 = [60., 41., 80., 101.]                           # .481 with q1 (just below 0.5): a negative
    p4, p5 = [100., 50., 150., 95.], [30., 10., 70., 30.]  # 0 with both; .333 with q0 and .053 with q1
    r0, r1, r2 = [25., 45., 105., 95.], [0., 0., 40., 30.], [120., 0., 160., 60.]  # image 1: .730, 0, 0
    proposals = [torch.tensor([p5, p0, p2, p1, p4]), torch.tensor([r1, r0, r2])]
    positives, negatives = [[p0, p1], [r0]], [[p5, p2, p4], [r1, r2]]
    for qs, pos, neg in zip(queries, positives, negatives):  # the design above, by the paper's rule
        assert [iou(p, q) > 0.5 for q, p in zip(qs.tolist(), pos)] == [True] * len(pos)
        assert all(iou(p, q) < 0.5 for p in neg for q in qs.tolist())
    head = BoxFeatures()
    roi_pool = Fixed(lambda feats, boxes, shapes: torch.cat(boxes))  # a box's feature: its coordinates
    swap(model, "croi", head)
    swap(model, "roi_pool", roi_pool)
    fq = torch.cat(queries) + 2  # view 2's query features: tied to the query, not equal to any proposal's

    def embed(box):
        return head.similarity_inputs(torch.tensor([box]))[1][0].tolist()
    tau, info, reg, row = 0.07, [], [], 0
    for qs, pos, neg in zip(queries, positives, negatives):
        for q, p in zip(qs.tolist(), pos):
            e_q = embed(fq[row].tolist())
            s_pos = sum(a * b for a, b in zip(e_q, embed(p)))
            s_neg = [sum(a * b for a, b in zip(e_q, embed(n))) for n in neg]
            info.append(-s_pos / tau + math.log(sum(math.exp(s / tau) for s in [s_pos, *s_neg])))
            pred = head.deltas(fq[row:row + 1], torch.tensor([p]))[0].tolist()
            reg.append(sum(abs(d - t) for d, t in zip(pred, encode(q, p, (10, 10, 5, 5)))))  # L1 (beta 0)
            row += 1
    for seed in range(8):  # the positive and the negatives are drawn at random: the loss must not depend on it
        torch.manual_seed(seed)
        losses = {}
        model.croi_step({"0": None}, fq, queries, proposals, (100, 160), losses, {})
        assert losses["loss_info"].item() == pytest.approx(sum(info) / 3, rel=1e-4), seed
        assert losses["loss_croi_reg"].item() == pytest.approx(sum(reg) / 3, rel=1e-4), seed
        for rois, pos, neg in zip(roi_pool.calls[-1][1], positives, negatives):  # query order, then P_neg
            assert rois[:len(pos)].tolist() == pos and sorted(rois[len(pos):].tolist()) == sorted(neg)
        assert roi_pool.calls[-1][2] == [(100, 160)] * 2


def test_info_nce_is_at_chance_when_its_similarities_are_equal(model, swap):
    """L_info averages over the batch's queries, whose images have different numbers of negatives (3 and 5 here):
    equal similarities give each query ln(1 + its negatives), and the measures pad the rows of the narrower image
    without counting the padding as negatives."""
    class EqualEmbeddings(torch.nn.Module):
        def similarity_inputs(self, x):
            return torch.zeros(len(x), 4), F.normalize(torch.ones(len(x), 3), dim=1)
    swap(model.args, "predet_neg", 5)
    swap(model.args, "use_croi_reg", False)
    swap(model, "croi", EqualEmbeddings())
    swap(model, "roi_pool", Fixed(lambda feats, boxes, shapes: torch.cat(boxes)))
    queries = [torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]), torch.tensor([[0.0, 0, 10, 10]])]
    far = [[50.0 + 5 * i, 50, 60 + 5 * i, 60] for i in range(6)]
    proposals = [torch.cat([torch.tensor(far[:3]), queries[0]]), torch.cat([torch.tensor(far), queries[1]])]
    losses, measures = {}, {}
    model.croi_step({"0": None}, torch.zeros(3, 4), queries, proposals, (100, 120), losses, measures)
    expected = (2 * math.log(1 + 3) + math.log(1 + 5)) / 3
    assert losses["loss_info"].item() == pytest.approx(expected)
    assert measures["info_chance"].item() == pytest.approx(expected)
    assert measures["info_acc1_chance"].item() == pytest.approx((2 / 4 + 1 / 6) / 3)
    assert measures["info_acc1"].item() == 0 and measures["info_cos_gap"].item() == pytest.approx(0, abs=1e-6)


def test_cls_loss_is_at_chance_when_it_predicts_the_prior():
    """A classification head whose output is the log prior whatever the features: L_cls equals its chance (the
    prior's cross-entropy with the normalised k-hot targets), over the images with labels only; the floor is the
    targets' entropy (ln 2 for a 2-label image, 0 for a 1-label one)."""
    prior = torch.tensor([0.5, 0.3, 0.2])
    model = predet.PreDet(parse("--backbone", "resnet18", "--predet-no-det"), num_classes=3, cls_prior=prior)
    with torch.no_grad():
        model.cls_head.weight.zero_()
        model.cls_head.bias.copy_(prior.log())
    view = torch.randn(3, 3, 64, 96)
    targets = torch.tensor([[1.0, 1, 0], [0, 0, 1], [0, 0, 0]])  # the third image has no label: left out
    losses, measures = model(view, view, None, None, targets)
    chance = (0.5 * -math.log(0.5) + 0.5 * -math.log(0.3) - math.log(0.2)) / 2
    assert losses["loss_cls"].item() == pytest.approx(chance, rel=1e-5)
    assert measures["cls_chance"].item() == pytest.approx(chance, rel=1e-5)
    assert measures["cls_floor"].item() == pytest.approx(math.log(2) / 2)


def test_croi_positive_and_at_most_predet_neg_negatives_are_drawn_at_random_per_image(model, swap):
    """The positive is drawn among the proposals with IoU > 0.5 (not always the best one, the query itself: its
    regression target would be 0); P_neg is a random subset of --predet-neg, not the first (highest-scoring)."""
    swap(model.args, "predet_neg", 16)
    swap(model, "croi", BoxFeatures())
    roi_pool = Fixed(lambda feats, boxes, shapes: torch.cat(boxes))
    swap(model, "roi_pool", roi_pool)
    query = [10., 10., 50., 50.]
    near = [[12., 10., 52., 50.], [10., 14., 50., 54.]]  # IoU > 0.5: candidates for the positive, never negatives
    far = [[60. + 3 * i, 60., 90. + 3 * i, 90.] for i in range(40)]
    proposals = [torch.tensor([query, *near, *far]), torch.tensor([query, *near, *far[:5]])]
    torch.manual_seed(0)
    for _ in range(6):
        model.croi_step({"0": None}, torch.zeros(2, 4), [torch.tensor([query])] * 2, proposals, (100, 200), {}, {})
    for rois, n_neg in zip(roi_pool.calls[0][1], (16, 5)):
        assert rois[0].tolist() in [query, *near] and len(rois) == 1 + n_neg
        negatives = rois[1:].tolist()
        assert len({tuple(b) for b in negatives}) == n_neg and all(b in far for b in negatives)
    assert len({tuple(call[1][0][0].tolist()) for call in roi_pool.calls}) > 1  # the positive varies
    assert len({tuple(b) for call in roi_pool.calls for b in call[1][0][1:].tolist()}) > 16  # so do the negatives


# ---- the model's wiring, the ablation's boxes, the export
def test_forward_looks_up_view_2s_queries_in_view_1_and_classifies_both_views(model, swap):
    """PreDet sec. 3.2: f_q is RoI-pooled from view 2 at view 2's query boxes; CRPN and CROI look in view 1 at
    view 1's boxes; the CROI's proposals are CRPN's plus the queries; L_cls sees both views with their labels."""
    B = 2
    view1, view2 = torch.zeros(B, 3, 64, 96), torch.ones(B, 3, 64, 96)

    def features(x):  # every value of image i's maps is x's mean: view 1 -> 0, view 2 -> 1
        m = x.mean((1, 2, 3))[:, None, None, None]
        return {k: m.expand(-1, 256, 64 // s, 96 // s)
                for k, s in zip(("0", "1", "2", "3", "pool"), (4, 8, 16, 32, 64))}
    swap(model, "backbone", Fixed(features))
    cls_loss = Fixed(lambda levels, targets: torch.zeros(()))
    pooled = torch.zeros(3 + 1, 256, 7, 7)  # f_q of the batch's 1 + 2 queries, then 1 row nobody should take
    roi_pool = Fixed(lambda feats, boxes, shapes: pooled[:sum(map(len, boxes))])
    crpn_step = Fixed(lambda view1, f1, fq, queries1, losses, with_proposals: [torch.full((3, 4), 7.0)] * B)
    croi_step = Fixed(lambda f1, fq, queries1, proposals, size, losses, measures: None)
    swap(model, "roi_pool", roi_pool)
    for name, fake in (("cls_loss", cls_loss), ("crpn_step", crpn_step), ("croi_step", croi_step)):
        swap(model, name, fake.forward)  # a method: replaced by an instance attribute, not a sub-module
    q1, q2 = [torch.tensor([[1., 2., 30., 40.]]), torch.tensor([[3., 4., 50., 60.]] * 2)], \
        [torch.tensor([[5., 6., 20., 30.]]), torch.tensor([[7., 8., 40., 50.]] * 2)]
    cls_targets = torch.tensor([[1., 0., 0.], [0., 1., 1.]])
    model(view1, view2, q1, q2, cls_targets)
    levels, targets = cls_loss.calls[0]
    assert len(levels) == 5 and all(x[:, 0, 0, 0].tolist() == [0, 0, 1, 1] for x in levels)
    assert targets.tolist() == cls_targets.repeat(2, 1).tolist()  # view 1's images, then view 2's
    feats, boxes, shapes = roi_pool.calls[0]
    assert all((f == 1).all() for f in feats.values()) and [b.tolist() for b in boxes] == [q.tolist() for q in q2]
    assert shapes == [(64, 96)] * B
    v1, f1, fq, queries1, _, with_proposals = crpn_step.calls[0]
    assert v1 is view1 and all((f == 0).all() for f in f1.values()) and queries1 is q1 and with_proposals
    assert fq.data_ptr() == pooled.data_ptr() and len(fq) == 3
    f1, fq, queries1, proposals, size, _, _ = croi_step.calls[0]
    assert all((f == 0).all() for f in f1.values()) and queries1 is q1 and size == (64, 96) and len(fq) == 3
    assert [p.tolist() for p in proposals] == [[[7.] * 4] * 3 + q.tolist() for q in q1]

    # --predet-no-crpn: the CROI head sees 4 jittered copies of each query and K_nms random boxes, plus the queries
    swap(model, "crpn", None)
    swap(model.args, "predet_post_nms", 5)
    model(view1, view2, q1, q2, cls_targets)
    assert len(crpn_step.calls) == 1
    proposals = croi_step.calls[1][3]
    for p, q in zip(proposals, q1):
        assert p.shape == (4 * len(q) + 5 + len(q), 4) and p[-len(q):].tolist() == q.tolist()
        assert (p >= 0).all() and (p[:, 0::2] <= 96).all() and (p[:, 1::2] <= 64).all()


def test_jittered_and_random_boxes_move_each_query_by_at_most_10_percent():
    """--predet-no-crpn (Table 1: boxes sampled around each query): 4 copies of each query, centre and size
    jittered by up to +-10% of its width (x) and height (y), then n random boxes over the view; all clipped."""
    torch.manual_seed(0)
    h, w = 100, 160  # non-square view
    queries = torch.tensor([[20., 30., 60., 40.], [130., 50., 160., 90.]])  # 40 x 10 inside; 30 x 40 at the edge
    boxes = predet.jittered_and_random(queries, (h, w), 50)
    assert boxes.shape == (4 * 2 + 50, 4)
    centres = (boxes[:8, :2] + boxes[:8, 2:]) / 2
    nearest = (centres[:, None] - (queries[None, :, :2] + queries[None, :, 2:]) / 2).norm(dim=2).argmin(1)
    assert sorted(nearest.tolist()) == [0] * 4 + [1] * 4  # 4 copies of each query
    rand = boxes[8:]
    assert (rand[:, 2:] > rand[:, :2]).all() and rand[:, 2].max() > h  # spread over the width, not the height
    side = ((rand[:, 2] - rand[:, 0]) * (rand[:, 3] - rand[:, 1])).sqrt() / (h * w) ** 0.5
    assert (side <= 0.8 + 1e-4).all()

    many = predet.jittered_and_random(queries.repeat(200, 1), (h, w), 10)[:1600]
    assert (many >= 0).all() and (many[:, 0::2] <= w).all() and (many[:, 1::2] <= h).all()  # clipped to the view
    edge = many[(many[:, 0] + many[:, 2]) / 2 > 100]
    assert len(edge) == 800 and (edge[:, 2] == w).any()
    inner = many[(many[:, 0] + many[:, 2]) / 2 < 100]  # far from the edges: not clipped
    q, qw, qh = queries[0], 40.0, 10.0
    for shift, scale in (((inner[:, 0] + inner[:, 2]) / 2 - (q[0] + q[2]) / 2, qw),
                         ((inner[:, 1] + inner[:, 3]) / 2 - (q[1] + q[3]) / 2, qh),
                         (inner[:, 2] - inner[:, 0] - qw, qw), (inner[:, 3] - inner[:, 1] - qh, qh)):
        ratio = shift / scale  # uniform in [-0.1, 0.1]
        assert ratio.abs().max() <= 0.1 + 1e-5 and ratio.max() > 0.09 and ratio.min() < -0.09


def test_export_renames_the_transferable_parts_into_the_detectors_keys(model):
    """model_final.pth: backbone + FPN, the CRPN's 3x3 conv as rpn.head.conv, the CROI box head as
    roi_heads.box_head, each under the fine-tune detector's own key; nothing else (heads of the pretext only)."""
    from common.detectors import build_detector
    state = checkpoint.final_state(model, rename=predet.EXPORT)
    detector = build_detector("fasterrcnn", 3, "resnet18", "bn").state_dict()
    transferable = {k for k in detector if k.startswith(("backbone.", "rpn.head.conv.", "roi_heads.box_head."))}
    assert set(state) == transferable
    assert all(state[k].shape == detector[k].shape for k in state)
    own = model.state_dict()
    assert torch.equal(state["rpn.head.conv.0.0.weight"], own["crpn.conv.0.0.weight"])
    box_head = [k for k in own if k.startswith("croi.box_head.")]
    assert box_head and all(torch.equal(state["roi_heads" + k[4:]], own[k]) for k in box_head)
    assert all(torch.equal(state[k], own[k]) for k in own if k.startswith("backbone."))


# ---- data
def gradient_image(h=150, w=220):
    """Red encodes x, green encodes y: a box's mean colour says where in the image it is."""
    x = torch.linspace(0, 255, w)[None].expand(h, w)
    y = torch.linspace(0, 255, h)[:, None].expand(h, w)
    return tv_tensors.Image(torch.stack([x, y, torch.full((h, w), 128.)]).round().to(torch.uint8))


def test_queries_cover_the_same_content_in_both_views_and_labels_are_k_hot():
    torch.manual_seed(0)
    args = parse()
    transform = predet.TwoViewsWithQueries(128, 5, args)
    transform.photometric = lambda img: img  # geometry only
    image = gradient_image()
    target = {"image_id": 1, "labels": torch.tensor([2, 5, 2])}
    for _ in range(10):
        views, info = transform(image, target)
        q1, q2 = info["queries1"], info["queries2"]
        assert views.shape == (2, 3, 128, 128) and 1 <= len(q1) == len(q2) <= 16
        assert (q1 >= 0).all() and (q1 <= 128).all() and (q2 >= 0).all() and (q2 <= 128).all()
        for b1, b2 in zip(q1.round().int().tolist(), q2.round().int().tolist()):
            mean1 = views[0, :2, b1[1] + 1:b1[3] - 1, b1[0] + 1:b1[2] - 1].float().mean((1, 2))
            mean2 = views[1, :2, b2[1] + 1:b2[3] - 1, b2[0] + 1:b2[2] - 1].float().mean((1, 2))
            # flips mirror red (x): compare its distance from the middle, and green (y) directly
            assert abs(abs(mean1[0] - 127.5) - abs(mean2[0] - 127.5)) < 8 and abs(mean1[1] - mean2[1]) < 8
        assert info["cls_target"].tolist() == [0, 1, 0, 0, 1]


def test_each_query_shows_the_same_content_in_both_views_and_not_another(textures):
    """Through the data pipeline (CocoDetection, TwoViewsWithQueries: two random crops, resizes and flips; colour
    off, it moves no box) on textures where every region differs: query i shows the same content in both views
    (correlation >= 0.9, the better of straight and mirrored), the other queries another (median < 0.5). A crop
    offset or a flip applied to a view but not to its queries fails this."""
    args = parse("--predet-color-strength", "0", "--predet-num-queries", "8")
    images = CocoDetection(*textures, keep_empty=True)
    images.transforms = predet.TwoViewsWithQueries(96, images.num_classes, args)
    torch.manual_seed(0)
    same, other = [], []
    for i in list(range(4)) * 3:
        views, info = images[i]
        match = content_match(views[0], info["queries1"], views[1], info["queries2"])  # [Q, Q]
        same += match.diag().tolist()
        other += match[~torch.eye(len(match), dtype=torch.bool)].tolist()
    assert len(same) >= 48 and min(same) >= 0.9, sorted(same)[:5]
    assert statistics.median(other) < 0.5


def test_the_pretext_learns_on_views_that_differ_only_in_geometry(textures):
    """PreDet's pretext (CRPN + CROI + L_cls, every loss on) where it is easiest: views that differ in crop, scale and
    flip only (crop area 0.5-1, no colour), on images whose regions all differ, fresh queries every step. L_info
    starts at chance (a random network's box features do not yet match across views) and its measure against
    chance must fall by more than half a nat within 24 steps of 2 images (the mean of the last 6 against that of
    the first 4: single steps are noisy), to more than 0.75 nats below chance, and the cosine gap (the positive's
    minus the negatives', from the embeddings, not from the loss) widen by more than 0.15. Queries
    that do not match across views, a loss of the wrong sign or a gradient that does not reach the CROI head fail
    this."""
    args = parse("--backbone", "resnet18", "--anchor-scale", "0.5", "--predet-dim", "16", "--predet-num-queries", "4",
                 "--predet-post-nms", "32", "--predet-neg", "16", "--predet-pre-nms", "200", "--box-head", "2fc",
                 "--predet-color-strength", "0", "--predet-crop-scale", "0.5", "1.0")
    images = CocoDetection(*textures, keep_empty=True)
    images.transforms = predet.TwoViewsWithQueries(64, images.num_classes, args)
    torch.manual_seed(0)
    model = predet.PreDet(args, images.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    measured = []
    for it in range(24):
        views, info = predet.collate_views([images[(2 * it + j) % 4] for j in range(2)])
        views = normalize(views.float() / 255)
        losses, measures = model(views[:, 0], views[:, 1], [i["queries1"] for i in info],
                                 [i["queries2"] for i in info], torch.stack([i["cls_target"] for i in info]))
        optimizer.zero_grad()
        sum(losses.values()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10)
        optimizer.step()
        measured.append((measures["info_vs_chance"].item(), measures["info_cos_gap"].item()))
    (first, first_gap), (last, last_gap) = ([statistics.fmean(m) for m in zip(*part)] for part in (measured[:4],
                                                                                                     measured[-6:]))
    assert last < first - 0.5 and last < -0.75 and last_gap > first_gap + 0.15, measured


def test_proposals_outside_the_overlap_of_the_two_crops_are_dropped():
    args = parse("--predet-query-nms", "1.0")
    proposals = {1: torch.tensor([[0., 0., 40., 40.],        # outside the overlap
                                  [90., 90., 140., 140.],    # inside
                                  [60., 70., 120., 110.]])}  # partly inside: clipped
    transform = predet.TwoViewsWithQueries(128, 5, args, proposals)
    crops = [(0, 0, 150, 150), (80, 80, 150, 150)]  # (top, left, h, w): overlap (80, 80)-(150, 150)
    queries = transform.sample_queries(1, (80, 80, 150, 150), crops)
    assert sorted(queries.tolist()) == [[80., 80., 120., 110.], [90., 90., 140., 140.]]


# ---- the script end to end
def test_resume_is_exact_and_finetune_loads_the_pretrained_parts(shapes, tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    run_script("predet.py", *PD, *shapes, "--output-dir", full)
    run_script("predet.py", *PD, *shapes, "--max-iters", "1", "--output-dir", part)
    run_script("predet.py", *PD, *shapes, "--output-dir", part, "--resume", "auto")
    a, b = iteration_losses(full), iteration_losses(part)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    # a resume is the same computation (the checkpoint's exact weights, optimizer state and random streams, the
    # same kernels in the same order): bit-identical, seen through log.txt's 6 decimals (rel 1e-6: its last one)
    for it in (2, 3):
        assert b[it] == pytest.approx(a[it], rel=1e-6), (it, a, b)
    terms = iteration_losses(full, "loss_info")
    assert len(terms) == 3 and all(math.isfinite(v) for v in terms.values())

    final = torch.load(f"{full}/model_final.pth", weights_only=True)
    assert final["meta"]["method"] == "predet" and final["meta"]["images_seen"] == 6
    assert final["meta"]["parts"] == ["backbone", "fpn", "rpn", "box_head"]
    proc = run_script("finetune.py", "--detector", "fasterrcnn", "--init", f"{full}/model_final.pth", "--iters", "1",
                      "--batch-size", "2", "--warmup-iters", "1", *TINY, *shapes, "--output-dir", str(tmp_path / "ft"))
    report = {m[0]: list(map(int, m[1:])) for m in
              re.findall(r"^\s+(\w+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)$", proc.stdout, re.M)}
    for part_name in ("backbone", "fpn", "box_head"):
        loaded, missing = report[part_name][:2]
        assert loaded > 0 and missing == 0, (part_name, report)
    assert report["rpn"][:2] == [2, 4]  # the 3x3 conv transfers; objectness and deltas start fresh
    assert report["box_predictor"][:2] == [0, 4]
    ft = json.load(open(tmp_path / "ft" / "results.json"))
    assert ft["init_method"] == "predet" and "AP" in ft["bbox"]
    # PreDet sec. 4.2: fine-tuned without freezing any layer, BN trains
    assert "--bn bn: the recipe's" in proc.stdout and "--trainable-layers 5: the recipe's" in proc.stdout
    assert (ft["finetune"]["recipe"]["bn"], ft["finetune"]["recipe"]["trainable_layers"]) == ("bn", 5)

    # Fig. 5b analysis works on any checkpoint of the repo, here the fine-tuned one
    out = tmp_path / "sim"
    proc = run_script("common.similarity", tmp_path / "ft" / "model_final.pth", "--size", "128", "--images", "2",
                      "--device", "cpu", *shapes, "--output-dir", out)
    table = json.load(open(out / "similarity.json"))
    assert table["method"] == "finetune" and table["images"] == 2
    # 128-px images: reference sides >= 32 px = 0.25 of the image, so no small (< 0.2) bucket
    assert "small" not in table and table["medium"]["pairs"] + table["large"]["pairs"] <= 2 * 8 * 9
    # Two boxes' RoI-pooled features converge as their IoU goes to 1, for any network (the paper's Fig. 5b has
    # r > 0 for every model): r is clearly positive (here about 0.9 medium, 0.7 large) unless the pairs'
    # IoUs and similarities are mismatched (r about 0) or the similarity is of the wrong boxes.
    assert table["medium"]["pearson"] > 0.3 and table["large"]["pearson"] > 0.3, table
    assert (out / "similarity.png").stat().st_size > 0 and "Pearson r(IoU, cosine similarity)" in proc.stdout


def test_ablation_flags_export_only_the_trained_parts(shapes, tmp_path):
    run_script("predet.py", *PD, *shapes, "--iters", "1", "--predet-no-crpn", "--predet-no-croi-reg",
               "--output-dir", str(tmp_path / "a"))
    log = [json.loads(line) for line in open(tmp_path / "a" / "log.txt")]
    assert "loss_info" in log[0] and "loss_crpn_cls" not in log[0] and "loss_croi_reg" not in log[0]
    meta = torch.load(tmp_path / "a" / "model_final.pth", weights_only=True)["meta"]
    assert meta["parts"] == ["backbone", "fpn", "box_head"]
    # what the learning check reads is what the script logs (common.claims)
    key, _ = claims.PRETEXT_MEASURE["predet"]
    assert key in meta["losses_first"] and key in meta["losses_last"]
    assert claims.pretext_checks(meta, 0.2)[0][1].startswith(f"predet {key}")


def test_a_checkpoint_from_before_the_colour_strength_flag_resumes_as_its_default():
    """--predet-color-strength came after runs had been written: a checkpoint without it ran as its default does, so
    resuming it with that is no change (rundir.ADDED_FLAGS), another value is."""
    new = vars(parse())
    old = {k: v for k, v in new.items() if k != "predet_color_strength"}
    assert rundir.changed_flags(old, new) == {}
    assert rundir.changed_flags(old, vars(parse("--predet-color-strength", "0.5"))) == {
        "predet_color_strength": [1.0, 0.5]}


def test_color_strength_scales_moco_v2s_colour_ops():
    """1: MoCo v2's jitter (0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale p 0.2, blur p 0.5; 0.5 halves each; 0 leaves
    every view's colours as they are."""
    def settings(strength):
        jitter, gray, blur = predet.TwoViewsWithQueries(64, 3, parse("--predet-color-strength", strength)
                                                         ).photometric.transforms
        j = jitter.transforms[0]
        return [*j.brightness, *j.contrast, *j.saturation, *j.hue, jitter.p, gray.p, blur.p]
    assert settings("1") == pytest.approx([0.6, 1.4, 0.6, 1.4, 0.6, 1.4, -0.1, 0.1, 0.8, 0.2, 0.5])
    assert settings("0.5") == pytest.approx([0.8, 1.2, 0.8, 1.2, 0.8, 1.2, -0.05, 0.05, 0.8, 0.1, 0.25])
    image = Image.fromarray(torch.randint(0, 256, (20, 30, 3), dtype=torch.uint8).numpy())
    off = predet.TwoViewsWithQueries(64, 3, parse("--predet-color-strength", "0")).photometric
    assert all((np.asarray(off(image)) == np.asarray(image)).all() for _ in range(10))


@pytest.mark.parametrize("flags, message", [
    (["--backbone", "vgg16"], "--backbone vgg16: unknown backbone"),
    (["--predet-queries", "proposals"], "--predet-queries proposals needs --proposals FILE"),
    (["--predet-no-cls", "--predet-no-det"], "every loss term is switched off"),
    (["--predet-color-strength", "1.5"], "--predet-color-strength 1.5: expected a value in [0, 1]"),
])
def test_user_errors_are_one_line(shapes, tmp_path, flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:  # in-process: these checks come before any data or model
        cli.run(predet.main, predet.get_args_parser(), [*PD, *shapes, "--output-dir", str(tmp_path / "x"), *flags])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
