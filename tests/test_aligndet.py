"""alignDet.py: the contrastive loss against a hand-computed InfoNCE, the EMA update, views that keep box
ids, FCOS assignment and sampling on known inputs, and end to end: frozen backbone, exact resume,
finetune.py --init loading the pre-trained parts (Faster R-CNN; RetinaNet and FCOS), one-line errors."""
import json
import os
import re
import shutil

import pytest
import torch
import torch.nn.functional as F
from torchvision import tv_tensors

import alignDet
from common import checkpoint, cli, proposals
from common.detectors import build_detector
from conftest import TINY, iteration_losses, run_script

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
    """methods.md §1 fact 6, written as loops."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    per_id = []
    for label in sorted(set(q_ids.tolist()) - {0}):
        queries = q[q_ids == label]
        keys = k[k_ids == label] if (k_ids == label).any() else queries
        negatives = torch.cat([q[q_ids != label], k[k_ids != label]])
        pairs = [-torch.log_softmax(torch.cat([(qq @ kk)[None], negatives @ qq]) / t, 0)[0]
                 for qq in queries for kk in keys]
        per_id.append(torch.stack(pairs).mean())
    return torch.stack(per_id).mean()


def test_contrastive_loss_equals_hand_computed_infonce():
    q, k = torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    loss = alignDet.box_contrastive_loss(q, torch.tensor([1]), k, torch.tensor([1, 2]), temperature=0.5)
    assert loss.item() == pytest.approx(torch.log(1 + torch.exp(torch.tensor(-2.0))).item(), abs=1e-6)  # [2, 0]

    torch.manual_seed(0)
    q, k = torch.randn(12, 8, requires_grad=True), torch.randn(9, 8)
    q_ids = torch.tensor([1, 1, 2, 0, 3, 3, 3, 0, 4, 2, 5, 1])  # id 4 and 5: no key (K = Q); 0: background
    k_ids = torch.tensor([1, 2, 2, 3, 0, 0, 1, 6, 3])  # id 6: a key without a query (negative only)
    loss = alignDet.box_contrastive_loss(q, q_ids, k, k_ids, 0.5)
    assert loss.item() == pytest.approx(reference_loss(q.detach(), q_ids, k, k_ids, 0.5).item(), rel=1e-5)
    loss.backward()
    assert q.grad[q_ids > 0].abs().sum() > 0
    ids = torch.arange(1, 13)
    aligned = alignDet.box_contrastive_loss(q.detach(), ids, q.detach().clone(), ids, 0.5)
    unrelated = alignDet.box_contrastive_loss(q.detach(), ids, torch.randn(12, 8), ids, 0.5)
    assert aligned < unrelated
    assert alignDet.box_contrastive_loss(q, torch.zeros(12, dtype=torch.long), k, k_ids, 0.5).item() == 0


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
    assert alignDet.momentum_at(0, 100) == pytest.approx(0.996) and alignDet.momentum_at(100, 100) == 1.0
    assert alignDet.momentum_at(50, 100) == pytest.approx(0.998)


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
    for k, v in final["model"].items():
        if k.startswith("backbone.body."):
            assert torch.equal(v, source[k]), k  # frozen: exactly the image-domain weights
    for prefix in ("backbone.fpn.", "rpn.", "roi_heads.box_head."):
        assert any(not torch.equal(v, at1[k]) for k, v in final["model"].items() if k.startswith(prefix)), prefix
    teacher = checkpoint.load(f"{full}/checkpoint_last.pth")["extra"]["teacher"]
    assert not any(k.startswith("detector.backbone.body.") for k in teacher)

    proc = run_script("finetune.py", "--detector", "fasterrcnn", "--box-head", "2fc", "--init",
                      f"{full}/model_final.pth", "--iters", "2", "--max-iters", "1", "--warmup-iters", "1", "--batch-size", "2", *TINY, *shapes,
                      "--output-dir", str(tmp_path / "ft"))
    report = transfer_report(proc.stdout)
    for part_name in ("backbone", "fpn", "rpn", "box_head"):
        assert report[part_name]["loaded"] > 0 and report[part_name]["missing"] == 0, report
    assert report["box_predictor"]["loaded"] == 0 and report["box_predictor"]["missing"] == 4
    # AlignDet's fine-tuning recipe: BN affine, stem + res2 frozen, lr x1.5 (of 0.02 x 2 / 16) and weight decay x0.5
    for line in ("--bn affine: the recipe's", "--trainable-layers 3: the recipe's", "--weight-decay 5e-05: the recipe's",
                 "--lr 0.00375: 0.0025 (the 1x lr: 0.02 at global batch 16, scaled to 2) x the recipe's multiplier 1.5"):
        assert line in proc.stdout, (line, proc.stdout)
    recipe = json.load(open(tmp_path / "ft" / "results.json"))["finetune"]["recipe"]
    assert recipe["lr"] == pytest.approx(0.00375) and recipe["weight_decay"] == pytest.approx(5e-5)


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
    losses = iteration_losses(out, "loss_contrast")
    assert len(losses) == 1 and all(v > 0 for v in losses.values())
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
