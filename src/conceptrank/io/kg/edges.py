"""What every knowledge-graph reader returns: edges between KG terms, and a report of what was read."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Mapping

__all__ = ["KGEdge", "KGRead", "MalformedLog", "term_of_label", "MAX_LISTED"]

MAX_LISTED = 20  # malformed lines listed by number (all are counted)


@dataclass(frozen=True)
class KGEdge:
    """One assertion between two KG terms (``wheel``, ``traffic_light``).

    ``weight`` is the KG's own (uncalibrated) weight; ``source`` the dataset / contributor it names.
    Duplicates of one ``(head, relation, tail)`` (several senses, several sources) are merged:
    the largest weight is kept and the sources are joined with ``|``.
    """

    head: str
    relation: str
    tail: str
    weight: float
    source: str


@dataclass
class MalformedLog:
    """Counts malformed lines and keeps the first :data:`MAX_LISTED` (line number, reason)."""

    count: int = 0
    lines: list = field(default_factory=list)

    def add(self, line: int, reason: str) -> None:
        self.count += 1
        if len(self.lines) < MAX_LISTED:
            self.lines.append((line, reason))


@dataclass(frozen=True)
class KGRead:
    """A knowledge graph filtered to the terms at hand, with an account of everything left out.

    Attributes
    ----------
    path : the file or folder read.
    format : ``conceptnet``, ``kgtk`` or ``wordnet``.
    edges : merged edges whose both ends are among the terms asked for (sorted).
    lines : data lines read (0 for WordNet).
    kept : lines (or WordNet pointers) that gave a kept edge, before merging duplicates.
    other_language : lines with a non-English end.
    malformed : count; ``malformed_lines`` the first (line number, reason) pairs.
    unknown_relations : relation name → count of kept lines, for names ConceptNet does not define.
    matched_terms : terms asked for that occur in the KG at all (as an English node).
    digest : SHA-256 of the file (None for a folder).
    cached : whether the edges came from the filtered-subgraph cache.
    """

    path: str
    format: str
    edges: tuple[KGEdge, ...]
    lines: int = 0
    kept: int = 0
    other_language: int = 0
    malformed: int = 0
    malformed_lines: tuple[tuple[int, str], ...] = ()
    unknown_relations: Mapping[str, int] = field(default_factory=dict)
    matched_terms: frozenset = frozenset()
    digest: str | None = None
    cached: bool = False

    def summary(self) -> str:
        src = f"{self.format} {self.path}" + (" (cached subgraph)" if self.cached else "")
        bits = [f"{len(self.edges)} edges among the concepts"]
        if self.lines:
            bits.append(f"{self.lines} lines read")
        if self.other_language:
            bits.append(f"{self.other_language} non-English")
        if self.malformed:
            shown = ", ".join(str(n) for n, _ in self.malformed_lines[:5])
            bits.append(f"{self.malformed} malformed (lines {shown}{' …' if self.malformed > 5 else ''})")
        if self.unknown_relations:
            bits.append("unknown relations kept: " + ", ".join(f"{k} ×{v}" for k, v in sorted(self.unknown_relations.items())))
        return f"[kg] {src}: " + "; ".join(bits)

    def to_dict(self) -> dict:
        return {
            "path": self.path, "format": self.format, "edges": len(self.edges), "lines": self.lines,
            "kept_lines": self.kept, "other_language": self.other_language, "malformed": self.malformed,
            "malformed_lines": [{"line": n, "reason": r} for n, r in self.malformed_lines],
            "unknown_relations": dict(sorted(self.unknown_relations.items())),
            "matched_terms": sorted(self.matched_terms), "sha256": self.digest, "cached": self.cached,
        }


_SPACES = re.compile(r"[\s]+")


def term_of_label(label: str) -> str:
    """A human-readable label as a ConceptNet-style term: lower case, spaces → underscores."""
    return _SPACES.sub("_", label.strip().lower())


def display(path: str | os.PathLike) -> str:
    return os.fspath(path)
