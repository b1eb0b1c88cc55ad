"""User input at every door: bad flags are one-line errors (exit 2, error.txt) in every script, --help shows
the defaults, images that PIL refuses or misreads, non-finite boxes, a proposal file that covers part of the
set, legacy checkpoints, skipped images counted where the results are, a run too slow for a CPU announced at
start-up, the architecture of --init taken from its meta, and the Makefile's checks before anything starts."""
import argparse
import builtins
import json
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import alignDet
import direct
import finetune
import montage
import predet
from common import checkpoint, cli, proposals, results, similarity
from common.coco import BadImageError, CocoDetection, read_rgb
from common.errors import UserError
from conftest import ROOT, TINY


class ChecksPassed(Exception):
    """Raised in place of the first step after the argument checks: the run would have started."""


def _stop(*args, **kwargs):
    raise ChecksPassed


@pytest.fixture(autouse=True)
def restore_process_state(monkeypatch):
    """In-process runs wrap print (dist) and take SIGINT/SIGTERM (engine.Run): undone after each test."""
    monkeypatch.setattr(builtins, "print", builtins.print)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, h in handlers.items():
        signal.signal(s, h)


def run_in_process(module, argv, monkeypatch, capsys, stop_at="resolve_data"):
    """cli.run(module.main) in this process, stopped at ``stop_at`` (a name in ``module``) when the flags pass.
    Returns (exit code, stderr lines)."""
    if stop_at:
        monkeypatch.setattr(module, stop_at, _stop)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.run(module.main, module.get_args_parser(), [str(a) for a in argv])
    return e.value.code, capsys.readouterr().err.strip().splitlines()


# ---- bad flags: one line, exit 2, error.txt; in-process (a subprocess per flag would cost seconds each)
BAD_FLAGS = [
    # the shared flags (common/cli.py check_args), through finetune.py
    (finetune, ["--print-freq", "0"], "--print-freq 0: expected"),
    (finetune, ["--lr", "-1"], "--lr -1: expected a positive"),
    (finetune, ["--lr", "0"], "--lr 0: expected a positive"),          # silently the default before
    (finetune, ["--lr", "nan"], "--lr nan: expected a positive"),
    (finetune, ["--base-lr", "0"], "--base-lr 0: expected a positive"),
    (finetune, ["--iters", "0"], "--iters 0: expected a positive"),    # silently the full schedule before
    (finetune, ["--epochs", "0"], "--epochs 0: expected a positive"),
    (finetune, ["--max-iters", "0"], "--max-iters 0: expected a positive"),
    (finetune, ["--eval-batch-size", "0"], "--eval-batch-size 0: expected a positive"),
    (finetune, ["--batch-size", "0"], "--batch-size 0: expected a positive"),
    (finetune, ["--workers", "-1"], "--workers -1: expected 0 or more"),
    (finetune, ["--warmup-iters", "-1"], "--warmup-iters -1: expected 0 or more"),
    (finetune, ["--ckpt-every", "-1"], "--ckpt-every -1: expected 0 or more"),
    (finetune, ["--keep-ckpts", "-1"], "--keep-ckpts -1: expected 0 or more"),
    (finetune, ["--skip-nonfinite", "-1"], "--skip-nonfinite -1: expected 0 or more"),
    (finetune, ["--clip-grad", "-1"], "--clip-grad -1: expected 0 (off) or a positive"),
    (finetune, ["--dist-timeout", "0"], "--dist-timeout 0: expected a positive"),
    (finetune, ["--weight-decay", "-0.1"], "--weight-decay -0.1: expected 0 or more"),
    (finetune, ["--momentum", "1"], "--momentum 1: expected a value in [0, 1)"),
    (finetune, ["--lr", "inf"], "--lr inf: expected a positive"),
    (finetune, ["--eval-every", "-1"], "--eval-every -1: expected 0 or more"),
    (finetune, ["--mask-head-lr-mult", "0"], "--mask-head-lr-mult 0: expected a positive"),
    (finetune, ["--lr-steps", "0", "11"], "--lr-steps 0 11: expected increasing positive epochs"),
    # each script's own lr / length flags, where `args.lr or default` and `if args.iters:` lived
    (direct, ["--lr", "0"], "--lr 0: expected a positive"),
    (direct, ["--print-freq", "0"], "--print-freq 0: expected"),
    (direct, ["--workers", "-1"], "--workers -1: expected 0 or more"),
    (montage, ["--lr", "0"], "--lr 0: expected a positive"),
    (montage, ["--iters", "0"], "--iters 0: expected a positive"),
    (montage, ["--warmup-factor", "-0.5"], "--warmup-factor -0.5: expected a value in [0, 1]"),
    (predet, ["--lr", "0"], "--lr 0: expected a positive"),
    (predet, ["--iters", "0"], "--iters 0: expected a positive"),
    (predet, ["--epochs", "0"], "--epochs 0: expected a positive"),
    (alignDet, ["--lr", "0"], "--lr 0: expected a positive"),
    (alignDet, ["--iters", "0"], "--iters 0: expected a positive"),
    (alignDet, ["--epochs", "0"], "--epochs 0: expected a positive"),
    (alignDet, ["--align-ema", "1.5"], "--align-ema 1.5: expected a value in [0, 1]"),
    (alignDet, ["--lr-steps", "11", "8"], "--lr-steps 11 8: expected increasing positive epochs"),
]


@pytest.mark.parametrize("module, flags, message", BAD_FLAGS,
                         ids=[f"{m.__name__}{''.join(f)}" for m, f, _ in BAD_FLAGS])
def test_bad_flags_are_one_line_errors(tmp_path, monkeypatch, capsys, module, flags, message):
    out = tmp_path / "run"
    base = ["--init", "scratch"] if module is finetune else []
    code, err = run_in_process(module, [*base, "--device", "cpu", "--output-dir", out, *flags], monkeypatch, capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert message in (out / "error.txt").read_text()


@pytest.mark.parametrize("module", [finetune, direct, montage, predet, alignDet], ids=lambda m: m.__name__)
def test_device_cuda_without_a_gpu_is_one_line(tmp_path, monkeypatch, capsys, module):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    base = ["--init", "scratch"] if module is finetune else []
    code, err = run_in_process(module, [*base, "--device", "cuda", "--output-dir", tmp_path / "run"], monkeypatch,
                               capsys)
    assert code == 2 and err == ["error: --device cuda: no CUDA device is visible here (torch.cuda.is_available() "
                                 "is False); use --device cpu, or auto"], err


def test_valid_flags_pass_the_checks(tmp_path, monkeypatch, capsys):
    """The other side of each threshold: the smallest valid values start the run."""
    flags = ["--init", "scratch", "--device", "cpu", "--output-dir", tmp_path, "--print-freq", "1", "--lr", "1e-6",
             "--iters", "1", "--max-iters", "1", "--eval-batch-size", "1", "--workers", "0", "--warmup-iters", "0",
             "--ckpt-every", "0", "--keep-ckpts", "0", "--clip-grad", "0", "--weight-decay", "0",
             "--momentum", "0", "--eval-every", "0", "--lr-steps", "1", "2"]
    monkeypatch.setattr(finetune, "resolve_data", _stop)
    with pytest.raises(ChecksPassed):
        cli.run(finetune.main, finetune.get_args_parser(), [str(f) for f in flags])
    for module in (direct, montage, predet, alignDet):
        monkeypatch.setattr(module, "resolve_data", _stop)
        with pytest.raises(ChecksPassed):
            cli.run(module.main, module.get_args_parser(), ["--device", "cpu", "--output-dir", str(tmp_path),
                                                            "--lr", "1e-6", "--iters", "1"])


@pytest.mark.parametrize("flags, message", [
    (["--workers", "-1"], "--workers -1: expected 0 or more"),
    (["--ss-max-side", "0"], "--ss-max-side 0: expected a positive"),
    (["--topk", "0"], "--topk 0: expected a positive"),
])
def test_proposal_flags_are_one_line_errors(monkeypatch, capsys, flags, message):
    code, err = run_in_process(proposals, flags, monkeypatch, capsys)
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_a_batch_larger_than_the_set_is_a_one_line_error(shapes, tmp_path, monkeypatch, capsys):
    """22 training images (2 of the 24 have no box), batch 23 on one process: not one batch per epoch (a
    ValueError traceback before)."""
    argv = ["--init", "scratch", "--detector", "fasterrcnn", *TINY, *shapes, "--device", "cpu",
            "--output-dir", tmp_path, "--batch-size", "23"]
    code, err = run_in_process(finetune, argv, monkeypatch, capsys, stop_at="build_detector_from_args")
    assert code == 2 and len(err) == 1 and err[0].startswith("error: --batch-size 23:"), err
    assert "22 items" in err[0]
    with pytest.raises(ChecksPassed):  # 22 fit one batch of 22
        cli.run(finetune.main, finetune.get_args_parser(), [str(a) for a in argv[:-1]] + ["22"])


# ---- --help shows every default
PARSERS = {"finetune": finetune.get_args_parser(), "direct": direct.get_args_parser(),
           "montage": montage.get_args_parser(), "predet": predet.get_args_parser(),
           "alignDet": alignDet.get_args_parser(), "proposals": proposals.get_args_parser(),
           "similarity": similarity.get_args_parser()}


def results_parser():
    """common.results builds its parser inside main: catch it at parse_args."""
    seen = {}

    def capture(self, *a, **k):
        seen["parser"] = self
        raise ChecksPassed
    real = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = capture
    try:
        with pytest.raises(ChecksPassed):
            results.main(["x"])
    finally:
        argparse.ArgumentParser.parse_args = real
    return seen["parser"]


def test_help_shows_every_default():
    """Every flag with a value for a default shows it in --help (ArgumentDefaultsHelpFormatter shows none
    for flags without a help text; None and False defaults say nothing and are left out)."""
    for name, parser in PARSERS.items():
        shown = 0
        for action in parser._actions:
            default = action.default
            if not action.option_strings or default is None or isinstance(default, bool) \
                    or default == argparse.SUPPRESS or default == []:
                continue
            entry = re.sub(r"\s+", " ", parser.formatter_class(prog="x")._format_action(action))
            assert f"(default: {default})" in entry, (name, entry)
            shown += 1
        assert shown >= 3, name
    assert results_parser().formatter_class is PARSERS["finetune"].formatter_class  # its flags default to None/[]
    text = re.sub(r"\s+", " ", PARSERS["finetune"].format_help())
    for expected in ("--batch-size BATCH_SIZE images per GPU (global batch = NGPU x this) (default: 2)",
                     "--workers WORKERS data-loading worker processes per GPU (default: 4)",
                     "--seed SEED (default: 0)", "--momentum MOMENTUM (default: 0.9)"):
        assert expected in text, expected
    assert "(default: None)" not in text and "(default: False)" not in text


# ---- images
def png_header_only(path, width, height):
    """A PNG whose header claims width x height (8-bit RGB), without pixel data: enough for PIL's size checks."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                + chunk(b"IEND", b""))


def one_image_set(tmp_path, file_name, width, height, boxes=((2, 3, 10, 5),)):
    os.makedirs(tmp_path / "images", exist_ok=True)
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({
        "images": [{"id": 1, "file_name": file_name, "width": width, "height": height}],
        "annotations": [{"id": i + 1, "image_id": 1, "category_id": 1, "bbox": list(b), "iscrowd": 0}
                        for i, b in enumerate(boxes)],
        "categories": [{"id": 1, "name": "x"}]}))
    return str(tmp_path / "images"), str(ann)


def test_an_image_over_pils_pixel_limit_is_a_bad_image_naming_the_file(tmp_path):
    img_dir, ann = one_image_set(tmp_path, "huge.png", 30000, 30000)
    png_header_only(os.path.join(img_dir, "huge.png"), 30000, 30000)
    with pytest.raises(BadImageError, match=r"huge.png: .*900000000 pixels.*--skip-bad-images"):
        CocoDetection(img_dir, ann)[0]
    assert CocoDetection(img_dir, ann, skip_bad_images=True)[0] is None
    # common.proposals decodes the same way: one line naming the file, not a DecompressionBombError
    with pytest.raises(UserError, match="huge.png: "):
        proposals.generate(img_dir, ann, str(tmp_path / "p.json"),
                           {"method": "ss", "topk": 5, "nms_iou": 0.5, "ss_max_side": 64, "seed": 0})


def test_16_bit_grayscale_png_is_scaled_to_8_bit(tmp_path):
    """PIL's convert('RGB') clips 16-bit values at 255 (an all-white image); v / 257 is the 8-bit value."""
    values = np.array([[0, 257, 32896, 65535, 1000], [65280, 128, 40000, 514, 12345]], np.uint16)  # 2 x 5
    path = str(tmp_path / "g16.png")
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    rgb = read_rgb(path, (2, 5))
    expected = [[0, 1, 128, 255, 4], [254, 0, 156, 2, 48]]  # round(v / 257) by hand
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 5, 3)
    for c in range(3):
        assert rgb[:, :, c].tolist() == expected


def test_non_finite_boxes_are_dropped_counted_and_kept_out_of_the_evaluation(tmp_path):
    img_dir, ann = one_image_set(tmp_path, "a.png", 40, 30, boxes=[
        (2, 3, 10, 5), (float("nan"), 3, 10, 5), (2, 3, float("inf"), 5), (30, 20, 20, 20)])  # last: clipped
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(os.path.join(img_dir, "a.png"))
    ds = CocoDetection(img_dir, ann)
    assert ds.stats["boxes with non-finite coordinates (dropped)"] == 2
    assert ds.stats["boxes clipped to the image"] == 1  # the clipped one only, not the NaN/inf ones
    assert ds[0][1]["boxes"].tolist() == [[2, 3, 12, 8], [30, 20, 40, 30]]
    gt = ds.coco_gt()
    assert sorted(gt.getAnnIds()) == [1, 4]
    assert all(math.isfinite(v) for a in gt.dataset["annotations"] for v in a["bbox"])


# ---- proposal files: AlignDet refuses one that covers part of the set, as PreDet does
def test_aligndet_refuses_a_proposal_file_covering_part_of_the_set(shapes, tmp_path, monkeypatch, capsys):
    train_ann = shapes[3]
    d = json.load(open(train_ann))
    part = {"images": d["images"][:10], "categories": [{"id": 1, "name": "proposal"}],
            "annotations": [{"id": i + 1, "image_id": im["id"], "bbox": [1, 1, 40, 40], "category_id": 1,
                             "score": 1.0} for i, im in enumerate(d["images"][:10])]}
    path = tmp_path / "part.json"
    path.write_text(json.dumps(part))
    argv = [*shapes, "--device", "cpu", "--output-dir", tmp_path / "run", "--backbone-weights", "scratch",
            "--backbone", "resnet18", "--align-proposals", path, "--workers", "0"]
    code, err = run_in_process(alignDet, argv, monkeypatch, capsys, stop_at="build_box_domain_model")
    assert code == 2 and len(err) == 1, err
    assert str(path) in err[0] and "10 of the 24 images" in err[0] and train_ann in err[0], err
    full = dict(part, images=d["images"])  # every image listed (14 of them without a proposal): accepted
    path.write_text(json.dumps(full))
    with pytest.raises(ChecksPassed):
        cli.run(alignDet.main, alignDet.get_args_parser(), [str(a) for a in argv] + ["--overwrite"])


# ---- checkpoints
@pytest.mark.parametrize("legacy", [True, False], ids=["legacy-format", "zip-format"])
def test_a_checkpoint_in_either_format_loads_and_cut_anywhere_is_one_line(tmp_path, legacy):
    """Cut at any byte, a file is 'not readable' (a cut legacy file raised IndexError, or ended in half a class
    name that weights_only refused as a Python object), never a traceback or a refusal."""
    path = str(tmp_path / "checkpoint.pth")
    obj = {"kind": "final", "model": {"w": torch.arange(6.0).reshape(2, 3)}, "meta": {"method": "direct"}}
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    loaded = checkpoint.load(path, kind="final")
    assert loaded["meta"] == {"method": "direct"} and torch.equal(loaded["model"]["w"], obj["model"]["w"])
    whole = open(path, "rb").read()
    for size in range(len(whole)):
        with open(path, "wb") as f:
            f.write(whole[:size])
        with pytest.raises(UserError, match=f"^{path}: not a readable PyTorch checkpoint \\(truncated or corrupt"):
            checkpoint.load(path)


# ---- the architecture of --init comes from its meta unless given
def resolve(tmp_path, meta, *flags):
    path = str(tmp_path / "model_final.pth")
    checkpoint.save({"kind": "final", "model": {}, "meta": meta}, path)
    args = finetune.get_args_parser().parse_args(["--init", path, *flags])
    finetune.resolve_recipe(args, torch.device("cpu"))
    return args


def test_architecture_of_init_comes_from_its_meta(tmp_path, capsys):
    meta = {"method": "direct", "detector": "fasterrcnn", "backbone": "resnet18", "box_head": "2fc",
            "finetune_recipe": direct.FINETUNE_RECIPE}
    args = resolve(tmp_path, meta)
    assert (args.detector, args.backbone, args.box_head) == ("fasterrcnn", "resnet18", "2fc")
    out = capsys.readouterr().out
    assert "--detector fasterrcnn: the checkpoint's" in out and "--backbone resnet18: the checkpoint's" in out
    args = resolve(tmp_path, meta, "--detector", "retinanet", "--backbone", "resnet50")  # the command line wins
    assert (args.detector, args.backbone, args.box_head) == ("retinanet", "resnet50", "2fc")
    assert "--detector retinanet: given on the command line (the checkpoint's: fasterrcnn)" in capsys.readouterr().out
    args = resolve(tmp_path, {"method": "montage", "backbone": "resnet18"})  # a backbone-only checkpoint
    assert (args.detector, args.backbone, args.box_head) == ("maskrcnn", "resnet18", "4conv1fc")
    # PreDet exports R-CNN keys (its meta: fasterrcnn) for a paper that fine-tunes Mask R-CNN (mask head lr x4)
    args = resolve(tmp_path, {"method": "predet", "detector": "fasterrcnn", "backbone": "resnet18",
                              "box_head": "2fc", "finetune_recipe": predet.FINETUNE_RECIPE})
    assert (args.detector, args.backbone, args.box_head) == ("maskrcnn", "resnet18", "2fc")
    assert args.mask_head_lr_mult == 4.0
    args = finetune.get_args_parser().parse_args(["--init", "scratch"])
    finetune.resolve_recipe(args, torch.device("cpu"))
    assert (args.detector, args.backbone, args.box_head) == ("maskrcnn", "resnet50", "4conv1fc")
    args = finetune.get_args_parser().parse_args(["--init", str(tmp_path / "model_final.pth"), "--detector", "yolo"])
    with pytest.raises(UserError, match="--detector yolo: unknown detector"):  # checked once filled in
        finetune.resolve_recipe(args, torch.device("cpu"))


# ---- a run that takes hours on a CPU says so at start-up
def test_cpu_time_estimate_warns_above_an_hour(capsys):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    # 43 s per image at short side 800 (Mask R-CNN R50-FPN, 2 cores): 2940 iterations x 2 images = 70.2 h
    msg = cli.warn_if_slow_on_cpu(cpu, 2940, 2, "800")
    assert msg and "70 h" in msg and "--backbone resnet18 --preset cpu" in msg and "README" in msg
    assert cli.warn_if_slow_on_cpu(cuda, 2940, 2, "800") is None
    assert cli.warn_if_slow_on_cpu(cpu, 41, 2, "800") is None       # 82 images x 43 s = 0.98 h
    assert cli.warn_if_slow_on_cpu(cpu, 42, 2, "800") is not None   # 84 images: 1.003 h
    # the small preset (short side 128): 43 x (128/800)^2 = 1.1 s per image
    assert cli.warn_if_slow_on_cpu(cpu, 1600, 2, "cpu") is None     # 0.98 h
    msg = cli.warn_if_slow_on_cpu(cpu, 1700, 2, "cpu")              # 1.04 h: fewer iterations help, not the preset
    assert msg and "--iters" in msg and "--preset cpu" not in msg
    assert "warning:" in capsys.readouterr().err


def test_finetune_with_the_docstrings_first_example_warns_at_start_up(shapes, tmp_path, monkeypatch, capsys):
    """`finetune.py --init scratch` on a CPU: the full-size preset, 12 epochs; warned before any iteration."""
    monkeypatch.setattr(finetune, "Run", _stop)
    with pytest.raises(ChecksPassed):
        cli.run(finetune.main, finetune.get_args_parser(),
                ["--init", "scratch", *shapes, "--device", "cpu", "--detector", "fasterrcnn", "--backbone",
                 "resnet18", "--output-dir", str(tmp_path), "--workers", "0"])
    err = capsys.readouterr().err
    assert "warning: on a CPU" in err and "--preset cpu" in err, err


# ---- the docstrings' CPU examples and the help texts
def docstring_example(module, marker):
    """The flags of the docstring's example line(s) ending in ``marker``."""
    text = module.__doc__.replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if marker in ln)
    return line.split(".py", 1)[1].split("#")[0].split()


@pytest.mark.parametrize("module", [direct, alignDet])
def test_cpu_examples_fit_a_two_core_machine(module):
    flags = docstring_example(module, "--device cpu")
    args = module.get_args_parser().parse_args(flags)
    assert args.device == "cpu" and args.workers <= 2, flags


def test_every_script_states_the_warm_up_cap_in_its_help():
    for name in ("finetune", "direct", "montage", "predet", "alignDet"):
        text = re.sub(r"\s+", " ", PARSERS[name].format_help())
        assert "at most 10% of the run's iterations (a short run reaches its lr); a value given is used as it " \
               "is" in text, name


def test_predet_switch_help_reads_as_a_sentence():
    parser = predet.get_args_parser()
    helps = {a.option_strings[0]: a.help for a in parser._actions if a.option_strings
             and a.option_strings[0].startswith("--predet-no-")}
    assert len(helps) == 5
    for flag, text in helps.items():
        assert text.startswith("switch off "), (flag, text)
        assert not re.search(r"boxes off|only off", text), (flag, text)


# ---- skipped bad images are counted in log.txt and in the meta (results.json's "finetune"), not only on stderr
class ImagesWithBadOnes(torch.utils.data.Dataset):
    """10 'images' (a float each); those in ``bad`` come back None, as CocoDetection's with --skip-bad-images."""

    def __init__(self, bad):
        self.bad = bad

    def __len__(self):
        return 10

    def __getitem__(self, i):
        return None if i in self.bad else (torch.tensor([float(i)]), {})


def test_skipped_images_are_counted_in_log_and_meta(tmp_path, capsys):
    from common.engine import Run
    from common.loader import build_train_loader
    args = argparse.Namespace(output_dir=str(tmp_path), keep_ckpts=0, tensorboard=False, resume=None, amp="off",
                              print_freq=1, ckpt_every=0, skip_nonfinite=0, clip_grad=0.0, cudnn_benchmark=None)
    model = torch.nn.Linear(1, 1)
    loader = build_train_loader(ImagesWithBadOnes({3, 7}), 5, 0, 0, torch.device("cpu"),
                                collate_fn=lambda b: b)
    run = Run(args, method="test", device=torch.device("cpu"), iters_per_epoch=2, max_iters=4, samples_per_iter=5)
    run.checkpoints_hold(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.amp.GradScaler("cpu", enabled=False))
    for it, batch in run.batches(loader):
        assert None not in batch and len(batch) == 5  # a bad image is replaced by the next index
        loss = model(torch.stack([x for x, _ in batch])).sum()
        run.log_losses({"loss": loss}, loss, 0.1)
    epochs = [json.loads(line) for line in open(tmp_path / "log.txt") if '"epoch"' in line]
    # every epoch draws all 10 indices once: the two bad ones are skipped twice per epoch, cumulatively
    assert [r["skipped_images"] for r in epochs] == [2, 4]
    assert run.finish({}, {})["skipped_images"] == 4


# ---- Ctrl-C in common.proposals: one line saying how to continue, no traceback
def test_ctrl_c_in_proposals_is_one_line(tmp_path, monkeypatch, capsys):
    from test_proposals import make_set
    data = make_set(str(tmp_path))
    out = str(tmp_path / "p.json")

    def interrupted(job):
        raise KeyboardInterrupt
    monkeypatch.setattr(proposals, "process_shard", interrupted)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.run(proposals.main, proposals.get_args_parser(), ["--method", "random", *data, "--out", out,
                                                              "--workers", "1"])
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if not ln.startswith("proposals (")]  # tqdm
    assert e.value.code == 128 + signal.SIGINT and len(err) == 1, err
    assert "interrupted" in err[0] and "same command" in err[0] and out + ".parts" in err[0]


def test_proposal_workers_ignore_ctrl_c():
    """Ctrl-C signals the whole process group: the pool's workers must not each print a KeyboardInterrupt
    traceback; only the main process stops (above)."""
    # Python's Ctrl-C handler, also where pytest was started with SIGINT ignored (a background job: nohup, &)
    started_with = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with proposals.worker_pool(1) as pool:
            assert pool.apply(signal.getsignal, (signal.SIGINT,)) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # this process still takes Ctrl-C
    finally:
        signal.signal(signal.SIGINT, started_with)


# ---- the Makefile checks DATA and the GPUs before anything starts
def make(*args):
    """make with a virtualenv that cannot be made (PYTHON=false): a check that comes too late fails, installing
    nothing. Run as a top-level make even under `make test` (no inherited MAKELEVEL/MAKEFLAGS, which would make it
    print "Entering directory" lines)."""
    inherited = {"CUDA_VISIBLE_DEVICES", "MAKELEVEL", "MAKEFLAGS", "MFLAGS", "MAKEOVERRIDES"}
    env = {k: v for k, v in os.environ.items() if k not in inherited}
    return subprocess.run(["make", "--no-print-directory", *args, "VENV=/nonexistent-venv", "PYTHON=false"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env=env)


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_makefile_checks_data_and_gpus_up_front(tmp_path):
    for target in ("finetune", "compare", "proposals"):
        proc = make(target, "DATA=/nonexistent")  # the default, data/coco, is not there either
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and "DATA=/nonexistent" in lines[0], (target, proc.stderr)
        assert proc.stdout == "", (target, proc.stdout)  # nothing ran (not even the install)
    gpus = int(subprocess.run("nvidia-smi -L 2>/dev/null | grep -c '^GPU'", shell=True, capture_output=True,
                              text=True).stdout.strip() or 0)
    (tmp_path / "annotations.json").write_text("{}")  # a set is there (the scripts check what it holds)
    for target in ("finetune", "compare"):
        proc = make(target, f"DATA={tmp_path}", f"NGPU={gpus + 1}")
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, (target, proc.stderr)
        assert f"NGPU={gpus + 1}" in lines[0] and f"{gpus} " in lines[0] and proc.stdout == "", lines
    proc = make("-n", "finetune", "DATA=/nonexistent")  # a dry run only shows the plan (tests/test_make.py)
    assert proc.returncode == 0 and "finetune.py" in proc.stdout, proc.stderr
