"""``make bench``: throughput figures for the scripts, printed as one table and written as JSON.

    python -m tests.bench                         # CPU: small configurations, synthetic data
    python -m tests.bench --data DIR --device cuda   # DIR: any COCO-format set (images/ + annotations.json)

It lives beside the tests because, like them, it imports the scripts (common/ never does).

For each training workload (a short run of the real script: fine-tuning for every detector family, then
Direct, Montage, PreDet and AlignDet at their papers' per-GPU configurations on a GPU, at the demo's on a
CPU): train samples/s (Montage: samples = 4 per montage; PreDet/AlignDet: image pairs), peak memory (GPU
max_memory_allocated, or the process' peak RSS on the CPU) and the share of step time spent waiting for
data, all read from the run's own log.txt; and the ratio to fine-tuning the same detector in the same
bench run. For each data pipeline at its paper-default size: loader-only items/s in ONE process with
one thread (= per DataLoader worker), and selective-search images/s for the proposal generator. COCO
evaluation seconds per 1000 images (bbox, segm; pycocotools and faster-coco-eval) on 100 fabricated
detections per image.
Plus the engine overhead: one training step as the scripts write it (with ``common.engine.Run``) against the same
torchvision model stepped in a bare loop on the same batch. Nothing here is asserted: figures only.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import cv2
import torch

from common import coco, coco_eval, engine, loader, transforms
from common.cli import HelpFormatter
from common.detectors import build_detector
from common.optim import set_lr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CPU_DET = ["--backbone", "resnet18", "--preset", "cpu", "--anchor-scale", "0.5", "--rpn-batch-size", "64",
           "--roi-batch-size", "64", "--rpn-post-nms-train", "300", "--rpn-post-nms-test", "100"]


# small CPU configurations of the pre-training scripts for the CPU bench rows: the demo's (Makefile: DEMO_*)
# sizes, but with the papers' 4conv1fc box head where the demo uses 2fc
CPU_METHODS = {
    "direct": ["--detector", "fasterrcnn", "--backbone", "resnet18", "--direct-size", "96", "--batch-size", "8",
               "--anchor-scale", "0.5", "--rpn-batch-size", "64", "--roi-batch-size", "32",
               "--rpn-post-nms-train", "300", "--warmup-iters", "2", "--epochs", "100"],
    "montage": ["--backbone", "resnet18", "--montage-size", "96", "--montage-split", "32", "--batch-size", "16",
                "--montage-loss", "blockwise", "--warmup-iters", "2"],
    "predet": ["--backbone", "resnet18", "--preset", "cpu", "--anchor-scale", "0.5", "--predet-dim", "64",
               "--predet-num-queries", "8", "--predet-post-nms", "64", "--predet-neg", "32", "--batch-size", "4",
               "--warmup-iters", "2"],
    "aligndet": ["--detector", "fasterrcnn", "--backbone-weights", "scratch", "--align-proposal-method", "random",
                 *CPU_DET, "--roi-batch-size", "16", "--batch-size", "4", "--warmup-iters", "2"],
}


def workloads(device, data_flags):
    """(name, script, args, reference) for each training workload; reference = the workload it is
    compared with (fine-tuning the same detector; at 1333x800 on the GPU, the CPU configuration on the CPU)."""
    on_gpu = device == "cuda"
    iters = 30 if on_gpu else 6

    def run_flags(iters):
        return ["--device", device, "--no-tb", "--print-freq", "1", "--max-iters", str(iters), *data_flags]

    common = run_flags(iters)
    ft = ["--init", "scratch", "--warmup-iters", "1", "--no-eval"]
    out = []
    for det in ("fasterrcnn", "maskrcnn", "retinanet", "fcos"):
        big = ["--backbone", "resnet50", "--preset", "800", "--batch-size", "4" if on_gpu else "2"]
        if on_gpu or det == "fasterrcnn":  # on a CPU one full-size row (~1 min a step) shows the ratio
            out.append((f"finetune {det} 1333x800", "finetune.py",
                        ft + ["--detector", det] + big + run_flags(iters if on_gpu else 2), None))
        if not on_gpu:
            out.append((f"finetune {det} cpu", "finetune.py", ft + ["--detector", det, "--batch-size", "4"]
                        + CPU_DET + common, "finetune fasterrcnn 1333x800"))
    if on_gpu:  # the papers' per-GPU configurations
        for det in ("fasterrcnn", "maskrcnn", "retinanet", "fcos"):
            ref = f"finetune {det} 1333x800"
            out.append((f"direct {det} 448 x8", "direct.py", ["--detector", det] + common, ref))
            out.append((f"aligndet {det} x2", "alignDet.py", ["--detector", det, "--backbone-weights", "scratch",
                                                              "--align-proposal-method", "random"] + common, ref))
        out.append(("montage r50 224 x64", "montage.py", ["--montage-loss", "blockwise"] + common,
                    "finetune fasterrcnn 1333x800"))
        out.append(("predet r50 480 x4 pairs", "predet.py", common, "finetune maskrcnn 1333x800"))
    else:
        for name, flags in CPU_METHODS.items():
            out.append((f"{name} cpu", f"{'alignDet' if name == 'aligndet' else name}.py", flags + common,
                        "finetune fasterrcnn cpu"))
    return out


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


def run_workload(script, args, workers):
    """Runs a script for a few iterations; returns the figures of its last log.txt epoch record."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, script, *args, "--workers", str(workers), "--output-dir", out]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
        records = [json.loads(line) for line in open(os.path.join(out, "log.txt"))]
        last = [r for r in records if "epoch" in r][-1]
        return {k: last[k] for k in ("samples_per_s", "peak_mem_mb", "data_time_share")}


def loader_throughput(dataset, n=128, repeats=3):
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


def engine_overhead(data, steps=4, rounds=3):
    """Median time of a script's step (set_lr, autocast, Run.finite's host sync, the GradScaler, Run.log_losses) /
    the same step in a bare loop, on one fixed CPU batch."""
    ds = coco.CocoDetection(data.train_images, data.train_ann, transforms.train_augment(), keep_empty=False,
                            resize=transforms.train_resize("cpu"))
    images, targets = loader.collate_detection([ds[i] for i in range(4)])
    images, targets = transforms.to_float_batch(images, torch.device("cpu")), engine.targets_to(targets, "cpu")
    kw = dict(rpn_batch_size_per_image=64, box_batch_size_per_image=64, rpn_pre_nms_top_n_train=300,
              rpn_post_nms_top_n_train=300)
    model = build_detector("fasterrcnn", ds.num_classes, "resnet18", "bn", trainable_layers=5, **kw)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    import finetune
    with tempfile.TemporaryDirectory() as out:
        args = finetune.get_args_parser().parse_args(["--output-dir", out, "--no-tb", "--device", "cpu"])
        run = engine.Run(args, method="bench", device=torch.device("cpu"), iters_per_epoch=100, max_iters=100,
                         samples_per_iter=4)
        scaler = torch.amp.GradScaler("cpu", enabled=run.amp == torch.float16)
        run.checkpoints_hold(model, opt, scaler)

        def bare(seed):
            torch.manual_seed(seed)
            losses = model(images, targets)
            sum(losses.values()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def ours(seed):
            torch.manual_seed(seed)
            lr = set_lr(opt, 1e-4)
            with run.autocast():
                losses = model(images, targets)
            loss = sum(losses.values())
            if run.finite(loss, losses):
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                run.log_losses(losses, loss, lr)

        times = {"bare": [], "engine": []}
        bare(0)
        for r in range(rounds):
            for name, fn in (("bare", bare), ("engine", ours)):
                for s in range(steps):
                    t = time.perf_counter()
                    fn(r * steps + s)
                    times[name].append(time.perf_counter() - t)
        run.log.close()
    bare_t, ours_t = statistics.median(times["bare"]), statistics.median(times["engine"])
    return {"bare_step_s": round(bare_t, 4), "engine_step_s": round(ours_t, 4), "ratio": round(ours_t / bare_t, 4)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--data", default=os.environ.get("BENCH_DATA") or None,
                   help="a real-image set (folder with images/ + annotations.json, or a COCO root); "
                        "default: the synthetic set")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--out", default="runs/bench", help="bench.json goes here")
    p.add_argument("--data-cache", default="data", help="where the synthetic set (and Montage's cache) live")
    p.add_argument("--only", default="", help="comma-separated substrings: run only matching rows")
    a = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    ns = argparse.Namespace(data_path=a.data, train_images=None, train_ann=None, val_images=None, val_ann=None,
                            data_cache=a.data_cache)
    data = coco.resolve_data(ns)
    data_flags = ["--data-path", a.data] if a.data else ["--data-cache", a.data_cache]
    rows = []

    def keep(name):
        return not a.only or any(s in name for s in a.only.split(","))

    for name, script, args, ref in workloads(a.device, data_flags):
        if keep(name):
            print(f"running {name} ...", flush=True)
            rows.append({"name": name, "kind": "train", "reference": ref,
                         **run_workload(script, args, 0 if a.device == "cpu" else a.workers)})
    for name, make in pipelines(data, a.data_cache):
        if keep(name):
            print(f"measuring {name} ...", flush=True)
            rows.append({"name": name, "kind": "loader", "items_per_s_per_worker": round(loader_throughput(make()), 1)})
    if keep("proposals"):
        rows.append({"name": "proposals: selective search (images)", "kind": "loader",
                     "items_per_s_per_worker": round(proposal_throughput(data), 2)})
    if keep("COCO eval"):
        rows += evaluation_speed(data)
    if keep("engine") and a.device == "cpu":
        rows.append({"name": "engine overhead (Run.step vs bare loop, CPU)", "kind": "engine",
                     **engine_overhead(data)})
    by_name = {r["name"]: r for r in rows}
    for r in rows:
        ref = by_name.get(r.get("reference") or "")
        if ref and "samples_per_s" in r and "samples_per_s" in ref:
            r["vs_reference"] = round(r["samples_per_s"] / ref["samples_per_s"], 2)
    print_table(rows, a)
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "bench.json")
    with open(path, "w") as f:
        json.dump({"device": a.device, "data": a.data or "synthetic", "rows": rows,
                   "torch": torch.__version__, "cpus": os.cpu_count()}, f, indent=1)
    print(f"wrote {path}")


def print_table(rows, a):
    print(f"\nbench on {a.device} ({os.cpu_count()} CPUs), data: {a.data or 'synthetic'}")
    cols = ("samples_per_s", "peak_mem_mb", "data_time_share", "vs_reference", "items_per_s_per_worker",
            "eval_s_per_1000_images", "bare_step_s", "engine_step_s", "ratio", "error")
    print(f"| {'workload':<44} | " + " | ".join(cols) + " |")
    print("|" + "---|" * (len(cols) + 1))
    for r in rows:
        print(f"| {r['name']:<44} | " + " | ".join(str(r.get(c, "")) for c in cols) + " |")


if __name__ == "__main__":
    main()
