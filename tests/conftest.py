"""Shared fixtures: a tiny synthetic COCO set, a one-image scene set, and a runner for the scripts as
subprocesses."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import roi_align

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common import synthetic  # noqa: E402

# the smallest detector configuration that still exercises every code path (CPU tests: --device cpu also where
# CUDA is visible)
TINY = ["--backbone", "resnet18", "--preset", "cpu", "--rpn-batch-size", "32", "--roi-batch-size", "32",
        "--rpn-post-nms-train", "64", "--rpn-post-nms-test", "32", "--workers", "0", "--print-freq", "1",
        "--anchor-scale", "0.5", "--no-tb", "--device", "cpu"]
SMALL = TINY[:TINY.index("--preset")] + TINY[TINY.index("--preset") + 2:]  # direct.py sizes with --direct-size
# what picks a device (default: CUDA where visible): every run of these in a test says which (--device)
DEVICE_SCRIPTS = {"finetune.py", "direct.py", "montage.py", "predet.py", "alignDet.py", "common.similarity",
                  "tests.bench"}


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    """A 24-image train / 8-image val synthetic set; returns the data flags of a custom COCO set."""
    root = str(tmp_path_factory.mktemp("data") / "shapes")
    synthetic.generate(root, num_train=24, num_val=8, seed=3)
    return ["--train-images", f"{root}/train", "--train-ann", f"{root}/annotations/instances_train.json",
            "--val-images", f"{root}/val", "--val-ann", f"{root}/annotations/instances_val.json"]


@pytest.fixture(scope="session")
def textures(tmp_path_factory):
    """4 images of smooth random colour texture (every region unlike every other), 168 x 120, each with 8 random
    boxes (15-45% of a side) annotated as objects: a set on which a box's content tells where it is. Returns
    (image_dir, ann_file)."""
    root = tmp_path_factory.mktemp("textures")
    g = torch.Generator().manual_seed(0)
    os.makedirs(root / "images")
    images, annotations, (h, w) = [], [], (120, 168)
    for i in range(4):
        x = torch.nn.functional.interpolate(torch.rand(1, 3, h // 10, w // 10, generator=g), size=(h, w),
                                            mode="bicubic", align_corners=False)
        Image.fromarray((x[0].clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()).save(root / "images" / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": w, "height": h})
        for _ in range(8):
            bw, bh = ((torch.rand(2, generator=g) * 0.3 + 0.15) * torch.tensor([w, h])).tolist()
            x0, y0 = (torch.rand(2, generator=g) * torch.tensor([w - bw, h - bh])).tolist()
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": 1 + i % 2,
                                "bbox": [x0, y0, bw, bh], "area": bw * bh, "iscrowd": 0})
    with open(root / "annotations.json", "w") as f:
        json.dump({"images": images, "annotations": annotations,
                   "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}, f)
    return str(root / "images"), str(root / "annotations.json")


def box_contents(image, boxes, mirror=False):
    """What each box of an image shows: its 7 x 7 RGB crop (RoIAlign), mean-free, unit length ([n, 147]); mirrored
    left-right if asked (a flipped view shows a box's content mirrored)."""
    crops = roi_align(image.float()[None], [boxes.float()], output_size=7, aligned=True)  # [n, 3, 7, 7]
    crops = (crops.flip(-1) if mirror else crops).flatten(1)
    crops = crops - crops.mean(1, keepdim=True)
    return crops / crops.norm(dim=1, keepdim=True).clamp(min=1e-6)


def content_match(image1, boxes1, image2, boxes2):
    """[n1, n2] correlation of the boxes' contents across two views, the better of straight and mirrored."""
    c1 = box_contents(image1, boxes1)
    return torch.maximum(c1 @ box_contents(image2, boxes2).T, c1 @ box_contents(image2, boxes2, mirror=True).T)


def write_scene(root, h, w, boxes, colours):
    """A one-image COCO set under ``root``: a grey PNG with filled boxes of the given colours, each
    annotated with its box and a rectangle polygon (category i + 1); returns (image_dir, ann_file)."""
    img = np.full((h, w, 3), 128, np.uint8)
    annotations = []
    for i, ((x0, y0, x1, y1), colour) in enumerate(zip(boxes, colours)):
        img[y0:y1, x0:x1] = colour
        annotations.append({"id": i + 1, "image_id": 1, "category_id": i + 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
                            "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]], "iscrowd": 0})
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    Image.fromarray(img).save(os.path.join(root, "images", "scene.png"))
    ann = os.path.join(root, "annotations.json")
    with open(ann, "w") as f:
        json.dump({"images": [{"id": 1, "file_name": "scene.png", "width": w, "height": h}],
                   "annotations": annotations,
                   "categories": [{"id": i + 1, "name": f"c{i + 1}"} for i in range(len(boxes))]}, f)
    return os.path.join(root, "images"), ann


def script_command(script, *args):
    """``python <script> args`` (``python -m <script>`` for a module); refuses (AssertionError) a run of a
    script in DEVICE_SCRIPTS without --device, which would be a GPU run where CUDA is visible."""
    argv = [script, *map(str, args)]
    if DEVICE_SCRIPTS & set(argv) and "--device" not in argv:
        raise AssertionError(f"{' '.join(argv)[:200]}...: a test names the device (--device cpu in the CPU suite)")
    return [sys.executable, *([] if script.endswith(".py") else ["-m"]), *argv]


def run_script(script, *args, expect_rc=0, timeout=600, env=None):
    """Runs ``python <script> args`` from the repo root; asserts its exit status; returns the result."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    proc = subprocess.run(script_command(script, *args), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=full_env)
    if expect_rc is not None and proc.returncode != expect_rc:
        raise AssertionError(f"{script} exited {proc.returncode} (expected {expect_rc})\n--- stdout\n"
                             f"{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    return proc


def iteration_losses(output_dir, key="loss"):
    """{iteration: loss} from a run's log.txt (needs --print-freq 1)."""
    out = {}
    with open(os.path.join(output_dir, "log.txt")) as f:
        for line in f:
            rec = json.loads(line)
            if "epoch" not in rec and key in rec:
                out[rec["iteration"]] = rec[key]
    return out


def _opencv_contrib():
    try:
        import cv2
    except ImportError:
        return False
    return hasattr(cv2, "ximgproc")


# selective search needs opencv-contrib, which make install installs; a machine's own image (e.g. a GPU image
# with plain OpenCV) may lack it: its tests are skipped there, saying so, and the rest of the suite runs
needs_selective_search = pytest.mark.skipif(not _opencv_contrib(), reason="selective search needs OpenCV's contrib "
                                            "modules (cv2.ximgproc): pip install opencv-contrib-python-headless")


def pytest_collection_modifyitems(config, items):
    """The GPU set runs only when asked for (-m gpu) and where CUDA is visible: make test stays the CPU suite
    also on a machine with GPUs."""
    import torch
    asked = "gpu" in (config.getoption("markexpr") or "")
    reason = None if asked and torch.cuda.is_available() else \
        "no CUDA device visible" if asked else "the GPU set: pytest -m gpu tests"
    for item in items:
        if reason and "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))
