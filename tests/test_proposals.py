"""common/proposal_boxes.py: the filter, NMS and top-K on known boxes, random boxes, selective search;
common/proposals.py: the CLI's output (pycocotools-readable, filter holds, empty images counted), resuming an
interrupted run, and the loader's one-line schema errors."""
import json
import os
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from common import proposal_boxes, proposals
from common.errors import UserError
from conftest import needs_selective_search, run_script


def make_set(root, sizes=((100, 80), (20, 20), (64, 200), (150, 120))):
    """A tiny COCO-format image set of noise images (width, height); the 20x20 one is too small for
    any proposal."""
    os.makedirs(f"{root}/images", exist_ok=True)
    rng = np.random.default_rng(0)
    images = []
    for i, (w, h) in enumerate(sizes, start=1):
        blocks = rng.integers(0, 255, (max(h // 16, 1), max(w // 16, 1), 3), dtype=np.uint8)
        Image.fromarray(blocks).resize((w, h), Image.NEAREST).save(f"{root}/images/{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": w, "height": h})
    with open(f"{root}/ann.json", "w") as f:
        json.dump({"images": images, "annotations": [], "categories": [{"id": 1, "name": "x"}]}, f)
    return ["--train-images", f"{root}/images", "--train-ann", f"{root}/ann.json"]


def test_filter_rules_on_known_boxes():
    boxes = torch.tensor([[0, 0, 32, 32],     # keep: the 32-px minimum
                          [0, 0, 31, 40],     # drop: w < 32
                          [0, 0, 96, 32],     # keep: aspect exactly 3
                          [0, 0, 100, 32],    # drop: aspect 3.125
                          [0, 0, 32, 97],     # drop: aspect < 1/3
                          [0, 0, 160, 160],   # keep: sqrt area ratio exactly 0.8
                          [0, 0, 161, 161]],  # drop: 0.805
                         dtype=torch.float32)
    assert proposal_boxes.filter_mask(boxes, 200, 200).tolist() == [True, False, True, False, False, True, False]


def test_nms_topk_and_fallback_on_known_boxes():
    boxes = torch.tensor([[0, 0, 50, 50], [1, 1, 51, 51], [100, 100, 150, 150], [0, 100, 40, 140],
                          [0, 0, 10, 10]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95, 1.0])
    kept, s, rule = proposal_boxes.select_proposals(boxes, scores, 200, 200, topk=10)
    assert rule == "full" and s.tolist() == pytest.approx([0.95, 0.9, 0.7])  # B suppressed, E filtered
    assert kept.tolist() == [[0, 100, 40, 140], [0, 0, 50, 50], [100, 100, 150, 150]]
    assert proposal_boxes.select_proposals(boxes, scores, 200, 200, topk=2)[0].tolist() == kept[:2].tolist()
    one = torch.ones(1)
    assert proposal_boxes.select_proposals(torch.tensor([[0., 0, 190, 190]]), one, 200, 200)[2] == "ratio_only"
    assert proposal_boxes.select_proposals(torch.tensor([[0., 0, 150, 40]]), one, 200, 200)[2] == "min_size_only"
    kept, s, rule = proposal_boxes.select_proposals(torch.tensor([[0., 0, 20, 20]]), one, 200, 200)
    assert rule == "none" and kept.shape == (0, 4) and s.shape == (0,)


def test_random_boxes_pass_the_filter_and_follow_the_generator():
    a = proposal_boxes.random_boxes(96, 120, 50, torch.Generator().manual_seed(1))
    b = proposal_boxes.random_boxes(96, 120, 50, torch.Generator().manual_seed(1))
    c = proposal_boxes.random_boxes(96, 120, 50, torch.Generator().manual_seed(2))
    assert a.shape == (50, 4) and a.dtype == torch.float32 and torch.equal(a, b) and not torch.equal(a, c)
    assert proposal_boxes.filter_mask(a, 96, 120).all()
    assert (a[:, :2] >= 0).all() and (a[:, 2] <= 96).all() and (a[:, 3] <= 120).all()
    assert proposal_boxes.random_boxes(20, 300, 10, torch.Generator()).shape == (0, 4)


@needs_selective_search
def test_selective_search_boxes_are_in_original_pixels():
    rng = np.random.default_rng(0)
    image = np.asarray(Image.fromarray(rng.integers(0, 255, (12, 20, 3), dtype=np.uint8)).resize((1000, 600)))
    boxes, scores = proposal_boxes.selective_search(image, max_side=100)
    assert len(boxes) > 10 and (scores[:-1] > scores[1:]).all()
    assert boxes[:, 2].max() > 500 and boxes[:, 2].max() <= 1000 and boxes[:, 3].max() <= 600


def test_missing_opencv_contrib_gives_an_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", types.ModuleType("cv2"))  # OpenCV without ximgproc
    with pytest.raises(UserError, match="pip install opencv-contrib-python-headless"):
        proposal_boxes.selective_search(np.zeros((64, 64, 3), np.uint8))


def cli(capsys, *argv):
    """Runs ``python -m common.proposals argv`` in this process; returns its stdout."""
    capsys.readouterr()
    proposals.main(proposals.get_args_parser().parse_args([str(a) for a in argv]))
    return capsys.readouterr().out


@pytest.mark.parametrize("method", [pytest.param("ss", marks=needs_selective_search), "random"])
def test_cli_writes_a_coco_file_whose_boxes_pass_the_filter(tmp_path, capsys, method):
    out = str(tmp_path / "p.json")
    flags = ["--method", method, *make_set(str(tmp_path)), "--out", out, "--topk", "20", "--shard-size", "1"]
    if method == "ss":  # the real entry point, with a pool of worker processes
        stdout = run_script("common.proposals", *flags, "--workers", "2").stdout
    else:
        stdout = cli(capsys, *flags, "--workers", "1")
    assert "1 images without proposals" in stdout
    coco = COCO(out)  # pycocotools reads it
    d = json.load(open(out))
    assert d["info"]["method"] == method and d["info"]["images_without_proposals"] == 1
    assert d["categories"] == [{"id": 1, "name": "proposal"}] and not os.path.exists(out + ".parts")
    assert len({a["id"] for a in d["annotations"]}) == len(d["annotations"])
    loaded = proposals.load_proposals(out, [1, 2, 3, 4])
    assert loaded[2].shape == (0, 4)
    for im in d["images"]:
        anns = coco.imgToAnns[im["id"]]
        assert len(anns) <= 20 and (im["id"] == 2) == (len(anns) == 0)
        assert [a["score"] for a in anns] == sorted((a["score"] for a in anns), reverse=True)
        boxes = loaded[im["id"]]
        assert len(boxes) == len(anns)
        if len(anns):  # no image here needs the fallback rules: the full filter holds on every box
            assert proposal_boxes.filter_mask(boxes, im["width"], im["height"]).all()
            x, y, w, h = anns[0]["bbox"]
            assert boxes[0].tolist() == pytest.approx([x, y, x + w, y + h], abs=0.01)


def test_interrupted_run_resumes_without_recomputing_or_duplicating(tmp_path, monkeypatch, capsys):
    data = make_set(str(tmp_path))
    ann, images = data[3], data[1]
    settings = {"method": "random", "topk": 10, "nms_iou": 0.5, "ss_max_side": None, "seed": 0}
    fresh, out = str(tmp_path / "fresh.json"), str(tmp_path / "out.json")
    proposals.generate(images, ann, fresh, settings, workers=1, shard_size=1)

    real = proposals.process_shard
    done = []

    def killed_after_two_shards(job):
        if len(done) == 2:
            raise KeyboardInterrupt
        done.append(job[0])
        return real(job)
    monkeypatch.setattr(proposals, "process_shard", killed_after_two_shards)
    with pytest.raises(KeyboardInterrupt):
        proposals.generate(images, ann, out, settings, workers=1, shard_size=1)
    parts = out + ".parts"
    assert sorted(os.listdir(parts)) == ["settings.json", "shard_000000.json", "shard_000001.json"]
    shard = json.load(open(f"{parts}/shard_000000.json"))
    shard["1"]["boxes"][0][-1] = 0.123  # marks the finished shard: a resumed run must reuse, not recompute it
    json.dump(shard, open(f"{parts}/shard_000000.json", "w"))
    open(f"{parts}/.tmp-killed-mid-write.json", "w").write("{trunc")

    monkeypatch.setattr(proposals, "process_shard", real)
    with pytest.raises(UserError, match="holds an interrupted run with other settings"):
        cli(capsys, "--method", "random", *data, "--out", out, "--topk", "20")  # not the interrupted settings
    assert os.path.isdir(parts)
    stdout = cli(capsys, "--method", "random", *data, "--out", out, "--topk", "10", "--shard-size", "1",
                 "--workers", "1")
    assert "resuming: 2/4 shards (2 images) already in" in stdout and not os.path.exists(parts)
    a, b = json.load(open(fresh)), json.load(open(out))
    assert [x["id"] for x in b["annotations"]] == list(range(1, len(a["annotations"]) + 1))
    assert b["annotations"][0]["score"] == 0.123
    assert [x["bbox"] for x in b["annotations"]] == [x["bbox"] for x in a["annotations"]]
    assert "exists (pass --overwrite" in cli(capsys, "--method", "random", *data, "--out", out)


GOOD = {"images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 80}],
        "annotations": [{"id": 1, "image_id": 1, "bbox": [10, 10, 40, 30], "category_id": 1, "score": 1.0}],
        "categories": [{"id": 1, "name": "proposal"}]}


@pytest.mark.parametrize("change, message", [
    (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), "annotations[0] (id 1): 'bbox' must be 4 numbers"),
    (lambda d: d["annotations"][0].update(image_id=9), "annotations[0] (id 1) refers to image_id 9"),
    (lambda d: d["annotations"][0].update(bbox=[10, 10, -4, 30]), "annotations[0] (id 1): bbox [10, 10, -4, 30] "
                                                                  "is empty or outside its 100x80 image 1"),
    (lambda d: d["annotations"][0].update(bbox=[90, 10, 40, 30]), "is empty or outside its 100x80 image"),
    (lambda d: d.pop("annotations"), "missing top-level list 'annotations'"),
    (lambda d: d["images"][0].pop("width"), "images[0] (id 1) is missing required key 'width'"),
    (lambda d: d["images"][0].update(id=7), "annotations[0] (id 1) refers to image_id 1"),
])
def test_load_proposals_schema_errors_are_one_line(tmp_path, change, message):
    d = json.loads(json.dumps(GOOD))
    change(d)
    path = str(tmp_path / "p.json")
    json.dump(d, open(path, "w"))
    with pytest.raises(UserError) as e:
        proposals.load_proposals(path, [1])
    assert str(e.value).startswith(path) and message in str(e.value) and "\n" not in str(e.value)


def test_load_proposals_needs_every_requested_image(tmp_path):
    path = str(tmp_path / "p.json")
    json.dump(GOOD, open(path, "w"))
    assert proposals.load_proposals(path)[1].tolist() == [[10, 10, 50, 40]]
    with pytest.raises(UserError, match=r"p.json: has no entry for image id 5 \(1 of the 2 requested"):
        proposals.load_proposals(path, [1, 5])
    open(path, "w").write("{not json")
    with pytest.raises(UserError, match="p.json: malformed JSON at line 1"):
        proposals.load_proposals(path)
