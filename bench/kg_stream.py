"""Benchmark: stream-filter a 5-million-line ConceptNet-format assertions file.

Generates ``--lines`` lines (default 5 000 000) in the ConceptNet 5.7 assertions format — edge URI,
relation URI, start and end URIs with POS/sense suffixes, a JSON info object like the dump's — with
30 % English–English edges and the rest in other languages, gzip-compressed, then filters it to
``--terms`` English terms with :func:`conceptrank.io.kg.conceptnet.read_conceptnet` (no cache) in a
child process and reports its rate (lines per second of the child's CPU time — one core — and per wall-clock second) and peak RSS (the child's ``ru_maxrss``).

Targets (issue 14): ≥ 200 000 lines/s and ≤ 300 MB peak RSS.

    python bench/kg_stream.py [--lines 5000000] [--terms 1000] [--keep FILE]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RELATIONS = ("RelatedTo", "IsA", "PartOf", "HasA", "UsedFor", "AtLocation", "HasProperty", "Synonym", "Antonym",
             "FormOf", "DerivedFrom", "MadeOf", "dbpedia/genre", "ExternalURL", "EtymologicallyRelatedTo")
LANGS = ("fr", "de", "ja", "es", "it", "ru", "pt", "nl", "fi", "zh")
VOCAB = 100_000


def _node(rng: random.Random, lang: str) -> str:
    term = f"w{rng.randrange(VOCAB)}"
    suffix = ("", "/n", "/v", "/a", "/n/wn/artifact")[rng.randrange(5)]
    return f"/c/{lang}/{term}{suffix}"


def generate(path: Path, lines: int, seed: int = 0) -> None:
    """Write ``lines`` assertion lines (JSON info objects drawn from a pool of 2000 like the dump's)."""
    rng = random.Random(seed)
    infos = [json.dumps({"dataset": f"/d/conceptnet/4/{LANGS[i % len(LANGS)]}", "license": "cc:by/4.0",
                         "sources": [{"activity": "/s/activity/omcs/omcs1_possibly_free_text",
                                      "contributor": f"/s/contributor/omcs/u{i}"}],
                         "weight": round(rng.uniform(0.1, 4.0), 3)}) for i in range(2000)]
    en = [_node(rng, "en") for _ in range(200_000)]
    other = [_node(rng, LANGS[i % len(LANGS)]) for i in range(200_000)]
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as f:
        buf = []
        for _ in range(lines):
            rel = RELATIONS[rng.randrange(len(RELATIONS))]
            english = rng.random() < 0.3
            s = en[rng.randrange(200_000)] if english else other[rng.randrange(200_000)]
            o = en[rng.randrange(200_000)] if english or rng.random() < 0.3 else other[rng.randrange(200_000)]
            buf.append(f"/a/[/r/{rel}/,{s}/,{o}/]\t/r/{rel}\t{s}\t{o}\t{infos[rng.randrange(2000)]}\n")
            if len(buf) == 50_000:
                f.write("".join(buf).encode())
                buf = []
        f.write("".join(buf).encode())


_CHILD = """
import json, sys, time
from conceptrank.io.kg.conceptnet import read_conceptnet
terms = frozenset(json.loads(sys.argv[2]))
t0, c0 = time.perf_counter(), time.process_time()
res = read_conceptnet(sys.argv[1], terms, None)
dt, cpu = time.perf_counter() - t0, time.process_time() - c0
print(json.dumps({"seconds": dt, "cpu": cpu, "lines": res.lines, "edges": len(res.edges), "kept": res.kept,
                  "other": res.other_language, "malformed": res.malformed}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=5_000_000)
    ap.add_argument("--terms", type=int, default=1000)
    ap.add_argument("--keep", type=Path, default=None, help="write the generated file here (and reuse it if present)")
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory()
    path = args.keep or Path(tmp.name) / "assertions.csv.gz"
    if not path.exists():
        t0 = time.perf_counter()
        generate(path, args.lines)
        print(f"generated {args.lines} lines ({path.stat().st_size / 2**20:.0f} MiB gzip) in {time.perf_counter() - t0:.0f} s")
    terms = sorted({f"w{i}" for i in random.Random(1).sample(range(VOCAB), args.terms)})
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path), json.dumps(terms)], env=env, check=True,
                         capture_output=True, text=True)
    peak_mib = max(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, before) / 1024
    r = json.loads(out.stdout.strip().splitlines()[-1])
    rate = r["lines"] / r["cpu"]
    print(f"filtered {r['lines']} lines to {r['edges']} edges among {args.terms} terms in {r['cpu']:.1f} s of CPU "
          f"({r['seconds']:.1f} s wall; {r['other']} non-English, {r['malformed']} malformed)")
    print(f"rate {rate:,.0f} lines per CPU-second on one core (target >= 200,000: {rate / 200_000:.2f}x); "
          f"wall-clock {r['lines'] / r['seconds']:,.0f} lines/s on this (possibly shared) machine")
    print(f"peak RSS {peak_mib:.0f} MiB (target <= 300 MB: {peak_mib * 1.048576 / 300:.2f} of it)")


if __name__ == "__main__":
    main()
