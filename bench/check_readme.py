"""Check the README's results paragraph against a demo run, so that its numbers cannot go stale.

    python bench/check_readme.py runs/demo            # exit 1 and a diff when the paragraph differs
    python bench/check_readme.py runs/demo --write    # rewrite the paragraph in README.md

The paragraph (the one starting with ``What the demo shows``) is rebuilt from the run's files —
``world/model/model.json`` (source accuracy), ``dissect/dissect.json`` (detectors, concepts per
category), ``rank/classifier.json`` (SVM accuracy), ``rank/rank.json`` (the ranker) and ``rank/summary.json`` (agreement, lift,
p-value, deletion ratio, ground-truth precision) and ``relate/relations.json`` (relation precision and recall) — and must equal the README's word for word, so
every number in it is checked.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
START = "What the demo shows"


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: cannot read {path} ({e}); run `make demo` first") from None


def _p_value(p: float, n: int) -> str:
    floor = 1.0 / (n + 1)
    return f"p ≤ {floor:.3f}" if p <= floor + 1e-12 else f"p = {p:.3f}"


def results_paragraph(run: Path) -> str:
    """The results paragraph for the demo run in ``run`` (one line, no wrapping)."""
    card = _read(run / "world" / "model" / "model.json")
    counts = _read(run / "dissect" / "dissect.json")["counts"]
    clf = _read(run / "rank" / "classifier.json")
    ranker = _read(run / "rank" / "rank.json").get("ranker", "paper")
    summary = _read(run / "rank" / "summary.json")
    acc = card["source_task"]["heldout_accuracy"]
    per_cat = ", ".join(f"{k} {v}" for k, v in counts["unique_concepts"].items())
    agree, base = summary["agreement"], summary["baselines"]
    top = summary["ground_truth"]["global"]["G=1"]
    n_classes = summary["n_classes"]
    return (
        f"{START} on the default world (seed 0, the shipped source model; `make check-readme` checks "
        f"every number here against a fresh run): the source model's held-out accuracy is "
        f"{acc['shape']:.2f} on shapes, {acc['color']:.2f} on colours, {acc['material']:.2f} on materials "
        f"and {acc['scene']:.2f} on scenes; dissection labels {counts['detectors']} of its {counts['units']} "
        f"`layer4` units (IoU ≥ 0.04) with {counts['concepts']} distinct concepts ({per_cat}); the SVM "
        f"reaches {clf['test_accuracy']:.2f} test accuracy on the {n_classes} classes; with the `{ranker}` "
        f"ranker, agreement is "
        f"{agree['5L-1G']['mean']:.2f} ± {agree['5L-1G']['std']:.2f} at 5L-1G "
        f"({base['5L-1G']['permutation_lift']:.1f}× chance, "
        f"{_p_value(base['5L-1G']['permutation_p'], base['n_permutations'])}) and "
        f"{agree['10L-10G']['mean']:.2f} at 10L-10G, where chance gives "
        f"{base['10L-10G']['permutation_mean']:.2f} — read the lift, not the mean; removing a class's "
        f"top concept lowers its SVM score {summary['deletion']['G=1']['ratio']:.1f}× more than removing "
        f"random labelled units; the top global concept is a planted class concept for "
        f"{round(top['precision'] * n_classes)} of {n_classes} classes (random concepts: "
        f"{top['random_precision'] * n_classes:.1f} of {n_classes}){_relations_clause(run)}."
    )


def _relations_clause(run: Path) -> str:
    """The relate stage's precision and recall against the planted relations, when the run has them."""
    path = run / "relate" / "relations.json"
    if not path.is_file():
        return ""
    rel = _read(path).get("summary") or {}
    if rel.get("precision") is None or rel.get("recall") is None:
        return ""
    return (f"; against the planted relations, the KG relations among each class's top global concepts that "
            f"its images' maps support have precision {rel['precision']:.2f} and recall {rel['recall']:.2f} "
            f"(degree-matched random relations: {rel['chance_precision']:.2f} and {rel['chance_recall']:.2f})")


def readme_paragraph(text: str) -> tuple[int, int]:
    """Start and end offsets of the results paragraph in the README's ``text``."""
    start = text.find(START)
    if start < 0:
        raise SystemExit(f"error: {README} has no paragraph starting with {START!r}")
    end = text.find("\n\n", start)
    return start, len(text) if end < 0 else end


def _words(s: str) -> list[str]:
    return re.sub(r"\s+", " ", s).strip().split(" ")


def _wrap(s: str, width: int = 100) -> str:
    lines, line = [], ""
    for w in s.split(" "):
        if line and len(line) + 1 + len(w) > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}" if line else w
    return "\n".join(lines + [line])


def check(run: Path, readme: Path = README, write: bool = False) -> list[str]:
    """Differences between the README's paragraph and ``run``'s (empty when they agree)."""
    text = readme.read_text(encoding="utf-8")
    start, end = readme_paragraph(text)
    want = results_paragraph(run)
    have = text[start:end]
    if _words(have) == _words(want):
        return []
    if write:
        readme.write_text(text[:start] + _wrap(want) + text[end:], encoding="utf-8")
    return list(difflib.unified_diff(_words(have), _words(want), "README.md", str(run), lineterm="", n=2))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a demo run folder (runs/demo)")
    ap.add_argument("--readme", type=Path, default=README)
    ap.add_argument("--write", action="store_true", help="rewrite the paragraph in the README")
    args = ap.parse_args(argv)
    diff = check(args.run, args.readme, args.write)
    if not diff:
        print(f"README results paragraph matches {args.run}")
        return 0
    print("\n".join(diff))
    print(f"README results paragraph differs from {args.run}" + (" (rewritten)" if args.write else
          "; run `python bench/check_readme.py RUN --write` to update it"))
    return 0 if args.write else 1


if __name__ == "__main__":
    sys.exit(main())
