"""Joint image + box (+ mask, + instance id) transforms on ``torchvision.transforms.v2``, and presets.

Images stay uint8 through the loader (4x less to copy than float) and become float on the device
(``to_float_batch``/``normalize``). Detectors get images already sized by these presets: their own
internal resize is disabled (``common.detectors.PresizedTransform``), so nothing is resized twice.
"""
import functools

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# named fine-tuning presets: short sides to draw from, long-side cap
PRESETS = {
    "800": ((800,), 1333),                                   # single scale 1333x800, the 1x recipe
    "multiscale": ((640, 672, 704, 736, 768, 800), 1333),   # short side {640..800}
    "cpu": ((128,), 192),                                    # small images for CPU demos and tests
}


def per_instance(inputs):
    """labels_getter for SanitizeBoundingBoxes: every per-instance tensor of the target dict
    ('labels', and 'ids' when boxes carry instance ids) is filtered together with the boxes."""
    target = inputs[1]
    return tuple(target[k] for k in ("labels", "ids") if k in target)


def train_resize(preset="800"):
    """The preset's random short-side resize (long side capped), for ``CocoDetection(resize=...)``: applied
    while loading, so that masks are rasterised at the output size."""
    min_sizes, max_size = PRESETS[preset]
    return v2.RandomShortestSize(min_size=list(min_sizes), max_size=max_size, antialias=True)


def train_augment(flip=0.5):
    """What follows ``train_resize``: horizontal flip, boxes clipped, boxes under 1 px dropped (with their
    labels, masks and ids)."""
    return v2.Compose([
        v2.RandomHorizontalFlip(flip),
        v2.ClampBoundingBoxes(),
        v2.SanitizeBoundingBoxes(labels_getter=per_instance),
    ])


def eval_resize(preset="800"):
    """The largest short side of the preset, long side capped (images only)."""
    min_sizes, max_size = PRESETS[preset]
    return v2.RandomShortestSize(min_size=[max(min_sizes)], max_size=max_size, antialias=True)


def to_float_batch(images, device):
    """uint8 CxHxW tensors -> float [0, 1] tensors on ``device`` (non-blocking copies)."""
    return [img.to(device, non_blocking=True).float().div_(255) for img in images]


@functools.lru_cache(maxsize=None)
def imagenet_mean_std(device, dtype):
    """ImageNet mean and std [1, 3, 1, 1] on ``device``, made once: building them per step would copy from
    the host and wait for the GPU every time."""
    return tuple(torch.tensor(v, dtype=dtype).view(1, 3, 1, 1).to(device) for v in (IMAGENET_MEAN, IMAGENET_STD))


def normalize(batch):
    """float [0, 1] Bx3xHxW -> ImageNet-normalised (for models without torchvision's detector transform)."""
    mean, std = imagenet_mean_std(batch.device, batch.dtype)
    return (batch - mean) / std
