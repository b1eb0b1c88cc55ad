"""The GPU set, for a machine with CUDA (one GPU; the 2-process test needs two):

    pytest -m gpu tests            # or, faster on a machine with cores to spare: pytest -m gpu -n 4 tests

`make test` leaves these out (conftest.py skips them without -m gpu, and wherever no CUDA device is visible).
- every training script takes a step on CUDA under --amp bf16 and under --amp fp16 (the GradScaler on), writes
  its checkpoint and model_final.pth, and finetune.py evaluates on CUDA under the same autocast;
- a resume on CUDA continues the run exactly. In fp32 (--amp off) with deterministic kernels: under bf16 each
  loss is rounded to 8 bits of mantissa (~0.4%), more than a lost optimizer or RNG state changes the next two
  losses, so the tolerance bf16 needs would pass a broken resume;
- with 2 GPUs visible, 2 processes (NCCL) take the mean of their ranks' steps (tests/test_distributed.py's
  check, on CUDA).
"""
import json
import math
import os
import subprocess

import pytest
import torch

from common import checkpoint
from conftest import ROOT, iteration_losses, run_script, script_command
from test_distributed import (DETECTION_SCRIPTS, aligndet_inputs,  # noqa: F401 (a fixture)
                              check_two_processes_take_the_mean_of_their_ranks_steps)
from test_faults import FT, SCRIPTS

pytestmark = pytest.mark.gpu
CUDA = ["--device", "cuda"]  # after a flag list's --device cpu: the last one counts


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_a_step_under_mixed_precision_on_cuda(script, amp, shapes, tmp_path):
    out = tmp_path / "run"
    run_script(script, *SCRIPTS[script], *shapes, "--data-cache", tmp_path / "cache", *CUDA, "--amp", amp,
               "--max-iters", 1, "--output-dir", out)
    state = checkpoint.load(str(out / "checkpoint_last.pth"), kind="train_state")
    assert state["iteration"] == 1 and math.isfinite(iteration_losses(out)[1])
    assert bool(state["scaler"]) == (amp == "fp16")  # the GradScaler's state: enabled for fp16 only
    meta = checkpoint.load(str(out / "model_final.pth"), kind="final")["meta"]
    assert meta["device_type"] != "cpu" and meta["iterations"] == 1
    if script == "finetune.py":  # the evaluation after training, on CUDA
        results = json.load(open(out / "results.json"))
        assert results["images"] == 8 and -1 <= results["bbox"]["AP"] <= 1


DETERMINISTIC = """
import os, runpy, sys, torch
torch.use_deterministic_algorithms(True, warn_only=True)
torch.backends.cudnn.benchmark = False
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_deterministic(script, *args):
    command = script_command(script, *args)
    proc = subprocess.run([command[0], "-c", DETERMINISTIC, *command[1:]], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, CUBLAS_WORKSPACE_CONFIG=":4096:8"))
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_a_resume_on_cuda_continues_the_run_exactly(shapes, tmp_path):
    flags = [*FT, *shapes, *CUDA, "--amp", "off", "--no-eval"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_deterministic("finetune.py", *flags, "--max-iters", 4, "--output-dir", full)
    run_deterministic("finetune.py", *flags, "--max-iters", 2, "--output-dir", cut)
    run_deterministic("finetune.py", *flags, "--max-iters", 4, "--output-dir", cut, "--resume", "auto")
    a, b = iteration_losses(full), iteration_losses(cut)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    # torch's deterministic mode makes a resume repeat every kernel but those without a deterministic CUDA
    # version (warn_only: torchvision's roi_align backward adds with atomics, in any order): their sums round
    # differently (~N x 2^-24 of them), which two more steps carry into the loss: rel 1e-5; a resume that lost
    # the optimizer state or a random stream is off by far more
    for it in (3, 4):
        assert b[it] == pytest.approx(a[it], rel=1e-5), (it, a, b)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("script", sorted(DETECTION_SCRIPTS))
def test_two_processes_on_two_gpus_take_the_mean_of_their_ranks_steps(script, shapes, tmp_path, request):
    check_two_processes_take_the_mean_of_their_ranks_steps(script, [*CUDA, "--amp", "off"], shapes, tmp_path,
                                                          request)
