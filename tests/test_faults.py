"""The fault matrix: preemption (SIGTERM), crashes (SIGKILL), non-finite losses and failing ranks, for every
training script. Each case asserts the exact behaviour the README promises."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from common import checkpoint
from common.loader import build_eval_loader, build_train_loader
from conftest import ROOT, TINY, iteration_losses, run_script

FT = ["--detector", "fasterrcnn", "--init", "scratch", "--batch-size", "2", "--iters", "40",
      "--warmup-iters", "5", *TINY]

# script -> flags of a short run on the `shapes` set (each must log every iteration: --print-freq 1)
SCRIPTS = {
    "finetune.py": FT,
    "direct.py": ["--detector", "fasterrcnn", "--backbone", "resnet18", "--direct-size", "96", "--batch-size", "2",
                  "--anchor-scale", "0.5", "--rpn-batch-size", "32", "--roi-batch-size", "32",
                  "--rpn-post-nms-train", "64", "--warmup-iters", "2", "--epochs", "10", "--workers", "0",
                  "--print-freq", "1", "--no-tb"],
    "montage.py": ["--backbone", "resnet18", "--montage-size", "64", "--montage-split", "32", "--batch-size", "4",
                   "--iters", "20", "--warmup-iters", "2", "--montage-erf-every", "3", "--montage-erf-batch", "2",
                   "--workers", "0", "--print-freq", "1", "--no-tb", "--device", "cpu"],
    "predet.py": ["--backbone", "resnet18", "--preset", "cpu", "--anchor-scale", "0.5", "--predet-dim", "32",
                  "--predet-num-queries", "4", "--predet-post-nms", "32", "--predet-neg", "16", "--predet-pre-nms",
                  "200", "--batch-size", "2", "--iters", "20", "--warmup-iters", "1", "--workers", "0",
                  "--print-freq", "1", "--no-tb", "--device", "cpu"],
    "alignDet.py": ["--detector", "fasterrcnn", "--backbone-weights", "scratch", "--align-proposal-method", "random",
                    "--batch-size", "2", "--iters", "20", "--warmup-iters", "2", "--align-dense-samples", "256",
                    "--box-head", "2fc", "--device", "cpu", *TINY],
}
ITERS = 6


def _start(script, flags, out, resume=False):
    cmd = [sys.executable, script, *map(str, flags), "--max-iters", str(ITERS), "--ckpt-every", "2", "--keep-ckpts", "2",
           "--output-dir", out, *(["--resume", "auto"] if resume else [])]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))


def _wait_for_iteration(proc, out, iteration, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"exited early ({proc.returncode}): {proc.communicate()[1][-3000:]}")
        try:
            if max(iteration_losses(out), default=0) >= iteration:
                return
        except (OSError, json.JSONDecodeError):
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"iteration {iteration} not reached in {timeout} s")


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_kill_and_preemption_then_resume_reproduce_the_uninterrupted_run(script, shapes, tmp_path):
    flags = [*SCRIPTS[script], *shapes, "--data-cache", tmp_path / "cache"]
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    run_script(script, *flags, "--max-iters", ITERS, "--output-dir", full)

    # SIGKILL at an arbitrary point after the first periodic checkpoint: nothing half-written is left
    proc = _start(script, flags, cut)
    _wait_for_iteration(proc, cut, 3)
    proc.kill()
    proc.wait()
    for name in os.listdir(cut):  # a kill during a save leaves at most a .tmp-*.pth, removed on resume
        if name.endswith(".pth") and not name.startswith(".tmp-"):
            assert checkpoint.load(os.path.join(cut, name), kind="train_state")["iteration"] >= 2, name

    # resume, then SIGTERM (preemption): a checkpoint at the next iteration boundary and a clear message
    proc = _start(script, flags, cut, resume=True)
    _wait_for_iteration(proc, cut, 4)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "stopped by SIGTERM at iteration" in err and "--resume auto" in err
    stopped_at = checkpoint.load(os.path.join(cut, "checkpoint_last.pth"), kind="train_state")["iteration"]
    assert 4 <= stopped_at < ITERS

    run_script(script, *flags, "--max-iters", ITERS, "--output-dir", cut, "--resume", "auto")
    a, b = iteration_losses(full), iteration_losses(cut)
    assert sorted(a) == sorted(b) == list(range(1, ITERS + 1))
    for it in a:
        assert b[it] == pytest.approx(a[it], rel=1e-5), (it, a, b)
    assert os.path.exists(os.path.join(cut, "model_final.pth"))
    assert not [name for name in os.listdir(cut) if name.startswith(".tmp-")]


def test_nonfinite_loss_stops_with_a_debug_checkpoint_or_is_skipped(shapes, tmp_path):
    flags = [*FT, *shapes, "--lr", "1e12", "--warmup-iters", "0", "--max-iters", "6"]
    proc = run_script("finetune.py", *flags, "--output-dir", str(tmp_path / "stop"), expect_rc=2)
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: non-finite loss at iteration ") and "loss_objectness=" in line
    assert "lr 1e+12" in line and "--skip-nonfinite" in line
    debug = [f for f in os.listdir(tmp_path / "stop") if f.startswith("checkpoint_debug_")]
    assert len(debug) == 1 and checkpoint.load(str(tmp_path / "stop" / debug[0]), kind="train_state")

    proc = run_script("finetune.py", *flags, "--skip-nonfinite", "6", "--output-dir", str(tmp_path / "skip"))
    with open(tmp_path / "skip" / "log.txt") as f:
        epochs = [json.loads(line) for line in f if '"epoch"' in line]
    assert epochs[-1]["skipped_steps"] >= 1 and "step skipped" in proc.stdout


def test_a_failing_rank_stops_every_rank(shapes, tmp_path):
    """Rank-local failure (a corrupt image read by one rank) ends the 2-process run promptly, named."""
    import shutil
    data = tmp_path / "data"
    shutil.copytree(shapes[1], data / "train")
    broken = sorted(os.listdir(data / "train"))[:3]
    for name in broken:
        with open(data / "train" / name, "wb") as f:
            f.write(b"\xff\xd8 not a jpeg")
    t0 = time.time()
    proc = run_script("torch.distributed.run", "--standalone", "--nproc_per_node=2", "finetune.py", *FT,
                      "--train-images", data / "train", *shapes[2:], "--max-iters", "20", "--dist-timeout", "60",
                      "--output-dir", tmp_path / "out", "--device", "cpu", expect_rc=None,
                      env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0 and time.time() - t0 < 120
    assert any(name in proc.stderr for name in broken), proc.stderr[-3000:]


# ---- stop signals inside the DataLoader workers ----

class SlowItems(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        time.sleep(0.05)
        return i


@pytest.mark.parametrize("build", ["train", "eval"])
def test_dataloader_workers_leave_stop_signals_to_the_main_process(build):
    """A scheduler signals every process of the job: the workers go on, the main process decides."""
    cpu = torch.device("cpu")
    loader = build_train_loader(SlowItems(), 1, 2, 0, cpu, collate_fn=lambda b: b[0]) if build == "train" else \
        build_eval_loader(SlowItems(), 1, 2, cpu, collate_fn=lambda b: b[0])
    items = iter(loader)
    first = next(items)
    workers = [str(worker.pid) for worker in items._workers]
    for sig in ("TERM", "INT"):  # from another process: the main process' own SIGTERM ends a worker
        subprocess.run(["kill", "-s", sig, *workers], check=True)
    assert sorted([first, *items]) == list(range(8))


CRASH_WITH_WORKERS = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from common.loader import build_train_loader
items = iter(build_train_loader(list(range(64)), 1, 2, 0, torch.device("cpu"), collate_fn=lambda b: b[0]))
next(items)
raise RuntimeError("a crash, its traceback holding the loader")
"""


def test_a_crash_with_live_workers_still_exits():
    """At exit, multiprocessing ends the workers still alive with SIGTERM and waits for them: a worker that
    ignored every SIGTERM would hang the crashed run forever."""
    proc = subprocess.run([sys.executable, "-c", CRASH_WITH_WORKERS, ROOT], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and "a crash, its traceback holding the loader" in proc.stderr
