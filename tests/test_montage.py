"""montage.py: sample extraction and its cache, the montage layout and the aspect-keeping fit, ERF maps against
known and independent answers, Eq. 2 label weights from hand-made ERFs, the losses written out with loops,
exact resume, and the hand-off of the backbone to finetune.py (2-process runs: test_distributed.py)."""
import json
import math
import os
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.ops import box_iou

import montage
from common import claims
from common.coco import DataSpec
from common.errors import UserError
from conftest import iteration_losses, run_script

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny runs: a second thread only spins when the cores are shared

# template 64 split 32: four 32x32 regions, a 2x2 feature map, one cell per region
TINY_M = ["--backbone", "resnet18", "--montage-size", "64", "--montage-split", "32", "--batch-size", "4",
          "--iters", "4", "--warmup-iters", "2", "--montage-erf-every", "2", "--montage-erf-batch", "2",
          "--workers", "0", "--print-freq", "1", "--no-tb", "--device", "cpu"]

# a hand-made COCO set: image id -> (w, h, [(category, x, y, w, h, iscrowd)])
HAND = {1: (200, 160, [(1, 10, 10, 60, 50, 0),    # S
                       (2, 120, 20, 20, 100, 0),   # T (0.2)
                       (1, 100, 130, 8, 20, 0),    # tiny: w < 16, no sample
                       (2, 150, 120, 40, 30, 1)]),  # crowd: no sample
        2: (240, 180, [(2, 20, 100, 150, 40, 0),   # W (3.75)
                       (1, 190, 10, 30, 30, 0)]),  # S
        3: (320, 240, [])}                         # no object: negatives only


def write_hand_set(root):
    os.makedirs(f"{root}/images", exist_ok=True)
    images, anns = [], []
    for image_id, (w, h, objects) in HAND.items():
        pixels = np.random.default_rng(image_id).integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(f"{root}/images/{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": w, "height": h})
        for cat, x, y, bw, bh, crowd in objects:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "bbox": [x, y, bw, bh],
                         "iscrowd": crowd, "area": bw * bh})
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    with open(f"{root}/annotations.json", "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": cats}, f)
    return DataSpec(f"{root}/images", f"{root}/annotations.json", f"{root}/images", f"{root}/annotations.json", "hand")


def extract(data, cache, *flags):
    args = montage.get_args_parser().parse_args(["--data-cache", cache, "--workers", "0",
                                                 "--montage-size", "96", "--montage-split", "32", *flags])
    path = montage.ensure_sample_cache(args, data)
    with open(f"{path}/info.json") as f:
        return path, np.load(f"{path}/index.npy"), json.load(f)


def test_extraction_positives_negatives_groups_and_cache(tmp_path, capsys):
    data = write_hand_set(str(tmp_path / "hand"))
    cache = str(tmp_path / "cache")
    path, index, info = extract(data, cache, "--montage-pos-per-neg", "2")
    pos, neg = index[index["label"] > 0], index[index["label"] == 0]
    # 4 positives (crowd and tiny excluded), labelled with their contiguous category, 4 / 2 negatives
    assert sorted(pos["label"].tolist()) == [1, 1, 2, 2] and len(neg) == 2
    images = sorted(HAND)
    for row in index:
        w, h, objects = HAND[images[row["image"]]]
        x0, y0, x1, y1 = row["box"]
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h  # clipped to the image
        assert row["group"] == montage.aspect_group(x1 - x0, y1 - y0)
        every_object = torch.tensor([[x, y, x + bw, y + bh] for _, x, y, bw, bh, _ in objects]).reshape(-1, 4)
        if row["label"] == 0:  # IoU exactly 0 with every object, crowd and tiny ones included, and with the
            assert min(x1 - x0, y1 - y0) >= 32  # positive samples (enlarged boxes) of its image
            box = torch.from_numpy(row["box"][None])
            positives = torch.from_numpy(index["box"][(index["image"] == row["image"]) & (index["label"] > 0)])
            others = torch.cat([every_object.float(), positives])
            assert len(others) == 0 or box_iou(box, others).max() == 0
        else:  # contains its GT box, enlarged by at most 25% of its size per side
            gt = [o for o in objects if o[0] == row["label"] and not o[5] and min(o[3:5]) >= 16]
            assert any(x - 0.25 * bw - 1e-3 <= x0 <= x and y - 0.25 * bh - 1e-3 <= y0 <= y and
                       x + bw <= x1 <= x + 1.25 * bw + 1e-3 and y + bh <= y1 <= y + 1.25 * bh + 1e-3
                       for _, x, y, bw, bh, _ in gt), row
        # stored downscaled to just cover the group's largest region (64x64, 64h x 32w, 32h x 64w), never up
        region_h, region_w = montage.stored_size(row["group"], 96, 32)
        scale = max(region_h / (y1 - y0), region_w / (x1 - x0))
        expected = (np.ceil(y1) - int(y0), np.ceil(x1) - int(x0)) if scale >= 1 else None
        if expected:
            assert (row["height"], row["width"]) == expected
        else:
            assert min(row["height"] - region_h, row["width"] - region_w) == 0
    assert {int(g) for g in pos["group"]} == {montage.S, montage.T, montage.W}
    assert info["positives"] == 4 and info["negatives"] == 2
    assert os.path.getsize(f"{path}/pixels.u8") == int((index["height"] * index["width"]).sum()) * 3

    # reused as is; a changed setting or annotation file is another cache
    mtime = os.path.getmtime(f"{path}/index.npy")
    capsys.readouterr()
    assert extract(data, cache, "--montage-pos-per-neg", "2")[0] == path
    assert "reusing" in capsys.readouterr().out and os.path.getmtime(f"{path}/index.npy") == mtime
    assert extract(data, cache, "--montage-pos-per-neg", "2", "--montage-enlarge", "0.1")[0] != path
    with open(data.train_ann) as f:
        d = json.load(f)
    d["annotations"].pop()
    with open(data.train_ann, "w") as f:
        json.dump(d, f)
    assert extract(data, cache, "--montage-pos-per-neg", "2")[0] != path


def test_ratio_holds_when_images_cannot_fit_their_negatives(shapes, tmp_path):
    """The synthetic images are small and crowded: deficits pass on, the total stays floor(P / 10)."""
    data = DataSpec(shapes[1], shapes[3], shapes[5], shapes[7], "shapes")
    _, index, info = extract(data, str(tmp_path / "cache"))
    assert info["negatives"] == info["positives"] // 10 > 0


def record(h, w, boxes, labels, crowd=()):
    """A CocoDetection record as plan_samples reads it."""
    return {"size": (h, w), "boxes": np.array(boxes, np.float32).reshape(-1, 4),
            "labels": np.array(labels, np.int64), "crowd": np.array(crowd, np.float64).reshape(-1, 4)}


def overlap(a, b):
    """Intersection area of two x0 y0 x1 y1 boxes (0 <=> IoU exactly 0)."""
    return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))


def test_planned_negatives_never_overlap_an_object_and_keep_the_ratio():
    """Sec. 3.1: negatives have IoU exactly 0 with every object of their image (the positive samples, i.e. the
    GT boxes enlarged for context, and the tiny and crowd boxes); positives : negatives = --montage-pos-per-neg
    over the set, an image with no room passing its share on to the next."""
    gt = [[20, 30, 60, 60], [100, 10, 116, 50], [150, 80, 165, 110]]  # 40 x 30; w = 16 (kept); w = 15 (dropped)
    records = [record(120, 200, gt, [1, 2, 3], crowd=[[160, 5, 195, 40]]),
               record(60, 60, [[0, 0, 60, 60]], [2]),  # one object filling its image: no room for a negative
               record(200, 300, [], [])]  # no object
    cfg = {"seed": 0, "enlarge": 0.5, "min_box": 16, "pos_per_neg": 0.25, "neg_min": 8, "neg_scale": (0.05, 0.5),
           "neg_aspect": 3.0, "neg_tries": 400}
    plans = montage.plan_samples(SimpleNamespace(records=records), cfg)
    # 4 negatives per positive: 2 positives -> 8 negatives; +1 positive -> 12, none fit; the last image: 4
    counts = [(int((labels > 0).sum()), int((labels == 0).sum())) for _, labels in plans]
    assert counts == [(2, 8), (1, 0), (0, 4)]
    boxes, labels = plans[0]
    assert labels.tolist()[:2] == [1, 2]
    for box, (x0, y0, x1, y1) in zip(boxes[:2], gt):  # each side grown by U(0, 0.5) x the box size, clipped
        w, h = x1 - x0, y1 - y0
        assert max(0, x0 - w / 2) <= box[0] <= x0 and max(0, y0 - h / 2) <= box[1] <= y0
        assert x1 <= box[2] <= min(200, x1 + w / 2) and y1 <= box[3] <= min(120, y1 + h / 2)
    objects = [*boxes[:2], *gt, [160, 5, 195, 40]]
    for neg in boxes[2:]:
        assert 0 <= neg[0] < neg[2] <= 200 and 0 <= neg[1] < neg[3] <= 120 and min(neg[2:] - neg[:2]) >= 8
        assert all(overlap(neg, obj) == 0 for obj in objects), neg


def write_cache(root, samples, num_classes=3):
    """A hand-made sample cache: samples = [(h, w, colour, label, group, area)]."""
    os.makedirs(root)
    rows, offset = [], 0
    with open(f"{root}/pixels.u8", "wb") as f:
        for h, w, colour, label, group, area in samples:
            f.write(np.full((h, w, 3), colour, np.uint8).tobytes())
            rows.append((offset, h, w, label, group, 0, (0, 0, area, 1)))
            offset += h * w * 3
    np.save(f"{root}/index.npy", np.array(rows, dtype=montage.INDEX_DTYPE))
    with open(f"{root}/info.json", "w") as f:
        json.dump({"annotations": "hand.json", "num_classes": num_classes}, f)
    return root


def test_montage_layout_groups_areas_and_labels(tmp_path):
    """Sec. 3.2: the S-sample of smaller box area top-left, the W-sample top-right, the T-sample bottom-left, the
    larger S bottom-right, each region filled by its own sample only (no padding), labels in region order.
    Every sample has its own colour, so the region it landed in tells which one was drawn."""
    S, T, W = montage.S, montage.T, montage.W
    samples = [(20, 24, 11, 1, S, 900),    # the largest S box, stored small: upscaled
               (100, 90, 22, 2, S, 50),   # the smallest S box, stored large: downscaled
               (40, 40, 55, 3, S, 300),
               (80, 20, 33, 3, T, 10), (90, 30, 66, 1, T, 10),
               (16, 70, 44, 0, W, 10), (20, 50, 77, 2, W, 10)]  # 44: a background W-sample
    by_colour = {colour: (label, group, area) for _, _, colour, label, group, area in samples}
    montages = montage.MontageSet(write_cache(str(tmp_path / "c"), samples), 96, 32, flip=0.5)
    assert len(montages) == 1  # 3 S-samples // 2
    # template 96 split 32, written out: TL 32 x 32, TR 32h x 64w, BL 64h x 32w, BR 64 x 64
    regions = [(0, 0, 32, 32), (0, 32, 32, 96), (32, 0, 96, 32), (32, 32, 96, 96)]
    drawn = []
    for seed in range(40):
        np.random.seed(seed)
        image, labels = montages[0]
        assert image.shape == (3, 96, 96) and image.dtype == torch.uint8
        colours = []
        for y0, x0, y1, x1 in regions:
            region = image[:, y0:y1, x0:x1]
            assert (region == region[0, 0, 0]).all()  # one sample covers the whole region
            colours.append(int(region[0, 0, 0]))
        tl, tr, bl, br = (by_colour[c] for c in colours)
        assert (tl[1], tr[1], bl[1], br[1]) == (S, W, T, S), colours
        assert colours[0] != colours[3] and tl[2] < br[2], colours  # two distinct S, the smaller box top-left
        assert labels.tolist() == [by_colour[c][0] for c in colours]
        drawn.append(colours)
    # every pair of S-samples, every T and every W is drawn
    assert {(c[0], c[3]) for c in drawn} == {(22, 55), (22, 11), (55, 11)}
    assert {c[1] for c in drawn} == {44, 77} and {c[2] for c in drawn} == {33, 66}
    with pytest.raises(UserError, match="needs 2 S-, 1 T- and 1 W-samples, but extraction found S=2 T=0 W=1"):
        montage.MontageSet(write_cache(str(tmp_path / "d"), [(9, 9, 1, 1, S, 1), (9, 9, 1, 1, S, 1),
                                                             (9, 30, 1, 1, W, 1)]), 96, 32)


def test_template_regions_groups_and_cells_in_the_papers_order():
    """Fig. 3, 224 split 64: TL 64 x 64 (smaller S), TR 64h x 160w (W), BL 160h x 64w (T), BR 160 x 160."""
    S, T, W = montage.S, montage.T, montage.W
    assert montage.region_boxes(224, 64) == ((0, 0, 64, 64), (0, 64, 64, 224), (64, 0, 224, 64), (64, 64, 224, 224))
    assert [montage.stored_size(g, 224, 64) for g in (S, T, W)] == [(160, 160), (160, 64), (64, 160)]
    erf_labels = montage.ErfLabels(224, 64, 0.7, "cpu")
    assert erf_labels.cell_region.tolist() == [[0, 0, 1, 1, 1, 1, 1]] * 2 + [[2, 2, 3, 3, 3, 3, 3]] * 5
    masks = erf_labels.input_masks  # 4 x 224 x 224
    for mask, (y0, x0, y1, x1) in zip(masks, [(0, 0, 64, 64), (0, 64, 64, 224), (64, 0, 224, 64),
                                              (64, 64, 224, 224)]):
        assert mask[y0:y1, x0:x1].all() and mask.sum() == (y1 - y0) * (x1 - x0)
    # the groups' aspect thresholds (w / h), each probed on both sides
    assert [montage.aspect_group(w, 100) for w in (49.9, 50, 150, 150.1)] == [T, S, S, W]


def ramp(h, w):
    """h x w x 3 uint8: channel 0 = step x x, channel 1 = step x y (step: the largest that fits 255),
    channel 2 = 255 (a padded pixel would not be 255). Returns the image and the step."""
    step = 255 // (max(h, w) - 1)
    y, x = np.mgrid[:h, :w]
    return np.stack([step * x, step * y, np.full((h, w), 255)], -1).astype(np.uint8), step


def ramp_slopes(image, margin):
    """Least-squares slopes of channel 0 along x and of channel 1 along y, ``margin`` px from the borders left
    out (an upscaled image's edge pixels are flat)."""
    image = image.astype(np.float64)[margin:-margin, margin:-margin]
    along_x = np.polyfit(np.arange(image.shape[1]), image[:, :, 0].mean(0), 1)[0]
    along_y = np.polyfit(np.arange(image.shape[0]), image[:, :, 1].mean(1), 1)[0]
    return along_x, along_y


@pytest.mark.parametrize("h, w, region_h, region_w", [
    (20, 60, 64, 64),    # a W-sample in a square region: x 3.2 to 64 x 192, cropped in x
    (200, 100, 32, 64),  # a tall sample in a wide region: x 0.64 to 128 x 64, cropped in y
    (90, 30, 64, 160),   # a T-sample in the W region: x 5.33 to 480 x 160
    (40, 120, 160, 64),  # a W-sample in the T region: x 4 to 160 x 480
])
def test_samples_keep_their_aspect_and_cover_their_region(h, w, region_h, region_w):
    """Sec. 3.2 / Fig. 2: no warping (a stretch would scale x and y differently) and no padding. On a ramp
    sample (value = step x coordinate) the slopes along x and y are both step / scale, scale = max(region_h / h,
    region_w / w), the smallest uniform scale that covers the region."""
    scale = max(region_h / h, region_w / w)
    sample, step = ramp(h, w)
    margin = max(2, math.ceil(scale))
    covered = montage.resize_to_cover(sample, region_h, region_w)
    assert covered.shape == (round(h * scale), round(w * scale), 3)
    assert ramp_slopes(covered, margin) == pytest.approx((step / scale, step / scale), rel=0.02)
    corners = set()
    for seed in range(6):
        np.random.seed(seed)
        for flip, sign in ((0, 1), (1, -1)):
            crop = montage.fit_to_region(sample, region_h, region_w, flip=flip)
            assert crop.shape == (region_h, region_w, 3) and (crop[..., 2] == 255).all()  # covered, no padding
            assert ramp_slopes(crop, margin) == pytest.approx((sign * step / scale, step / scale), rel=0.02)
            corners.add(tuple(crop[0, 0, :2]))
    assert len(corners) > 2  # the crop's position is random


class StridedConv(nn.Module):
    """features = BN(conv 32 x 32, stride 32): output cell (j, k) sees exactly input block (j, k), through the
    kernel. In eval mode BN divides by sqrt(running var + eps) = 2 (eps 2^-20 and var 4 - 2^-20, exact in float32:
    torch before 2.13 refuses eps 0); batch statistics (train mode) would not."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 32, stride=32, bias=False)
        self.bn = nn.BatchNorm2d(2, eps=2.0 ** -20)
        self.bn.running_var.fill_(4.0 - 2.0 ** -20)
        self.bn.running_mean.fill_(1.0)

    def features(self, x):
        return self.bn(self.conv(x))


@pytest.mark.numerics
def test_erf_of_each_position_is_its_own_block_through_the_kernel(monkeypatch):
    """Luo et al.'s ERF of a model whose answer is known: G[j, k] = sum over images and RGB of |d sum_c X[c, j, k]
    / d input| = B x sum_rgb |sum_c kernel[c, rgb]| / 2 on input block (j, k), 0 elsewhere. A 2 x 5 feature map
    and an asymmetric (random) kernel: a transposed position or kernel cannot pass. Then the positions shared
    over 2 ranks: each computes every 2nd one, the sum over the ranks is the whole map."""
    torch.manual_seed(0)
    model = StridedConv().train()
    images = torch.randn(2, 3, 64, 160)
    erf = montage.effective_receptive_fields(model, images)
    assert erf.shape == (2, 5, 64, 160)
    assert model.training and all(p.grad is None for p in model.parameters())  # mode restored, nothing to train on
    kernel = 2 * model.conv.weight.detach().sum(0).abs().sum(0) / 2  # 32 x 32: 2 images, BN's / 2
    expected = torch.zeros(2, 5, 64, 160)
    for j in range(2):
        for k in range(5):
            expected[j, k, 32 * j:32 * j + 32, 32 * k:32 * k + 32] = kernel
    assert torch.allclose(erf, expected, atol=1e-6)
    montage.effective_receptive_fields(model.eval(), images)
    assert not model.training
    monkeypatch.setattr(montage.dist, "get_world_size", lambda: 2)
    for rank in range(2):
        monkeypatch.setattr(montage.dist, "get_rank", lambda rank=rank: rank)
        mine = torch.arange(10).reshape(2, 5) % 2 == rank  # positions 0, 2, 4, ... in row-major order on rank 0
        assert torch.allclose(montage.effective_receptive_fields(model, images), expected * mine[..., None, None],
                              atol=1e-6)  # all_reduce_sum: identity on one process


@pytest.mark.numerics
def test_erf_of_a_resnet_matches_autograd_of_single_positions():
    """Each position's ERF written out independently: autograd of that one position, one image at a time (eval
    mode: an image's ERF cannot depend on the others of the batch), summed over the images."""
    torch.manual_seed(0)
    model = montage.MontageNet("resnet18", 3).train()
    images = torch.randn(2, 3, 32, 96)  # a 1 x 3 feature map (the 2-D layout: test above)
    erf = montage.effective_receptive_fields(model, images)
    assert erf.shape == (1, 3, 32, 96) and model.training
    model.eval()
    for j, k in [(0, 0), (0, 2)]:
        expected = torch.zeros(32, 96)
        for image in images:
            x = image[None].clone().requires_grad_(True)
            grad, = torch.autograd.grad(model.backbone.body(x)["out"][0, :, j, k].sum(), x)
            expected += grad[0].abs().sum(0)
        # the same gradients by batched and single-image kernels: each conv's sums of up to 4608 terms in another
        # order (~sqrt(N) x 2^-24 = 4e-6 relative), through the 20 layers of the backward: rtol 1e-4
        assert torch.allclose(erf[j, k], expected, rtol=1e-4, atol=1e-8), (j, k)


class WideConv(nn.Module):
    """features = conv 64 x 64, stride 32, padding 16: each cell sees its own 32 x 32 block and 16 px around
    it, so its ERF spills into the neighbouring regions."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 64, stride=32, padding=16)

    def features(self, x):
        return self.conv(x)


@pytest.mark.numerics
def test_erf_labels_update_wires_the_template_and_tau():
    """ErfLabels.update = Eq. 2 on the ERF of the model, with the template's masks and cells and --montage-tau;
    its state (the weights) survives a save and load."""
    torch.manual_seed(0)
    model, images = WideConv(), torch.randn(2, 3, 96, 96)
    erf_labels = montage.ErfLabels(96, 32, 0.9, "cpu")
    erf_labels.update(model, images, iteration=0)
    expected = montage.erf_label_weights(montage.effective_receptive_fields(model, images),
                                         montage.region_masks(96, 32), montage.region_masks(3, 1).argmax(0), 0.9)
    assert torch.allclose(erf_labels.weights, expected)
    own = (erf_labels.weights * F.one_hot(erf_labels.cell_region, 4).permute(2, 0, 1)).sum(0)  # 3 x 3
    assert (own >= 0.9 - 1e-6).all() and (own < 1).any()  # the ERF spills: soft labels
    restored = montage.ErfLabels(96, 32, 0.9, "cpu")
    restored.load_state_dict(erf_labels.state_dict())
    assert torch.equal(restored.weights, erf_labels.weights)


# A 64 x 96 input (H x W) on a 2 x 3 feature map, cut like the template with split 32: TL 32 x 32,
# TR 32h x 64w, BL 32h x 32w, BR 32h x 64w.
HAND_CELLS = torch.tensor([[0, 1, 1], [2, 3, 3]])


def hand_masks():
    masks = torch.zeros(4, 64, 96)
    masks[0, :32, :32] = masks[1, :32, 32:] = masks[2, 32:, :32] = masks[3, 32:, 32:] = 1
    return masks


def hand_erf():
    """2 x 3 x 64 x 96 ERF maps, each placing known masses at a few pixels of known regions."""
    points = {(0, 0): [(5, 7, .4), (30, 2, .29), (3, 90, .2), (60, 40, .11)],  # TL .69 (own), TR .2, BR .11
              (0, 1): [(10, 50, .71), (31, 31, .09), (33, 0, .2)],  # TR .71 (own), TL .09, BL .2
              (0, 2): [(0, 95, 3.), (31, 32, 1.)],  # all in TR (own), 4 in all
              (1, 0): [(40, 10, .4), (63, 95, .6)],  # BL .4 (own), BR .6
              (1, 1): [(0, 0, 5.)],  # all in TL, none in BR (own)
              (1, 2): []}  # no ERF at all
    erf = torch.zeros(2, 3, 64, 96)
    for (j, k), masses in points.items():
        for y, x, value in masses:
            erf[j, k, y, x] += value
    return erf


@pytest.mark.numerics
def test_erf_label_weights_from_eq_2_by_hand():
    """Eq. 2 with the factor (1 - w_r): w_r = max(tau, share of the own region r), the other regions split
    1 - w_r in proportion to their shares of the ERF outside r; the weights sum to 1."""
    expected = {(0, 0): [.7, .3 * .2 / .31, 0, .3 * .11 / .31],  # own .69, just under tau: raised to .7
                (0, 1): [.09, .71, .2, 0],  # own .71, just over tau: the shares as they are
                (0, 2): [0, 1, 0, 0],  # everything in the own region
                (1, 0): [0, 0, .7, .3],  # 40 / 60 between the own region and BR
                (1, 1): [.3, 0, 0, .7],  # nothing in the own region
                (1, 2): [0, 0, 0, 1]}  # an all-0 ERF: the own label only
    for scale in (1, 1000):  # shares: the ERF's scale does not matter
        w = montage.erf_label_weights(scale * hand_erf(), hand_masks(), HAND_CELLS, tau=0.7)
        assert w.shape == (4, 2, 3)
        for (j, k), weights in expected.items():
            assert w[:, j, k].tolist() == pytest.approx(weights, abs=1e-6), (j, k)
    # tau on both sides of the 0.4 own share of position (1, 0)
    w = montage.erf_label_weights(hand_erf(), hand_masks(), HAND_CELLS, tau=0.41)
    assert w[:, 1, 0].tolist() == pytest.approx([0, 0, .41, .59], abs=1e-6)
    w = montage.erf_label_weights(hand_erf(), hand_masks(), HAND_CELLS, tau=0.39)
    assert w[:, 1, 0].tolist() == pytest.approx([0, 0, .4, .6], abs=1e-6)
    assert w[:, 0, 0].tolist() == pytest.approx([.69, .2, 0, .11], abs=1e-6)  # .69 over tau now: kept
    # tau = 1: hard labels (block-wise with dense CE, sec. 3.3); a tiny tau: still the own label on an all-0 ERF
    w = montage.erf_label_weights(hand_erf(), hand_masks(), HAND_CELLS, tau=1.0)
    assert torch.equal(w, F.one_hot(HAND_CELLS, 4).permute(2, 0, 1).float())
    w = montage.erf_label_weights(hand_erf(), hand_masks(), HAND_CELLS, tau=1e-6)
    assert w[:, 1, 2].tolist() == [0, 0, 0, 1]
    assert w[:, 1, 1].tolist() == pytest.approx([1 - 1e-6, 0, 0, 1e-6], abs=1e-7)


# a 3 x 4 cell grid cut like the template: TL 1 x 1, TR 1h x 3w, BL 2h x 1w, BR 2h x 3w (areas 1, 3, 2, 6)
LOSS_CELLS = torch.tensor([[0, 1, 1, 1], [2, 3, 3, 3], [2, 3, 3, 3]])
LOSS_LABELS = torch.tensor([[1, 0, 4, 1], [3, 3, 0, 2]])  # B x 4 in region order; 0 = background; 5 classes


def log_softmax_list(z):
    top = max(z)
    log_sum = top + math.log(sum(math.exp(v - top) for v in z))
    return [v - log_sum for v in z]


@pytest.mark.numerics
def test_erf_loss_from_eq_1_with_loops_and_its_gradient():
    """Eq. 1 and sec. 3.3: soft label sum_i w_i y_i at each position, cross-entropy at each position, averaged
    per region, then over the 4 regions (and the images). The gradient on a logit is (softmax - soft label) /
    (images x 4 x cells of its region): small regions weigh as much as large ones."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 3, 4, generator=g)
    weights = torch.rand(4, 3, 4, generator=g)
    weights /= weights.sum(0)
    expected, grad = 0.0, torch.zeros_like(logits)
    for b in range(2):
        for r in range(4):
            where = [(j, k) for j in range(3) for k in range(4) if LOSS_CELLS[j, k] == r]
            for j, k in where:
                log_p = log_softmax_list(logits[b, :, j, k].tolist())
                soft = [sum(weights[i, j, k].item() for i in range(4) if LOSS_LABELS[b, i] == c) for c in range(5)]
                expected += -sum(t * lp for t, lp in zip(soft, log_p)) / len(where) / 4 / 2
                for c in range(5):
                    grad[b, c, j, k] = (math.exp(log_p[c]) - soft[c]) / len(where) / 4 / 2
    logits.requires_grad_(True)
    loss, _ = montage.montage_loss(logits, LOSS_LABELS, LOSS_CELLS, "erf", weights)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert torch.allclose(logits.grad, grad, atol=1e-7)
    for kind in ("erf", "blockwise", "global"):  # uniform logits: log(K + 1) whatever the labels
        loss, _ = montage.montage_loss(torch.zeros(2, 5, 3, 4), LOSS_LABELS, LOSS_CELLS, kind, weights)
        assert loss.item() == pytest.approx(math.log(5), rel=1e-6)


@pytest.mark.numerics
def test_blockwise_and_global_losses_with_loops():
    """Sec. 3.3's alternatives: block-wise = each region's averaged logits against its label; global = the
    image's averaged logits against the labels mixed by region area (1, 3, 2, 6 cells of 12)."""
    logits = torch.randn(2, 5, 3, 4, generator=torch.Generator().manual_seed(1))
    blockwise, global_ = 0.0, 0.0
    for b in range(2):
        for r in range(4):
            where = [(j, k) for j in range(3) for k in range(4) if LOSS_CELLS[j, k] == r]
            pooled = [sum(logits[b, c, j, k].item() for j, k in where) / len(where) for c in range(5)]
            blockwise += -log_softmax_list(pooled)[LOSS_LABELS[b, r]] / 8
        pooled = [logits[b, c].mean().item() for c in range(5)]
        mix = [sum(area / 12 for r, area in enumerate((1, 3, 2, 6)) if LOSS_LABELS[b, r] == c) for c in range(5)]
        global_ += -sum(m * lp for m, lp in zip(mix, log_softmax_list(pooled))) / 2
    assert montage.montage_loss(logits, LOSS_LABELS, LOSS_CELLS, "blockwise")[0].item() == pytest.approx(blockwise,
                                                                                                         rel=1e-6)
    assert montage.montage_loss(logits, LOSS_LABELS, LOSS_CELLS, "global")[0].item() == pytest.approx(global_,
                                                                                                      rel=1e-6)


def test_resume_continues_with_identical_losses(shapes, tmp_path):
    """ERF weights recomputed at 0 and 2: the run stopped at 3 resumes with those of iteration 2."""
    cache = ["--data-cache", str(tmp_path / "cache")]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    proc = run_script("montage.py", *TINY_M, *shapes, *cache, "--output-dir", full, env=ONE_THREAD)
    assert re.findall(r"ERF label weights at iteration (\d+)", proc.stdout) == ["0", "2"]  # every 2 from 0
    run_script("montage.py", *TINY_M, *shapes, *cache, "--max-iters", "3", "--output-dir", part, env=ONE_THREAD)
    run_script("montage.py", *TINY_M, *shapes, *cache, "--output-dir", part, "--resume", "auto", env=ONE_THREAD)
    a, b = iteration_losses(full), iteration_losses(part)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    # a resume is the same computation (the checkpoint's exact weights, optimizer state and random streams, the
    # same kernels in the same order): bit-identical, seen through log.txt's 6 decimals (rel 1e-6: its last one)
    for it in (1, 2, 3, 4):  # 1-3: the run that extracted the samples draws what the reusing one does
        assert b[it] == pytest.approx(a[it], rel=1e-6), (it, a, b)


def test_pretrained_backbone_loads_into_finetune(shapes, tmp_path):
    out = str(tmp_path / "pre")
    run_script("montage.py", *TINY_M, *shapes, "--data-cache", str(tmp_path / "cache"), "--max-iters", "2",
               "--montage-loss", "blockwise", "--output-dir", out, env=ONE_THREAD)
    final = torch.load(f"{out}/model_final.pth", weights_only=True)
    meta = final["meta"]
    assert meta["method"] == "montage" and meta["backbone"] == "resnet18" and meta["parts"] == ["backbone"]
    assert meta["iterations"] == 2 and meta["images_seen"] == 2 * 4 * 4 and meta["device_hours"] > 0
    key, _ = claims.PRETEXT_MEASURE["montage"]  # the learning check reads what the script logs
    assert key in meta["losses_first"] and key in meta["losses_last"]
    assert all(k.startswith("backbone.body.") for k in final["model"])
    proc = run_script("finetune.py", "--detector", "fasterrcnn", "--init", f"{out}/model_final.pth",
                      "--backbone", "resnet18", "--preset", "cpu", "--anchor-scale", "0.5", "--batch-size", "2",
                      "--rpn-batch-size", "32", "--roi-batch-size", "32", "--rpn-post-nms-train", "64",
                      "--rpn-post-nms-test", "32", "--iters", "1", "--warmup-iters", "1", "--workers", "0",
                      "--no-tb", "--device", "cpu", *shapes, "--output-dir", str(tmp_path / "ft"), env=ONE_THREAD)
    report = {line.split()[0]: [int(v) for v in line.split()[1:]] for line in proc.stdout.splitlines()
              if line.startswith("  ") and line.split()[0] in ("backbone", "fpn", "rpn", "box_head")}
    loaded, missing, mismatch, unexpected, _ = report["backbone"]
    assert loaded > 0 and missing == mismatch == unexpected == 0, proc.stdout
    assert report["fpn"][0] == 0 and report["rpn"][0] == 0 and report["box_head"][0] == 0  # fresh
    assert "--bn frozen: the recipe's" in proc.stdout  # Montage backbones fine-tune with frozen BN (sec. 4.5)


@pytest.mark.parametrize("flags, message", [
    (["--montage-size", "100"], "--montage-size 100 --montage-split 32: both must be multiples of 32"),
    (["--montage-split", "64"], "with 0 < split < size"),
    (["--montage-tau", "0"], "--montage-tau 0.0: expected a value in (0, 1]"),
    (["--montage-tau", "1.01"], "--montage-tau 1.01: expected a value in (0, 1]"),
    (["--backbone", "vgg16"], "--backbone vgg16: unknown backbone"),
])
def test_bad_flags_are_user_errors(flags, message):
    args = montage.get_args_parser().parse_args([*TINY_M, *flags])
    with pytest.raises(UserError) as e:
        montage.check_montage_args(args)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("tau", ["1e-6", "0.7", "1"])
def test_tau_in_range_is_accepted(tau):
    """tau is the own label's minimum weight: (0, 1], 1 = hard labels (the other side of the bad values)."""
    montage.check_montage_args(montage.get_args_parser().parse_args([*TINY_M, "--montage-tau", tau]))


def test_user_error_is_one_line(shapes, tmp_path):
    proc = run_script("montage.py", *TINY_M, *shapes, "--montage-size", "100", "--output-dir", str(tmp_path / "x"),
                      expect_rc=2, env=ONE_THREAD)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --montage-size 100"), proc.stderr
