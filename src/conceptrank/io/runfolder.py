"""Check that a run folder is complete before a command reads it (``report``, ``explain``).

A run folder holds one folder per stage (``dissect/``, ``extract/``, ``rank/``), each with its manifest
(``dissect.json``, ``extract.json``, ``rank.json``) written last. A stage folder that a command needs
but that lacks its manifest was half-written (killed) or not made by conceptrank; a manifest whose
listed outputs are missing or have another size vouches for files that are no longer there; an
``.npz`` whose zip directory cannot be read was cut short. Each is refused with a message naming
every missing or damaged file, instead of rendering an empty or misleading result.
"""

from __future__ import annotations

import csv
import json
import zipfile
from pathlib import Path
from typing import Sequence

from conceptrank.errors import RunFolderError

__all__ = ["STAGE_MANIFESTS", "REQUIRED_FILES", "run_folder_problems", "check_run_folder"]

STAGE_MANIFESTS = {"dissect": "dissect.json", "extract": "extract.json", "rank": "rank.json"}
REQUIRED_FILES = {
    "rank": ("rank.json", "local_concepts.csv", "global_concepts.csv", "images.csv", "svm.npz"),
    "extract": ("activations.npz",),  # an extract/ written by the Python API may lack its manifest
    "dissect": ("dissect.json", "tally.csv"),
}


def _manifest(path: Path, problems: list[str]) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        problems.append(f"{path} is unreadable ({type(e).__name__}: {e})")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path} is not a manifest (a JSON object)")
        return None
    return data


def _check_outputs(folder: Path, manifest: dict, problems: list[str]) -> None:
    outputs = (manifest.get("cache") or {}).get("outputs") if isinstance(manifest.get("cache"), dict) else None
    if not isinstance(outputs, dict):
        return  # an older manifest without a cache section: nothing recorded to compare against
    for name, rec in outputs.items():
        p = folder / name
        if not p.is_file():
            problems.append(f"{p} is missing (listed in {folder.name}/{STAGE_MANIFESTS[folder.name]})")
        elif isinstance(rec, dict) and rec.get("bytes") is not None and p.stat().st_size != rec["bytes"]:
            problems.append(f"{p} has {p.stat().st_size} bytes, its manifest recorded {rec['bytes']} (truncated or replaced)")


def _check_npz(path: Path, problems: list[str]) -> None:
    try:
        with zipfile.ZipFile(path) as zf:
            zf.namelist()
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        problems.append(f"{path} is not a readable .npz archive (truncated or corrupt: {e})")


def _csv_rows(path: Path) -> int | None:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return max(sum(1 for _ in csv.reader(f)) - 1, 0)
    except (OSError, UnicodeDecodeError, csv.Error):
        return None


def _check_rank_rows(rdir: Path, manifest: dict, problems: list[str]) -> None:
    n_images = manifest.get("n_images")
    if isinstance(n_images, int) and (rdir / "images.csv").is_file():
        rows = _csv_rows(rdir / "images.csv")
        if rows != n_images:
            problems.append(f"{rdir / 'images.csv'} has {rows} rows, rank.json records {n_images} images")
    for name in ("local_concepts.csv", "global_concepts.csv"):
        if (rdir / name).is_file() and _csv_rows(rdir / name) is None:
            problems.append(f"{rdir / name} is not readable UTF-8 CSV")


def run_folder_problems(root: str | Path, need: Sequence[str] = ("rank",)) -> list[str]:
    """Everything missing or damaged in the run folder ``root`` (empty when it is complete).

    Parameters
    ----------
    root : the run folder.
    need : stages whose folder must be there with its required files (:data:`REQUIRED_FILES`);
        the other stage folders are checked only when present.
    """
    root = Path(root)
    if not root.is_dir():
        return [f"run folder not found: {root}"]
    problems: list[str] = []
    for stage, manifest_name in STAGE_MANIFESTS.items():
        folder = root / stage
        if not folder.is_dir():
            if stage in need:
                problems.append(f"{folder} is missing (run `conceptrank {stage}` into it, or `conceptrank demo`/`run`)")
            continue
        mpath = folder / manifest_name
        if not mpath.is_file():  # e.g. a dissect/ holding only an existing NetDissect tally.csv
            if stage in need and manifest_name in REQUIRED_FILES[stage]:
                problems.append(f"{mpath} is missing: {stage}/ was half-written (interrupted) or not made by conceptrank")
            elif stage in need:
                problems += [f"{folder / n} is missing" for n in REQUIRED_FILES[stage] if not (folder / n).is_file()]
            for npz in sorted(folder.glob("*.npz")):
                _check_npz(npz, problems)
            continue
        manifest = _manifest(mpath, problems)
        if manifest is None:
            continue
        if stage in need:
            problems += [f"{folder / n} is missing" for n in REQUIRED_FILES[stage] if not (folder / n).is_file()]
        _check_outputs(folder, manifest, problems)
        for npz in sorted(folder.glob("*.npz")):
            _check_npz(npz, problems)
        if stage == "rank":
            _check_rank_rows(folder, manifest, problems)
    return list(dict.fromkeys(problems))


def check_run_folder(root: str | Path, need: Sequence[str] = ("rank",), what: str = "this command") -> None:
    """Raise :class:`RunFolderError` naming every problem :func:`run_folder_problems` finds."""
    if not Path(root).is_dir():
        files = ", ".join(f"{stage}/{name}" for stage in need for name in REQUIRED_FILES[stage])
        raise RunFolderError(f"run folder not found: {root} (expected a folder made by `demo` or `run`, with {files})")
    problems = run_folder_problems(root, need)
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise RunFolderError(f"{root} is not a complete run folder for {what}: " + "; ".join(problems[:3]) + more)
