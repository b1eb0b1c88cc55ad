"""finetune.py end to end: 2-process gloo, one-line errors, and that it learns (exact resume after SIGKILL and
SIGTERM: test_faults.py)."""
import json
import os

import pytest

from conftest import TINY, run_script

FT = ["--detector", "fasterrcnn", "--init", "scratch", "--batch-size", "2", "--iters", "40",
      "--warmup-iters", "5", *TINY]


def test_two_process_gloo_run_trains_and_evaluates(shapes, tmp_path):
    out = str(tmp_path / "ddp")
    proc = run_script("torch.distributed.run", "--standalone", "--nproc_per_node=2", "finetune.py", *FT,
                      *shapes, "--max-iters", "3", "--output-dir", out, "--device", "cpu",
                      env={"OMP_NUM_THREADS": "1"})
    res = json.load(open(os.path.join(out, "results.json")))
    assert res["finetune"]["world_size"] == 2 and res["finetune"]["images_seen"] == 3 * 2 * 2
    assert res["images"] == 8  # every val image evaluated exactly once over the two ranks
    assert proc.stdout.count("bbox: AP") == 1  # only rank 0 prints


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
