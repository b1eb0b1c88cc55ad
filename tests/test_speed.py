"""The speed paths (AMP, channels_last) compute the same thing as fp32, the logged throughput is wall clock, and
the benchmark emits every figure."""
import argparse
import json
import time

import pytest
import torch

from common import coco_eval, engine, synthetic
from common.coco import CocoDetection
from common.detectors import PresizedTransform, build_detector, pad_multiple_for
from common.errors import UserError
from common.loader import collate_detection
from common.transforms import to_float_batch, train_augment, train_resize
from conftest import run_script
from test_checkpoint import own_signal_handlers, run_args, sgd_step, tiny_run  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def batch(shapes):
    ds = CocoDetection(shapes[1], shapes[3], train_augment(), keep_empty=False, resize=train_resize("cpu"))
    images, targets = collate_detection([ds[i] for i in range(2)])
    return to_float_batch(images, torch.device("cpu")), engine.targets_to(targets, "cpu"), ds.num_classes


def _losses(model, images, targets, dtype=None):
    torch.manual_seed(0)  # the RPN/RoI samplers draw the same anchors and RoIs
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        return {k: float(v.detach()) for k, v in model(images, targets).items()}


@pytest.mark.numerics
def test_bf16_autocast_and_channels_last_match_fp32(batch):
    images, targets, k = batch
    torch.manual_seed(0)
    model = build_detector("fasterrcnn", k, "resnet18", "frozen", box_head="2fc", min_size=128, max_size=192)
    model.train()
    fp32 = _losses(model, images, targets)
    assert engine.amp_dtype(argparse.Namespace(amp="bf16"), torch.device("cpu")) == torch.bfloat16
    assert engine.amp_dtype(argparse.Namespace(amp="auto"), torch.device("cpu")) is None  # off on the CPU
    bf16 = _losses(model, images, targets, torch.bfloat16)
    # the RPN terms are computed on the same sampled anchors; RoI terms depend on which proposals survive NMS.
    # bf16 keeps 8 bits of mantissa (2^-9 = 2e-3 per rounding) through the backbone's convolutions: rel 0.03
    for key in ("loss_objectness", "loss_rpn_box_reg"):
        assert bf16[key] == pytest.approx(fp32[key], rel=0.03), (key, fp32, bf16)
    model = model.to(memory_format=torch.channels_last)
    cl = _losses(model, images, targets)  # the model's transform batches them; convs run channels-last
    # channels-last convolutions are other kernels, which add each output's terms in another order (~sqrt(N) x
    # 2^-24 relative); a proposal near an NMS or IoU threshold can carry that into the RoI terms: rel 1e-3
    # (a layout mixed up, e.g. channels read as columns, moves every term by its own size)
    for key in fp32:
        assert cl[key] == pytest.approx(fp32[key], rel=1e-3, abs=1e-5), (key, fp32, cl)


def test_canvas_sides_are_multiples_of_pad_multiple_capped_at_the_preset():
    at_1333 = PresizedTransform(pad_multiple=160, max_side=1333)
    assert at_1333.canvas_size([(800, 1067), (800, 1000)]) == (800, 1120)  # COCO's 4:3 at short side 800
    assert at_1333.canvas_size([(800, 1333)]) == (800, 1344)  # the cap rounded up to 32 (not 1440)
    assert at_1333.canvas_size([(672, 896), (640, 1100)]) == (800, 1120)  # multiscale views: 640 or 800 high
    assert at_1333.canvas_size([(800, 1400)]) == (800, 1408)  # past the cap: still a multiple of 32
    assert PresizedTransform(pad_multiple=32, max_side=1333).canvas_size([(800, 1067)]) == (800, 1088)
    assert PresizedTransform().canvas_size([(100, 150)]) == (128, 160)  # torchvision's padding


def test_pad_multiple_is_torchvisions_on_the_cpu_by_default_and_a_multiple_of_32():
    import finetune
    args = finetune.get_args_parser().parse_args([])
    assert pad_multiple_for(args, torch.device("cpu")) == 32  # the CPU runs' numbers stay as they were
    assert pad_multiple_for(args, torch.device("cuda")) == 160
    args.pad_multiple = 96
    assert pad_multiple_for(args, torch.device("cpu")) == 96
    args.pad_multiple = 100
    with pytest.raises(UserError, match="--pad-multiple 100: expected a multiple of 32"):
        pad_multiple_for(args, torch.device("cuda"))


def test_canvas_padding_leaves_the_losses_unchanged_where_it_adds_no_pixels():
    """pad_multiple 160 against torchvision's 32, same weights, same sampler draws: identical losses for a batch
    whose largest image already has canvas sides (160 x 320). A smaller batch gets more zero padding, its images
    and their sizes unchanged; the anchors over the padding are negatives, so the RPN's loss changes."""
    torch.manual_seed(0)
    model = build_detector("fasterrcnn", 3, "resnet18", "frozen", box_head="2fc", rpn_batch_size_per_image=32,
                           box_batch_size_per_image=32)
    model.train()
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 90.0, 70.0]]), "labels": torch.tensor([1])}] * 2

    def batch_and_losses(images, pad_multiple):
        model.transform.pad_multiple = pad_multiple
        batch, _ = model.transform(images, [dict(t) for t in targets])
        return batch, _losses(model, images, targets)

    filled = [torch.rand(3, 160, 320), torch.rand(3, 144, 300)]
    (batch32, losses32), (batch160, losses160) = batch_and_losses(filled, 32), batch_and_losses(filled, 160)
    assert batch160.tensors.shape == batch32.tensors.shape == (2, 3, 160, 320)
    assert losses160 == losses32  # bit-identical

    small = [torch.rand(3, 128, 192), torch.rand(3, 128, 170)]
    (batch32, losses32), (batch160, losses160) = batch_and_losses(small, 32), batch_and_losses(small, 160)
    assert batch32.tensors.shape[-2:] == (128, 192) and batch160.tensors.shape[-2:] == (160, 320)
    assert batch160.image_sizes == batch32.image_sizes == [(128, 192), (128, 170)]
    assert torch.equal(batch160.tensors[..., :128, :192], batch32.tensors)
    assert not batch160.tensors[..., 128:, :].any() and not batch160.tensors[..., 192:].any()
    assert losses160["loss_objectness"] != losses32["loss_objectness"]


def test_bench_emits_every_figure(tmp_path):
    synthetic.generate(str(tmp_path / "cache" / "shapes"), num_train=24, num_val=8, seed=3)
    run_script("tests.bench", "--device", "cpu", "--data-cache", tmp_path / "cache", "--out", tmp_path / "bench",
               "--only", "montage cpu,shapes finetune,loader direct,loader montage,COCO eval")
    rows = {r["name"]: r for r in json.load(open(tmp_path / "bench" / "bench.json"))["rows"]}
    backends = ("pycocotools", "faster") if coco_eval.faster_coco_eval_available() else ("pycocotools",)
    evals = {f"COCO eval {t}, {b} (100 dets/image)" for b in backends for t in ("bbox", "segm")}
    assert set(rows) == {"montage cpu", "shapes finetune 1333x800 x4", "loader direct 448 (+masks)",
                         "loader montage 224 from the sample cache"} | evals
    assert all(rows[name]["eval_s_per_1000_images"] > 0 for name in evals)
    train = rows["montage cpu"]  # its run, then its limit: the same loop body on one batch
    assert train["samples_per_s"] > 0 and train["peak_mem_mb"] > 0 and 0 <= train["data_time_share"] < 1
    assert train["speed_window"] == [1, 5]  # 5 iterations, the first one the warm-up
    assert train["limit_samples_per_s"] > 0
    assert train["vs_limit"] == round(train["samples_per_s"] / train["limit_samples_per_s"], 2)
    assert train["shapes_per_100_it"] == train["shapes_per_100_it_pad32"] == 1  # 96-px montages only
    shapes = rows["shapes finetune 1333x800 x4"]  # images of 96-224 px at short side 800: many aspect ratios
    assert 1 <= shapes["shapes_per_100_it"] < shapes["shapes_per_100_it_pad32"]
    assert rows["loader direct 448 (+masks)"]["items_per_s_per_worker"] > 0
    assert rows["loader montage 224 from the sample cache"]["items_per_s_per_worker"] > 0
    assert "| montage cpu | " in open(tmp_path / "bench" / "bench.md").read()


def test_logged_throughput_is_wall_clock_after_the_warm_up(tmp_path, own_signal_handlers):
    """samples_per_s = samples x iterations / wall seconds over the stated window (the first 20 / 5 = 4
    iterations, the warm-up, left out), evaluations between epochs and checkpoints included and reported apart."""
    run, loader = tiny_run(run_args(tmp_path, ckpt_every=5), max_iters=20)  # 6 iterations per epoch
    for it, x in run.batches(loader, on_epoch_end=lambda epoch: time.sleep(0.2)):  # an "evaluation"
        time.sleep(0.01)
        sgd_step(run, (run.model(x) ** 2).mean())
    records = [json.loads(line) for line in open(tmp_path / "log.txt") if '"epoch"' in line]
    assert [r["speed_window"] for r in records] == [[4, 6], [4, 12], [4, 18], [4, 20]]
    last = records[-1]
    assert last["eval_s"] >= 4 * 0.2 and last["checkpoint_s"] > 0  # epoch ends 6, 12, 18, 20; saves 5, 10, 15
    assert last["wall_s"] >= 16 * 0.01 + last["eval_s"] + last["checkpoint_s"] + last["data_wait_s"]
    assert last["samples_per_s"] == pytest.approx(2 * 16 / last["wall_s"], rel=1e-3)
    assert last["data_time_share"] == pytest.approx(last["data_wait_s"] / last["wall_s"], abs=1e-3)
    assert run.compute_meta()["train_speed"]["speed_window"] == [4, 20]
