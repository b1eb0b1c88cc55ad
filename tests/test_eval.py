"""The evaluator: perfect detections score AP 1, scrambled ones about 0, with original category ids; labels map
to categories exactly, and no detector output can land in a wrong category (label 0 is never cat_ids[-1])."""
import re

import pytest
import torch

from common.coco import CocoDetection
from common.coco_eval import STAT_NAMES, coco_evaluate, faster_coco_eval_available, to_coco_results
from common.detectors import build_detector


@pytest.fixture(scope="module")
def val_set(shapes):
    return CocoDetection(shapes[5], shapes[7], with_masks=True)


def perfect_outputs(ds, scale=1.0):
    """Ground truth as detector outputs, for an input image ``scale`` x the original size."""
    outs = []
    for i in range(len(ds)):
        _, t = ds.load(i)
        n = len(t["labels"])
        outs.append((t, {"boxes": t["boxes"].as_subclass(torch.Tensor) * scale, "labels": t["labels"],
                         "scores": torch.linspace(1, 0.5, n),
                         "masks": t["masks"].float()[:, None]}))
    return outs


def results_of(ds, outs, scale=1.0):
    res = []
    for t, out in outs:
        h, w = t["orig_size"]
        res += to_coco_results(out, t["image_id"], (round(h * scale), round(w * scale)), (h, w), ds.cat_ids)
    return res


def test_ground_truth_scores_ap_one_with_original_category_ids(val_set):
    outs = perfect_outputs(val_set, scale=2.0)  # outputs on a 2x resized input are mapped back
    res = results_of(val_set, outs, scale=2.0)
    used = {r["category_id"] for r in res}
    assert used <= {1, 2, 4, 7, 9} and used & {7, 9}  # COCO ids, not the contiguous labels 1..5
    for backend in ("pycocotools", "faster") if faster_coco_eval_available() else ("pycocotools",):
        stats = coco_evaluate(val_set.coco_gt(), res, "bbox", backend)
        assert set(stats) == set(STAT_NAMES)
        assert stats["AP"] == pytest.approx(1.0, abs=1e-6) and stats["AR100"] == pytest.approx(1.0, abs=1e-6)
        segm = coco_evaluate(val_set.coco_gt(), res, "segm", backend)
        assert segm["AP50"] > 0.95


def test_scrambled_boxes_score_near_zero(val_set):
    g = torch.Generator().manual_seed(0)
    outs = perfect_outputs(val_set)
    res = []
    for t, out in outs:
        perm = torch.randperm(len(out["boxes"]), generator=g)
        h, w = t["orig_size"]
        boxes = torch.rand(len(perm), 4, generator=g) * torch.tensor([w, h, w, h]) / 2
        boxes[:, 2:] += boxes[:, :2] / 4 + 2  # random small boxes
        out = dict(out, boxes=boxes, labels=out["labels"][perm])
        out.pop("masks")
        res += to_coco_results(out, t["image_id"], (h, w), (h, w), val_set.cat_ids)
    assert coco_evaluate(val_set.coco_gt(), res, "bbox")["AP"] < 0.05


def test_no_detections_give_zero_not_an_error(val_set):
    assert coco_evaluate(val_set.coco_gt(), [], "bbox")["AP"] == 0.0


@pytest.mark.skipif(not faster_coco_eval_available(), reason="faster-coco-eval not installed")
def test_faster_coco_eval_matches_pycocotools(val_set):
    g = torch.Generator().manual_seed(1)
    res = []
    for t, out in perfect_outputs(val_set):
        h, w = t["orig_size"]
        jitter = torch.randn(out["boxes"].shape, generator=g) * 4  # imperfect: a spread of IoUs
        shifted = torch.stack([m.roll(int(torch.randint(-4, 5, (1,), generator=g)), dims=-1) for m in out["masks"]])
        out = dict(out, boxes=out["boxes"] + jitter, scores=torch.rand(len(jitter), generator=g), masks=shifted)
        res += to_coco_results(out, t["image_id"], (h, w), (h, w), val_set.cat_ids)
    for iou_type in ("bbox", "segm"):
        a = coco_evaluate(val_set.coco_gt(), res, iou_type, "pycocotools")
        b = coco_evaluate(val_set.coco_gt(), res, iou_type, "faster")
        assert 0.05 < a["AP"] < 0.95
        for k in STAT_NAMES:
            assert a[k] == pytest.approx(b[k], abs=1e-4), k


def detections(labels):
    n = len(labels)
    return {"boxes": torch.tensor([[10.0, 5.0, 20.0, 15.0]] * n), "scores": torch.linspace(0.9, 0.5, n),
            "labels": torch.tensor(labels)}


def test_labels_map_to_their_category_and_boxes_to_the_original_non_square_image():
    """Label l -> cat_ids[l - 1]; boxes from a 50 x 100 input to a 100 x 300 original: x x 3, y x 2, as XYWH."""
    res = to_coco_results(detections([1, 2, 3, 2]), 7, (50, 100), (100, 300), [3, 8, 11])
    assert [r["category_id"] for r in res] == [3, 8, 11, 8]
    assert [r["image_id"] for r in res] == [7] * 4
    assert res[0]["bbox"] == [30.0, 10.0, 30.0, 20.0] and res[0]["score"] == pytest.approx(0.9)


@pytest.mark.parametrize("labels, bad", [([1, 0, 2], [0]), ([3, 4], [4]), ([-1, 2], [-1])])
def test_labels_outside_1_to_K_are_refused_not_given_a_category(labels, bad):
    """Label 0 would index cat_ids[-1], the last category: an error instead of a silently wrong category."""
    with pytest.raises(ValueError, match=re.escape(f"labels {bad} outside 1..3")):
        to_coco_results(detections(labels), 7, (50, 100), (100, 300), [3, 8, 11])


@pytest.mark.parametrize("name", ["retinanet", "fcos"])
def test_dense_detectors_never_emit_label_zero_and_output_zero_changes_nothing(name):
    """RetinaNet / FCOS with K = 3 have K + 1 sigmoid outputs; the label is the output's index, so output 0
    (no class: trained negative everywhere) must never become a detection, nor take a real detection's place.
    Classifier logits are made constant: class 2 at -1 everywhere (score 0.27, over the thresholds), classes 1
    and 3 at -8, output 0 at -8 (never scoring) or +8 (outscoring class 2 everywhere): the detections must be
    the same, all class 2."""
    torch.manual_seed(0)
    model = build_detector(name, 3, "resnet18", detections_per_img=30).eval()
    cls = model.head.classification_head.cls_logits  # conv with A x (K + 1) channels: anchor a, output k at a(K+1)+k
    image = torch.rand(3, 64, 96)
    outputs = []
    for logit0 in (-8.0, 8.0):
        with torch.no_grad():
            cls.weight.zero_()
            cls.bias.copy_(torch.tensor([logit0, -8.0, -1.0, -8.0]).repeat(cls.bias.numel() // 4))
            out = model([image])[0]
        assert out["labels"].tolist() == [2] * len(out["labels"]) and len(out["labels"]) == 30, out["labels"]
        outputs.append(out)
    for key in ("boxes", "scores", "labels"):
        assert torch.equal(outputs[0][key], outputs[1][key]), key
    res = to_coco_results(outputs[1], 1, (64, 96), (64, 96), [3, 8, 11])
    assert {r["category_id"] for r in res} == {8}
