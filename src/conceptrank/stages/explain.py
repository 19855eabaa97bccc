"""Decision-faithful local explanations: which concepts made the SVM decide as it did for an image.

For an image with mean activations x, the score of class c is split exactly (see
:mod:`conceptrank.core.faithfulness`) into

``s_c = Σ_k contribution_k + remainder (unlabelled units) + bias``,
``contribution_k = Σ_{units u labelled k} (x_u − train_mean_u) / scale_u · w_cu``

(the training mean of ``svm.npz`` under both protocols; ``bias`` is then the score of an image at
the training mean).

:func:`explain_vector` (pure) gives, for the predicted class, its score, the margin over the
runner-up class, the concepts that pushed the score up ("for") and down ("against") with their
contributions and units, and the decomposition of the margin ``s_pred − s_runner-up`` in the same
way. :func:`contribution_maps` turns a layer's activation maps into per-concept *contribution maps*
``Σ_u (A_u(p) − train_mean_u) / scale_u · w_cu`` whose spatial mean is exactly the concept's
contribution when A is the map the mean activation came from (the upsampled maps shown in the PNG
keep that mean only approximately: bilinear upsampling is not exactly mean-preserving at the edges).

:func:`run_explain` (I/O) reads a run folder (``run.json``, ``extract/``, ``rank/``, the tally),
reruns the model on the requested images for the heatmaps, and writes
``DIR/explain/<image>.json`` and ``DIR/explain/<image>.png``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Sequence

import numpy as np

from conceptrank.core.faithfulness import SVMParams, concept_contributions
from conceptrank.core.ranking import protocol_min_iou, unit_concept_table
from conceptrank.errors import ConceptrankError
from conceptrank.io.cache import atomic_write_json, read_json
from conceptrank.io.rankings import (
    check_ranking_inputs,
    check_ranking_outputs,
    ranking_input_paths,
)
from conceptrank.io.svm import load_svm
from conceptrank.stages.maps import layer_maps
from conceptrank.stages.relate import image_relations

__all__ = [
    "ConceptContribution",
    "Explanation",
    "ExplainResult",
    "explain_vector",
    "contribution_maps",
    "resolve_image",
    "run_explain",
]


@dataclass(frozen=True)
class ConceptContribution:
    """One concept's share of a class score.

    Attributes
    ----------
    concept, category : the concept (category '' when unknown).
    contribution : Σ over its units of z_u · w_cu.
    units : ((unit, contribution), ...) 0-based units, largest |contribution| first.
    """

    concept: str
    category: str
    contribution: float
    units: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class Explanation:
    """Why the linear ranker scored one image as it did.

    Attributes
    ----------
    predicted, runner_up : class names (runner_up '' when there is one class).
    score, runner_up_score : their scores; ``margin`` = score − runner_up_score.
    scores : class → score, every class.
    contributions : every concept's contribution to the predicted class's score, largest first.
    for_, against : the ``top`` most positive / most negative of them (positive / negative only).
    remainder : contribution of the unlabelled units; ``bias`` the intercept.
    margin_contributions : concept → contribution to the margin (same decomposition with
        ``w_pred − w_runner-up``); ``margin_remainder``, ``margin_bias`` likewise.
    """

    predicted: str
    runner_up: str
    score: float
    runner_up_score: float
    margin: float
    scores: dict
    contributions: tuple[ConceptContribution, ...]
    for_: tuple[ConceptContribution, ...]
    against: tuple[ConceptContribution, ...]
    remainder: float
    bias: float
    margin_contributions: dict = field(default_factory=dict)
    margin_remainder: float = 0.0
    margin_bias: float = 0.0

    @property
    def total(self) -> float:
        """Σ contributions + remainder + bias (= ``score``, up to rounding)."""
        return float(sum(c.contribution for c in self.contributions) + self.remainder + self.bias)

    def to_dict(self) -> dict:
        def cc(c: ConceptContribution) -> dict:
            return {"concept": c.concept, "category": c.category, "contribution": c.contribution,
                    "units": [{"unit": u + 1, "contribution": v} for u, v in c.units]}

        return {
            "predicted": self.predicted, "score": self.score, "runner_up": self.runner_up,
            "runner_up_score": self.runner_up_score, "margin": self.margin, "scores": dict(self.scores),
            "for": [cc(c) for c in self.for_], "against": [cc(c) for c in self.against],
            "contributions": {c.concept: c.contribution for c in self.contributions},
            "remainder_unlabelled_units": self.remainder, "bias": self.bias,
            "sum_check": {"sum": self.total, "score": self.score, "abs_error": abs(self.total - self.score)},
            "margin_contributions": dict(self.margin_contributions),
            "margin_remainder_unlabelled_units": self.margin_remainder, "margin_bias": self.margin_bias,
            "units_numbering": "1-based, as in tally.csv",
        }


def explain_vector(
    x: np.ndarray, svm: SVMParams, unit_concepts: Sequence, top: int = 5, klass: str | None = None
) -> Explanation:
    """Explain the linear ranker's decision for one image.

    Parameters
    ----------
    x : (U,) mean activations of the image.
    svm : the linear model.
    unit_concepts : length U; per unit ``(concept, category, iou)`` or None (unlabelled).
    top : concepts listed for and against.
    klass : explain this class's score instead of the predicted one's (the margin is then taken
        against the best other class).
    """
    ids, names = unit_concept_table(unit_concepts)
    cat = {}
    for uc in unit_concepts:
        if uc is not None and uc[0]:
            cat.setdefault(uc[0], uc[1])
    con = concept_contributions(np.asarray(x, dtype=np.float64)[None, :], svm, ids, names)
    scores = con.decision[0]
    order = np.argsort(-scores, kind="stable")
    p = int(order[0]) if klass is None else svm.classes.index(klass)
    others = [int(c) for c in order if c != p]
    r = others[0] if others else None
    per_c = con.per_concept[0, p]
    per_u = con.per_unit[0, p]

    def entry(k: int) -> ConceptContribution:
        units = np.flatnonzero(ids == k)
        units = units[np.argsort(-np.abs(per_u[units]), kind="stable")]
        return ConceptContribution(names[k], cat.get(names[k], ""), float(per_c[k]),
                                   tuple((int(u), float(per_u[u])) for u in units))

    ranked = np.argsort(-per_c, kind="stable")
    contributions = tuple(entry(int(k)) for k in ranked)
    for_ = tuple(c for c in contributions if c.contribution > 0)[:top]
    against = tuple(sorted((c for c in contributions if c.contribution < 0), key=lambda c: c.contribution))[:top]
    if r is not None:
        m_c = per_c - con.per_concept[0, r]
        margin_contrib = {names[int(k)]: float(m_c[k]) for k in np.argsort(-m_c, kind="stable")}
        m_rem = float(con.remainder[0, p] - con.remainder[0, r])
        m_bias = float(con.bias[p] - con.bias[r])
    else:
        margin_contrib, m_rem, m_bias = {}, 0.0, 0.0
    return Explanation(
        predicted=svm.classes[p],
        runner_up=svm.classes[r] if r is not None else "",
        score=float(scores[p]),
        runner_up_score=float(scores[r]) if r is not None else float("nan"),
        margin=float(scores[p] - scores[r]) if r is not None else float("nan"),
        scores={svm.classes[c]: float(scores[c]) for c in range(len(scores))},
        contributions=contributions,
        for_=for_,
        against=against,
        remainder=float(con.remainder[0, p]),
        bias=float(con.bias[p]),
        margin_contributions=margin_contrib,
        margin_remainder=m_rem,
        margin_bias=m_bias,
    )


def contribution_maps(maps: np.ndarray, svm: SVMParams, klass: int, unit_groups: Sequence[Sequence[int]]) -> np.ndarray:
    """Per-group spatial contribution maps.

    Parameters
    ----------
    maps : (U, h, w) the layer's activation maps for one image.
    klass : class index into ``svm.coef``.
    unit_groups : P groups of unit indices (e.g. the units of one concept each).

    Returns
    -------
    (P, h, w) float64 — ``Σ_{u in group} (maps[u] − train_mean_u) / scale_u · coef[klass, u]``; the spatial
    mean of a group's map equals its contribution computed from the spatially averaged activations.
    """
    maps = np.asarray(maps, dtype=np.float64)
    out = np.zeros((len(unit_groups),) + maps.shape[1:])
    for i, units in enumerate(unit_groups):
        u = np.asarray(list(units), dtype=np.int64)
        if u.size:
            z = (maps[u] - svm.reference[u, None, None]) / svm.scale[u, None, None]
            out[i] = np.tensordot(svm.coef[klass, u], z, axes=1)
    return out


def resolve_image(query: str, images: Sequence[str]) -> int:
    """Index of the image named by ``query``: an exact relative path, else a unique file-name match.

    Raises :class:`ConceptrankError` naming the candidates when none or several match.
    """
    images = list(images)
    q = query.replace("\\", "/").strip()
    if q in images:
        return images.index(q)
    name = PurePosixPath(q).name
    hits = [i for i, im in enumerate(images) if PurePosixPath(im).name == name]
    if not hits:
        hits = [i for i, im in enumerate(images) if im.endswith("/" + q)]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        import difflib

        by_name = {PurePosixPath(im).name: im for im in images}  # near-misses of the name only (typos)
        close = [by_name[n] for n in difflib.get_close_matches(name, list(by_name), n=3, cutoff=0.85)]
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConceptrankError(f"image {query!r} is not among the {len(images)} extracted images{hint}")
    shown = ", ".join(images[i] for i in hits[:5])
    raise ConceptrankError(f"image {query!r} matches {len(hits)} images ({shown}); give its path relative to the dataset root")


# --------------------------------------------------------------------------------------------
# I/O edge
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageExplanation:
    """One explained image: its names, the explanation, and the files written."""

    image: str
    true_class: str
    split: str
    explanation: Explanation
    json_path: Path
    png_path: Path | None
    activation_check: float | None  # max |recomputed − stored mean activation|, None when not recomputed
    notes: tuple[str, ...] = ()
    rules: tuple[str, ...] = ()  # which class rule decided the image (RUN/rules), see stages/rules.explain_rules


@dataclass(frozen=True)
class ExplainResult:
    """What :func:`run_explain` produced; ``text()`` is what the CLI prints."""

    out: Path
    images: tuple[ImageExplanation, ...]

    def text(self, top: int = 5) -> str:
        lines = []
        for ie in self.images:
            e = ie.explanation
            ok = "correct" if e.predicted == ie.true_class else f"wrong, true class {ie.true_class}"
            lines.append(f"{ie.image} (class {ie.true_class}, split {ie.split})")
            lines.append(f"  predicted {e.predicted} ({ok}): score {e.score:+.3f}, margin {e.margin:+.3f} over {e.runner_up}")
            for label, items in (("for", e.for_), ("against", e.against)):
                if not items:
                    lines.append(f"  {label:<8} –")
                    continue
                parts = []
                for c in items[:top]:
                    units = ", ".join(str(u + 1) for u, _ in c.units[:3]) + (" …" if len(c.units) > 3 else "")
                    parts.append(f"{c.concept} {c.contribution:+.3f} (unit{'s' if len(c.units) > 1 else ''} {units})")
                lines.append(f"  {label:<8} " + "; ".join(parts))
            lines.append(
                f"  = Σ concepts {sum(c.contribution for c in e.contributions):+.3f} + unlabelled units "
                f"{e.remainder:+.3f} + bias {e.bias:+.3f} = {e.total:+.3f}"
            )
            files = str(ie.json_path) + (f", {ie.png_path}" if ie.png_path else "")
            lines.append(f"  → {files}")
            lines.extend(f"  {r}" for r in ie.rules)
            for n in ie.notes:
                lines.append(f"  note: {n}")
        return "\n".join(lines)


def _safe_name(rel: str) -> str:
    """A file name for the outputs of image ``rel``: a readable slug of its path plus a digest of the
    exact path, so two images never share one (``a/img 0.jpg`` vs ``a/img_0.jpg``)."""
    import hashlib

    stem = str(PurePosixPath(rel).with_suffix(""))
    slug = "".join(ch if ch.isascii() and (ch.isalnum() or ch in "-_.") else "_" for ch in stem.replace("/", "__"))
    digest = hashlib.sha256(rel.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return f"{slug.strip('.')[:80] or 'image'}-{digest}"


def _signed_overlay(rgb: np.ndarray, m: np.ndarray, lim: float) -> np.ndarray:
    """The report's heatmap style for a signed map: colour over the image, opacity growing with |value| / lim.

    The image underneath is a light grey copy, so that its own reds and blues do not read as contributions.
    """
    import matplotlib

    v = np.clip(np.nan_to_num(m / lim), -1.0, 1.0)
    colors = matplotlib.colormaps["RdBu_r"]((v + 1.0) / 2.0)[..., :3]
    a = (0.9 * np.abs(v) ** 0.7)[..., None]
    gray = (rgb.mean(axis=2) if rgb.ndim == 3 else rgb).astype(np.float64) / 255.0
    base = np.repeat((0.45 + 0.5 * gray)[..., None], 3, axis=2)
    return base * (1.0 - a) + colors * a


def _render_png(path: Path, img: np.ndarray, title: str, panels: list[tuple[str, np.ndarray]],
                true_class: str | None = None, predicted: str | None = None, n_for: int | None = None) -> None:
    """Image + one overlay per contribution map (red raises the predicted class's score, blue lowers it).

    The first ``n_for`` panels (concepts for the prediction) share one symmetric colour scale and the
    rest (concepts against) another, each with its colour bar: against-contributions are often ten
    times smaller and would be invisible on the for-scale. ``n_for=None`` puts every panel on one scale.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    from conceptrank.io.cache import atomic_write

    n_for = len(panels) if n_for is None else max(0, min(n_for, len(panels)))
    groups = [("for the prediction", panels[:n_for]), ("against it", panels[n_for:])]
    n = 1 + len(panels)
    fig = Figure(figsize=(2.5 * n + 0.4, 3.9), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n, squeeze=False)[0]
    axes[0].imshow(img)
    verdict = "" if not (true_class and predicted) else (" ✓" if true_class == predicted else " ✗")
    axes[0].set_title("input" + (f"\ntrue: {true_class}" if true_class else "")
                      + (f"\npredicted: {predicted}{verdict}" if predicted else ""), fontsize=9)
    k = 1
    for name, group in groups:
        if not group:
            continue
        lim = max([float(np.abs(m).max()) for _, m in group] + [1e-12])
        gaxes = axes[k:k + len(group)]
        for ax, (label, m) in zip(gaxes, group):
            ax.imshow(_signed_overlay(img, m, lim), interpolation="bilinear")
            ax.set_title(f"{'for' if name.startswith('for') else 'against'}: {label}", fontsize=9)
        cb = fig.colorbar(ScalarMappable(Normalize(-lim, lim), "RdBu_r"), ax=list(gaxes), orientation="horizontal",
                          shrink=0.9, aspect=25, pad=0.02)
        cb.set_label(f"contribution per position, concepts {name}\n(one scale for these {len(group)} panels)",
                     fontsize=8)
        cb.ax.tick_params(labelsize=8)
        k += len(group)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110, metadata={"Software": None})


@dataclass(frozen=True)
class _ExplainInputs:
    """What run_explain reads from a run folder, checked to belong together."""

    run_cfg: dict
    extract_meta: dict
    act: object  # conceptrank.io.activations.Activations
    svm: SVMParams
    unit_concepts: list
    rank_sha256: str


def _load_explain_inputs(run: Path) -> _ExplainInputs:
    """run.json, the activations and tally rank.json vouches for (SHA-256 checked), svm.npz."""
    from conceptrank.io.activations import load_activations
    from conceptrank.io.cache import file_sha256
    from conceptrank.io.tally_csv import read_tally

    rank_dir = run / "rank"
    if not (rank_dir / "svm.npz").exists():
        raise ConceptrankError(f"{rank_dir / 'svm.npz'} not found (is {run} a run folder made by `demo` or `run`?)")
    run_meta = read_json(run / "run.json") if (run / "run.json").exists() else {}
    rank_meta = read_json(rank_dir / "rank.json")
    act_path, tally = ranking_input_paths(rank_dir, rank_meta)
    if act_path is None or tally is None:
        raise ConceptrankError(f"cannot find the activations or the tally of {run}")
    check_ranking_inputs(rank_dir, rank_meta, act_path, tally)
    check_ranking_outputs(rank_dir)
    act = load_activations(act_path)
    extract_json = act.path.parent / "extract.json"
    svm = load_svm(rank_dir / "svm.npz")
    min_iou = protocol_min_iou(rank_meta.get("protocol", "standard"), rank_meta.get("min_iou"))
    cats = rank_meta.get("categories")
    unit_concepts = read_tally(tally).concepts(min_iou, tuple(cats) if cats else None)
    if len(unit_concepts) != act.mean.shape[1] or svm.coef.shape[1] != act.mean.shape[1]:
        raise ConceptrankError("tally, activations and svm.npz disagree on the number of units")
    return _ExplainInputs(run_meta.get("config") or {}, read_json(extract_json) if extract_json.exists() else {},
                          act, svm, unit_concepts, file_sha256(rank_dir / "rank.json"))


def _maps_or_note(inp: _ExplainInputs, rels: list[str]) -> tuple[list | None, list, str | None]:
    """The layer's activation maps and pictures of the images, or why there are none."""
    try:
        maps, pics, _ = layer_maps(inp.run_cfg, inp.extract_meta, rels)
        return maps, pics, None
    except Exception as e:  # noqa: BLE001 - heatmaps are optional; the explanation stands without them
        return None, [], f"no heatmaps: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _activation_check(m: np.ndarray, x: np.ndarray) -> tuple[float, str | None]:
    """max |spatial mean of the recomputed maps − stored mean activation|, and a note when too large."""
    recomputed = m.reshape(m.shape[0], -1).mean(axis=1)
    check = float(np.max(np.abs(recomputed - x.astype(np.float64))))
    if check > 1e-3 * max(1.0, float(np.abs(x).max())):
        return check, (f"recomputed activations differ from activations.npz by up to {check:.3g}: "
                       "the heatmaps may not match the stored numbers")
    return check, None


def _draw_heatmaps(png: Path, rel: str, exp: Explanation, svm: SVMParams, m: np.ndarray, pic: np.ndarray,
                   heatmaps: int, true_class: str | None = None) -> dict:
    """Contribution maps of the top concepts for (and against) into ``png``; returns their record."""
    import torch

    from conceptrank.core.upsample import upsample_bilinear

    ids_by_concept = {c.concept: [u for u, _ in c.units] for c in exp.contributions}
    chosen = list(exp.for_[:heatmaps]) + list(exp.against[: min(2, heatmaps)])
    cm = contribution_maps(m, svm, svm.classes.index(exp.predicted), [ids_by_concept[c.concept] for c in chosen])
    H, W = pic.shape[:2]
    up = upsample_bilinear(torch.from_numpy(cm.astype(np.float32)), (H, W)).numpy() if len(chosen) else cm
    _render_png(
        png, pic, f"{rel}: predicted {exp.predicted} (margin {exp.margin:+.2f} over {exp.runner_up})",
        [(f"{c.concept} {c.contribution:+.2f}", up[i]) for i, c in enumerate(chosen)],
        true_class=true_class, predicted=exp.predicted, n_for=min(heatmaps, len(exp.for_)),
    )
    return {
        "png": png.name,
        "concepts": [c.concept for c in chosen],
        "map_means": [float(cm[i].mean()) for i in range(len(chosen))],
        "note": "per concept, Σ over its units of (A_u − train mean_u) / scale_u × w_u at every position "
                "of the layer's map (red raises the predicted class's score); the spatial mean equals "
                "the contribution",
    }


def run_explain(run: str | Path, images: Sequence[str], top: int = 5, heatmaps: int = 3) -> ExplainResult:
    """Explain the ranker's decisions for images of a run; write JSON and PNG under ``run/explain``.

    Parameters
    ----------
    run : a run folder (``run.json``, ``extract/``, ``rank/``, ``dissect/`` — as ``demo`` writes).
    images : image paths relative to the dataset root (as in activations.npz ``images``) or file
        names that match exactly one of them.
    top : concepts listed for and against.
    heatmaps : contribution maps drawn for the top concepts for (and as many against, at most 2).

    Refuses (:class:`~conceptrank.errors.StaleInputError`) activations, a tally or rank outputs
    that are not the bytes ``rank.json`` recorded.
    """
    from conceptrank.io.runfolder import check_run_folder

    run = Path(run)
    if not images:
        raise ConceptrankError("no images given")
    check_run_folder(run, ("rank", "extract"), "explain")
    inp = _load_explain_inputs(run)
    act = inp.act
    rows = [resolve_image(q, act.images.tolist()) for q in images]
    rels = [str(act.images[r]) for r in rows]
    out = run / "explain"
    out.mkdir(parents=True, exist_ok=True)
    maps, pics, map_note = _maps_or_note(inp, rels)
    from conceptrank.stages.rules import explain_rules

    rule_lines = explain_rules(run, rels)  # which class rule decided each image (`rules`), {} without rules
    results = []
    for j, (r, rel) in enumerate(zip(rows, rels)):
        exp = explain_vector(act.mean[r], inp.svm, inp.unit_concepts, top)
        name = _safe_name(rel)
        notes: list[str] = [map_note] if map_note else []
        check = png = None
        record = {
            "image": rel, "class": str(act.classes[r]), "split": str(act.splits[r]),
            **exp.to_dict(),
            "decomposition": "score = Σ concept contributions + unlabelled units + bias, with contribution = "
                             "Σ over the concept's units of (x_u − train mean_u) / scale_u × w_u (svm.npz; "
                             "scale = train std, or 1 under the paper protocol)",
            "inputs": {"rank.json_sha256": inp.rank_sha256},
        }
        if maps is not None:
            check, note = _activation_check(maps[j], act.mean[r])
            notes += [note] if note else []
            png = out / f"{name}.png"
            record["heatmaps"] = _draw_heatmaps(png, rel, exp, inp.svm, maps[j], pics[j], heatmaps,
                                                  true_class=str(act.classes[r]))
            record["activation_check_max_abs_diff"] = check
        held = [x for x in image_relations(run, rel) if x["fits"]]  # KG relations grounded in this image (`relate`)
        record["relations"] = held
        notes += [f"relations that hold in it: {'; '.join(' '.join((x['head'], x['relation'], x['tail'])) for x in held)}"] if held else []
        if notes:
            record["notes"] = notes
        if rel in rule_lines:
            record["rules"] = rule_lines[rel]
        jp = out / f"{name}.json"
        atomic_write_json(jp, record)
        results.append(ImageExplanation(rel, str(act.classes[r]), str(act.splits[r]), exp, jp, png, check, tuple(notes),
                                        tuple(rule_lines.get(rel, ()))))
    return ExplainResult(out, tuple(results))
