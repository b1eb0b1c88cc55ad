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


def _results(ap, ft_hours, pretrain=None, segm=None, recipe=None, ft_flops=None):
    res = {"bbox": _stats(ap), "pretrain": pretrain or {}, "eval_only": False,
           "finetune": {"schedule": "100 it", "device_hours": ft_hours, "device_type": "cpu", "recipe": recipe,
                        "train_flops": ft_flops}}
    if segm is not None:
        res["segm"] = _stats(segm)
    return res


def test_table_csv_and_plot(tmp_path):
    root = str(tmp_path / "runs")
    _run(root, "ft-scratch-s0", "scratch", 0, _results(0.30, 0.01))
    _run(root, "ft-scratch-s1", "scratch", 1, _results(0.40, 0.03))
    direct = {"method": "direct", "schedule": "P1x", "device_hours": 0.5, "iterations": 10, "train_flops": 3e15,
              "losses_first": {"loss": 2.0}, "losses_last": {"loss": 1.0}}
    _run(root, "ft-direct-s0", "runs/direct-p1x/model_final.pth", 0,
         _results(0.5, 0.02, direct, segm=0.25, ft_flops=1e15))
    aligndet = {"method": "aligndet", "iterations": 7, "device_hours": 0.25, "train_flops": 1e15,
                "backbone_meta": {"method": "montage", "device_hours": 0.5}}  # its backbone's FLOPs unknown
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
                                "| 0.450 | n/a | n/a | 0.7500 | 0.2500 | cpu | 0 | not checked: seed 0: aligndet: "
                                "loss_contrast not logged; seed 0: montage: loss_cls not logged | done |")
    assert body["direct"] == ("| direct | direct | fasterrcnn | resnet18 | P1x | 100 it | ? | 0.500 | 0.700 | 0.450 | "
                              "n/a | 0.250 | 0.500 | 0.250 | 0.500 | 3000.00 | 4000.00 | 0.5000 | 0.0200 | cpu | 0 | learned: "
                              "seed 0: direct loss 2.000 -> 1.000 (learned if <= 1.600) | done |")
    # two seeds -> mean ± sample std, and each seed's AP
    assert body["scratch"].startswith("| scratch | scratch | fasterrcnn | resnet18 | none | 100 it | ? | 0.350 ± 0.071 |")
    assert "| 0.300 0.400 | 0.00 ± 0.00 | n/a | 0.0000 ± 0.0000 | 0.0200 ± 0.0141 | cpu | 0,1 | n/a | done |" in body["scratch"]
    # failures are shown as such, never as zeros
    assert body["imagenet"] == ("| imagenet | imagenet | fasterrcnn | resnet18 | ImageNet-1k (torchvision) | ? | n/a "
                                "| — | — | — | — | — | — | — | — | n/a | — | n/a | — | n/a | 0,1 | — | skipped: ImageNet "
                                "weights unavailable offline |")
    assert body["direct-p3x"].endswith("| failed: runs/x.jpg: cannot read image |")
    assert body["predet"].endswith("incomplete: stopped after iteration 7 |")
    assert body["montage"].endswith("| not run: its pre-training montage did not finish: failed: OSError: disk "
                                    "full (a crash: see its traceback) |")
    assert len(rows) == 7
    # a claim on a row whose pretext was not checked is undecidable; one seed decides nothing
    assert dict(claims)["aligndet > scratch"]["verdict"] == "undecidable: the pretext of aligndet not checked (its " \
                                                           "pretext check)"
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


def _pretrained(method, flops, first, last, key="loss", **extra):
    return {"method": method, "train_flops": flops, "losses_first": {key: first}, "losses_last": {key: last}, **extra}


def test_claims_against_scratch_use_the_same_seeds_curve_at_matched_flops(tmp_path):
    """Scratch at 1000 and 4000 TFLOP per seed; Direct's total (pre-training + fine-tune, 1000 each) is 2000, halfway
    in log FLOPs, so its baseline is the mean of the seed's two scratch APs (linear in FLOPs: a third of the way)."""
    root = str(tmp_path / "runs")
    short, long_, direct = (0.10, 0.12, 0.08), (0.30, 0.28, 0.32), (0.25, 0.24, 0.27)
    for seed in range(3):
        _run(root, f"ft-scratch-s{seed}", "scratch", seed, _results(short[seed], 0.01, ft_flops=1e15))
        _run(root, f"ft-scratch-4x-s{seed}", "scratch", seed, _results(long_[seed], 0.04, ft_flops=4e15))
        _run(root, f"ft-direct-s{seed}", "runs/direct/model_final.pth", seed,
             _results(direct[seed], 0.01, _pretrained("direct", 1e15, 2.0, 1.2), ft_flops=1e15))
        _run(root, f"ft-late-s{seed}", "runs/late/model_final.pth", seed,  # 5000 TFLOP: past the curve's end
             _results(0.9, 0.01, _pretrained("direct", 4e15, 2.0, 1.2), ft_flops=1e15))
    _, claims = write_results(root, claims=["direct > scratch", "late > scratch"])
    claims = dict(claims)
    diffs = [0.05, 0.04, 0.07]  # against 0.20, 0.20, 0.20
    assert claims["direct > scratch"]["diff"] == pytest.approx(sum(diffs) / 3)
    assert claims["direct > scratch"]["sd"] == pytest.approx(0.0152753, rel=1e-5)
    assert claims["direct > scratch"]["detectable"] == pytest.approx(2.920 * 0.0152753 / math.sqrt(3), rel=1e-4)
    assert claims["direct > scratch"]["verdict"] == "held"
    assert claims["late > scratch"]["verdict"] == ("undecidable: late (seed 0, 5000.00 TFLOP) costs more than the "
                                                   "longest scratch run")
    text = open(os.path.join(root, "results.md")).read()
    assert ("| direct > scratch | scratch at the same FLOPs (same seed's curve) | 0.053 | 0.015 | 3 | 0.026 | held |"
            in text)


def test_claims_between_methods_are_paired_by_seed(tmp_path):
    """Seeds far apart, differences within a seed alike: held by the paired test (the combined spread of the
    rows, 0.28, would hide it); a difference within its detectable size is not held; 2 seeds use t(0.95, 1)."""
    root = str(tmp_path / "runs")
    for seed, (a, b, c) in enumerate([(0.30, 0.28, 0.31), (0.50, 0.47, 0.47), (0.70, 0.69, 0.72)]):
        _run(root, f"ft-aligndet-s{seed}", "runs/a/model_final.pth", seed,
             _results(a, 0.01, _pretrained("aligndet", 2e15, 4.0, 3.0, "loss_contrast"), ft_flops=1e15))
        _run(root, f"ft-montage-s{seed}", "runs/m/model_final.pth", seed,
             _results(b, 0.01, _pretrained("montage", 1e15, 1.0, 0.5, "loss_cls"), ft_flops=1e15))
        _run(root, f"ft-other-s{seed}", "runs/o/model_final.pth", seed,
             _results(c, 0.01, _pretrained("montage", 1e15, 1.0, 0.5, "loss_cls"), ft_flops=1e15))
    for seed, ap in ((0, 0.40), (1, 0.45)):
        _run(root, f"ft-two-s{seed}", "runs/t/model_final.pth", seed,
             _results(ap, 0.01, _pretrained("montage", 1e15, 1.0, 0.5, "loss_cls"), ft_flops=1e15))
    _, claims = write_results(root, claims=["aligndet > montage", "other > montage", "two > montage"])
    claims = dict(claims)
    assert claims["aligndet > montage"]["diff"] == pytest.approx(0.02)
    assert claims["aligndet > montage"]["sd"] == pytest.approx(0.01)
    assert claims["aligndet > montage"]["verdict"] == "held"
    assert claims["aligndet > montage"]["baseline"] == "montage, paired by seed (compute ratio 1.50)"
    # other - montage: 0.03, 0.00, 0.03 -> mean 0.02, sd 0.0173: t x se = 2.920 x 0.01 = 0.0292 > 0.02
    assert claims["other > montage"]["detectable"] == pytest.approx(2.920 * 0.0173205 / math.sqrt(3), rel=1e-4)
    assert claims["other > montage"]["verdict"] == "not held"
    # two - montage: 0.12, -0.02 over 2 seeds
    assert claims["two > montage"]["n"] == 2
    assert claims["two > montage"]["detectable"] == pytest.approx(6.314 * 0.0989949 / math.sqrt(2), rel=1e-4)


def test_a_pretext_that_did_not_learn_leaves_its_claims_undecidable(tmp_path):
    """The check is a fall of at least --learned-drop from the first logged window to the last, on each stage's
    own pretext loss (PreDet's ablation has no loss_info: its loss_cls), every stage of a chain."""
    root = str(tmp_path / "runs")
    for seed in range(3):
        _run(root, f"ft-scratch-s{seed}", "scratch", seed, _results(0.1 + 0.01 * seed, 0.01, ft_flops=1e15))
        _run(root, f"ft-scratch-8x-s{seed}", "scratch", seed, _results(0.4, 0.08, ft_flops=8e15))
        _run(root, f"ft-predet-s{seed}", "runs/p/model_final.pth", seed,  # 3.5 -> 2.8 is exactly 20%: learned
             _results(0.3, 0.01, _pretrained("predet", 1e15, 3.5, 2.8 if seed else 2.81, "loss_info"), ft_flops=1e15))
        _run(root, f"ft-predet-cls-s{seed}", "runs/c/model_final.pth", seed,
             _results(0.3, 0.01, _pretrained("predet", 1e15, 2.0, 1.5, "loss_cls"), ft_flops=1e15))
        backbone = _pretrained("montage", 1e15, 1.0, 0.9, "loss_cls")  # 10%: did not learn
        _run(root, f"ft-aligndet-s{seed}", "runs/a/model_final.pth", seed,
             _results(0.3, 0.01, _pretrained("aligndet", 1e15, 4.0, 2.0, "loss_contrast", backbone_meta=backbone),
                      ft_flops=1e15))
    rows, claims = write_results(root, claims=["predet > scratch", "predet-cls > scratch", "aligndet > scratch"])
    claims, rows = dict(claims), {r["row"]: r for r in rows}
    assert rows["predet"]["pretext check"] == ("did not learn: seed 0: predet loss_info 3.500 -> 2.810 (learned if "
                                               "<= 2.800)")
    assert claims["predet > scratch"]["verdict"] == "undecidable: the pretext of predet did not learn (its pretext check)"
    assert rows["predet-cls"]["pretext check"].startswith("learned: seed 0: predet loss_cls 2.000 -> 1.500")
    assert claims["predet-cls > scratch"]["verdict"] == "held"
    assert rows["aligndet"]["pretext check"].startswith("did not learn: seed 0: montage loss_cls 1.000 -> 0.900")
    assert claims["aligndet > scratch"]["verdict"].startswith("undecidable")
    # a looser check passes the same runs
    _, claims = write_results(root, claims=["predet > scratch"], learned_drop=0.1)
    assert dict(claims)["predet > scratch"]["verdict"] == "held"
