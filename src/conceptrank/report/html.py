"""``write_report``: a run folder → ``report.html`` + ``figures/`` (PNG figures, JPEG thumbnails).

The page is one HTML file with its CSS and JavaScript inline and only relative links into
``figures/``, so it opens from ``file://`` with no network. Every text from the data (class,
concept and file names) goes through Jinja2 with autoescaping on; lists for the filters travel as
JSON in single-quoted ``data-`` attributes (Jinja's ``tojson`` escapes ``<``, ``>``, ``&`` and ``'``).
"""

from __future__ import annotations

import csv
import math
import re
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable

import numpy as np

from conceptrank.errors import ConceptrankError
from conceptrank.report import figures as F
from conceptrank.report import scores as S
from conceptrank.report.data import RunData, load_run
from conceptrank.report.relations import relations_section
from conceptrank.report.rules import class_rules

__all__ = ["ReportOptions", "write_report", "render_html"]

_HERE = Path(__file__).parent


@dataclass(frozen=True)
class ReportOptions:
    """What the report includes and how large its pictures are.

    Attributes
    ----------
    unit_images : top probe images per unit card.
    images_per_class : sampled target images per class (image panels).
    top_units : heatmap overlays per image panel (its top local concepts).
    unit_thumb, panel_thumb : longest side of the thumbnails in pixels.
    max_units : at most this many unit cards (highest IoU first); None for every labelled unit.
    seed : sampling seed for the image panels; None takes the run's seed.
    dpi : resolution of the PNG figures.
    """

    unit_images: int = 4
    images_per_class: int = 3
    top_units: int = 3
    unit_thumb: int = 96
    panel_thumb: int = 128
    max_units: int | None = None
    seed: int | None = None
    dpi: int = 150

    def __post_init__(self) -> None:
        for name in ("unit_images", "images_per_class", "top_units"):
            if getattr(self, name) < 0:
                raise ConceptrankError(f"ReportOptions.{name} must be >= 0")
        if self.unit_thumb < 8 or self.panel_thumb < 8 or self.dpi < 10:
            raise ConceptrankError("ReportOptions: thumbnails need at least 8 px and figures at least 10 dpi")
        if self.max_units is not None and self.max_units < 0:
            raise ConceptrankError("ReportOptions.max_units must be >= 0 or None")


@dataclass
class _Notes:
    items: list[str] = field(default_factory=list)

    def add(self, msg: str) -> None:
        if msg not in self.items:
            self.items.append(msg)


# -- helpers -----------------------------------------------------------------------------------
def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_") or "x"


def _fmt(x: Any, digits: int = 3) -> str:
    """``digits`` significant digits (the report's one number format)."""
    return S.sig(x, digits)


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _probe_size(probe_root: Path) -> tuple[int, int] | None:
    """The most common (ih, iw) of the probe's index.csv: the size dissection fed every image at."""
    try:
        with open(probe_root / "index.csv", newline="", encoding="utf-8") as f:
            sizes = Counter((int(r["ih"]), int(r["iw"])) for r in csv.DictReader(f))
    except (OSError, KeyError, ValueError):
        return None
    return max(sizes, key=lambda k: sizes[k]) if sizes else None


def _load_model(data: RunData, notes: _Notes):
    from conceptrank.errors import user_error_types
    from conceptrank.nn.models import load_model

    spec = data.config.get("model") or (data.model or {}).get("model")
    if not spec or not data.layer:
        notes.add("no model or layer in run.json: thumbnails show no activations")
        return None
    try:
        m = load_model(str(spec), data.config.get("weights"))
    except user_error_types() as e:
        notes.add(f"cannot load the model ({e}): thumbnails show no activations")
        return None
    fp = (data.model or {}).get("fingerprint")
    if fp and fp != m.fingerprint:
        notes.add("the model's weights changed since the run (fingerprint differs): overlays may not match")
    return m


# -- figures -----------------------------------------------------------------------------------
def _figures(data: RunData, figdir: Path, root: Path, dpi: int, notes: _Notes) -> list[dict]:
    out: list[dict] = []

    def save(fig, name: str, title: str, caption: str) -> None:
        from PIL import Image

        path = F.save_figure(fig, figdir / name, dpi=dpi)
        with Image.open(path) as im:
            width = round(im.width * 96 / dpi)  # shown at its physical size: 9 pt stays 12 CSS px
        out.append({"id": "fig-" + _slug(Path(name).stem), "src": _rel(path, root), "title": title, "caption": caption,
                    "width": width})

    cls = data.classifier or {}
    cm = cls.get("confusion_matrix")
    if cm is not None and len(data.classes) and np.shape(cm) == (len(data.classes), len(data.classes)):
        acc = cls.get("test_accuracy")
        save(F.confusion_matrix_figure(cm, data.classes), "confusion_matrix.png", "Confusion matrix",
             f"Rows: true class, normalized to sum to 1; columns: predicted class. Evaluated split: "
             f"{cls.get('evaluated_split', '?')}, accuracy {_fmt(acc)}.")
    elif cm is not None:
        notes.add("confusion matrix does not match the class list; not drawn")
    _agreement_figures(data, save)
    labelled = data.labelled_units()
    if data.units:
        cats = list(data.categories) or list(dict.fromkeys(u.category for u in labelled))
        per_cat = {c: sum(1 for u in labelled if u.category == c) for c in cats}
        distinct = {c: len({u.concept for u in labelled if u.category == c}) for c in cats}
        save(F.units_per_category_figure(per_cat, len(data.units), distinct), "units_per_category.png",
             "Interpretable units per category",
             f"Units whose best concept has IoU ≥ {data.iou_threshold:g}, by the concept's category.")
        freq = Counter((u.concept, u.category) for u in labelled)
        if freq:
            save(F.concept_frequency_figure([(c, k, n) for (c, k), n in freq.items()], cats),
                 "concept_frequency.png", "Units per concept",
                 "How many units detect each concept (Network Dissection's bar graph).")
    return out


def _class_values(data: RunData, cfg: str, classes: list[str], key: str) -> list[float] | None:
    per = data.class_chance.get(cfg) or {}
    vals = [float((per.get(c) or {}).get(key, math.nan)) for c in classes]
    return vals if any(math.isfinite(v) for v in vals) else None


def _agreement_figures(data: RunData, save: Callable[..., None]) -> None:
    """Per-class bars for each K:G configuration and the summary, with chance and at-chance marks."""
    summary = data.summary or {}
    agreement = summary.get("agreement") or {}
    base = summary.get("baselines") or {}
    verdicts = {cfg: S.chance_verdict(summary, cfg) for cfg in data.configs}
    classes = [c for c in data.classes if c in data.precision]
    for cfg in data.configs:
        if not classes:
            break
        a, v = agreement.get(cfg) or {}, verdicts.get(cfg)
        chance = _class_values(data, cfg, classes, "permutation_mean") or (base.get(cfg) or {}).get("permutation_mean")
        lo, hi = (_class_values(data, cfg, classes, k) for k in ("ci_low", "ci_high"))
        fig = F.agreement_bars_figure(classes, [data.precision[c].get(cfg, math.nan) for c in classes], cfg,
                                      mean=a.get("mean"), chance=chance, interval=(lo, hi) if lo and hi else None,
                                      at_chance=v.reason if v and v.at_chance else None)
        save(fig, f"agreement_{_slug(cfg)}.png", f"Agreement per class, {cfg}",
             f"Share of each class's images whose top-{a.get('k', 'K')} local concepts include one of the class's "
             f"top-{a.get('g', 'G')} global concepts" + (" (error bars: 95% bootstrap interval)" if lo and hi else "")
             + (". Grey: the agreement random global lists give (shuffled classes)" if chance is not None else "")
             + (f". At chance: {v.reason}, so these bars say nothing about the ranking." if v and v.at_chance else "."))
    if agreement:
        cfgs = [c for c in data.configs if c in agreement] or list(agreement)
        chance = [float((base.get(c) or {}).get("permutation_mean", math.nan)) for c in cfgs]
        flags = [bool(verdicts.get(c) and verdicts[c].at_chance) for c in cfgs]
        save(F.agreement_summary_figure(cfgs, [agreement[c].get("mean", math.nan) for c in cfgs],
                                        [agreement[c].get("std", math.nan) for c in cfgs],
                                        chance=chance if any(math.isfinite(c) for c in chance) else None,
                                        at_chance=flags),
             "agreement_summary.png", "Agreement per configuration",
             "Mean over classes; error bars: standard deviation over classes, clipped to [0, 1]"
             + ("; grey: chance (shuffled classes)" if base else "")
             + ("; hatched: at chance (see the agreement table)." if any(flags) else "."))


def _upsample_grouped(maps: dict[tuple[int, int], np.ndarray], sizes: dict[int, tuple[int, int]]
                      ) -> dict[tuple[int, int], np.ndarray]:
    """Upsample every ``(image, unit)`` map to its image's thumbnail size, one call per (map, thumbnail) shape."""
    from conceptrank.report.visuals import upsampled

    groups: dict[tuple, list[tuple[int, int]]] = {}
    for key, m in maps.items():
        if key[0] in sizes:
            groups.setdefault((m.shape, tuple(sizes[key[0]])), []).append(key)
    out = {}
    for (_, size), keys in groups.items():
        up = upsampled(np.stack([maps[k] for k in keys]), size)
        out.update(zip(keys, up))
    return out


# -- unit cards --------------------------------------------------------------------------------
def _unit_cards(data: RunData, model, opts: ReportOptions, figdir: Path, root: Path, notes: _Notes,
                unit_classes: dict[int, list[str]]) -> list[dict]:
    from PIL import Image

    from conceptrank.io.broden import BrodenError, safe_relpath
    from conceptrank.report import visuals as V

    labelled = data.labelled_units()
    if opts.max_units is not None and len(labelled) > opts.max_units:
        notes.add(f"unit cards: the {opts.max_units} units with the highest IoU of {len(labelled)} labelled units")
        labelled = labelled[: opts.max_units]
    cards = [{
        "unit": u.unit, "id": f"unit-{u.unit}", "concept": u.concept, "category": u.category, "iou": _fmt(u.iou),
        "classes": unit_classes.get(u.unit, []), "images": [],
    } for u in labelled]
    ti, thr = data.top_images, data.thresholds
    if not labelled:
        return cards
    if ti is None:
        notes.add("no dissect/top_images.npz: unit cards show no probe images")
        return cards
    if data.probe_root is None:
        notes.add("the probe set is not available: unit cards show no probe images")
        return cards
    U = ti["index"].shape[0]
    k = min(opts.unit_images, ti["index"].shape[1])
    size = _probe_size(data.probe_root) or (tuple(model.input_size) if model is not None else None)
    to_tensor = None
    if model is not None:
        from conceptrank.nn.models import netdissect_tensor

        prep = ((data.dissect or {}).get("config") or {}).get("preprocess", data.config.get("preprocess", "model"))
        fn = netdissect_tensor if prep == "netdissect" else model.to_tensor
        to_tensor = lambda im: fn(im, size)  # noqa: E731
    need: dict[str, set[int]] = {}
    for u in labelled:
        if u.unit - 1 >= U:
            continue
        for j in range(k):
            need.setdefault(str(ti["images"][u.unit - 1, j]), set()).add(u.unit - 1)
    overlays: dict[tuple[str, int], str] = {}
    unreadable: list[str] = []
    rels = sorted(need)
    chunk = 64  # bounds memory: images of one chunk are decoded, run, drawn and dropped together
    for start in range(0, len(rels), chunk):
        part = rels[start:start + chunk]
        imgs: list[Image.Image | None] = []
        for rel in part:
            try:
                with Image.open(safe_relpath(rel, data.probe_root / "images", "top_images.npz")) as im:
                    imgs.append(im.convert("RGB"))
            except (OSError, BrodenError):
                unreadable.append(rel)
                imgs.append(None)
        ok = [i for i, im in enumerate(imgs) if im is not None]
        maps = {}
        if to_tensor is not None and ok:
            try:
                got = V.unit_maps(model.module, data.layer, [imgs[i] for i in ok], to_tensor,
                                  {p: need[part[i]] for p, i in enumerate(ok)})
                maps = {(ok[p], u): m for (p, u), m in got.items()}
            except (ValueError, RuntimeError, KeyError) as e:
                notes.add(f"cannot compute activation maps of the probe images ({e})")
                to_tensor = None
        thumbs = {i: V.thumbnail(imgs[i], opts.unit_thumb) for i in ok}
        ups = _upsample_grouped(maps, {i: t.shape[:2] for i, t in thumbs.items()}) if thr is not None else {}
        for i in ok:
            rel = part[i]
            rgb = thumbs[i]
            for u in sorted(need[rel]):
                if (i, u) in ups and u < len(thr):
                    pic = V.mask_overlay(rgb, ups[(i, u)] > thr[u])
                else:
                    pic = rgb
                path = V.save_jpeg(pic, figdir / "units" / f"unit{u + 1:05d}_{_slug(PurePosixPath(rel).stem)[:40]}_{start + i}.jpg")
                overlays[(rel, u)] = _rel(path, root)
    if unreadable:
        notes.add(f"{len(unreadable)} probe image(s) could not be read, e.g. {unreadable[0]}")
    for card, u in zip(cards, labelled):
        for j in range(k if u.unit - 1 < U else 0):
            rel = str(ti["images"][u.unit - 1, j])
            if (rel, u.unit - 1) in overlays:
                card["images"].append({"src": overlays[(rel, u.unit - 1)], "name": rel,
                                       "value": _fmt(float(ti["value"][u.unit - 1, j]))})
    return cards


# -- classes and image panels --------------------------------------------------------------------
def _sample(data: RunData, n: int, seed: int) -> dict[str, list]:
    split = (data.summary or {}).get("split") or (data.classifier or {}).get("evaluated_split")
    by_class: dict[str, list] = {c: [] for c in data.classes}
    for im in data.images:
        by_class.setdefault(im.cls, []).append(im)
    out = {}
    for c in data.classes:
        items = sorted(by_class.get(c, []), key=lambda r: r.image)
        pool = [r for r in items if split in (None, "all") or r.split == split] or items
        rng = np.random.default_rng([seed, zlib.crc32(c.encode("utf-8"))])  # per class name: stable across class lists
        pick = sorted(rng.choice(len(pool), size=min(n, len(pool)), replace=False).tolist()) if pool else []
        out[c] = [pool[i] for i in pick]
    return out


def _image_panels(data: RunData, model, opts: ReportOptions, figdir: Path, root: Path, notes: _Notes,
                  seed: int) -> dict[str, list[dict]]:
    from conceptrank.io.images import load_rgb
    from conceptrank.report import visuals as V

    sample = _sample(data, opts.images_per_class, seed)
    flat = [(c, r) for c in data.classes for r in sample[c]]
    crop = ((data.extract or {}).get("config") or {}).get("crop", data.config.get("crop", "none"))
    size = (data.extract or {}).get("input_size") or (list(model.input_size) if model is not None else None)
    imgs = []
    unreadable: list[str] = []
    for _, r in flat:
        img = None
        if data.target_root is not None:
            try:
                img = load_rgb(data.target_root.joinpath(*PurePosixPath(r.image).parts))
                if crop == "person":
                    from conceptrank.io.targets import person_box

                    box = person_box(data.target_root, r.image)
                    if box is not None:
                        img = img.crop(tuple(box))
            except (ConceptrankError, OSError) as e:
                unreadable.append(f"{r.image} ({e})")
                img = None
        imgs.append(img)
    if unreadable:
        notes.add(f"{len(unreadable)} target image(s) could not be read, e.g. {unreadable[0]}")
    if data.target_root is None:
        notes.add("the target set is not available: image panels show no pictures")
    wanted = {}
    for p, (_, r) in enumerate(flat):
        units = [rc.unit - 1 for rc in data.local.get(r.image, ())[: opts.top_units] if rc.unit >= 1]
        if imgs[p] is not None and units:
            wanted[p] = units
    maps: dict = {}
    if model is not None and size and wanted:
        ok = sorted(wanted)
        try:
            got = V.unit_maps(model.module, data.layer, [imgs[p] for p in ok],
                              lambda im: model.to_tensor(im, tuple(size)), {q: wanted[p] for q, p in enumerate(ok)})
            maps = {(ok[q], u): m for (q, u), m in got.items()}
        except (ValueError, RuntimeError, KeyError) as e:
            notes.add(f"cannot compute activation maps of the target images ({e})")
    thr = data.thresholds
    thumbs = {p: V.thumbnail(im, opts.panel_thumb) for p, im in enumerate(imgs) if im is not None}
    ups = _upsample_grouped(maps, {p: t.shape[:2] for p, t in thumbs.items()})
    panels: dict[str, list[dict]] = {c: [] for c in data.classes}
    for p, (c, r) in enumerate(flat):
        local = data.local.get(r.image, ())
        panel = {
            "id": f"img-{p}", "image": r.image, "cls": c, "split": r.split,
            "predicted": data.predictions.get(r.image), "src": None, "overlays": [],
            "concepts": list(dict.fromkeys(rc.concept for rc in local)),
            "local": [{"rank": rc.rank, "concept": rc.concept, "category": rc.category, "unit": rc.unit,
                       "score": _fmt(rc.value), "planted": rc.concept in data.planted.get(c, ())} for rc in local],
        }
        if p in thumbs:
            rgb = thumbs[p]
            panel["src"] = _rel(V.save_jpeg(rgb, figdir / "images" / f"img{p:05d}.jpg"), root)
            for rc in local[: opts.top_units]:
                if (p, rc.unit - 1) not in ups:
                    continue
                up = ups[(p, rc.unit - 1)]
                peak = float(up.max())
                heat = up / peak if peak > 0 else np.zeros_like(up)
                u = rc.unit - 1
                mask = up > thr[u] if thr is not None and u < len(thr) else None
                pic = V.heatmap_overlay(rgb, heat, mask)
                path = V.save_jpeg(pic, figdir / "images" / f"img{p:05d}_unit{rc.unit:05d}.jpg")
                panel["overlays"].append({"src": _rel(path, root), "concept": rc.concept, "category": rc.category,
                                          "unit": rc.unit, "score": _fmt(rc.value), "rank": rc.rank,
                                          "planted": rc.concept in data.planted.get(c, ())})
        panels[c].append(panel)
    return panels


def _class_sections(data: RunData, panels: dict[str, list[dict]], unit_ids: set[int]) -> list[dict]:
    cls = data.classifier or {}
    cm = cls.get("confusion_matrix")
    per_class = cls.get("per_class") or {}
    counts = Counter(im.cls for im in data.images if
                     (data.summary or {}).get("split") in (None, "all") or im.split == (data.summary or {}).get("split"))
    verdicts = {cfg: S.chance_verdict(data.summary, cfg) for cfg in data.configs}
    sections = []
    for ci, c in enumerate(data.classes):
        glob = data.global_concepts.get(c, ())
        wmax = max((abs(g.value) for g in glob if math.isfinite(g.value)), default=0.0) or 1.0
        planted = data.planted.get(c, ())

        def row(g):
            return {"rank": g.rank, "concept": g.concept, "category": g.category, "unit": g.unit,
                    "weight": _fmt(g.value, 3), "width": round(100 * min(1.0, abs(g.value) / wmax), 1)
                    if math.isfinite(g.value) else 0, "linked": g.unit in unit_ids, "planted": g.concept in planted}

        rank_of: dict[str, str] = {}
        for g in glob:  # '+' rows come first
            rank_of.setdefault(g.concept, f"{'global' if g.sign == '+' else 'against'} #{g.rank}")

        confusion = []
        if cm is not None and np.shape(cm) == (len(data.classes), len(data.classes)):
            r = np.asarray(cm[ci], dtype=np.float64)
            tot = r.sum()
            confusion = [{"cls": data.classes[j], "idx": j, "count": int(r[j]),
                          "frac": _fmt(r[j] / tot if tot else math.nan, 2), "correct": j == ci}
                         for j in np.argsort(-r, kind="stable") if r[j] > 0]
        pc = per_class.get(c) or {}
        sections.append({
            "idx": ci, "id": f"class-{ci}", "name": c,
            "n_images": counts.get(c, 0),
            "metrics": {k: _fmt(pc.get(k)) for k in ("precision", "recall", "f1")} if pc else None,
            "support": pc.get("support"),
            "agreement": [(cfg, _fmt(data.precision.get(c, {}).get(cfg)), bool(verdicts[cfg] and verdicts[cfg].at_chance))
                          for cfg in data.configs],
            "planted": [{"concept": x, "rank": rank_of.get(x)} for x in planted],
            "has_truth": bool(data.planted),
            "confusion": confusion,
            "plus": [row(g) for g in glob if g.sign == "+"],
            "minus": [row(g) for g in glob if g.sign != "+"],
            "concepts": list(dict.fromkeys(g.concept for g in glob)),
            "panels": panels.get(c, []),
        })
    return sections


# old card architecture names → today's (the synthetic world's CNN was once called "conceptnet",
# the name of the ConceptNet knowledge graph)
_ARCH_RENAMED = {"conceptnet": "worldnet"}


def _model_description(data: RunData) -> tuple[str | None, str | None]:
    """(architecture, weights) in words: from the model card for a card, else the torchvision name and enum."""
    card, model, cfg = data.model_card, data.model or {}, data.config
    if card.get("architecture"):
        kw = card.get("arch_kwargs") or {}
        shown = [f"{k} {v}" for k, v in kw.items() if not isinstance(v, bool)]
        name = _ARCH_RENAMED.get(str(card["architecture"]), str(card["architecture"]))
        arch = name + (f" ({', '.join(shown)})" if shown else "")
        w = model.get("weights") or card.get("weights")
        return arch, (Path(str(w)).name if w else None)
    name = model.get("model") or cfg.get("model")
    w = model.get("weights") or cfg.get("weights")
    if name is None:
        return None, None
    return str(name), ("random init" if str(w).lower() == "none" else (str(w) if w else None))


def _source_task(card: dict) -> str | None:
    st = card.get("source_task")
    if not isinstance(st, dict):
        return None
    cfg = st.get("config") if isinstance(st.get("config"), dict) else st  # cards keep the settings in config
    acc = st.get("heldout_accuracy") or {}
    heads = ", ".join(f"{h} {_fmt(acc[h], 2)}" for h in ("shape", "color", "material", "scene") if h in acc)
    return (f"the synthetic world's source task ({cfg.get('train_images', '?')} images × {cfg.get('epochs', '?')} "
            f"epochs" + (f"; held-out accuracy {heads})" if heads else ")"))


def _overview(data: RunData) -> dict:
    cfg, model = data.config, data.model or {}
    dj, ej, rj, cj, sj = (data.dissect or {}), (data.extract or {}), (data.rank or {}), (data.classifier or {}), (data.summary or {})
    labelled = data.labelled_units()
    cats = list(data.categories) or sorted({u.category for u in labelled})
    per_cat = [{"category": c, "units": sum(1 for u in labelled if u.category == c),
                "concepts": len({u.concept for u in labelled if u.category == c})} for c in cats]
    arch, weights = _model_description(data)
    setup = [
        ("Architecture", arch),
        ("Weights", weights),
        ("Trained on", _source_task(data.model_card)),
        ("Model", model.get("model") or cfg.get("model")),
        ("Input size", "×".join(str(s) for s in model.get("input_size", [])) or None),
        ("Layer", data.layer),
        ("Probe set", cfg.get("probe") or dj.get("probe")),
        ("Probe images", (dj.get("counts") or {}).get("images")),
        ("Dissection", f"top {_fmt(100 * float((dj.get('config') or {}).get('quantile', cfg.get('quantile')) or math.nan), 2)}% of activations, "
                       f"IoU ≥ {data.iou_threshold:g}, preprocess {(dj.get('config') or {}).get('preprocess', cfg.get('preprocess', '?'))}"
         if dj or cfg else None),
        ("Target set", (ej.get("dataset") or {}).get("root") or cfg.get("target")),
        ("Target images", (ej.get("counts") or {}).get("images")),
        ("Classes", len(data.classes) or None),
        ("Protocol", rj.get("protocol") or cj.get("protocol") or cfg.get("protocol")),
        ("Rankings", f"top {rj.get('top_local')} local, top {rj.get('top_global')} global concepts, "
                     f"min IoU {_fmt(rj.get('min_iou'), 2)}" if rj else None),
        ("Evaluated split", sj.get("split") or cj.get("evaluated_split")),
    ]
    counts = [
        ("Units", len(data.units) or (dj.get("counts") or {}).get("units")),
        ("Interpretable units", f"{len(labelled)} (IoU ≥ {data.iou_threshold:g})" if data.units else None),
        ("Distinct concepts", len({(u.category, u.concept) for u in labelled}) if data.units else None),
    ]
    clf = [
        ("Accuracy", _fmt(cj.get("test_accuracy"))),
        ("Macro precision", _fmt(cj.get("macro_precision"))),
        ("Macro recall", _fmt(cj.get("macro_recall"))),
        ("Macro F1", _fmt(cj.get("macro_f1"))),
        ("Best C", cj.get("best_C")),
        ("Train / evaluated images", f"{cj.get('n_train')} / {cj.get('n_test')}" if "n_train" in cj else None),
    ] if cj else []
    agreement = S.agreement_rows(sj)
    extras = [{"key": t.key, "title": t.title, "columns": list(t.columns), "rows": [(lbl, list(c)) for lbl, c in t.rows],
               "caption": t.caption, "notes": list(t.notes)} for t in S.score_tables(sj)]
    details = sj.get("details")
    details_link = None
    if isinstance(details, str) and details and (data.root / "rank" / details).is_file():
        details_link = (Path("rank") / details).as_posix()
    return {
        "setup": [(k, v) for k, v in setup if v not in (None, "")],
        "counts": [(k, v) for k, v in counts if v not in (None, "")],
        "per_category": per_cat,
        "classifier": [(k, v) for k, v in clf if v not in (None, "", "–")],
        "classifier_warnings": list(cj.get("warnings") or []),
        "agreement": agreement,
        "agreement_meta": {"n_images": sj.get("n_images"), "n_classes": sj.get("n_classes"), "split": sj.get("split"),
                           "omitted": sj.get("omitted_classes") or []},
        "extras": extras,
        "details": details_link,
    }


# -- rendering ---------------------------------------------------------------------------------
def _environment():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(_HERE / "templates")),
        autoescape=True,  # every {{ }} is escaped, whatever the template's file name
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env


def render_html(context: dict) -> str:
    """Render ``templates/report.html`` with ``context`` (CSS and JS from ``static/`` are inlined)."""
    from markupsafe import Markup

    ctx = dict(context)
    ctx["css"] = Markup((_HERE / "static" / "report.css").read_text(encoding="utf-8"))
    js = (_HERE / "static" / "report.js").read_text(encoding="utf-8")
    if "</script" in js.lower():
        raise ValueError("report.js must not contain '</script'")
    ctx["js"] = Markup(js)
    return _environment().get_template("report.html").render(**ctx)


def write_report(run: str | Path, options: ReportOptions | None = None,
                 echo: Callable[[str], None] | None = None) -> Path:
    """Write ``RUN/report.html`` and ``RUN/figures/`` for a run folder.

    Parameters
    ----------
    run : a folder written by ``conceptrank demo`` or ``conceptrank run``.
    options : what to include (default :class:`ReportOptions`).
    echo : optional progress printer.

    Returns
    -------
    Path of ``report.html``.

    Raises
    ------
    ConceptrankError
        When ``run`` is not a run folder. Missing parts of a run (no model, no probe set, a stage
        not run) are named in the report instead.
    """
    from conceptrank.io import cache
    from conceptrank.io.runfolder import check_run_folder

    opts = options or ReportOptions()
    t0 = time.perf_counter()
    root = Path(run)
    check_run_folder(root, ("rank",), "a report")
    data = load_run(root)
    notes = _Notes(list(data.warnings))
    # Everything is drawn into a staging folder first and published only when the page is ready:
    # a failure (or kill) leaves the previous report and its figures as they were.
    staging = cache.staging_folder(root, ".report-staging")
    figdir = staging / "figures"
    root_for_links = staging  # links are relative to the run folder, where the files end up
    figs = _figures(data, figdir, root_for_links, opts.dpi, notes)
    model = _load_model(data, notes) if (data.top_images is not None or data.images) else None

    unit_classes: dict[int, list[str]] = {}
    unit_of_concept: dict[str, list[int]] = {}
    for u in data.labelled_units():
        unit_of_concept.setdefault(u.concept, []).append(u.unit)
    for c in data.classes:
        for g in data.global_concepts.get(c, ()):
            for uu in {g.unit, *unit_of_concept.get(g.concept, [])}:
                lst = unit_classes.setdefault(uu, [])
                if c not in lst:
                    lst.append(c)
    cards = _unit_cards(data, model, opts, figdir, root_for_links, notes, unit_classes)
    seed = opts.seed if opts.seed is not None else int(data.config.get("seed") or 0)
    panels = _image_panels(data, model, opts, figdir, root_for_links, notes, seed)
    sections = _class_sections(data, panels, {c["unit"] for c in cards})

    concepts = sorted({u.concept for u in data.labelled_units()}
                      | {g.concept for gs in data.global_concepts.values() for g in gs}
                      | {p for s in sections for pn in s["panels"] for p in pn["concepts"]})
    arch, weights = _model_description(data)
    title_bits = [x for x in (arch and (arch + (f", {weights}" if weights else "")),
                              data.layer) if x]
    context = {
        "title": "conceptrank report" + (f" — {' · '.join(title_bits)}" if title_bits else ""),
        "run": str(root),
        "overview": _overview(data),
        "figures": figs,
        "cards": cards,
        "labelled_total": len(data.labelled_units()),
        "sections": sections,
        "relations": relations_section(root, figdir, opts.dpi),
        "class_rules": class_rules(root),
        "classes": list(data.classes),
        "concepts": concepts,
        "notes": notes.items,
        "options": opts,
        "generated": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    html = render_html(context)
    out = root / "report.html"
    cache.publish_staged(staging, root, ".report-files.json", commit=lambda: cache.atomic_write_text(out, html))
    if echo is not None:
        echo(f"report: {out} ({len(cards)} unit cards, {len(sections)} classes) in {time.perf_counter() - t0:.1f}s")
    return out
