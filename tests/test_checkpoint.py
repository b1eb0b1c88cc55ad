"""The checkpoint contract: atomic writes, weights_only loads, kinds, and the per-part transfer report; the run
directory: one run at a time, resumed only with the flags it was started with, one log record per iteration."""
import argparse
import fcntl
import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch

from common import checkpoint, cli, engine, rundir
from common import loader as data_loader
from common.detectors import build_detector
from common.errors import UserError
from common.metrics import read_jsonl
from common.optim import set_lr


def tiny(name="fasterrcnn", k=5, backbone="resnet18", norm="bn"):
    return build_detector(name, k, backbone, norm, "4conv1fc", trainable_layers=5)


def write_final(path, model, **meta):
    checkpoint.save({"kind": "final", "model": checkpoint.final_state(model, **meta.pop("select", {})),
                     "meta": meta}, str(path))
    return str(path)


def test_atomic_save_keeps_the_previous_file_on_a_crash(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint_last.pth")
    checkpoint.save({"kind": "train_state", "iteration": 1}, path)

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # e.g. a signal in the middle of the write

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save({"kind": "train_state", "iteration": 2}, path)
    monkeypatch.undo()
    assert checkpoint.load(path)["iteration"] == 1
    assert os.listdir(tmp_path) == ["checkpoint_last.pth"]


def test_periodic_checkpoints_keep_the_newest_and_latest_skips_corrupt(tmp_path, capsys):
    ck = checkpoint.Checkpointer(str(tmp_path), keep=2)
    for it in (10, 20, 30):
        ck.save({"kind": "train_state", "iteration": it}, periodic=True)
    assert [os.path.basename(p) for p in ck.periodic()] == ["checkpoint_00000020.pth", "checkpoint_00000030.pth"]
    assert checkpoint.load(ck.periodic()[0])["iteration"] == 20  # the hard link kept iteration 20's content
    newest = ck.periodic()[-1]
    for corrupt in (ck.last, newest):  # new files (not the shared inode) that got corrupted
        os.remove(corrupt)
        open(corrupt, "wb").write(b"garbage")
    capsys.readouterr()
    assert ck.latest() == ck.periodic()[0]  # the previous kept one, each unreadable one named with it
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 2 and all(w.startswith("warning: ") and w.endswith(
        f"; resuming from {ck.periodic()[0]} (iteration 20) instead") for w in warnings), warnings
    assert {ck.last, newest} == {w.split(": ")[1] for w in warnings}

    os.remove(ck.periodic()[0])
    open(os.path.join(tmp_path, "checkpoint_00000020.pth"), "wb").write(b"garbage")
    with pytest.raises(UserError) as none_readable:  # never a silent start at iteration 0
        ck.latest()
    message = str(none_readable.value)
    assert "\n" not in message and message.startswith(f"no readable checkpoint in {tmp_path} to resume from: ")
    assert all(name in message for name in (ck.last, newest, "checkpoint_00000020.pth", "--overwrite")), message


def test_malicious_checkpoint_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = str(tmp_path / "evil.pth")
    torch.save({"kind": "final", "model": {}, "meta": Evil()}, path)
    with pytest.raises(UserError, match="refused: the file holds Python objects"):
        checkpoint.load(path)
    assert not marker.exists()


def test_a_cpu_run_never_starts_cuda_for_its_random_states(monkeypatch):
    """On a GPU machine a CPU run (or a rank forked from a process that used CUDA, where CUDA cannot start)
    records and restores no CUDA generator; a CUDA run records its own device's."""
    def no_cuda(*args):
        raise RuntimeError("Cannot re-initialize CUDA in forked subprocess")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", no_cuda)
    monkeypatch.setattr(torch.cuda, "set_rng_state", no_cuda)
    state = checkpoint.rng_state(torch.device("cpu"))
    assert "cuda" not in state
    checkpoint.set_rng_state({**state, "cuda": torch.zeros(16, dtype=torch.uint8)}, torch.device("cpu"))
    seen = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: seen.append(device) or torch.ones(3))
    assert torch.equal(checkpoint.rng_state(torch.device("cuda", 1))["cuda"], torch.ones(3))
    assert seen == [torch.device("cuda", 1)]


def test_kinds_are_explained(tmp_path):
    state = str(tmp_path / "checkpoint_last.pth")
    checkpoint.save({"kind": "train_state", "iteration": 3}, state)
    with pytest.raises(UserError, match="training-state checkpoint .* --init expects the model_final.pth"):
        checkpoint.load(state, kind="final")
    final = str(tmp_path / "model_final.pth")
    checkpoint.save({"kind": "final", "model": {}, "meta": {}}, final)
    with pytest.raises(UserError, match="is a model_final.pth .* --resume expects a checkpoint_last.pth"):
        checkpoint.load(final, kind="train_state")
    open(tmp_path / "junk.pth", "wb").write(b"\x00" * 100)
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint"):
        checkpoint.load(str(tmp_path / "junk.pth"))


def test_full_transfer_reports_every_part_loaded(tmp_path):
    src = tiny("maskrcnn")
    path = write_final(tmp_path / "m.pth", src, method="direct", detector="maskrcnn", backbone="resnet18")
    dst = tiny("maskrcnn", norm="frozen")  # BN statistics + affine go into FrozenBatchNorm2d
    report, meta = checkpoint.load_pretrained(dst, path)
    assert meta["method"] == "direct"
    for part in ("backbone", "fpn", "rpn", "box_head", "box_predictor", "mask_head", "mask_predictor"):
        assert report[part]["loaded"] > 0 and report[part]["missing"] == 0, part
    src_bn = src.backbone.body.bn1
    assert torch.equal(dst.backbone.body.bn1.running_var, src_bn.running_var)
    assert torch.equal(dst.backbone.body.bn1.weight, src_bn.weight.detach())


def test_partial_and_mismatched_checkpoints(tmp_path, capsys):
    src = tiny("fasterrcnn", k=5)
    path = write_final(tmp_path / "f.pth", src, method="direct", num_classes=5)
    other_classes = tiny("fasterrcnn", k=3)
    with pytest.raises(UserError, match="does not fit this model .*num_classes=5.*--init-partial"):
        checkpoint.load_pretrained(other_classes, path)
    report, _ = checkpoint.load_pretrained(other_classes, path, allow_partial=True)
    assert report["box_predictor"]["shape_mismatch"] == 4 and report["box_predictor"]["loaded"] == 0
    assert report["box_head"]["loaded"] > 0
    assert torch.equal(other_classes.roi_heads.box_head[0][0].weight, src.roi_heads.box_head[0][0].weight)
    assert "shape_mismatch" in capsys.readouterr().out

    backbone_only = write_final(tmp_path / "b.pth", src, method="montage", select={"keep": {"backbone"}})
    fresh = tiny("fasterrcnn", k=3)
    report, _ = checkpoint.load_pretrained(fresh, backbone_only)  # no refusal: nothing mismatches
    assert report["backbone"]["missing"] == 0 and report["fpn"]["loaded"] == 0 and report["fpn"]["missing"] > 0

    report, _ = checkpoint.load_pretrained(tiny("fasterrcnn", k=5), path, parts={"backbone", "fpn"})
    assert report["rpn"]["not_requested"] > 0 and report["rpn"]["loaded"] == 0

    with pytest.raises(UserError, match="does not fit"):  # another backbone: unknown keys, shapes differ
        checkpoint.load_pretrained(build_detector("fasterrcnn", 5, "resnet50", "bn"), path)

    nothing = str(tmp_path / "n.pth")
    checkpoint.save({"kind": "final", "model": {"foo.weight": torch.zeros(1)}, "meta": {}}, nothing)
    with pytest.raises(UserError, match="no key of the checkpoint matches this model"):
        checkpoint.load_pretrained(tiny(), nothing)


def test_a_crash_is_left_in_error_txt_with_its_traceback_still_raised(tmp_path):
    """Not only user errors: whatever ends a run early is recorded where the results table reads it."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--output-dir")
    out = tmp_path / "run"

    def crash(args):
        raise OSError("[Errno 39] Directory not empty: 'data/.shapes-x' -> 'data/shapes'")
    with pytest.raises(OSError):
        cli.run(crash, parser, ["--output-dir", str(out)])
    assert (out / "error.txt").read_text() == ("OSError: [Errno 39] Directory not empty: 'data/.shapes-x' -> "
                                               "'data/shapes' (a crash: see its traceback)\n")


def test_checkpoints_follow_the_umask(tmp_path):
    """A results folder shared by a group: a checkpoint gets the mode every other file of the run gets
    (0666 minus the umask), not mkstemp's fixed 0600."""
    for umask, mode in ((0o002, 0o664), (0o027, 0o640), (0o077, 0o600)):
        old = os.umask(umask)
        try:
            path = tmp_path / f"checkpoint_{umask:o}.pth"
            checkpoint.save({"kind": "final", "model": {}, "meta": {}}, str(path))
        finally:
            os.umask(old)
        assert stat.S_IMODE(os.stat(path).st_mode) == mode, (oct(umask), oct(os.stat(path).st_mode))


# ---- the run directory: one run at a time, resumed only as the run it was ----

FIRST_RUN = """
import fcntl, json, os, sys, time
out = sys.argv[1]
os.makedirs(out)
lock = open(os.path.join(out, ".lock"), "a+")  # what a run's rank 0 holds for its life (common.rundir)
fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
lock.write(f"pid {os.getpid()} on this host\\n")
lock.flush()
json.dump({"who": "first"}, open(os.path.join(out, "args.json"), "w"))
open(os.path.join(out, "checkpoint_last.pth"), "wb").close()  # it got as far as a checkpoint
print("started", flush=True)
time.sleep(300)
"""


def second_run(out, *flags):
    """prepare_output_dir as a script's main() calls it, through cli.run (user errors -> exit 2, error.txt)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--output-dir")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--resume", default=None)
    parser.add_argument("--who", default="second")
    cli.run(lambda args: rundir.prepare_output_dir(args, None), parser, ["--output-dir", str(out), *flags])


def test_a_second_run_into_a_live_run_directory_is_refused_and_a_killed_run_leaves_no_lock(tmp_path, capsys):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-c", FIRST_RUN, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "started"
        for flags in ((), ("--resume", "auto"), ("--overwrite",)):
            with pytest.raises(SystemExit) as stop:
                second_run(out, *flags)
            assert stop.value.code == 2, flags
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith("error: "), err
            assert "in use by another run" in err[0] and f"pid {first.pid}" in err[0], err[0]
            # nothing of the first run is touched: its record, its checkpoint, and no error.txt of ours in it
            assert json.load(open(out / "args.json")) == {"who": "first"}
            assert sorted(os.listdir(out)) == [".lock", "args.json", "checkpoint_last.pth"], flags
    finally:
        first.kill()  # SIGKILL: no exit handler runs; the kernel drops the lock with the process
        first.wait()
    second_run(out, "--overwrite")
    assert json.load(open(out / "args.json"))["who"] == "second"
    assert sorted(os.listdir(out)) == [".lock", "args.json"]
    with open(out / ".lock") as other, pytest.raises(BlockingIOError):  # the second run holds it now
        fcntl.flock(other, fcntl.LOCK_SH | fcntl.LOCK_NB)


class Points(torch.utils.data.Dataset):
    """12 random 3-vectors, each drawn under its sample's seed (common.loader.SeededDataset)."""

    def __len__(self):
        return 12

    def __getitem__(self, i):
        return torch.randn(3) + i


def run_args(out, **changes):
    """The flags of a run as a script parses them (the shared ones + a few of a script's own)."""
    args = cli.base_parser().parse_args(["--output-dir", str(out), "--no-tb", "--amp", "off", "--device", "cpu",
                                         "--workers", "0", "--print-freq", "1"])
    args.batch_size, args.lr, args.backbone, args.eval_every, args.eval_batch_size = 2, 0.1, "resnet18", 0, 2
    for flag, value in changes.items():
        setattr(args, flag, value)
    return args


def tiny_run(args, max_iters=8, width=3):
    """A Run over a 2-parameter-tensor model, 6 iterations per epoch, as a script builds it (resumed when
    ``args.resume``)."""
    rundir.prepare_output_dir(args, None)
    torch.manual_seed(0)
    model = torch.nn.Linear(width, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    loader = data_loader.build_train_loader(Points(), args.batch_size, 0, args.seed, torch.device("cpu"),
                                            collate_fn=torch.utils.data.default_collate)
    run = engine.Run(args, method="test", device=torch.device("cpu"), max_iters=max_iters,
                     iters_per_epoch=loader.batch_sampler.batches_per_epoch, samples_per_iter=args.batch_size)
    run.checkpoints_hold(model, optimizer, torch.amp.GradScaler("cpu", enabled=False))
    if args.resume:
        run.resume()
    return run, loader


def sgd_step(run, loss, lr=0.0):
    """The optimisation step of a script's loop (no AMP, no clipping)."""
    if run.finite(loss, {"loss": loss}):
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        run.log_losses({"loss": loss}, loss, lr)


def train(run, loader, signal_in_iteration=None):
    """The loop of a script; a SIGTERM comes in the middle of iteration ``signal_in_iteration`` (as in
    Montage's ERF pass), where the script reaches a stop point. Returns {iteration: loss}."""
    losses = {}
    for it, x in run.batches(loader):
        if it == signal_in_iteration:
            os.kill(os.getpid(), signal.SIGTERM)
            run.stop_point()
        noise = torch.randn(3)  # the global RNG, as dropout or a sampler draws from it: resumed exactly
        lr = set_lr(run.optimizer, run.args.lr)
        loss = ((run.model(x + noise) - 1) ** 2).mean()
        sgd_step(run, loss, lr)
        losses[it] = loss.item()
    return losses


@pytest.fixture
def own_signal_handlers():
    """Run installs SIGTERM/SIGINT handlers: give pytest its own back afterwards."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def log_records(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.txt"))]


def test_a_stop_point_inside_an_iteration_checkpoints_it_and_the_resumed_run_is_exact(tmp_path, capsys,
                                                                                        own_signal_handlers):
    full = train(*tiny_run(run_args(tmp_path / "full")))
    run, loader = tiny_run(run_args(tmp_path / "cut"))
    with pytest.raises(engine.Stopped) as stop:
        train(run, loader, signal_in_iteration=3)
    assert stop.value.code == 128 + signal.SIGTERM
    assert "stopped by SIGTERM at iteration 3" in capsys.readouterr().err
    assert checkpoint.load(str(tmp_path / "cut" / "checkpoint_last.pth"))["iteration"] == 3  # 0, 1, 2 done
    resumed = train(*tiny_run(run_args(tmp_path / "cut", resume="auto")))
    assert sorted(resumed) == [3, 4, 5, 6, 7]
    assert [resumed[it] for it in resumed] == [full[it] for it in resumed]  # bit-identical


def test_checkpoints_come_every_ckpt_every_iterations_and_at_the_last_not_at_epoch_ends(tmp_path,
                                                                                        own_signal_handlers):
    """Epochs of 6 iterations, --ckpt-every 4: checkpoints at 4, 8, 12 and the last iteration, 14. A run killed
    in iteration 7 (after the epoch end at 6) resumes from 4 and reproduces the uninterrupted run."""
    def recording_saves(run):
        saved, save = [], run.ckpt.save
        run.ckpt.save = lambda state, periodic=False: (saved.append((state["iteration"], periodic)),
                                                       save(state, periodic))
        return saved

    full = train(*tiny_run(run_args(tmp_path / "full"), max_iters=14))
    run, loader = tiny_run(run_args(tmp_path / "cut", ckpt_every=4), max_iters=14)
    saved = recording_saves(run)
    for it, x in run.batches(loader):
        if it == 7:
            break
        sgd_step(run, ((run.model(x + torch.randn(3)) - 1) ** 2).mean(), run.args.lr)
    assert saved == [(4, True)]
    run, loader = tiny_run(run_args(tmp_path / "cut", resume="auto", ckpt_every=4), max_iters=14)
    saved = recording_saves(run)
    resumed = train(run, loader)
    assert sorted(resumed) == list(range(4, 14)) and [resumed[it] for it in resumed] == [full[it] for it in resumed]
    assert saved == [(8, True), (12, True), (14, False)]


def test_a_run_reads_the_epochs_left_in_one_loader_pass_with_the_batches_of_one_pass_per_epoch(
        tmp_path, monkeypatch, own_signal_handlers):
    """One DataLoader pass over several epochs keeps the workers loading across epoch ends; its batches are those
    of a pass per epoch, from a mid-epoch position on (a resume)."""
    sampler = data_loader.TrainBatchSampler(13, 2, seed=5)  # 6 batches per epoch

    def epoch(e, skip=0):
        sampler.set_epoch(e, skip)
        return list(sampler)

    expected = epoch(1, 4) + epoch(2) + epoch(3)
    sampler.set_epoch(1, 4, epochs=3)
    assert len(sampler) == len(expected) == 14 and list(sampler) == expected
    run, loader = tiny_run(run_args(tmp_path), max_iters=14)  # epochs of 6 iterations
    passes, pass_over = [], type(loader).__iter__
    monkeypatch.setattr(type(loader), "__iter__", lambda self: passes.append(len(self)) or pass_over(self))
    assert sorted(train(run, loader)) == list(range(14)) and passes == [18]  # 3 epochs, the last one cut at 14


def test_resume_refuses_flags_that_change_the_run_and_records_harmless_ones(tmp_path, capsys, own_signal_handlers):
    out = tmp_path / "run"
    train(*tiny_run(run_args(out), max_iters=4))
    original = json.load(open(out / "args.json"))
    records = log_records(out)
    for changes, named in (({"batch_size": 4}, ["--batch-size 2 -> 4"]),  # the iteration position means other data
                           ({"lr": 0.2, "seed": 1}, ["--lr 0.1 -> 0.2", "--seed 0 -> 1"]),
                           ({"eval_every": 1}, ["--eval-every 0 -> 1"]),  # evaluating draws from the global RNG
                           ({"eval_batch_size": 1}, ["--eval-batch-size 2 -> 1"]),  # padding changes detections
                           ({"backbone": "resnet50"}, ["--backbone resnet18 -> resnet50"])):
        with pytest.raises(UserError) as refused:
            tiny_run(run_args(out, resume="auto", **changes), max_iters=8)
        message = str(refused.value)
        assert "\n" not in message and all(n in message for n in named), message
        assert "--workers" not in message and "--resume" not in message
        assert json.load(open(out / "args.json")) == original and log_records(out) == records

    capsys.readouterr()
    changes = {"workers": 2, "print_freq": 5, "ckpt_every": 7, "keep_ckpts": 1, "tensorboard": False,
               "dist_timeout": 60, "max_iters": 6, "skip_bad_images": True}
    run, _ = tiny_run(run_args(out, resume="auto", **changes), max_iters=6)
    assert run.start_iter == 4
    printed = capsys.readouterr().out
    assert "--workers 0 -> 2" in printed and "--print-freq 1 -> 5" in printed
    assert json.load(open(out / "args.json")) == original  # the record of what the run was
    resume = log_records(out)[-1]["resumed"]
    assert resume["iteration"] == 4 and resume["changed"]["workers"] == [0, 2]
    assert set(resume["changed"]) == {"workers", "print_freq", "ckpt_every", "keep_ckpts", "dist_timeout",
                                      "max_iters", "skip_bad_images"}


def test_a_checkpoint_from_before_the_scripts_recorded_their_lr_still_resumes(tmp_path, own_signal_handlers):
    """Such a checkpoint holds lr and warm-up None (the script's defaults then): not compared, whatever the
    script resolves them to now; any other flag still is."""
    out = tmp_path / "run"
    train(*tiny_run(run_args(out, warmup_iters=None), max_iters=4))
    path = str(out / "checkpoint_last.pth")
    state = checkpoint.load(path)
    state["args"]["lr"] = None
    checkpoint.save(state, path)
    run, _ = tiny_run(run_args(out, resume="auto", warmup_iters=3), max_iters=6)
    assert run.start_iter == 4
    with pytest.raises(UserError, match="--seed 0 -> 1"):
        tiny_run(run_args(out, resume="auto", seed=1), max_iters=6)


def test_resuming_a_checkpoint_of_another_shape_is_one_line(tmp_path, own_signal_handlers):
    out = tmp_path / "run"
    train(*tiny_run(run_args(out), max_iters=2))
    with pytest.raises(UserError) as refused:  # same flags (e.g. --eval-only skips the comparison), other model
        tiny_run(run_args(out, resume="auto", eval_only=True), width=5)
    assert "\n" not in str(refused.value) and "does not fit" in str(refused.value), refused.value


def test_resume_keeps_one_log_record_per_iteration(tmp_path, own_signal_handlers):
    """A kill after the checkpoint of iteration 4 and the log lines of 5 and 6: the resumed run redoes 5, 6."""
    out = tmp_path / "run"
    run, loader = tiny_run(run_args(out, ckpt_every=3), max_iters=8)
    for it, x in run.batches(loader):
        if it == 5:  # iterations 0..4 done and logged, the last checkpoint at 3
            break
        sgd_step(run, (run.model(x) ** 2).mean())
    with open(out / "log.txt", "a") as f:
        f.write('{"iteration": 6, "lo')  # a line cut by the kill
    assert [r["iteration"] for r in read_jsonl(str(out / "log.txt"))] == [1, 2, 3, 4, 5]
    before = open(out / "log.txt").read()
    tiny_run(run_args(out, resume="auto", eval_only=True))  # evaluating the checkpoint leaves the log alone
    assert open(out / "log.txt").read() == before
    train(*tiny_run(run_args(out, resume="auto", ckpt_every=3), max_iters=8))
    records = log_records(out)  # every line whole
    assert [r["iteration"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [r["iteration"] for r in records if "epoch" in r] == [6, 8]
    assert [r["resumed"]["iteration"] for r in records if "resumed" in r] == [3]


def test_a_forked_worker_that_outlives_its_killed_run_does_not_keep_the_lock(tmp_path):
    """A DataLoader worker is a fork of rank 0: if it kept a copy of the lock, a run killed with SIGKILL would
    stay locked while its orphaned workers wind down (or hang in a read)."""
    out = tmp_path / "run"
    rundir.prepare_output_dir(argparse.Namespace(output_dir=str(out), overwrite=False, resume=None), None)
    ready, started = os.pipe()
    worker = os.fork()
    if worker == 0:  # the worker: alive for the rest of the test
        os.write(started, b"1")
        time.sleep(30)
        os._exit(0)
    try:
        assert os.read(ready, 1) == b"1"
        rundir._run_lock.close()  # the run's main process dies (what the kernel does to its files on SIGKILL)
        rundir._run_lock = None
        with open(out / ".lock") as other:
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free for the next run although the worker lives
    finally:
        os.kill(worker, signal.SIGKILL)
        os.waitpid(worker, 0)
        os.close(ready)
        os.close(started)


def test_train_flops_average_the_counted_iterations_and_skip_uncounted_ones(tmp_path, own_signal_handlers):
    """Linear(3, 2) on batches of 2 points that need no gradient: the forward addmm 2 x 2 x 3 x 2 = 24 FLOPs, the
    weight gradient's mm the same: 48 per iteration. Iterations 3, 6, 9, ... also run a 4x5 @ 5x6 product (240
    FLOPs): a batch whose size varies. With --print-freq 3 the first iteration of every window is counted (0, 3,
    6; 0 is marked uncounted, as Montage's ERF pass, so 1 is counted instead): (48 + 288 + 288) / 3 = 208 per
    iteration, 208 x 8 in all (the first iteration alone would give 48 x 8)."""
    run, loader = tiny_run(run_args(tmp_path / "run", print_freq=3))
    run.uncounted = lambda it: it == 0
    for it, x in run.batches(loader):
        if it % 3 == 0:
            torch.ones(4, 5) @ torch.ones(5, 6)
        sgd_step(run, ((run.model(x) - 1) ** 2).mean())
    assert run.cost.flops_counted == [48 + 288 + 288, 3]
    assert run.compute_meta()["train_flops"] == 208 * 8
    assert checkpoint.load(str(tmp_path / "run" / "checkpoint_last.pth"))["flops_counted"] == [624, 3]  # resumed


def test_the_learning_windows_are_full_ones(tmp_path, own_signal_handlers):
    """The meta's first and last loss windows average --print-freq iterations each: with 8 iterations at
    --print-freq 3 they are iterations 1-3 and 4-6, not the last record's 7-8 (a partial window: AlignDet's 31
    iterations were judged on iteration 31 alone). Each log record says how many iterations it averages."""
    run, loader = tiny_run(run_args(tmp_path / "run", print_freq=3))
    logged = {}
    for it, x in run.batches(loader):
        loss = ((run.model(x) - 1) ** 2).mean()
        sgd_step(run, loss)
        logged[it + 1] = loss.item()
    meta = run.compute_meta()
    assert meta["losses_first"] == {"iteration": 3, "loss": pytest.approx(sum(logged[i] for i in (1, 2, 3)) / 3)}
    assert meta["losses_last"] == {"iteration": 6, "loss": pytest.approx(sum(logged[i] for i in (4, 5, 6)) / 3)}
    windows = [r["window"] for r in read_jsonl(str(tmp_path / "run" / "log.txt")) if "loss" in r and "epoch" not in r]
    assert windows == [3, 3, 2]


def test_clipped_steps_are_logged_per_window_and_as_a_share_of_the_run(tmp_path, own_signal_handlers):
    """grad_norm (clip_grad_norm_'s result) above --clip-grad counts as clipped, a non-finite one too; the meta's
    share weights each window by its iterations: 2 clipped of 8 steps."""
    run, loader = tiny_run(run_args(tmp_path / "run", print_freq=3, clip_grad=1.0))
    norms = [0.5, 2.0, 1.0, 0.3, float("inf"), 0.9, 0.1, 0.2]  # clipped: 2.0 and inf (1.0 is not above the clip)
    for it, x in run.batches(loader):
        loss = ((run.model(x) - 1) ** 2).mean()
        run.log_losses({"loss": loss}, loss, 0.0, grad_norm=torch.tensor(norms[it]))
    clipped = [r["clipped"] for r in read_jsonl(str(tmp_path / "run" / "log.txt")) if "clipped" in r]
    assert clipped == pytest.approx([1 / 3, 1 / 3, 0.0])
    assert run.compute_meta()["clipped_share"] == 0.25


def test_flop_counter_counts_around_autograd_grad():
    """Montage's ERF takes gradients of an output position with respect to the input (autograd.grad), which
    torch's FlopCounterMode refuses. A 3x3 conv, 2 -> 3 channels, on a non-square 5 x 7 input: the forward
    2 x (3 x 5 x 7) x (2 x 3 x 3) = 3780 FLOPs, the input gradient (a transposed conv) the same; the weight,
    which needs no gradient here, none."""
    from common.metrics import FlopCounter
    x = torch.randn(1, 2, 5, 7, requires_grad=True)
    w = torch.randn(3, 2, 3, 3)
    with FlopCounter() as counter:
        out = torch.nn.functional.conv2d(x, w, padding=1)
        torch.autograd.grad(out[0, :, 2, 3].sum(), x)
    assert counter.total == 2 * 3780
