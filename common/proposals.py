"""Unsupervised box proposals for AlignDet (pseudo boxes) and PreDet (query boxes): the file, its generator and
its loader.

    python -m common.proposals --method ss --data-path /data/coco --out data/proposals/coco_ss.json
    python -m common.proposals --method random                    # the synthetic set, no OpenCV needed

Per image of a COCO-format set (the scripts' data flags; labels are ignored): candidates (selective search,
``--ss-max-side``, or random boxes seeded by ``--seed`` and the image id), the AlignDet/SoCo filter
``ratio3size0008`` with SoCo's fallbacks (images that needed one, and images left without a box, are counted in
the output's "info" and printed), NMS and the top ``--topk`` (common.proposal_boxes says how).
Output: ONE JSON in COCO-annotation form, boxes in original pixels, ``category_id`` 1 ("proposal"):
``{"info": {method, settings, counts}, "images": [{id, file_name, width, height}], "annotations": [{id,
image_id, bbox: [x, y, w, h], category_id: 1, score}], "categories": [{id: 1, name: "proposal"}]}``;
an image's annotations are in descending score order. It is also a valid instances file.
Images are processed in shards by ``--workers`` processes; each finished shard is written atomically to
``<out>.parts/``, so an interrupted run continues where it stopped (same command); the final file is
written atomically and the parts are then removed; Ctrl-C stops with one line saying so (exit status 130).
OpenCV's selective search is randomised (its own
RNG, not seedable from Python): SS files are not bit-reproducible, as the AlignDet author warns.
"""
import argparse
import glob
import json
import multiprocessing
import os
import shutil
import signal
import sys

import torch
from torchvision.ops import box_convert
from tqdm import tqdm

from common import atomic, cli
from common.coco import load_coco_json, read_rgb, resolve_data
from common.errors import UserError
from common.proposal_boxes import (MAX_RATIO, MAX_SIZE_RATIO, MIN_SIZE, SS_MAX_SIDE, random_boxes, rank_scores,
                                   select_proposals, selective_search)


# ---- one image's entry ----
def image_proposals(image_dir, im, settings):
    """Proposals of one image entry -> (list of [x, y, w, h, score], rule used)."""
    width, height = im["width"], im["height"]
    if settings["method"] == "random":
        g = torch.Generator().manual_seed(settings["seed"] * 1000003 + im["id"])
        boxes = random_boxes(width, height, settings["topk"] * 4, g)
        scores = rank_scores(len(boxes))
    else:
        rgb = read_rgb(os.path.join(image_dir, im["file_name"]), (height, width))
        boxes, scores = selective_search(rgb, settings["ss_max_side"])
    boxes, scores, rule = select_proposals(boxes, scores, width, height, settings["topk"], settings["nms_iou"])
    xywh = box_convert(boxes, "xyxy", "xywh")
    return [[round(v, 2) for v in b] + [round(s, 5)] for b, s in zip(xywh.tolist(), scores.tolist())], rule


# ---- the resumable, parallel generator ----
def process_shard(job):
    """Computes one shard and writes it atomically to parts_dir/shard_<index>.json; returns its size."""
    index, images, image_dir, settings, parts_dir = job
    result = {}
    for im in images:
        boxes, rule = image_proposals(image_dir, im, settings)
        result[str(im["id"])] = {"boxes": boxes, "rule": rule}
    atomic.write_json(result, os.path.join(parts_dir, f"shard_{index:06d}.json"))
    return len(images)


def worker_pool(processes):
    """A spawn Pool whose workers ignore SIGINT from their start (an ignored signal stays ignored across exec,
    and Python then installs no KeyboardInterrupt handler): Ctrl-C reaches the whole process group, and only
    this process should stop, once (generate's caller says so), terminating the pool."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return multiprocessing.get_context("spawn").Pool(processes)
    finally:
        signal.signal(signal.SIGINT, previous)


def generate(image_dir, ann_file, out, settings, workers=1, shard_size=64):
    """Writes the proposal JSON ``out`` for every image of ``ann_file``; resumes from ``out``.parts/.
    Returns the info dict written into the file."""
    images = sorted(load_coco_json(ann_file, require_annotations=False)["images"], key=lambda im: im["id"])
    images = [{k: im[k] for k in ("id", "file_name", "width", "height")} for im in images]
    parts_dir = out + ".parts"
    os.makedirs(parts_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(parts_dir, ".tmp-*")):  # a kill during a shard write
        os.remove(stale)
    settings_file = os.path.join(parts_dir, "settings.json")
    key = {**settings, "annotations": os.path.abspath(ann_file), "images": len(images), "shard_size": shard_size}
    if os.path.exists(settings_file):
        with open(settings_file) as f:
            if json.load(f) != key:
                raise UserError(f"{parts_dir}: holds an interrupted run with other settings or data; delete "
                                "it (or pass --overwrite) to start over")
    else:
        atomic.write_json(key, settings_file)
    shards = [images[i:i + shard_size] for i in range(0, len(images), shard_size)]
    todo = [(i, s, image_dir, settings, parts_dir) for i, s in enumerate(shards)
            if not os.path.exists(os.path.join(parts_dir, f"shard_{i:06d}.json"))]
    done = len(images) - sum(len(job[1]) for job in todo)
    if done:
        print(f"resuming: {len(shards) - len(todo)}/{len(shards)} shards ({done} images) already in {parts_dir}")
    with tqdm(total=len(images), initial=done, desc=f"proposals ({settings['method']})", dynamic_ncols=True,
              mininterval=1 if sys.stderr.isatty() else 30) as bar:
        if workers > 1 and len(todo) > 1:
            with worker_pool(min(workers, len(todo))) as pool:
                for n in pool.imap_unordered(process_shard, todo):
                    bar.update(n)
        else:
            for job in todo:
                bar.update(process_shard(job))
    return merge_shards(images, shards, parts_dir, out, settings)


def merge_shards(images, shards, parts_dir, out, settings):
    by_id = {}
    for i in range(len(shards)):
        with open(os.path.join(parts_dir, f"shard_{i:06d}.json")) as f:
            by_id.update(json.load(f))
    annotations, rules = [], {"full": 0, "ratio_only": 0, "min_size_only": 0, "none": 0}
    for im in images:
        entry = by_id[str(im["id"])]
        rules[entry["rule"]] += 1
        for *xywh, score in entry["boxes"]:
            annotations.append({"id": len(annotations) + 1, "image_id": im["id"], "bbox": xywh,
                                "area": round(xywh[2] * xywh[3], 2), "iscrowd": 0, "category_id": 1,
                                "score": score})
    info = {"description": "unsupervised proposals (python -m common.proposals)", **settings,
            "filter": f"w,h >= {MIN_SIZE} px, aspect in [1/{MAX_RATIO:g}, {MAX_RATIO:g}], sqrt(area ratio) "
                      f"<= {MAX_SIZE_RATIO}; SoCo fallback rules for images it empties",
            "images": len(images), "proposals": len(annotations),
            "images_with_fallback_filter": rules["ratio_only"] + rules["min_size_only"],
            "images_without_proposals": rules["none"]}
    atomic.write_json({"info": info, "images": images, "annotations": annotations,
                       "categories": [{"id": 1, "name": "proposal"}]}, out)
    shutil.rmtree(parts_dir)
    return info


# ---- the loader ----
def load_proposals(path, image_ids=None):
    """Reads a proposal JSON -> {image_id: float tensor [K, 4] xyxy in original px}, in the file's
    (descending score) order; images without proposals map to an empty [0, 4] tensor.
    image_ids: the images the caller needs (default: all of the file); one missing is an error.
    Schema problems are a one-line UserError naming the file and the entry."""
    d = load_coco_json(path, require_annotations=True)
    sizes = {im["id"]: (im["width"], im["height"]) for im in d["images"]}
    boxes = {i: [] for i in sizes}
    for n, a in enumerate(d["annotations"]):
        x, y, w, h = a["bbox"]
        width, height = sizes[a["image_id"]]
        if w <= 0 or h <= 0 or x < -1 or y < -1 or x + w > width + 1 or y + h > height + 1:
            raise UserError(f"{path}: annotations[{n}] (id {a['id']}): bbox {a['bbox']} is empty or outside "
                            f"its {width}x{height} image {a['image_id']}")
        boxes[a["image_id"]].append((max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)))
    wanted = sorted(sizes) if image_ids is None else image_ids
    missing = [i for i in wanted if i not in boxes]
    if missing:
        raise UserError(f"{path}: has no entry for image id {missing[0]} ({len(missing)} of the {len(wanted)} "
                        "requested images are missing); regenerate it for this image set")
    return {i: torch.tensor(boxes[i], dtype=torch.float32).reshape(-1, 4) for i in wanted}


def check_coverage(path, ann_file):
    """Refuses (UserError) a proposal file that lacks images of the training set ``ann_file``: a script that
    trains on the file's images would otherwise silently train on a fraction of the set. Images listed
    without a proposal count as covered (they have none)."""
    listed = {im["id"] for im in load_coco_json(path, require_annotations=False)["images"]}
    wanted = sorted(im["id"] for im in load_coco_json(ann_file, require_annotations=False)["images"])
    missing = [i for i in wanted if i not in listed]
    if missing:
        raise UserError(f"{path}: covers {len(wanted) - len(missing)} of the {len(wanted)} images of {ann_file} "
                        f"(no entry for image id {missing[0]}, ...); regenerate it for this image set: python -m "
                        f"common.proposals <the same data flags> --out {path} --overwrite")


def get_args_parser(add_help=True):
    p = argparse.ArgumentParser(description="Unsupervised proposals (selective search or random) -> COCO JSON",
                                add_help=add_help, formatter_class=cli.HelpFormatter)
    g = p.add_argument_group("data (the scripts' data flags; default: the synthetic set)")
    g.add_argument("--data-path", default=None, help="COCO root (its train2017 split) or images/ + annotations.json")
    g.add_argument("--train-images", default=None, help="custom COCO-format set: image folder")
    g.add_argument("--train-ann", default=None, help="custom COCO-format set: annotation JSON (labels unused)")
    g.add_argument("--data-cache", default="data", help="where the synthetic set is generated")
    g.add_argument("--workers", type=int, default=4, help="worker processes (one image at a time each)")
    g = p.add_argument_group("proposals")
    g.add_argument("--method", default="ss", choices=["ss", "random"])
    g.add_argument("--out", default=None, help="output JSON (default <data-cache>/proposals/<set>_<method>.json)")
    g.add_argument("--topk", type=int, default=50, help="proposals kept per image, after NMS")
    g.add_argument("--nms-iou", type=float, default=0.5)
    g.add_argument("--ss-max-side", type=int, default=SS_MAX_SIDE,
                   help="selective search runs on a copy whose long side is at most this (px)")
    g.add_argument("--seed", type=int, default=0, help="--method random: boxes are a function of seed + image id")
    g.add_argument("--shard-size", type=int, default=64, help="images per resumable unit of work")
    g.add_argument("--overwrite", action="store_true", help="recompute an existing output (and its parts)")
    return p


def default_output(data_cache, set_name, method):
    return os.path.join(data_cache, "proposals", f"{set_name}_{method}.json")


def main(args):
    for flag in ("data_path", "train_images", "train_ann"):
        if getattr(args, flag) is not None and not os.path.exists(getattr(args, flag)):
            raise UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: no such file or directory")
    for flag in ("topk", "shard_size", "ss_max_side"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: expected a positive integer")
    if args.workers < 0:
        raise UserError(f"--workers {args.workers}: expected 0 or more")
    if not 0 < args.nms_iou <= 1:
        raise UserError(f"--nms-iou {args.nms_iou:g}: expected a value in (0, 1]")
    data = resolve_data(argparse.Namespace(val_images=None, val_ann=None, **{
        k: getattr(args, k) for k in ("data_path", "train_images", "train_ann", "data_cache")}))
    out = args.out or default_output(args.data_cache, data.name, args.method)
    if os.path.exists(out) and not args.overwrite:
        print(f"{out} exists (pass --overwrite to recompute it)")
        return
    if args.overwrite:
        shutil.rmtree(out + ".parts", ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    settings = {"method": args.method, "topk": args.topk, "nms_iou": args.nms_iou,
                "ss_max_side": args.ss_max_side if args.method == "ss" else None, "seed": args.seed}
    try:
        info = generate(data.train_images, data.train_ann, out, settings, args.workers, args.shard_size)
    except KeyboardInterrupt:
        print(f"interrupted (Ctrl-C): the finished shards are kept in {out}.parts; run the same command to "
              "continue", file=sys.stderr, flush=True)
        sys.exit(128 + signal.SIGINT)
    print(f"wrote {out}: {info['proposals']} proposals for {info['images']} images "
          f"({info['proposals'] / max(info['images'], 1):.1f} per image); fallback filter used for "
          f"{info['images_with_fallback_filter']} images; {info['images_without_proposals']} images without "
          "proposals")


if __name__ == "__main__":
    cli.run(main, get_args_parser())
