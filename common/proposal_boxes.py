"""The boxes of an image's unsupervised proposals (common.proposals writes them to a file, image by image):

1. candidates: ``ss`` = OpenCV-contrib selective search, fast mode (``cv2.ximgproc.segmentation``, as
   DETReg), on a copy whose long side is at most ``--ss-max-side`` px, boxes scaled back to original
   pixels and scored by their rank in OpenCV's output (first = 1); ``random`` = ``random_boxes``
   (seeded by ``--seed`` and the image id), scored by draw order;
2. the AlignDet/SoCo filter ``ratio3size0008``: w, h >= 32 px, 1/3 <= w/h <= 3,
   sqrt(w*h / (W*H)) <= 0.8. An image the filter empties falls back to SoCo's rules
   (ratio + min size, then min size only); an image still empty (e.g. smaller than 32 px) keeps no box;
3. NMS at IoU 0.5 (``torchvision.ops.nms``; our reading of the "@0.5" in AlignDet's file name), then the
   top ``--topk`` (50) by score.
"""
import numpy as np
import torch
from torchvision.ops import box_convert, clip_boxes_to_image, nms

from common.errors import UserError

MIN_SIZE, MAX_RATIO, MAX_SIZE_RATIO = 32, 3.0, 0.8  # the ratio3size0008 filter
# px: long side of the copy selective search runs on (DETReg runs it on a 128x128 copy, SoCo at full size: 500
# keeps boxes down to the filter's 32 px at a fraction of the full-size cost)
SS_MAX_SIDE = 500


# ---- the filter, NMS and top-K ----
def filter_mask(boxes, width, height, min_size=MIN_SIZE, max_ratio=MAX_RATIO, max_size_ratio=MAX_SIZE_RATIO):
    """boxes: [N, 4] xyxy in original px -> bool [N]: w, h >= min_size, 1/max_ratio <= w/h <= max_ratio,
    sqrt(w*h / (width*height)) <= max_size_ratio. ``None`` disables a rule."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    keep = (w >= min_size) & (h >= min_size)
    if max_ratio is not None:
        ratio = w / h.clamp(min=1e-6)
        keep &= (ratio >= 1 / max_ratio) & (ratio <= max_ratio)
    if max_size_ratio is not None:
        keep &= (w * h / (width * height)).sqrt() <= max_size_ratio
    return keep


# SoCo's fallback ladder for images the full filter empties (SoCo's filter_ss_proposals_json_post_no_prop.py)
FILTER_RULES = (("full", {}), ("ratio_only", {"max_size_ratio": None}),
                ("min_size_only", {"max_ratio": None, "max_size_ratio": None}))


def select_proposals(boxes, scores, width, height, topk=50, nms_iou=0.5):
    """Filter (with fallback), NMS, top-K. boxes [N, 4] xyxy, scores [N] -> (boxes [k, 4], scores [k],
    rule): k <= topk, sorted by descending score; rule = the filter rule used, or "none" if k == 0."""
    for rule, overrides in FILTER_RULES:
        keep = filter_mask(boxes, width, height, **overrides)
        if keep.any():
            b, s = boxes[keep], scores[keep]
            order = nms(b, s, nms_iou)[:topk]  # nms returns indices sorted by decreasing score
            return b[order], s[order], rule
    return boxes.new_zeros((0, 4)), scores.new_zeros((0,)), "none"


# ---- candidates ----
def random_boxes(width, height, k, generator):
    """k random boxes [k, 4] xyxy (float) inside a width x height image that pass the full filter:
    sides log-uniform in [32, image side], aspect and size rules enforced by rejection, position uniform.
    Fewer than k (possibly 0) only when the image is too small for the filter (a side under 32 px)."""
    if width < MIN_SIZE or height < MIN_SIZE or k <= 0:
        return torch.zeros((0, 4))
    lo = torch.tensor(MIN_SIZE, dtype=torch.float64).log()
    out = []
    for _ in range(50):  # rejection rounds; acceptance is >= ~25% for any image of at least 32x32 px
        u = torch.rand((4 * k, 4), generator=generator, dtype=torch.float64)
        w = (lo + u[:, 0] * (np.log(width) - lo)).exp()  # [4k] log-uniform side lengths
        h = (lo + u[:, 1] * (np.log(height) - lo)).exp()
        x0, y0 = u[:, 2] * (width - w), u[:, 3] * (height - h)
        boxes = torch.stack([x0, y0, x0 + w, y0 + h], dim=1)  # [4k, 4]
        out.append(boxes[filter_mask(boxes, width, height)])
        if sum(len(b) for b in out) >= k:
            break
    return torch.cat(out)[:k].float()


def selective_search(image, max_side=SS_MAX_SIDE):
    """OpenCV fast-mode selective search on a copy downscaled to long side <= max_side.
    image: uint8 HxWx3 RGB numpy -> (boxes [N, 4] xyxy float in original px, scores [N]: 1 - rank/N)."""
    try:
        import cv2
        segmentation = cv2.ximgproc.segmentation
    except (ImportError, AttributeError):
        raise UserError("selective search needs OpenCV's contrib modules (cv2.ximgproc): pip install "
                        "opencv-contrib-python-headless (and uninstall opencv-python if it shadows it), or "
                        "use --method random") from None
    cv2.setNumThreads(1)  # one process per core already
    height, width = image.shape[:2]
    scale = min(1.0, max_side / max(height, width))
    small = image if scale == 1.0 else cv2.resize(
        image, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA)
    ss = segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(np.ascontiguousarray(small[:, :, ::-1]))  # OpenCV wants BGR
    ss.switchToSelectiveSearchFast()
    rects = torch.from_numpy(ss.process().astype(np.float32)).reshape(-1, 4)  # [N, 4] x, y, w, h (small)
    sx, sy = width / small.shape[1], height / small.shape[0]
    boxes = box_convert(rects, "xywh", "xyxy") * torch.tensor([sx, sy, sx, sy])
    boxes = clip_boxes_to_image(boxes, (height, width))
    return boxes, rank_scores(len(boxes))


def rank_scores(n):
    """Scores [n] of boxes given in rank order: 1 - rank / n."""
    return 1 - torch.arange(n, dtype=torch.float32) / max(n, 1)
