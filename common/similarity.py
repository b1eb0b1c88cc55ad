"""Does a pre-trained backbone tell boxes apart? PreDet's Fig. 5b for any model_final.pth of this repo.

    python -m common.similarity runs/predet/<run>/model_final.pth --data-path /data/coco
    python -m common.similarity runs/demo/montage/model_final.pth --size 128 --images 20 --device cpu

On validation images resized to size x size, around random reference boxes (the proposal generator's
random boxes: sides >= 32 px, aspect 1/3..3, sqrt-area <= 0.8 of the image), pick boxes whose IoU with the
reference spreads over 0.05-0.95 (one per 0.1-wide bin), pool their 7x7 FPN features with RoIAlign (the
FPN's level rule) and take the cosine similarity to the reference's. A backbone that localises well gives
a high Pearson correlation between IoU and similarity; the table splits it by reference-box size
(sqrt-area / side: small < 0.2 <= medium < 0.4 <= large; with the 32-px minimum side, images under 160 px
have no small references). The checkpoint's backbone and FPN are loaded
into a Faster R-CNN of its backbone (a checkpoint without an FPN, e.g. Montage's, keeps a random FPN: the
report says so). Writes similarity.json and similarity.png next to the checkpoint (or to --output-dir).
"""
import argparse
import json
import os

import torch
import torch.nn.functional as F
from torchvision.ops import MultiScaleRoIAlign, box_iou, clip_boxes_to_image
from torchvision.transforms import v2

from common import checkpoint, cli, dist, proposal_boxes
from common.coco import CocoDetection, resolve_data
from common.detectors import build_detector
from common.transforms import normalize

IOU_BINS = torch.arange(0.05, 0.95, 0.1).tolist()  # [lo, lo + 0.1)


def get_args_parser():
    p = argparse.ArgumentParser(description="IoU-vs-feature-similarity correlation of a checkpoint's backbone",
                                parents=[cli.base_parser()], formatter_class=cli.HelpFormatter)
    p.add_argument("checkpoint", help="a model_final.pth of any script of this repo")
    p.add_argument("--size", type=int, default=480, help="images are resized to size x size (PreDet's views)")
    p.add_argument("--images", type=int, default=100, help="validation images to use")
    p.add_argument("--refs-per-image", type=int, default=8, help="reference boxes per image")
    return p


def pairs_around(ref, size, n=256):
    """Boxes around ``ref`` [4] whose IoU with it falls in each bin of IOU_BINS (at most one per bin):
    n random shifts (up to one box size) and log-scalings (e^+-0.7), the nearest to each bin's centre.
    Returns (boxes [k, 4], iou [k]), k <= 9."""
    wh = (ref[2:] - ref[:2]).repeat(n, 1)
    centre = (ref[2:] + ref[:2]) / 2 + (torch.rand(n, 2) - 0.5) * 2 * wh
    wh = wh * torch.exp(torch.empty(n, 2).uniform_(-0.7, 0.7))
    cand = clip_boxes_to_image(torch.cat([centre - wh / 2, centre + wh / 2], 1), (size, size))
    iou = box_iou(ref[None], cand)[0]
    chosen = [int((iou - lo - 0.05).abs().argmin()) for lo in IOU_BINS]
    chosen = [c for c, lo in zip(chosen, IOU_BINS) if lo <= iou[c] < lo + 0.1]
    return cand[chosen], iou[chosen]


@torch.no_grad()
def main(args):
    device = dist.init_distributed(args.device, args.dist_timeout)
    meta = checkpoint.load(args.checkpoint, kind="final")["meta"]
    detector = build_detector("fasterrcnn", 1, meta.get("backbone", "resnet50"), "frozen")
    checkpoint.load_pretrained(detector, args.checkpoint, parts=["backbone", "fpn"], allow_partial=True)
    backbone, size = detector.backbone.to(device).eval(), args.size
    data = resolve_data(args)
    val = CocoDetection(data.val_images, data.val_ann, v2.Resize((size, size), antialias=True),
                        skip_bad_images=args.skip_bad_images)
    roi_pool = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    pairs = {"small": [], "medium": [], "large": []}  # (iou, similarity) per reference-box size
    n_images = min(args.images, len(val))
    for idx in range(n_images):
        item = val[idx]
        if item is None:  # a bad image, skipped with a warning
            continue
        feats = backbone(normalize(item[0].to(device).float()[None] / 255))  # {level: [1, 256, h, w]}
        for ref in proposal_boxes.random_boxes(size, size, args.refs_per_image, generator):
            boxes, iou = pairs_around(ref, size)
            f = roi_pool(feats, [torch.cat([ref[None], boxes]).to(device)], [(size, size)])  # [1 + k, 256, 7, 7]
            f = F.normalize(f.flatten(1), dim=1)
            side = float((ref[2:] - ref[:2]).prod().sqrt()) / size
            bucket = "small" if side < 0.2 else "medium" if side < 0.4 else "large"
            pairs[bucket] += zip(iou.tolist(), (f[1:] @ f[0]).tolist())
    table = {}
    for bucket, values in pairs.items():
        if len(values) > 2:
            r = float(torch.corrcoef(torch.tensor(values).T)[0, 1])
            table[bucket] = {"pairs": len(values), "pearson": r}
            print(f"{bucket:>7}: {len(values)} pairs, Pearson r(IoU, cosine similarity) = {r:.3f}")
    out = args.output_dir or os.path.dirname(os.path.abspath(args.checkpoint))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "similarity.json"), "w") as f:
        json.dump({"checkpoint": args.checkpoint, "method": meta.get("method"), "images": n_images, **table},
                  f, indent=1)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.bar(list(table), [t["pearson"] for t in table.values()])
    ax.set(ylabel="Pearson r (IoU, similarity)", title=f"{meta.get('method', '?')}: {os.path.basename(out)}")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "similarity.png"), dpi=100)
    print(f"wrote {out}/similarity.json and similarity.png")


if __name__ == "__main__":
    cli.run(main, get_args_parser())
