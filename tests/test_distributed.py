"""Distributed training proven, not assumed: the samplers' shards, and every training script's 2-process gloo run
against 1-process runs on the CPU.

What a 2-process run must equal depends on what the script's losses couple across the images of a batch:
- Montage's loss is a mean over images of per-image terms and its only other coupling is BatchNorm, so 2
  processes x 1 montage must equal 1 process x 2 montages whose BN normalises each rank's share of the batch
  on its own (per-GPU BN; tests/dist_harness.py --ghost-bn), with rank 0's running statistics kept: the
  losses of every iteration, the ERF label weights and the weights.
- The detection scripts (finetune, Direct, PreDet, AlignDet) normalise their losses per rank, as torchvision
  and mmdet do on each GPU (sampled anchors / RoIs / queries of the rank's batch, AlignDet's contrast within
  the rank's batch), draw their samples from each rank's own random stream, and Direct/PreDet/finetune-from-
  scratch train per-GPU BN. A 1-process run at the global batch is therefore a different computation. What
  must hold is the definition of data-parallel SGD: one step of the 2-process run equals the mean of the
  steps two plain 1-process runs take, each playing one rank (its shard, its seed, rank 0's initial weights,
  world size 1: tests/dist_harness.py --reference-first). One SGD step (momentum buffer = gradient, no
  warm-up, no clipping, --lr fixed) is linear in the gradient, so the 2-process parameters must be the mean
  of the played ranks' to float precision, its logged loss their mean, its BN running statistics rank 0's,
  and AlignDet's EMA teacher (linear in the parameters) the mean of theirs. Further steps are not compared:
  the played runs leave the 2-process trajectory after the first step by construction.
Each 2-process run also records what each rank trained on: disjoint shards, each the one its played rank saw.
"""
import json

import pytest
import torch

from common import dist
from common.loader import ShardSampler, TrainBatchSampler
from conftest import SMALL, TINY, iteration_losses, run_script

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
HARNESS = "tests/dist_harness.py"
TORCHRUN = ("torch.distributed.run", "--standalone", "--nproc_per_node=2")


# ---------------------------------------------------------------------------------------------------------
# Samplers, with a faked rank and world size
# ---------------------------------------------------------------------------------------------------------
def fake_world(monkeypatch, rank, world):
    monkeypatch.setattr(dist, "get_rank", lambda: rank)
    monkeypatch.setattr(dist, "get_world_size", lambda: world)


def train_batches(monkeypatch, rank, world, num_items, batch_size, seed=7, epoch=0, group_ids=None):
    """The batches of (index, sample seed) pairs rank ``rank`` of ``world`` trains on in ``epoch``."""
    fake_world(monkeypatch, rank, world)
    sampler = TrainBatchSampler(num_items, batch_size, seed, group_ids)
    sampler.set_epoch(epoch)
    return [[tuple(item) for item in batch] for batch in sampler]


def distributed_sampler_shard(order, world, rank):
    """torch's DistributedSampler (no shuffle, wrap-around padding) over the epoch's order: the items of rank
    ``rank``, which TrainBatchSampler's docstring promises to shard like."""
    positions = torch.utils.data.DistributedSampler(range(len(order)), world, rank, shuffle=False)
    return [order[p] for p in positions]


@pytest.mark.parametrize("num_items, world, batch_size", [(24, 2, 1), (23, 2, 2), (10, 3, 2), (7, 4, 1), (9, 2, 3)])
def test_train_shards_are_disjoint_and_cover_the_epoch(monkeypatch, num_items, world, batch_size):
    for epoch in (0, 1):
        order = [i for [(i, _)] in train_batches(monkeypatch, 0, 1, num_items, 1, epoch=epoch)]  # the epoch's order
        assert sorted(order) == list(range(num_items))
        ranks = [train_batches(monkeypatch, r, world, num_items, batch_size, epoch=epoch) for r in range(world)]
        per_rank = -(-num_items // world)
        kept = per_rank // batch_size * batch_size  # drop_last: a partial last batch of a rank is not trained
        samples = []
        for r, batches in enumerate(ranks):
            assert all(len(b) == batch_size for b in batches) and len(batches) == per_rank // batch_size
            items = [item for batch in batches for item in batch]
            assert [i for i, _ in items] == distributed_sampler_shard(order, world, r)[:kept], (epoch, r)
            samples += items
        # no two ranks (or batches) train on the same (image, augmentation): a wrapped-around repeat of an
        # image gets another sample seed
        assert len(set(samples)) == len(samples)
        if kept == per_rank:  # every image of the epoch is trained, the first `pad` of its order twice
            pad = per_rank * world - num_items
            counts = torch.bincount(torch.tensor([i for i, _ in samples]), minlength=num_items)
            assert counts.min() == 1 and sorted(torch.nonzero(counts == 2).flatten().tolist()) == sorted(order[:pad])
    # another epoch, another order
    assert train_batches(monkeypatch, 0, world, num_items, batch_size, epoch=0) != \
        train_batches(monkeypatch, 0, world, num_items, batch_size, epoch=1)


@pytest.mark.parametrize("world, batch_size", [(2, 1), (2, 3), (3, 2)])
def test_one_process_global_batch_is_the_union_of_the_ranks_batches(monkeypatch, world, batch_size):
    """The same samples (image and augmentation seed) in each global batch, whatever the number of processes."""
    num_items = 12 * world
    one = train_batches(monkeypatch, 0, 1, num_items, world * batch_size)
    ranks = [train_batches(monkeypatch, r, world, num_items, batch_size) for r in range(world)]
    assert len(one) == len(ranks[0]) == num_items // (world * batch_size)
    for t, global_batch in enumerate(one):
        assert sorted(global_batch) == sorted(item for rank in ranks for item in rank[t]), t


def test_aspect_grouped_batches_stay_in_their_rank_shard(monkeypatch):
    """With aspect-ratio groups each rank still trains only on its own shard, one group per batch (but the
    leftovers at the end of the epoch)."""
    num_items, world, batch_size = 22, 2, 2
    groups = [1, 0, 0, 1, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0, 1, 1, 1, 0, 0, 1, 1, 1]
    order = [i for [(i, _)] in train_batches(monkeypatch, 0, 1, num_items, 1)]
    seen = []
    for r in range(world):
        batches = train_batches(monkeypatch, r, world, num_items, batch_size, group_ids=groups)
        items = [i for batch in batches for i, _ in batch]
        assert set(items) <= set(distributed_sampler_shard(order, world, r)) and len(set(items)) == len(items)
        mixed = [b for b in batches if len({groups[i] for i, _ in b}) > 1]
        assert len(mixed) <= 1 and (not mixed or mixed[0] == batches[-1])
        seen += items
    assert len(set(seen)) == len(seen)  # 22 items over 2 ranks: no padding, so no item on both ranks


@pytest.mark.parametrize("num_items", [8, 7, 1])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_shards_cover_every_image_exactly_once(monkeypatch, num_items, world):
    shards = []
    for r in range(world):
        fake_world(monkeypatch, r, world)
        shards.append(list(ShardSampler(num_items)))
        assert len(ShardSampler(num_items)) == len(shards[-1])
    assert sorted(i for s in shards for i in s) == list(range(num_items))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1  # balanced: no rank waits on a longer shard


# ---------------------------------------------------------------------------------------------------------
# Every training script: a 2-process gloo run against 1-process runs
# ---------------------------------------------------------------------------------------------------------
def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def is_bn_statistic(key):
    return key.endswith(("running_mean", "running_var", "num_batches_tracked"))


def step_errors(got, expected, initial, fraction):
    """{key: (error, tolerance)} of every floating-point entry of the state dict ``got`` against ``expected``,
    both reached from ``initial`` by the same SGD step(s) computed in another order: the error is the largest
    element's, the tolerance ``fraction`` of the largest element of the step (``expected - initial``) plus 4
    ulp of the largest initial element (the update's own rounding, w - lr * g, at the weight's scale)."""
    out = {}
    for k, v in got.items():
        if v.is_floating_point():
            step = (expected[k].double() - initial[k].double()).abs().max().item()
            tolerance = fraction * step + 4 * torch.finfo(v.dtype).eps * initial[k].abs().max().item()
            out[k] = ((v.double() - expected[k].double()).abs().max().item(), tolerance)
    return out


# One SGD step is lr x the gradient, and the gradient of a weight is a float32 sum over the batch's positions
# (N = B x H x W terms) that the two runs add in another order (per rank, then all-reduced, against one
# process's own order; other kernels): its rounding is up to ~N x 2^-24 of the sum of the terms' magnitudes,
# which is a larger share of the sum where its terms cancel (a BN weight's gradient, sum dy * x_hat, is near
# 0 by construction): 1e-2 of the step. A rank whose step is not averaged, or another sample, is off by the
# order of the step itself.
STEP_ROUNDING = 1e-2


def assert_mean_of_ranks(ddp, played, initial, what):
    """``ddp`` (a state dict) has every floating-point entry equal to the mean of the ``played`` ones, to float
    precision relative to the step taken from ``initial`` (STEP_ROUNDING); and the test is able to see a rank
    that did not average (rank 0's own step is off by far more than the tolerance somewhere)."""
    assert ddp.keys() == played[0].keys() == initial.keys(), what
    mean = {k: sum(p[k].double() for p in played) / len(played) for k, v in ddp.items() if v.is_floating_point()}
    for k, (error, tolerance) in step_errors(ddp, mean, initial, STEP_ROUNDING).items():
        assert error <= tolerance, f"{what} {k}: off the mean of the ranks' steps by {error:.3g} (max {tolerance:.3g})"
    own = step_errors(played[0], mean, initial, STEP_ROUNDING)
    assert any(error > 10 * tolerance for error, tolerance in own.values()), \
        f"{what}: the ranks' steps do not differ; this comparison could not see a missing average"


# flags of one SGD step at a fixed lr on 1 image per rank (no warm-up: the step must be lr x the gradient)
STEP = ["--batch-size", "1", "--warmup-iters", "0", "--lr", "0.02", "--max-iters", "1", "--device", "cpu"]
DETECTION_SCRIPTS = {
    "finetune.py": ["--detector", "fasterrcnn", "--init", "scratch", "--iters", "12", *TINY],
    "direct.py": ["--detector", "fasterrcnn", "--direct-size", "64", "--iters", "10", *SMALL, "--roi-batch-size", "8"],
    "predet.py": ["--backbone", "resnet18", "--preset", "cpu", "--anchor-scale", "0.5", "--predet-dim", "32",
                  "--predet-num-queries", "4", "--predet-post-nms", "32", "--predet-neg", "16", "--predet-pre-nms",
                  "200", "--iters", "10", "--workers", "0", "--print-freq", "1", "--no-tb"],
    # EMA momentum 0.5: the teacher moves by half the online step (at 0.996 its step would drown in float noise)
    "alignDet.py": ["--detector", "fasterrcnn", "--box-head", "2fc", "--iters", "10", "--align-dense-samples", "256",
                    "--align-ema", "0.5", *TINY],
}


# a model_final.pth key -> the key of the same tensor in the script's model (predet.EXPORT's renaming reversed)
FINAL_KEYS = {"finetune.py": str, "direct.py": str, "alignDet.py": lambda k: "detector." + k,
              "predet.py": lambda k: k.replace("rpn.head.conv.", "crpn.conv.").replace("roi_heads.box_head.",
                                                                                         "croi.box_head.")}


@pytest.fixture(scope="module")
def aligndet_inputs(shapes, tmp_path_factory):
    """Random proposals of the training images and a random ResNet-18 backbone checkpoint (image-domain stage)."""
    from common import checkpoint, proposals
    from common.detectors import build_detector
    root = tmp_path_factory.mktemp("aligndet")
    proposals.generate(shapes[1], shapes[3], str(root / "random.json"),
                       {"method": "random", "topk": 50, "nms_iou": 0.5, "ss_max_side": None, "seed": 0})
    torch.manual_seed(5)
    checkpoint.save_final(str(root / "backbone.pth"),
                          checkpoint.final_state(build_detector("fasterrcnn", 5, "resnet18"), keep={"backbone"}),
                          {"method": "test"})
    return ["--align-proposals", str(root / "random.json"), "--backbone-weights", str(root / "backbone.pth")]


@pytest.mark.numerics
@pytest.mark.parametrize("script", sorted(DETECTION_SCRIPTS))
def test_two_processes_take_the_mean_of_their_ranks_steps(script, shapes, tmp_path, request):
    check_two_processes_take_the_mean_of_their_ranks_steps(script, [], shapes, tmp_path, request)


def check_two_processes_take_the_mean_of_their_ranks_steps(script, device_flags, shapes, tmp_path, request):
    """The 2-process run (gloo on the CPU; NCCL with ``device_flags`` --device cuda) against its played ranks."""
    flags = [*DETECTION_SCRIPTS[script], *STEP, *device_flags, *shapes, "--output-dir", str(tmp_path / "{run}")]
    if script == "alignDet.py":
        flags += request.getfixturevalue("aligndet_inputs")
    solo_only = ["--solo-args=--no-eval"] if script == "finetune.py" else []  # the 2-process run evaluates
    proc = run_script(*TORCHRUN, HARNESS, "--reference-first", *solo_only, script, *flags, env=ONE_THREAD)
    ddp = [load(tmp_path / "ddp" / f"rank{r}.pt") for r in (0, 1)]
    played = [load(tmp_path / f"solo{r}" / f"rank{r}.pt") for r in (0, 1)]
    initial = load(tmp_path / "solo0" / "initial.pt")

    # each rank trained on its own shard, the one its played rank saw (sampler built with the real rank)
    for r in (0, 1):
        assert ddp[r]["iteration"] == played[r]["iteration"] == 1
        assert ddp[r]["batches"] == played[r]["batches"] and len(ddp[r]["batches"]) == 1, r
    assert not {i for i, _ in ddp[0]["batches"][0]} & {i for i, _ in ddp[1]["batches"][0]}  # not the same images

    # the logged loss (and each term) is the mean over the ranks of theirs
    terms = [k for k in json.loads(open(tmp_path / "solo0" / "log.txt").readline()) if k.startswith("loss")]
    assert "loss" in terms and len(terms) >= 3, terms
    for key in terms:
        solo = [iteration_losses(tmp_path / f"solo{r}", key)[1] for r in (0, 1)]
        # each rank's loss is its played rank's (the same forward), averaged in float32 (1 ulp: 5e-7 at a loss < 8);
        # log.txt rounds every value to 6 decimals (5e-7 on the 2-process one, 5e-7 on the mean of the two played)
        assert iteration_losses(tmp_path / "ddp", key)[1] == pytest.approx(sum(solo) / 2, abs=2e-6), key

    # one synchronised SGD step: the ranks' parameters agree and are the mean of the played ranks' steps
    params = [{k: v for k, v in s["model"].items() if not is_bn_statistic(k)} for s in (*ddp, *played)]
    for k, v in params[0].items():
        assert torch.equal(v, params[1][k]), f"rank 0 and rank 1 disagree on {k}"
    start = {k: v for k, v in initial["model"].items() if not is_bn_statistic(k)}
    assert_mean_of_ranks(params[0], params[2:], start, script)
    # BN running statistics: per GPU, rank 0's are the run's: its played rank's forward of the same image from
    # the same weights, the same sums but where a kernel picks another order in a DDP process (e.g. by memory
    # layout): a batch's mean and variance over N = H x W values, rel ~ N x 2^-24 at most
    for k, v in ddp[0]["model"].items():
        if is_bn_statistic(k):
            assert torch.allclose(v.double(), played[0]["model"][k].double(), rtol=1e-5, atol=1e-6), k

    if script == "alignDet.py":  # the EMA teacher: the same on every rank, the mean of the played ranks'
        teachers = [s["extra"]["teacher"] for s in (*ddp, *played)]
        for k, v in teachers[0].items():
            assert torch.equal(v, teachers[1][k]), f"the ranks' EMA teachers disagree on {k}"
        assert_mean_of_ranks(teachers[0], teachers[2:], initial["extra"]["teacher"], "EMA teacher")
    final = load(tmp_path / "ddp" / "model_final.pth")
    for k, v in final["model"].items():  # model_final.pth holds the synchronised weights
        assert torch.equal(v, ddp[0]["model"][FINAL_KEYS[script](k)]), k
    assert final["meta"]["world_size"] == 2 and final["meta"]["images_seen"] == 2
    if script == "finetune.py":
        results = json.load(open(tmp_path / "ddp" / "results.json"))
        assert results["images"] == 8  # every val image evaluated exactly once over the two ranks
        assert proc.stdout.count("bbox: AP") == 1  # only rank 0 prints


MONTAGE = ["--backbone", "resnet18", "--montage-size", "128", "--montage-split", "32", "--iters", "20",
           "--warmup-iters", "0", "--lr", "0.01", "--montage-erf-every", "1", "--montage-erf-batch", "2",
           "--max-iters", "2", "--workers", "0", "--print-freq", "1", "--no-tb", "--device", "cpu"]


@pytest.mark.numerics
def test_montage_two_processes_equal_one_process_at_the_global_batch(shapes, tmp_path):
    """2 processes x 1 montage vs 1 process x 2 montages with per-rank BN (--ghost-bn 1): the same samples in
    each global batch, the same losses, the same ERF label weights (recomputed at iterations 0 and 1 from the
    synchronised weights and rank 0's BN statistics) and the same weights."""
    flags = [*MONTAGE, *shapes, "--data-cache", str(tmp_path / "cache")]
    ddp_dir, one_dir = tmp_path / "ddp", tmp_path / "one"
    run_script(*TORCHRUN, HARNESS, "montage.py", *flags, "--batch-size", "1", "--output-dir", ddp_dir,
               env=ONE_THREAD)
    run_script(HARNESS, "--ghost-bn", "1", "montage.py", *flags, "--batch-size", "2", "--output-dir", one_dir,
               env=ONE_THREAD)
    ddp = [load(ddp_dir / f"rank{r}.pt") for r in (0, 1)]
    one = load(one_dir / "rank0.pt")
    assert one["batches"] == [b0 + b1 for b0, b1 in zip(ddp[0]["batches"], ddp[1]["batches"])]
    assert len(one["batches"]) == 2

    a, b = iteration_losses(ddp_dir), iteration_losses(one_dir)
    assert sorted(a) == sorted(b) == [1, 2]
    # iteration 1, from the same weights on the same samples: each logit a float32 sum of up to 4608 products
    # (3 x 3 x 512) added in another order in a batch of 2 than of 1 (~sqrt(4608) x 2^-24 = 4e-6 relative), over
    # 20 layers (~sqrt(20) x that); the loss, a mean over 128 positions' terms, averages them down: rel 1e-5.
    # Iteration 2, from weights that differ by the first step's rounding (1e-2 of the step at most, below):
    # 1e-2 of what a step moves the loss (~4e-3 relative here): rel 1e-4. Another ERF batch moves iteration 1's
    # loss by ~8e-5, a rank's gradient missing from the average moves iteration 2's by ~3e-3.
    assert a[1] == pytest.approx(b[1], rel=1e-5) and a[2] == pytest.approx(b[2], rel=1e-4), (a, b)

    # the weights after the first step: the same step computed in another order (STEP_ROUNDING)
    initial = load(one_dir / "initial.pt")["model"]
    after_one = [s["state_at"][1]["model"] for s in (ddp[0], one)]
    for k, (error, tolerance) in step_errors(*after_one, initial, STEP_ROUNDING).items():
        assert error <= tolerance, f"{k} after step 1: off the 1-process run by {error:.3g} (tolerance {tolerance:.3g})"

    erf = [s["extra"]["erf"]["weights"] for s in (*ddp, one)]
    erf_first = [s["state_at"][1]["extra"]["erf"]["weights"] for s in (*ddp, one)]
    assert torch.equal(erf[0], erf[1])  # every rank holds the whole ERF (the positions are all-reduced)
    # iteration 0's ERF: the same weights, BN statistics and ERF batch, every position's gradient by the same
    # kernels, each on one rank (zeros elsewhere: the all-reduce's sum is exact), so bit-identical
    assert torch.equal(erf_first[0], erf_first[2])
    # iteration 1's: from the weights and rank 0's BN statistics after the first step, which differ between
    # the runs by that step's rounding (1e-2 of the step at most, above); the ERF's shares of |input gradient|
    # move smoothly with the weights but where a ReLU or max-pool decision flips: 5% of the ERF's own change
    # over the step. A rank that kept its own BN statistics (no broadcast) is off by about 20% of it.
    error = (erf[0] - erf[2]).abs().max().item()
    change = (erf[2] - erf_first[2]).abs().max().item()
    assert error <= 0.05 * change, f"ERF label weights off the 1-process run's by {error:.3g} (change {change:.3g})"
    own = erf[0].max(0).values  # 4 x 4 positions: a position missed by the all-reduce would have own weight 1
    assert torch.allclose(erf[0].sum(0), torch.ones(4, 4)) and (own >= 0.7 - 1e-6).all() and (own < 0.99).all()

    for k, v in ddp[0]["model"].items():
        assert torch.equal(v, ddp[1]["model"][k]) or is_bn_statistic(k), f"rank 0 and rank 1 disagree on {k}"
    # after the second step: its gradient is taken at weights that differ by the first step's rounding, through
    # ReLU and max-pool decisions (ties on flat montage regions) that this can flip, each flip moving a
    # position's gradient whole: in a tensor's largest element that is a large share of the step (5% seen with
    # oneDNN's AVX2 kernels), in the tensor's norm a small one. 5% of the two steps' norm: a rank whose second
    # step is not averaged is off by about half of that step.
    for k, v in ddp[0]["model"].items():
        if v.is_floating_point():
            step = (one["model"][k].double() - initial[k].double()).norm().item()
            tolerance = 0.05 * step + 4 * torch.finfo(v.dtype).eps * initial[k].double().norm().item()
            error = (v.double() - one["model"][k].double()).norm().item()
            assert error <= tolerance, f"{k}: off the 1-process run by {error:.3g} (tolerance {tolerance:.3g}, norm)"
    meta = load(ddp_dir / "model_final.pth")["meta"]
    assert meta["world_size"] == 2 and meta["images_seen"] == 2 * 2 * 4 and meta["montages_seen"] == 4
