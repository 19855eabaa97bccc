"""Agreement between local and global concept rankings (the paper's Formula 2).

For a class c, a number K of local and G of global concepts::

    P_c = |{images i of class c : top-K local concepts of i ∩ top-G global (+) concepts of c ≠ ∅}|
          / |images of class c|

Concepts are compared by name. An image without local concepts counts as no overlap; a class
without global concepts scores 0; a class with no images in the evaluated split is omitted (and
listed under ``omitted_classes``).

The summary statistics over classes are mean, population standard deviation (numpy's default
``ddof=0``), min and max. ``summary.json`` keeps the agreement scores under ``"agreement"`` so that
other scores (chance baselines, ground truth) can be added under their own keys.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .cache import atomic_write_json, atomic_write_text, read_json
from .errors import ConceptrankError

__all__ = [
    "DEFAULT_CONFIGS",
    "EvaluateConfig",
    "EvaluateResult",
    "Ranking",
    "agreement",
    "config_name",
    "parse_configs",
    "read_ranking",
    "summarize",
    "run_evaluate",
    "evaluate",
]

DEFAULT_CONFIGS = "5:1,5:5,5:10,10:10"
SPLIT_CHOICES = ("test", "train", "all")


@dataclass(frozen=True)
class EvaluateConfig:
    """Parameters of the ``evaluate`` stage.

    Attributes
    ----------
    configs : K:G pairs, as text ("5:1,5:5") or a sequence of (K, G).
    split : 'test', 'train' or 'all'; None → 'test' for standard rankings, 'all' for the paper
        protocol (as the paper evaluated).
    truth : a synthetic world's truth.json (ground-truth scores: not computed by this version; the
        path is recorded in summary.json).
    seed : reserved for chance baselines.
    """

    configs: str | Sequence[tuple[int, int]] = DEFAULT_CONFIGS
    split: str | None = None
    truth: Path | None = None
    seed: int = 0


@dataclass(frozen=True)
class EvaluateResult:
    """What :func:`run_evaluate` produced.

    Attributes
    ----------
    out : output folder.
    split : the evaluated split.
    configs : the (K, G) pairs, in order.
    per_class : class → config name (e.g. '5L-1G') → P_c.
    summary : the content of summary.json.
    """

    out: Path
    split: str
    configs: tuple[tuple[int, int], ...]
    per_class: dict
    summary: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [config_name(k, g) for k, g in self.configs]

    def table(self) -> str:
        """Per config: mean ± std, min, max over classes, and the numbers of classes and images."""
        s = self.summary
        head = (
            f"agreement (Formula 2), split {self.split}, protocol {s.get('protocol', '?')}: "
            f"{s.get('n_classes', 0)} classes, {s.get('n_images', 0)} images"
        )
        rows = [("config", "mean ± std", "min", "max", "classes", "images")]
        for name in self.names:
            a = s["agreement"][name]
            rows.append((
                name, f"{a['mean']:.3f} ± {a['std']:.3f}", f"{a['min']:.3f}", f"{a['max']:.3f}",
                str(s["n_classes"]), str(s["n_images"]),
            ))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [head] + ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
        if s.get("omitted_classes"):
            lines.append(f"omitted (no images in split {self.split}): {', '.join(s['omitted_classes'])}")
        if s.get("truth") is not None:
            lines.append("note: ground-truth scores (--truth) are not computed by this version")
        lines.append(f"→ {self.out}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# pure computation
# --------------------------------------------------------------------------------------------


def config_name(k: int, g: int) -> str:
    """'5L-1G' for K=5 local and G=1 global concepts."""
    return f"{k}L-{g}G"


def parse_configs(configs: str | Sequence[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Parse "5:1,5:5" (or a sequence of pairs) into ((5, 1), (5, 5)); errors name the bad item."""
    if isinstance(configs, str):
        items = [s.strip() for s in configs.split(",")]
        pairs = []
        for item in items:
            parts = item.split(":")
            try:
                if len(parts) != 2:
                    raise ValueError
                k, g = int(parts[0]), int(parts[1])
            except ValueError:
                raise ConceptrankError(
                    f"bad --configs item {item!r}: expected K:G with positive integers (e.g. 5:1)"
                ) from None
            pairs.append((k, g, item))
    else:
        pairs = []
        for item in configs:
            try:
                k, g = item
                if int(k) != k or int(g) != g:
                    raise ValueError
                pairs.append((int(k), int(g), repr(item)))
            except (TypeError, ValueError):
                raise ConceptrankError(f"bad config {item!r}: expected a (K, G) pair of positive integers") from None
    if not pairs:
        raise ConceptrankError("no K:G configurations given")
    out: list[tuple[int, int]] = []
    for k, g, item in pairs:
        if k < 1 or g < 1:
            raise ConceptrankError(f"bad --configs item {item!r}: K and G must be ≥ 1")
        if (k, g) in out:
            raise ConceptrankError(f"--configs lists {k}:{g} twice")
        out.append((k, g))
    return tuple(out)


def agreement(
    local: Mapping[str, Sequence[str]],
    image_class: Mapping[str, str],
    global_: Mapping[str, Sequence[str]],
    k: int,
    g: int,
) -> dict[str, float]:
    """Formula 2: per class, the share of its images whose top-K local concepts meet its top-G global ones.

    Parameters
    ----------
    local : image → its local concepts in rank order (an image missing here has none).
    image_class : image → class, for every image evaluated (defines the class sizes).
    global_ : class → its global (supporting) concepts in rank order (missing: none).
    k, g : numbers of local / global concepts compared.

    Returns
    -------
    dict class → P_c in [0, 1], for every class with at least one image; classes in the order of
    ``global_`` first, then the remaining ones sorted.
    """
    if k < 1 or g < 1:
        raise ValueError(f"k and g must be ≥ 1 (got {k}, {g})")
    hits: dict[str, int] = {}
    total: dict[str, int] = {}
    gsets = {c: set(list(v)[:g]) for c, v in global_.items()}
    for img, c in image_class.items():
        total[c] = total.get(c, 0) + 1
        concepts = set(list(local.get(img, ()))[:k])
        if concepts & gsets.get(c, set()):
            hits[c] = hits.get(c, 0) + 1
    order = [c for c in global_ if c in total] + sorted(c for c in total if c not in global_)
    return {c: hits.get(c, 0) / total[c] for c in order}


def summarize(values: Sequence[float]) -> dict:
    """mean, std (population, ddof=0), min, max of per-class scores."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "max": float(v.max())}


# --------------------------------------------------------------------------------------------
# I/O edge
# --------------------------------------------------------------------------------------------


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
    """

    path: Path
    meta: dict
    classes: tuple[str, ...]
    images: dict
    local: dict
    global_pos: dict

    @property
    def protocol(self) -> str:
        return str(self.meta.get("protocol", "standard"))


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


def read_ranking(ranking: str | Path) -> Ranking:
    """Read rank.json, local_concepts.csv, global_concepts.csv and images.csv of a rank folder."""
    path = Path(ranking)
    if path.is_file():
        path = path.parent
    meta_path = path / "rank.json"
    if not meta_path.exists():
        raise ConceptrankError(f"{meta_path} not found (is {path} an output folder of `conceptrank rank`?)")
    meta = read_json(meta_path)

    local_file = path / "local_concepts.csv"
    rows = _read_csv(local_file, ["image", "class", "split", "rank", "concept"])
    images: dict[str, tuple[str, str]] = {}
    ranked: dict[str, list[tuple[int, str]]] = {}
    for r in rows:
        images.setdefault(r["image"], (r["class"], r["split"]))
        ranked.setdefault(r["image"], []).append((_int(r["rank"], local_file, "rank"), r["concept"]))
    images_file = path / "images.csv"
    if images_file.exists():  # lists images without any local concept too
        for r in _read_csv(images_file, ["image", "class", "split"]):
            images.setdefault(r["image"], (r["class"], r["split"]))
    local = {img: [c for _, c in sorted(v)] for img, v in ranked.items()}

    global_file = path / "global_concepts.csv"
    grows = _read_csv(global_file, ["class", "rank", "concept", "sign"])
    gpos: dict[str, list[tuple[int, str]]] = {}
    for r in grows:
        if r["sign"] == "+":
            gpos.setdefault(r["class"], []).append((_int(r["rank"], global_file, "rank"), r["concept"]))
    global_pos = {c: [x for _, x in sorted(v)] for c, v in gpos.items()}

    classes = meta.get("classes")
    if not classes:
        cj = path / "classifier.json"
        classes = read_json(cj).get("classes") if cj.exists() else None
    if not classes:
        classes = sorted({c for c, _ in images.values()})
    return Ranking(path, meta, tuple(classes), images, local, global_pos)


def run_evaluate(ranking: Path, out: Path | None, cfg: EvaluateConfig) -> EvaluateResult:
    """Score the agreement of a ranking for every K:G configuration.

    Parameters
    ----------
    ranking : an output folder of ``rank``.
    out : output folder (default: ``ranking``).
    cfg : :class:`EvaluateConfig`.

    Writes ``precision.csv`` (class, then one column per configuration, rows in class order) and
    ``summary.json``.
    """
    configs = parse_configs(cfg.configs)
    rk = read_ranking(ranking)
    top_local = rk.meta.get("top_local")
    top_global = rk.meta.get("top_global")
    for k, g in configs:
        if top_local is not None and k > int(top_local):
            raise ConceptrankError(
                f"config {k}:{g} asks for K={k} local concepts but the ranking kept only "
                f"--top-local {top_local}; re-run `conceptrank rank` with --top-local {k}"
            )
        if top_global is not None and g > int(top_global):
            raise ConceptrankError(
                f"config {k}:{g} asks for G={g} global concepts but the ranking kept only "
                f"--top-global {top_global}; re-run `conceptrank rank` with --top-global {g}"
            )
    split = cfg.split if cfg.split is not None else ("all" if rk.protocol == "paper" else "test")
    if split not in SPLIT_CHOICES:
        raise ConceptrankError(f"unknown split {split!r}: expected one of {', '.join(SPLIT_CHOICES)}")

    image_class = {img: c for img, (c, s) in rk.images.items() if split == "all" or s == split}
    if not image_class:
        present = sorted({s for _, s in rk.images.values()})
        raise ConceptrankError(f"no images in split {split!r} of {rk.path} (splits present: {', '.join(present)})")
    present_classes = set(image_class.values())
    class_order = [c for c in rk.classes if c in present_classes] + sorted(present_classes - set(rk.classes))
    omitted = [c for c in rk.classes if c not in present_classes]

    per_config: dict[str, dict[str, float]] = {}
    for k, g in configs:
        p = agreement(rk.local, image_class, rk.global_pos, k, g)
        per_config[config_name(k, g)] = {c: p[c] for c in class_order}
    names = list(per_config)
    per_class = {c: {n: per_config[n][c] for n in names} for c in class_order}

    n_per_class = {c: 0 for c in class_order}
    for c in image_class.values():
        n_per_class[c] += 1
    summary = {
        "ranking": str(rk.path),
        "protocol": rk.protocol,
        "split": split,
        "n_images": len(image_class),
        "n_classes": len(class_order),
        "images_per_class": n_per_class,
        "omitted_classes": omitted,
        "configs": names,
        "std_ddof": 0,
        "agreement": {
            config_name(k, g): {"k": k, "g": g, **summarize(per_config[config_name(k, g)].values())}
            for k, g in configs
        },
        "truth": None if cfg.truth is None else {"path": str(cfg.truth), "scores": None,
                                                 "note": "ground-truth scores are not computed by this version"},
    }

    out = Path(out) if out is not None else rk.path
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["class"] + names)
    for c in class_order:
        w.writerow([c] + [repr(float(per_class[c][n])) for n in names])
    atomic_write_text(out / "precision.csv", buf.getvalue())
    atomic_write_json(out / "summary.json", summary)
    return EvaluateResult(out=out, split=split, configs=configs, per_class=per_class, summary=summary)


# ``conceptrank.evaluate`` (lazy export in __init__) resolves to this function.
evaluate = run_evaluate
