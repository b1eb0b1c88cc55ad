"""direct.py: the LxL pipeline, the lr recipe, exact resume, and the hand-off of the whole detector to finetune.py."""
import json
import os
import re

import pytest
import torch
from torchvision import tv_tensors

import direct
from common import cli
from common.coco import CocoDetection
from conftest import TINY, iteration_losses, run_script, write_scene

SMALL = [f for f in TINY if f not in ("--preset", "cpu")]  # direct.py sizes images with --direct-size
# 8 sampled RoIs per image: the 4conv1fc head's convolutions on the RoIs dominate a CPU step
PRE = ["--detector", "fasterrcnn", "--direct-size", "64", "--batch-size", "2", "--warmup-iters", "2", *SMALL,
       "--roi-batch-size", "8"]
RED, BLUE = (250, 10, 10), (10, 10, 250)


def scene(h, w, boxes, colours):
    """A grey uint8 image with filled boxes of the given colours, their masks, labels 1..N."""
    img = torch.full((3, h, w), 128, dtype=torch.uint8)
    masks = torch.zeros((len(boxes), h, w), dtype=torch.uint8)
    for i, ((x0, y0, x1, y1), colour) in enumerate(zip(boxes, colours)):
        img[:, y0:y1, x0:x1] = torch.tensor(colour, dtype=torch.uint8)[:, None, None]
        masks[i, y0:y1, x0:x1] = 1
    target = {"boxes": tv_tensors.BoundingBoxes(torch.tensor(boxes, dtype=torch.float32), format="XYXY",
                                                canvas_size=(h, w)),
              "labels": torch.arange(1, len(boxes) + 1), "masks": tv_tensors.Mask(masks), "image_id": 5,
              "orig_size": (h, w)}
    return tv_tensors.Image(img), target


def check_sample(img, target, size, colours):
    """Exactly size x size; every box inside the canvas, on pixels of its colour, and equal to its mask's extent."""
    assert tuple(img.shape) == (3, size, size) and tuple(target["masks"].shape[-2:]) == (size, size)
    assert len(target["boxes"]) == len(target["labels"]) == len(target["masks"]) >= 1
    for box, label, mask in zip(target["boxes"], target["labels"], target["masks"]):
        assert (box >= 0).all() and (box <= size).all()
        x0, y0, x1, y1 = box.tolist()
        ys, xs = torch.nonzero(mask, as_tuple=True)
        extent = [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
        assert max(abs(a - b) for a, b in zip(extent, (x0, y0, x1, y1))) <= 1.5, (box.tolist(), extent)
        inner = img[:, round(y0) + 1:round(y1) - 1, round(x0) + 1:round(x1) - 1].float()
        if inner.numel():  # boxes cut to a sliver by the crop have no inner pixels
            expected = torch.tensor(colours[int(label) - 1], dtype=torch.float32)[:, None, None]
            assert (inner - expected).abs().max() < 40, f"box {box.tolist()} is off its pixels"


def scene_set(root, h, w, boxes, colours, size, scale_range=(0.8, 1.2)):
    """The Direct pipeline (load-time ScaleLongSide, then crop, flip, pad) on a one-image scene set."""
    images, ann = write_scene(root, h, w, boxes, colours)
    return CocoDetection(images, ann, direct.direct_train_transform(size), with_masks=True,
                         resize=direct.ScaleLongSide(size, scale_range))


def test_pipeline_gives_LxL_images_with_boxes_and_masks_on_their_pixels(tmp_path):
    torch.manual_seed(0)
    ds = scene_set(str(tmp_path), 120, 200, [(20, 30, 80, 70), (120, 50, 190, 110)], (RED, BLUE), 96)
    heights, flipped = set(), 0
    for _ in range(40):
        out, t = ds[0]
        check_sample(out, t, 96, (RED, BLUE))
        # 200 px long side -> 96 x alpha in [77, 115]; the 120 px side -> [46, 69] rows of image, the rest
        # is padding in the mean colour at the bottom
        content = (out != torch.tensor(direct.MEAN_COLOUR, dtype=torch.uint8)[:, None, None]).any(0)
        rows = content.any(1).nonzero().flatten()
        assert rows.min() == 0 and 46 <= rows.max() + 1 <= 69
        assert (out[:, rows.max() + 1:, :] == out[:, -1:, -1:]).all()
        heights.add(int(rows.max()) + 1)
        flipped += int(t["boxes"][0, 0] > t["boxes"][-1, 0]) if len(t["boxes"]) == 2 else 0
    assert len(heights) > 5 and 5 < flipped < 35  # alpha is drawn, and about half the samples are flipped


def test_crop_is_redrawn_until_a_box_survives(tmp_path):
    """One small box at the right end of a wide image: most windows miss it, yet it is always kept."""
    ds = scene_set(str(tmp_path), 100, 400, [(370, 40, 392, 70)], (RED,), 64, (1.2, 1.2))  # long side 77 -> crop 64
    for seed in range(20):
        torch.manual_seed(seed)
        out, t = ds[0]
        check_sample(out, t, 64, (RED,))
    # where hardly any window hits the box (left in 0..936), the last resort puts the window on it
    img, target = scene(64, 1000, [(10, 20, 30, 40)], (RED,))
    crop = direct.CropKeepingBoxes(64, tries=1)
    kept = 0
    for seed in range(20):
        torch.manual_seed(seed)
        out, t = crop(img, target)
        assert tuple(out.shape) == (3, 64, 64)
        kept += crop.keeps_a_box(t["boxes"], 0, 0, 64, 64)
    assert kept == 20


def test_lr_is_scaled_from_batch_64_warmed_up_then_fixed():
    assert direct.paper_lr("maskrcnn", 64) == pytest.approx(0.08)
    assert direct.paper_lr("maskrcnn", 8) == pytest.approx(0.01)
    assert direct.paper_lr("retinanet", 128) == pytest.approx(0.08)
    assert direct.direct_lr(0, 0.08, 500) == pytest.approx(0.0008)
    assert direct.direct_lr(250, 0.08, 500) == pytest.approx(0.08 * (0.01 + 0.99 * 0.5))
    assert [direct.direct_lr(i, 0.08, 500) for i in (500, 10_000, 10**6)] == [0.08] * 3
    assert direct.schedule_iters("P1x", 64) == 88_000 and direct.schedule_iters("P3x", 8) == 3 * 88_000 * 8
    args = direct.get_args_parser().parse_args([])
    assert (args.detector, args.backbone, args.bn, args.trainable_layers, args.box_head) == \
        ("maskrcnn", "resnet50", "bn", 5, "4conv1fc")
    assert (args.batch_size, args.direct_size, args.schedule, args.weight_decay) == (8, 448, "P1x", 1e-4)


def test_resume_continues_with_identical_losses_and_fixed_lr(shapes, tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    run_script("direct.py", *PRE, *shapes, "--max-iters", "5", "--output-dir", full)
    run_script("direct.py", *PRE, *shapes, "--max-iters", "2", "--output-dir", part)
    run_script("direct.py", *PRE, *shapes, "--max-iters", "5", "--output-dir", part, "--resume", "auto")
    a, b = iteration_losses(full), iteration_losses(part)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    for it in (3, 4, 5):
        assert b[it] == pytest.approx(a[it], rel=1e-6), (it, a, b)
    lrs = iteration_losses(full, "lr")  # the lr of iteration i - 1; global batch 2 -> 0.08 x 2 / 64
    assert lrs[1] == pytest.approx(0.0025 * 0.01) and lrs[2] < 0.0025
    assert [lrs[i] for i in (3, 4, 5)] == pytest.approx([0.0025] * 3)
    meta = torch.load(os.path.join(part, "model_final.pth"), weights_only=True)["meta"]
    assert (meta["method"], meta["iterations"], meta["images_seen"]) == ("direct", 5, 10)


def test_finetune_loads_the_whole_pretrained_detector_with_frozen_bn(shapes, tmp_path):
    pre, ft = tmp_path / "pre", tmp_path / "ft"
    run_script("direct.py", *PRE, *shapes, "--detector", "maskrcnn", "--max-iters", "2", "--output-dir", pre)
    ck = torch.load(pre / "model_final.pth", weights_only=True)
    meta = ck["meta"]
    assert (meta["method"], meta["detector"], meta["backbone"], meta["input_size"]) == \
        ("direct", "maskrcnn", "resnet18", 64)
    assert meta["parts"] == ["backbone", "fpn", "rpn", "box_head", "box_predictor", "mask_head", "mask_predictor"]
    assert meta["images_seen"] == 4 and meta["device_hours"] > 0
    assert not torch.allclose(ck["model"]["backbone.body.bn1.running_var"], torch.ones(64))  # BN trained

    proc = run_script("finetune.py", "--detector", "maskrcnn", "--init", pre / "model_final.pth", *TINY, *shapes,
                      "--roi-batch-size", "8", "--detections-per-img", "10", "--batch-size", "2", "--iters", "2",
                      "--warmup-iters", "1", "--output-dir", ft)
    assert "(method direct, --protocol paper): Direct paper sec. 3.4 and Table 2" in proc.stdout
    assert "--bn frozen: the recipe's" in proc.stdout and "--trainable-layers 3: the recipe's" in proc.stdout
    rows = re.findall(r"^\s+(\w+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)$", proc.stdout, re.M)
    assert {r[0] for r in rows} == set(meta["parts"])
    for part, loaded, missing, mismatch, unexpected, _ in rows:
        assert int(loaded) > 0 and (missing, mismatch, unexpected) == ("0", "0", "0"), part
    # the fine-tune kept BN frozen at the pre-trained statistics, and the frozen stem unchanged
    tuned = torch.load(ft / "model_final.pth", weights_only=True)["model"]
    for key in ("backbone.body.bn1.running_mean", "backbone.body.layer4.1.bn2.running_var",
                "backbone.body.layer3.0.bn1.weight", "backbone.body.conv1.weight"):
        assert torch.equal(tuned[key], ck["model"][key]), key
    assert not torch.equal(tuned["rpn.head.conv.0.0.weight"], ck["model"]["rpn.head.conv.0.0.weight"])
    assert json.load(open(ft / "results.json"))["pretrain"]["method"] == "direct"


@pytest.mark.parametrize("flags, message", [
    (["--trainable-layers", "3"], "--trainable-layers 3: Direct pre-training trains every stage"),
    (["--direct-size", "100"], "--direct-size 100: expected a positive multiple of 32"),
    (["--direct-scale-range", "1.2", "0.8"], "--direct-scale-range 1.2 0.8: expected 0 < LO <= HI"),
    (["--direct-crop-tries", "0"], "--direct-crop-tries 0: expected at least 1"),
    (["--epochs", "0"], "--epochs 0: expected a positive integer"),
])
def test_bad_flags_are_one_line_errors(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exc:
        cli.run(direct.main, direct.get_args_parser(), [*PRE, "--output-dir", str(tmp_path), *flags])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(lines) == 1 and message in lines[0], lines


def test_frozen_bn_is_refused_in_one_line(shapes, tmp_path):
    proc = run_script("direct.py", *PRE, *shapes, "--bn", "frozen", "--output-dir", tmp_path, expect_rc=2)
    assert proc.stderr.strip() == ("error: --bn frozen: Direct pre-trains from random init, so BN must train "
                                   "(--bn bn, or syncbn on several GPUs)")
