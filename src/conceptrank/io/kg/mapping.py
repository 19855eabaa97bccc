"""Concept names (Broden labels) ↔ knowledge-graph terms.

Normalisation (:func:`normalise_concept`), in order:

1. lower case, surrounding spaces removed;
2. a Broden category suffix — a hyphen and one letter at the end (``green-c`` colour, ``ocean-s``
   scene, ...) — is dropped;
3. runs of spaces and hyphens become one underscore (``traffic light`` and ``traffic-light`` →
   ``traffic_light``, ConceptNet's spelling).

An override CSV (columns ``concept,term``; an empty term leaves the concept unmapped on purpose)
replaces the rule for the concepts it names. Every concept whose term the KG does not know is
counted and listed by :meth:`ConceptMapping.unmatched`.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from conceptrank.errors import KnowledgeGraphError

__all__ = ["normalise_concept", "read_overrides", "ConceptMapping", "map_concepts"]

_SUFFIX = re.compile(r"-[a-z]$")
_SEPARATORS = re.compile(r"[\s\-]+")


def normalise_concept(name: str) -> str:
    """The KG term for a concept name by the documented rule (``ocean-s`` → ``ocean``)."""
    s = _SUFFIX.sub("", name.strip().lower())
    return _SEPARATORS.sub("_", s).strip("_")


def read_overrides(path: str | os.PathLike) -> dict[str, str]:
    """``concept → term`` from a CSV with a ``concept,term`` header."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"concept", "term"} <= set(reader.fieldnames):
                raise KnowledgeGraphError(f"{path}: line 1 must be the header concept,term (found {reader.fieldnames})")
            out = {}
            for n, row in enumerate(reader, 2):
                concept = (row.get("concept") or "").strip()
                if not concept:
                    raise KnowledgeGraphError(f"{path}: line {n}: empty concept")
                if concept in out:
                    raise KnowledgeGraphError(f"{path}: line {n}: concept {concept!r} is listed twice")
                out[concept] = (row.get("term") or "").strip()
    except FileNotFoundError:
        raise KnowledgeGraphError(f"{path}: no such file (the concept-term override CSV)") from None
    except UnicodeDecodeError:
        raise KnowledgeGraphError(f"{path}: not UTF-8 text") from None
    return out


@dataclass(frozen=True)
class ConceptMapping:
    """Concept → KG term ('' for a concept deliberately left unmapped), and which came from overrides."""

    terms: Mapping[str, str]
    overridden: tuple[str, ...] = ()

    def term_set(self) -> frozenset[str]:
        return frozenset(t for t in self.terms.values() if t)

    def concepts_of(self) -> dict[str, tuple[str, ...]]:
        """term → the concepts mapped to it (several concepts may share a term)."""
        out: dict[str, list[str]] = {}
        for c, t in sorted(self.terms.items()):
            if t:
                out.setdefault(t, []).append(c)
        return {t: tuple(cs) for t, cs in out.items()}

    def unmatched(self, known_terms: Iterable[str]) -> tuple[str, ...]:
        """Concepts whose term is not among ``known_terms`` (or that have no term), sorted."""
        known = set(known_terms)
        return tuple(sorted(c for c, t in self.terms.items() if not t or t not in known))


def map_concepts(concepts: Iterable[str], overrides: Mapping[str, str] | None = None) -> ConceptMapping:
    """Map every concept to its term: the override when there is one, else :func:`normalise_concept`."""
    overrides = dict(overrides or {})
    concepts = sorted(set(concepts))
    terms = {c: overrides[c] if c in overrides else normalise_concept(c) for c in concepts}
    return ConceptMapping(terms, tuple(c for c in concepts if c in overrides))
