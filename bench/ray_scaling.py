"""Scaling of the Ray engine on this machine: dissect (and extract) with the local engine, then Ray
with 1 and 2 workers on a local cluster; prints wall times, speed ratios and whether the outputs are
byte-identical, measured in one run.

Usage::

    python bench/ray_scaling.py                                   # synthetic probe, resnet18 (random) layer4
    python bench/ray_scaling.py --model runs/demo/world/model --probe runs/demo/world/probe
    python bench/ray_scaling.py --device cuda --model resnet152 --probe-images 10000 --workers-list 1,8

With ``--cpus`` the local cluster gets that many CPUs (default: all); each worker gets an equal share
(or one GPU when the cluster has GPUs). The Ray engine runs the forward pass twice (thresholds, then
tally: no feature store crosses the network), so on one machine whose cores the local engine already
uses, it is expected to be slower than the local engine; it pays off when workers bring their own
cores or GPUs.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

OUTPUTS = ("tally.csv", "thresholds.npy", "top_images.npz", "tally_counts.npz")


def timed_dissect(model, layer, probe, out: Path, **cfg) -> tuple[float, dict]:
    from conceptrank.stages.dissect import DissectConfig, run_dissect

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    (res,) = run_dissect(model, None, layer, probe, out, DissectConfig(progress=False, **cfg))
    return time.perf_counter() - t0, res.timings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--weights", default="none")
    ap.add_argument("--layer", default="layer4")
    ap.add_argument("--probe", type=Path, default=None, help="a Broden folder (default: a synthetic one)")
    ap.add_argument("--probe-images", type=int, default=240)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cpus", type=int, default=None)
    ap.add_argument("--workers-list", default="1,2")
    ap.add_argument("--work", type=Path, default=HERE.parent / "runs" / "bench")
    args = ap.parse_args()

    import ray

    from conceptrank.nn.models import load_model
    from dissect import make_probe

    args.work.mkdir(parents=True, exist_ok=True)
    probe = args.probe or make_probe(args.work, args.probe_images, args.size)
    if Path(args.model).exists():
        args.weights = None
    model = load_model(args.model, args.weights)
    common = dict(batch_size=args.batch_size, workers=0, device=args.device)
    print(f"model {args.model} layer {args.layer}, probe {probe}, device {args.device}, batch {args.batch_size}")
    local_s, local_t = timed_dissect(model, args.layer, probe, args.work / "ray_local", **common)
    print(f"local engine               {local_s:8.2f} s   (" + ", ".join(f"{k} {v:.1f}s" for k, v in local_t.items()) + ")")
    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        ref = {n: (args.work / "ray_local" / n).read_bytes() for n in OUTPUTS}
        base = None
        for w in (int(x) for x in args.workers_list.split(",")):
            out = args.work / f"ray_{w}"
            secs, t = timed_dissect(model, args.layer, probe, out, engine="ray", ray_workers=w, **common)
            same = all((out / n).read_bytes() == ref[n] for n in OUTPUTS)
            base = base or secs
            print(f"ray engine, {w} worker(s)     {secs:8.2f} s   vs 1 worker {base / secs:.2f}x, vs local "
                  f"{local_s / secs:.2f}x, outputs {'byte-identical' if same else 'DIFFERENT'} ("
                  + ", ".join(f"{k} {v:.1f}s" for k, v in t.items()) + ")")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
