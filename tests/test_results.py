"""The comparison's results writer on a fabricated runs directory."""
import csv
import json
import math
import os
import statistics

import pytest

from PIL import Image

from common.claims import paired_test
from common.results import write_results


def _stats(ap):
    return {"AP": ap, "AP50": ap + 0.2, "AP75": ap - 0.05, "APs": -1.0, "APm": ap / 2, "APl": ap}


def _run(root, name, init, seed=0, results=None, error=None, log=None, **args):
    d = os.path.join(root, name)
    os.makedirs(d)
    with open(os.path.join(d, "args.json"), "w") as f:
        json.dump({"script": "finetune.py", "init": init, "detector": "fasterrcnn", "backbone": "resnet18",
                   "seed": seed, **args}, f)
    if results:
        with open(os.path.join(d, "results.json"), "w") as f:
            json.dump(results, f)
    if error:
        with open(os.path.join(d, "error.txt"), "w") as f:
            f.write(error + "\n")
    if log:
        with open(os.path.join(d, "log.txt"), "w") as f:
            f.write("\n".join(json.dumps(r) for r in log) + "\n{\"iteration\": 9")  # last line cut by a crash


def _results(ap, ft_hours, pretrain=None, segm=None, recipe=None, ft_flops=None, machine=None):
    res = {"bbox": _stats(ap), "pretrain": pretrain or {}, "eval_only": False,
           "finetune": {"schedule": "100 it", "device_hours": ft_hours, "device_type": "cpu", "recipe": recipe,
                        "train_flops": ft_flops, **({"machine": machine} if machine else {})}}
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

    rows, claims, _ = write_results(root, expect=["ft-scratch-s0", "ft-montage-s0"],
                                 claims=["direct > scratch", "aligndet > scratch", "montage > scratch"])

    with open(os.path.join(root, "results.md")) as f:
        machine, table = f.read().split("\n\n")[:2]
    assert machine == "Machine: unknown (every run of this table)."  # runs from before machines were recorded
    table = table.splitlines()
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
    assert dict(claims)["montage > scratch"]["verdict"] == "not evaluated: row montage has no finished run"
    # scratch's FLOPs are unknown here (runs from before they were counted): no curve to read direct's seed off
    assert dict(claims)["direct > scratch"]["verdict"] == "not evaluated: no seed gives an AP on both sides"
    assert dict(claims)["direct > scratch"]["dropped"] == ["0: scratch curve incomplete: scratch has no FLOPs count",
                                                           "1: no direct run"]

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
    rows, _, _ = write_results(root, expect=["ft-imagenet-s0", "ft-predet-s0", "ft-direct-p1x-s1", "ft-aligndet-s0"])
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
    _, claims, _ = write_results(root, claims=["direct > scratch", "late > scratch"])
    claims = dict(claims)
    diffs = [0.05, 0.04, 0.07]  # against 0.20, 0.20, 0.20
    assert claims["direct > scratch"]["diff"] == pytest.approx(sum(diffs) / 3)
    assert claims["direct > scratch"]["sd"] == pytest.approx(0.0152753, rel=1e-5)
    assert claims["direct > scratch"]["threshold"] == pytest.approx(2.920 * 0.0152753 / math.sqrt(3), rel=1e-4)
    assert claims["direct > scratch"]["verdict"] == "held"
    assert claims["late > scratch"]["verdict"] == ("undecidable: late (seed 0, 5000.00 TFLOP) costs more than the "
                                                   "longest scratch run")
    text = open(os.path.join(root, "results.md")).read()
    # n, the seeds, none dropped, the mean difference, sd, the 5% threshold t(0.95, 2) x se and the difference
    # detectable with 80% power (t(0.95, 2) + t(0.80, 2)) x se = (2.920 + 1.061) x 0.0088192 = 0.0351
    assert ("| direct > scratch | scratch at the same FLOPs (same seed's curve) | 3 | 0,1,2 | — | 0.053 | 0.015 | "
            "0.026 | 0.035 | held |" in text)
    assert claims["direct > scratch"]["detectable"] == pytest.approx((2.920 + 1.061) * 0.0152753 / math.sqrt(3),
                                                                     rel=1e-4)


def test_claims_between_methods_are_paired_by_seed_with_three_outcomes(tmp_path):
    """Seeds far apart, differences within a seed alike: held by the paired test (the combined spread of the
    rows, 0.28, would hide it); a difference within its threshold is inconclusive; a row significantly worse is
    the opposite; 2 seeds use t(0.95, 1) and t(0.80, 1)."""
    root = str(tmp_path / "runs")
    for seed, (a, b, c, d) in enumerate([(0.30, 0.28, 0.31, 0.25), (0.50, 0.47, 0.47, 0.43),
                                         (0.70, 0.69, 0.72, 0.63)]):
        _run(root, f"ft-aligndet-s{seed}", "runs/a/model_final.pth", seed,
             _results(a, 0.01, _pretrained("aligndet", 2e15, 4.0, 3.0, "loss_contrast"), ft_flops=1e15))
        _run(root, f"ft-montage-s{seed}", "runs/m/model_final.pth", seed,
             _results(b, 0.01, _pretrained("montage", 1e15, 1.0, 0.5, "loss_cls"), ft_flops=1e15))
        _run(root, f"ft-other-s{seed}", "runs/o/model_final.pth", seed,
             _results(c, 0.01, _pretrained("montage", 1e15, 1.0, 0.5, "loss_cls"), ft_flops=1e15))
        _run(root, f"ft-worse-s{seed}", "runs/w/model_final.pth", seed,
             _results(d, 0.01, _pretrained("montage", 1e15, 1.0, 0.5, "loss_cls"), ft_flops=1e15))
    for seed, ap in ((0, 0.40), (1, 0.45)):
        _run(root, f"ft-two-s{seed}", "runs/t/model_final.pth", seed,
             _results(ap, 0.01, _pretrained("montage", 1e15, 1.0, 0.5, "loss_cls"), ft_flops=1e15))
    _, claims, _ = write_results(root, claims=["aligndet > montage", "other > montage", "worse > montage",
                                               "two > montage"])
    claims = dict(claims)
    assert claims["aligndet > montage"]["diff"] == pytest.approx(0.02)
    assert claims["aligndet > montage"]["sd"] == pytest.approx(0.01)
    assert claims["aligndet > montage"]["verdict"] == "held"
    assert claims["aligndet > montage"]["baseline"] == "montage, paired by seed (compute ratio 1.50)"
    # other - montage: 0.03, 0.00, 0.03 -> mean 0.02, sd 0.0173: t x se = 2.920 x 0.01 = 0.0292 > 0.02
    assert claims["other > montage"]["threshold"] == pytest.approx(2.920 * 0.0173205 / math.sqrt(3), rel=1e-4)
    assert claims["other > montage"]["verdict"] == "inconclusive"
    # worse - montage: -0.03, -0.04, -0.06 -> mean -0.0433, sd 0.01528, threshold 2.920 x 0.00882 = 0.0258
    assert claims["worse > montage"]["diff"] == pytest.approx(-0.0433333, rel=1e-5)
    assert claims["worse > montage"]["verdict"] == "opposite"
    # two - montage: 0.12, -0.02 over 2 seeds (no seed 2: dropped, named)
    assert claims["two > montage"]["n"] == 2 and claims["two > montage"]["seeds"] == [0, 1]
    assert claims["two > montage"]["dropped"] == ["2: no two run"]
    assert claims["two > montage"]["threshold"] == pytest.approx(6.314 * 0.0989949 / math.sqrt(2), rel=1e-4)
    assert claims["two > montage"]["detectable"] == pytest.approx((6.314 + 1.376) * 0.0989949 / math.sqrt(2),
                                                                  rel=1e-4)


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
    rows, claims, _ = write_results(root, claims=["predet > scratch", "predet-cls > scratch", "aligndet > scratch"])
    claims, rows = dict(claims), {r["row"]: r for r in rows}
    assert rows["predet"]["pretext check"] == ("did not learn: seed 0: predet loss_info 3.500 -> 2.810 (learned if "
                                               "<= 2.800)")
    assert claims["predet > scratch"]["verdict"] == "undecidable: the pretext of predet did not learn (its pretext check)"
    assert rows["predet-cls"]["pretext check"].startswith("learned: seed 0: predet loss_cls 2.000 -> 1.500")
    assert claims["predet-cls > scratch"]["verdict"] == "held"
    assert rows["aligndet"]["pretext check"].startswith("did not learn: seed 0: montage loss_cls 1.000 -> 0.900")
    assert claims["aligndet > scratch"]["verdict"].startswith("undecidable")
    # a looser check passes the same runs
    _, claims, _ = write_results(root, claims=["predet > scratch"], learned_drop=0.1)
    assert dict(claims)["predet > scratch"]["verdict"] == "held"


def test_scratch_curve_is_read_linearly_in_log_flops_and_at_its_cheapest_run_below_it(tmp_path):
    """Scratch at 1 and 4 PFLOP per seed. 'mid' costs 1.5 PFLOP: a quarter of the way up in log FLOPs would be
    wrong by either end's swap, the expected scratch AP is a0 + (a1 - a0) x ln(1.5 / 1) / ln(4 / 1) by hand.
    'cheap' costs 0.5 PFLOP, below the cheapest scratch run: scratch there had more compute, so its AP counts
    as is (no extrapolation down the curve)."""
    root = str(tmp_path / "runs")
    short, long_ = (0.10, 0.12, 0.08), (0.30, 0.36, 0.26)
    mid, cheap = (0.20, 0.25, 0.14), (0.05, 0.09, 0.02)
    for seed in range(3):
        _run(root, f"ft-scratch-s{seed}", "scratch", seed, _results(short[seed], 0.01, ft_flops=1e15))
        _run(root, f"ft-scratch-4x-s{seed}", "scratch", seed, _results(long_[seed], 0.04, ft_flops=4e15))
        _run(root, f"ft-mid-s{seed}", "runs/mid/model_final.pth", seed,
             _results(mid[seed], 0.01, _pretrained("direct", 0.5e15, 2.0, 1.2), ft_flops=1e15))
        _run(root, f"ft-cheap-s{seed}", "runs/cheap/model_final.pth", seed,
             _results(cheap[seed], 0.01, _pretrained("direct", 0.25e15, 2.0, 1.2), ft_flops=0.25e15))
    _, claims, _ = write_results(root, claims=["mid > scratch", "cheap > scratch"])
    claims = dict(claims)
    fraction = math.log(1.5) / math.log(4)  # 0.2925 of the way from 1 to 4 PFLOP in log FLOPs
    expected = [m - (a0 + (a1 - a0) * fraction) for m, a0, a1 in zip(mid, short, long_)]
    assert claims["mid > scratch"]["diff"] == pytest.approx(sum(expected) / 3, rel=1e-9)
    assert claims["mid > scratch"]["sd"] == pytest.approx(statistics.stdev(expected), rel=1e-9)
    assert claims["cheap > scratch"]["diff"] == pytest.approx((-0.05 - 0.03 - 0.06) / 3, rel=1e-9)
    assert claims["cheap > scratch"]["seeds"] == [0, 1, 2] and claims["cheap > scratch"]["dropped"] == []


def test_the_threshold_itself_is_inconclusive_and_a_hair_past_it_decides():
    """n = 4 differences t k + (-3k, k, k, k) with k = 1/16: mean t k, sd 2k, se = sd / sqrt(4) = k, so the 5%
    threshold t(0.95, 3) x se is t k exactly in float64 (t = 2.353 from the t table; k a power of two; t - 3 and
    t + 1 are exact). 'Exceeds' is strict: at the threshold the claim is inconclusive, and the same both ways."""
    t, k = 2.353, 1 / 16
    at = [(t - 3) * k, (t + 1) * k, (t + 1) * k, (t + 1) * k]
    result = paired_test(at)
    assert result["diff"] == t * k and result["threshold"] == t * k  # exact by construction
    assert result["verdict"] == "inconclusive"
    assert result["detectable"] == pytest.approx((2.353 + 0.978) * k, rel=1e-12)  # t(0.80, 3) = 0.978
    past = at[:3] + [at[3] + 1e-9]  # mean + 2.5e-10, threshold + 2.353 x 0.83e-10
    assert paired_test(past)["verdict"] == "held"
    assert paired_test([-d for d in at])["verdict"] == "inconclusive"
    assert paired_test([-d for d in past])["verdict"] == "opposite"


def test_equal_paired_differences_make_a_degenerate_test_and_missing_aps_drop_their_seed(tmp_path):
    """Every seed of 'same' is montage + 0.02: sd 0 (up to float rounding), the t-test degenerate, said so.
    A NaN AP (seed 1 of 'gappy') and COCO's -1 (seed 2 of montage) are missing: those seeds are dropped and
    named, never paired, and the test runs on the seeds left."""
    root = str(tmp_path / "runs")
    montage, gappy = (0.30, 0.50, -1.0, 0.40), (0.34, float("nan"), 0.60, 0.45)
    for seed in range(4):
        meta = _pretrained("montage", 1e15, 1.0, 0.5, "loss_cls")
        _run(root, f"ft-montage-s{seed}", "runs/m/model_final.pth", seed, _results(montage[seed], 0.01, meta, ft_flops=1e15))
        _run(root, f"ft-same-s{seed}", "runs/s/model_final.pth", seed,
             _results((0.30, 0.50, 0.70, 0.40)[seed] + 0.02, 0.01, meta, ft_flops=1e15))
        _run(root, f"ft-gappy-s{seed}", "runs/g/model_final.pth", seed, _results(gappy[seed], 0.01, meta, ft_flops=1e15))
    rows, claims, _ = write_results(root, claims=["same > montage", "gappy > montage"])
    claims, rows = dict(claims), {r["row"]: r for r in rows}
    assert claims["same > montage"]["verdict"] == ("undecidable: every paired difference is 0.020 (sd 0): the t-test "
                                                   "is degenerate")
    assert claims["same > montage"]["dropped"] == ["2: montage's AP n/a"]
    assert claims["gappy > montage"]["seeds"] == [0, 3] and claims["gappy > montage"]["n"] == 2
    assert claims["gappy > montage"]["dropped"] == ["1: gappy's AP n/a", "2: montage's AP n/a"]
    assert claims["gappy > montage"]["diff"] == pytest.approx(0.045)
    # the table: the mean and std over the seeds with an AP, each seed's AP listed
    assert rows["montage"]["AP"] == pytest.approx(0.40) and rows["montage"]["AP std"] == pytest.approx(0.1)
    assert rows["montage"]["AP by seed"] == "0.300 0.500 n/a 0.400"
    assert rows["gappy"]["AP by seed"] == "0.340 n/a 0.600 0.450"


def test_claims_name_the_seeds_they_drop_and_go_to_a_csv(tmp_path):
    """a has seeds 0, 1, 2, 3 and b 1, 2, 3, 4, b's seed 3 failed: the claim pairs seeds 1 and 2 and names
    the three it dropped; claims.csv holds every column of the claims' table."""
    root = str(tmp_path / "runs")
    meta = _pretrained("montage", 1e15, 1.0, 0.5, "loss_cls")
    for seed in range(4):
        _run(root, f"ft-a-s{seed}", "runs/a/model_final.pth", seed, _results(0.3 + 0.1 * seed, 0.01, meta, ft_flops=1e15))
    for seed in (1, 2, 4):
        _run(root, f"ft-b-s{seed}", "runs/b/model_final.pth", seed, _results(0.2 + 0.11 * seed, 0.01, meta, ft_flops=1e15))
    _run(root, "ft-b-s3", "runs/b/model_final.pth", 3, error="ValueError: loss is nan (a crash: see its traceback)")
    _, claims, _ = write_results(root, claims=["a > b"])
    claim = dict(claims)["a > b"]
    assert claim["seeds"] == [1, 2] and claim["dropped"] == ["0: no b run", "3: b failed", "4: no a run"]
    with open(os.path.join(root, "claims.csv")) as f:
        record, = list(csv.DictReader(f))
    assert record["claim"] == "a > b" and record["n"] == "2" and record["seeds"] == "1,2"
    assert record["dropped seeds"] == "0: no b run; 3: b failed; 4: no a run"
    # a - b: 0.40 - 0.31 and 0.50 - 0.42
    assert float(record["mean AP difference"]) == pytest.approx(0.085) and float(record["sd"]) == pytest.approx(
        0.0070711, rel=1e-4)
    assert float(record["5% threshold (t x se)"]) == pytest.approx(6.314 * 0.005, rel=1e-4)
    assert float(record["detectable at 80% power"]) == pytest.approx((6.314 + 1.376) * 0.005, rel=1e-4)
    assert record["verdict"] == "held"  # 0.085 > 0.0316
