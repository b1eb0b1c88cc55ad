"""COCO-format detection data: validated annotation loading, the dataset, and where the data lives.

``CocoDetection`` returns ``(image, target)``: a uint8 ``tv_tensors.Image`` (3xHxW, RGB; grayscale, CMYK
and RGBA files are converted) and ``target = {boxes: BoundingBoxes XYXY float, labels: int64 in 1..K,
masks: Mask NxHxW (with_masks), image_id, orig_size: (H, W)}``; with a load-time ``resize`` the image,
boxes and masks are H'xW' while ``orig_size`` stays the file's (H, W) (evaluation maps back to it).
Category ids are mapped to contiguous labels 1..K in id order; ``cat_ids[label - 1]`` maps back for
evaluation. Crowd boxes never enter training targets (the evaluator still sees them through the ground
truth; each record keeps them apart, as 'crowd', for samplers that must avoid them). Fix-ups that COCO
practice allows are applied and counted in a start-up summary: boxes clipped to the image, boxes with
negative size or under 1 px dropped, boxes with a non-finite coordinate (NaN, inf) dropped (from the
evaluation's ground truth too), missing 'area'/'iscrowd' filled. Everything else that is wrong in an
annotation file is a one-line ``UserError`` naming the file and the entry. 16-bit grayscale images are
scaled to 8 bits (v / 257); an image over PIL's pixel limit is a bad image, like an unreadable one.
One module at ~300 lines: what a COCO-format set must hold, the dataset that reads it so, and ``resolve_data``
(the data flags -> the set's files) are what every script imports together.
"""
import collections
import contextlib
import io
import json
import math
import os
import sys

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from common import dist, synthetic
from common.errors import UserError


class BadImageError(UserError):
    pass


def load_coco_json(path, require_annotations=True):
    """Reads and validates a COCO instances file; returns the dict (defaults filled in place)."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: annotation file not found")
    try:
        with open(path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: malformed JSON at line {e.lineno} column {e.colno} ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not a UTF-8 JSON file ({e.reason} at byte {e.start})") from None
    if not isinstance(d, dict):
        raise UserError(f"{path}: expected a JSON object with 'images', 'annotations' and 'categories'")
    for key in ("images", "categories") + (("annotations",) if require_annotations else ()):
        if not isinstance(d.get(key), list):
            raise UserError(f"{path}: missing top-level list '{key}' (expected the COCO instances format)")
    d.setdefault("annotations", [])
    num = (int, float)
    _check_section(path, "images", d["images"], {"id": int, "file_name": str, "width": num, "height": num})
    _check_section(path, "categories", d["categories"], {"id": int, "name": str})
    _check_section(path, "annotations", d["annotations"], {"id": int, "image_id": int, "category_id": int,
                                                           "bbox": list})
    image_ids = {im["id"] for im in d["images"]}
    cat_ids = {c["id"] for c in d["categories"]}
    for i, a in enumerate(d["annotations"]):
        where = f"{path}: annotations[{i}] (id {a['id']})"
        if a["image_id"] not in image_ids:
            raise UserError(f"{where} refers to image_id {a['image_id']}, which is not in 'images'")
        if a["category_id"] not in cat_ids:
            raise UserError(f"{where} has unknown category_id {a['category_id']} (known: {sorted(cat_ids)})")
        if len(a["bbox"]) != 4 or not all(isinstance(v, num) for v in a["bbox"]):
            raise UserError(f"{where}: 'bbox' must be 4 numbers [x, y, width, height], got {a['bbox']}")
        a.setdefault("iscrowd", 0)
        a.setdefault("area", float(a["bbox"][2] * a["bbox"][3]))
    return d


def _check_section(path, section, entries, required):
    seen = set()
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise UserError(f"{path}: {section}[{i}] is not an object")
        for key, typ in required.items():
            if key not in e:
                raise UserError(f"{path}: {section}[{i}] (id {e.get('id')}) is missing required key '{key}'")
            if not isinstance(e[key], typ) or isinstance(e[key], bool):
                raise UserError(f"{path}: {section}[{i}] (id {e.get('id')}): '{key}' has the wrong type "
                                f"({type(e[key]).__name__})")
        if e["id"] in seen:
            raise UserError(f"{path}: duplicate {section} id {e['id']} (at {section}[{i}])")
        seen.add(e["id"])


class CocoDetection(torch.utils.data.Dataset):
    """A COCO-format detection set; see the module docstring for what an item holds.

    keep_empty: keep images without (non-crowd) boxes; evaluation needs them, training usually not.
    skip_bad_images: an unreadable image gives None (with a warning) instead of a BadImageError.
    resize: optional sizing transform, applied while loading, before ``transforms``: any v2 transform whose
        ``make_params`` returns {"size": [h, w]} (v2.RandomShortestSize, direct.ScaleLongSide). The image
        is resized (bilinear, antialiased), boxes are scaled, and polygon masks are rasterised directly at
        [h, w]: 3-4x cheaper than decoding them at full size and resizing them (nearest).
    """

    def __init__(self, image_dir, ann_file, transforms=None, with_masks=False, keep_empty=True,
                 skip_bad_images=False, require_annotations=True, resize=None):
        self.image_dir, self.ann_file = image_dir, ann_file
        self.transforms, self.with_masks, self.skip_bad_images = transforms, with_masks, skip_bad_images
        self.resize = resize
        if not os.path.isdir(image_dir):
            raise UserError(f"{image_dir}: image folder not found")
        d = load_coco_json(ann_file, require_annotations)
        self.cat_ids = sorted(c["id"] for c in d["categories"])
        names = {c["id"]: c["name"] for c in d["categories"]}
        self.class_names = [names[c] for c in self.cat_ids]
        label_of = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        by_image = collections.defaultdict(list)
        for a in d["annotations"]:
            by_image[a["image_id"]].append(a)
        self.stats = collections.Counter(images=len(d["images"]), annotations=len(d["annotations"]))
        self.records = []
        for im in sorted(d["images"], key=lambda im: im["id"]):
            rec = self._record(im, by_image[im["id"]], label_of)
            if len(rec["labels"]) == 0:
                self.stats["images without boxes"] += 1
                if not keep_empty:
                    continue
            self.records.append(rec)
        self.stats["boxes"] = sum(len(r["labels"]) for r in self.records)
        self._coco_gt = None  # pycocotools ground truth, built on first use
        if not self.records:
            raise UserError(f"{ann_file}: no images left after filtering ({self.summary()})")

    def _record(self, im, anns, label_of):
        w, h = im["width"], im["height"]
        boxes, labels, segms, crowd = [], [], [], []
        for a in anns:
            x, y, bw, bh = a["bbox"]
            if not all(math.isfinite(v) for v in a["bbox"]):
                self.stats["boxes with non-finite coordinates (dropped)"] += 1
                continue
            if a["iscrowd"]:
                self.stats["crowd boxes (excluded)"] += 1
                crowd.append((x, y, x + bw, y + bh))
                continue
            if bw < 0 or bh < 0:
                self.stats["boxes with negative size (dropped)"] += 1
                continue
            x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + bw, w), min(y + bh, h)
            if (x0, y0, x1, y1) != (x, y, x + bw, y + bh):
                self.stats["boxes clipped to the image"] += 1
            if x1 - x0 < 1 or y1 - y0 < 1:
                self.stats["degenerate boxes under 1 px (dropped)"] += 1
                continue
            if self.with_masks and not a.get("segmentation"):
                raise UserError(f"{self.ann_file}: annotation id {a['id']} has no 'segmentation', "
                                "which a mask detector needs (use a box-only detector)")
            boxes.append((x0, y0, x1, y1))
            labels.append(label_of[a["category_id"]])
            segms.append(a.get("segmentation"))
        return {"image_id": im["id"], "file_name": im["file_name"], "size": (int(h), int(w)),
                "boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                "labels": np.asarray(labels, dtype=np.int64),
                "crowd": np.asarray(crowd, dtype=np.float64).reshape(-1, 4),  # XYXY, as annotated: not trained on
                # one JSON string per image: cheap to share with forked DataLoader workers
                "segms": json.dumps(segms).encode() if self.with_masks else None}

    def summary(self):
        return ", ".join(f"{v} {k}" for k, v in self.stats.items())

    def __len__(self):
        return len(self.records)

    @property
    def num_classes(self):
        """Number of foreground classes K (labels are 1..K; detectors get K + 1 outputs)."""
        return len(self.cat_ids)

    def coco_gt(self):
        """pycocotools ground truth from the annotation file, built once per dataset, without the boxes that
        have a non-finite coordinate (dropped from training too; COCOeval would match detections to them)."""
        if self._coco_gt is None:
            self._coco_gt = COCO()
            d = load_coco_json(self.ann_file)
            d["annotations"] = [a for a in d["annotations"] if all(math.isfinite(v) for v in a["bbox"])]
            self._coco_gt.dataset = d
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
                self._coco_gt.createIndex()
        return self._coco_gt

    def aspect_ratios(self):
        return [r["size"][1] / r["size"][0] for r in self.records]

    def read_image(self, rec):
        """Decodes one image to a uint8 RGB tensor 3xHxW; raises BadImageError naming the file."""
        rgb = read_rgb(os.path.join(self.image_dir, rec["file_name"]), rec["size"],
                       "; use --skip-bad-images to skip such images")
        return tv_tensors.Image(torch.from_numpy(rgb).permute(2, 0, 1))

    def load(self, idx):
        """The (image, target) of item idx, sized by ``resize`` when given."""
        rec = self.records[idx]
        image = self.read_image(rec)
        h, w = rec["size"]
        boxes = tv_tensors.BoundingBoxes(torch.from_numpy(rec["boxes"]), format="XYXY", canvas_size=(h, w))
        size = [h, w] if self.resize is None else list(self.resize.make_params([image])["size"])
        if size != [h, w]:
            image, boxes = F.resize(image, size, antialias=True), F.resize(boxes, size)
        target = {"boxes": boxes, "labels": torch.from_numpy(rec["labels"]), "image_id": rec["image_id"],
                  "orig_size": (h, w)}
        if self.with_masks:
            target["masks"] = tv_tensors.Mask(decode_masks(json.loads(rec["segms"]), h, w, size))
        return image, target

    def __getitem__(self, idx):
        try:
            image, target = self.load(idx)
        except BadImageError as e:
            if not self.skip_bad_images:
                raise
            print(f"warning: skipping bad image: {e.args[0].split('; use')[0]}", file=sys.stderr, flush=True)
            return None
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def read_rgb(path, size, hint=""):
    """Decodes an image file to a uint8 RGB array HxWx3 (grayscale, CMYK, RGBA, palette converted; 16-bit
    grayscale scaled to 8 bits, v / 257, where PIL's convert would clip it at 255), checking it against its
    annotated size (h, w); raises BadImageError naming the file (``hint`` ends the message), also for an
    image over PIL's pixel limit (``Image.MAX_IMAGE_PIXELS``, a decompression-bomb guard)."""
    try:
        with Image.open(path) as img:
            if img.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):  # 16-bit grayscale ("I": PNG, older PIL)
                gray = np.asarray(img, dtype=np.float64).clip(0, 65535) / 257
                img = Image.fromarray(np.round(gray).astype(np.uint8), "L")
            img = img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise BadImageError(f"{path}: cannot read image ({e}){hint}") from None
    h, w = size
    if (img.height, img.width) != (h, w):
        raise BadImageError(f"{path}: image is {img.width}x{img.height} but its annotation says {w}x{h}")
    return np.array(img)


def decode_masks(segms, h, w, size=None):
    """COCO polygons / RLEs of an h x w image -> uint8 tensor N x size[0] x size[1] (default h x w), row-major.
    Polygons are scaled and rasterised at ``size``; RLEs are decoded at h x w and resized (nearest)."""
    oh, ow = size or (h, w)
    sx, sy = ow / w, oh / h
    masks = []
    for s in segms:
        if isinstance(s, list):  # polygons [[x0, y0, x1, y1, ...], ...] in pixels
            # rasterised with x and y swapped on a w x h canvas: pycocotools writes column-major, so the
            # transpose of its output is the row-major h x w mask without a copy (transposing costs ~1 ms
            # per megapixel, and every later crop, flip, pad and index would pay it on column-major masks)
            yx = []
            for poly in s:  # pycocotools ignores an odd last value: so do we
                xy = np.asarray(poly[:len(poly) // 2 * 2], dtype=np.float64).reshape(-1, 2) * (sx, sy)
                yx.append(xy[:, ::-1].ravel().tolist())
            masks.append(torch.from_numpy(mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(yx, ow, oh))).T))
        else:  # RLE, uncompressed (counts: list) or compressed
            rle = mask_utils.frPyObjects(s, h, w) if isinstance(s.get("counts"), list) else s
            masks.append(F.resize_mask(torch.from_numpy(mask_utils.decode(rle))[None].contiguous(), [oh, ow])[0])
    return torch.stack(masks) if masks else torch.zeros((0, oh, ow), dtype=torch.uint8)


DataSpec = collections.namedtuple("DataSpec", "train_images train_ann val_images val_ann name")


def resolve_data(args):
    """Where the train/val data lives, from --data-path, the custom-set flags, or the synthetic default."""
    custom = (args.train_images, args.train_ann, args.val_images, args.val_ann)
    if any(custom):
        if not (args.train_images and args.train_ann):
            raise UserError("a custom COCO-format set needs both --train-images and --train-ann "
                            "(and --val-images/--val-ann for evaluation)")
        if bool(args.val_images) != bool(args.val_ann):
            raise UserError("--val-images and --val-ann go together")
        if not args.val_images:
            print("note: no --val-images/--val-ann given: evaluating on the training set")
        return DataSpec(args.train_images, args.train_ann, args.val_images or args.train_images,
                        args.val_ann or args.train_ann, os.path.basename(os.path.normpath(args.train_images)))
    if args.data_path:
        root = args.data_path
        ann = os.path.join(root, "annotations", "instances_{}2017.json")
        if os.path.isfile(ann.format("train")):
            return DataSpec(os.path.join(root, "train2017"), ann.format("train"),
                            os.path.join(root, "val2017"), ann.format("val"), "coco")
        if os.path.isfile(os.path.join(root, "annotations.json")) and os.path.isdir(os.path.join(root, "images")):
            print(f"note: {root} has one split (images/ + annotations.json): it is used for training and "
                  "evaluation")
            one = (os.path.join(root, "images"), os.path.join(root, "annotations.json"))
            return DataSpec(*one, *one, os.path.basename(os.path.normpath(root)))
        raise UserError(f"--data-path {root}: expected train2017/, val2017/ and annotations/instances_"
                        "{train,val}2017.json (COCO layout), or images/ + annotations.json")
    root = os.path.join(args.data_cache, "shapes")
    if dist.is_main_process():
        synthetic.ensure(root)
    dist.barrier()
    return DataSpec(os.path.join(root, "train"), os.path.join(root, "annotations", "instances_train.json"),
                    os.path.join(root, "val"), os.path.join(root, "annotations", "instances_val.json"), "shapes")
