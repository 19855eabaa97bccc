"""Index a labelled target image set: Stanford 40 Actions, an image folder, or a CSV manifest.

Layouts
-------
``stanford40`` (see ``shared/spec/stanford40-layout.md``)
    ``JPEGImages/<class>_<NNN>.jpg``, ``ImageSplits/actions.txt`` (a header line, then one
    ``<class><whitespace><count>`` per line, tab or spaces; the count is not checked) and
    ``ImageSplits/<class>_train.txt`` / ``<class>_test.txt`` listing image file names (relative to
    ``JPEGImages/``), one per line. Every listed image must exist and its name, minus the trailing
    ``_<NNN>.<ext>``, must be the split file's class. Classes keep the order of ``actions.txt``;
    splits are ``train`` and ``test``. Item paths are ``JPEGImages/<name>``.
``imagefolder``
    ``root/<class>/*.{jpg,jpeg,png,bmp,webp}`` (extension case-insensitive, not recursive, hidden
    files and folders ignored; folders without images are not classes). Split ``all``.
``manifest``
    ``root`` is a CSV file with a header holding ``path`` and ``label`` (and optionally ``split``,
    default ``all``); paths are relative to the CSV file's folder. Split values other than
    ``train``, ``test`` and ``all``, and ``all`` beside train/test rows, are refused unless mapped
    explicitly (``split_map``, e.g. ``val=train`` or ``val=drop``; dropped rows are counted).
``auto``
    ``stanford40`` if ``root/ImageSplits/actions.txt`` exists, ``manifest`` if ``root`` is a
    ``.csv`` file, else ``imagefolder``.

Order is deterministic: classes as listed in ``actions.txt`` (stanford40) or alphabetically; items
by class, then split (``train``, ``val``, ``test``, then others alphabetically), then path.

Text files are read as UTF-8 with ``errors='surrogateescape'``, so names that are not valid UTF-8
round-trip to the same bytes on disk (POSIX); names may contain spaces. Absolute paths and ``..``
components in split files and manifests are rejected. Every error is a :class:`TargetError` naming
the file (and line) at fault.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Mapping

from conceptrank.core.ranking import SPLITS  # the split names every stage understands
from conceptrank.errors import TargetError
from conceptrank.io.images import IMAGE_EXTENSIONS

__all__ = [
    "TargetError",
    "TargetItem",
    "TargetSet",
    "LAYOUTS",
    "SPLITS",
    "SPLIT_TARGETS",
    "parse_split_map",
    "load_targets",
    "person_box",
    "class_of_stanford_name",
]

LAYOUTS = ("auto", "stanford40", "imagefolder", "manifest")
SPLIT_TARGETS = SPLITS + ("drop",)  # what another split name may be mapped to
_SPLIT_RANK = {"train": 0, "val": 1, "test": 2}
_STANFORD_NAME = re.compile(r"^(?P<cls>.+)_(?P<num>\d+)\.[A-Za-z0-9]+$")


@dataclass(frozen=True)
class TargetItem:
    """One labelled image.

    Attributes
    ----------
    rel : str
        Path relative to the dataset root (POSIX separators), e.g. ``JPEGImages/applauding_001.jpg``.
    cls : str
        Class name.
    split : str
        ``train``, ``test`` or ``all`` (other split values must be mapped, see :func:`load_targets`).
    """

    rel: str
    cls: str
    split: str


@dataclass(frozen=True)
class TargetSet:
    """An indexed target set.

    Attributes
    ----------
    root : Path
        The dataset folder, or the CSV file for the ``manifest`` layout.
    layout : str
        ``stanford40``, ``imagefolder`` or ``manifest`` (never ``auto``).
    items : tuple of TargetItem
        In deterministic order (class, split, path).
    classes : tuple of str
        Class names in order (``actions.txt`` order, or alphabetical).
    dropped : dict
        split name → images left out because the split map sends that split to ``drop``.
    """

    root: Path
    layout: str
    items: tuple[TargetItem, ...]
    classes: tuple[str, ...]
    dropped: dict = field(default_factory=dict)
    skipped: tuple[tuple[str, str], ...] = ()  # (path relative to root, reason) of entries left out

    @property
    def image_root(self) -> Path:
        """The folder that item paths are relative to (the CSV's folder for a manifest)."""
        return self.root.parent if self.layout == "manifest" else self.root

    def __len__(self) -> int:
        return len(self.items)

    def path(self, item: TargetItem | int) -> Path:
        """Absolute-or-as-given path of an item (or of the item at an index)."""
        if isinstance(item, int):
            item = self.items[item]
        return self.image_root.joinpath(*PurePosixPath(item.rel).parts)

    @property
    def annotations_dir(self) -> Path:
        """Where Stanford 40 ``XMLAnnotations/<name>.xml`` person boxes live (may not exist)."""
        return self.image_root / "XMLAnnotations"

    def has_person_boxes(self) -> bool:
        return self.annotations_dir.is_dir()

    def counts(self) -> dict[str, int]:
        """Number of items per class, in class order."""
        out = {c: 0 for c in self.classes}
        for it in self.items:
            out[it.cls] += 1
        return out

    def fingerprint(self) -> str:
        """SHA-256 over the layout, the class order, and every item's path, class, split and file size.

        Independent of where the dataset lives; changes when an image is added, removed, relabelled
        or rewritten with a different size. (Image bytes are not hashed: too slow for large sets.)
        """
        h = hashlib.sha256()
        h.update(json.dumps({"layout": self.layout, "classes": list(self.classes)}).encode())
        for it in self.items:
            try:
                size = self.path(it).stat().st_size
            except OSError:
                size = -1
            h.update(b"\n")
            h.update(json.dumps([it.rel, it.cls, it.split, size]).encode())
        return h.hexdigest()


# -- helpers ------------------------------------------------------------------------------------
def _safe_rel(name: str, where: str) -> PurePosixPath:
    """Validate a relative path from a split file or manifest; refuse absolute and ``..`` paths."""
    raw = name.strip()
    if not raw:
        raise TargetError(f"{where}: empty path")
    if "\x00" in raw:
        raise TargetError(f"{where}: path {raw!r} contains a NUL character")
    norm = raw.replace("\\", "/")
    p = PurePosixPath(norm)
    if p.is_absolute() or os.path.isabs(raw) or PureWindowsPath(raw).drive or norm.startswith("~"):
        raise TargetError(f"{where}: absolute path {raw!r} rejected (paths must be relative to the dataset)")
    if ".." in p.parts:
        raise TargetError(f"{where}: path {raw!r} escapes the dataset folder ('..' rejected)")
    parts = [q for q in p.parts if q not in ("", ".")]
    if not parts:
        raise TargetError(f"{where}: path {raw!r} names no file")
    return PurePosixPath(*parts)


def _read_lines(path: Path) -> list[tuple[int, str]]:
    """Non-blank lines ``(line_number, text)`` of a text file (UTF-8, surrogateescape, BOM dropped)."""
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    if text.startswith("\ufeff"):
        text = text[1:]
    out = []
    for i, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r").strip()
        if line:
            out.append((i, line))
    return out


def _split_key(split: str) -> tuple[int, str]:
    return (_SPLIT_RANK.get(split, len(_SPLIT_RANK)), split)


def _sorted_items(items: list[TargetItem], classes: tuple[str, ...]) -> tuple[TargetItem, ...]:
    order = {c: i for i, c in enumerate(classes)}
    return tuple(sorted(items, key=lambda it: (order[it.cls], _split_key(it.split), it.rel)))


def class_of_stanford_name(name: str) -> str | None:
    """The class of a Stanford 40 image file name (``riding_a_bike_012.jpg`` → ``riding_a_bike``)."""
    m = _STANFORD_NAME.match(PurePosixPath(name).name)
    return m.group("cls") if m else None


# -- layouts ------------------------------------------------------------------------------------
def _read_actions(path: Path) -> list[str]:
    lines = _read_lines(path)
    classes: list[str] = []
    where: dict[str, int] = {}
    for k, (no, line) in enumerate(lines):
        parts = line.rsplit(None, 1)
        if len(parts) == 2 and re.fullmatch(r"[+-]?\d+", parts[1]):
            name = parts[0].strip()
        elif k == 0:
            continue  # the header line ('action_name  number_of_images')
        else:
            raise TargetError(
                f"{path} line {no}: expected '<action name> <image count>', got {line!r}"
            )
        if name in where:
            raise TargetError(f"{path} line {no}: action {name!r} already listed on line {where[name]}")
        if "/" in name or "\\" in name or name in (".", ".."):
            raise TargetError(f"{path} line {no}: action name {name!r} may not contain path separators")
        where[name] = no
        classes.append(name)
    if not classes:
        raise TargetError(f"{path}: lists no actions (expected a header line, then '<action> <count>' lines)")
    return classes


def _load_stanford40(root: Path) -> TargetSet:
    splits_dir = root / "ImageSplits"
    actions = splits_dir / "actions.txt"
    img_dir = root / "JPEGImages"
    if not actions.is_file():
        raise TargetError(f"missing file {actions} (Stanford 40 layout)")
    if not img_dir.is_dir():
        raise TargetError(f"missing folder {img_dir} (Stanford 40 layout)")
    classes = tuple(_read_actions(actions))
    items: list[TargetItem] = []
    seen: dict[str, str] = {}
    for cls in classes:
        for split in ("train", "test"):
            sfile = splits_dir / f"{cls}_{split}.txt"
            if not sfile.is_file():
                raise TargetError(f"missing split file {sfile} (action {cls!r} is listed in {actions})")
            for no, name in _read_lines(sfile):
                where = f"{sfile} line {no}"
                rel_in = _safe_rel(name, where)
                derived = class_of_stanford_name(rel_in.name)
                if derived is None:
                    if not rel_in.name.startswith(f"{cls}_"):
                        raise TargetError(
                            f"{where}: image {name!r} is not named '{cls}_<NNN>.jpg' (class {cls!r})"
                        )
                elif derived != cls:
                    raise TargetError(
                        f"{where}: image {name!r} belongs to class {derived!r}, not to this split file's "
                        f"class {cls!r}"
                    )
                path = img_dir.joinpath(*rel_in.parts)
                if not path.is_file():
                    raise TargetError(f"{where}: listed image {name!r} does not exist ({path})")
                rel = "JPEGImages/" + rel_in.as_posix()
                if rel in seen:
                    raise TargetError(f"{where}: image {name!r} is listed twice (also {seen[rel]})")
                seen[rel] = where
                items.append(TargetItem(rel, cls, split))
        if not any(it.cls == cls for it in items):
            raise TargetError(f"action {cls!r} is listed in {actions} but {cls}_train.txt and {cls}_test.txt list "
                              "no images; add its images or remove it from actions.txt")
    return TargetSet(root, "stanford40", _sorted_items(items, classes), classes)


def _load_imagefolder(root: Path) -> TargetSet:
    if not root.is_dir():
        raise TargetError(f"dataset folder not found: {root}")
    items: list[TargetItem] = []
    classes: list[str] = []
    skipped: list[tuple[str, str]] = []
    real_dirs = {d.resolve(): d.name for d in root.iterdir() if d.is_dir() and not d.is_symlink()}
    for d in sorted(root.iterdir(), key=lambda p: p.name):
        if d.name.startswith("."):
            continue
        if d.is_symlink() and not d.exists():
            skipped.append((d.name, "broken or looping symlink"))
            continue
        if not d.is_dir():
            continue
        if d.is_symlink() and d.resolve() in real_dirs:
            skipped.append((d.name, f"symlink to class folder {real_dirs[d.resolve()]!r}, not a class of its own"))
            continue
        names = []
        for f in sorted(d.iterdir(), key=lambda p: p.name):
            if f.name.startswith(".") or f.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            if f.is_file():
                names.append(f.name)
            elif f.is_symlink() and not f.exists():
                skipped.append((f"{d.name}/{f.name}", "broken or looping symlink"))
        if not names:
            skipped.append((d.name, "class folder without images"))
            continue
        classes.append(d.name)
        items.extend(TargetItem(f"{d.name}/{n}", d.name, "all") for n in names)
    return TargetSet(root, "imagefolder", _sorted_items(items, tuple(classes)), tuple(classes), skipped=tuple(skipped))


def _load_manifest(csv_path: Path) -> TargetSet:
    if not csv_path.is_file():
        raise TargetError(f"manifest not found: {csv_path}")
    base = csv_path.parent
    items: list[TargetItem] = []
    seen: dict[str, int] = {}
    with open(csv_path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        reader.fieldnames = header
        missing = [c for c in ("path", "label") if c not in header]
        if missing:
            raise TargetError(
                f"{csv_path} line 1: header lacks column(s) {missing} (expected 'path,label,split')"
            )
        for row in reader:
            no = reader.line_num
            where = f"{csv_path} line {no}"
            if all(not (v or "").strip() for k, v in row.items() if k is not None):
                continue  # blank line
            rel_p = _safe_rel(row.get("path") or "", where)
            label = (row.get("label") or "").strip()
            if not label:
                raise TargetError(f"{where}: empty label")
            split = (row.get("split") or "").strip() or "all"
            path = base.joinpath(*rel_p.parts)
            if not path.is_file():
                raise TargetError(f"{where}: image {row.get('path')!r} does not exist ({path})")
            rel = rel_p.as_posix()
            if rel in seen:
                raise TargetError(f"{where}: image {rel!r} is listed twice (also line {seen[rel]})")
            seen[rel] = no
            items.append(TargetItem(rel, label, split))
    classes = tuple(sorted({it.cls for it in items}))
    return TargetSet(csv_path, "manifest", _sorted_items(items, classes), classes)


def _restrict(ts: TargetSet, split_file: str | os.PathLike) -> TargetSet:
    """Keep only the items listed in ``split_file`` (one image path per line)."""
    sf = Path(split_file)
    if not sf.is_file() and not sf.is_absolute():
        for cand in (ts.image_root / sf, ts.image_root / "ImageSplits" / sf):
            if cand.is_file():
                sf = cand
                break
    if not sf.is_file():
        raise TargetError(f"missing split file {split_file}")
    by_rel = {it.rel: it for it in ts.items}
    keep: set[str] = set()
    for no, name in _read_lines(sf):
        rel = _safe_rel(name, f"{sf} line {no}").as_posix()
        if rel not in by_rel and ts.layout == "stanford40":
            rel = "JPEGImages/" + rel
        if rel not in by_rel:
            raise TargetError(f"{sf} line {no}: image {name!r} is not in the dataset")
        keep.add(rel)
    items = tuple(it for it in ts.items if it.rel in keep)
    classes = tuple(c for c in ts.classes if any(it.cls == c for it in items))
    return TargetSet(ts.root, ts.layout, items, classes, skipped=ts.skipped)


def parse_split_map(text: str | Mapping[str, str] | None) -> dict[str, str]:
    """``"val=train,extra=drop"`` (or a mapping) → ``{"val": "train", "extra": "drop"}``, validated.

    Every target must be one of :data:`SPLIT_TARGETS`; errors name the bad item.
    """
    if not text:
        return {}
    pairs = list(text.items()) if isinstance(text, Mapping) else [
        tuple(p.strip() for p in item.split("=", 1)) if "=" in item else (item.strip(), "")
        for item in str(text).split(",") if item.strip()]
    out: dict[str, str] = {}
    for src, dst in pairs:
        if not src or dst not in SPLIT_TARGETS:
            raise TargetError(
                f"bad split map item {src}={dst}: expected NAME=TARGET with TARGET one of {', '.join(SPLIT_TARGETS)}"
            )
        out[str(src)] = str(dst)
    return out


def _apply_split_map(ts: TargetSet, split_map: Mapping[str, str], where: Path) -> TargetSet:
    """Rename or drop splits as mapped; refuse unknown split names and ``all`` beside train/test."""
    items: list[TargetItem] = []
    dropped: dict[str, int] = {}
    unknown: dict[str, list[str]] = {}
    for it in ts.items:
        split = split_map.get(it.split, it.split)
        if split == "drop":
            dropped[it.split] = dropped.get(it.split, 0) + 1
        elif split not in SPLITS:
            unknown.setdefault(it.split, []).append(it.rel)
        else:
            items.append(it if split == it.split else TargetItem(it.rel, it.cls, split))
    if unknown:
        name, rels = next(iter(unknown.items()))
        raise TargetError(
            f"{where}: split {name!r} ({len(rels)} image(s), first {rels[0]!r}) is not one of {', '.join(SPLITS)}; "
            f"map it explicitly, e.g. split map {name}=train, {name}=test or {name}=drop"
        )
    n_all = [it.rel for it in items if it.split == "all"]
    if n_all and len(n_all) < len(items):
        raise TargetError(
            f"{where}: {len(n_all)} image(s) have no train/test split (first {n_all[0]!r}) beside images that "
            "have one; give them a split or map them explicitly, e.g. split map all=train or all=drop"
        )
    classes = tuple(c for c in ts.classes if any(it.cls == c for it in items)) if dropped else ts.classes
    return replace(ts, items=_sorted_items(items, classes), classes=classes, dropped=dropped)


def load_targets(
    root: str | os.PathLike,
    layout: str = "auto",
    split_file: str | os.PathLike | None = None,
    split_map: str | Mapping[str, str] | None = None,
) -> TargetSet:
    """Index a target set.

    Parameters
    ----------
    root : path-like
        Dataset folder (``stanford40``, ``imagefolder``) or CSV file (``manifest``).
    layout : {'auto', 'stanford40', 'imagefolder', 'manifest'}
        See the module docstring.
    split_file : path-like, optional
        Keep only the images listed in this text file, one path per line (relative to the dataset
        root; for Stanford 40 also relative to ``JPEGImages/``, so ``ImageSplits/test.txt`` works). A
        relative path that does not exist is also looked up under the root and ``root/ImageSplits``.
    split_map : mapping or ``"val=train,extra=drop"``, optional
        Split names other than ``train``, ``test`` and ``all`` are refused unless mapped here to
        one of those or to ``drop`` (left out, counted in :attr:`TargetSet.dropped`). ``all`` beside
        train/test images is refused too unless mapped (e.g. ``all=train``).

    Returns
    -------
    TargetSet

    Raises
    ------
    TargetError
        Unknown layout, missing files, bad or escaping paths, or no images at all.
    """
    root = Path(root)
    if layout not in LAYOUTS:
        raise TargetError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if not root.exists():
        raise TargetError(f"dataset not found: {root}")
    if layout == "auto":
        if (root / "ImageSplits" / "actions.txt").is_file():
            layout = "stanford40"
        elif root.is_file() and root.suffix.lower() == ".csv":
            layout = "manifest"
        else:
            layout = "imagefolder"
    if layout == "stanford40":
        ts = _load_stanford40(root)
    elif layout == "manifest":
        ts = _load_manifest(root)
    else:
        ts = _load_imagefolder(root)
    if split_file is not None:
        ts = _restrict(ts, split_file)
    ts = _apply_split_map(ts, parse_split_map(split_map), root)
    if not ts.items:
        hint = {
            "imagefolder": f" (expected {root}/<class>/*.{{{','.join(e[1:] for e in IMAGE_EXTENSIONS)}}})",
            "stanford40": " (the split files list no images)",
            "manifest": " (the manifest has no rows)",
        }[ts.layout]
        raise TargetError(f"empty dataset: no images in {root}{hint}")
    return ts


# -- Stanford 40 person boxes ---------------------------------------------------------------------
def person_box(root: str | os.PathLike, rel: str) -> tuple[int, int, int, int] | None:
    """The person box of a Stanford 40 image from ``root/XMLAnnotations/<name>.xml``.

    Parameters
    ----------
    root : path-like
        Dataset root (the folder holding ``XMLAnnotations/``).
    rel : str
        The image's path relative to the root (only its stem is used).

    Returns
    -------
    (xmin, ymin, xmax, ymax) or None
        Integer pixel coordinates as written in the file; the **union** of all ``<object>`` boxes
        (Stanford 40 has one person per image; a union never cuts off an annotated person).
        ``None`` when the XML file does not exist or holds no box.

    Raises
    ------
    TargetError
        When the XML is malformed or a coordinate is not a number.
    """
    xml = Path(root) / "XMLAnnotations" / (PurePosixPath(rel).stem + ".xml")
    if not xml.is_file():
        return None
    try:
        tree = ET.parse(xml)
    except ET.ParseError as e:
        raise TargetError(f"{xml}: malformed XML ({e})") from None
    boxes = []
    for obj in tree.getroot().iter("object"):
        bb = obj.find("bndbox")
        if bb is None:
            continue
        try:
            vals = [float((bb.findtext(k) or "").strip()) for k in ("xmin", "ymin", "xmax", "ymax")]
        except ValueError:
            raise TargetError(f"{xml}: a <bndbox> coordinate is missing or not a number") from None
        boxes.append(vals)
    if not boxes:
        return None
    x0 = min(b[0] for b in boxes)
    y0 = min(b[1] for b in boxes)
    x1 = max(b[2] for b in boxes)
    y1 = max(b[3] for b in boxes)
    return (int(round(x0)), int(round(y0)), int(round(x1)), int(round(y1)))
