"""Montage pre-training: classification pre-training of a detector's backbone on the detection set itself.

"Cheaper Pre-training Lunch: An Efficient Paradigm for Object Detection", Zhou et al., ECCV 2020,
https://arxiv.org/abs/2004.12178 (no public code: our readings where the paper is silent are listed below).
1. Sample extraction, once per dataset + settings, cached in --data-cache/montage/: positives are the
   ground-truth boxes (no crowd, none under --montage-min-box px), each side enlarged by U(0, 0.25) x the
   box size for context and clipped to the image; negatives are random boxes with IoU exactly 0 to every
   object of their image (positives, tiny and crowd boxes), 10 positives : 1 negative. Each sample is
   stored pre-resized (uint8, never upscaled) in ONE memory-mapped file plus an index: no JPEG decoding
   while training.
2. Montage assembly: 2 S-samples (0.5 <= w/h <= 1.5), 1 T (w/h < 0.5) and 1 W (w/h > 1.5) drawn at
   random fill the 224x224 template split 64|160: smaller S top-left (64x64), W top-right (64x160),
   T bottom-left (160x64), larger S bottom-right (160x160). Each sample is resized keeping its aspect to
   cover its region, randomly cropped to it and flipped with p = 0.5: no padding, little distortion.
3. ERF-adaptive dense classification: the ResNet's pooling/FC become a 1x1 conv giving K + 1 logits
   (background = 0) at each of the 7x7 positions. Position (j,k) in region r gets the soft label
   sum_i w_i y_i with w_r = max(tau, ERF share of region r), the rest split over the other regions by
   their ERF shares (Eq. 2, with the factor (1 - w_r) our copy of the paper lost, so that sum_i w_i = 1).
   The ERF (Luo et al.) is recomputed every 5k iterations, starting from the random network. The loss
   is the soft cross-entropy at every position, averaged per region, then over the 4 regions.
4. SGD momentum 0.9, wd 1e-4, 512 montages (2048 samples) per step on 8 GPUs, lr warm-up 0.2 -> 0.8 over
   1250 iterations then cosine to 0, 64k iterations. Lrs scale linearly with the global batch:
   lr = 0.8 / 512 * NGPU * batch-size.
Only the backbone is exported (model_final.pth, in the detector's key space: backbone.body.*);
finetune.py --init loads it and fine-tunes with frozen BN from its statistics.

    python montage.py                                            # synthetic set, CPU or 1 GPU
    python montage.py --backbone resnet18 --montage-size 96 --montage-split 32 --batch-size 16 --iters 200 \\
        --warmup-iters 20 --montage-erf-every 50 --montage-erf-batch 16 --device cpu --workers 1  # CPU demo
    torchrun --standalone --nproc_per_node=8 montage.py --data-path /data/coco      # the paper's recipe
    python finetune.py --data-path /data/coco --detector fasterrcnn --init runs/montage/<run>/model_final.pth

Choices where the paper is silent (all flags): the template split, the enlargement range, the minimum
sizes, the negative box distribution, momentum, flip as the only augmentation, the ERF in eval mode
(BN running statistics, so that images stay independent) on a fresh batch of --montage-erf-batch
montages, and an epoch = (number of S-samples) / 2 montages, each drawn at random from its item seed.
"""
import argparse
import hashlib
import json
import os
import shutil
import time

import cv2
import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.data import default_collate
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import box_iou
from tqdm import tqdm

from common import checkpoint, cli, dist
from common.coco import BadImageError, CocoDetection, resolve_data
from common.detectors import BACKBONES
from common.engine import Run
from common.metrics import FlopCounter
from common.pretext import soft_target_measures
from common.loader import SeededDataset, build_train_loader
from common.optim import lr_at, param_groups, scaled_lr, set_lr, warmup_help, warmup_iters
from common.rundir import prepare_output_dir
from common.transforms import normalize

STRIDE = 32  # of the ResNet's last stage
# the region order everywhere (boxes, masks, labels, weights): top-left (smaller S), top-right (W),
# bottom-left (T), bottom-right (larger S)
S, T, W = 0, 1, 2  # aspect groups
INDEX_DTYPE = np.dtype([("offset", "i8"), ("height", "i4"), ("width", "i4"), ("label", "i4"), ("group", "i1"),
                        ("image", "i4"), ("box", "f4", (4,))])  # box: the crop in image pixels, x0 y0 x1 y1
CACHE_VERSION = 2  # bump when extraction changes: older caches are then left unused
# How the paper fine-tunes (written into model_final.pth, applied by finetune.py --protocol paper)
FINETUNE_RECIPE = {"bn": "frozen", "trainable_layers": 3,
                   "source": "paper (Montage sec. 4.5): BN frozen when transferring. Inferred (not stated): stem "
                             "+ res2 frozen and lr x1, the standard 1x recipe's"}


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser(description="Montage pre-training of a detector backbone",
                                     parents=[cli.base_parser()], add_help=add_help,
                                     formatter_class=cli.HelpFormatter)
    g = parser.add_argument_group("pre-training")
    g.add_argument("--backbone", default="resnet50", help="|".join(BACKBONES) + " (plain BatchNorm)")
    g.add_argument("--batch-size", type=int, default=64,
                   help="montages per GPU, 4 samples each (global batch = NGPU x this; paper: 512)")
    g.add_argument("--lr", type=float, default=None, help="peak lr (default: 0.8 at global batch 512, scaled)")
    g.add_argument("--warmup-factor", type=float, default=0.25,
                   help="the warm-up starts at this fraction of the peak lr (paper: 0.2 -> 0.8)")
    g.add_argument("--warmup-iters", type=int, default=None, help=warmup_help(1250))
    g.add_argument("--iters", type=int, default=64000, help="total iterations (the cosine reaches 0 here)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (not stated by the paper)")
    g.add_argument("--weight-decay", type=float, default=1e-4)
    # montage specific
    g = parser.add_argument_group("montage")
    g.add_argument("--montage-size", type=int, default=224, help="template side (px, a multiple of 32)")
    g.add_argument("--montage-split", type=int, default=64,
                   help="side of the small top-left region (px, a multiple of 32): 64 | 160 on 224")
    g.add_argument("--montage-loss", default="erf", choices=["erf", "blockwise", "global"],
                   help="erf: ERF-adaptive dense; blockwise: region-pooled logits, one label each; "
                        "global: image-pooled logits, area-weighted label (CutMix-like)")
    g.add_argument("--montage-tau", type=float, default=0.7,
                   help="min weight of a position's own label, in (0, 1] (1 = hard)")
    g.add_argument("--montage-erf-every", type=int, default=5000, help="iterations between ERF recomputations")
    g.add_argument("--montage-erf-batch", type=int, default=64, help="montages the ERF is averaged over")
    g.add_argument("--montage-flip", type=float, default=0.5, help="per-sample horizontal flip probability")
    g = parser.add_argument_group("montage sample extraction (cached once per annotation file + these flags)")
    g.add_argument("--montage-enlarge", type=float, default=0.25,
                   help="each side of a GT box grows by U(0, this) x its w or h")
    g.add_argument("--montage-min-box", type=float, default=16, help="GT boxes with w or h under this (px): no sample")
    g.add_argument("--montage-pos-per-neg", type=float, default=10, help="positives per negative (paper 10:1)")
    g.add_argument("--montage-neg-min", type=float, default=32, help="min negative side (px)")
    g.add_argument("--montage-neg-scale", type=float, nargs=2, default=(0.05, 0.5),
                   help="negative sqrt(area) range, as a fraction of the image's sqrt(area)")
    g.add_argument("--montage-neg-aspect", type=float, default=3.0, help="negative w/h in [1/this, this], log-uniform")
    g.add_argument("--montage-neg-tries", type=int, default=100, help="random boxes tried per image for its negatives")
    g.add_argument("--montage-extract-seed", type=int, default=0, help="seed of the extraction (part of the cache key)")
    return parser


def check_montage_args(args):
    size, split = args.montage_size, args.montage_split
    if args.backbone not in BACKBONES:
        raise cli.UserError(f"--backbone {args.backbone}: unknown backbone (expected one of {', '.join(BACKBONES)})")
    if size % STRIDE or split % STRIDE or not 0 < split < size:
        raise cli.UserError(f"--montage-size {size} --montage-split {split}: both must be multiples of {STRIDE} "
                            "with 0 < split < size (the regions must align with the feature cells)")
    if not 0 < args.montage_tau <= 1:  # the own label's minimum weight; at 0 an all-0 ERF gives 0 / 0 weights
        raise cli.UserError(f"--montage-tau {args.montage_tau}: expected a value in (0, 1] (the minimum weight of "
                            "a position's own label; 1 = hard labels)")
    if not 0 <= args.warmup_factor <= 1:
        raise cli.UserError(f"--warmup-factor {args.warmup_factor:g}: expected a value in [0, 1] (the lr starts at "
                            "this fraction of the peak)")
    if args.montage_erf_every < 1 or args.montage_erf_batch < 1:
        raise cli.UserError("--montage-erf-every and --montage-erf-batch must be positive")
    lo, hi = args.montage_neg_scale
    if not 0 < lo <= hi <= 1 or args.montage_neg_aspect < 1 or args.montage_pos_per_neg <= 0:
        raise cli.UserError("negatives: expected 0 < --montage-neg-scale LO <= HI <= 1, --montage-neg-aspect >= 1 "
                            "and --montage-pos-per-neg > 0")


# ------------------------------------------------------------------------------------------------------
# 1. Sample extraction: detection set -> classification samples in one memory-mapped file
# ------------------------------------------------------------------------------------------------------
def aspect_group(w, h):
    """S (0.5 <= w/h <= 1.5), T (w/h < 0.5) or W (w/h > 1.5)."""
    ratio = w / h
    return S if 0.5 <= ratio <= 1.5 else T if ratio < 0.5 else W


def region_boxes(size, split):
    """(y0, x0, y1, x1) of the 4 template regions, in region order."""
    return ((0, 0, split, split), (0, split, split, size), (split, 0, size, split), (split, split, size, size))


def stored_size(group, size, split):
    """(h, w) of the largest region a sample of this group can land in: it is stored to just cover it."""
    big = size - split
    return {S: (big, big), T: (big, split), W: (split, big)}[group]


def resize_to_cover(sample, region_h, region_w):
    """Resizes an h x w x 3 sample, keeping its aspect ratio, to just cover region_h x region_w."""
    h, w = sample.shape[:2]
    scale = max(region_h / h, region_w / w)
    if scale == 1:
        return sample
    size = (max(region_w, round(w * scale)), max(region_h, round(h * scale)))  # cv2 takes (w, h)
    return cv2.resize(sample, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


def plan_samples(dataset, cfg):
    """The sample boxes of every image, without decoding any: [(boxes N x 4 xyxy, labels N)] per record,
    positives (label 1..K) then negatives (label 0). Each image draws from its own RNG; negatives keep the
    running total at floor(positives so far / pos_per_neg), an image that cannot fit its share (crowded or
    small) passing the deficit on to the next ones."""
    plans, positives, negatives = [], 0, 0
    for i, rec in enumerate(tqdm(dataset.records, desc="planning montage samples", mininterval=10)):
        rng = np.random.default_rng([cfg["seed"], i])
        img_h, img_w = rec["size"]
        keep = ((rec["boxes"][:, 2:] - rec["boxes"][:, :2]) >= cfg["min_box"]).all(1)  # no tiny boxes
        gt, labels = rec["boxes"][keep], rec["labels"][keep]  # P x 4, P (crowd boxes are apart, in "crowd")
        grow = rng.uniform(0, cfg["enlarge"], (len(gt), 4)) * np.tile(gt[:, 2:] - gt[:, :2], 2)  # P x 4
        pos = np.clip(gt + grow * [-1, -1, 1, 1], 0, [img_w, img_h, img_w, img_h])  # enlarged, clipped
        positives += len(pos)
        objects = np.concatenate([pos, rec["boxes"], rec["crowd"]])
        neg = random_negatives(rng, img_w, img_h, objects, int(positives / cfg["pos_per_neg"]) - negatives, cfg)
        negatives += len(neg)
        plans.append((np.concatenate([pos, neg]).astype(np.float32),
                      np.concatenate([labels, np.zeros(len(neg), np.int64)])))
    return plans


def random_negatives(rng, img_w, img_h, objects, count, cfg):
    """Up to ``count`` random boxes (x0 y0 x1 y1) whose IoU with every box of ``objects`` is exactly 0."""
    n = cfg["neg_tries"] if count > 0 else 0
    side = rng.uniform(*cfg["neg_scale"], n) * np.sqrt(img_w * img_h)  # sqrt(area) of each try
    aspect = np.exp(rng.uniform(-1, 1, n) * np.log(cfg["neg_aspect"]))  # w / h, log-uniform
    w, h = side * np.sqrt(aspect), side / np.sqrt(aspect)
    x0, y0 = rng.uniform(0, 1, n) * (img_w - w), rng.uniform(0, 1, n) * (img_h - h)
    tries = np.stack([np.floor(x0), np.floor(y0), np.ceil(x0 + w), np.ceil(y0 + h)], 1)  # n x 4, whole pixels
    ok = (w <= img_w) & (h <= img_h) & (np.minimum(w, h) >= cfg["neg_min"])
    if len(objects) and n:
        ok &= box_iou(torch.from_numpy(tries), torch.from_numpy(objects).double()).amax(1).numpy() == 0
    return tries[ok][:count]


class SampleCropper(torch.utils.data.Dataset):
    """Item i = the planned samples of image i as h x w x 3 uint8 arrays, each downscaled to just cover the
    largest region of its aspect group (never upscaled: small objects stay small on disk). DataLoader
    workers decode and crop images in parallel; an unreadable image (--skip-bad-images) gives none."""

    def __init__(self, dataset, plans, template):
        self.dataset, self.plans, self.template = dataset, plans, template

    def __len__(self):
        return len(self.plans)

    def __getitem__(self, i):
        try:
            image = self.dataset.read_image(self.dataset.records[i]).permute(1, 2, 0).numpy()  # H x W x 3
        except BadImageError:
            if not self.dataset.skip_bad_images:
                raise
            return []
        crops = []
        for x0, y0, x1, y1 in self.plans[i][0]:
            patch = image[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))]  # rounded outwards
            region_h, region_w = stored_size(aspect_group(x1 - x0, y1 - y0), *self.template)
            if patch.shape[0] > region_h and patch.shape[1] > region_w:
                patch = resize_to_cover(patch, region_h, region_w)
            crops.append(np.ascontiguousarray(patch))
        return crops


def extraction_settings(args):
    return {"version": CACHE_VERSION, "enlarge": args.montage_enlarge, "min_box": args.montage_min_box,
            "pos_per_neg": args.montage_pos_per_neg, "neg_min": args.montage_neg_min,
            "neg_scale": list(args.montage_neg_scale), "neg_aspect": args.montage_neg_aspect,
            "neg_tries": args.montage_neg_tries, "seed": args.montage_extract_seed,
            "template": [args.montage_size, args.montage_split]}


def sample_cache_dir(args, data):
    """--data-cache/montage/<set>-<hash of the annotation file, the image folder and the settings>."""
    digest = hashlib.sha1()
    with open(data.train_ann, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    digest.update(json.dumps([os.path.abspath(data.train_images), extraction_settings(args)]).encode())
    return os.path.join(args.data_cache, "montage", f"{data.name}-{digest.hexdigest()[:16]}")


def ensure_sample_cache(args, data):
    """Extracts the samples once (rank 0, written atomically); later runs and the other ranks reuse them."""
    path = sample_cache_dir(args, data)
    done = os.path.join(path, "info.json")
    if os.path.exists(done):
        print(f"montage samples: reusing {path}")
    elif dist.is_main_process():
        extract_samples(args, data, path)
    while not os.path.exists(done):  # other ranks: extraction can outlast any collective's timeout
        time.sleep(5)
    return path


def extract_samples(args, data, path):
    """Plans every sample box, crops them (DataLoader workers) into ``path``/pixels.u8, one sample after
    another, and writes index.npy (INDEX_DTYPE rows) and info.json; ``path`` appears complete or not at all."""
    dataset = CocoDetection(data.train_images, data.train_ann, keep_empty=True,
                            skip_bad_images=args.skip_bad_images)
    cfg = extraction_settings(args)
    plans = plan_samples(dataset, cfg)
    tmp = f"{path}.tmp-{os.getpid()}"
    os.makedirs(tmp)
    rows, offset = [], 0
    # batch_size=None, identity collate: each item is one image's list of crops, as the worker made it;
    # its own generator, so that a run that extracts draws the same model init as one that reuses
    loader = torch.utils.data.DataLoader(SampleCropper(dataset, plans, cfg["template"]), batch_size=None,
                                         num_workers=args.workers, collate_fn=list, generator=torch.Generator())
    with open(os.path.join(tmp, "pixels.u8"), "wb") as f:
        for i, crops in enumerate(tqdm(loader, desc=f"extracting montage samples from {data.train_ann}",
                                       mininterval=10)):
            for pixels, box, label in zip(crops, *plans[i]):
                f.write(pixels.tobytes())
                rows.append((offset, *pixels.shape[:2], label, aspect_group(box[2] - box[0], box[3] - box[1]), i, box))
                offset += pixels.size
    index = np.array(rows, dtype=INDEX_DTYPE)
    np.save(os.path.join(tmp, "index.npy"), index)
    info = {"annotations": data.train_ann, "images": data.train_images, "settings": cfg,
            "num_classes": dataset.num_classes, "class_names": dataset.class_names,
            "positives": int((index["label"] > 0).sum()), "negatives": int((index["label"] == 0).sum()),
            "groups": {name: int((index["group"] == g).sum()) for g, name in enumerate("STW")},
            "bytes": offset, "dataset": dataset.summary()}
    with open(os.path.join(tmp, "info.json"), "w") as f:
        json.dump(info, f, indent=1)
    try:
        os.rename(tmp, path)
    except OSError:  # another process finished the same extraction first
        shutil.rmtree(tmp)
    print(f"montage samples: wrote {path}: {info['positives']} positives, {info['negatives']} negatives, "
          f"groups {info['groups']}, {offset / 2**20:.1f} MiB")


# ------------------------------------------------------------------------------------------------------
# 2. Montage assembly
# ------------------------------------------------------------------------------------------------------
class MontageSet(torch.utils.data.Dataset):
    """Montages from the sample cache: item = (uint8 3 x size x size image, int64 (4,) labels in region
    order; 0 = background). The random draws use numpy's global RNG, which SeededDataset seeds per item."""

    def __init__(self, cache, size, split, flip=0.5):
        with open(os.path.join(cache, "info.json")) as f:
            self.info = json.load(f)
        self.index = np.load(os.path.join(cache, "index.npy"))
        self.pixels_path, self.pixels = os.path.join(cache, "pixels.u8"), None  # mapped in each worker
        self.regions, self.flip = region_boxes(size, split), flip
        self.size = size
        self.by_group = [np.flatnonzero(self.index["group"] == g) for g in (S, T, W)]
        box = self.index["box"]
        self.area = (box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1])
        counts = [len(g) for g in self.by_group]
        if counts[S] < 2 or counts[T] < 1 or counts[W] < 1:
            raise cli.UserError(f"{self.info['annotations']}: a montage needs 2 S-, 1 T- and 1 W-samples, but "
                                f"extraction found S={counts[S]} T={counts[T]} W={counts[W]}")

    @property
    def num_classes(self):
        return self.info["num_classes"]

    def __len__(self):
        return len(self.by_group[S]) // 2

    def region_prior(self):
        """4 x (K+1): the label distribution of the samples each region draws from (region order: S, W, T, S)."""
        labels = self.index["label"].astype(np.int64)
        prior = [np.bincount(labels[self.by_group[g]], minlength=self.num_classes + 1) for g in (S, W, T, S)]
        return torch.tensor(np.stack(prior), dtype=torch.float32) / torch.tensor([[len(self.by_group[g])]
                                                                                  for g in (S, W, T, S)])

    def sample(self, i):
        """Sample i of the cache: an h x w x 3 uint8 view into the memory-mapped file."""
        if self.pixels is None:
            self.pixels = np.memmap(self.pixels_path, dtype=np.uint8, mode="r")
        offset, h, w = (int(self.index[i][k]) for k in ("offset", "height", "width"))
        return self.pixels[offset:offset + h * w * 3].reshape(h, w, 3)

    def __getitem__(self, idx):
        s, t, w = self.by_group
        first, second = np.random.randint(len(s)), np.random.randint(len(s) - 1)  # two distinct S-samples in
        small, large = s[first], s[second + (second >= first)]  # O(1), not np.random.choice's O(len) shuffle
        if self.area[small] > self.area[large]:
            small, large = large, small
        chosen = (small, w[np.random.randint(len(w))], t[np.random.randint(len(t))], large)
        canvas = np.empty((self.size, self.size, 3), np.uint8)
        for i, (y0, x0, y1, x1) in zip(chosen, self.regions):
            canvas[y0:y1, x0:x1] = fit_to_region(self.sample(i), y1 - y0, x1 - x0, self.flip)
        labels = torch.from_numpy(self.index["label"][list(chosen)].astype(np.int64))  # 4, region order
        return torch.from_numpy(canvas).permute(2, 0, 1), labels  # 3 x size x size uint8, 4


def fit_to_region(sample, region_h, region_w, flip):
    """Resize (keeping the aspect) to cover region_h x region_w, random crop to it, flip with p = flip."""
    sample = resize_to_cover(sample, region_h, region_w)
    y = np.random.randint(sample.shape[0] - region_h + 1)
    x = np.random.randint(sample.shape[1] - region_w + 1)
    crop = sample[y:y + region_h, x:x + region_w]
    return crop[:, ::-1] if np.random.rand() < flip else crop


def region_masks(size, split):
    """4 x size x size binary masks of the regions (in pixels, or in feature cells with size/32, split/32)."""
    masks = torch.zeros(4, size, size)
    for m, (y0, x0, y1, x1) in zip(masks, region_boxes(size, split)):
        m[y0:y1, x0:x1] = 1
    return masks


# ------------------------------------------------------------------------------------------------------
# 3. Model, ERF-adaptive soft labels and the loss
# ------------------------------------------------------------------------------------------------------
class MontageNet(nn.Module):
    """A torchvision ResNet (plain BN) whose global pooling + FC are replaced by a 1x1 conv: K + 1 logits at
    every position of the last feature map. ``backbone.body`` has exactly the keys of a detector's
    ResNet body (``backbone.body.layer1.0.conv1.weight``...), so finetune.py --init loads it."""

    def __init__(self, backbone, num_classes):
        super().__init__()
        resnet = torchvision.models.get_model(backbone, weights=None, norm_layer=nn.BatchNorm2d)
        self.backbone = nn.Module()
        self.backbone.body = IntermediateLayerGetter(resnet, {"layer4": "out"})
        self.classifier = nn.Conv2d(resnet.fc.in_features, num_classes + 1, kernel_size=1)

    def features(self, x):
        return self.backbone.body(x)["out"]  # B x C' x H/32 x W/32

    def forward(self, x):
        return self.classifier(self.features(x))  # B x (K+1) x H/32 x W/32


def effective_receptive_fields(model, images, run=None):
    """ERF of every output position (Luo et al. 2016): G[j, k] = sum over the batch and RGB of
    |d X[:, :, j, k].sum() / d input|, an h x w x H x W tensor (X = the last feature map, B x C' x h x w).

    BN uses its running statistics (eval mode), so each image's ERF depends on that image only. With several
    processes each computes every world-th position and the maps are summed over ranks; every rank first takes
    rank 0's BN statistics (each rank's own batches have moved its copy since DDP last broadcast rank 0's), so
    that the ERF is the one a single process would compute. run: the common.engine.Run, whose stop point every
    rank reaches before each of the positions every rank has (a stop signal is honoured within one backward
    pass, not at the end of the whole pass)."""
    if dist.is_dist():
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)
    was_training = model.training
    model.eval()
    x = images.detach().requires_grad_(True)  # B x 3 x H x W
    feats = model.features(x)  # B x C' x h x w
    h, w = feats.shape[-2:]
    erf = torch.zeros(h, w, *x.shape[-2:], device=x.device)  # h x w x H x W
    positions_on_every_rank = h * w // dist.get_world_size()
    for i, p in enumerate(range(dist.get_rank(), h * w, dist.get_world_size())):
        if run is not None and i < positions_on_every_rank:
            run.stop_point()
        j, k = divmod(p, w)
        grad, = torch.autograd.grad(feats[:, :, j, k].sum(), x, retain_graph=p + dist.get_world_size() < h * w)
        erf[j, k] = grad.abs().sum((0, 1))  # H x W
    model.train(was_training)
    return dist.all_reduce_sum(erf)


def erf_label_weights(erf, input_masks, cell_region, tau):
    """Eq. 2: w[i, j, k], the weight of region i's label at position (j, k); sum_i w[i, j, k] = 1.

    erf: h x w x H x W ERF maps; input_masks: 4 x H x W region masks; cell_region: h x w region index of
    each position; tau: the own region's minimum weight. Returns 4 x h x w."""
    share = torch.einsum("jkyx,iyx->ijk", erf, input_masks) / erf.sum((2, 3)).clamp_min(1e-30)  # 4 x h x w
    own = F.one_hot(cell_region, 4).permute(2, 0, 1).float()  # 4 x h x w, 1 at the position's region r
    own_weight = (share * own).sum(0).clamp(min=tau)  # h x w: max(tau, share_r)
    others = share * (1 - own)  # 4 x h x w: sum g m^i / sum g, 0 for i = r
    others = others / others.sum(0).clamp_min(1e-30)  # = sum g m^i / sum g (1 - m^r): the masks tile the input
    weights = own * own_weight + (1 - own_weight) * others
    return weights / weights.sum(0)  # sums to 1 already, except where the ERF is all 0: own label only


def montage_loss(logits, labels, cell_region, kind="erf", weights=None, region_prior=None):
    """Classification loss of a batch of montages, and its progress against chance.

    logits: B x (K+1) x h x w; labels: B x 4 (region order, 0 = background); cell_region: h x w region
    index of each position; weights: 4 x h x w soft-label weights (kind "erf"); region_prior: 4 x (K+1), the
    label distribution of each region's samples (MontageSet.region_prior; default uniform).
    erf: soft cross-entropy at every position, averaged per region, then over regions and images;
    blockwise: region-averaged logits (= region-pooled features through the 1x1 conv), one CE per region;
    global: image-averaged logits against the area-weighted mix of the 4 labels.
    Returns (loss, measures): cls_chance is the loss of the best prediction that ignores the image (at each
    position, its target mixed from the region priors instead of the labels), cls_floor the targets' entropy
    (common.pretext)."""
    B, C = logits.shape[:2]
    logits = logits.float()
    onehot = F.one_hot(labels, C).float()  # B x 4 x (K+1)
    prior = torch.full((4, C), 1 / C, device=logits.device) if region_prior is None else region_prior.float()
    cells = F.one_hot(cell_region, 4).permute(2, 0, 1).float()  # 4 x h x w
    area = cells.sum((1, 2))  # 4: cells per region
    if kind == "erf":
        soft = torch.einsum("ijk,bic->bcjk", weights, onehot)  # B x (K+1) x h x w: Eq. 1
        loss_map = -(soft * F.log_softmax(logits, 1)).sum(1)  # B x h x w
        loss = (torch.einsum("bjk,ijk->bi", loss_map, cells) / area).mean()  # mean over B x 4 region losses
        position_weight = (cells / area[:, None, None]).sum(0).flatten() / (4 * B)  # h*w: each position's share
        targets = soft.permute(0, 2, 3, 1).reshape(-1, C)  # B*h*w x (K+1)
        blind = torch.einsum("ijk,ic->jkc", weights, prior).reshape(-1, C).repeat(B, 1)  # the same, from priors
        weight = position_weight.repeat(B)
    elif kind == "blockwise":
        pooled = torch.einsum("bcjk,ijk->bic", logits, cells) / area[:, None]  # B x 4 x (K+1)
        loss = F.cross_entropy(pooled.flatten(0, 1), labels.flatten())
        targets, blind = onehot.flatten(0, 1), prior.repeat(B, 1)  # B*4 x (K+1)
        weight = torch.full((4 * B,), 1 / (4 * B), device=logits.device)
    else:
        mix = area / area.sum()  # 4: each region's share of the image
        targets = torch.einsum("i,bic->bc", mix, onehot)  # B x (K+1)
        loss = -(targets * F.log_softmax(logits.mean((2, 3)), 1)).sum(1).mean()
        blind, weight = (mix @ prior).expand(B, C), torch.full((B,), 1 / B, device=logits.device)
    return loss, soft_target_measures("cls", loss, targets, blind, weight)


class ErfLabels:
    """The ERF-adaptive label weights (4 x h x w), the seconds and the FLOPs spent on them: resumable state
    (Run extra). The ERF passes are counted here, apart from the training iterations' FLOPs."""

    def __init__(self, size, split, tau, device):
        self.input_masks = region_masks(size, split).to(device)  # 4 x H x W
        self.cell_region = region_masks(size // STRIDE, split // STRIDE).argmax(0).to(device)  # h x w
        self.tau, self.weights, self.seconds, self.flops = tau, None, 0.0, 0

    def update(self, model, images, iteration, run=None):
        t = time.perf_counter()
        with FlopCounter() as counter:
            erf = effective_receptive_fields(model, images, run)  # h x w x H x W
        self.flops += counter.total * dist.get_world_size()
        self.weights = erf_label_weights(erf, self.input_masks, self.cell_region, self.tau)
        self.seconds += time.perf_counter() - t
        own = (self.weights * F.one_hot(self.cell_region, 4).permute(2, 0, 1)).sum(0)
        print(f"ERF label weights at iteration {iteration} ({time.perf_counter() - t:.1f} s): own-label weight "
              f"min {own.min():.3f} mean {own.mean():.3f}")

    def state_dict(self):
        return {"weights": self.weights.cpu(), "seconds": self.seconds, "flops": self.flops}

    def load_state_dict(self, state):
        self.weights = state["weights"].to(self.input_masks.device)
        self.seconds, self.flops = state["seconds"], state.get("flops", 0)


def erf_batch(montages, n, iteration, seed, device):
    """n montages that depend only on (seed, iteration): the same on every rank and after a resume."""
    seeded = SeededDataset(montages)
    images = torch.stack([seeded[(i, seed * 1000003 + iteration * 7919 + i)][0] for i in range(n)])
    return normalize(images.to(device).float().div_(255))


# ------------------------------------------------------------------------------------------------------
# 4. Training
# ------------------------------------------------------------------------------------------------------
def main(args):
    device = dist.init_distributed(args.device, args.dist_timeout)
    cli.check_args(args)
    check_montage_args(args)
    dist.seed_everything(args.seed)
    data = resolve_data(args)
    prepare_output_dir(args, f"runs/montage/{args.backbone}_{data.name}_{args.montage_loss}")
    print(f"args: {vars(args)}")

    # data: samples extracted once and cached, montages assembled on the fly
    montages = MontageSet(ensure_sample_cache(args, data), args.montage_size, args.montage_split,
                          args.montage_flip)
    info = montages.info
    print(f"samples: {info['positives']} positives, {info['negatives']} negatives, groups {info['groups']}; "
          f"{len(montages)} montages per epoch")
    loader = build_train_loader(montages, args.batch_size, args.workers, args.seed, device,
                                collate_fn=default_collate)

    # model
    model = MontageNet(args.backbone, montages.num_classes).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model_without_ddp = model
    model = dist.data_parallel(model, device)

    # optimisation: the paper's recipe at global batch 512, lr scaled linearly
    global_batch = args.batch_size * dist.get_world_size()
    base_lr = args.lr or scaled_lr(0.8, 512, global_batch)
    optimizer = torch.optim.SGD(param_groups(model_without_ddp, args.weight_decay), lr=base_lr,
                                momentum=args.momentum)
    max_iters = min(args.iters, args.max_iters or args.iters)
    # the lr and warm-up this run uses, given or not: what a resume compares (common.rundir)
    args.lr, args.warmup_iters = base_lr, warmup_iters(args.warmup_iters, 1250, args.iters)
    print(f"schedule: {args.iters} iterations, global batch {global_batch} montages, "
          f"lr {base_lr * args.warmup_factor:g} -> {base_lr:g} over {args.warmup_iters}, cosine to 0; "
          f"loss {args.montage_loss}" +
          (f"; stopping at {max_iters} (--max-iters)" if max_iters < args.iters else ""))
    erf = ErfLabels(args.montage_size, args.montage_split, args.montage_tau, device)
    region_prior = montages.region_prior().to(device)  # the loss's chance level (montage_loss)
    run = Run(args, method="montage", device=device, iters_per_epoch=loader.batch_sampler.batches_per_epoch,
              max_iters=max_iters, samples_per_iter=4 * args.batch_size)
    scaler = torch.amp.GradScaler(device.type, enabled=run.amp == torch.float16)  # loss scaling for fp16 only
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    run.checkpoints_hold(model_without_ddp, optimizer, scaler, **({"erf": erf} if args.montage_loss == "erf" else {}))
    run.uncounted = lambda it: args.montage_loss == "erf" and it % args.montage_erf_every == 0  # ERF FLOPs: erf.flops
    if args.resume:  # model, optimizer, scaler, ERF label weights, iteration and random streams
        run.resume()

    model.train()
    for it, (images, labels) in run.batches(loader):
        if args.montage_loss == "erf" and it % args.montage_erf_every == 0:
            erf.update(model_without_ddp, erf_batch(montages, args.montage_erf_batch, it, args.seed, device), it,
                       run)
        lr = set_lr(optimizer, lr_at(it, base_lr, "cosine", args.iters, args.warmup_iters, args.warmup_factor))
        images = normalize(images.to(device, non_blocking=True).float().div_(255))  # B x 3 x S x S
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with run.autocast():
            logits = model(images)  # B x (K+1) x S/32 x S/32
        loss_cls, measures = montage_loss(logits, labels.to(device, non_blocking=True), erf.cell_region,
                                          args.montage_loss, erf.weights, region_prior)
        losses = {"loss_cls": loss_cls}
        loss = sum(losses.values())
        if not run.finite(loss, losses):  # agreed over ranks: skipped (--skip-nonfinite) or the run stops
            continue
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        grad_norm = None
        if args.clip_grad > 0:
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.clip_grad)  # the norm before clipping
        scaler.step(optimizer)
        scaler.update()
        run.log_losses(losses, loss, lr, measures, grad_norm)

    meta = run.finish(checkpoint.final_state(model_without_ddp, keep=("backbone",)),
                      {"method": "montage", "finetune_recipe": FINETUNE_RECIPE,
                       "backbone": args.backbone, "num_classes": montages.num_classes,
                       "trained": "backbone", "montages_seen": run.iteration * global_batch,
                       "montage_loss": args.montage_loss, "template": [args.montage_size, args.montage_split],
                       "erf_seconds": round(erf.seconds, 2), "erf_flops": erf.flops,
                       "train_flops": run.train_flops() + erf.flops if run.train_flops() else None})
    print(f"wrote {os.path.join(args.output_dir, 'model_final.pth')}: {meta['images_seen']} samples in "
          f"{meta['wall_clock_s']} s ({meta['device_hours']} device-hours; ERF {erf.seconds:.1f} s)")


if __name__ == "__main__":
    cli.run(main, get_args_parser())
