"""Direct detection pre-training: train the whole detector from random init on the detection set itself.

Li, Zhang, Zhang, "Direct Detection Pre-Training" (arXiv 2106.03112; official code: mmdetection 2.x configs
``configs/direct_pretraining/*``). Instead of ImageNet classification pre-training, the detector (backbone,
FPN, RPN, box head and predictor, mask head) is trained from random initialisation on the target set at LOW
resolution (448x448: long side 448 x U(0.8, 1.2), random crop, pad) with a large per-GPU batch (8) and plain,
trainable per-GPU BatchNorm, at a fixed learning rate. Then finetune.py loads the whole detector and
fine-tunes it at 1333x800 with BatchNorm frozen at the pre-trained statistics (the paper's 'Fixed' mode):
Mask R-CNN R50-FPN box AP 38.2 (ImageNet 1x) -> 40.0 (P1x + 1x) / 41.5 (P3x + 1x) at ~1/11 of ImageNet's cost.

    python direct.py --detector fasterrcnn --backbone resnet18 --direct-size 128 --batch-size 4 \\
        --anchor-scale 0.5 --rpn-batch-size 64 --roi-batch-size 32 --rpn-post-nms-train 300 \\
        --rpn-post-nms-test 100 --warmup-iters 20 --max-iters 60 --workers 2 --device cpu   # CPU demo, synthetic set
    torchrun --standalone --nproc_per_node=8 direct.py --data-path /data/coco --schedule P3x
    torchrun --standalone --nproc_per_node=8 finetune.py --data-path /data/coco \\
        --init runs/direct/maskrcnn_resnet50_448/model_final.pth   # BN frozen, stem+res2 frozen: the paper's fine-tune

Recipe (defaults = the official 8 GPU x 8 image configs):
- data: alpha ~ U(--direct-scale-range 0.8 1.2); rescale keeping aspect so the long side is
  round(alpha x --direct-size); random crop to at most LxL (only a dimension over L is cropped), re-drawn
  until a box survives; horizontal flip (0.5); pad bottom/right to exactly LxL. Masks follow (Mask R-CNN).
  The detector does not resize again (common.detectors.PresizedTransform); L must be a multiple of 32.
- model: --detector maskrcnn (or fasterrcnn | retinanet | fcos), --backbone resnet50, random init, plain BN
  in train mode everywhere (--bn syncbn on request), all stages trainable, FPN without norm, 4conv1fc box
  head without norm (R-CNNs).
- optimisation: SGD momentum 0.9, weight decay 1e-4 and none on norm layers, no gradient clipping.
  lr = 0.08 (R-CNNs) / 0.04 (RetinaNet, FCOS) x global batch / 64, i.e. lr = 0.01 x NGPU x batch-size / 8
  for the R-CNNs; linear warmup from 0.01 x lr over 500 iterations (1000 for RetinaNet, FCOS); then FIXED.
- length: --schedule P1x = 88,000 iterations at global batch 64 (~48 COCO epochs: 12 epochs of the 4x
  repeated set), P2x/P3x/P4x = 2/3/4 x that; the iterations scale with 64 / global batch. --epochs N
  (passes over the training set) overrides; --max-iters stops early (lr is fixed, so nothing else changes).
Output: runs/direct/<detector>_<backbone>_<L>/model_final.pth with the whole detector, and meta (method
"direct", detector, backbone, box head, classes, schedule, input size, iterations, images seen, device-hours).

Departures and choices where the official recipe is silent (each is a flag or stated here):
- a crop that keeps no box is re-drawn on the same image (--direct-crop-tries, default 10), then placed so
  that it contains the centre of a random box; mmdet instead moves on to another random image. Boxes keep
  at least 1 px in each direction (torchvision's SanitizeBoundingBoxes; mmdet keeps any positive size).
- padding is done in the loader (uint8) with the ImageNet mean colour, which the detector's normalisation
  maps to ~0: the official pipeline pads zeros after normalising. Proposals are therefore clipped to the LxL
  canvas rather than to the unpadded image.
- torchvision's detectors differ from mmdet's in details: RPN/RoI sampling and losses (smooth L1 with
  beta 1/9 for the RPN vs L1), P6 of RetinaNet from P5, FCOS heads with GroupNorm (see common/detectors.py).
- FCOS is not in the paper: it gets RetinaNet's lr and warmup. Warmup iterations do not scale with the batch.
- multi-GPU: BN statistics are per GPU (DDP without buffer broadcasting, as mmdet); rank 0's are saved.
"""
import argparse

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from common import checkpoint, cli, dist
from common.coco import CocoDetection, resolve_data
from common.detectors import add_detector_args, build_detector_from_args, check_detector_args, count_parameters
from common.engine import Run, targets_to
from common.loader import build_train_loader
from common.optim import lr_at, param_groups, scaled_lr, set_lr, warmup_help, warmup_iters
from common.rundir import prepare_output_dir
from common.transforms import IMAGENET_MEAN, to_float_batch, train_augment

PAPER_BATCH = 64  # 8 GPUs x 8 images
PAPER_LR = {"fasterrcnn": 0.08, "maskrcnn": 0.08, "retinanet": 0.04, "fcos": 0.04}  # at global batch 64
PAPER_WARMUP = {"fasterrcnn": 500, "maskrcnn": 500, "retinanet": 1000, "fcos": 1000}  # iterations
WARMUP_RATIO = 0.01  # warmup starts at 0.01 x lr
P1X_ITERS = 88_000  # at global batch 64
SCHEDULES = {"P1x": 1, "P2x": 2, "P3x": 3, "P4x": 4}
MEAN_COLOUR = [round(255 * m) for m in IMAGENET_MEAN]  # uint8 padding that normalises to ~0
# How the paper fine-tunes (written into model_final.pth, applied by finetune.py --protocol paper)
FINETUNE_RECIPE = {"bn": "frozen", "trainable_layers": 3,
                   "source": "paper (Direct sec. 3.4, Table 2): BN 'Fixed', statistics and affine frozen; the 1x "
                             "schedule. Not in the paper: stem + res2 frozen (its official configs), lr x1"}


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser(description="Direct detection pre-training of a whole detector",
                                     parents=[cli.base_parser()], add_help=add_help,
                                     formatter_class=cli.HelpFormatter)
    add_detector_args(parser, detector="maskrcnn", backbone="resnet50", bn="bn", trainable_layers=5)
    g = parser.add_argument_group("pre-training")
    g.add_argument("--batch-size", type=int, default=8, help="images per GPU (global batch = NGPU x this)")
    g.add_argument("--lr", type=float, default=None,
                   help="base lr (default: 0.08 R-CNN / 0.04 RetinaNet, FCOS at global batch 64, scaled)")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=1e-4, help="for all but norm layers (those get 0)")
    g.add_argument("--warmup-iters", type=int, default=None, help=warmup_help("500 R-CNN / 1000 RetinaNet, FCOS"))
    g.add_argument("--schedule", default="P1x", choices=sorted(SCHEDULES),
                   help="P1x = 88k iterations at global batch 64 (scaled to the global batch); P3x recommended")
    g.add_argument("--epochs", type=int, default=None, help="train this many passes over the set instead")
    g.add_argument("--iters", type=int, default=None, help="train this many iterations instead (toy runs)")
    # direct specific: the low-resolution pipeline
    g.add_argument("--direct-size", type=int, default=448, help="L: pre-training images are LxL pixels")
    g.add_argument("--direct-scale-range", type=float, nargs=2, default=(0.8, 1.2), metavar=("LO", "HI"),
                   help="alpha range: the long side is rescaled to alpha x L before the crop")
    g.add_argument("--direct-crop-tries", type=int, default=10,
                   help="crops drawn until one keeps a box; then the crop is placed on a random box")
    return parser


def check_direct_args(args):
    if args.bn not in ("bn", "syncbn"):
        raise cli.UserError(f"--bn {args.bn}: Direct pre-trains from random init, so BN must train "
                            "(--bn bn, or syncbn on several GPUs)")
    if args.trainable_layers != 5:
        raise cli.UserError(f"--trainable-layers {args.trainable_layers}: Direct pre-training trains every "
                            "stage of a random network (expected 5)")
    if args.direct_size < 32 or args.direct_size % 32:
        raise cli.UserError(f"--direct-size {args.direct_size}: expected a positive multiple of 32 (the "
                            "detector pads batches to multiples of 32)")
    lo, hi = args.direct_scale_range
    if not 0 < lo <= hi:
        raise cli.UserError(f"--direct-scale-range {lo:g} {hi:g}: expected 0 < LO <= HI")
    if args.direct_crop_tries < 1:
        raise cli.UserError(f"--direct-crop-tries {args.direct_crop_tries}: expected at least 1")
    if args.iters is not None and args.iters < 1:
        raise cli.UserError(f"--iters {args.iters}: expected a positive integer")
    if args.epochs is not None and args.epochs < 1:
        raise cli.UserError(f"--epochs {args.epochs}: expected a positive integer")


# ---------------------------------------------------------------------------------------------------
# The Direct low-resolution pipeline (mmdet's Resize(ratio_range) -> RandomCrop -> RandomFlip -> Pad)
# on transforms.v2: image, boxes (tv_tensors.BoundingBoxes) and masks (tv_tensors.Mask) move together.
# ---------------------------------------------------------------------------------------------------
def image_size(flat_inputs):
    """(H, W) of the sample's image."""
    return tuple(F.get_size(next(x for x in flat_inputs if isinstance(x, tv_tensors.Image))))


class ScaleLongSide(v2.Transform):
    """alpha ~ U(lo, hi), then an aspect-keeping resize so that the long side is round(alpha x size):
    the image fits in an (alpha L) x (alpha L) square (mmdet: Resize(img_scale=(L, L), ratio_range,
    keep_ratio=True)). Image 3xHxW -> 3xH'xW' with max(H', W') = round(alpha L); boxes Nx4 scaled.
    Given to CocoDetection as its load-time ``resize``, which rasterises the masks at H'xW'.
    Not torchvision's v2.ScaleJitter((L, L), (lo, hi)): it draws the same scale but truncates the size where
    mmdet rounds it (a long side of 447 px for alpha L = 447.99)."""

    def __init__(self, size, scale_range):
        super().__init__()
        self.size, self.scale_range = size, scale_range

    def make_params(self, flat_inputs):
        h, w = image_size(flat_inputs)
        lo, hi = self.scale_range
        alpha = lo + (hi - lo) * float(torch.rand(()))
        scale = alpha * self.size / max(h, w)
        return {"size": [max(1, round(h * scale)), max(1, round(w * scale))]}

    def transform(self, inpt, params):
        return self._call_kernel(F.resize, inpt, params["size"], antialias=True)


class CropKeepingBoxes(v2.Transform):
    """Random crop to at most size x size: only a dimension larger than ``size`` is cropped, at a uniform
    offset. An offset whose window keeps no box (>= 1 px in each direction after clipping) is re-drawn, up
    to ``tries`` times; then the window is placed so that it contains the centre of a random box.
    Image 3xHxW -> 3xhxw with h = min(H, L), w = min(W, L); boxes are shifted and clipped (sanitise after)."""

    def __init__(self, size, tries):
        super().__init__()
        self.size, self.tries = size, tries

    def make_params(self, flat_inputs):
        h, w = image_size(flat_inputs)
        ch, cw = min(h, self.size), min(w, self.size)
        boxes = next(x for x in flat_inputs if isinstance(x, tv_tensors.BoundingBoxes))  # Nx4 XYXY
        for _ in range(self.tries):
            top, left = int(torch.randint(h - ch + 1, ())), int(torch.randint(w - cw + 1, ()))
            if len(boxes) == 0 or self.keeps_a_box(boxes, top, left, ch, cw):
                break
        else:  # a window on the centre of a random box: left in [cx - cw, cx], within the image
            x0, y0, x1, y1 = boxes[int(torch.randint(len(boxes), ()))].tolist()
            top = self.offset_around((y0 + y1) / 2, ch, h)
            left = self.offset_around((x0 + x1) / 2, cw, w)
        return {"top": top, "left": left, "height": ch, "width": cw}

    @staticmethod
    def keeps_a_box(boxes, top, left, height, width):
        x0 = (boxes[:, 0] - left).clamp(0, width)  # N
        x1 = (boxes[:, 2] - left).clamp(0, width)
        y0 = (boxes[:, 1] - top).clamp(0, height)
        y1 = (boxes[:, 3] - top).clamp(0, height)
        return bool(((x1 - x0 >= 1) & (y1 - y0 >= 1)).any())

    @staticmethod
    def offset_around(centre, crop, full):
        lo = min(max(0, int(centre - crop) + 1), full - crop)  # the window [left, left + crop) holds centre
        hi = max(min(full - crop, int(centre)), lo)
        return lo + int(torch.randint(hi - lo + 1, ()))

    def transform(self, inpt, params):
        return self._call_kernel(F.crop, inpt, **params)


class PadBottomRight(v2.Transform):
    """Pads bottom and right to exactly size x size: the image with ``fill`` (the ImageNet mean colour,
    ~0 once normalised, like mmdet's zero padding after Normalize), masks with 0; boxes only get the new
    canvas size. Image 3xhxw -> 3xLxL; masks Nxhxw -> NxLxL."""

    def __init__(self, size, fill):
        super().__init__()
        self.size, self.fill = size, fill

    def make_params(self, flat_inputs):
        h, w = image_size(flat_inputs)
        return {"padding": [0, 0, self.size - w, self.size - h]}  # left, top, right, bottom

    def transform(self, inpt, params):
        fill = self.fill if isinstance(inpt, tv_tensors.Image) else 0
        return self._call_kernel(F.pad, inpt, padding=params["padding"], fill=fill)


def direct_train_transform(size=448, crop_tries=10, flip=0.5):
    """After ScaleLongSide: (uint8 image 3xH'xW', target) -> (uint8 image 3xLxL, target with the
    boxes/labels/masks of the kept boxes)."""
    # the fine-tune's augmentation in the middle: flip, then boxes under 1 px dropped with labels and masks
    return v2.Compose([CropKeepingBoxes(size, crop_tries), train_augment(flip), PadBottomRight(size, MEAN_COLOUR)])


# ---------------------------------------------------------------------------------------------------
# The recipe: lr scaled from the paper's global batch 64, warmup then fixed; P-schedules in iterations.
# ---------------------------------------------------------------------------------------------------
def paper_lr(detector, global_batch):
    """0.08 (R-CNNs) or 0.04 (RetinaNet, FCOS) at global batch 64, scaled linearly."""
    return scaled_lr(PAPER_LR[detector], PAPER_BATCH, global_batch)


def schedule_iters(schedule, global_batch):
    """P1x = 88k iterations at global batch 64: the same number of images at any other global batch."""
    return round(SCHEDULES[schedule] * P1X_ITERS * PAPER_BATCH / global_batch)


def direct_lr(it, base_lr, warmup_iters):
    """Linear warmup from 0.01 x base_lr, then base_lr for ever (mmdet policy='fixed')."""
    return lr_at(it, base_lr, "fixed", warmup_iters=warmup_iters, warmup_ratio=WARMUP_RATIO)


def main(args):
    device = dist.init_distributed(args.device, args.dist_timeout)
    cli.check_args(args)
    check_direct_args(args)
    check_detector_args(args, device)
    dist.seed_everything(args.seed)
    data = resolve_data(args)
    prepare_output_dir(args, f"runs/direct/{args.detector}_{args.backbone}_{args.direct_size}")
    print(f"args: {vars(args)}")

    # data: the training set only (nothing is evaluated here); images without boxes are left out, and
    # every batch is B x 3 x L x L, so no aspect-ratio grouping is needed
    train_set = CocoDetection(
        data.train_images, data.train_ann, direct_train_transform(args.direct_size, args.direct_crop_tries),
        with_masks=args.detector == "maskrcnn", keep_empty=False, skip_bad_images=args.skip_bad_images,
        resize=ScaleLongSide(args.direct_size, tuple(args.direct_scale_range)))
    print(f"train ({data.train_ann}): {train_set.summary()}")
    loader = build_train_loader(train_set, args.batch_size, args.workers, args.seed, device)

    # model: the whole detector from random init, plain BN in train mode, every stage trainable
    model = build_detector_from_args(args, train_set.num_classes, imagenet=False)
    model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    print(f"model: {args.detector} {args.backbone} ({args.box_head} box head), {train_set.num_classes} classes, "
          f"{count_parameters(model) / 1e6:.1f}M parameters, BN: {args.bn}")
    model_without_ddp = model  # per-GPU BN statistics, not re-broadcast from rank 0 at every step (mmdet):
    model = dist.data_parallel(model, device, sync_buffers=False)

    # optimisation: SGD, no weight decay on norm layers, warmup then a fixed lr
    global_batch = args.batch_size * dist.get_world_size()
    base_lr = args.lr or paper_lr(args.detector, global_batch)
    optimizer = torch.optim.SGD(param_groups(model_without_ddp, args.weight_decay, norm_weight_decay=0.0),
                                lr=base_lr, momentum=args.momentum)
    iters_per_epoch = loader.batch_sampler.batches_per_epoch
    total = args.iters or (args.epochs * iters_per_epoch if args.epochs else schedule_iters(args.schedule, global_batch))
    warmup = warmup_iters(args.warmup_iters, PAPER_WARMUP[args.detector], total)
    # the lr and warm-up this run uses, given or not: what a resume compares (common.rundir)
    args.lr, args.warmup_iters = base_lr, warmup
    max_iters = min(total, args.max_iters or total)
    length = f"{args.iters} it" if args.iters else f"{args.epochs} epochs" if args.epochs else args.schedule
    print(f"schedule: {length} = {total} iterations at global batch {global_batch} ({total / iters_per_epoch:.1f} "
          f"epochs of {len(train_set)} images), lr {base_lr:g} fixed after {warmup} warmup iterations" +
          (f"; stopping at {max_iters} (--max-iters)" if max_iters < total else ""))
    run = Run(args, method="direct", device=device, iters_per_epoch=iters_per_epoch, max_iters=max_iters,
              samples_per_iter=args.batch_size)
    scaler = torch.amp.GradScaler(device.type, enabled=run.amp == torch.float16)  # loss scaling for fp16 only
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    run.checkpoints_hold(model_without_ddp, optimizer, scaler)
    if args.resume:  # model, optimizer, scaler, iteration and random streams from the newest checkpoint
        run.resume()

    model.train()
    for it, (images, targets) in run.batches(loader):
        lr = set_lr(optimizer, direct_lr(it, base_lr, warmup))
        images = to_float_batch(images, device)  # B x [3 x L x L], normalised inside the detector
        targets = targets_to(targets, device)  # boxes N_i x 4, labels N_i, (masks N_i x L x L)
        with run.autocast():
            losses = model(images, targets)  # e.g. loss_objectness, loss_rpn_box_reg, loss_classifier, ...
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
        run.log_losses(losses, loss, lr, grad_norm=grad_norm)

    meta = run.finish(checkpoint.final_state(model_without_ddp),
                      {"method": "direct", "finetune_recipe": FINETUNE_RECIPE,
                       "detector": args.detector, "backbone": args.backbone,
                       "box_head": args.box_head, "num_classes": train_set.num_classes, "bn": args.bn,
                       "schedule": length, "total_iters": total, "input_size": args.direct_size,
                       "global_batch": global_batch, "lr": base_lr, "trained": "all"})
    print(f"wrote {args.output_dir}/model_final.pth ({meta['iterations']} iterations, {meta['images_seen']} "
          f"images, {meta['device_hours']} device-hours); fine-tune it with finetune.py --init")


if __name__ == "__main__":
    cli.run(main, get_args_parser())
