"""Fine-tune and evaluate: the one protocol every pre-training method of this repo ends in.

Builds a torchvision detector (Faster R-CNN, Mask R-CNN, RetinaNet or FCOS on a ResNet-FPN), starts it
from ``--init scratch | imagenet | PATH`` (PATH = any model_final.pth of this repo, or the weights of another
framework: common.formats; its per-part transfer report is printed), trains it with the standard COCO recipe
and evaluates it with COCOeval (bbox, and segm for Mask R-CNN). Writes results.json, log.txt, TensorBoard
scalars and model_final.pth to ``--output-dir`` (default runs/finetune/<detector>_<backbone>_<init>).

Defaults are the 1x recipe on 8 GPUs x 2 images: SGD momentum 0.9, weight decay 1e-4, lr 0.02 for the
R-CNNs and 0.01 for RetinaNet/FCOS at global batch 16, scaled linearly to other batches
(lr = 0.02 / 16 * NGPU * batch-size), 500-iteration linear warmup, 12 epochs with lr x0.1 after epochs 8
and 11, single-scale 1333x800 with flip, 4conv1fc box head.

What is trained, and how, follows the fine-tuning recipe of the paper behind --init (--protocol paper, the
default), which every pre-training script writes into its model_final.pth: Direct (Table 2, 'Fixed') and
Montage (sec. 4.5) freeze BN at the pre-trained statistics and the stem + res2; PreDet (sec. 4.2) freezes
nothing and trains BN, with the mask head at 4x the lr and short sides {640..800}; AlignDet (official
configs) keeps the BN statistics fixed but trains its affine parameters, at lr x1.5 and weight decay x0.5.
ImageNet weights get the standard recipe (frozen BN, frozen stem + res2), a random network (scratch)
trains every stage with plain BN (SyncBN on several GPUs). --protocol common gives every pre-trained init
the standard recipe instead, for a comparison in which only the weights differ. A flag given on the
command line (--bn, --trainable-layers, --preset, --lr, --weight-decay, --mask-head-lr-mult) always wins;
the start-up lines say, for each setting, what was applied and where it came from. So do --detector,
--backbone and --box-head: when not given, they are those of --init (its meta), else Mask R-CNN R50-FPN with
the 4conv1fc head. On a CPU, a run that would take hours says so at start-up (README: CPU configuration).

    python finetune.py --init scratch                                   # synthetic set, CPU or 1 GPU
    torchrun --nproc_per_node=8 finetune.py --data-path /data/coco --init runs/direct/<run>/model_final.pth
    python finetune.py --data-path /data/coco --init imagenet --eval-only --resume runs/finetune/<run>/checkpoint_last.pth
"""
import argparse
import os

import torch

from common import atomic, checkpoint, cli, dist
from common.coco import CocoDetection, resolve_data
from common.detectors import (add_detector_args, add_pad_multiple_arg, build_detector_from_args, check_detector_args,
                              pad_multiple_for)
from common.coco_eval import evaluate
from common.engine import Run, targets_to
from common.loader import aspect_groups, build_eval_loader, build_train_loader
from common.optim import LR_1X, lr_at, param_groups, schedule_1x, set_lr, warmup_help, warmup_iters
from common.rundir import prepare_output_dir
from common.transforms import PRESETS, eval_resize, to_float_batch, train_augment, train_resize

DEFAULT_ARCHITECTURE = {"detector": "maskrcnn", "backbone": "resnet50", "box_head": "4conv1fc"}
SCHEDULES = {"1x": (12, (8, 11)), "2x": (24, (16, 22))}  # epochs, lr steps (epochs)


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser(description="Fine-tune a detector from any pre-training and evaluate it",
                                     parents=[cli.base_parser()], add_help=add_help,
                                     formatter_class=cli.HelpFormatter)
    add_detector_args(parser, detector=None, backbone=None, bn=None, trainable_layers=None)
    parser.set_defaults(box_head=None)  # None: --init's (its meta), else DEFAULT_ARCHITECTURE (resolve_architecture)
    for action in parser._actions:
        if action.dest in DEFAULT_ARCHITECTURE:
            action.help += f" (default: --init's, from its meta; else {DEFAULT_ARCHITECTURE[action.dest]})"
    g = parser.add_argument_group("fine-tuning")
    g.add_argument("--init", default="imagenet", help="scratch | imagenet | PATH to a model_final.pth, a torchvision / "
                   "timm ResNet state dict, a detectron2 .pkl (MoCo's layout) or an MMDetection checkpoint")
    g.add_argument("--init-partial", action="store_true",
                   help="load the keys of --init that fit this model and leave the rest fresh")
    g.add_argument("--protocol", default="paper", choices=["paper", "common"],
                   help="paper: the fine-tuning recipe of --init's paper (from its meta); common: the standard "
                        "recipe for every pre-trained init (frozen BN, stem + res2 frozen, lr x1)")
    g.add_argument("--batch-size", type=int, default=2, help="images per GPU (global batch = NGPU x this)")
    g.add_argument("--base-lr", type=float, default=None,
                   help="the 1x lr of this run before the recipe's multiplier (default: 0.02 R-CNN / 0.01 "
                        "RetinaNet, FCOS at global batch 16, scaled linearly)")
    g.add_argument("--lr", type=float, default=None, help="the lr itself: replaces --base-lr x the recipe's multiplier")
    g.add_argument("--mask-head-lr-mult", type=float, default=None,
                   help="Mask R-CNN mask head lr multiplier (default: the recipe's; PreDet: 4)")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=None, help="default 1e-4 x the recipe's multiplier")
    g.add_argument("--schedule", default="1x", choices=sorted(SCHEDULES), help="1x = 12 epochs, 2x = 24")
    g.add_argument("--epochs", type=int, default=None, help="override the schedule's epochs")
    g.add_argument("--lr-steps", type=int, nargs="+", default=None, help="epochs after which lr x0.1")
    g.add_argument("--iters", type=int, default=None,
                   help="train this many iterations instead of epochs; lr steps at 8/12 and 11/12 of them")
    g.add_argument("--warmup-iters", type=int, default=None, help=warmup_help(500))
    g.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="image-size preset (transforms.py; default: the recipe's, 800 = single-scale 1333x800)")
    add_pad_multiple_arg(g)
    g.add_argument("--keep-empty-images", action="store_true", help="train on images without boxes too")
    g.add_argument("--eval-only", action="store_true", help="evaluate --init or --resume, no training")
    g.add_argument("--eval-every", type=int, default=0, help="also evaluate every N epochs (0: at the end only)")
    g.add_argument("--no-eval", action="store_true", help="train only (benchmarks); evaluate later with --eval-only")
    g.add_argument("--eval-batch-size", type=int, default=2)
    g.add_argument("--eval-backend", default="auto", choices=["auto", "pycocotools", "faster"],
                   help="auto = faster-coco-eval when installed (same stats), else pycocotools")
    return parser


# Recipes without a paper behind them (a pre-training script writes its paper's into its checkpoint):
# the standard 1x recipe of torchvision's detection references and detectron2 for pre-trained weights, and
# every stage with plain BN for a random network (nothing to keep frozen in it).
STANDARD_RECIPE = {"bn": "frozen", "trainable_layers": 3, "lr_mult": 1.0, "wd_mult": 1.0,
                   "mask_head_lr_mult": 1.0, "preset": "800",
                   "source": "the standard 1x recipe: BN frozen at the pre-trained statistics, stem + res2 frozen"}
SCRATCH_RECIPE = dict(STANDARD_RECIPE, bn="train", trainable_layers=5,
                      source="a random network: every stage trains, BN in train mode")


def resolve_architecture(args, meta):
    """--detector, --backbone, --box-head: given on the command line, else the checkpoint's (the meta of --init),
    else DEFAULT_ARCHITECTURE; each printed with where it came from. One exception: PreDet exports R-CNN keys
    (its meta says fasterrcnn) for a paper that fine-tunes Mask R-CNN, which its recipe's mask-head lr
    multiplier says: an R-CNN checkpoint whose recipe sets one is fine-tuned as Mask R-CNN."""
    print(f"architecture for {args.init}:")
    recipe = meta.get("finetune_recipe", {})
    for flag, default in DEFAULT_ARCHITECTURE.items():
        theirs = meta.get(flag)
        name = f"--{flag.replace('_', '-')}"
        if getattr(args, flag) is not None:
            print(f"  {name} {getattr(args, flag)}: given on the command line"
                  + (f" (the checkpoint's: {theirs})" if theirs else ""))
        elif flag == "detector" and theirs in ("fasterrcnn", "maskrcnn") and "mask_head_lr_mult" in recipe:
            args.detector = "maskrcnn"
            print(f"  {name} maskrcnn: the recipe's (its mask-head lr multiplier is Mask R-CNN's; the "
                  f"checkpoint's keys, {theirs}, fit it)")
        elif theirs:
            setattr(args, flag, theirs)
            print(f"  {name} {theirs}: the checkpoint's (its meta)")
        else:
            setattr(args, flag, default)
            print(f"  {name} {default}: the default")


def resolve_recipe(args, device):
    """Reads the meta of --init and settles the architecture (resolve_architecture, then checked) and every
    fine-tuning setting: a flag given on the command line, else the recipe (--protocol), each printed with
    where it came from. Returns (meta, method, recipe, lr)."""
    meta = {}
    if args.init not in ("scratch", "imagenet"):
        meta = checkpoint.load(args.init, kind="final")["meta"]
    resolve_architecture(args, meta)
    check_detector_args(args, device)
    method = meta.get("method", args.init if args.init in ("scratch", "imagenet") else "checkpoint")
    if method == "scratch":
        recipe = SCRATCH_RECIPE
    elif args.protocol == "paper" and "finetune_recipe" in meta:
        recipe = dict(STANDARD_RECIPE, **meta["finetune_recipe"])
    else:
        why = "--protocol common" if args.protocol == "common" else \
            "ImageNet weights" if method == "imagenet" else "no recipe in the checkpoint's meta"
        recipe = dict(STANDARD_RECIPE, source=f"{STANDARD_RECIPE['source']} ({why})")
    print(f"fine-tuning recipe for {args.init} (method {method}, --protocol {args.protocol}): {recipe['source']}")

    def setting(flag, value):
        given = getattr(args, flag) is not None
        applied = getattr(args, flag) if given else value
        print(f"  --{flag.replace('_', '-')} {applied:{'g' if isinstance(applied, float) else ''}}: "
              + (f"given on the command line (the recipe's: {value})" if given else "the recipe's"))
        return applied

    multi_gpu = dist.get_world_size() > 1 and device.type == "cuda"
    trained_bn = "syncbn" if multi_gpu else "bn"
    args.bn = setting("bn", trained_bn if recipe["bn"] == "train" else recipe["bn"])
    args.trainable_layers = setting("trainable_layers", recipe["trainable_layers"])
    args.preset = setting("preset", recipe["preset"])
    args.weight_decay = setting("weight_decay", 1e-4 * recipe["wd_mult"])
    if args.detector == "maskrcnn":
        args.mask_head_lr_mult = setting("mask_head_lr_mult", recipe["mask_head_lr_mult"])
    if args.lr is not None:
        print(f"  --lr {args.lr:g}: given on the command line (the recipe's multiplier x{recipe['lr_mult']:g} "
              "not applied)")
        return meta, method, recipe, args.lr
    global_batch = args.batch_size * dist.get_world_size()
    base = args.base_lr if args.base_lr is not None else LR_1X[args.detector] * global_batch / 16
    print(f"  --lr {base * recipe['lr_mult']:g}: {base:g} ("
          + ("--base-lr" if args.base_lr is not None else
             f"the 1x lr: {LR_1X[args.detector]:g} at global batch 16, scaled to {global_batch}")
          + f") x the recipe's multiplier {recipe['lr_mult']:g}")
    return meta, method, recipe, base * recipe["lr_mult"]


def main(args):
    device = dist.init_distributed(args.device, args.dist_timeout)
    cli.check_args(args)
    init_meta, method, recipe, base_lr = resolve_recipe(args, device)  # checks the detector flags once filled
    dist.seed_everything(args.seed)
    data = resolve_data(args)
    init_name = args.init if method in ("scratch", "imagenet") else \
        f"{method}-{os.path.basename(os.path.dirname(os.path.abspath(args.init)))}"
    prepare_output_dir(args, f"runs/finetune/{args.detector}_{args.backbone}_{init_name}")
    print(f"args: {vars(args)}")

    # data
    with_masks = args.detector == "maskrcnn"
    train_set = CocoDetection(data.train_images, data.train_ann, train_augment(), with_masks,
                              keep_empty=args.keep_empty_images, skip_bad_images=args.skip_bad_images,
                              resize=train_resize(args.preset))
    val_set = CocoDetection(data.val_images, data.val_ann, eval_resize(args.preset), with_masks=False,
                            skip_bad_images=args.skip_bad_images)
    print(f"train ({data.train_ann}): {train_set.summary()}")
    print(f"val ({data.val_ann}): {val_set.summary()}")
    if val_set.cat_ids != train_set.cat_ids:
        raise cli.UserError(f"{data.val_ann}: its categories differ from {data.train_ann}'s")
    train_loader = build_train_loader(train_set, args.batch_size, args.workers, args.seed, device,
                                      group_ids=aspect_groups(train_set))
    val_loader = build_eval_loader(val_set, args.eval_batch_size, args.workers, device)

    # model
    model = build_detector_from_args(args, train_set.num_classes, imagenet=args.init == "imagenet",
                                     pad_multiple=pad_multiple_for(args, device), max_side=PRESETS[args.preset][1])
    if args.init not in ("scratch", "imagenet"):
        checkpoint.load_pretrained(model, args.init, allow_partial=args.init_partial)
    model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model_without_ddp = model
    model = dist.data_parallel(model, device)

    # optimisation: the 1x schedule, at the recipe's lr (resolve_recipe)
    global_batch = args.batch_size * dist.get_world_size()
    mask_head = {"roi_heads.mask_head.": args.mask_head_lr_mult, "roi_heads.mask_predictor.": args.mask_head_lr_mult}
    optimizer = torch.optim.SGD(param_groups(model_without_ddp, args.weight_decay,
                                             lr_mults=mask_head if args.detector == "maskrcnn" else None),
                                lr=base_lr, momentum=args.momentum)
    iters_per_epoch = train_loader.batch_sampler.batches_per_epoch
    epochs, steps = SCHEDULES[args.schedule]
    epochs, steps = args.epochs or epochs, args.lr_steps or steps
    total, lr_steps = schedule_1x(args.iters, epochs, steps, iters_per_epoch)
    max_iters = min(total, args.max_iters or total)
    # the lr and warm-up this run uses, given or not: what a resume compares (common.rundir)
    args.lr, args.warmup_iters = base_lr, warmup_iters(args.warmup_iters, 500, total)
    print(f"schedule: {total} iterations ({iters_per_epoch}/epoch, global batch {global_batch}), "
          f"lr {base_lr:g} x0.1 at {lr_steps}, warmup {args.warmup_iters}" +
          (f"; stopping at {max_iters} (--max-iters)" if max_iters < total else ""))
    if not args.eval_only:
        cli.warn_if_slow_on_cpu(device, max_iters, args.batch_size, args.preset)
    run = Run(args, method="finetune", device=device, iters_per_epoch=iters_per_epoch, max_iters=max_iters,
              samples_per_iter=args.batch_size)
    scaler = torch.amp.GradScaler(device.type, enabled=run.amp == torch.float16)  # loss scaling for fp16 only
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    run.checkpoints_hold(model_without_ddp, optimizer, scaler)
    if args.resume:  # model, optimizer, scaler, iteration and random streams from the newest checkpoint
        run.resume()
    if args.eval_only:
        stats = evaluate(model_without_ddp, val_loader, device, run.amp, args.eval_backend, run)
        write_results(args, stats, init_meta, run.compute_meta(), eval_only=True)
        return

    def on_epoch_end(epoch):
        if args.eval_every and (epoch + 1) % args.eval_every == 0 and run.iteration < max_iters:
            stats = evaluate(model_without_ddp, val_loader, device, run.amp, args.eval_backend, run)
            run.log.scalars(epoch + 1, stats["bbox"], prefix="test/bbox_")
            return {f"test_bbox_{k}": v for k, v in stats["bbox"].items()}

    model.train()
    for it, (images, targets) in run.batches(train_loader, on_epoch_end):
        lr = set_lr(optimizer, lr_at(it, base_lr, "step", total, args.warmup_iters, 0.001, lr_steps))
        images, targets = to_float_batch(images, device), targets_to(targets, device)
        with run.autocast():
            losses = model(images, targets)  # loss_classifier, loss_box_reg, (loss_mask), loss_objectness, ...
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
                      {"method": "finetune", "detector": args.detector, "backbone": args.backbone,
                       "box_head": args.box_head, "num_classes": train_set.num_classes, "init": args.init,
                       "recipe": {"protocol": args.protocol, "source": recipe["source"], "bn": args.bn,
                                  "trainable_layers": args.trainable_layers, "lr": base_lr,
                                  "weight_decay": args.weight_decay, "preset": args.preset,
                                  "mask_head_lr_mult": args.mask_head_lr_mult},
                       "schedule": f"{total} it" if args.iters else f"{epochs} ep" if args.epochs else args.schedule,
                       "trained": "all" if args.trainable_layers == 5 else "all but the frozen ResNet stages"})
    if args.no_eval:
        return
    stats = evaluate(model_without_ddp, val_loader, device, run.amp, args.eval_backend, run)
    run.log.jsonl({"iteration": run.iteration, **{f"test_bbox_{k}": v for k, v in stats["bbox"].items()}})
    write_results(args, stats, init_meta, meta)


def write_results(args, stats, init_meta, meta, eval_only=False):
    """results.json: every COCO stat, the compute of this run and of the pre-training it started from."""
    results = {"detector": args.detector, "backbone": args.backbone, "init": args.init,
               "init_method": init_meta.get("method", args.init), "pretrain": init_meta,
               "finetune": meta, "eval_only": eval_only, "seed": args.seed, **stats}
    if dist.is_main_process():
        atomic.write_json(results, os.path.join(args.output_dir, "results.json"), indent=1)  # whole or not at all
        print_table(stats)


def print_table(stats):
    for iou_type in ("bbox", "segm"):
        if iou_type in stats:
            s = stats[iou_type]
            print(f"{iou_type:>5}: " + "  ".join(f"{k} {v:.3f}" if v >= 0 else f"{k} n/a" for k, v in s.items()))
    print(f"evaluated {stats['images']} images in {stats['seconds']} s")


if __name__ == "__main__":
    cli.run(main, get_args_parser())
