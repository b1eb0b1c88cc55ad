"""alignDet.py: the contrastive loss (value and gradient) against hand-computed InfoNCE numbers and a loop
reference, the EMA update and momentum schedule, views that keep box ids (also when a box is dropped from one
view only), FCOS assignment and sampling on known inputs, each detector's box-domain losses on heads replaced by
fixed functions, the training loop's wiring (views, keys, teacher update after a step), and end to end: frozen
backbone, exact resume, finetune.py --init loading the pre-trained parts (Faster R-CNN; RetinaNet and FCOS),
one-line errors."""
import json
import math
import os
import re
import shutil
import statistics

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import tv_tensors
from torchvision.models.detection.image_list import ImageList
from torchvision.transforms import v2

import alignDet
from common import checkpoint, claims, cli, proposals
from common.detectors import build_detector
from common.coco import CocoDetection
from common.engine import Run, targets_to
from common.transforms import to_float_batch, train_augment
from conftest import TINY, content_match, iteration_losses, run_script

AD = ["--batch-size", "2", "--iters", "40", "--warmup-iters", "5", "--align-dense-samples", "256", "--device", "cpu",
      *TINY]


@pytest.fixture(scope="session")
def proposal_file(shapes, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("proposals") / "random.json")
    settings = {"method": "random", "topk": 50, "nms_iou": 0.5, "ss_max_side": None, "seed": 0}
    proposals.generate(shapes[1], shapes[3], path, settings)
    return path


@pytest.fixture(scope="session")
def backbone_file(tmp_path_factory):
    """A model_final.pth with a random ResNet-18 backbone (as an image-domain stage would write)."""
    path = str(tmp_path_factory.mktemp("backbone") / "model_final.pth")
    torch.manual_seed(5)
    model = build_detector("fasterrcnn", 5, "resnet18")
    checkpoint.save_final(path, checkpoint.final_state(model, keep={"backbone"}), {"method": "test"})
    return path


# ---- the method core on hand-made inputs ----
def reference_loss(q, q_ids, k, k_ids, t):
    """AlignDet's box-level contrastive loss (its official ContrastiveLoss), written as loops. Returns (loss, d loss / d q): every query row is its own leaf, the
    only tensors that require grad; keys, the K = Q stand-ins and the negatives are built from detached copies."""
    leaves = [row.detach().clone().requires_grad_(True) for row in q]
    frozen_q, k = F.normalize(q.detach(), dim=1), F.normalize(k.detach(), dim=1)
    per_id = []
    for label in sorted(set(q_ids.tolist()) - {0}):
        queries = [F.normalize(leaves[i], dim=0) for i in range(len(q)) if q_ids[i] == label]
        keys = k[k_ids == label] if (k_ids == label).any() else frozen_q[q_ids == label]
        negatives = torch.cat([frozen_q[q_ids != label], k[k_ids != label]])
        pairs = [-torch.log_softmax(torch.cat([(qq @ kk)[None], negatives @ qq]) / t, 0)[0]
                 for qq in queries for kk in keys]
        per_id.append(torch.stack(pairs).mean())
    loss = torch.stack(per_id).mean()
    loss.backward()
    grad = torch.stack([leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves])
    return loss.detach(), grad


def loss_and_query_grad(q, q_ids, k, k_ids, t):
    """box_contrastive_loss and its gradient w.r.t. the queries (keys given without grad, as the teacher's)."""
    q = q.detach().clone().requires_grad_(True)
    loss, _ = alignDet.box_contrastive_loss(q, q_ids, k.detach(), k_ids, t)
    loss.backward()
    return loss.detach(), q.grad


@pytest.mark.numerics
def test_contrastive_loss_equals_hand_computed_infonce():
    q, k = torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    for t in (0.5, 0.2):  # one positive at cosine 1, one negative at cosine 0: log(1 + exp(-1 / T))
        loss, _ = alignDet.box_contrastive_loss(q, torch.tensor([1]), k, torch.tensor([1, 2]), temperature=t)
        assert loss.item() == pytest.approx(math.log(1 + math.exp(-1 / t)), abs=1e-6), t

    torch.manual_seed(0)
    q, k = torch.randn(12, 8), torch.randn(9, 8)
    q_ids = torch.tensor([1, 1, 2, 0, 3, 3, 3, 0, 4, 2, 5, 1])  # id 4 and 5: no key (K = Q); 0: background
    k_ids = torch.tensor([1, 2, 2, 3, 0, 0, 1, 6, 3])  # id 6: a key without a query (negative only)
    loss, grad = loss_and_query_grad(q, q_ids, k, k_ids, 0.5)
    expected, expected_grad = reference_loss(q, q_ids, k, k_ids, 0.5)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)
    ids = torch.arange(1, 13)
    aligned, _ = alignDet.box_contrastive_loss(q, ids, q.clone(), ids, 0.5)
    unrelated, _ = alignDet.box_contrastive_loss(q, ids, torch.randn(12, 8), ids, 0.5)
    assert aligned < unrelated
    background = q.clone().requires_grad_(True)
    zero, _ = alignDet.box_contrastive_loss(background, torch.zeros(12, dtype=torch.long), k, k_ids, 0.5)
    assert zero.item() == 0 and zero.requires_grad  # no anchor: zero, but a graph backward() accepts


@pytest.mark.numerics
def test_contrastive_gradient_flows_through_the_queries_only():
    """Queries carry the gradient; keys (teacher) and negatives (online and teacher samples of other ids) are
    stop-gradient, so the gradient w.r.t. the queries is the reference's, whose negatives are detached copies:
    a background query (a negative only) gets exactly none. Unequal counts (5 queries, 7 keys) so a swap of
    queries and keys cannot pass."""
    torch.manual_seed(1)
    q, k = torch.randn(5, 3) * torch.tensor([1.0, 2.0, 0.5]), torch.randn(7, 3)
    q_ids, k_ids = torch.tensor([2, 0, 2, 1, 3]), torch.tensor([1, 2, 0, 1, 4, 2, 0])  # id 3: no key (K = Q)
    loss, grad = loss_and_query_grad(q, q_ids, k, k_ids, 0.3)
    expected, expected_grad = reference_loss(q, q_ids, k, k_ids, 0.3)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)
    assert torch.equal(grad[1], torch.zeros(3)) and grad[q_ids > 0].abs().min() > 0
    swapped, _ = reference_loss(k, k_ids, q, q_ids, 0.3)
    assert abs(swapped.item() - loss.item()) > 1e-2  # the swap changes the value: the check above can tell


@pytest.mark.numerics
def test_contrastive_loss_per_id_mean_temperature_normalisation_and_background():
    """3-d axes vectors (cosines -1, 0, 1) of assorted lengths, so each pair's loss is written by hand:
    log(1 + sum_n exp((q.n - q.k) / T)). Id 1 has 1 query and 2 keys, id 2 one pair, id 0 (background) one
    query and one key that are negatives only. Mean over id 1's 2 pairs, then over the 2 ids."""
    q = torch.tensor([[2.0, 0, 0], [0, 0.5, 0], [0, 0, 3]])  # ids 1, 2, 0
    k = torch.tensor([[4.0, 0, 0], [0, 0, 0.2], [0, 1.5, 0], [-1, 0, 0]])  # ids 1, 1, 2, 0
    q_ids, k_ids = torch.tensor([1, 2, 0]), torch.tensor([1, 1, 2, 0])
    for t in (0.5, 0.2):
        e = math.exp(-1 / t)
        # id 1's negatives: q2 (0), q3 (0), k3 (0), k4 (-1); id 2's: q1, q3, k1, k2, k4 (all 0)
        id1 = [math.log(1 + 3 * e + e * e), math.log(4 + e)]  # positive k1 (cosine 1), k2 (cosine 0)
        id2 = math.log(1 + 5 * e)  # positive k3 (cosine 1)
        expected = (sum(id1) / 2 + id2) / 2
        assert (sum(id1) + id2) / 3 != pytest.approx(expected, rel=1e-3)  # a flat mean over pairs differs
        loss, grad = loss_and_query_grad(q, q_ids, k, k_ids, t)
        assert loss.item() == pytest.approx(expected, rel=1e-6), t
        assert torch.equal(grad[2], torch.zeros(3))  # the background query is never an anchor
        torch.testing.assert_close(grad, reference_loss(q, q_ids, k, k_ids, t)[1], rtol=1e-4, atol=1e-7)
    # K = Q for an id without keys: the queries (detached) serve as keys, themselves included
    q, q_ids = torch.tensor([[1.0, 0], [0, 3]]), torch.tensor([1, 1])
    k, k_ids = torch.tensor([[-2.0, 0]]), torch.tensor([2])  # id 2: a teacher negative, no query: no anchor
    pairs = [math.log(1 + math.exp(-4)), math.log(1 + math.exp(-2)), math.log(2), math.log(1 + math.exp(-2))]
    loss, grad = loss_and_query_grad(q, q_ids, k, k_ids, 0.5)  # pairs (a, a), (a, b), (b, a), (b, b)
    assert loss.item() == pytest.approx(sum(pairs) / 4, rel=1e-6)
    torch.testing.assert_close(grad, reference_loss(q, q_ids, k, k_ids, 0.5)[1], rtol=1e-4, atol=1e-7)


def test_fcos_assignment_and_sampling_on_known_inputs():
    def points(xy, size):
        return torch.tensor([[x - size / 2, y - size / 2, x + size / 2, y + size / 2] for x, y in xy])
    boxes = torch.tensor([[0.0, 0, 40, 40], [0, 0, 80, 80]])
    one_level = points([(10, 10), (50, 50), (100, 100)], 8)
    assert alignDet.fcos_assign(one_level, boxes, [3]).tolist() == [0, 1, -1]  # the smallest box wins
    two_levels = torch.cat([points([(60, 60)], 8), points([(60, 60)], 16)])  # ranges 0-64, then 64-inf
    big = torch.tensor([[0.0, 0, 200, 200]])  # distances to its sides: 60, 60, 140, 140
    assert alignDet.fcos_assign(two_levels, big, [1, 1]).tolist() == [-1, 0]
    assert alignDet.fcos_assign(one_level, torch.zeros(0, 4), [3]).tolist() == [-1, -1, -1]

    positive = torch.tensor([0, 1, 0, 1, 1, 0, 0, 0], dtype=torch.bool)
    keep = alignDet.sample_positives_first(positive, ~positive, 5)
    assert sorted(keep[:3].tolist()) == [1, 3, 4] and not positive[keep[3:]].any() and len(set(keep.tolist())) == 5
    assert positive[alignDet.sample_positives_first(positive, ~positive, 2)].all()
    matched = torch.tensor([2, -1, 0, -2])
    assert alignDet.assigned_ids(matched, torch.tensor([7, 8, 9])).tolist() == [9, 0, 7, 0]


def tiny_args(*extra):
    return alignDet.get_args_parser().parse_args([*TINY, "--backbone-weights", "scratch", *extra])


@pytest.mark.numerics
def test_ema_update_is_exact_and_leaves_the_frozen_backbone_alone():
    online = alignDet.build_box_domain_model(tiny_args())
    teacher = alignDet.EmaTeacher(online)
    assert not any(p.requires_grad for p in teacher.model.parameters()) and not teacher.model.training
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))  # the frozen backbone too: the EMA must not touch it anyway
    before = {n: p.clone() for n, p in teacher.model.named_parameters()}
    teacher.update(online, 0.9)
    online_p = dict(online.named_parameters())
    for n, p in teacher.model.named_parameters():
        if n.startswith("detector.backbone.body."):
            assert torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n] * 0.9 + online_p[n] * (1 - 0.9)), n
    state = teacher.state_dict()
    assert state and not any(k.startswith("detector.backbone.body.") for k in state)
    fresh = alignDet.EmaTeacher(alignDet.build_box_domain_model(tiny_args()))
    fresh.load_state_dict(state)
    assert all(torch.equal(v, fresh.model.state_dict()[k]) for k, v in state.items())
    # m = 1 - (1 - base)(cos(pi k / K) + 1) / 2: base at k = 0, 1 at k = K, cosine in between
    assert alignDet.momentum_at(0, 100) == pytest.approx(0.996) and alignDet.momentum_at(100, 100) == 1.0
    assert alignDet.momentum_at(50, 100) == pytest.approx(0.998)
    assert alignDet.momentum_at(25, 100) == pytest.approx(1 - 0.004 * (math.sqrt(0.5) + 1) / 2, abs=1e-12)
    assert alignDet.momentum_at(10, 30, base=0.9) == pytest.approx(1 - 0.1 * 0.75, abs=1e-12)  # cos(pi/3) = 1/2


def test_views_keep_each_box_id_on_the_same_image_region():
    w, h = 160, 120
    boxes = torch.tensor([[10.0, 20, 60, 70], [80, 10, 150, 50], [40, 60, 120, 110]])
    target = {"boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)), "labels": torch.ones(3)}
    images = [(tv_tensors.Image(torch.randint(0, 255, (3, h, w), dtype=torch.uint8)), target)]
    views = alignDet.TwoViews(images, alignDet.build_view_transform("cpu"), max_boxes=3)
    flips = set()
    for seed in range(12):
        torch.manual_seed(seed)
        for image, t in views[0]:
            assert t["ids"].tolist() == [1, 2, 3] and t["num_boxes"] == 3
            scale = image.shape[-1] / w
            back = t["boxes"] / scale  # [3, 4] in original pixels
            flipped = torch.stack([w - back[:, 2], back[:, 1], w - back[:, 0], back[:, 3]], dim=1)
            straight = torch.allclose(back, boxes, atol=1.5)
            assert straight or torch.allclose(flipped, boxes, atol=1.5)
            flips.add(straight)
    assert flips == {True, False}
    batch = alignDet.collate_views([views[0], views[0]])
    assert [t["ids"].tolist() for t in batch[1]] == [t["ids"].tolist() for t in batch[3]] == [[1, 2, 3], [4, 5, 6]]


def test_each_pseudo_box_shows_the_same_content_in_both_views(textures, monkeypatch):
    """Through the training pipeline (TwoViews with the view transform, collate_views over a batch of 4 images):
    the pseudo box with id k shows the same content in both views (correlation >= 0.9: the same pixels, resized,
    perhaps mirrored) and the other ids of the batch another (median correlation < 0.5). A flip or resize that
    moved an image but not its boxes, or ids that collide across the batch, fails this. The colour ops are off:
    they move no box."""
    monkeypatch.setattr(alignDet.RandomColorOp, "transform", lambda self, inpt, params: inpt)
    views = alignDet.TwoViews(CocoDetection(*textures, keep_empty=False), alignDet.build_view_transform("cpu"), 50)
    torch.manual_seed(0)
    same, other = [], []
    for _ in range(3):
        images1, targets1, images2, targets2 = alignDet.collate_views([views[i] for i in range(4)])
        ids1, ids2 = (torch.cat([t["ids"] for t in targets]) for targets in (targets1, targets2))
        assert len(set(ids1.tolist())) == len(ids1) == 32  # one id per pseudo box of the batch
        match = torch.cat([torch.cat([content_match(im1, t1["boxes"], im2, t2["boxes"])  # [32, 32] over the batch
                                      for im2, t2 in zip(images2, targets2)], 1) for im1, t1 in zip(images1, targets1)])
        same_id = ids1[:, None] == ids2[None]
        same += match[same_id].tolist()
        other += match[~same_id].tolist()
    assert len(same) == 96 and min(same) >= 0.9, sorted(same)[:5]
    assert statistics.median(other) < 0.5


def test_the_easiest_task_learns_identical_views_and_the_teacher_is_the_student(textures):
    """AlignDet's pretext where it is easiest: the teacher sees the same view and is the student (momentum 0), no
    regression losses. Retrieval is trivial there from the start (top-1 1.0), but the loss still has to push the
    other boxes' embeddings apart: within 20 steps on batches of 2 of the 4 images, its measure against chance falls
    by more than half a nat and ends more than a nat below chance, and the cosine gap (same box minus other boxes,
    computed from the embeddings, not from the loss) widens by more than 0.4. A loss with the wrong sign, or
    embeddings that carry no gradient, fail this."""
    views = alignDet.TwoViews(CocoDetection(*textures, keep_empty=False), v2.Resize((60, 84), antialias=True),
                              50)  # identical views: a resize and nothing random
    torch.manual_seed(0)
    online = alignDet.build_box_domain_model(tiny_args("--roi-batch-size", "16"))
    teacher = alignDet.EmaTeacher(online)
    optimizer = torch.optim.SGD([p for p in online.parameters() if p.requires_grad], lr=0.02, momentum=0.9)
    measured = []
    for it in range(20):
        images1, targets1, images2, targets2 = alignDet.collate_views([views[(2 * it + j) % 4] for j in range(2)])
        cpu = torch.device("cpu")
        queries, query_ids, _ = online(to_float_batch(images1, cpu), targets_to(targets1, cpu, keys=("boxes", "ids")))
        with torch.no_grad():
            keys, key_ids, _ = teacher.model(to_float_batch(images2, cpu), targets_to(targets2, cpu, keys=("boxes", "ids")))
        loss, measures = alignDet.box_contrastive_loss(queries, query_ids, keys, key_ids, 0.5)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        teacher.update(online, 0.0)
        measured.append((measures["contrast_vs_chance"].item(), measures["contrast_cos_gap"].item()))
    (first, first_gap), (last, last_gap) = ([statistics.fmean(m) for m in zip(*part)] for part in (measured[:4],
                                                                                                     measured[-4:]))
    assert last < first - 0.5 and last < -1.0 and last_gap > first_gap + 0.4, measured


class StretchEachCall:
    """A view's resize with known per-axis scales, cycling over ``scales`` [(sx, sy), ...] call by call."""

    def __init__(self, scales):
        self.scales, self.calls = scales, []

    def __call__(self, image, target):
        sx, sy = self.scales[len(self.calls) % len(self.scales)]
        self.calls.append((sx, sy))
        h, w = image.shape[-2:]
        return v2.Resize((round(h * sy), round(w * sx)), antialias=True)(image, target)


@pytest.mark.numerics
def test_a_box_dropped_in_one_view_only_keeps_the_other_ids_aligned():
    """A pseudo box under 1 px after one view's resize is dropped from that view only (with its id); the other
    boxes keep their ids and regions in both views, the batch offsets stay those of the full box counts (so ids
    never collide), and the loss then takes the dropped id's queries as its keys (K = Q)."""
    w, h = 160, 120
    thick1, thick2 = [10.0, 20, 60, 70], [40, 60, 120, 110]
    thin_x, thin_y = [80, 10, 81.5, 50], [90, 70, 130, 71.5]  # 1.5 px wide / tall
    scenes = [[thick1, thin_y, thin_x], [thick2, thin_x, thick1]]  # box k has id k + 1 (+ 3 in image 2)
    images = []
    for boxes in scenes:
        target = {"boxes": tv_tensors.BoundingBoxes(torch.tensor(boxes), format="XYXY", canvas_size=(h, w)),
                  "labels": torch.ones(3)}
        images.append((tv_tensors.Image(torch.randint(0, 255, (3, h, w), dtype=torch.uint8)), target))
    # view 1 stretches x by 2 and squeezes y by 0.4 (drops thin_y); view 2 the other way round (drops thin_x)
    stretch = StretchEachCall([(2.0, 0.4), (0.4, 2.0)])
    view = v2.Compose([stretch, train_augment(), alignDet.RandomColorOp()])
    dataset = alignDet.TwoViews(images, view, max_boxes=3)
    torch.manual_seed(0)
    images1, targets1, images2, targets2 = alignDet.collate_views([dataset[0], dataset[1]])
    assert [t["ids"].tolist() for t in targets1] == [[1, 3], [4, 5, 6]]
    assert [t["ids"].tolist() for t in targets2] == [[1, 2], [4, 6]]
    for images_, targets_, (sx, sy) in ((images1, targets1, (2.0, 0.4)), (images2, targets2, (0.4, 2.0))):
        for b, (image, t) in enumerate(zip(images_, targets_)):
            assert tuple(image.shape[-2:]) == (round(h * sy), round(w * sx))
            original = torch.tensor(scenes[b])[t["ids"] - 1 - 3 * b]  # each kept box's own region, by its id
            back = t["boxes"] / torch.tensor([sx, sy, sx, sy])
            flipped = torch.stack([w - back[:, 2], back[:, 1], w - back[:, 0], back[:, 3]], dim=1)
            assert torch.allclose(back, original, atol=0.1) or torch.allclose(flipped, original, atol=0.1), b

    # the loss on these ids (one embedding per box and view): ids 3 and 5 have queries, no keys
    q_ids, k_ids = torch.cat([t["ids"] for t in targets1]), torch.cat([t["ids"] for t in targets2])
    q, k = torch.randn(len(q_ids), 6), torch.randn(len(k_ids), 6)
    loss, grad = loss_and_query_grad(q, q_ids, k, k_ids, 0.5)
    expected, expected_grad = reference_loss(q, q_ids, k, k_ids, 0.5)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)


# ---- the box-domain heads on known outputs: each detector's heads replaced by fixed functions ----
class Fixed(nn.Module):
    """A submodule whose forward is a given function (stands in for a head, the RPN or the RoI pooling)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def iou(a, b):
    """IoU of two xyxy boxes (lists), by hand."""
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def encode(gt, box, weights):
    """Faster R-CNN deltas of ``gt`` relative to ``box`` (centre offsets / size, log size ratios) x weights."""
    (gx, gy, gw, gh), (px, py, pw, ph) = [((b[0] + b[2]) / 2, (b[1] + b[3]) / 2, b[2] - b[0], b[3] - b[1])
                                          for b in (gt, box)]
    wx, wy, ww, wh = weights
    return [wx * (gx - px) / pw, wy * (gy - py) / ph, ww * math.log(gw / pw), wh * math.log(gh / ph)]


def rows(embeddings, ids):
    """The (embedding row, id) pairs as a sorted list (the samplers shuffle)."""
    return sorted((tuple(round(v, 3) for v in e.tolist()), i) for e, i in zip(embeddings, ids.tolist()))


@pytest.fixture(scope="module")
def rcnn_model():
    return alignDet.build_box_domain_model(tiny_args("--box-head", "2fc"))


@pytest.mark.numerics
def test_rcnn_rois_are_positive_proposals_plus_pseudo_boxes_with_id_specific_regression(rcnn_model, monkeypatch):
    """RoIs: proposals at IoU >= 0.5 with a pseudo box (0.5 in, 0.475 out) plus the pseudo boxes themselves;
    embedding = the RoI (identity pooling and projector); predicted delta c of RoI r for id j:
    j / 10 + x0(r) / 100 + c / 20, so the regression must read the columns of the RoI's own instance id; targets
    with stds (.1, .1, .2, .2); L1 summed over the 4 coordinates / number of RoIs."""
    heads, num_ids = rcnn_model.detector.roi_heads, 8
    assert heads.box_coder.weights == (10.0, 10.0, 5.0, 5.0)
    gts = [[[0.0, 0, 40, 20], [100, 40, 160, 100]], [[10.0, 10, 50, 90]]]  # ids 1, 2 | 3 (batch offsets)
    props = [[[0.0, 0, 20, 20], [0, 0, 19, 20], [100, 40, 160, 130], [170, 0, 190, 10]],  # 0.5, .475, .67, 0
             [[10.0, 10, 50, 70], [60, 60, 70, 70], [10, 12, 50, 90]]]  # 0.75, 0, 0.95
    targets = [{"boxes": torch.tensor(g), "ids": torch.arange(1, len(g) + 1) + 2 * b} for b, g in enumerate(gts)]

    def bbox_pred(x):  # [R, 4] RoIs -> [R, num_ids * 4]
        j, c = torch.arange(num_ids)[None, :, None], torch.arange(4)[None, None, :]
        return (j / 10 + x[:, None, :1] / 100 + c / 20).flatten(1)
    rpn = Fixed(lambda images, features, targets=None: ([torch.tensor(p) for p in props],
                                                       {"loss_objectness": torch.tensor(0.0),
                                                        "loss_rpn_box_reg": torch.tensor(0.0)}))
    monkeypatch.setattr(rcnn_model.detector, "rpn", rpn)
    monkeypatch.setattr(heads, "box_roi_pool", Fixed(lambda features, rois, sizes: torch.cat(rois)))
    monkeypatch.setattr(heads, "box_head", nn.Identity())
    monkeypatch.setattr(heads.box_predictor, "cls_score", nn.Identity())
    monkeypatch.setattr(heads.box_predictor, "bbox_pred", Fixed(bbox_pred))
    images = ImageList(torch.zeros(2, 3, 120, 200), [(120, 200), (120, 200)])
    embeddings, ids, losses = rcnn_model.train().rcnn(images, {}, targets)

    expected, total = [], 0.0
    for b, (g, p) in enumerate(zip(gts, props)):
        for roi in p + g:
            overlaps = [iou(roi, box) for box in g]
            if max(overlaps) >= 0.5:
                k = overlaps.index(max(overlaps))
                label = k + 1 + 2 * b
                expected.append((tuple(roi), label))
                pred = [label / 10 + roi[0] / 100 + c / 20 for c in range(4)]
                total += sum(abs(d - t) for d, t in zip(pred, encode(g[k], roi, (10, 10, 5, 5))))
    assert len(expected) == 7  # 4 proposals (IoU 0.5, 0.67, 0.75, 0.95) and the 3 pseudo boxes
    assert rows(embeddings, ids) == sorted((tuple(round(v, 3) for v in e), i) for e, i in expected)
    assert losses["loss_roi_reg"].item() == pytest.approx(total / len(expected), rel=1e-5)


@pytest.mark.numerics
def test_retinanet_contrast_samples_and_l1_averaged_over_the_batch_positives(monkeypatch):
    """Anchors at IoU 0.5 (positive), 0.45 and 0.4 (ignored: neither sampled nor regressed), 0.375 and 0
    (background, id 0); a pseudo box whose best anchor has IoU 0.3 still gets it (low-quality match).
    L1 on the positives' deltas (stds 1), summed over coordinates and averaged over the batch's positives
    (3 in image 1, 2 in image 2: not a mean of per-image means)."""
    model = alignDet.build_box_domain_model(tiny_args("--detector", "retinanet"))
    model.dense_samples = 100  # every positive and negative
    gts = [[[0.0, 0, 40, 20], [100, 40, 160, 100]], [[10.0, 10, 50, 90], [120, 0, 150, 30]]]
    anchors = [[[0.0, 0, 20, 20], [0, 0, 40, 20], [0, 0, 18, 20], [0, 0, 16, 20], [0, 0, 15, 20],
                [200, 0, 240, 30], [100, 40, 160, 130]],
               [[10.0, 10, 50, 70], [120, 0, 150, 9], [60, 60, 70, 100], [0, 100, 5, 110], [150, 100, 190, 118],
                [10, 10, 50, 36], [10, 10, 50, 45]]]
    matches = [[0, 0, None, None, -1, -1, 1], [0, 1, -1, -1, -1, -1, None]]  # None: ignored
    targets = [{"boxes": torch.tensor(g), "ids": torch.arange(1, 3) + 2 * b} for b, g in enumerate(gts)]
    deltas = torch.tensor([[[0.1 * (a + 1) - 0.05 * c + 0.3 * b for c in range(4)] for a in range(7)]
                           for b in range(2)])  # [B, A, 4]
    embeddings = torch.tensor(anchors) + 1000 * torch.arange(2)[:, None, None]  # [B, A, 4]: the anchor, image
    head = model.detector.head
    monkeypatch.setattr(head, "classification_head", Fixed(lambda features: embeddings))
    monkeypatch.setattr(head, "regression_head", Fixed(lambda features: deltas))
    monkeypatch.setattr(model.detector, "anchor_generator", Fixed(lambda images, features: [torch.tensor(a)
                                                                                            for a in anchors]))
    images = ImageList(torch.zeros(2, 3, 128, 256), [(128, 256), (128, 256)])
    emb, ids, losses = model.train().retinanet(images, {}, targets)

    expected, total, positives = [], 0.0, 0
    for b in range(2):
        for a, k in enumerate(matches[b]):
            if k is None:
                continue
            expected.append((tuple(v + 1000 * b for v in anchors[b][a]), k + 1 + 2 * b if k >= 0 else 0))
            if k >= 0:
                positives += 1
                target = encode(gts[b][k], anchors[b][a], (1, 1, 1, 1))
                total += sum(abs(d - t) for d, t in zip(deltas[b, a].tolist(), target))
    assert positives == 5
    assert rows(emb, ids) == sorted((tuple(round(v, 3) for v in e), i) for e, i in expected)
    assert losses["loss_reg"].item() == pytest.approx(total / positives, rel=1e-5)
    model.dense_samples = 3  # per image: positives first (image 1: its 3; image 2: its 2 and one background)
    emb, ids, _ = model.retinanet(images, {}, targets)
    picked = rows(emb, ids)
    assert [row for row in picked if row[1] > 0] == sorted(
        (tuple(round(v, 3) for v in e), i) for e, i in expected if i > 0)
    assert [row[0][0] >= 1000 for row in picked if row[1] == 0] == [True]  # the background is image 2's


def giou_loss(p, g):
    """1 - GIoU of two xyxy boxes, by hand."""
    enclosing = (max(p[2], g[2]) - min(p[0], g[0])) * (max(p[3], g[3]) - min(p[1], g[1]))
    inter = max(0.0, min(p[2], g[2]) - max(p[0], g[0])) * max(0.0, min(p[3], g[3]) - max(p[1], g[1]))
    union = (p[2] - p[0]) * (p[3] - p[1]) + (g[2] - g[0]) * (g[3] - g[1]) - inter
    return 1 - (inter / union - (enclosing - union) / enclosing)


@pytest.mark.numerics
def test_fcos_giou_weighted_by_centerness_targets_and_centerness_bce(monkeypatch):
    """One level of 3 x 2 points (stride 16); each point's positive box is the smallest one containing it
    (a point on a box's edge is outside). loss_reg = sum(GIoU loss x centerness target) / sum(centerness
    targets), centerness target sqrt(min(l, r) / max(l, r) x min(t, b) / max(t, b)) from the point's
    distances to its box; loss_ctr = BCE(logit, target) summed / number of positives."""
    model = alignDet.build_box_domain_model(tiny_args("--detector", "fcos"))
    model.dense_samples = 100
    centres = [(x, y) for y in (8.0, 24.0) for x in (8.0, 24.0, 40.0)]  # row-major over a [2, 3] map
    anchors = torch.tensor([[x - 8, y - 8, x + 8, y + 8] for x, y in centres])  # [6, 4] stride-sized boxes
    gts = [[[0.0, 0, 30, 20], [0, 0, 36, 34]], [[24.0, 2, 46, 30]]]
    matches = [[0, 0, -1, 1, 1, -1], [-1, -1, 0, -1, -1, 0]]  # x = 24 lies on the edge of image 2's box
    targets = [{"boxes": torch.tensor(g), "ids": torch.arange(1, len(g) + 1) + 2 * b} for b, g in enumerate(gts)]
    ltrb = torch.tensor([[[0.3 + 0.1 * p + 0.2 * b + 0.05 * c for c in range(4)] for p in range(6)]
                         for b in range(2)])  # [B, P, 4] distances in stride units
    logits = torch.tensor([[[0.4 * p - 0.5 * b - 0.7] for p in range(6)] for b in range(2)])  # [B, P, 1]
    embeddings = anchors[None] + 1000 * torch.arange(2)[:, None, None]  # [B, P, 4]
    head = model.detector.head
    monkeypatch.setattr(head, "classification_head", Fixed(lambda features: embeddings))
    monkeypatch.setattr(head, "regression_head", Fixed(lambda features: (ltrb, logits)))
    monkeypatch.setattr(model.detector, "anchor_generator", Fixed(lambda images, features: [anchors, anchors]))
    images = ImageList(torch.zeros(2, 3, 32, 48), [(32, 48), (32, 48)])
    emb, ids, losses = model.train().fcos(images, {"p3": torch.zeros(2, 8, 2, 3)}, targets)

    expected, weighted, weights, bce = [], 0.0, 0.0, []
    for b in range(2):
        for p, ((x, y), k) in enumerate(zip(centres, matches[b])):
            expected.append((tuple(v + 1000 * b for v in anchors[p].tolist()), k + 1 + 2 * b if k >= 0 else 0))
            if k < 0:
                continue
            g = gts[b][k]
            l_, t_, r_, b_ = x - g[0], y - g[1], g[2] - x, g[3] - y
            centerness = math.sqrt(min(l_, r_) / max(l_, r_) * min(t_, b_) / max(t_, b_))
            d = [v * 16 for v in ltrb[b, p].tolist()]
            weighted += giou_loss([x - d[0], y - d[1], x + d[2], y + d[3]], g) * centerness
            weights += centerness
            s = 1 / (1 + math.exp(-logits[b, p, 0].item()))
            bce.append(-(centerness * math.log(s) + (1 - centerness) * math.log(1 - s)))
    assert len(bce) == 6
    assert rows(emb, ids) == sorted((tuple(round(v, 3) for v in e), i) for e, i in expected)
    assert losses["loss_reg"].item() == pytest.approx(weighted / weights, rel=1e-5)
    assert losses["loss_ctr"].item() == pytest.approx(sum(bce) / len(bce), rel=1e-5)
    model.dense_samples = 7  # over the view batch: the 6 positives of both images first, then one background
    emb, ids, _ = model.fcos(images, {"p3": torch.zeros(2, 8, 2, 3)}, targets)
    picked = rows(emb, ids)
    assert len(picked) == 7 and [row for row in picked if row[1] > 0] == sorted(
        (tuple(round(v, 3) for v in e), i) for e, i in expected if i > 0)


# ---- end to end ----
def transfer_report(stdout):
    """{part: {column: count}} from a printed transfer report."""
    lines = stdout[stdout.index("transfer report"):].splitlines()
    cols = lines[1].split()[1:]
    rows = {}
    for line in lines[2:]:
        parts = line.split()
        if len(parts) != len(cols) + 1 or not parts[1].isdigit():
            break
        rows[parts[0]] = dict(zip(cols, map(int, parts[1:])))
    return rows


def test_frozen_backbone_exact_resume_and_finetune_loads_the_pretrained_parts(shapes, proposal_file, backbone_file,
                                                                              tmp_path):
    # the 2fc box head keeps this CPU test fast (4conv1fc on the RoIs costs more than the rest of the step)
    flags = [*AD, *shapes, "--box-head", "2fc", "--align-proposals", proposal_file, "--backbone-weights", backbone_file]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    run_script("alignDet.py", *flags, "--max-iters", "3", "--output-dir", full)
    run_script("alignDet.py", *flags, "--max-iters", "1", "--output-dir", part)
    shutil.copy(f"{part}/model_final.pth", tmp_path / "at1.pth")
    run_script("alignDet.py", *flags, "--max-iters", "3", "--output-dir", part, "--resume", "auto")
    # a resume is the same computation (the checkpoint's exact weights, optimizer state and random streams, the
    # same kernels in the same order): bit-identical, seen through log.txt's 6 decimals (rel 1e-6: its last one)
    for key in ("loss", "loss_contrast", "loss_roi_reg"):
        a, b = iteration_losses(full, key), iteration_losses(part, key)
        assert sorted(a) == sorted(b) == [1, 2, 3]
        for it in (2, 3):
            assert b[it] == pytest.approx(a[it], rel=1e-6), (key, it, a, b)

    source = checkpoint.load(backbone_file)["model"]
    final, at1 = checkpoint.load(f"{full}/model_final.pth"), checkpoint.load(str(tmp_path / "at1.pth"))["model"]
    assert final["meta"]["parts"] == ["backbone", "fpn", "rpn", "box_head"]
    assert final["meta"]["method"] == "aligndet" and final["meta"]["iterations"] == 3
    assert final["meta"]["images_seen"] == 6 and "device_hours" in final["meta"]
    key, _ = claims.PRETEXT_MEASURE["aligndet"]  # the learning check reads what the script logs
    assert key in final["meta"]["losses_first"] and key in final["meta"]["losses_last"]
    for k, v in final["model"].items():
        if k.startswith("backbone.body."):
            assert torch.equal(v, source[k]), k  # frozen: exactly the image-domain weights
    for prefix in ("backbone.fpn.", "rpn.", "roi_heads.box_head."):
        assert any(not torch.equal(v, at1[k]) for k, v in final["model"].items() if k.startswith(prefix)), prefix
    teacher = checkpoint.load(f"{full}/checkpoint_last.pth")["extra"]["teacher"]
    assert not any(k.startswith("detector.backbone.body.") for k in teacher)

    proc = run_script("finetune.py", "--detector", "fasterrcnn", "--box-head", "2fc", "--init",
                      f"{full}/model_final.pth", "--iters", "2", "--max-iters", "1", "--warmup-iters", "1",
                      "--batch-size", "2", *TINY, *shapes, "--output-dir", str(tmp_path / "ft"))
    report = transfer_report(proc.stdout)
    for part_name in ("backbone", "fpn", "rpn", "box_head"):
        assert report[part_name]["loaded"] > 0 and report[part_name]["missing"] == 0, report
    assert report["box_predictor"]["loaded"] == 0 and report["box_predictor"]["missing"] == 4
    # AlignDet's fine-tuning recipe: BN affine, stem + res2 frozen, lr x1.5 (of 0.02 x 2 / 16), weight decay x0.5
    for line in ("--bn affine: the recipe's", "--trainable-layers 3: the recipe's",
                 "--weight-decay 5e-05: the recipe's",
                 "--lr 0.00375: 0.0025 (the 1x lr: 0.02 at global batch 16, scaled to 2) x the recipe's "
                 "multiplier 1.5"):
        assert line in proc.stdout, (line, proc.stdout)
    recipe = json.load(open(tmp_path / "ft" / "results.json"))["finetune"]["recipe"]
    assert recipe["lr"] == pytest.approx(0.00375) and recipe["weight_decay"] == pytest.approx(5e-5)


@pytest.mark.numerics
def test_training_loop_wiring_teacher_updates_only_after_a_step(shapes, proposal_file, tmp_path, monkeypatch):
    """main(), in process, 3 iterations whose 2nd loss is made non-finite (skipped, --skip-nonfinite 1):
    the online model (training mode) sees view 1 and gives the queries (with grad), the teacher (eval mode)
    sees view 2 under no_grad and gives the keys; the loss gets --align-temperature and is logged x
    --align-contrast-weight; the teacher is updated right after each successful step only, with
    m = 1 - (1 - base)(cos(pi it / total) + 1) / 2 (iterations 0 and 2 of 40)."""
    events, batches, forwards, losses_in = [], [], [], []
    real_collate, real_forward = alignDet.collate_views, alignDet.BoxDomainModel.forward
    real_loss, real_finite, real_update = alignDet.box_contrastive_loss, Run.finite, alignDet.EmaTeacher.update

    def collate(batch):
        batches.append(real_collate(batch))
        return batches[-1]

    def forward(self, images, targets):
        out = real_forward(self, images, targets)
        forwards.append((self.training, images, out))
        return out

    def loss(*args):
        losses_in.append(args)
        value, measures = real_loss(*args)
        return (value * float("nan") if len(losses_in) == 2 else value), measures

    def finite(self, loss, losses):  # True: the step is taken
        events.append(("step", real_finite(self, loss, losses)))
        return events[-1][1]

    def update(self, online, m):
        events.append(("update", m))
        return real_update(self, online, m)
    for name, fn in (("collate_views", collate), ("box_contrastive_loss", loss)):
        monkeypatch.setattr(alignDet, name, fn)
    monkeypatch.setattr(alignDet.BoxDomainModel, "forward", forward)
    monkeypatch.setattr(alignDet.EmaTeacher, "update", update)
    monkeypatch.setattr(Run, "finite", finite)
    out = str(tmp_path / "run")
    cli.run(alignDet.main, alignDet.get_args_parser(), [
        *AD, *shapes, "--detector", "fcos", "--batch-size", "1", "--backbone-weights", "scratch", "--align-proposals",
        proposal_file, "--max-iters", "3", "--skip-nonfinite", "1", "--align-temperature", "0.3",
        "--align-contrast-weight", "2", "--align-ema", "0.9", "--output-dir", out])

    def m(it):
        return 1 - 0.1 * (math.cos(math.pi * it / 40) + 1) / 2
    assert events == [("step", True), ("update", pytest.approx(m(0))), ("step", False), ("step", True),
                      ("update", pytest.approx(m(2)))]
    assert len(batches) == 3 and len(forwards) == 6 and len(losses_in) == 3
    views_differ = False
    for it, (images1, _, images2, _) in enumerate(batches):
        (train1, seen1, (q, q_ids, _)), (train2, seen2, (k, k_ids, _)) = forwards[2 * it: 2 * it + 2]
        assert train1 and not train2
        assert torch.equal(seen1[0], images1[0].float() / 255) and torch.equal(seen2[0], images2[0].float() / 255)
        views_differ |= images1[0].shape != images2[0].shape or not torch.equal(images1[0], images2[0])
        queries, query_ids, keys, key_ids, temperature = losses_in[it]
        assert queries is q and query_ids is q_ids and keys is k and key_ids is k_ids and temperature == 0.3
        assert queries.requires_grad and not keys.requires_grad
    assert views_differ  # so the image checks above can tell the views apart
    logged = iteration_losses(out, "loss_contrast")
    assert sorted(logged) == [1, 3]  # the skipped step is not logged
    for it in (1, 3):
        args = [a.detach() if torch.is_tensor(a) else a for a in losses_in[it - 1]]
        assert logged[it] == pytest.approx(2 * real_loss(*args)[0].item(), rel=1e-5)


@pytest.mark.parametrize("detector, trained, dropped", [
    ("retinanet", ("fpn", "cls_tower", "reg_tower"), ("classifier", "regressor")),
    ("fcos", ("fpn", "cls_tower", "reg_tower"), ("classifier", "regressor", "centerness")),
])
def test_dense_detectors_pretrain_and_transfer(shapes, tmp_path, detector, trained, dropped):
    out = str(tmp_path / detector)
    # no --align-proposals: the default file is generated on first use (into --data-cache)
    proc = run_script("alignDet.py", *AD, *shapes, "--detector", detector, "--backbone-weights", "scratch",
                      "--align-proposal-method", "random", "--data-cache", str(tmp_path / "cache"), "--max-iters", "1",
                      "--batch-size", "1", "--output-dir", out)
    assert "generating" in proc.stdout and os.path.isfile(tmp_path / "cache" / "proposals" / "train_random.json")
    # each detector's own terms are logged, and the logged total is their sum
    terms = {"retinanet": ("loss_reg", "loss_contrast"), "fcos": ("loss_reg", "loss_ctr", "loss_contrast")}[detector]
    record = [json.loads(line) for line in open(f"{out}/log.txt") if '"epoch"' not in line]
    measures = {f"contrast_{m}" for m in ("chance", "vs_chance", "acc1", "acc1_chance", "cos_gap")}
    assert len(record) == 1 and set(record[0]) == {"iteration", "window", "loss", "lr", "time", *terms, *measures}
    assert record[0]["loss"] == pytest.approx(sum(record[0][k] for k in terms), abs=1e-5)
    model = build_detector(detector, 5, "resnet18")
    report, meta = checkpoint.load_pretrained(model, f"{out}/model_final.pth")
    for part in ("backbone", *trained):
        assert report[part]["loaded"] > 0 and report[part]["missing"] == 0, (part, report)
    for part in dropped:
        assert report[part]["loaded"] == 0 and report[part]["missing"] > 0, (part, report)
    assert meta["detector"] == detector and meta["method"] == "aligndet"


@pytest.mark.parametrize("flags, message", [
    (["--backbone-weights", "/nonexistent.pth"], "--backbone-weights /nonexistent.pth: no such file"),
    (["--align-proposals", "/nonexistent.json"], "--align-proposals /nonexistent.json: no such file; make it with"),
    (["--bn", "bn"], "the box-domain stage keeps the backbone frozen"),
    (["--batch-size", "6"], "--batch-size 6 x --align-max-proposals 50 instance ids do not fit"),
    (["--detector", "yolo"], "--detector yolo: unknown detector"),
])
def test_user_errors_are_one_line(shapes, tmp_path, capsys, flags, message):
    argv = [*AD, *shapes, "--output-dir", str(tmp_path / "x"), "--backbone-weights", "scratch", *flags]
    with pytest.raises(SystemExit) as e:
        cli.run(alignDet.main, alignDet.get_args_parser(), [str(a) for a in argv])
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_proposal_file_with_a_schema_error_is_one_line(shapes, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [], "annotations": [{"id": 1}], "categories": []}')
    argv = [*AD, *shapes, "--output-dir", str(tmp_path / "x"), "--backbone-weights", "scratch",
            "--align-proposals", str(bad)]
    with pytest.raises(SystemExit):
        cli.run(alignDet.main, alignDet.get_args_parser(), argv)
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"error: .*bad\.json: annotations\[0\] \(id 1\) is missing required key 'image_id'", err), err
