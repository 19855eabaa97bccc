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

Input files are fingerprinted by their bytes when that is cheap (listed files totalling at most
:data:`CONTENT_HASH_MAX_BYTES`), else by size and modification time; ``--verify-content``
(``CONCEPTRANK_VERIFY_CONTENT=1``) hashes the bytes whatever the size.

Disk and writers: :func:`ensure_free_space` checks free space before a stage writes a large file and
:func:`create_memmap` also reserves the file's blocks (a full disk is an error up front, never a
``Bus error`` later); :func:`atomic_write` turns an ``OSError`` into one :class:`OutputError` line;
:func:`folder_lock` lets one process at a time write an output folder.

Environment variables: ``CONCEPTRANK_CHECKPOINT_SECONDS`` (minimum seconds between two
checkpoints of a stage, default 60; 0 checkpoints after every batch; anything else but a finite
number >= 0 is an error) and ``CONCEPTRANK_VERIFY_CONTENT``.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import glob
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator, Mapping

from conceptrank.errors import (
    ConceptrankError,
    ConfigError,
    DiskSpaceError,
    FolderBusyError,
    OutputError,
)

__all__ = [
    "CACHE_FORMAT",
    "Checkpointer",
    "checkpoint_seconds",
    "Manifest",
    "array_sha256",
    "atomic_write",
    "atomic_write_text",
    "atomic_write_json",
    "clear_scratch",
    "create_memmap",
    "ensure_free_space",
    "folder_lock",
    "write_error",
    "file_sha256",
    "files_fingerprint",
    "hash_json",
    "load_checkpoint",
    "lookup",
    "manifest_section",
    "output_digests",
    "publish_staged",
    "package_versions",
    "read_json",
    "remove_scratch",
    "remove_temps",
    "save_npz",
    "stage_key",
    "staging_folder",
    "tree_fingerprint",
    "verify_content",
    "why_recompute",
    "write_checkpoint",
]

CACHE_FORMAT = 1  # bump when the meaning of a key or of a cached output changes
CHECKPOINT_SECONDS_ENV = "CONCEPTRANK_CHECKPOINT_SECONDS"
DEFAULT_CHECKPOINT_SECONDS = 60.0
VERIFY_CONTENT_ENV = "CONCEPTRANK_VERIFY_CONTENT"
CONTENT_HASH_MAX_BYTES = 256 << 20  # listed input files up to this size are fingerprinted by content
FREE_SPACE_MARGIN = 32 << 20  # left free beyond a stage's estimate (manifests, logs, other writers)
LOCK_NAME = ".conceptrank.lock"


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
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise write_error(path, e) from None
    os.close(fd)
    with contextlib.suppress(OSError):  # mkstemp makes 0600; outputs get the usual 0666 & ~umask
        os.chmod(tmp, 0o666 & ~_umask())
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if e.errno in WRITE_ERRNOS:
            raise write_error(path, e) from None
        raise
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG,
                          errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.EIO})


def write_error(path: str | os.PathLike, e: OSError) -> OutputError:
    """The one-line error for an ``OSError`` raised while writing ``path`` (disk full, read-only, ...)."""
    where = e.filename if e.filename else path
    reason = e.strerror or type(e).__name__
    hint = ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "; free some space or choose an --out on a disk with more room (previous outputs are kept)"
    elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        hint = "; choose a writable --out"
    cls = DiskSpaceError if e.errno in (errno.ENOSPC, errno.EDQUOT) else OutputError
    return cls(f"cannot write {where}: {reason}{hint}", where)


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


def verify_content() -> bool:
    """True when ``CONCEPTRANK_VERIFY_CONTENT`` asks to fingerprint input files by their bytes."""
    return os.environ.get(VERIFY_CONTENT_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def files_fingerprint(root: str | os.PathLike, rels: Iterable[str], content: bool | None = None) -> str:
    """SHA-256 over the files under ``root`` named by ``rels`` (missing files count too).

    Each file contributes its path and either its bytes' SHA-256 (``content``) or its
    ``(size, mtime_ns)``. ``content=None`` hashes the bytes when the files total at most
    :data:`CONTENT_HASH_MAX_BYTES` or ``CONCEPTRANK_VERIFY_CONTENT`` is set, and trusts size and
    modification time otherwise (one ``stat`` per file: catches a rewritten or touched file, but not
    two same-size files swapped with their times restored).
    """
    root = Path(root)
    stats = []
    for rel in rels:
        p = root.joinpath(*PurePosixPath(str(rel).replace("\\", "/")).parts)
        try:
            st = os.stat(p)
            stats.append((str(rel), p, st.st_size, st.st_mtime_ns))
        except OSError:
            stats.append((str(rel), p, -1, -1))
    if content is None:
        content = verify_content() or sum(max(s[2], 0) for s in stats) <= CONTENT_HASH_MAX_BYTES
    h = hashlib.sha256(b"content\n" if content else b"")
    for rel, p, size, mtime in stats:
        if content:
            try:
                rec: tuple = (rel, size, file_sha256(p) if size >= 0 else "")
            except OSError:
                rec = (rel, -1, "")
        else:
            rec = (rel, size, mtime)
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
        rels += [(base / f).as_posix() for f in sorted(filenames) if f != LOCK_NAME]
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


def load_npz(path: str | os.PathLike, required: Iterable[str], optional: Iterable[str] = ()) -> dict[str, Any]:
    """All ``required`` (and the present ``optional``) arrays of an ``.npz``, read eagerly.

    Raises
    ------
    ConceptrankError
        Naming the file, when it is not a complete archive or lacks a required array.
    """
    import numpy as np

    required = tuple(required)
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in required if k not in z.files]
            if missing:
                raise ConceptrankError(f"{path}: missing array(s) {', '.join(missing)}")
            return {k: z[k] for k in required + tuple(k for k in optional if k in z.files)}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        if isinstance(e, ConceptrankError):
            raise
        raise ConceptrankError(f"cannot read {path}: {e}") from None


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


# -- disk space and writers -------------------------------------------------------------------------
def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _existing_dir(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.is_dir() and path != path.parent:
        path = path.parent
    return path


def ensure_free_space(path: str | os.PathLike, nbytes: int, what: str, hint: str = "") -> None:
    """Raise :class:`DiskSpaceError` unless the file system holding ``path`` has ``nbytes`` (plus a
    :data:`FREE_SPACE_MARGIN`) free.

    Parameters
    ----------
    path : the file or folder about to be written (it need not exist yet).
    nbytes : the estimate of what will be written there.
    what : what is written, for the message (e.g. ``"the feature cache of layer4"``).
    hint : the way out, appended to the message (e.g. ``"pass --store float16 to halve it"``).
    """
    where = _existing_dir(Path(path))
    try:
        free = shutil.disk_usage(where).free
    except OSError:  # cannot tell (odd file system): let the write itself report a problem
        return
    need = int(nbytes) + FREE_SPACE_MARGIN
    if free < need:
        raise DiskSpaceError(
            f"not enough free space for {what}: needs {_fmt_bytes(need)} at {where}, only {_fmt_bytes(free)} free"
            + (f"; {hint}" if hint else "") + " (previous outputs are kept)", where)


def create_memmap(path: str | os.PathLike, dtype: Any, shape: tuple[int, ...], what: str, hint: str = "",
                  extra_bytes: int = 0):
    """A new ``.npy`` memmap (``np.lib.format.open_memmap(mode="w+")``) whose blocks are reserved.

    Checks free space for the file plus ``extra_bytes`` (what the stage writes afterwards, e.g. its
    outputs) with :func:`ensure_free_space`, then allocates the file's blocks (``posix_fallocate``),
    so that a disk filling up is an error here and never a ``Bus error`` on a later write to the map.
    """
    import numpy as np

    path = Path(path)
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    ensure_free_space(path, nbytes + int(extra_bytes), what, hint)
    try:
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=tuple(shape))
        _reserve_blocks(path)
    except OSError as e:
        raise write_error(path, e) from None
    return mm


def _reserve_blocks(path: Path) -> None:
    if not hasattr(os, "posix_fallocate"):  # pragma: no cover - not Linux
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise OSError(e.errno, e.strerror, str(path)) from None
    finally:
        os.close(fd)


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold the advisory lock of an output folder (``FOLDER/.conceptrank.lock``, ``fcntl.flock``).

    One process at a time writes a folder: a second one fails at once with
    :class:`FolderBusyError` naming the holder's pid (it does not wait). The lock goes away with the
    process, also when it is killed; the lock file itself stays (deleting it would race), except
    that a folder this call created and that is still empty at the end is removed again.
    """
    import fcntl

    folder = Path(folder)
    lock = folder / LOCK_NAME
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise write_error(lock, e) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise FolderBusyError(
                f"{folder} is being written by another conceptrank process (pid {holder}); "
                "wait for it to finish or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield folder
    finally:
        if created and not any(p.name != LOCK_NAME for p in folder.iterdir()):
            with contextlib.suppress(OSError):  # a command that failed early leaves no empty folder behind
                lock.unlink()
                for p in created:
                    p.rmdir()
        os.close(fd)  # releases the lock


def checkpoint_seconds() -> float:
    """``CONCEPTRANK_CHECKPOINT_SECONDS`` as a number of seconds (default 60).

    Raises
    ------
    ConfigError
        When it is set to anything but a finite number >= 0.
    """
    raw = os.environ.get(CHECKPOINT_SECONDS_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_CHECKPOINT_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{CHECKPOINT_SECONDS_ENV}={raw!r}: expected a number of seconds >= 0 (e.g. 60)")
    return value


# -- staged outputs ---------------------------------------------------------------------------------
def staging_folder(parent: str | os.PathLike, name: str) -> Path:
    """A fresh, empty ``parent/name`` to write a set of outputs into before :func:`publish_staged`
    (a leftover of a run that was killed is removed: only this code writes there)."""
    path = Path(parent) / name
    shutil.rmtree(path, ignore_errors=True)
    try:
        path.mkdir(parents=True)
    except OSError as e:
        raise write_error(path, e) from None
    return path


def _published(dest: Path, manifest: str) -> set[str]:
    try:
        names = read_json(dest / manifest).get("files", [])
    except (OSError, ValueError, AttributeError):
        return set()
    return {n for n in names if isinstance(n, str) and ".." not in PurePosixPath(n).parts
            and not PurePosixPath(n).is_absolute()}


def publish_staged(staging: str | os.PathLike, dest: str | os.PathLike, manifest: str,
                   commit: Any = None) -> list[str]:
    """Move every file of ``staging`` to the same place under ``dest``, then call ``commit()`` (e.g.
    the atomic write of the page that links them), record the files in ``dest/manifest`` and delete
    the files that the previous publication recorded but this one did not write.

    Files in ``dest`` that no publication recorded (a user's own) are never deleted. Until
    ``commit`` runs, the previous outputs keep every file they link to.

    Returns
    -------
    The published paths, relative to ``dest`` (POSIX, sorted).
    """
    staging, dest = Path(staging), Path(dest)
    rels = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
    old = _published(dest, manifest)
    try:
        for rel in rels:
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / rel, target)
    except OSError as e:
        raise write_error(dest / rel, e) from None
    if commit is not None:
        commit()
    atomic_write_json(dest / manifest, {"files": rels})
    for rel in sorted(old - set(rels)):
        with contextlib.suppress(OSError):
            (dest / rel).unlink()
        parent = (dest / rel).parent
        while parent != dest and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent
    shutil.rmtree(staging, ignore_errors=True)
    return rels


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
            interval = checkpoint_seconds()
        self.interval = max(0.0, float(interval))
        self.last = time.monotonic()
        self.last_batches: int | None = None

    def due(self, batches: int) -> bool:
        return time.monotonic() - self.last >= self.interval

    def saved(self, batches: int) -> None:
        self.last = time.monotonic()
        self.last_batches = batches
