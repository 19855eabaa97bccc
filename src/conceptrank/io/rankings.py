"""A ``rank`` output folder: its files, the one reader for them, and the checks that keep runs apart.

Files (written by :func:`conceptrank.stages.rank.run_rank`)::

    local_concepts.csv   image, class, split, rank, concept, category, unit (1-based), score
    global_concepts.csv  class, rank, concept, category, unit (1-based), weight, sign ('+' / '-')
    images.csv           image, class, split, n_concepts
    rankings.json        the same rankings as one JSON document
    classifier.json      the linear SVM's selection and scores
    svm.npz              the SVM (see :mod:`conceptrank.io.svm`)
    rank.json            manifest, written last: configuration, input paths and SHA-256
                         (``fingerprints.activations_sha256`` / ``tally_sha256``), output digests

``evaluate`` adds ``precision.csv``, ``summary.json`` and ``evaluation.json`` (and the pipeline's
``evaluate.json`` cache manifest); ``summary.json`` records the SHA-256 of the ``rank.json`` it
scored (``inputs``).

Boundaries: :func:`check_ranking_inputs` refuses (:class:`~conceptrank.errors.StaleInputError`)
activations or a tally whose bytes are not the ones ``rank.json`` recorded, and an output of the
folder that changed after ``rank.json`` vouched for it; :func:`run_folder_mismatches` lists every
part of a run folder that does not belong with the others (for the report).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from conceptrank.core.ranking import PROTOCOLS, RankedConcept, protocol_min_iou
from conceptrank.errors import ConceptrankError, StaleInputError
from conceptrank.io.cache import Manifest, file_sha256, read_json

__all__ = [
    "RANK_OUTPUTS",
    "EVALUATE_OUTPUTS",
    "Ranking",
    "read_ranking",
    "RankedLists",
    "read_ranked_lists",
    "local_concepts_text",
    "global_concepts_text",
    "images_text",
    "rankings_document",
    "ranking_input_paths",
    "check_input_hash",
    "check_written_by",
    "check_ranking_outputs",
    "check_ranking_inputs",
    "run_folder_mismatches",
]

RANK_OUTPUTS = ("local_concepts.csv", "global_concepts.csv", "images.csv", "rankings.json", "classifier.json", "svm.npz")
# what `evaluate` writes into a rank folder; stale as soon as `rank` recomputes
EVALUATE_OUTPUTS = ("precision.csv", "summary.json", "evaluation.json", "evaluate.json")


@dataclass(frozen=True)
class Ranking:
    """A ``rank`` output folder, read back.

    Attributes
    ----------
    path : the folder.
    meta : rank.json.
    classes : class order (classifier.json / rank.json).
    images : image → (class, split), for every image ranked.
    local : image → local concepts in rank order.
    global_pos : class → supporting global concepts in rank order.
    global_units : class → 0-based unit of each supporting global concept (aligned with
        ``global_pos``; empty when global_concepts.csv has no ``unit`` column).
    categories : concept → category, as the CSV files give it.
    manifest_sha256 : SHA-256 of rank.json (identifies the whole ranking: it holds the outputs' digests).
    """

    path: Path
    meta: dict
    classes: tuple[str, ...]
    images: dict
    local: dict
    global_pos: dict
    global_units: dict = field(default_factory=dict)
    categories: dict = field(default_factory=dict)
    manifest_sha256: str | None = None

    @property
    def protocol(self) -> str:
        return str(self.meta.get("protocol", "standard"))

    @property
    def min_iou(self) -> float:
        """The IoU from which a unit carried a concept in this ranking."""
        return protocol_min_iou(self.protocol if self.protocol in PROTOCOLS else "standard", self.meta.get("min_iou"))

    @property
    def label_categories(self) -> tuple[str, ...] | None:
        cats = self.meta.get("categories")
        return tuple(cats) if cats else None


def _read_csv(path: Path, required: Sequence[str]) -> list[dict]:
    if not path.exists():
        raise ConceptrankError(f"{path} not found (is {path.parent} an output folder of `conceptrank rank`?)")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ConceptrankError(f"{path}: missing column(s) {', '.join(missing)}")
        return list(reader)


def _int(v: str, path: Path, what: str) -> int:
    try:
        return int(v)
    except ValueError:
        raise ConceptrankError(f"{path}: {what} {v!r} is not an integer") from None


def _read_local(path: Path, categories: dict) -> tuple[dict, dict]:
    """(image → (class, split), image → concepts in rank order) from local_concepts.csv and images.csv."""
    local_file = path / "local_concepts.csv"
    images: dict[str, tuple[str, str]] = {}
    ranked: dict[str, list[tuple[int, str]]] = {}
    for r in _read_csv(local_file, ["image", "class", "split", "rank", "concept"]):
        images.setdefault(r["image"], (r["class"], r["split"]))
        ranked.setdefault(r["image"], []).append((_int(r["rank"], local_file, "rank"), r["concept"]))
        if r.get("category"):
            categories.setdefault(r["concept"], r["category"])
    images_file = path / "images.csv"
    if images_file.exists():  # lists images without any local concept too
        for r in _read_csv(images_file, ["image", "class", "split"]):
            images.setdefault(r["image"], (r["class"], r["split"]))
    return images, {img: [c for _, c in sorted(v)] for img, v in ranked.items()}


def _read_global(path: Path, categories: dict) -> tuple[dict, dict]:
    """(class → supporting concepts, class → their 0-based units) from global_concepts.csv."""
    global_file = path / "global_concepts.csv"
    grows = _read_csv(global_file, ["class", "rank", "concept", "sign"])
    gpos: dict[str, list[tuple[int, str, int]]] = {}
    has_unit = bool(grows) and "unit" in grows[0]
    for r in grows:
        if r.get("category"):
            categories.setdefault(r["concept"], r["category"])
        if r["sign"] == "+":
            unit = _int(r["unit"], global_file, "unit") - 1 if has_unit and r["unit"] != "" else -1
            gpos.setdefault(r["class"], []).append((_int(r["rank"], global_file, "rank"), r["concept"], unit))
    global_pos = {c: [x for _, x, _ in sorted(v)] for c, v in gpos.items()}
    global_units = {c: [u for _, _, u in sorted(v)] for c, v in gpos.items()} if has_unit else {}
    return global_pos, global_units


def read_ranking(ranking: str | Path) -> Ranking:
    """Read rank.json, local_concepts.csv, global_concepts.csv and images.csv of a rank folder.

    Raises :class:`StaleInputError` when one of the folder's outputs changed after ``rank.json``
    recorded it (see :func:`check_ranking_outputs`).
    """
    path = Path(ranking)
    if path.is_file():
        path = path.parent
    meta_path = path / "rank.json"
    if not meta_path.exists():
        raise ConceptrankError(f"{meta_path} not found (is {path} an output folder of `conceptrank rank`?)")
    meta = read_json(meta_path)
    check_ranking_outputs(path)
    categories: dict[str, str] = {}
    images, local = _read_local(path, categories)
    global_pos, global_units = _read_global(path, categories)
    classes = meta.get("classes")
    if not classes:
        cj = path / "classifier.json"
        classes = read_json(cj).get("classes") if cj.exists() else None
    if not classes:
        classes = sorted({c for c, _ in images.values()})
    return Ranking(path, meta, tuple(classes), images, local, global_pos, global_units, categories,
                   file_sha256(meta_path))


# --------------------------------------------------------------------------------------------
# the rankings with their units and scores (writers and the matching reader)
# --------------------------------------------------------------------------------------------

LOCAL_HEADER = ("image", "class", "split", "rank", "concept", "category", "unit", "score")
GLOBAL_HEADER = ("class", "rank", "concept", "category", "unit", "weight", "sign")
IMAGES_HEADER = ("image", "class", "split", "n_concepts")


def _fmt(x: float) -> str:
    return repr(float(x))


def _csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def local_concepts_text(images: Sequence[str], classes: Sequence[str], splits: Sequence[str],
                        local: Sequence[Sequence[RankedConcept]]) -> str:
    """local_concepts.csv: one row per (image, rank); units 1-based, scores as exact reprs."""
    return _csv_text(LOCAL_HEADER, [
        [images[i], classes[i], splits[i], r + 1, rc.concept, rc.category, rc.unit + 1, _fmt(rc.score)]
        for i, ranking in enumerate(local) for r, rc in enumerate(ranking)
    ])


def images_text(images: Sequence[str], classes: Sequence[str], splits: Sequence[str],
                local: Sequence[Sequence[RankedConcept]]) -> str:
    """images.csv: every ranked image (also those without a local concept)."""
    return _csv_text(IMAGES_HEADER, [[images[i], classes[i], splits[i], len(local[i])] for i in range(len(images))])


def global_concepts_text(classes: Sequence[str], global_for: Sequence[Sequence[RankedConcept]],
                         global_against: Sequence[Sequence[RankedConcept]]) -> str:
    """global_concepts.csv: per class its supporting ('+') then its opposing ('-') concepts."""
    rows = []
    for ci, c in enumerate(classes):
        for sign, lists in (("+", global_for), ("-", global_against)):
            rows += [[c, r + 1, rc.concept, rc.category, rc.unit + 1, _fmt(rc.score), sign]
                     for r, rc in enumerate(lists[ci])]
    return _csv_text(GLOBAL_HEADER, rows)


def rankings_document(protocol: str, classes: Sequence[str], images: Sequence[str], image_classes: Sequence[str],
                      splits: Sequence[str], local: Sequence[Sequence[RankedConcept]],
                      global_for: Sequence[Sequence[RankedConcept]],
                      global_against: Sequence[Sequence[RankedConcept]]) -> dict:
    """rankings.json: the same rankings as one JSON document, for tools that prefer it to the CSVs."""
    def item(rc: RankedConcept, key: str) -> dict:
        return {"concept": rc.concept, "category": rc.category, "unit": rc.unit + 1, key: float(rc.score)}

    return {
        "protocol": protocol,
        "global": {c: {"for": [item(rc, "weight") for rc in global_for[ci]],
                       "against": [item(rc, "weight") for rc in global_against[ci]]} for ci, c in enumerate(classes)},
        "local": [{"image": images[i], "class": image_classes[i], "split": splits[i],
                   "concepts": [item(rc, "score") for rc in local[i]]} for i in range(len(images))],
    }


@dataclass(frozen=True)
class RankedLists:
    """The rankings of a rank folder with units and scores, as ``rank`` computed them.

    Attributes
    ----------
    images, image_classes, splits : (N,) from images.csv, in file order.
    local : N tuples of :class:`RankedConcept` (0-based units; score = mean activation).
    global_for, global_against : class → tuple of :class:`RankedConcept` (score = SVM weight).
    """

    images: tuple[str, ...]
    image_classes: tuple[str, ...]
    splits: tuple[str, ...]
    local: tuple[tuple[RankedConcept, ...], ...]
    global_for: dict
    global_against: dict


def _ranked(r: dict, path: Path, value: str) -> tuple[int, RankedConcept]:
    try:
        return int(r["rank"]), RankedConcept(r["concept"], r["category"], int(r["unit"]) - 1, float(r[value]))
    except ValueError:
        raise ConceptrankError(f"{path}: bad rank, unit or {value} in row {r}") from None


def read_ranked_lists(rank_dir: str | Path) -> RankedLists:
    """Read images.csv, local_concepts.csv and global_concepts.csv with their units and scores."""
    path = Path(rank_dir)
    rows = _read_csv(path / "images.csv", IMAGES_HEADER[:3])
    lf, gf = path / "local_concepts.csv", path / "global_concepts.csv"
    by_image: dict[str, list] = {r["image"]: [] for r in rows}
    for r in _read_csv(lf, LOCAL_HEADER):
        by_image.setdefault(r["image"], []).append(_ranked(r, lf, "score"))
    lists: dict[tuple[str, str], list] = {}
    for r in _read_csv(gf, GLOBAL_HEADER):
        lists.setdefault((r["class"], r["sign"]), []).append(_ranked(r, gf, "weight"))
    def ordered(v: list) -> tuple[RankedConcept, ...]:
        return tuple(rc for _, rc in sorted(v, key=lambda t: t[0]))

    return RankedLists(
        images=tuple(r["image"] for r in rows), image_classes=tuple(r["class"] for r in rows),
        splits=tuple(r["split"] for r in rows),
        local=tuple(ordered(by_image[r["image"]]) for r in rows),
        global_for={c: ordered(v) for (c, s), v in lists.items() if s == "+"},
        global_against={c: ordered(v) for (c, s), v in lists.items() if s == "-"},
    )


# --------------------------------------------------------------------------------------------
# boundaries: the inputs and outputs rank.json vouches for
# --------------------------------------------------------------------------------------------


def _first_existing(*cands: Any) -> Path | None:
    for c in cands:
        if c and Path(c).exists():
            return Path(c)
    return None


def ranking_input_paths(rank_dir: str | Path, meta: dict) -> tuple[Path | None, Path | None]:
    """(activations.npz, tally.csv) of a ranking: the paths rank.json recorded, else the run-folder
    layout (``../extract/activations.npz``, ``../dissect/tally.csv``); None when neither exists."""
    inputs = meta.get("inputs") or {}
    run = Path(rank_dir).parent
    act = _first_existing(inputs.get("activations"), run / "extract" / "activations.npz")
    tally = _first_existing(inputs.get("tally"), run / "dissect" / "tally.csv")
    return act, tally


def _short(sha: str | None) -> str:
    return (sha or "?")[:12]


def check_input_hash(path: Path, recorded: str | None, manifest: Path, what: str, rerun: str) -> None:
    """Raise :class:`StaleInputError` when ``path``'s SHA-256 is not the one ``manifest`` recorded.

    ``recorded`` None (an older manifest) passes. ``what`` names the file in the message ("the
    tally"), ``rerun`` says which command makes them agree again.
    """
    if not recorded:
        return
    actual = file_sha256(path)
    if actual != recorded:
        raise StaleInputError(
            f"{what} {path} (SHA-256 {_short(actual)}…) is not the file {manifest} was computed from "
            f"(SHA-256 {_short(recorded)}…): it changed after that stage ran; {rerun}",
            path=path, manifest=manifest,
        )


def check_written_by(path: Path, actual: str, manifest: Path, meta: dict | None, rerun: str) -> None:
    """Raise :class:`StaleInputError` when ``path`` (SHA-256 ``actual``) is not the output that
    the upstream manifest ``meta`` (read from ``manifest``) recorded under its file name."""
    rec = ((((meta or {}).get("cache") or {}).get("outputs") or {}).get(path.name) or {}).get("sha256")
    if rec and rec != actual:
        raise StaleInputError(
            f"{path} (SHA-256 {_short(actual)}…) is not the file {manifest} wrote (SHA-256 {_short(rec)}…): "
            f"it was replaced after that stage ran, so {manifest.name} does not describe it; {rerun}",
            path=path, manifest=manifest,
        )


def check_ranking_outputs(rank_dir: str | Path) -> None:
    """Raise :class:`StaleInputError` when an output of the rank folder is missing or differs from
    the digest ``rank.json`` recorded for it (manifests without digests pass)."""
    rank_dir = Path(rank_dir)
    m = Manifest.read(rank_dir / "rank.json")
    if m is None or not m.outputs:
        return
    for name, rec in m.outputs.items():
        p = rank_dir / name
        if not p.is_file():
            raise StaleInputError(f"{p} is missing although {m.path} lists it; re-run `conceptrank rank`",
                                  path=p, manifest=m.path)
        if file_sha256(p) != rec.get("sha256"):
            raise StaleInputError(
                f"{p} is not the file {m.path} recorded (it changed after `rank` wrote it); re-run `conceptrank rank`",
                path=p, manifest=m.path,
            )


def check_ranking_inputs(rank_dir: str | Path, meta: dict, act: Path | None, tally: Path | None) -> None:
    """Refuse activations / a tally that differ from what the ranking was computed from.

    Raises :class:`StaleInputError` naming both files when the SHA-256 of ``act`` or ``tally``
    is not the one in ``rank.json`` (``fingerprints``).
    """
    fp = meta.get("fingerprints") or {}
    manifest = Path(rank_dir) / "rank.json"
    rerun = "re-run `conceptrank rank` on the current files (then `evaluate`)"
    if act is not None:
        check_input_hash(act, fp.get("activations_sha256"), manifest, "the activations", rerun)
    if tally is not None:
        check_input_hash(tally, fp.get("tally_sha256"), manifest, "the tally", rerun)


def run_folder_mismatches(run: str | Path) -> list[str]:
    """Every part of a run folder (``dissect/``, ``extract/``, ``rank/``) that does not belong with
    the others, in words; empty when they all agree (or cannot be compared)."""
    run = Path(run)
    rank_dir = run / "rank"
    problems: list[str] = []
    if not (rank_dir / "rank.json").is_file():
        return problems
    try:
        meta = read_json(rank_dir / "rank.json")
    except (OSError, ValueError) as e:
        return [f"cannot read {rank_dir / 'rank.json'}: {e}"]
    fp = meta.get("fingerprints") or {}
    for rel, key in (("extract/activations.npz", "activations_sha256"), ("dissect/tally.csv", "tally_sha256")):
        p = run / rel
        if p.is_file() and fp.get(key) and file_sha256(p) != fp[key]:
            problems.append(f"{p} changed after the ranking was computed ({rank_dir / 'rank.json'} recorded "
                            f"SHA-256 {_short(fp[key])}…): re-run `conceptrank rank` and `evaluate`")
    try:
        check_ranking_outputs(rank_dir)
    except StaleInputError as e:
        problems.append(str(e))
    summary = rank_dir / "summary.json"
    if summary.is_file():
        try:
            recorded = (read_json(summary).get("inputs") or {}).get("rank.json_sha256")
        except (OSError, ValueError, AttributeError):
            recorded = None
        if recorded is None:
            problems.append(f"{summary} does not say which ranking it scored (an older `evaluate`): re-run `evaluate`")
        elif recorded != file_sha256(rank_dir / "rank.json"):
            problems.append(f"{summary} scored another ranking than {rank_dir / 'rank.json'}: re-run `evaluate`")
    return problems
