"""direct.py: the LxL pipeline, the lr recipe, the optimizer and random init that main builds, exact resume, and
the hand-off of the whole detector to finetune.py."""
import contextlib
import inspect
import json
import math
import os
import re

import pytest
import torch
import torchvision
from torch import nn
from torchvision import tv_tensors
from torchvision.ops import FrozenBatchNorm2d

import direct
from common import claims, cli
from common.coco import CocoDetection
from conftest import ROOT, SMALL, TINY, iteration_losses, run_script, write_scene

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


@pytest.mark.parametrize("h, w, boxes", [
    (150, 90, [(10, 20, 40, 60), (50, 100, 80, 140)]),  # tall: 80 x 48 after the resize, 16 rows to crop
    (90, 150, [(20, 10, 60, 40), (100, 50, 140, 80)]),  # wide: the same scene transposed, 16 columns to crop
])
def test_non_square_image_is_scaled_by_its_long_side_cropped_flipped_then_padded_bottom_right(h, w, boxes):
    """L = 64, alpha = 1.25: the long side becomes 80 and the short one 48 (scale 80/150); only the long side is
    cropped (to 64, at a random offset 0..16); the flip mirrors the 64 x 48 crop, not the padded canvas; the
    short side is then padded at the bottom or right with the ImageNet mean colour (124, 116, 104). Each
    sample's boxes must equal those of exactly one (top, left, flip), worked out here from the scene."""
    s, (rh, rw) = 80 / 150, (round(h * 80 / 150), round(w * 80 / 150))
    ch, cw = min(rh, 64), min(rw, 64)
    img, target = scene(h, w, boxes, (RED, BLUE))
    scale, pipeline = direct.ScaleLongSide(64, (1.25, 1.25)), direct.direct_train_transform(64)

    def expected(top, left, flip):
        out = []
        for x0, y0, x1, y1 in boxes:
            x0, x1 = (min(max(x * s - left, 0), cw) for x in (x0, x1))
            y0, y1 = (min(max(y * s - top, 0), ch) for y in (y0, y1))
            out.append([cw - x1, y0, cw - x0, y1] if flip else [x0, y0, x1, y1])
        return out

    candidates = [(top, left, flip) for top in range(rh - ch + 1) for left in range(rw - cw + 1) for flip in (0, 1)]
    assert len(candidates) == 34
    seen = set()
    for seed in range(30):
        torch.manual_seed(seed)
        out, t = pipeline(*scale(img, target))
        check_sample(out, t, 64, (RED, BLUE))
        assert t["labels"].tolist() == [1, 2]  # both boxes survive every crop
        got = t["boxes"].tolist()
        matches = [c for c in candidates if all(g == pytest.approx(e, abs=0.02) for g, e in zip(got, expected(*c)))]
        assert len(matches) == 1, (seed, got)
        seen.add(matches[0])
        pad = torch.ones(64, 64, dtype=torch.bool)
        pad[:ch, :cw] = False
        assert (out.permute(1, 2, 0)[pad] == torch.tensor([124, 116, 104], dtype=torch.uint8)).all()
        assert (out[:, :ch, :cw] != torch.tensor([124, 116, 104], dtype=torch.uint8)[:, None, None]).any(0).all()
    assert len({c[:2] for c in seen}) > 5 and {c[2] for c in seen} == {0, 1}  # random offsets, both flips


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


@pytest.mark.parametrize("box", [(100, 100, 140, 140), (700, 100, 740, 140)])
@pytest.mark.parametrize("tries", [1, 10])
def test_crop_keeps_the_box_checking_rows_against_top_and_columns_against_left(box, tries):
    """A 240 x 1000 image, one red box, crop 64 x 64: most windows miss it, yet every crop shows it. The first box
    lies on the diagonal (its rows = its columns), so a check of the columns against ``top`` would pass windows
    that miss it; the second is far to the right, so a last resort placed on its row centre would miss it."""
    img, target = scene(240, 1000, [box], (RED,))
    crop = direct.CropKeepingBoxes(64, tries)
    for seed in range(20):
        torch.manual_seed(seed)
        out, t = crop(img, target)
        assert tuple(out.shape) == (3, 64, 64)
        red = (out.int() - torch.tensor(RED)[:, None, None]).abs().sum(0) < 30  # 64 x 64
        ys, xs = red.nonzero(as_tuple=True)
        assert len(ys) > 0, f"seed {seed}: the crop lost the box"
        x0, y0, x1, y1 = t["boxes"][0].tolist()
        assert [max(x0, 0), max(y0, 0), min(x1, 64), min(y1, 64)] == \
            [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


@pytest.mark.parametrize("centre, crop, full, lo, hi", [
    (100.5, 64, 1000, 37, 100),  # left <= 100.5 < left + 64
    (100.0, 64, 1000, 37, 100),  # left + 64 > 100 -> left >= 37
    (10.0, 64, 1000, 0, 10),  # the window stays in the image
    (990.0, 64, 1000, 927, 936),
    (30.0, 64, 64, 0, 0),  # the crop is the whole side
])
def test_last_resort_window_holds_the_box_centre_at_every_offset(centre, crop, full, lo, hi):
    """The last resort draws a window [left, left + crop) inside [0, full) holding the box centre: every such
    integer left (worked out by hand), and no other, comes up."""
    torch.manual_seed(0)
    offsets = {direct.CropKeepingBoxes.offset_around(centre, crop, full) for _ in range(2000)}
    assert offsets == set(range(lo, hi + 1))


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


# the keyword of the installed torch's DDP that keeps per-GPU buffers: forward_sync_buffers from torch 2.13 on
DDP_RANK_LOCAL_BUFFERS = next(k for k in ("forward_sync_buffers", "broadcast_buffers")
                              if k in inspect.signature(nn.parallel.DistributedDataParallel).parameters)


class StopBeforeWriting(Exception):
    pass


def capture_main(argv, its, monkeypatch, world=1):
    """Runs direct.main in-process with a stand-in for common.engine.Run: the model and optimizer main builds
    (as it hands them to Run.checkpoints_hold), Run's keyword arguments, the training set the loader reads, and
    the lr main sets at each iteration of ``its(max_iters)``. The detector computes nothing (its forward
    returns no losses); pre-trained weights or a checkpoint read fail. ``world`` > 1: rank 0 of that many processes, DDP's arguments recorded."""
    seen = {"lrs": {}}

    def recording_ddp(module, **kwargs):
        seen["ddp"] = kwargs
        return module

    def no_download(*a, **k):
        raise AssertionError(f"Direct pre-training downloaded weights: {a}")

    def no_checkpoint(*a, **k):
        raise AssertionError(f"Direct pre-training read a checkpoint: {a}")

    class RecordingRun:
        def __init__(self, args, **kwargs):
            seen.update(**kwargs)
            self.amp = None

        def checkpoints_hold(self, model, optimizer, scaler, **extra):
            seen.update(model=model, optimizer=optimizer)
            seen["init"] = {k: v.clone() for k, v in model.state_dict().items()}
            model.forward = lambda images, targets: {}

        def batches(self, loader):
            seen["train_set"] = loader.dataset.dataset  # the loader's SeededDataset wraps it
            for self.it in its(seen["max_iters"]):
                yield self.it, ([], [])

        def autocast(self):
            return contextlib.nullcontext()

        def finite(self, loss, losses):  # reached after set_lr: the lr main set for this iteration
            seen["lrs"][self.it] = seen["optimizer"].param_groups[0]["lr"]
            return False  # the detector computed nothing: no step

        def finish(self, state, meta):
            raise StopBeforeWriting

    monkeypatch.setattr(direct, "Run", RecordingRun)
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch, "load", no_checkpoint)
    monkeypatch.setattr(direct.dist, "get_world_size", lambda: world)
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", recording_ddp)
    with pytest.raises(StopBeforeWriting):
        direct.main(direct.get_args_parser().parse_args([str(a) for a in argv]))
    return seen


@pytest.mark.parametrize("detector, schedule, world, batch, lr, warmup, iters", [
    ("fasterrcnn", "P1x", 1, 2, 0.08 * 2 / 64, 500, 88_000 * 32),
    ("maskrcnn", "P3x", 1, 16, 0.08 * 16 / 64, 500, 3 * 88_000 * 4),
    ("retinanet", "P2x", 2, 2, 0.04 * 4 / 64, 1000, 2 * 88_000 * 16),  # global batch 2 GPUs x 2
    ("fcos", "P4x", 1, 16, 0.04 * 16 / 64, 1000, 4 * 88_000 * 4),
])
def test_main_pretrains_from_random_init_with_the_papers_optimizer_lr_and_length(
        shapes, tmp_path, monkeypatch, detector, schedule, world, batch, lr, warmup, iters):
    """What main builds (the Direct paper sec. 3.2-3.4, 4.1 and the official configs): every parameter of a
    randomly initialised detector in SGD (momentum 0.9) with weight decay 1e-4, except norm layers (BN, FCOS'
    GroupNorm: norm_decay_mult=0); lr 0.08 (R-CNN) / 0.04 (dense) x global batch / 64, warmed up linearly
    from 0.01 x lr over 500 / 1000 iterations, then fixed; P<n>x = n x 88k iterations x 64 / global batch;
    448 x 448 images, alpha in (0.8, 1.2); on several GPUs, per-GPU BN statistics (no buffer sync in DDP)."""
    seen = capture_main([*shapes, "--detector", detector, "--backbone", "resnet18", "--schedule", schedule,
                         "--batch-size", batch, "--workers", 0, "--device", "cpu", "--no-tb",
                         "--output-dir", tmp_path], lambda n: [0, 1, 250, 499, 500, 999, 1000, n - 1], monkeypatch,
                        world)
    model, optimizer = seen["model"], seen["optimizer"]
    assert (seen["max_iters"], seen["samples_per_iter"]) == (iters, batch)  # Run counts samples per rank
    assert seen.get("ddp") == (None if world == 1 else {"device_ids": None, DDP_RANK_LOCAL_BUFFERS: False})
    expected = {it: lr * (0.01 + 0.99 * it / warmup) if it < warmup else lr
                for it in (0, 1, 250, 499, 500, 999, 1000, iters - 1)}
    assert seen["lrs"] == pytest.approx(expected, rel=1e-9)

    # the optimizer: every parameter once, norm layers without weight decay, everything else 1e-4
    assert type(optimizer) is torch.optim.SGD
    decay_of = {}
    for group in optimizer.param_groups:
        assert (group["momentum"], group["dampening"], group["nesterov"], group["lr"]) == (0.9, 0, False, lr)
        for p in group["params"]:
            assert id(p) not in decay_of
            decay_of[id(p)] = group["weight_decay"]
    norm_types, by_kind = (nn.BatchNorm2d, nn.GroupNorm), {0.0: [], 1e-4: []}
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            assert p.requires_grad and id(p) in decay_of, f"{module_name}.{name} is not trained"
            wanted = 0.0 if isinstance(module, norm_types) else 1e-4
            assert decay_of[id(p)] == wanted, (f"{module_name}.{name}", decay_of[id(p)])
            by_kind[wanted].append(f"{module_name}.{name}")
    assert len(decay_of) == len(list(model.parameters()))
    assert {"backbone.body.bn1.weight", "backbone.body.layer4.1.bn2.bias"} <= set(by_kind[0.0])
    assert {"backbone.body.conv1.weight", "backbone.fpn.layer_blocks.0.0.bias"} <= set(by_kind[1e-4])
    if detector == "fcos":  # the head's GroupNorm(32) layers are norm layers too
        assert "head.classification_head.conv.1.weight" in by_kind[0.0]

    # random init: plain BN at its initial state everywhere, the stem conv at torchvision's kaiming-normal
    # (fan_out, ReLU) init: std sqrt(2 / (64 x 7 x 7)); ImageNet weights have neither
    init = seen["init"]
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 20 and not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    for n in bns:
        assert (init[f"{n}.weight"] == 1).all() and (init[f"{n}.bias"] == 0).all(), n
        assert (init[f"{n}.running_mean"] == 0).all() and (init[f"{n}.running_var"] == 1).all(), n
        assert init[f"{n}.num_batches_tracked"] == 0, n
    stem = init["backbone.body.conv1.weight"]
    assert stem.std().item() == pytest.approx(math.sqrt(2 / (64 * 7 * 7)), rel=0.05)
    assert abs(stem.mean().item()) < 0.002

    # the data: the LxL pipeline at L = 448 after the load-time long-side resize with alpha ~ U(0.8, 1.2)
    train_set = seen["train_set"]
    assert type(train_set.resize) is direct.ScaleLongSide
    assert (train_set.resize.size, tuple(train_set.resize.scale_range)) == (448, (0.8, 1.2))
    img, target = train_set[0]
    assert tuple(img.shape) == (3, 448, 448) and ("masks" in target) == (detector == "maskrcnn")


def test_a_short_run_warms_up_over_a_tenth_of_it_unless_told(shapes, tmp_path, monkeypatch, capsys):
    """--iters 30 under the paper's 500-iteration warm-up: 3 iterations (10% of the run), printed; a
    --warmup-iters given is used as it is."""
    lr = 0.08 * 2 / 64
    for flags, warmup in (([], 3), (["--warmup-iters", 20], 20)):
        seen = capture_main([*shapes, "--detector", "fasterrcnn", "--backbone", "resnet18", "--iters", 30,
                             "--batch-size", 2, "--workers", 0, "--device", "cpu", "--no-tb",
                             "--output-dir", tmp_path / str(warmup), *flags], range, monkeypatch)
        assert seen["lrs"] == pytest.approx({it: lr * (0.01 + 0.99 * it / warmup) if it < warmup else lr
                                             for it in range(30)}, rel=1e-9), warmup
        printed = capsys.readouterr().out
        assert ("warm-up: 3 iterations, 10% of the run's 30 (the recipe's 500 is capped there; --warmup-iters N "
                "sets it)" in printed) == (warmup == 3)


def test_the_lr_is_fixed_after_the_warm_up_and_the_meta_counts_the_run(shapes, tmp_path):
    """Direct's fixed lr after a warm-up from 0.01 x lr (its official configs; sec. 3.4: the lr scaled linearly),
    read off the run's log. Its exact resume is tested with every script's in test_faults.py (a kill, a
    preemption, then a resume reproduce the uninterrupted run)."""
    full = str(tmp_path / "full")
    run_script("direct.py", *PRE, *shapes, "--max-iters", "5", "--output-dir", full)
    lrs = iteration_losses(full, "lr")  # the lr of iteration i - 1; global batch 2 -> 0.08 x 2 / 64
    assert lrs[1] == pytest.approx(0.0025 * 0.01) and lrs[2] < 0.0025
    assert [lrs[i] for i in (3, 4, 5)] == pytest.approx([0.0025] * 3)
    meta = torch.load(os.path.join(full, "model_final.pth"), weights_only=True)["meta"]
    assert (meta["method"], meta["iterations"], meta["images_seen"]) == ("direct", 5, 10)
    assert claims.PRETEXT_LOSS["direct"] in meta["losses_last"]  # the learning check reads what the script logs


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
    assert "(method direct, --protocol paper): paper (Direct sec. 3.4, Table 2)" in proc.stdout
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


def test_requirements_declare_exactly_the_tested_torch_range_and_make_installs_a_tested_pair():
    """requirements.txt lists the torch / torchvision pairs the suite passed with ('# tested:' lines); its range
    for each runs from the oldest listed to the newest, and `make install` (the Makefile's TORCH_PKGS) installs
    one of the listed pairs."""
    text = open(os.path.join(ROOT, "requirements.txt")).read()
    version = lambda v: tuple(map(int, v.split(".")))  # noqa: E731
    tested = [dict(re.findall(r"(torch|torchvision)==([\d.]+)", line))
              for line in re.findall(r"^# tested: (.*)$", text, re.M)]
    assert len(tested) >= 2 and all(set(pair) == {"torch", "torchvision"} for pair in tested), tested
    for package in ("torch", "torchvision"):
        declared = re.findall(rf"^{package}>=([\d.]+),<=([\d.]+)\s*$", text, re.M)
        assert declared == [(min((p[package] for p in tested), key=version),
                             max((p[package] for p in tested), key=version))], (package, declared)
    pins = dict(re.findall(r"(torch|torchvision)==([\d.]+)",
                           re.search(r"^TORCH_PKGS \?= (.*)$", open(os.path.join(ROOT, "Makefile")).read(), re.M)[1]))
    assert pins in tested
