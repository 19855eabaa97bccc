"""Fingerprints, manifests, checkpoints and atomic writes.

Every stage output carries a fingerprint of everything that produced it (model weights, layer, data
index, parameters, package versions), so a cached result is reused only when all of those match.

Caching contract (shared by dissect, extract, rank and the pipeline's evaluate/synth steps):

* a stage computes ``key = stage_key(stage, fingerprints, params)`` from its inputs before any
  work; ``fingerprints`` name *what* it runs on (model weights, layer, data index and file stats,
  input files' hashes), ``params`` *how* (every setting that can change an output byte);
* its manifest (``dissect.json``, ``extract.json``, ``rank.json``, ...) is written **last**, after
  every output, and holds a ``"cache"`` section (:func:`manifest_section`): the key, the
  fingerprints and params it was made from, the package versions and the SHA-256 of each output;
* on the next run :meth:`Manifest.reusable` accepts the outputs only when the key is equal *and*
  every output still has its recorded hash; anything else recomputes (:meth:`Manifest.changes`
  names what differs). A stage that recomputes deletes its manifest first, so a run killed while
  writing outputs is never mistaken for a finished one;
* long stages checkpoint their progress under the output folder (``.features/<key>/``,
  ``.partial/<key>/``) with :func:`write_checkpoint` every :class:`Checkpointer` interval, and
  resume from the last checkpoint whose key matches.

Environment variables: ``CONCEPTRANK_CHECKPOINT_SECONDS`` (minimum seconds between two
checkpoints of a stage, default 60; 0 checkpoints after every batch).
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import json
import os
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator, Mapping

__all__ = [
    "CACHE_FORMAT",
    "Checkpointer",
    "Manifest",
    "array_sha256",
    "atomic_write",
    "atomic_write_text",
    "atomic_write_json",
    "clear_scratch",
    "file_sha256",
    "files_fingerprint",
    "hash_json",
    "load_checkpoint",
    "lookup",
    "manifest_section",
    "output_digests",
    "package_versions",
    "read_json",
    "remove_scratch",
    "remove_temps",
    "save_npz",
    "stage_key",
    "tree_fingerprint",
    "why_recompute",
    "write_checkpoint",
]

CACHE_FORMAT = 1  # bump when the meaning of a key or of a cached output changes
CHECKPOINT_SECONDS_ENV = "CONCEPTRANK_CHECKPOINT_SECONDS"
DEFAULT_CHECKPOINT_SECONDS = 60.0


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def hash_json(obj: Any) -> str:
    """SHA-256 of the canonical JSON form of ``obj`` (sorted keys, no whitespace)."""
    data = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[Any]:
    """Open a temporary file next to ``path`` and rename it over ``path`` on success.

    A reader never sees a half-written file; an exception leaves the old file untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    with contextlib.suppress(OSError):  # mkstemp makes 0600; outputs get the usual 0666 & ~umask
        os.chmod(tmp, 0o666 & ~_umask())
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def package_versions() -> dict[str, str]:
    """Versions of the packages whose behaviour shapes the results."""
    return dict(_package_versions())


@functools.lru_cache(maxsize=1)
def _package_versions() -> tuple[tuple[str, str], ...]:
    from importlib import metadata

    out = []
    for name in ("conceptrank", "torch", "torchvision", "numpy", "scikit-learn", "pillow"):
        try:
            out.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            out.append((name, "absent"))
    return tuple(out)


# -- keys and fingerprints -----------------------------------------------------------------------
def stage_key(stage: str, fingerprints: Mapping[str, Any], params: Mapping[str, Any]) -> str:
    """The cache key of a stage run: SHA-256 over the stage name, its input fingerprints, its
    parameters, the package versions and :data:`CACHE_FORMAT`.

    Equal keys mean "the outputs would be the same bytes"; any change to any part changes the key.
    """
    return hash_json({
        "cache_format": CACHE_FORMAT,
        "stage": stage,
        "fingerprints": dict(fingerprints),
        "params": dict(params),
        "package_versions": package_versions(),
    })


def array_sha256(a: Any) -> str:
    """SHA-256 of an array's dtype, shape and bytes (e.g. thresholds given to dissect)."""
    import numpy as np

    a = np.ascontiguousarray(np.asarray(a))
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def files_fingerprint(root: str | os.PathLike, rels: Iterable[str]) -> str:
    """SHA-256 over ``(path, size, mtime_ns)`` of files under ``root`` (missing files count too).

    Cheap (one ``stat`` per file, no reading) and catches a file that was rewritten, replaced or
    touched; a copy of the data that does not keep modification times recomputes (never stale).
    """
    root = Path(root)
    h = hashlib.sha256()
    for rel in rels:
        try:
            st = os.stat(root.joinpath(*PurePosixPath(str(rel).replace("\\", "/")).parts))
            rec = (str(rel), st.st_size, st.st_mtime_ns)
        except OSError:
            rec = (str(rel), -1, -1)
        h.update(json.dumps(rec).encode())
        h.update(b"\n")
    return h.hexdigest()


def tree_fingerprint(root: str | os.PathLike) -> str:
    """:func:`files_fingerprint` of every file below ``root`` (sorted, hidden files included)."""
    root = Path(root)
    rels = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        base = Path(dirpath).relative_to(root)
        rels += [(base / f).as_posix() for f in sorted(filenames)]
    return files_fingerprint(root, rels)


# -- deterministic npz ------------------------------------------------------------------------------
def save_npz(path: str | os.PathLike, **arrays: Any) -> None:
    """np.savez-compatible archive written atomically with fixed timestamps: equal arrays give equal
    bytes (``np.savez`` embeds the current time). Read it with ``np.load(path, allow_pickle=False)``."""
    import numpy as np

    with atomic_write(path, "wb") as f:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as zf:
            for name, arr in arrays.items():
                info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                with zf.open(info, "w", force_zip64=True) as g:
                    np.lib.format.write_array(g, np.asarray(arr), allow_pickle=False)


# -- manifests --------------------------------------------------------------------------------------
def output_digests(folder: str | os.PathLike, names: Iterable[str]) -> dict[str, dict]:
    folder = Path(folder)
    return {n: {"sha256": file_sha256(folder / n), "bytes": (folder / n).stat().st_size} for n in names}


def manifest_section(stage: str, key: str, fingerprints: Mapping[str, Any], params: Mapping[str, Any],
                     folder: str | os.PathLike, outputs: Iterable[str]) -> dict:
    """The ``"cache"`` section of a stage manifest; call it after every output in ``outputs``
    (names relative to ``folder``) is written, and write the manifest right after."""
    return {
        "format": CACHE_FORMAT,
        "stage": stage,
        "key": key,
        "fingerprints": dict(fingerprints),
        "params": dict(params),
        "package_versions": package_versions(),
        "outputs": output_digests(folder, outputs),
    }


@dataclass(frozen=True)
class Manifest:
    """A stage manifest read back (``data`` is the whole JSON document; its ``"cache"`` section is
    what :func:`manifest_section` wrote)."""

    path: Path
    data: dict

    @classmethod
    def read(cls, path: str | os.PathLike) -> "Manifest | None":
        """The manifest at ``path``, or None when it is missing or unreadable (then: recompute)."""
        path = Path(path)
        try:
            data = read_json(path)
        except (OSError, ValueError):
            return None
        return cls(path, data) if isinstance(data, dict) else None

    @property
    def section(self) -> dict:
        sec = self.data.get("cache")
        return sec if isinstance(sec, dict) else {}

    @property
    def key(self) -> str | None:
        return self.section.get("key")

    @property
    def stage(self) -> str | None:
        return self.section.get("stage")

    @property
    def outputs(self) -> dict:
        out = self.section.get("outputs")
        return out if isinstance(out, dict) else {}

    def verify_outputs(self) -> str | None:
        """None when every recorded output exists with its recorded size and SHA-256, else why not."""
        if not self.outputs:
            return "the manifest lists no outputs"
        folder = self.path.parent
        for name, rec in self.outputs.items():
            p = folder / name
            try:
                if p.stat().st_size != rec.get("bytes"):
                    return f"{p} changed size"
            except OSError:
                return f"{p} is missing"
            if file_sha256(p) != rec.get("sha256"):
                return f"{p} changed"
        return None

    def check(self, key: str) -> str | None:
        """None when the outputs can be reused for ``key``, else the reason they cannot."""
        if self.section.get("format") != CACHE_FORMAT or not self.key:
            return "no cache key (older format)"
        if self.key != key:
            return "inputs changed"
        return self.verify_outputs()

    def reusable(self, key: str) -> bool:
        return self.check(key) is None

    def changes(self, fingerprints: Mapping[str, Any], params: Mapping[str, Any]) -> list[str]:
        """Names of the fingerprints / params / package versions that differ from the recorded ones."""
        sec = self.section
        out = []
        for what, new, old in (("", fingerprints, sec.get("fingerprints") or {}), ("", params, sec.get("params") or {}),
                               ("package ", package_versions(), sec.get("package_versions") or {})):
            for k in sorted(set(new) | set(old)):
                if hash_json(new.get(k)) != hash_json(old.get(k)):
                    out.append(f"{what}{k}")
        return out


def lookup(path: str | os.PathLike, key: str) -> Manifest | None:
    """The manifest at ``path`` when its outputs can be reused for ``key``, else None."""
    m = Manifest.read(path)
    return m if m is not None and m.reusable(key) else None


def why_recompute(path: str | os.PathLike, key: str, fingerprints: Mapping[str, Any],
                  params: Mapping[str, Any]) -> str | None:
    """Why the outputs next to the manifest at ``path`` cannot be reused (None: no manifest there,
    or they can), e.g. ``"changed: quantile, layer"``, for a one-line note to the user."""
    m = Manifest.read(path)
    if m is None:
        return None
    reason = m.check(key)
    if reason == "inputs changed":
        changed = m.changes(fingerprints, params)
        return f"changed: {', '.join(changed)}" if changed else reason
    return reason


# -- checkpoints ------------------------------------------------------------------------------------
def write_checkpoint(path: str | os.PathLike, meta: Mapping[str, Any], arrays: Mapping[str, Any] | None = None) -> None:
    """Atomically write a resume checkpoint: ``meta`` (JSON) plus named arrays, in one npz.

    Flush any memmap the checkpoint vouches for *before* calling this.
    """
    import numpy as np

    save_npz(path, __meta__=np.array(json.dumps(dict(meta), sort_keys=True, default=_json_default)), **dict(arrays or {}))


def load_checkpoint(path: str | os.PathLike, key: str) -> tuple[dict, dict] | None:
    """``(meta, arrays)`` of the checkpoint at ``path`` when it exists, is readable and was written
    for ``key`` (``meta["key"]``); None otherwise."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(str(arrays.pop("__meta__")))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
        return None
    if not isinstance(meta, dict) or meta.get("key") != key:
        return None
    return meta, arrays


def clear_scratch(parent: str | os.PathLike, keep: str | None = None) -> None:
    """Delete everything in ``parent`` (a ``.features`` / ``.partial`` folder) except ``keep``:
    partial work of runs with other keys can never be resumed by this one."""
    parent = Path(parent)
    if not parent.is_dir():
        return
    for p in parent.iterdir():
        if p.name == keep:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()


def remove_temps(folder: str | os.PathLike, names: Iterable[str]) -> None:
    """Delete temporary files that :func:`atomic_write` left for ``names`` in ``folder`` when the
    process was killed mid-write (``.<name>.<random>.tmp``)."""
    folder = Path(folder)
    for name in names:
        for p in folder.glob(f".{glob.escape(name)}.*.tmp"):
            with contextlib.suppress(OSError):
                p.unlink()


def remove_scratch(folder: str | os.PathLike) -> None:
    """Delete a finished run's scratch folder, and its parent when that is left empty."""
    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):
        folder.parent.rmdir()


class Checkpointer:
    """When a stage writes its next resume checkpoint.

    ``due(batches)`` is true when at least ``interval`` seconds passed since the last checkpoint
    (``CONCEPTRANK_CHECKPOINT_SECONDS``, default 60); ``saved(batches)`` restarts the clock.
    """

    def __init__(self, stage: str, interval: float | None = None) -> None:
        self.stage = stage
        if interval is None:
            try:
                interval = float(os.environ.get(CHECKPOINT_SECONDS_ENV, DEFAULT_CHECKPOINT_SECONDS))
            except ValueError:
                interval = DEFAULT_CHECKPOINT_SECONDS
        self.interval = max(0.0, float(interval))
        self.last = time.monotonic()
        self.last_batches: int | None = None

    def due(self, batches: int) -> bool:
        return time.monotonic() - self.last >= self.interval

    def saved(self, batches: int) -> None:
        self.last = time.monotonic()
        self.last_batches = batches
