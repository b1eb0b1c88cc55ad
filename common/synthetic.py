"""A deterministic COCO-format "shapes" detection dataset, the embedded default of every script.

    python -m common.synthetic --out data/shapes            # train 512 + val 128 images, seed 0

Writes ``DIR/train/*.jpg``, ``DIR/val/*.jpg`` and ``DIR/annotations/instances_{train,val}.json`` with
polygon masks. Five categories differ in shape and in colour family (with per-object jitter): disc,
square, triangle, bar (aspect 3-4.5, horizontal or vertical) and ring. Category ids have gaps (1, 2, 4,
7, 9), as COCO's do, so the contiguous-label mapping is exercised. Objects span COCO's small / medium /
large areas, overlap each other partially (occlusion), and lie on textured backgrounds (smooth colour
gradients, noise and faint stripes). Image sizes vary between 96 and 224 px, and about 4% of the images
hold no object. The same seed always writes the same bytes.
"""
import argparse
import json
import math
import os
import shutil
import tempfile

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from common.cli import HelpFormatter

CATEGORIES = [  # (coco id, name, base RGB colour)
    (1, "disc", (220, 50, 40)),
    (2, "square", (40, 190, 60)),
    (4, "triangle", (40, 80, 230)),
    (7, "bar", (235, 200, 30)),
    (9, "ring", (200, 60, 210)),
]


def _polygon(kind, cx, cy, w, h):
    """Outline of one object as a list of (x, y) points (the ring's outer circle; its hole is drawn)."""
    if kind in ("disc", "ring"):
        return [(cx + w / 2 * math.cos(t), cy + h / 2 * math.sin(t))
                for t in np.linspace(0, 2 * math.pi, 24, endpoint=False)]
    if kind == "triangle":
        return [(cx, cy - h / 2), (cx + w / 2, cy + h / 2), (cx - w / 2, cy + h / 2)]
    return [(cx - w / 2, cy - h / 2), (cx + w / 2, cy - h / 2), (cx + w / 2, cy + h / 2), (cx - w / 2, cy + h / 2)]


def _background(rng, width, height):
    """Textured background: a random two-colour gradient, Gaussian noise and faint stripes."""
    c0, c1 = rng.uniform(60, 190, size=(2, 3))
    t = np.linspace(0, 1, width if rng.rand() < 0.5 else height)
    grad = c0[None, :] * (1 - t[:, None]) + c1[None, :] * t[:, None]
    img = np.broadcast_to(grad[None, :, :] if len(t) == width else grad[:, None, :], (height, width, 3)).copy()
    img += rng.normal(0, 10, size=img.shape)
    period = rng.randint(6, 20)
    stripes = (np.arange(width)[None, :] + rng.randint(0, 2) * np.arange(height)[:, None]) % period < period // 3
    img[stripes] += rng.uniform(-12, 12)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _draw_image(rng, image_id, ann_start):
    width, height = (int(v) for v in rng.randint(96, 225, size=2))
    img = _background(rng, width, height)
    draw = ImageDraw.Draw(img)
    anns, placed = [], []
    n_objects = 0 if rng.rand() < 0.04 else rng.randint(1, 6)
    for _ in range(n_objects):
        for _attempt in range(20):  # find a place that overlaps earlier objects only partially
            cat_id, kind, colour = CATEGORIES[rng.randint(len(CATEGORIES))]
            side = math.exp(rng.uniform(math.log(14), math.log(0.75 * min(width, height))))
            w = h = side
            if kind == "bar":
                aspect = rng.uniform(3, 4.5)
                w, h = (side, side / aspect) if rng.rand() < 0.5 else (side / aspect, side)
            elif kind in ("disc", "ring", "triangle"):
                aspect = rng.uniform(0.75, 1.33)
                w, h = side * aspect ** 0.5, side / aspect ** 0.5
            cx, cy = rng.uniform(w / 2, width - w / 2), rng.uniform(h / 2, height - h / 2)
            box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
            if all(_overlap_fraction(box, p) < 0.4 for p in placed):
                break
        else:
            continue
        placed.append(box)
        poly = _polygon(kind, cx, cy, w, h)
        fill = tuple(int(np.clip(c + rng.uniform(-30, 30), 0, 255)) for c in colour)
        if kind == "ring":  # a thick outline: the hole shows the background (the mask is the outer disc)
            draw.ellipse(box, outline=fill, width=max(2, int(min(w, h) / 5)))
        else:
            draw.polygon(poly, fill=fill)
        xs, ys = [p[0] for p in poly], [p[1] for p in poly]
        x0, y0 = max(min(xs), 0.0), max(min(ys), 0.0)
        x1, y1 = min(max(xs), width), min(max(ys), height)
        anns.append({"id": ann_start + len(anns), "image_id": image_id, "category_id": cat_id,
                     "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                     "area": round(_polygon_area(poly), 2), "iscrowd": 0,
                     "segmentation": [[round(v, 2) for p in poly for v in p]]})
    if rng.rand() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
    return img, anns


def _overlap_fraction(a, b):
    """Intersection area over the smaller box's area."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / smaller


def _polygon_area(poly):
    x, y = np.array([p[0] for p in poly]), np.array([p[1] for p in poly])
    return 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))


def write_split(out_dir, split, num_images, seed):
    """Writes ``out_dir/split/*.jpg`` and ``out_dir/annotations/instances_<split>.json``."""
    rng = np.random.RandomState(seed)
    os.makedirs(os.path.join(out_dir, split), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "annotations"), exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        image_id = 1 + i  # COCO ids start at 1
        img, anns = _draw_image(rng, image_id, len(annotations) + 1)
        file_name = f"{image_id:06d}.jpg"
        img.save(os.path.join(out_dir, split, file_name), quality=92)
        images.append({"id": image_id, "file_name": file_name, "width": img.width, "height": img.height})
        annotations.extend(anns)
    categories = [{"id": cid, "name": name, "supercategory": "shape"} for cid, name, _ in CATEGORIES]
    dataset = {"info": {"description": f"synthetic shapes, {split}, seed {seed}"}, "images": images,
               "annotations": annotations, "categories": categories}
    with open(os.path.join(out_dir, "annotations", f"instances_{split}.json"), "w") as f:
        json.dump(dataset, f)


def generate(out_dir, num_train=512, num_val=128, seed=0):
    """Writes the whole dataset into a temporary directory, then renames it: never half-written. When
    another process finished the same set first (two stages of ``make -j`` starting at once), its
    complete copy is kept and this one is dropped."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".shapes-", dir=parent)
    try:
        write_split(tmp, "train", num_train, seed)
        write_split(tmp, "val", num_val, seed + 1)
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if not is_complete(out_dir):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def is_complete(out_dir):
    """The validation annotations are the last file ``generate`` writes."""
    return os.path.exists(os.path.join(out_dir, "annotations", "instances_val.json"))


def ensure(out_dir, **kwargs):
    """Generates the dataset at ``out_dir`` unless it is already complete there."""
    if not is_complete(out_dir):
        generate(out_dir, **kwargs)
    return out_dir


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--out", default="data/shapes", help="output directory (must not exist)")
    parser.add_argument("--num-train", type=int, default=512)
    parser.add_argument("--num-val", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args()
    if os.path.exists(a.out):
        parser.error(f"--out {a.out} already exists; remove it or choose another directory")
    generate(a.out, a.num_train, a.num_val, a.seed)
    print(f"wrote {a.num_train} train and {a.num_val} val images to {a.out}")
