"""The COCO loader: category-id gaps, crowd boxes, empty images, degenerate boxes, bad input, masks
rasterised at the load-time size."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision.transforms.v2 import functional as F

from common import synthetic
from common.coco import BadImageError, CocoDetection, decode_masks, load_coco_json
from common.errors import UserError


def write_set(tmp_path, annotations=None, images=None, categories=None, raw=None):
    img_dir = tmp_path / "images"
    img_dir.mkdir(exist_ok=True)
    images = images if images is not None else [
        {"id": 1, "file_name": "a.jpg", "width": 64, "height": 48},
        {"id": 2, "file_name": "b.png", "width": 40, "height": 40},   # grayscale file
        {"id": 5, "file_name": "c.jpg", "width": 64, "height": 48},   # no annotations
    ]
    Image.fromarray(np.full((48, 64, 3), 200, np.uint8)).save(img_dir / "a.jpg")
    Image.fromarray(np.full((40, 40), 90, np.uint8)).save(img_dir / "b.png")
    Image.fromarray(np.full((48, 64, 3), 30, np.uint8)).convert("CMYK").save(img_dir / "c.jpg")
    categories = categories if categories is not None else [{"id": 3, "name": "cat"}, {"id": 17, "name": "dog"},
                                                            {"id": 90, "name": "toothbrush"}]
    annotations = annotations if annotations is not None else [
        {"id": 1, "image_id": 1, "category_id": 17, "bbox": [10, 5, 20, 10], "iscrowd": 0, "area": 200,
         "segmentation": [[10, 5, 30, 5, 30, 15, 10, 15]]},
        {"id": 2, "image_id": 1, "category_id": 90, "bbox": [50, 30, 30, 30], "iscrowd": 0, "area": 900,
         "segmentation": [[50, 30, 64, 30, 64, 48, 50, 48]]},                            # clipped to the image
        {"id": 3, "image_id": 1, "category_id": 3, "bbox": [0, 0, 64, 48], "iscrowd": 1, "area": 3072,
         "segmentation": {"size": [48, 64], "counts": [0, 3072]}},                        # crowd
        {"id": 4, "image_id": 2, "category_id": 3, "bbox": [5, 5, 0.5, 10], "iscrowd": 0, "area": 5,
         "segmentation": [[5, 5, 5.5, 5, 5.5, 15]]},                                      # degenerate
        {"id": 5, "image_id": 2, "category_id": 3, "bbox": [5, 5, -3, 10], "iscrowd": 0, "area": 0,
         "segmentation": [[5, 5, 2, 5, 2, 15]]},                                          # negative size
        {"id": 6, "image_id": 2, "category_id": 90, "bbox": [2, 3, 30, 20], "iscrowd": 0,
         "segmentation": [[2, 3, 32, 3, 32, 23, 2, 23]]},                                 # no 'area'
    ]
    ann = tmp_path / "ann.json"
    ann.write_text(raw if raw is not None else json.dumps(
        {"images": images, "annotations": annotations, "categories": categories}))
    return str(img_dir), str(ann)


def test_loader_maps_gapped_category_ids_and_filters(tmp_path):
    img_dir, ann = write_set(tmp_path)
    ds = CocoDetection(img_dir, ann, with_masks=True, keep_empty=True)
    assert ds.cat_ids == [3, 17, 90] and ds.num_classes == 3
    assert ds.class_names == ["cat", "dog", "toothbrush"]
    assert len(ds) == 3
    img, t = ds[0]
    assert img.dtype == torch.uint8 and img.shape == (3, 48, 64)
    assert t["labels"].tolist() == [2, 3]                   # 17 -> 2, 90 -> 3; crowd excluded
    assert t["boxes"].tolist() == [[10, 5, 30, 15], [50, 30, 64, 48]]
    assert t["masks"].shape == (2, 48, 64) and t["masks"][0, 7, 15] == 1 and t["masks"][0, 30, 15] == 0
    img, t = ds[1]                                           # grayscale -> 3 channels
    assert img.shape == (3, 40, 40) and t["labels"].tolist() == [3]
    img, t = ds[2]                                           # CMYK -> RGB, no boxes
    assert img.shape == (3, 48, 64) and t["boxes"].shape == (0, 4)
    s = ds.stats
    assert s["crowd boxes (excluded)"] == 1 and s["boxes clipped to the image"] == 1
    assert s["degenerate boxes under 1 px (dropped)"] == 1 and s["boxes with negative size (dropped)"] == 1
    assert s["images without boxes"] == 1
    gt = ds.coco_gt()                                        # evaluation keeps the original annotations
    assert len(gt.getAnnIds()) == 6 and gt.anns[6]["area"] == 600


def test_training_view_skips_images_without_boxes(tmp_path):
    img_dir, ann = write_set(tmp_path)
    ds = CocoDetection(img_dir, ann, keep_empty=False)
    assert [r["image_id"] for r in ds.records] == [1, 2]


@pytest.mark.parametrize("raw, message", [
    ('{"images": [], "annotations": [', "malformed JSON at line 1 column 32"),
    ('[1, 2]', "expected a JSON object"),
    ('{"images": [], "categories": []}', "missing top-level list 'annotations'"),
])
def test_malformed_files(tmp_path, raw, message):
    img_dir, ann = write_set(tmp_path, raw=raw)
    with pytest.raises(UserError, match=message):
        CocoDetection(img_dir, ann)


def test_bad_entries_are_named(tmp_path):
    cats = [{"id": 1, "name": "a"}]
    im = {"id": 1, "file_name": "a.jpg", "width": 64, "height": 48}
    cases = [
        (dict(images=[{"id": 1, "file_name": "a.jpg", "width": 64}]), r"images\[0\] \(id 1\) is missing required key 'height'"),
        (dict(images=[im, dict(im)]), "duplicate images id 1"),
        (dict(images=[im], annotations=[{"id": 1, "image_id": 9, "category_id": 1, "bbox": [0, 0, 1, 1]}]),
         "refers to image_id 9, which is not in 'images'"),
        (dict(images=[im], annotations=[{"id": 1, "image_id": 1, "category_id": 4, "bbox": [0, 0, 1, 1]}]),
         r"unknown category_id 4 \(known: \[1\]\)"),
        (dict(images=[im], annotations=[{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 1]}]),
         "'bbox' must be 4 numbers"),
        (dict(images=[im], annotations=[{"id": 3, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5]}] * 2),
         "duplicate annotations id 3"),
    ]
    for kwargs, message in cases:
        kwargs.setdefault("annotations", [])
        img_dir, ann = write_set(tmp_path, categories=cats, **kwargs)
        with pytest.raises(UserError, match=message):
            CocoDetection(img_dir, ann)


def test_empty_after_filtering_is_an_error(tmp_path):
    img_dir, ann = write_set(tmp_path, annotations=[])
    with pytest.raises(UserError, match="no images left after filtering"):
        CocoDetection(img_dir, ann, keep_empty=False)


def test_bad_images_error_or_skip(tmp_path):
    img_dir, ann = write_set(tmp_path)
    data = open(os.path.join(img_dir, "a.jpg"), "rb").read()
    open(os.path.join(img_dir, "a.jpg"), "wb").write(data[: len(data) // 2])  # truncated JPEG
    os.remove(os.path.join(img_dir, "b.png"))                                 # missing file
    ds = CocoDetection(img_dir, ann)
    with pytest.raises(BadImageError, match="a.jpg: cannot read image"):
        ds[0]
    with pytest.raises(BadImageError, match="b.png: cannot read image"):
        ds[1]
    ds = CocoDetection(img_dir, ann, skip_bad_images=True)
    assert ds[0] is None and ds[1] is None and ds[2] is not None


def test_size_mismatch_is_reported(tmp_path):
    img_dir, ann = write_set(tmp_path, images=[{"id": 1, "file_name": "a.jpg", "width": 48, "height": 64}],
                             annotations=[])
    with pytest.raises(BadImageError, match="image is 64x48 but its annotation says 48x64"):
        CocoDetection(img_dir, ann)[0]


def test_load_coco_json_allows_unlabeled_sets(tmp_path):
    path = tmp_path / "unlabeled.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "width": 4, "height": 4}],
                                "categories": []}))
    assert load_coco_json(str(path), require_annotations=False)["annotations"] == []


def test_masks_are_rasterised_at_the_requested_size():
    """Polygons are scaled and rasterised at the output size; RLEs are decoded and resized (nearest)."""
    rect = [[10, 20, 50, 20, 50, 40, 10, 40]]  # x 10..50, y 20..40 in a 60 x 80 (h x w) image
    full = decode_masks([rect], 60, 80)
    assert full.shape == (1, 60, 80) and full.dtype == torch.uint8
    assert torch.equal(decode_masks([rect], 60, 80, [60, 80]), full)
    for size in ([30, 40], [150, 200], [30, 160]):  # halved, x2.5, and stretched (y x0.5, x x2)
        sy, sx = size[0] / 60, size[1] / 80
        ys, xs = decode_masks([rect], 60, 80, size)[0].nonzero(as_tuple=True)
        extent = [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
        assert max(abs(a - b) for a, b in zip(extent, (10 * sx, 20 * sy, 50 * sx, 40 * sy))) <= 1, (size, extent)
    odd = [rect[0] + [99]]  # a stray odd value is ignored, as pycocotools does
    assert torch.equal(decode_masks([odd], 60, 80, [30, 160]), decode_masks([rect], 60, 80, [30, 160]))
    rle = mask_utils.encode(np.asfortranarray(full[0].numpy()))
    assert torch.equal(decode_masks([rle], 60, 80, [30, 40]), F.resize_mask(full, [30, 40]))
    assert decode_masks([], 60, 80, [30, 40]).shape == (0, 30, 40)


def test_synthetic_set_generated_twice_at_once_keeps_the_first_complete_copy(tmp_path):
    """Two `make -j` stages may generate the set together: the one that loses the rename keeps the
    winner's complete copy (and leaves no temporary folder); a half-written folder is never taken."""
    out = tmp_path / "shapes"
    synthetic.generate(str(out), num_train=2, num_val=1, seed=0)
    first = (out / "annotations" / "instances_train.json").read_bytes()
    synthetic.generate(str(out), num_train=3, num_val=1, seed=1)  # the loser: its rename fails
    assert (out / "annotations" / "instances_train.json").read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes"]
    broken = tmp_path / "broken"
    (broken / "train").mkdir(parents=True)
    (broken / "train" / "x.jpg").write_bytes(b"")
    with pytest.raises(OSError):
        synthetic.generate(str(broken), num_train=1, num_val=1)
