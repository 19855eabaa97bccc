"""Knowledge-graph readers: ConceptNet 5.7 assertions, CSKG / KGTK TSV, WordNet 3.0 (WNDB).

:func:`load_kg` picks the reader (``auto`` looks at the path) and returns a
:class:`~conceptrank.io.kg.edges.KGRead`: the edges among the terms asked for, plus an account of
what was left out (non-English, malformed lines by number, unknown relation names).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Literal

from conceptrank.errors import KnowledgeGraphError
from conceptrank.io.kg.conceptnet import read_conceptnet
from conceptrank.io.kg.edges import KGEdge, KGRead
from conceptrank.io.kg.kgtk import read_kgtk
from conceptrank.io.kg.mapping import (
    ConceptMapping,
    map_concepts,
    normalise_concept,
    read_overrides,
)
from conceptrank.io.kg.wordnet import DEFAULT_WORDNET, is_wordnet_dir, read_wordnet

__all__ = [
    "KGFormat", "KGEdge", "KGRead", "ConceptMapping", "load_kg", "detect_format", "map_concepts",
    "normalise_concept", "read_overrides", "read_conceptnet", "read_kgtk", "read_wordnet", "DEFAULT_WORDNET",
]

KGFormat = Literal["auto", "conceptnet", "kgtk", "wordnet"]
_FORMATS = ("auto", "conceptnet", "kgtk", "wordnet")


def _single_file(folder: Path) -> Path:
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith((".csv.gz", ".csv", ".tsv", ".tsv.gz")))
    if len(found) != 1:
        raise KnowledgeGraphError(
            f"{folder}: expected a WordNet database folder or exactly one .csv(.gz) / .tsv(.gz) knowledge graph, "
            f"found {len(found)}" + (f" ({', '.join(p.name for p in found[:5])})" if found else "")
        )
    return found[0]


def detect_format(path: str | os.PathLike) -> tuple[str, Path]:
    """``(format, file or folder)`` for a path: a WNDB folder is WordNet, ``*.tsv[.gz]`` KGTK, ``*.csv[.gz]`` ConceptNet."""
    path = Path(path)
    if not path.exists():
        raise KnowledgeGraphError(f"--kg {path}: no such file or folder")
    if path.is_dir():
        if is_wordnet_dir(path):
            return "wordnet", path
        path = _single_file(path)
    name = path.name.lower()
    if name.endswith((".tsv", ".tsv.gz")):
        return "kgtk", path
    if name.endswith((".csv", ".csv.gz")):
        return "conceptnet", path
    raise KnowledgeGraphError(f"--kg {path}: cannot tell its format from the name; pass --kg-format conceptnet, kgtk or wordnet")


def load_kg(path: str | os.PathLike, terms: Iterable[str], fmt: KGFormat = "auto",
            cache_dir: str | os.PathLike | None = None) -> KGRead:
    """Read the knowledge graph at ``path`` restricted to ``terms``.

    Parameters
    ----------
    path : ConceptNet assertions file, KGTK file, WNDB folder, or a folder holding one KG file.
    terms : KG terms to keep edges between.
    fmt : ``auto`` (from the path) or the format.
    cache_dir : ConceptNet only: where the filtered subgraph is cached.
    """
    if fmt not in _FORMATS:
        raise KnowledgeGraphError(f"--kg-format {fmt!r}: choose one of {', '.join(_FORMATS)}")
    found, target = detect_format(path)
    if fmt != "auto":
        if fmt != "wordnet" and target.is_dir():
            raise KnowledgeGraphError(f"--kg {path}: a folder, but --kg-format {fmt} reads a file")
        found = fmt
    if found == "wordnet":
        return read_wordnet(target, terms)
    if found == "kgtk":
        return read_kgtk(target, terms)
    return read_conceptnet(target, terms, cache_dir)
