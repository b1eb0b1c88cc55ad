"""COCO evaluation: detector outputs -> COCO result entries -> the 12 standard stats by name.

The results use the ORIGINAL category ids and original-image coordinates. ``coco_evaluate`` runs
pycocotools' COCOeval, or faster-coco-eval's C++ implementation (same stats, much faster on large
sets) when it is installed and ``backend`` is 'auto' or 'faster'. The ground truth is the dataset's
``coco_gt()``, built once per dataset from its annotation file. ``evaluate`` runs a detector over a
loader on every rank and returns the stats on every rank; given the run, it honours a stop signal within a
batch (common.engine.Run.stop_point).
"""
import contextlib
import copy
import io
import time

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from tqdm import tqdm

from common import dist
from common.transforms import to_float_batch

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def to_coco_results(output, image_id, input_size, orig_size, cat_ids):
    """One detector output (in input-image pixels) -> COCO result dicts in original-image pixels.

    output: {boxes: Nx4 XYXY, scores: N, labels: N in 1..K[, masks: Nx1xhxw probabilities]}.
    Label l is category ``cat_ids[l - 1]``. A label outside 1..K raises ValueError: label 0 would
    otherwise become ``cat_ids[-1]``, the last category, silently (a wrong category, not an error), and
    dropping it instead would hide a detector that emits labels it was not trained on. The detectors of
    common.detectors emit 1..K only (R-CNNs drop the background; RetinaNet/FCOS: ForegroundLabelsOnly).
    """
    (h_in, w_in), (h0, w0) = input_size, orig_size
    boxes = output["boxes"].float().cpu() * torch.tensor([w0 / w_in, h0 / h_in, w0 / w_in, h0 / h_in])
    boxes[:, 2:] -= boxes[:, :2]  # -> XYWH
    scores, labels = output["scores"].float().cpu().tolist(), output["labels"].cpu().tolist()
    bad = sorted({lab for lab in labels if not 1 <= lab <= len(cat_ids)})
    if bad:
        raise ValueError(f"detections of image {image_id} have labels {bad} outside 1..{len(cat_ids)} (the "
                         f"{len(cat_ids)} categories): no category id to give them; the detector's "
                         "outputs do not match the dataset's classes")
    results = [{"image_id": image_id, "category_id": cat_ids[lab - 1], "bbox": [round(v, 2) for v in box],
                "score": round(s, 5)} for box, s, lab in zip(boxes.tolist(), scores, labels)]
    if "masks" in output and len(results):
        masks = F.interpolate(output["masks"].float(), size=(h0, w0), mode="bilinear", align_corners=False)
        masks = (masks[:, 0] > 0.5).cpu().numpy().astype(np.uint8)
        for r, m in zip(results, masks):
            rle = mask_utils.encode(np.asfortranarray(m))
            rle["counts"] = rle["counts"].decode("ascii")
            r["segmentation"] = rle
    return results


def faster_coco_eval_available():
    try:
        import faster_coco_eval  # noqa: F401
        return True
    except ImportError:
        return False


def coco_evaluate(coco_gt, results, iou_type="bbox", backend="auto"):
    """COCOeval on ``results`` (list of result dicts); returns {name: value} for the 12 stats.

    No detections at all give zeros (AP is 0, not undefined). iou_type: 'bbox' or 'segm'."""
    if not results:
        return {k: 0.0 for k in STAT_NAMES}
    if backend == "faster" or (backend == "auto" and faster_coco_eval_available()):
        from faster_coco_eval import COCO, COCOeval_faster as COCOeval
        gt = COCO(coco_gt.dataset, use_deepcopy=True)
    else:
        from pycocotools.cocoeval import COCOeval
        gt = coco_gt
    with contextlib.redirect_stdout(io.StringIO()):  # both print progress and the summary table
        dt = gt.loadRes(copy.deepcopy(results))
        ev = COCOeval(gt, dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: float(v) for k, v in zip(STAT_NAMES, ev.stats[:12])}  # -1 = undefined (no such GT)


def _coco_stats(dataset, results, backend):
    stats = {"bbox": coco_evaluate(dataset.coco_gt(), results, "bbox", backend)}
    if results and "segmentation" in results[0]:
        stats["segm"] = coco_evaluate(dataset.coco_gt(), results, "segm", backend)
    return stats


@torch.no_grad()
def evaluate(model, loader, device, dtype=None, backend="auto", run=None):
    """Inference on every rank, gather on rank 0, COCOeval bbox (+ segm when the model outputs masks).

    run: the common.engine.Run, to honour a stop signal within seconds: every rank reaches its stop point
    before each batch that every rank has (the shards differ by at most one image), and a signal ends rank
    0's COCOeval at once, after which every rank reaches one more stop point. Without it a signal waits
    for the end of the evaluation.
    Returns {"bbox": {AP, AP50, ...}, ["segm": {...}], "images": n, "seconds": s} on every rank."""
    dataset = loader.dataset
    model.eval()
    t0 = time.time()
    results, n_images = [], 0
    batches_on_every_rank = len(loader)
    if run is not None and dist.get_world_size() > 1:
        batches_on_every_rank = min(dist.all_gather_object(len(loader)))
    bar = tqdm(loader, disable=not dist.is_main_process(), desc="eval", mininterval=30)
    for i, (images, targets) in enumerate(bar):
        if run is not None and i < batches_on_every_rank:
            run.stop_point()
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            outputs = model(to_float_batch(images, device))
        for img, out, t in zip(images, outputs, targets):
            results += to_coco_results(out, t["image_id"], img.shape[-2:], t["orig_size"], dataset.cat_ids)
        n_images += len(images)
    gathered = dist.all_gather_object((results, n_images))
    stats = None
    if dist.is_main_process():
        results = [r for part, _ in gathered for r in part]
        n_images = sum(n for _, n in gathered)
        if run is None:
            stats = _coco_stats(dataset, results, backend)
        else:  # None when a stop signal came
            stats = run.signals.interruptible(_coco_stats, dataset, results, backend)
        if stats is not None:
            skipped = len(dataset) - n_images
            stats.update(images=n_images, skipped_images=skipped, seconds=round(time.time() - t0, 2))
    stats = dist.broadcast_object(stats)
    if stats is None:  # on every rank alike
        run.stop_point()  # rank 0 holds the signal: every rank stops here
    model.train()
    return stats
