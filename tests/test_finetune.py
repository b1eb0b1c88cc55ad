"""finetune.py end to end: one-line errors, and that it learns (exact resume after SIGKILL and SIGTERM:
test_faults.py; 2-process gloo runs and evaluation shards: test_distributed.py)."""
import json

import pytest
import torch

import alignDet
import direct
import finetune
import montage
import predet
from common import checkpoint
from common.detectors import build_detector
from common.optim import param_groups, set_lr
from conftest import TINY, run_script

# the 2fc box head: a third of 4conv1fc's CPU time (4conv1fc runs in test_direct and test_export)
FT = ["--detector", "fasterrcnn", "--box-head", "2fc", "--init", "scratch", "--batch-size", "2", "--iters", "40",
      "--warmup-iters", "5", *TINY]


@pytest.mark.parametrize("flags, message", [
    (["--detector", "yolo"], "--detector yolo: unknown detector (expected one of fasterrcnn"),
    (["--backbone", "vgg16"], "--backbone vgg16: unknown backbone"),
    (["--train-images", "/nonexistent", "--train-ann", "x.json"], "--train-images /nonexistent: no such file"),
    (["--init", "/nonexistent.pth"], "/nonexistent.pth: no such checkpoint file"),
    (["--bn", "syncbn"], "--bn syncbn needs several GPU processes"),
    (["--amp", "fp16", "--device", "cpu"], "--amp fp16 needs a CUDA device"),
])
def test_user_errors_are_one_line(shapes, tmp_path, flags, message):
    proc = run_script("finetune.py", *FT, *shapes, "--output-dir", str(tmp_path / "x"), *flags, expect_rc=2)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr


def test_checkpoint_of_another_architecture_is_refused(shapes, tmp_path):
    src = str(tmp_path / "src")
    run_script("finetune.py", *FT, *shapes, "--max-iters", "1", "--output-dir", src)
    proc = run_script("finetune.py", *FT, *shapes, "--output-dir", str(tmp_path / "dst"), "--max-iters", "1",
                      "--detector", "retinanet", "--init", f"{src}/model_final.pth", expect_rc=2)
    assert "does not fit this model" in proc.stderr and "--init-partial" in proc.stderr
    assert "transfer report" in proc.stdout
    proc = run_script("finetune.py", *FT, *shapes, "--output-dir", str(tmp_path / "dst2"), "--max-iters", "1",
                      "--init", f"{src}/checkpoint_last.pth", expect_rc=2)
    assert "training-state checkpoint" in proc.stderr
    proc = run_script("finetune.py", *FT, *shapes, "--output-dir", src, "--max-iters", "1", expect_rc=2)
    assert "already holds a run; add --resume auto" in proc.stderr


def test_finetune_learns(shapes, tmp_path):
    """50 steps on the 24 training images lift AP50 on them far above the untrained model's."""
    train_only = shapes[:4]  # evaluated on the training set: a short schedule must fit it
    flags = [*FT, *train_only, "--batch-size", "4", "--iters", "50", "--warmup-iters", "10", "--lr", "0.02",
             "--clip-grad", "10", "--print-freq", "10"]
    run_script("finetune.py", *flags, "--output-dir", str(tmp_path / "untrained"), "--eval-only")
    run_script("finetune.py", *flags, "--output-dir", str(tmp_path / "trained"))
    before = json.load(open(tmp_path / "untrained" / "results.json"))["bbox"]["AP50"]
    after = json.load(open(tmp_path / "trained" / "results.json"))["bbox"]["AP50"]
    assert after > 0.15 and after > 10 * before, (before, after)


# ---- the fine-tuning recipe: from the checkpoint's meta, flags win, printed as applied
def recipe_of(tmp_path, capsys, meta, *flags):
    """resolve_recipe on a model_final.pth holding only ``meta``: (args, lr, printed lines)."""
    path = str(tmp_path / "model_final.pth")
    checkpoint.save({"kind": "final", "model": {}, "meta": meta}, path)
    args = finetune.get_args_parser().parse_args(["--init", path, "--batch-size", "4", *flags])
    _, _, _, lr = finetune.resolve_recipe(args, torch.device("cpu"))
    return args, lr, capsys.readouterr().out


def test_each_papers_recipe_is_applied_and_printed(tmp_path, capsys):
    # AlignDet (official configs): BN statistics fixed, affine trained, stem + res2 frozen, lr x1.5, wd x0.5
    args, lr, out = recipe_of(tmp_path, capsys, {"method": "aligndet", "finetune_recipe": alignDet.FINETUNE_RECIPE},
                              "--detector", "fasterrcnn")
    assert (args.bn, args.trainable_layers, args.preset) == ("affine", 3, "800")
    assert lr == pytest.approx(1.5 * 0.02 * 4 / 16) and args.weight_decay == pytest.approx(0.5e-4)
    assert "--lr 0.0075: 0.005 (the 1x lr: 0.02 at global batch 16, scaled to 4) x the recipe's multiplier 1.5" in out
    # PreDet sec. 4.2: nothing frozen, BN trains (one process: plain BN), mask head at 4x the lr, {640..800}
    args, lr, out = recipe_of(tmp_path, capsys, {"method": "predet", "finetune_recipe": predet.FINETUNE_RECIPE})
    assert (args.bn, args.trainable_layers, args.preset, args.mask_head_lr_mult) == ("bn", 5, "multiscale", 4.0)
    assert lr == pytest.approx(0.005) and args.weight_decay == pytest.approx(1e-4)
    # Direct (Table 2, 'Fixed') and Montage (sec. 4.5): BN frozen at the pre-trained statistics
    for module in (direct, montage):
        args, lr, out = recipe_of(tmp_path, capsys, {"method": "x", "finetune_recipe": module.FINETUNE_RECIPE})
        assert (args.bn, args.trainable_layers, args.mask_head_lr_mult) == ("frozen", 3, 1.0), module
        assert lr == pytest.approx(0.005), module
    # a checkpoint without a recipe, and scratch
    args, lr, out = recipe_of(tmp_path, capsys, {"method": "finetune"})
    assert (args.bn, args.trainable_layers) == ("frozen", 3) and "no recipe in the checkpoint's meta" in out
    args = finetune.get_args_parser().parse_args(["--init", "scratch"])
    finetune.resolve_recipe(args, torch.device("cpu"))
    assert (args.bn, args.trainable_layers) == ("bn", 5)


def test_flags_on_the_command_line_win_and_common_protocol_ignores_the_recipe(tmp_path, capsys):
    meta = {"method": "aligndet", "finetune_recipe": alignDet.FINETUNE_RECIPE}
    args, lr, out = recipe_of(tmp_path, capsys, meta, "--detector", "fasterrcnn", "--lr", "0.02", "--bn", "frozen")
    assert lr == 0.02 and args.bn == "frozen" and args.weight_decay == pytest.approx(0.5e-4)
    assert "--lr 0.02: given on the command line (the recipe's multiplier x1.5 not applied)" in out
    assert "--bn frozen: given on the command line (the recipe's: affine)" in out
    args, lr, out = recipe_of(tmp_path, capsys, meta, "--detector", "fasterrcnn", "--base-lr", "0.02")
    assert lr == pytest.approx(0.03) and "--lr 0.03: 0.02 (--base-lr) x the recipe's multiplier 1.5" in out
    args, lr, out = recipe_of(tmp_path, capsys, meta, "--detector", "fasterrcnn", "--protocol", "common")
    assert (args.bn, args.trainable_layers) == ("frozen", 3) and lr == pytest.approx(0.005)
    assert args.weight_decay == pytest.approx(1e-4) and "(--protocol common)" in out


def test_mask_head_lr_multiplier_reaches_the_optimizer():
    model = build_detector("maskrcnn", 3, "resnet18", norm="bn", trainable_layers=5)
    mults = {"roi_heads.mask_head.": 4.0, "roi_heads.mask_predictor.": 4.0}
    groups = param_groups(model, 1e-4, lr_mults=mults)
    optimizer = torch.optim.SGD(groups, lr=0.1)
    set_lr(optimizer, 0.01)
    mask = {id(p) for n, p in model.named_parameters() if n.startswith(("roi_heads.mask_head.", "roi_heads.mask_pred"))}
    for group in optimizer.param_groups:
        in_mask = {id(p) in mask for p in group["params"]}
        assert len(in_mask) == 1  # a group holds mask-head parameters only, or none
        assert group["lr"] == pytest.approx(0.04 if in_mask == {True} else 0.01)
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())


def test_results_json_is_written_whole_or_not_at_all(tmp_path):
    """A write that fails half-way (here a stat json cannot encode, after the others were written) leaves the
    previous results.json as it was and no temporary file: the file was truncated and half-written in place,
    which make then took for a finished stage."""
    args = finetune.get_args_parser().parse_args(["--init", "scratch", "--output-dir", str(tmp_path)])
    path = tmp_path / "results.json"
    path.write_text('{"previous": true}')
    stats = {"bbox": {"AP": 0.25, "AP50": 0.5}, "images": 8, "seconds": 1.0, "later": object()}
    with pytest.raises(TypeError):
        finetune.write_results(args, stats, {}, {"method": "finetune"})
    assert path.read_text() == '{"previous": true}' and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    finetune.write_results(args, {k: v for k, v in stats.items() if k != "later"}, {}, {"method": "finetune"})
    assert json.loads(path.read_text())["bbox"] == {"AP": 0.25, "AP50": 0.5}
