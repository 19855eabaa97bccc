"""Benchmark of ``conceptrank benchmark-rankers`` itself: is the 3-world ranker benchmark ≤ 10 min on 2 cores?

Runs the whole benchmark from scratch (fresh worlds, dissections, extractions, probe activations,
every ranker with its stability refits) in a temporary folder, with torch limited to 2 threads, and
prints the wall time, the CPU time (this process and its children) and their ratio to the 600 s
budget; then the table it measured. A busy machine inflates the wall time, not the CPU time: on a
machine shared with other jobs, read ``cpu / 2 cores``.

Usage::

    python bench/rankers.py                         # seeds 1,2,3, the shipped model (or one trained once)
    python bench/rankers.py --model runs/demo/world/model --seeds 1,2,3
    python bench/rankers.py --keep runs/benchmark   # keep the outputs there instead of a temp folder
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

BUDGET_S = 600.0


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--model", default=None, help="model card folder (default: shipped, else trained once)")
    ap.add_argument("--keep", default=None, help="output folder to keep (default: a temporary one, removed)")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    import torch

    torch.set_num_threads(2)
    from conceptrank.pipeline import run_ranker_benchmark
    from conceptrank.stages.benchmark import BenchmarkConfig

    out = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_rankers_"))
    if args.keep and out.exists():
        shutil.rmtree(out)  # from scratch: nothing reused
    cfg = BenchmarkConfig(seeds=tuple(int(s) for s in args.seeds.split(",")),
                          model=Path(args.model) if args.model else None)
    t0, c0 = time.perf_counter(), _cpu_seconds()
    try:
        res = run_ranker_benchmark(out, cfg, echo=lambda m: None)
    finally:
        wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    print(res.table())
    print(f"\n{len(cfg.seeds)} world(s), {len(cfg.rankers)} rankers, from scratch:")
    print(f"  wall {wall:.0f} s = {wall / BUDGET_S:.2f} x the {BUDGET_S:.0f} s budget")
    print(f"  cpu  {cpu:.0f} s; on 2 cores ≥ {cpu / 2:.0f} s = {cpu / 2 / BUDGET_S:.2f} x the budget")
    for k, v in res.timings.items():
        print(f"  {k}: {v:.1f} s")


if __name__ == "__main__":
    main()
