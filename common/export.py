"""Pre-trained weights for other frameworks: any model_final.pth of this repository as a torchvision or timm
state dict, a detectron2 .pkl or an MMDetection checkpoint (the names: common.formats, one table per format).

    python -m common.export runs/direct/<run>/model_final.pth --to detectron2 --out direct_r50.pkl
    python -m common.export runs/montage/<run>/model_final.pth --to timm --out montage_r50.pth
    python -m common.export runs/predet/<run>/model_final.pth --to mmdet --out predet.pth --backbone-only

The file holds the detector where the checkpoint has more than the backbone (timm: always the backbone alone;
--backbone-only: the backbone alone in any format); the lines printed say what it holds, what was left out
and why, and the config line the framework needs for the same model. A checkpoint whose parts the format has
no names for (a RetinaNet or FCOS head in detectron2's or MMDetection's) is refused with one line, exit 2.
CHECKPOINT may also be a file of another framework that finetune.py --init reads (a torchvision / timm ResNet,
a detectron2 .pkl, an MMDetection checkpoint). What each framework then needs is in the README ("Using the
weights elsewhere").
"""
import argparse
import pickle

from common import checkpoint, cli, formats
from common.detectors import PART_NAMES, part_of

# torchvision normalises RGB images in [0, 1] with ImageNet's mean and std: the same on a 0-255 scale
PIXEL_MEAN, PIXEL_STD = "[123.675, 116.28, 103.53]", "[58.395, 57.12, 57.375]"


def get_args_parser():
    p = argparse.ArgumentParser(description="Export a checkpoint's weights to another framework's names",
                                formatter_class=cli.HelpFormatter)
    p.add_argument("checkpoint", help="a model_final.pth of any script of this repository (or weights --init reads)")
    p.add_argument("--to", required=True, choices=formats.FORMATS, help="the framework whose names to write")
    p.add_argument("--out", required=True, help="the file to write (detectron2: a .pkl)")
    p.add_argument("--backbone-only", action="store_true", help="write the ResNet alone, also of a detector")
    return p


def write(fmt, state, meta, path):
    """The file each framework loads: a bare state dict (torchvision, timm), detectron2's pickle of numpy arrays
    (as MoCo's converter writes it), MMDetection's {"state_dict", "meta"}; written atomically."""
    if fmt == "detectron2":
        obj = {"model": {k: v.numpy() for k, v in state.items()}, "matching_heuristics": True, "meta": meta,
               "__author__": f"{meta.get('method', 'weights')} (python -m common.export)"}
        checkpoint.save(obj, path, dump=pickle.dump)
    else:
        checkpoint.save({"state_dict": state, "meta": meta} if fmt == "mmdet" else state, path)


def usage(fmt, holds, meta, path):
    """What the framework needs to build the same model around the file."""
    backbone = meta.get("backbone", "resnet50")
    depth, k = int(backbone[len("resnet"):]), meta.get("num_classes")
    detector = holds == "detector"
    if fmt == "timm":
        return f"timm.create_model('{backbone}', pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file='{path}'))"
    if fmt == "torchvision":
        load = f"torch.load('{path}', weights_only=True)"
        if detector:
            return (f"the same {meta.get('detector', 'detector')} from torchvision.models.detection on "
                    f"resnet_fpn_backbone('{backbone}')" + f", box head {meta.get('box_head')}" * ('box_head' in meta)
                    + f", {k} + 1 classes" * (k is not None) + f": model.load_state_dict({load}, strict=False) "
                    "(its missing_keys: the parts the checkpoint does not hold)")
        return f"torchvision.models.{backbone}().load_state_dict({load}, strict=False)  # fc.* missing"
    if fmt == "detectron2":
        line = (f"MODEL.WEIGHTS {path} MODEL.RESNETS.DEPTH {depth}" + " MODEL.RESNETS.RES2_OUT_CHANNELS 64" * (depth < 50)
                + f" MODEL.RESNETS.STRIDE_IN_1X1 False MODEL.PIXEL_MEAN \"{PIXEL_MEAN}\" MODEL.PIXEL_STD \"{PIXEL_STD}\""
                " INPUT.FORMAT RGB")
        if detector:
            line += " MODEL.ROI_BOX_HEAD.NUM_CONV 4 MODEL.ROI_BOX_HEAD.NUM_FC 1" * (meta.get("box_head") == "4conv1fc")
            line += " MODEL.MASK_ON True" * (meta.get("detector") == "maskrcnn")
            line += f" MODEL.ROI_HEADS.NUM_CLASSES {k}" * (k is not None)
        return line + "  (a Base-RCNN-FPN config)" * detector
    channels = "[64, 128, 256, 512]" if depth < 50 else "[256, 512, 1024, 2048]"
    backbone_cfg = f"backbone=dict(depth={depth}, ...), neck=dict(in_channels={channels}, ...)"
    if not detector:
        return f"model.backbone = dict(type='ResNet', depth={depth}, init_cfg=dict(type='Pretrained', checkpoint='{path}'))"
    head = "Shared4Conv1FCBBoxHead" if meta.get("box_head") == "4conv1fc" else "Shared2FCBBoxHead"
    return (f"load_from = '{path}' with {backbone_cfg}, roi_head.bbox_head type {head}" + f", num_classes={k}" *
            (k is not None) + f"; its backbone alone: init_cfg=dict(type='Pretrained', prefix='backbone.', checkpoint='{path}')")


def main(args):
    ckpt = checkpoint.load(args.checkpoint, kind="final")
    state, meta = ckpt["model"], dict(ckpt.get("meta", {}))
    meta.pop("imported", None)
    out, holds, left_out = formats.export(state, meta, args.to, args.backbone_only, args.checkpoint)
    if not out:
        raise cli.UserError(f"{args.checkpoint}: nothing to export to {args.to} (no backbone in it)")
    write(args.to, out, meta, args.out)
    described = ", ".join(f"{k}={meta[k]}" for k in ("method", "detector", "backbone", "box_head") if k in meta)
    print(f"{args.checkpoint} ({described}) -> {args.out}: {args.to}, the {holds}, {len(out)} tensors")
    for part in sorted({part_of(k) for k in state}, key=PART_NAMES.index):
        total = sum(part_of(k) == part for k in state)
        n_out, why = left_out.get(part, (0, ""))
        print(f"  {part:<15} {total - n_out:>5} written" + (f", {n_out} left out: {why}" if n_out else ""))
    print(f"use it: {usage(args.to, holds, meta, args.out)}")


if __name__ == "__main__":
    cli.run(main, get_args_parser())
