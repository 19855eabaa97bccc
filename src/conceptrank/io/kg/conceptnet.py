"""ConceptNet 5.7 assertions (``conceptnet-assertions-5.7.0.csv.gz``), streamed once with constant memory.

Each line holds five tab-separated fields: edge URI, relation URI (``/r/PartOf``), start and end node
URIs (``/c/en/wheel/n``), and a JSON object with at least ``weight`` (see
``shared/spec/knowledge-graph-formats.md``). :func:`read_conceptnet` keeps the lines whose both
ends are English terms among the ones asked for and merges duplicates (several senses or sources of
one edge); only kept lines have their JSON parsed. What it leaves out is counted: non-English or
non-concept ends, malformed lines (wrong field count, a relation or start that is no URI, bad JSON,
no numeric weight; the first ones by line number), relation names ConceptNet does not define (kept).
A truncated or corrupt ``.gz`` and bytes that are not UTF-8 raise :class:`KnowledgeGraphError`
naming the file (and the line).

The filtered subgraph is cached as CSV (``cache_dir/conceptnet-<key>.csv`` plus a ``.json``
account) keyed by the dump's SHA-256 and the term set; the digest itself is remembered by file
size and modification time, so an unchanged dump is not hashed again.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
import os
import zlib
from collections import Counter
from pathlib import Path
from typing import Iterable, TextIO

from conceptrank.core.relations import canonical_relation, is_known
from conceptrank.errors import KnowledgeGraphError
from conceptrank.io.cache import (
    atomic_write_json,
    atomic_write_text,
    file_sha256,
    hash_json,
    read_json,
)
from conceptrank.io.kg.edges import KGEdge, KGRead, MalformedLog

__all__ = ["read_conceptnet", "filter_conceptnet_lines", "open_text", "merge_edges", "CACHE_VERSION"]

CACHE_VERSION = 1  # bump when the filter's meaning changes
_EN = "/c/en/"


def open_text(path: Path) -> TextIO:
    """The file as UTF-8 text (gunzipped when it ends in ``.gz``), lines split on ``\\n`` only."""
    if str(path).endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="strict", newline="\n")
    return open(path, "r", encoding="utf-8", errors="strict", newline="\n")


def _scan_lines(path: Path) -> tuple[int, int]:
    """Rescan the raw bytes: (lines readable before the file breaks off, first non-UTF-8 line or 0)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    n = 0
    try:
        with opener(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError:
                    return n - 1, n
    except (OSError, EOFError, zlib.error):
        pass
    return n, 0


def read_errors(path: Path, e: BaseException) -> KnowledgeGraphError:
    """A clear error for a file that cannot be read to its end (the error path rescans it for the line)."""
    good, bad = _scan_lines(path)
    if isinstance(e, UnicodeDecodeError):
        where = f"line {bad}" if bad else f"after line {good}"
        return KnowledgeGraphError(f"{path}: {where} is not UTF-8 text ({e.reason}); knowledge graphs must be UTF-8")
    if isinstance(e, EOFError):
        return KnowledgeGraphError(f"{path}: the gzip file is truncated (it breaks off after line {good}); "
                                   "download it again (conceptrank fetch conceptnet resumes and checks it)")
    return KnowledgeGraphError(f"{path}: cannot be read to its end (it breaks off after line {good}): {e}")


_READ_ERRORS = (UnicodeDecodeError, EOFError, gzip.BadGzipFile, zlib.error, OSError)


def filter_conceptnet_lines(lines: Iterable[str], terms: frozenset[str]) -> dict:
    """The filter's inner loop over assertion lines; returns raw counts and kept ``(h, r, t, json)`` tuples.

    Only lines whose both ends are ``/c/en/<term>`` with ``term`` in ``terms`` are kept; their JSON
    is parsed later. Kept tuples: ``(line number, relation URI, head term, tail term, json text)``.
    """
    log = MalformedLog()
    kept = []
    matched = set()
    other = 0
    n = 0
    for n, line in enumerate(lines, 1):
        parts = line.split("\t")
        if len(parts) != 5:
            if line.strip():
                log.add(n, f"{len(parts)} tab-separated fields, expected 5")
            continue
        s = parts[2]
        o = parts[3]
        if not s.startswith(_EN) or not o.startswith(_EN):
            if not s.startswith("/c/") or not parts[1].startswith("/r/"):
                log.add(n, "relation or start is not a ConceptNet URI (/r/..., /c/...)")
            else:
                other += 1
            continue
        h = s[6:].partition("/")[0]
        t = o[6:].partition("/")[0]
        hin = h in terms
        tin = t in terms
        if hin:
            matched.add(h)
        if tin:
            matched.add(t)
        if hin and tin:
            kept.append((n, parts[1], h, t, parts[4]))
    return {"lines": n, "kept": kept, "matched": matched, "other": other, "log": log}


def merge_edges(rows: Iterable[tuple[str, str, str, float, str]]) -> tuple[KGEdge, ...]:
    """Merge ``(head, relation, tail, weight, source)`` rows into sorted unique edges (max weight, joined sources)."""
    best: dict[tuple[str, str, str], list] = {}
    for h, r, t, w, src in rows:
        cur = best.setdefault((h, r, t), [w, set()])
        cur[0] = max(cur[0], w)
        if src:
            cur[1].add(src)
    return tuple(KGEdge(h, r, t, float(w), "|".join(sorted(s))) for (h, r, t), (w, s) in sorted(best.items()))


def _parse_kept(kept: list, log: MalformedLog) -> tuple[list, Counter]:
    rows = []
    unknown: Counter = Counter()
    for n, rel_uri, h, t, info in kept:
        try:
            meta = json.loads(info)
            weight = float(meta["weight"])
        except (ValueError, KeyError, TypeError):
            log.add(n, "the fifth field is not a JSON object with a numeric 'weight'")
            continue
        rel = canonical_relation(rel_uri)
        if not is_known(rel):
            unknown[rel] += 1
        source = meta.get("dataset") if isinstance(meta, dict) else None
        rows.append((h, rel, t, weight, str(source or "conceptnet")))
    return rows, unknown


def stream_conceptnet(path: Path, terms: frozenset[str]) -> KGRead:
    """Filter the assertions file in one pass (no cache)."""
    if not path.is_file():
        raise KnowledgeGraphError(f"{path}: no such file")
    try:
        with open_text(path) as f:
            raw = filter_conceptnet_lines(f, terms)
    except _READ_ERRORS as e:
        raise read_errors(path, e) from None
    log: MalformedLog = raw["log"]
    rows, unknown = _parse_kept(raw["kept"], log)
    return KGRead(
        path=str(path), format="conceptnet", edges=merge_edges(rows), lines=raw["lines"], kept=len(rows),
        other_language=raw["other"], malformed=log.count, malformed_lines=tuple(sorted(log.lines))[:20],
        unknown_relations=dict(unknown), matched_terms=frozenset(raw["matched"]),
    )


# -- cache -----------------------------------------------------------------------------------------
def _digest(path: Path, cache_dir: Path) -> str:
    """SHA-256 of ``path``, remembered in ``cache_dir/digests.json`` by size and mtime."""
    memo_path = cache_dir / "digests.json"
    try:
        memo = read_json(memo_path) if memo_path.is_file() else {}
    except (OSError, ValueError):
        memo = {}
    st = path.stat()
    key = str(path.resolve())
    rec = memo.get(key) or {}
    if rec.get("size") == st.st_size and rec.get("mtime_ns") == st.st_mtime_ns and rec.get("sha256"):
        return rec["sha256"]
    digest = file_sha256(path)
    memo[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    atomic_write_json(memo_path, memo)
    return digest


def _write_cache(csv_path: Path, meta_path: Path, res: KGRead, key: str) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["head", "relation", "tail", "weight", "source"])
    w.writerows([e.head, e.relation, e.tail, repr(e.weight), e.source] for e in res.edges)
    atomic_write_text(csv_path, buf.getvalue())
    atomic_write_json(meta_path, {"key": key, "csv_sha256": file_sha256(csv_path), **res.to_dict()})


def _read_cache(csv_path: Path, meta_path: Path, key: str) -> KGRead | None:
    try:
        meta = read_json(meta_path)
        if meta.get("key") != key or file_sha256(csv_path) != meta.get("csv_sha256"):
            return None
        with open(csv_path, newline="", encoding="utf-8") as f:
            edges = tuple(KGEdge(r["head"], r["relation"], r["tail"], float(r["weight"]), r["source"])
                          for r in csv.DictReader(f))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return KGRead(
        path=meta["path"], format="conceptnet", edges=edges, lines=meta["lines"], kept=meta["kept_lines"],
        other_language=meta["other_language"], malformed=meta["malformed"],
        malformed_lines=tuple((d["line"], d["reason"]) for d in meta["malformed_lines"]),
        unknown_relations=meta["unknown_relations"], matched_terms=frozenset(meta["matched_terms"]),
        digest=meta["sha256"], cached=True,
    )


def read_conceptnet(path: str | os.PathLike, terms: Iterable[str], cache_dir: str | os.PathLike | None = None) -> KGRead:
    """ConceptNet assertions among ``terms``, from the cache when this dump and term set were filtered before.

    Parameters
    ----------
    path : the ``.csv.gz`` (or plain ``.csv``) assertions file.
    terms : ConceptNet terms (``wheel``, ``traffic_light``) to keep edges between.
    cache_dir : where to cache the filtered subgraph; None disables the cache.
    """
    path = Path(path)
    terms = frozenset(terms)
    if cache_dir is None:
        return stream_conceptnet(path, terms)
    if not path.is_file():
        raise KnowledgeGraphError(f"{path}: no such file")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    digest = _digest(path, cache_dir)
    key = hash_json({"format": "conceptnet", "version": CACHE_VERSION, "sha256": digest, "terms": sorted(terms)})
    csv_path = cache_dir / f"conceptnet-{key[:20]}.csv"
    meta_path = csv_path.with_suffix(".json")
    hit = _read_cache(csv_path, meta_path, key)
    if hit is not None:
        return hit
    res = stream_conceptnet(path, terms)
    res = dataclasses.replace(res, digest=digest)
    _write_cache(csv_path, meta_path, res, key)
    return res
