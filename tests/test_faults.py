"""The fault matrix: preemption (SIGTERM, to the whole process group as schedulers send it), crashes (SIGKILL),
non-finite losses and failing ranks, for every training script; stop signals during an evaluation or
Montage's ERF pass, on one process and on two ranks; a read-only or full disk, a kill before the first
checkpoint, the means logged after a mid-epoch resume. Each case asserts the exact behaviour the README
promises."""
import builtins
import collections
import contextlib
import datetime
import errno
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import types

import pytest
import torch

from common import checkpoint, cli, coco_eval, dist, engine, train_state
from common.coco_eval import evaluate
from common.errors import UserError
from common.loader import build_eval_loader, build_train_loader
from common.metrics import read_jsonl
from conftest import ROOT, TINY, iteration_losses, run_script, script_command
from test_checkpoint import (own_signal_handlers, run_args, second_run, sgd_step, tiny_run,  # noqa: F401 (a fixture)
                             train)

# the 2fc box head: a third of 4conv1fc's CPU time (4conv1fc runs in test_direct and test_export)
FT = ["--detector", "fasterrcnn", "--box-head", "2fc", "--init", "scratch", "--batch-size", "2", "--iters", "40",
      "--warmup-iters", "5", *TINY]

# script -> flags of a short run on the `shapes` set (each must log every iteration: --print-freq 1)
SCRIPTS = {
    "finetune.py": FT,
    "direct.py": ["--detector", "fasterrcnn", "--backbone", "resnet18", "--direct-size", "96", "--batch-size", "2",
                  "--anchor-scale", "0.5", "--rpn-batch-size", "32", "--roi-batch-size", "32",
                  "--rpn-post-nms-train", "64", "--warmup-iters", "2", "--epochs", "10", "--workers", "0",
                  "--print-freq", "1", "--no-tb", "--device", "cpu"],
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


def _start(script, flags, out, resume=False, workers=0):
    """The script in a process group of its own (as a batch job), with ``workers`` DataLoader processes."""
    cmd = script_command(script, *flags, "--max-iters", ITERS, "--ckpt-every", 2, "--keep-ckpts", 2,
                         "--output-dir", out, "--workers", workers, *(["--resume", "auto"] if resume else []))
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)


def _stop_group(proc, sig=signal.SIGTERM):
    """What SLURM, Kubernetes and `timeout` do: the signal to every process of the job, workers included."""
    os.killpg(proc.pid, sig)
    _, err = proc.communicate(timeout=120)
    return err


def _logged_since(out, resumes):
    """The last iteration log.txt holds after its ``resumes``-th "resumed" record (0: from its start)."""
    seen, last = 0, 0
    for rec in read_jsonl(os.path.join(out, "log.txt")):
        seen += "resumed" in rec
        if seen >= resumes and "loss" in rec and "epoch" not in rec:
            last = max(last, rec["iteration"])
    return last


def _wait_for_iteration(proc, out, iteration, resumes=0, timeout=300):
    """Until ``proc`` logs ``iteration``; a resumed run (``resumes`` > 0) counts only what it logged itself, not
    the records a killed predecessor left past the checkpoint (which the resume drops once it has started)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"exited early ({proc.returncode}): {proc.communicate()[1][-3000:]}")
        try:
            if _logged_since(out, resumes) >= iteration:
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

    # resume with a DataLoader worker (a flag that leaves the run as it was), then SIGTERM to the process group
    # (preemption): the worker leaves it to the main process, which checkpoints at the next iteration boundary
    proc = _start(script, flags, cut, resume=True, workers=1)
    _wait_for_iteration(proc, cut, 4, resumes=1)
    err = _stop_group(proc)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "stopped by SIGTERM at iteration" in err and "--resume auto" in err
    stopped_at = checkpoint.load(os.path.join(cut, "checkpoint_last.pth"), kind="train_state")["iteration"]
    assert 4 <= stopped_at < ITERS

    if script == "finetune.py":  # a SIGTERM during the evaluation after training: the weights are kept
        proc = _start(script, flags, cut, resume=True, workers=1)
        final = os.path.join(cut, "model_final.pth")
        while not os.path.exists(final) and proc.poll() is None:
            time.sleep(0.01)
        err = _stop_group(proc)
        assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
        assert f"the trained weights are in {final}" in err and "--resume auto" in err, err[-3000:]
        assert not os.path.exists(os.path.join(cut, "results.json"))
    # the run's lr and warm-up, given or the script's (lr scaled to the batch), are in its checkpoints; given
    # again to the resume, they are no change
    used = checkpoint.load(os.path.join(cut, "checkpoint_last.pth"), kind="train_state")["args"]
    assert isinstance(used["lr"], float) and isinstance(used["warmup_iters"], int), used
    run_script(script, *flags, "--max-iters", ITERS, "--output-dir", cut, "--resume", "auto", "--lr", repr(used["lr"]),
               "--warmup-iters", used["warmup_iters"])
    a, b = iteration_losses(full), iteration_losses(cut)
    assert sorted(a) == sorted(b) == list(range(1, ITERS + 1))
    # a resume is the same computation (the checkpoint's exact weights, optimizer state and random streams, the
    # same kernels in the same order): bit-identical, seen through log.txt's 6 decimals (rel 1e-5: ten of its
    # last decimal; a lost optimizer state or random stream moves a loss by far more)
    for it in a:
        assert b[it] == pytest.approx(a[it], rel=1e-5), (it, a, b)
    # the meta counts the run across its three processes as the uninterrupted one counts it
    meta_full, meta_cut = (checkpoint.load(os.path.join(d, "model_final.pth"))["meta"] for d in (full, cut))
    assert meta_cut["iterations"] == meta_full["iterations"] == ITERS
    assert meta_cut["images_seen"] == meta_full["images_seen"] > 0
    assert not [name for name in os.listdir(cut) if name.startswith(".tmp-")]
    # one log record per iteration although iterations were redone; args.json: the run as it was started
    with open(os.path.join(cut, "log.txt")) as f:
        records = [json.loads(line) for line in f]
    per_iteration = collections.Counter(r["iteration"] for r in records if "loss" in r and "epoch" not in r)
    assert per_iteration == {it: 1 for it in range(1, ITERS + 1)}
    resumes = [r["resumed"] for r in records if "resumed" in r]  # the SIGKILLed attempt had no worker
    assert resumes[0]["changed"]["workers"] == [0, 1] and resumes[0]["iteration"] >= 2
    with open(os.path.join(cut, "args.json")) as f:
        assert json.load(f)["workers"] == 0
    if script == "finetune.py":  # the re-run evaluated the trained weights: no iteration redone, one evaluation
        assert os.path.exists(os.path.join(cut, "results.json"))
        assert len([r for r in records if "test_bbox_AP" in r]) == 1


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


# ---- stop signals inside the DataLoader workers, an evaluation and Montage's ERF pass ----

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


class BlankImages(torch.utils.data.Dataset):
    """n blank 16 x 24 images, each with one 8 x 8 box of category 7 at (2, 2)."""
    cat_ids = [7]

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.zeros(3, 16, 24, dtype=torch.uint8), {"image_id": i + 1, "orig_size": (16, 24)}

    def coco_gt(self):
        from pycocotools.coco import COCO
        gt = COCO()
        gt.dataset = {"images": [{"id": i + 1, "width": 24, "height": 16} for i in range(self.n)],
                      "annotations": [{"id": i + 1, "image_id": i + 1, "category_id": 7, "bbox": [2, 2, 8, 8],
                                       "area": 64, "iscrowd": 0} for i in range(self.n)],
                      "categories": [{"id": 7, "name": "box"}]}
        with contextlib.redirect_stdout(io.StringIO()):
            gt.createIndex()
        return gt


class BoxFinder(torch.nn.Module):
    """A detector that finds every image's box; counts its calls and signals its own process (SIGTERM) at
    the ``signal_at``-th."""

    def __init__(self, signal_at=None):
        super().__init__()
        self.calls, self.signal_at = 0, signal_at

    def forward(self, images):
        self.calls += 1
        if self.calls == self.signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return [{"boxes": torch.tensor([[2.0, 2.0, 10.0, 10.0]]), "scores": torch.tensor([0.9]),
                 "labels": torch.tensor([1])} for _ in images]


@pytest.mark.parametrize("phase", ["training", "after training", "eval-only"])
def test_a_stop_signal_ends_an_evaluation_at_the_next_batch(phase, tmp_path, capsys, own_signal_handlers):
    cpu = torch.device("cpu")
    run, _ = tiny_run(run_args(tmp_path / "run", eval_only=phase == "eval-only"), max_iters=2)
    if phase == "after training":
        run.finish(run.model.state_dict(), {})
    loader = build_eval_loader(BlankImages(6), 1, 0, cpu)
    assert evaluate(BoxFinder(), loader, cpu, run=run)["bbox"]["AP"] == 1.0  # no signal: the whole evaluation
    model = BoxFinder(signal_at=2)
    with pytest.raises(engine.Stopped) as stop:
        evaluate(model, loader, cpu, run=run)
    assert stop.value.code == 128 + signal.SIGTERM and model.calls == 2  # not 6
    err = capsys.readouterr().err
    if phase == "training":  # an --eval-every evaluation: the run checkpoints and continues later
        assert "stopped by SIGTERM at iteration 0: wrote" in err
        assert checkpoint.load(str(tmp_path / "run" / "checkpoint_last.pth"))["iteration"] == 0
    elif phase == "after training":
        final = tmp_path / "run" / "model_final.pth"
        assert f"the trained weights are in {final}" in err and "--resume auto" in err
        assert not os.path.exists(tmp_path / "run" / "checkpoint_last.pth")  # nothing more to checkpoint
    else:
        assert "stopped by SIGTERM during the evaluation (--eval-only)" in err
        assert not os.path.exists(tmp_path / "run" / "checkpoint_last.pth")


def test_a_stop_signal_ends_rank_0s_cocoeval_at_once(tmp_path, monkeypatch, own_signal_handlers):
    """COCOeval runs for minutes on a large set, and no stop point reaches into it."""
    def endless_cocoeval(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)

    monkeypatch.setattr(coco_eval, "coco_evaluate", endless_cocoeval)
    run, _ = tiny_run(run_args(tmp_path / "run", eval_only=True))
    t0 = time.time()
    with pytest.raises(engine.Stopped):
        evaluate(BoxFinder(), build_eval_loader(BlankImages(3), 1, 0, torch.device("cpu")), torch.device("cpu"),
                 run=run)
    assert time.time() - t0 < 10


class CountingStops:
    """A Run's stop points, counted; the ``stop_at``-th raises Stopped as an agreed stop would."""

    def __init__(self, stop_at=None):
        self.calls, self.stop_at = 0, stop_at

    def stop_point(self):
        self.calls += 1
        if self.calls == self.stop_at:
            raise engine.Stopped(128 + signal.SIGTERM)


def test_the_erf_pass_reaches_a_stop_point_before_every_position():
    import montage
    torch.manual_seed(0)
    model = montage.MontageNet("resnet18", 3)
    images = torch.randn(2, 3, 64, 96)  # 2 x 3 output positions
    stops = CountingStops()
    erf = montage.effective_receptive_fields(model, images, stops)
    assert stops.calls == 6
    assert torch.equal(erf, montage.effective_receptive_fields(model, images))  # the stop points change nothing
    with pytest.raises(engine.Stopped):
        montage.effective_receptive_fields(model, images, CountingStops(stop_at=2))


class SignalRank1At:
    """Rank 1 gets a SIGTERM (its own, as if the scheduler reached it first) just before its ``call``-th stop
    point; every call goes on to the Run's real stop point."""

    def __init__(self, run, call):
        self.run, self.call, self.calls = run, call, 0

    def stop_point(self):
        self.calls += 1
        if self.calls == self.call and dist.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        self.run.stop_point()


def _two_ranks(rank, tmp):
    """One rank of the two of test_stops_inside_evaluations_and_erf_passes_are_agreed_by_every_rank."""
    import montage
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=2,
                                         timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    cpu, outcome = torch.device("cpu"), {}
    loader = build_eval_loader(BlankImages(5), 1, 0, cpu)  # rank 0: 3 batches, rank 1: 2
    torch.manual_seed(0)
    net, images = montage.MontageNet("resnet18", 3), torch.randn(1, 3, 96, 96)  # 9 positions: rank 0 5, rank 1 4
    cases = {"eval: rank 1 in a batch both have": lambda run: evaluate(BoxFinder(1 if rank == 1 else None), loader,
                                                                        cpu, run=run),
             "eval: rank 0 in its last batch": lambda run: evaluate(BoxFinder(3 if rank == 0 else None), loader,
                                                                     cpu, run=run),
             "erf: rank 1": lambda run: montage.effective_receptive_fields(net, images, SignalRank1At(run, 3)),
             "erf: no signal": lambda run: montage.effective_receptive_fields(net, images, run)}
    for name, case in cases.items():
        run, _ = tiny_run(run_args(f"{tmp}/{len(outcome)}"), max_iters=2)
        try:
            case(run)
            outcome[name] = "finished"
        except engine.Stopped as stop:
            outcome[name] = f"stopped {stop.code}"
        torch.distributed.barrier()
    with open(f"{tmp}/rank{rank}.json", "w") as f:
        json.dump(outcome, f)


def test_stops_inside_evaluations_and_erf_passes_are_agreed_by_every_rank(tmp_path):
    """Shards of unequal length (5 images, 9 ERF positions over 2 ranks) and a signal seen by one rank only:
    both ranks stop at the same point and leave the collectives the same way, within the test's time."""
    # forked: the ranks start with this process' modules imported (spawned, each would import them again)
    context = torch.multiprocessing.start_processes(_two_ranks, args=(str(tmp_path),), nprocs=2, join=False,
                                                    start_method="fork")
    deadline = time.time() + 240
    while not context.join(timeout=5):
        if time.time() > deadline:
            for proc in context.processes:
                proc.kill()
            raise AssertionError("the ranks hang")
    outcomes = [json.load(open(tmp_path / f"rank{rank}.json")) for rank in (0, 1)]
    expected = {"eval: rank 1 in a batch both have": "stopped 143", "eval: rank 0 in its last batch": "stopped 143",
                "erf: rank 1": "stopped 143", "erf: no signal": "finished"}
    assert outcomes == [expected, expected]
    for case in range(3):  # each stop checkpointed once, by rank 0, with both ranks' random states
        assert len(checkpoint.load(str(tmp_path / str(case) / "checkpoint_last.pth"))["rng"]) == 2


# ---- the disk: read-only, full ----

def test_a_read_only_output_directory_is_one_line(tmp_path, monkeypatch, capsys):
    """As root (CI) a chmod stops nothing: here every open() of a file in the directory fails as on a read-only
    mount. The run stops at its first write with one line, exit 2; a user error later, whose error.txt cannot
    be written either, is still one line."""
    out = tmp_path / "run"
    out.mkdir()
    real_open = builtins.open

    def read_only(path, *args, **kwargs):
        if str(path).startswith(str(out)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, *args, **kwargs)

    def late_error(args):
        raise UserError("a user error after the directory was checked")

    monkeypatch.setattr(builtins, "open", read_only)
    for start, line in ((lambda: second_run(out),  # prepare_output_dir: a script's first write there
                         f"error: --output-dir {out}: cannot write there (Read-only file system); expected a "
                         "directory this run can write to"),
                        (lambda: cli.run(late_error, cli.base_parser(), ["--output-dir", str(out)]),
                         "error: a user error after the directory was checked")):
        with pytest.raises(SystemExit) as stop:
            start()
        assert stop.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [line]
    monkeypatch.undo()
    assert os.listdir(out) == []


class FullDisk:
    """A file on a disk with ``free`` bytes left: a write past them fails with ENOSPC, as write(2) does."""

    def __init__(self, f, free):
        self.f, self.free = f, free

    def write(self, data):
        if len(data) > self.free:  # what fits is written, as write(2) does before ENOSPC
            self.f.write(data[:self.free])
            self.free = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.free -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch,
                                                                                 own_signal_handlers):
    out = tmp_path / "run"
    run, loader = tiny_run(run_args(out), max_iters=6)
    train(run, loader)  # checkpoint_last.pth at iteration 6
    before = (out / "checkpoint_last.pth").read_bytes()
    state = io.BytesIO()
    torch.save(train_state.state(run), state)
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode), free=1000))
    with pytest.raises(UserError) as full:
        train_state.save(run)
    monkeypatch.undo()
    needed = f"{len(state.getvalue()) / 1024:.1f} KiB"
    assert re.fullmatch(re.escape(f"{out}: no space left on the device: checkpoint_last.pth needs {needed} (the state "
                                  "being written), ") + r"[\d.]+ [KMG]iB free there; " + re.escape(
        "the previous checkpoint_last.pth is intact: free space there and run the same command with --resume auto"),
        str(full.value)), full.value
    assert (out / "checkpoint_last.pth").read_bytes() == before and not [
        name for name in os.listdir(out) if name.startswith(".tmp-")]


def test_a_full_disk_while_logging_is_one_line_and_the_resumed_run_logs_each_iteration_once(tmp_path, monkeypatch,
                                                                                          capsys, own_signal_handlers):
    """The disk fills after the checkpoint at iteration 4: iteration 5's log record is cut mid-line. The run stops
    with one line naming log.txt (exit 2); resumed, its log and losses are the uninterrupted run's."""
    train(*tiny_run(run_args(tmp_path / "full", ckpt_every=4), max_iters=8))
    out = tmp_path / "run"
    real_open = builtins.open

    def filling_disk(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        full = str(path) == str(out / "log.txt") and os.path.exists(out / "checkpoint_last.pth")
        return FullDisk(f, free=10) if full else f

    capsys.readouterr()
    monkeypatch.setattr(builtins, "open", filling_disk)
    parsed = types.SimpleNamespace(parse_args=lambda argv: run_args(out, ckpt_every=4))  # cli.run's parser
    with pytest.raises(SystemExit) as stop:
        cli.run(lambda args: train(*tiny_run(args, max_iters=8)), parsed, [])
    monkeypatch.undo()
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("test: ")]  # tqdm's
    assert stop.value.code == 2 and len(err) == 1, err
    assert re.fullmatch(re.escape(f"error: {out / 'log.txt'}: No space left on device while writing it, ") + r"[\d.]+ "
                        + re.escape("MiB free there; the checkpoints written before are intact: free space there (or "
                                    "make it writable) and run the same command with --resume auto"), err[0]), err[0]
    assert max(r.get("iteration", 0) for r in read_jsonl(str(out / "log.txt"))) == 4
    train(*tiny_run(run_args(out, ckpt_every=4, resume="auto"), max_iters=8))
    losses = [{k: r[k] for k in ("iteration", "loss")} for r in read_jsonl(str(out / "log.txt")) if "loss" in r]
    assert losses == [{k: r[k] for k in ("iteration", "loss")} for r in read_jsonl(str(tmp_path / "full" / "log.txt"))
                      if "loss" in r] and [r["iteration"] for r in losses] == list(range(1, 9))


@pytest.mark.parametrize("resume", ["auto", None])
def test_a_kill_before_the_first_checkpoint_leaves_one_log_record_per_iteration(tmp_path, resume, own_signal_handlers):
    """Killed after logging iterations 1-4, before its first checkpoint (--ckpt-every 1000: at its last
    iteration): the run starts again at 0, with --resume auto or without, and its log has each iteration once."""
    out = tmp_path / "run"
    run, loader = tiny_run(run_args(out), max_iters=8)
    for it, x in run.batches(loader):
        if it == 4:
            break
        sgd_step(run, (run.model(x) ** 2).mean())
    assert not os.path.exists(out / "checkpoint_last.pth") and len(read_jsonl(str(out / "log.txt"))) == 4
    train(*tiny_run(run_args(out, resume=resume), max_iters=8))
    iterations = [r["iteration"] for r in read_jsonl(str(out / "log.txt")) if "loss" in r]
    assert iterations == [1, 2, 3, 4, 5, 6, 7, 8]


def test_the_means_logged_after_a_mid_epoch_resume_are_the_uninterrupted_runs(tmp_path, capsys, own_signal_handlers):
    """Stopped at iteration 3 of a 6-iteration epoch, logging every 4: the resumed run's epoch record (train_*
    means over iterations 1-6) and its record of iterations 1-4 hold the sums from before the stop."""
    train(*tiny_run(run_args(tmp_path / "full", print_freq=4)))
    run, loader = tiny_run(run_args(tmp_path / "cut", print_freq=4))
    with pytest.raises(engine.Stopped):
        train(run, loader, signal_in_iteration=3)
    train(*tiny_run(run_args(tmp_path / "cut", print_freq=4, resume="auto")))
    full, cut = (read_jsonl(str(tmp_path / name / "log.txt")) for name in ("full", "cut"))
    means = [{k: v for k, v in r.items() if k.startswith("train_")} for r in full if "epoch" in r]
    assert [r["iteration"] for r in full if "epoch" in r] == [6, 8] and all(means)
    assert [{k: v for k, v in r.items() if k.startswith("train_")} for r in cut if "epoch" in r] == means
    logged = [r["loss"] for r in full if "loss" in r and "epoch" not in r]
    assert [r["loss"] for r in cut if "loss" in r and "epoch" not in r] == logged and len(logged) == 2
