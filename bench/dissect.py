"""Benchmark of the dissect stage; prints ratios measured in one run.

1. whole dissect vs. the bare forward pass over the same probe images (data loading included);
   goal ≤ 1.1× (the loader decodes and packs the masks while the model runs, so the tally after
   the forward pass is only counting); and vs. a NetDissect-Lite-style run (the same forward pass,
   then the naive threshold + tally, timed on ``--naive-images`` and scaled to N): goal ≥ 1.5×;
2. threshold + tally phases vs. an in-project naive reference (NetDissect-Lite's algorithm: exact
   quantile over every activation, then a Python loop over images × units with PIL resizes);
   goal ≥ 50×; and the max IoU difference with equal thresholds (goal ≤ 1e-6);
3. peak RSS of a dissect run at N and 4N probe images (should stay flat).

Usage::

    python bench/dissect.py                      # resnet18 (random init) layer4 on a 224-px synthetic probe set
    python bench/dissect.py --model runs/demo/world/model --size 64     # the demo's small model
    python bench/dissect.py --device cuda --model resnet152 --size 224 --probe-images 10000

The synthetic probe sets are generated under ``--work`` (kept between runs, keyed by their
parameters). With ``--model`` a torchvision name, the layer defaults to ``layer4``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def make_probe(work: Path, n: int, size: int, seed: int = 0) -> Path:
    from conceptrank.synthetic.world import generate_world

    out = work / f"world_n{n}_s{size}_seed{seed}"
    if not (out / "probe" / "index.csv").exists():
        generate_world(out, seed=seed, size=size, probe_images=n, images_per_class=10, progress=False)
    return out / "probe"


def make_model_card(work: Path, size: int) -> Path:
    """A trained synthetic model when one exists in work/, else a seeded random ConceptNet card."""
    from conceptrank.synthetic.build import build_world

    out = work / f"model_world_s{size}"
    if not (out / "model" / "model.json").exists():
        build_world(out, seed=0, size=size, probe_images=32, images_per_class=10, model="auto", progress=False)
    return out / "model"


def bare_forward(model, layer: str, probe: Path, batch_size: int, workers: int, device: str) -> float:
    """Seconds for data loading + forward over the probe images, nothing else."""
    import torch

    from conceptrank.io.broden import BrodenDataset
    from conceptrank.nn.hooks import record_layers
    from conceptrank.nn.device import resolve_device
    from conceptrank.stages.dissect import _loader, _probe_size, _ProbeImages

    ds = BrodenDataset(probe)
    dev = resolve_device(device)
    module = model.module.to(dev).eval()
    loader = _loader(_ProbeImages(ds, model.to_tensor, _probe_size(ds)), batch_size, workers)
    t0 = time.perf_counter()
    with torch.inference_mode(), record_layers(module, [layer]) as rec:
        for x in loader:
            module(x.to(dev))
            rec[layer].float().cpu()  # the features leave the device in dissect too
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def naive_phases(model, layer: str, probe: Path, thresholds_for_iou: np.ndarray, quantile: float):
    """NetDissect-Lite's algorithm on the same features: returns (seconds, iou with given thresholds)."""
    import torch

    from conceptrank.io.broden import BrodenDataset
    from conceptrank.nn.hooks import record_layers
    from conceptrank.core.tally import label_category_matrix
    from conceptrank.stages.dissect import _probe_size
    from conceptrank.testing.reference import naive_tally

    ds = BrodenDataset(probe)
    size = _probe_size(ds)
    feats = []
    with torch.inference_mode(), record_layers(model.module.cpu(), [layer]) as rec:
        for i in range(0, len(ds), 64):
            x = torch.stack([model.to_tensor(ds.load_image(j), size) for j in range(i, min(i + 64, len(ds)))])
            model.module(x)
            feats.append(rec[layer].float().numpy())
    feats = np.concatenate(feats)
    planes = [ds.load_planes(i) for i in range(len(ds))]
    scalars = [list(r.scalars) for r in ds.records]
    lc = label_category_matrix(ds.primary, len(ds.categories))
    t0 = time.perf_counter()
    U = feats.shape[1]
    _ = np.quantile(feats.transpose(1, 0, 2, 3).reshape(U, -1).astype(np.float64), 1 - quantile, axis=1)
    truth, both, act = naive_tally(feats, thresholds_for_iou, planes, scalars, lc)
    secs = time.perf_counter() - t0
    iou = both / (act @ lc.T + truth[None, :] - both + 1e-10)

    # ours on exactly the same in-memory inputs: running top-k thresholds + vectorized tally
    from conceptrank.core.stats import TopKQuantile
    from conceptrank.core.tally import TallyAccumulator

    t0 = time.perf_counter()
    ft = torch.from_numpy(feats)
    tk = TopKQuantile(U, feats.shape[0] * feats.shape[2] * feats.shape[3], quantile)
    for i in range(0, len(ft), 64):
        tk.add(ft[i:i + 64].permute(1, 0, 2, 3).reshape(U, -1))
    tk.result()
    acc = TallyAccumulator(thresholds_for_iou, lc)
    pt = [torch.from_numpy(p) for p in planes]
    for i in range(0, len(ft), 64):
        acc.add(ft[i:i + 64], pt[i:i + 64], scalars[i:i + 64])
    ours = time.perf_counter() - t0
    return secs, iou, ours


def child_dissect(args) -> None:
    from conceptrank.io.broden import BrodenDataset
    from conceptrank.nn.models import load_model
    from conceptrank.stages.dissect import DissectConfig, run_dissect

    model = load_model(args.model, args.weights)
    cfg = DissectConfig(batch_size=args.batch_size, workers=args.workers, device=args.device, progress=False)
    (res,) = run_dissect(model, None, args.layer, BrodenDataset(args.probe), Path(args.out), cfg)
    print(json.dumps({"timings": res.timings}))


def peak_rss_mb(args, probe: Path, out: Path) -> float:
    cmd = [sys.executable, __file__, "--child", "--probe", str(probe), "--out", str(out), "--model", args.model,
           "--layer", args.layer, "--batch-size", str(args.batch_size), "--workers", str(args.workers),
           "--device", args.device]
    if args.weights:
        cmd += ["--weights", args.weights]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    p.stdout.read()
    if status != 0:
        raise SystemExit(f"child dissect failed: {cmd}")
    return usage.ru_maxrss / 1024.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--probe-images", type=int, default=400)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--model", default="resnet18", help="model card or torchvision name ('synthetic': train the world's model)")
    ap.add_argument("--weights", default="none")
    ap.add_argument("--layer", default="layer4")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quantile", type=float, default=0.005)
    ap.add_argument("--work", type=Path, default=HERE.parent / "runs" / "bench")
    ap.add_argument("--naive-images", type=int, default=100, help="images for the naive reference (it is slow)")
    ap.add_argument("--no-rss", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child_dissect(args)

    from conceptrank.io.broden import BrodenDataset
    from conceptrank.nn.models import load_model
    from conceptrank.stages.dissect import DissectConfig, run_dissect

    args.work.mkdir(parents=True, exist_ok=True)
    if args.model == "synthetic":
        args.model = str(make_model_card(args.work, args.size))
    if Path(args.model).exists():  # a model card carries its own weights
        args.weights = None
    model = load_model(args.model, args.weights)
    probe = make_probe(args.work, args.probe_images, args.size)
    cfg = DissectConfig(batch_size=args.batch_size, workers=args.workers, device=args.device, quantile=args.quantile,
                        progress=False)
    print(f"model {args.model} layer {args.layer}, probe {probe} ({args.probe_images} images, {args.size}px), "
          f"device {args.device}, workers {args.workers}")

    # warm-up (page cache, lazy init), then bare forward and whole dissect, alternated twice
    bare_forward(model, args.layer, probe, args.batch_size, args.workers, args.device)
    fw, wd = [], []
    for _ in range(2):
        fw.append(bare_forward(model, args.layer, probe, args.batch_size, args.workers, args.device))
        shutil.rmtree(args.work / "out", ignore_errors=True)  # never measure a cached result
        t0 = time.perf_counter()
        (res,) = run_dissect(model, None, args.layer, BrodenDataset(probe), args.work / "out", cfg)
        wd.append(time.perf_counter() - t0)
    fwd, whole = min(fw), min(wd)
    print(f"bare forward pass         {fwd:8.2f} s")
    print(f"whole dissect             {whole:8.2f} s   ratio {whole / fwd:.2f}x   (goal <= 1.1x)")
    print(f"  phases: " + ", ".join(f"{k} {v:.2f}s" for k, v in res.timings.items()))
    t = res.timings
    print(f"  within that run: total / its forward phase (loading, masks decoded in the loader) "
          f"{t['total'] / t['forward']:.2f}x; tally after the forward pass {t['tally']:.2f} s "
          f"({100 * t['tally'] / t['forward']:.0f}% of it)")

    # naive reference on a subset (it is slow): same thresholds → IoU difference; phase speed ratio
    sub = make_probe(args.work, args.naive_images, args.size)
    shutil.rmtree(args.work / "out_sub", ignore_errors=True)
    (ours,) = run_dissect(model, None, args.layer, BrodenDataset(sub), args.work / "out_sub", cfg)
    naive_s, naive_iou, same_inputs_s = naive_phases(model, args.layer, sub, ours.thresholds, args.quantile)
    ours_s = ours.timings["threshold"] + ours.timings["tally"]
    diff = float(np.abs(naive_iou - ours.iou).max())
    print(f"threshold+tally, {args.naive_images} images, features and masks in memory: naive {naive_s:.3f} s, "
          f"ours {same_inputs_s:.3f} s, speed ratio {naive_s / same_inputs_s:.1f}x (goal >= 50x)")
    print(f"  (ours inside dissect, masks decoded from PNG in loader workers: {ours_s:.3f} s, "
          f"ratio {naive_s / ours_s:.1f}x)")
    print(f"max |IoU difference| with equal thresholds: {diff:.2e} (goal <= 1e-6)")
    naive_whole = fwd + naive_s * args.probe_images / args.naive_images
    print(f"NetDissect-Lite-style whole run (forward + naive threshold/tally scaled to {args.probe_images} images): "
          f"{naive_whole:.2f} s; ours {whole:.2f} s, speed ratio {naive_whole / whole:.2f}x (goal >= 1.5x)")

    if not args.no_rss:
        big = make_probe(args.work, 4 * args.probe_images, args.size)
        for d in ("rss1", "rss4"):
            shutil.rmtree(args.work / d, ignore_errors=True)
        r1 = peak_rss_mb(args, probe, args.work / "rss1")
        r4 = peak_rss_mb(args, big, args.work / "rss4")
        print(f"peak RSS: {r1:.0f} MB at N={args.probe_images}, {r4:.0f} MB at 4N={4 * args.probe_images}, "
              f"ratio {r4 / r1:.2f} (flat = 1.0)")


if __name__ == "__main__":
    main()
