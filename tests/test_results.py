"""The comparison's results writer on a fabricated runs directory."""
import csv
import json
import math
import os

import pytest

from PIL import Image

from common.results import write_results


def _stats(ap):
    return {"AP": ap, "AP50": ap + 0.2, "AP75": ap - 0.05, "APs": -1.0, "APm": ap / 2, "APl": ap}


def _run(root, name, init, seed=0, results=None, error=None, log=None):
    d = os.path.join(root, name)
    os.makedirs(d)
    with open(os.path.join(d, "args.json"), "w") as f:
        json.dump({"script": "finetune.py", "init": init, "detector": "fasterrcnn", "backbone": "resnet18",
                   "seed": seed}, f)
    if results:
        with open(os.path.join(d, "results.json"), "w") as f:
            json.dump(results, f)
    if error:
        with open(os.path.join(d, "error.txt"), "w") as f:
            f.write(error + "\n")
    if log:
        with open(os.path.join(d, "log.txt"), "w") as f:
            f.write("\n".join(json.dumps(r) for r in log) + "\n{\"iteration\": 9")  # last line cut by a crash


def _results(ap, ft_hours, pretrain=None, segm=None, recipe=None):
    res = {"bbox": _stats(ap), "pretrain": pretrain or {}, "eval_only": False,
           "finetune": {"schedule": "100 it", "device_hours": ft_hours, "device_type": "cpu", "recipe": recipe}}
    if segm is not None:
        res["segm"] = _stats(segm)
    return res


def test_table_csv_and_plot(tmp_path):
    root = str(tmp_path / "runs")
    _run(root, "ft-scratch-s0", "scratch", 0, _results(0.30, 0.01))
    _run(root, "ft-scratch-s1", "scratch", 1, _results(0.40, 0.03))
    direct = {"method": "direct", "schedule": "P1x", "device_hours": 0.5, "iterations": 10}
    _run(root, "ft-direct-s0", "runs/direct-p1x/model_final.pth", 0, _results(0.5, 0.02, direct, segm=0.25))
    aligndet = {"method": "aligndet", "iterations": 7, "device_hours": 0.25,
                "backbone_meta": {"method": "montage", "device_hours": 0.5}}
    recipe = {"protocol": "paper", "bn": "affine", "trainable_layers": 3, "lr": 0.03, "weight_decay": 5e-5}
    _run(root, "ft-aligndet-s0", "runs/aligndet/model_final.pth", 0, _results(0.45, 0.25, aligndet, recipe=recipe))
    _run(root, "ft-imagenet-s0", "imagenet", 0, error="skipped: ImageNet weights unavailable offline")
    _run(root, "ft-imagenet-s1", "imagenet", 1, error="skipped: ImageNet weights unavailable offline")  # one line
    _run(root, "ft-direct-p3x-s0", "runs/direct-p3x/model_final.pth", 0, error="runs/x.jpg: cannot read image")
    _run(root, "ft-predet-s0", "runs/predet/model_final.pth", 0, log=[{"iteration": 3}, {"iteration": 7}])
    os.makedirs(os.path.join(root, "direct-p1x"))  # a pre-training run: not a row
    with open(os.path.join(root, "direct-p1x", "args.json"), "w") as f:
        json.dump({"script": "direct.py"}, f)

    os.makedirs(os.path.join(root, "montage"))  # a pre-training that crashed: its fine-tune never started
    with open(os.path.join(root, "montage", "error.txt"), "w") as f:
        f.write("OSError: disk full (a crash: see its traceback)\n")

    rows, claims = write_results(root, expect=["ft-scratch-s0", "ft-montage-s0"],
                                 claims=["direct > scratch", "aligndet > scratch", "montage > scratch"])

    with open(os.path.join(root, "results.md")) as f:
        table = f.read().split("\n\n")[0].splitlines()
    assert table[0].startswith("| row | method | detector | backbone | pre-train | fine-tune | recipe | AP | AP50 |")
    body = {line.split(" | ")[0][2:]: line for line in table[2:]}
    assert len(table) == 2 + 7
    assert body["aligndet"] == ("| aligndet | aligndet | fasterrcnn | resnet18 | 7 it | 100 it | paper: BN affine only, 2 "
                                "stages frozen, lr 0.03, wd 5e-05 | 0.450 | 0.650 | 0.400 | n/a | 0.225 | 0.450 | n/a "
                                "| 0.450 | 0.7500 | 0.2500 | 1.0000 | cpu | 0 | done |")
    assert body["direct"] == ("| direct | direct | fasterrcnn | resnet18 | P1x | 100 it | ? | 0.500 | 0.700 | 0.450 | "
                              "n/a | 0.250 | 0.500 | 0.250 | 0.500 | 0.5000 | 0.0200 | 0.5200 | cpu | 0 | done |")
    # two seeds -> mean ± sample std, and each seed's AP
    assert body["scratch"].startswith("| scratch | scratch | fasterrcnn | resnet18 | none | 100 it | ? | 0.350 ± 0.071 |")
    assert ("| 0.300 0.400 | 0.0000 ± 0.0000 | 0.0200 ± 0.0141 | 0.0200 ± 0.0141 | cpu | 0,1 | done |"
            in body["scratch"])
    # failures are shown as such, never as zeros
    assert body["imagenet"] == ("| imagenet | imagenet | fasterrcnn | resnet18 | ImageNet-1k (torchvision) | ? | n/a "
                                "| — | — | — | — | — | — | — | — | n/a | — | — | n/a | 0,1 | skipped: ImageNet weights "
                                "unavailable offline |")
    assert body["direct-p3x"].endswith("| failed: runs/x.jpg: cannot read image |")
    assert body["predet"].endswith("incomplete: stopped after iteration 7 |")
    assert body["montage"].endswith("| not run: its pre-training montage did not finish: failed: OSError: disk "
                                    "full (a crash: see its traceback) |")
    assert len(rows) == 7
    # claims: held when the mean difference exceeds the combined std; one seed decides nothing
    assert dict(claims)["aligndet > scratch"]["verdict"] == "undecided: one seed gives no spread (SEEDS=3)"
    assert dict(claims)["montage > scratch"]["verdict"] == "not evaluated: row montage has no results"

    with open(os.path.join(root, "results.csv")) as f:
        records = list(csv.DictReader(f))
    scratch = next(r for r in records if r["method"] == "scratch")
    assert float(scratch["AP"]) == 0.35 and abs(float(scratch["AP std"]) - 0.0707107) < 1e-6
    imagenet = next(r for r in records if r["method"] == "imagenet")
    assert imagenet["AP"] == "" and imagenet["status"].startswith("skipped")

    with Image.open(os.path.join(root, "results.png")) as png:
        png.verify()
        assert png.format == "PNG" and png.size[0] > 300


def test_expected_runs_that_left_no_run_say_why(tmp_path):
    root = str(tmp_path / "runs")
    os.makedirs(os.path.join(root, "ft-imagenet-s0"))  # crashed before writing args.json: only error.txt
    with open(os.path.join(root, "ft-imagenet-s0", "error.txt"), "w") as f:
        f.write("OSError: [Errno 39] Directory not empty (a crash: see its traceback)\n")
    os.makedirs(os.path.join(root, "predet"))  # a pre-training stopped by a signal
    with open(os.path.join(root, "predet", "log.txt"), "w") as f:
        f.write(json.dumps({"iteration": 4}) + "\n")
    os.makedirs(os.path.join(root, "direct-p1x-s1"))  # finished, but its fine-tune was never started
    open(os.path.join(root, "direct-p1x-s1", "model_final.pth"), "w").close()
    rows, _ = write_results(root, expect=["ft-imagenet-s0", "ft-predet-s0", "ft-direct-p1x-s1", "ft-aligndet-s0"])
    status = {r["method"]: r["status"] for r in rows}
    assert status == {
        "imagenet": "failed: OSError: [Errno 39] Directory not empty (a crash: see its traceback)",
        "predet": "not run: its pre-training predet did not finish: incomplete: stopped after iteration 4",
        "direct-p1x": "not run: its pre-training direct-p1x-s1 finished, the fine-tune never started",
        "aligndet": "not run: neither it nor a pre-training stage of that name started (an earlier stage failed? "
                    "see make's output)"}


def test_claims_are_judged_against_the_combined_spread(tmp_path):
    root = str(tmp_path / "runs")
    for seed, (a, b, c) in enumerate([(0.30, 0.20, 0.22), (0.32, 0.21, 0.18), (0.34, 0.22, 0.26)]):
        _run(root, f"ft-direct-s{seed}", "runs/direct/model_final.pth", seed, _results(a, 0.01, {"method": "direct"}))
        _run(root, f"ft-scratch-s{seed}", "scratch", seed, _results(b, 0.01))
        _run(root, f"ft-montage-s{seed}", "runs/montage/model_final.pth", seed, _results(c, 0.01, {"method": "montage"}))
    _, claims = write_results(root, claims=["direct > scratch", "montage > scratch", "scratch > direct"])
    claims = dict(claims)
    # direct 0.32 ± 0.02, scratch 0.21 ± 0.01: 0.11 > sqrt(0.02^2 + 0.01^2) = 0.0224
    assert claims["direct > scratch"]["diff"] == pytest.approx(0.11)
    assert claims["direct > scratch"]["combined_std"] == pytest.approx(math.hypot(0.02, 0.01))
    assert claims["direct > scratch"]["verdict"] == "held"
    # montage 0.22 ± 0.04: 0.01 < sqrt(0.04^2 + 0.01^2)
    assert claims["montage > scratch"]["verdict"] == "not held" and claims["scratch > direct"]["verdict"] == "not held"
    text = open(os.path.join(root, "results.md")).read()
    assert "| direct > scratch | 0.110 | 0.022 | held |" in text
