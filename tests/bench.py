"""``make bench``: throughput figures for the scripts, printed as markdown tables and written as JSON.

    python -m tests.bench                              # CPU: small configurations, synthetic data
    python -m tests.bench --data DIR --device cuda     # DIR: any COCO-format set (images/ + annotations.json)
    tests/gpu_check.sh DIR OUT                         # the training rows on one GPU within a time budget

It lives beside the tests because, like them, it imports the scripts (common/ never does).

For each training workload (the real script: fine-tuning, then Direct, Montage, PreDet and AlignDet at their
papers' per-GPU configurations on a GPU, at half the demo's batch on a CPU; samples: images, Montage: 4 per montage,
PreDet and AlignDet: image pairs):
- the run: a short run of the script as a user starts it (its loader, engine, logging, the final checkpoint),
  read from its log.txt: its steady rate (wall clock after the warm-up, over the stated speed_window:
  common.metrics.WallClock), the share of that time spent waiting for data and its peak memory (GPU
  max_memory_allocated, or the process' peak RSS on the CPU);
- its limit: the same script's main() with ``FixedBatchRun`` in place of common.engine.Run: the same model,
  flags and loop body, stepped on ONE batch of the script's own loader moved to the device once; no loading,
  logging, checkpoints or finiteness sync; the median step of steps 8-30 on a GPU (2-3 on a CPU),
  synchronised around each; vs_limit = rate / limit;
- the distinct input shapes of 100 iterations of its loader, on the model's canvases and on torchvision's
  (padding to 32);
- vs_reference: the rate against fine-tuning the same detector in the same bench run.
Shape rows count the input shapes of the GPU configurations on any machine (their loaders only). For each data
pipeline at its paper-default size: loader-only items/s in ONE process with one thread (= per DataLoader
worker), and selective-search images/s for the proposal generator. COCO evaluation seconds per 1000 images
(bbox, segm; pycocotools and faster-coco-eval) on 100 fabricated detections per image. Nothing here is asserted:
figures only.
"""
import argparse
import contextlib
import functools
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import cv2
import torch
from torchvision import tv_tensors

from common import coco, coco_eval, engine, loader, transforms
from common.cli import HelpFormatter
from common.detectors import PresizedTransform
from common.metrics import peak_memory_mb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CPU_DET = ["--backbone", "resnet18", "--preset", "cpu", "--anchor-scale", "0.5", "--rpn-batch-size", "64",
           "--roi-batch-size", "64", "--rpn-post-nms-train", "300", "--rpn-post-nms-test", "100", "--box-head", "2fc"]


# small CPU configurations of the scripts for the CPU bench rows: the demo's (Makefile: CPU_DET, DEMO_*), at half
# its batch sizes (Montage's whole) so that the CPU bench takes two minutes
CPU_METHODS = {
    "finetune": ["--detector", "fasterrcnn", "--init", "scratch", "--warmup-iters", "1", "--no-eval",
                 "--batch-size", "2", *CPU_DET],
    "direct": ["--detector", "fasterrcnn", "--backbone", "resnet18", "--direct-size", "96", "--batch-size", "4",
               "--anchor-scale", "0.5", "--rpn-batch-size", "64", "--roi-batch-size", "32", "--box-head", "2fc",
               "--rpn-post-nms-train", "300", "--warmup-iters", "2", "--epochs", "100"],
    "montage": ["--backbone", "resnet18", "--montage-size", "96", "--montage-split", "32", "--batch-size", "16",
                "--montage-loss", "blockwise", "--warmup-iters", "2"],
    "predet": ["--backbone", "resnet18", "--preset", "cpu", "--box-head", "2fc", "--anchor-scale", "0.5",
               "--predet-dim", "64", "--predet-num-queries", "8", "--predet-post-nms", "64", "--predet-neg", "32",
               "--batch-size", "2", "--warmup-iters", "2"],
    "aligndet": ["--detector", "fasterrcnn", "--backbone-weights", "scratch", "--align-proposal-method", "random",
                 *CPU_DET, "--roi-batch-size", "16", "--batch-size", "2", "--warmup-iters", "2"],
}


def workloads(device, data_flags):
    """(name, script, args, reference) for each training workload; reference = the workload it is compared
    with (fine-tuning the same detector). On a GPU the first rows are those a time budget should reach first:
    the fine-tune and every pre-training with Faster R-CNN, then switches to judge (--cudnn-benchmark,
    --channels-last, torchvision's padding), then the other detectors."""
    run = ["--device", device, "--no-tb", "--max-iters", "60" if device == "cuda" else "5", *data_flags]
    if device != "cuda":
        return [(f"{name} cpu", f"{'alignDet' if name == 'aligndet' else name}.py", flags + run,
                 None if name == "finetune" else "finetune cpu") for name, flags in CPU_METHODS.items()]
    ft = ["--init", "scratch", "--warmup-iters", "1", "--no-eval"]

    def finetune(det):
        return (f"finetune {det} 1333x800 x4", "finetune.py",
                ft + ["--detector", det, "--backbone", "resnet50", "--preset", "800", "--batch-size", "4", *run], None)

    def direct(det):
        return f"direct {det} 448 x8", "direct.py", ["--detector", det, *run], f"finetune {det} 1333x800 x4"

    def aligndet(det):
        return (f"aligndet {det} x2", "alignDet.py", ["--detector", det, "--backbone-weights", "scratch",
                                                       "--align-proposal-method", "random", *run],
                f"finetune {det} 1333x800 x4")

    def variant(row, *flags):
        name, script, args, ref = row
        return f"{name} {' '.join(flags)}", script, args + list(flags), ref

    montage = ("montage r50 224 x64", "montage.py", ["--montage-loss", "blockwise", *run], None)
    out = [finetune("fasterrcnn"), aligndet("fasterrcnn"), montage,
           ("predet r50 480 x4 pairs", "predet.py", run, "finetune maskrcnn 1333x800 x4"), direct("fasterrcnn"),
           variant(finetune("fasterrcnn"), "--cudnn-benchmark"), variant(finetune("fasterrcnn"), "--channels-last"),
           variant(aligndet("fasterrcnn"), "--pad-multiple", "32"), variant(montage, "--cudnn-benchmark"),
           variant(finetune("fasterrcnn"), "--pad-multiple", "32")]
    for det in ("maskrcnn", "retinanet", "fcos"):
        out += [finetune(det), direct(det), aligndet(det)]
    return out


def shape_workloads(data_flags):
    """(name, script, args) whose input shapes per 100 iterations the bench counts on the CPU (their loaders only):
    the GPU configurations with the most shapes, on CUDA's default canvases (--pad-multiple 160)."""
    run = ["--device", "cpu", "--no-tb", "--pad-multiple", "160", *data_flags]
    return [("shapes finetune 1333x800 x4", "finetune.py", ["--detector", "fasterrcnn", "--init", "scratch",
                                                            "--preset", "800", "--batch-size", "4", *run]),
            ("shapes aligndet multiscale views x2", "alignDet.py", ["--detector", "fasterrcnn", "--backbone-weights",
                                                                    "scratch", "--align-proposal-method", "random",
                                                                    *run])]


def pipelines(data, data_cache):
    """(name, make_dataset) for each data pipeline at its paper-default size."""
    import direct
    import montage
    import predet
    import alignDet
    from common import proposals

    def finetune_set(with_masks):
        return coco.CocoDetection(data.train_images, data.train_ann, transforms.train_augment(),
                                  with_masks=with_masks, keep_empty=False, resize=transforms.train_resize("800"))

    def predet_set():
        args = predet.get_args_parser().parse_args([])
        ds = coco.CocoDetection(data.train_images, data.train_ann, keep_empty=True)
        ds.transforms = predet.TwoViewsWithQueries(480, ds.num_classes, args)
        return ds

    def aligndet_set():
        tmp = tempfile.mkdtemp()
        settings = {"method": "random", "topk": 50, "nms_iou": 0.5, "ss_max_side": None, "seed": 0}
        path = os.path.join(tmp, "proposals.json")
        proposals.generate(data.train_images, data.train_ann, path, settings, workers=1)
        images = coco.CocoDetection(data.train_images, path, keep_empty=False)
        return alignDet.TwoViews(images, alignDet.build_view_transform("multiscale"), 50)

    def montage_set():
        args = montage.get_args_parser().parse_args(["--data-cache", data_cache])
        return montage.MontageSet(montage.ensure_sample_cache(args, data), 224, 64)

    return [("loader finetune 1333x800 (boxes)", lambda: finetune_set(False)),
            ("loader finetune 1333x800 (+masks)", lambda: finetune_set(True)),
            ("loader direct 448 (+masks)", lambda: coco.CocoDetection(
                data.train_images, data.train_ann, direct.direct_train_transform(448), with_masks=True,
                keep_empty=False, resize=direct.ScaleLongSide(448, (0.8, 1.2)))),
            ("loader predet 2x480 views + queries (pairs)", predet_set),
            ("loader aligndet 2x640-800 views + proposals (pairs)", aligndet_set),
            ("loader montage 224 from the sample cache", montage_set)]


def proposal_throughput(data, n=16):
    """Selective-search images/s in one process (= per worker of python -m common.proposals)."""
    from common import proposals
    images = coco.load_coco_json(data.train_ann)["images"][:n]
    settings = {"method": "ss", "topk": 50, "nms_iou": 0.5, "ss_max_side": proposals.SS_MAX_SIDE, "seed": 0}
    t = time.perf_counter()
    for im in images:
        proposals.image_proposals(data.train_images, im, settings)
    return len(images) / (time.perf_counter() - t)


def evaluation_speed(data, per_image=100):
    """COCOeval seconds per 1000 images, bbox (and segm when the set has masks), for each installed backend,
    on the val set's own ground truth with ``per_image`` fabricated detections per image: copies of its
    objects with centre and size jittered by up to 10% of the object's size, each with the object's mask
    (so the matching work is that of a real detector's output)."""
    gt = coco.CocoDetection(data.val_images, data.val_ann).coco_gt()
    with_masks = all("segmentation" in a for a in gt.dataset["annotations"])
    g = torch.Generator().manual_seed(0)
    results = []
    for image_id in gt.getImgIds():
        anns = [a for a in gt.loadAnns(gt.getAnnIds(imgIds=image_id)) if not a["iscrowd"]]
        rles = [gt.annToRLE(a) for a in anns] if with_masks else []  # one per object, shared by its copies
        for i in range(per_image if anns else 0):
            a = anns[i % len(anns)]
            x, y, w, h = a["bbox"]
            dx, dy, dw, dh = (0.2 * (torch.rand(4, generator=g) - 0.5)).tolist()
            r = {"image_id": image_id, "category_id": a["category_id"], "score": float(torch.rand((), generator=g)),
                 "bbox": [x + dx * w, y + dy * h, w * (1 + dw), h * (1 + dh)]}
            if with_masks:
                rle = rles[i % len(anns)]
                counts = rle["counts"]
                r["segmentation"] = {"size": rle["size"],
                                     "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}
            results.append(r)
    rows = []
    for backend in ("pycocotools", "faster") if coco_eval.faster_coco_eval_available() else ("pycocotools",):
        for iou_type in ("bbox", "segm") if with_masks else ("bbox",):
            t = time.perf_counter()
            coco_eval.coco_evaluate(gt, results, iou_type, backend)
            rows.append({"name": f"COCO eval {iou_type}, {backend} ({per_image} dets/image)", "kind": "eval",
                         "eval_s_per_1000_images": round((time.perf_counter() - t) / len(gt.imgs) * 1000, 2)})
    return rows


def run_workload(script, args, workers, timeout):
    """Runs a script as a user does; returns the figures of its last log.txt epoch record (the run's steady
    rate: wall clock after the warm-up)."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, script, *args, "--workers", str(workers), "--output-dir", out]
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"skipped": f"--budget-s spent ({timeout:.0f} s left were not enough)"}
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
        records = [json.loads(line) for line in open(os.path.join(out, "log.txt"))]
        last = [r for r in records if "epoch" in r][-1]
        return {k: last[k] for k in ("samples_per_s", "speed_window", "data_time_share", "peak_mem_mb")}


class Measured(Exception):
    """Raised by ``FixedBatchRun.batches`` once it has measured: ends the script's main()."""

    def __init__(self, figures):
        super().__init__("measured")
        self.figures = figures


class FixedBatchRun:
    """Stands in for common.engine.Run in a script's main() (``limit_of``): counts the input shapes of
    ``shape_iters`` iterations of the script's own loader, then yields its first batch, moved to the device
    once, ``warmup`` + ``steps`` times to the script's own loop body, and raises Measured with the median step
    of the last ``steps``. Every other method of Run that a loop body calls does nothing (no logging, no
    finiteness sync, no checkpoint)."""

    def __init__(self, args, *, method, device, iters_per_epoch, max_iters, samples_per_iter, warmup, steps,
                 shape_iters=100):
        self.device, self.samples_per_iter = device, samples_per_iter
        self.warmup, self.steps, self.shape_iters = warmup, steps, shape_iters
        self.amp = engine.amp_dtype(args, device)
        engine.set_cudnn_benchmark(args, device)
        self.model = None

    autocast = engine.Run.autocast

    def checkpoints_hold(self, model, optimizer, scaler, **extra):
        self.model = model

    def finite(self, loss, losses):
        return True

    def log_losses(self, losses, loss, lr, measures=None, grad_norm=None):
        pass

    def stop_point(self):
        pass

    def batches(self, loader, on_epoch_end=None):
        canvas = next((m for m in self.model.modules() if isinstance(m, PresizedTransform)), None)
        torchvisions = PresizedTransform(32)  # torchvision's padding, for comparison
        first, shapes, shapes32 = None, set(), set()
        for batch in loader_batches(loader, self.shape_iters):
            first = first or batch
            shapes.update(input_shapes(batch, canvas))
            shapes32.update(input_shapes(batch, torchvisions))
        figures = {"shapes_per_100_it": len(shapes), "shapes_per_100_it_pad32": len(shapes32)}
        if self.steps:
            batch, times = to_device(first, self.device), []
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            for i in range(self.warmup + self.steps):
                synchronize(self.device)
                t = time.perf_counter()
                yield i, batch
                synchronize(self.device)
                times.append(time.perf_counter() - t)
            step = statistics.median(times[self.warmup:])
            figures.update(limit_samples_per_s=round(self.samples_per_iter / step, 2), limit_peak_mem_mb=round(
                peak_memory_mb(self.device)) if self.device.type == "cuda" else None)
        raise Measured(figures)


def loader_batches(loader, n):
    """The first n batches of a script's training loader, epoch after epoch."""
    epoch = 0
    while True:
        loader.batch_sampler.set_epoch(epoch)
        for batch in loader:
            yield batch
            n -= 1
            if n == 0:
                return
        epoch += 1


def input_shapes(batch, canvas):
    """The image batch shapes a model sees for one loader batch: each list of images batched on ``canvas`` (a
    PresizedTransform), each stacked image tensor (Montage, PreDet) as it is."""
    shapes = []
    for part in batch:
        if isinstance(part, (list, tuple)) and part and isinstance(part[0], tv_tensors.Image):
            shapes.append((len(part), *canvas.canvas_size([img.shape[-2:] for img in part])))
        elif torch.is_tensor(part) and part.dim() >= 4:
            shapes.append(tuple(part.shape))
    return shapes


def to_device(batch, device):
    if torch.is_tensor(batch):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def limit_of(script, args, workers, log, warmup=0, steps=0):
    """The script's main() with FixedBatchRun for Run (see there; steps=0: the input shapes only); its printed
    lines go to ``log``."""
    module = importlib.import_module(script[:-len(".py")])
    with tempfile.TemporaryDirectory() as out:
        parsed = module.get_args_parser().parse_args([*args, "--workers", str(workers), "--output-dir", out])
        module.Run = functools.partial(FixedBatchRun, warmup=warmup, steps=steps)
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                module.main(parsed)
        except Measured as m:
            return m.figures
        finally:
            module.Run = engine.Run
    raise RuntimeError(f"{script} ended without reaching its training loop")


def loader_throughput(dataset, n=64, repeats=2):
    """Items per second of ``dataset`` (transforms included) in one process with one thread (torch and
    OpenCV), as in a DataLoader worker: the per-worker figure. The first n items (the whole set when
    smaller), the best of ``repeats`` passes: a shared machine's other load only ever slows a pass."""
    seeded, threads = loader.SeededDataset(dataset), torch.get_num_threads()
    n = min(n, len(dataset))
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    try:
        seeded[(0, 0)]  # warm-up (lazy imports, caches)
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            for i in range(n):
                seeded[(i, i)]
            best = min(best, time.perf_counter() - t)
        return n / best
    finally:
        torch.set_num_threads(threads)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--data", default=os.environ.get("BENCH_DATA") or None,
                   help="a real-image set (folder with images/ + annotations.json, or a COCO root); "
                        "default: the synthetic set")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader workers on a GPU")
    p.add_argument("--out", default="runs/bench", help="bench.json, bench.md and limits.log go here")
    p.add_argument("--data-cache", default="data", help="where the synthetic set (and Montage's cache) live")
    p.add_argument("--only", default="", help="comma-separated name prefixes: run only the rows that start so")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no training row once the time left is under the mean time of a row so far; a "
                        "run gets the time left at most")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first training row that fails")
    a = p.parse_args()
    start = time.time()
    ns = argparse.Namespace(data_path=a.data, train_images=None, train_ann=None, val_images=None, val_ann=None,
                            data_cache=a.data_cache)
    data = coco.resolve_data(ns)
    data_flags = ["--data-path", a.data] if a.data else ["--data-cache", a.data_cache]
    on_gpu = a.device == "cuda"
    workers, (warmup, steps) = (a.workers, (7, 23)) if on_gpu else (0, (1, 2))
    os.makedirs(a.out, exist_ok=True)
    log = open(os.path.join(a.out, "limits.log"), "w")  # what the limits' main() printed
    rows, durations = [], []

    def keep(name):
        return not a.only or any(name.startswith(s) for s in a.only.split(","))

    def limit_row(name, script, args, workers, warmup=0, steps=0):
        print(f"{'measuring the limit of' if steps else 'counting the input shapes of'} {name} ...", flush=True)
        try:
            return limit_of(script, args, workers, log, warmup, steps)
        except Exception as e:  # a bench row that fails says why; the others still run
            log.write(traceback.format_exc())
            return {"error": f"limit: {type(e).__name__}: {str(e).strip().splitlines()[-1][:200]} (limits.log)"}
        finally:
            log.flush()
            if on_gpu:
                torch.cuda.empty_cache()

    for name, script, args, ref in workloads(a.device, data_flags):
        if not keep(name):
            continue
        left = None if a.budget_s is None else a.budget_s - (time.time() - start)
        if left is not None and left < (statistics.mean(durations) if durations else 1):
            rows.append({"name": name, "kind": "train", "skipped": "--budget-s spent"})
            continue
        t = time.time()
        print(f"running {name} ...", flush=True)
        row = {"name": name, "kind": "train", "reference": ref, **run_workload(script, args, workers, left)}
        if "samples_per_s" in row:
            row.update(limit_row(name, script, args, workers, warmup=warmup, steps=steps))
        if "limit_samples_per_s" in row:
            row["vs_limit"] = round(row["samples_per_s"] / row["limit_samples_per_s"], 2)
        rows.append(row)
        durations.append(time.time() - t)
        write_report(rows, a)
        if a.fail_fast and "error" in row:
            print(f"error in {name}: {row['error']}", file=sys.stderr)
            sys.exit(1)
    for name, script, args in shape_workloads(data_flags):
        if keep(name):
            rows.append({"name": name, "kind": "shapes", **limit_row(name, script, args, 0, steps=0)})
    for name, make in pipelines(data, a.data_cache):
        if keep(name):
            print(f"measuring {name} ...", flush=True)
            rows.append({"name": name, "kind": "loader", "items_per_s_per_worker": round(loader_throughput(make()), 1)})
    if keep("proposals"):
        rows.append({"name": "proposals: selective search (images)", "kind": "loader",
                     "items_per_s_per_worker": round(proposal_throughput(data), 2)})
    if keep("COCO eval"):
        rows += evaluation_speed(data)
    print(write_report(rows, a))
    print(f"wrote {a.out}/bench.json, bench.md")
    if any("error" in r for r in rows):
        sys.exit(1)


COLUMNS = {  # kind -> the figures its table shows
    "train": ("samples_per_s", "speed_window", "limit_samples_per_s", "vs_limit", "data_time_share", "peak_mem_mb",
              "limit_peak_mem_mb", "shapes_per_100_it", "shapes_per_100_it_pad32", "vs_reference", "error",
              "skipped"),
    "shapes": ("shapes_per_100_it", "shapes_per_100_it_pad32", "error"),
    "loader": ("items_per_s_per_worker",),
    "eval": ("eval_s_per_1000_images",),
}


def write_report(rows, a):
    """Writes bench.json and bench.md (one markdown table per kind of row); returns the markdown."""
    by_name = {r["name"]: r for r in rows}
    for r in rows:
        ref = by_name.get(r.get("reference") or "", {})
        if r.get("samples_per_s") and ref.get("samples_per_s"):
            r["vs_reference"] = round(r["samples_per_s"] / ref["samples_per_s"], 2)
    device = torch.cuda.get_device_name() if a.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    head = (f"bench {time.strftime('%Y-%m-%d')} on {device}, torch {torch.__version__}, data: {a.data or 'synthetic'}"
            + (f", {a.workers} workers" if a.device == "cuda" else ", no workers"))
    lines = [head]
    for kind, cols in COLUMNS.items():
        kind_rows = [r for r in rows if r["kind"] == kind]
        if kind_rows:
            lines += ["", "| workload | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
            lines += [f"| {r['name']} | " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in kind_rows]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(a.out, "bench.md"), "w") as f:
        f.write(text)
    with open(os.path.join(a.out, "bench.json"), "w") as f:
        json.dump({"device": device, "data": a.data or "synthetic", "rows": rows, "torch": torch.__version__,
                   "cpus": os.cpu_count()}, f, indent=1)
    return text


if __name__ == "__main__":
    main()
