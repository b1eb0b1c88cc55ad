"""montage.py: sample extraction and its cache, montage layout, ERF label weights, the losses on hand-made
logits, exact resume, and the hand-off of the backbone to finetune.py (2-process runs: test_distributed.py)."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.ops import box_iou

import montage
from common.cli import UserError
from common.coco import DataSpec
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
        if row["label"] == 0:  # IoU exactly 0 with every object, crowd and tiny ones included
            assert min(x1 - x0, y1 - y0) >= 32
            box = torch.from_numpy(row["box"][None])
            assert len(every_object) == 0 or box_iou(box, every_object.float()).max() == 0
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


def test_montage_layout(tmp_path):
    S, T, W = montage.S, montage.T, montage.W
    cache = write_cache(str(tmp_path / "c"), [(20, 24, 11, 1, S, 900),      # larger S (by box area): upscaled
                                              (100, 90, 22, 2, S, 50),     # smaller S: downscaled
                                              (80, 20, 33, 3, T, 10),
                                              (16, 70, 44, 0, W, 10)])     # a background W-sample
    montages = montage.MontageSet(cache, 96, 32, flip=0.5)
    for seed in range(4):
        np.random.seed(seed)
        image, labels = montages[0]
        assert image.shape == (3, 96, 96) and image.dtype == torch.uint8
        # small S top-left 32x32, W top-right 32x64, T bottom-left 64x32, large S bottom-right 64x64
        for (y0, x0, y1, x1), colour in zip(montage.region_boxes(96, 32), (22, 44, 33, 11)):
            assert (image[:, y0:y1, x0:x1] == colour).all()  # every pixel from its sample: no padding
        assert labels.tolist() == [2, 0, 3, 1]
    sample = np.arange(10 * 40 * 3, dtype=np.uint8).reshape(10, 40, 3)
    assert montage.fit_to_region(sample, 32, 32, flip=0).shape == (32, 32, 3)  # covered, then cropped
    with pytest.raises(UserError, match="needs 2 S-, 1 T- and 1 W-samples, but extraction found S=2 T=0 W=1"):
        montage.MontageSet(write_cache(str(tmp_path / "d"), [(9, 9, 1, 1, S, 1), (9, 9, 1, 1, S, 1),
                                                             (9, 30, 1, 1, W, 1)]), 96, 32)


def test_erf_label_weights_known_answer():
    """Template 64 split 32 (regions = quadrants, one cell each); an ERF placing 0.5 / 0.3 / 0 / 0.2 of its
    mass in TL / TR / BL / BR for every cell."""
    masks = montage.region_masks(64, 32)  # 4 x 64 x 64
    cells = montage.region_masks(2, 1).argmax(0)  # 2 x 2: [[TL, TR], [BL, BR]]
    assert cells.tolist() == [[0, 1], [2, 3]]
    per_pixel = torch.tensor([0.5, 0.3, 0.0, 0.2]) / (32 * 32)
    erf = torch.einsum("i,iyx->yx", per_pixel, masks).expand(2, 2, 64, 64)  # h x w x H x W
    w = montage.erf_label_weights(erf, masks, cells, tau=0.7)  # 4 x 2 x 2
    # cell TL: own share 0.5 -> 0.7; the 0.3 left split 0.3 : 0 : 0.2 over TR, BL, BR
    assert w[:, 0, 0].tolist() == pytest.approx([0.7, 0.18, 0.0, 0.12], abs=1e-5)
    # cell BR: own share 0.2 -> 0.7; 0.3 split 0.5 : 0.3 : 0 over TL, TR, BL
    assert w[:, 1, 1].tolist() == pytest.approx([0.1875, 0.1125, 0.0, 0.7], abs=1e-5)
    assert torch.allclose(w.sum(0), torch.ones(2, 2))
    w = montage.erf_label_weights(erf, masks, cells, tau=0.4)
    assert w[:, 0, 0].tolist() == pytest.approx([0.5, 0.3, 0.0, 0.2], abs=1e-5)  # share above tau: kept as is
    hard = montage.erf_label_weights(erf, masks, cells, tau=1.0)
    assert torch.equal(hard, F.one_hot(cells, 4).permute(2, 0, 1).float())


def test_erf_of_a_random_resnet_is_local_and_weights_are_valid():
    torch.manual_seed(0)
    model = montage.MontageNet("resnet18", 3)
    erf = montage.effective_receptive_fields(model, torch.randn(2, 3, 96, 96))  # 3 x 3 x 96 x 96
    assert erf.shape == (3, 3, 96, 96) and model.training
    quadrant = erf[0, 0].reshape(2, 48, 2, 48).sum((1, 3))  # mass of each input quadrant for cell (0, 0)
    assert quadrant[0, 0] == quadrant.max() and quadrant[0, 0] > 2 * quadrant[1, 1]  # vs the opposite corner
    masks, cells = montage.region_masks(96, 32), montage.region_masks(3, 1).argmax(0)
    w = montage.erf_label_weights(erf, masks, cells, tau=0.7)
    own = (w * F.one_hot(cells, 4).permute(2, 0, 1)).sum(0)
    assert torch.allclose(w.sum(0), torch.ones(3, 3)) and (own >= 0.7 - 1e-6).all() and (w >= 0).all()


def test_losses_on_hand_made_logits():
    torch.manual_seed(0)
    cells = montage.region_masks(7, 2).argmax(0)  # the 224 / 64 template's 7x7 cells
    logits, labels = torch.randn(3, 6, 7, 7), torch.randint(0, 6, (3, 4))
    hard = F.one_hot(cells, 4).permute(2, 0, 1).float()  # tau = 1
    expected = torch.stack([torch.stack([
        torch.stack([F.cross_entropy(logits[b, :, j, k][None], labels[b, r][None])
                     for j in range(7) for k in range(7) if cells[j, k] == r]).mean()
        for r in range(4)]).mean() for b in range(3)]).mean()
    assert montage.montage_loss(logits, labels, cells, "erf", hard) == pytest.approx(expected.item(), rel=1e-5)
    # soft labels: CE against the label mixture, region by region
    soft_w = torch.rand(4, 7, 7)
    soft_w /= soft_w.sum(0)
    target = torch.einsum("ijk,bic->bcjk", soft_w, F.one_hot(labels, 6).float())
    loss_map = -(target * logits.log_softmax(1)).sum(1)
    expected = torch.stack([loss_map[:, cells == r].mean(1) for r in range(4)], 1).mean()
    assert montage.montage_loss(logits, labels, cells, "erf", soft_w) == pytest.approx(expected.item(), rel=1e-5)
    # block-wise: pooled logits of each region; global: image-pooled logits vs area-weighted labels
    pooled = torch.stack([logits[:, :, cells == r].mean(2) for r in range(4)], 1)  # B x 4 x C
    expected = F.cross_entropy(pooled.reshape(-1, 6), labels.reshape(-1))
    assert montage.montage_loss(logits, labels, cells, "blockwise") == pytest.approx(expected.item(), rel=1e-5)
    mix = torch.einsum("i,bic->bc", torch.tensor([4, 10, 10, 25]) / 49., F.one_hot(labels, 6).float())
    expected = -(mix * logits.mean((2, 3)).log_softmax(1)).sum(1).mean()
    assert montage.montage_loss(logits, labels, cells, "global") == pytest.approx(expected.item(), rel=1e-5)
    for kind in ("erf", "blockwise", "global"):  # uniform logits: log(K + 1) whatever the labels
        loss = montage.montage_loss(torch.zeros(2, 6, 7, 7), labels[:2], cells, kind, soft_w)
        assert loss.item() == pytest.approx(np.log(6), rel=1e-6)


def test_resume_continues_with_identical_losses(shapes, tmp_path):
    """ERF weights recomputed at 0 and 2: the run stopped at 3 resumes with those of iteration 2."""
    cache = ["--data-cache", str(tmp_path / "cache")]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    run_script("montage.py", *TINY_M, *shapes, *cache, "--output-dir", full, env=ONE_THREAD)
    run_script("montage.py", *TINY_M, *shapes, *cache, "--max-iters", "3", "--output-dir", part, env=ONE_THREAD)
    run_script("montage.py", *TINY_M, *shapes, *cache, "--output-dir", part, "--resume", "auto", env=ONE_THREAD)
    a, b = iteration_losses(full), iteration_losses(part)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
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
    (["--montage-tau", "1.5"], "--montage-tau 1.5: expected a value in [0, 1]"),
    (["--backbone", "vgg16"], "--backbone vgg16: unknown backbone"),
])
def test_bad_flags_are_user_errors(flags, message):
    args = montage.get_args_parser().parse_args([*TINY_M, *flags])
    with pytest.raises(UserError) as e:
        montage.check_montage_args(args)
    assert message in str(e.value)


def test_user_error_is_one_line(shapes, tmp_path):
    proc = run_script("montage.py", *TINY_M, *shapes, "--montage-size", "100", "--output-dir", str(tmp_path / "x"),
                      expect_rc=2, env=ONE_THREAD)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --montage-size 100"), proc.stderr
