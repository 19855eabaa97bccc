"""CSKG / KGTK edge files (``cskg.tsv``, optionally gzipped): tab-separated with a header.

Required columns: ``node1``, ``relation``, ``node2``. A node's term is the ConceptNet term of a
``/c/en/...`` id; for other ids (``wn:wheel.n.01``, ``vg:...``) each of its ``node1;label`` /
``node2;label`` labels (several separated by ``|``) is a term (lower case, spaces → ``_``), and the
edge is kept for every label pair among the terms asked for. Nodes of other languages (``/c/fr/...``)
are counted and left out. ``weight`` and ``source`` columns are used when present (weight 1.0 and
source ``kgtk`` otherwise). Relations are canonical ConceptNet names where they are ones
(``/r/PartOf``, ``mw:MayHaveProperty``); other names are kept as they are and reported.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Iterable

from conceptrank.core.relations import canonical_relation, is_known
from conceptrank.errors import KnowledgeGraphError
from conceptrank.io.kg.conceptnet import (
    _READ_ERRORS,
    merge_edges,
    open_text,
    read_errors,
)
from conceptrank.io.kg.edges import KGRead, MalformedLog, term_of_label

__all__ = ["read_kgtk", "REQUIRED_COLUMNS"]

REQUIRED_COLUMNS = ("node1", "relation", "node2")


def _node_terms(node: str, labels: str) -> tuple[list[str], bool]:
    """A node's candidate terms and whether it is of another language."""
    if node.startswith("/c/"):
        if not node.startswith("/c/en/"):
            return [], True
        return [node[6:].partition("/")[0]], False
    return [term_of_label(x) for x in labels.split("|") if x.strip()], False


def _columns(header: str, path: Path) -> dict[str, int]:
    cols = {name.strip(): i for i, name in enumerate(header.rstrip("\n").split("\t"))}
    missing = [c for c in REQUIRED_COLUMNS if c not in cols]
    if missing:
        raise KnowledgeGraphError(f"{path}: line 1 is not a KGTK header: missing column(s) {', '.join(missing)} "
                                  f"(found {', '.join(list(cols)[:8])})")
    return cols


def _weight(parts: list[str], col: int | None) -> float | None:
    if col is None or col >= len(parts) or not parts[col].strip():
        return 1.0
    try:
        return float(parts[col])
    except ValueError:
        return None


def _scan(lines, cols: dict[str, int], terms: frozenset[str], log: MalformedLog) -> dict:
    i1, ir, i2 = cols["node1"], cols["relation"], cols["node2"]
    l1, l2 = cols.get("node1;label"), cols.get("node2;label")
    iw, isrc = cols.get("weight"), cols.get("source")
    width = len(cols)
    rows, matched, unknown = [], set(), Counter()
    other = n = 0
    for n, line in enumerate(lines, 2):
        parts = line.rstrip("\n").split("\t")
        if len(parts) != width:
            if line.strip():
                log.add(n, f"{len(parts)} tab-separated fields, the header has {width}")
            continue
        heads, other1 = _node_terms(parts[i1], parts[l1] if l1 is not None else "")
        tails, other2 = _node_terms(parts[i2], parts[l2] if l2 is not None else "")
        if other1 or other2:
            other += 1
            continue
        heads = [h for h in heads if h in terms]
        tails = [t for t in tails if t in terms]
        matched.update(heads, tails)
        if not heads or not tails:
            continue
        w = _weight(parts, iw)
        if w is None:
            log.add(n, f"weight {parts[iw]!r} is not a number")
            continue
        rel = canonical_relation(parts[ir])
        if not rel:
            log.add(n, "empty relation")
            continue
        if not is_known(rel):
            unknown[rel] += 1
        src = parts[isrc] if isrc is not None else "kgtk"
        rows += [(h, rel, t, w, src) for h in heads for t in tails if h != t]
    return {"rows": rows, "matched": matched, "unknown": unknown, "other": other, "lines": max(n - 1, 0)}


def read_kgtk(path: str | os.PathLike, terms: Iterable[str]) -> KGRead:
    """Edges of a KGTK file among ``terms``, with counts of what was left out."""
    path = Path(path)
    terms = frozenset(terms)
    if not path.is_file():
        raise KnowledgeGraphError(f"{path}: no such file")
    log = MalformedLog()
    try:
        with open_text(path) as f:
            header = f.readline()
            if not header:
                raise KnowledgeGraphError(f"{path}: the file is empty (a KGTK file starts with a header line)")
            raw = _scan(f, _columns(header, path), terms, log)
    except _READ_ERRORS as e:
        raise read_errors(path, e) from None
    return KGRead(
        path=str(path), format="kgtk", edges=merge_edges(raw["rows"]), lines=raw["lines"], kept=len(raw["rows"]),
        other_language=raw["other"], malformed=log.count, malformed_lines=tuple(log.lines),
        unknown_relations=dict(raw["unknown"]), matched_terms=frozenset(raw["matched"]),
    )
