"""The Makefile's pipelines: torchrun lines for 8 GPUs and several nodes, and skip/resume of finished stages."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, iteration_losses

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


# the venv of the interpreter running the tests (make test VENV=DIR tests DIR's torch, not ./.venv's)
VENV = f"VENV={sys.prefix}"


def make(*args, dry=True, **kw):
    return subprocess.run(["make", *(["-n"] if dry else []), *args, VENV], cwd=ROOT, capture_output=True,
                          text=True, **kw)


def test_compare_runs_every_stage_with_torchrun(tmp_path):
    out = make("compare-runs", f"OUT={tmp_path}", "DATA=/data/coco", "SEEDS=2").stdout
    launches = [line for line in out.splitlines() if "torch.distributed.run" in line]
    assert all("--nnodes=1 --node_rank=0 --nproc_per_node=8 --master_addr=127.0.0.1 --master_port=29500" in line
               for line in launches)
    scripts = [re.search(r"(\w+\.py)", line).group(1) for line in launches]
    assert sorted(set(scripts)) == ["alignDet.py", "direct.py", "finetune.py", "montage.py", "predet.py"]
    finetunes = [line for line in launches if "finetune.py" in line]
    assert len(finetunes) == 7 * 2  # 7 rows x 2 seeds
    root = f"{tmp_path}/compare/maskrcnn"
    for row in ("scratch", "imagenet", "direct-p1x", "direct-p3x", "montage", "predet", "aligndet"):
        for seed in (0, 1):
            assert sum(f"--output-dir {root}/ft-{row}-s{seed} " in line and f"--seed {seed} " in line
                       for line in finetunes) == 1, (row, seed)
    assert any(f"--init {root}/direct-p3x/model_final.pth" in line for line in finetunes)
    assert any("direct.py" in line and "--schedule P3x" in line for line in launches)
    assert "common.proposals --data-path /data/coco --method ss" in out
    # a pre-training stage runs before the fine-tune that needs it
    assert out.index("direct.py") < out.index(f"--init {root}/direct-p1x/model_final.pth")


def test_single_finetune_target(tmp_path):
    out = make("finetune", f"OUT={tmp_path}", "DATA=/data/coco", "DETECTOR=retinanet",
               "INIT=runs/direct/x/model_final.pth").stdout
    line = next(line for line in out.splitlines() if "finetune.py" in line)
    assert "torch.distributed.run" in line and "--nproc_per_node=8" in line
    assert "--data-path /data/coco --detector retinanet --init runs/direct/x/model_final.pth" in line


def test_multi_node_lines(tmp_path):
    out = make("compare-runs", f"OUT={tmp_path}", "NNODES=2", "NODE_RANK=1", "MASTER_ADDR=10.0.0.7",
               "NGPU=4").stdout
    launches = [line for line in out.splitlines() if "torch.distributed.run" in line]
    assert len(launches) == 7 + 5
    assert all("--nnodes=2 --node_rank=1 --nproc_per_node=4 --master_addr=10.0.0.7" in line for line in launches)


def test_a_dry_run_of_a_pipeline_runs_nothing(tmp_path):
    """make -n runs a recipe line that starts a sub-make (which inherits -n): such a line must not also make
    the table. The venv's python here only leaves a mark; a top-level make (no inherited MAKEFLAGS...)."""
    venv, marks = tmp_path / "venv", tmp_path / "python-ran"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(f'#!/bin/sh\necho "$@" >> {marks}\n')
    (venv / "bin" / "python").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS", "MAKEOVERRIDES")}
    for goal in ("demo", "demo-claims", "compare"):
        proc = subprocess.run(["make", "-n", "--no-print-directory", goal, f"VENV={venv}", f"OUT={tmp_path}/out",
                               "DATA=/data/coco"], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
        assert proc.returncode == 0, (goal, proc.stderr[-3000:])
        assert f"{venv}/bin/python -m common.results {tmp_path}/out/" in proc.stdout, goal  # the plan shows it
        assert not marks.exists() and not os.path.exists(tmp_path / "out"), goal


def test_finished_stages_are_skipped_and_an_interrupted_one_resumes(shapes, tmp_path):
    """A demo stage killed half-way resumes on the next `make`; a finished stage is not run again."""
    tiny_ft = ("$(PY) finetune.py --detector fasterrcnn --backbone resnet18 --preset cpu --anchor-scale 0.5 "
               "--rpn-batch-size 32 --roi-batch-size 32 --rpn-post-nms-train 64 --rpn-post-nms-test 32 "
               "--batch-size 2 --iters 6 --warmup-iters 2 --workers 0 --print-freq 1 --no-tb --device cpu "
               + " ".join(shapes))
    target = f"{tmp_path}/demo/ft-scratch-s0/results.json"
    proc = subprocess.Popen(["make", target, f"OUT={tmp_path}", f"DEMO_FT={tiny_ft}", VENV], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    run_dir = os.path.dirname(target)
    deadline = time.time() + 300
    while time.time() < deadline and max(_logged(run_dir), default=0) < 2:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)  # what a scheduler's preemption does to the job
    proc.communicate(timeout=120)
    assert proc.returncode != 0 and not os.path.exists(target)

    again = make(target, f"OUT={tmp_path}", f"DEMO_FT={tiny_ft}", dry=False, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout and os.path.exists(target)
    assert sorted(iteration_losses(run_dir)) == list(range(1, 7))

    # the finished stage is skipped; the rest of the demo would run
    plan = make("demo-runs", f"OUT={tmp_path}", f"DEMO_FT={tiny_ft}").stdout
    assert "ft-scratch-s0" not in plan and f"{tmp_path}/demo/ft-direct-p1x-s0" in plan


def _logged(run_dir):
    try:
        return iteration_losses(run_dir)
    except (OSError, ValueError):
        return {}


FAKE_PYTHON = """#!/bin/sh
# every stage leaves the file make waits for; the table exits with $TABLE_STATUS
echo "$*" >> "$MARKS"
prev=""
for a in "$@"; do
    case "$prev" in --output-dir|--out) out="$a";; esac
    prev="$a"
done
case "$*" in
    *common.results*) exit "$TABLE_STATUS";;
    *common.synthetic*) mkdir -p "$out/annotations" && touch "$out/annotations/instances_val.json";;
    *common.proposals*) mkdir -p "$(dirname "$out")" && touch "$out";;
    *finetune.py*) mkdir -p "$out" && echo '{}' > "$out/results.json";;
    *) mkdir -p "$out" && touch "$out/model_final.pth";;
esac
"""
CLOSING = {"demo": "toy scale (ResNet-18, 128 px, tens of iterations on a CPU): these are NOT paper numbers",
           "demo-claims": "toy scale (ResNet-18, 128 px): these are NOT paper numbers", "compare": None}


@pytest.mark.parametrize("goal", ["demo", "demo-claims", "compare"])
def test_a_pipeline_exits_with_its_tables_status_and_says_nothing_after_a_failed_table(tmp_path, goal):
    """Every stage runs (a python that only leaves each stage's file), then the table: when it fails, so does the
    pipeline, without its closing line; when it passes, the pipeline does too, with it."""
    venv, data = tmp_path / "venv", tmp_path / "coco"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(FAKE_PYTHON)
    (venv / "bin" / "python").chmod(0o755)
    (venv / ".installed").touch()
    data.mkdir()
    (data / "annotations.json").touch()
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS", "MAKEOVERRIDES")}
    env.update(MARKS=str(tmp_path / "marks"), CUDA_VISIBLE_DEVICES="0")
    flags = [f"VENV={venv}", f"OUT={tmp_path}/out", f"DATA={data}", "NGPU=1", f"DATA_CACHE={tmp_path}/cache",
             f"SHAPES={tmp_path}/cache/shapes/annotations/instances_val.json"]
    for table_status in (1, 0):
        env["TABLE_STATUS"] = str(table_status)
        proc = subprocess.run(["make", "--no-print-directory", goal, *flags], cwd=ROOT, capture_output=True,
                              text=True, timeout=300, env=env)
        assert (proc.returncode != 0) == (table_status != 0), (table_status, proc.stdout[-2000:], proc.stderr[-2000:])
        if CLOSING[goal]:
            assert (CLOSING[goal] in proc.stdout.splitlines()) == (table_status == 0), (table_status, proc.stdout)
    marks = (tmp_path / "marks").read_text()
    assert marks.count("-m common.results") == 2 and marks.count("finetune.py") >= 7


def test_a_results_json_that_does_not_parse_is_not_a_finished_stage(tmp_path):
    """A copy cut short or a crash mid-write of a run from before results.json was written atomically: make runs
    the fine-tune again (--resume auto evaluates it again); a whole results.json, even one the table cannot use
    (that is the table's row to say), counts as done."""
    demo = tmp_path / "demo"
    for name, text in (("ft-scratch-s0", '{"bbox": {"AP": 0.3'), ("ft-montage-s0", "[1, 2]")):
        (demo / name).mkdir(parents=True)
        (demo / name / "results.json").write_text(text)
        (demo / name.removeprefix("ft-")).mkdir()
        (demo / name.removeprefix("ft-") / "model_final.pth").touch()
    plan = make("demo-runs", f"OUT={tmp_path}").stdout
    assert f"--init scratch --seed 0 --output-dir {demo}/ft-scratch-s0 --resume auto" in plan
    assert f"--output-dir {demo}/ft-montage-s0 " not in plan
