"""Read and write probe sets in the Broden format (see ``shared/spec/broden-format.md``).

Layout at the dataset root: ``index.csv``, ``category.csv``, ``label.csv``, ``c_<category>.csv`` and
``images/`` (JPEG images and RGB PNG masks whose pixel label is ``R + 256*G``, possibly nested).
"""

from __future__ import annotations

import csv
import hashlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

from conceptrank.errors import BrodenError
from conceptrank.io.images import ImageDecodeError, load_rgb

__all__ = [
    "BrodenError",
    "BrodenRecord",
    "BrodenDataset",
    "LabelInfo",
    "decode_mask",
    "encode_mask",
    "safe_relpath",
    "write_broden",
]

INDEX_FIXED = ["image", "split", "ih", "iw", "sh", "sw"]
BRODEN_CATEGORIES = ["color", "object", "part", "material", "scene", "texture"]


def safe_relpath(rel: str, root: Path, what: str) -> Path:
    """Resolve ``rel`` under ``root``, refusing empty paths, absolute paths (also ``C:\\…``) and ``..``."""
    rel = (rel or "").strip()
    if not rel:
        raise BrodenError(f"{what}: empty file path")
    if "\x00" in rel:
        raise BrodenError(f"{what}: path {rel!r} contains a NUL character")
    p = PurePosixPath(rel.replace("\\", "/"))
    if p.is_absolute() or os.path.isabs(rel) or PureWindowsPath(rel).drive or ".." in p.parts:
        raise BrodenError(f"{what}: path {rel!r} escapes the dataset root (absolute or '..' paths are rejected)")
    return root.joinpath(*p.parts)


def encode_mask(labels: np.ndarray) -> Image.Image:
    """Encode an ``(H, W)`` integer label map as an RGB image with ``label = R + 256*G``."""
    labels = np.asarray(labels)
    if labels.min(initial=0) < 0 or labels.max(initial=0) >= 256 * 256:
        raise ValueError("mask labels must lie in [0, 65535]")
    rgb = np.zeros(labels.shape + (3,), np.uint8)
    rgb[..., 0] = labels % 256
    rgb[..., 1] = labels // 256
    return Image.fromarray(rgb, "RGB")


def decode_mask(path: Path, shape: tuple[int, int] | None = None, where: str = "") -> np.ndarray:
    """Decode a Broden mask PNG into an ``(H, W)`` int32 label map (``R + 256*G``, blue ignored).

    Grayscale and palette PNGs are accepted by converting to RGB (a grayscale value v becomes
    ``v + 256*v`` exactly as an RGB image with R=G=B=v would; a palette entry's colour is decoded).
    With ``shape`` = ``(sh, sw)`` the size is checked from the file header, before any pixel is
    decoded, so a wrong-size (or decompression-bomb-sized) mask fails fast.
    """
    try:
        with warnings.catch_warnings():
            # the size is checked below from the header, before decoding (PIL itself refuses > 2x its limit)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
        with im:
            if im.mode.startswith("I") or im.mode == "F":
                raise BrodenError(f"mask {path}: 16/32-bit single-channel masks are not Broden masks (mode {im.mode})")
            if shape is not None and (im.height, im.width) != tuple(shape):
                raise BrodenError(
                    f"mask {path}{where} is {im.height}x{im.width}, expected sh x sw = {shape[0]}x{shape[1]}"
                )
            rgb = np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise BrodenError(f"mask file missing: {path}") from None
    except BrodenError:
        raise
    except Exception as e:  # PIL raises many types for corrupt files
        raise BrodenError(f"mask {path}: cannot decode ({e})") from None
    return rgb[..., 0].astype(np.int32) + 256 * rgb[..., 1].astype(np.int32)


@dataclass(frozen=True)
class LabelInfo:
    number: int
    name: str
    categories: tuple[str, ...]
    syns: tuple[str, ...] = ()


@dataclass(frozen=True)
class BrodenRecord:
    """One row of index.csv, restricted to the selected categories.

    ``planes`` holds mask file paths relative to ``images/``; ``scalars`` image-level label numbers.
    """

    image: str
    split: str
    ih: int
    iw: int
    sh: int
    sw: int
    planes: tuple[str, ...]
    scalars: tuple[int, ...]
    row: int  # 1-based line number in index.csv (header = line 1), for error messages


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        raise BrodenError(f"missing file: {path}")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return list(csv.DictReader(f))
    except UnicodeDecodeError as e:
        raise BrodenError(f"{path}: not UTF-8 text ({e})") from None
    except csv.Error as e:
        raise BrodenError(f"{path}: not a valid CSV file ({e})") from None


def _require(row: Mapping[str, str], cols: Sequence[str], path: Path) -> None:
    missing = [c for c in cols if c not in row]
    if missing:
        raise BrodenError(f"{path}: missing column(s) {missing}")


def _int(v: str, path: Path, line: int, col: str) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        raise BrodenError(f"{path} line {line}: column {col!r} is not an integer: {v!r}") from None


def _float(v: str, path: Path, line: int, col: str) -> float:
    try:
        return float(v) if v not in ("", None) else 0.0
    except ValueError:
        raise BrodenError(f"{path} line {line}: column {col!r} is not a number: {v!r}") from None


PROBE_TABLES = ("index.csv", "category.csv", "label.csv")


def _require_probe_tables(root: Path) -> None:
    """Refuse a folder that is not a Broden probe set, saying what is missing (and what it looks like)."""
    missing = [n for n in PROBE_TABLES if not (root / n).is_file()]
    if not missing:
        return
    looks = ""
    if (root / "JPEGImages").is_dir() or (root / "ImageSplits").is_dir():
        looks = "; it looks like a Stanford 40 target set: give it to `extract --dataset`"
    elif any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir()) and not (root / "images").is_dir():
        looks = "; it looks like an image folder (target set): give it to `extract --dataset`"
    raise BrodenError(
        f"{root} is not a Broden probe set: missing {', '.join(missing)} (a probe set holds index.csv, "
        f"category.csv, label.csv, c_<category>.csv and images/; `conceptrank fetch broden` downloads one){looks}")


class BrodenDataset:
    """A Broden-format probe set.

    Parameters
    ----------
    root : path
        Dataset root holding ``index.csv`` etc.
    categories : sequence of str, optional
        Categories to use (default: all in ``category.csv``). Kept in ``category.csv`` order.

    Attributes
    ----------
    categories : list of str
        Selected categories in ``category.csv`` order.
    labels : dict of int to LabelInfo
    primary : np.ndarray, shape (L+1,)
        Index into ``categories`` of each label's primary category, -1 if none is selected.
    records : list of BrodenRecord
        Rows with data in at least one selected category.
    dropped_rows : int
        index.csv rows without data in any selected category (dropped, as NetDissect does).
    """

    def __init__(self, root: str | os.PathLike, categories: Sequence[str] | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise BrodenError(f"probe set directory not found: {self.root}")
        _require_probe_tables(self.root)
        cat_rows = _read_csv(self.root / "category.csv")
        if cat_rows:
            _require(cat_rows[0], ["name"], self.root / "category.csv")
        self.all_categories = [r["name"] for r in cat_rows]
        if categories is None:
            self.categories = list(self.all_categories)
        else:
            wanted = [c.strip() for c in categories if c.strip()]
            unknown = [c for c in wanted if c not in self.all_categories]
            if unknown:
                raise BrodenError(
                    f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {unknown}; "
                    f"category.csv lists {self.all_categories}"
                )
            self.categories = [c for c in self.all_categories if c in wanted]
        if not self.categories:
            raise BrodenError("no categories selected")
        self._read_labels()
        self._read_coverage()
        self._compute_primary()
        self._read_index()

    # -- tables -----------------------------------------------------------------------------
    def _read_labels(self) -> None:
        path = self.root / "label.csv"
        rows = _read_csv(path)
        if rows:
            _require(rows[0], ["number", "name", "category"], path)
        self.labels: dict[int, LabelInfo] = {}
        for i, r in enumerate(rows, start=2):
            num = _int(r["number"], path, i, "number")
            if num <= 0:
                raise BrodenError(f"{path} line {i}: label number must be >= 1, got {num}")
            if num in self.labels:
                raise BrodenError(f"{path} line {i}: duplicate label number {num}")
            cats = []
            for item in (r.get("category") or "").split(";"):
                item = item.strip()
                if item:
                    cats.append(item.split("(", 1)[0])
            syns = tuple(s for s in (r.get("syns") or "").split(";") if s)
            self.labels[num] = LabelInfo(num, r["name"], tuple(cats), syns)
        self.max_label = max(self.labels, default=0)
        self.label_names = [""] * (self.max_label + 1)
        self._known = np.zeros(self.max_label + 1, bool)  # label numbers present in label.csv
        for n, info in self.labels.items():
            self.label_names[n] = info.name
            self._known[n] = True

    def _read_coverage(self) -> None:
        # coverage[cat][number] from c_<cat>.csv; used to choose a label's primary category.
        self.coverage: dict[str, dict[int, float]] = {}
        for cat in self.categories:
            path = self.root / f"c_{cat}.csv"
            if not path.exists():
                raise BrodenError(f"missing file: {path} (needed for selected category {cat!r})")
            rows = _read_csv(path)
            if rows:
                _require(rows[0], ["code", "number"], path)
            cov: dict[int, float] = {}
            for i, r in enumerate(rows, start=2):
                num = _int(r["number"], path, i, "number")
                if num not in self.labels:
                    raise BrodenError(f"{path} line {i}: label number {num} is not in label.csv")
                cov[num] = _float(r.get("coverage", ""), path, i, "coverage")
            self.coverage[cat] = cov

    def _compute_primary(self) -> None:
        primary = np.full(self.max_label + 1, -1, dtype=np.int64)
        for num, info in self.labels.items():
            best, best_cov = -1, -np.inf
            for ci, cat in enumerate(self.categories):
                in_cat = num in self.coverage[cat] or cat in info.categories
                if not in_cat:
                    continue
                cov = self.coverage[cat].get(num, 0.0)
                if cov >= best_cov:  # ties go to the later category in category.csv order
                    best, best_cov = ci, cov
            primary[num] = best
        self.primary = primary

    def _read_index(self) -> None:
        path = self.root / "index.csv"
        if not path.exists():
            raise BrodenError(f"missing file: {path}")
        self.records: list[BrodenRecord] = []
        self.dropped_rows = 0
        # File names that are not UTF-8 round-trip to the same bytes on disk (surrogateescape).
        with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in INDEX_FIXED if c not in header]
            if missing:
                raise BrodenError(f"{path}: missing column(s) {missing}")
            absent = [c for c in self.categories if c not in header]
            if absent:
                raise BrodenError(
                    f"{path}: no column for selected categor{'y' if len(absent) == 1 else 'ies'} {absent} "
                    f"(header: {','.join(header)})"
                )
            try:
                self._read_rows(path, reader)
            except csv.Error as e:
                raise BrodenError(f"{path} line {reader.line_num}: not valid CSV ({e})") from None
        if not self.records:
            raise BrodenError(f"{path}: no image has data in the selected categories {self.categories}")

    def _read_rows(self, path: Path, reader: csv.DictReader) -> None:
        width = len(reader.fieldnames or [])
        seen: dict[str, int] = {}
        for r in reader:
            line = reader.line_num  # physical line of this row (blank lines and CRLF counted right)
            fields = width + len(r.get(None) or []) - sum(1 for v in r.values() if v is None)
            if fields != width:
                raise BrodenError(f"{path} line {line}: {fields} fields, the header has {width} "
                                  "(a cell with a comma must be quoted)")
            key = (r["image"] or "").strip()
            if key in seen:
                raise BrodenError(f"{path} line {line}: image {key!r} is listed again (first on line {seen[key]}); "
                                  "each image must have one row (duplicates would be counted twice)")
            seen[key] = line
            planes: list[str] = []
            scalars: list[int] = []
            for cat in self.categories:
                for item in (r.get(cat) or "").split(";"):
                    item = item.strip()
                    if not item:
                        continue
                    if item.lstrip("-").isdigit():
                        num = int(item)
                        if num not in self.labels:
                            raise BrodenError(
                                f"{path} line {line}: image-level label {num} in column {cat!r} "
                                "is not in label.csv"
                            )
                        scalars.append(num)
                    else:
                        safe_relpath(item, self.root / "images", f"{path} line {line}")
                        planes.append(item)
            if not planes and not scalars:
                self.dropped_rows += 1
                continue
            image = (r["image"] or "").strip()
            safe_relpath(image, self.root / "images", f"{path} line {line}")
            dims = {}
            for col in ("ih", "iw", "sh", "sw"):
                dims[col] = _int(r[col], path, line, col)
                if dims[col] < 1:
                    raise BrodenError(f"{path} line {line}: column {col!r} must be a positive size, got {dims[col]}")
            self.records.append(
                BrodenRecord(
                    image=image,
                    split=r.get("split") or "",
                    planes=tuple(planes),
                    scalars=tuple(scalars),
                    row=line,
                    **dims,
                )
            )

    # -- access -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.records)

    @property
    def num_labels(self) -> int:
        """Size of the label axis (max label number + 1; index 0 is 'unlabelled')."""
        return self.max_label + 1

    def image_path(self, i: int) -> Path:
        return safe_relpath(self.records[i].image, self.root / "images", "index.csv")

    def load_image(self, i: int) -> Image.Image:
        """The i-th probe image as 8-bit RGB, decoded like target images
        (:func:`conceptrank.io.images.load_rgb`: grayscale, CMYK, 16-bit and alpha images converted;
        truncated, corrupt, empty, 1-pixel and decompression-bomb-sized files refused).

        Raises BrodenError naming the index.csv line and the file.
        """
        path = self.image_path(i)
        row = self.records[i].row
        try:
            return load_rgb(path)
        except ImageDecodeError as e:
            if e.reason == "missing file":
                raise BrodenError(f"index.csv line {row}: image file missing: {path}") from None
            detail = f": {e.detail}" if e.detail else ""
            raise BrodenError(f"index.csv line {row}: cannot use image {path} ({e.reason}{detail})") from None

    def load_planes(self, i: int) -> np.ndarray:
        """Mask planes of image i in the selected categories, shape ``(P, sh, sw)`` int32.

        Raises BrodenError naming the file when a mask is missing, has the wrong size, or holds a
        label number absent from label.csv.
        """
        rec = self.records[i]
        out = np.zeros((len(rec.planes), rec.sh, rec.sw), np.int32)
        for k, rel in enumerate(rec.planes):
            path = safe_relpath(rel, self.root / "images", f"index.csv line {rec.row}")
            m = decode_mask(path, (rec.sh, rec.sw), f" (index.csv line {rec.row})")
            present = np.unique(m)
            bad = [int(v) for v in present if v != 0 and (v > self.max_label or not self._known[v])]
            if bad:
                raise BrodenError(
                    f"mask {path} (index.csv line {rec.row}) holds label number(s) {bad[:5]} absent from label.csv"
                )
            out[k] = m
        return out

    def fingerprint(self) -> str:
        """SHA-256 over the index and label tables and the selected categories (not image bytes)."""
        h = hashlib.sha256()
        for name in ["index.csv", "category.csv", "label.csv"] + [f"c_{c}.csv" for c in self.categories]:
            h.update(name.encode())
            h.update((self.root / name).read_bytes())
        h.update(",".join(self.categories).encode())
        return h.hexdigest()

    def image_level_labels(self) -> frozenset[str]:
        """Names of the labels given as image-level numbers (Broden's scenes): they cover their whole image."""
        nums = {n for rec in self.records for n in rec.scalars}
        return frozenset(self.labels[n].name for n in nums if n in self.labels)

    def category_of_label(self, number: int) -> str:
        ci = int(self.primary[number]) if 0 <= number <= self.max_label else -1
        return self.categories[ci] if ci >= 0 else ""


# -- writer ---------------------------------------------------------------------------------
@dataclass
class _Stat:
    frequency: int = 0
    pixels: float = 0.0  # coverage in units of whole images


@dataclass
class WriterRow:
    """A row to write: mask planes (paths relative to images/) and image-level labels per category."""

    image: str
    split: str
    ih: int
    iw: int
    sh: int
    sw: int
    cells: dict[str, list[str | int]] = field(default_factory=dict)
    coverage: dict[str, dict[int, float]] | None = None  # per category, :func:`cell_coverage` (else decoded)


def cell_coverage(items: Sequence[int | np.ndarray]) -> dict[int, float]:
    """Label → its share of the image in one index cell: an image-level number counts 1, a mask plane
    (a label array) the share of its pixels; summed over the cell's items in order."""
    seen: dict[int, float] = {}
    for item in items:
        if isinstance(item, (int, np.integer)):
            seen[int(item)] = seen.get(int(item), 0.0) + 1.0
            continue
        counts = np.bincount(np.asarray(item).ravel())
        for num in np.nonzero(counts)[0]:
            if num:
                seen[int(num)] = seen.get(int(num), 0.0) + counts[num] / item.size
    return seen


def _fmt(x: float) -> str:
    # Fixed-point, never '.5' or '1e-05' (NetDissect-Lite's parser rejects those).
    s = f"{x:.6f}".rstrip("0")
    return s + "0" if s.endswith(".") else s


def write_broden(
    root: str | os.PathLike,
    categories: Sequence[str],
    labels: Iterable[tuple[int, str, str]],
    rows: Sequence[WriterRow],
    syns: Mapping[int, Sequence[str]] | None = None,
) -> None:
    """Write the Broden tables for images and masks already saved under ``root/images``.

    Parameters
    ----------
    categories : category names in the order they go into category.csv.
    labels : ``(number, name, category)`` triples; a label may appear with several categories.
    rows : index rows; frequencies and coverages are computed from the masks themselves (or taken from
        a row's ``coverage``, computed by :func:`cell_coverage` from the arrays before they were saved).
    """
    root = Path(root)
    label_list = list(labels)
    names: dict[int, str] = {}
    label_cats: dict[int, list[str]] = {}
    for num, name, cat in label_list:
        if cat not in categories:
            raise ValueError(f"label {num} {name!r}: unknown category {cat!r}")
        names[num] = name
        label_cats.setdefault(num, []).append(cat)

    stats: dict[tuple[str, int], _Stat] = {}
    cat_freq = {c: 0 for c in categories}
    for r in rows:
        for cat, items in r.cells.items():
            if items:
                cat_freq[cat] += 1
            if r.coverage is not None and cat in r.coverage:
                seen = r.coverage[cat]
            else:
                seen = cell_coverage([it if isinstance(it, (int, np.integer)) else decode_mask(root / "images" / it)
                                      for it in items])
            for num, cov in seen.items():
                if num not in names:
                    raise ValueError(f"row {r.image}: label {num} not declared")
                st = stats.setdefault((cat, num), _Stat())
                st.frequency += 1
                st.pixels += cov

    def total(num: int) -> _Stat:
        s = _Stat()
        for c in label_cats[num]:
            st = stats.get((c, num))
            if st:
                s.frequency += st.frequency
                s.pixels += st.pixels
        return s

    with open(root / "index.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(INDEX_FIXED + list(categories))
        for r in rows:
            cells = [";".join(str(x) for x in r.cells.get(c, [])) for c in categories]
            w.writerow([r.image, r.split, r.ih, r.iw, r.sh, r.sw] + cells)

    with open(root / "category.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["name", "first", "last", "count", "frequency"])
        for c in categories:
            nums = sorted(n for n, cs in label_cats.items() if c in cs)
            w.writerow([c, nums[0] if nums else 0, nums[-1] if nums else 0, len(nums), cat_freq[c]])

    with open(root / "label.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["number", "name", "category", "frequency", "coverage", "syns"])
        for num in sorted(names):
            t = total(num)
            cats = ";".join(f"{c}({stats.get((c, num), _Stat()).frequency})" for c in label_cats[num])
            w.writerow([num, names[num], cats, t.frequency, _fmt(t.pixels), ";".join((syns or {}).get(num, []))])

    for c in categories:
        with open(root / f"c_{c}.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["code", "number", "name", "frequency", "coverage"])
            nums = sorted(n for n, cs in label_cats.items() if c in cs)
            for code, num in enumerate(nums, start=1):
                st = stats.get((c, num), _Stat())
                w.writerow([code, num, names[num], st.frequency, _fmt(st.pixels)])
