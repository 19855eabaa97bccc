"""Download and unpack the real data sets: Broden (probe set), Stanford 40 Actions (target set), and
ConceptNet 5.7's assertions (a knowledge graph, kept as the downloaded ``.csv.gz``).

``conceptrank fetch broden|stanford40|conceptnet --to DIR`` calls :func:`fetch_dataset`, which for every
archive of the data set

1. skips everything when the archive's extracted content is already complete (its *marker*
   exists, e.g. ``DIR/broden1_224/index.csv``), so a folder placed there by hand is used as is;
2. otherwise uses ``DIR/<archive>`` if it is already there (a finished download, or an archive
   copied there by hand), checking it against the known or recorded SHA-256 digest;
3. otherwise downloads it with :func:`download`: into ``DIR/<archive>.part``, resuming a partial
   file with an HTTP ``Range`` request, checking its size and digest, and renaming it to its final
   name only once it is complete;
4. extracts it with :mod:`zipfile` into a temporary folder next to its destination (members with
   absolute paths or ``..`` are refused) and moves the result into place, the part that holds the
   marker last, so an interrupted extraction never looks complete.

Checksums
---------
The official servers publish no digests and none could be obtained offline, so every registry
entry has ``sha256=None`` and ``size=None``. Instead the digest computed when an archive is first
completed is recorded in ``DIR/.conceptrank-fetch.json`` and every later download or reuse of that
archive is verified against it (trust on first use). A file that does not match a known or recorded
digest is deleted and a :class:`~conceptrank.errors.ConceptrankError` explains what happened.

Offline behaviour
-----------------
Connection and read timeouts are ``timeout`` seconds (host-name resolution is bounded by the same
limit), so without a network the command fails within seconds with a :class:`DownloadError` that
names the URL(s) to fetch on another machine and where to put the archives (or their extracted
content) so that the command then completes without the network.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import shlex
import shutil
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from conceptrank.errors import ConceptrankError, DownloadError
from conceptrank.io.cache import atomic_write_json, file_sha256

__all__ = [
    "DATASETS",
    "MANIFEST_NAME",
    "DownloadError",
    "FetchResult",
    "Resource",
    "download",
    "extract_archive",
    "fetch_dataset",
    "resources",
]

MANIFEST_NAME = ".conceptrank-fetch.json"
"""Per-destination record of the archives completed there (URL, size, SHA-256)."""

_CHUNK = 1 << 16
_BRODEN_BASE = "http://netdissect.csail.mit.edu/data/"
_STANFORD_BASE = "http://vision.stanford.edu/Datasets/"
_CONCEPTNET_BASE = "https://s3.amazonaws.com/conceptnet/downloads/2019/edges/"
_CONCEPTNET_FILE = "conceptnet-assertions-5.7.0.csv.gz"
_BRODEN_VARIANTS = ("224", "227")
DATASETS = ("broden", "stanford40", "conceptnet")
"""Names accepted by :func:`fetch_dataset` (``stanford-40`` and ``stanford_40`` work too)."""


@dataclass(frozen=True)
class Resource:
    """One downloadable archive of a data set.

    Attributes
    ----------
    name : str
        Human-readable label, e.g. ``broden1_224``.
    url : str
        Where to download it from (the official address, or a mirror's when ``base_url`` is given).
    filename : str
        The archive's file name; it is stored as ``DIR/<filename>``.
    sha256 : str or None
        Known SHA-256 hex digest. ``None`` for every registry entry (the servers publish none); the
        digest is then recorded in ``DIR/.conceptrank-fetch.json`` on first completion.
    size : int or None
        Known size in bytes, ``None`` when unknown.
    extract_to : str
        Sub-folder of ``DIR`` the archive's content ends up in (``broden1_224``, ``Stanford40``).
        A single top-level folder of that same name inside the archive is not repeated.
    marker : str
        Path, relative to ``DIR/<extract_to>``, whose existence means the content is complete
        (``index.csv``, ``ImageSplits/actions.txt``, ...). An empty ``extract_to`` means the file is
        used as downloaded (ConceptNet's ``.csv.gz``): nothing is extracted.
    """

    name: str
    url: str
    filename: str
    sha256: str | None
    size: int | None
    extract_to: str
    marker: str = ""

    @property
    def official_url(self) -> str:
        """The official address of this archive (``url`` may point at a mirror)."""
        if not self.extract_to:
            return _CONCEPTNET_BASE + self.filename
        base = _STANFORD_BASE if self.extract_to == "Stanford40" else _BRODEN_BASE
        return base + self.filename


@dataclass(frozen=True)
class FetchResult:
    """What :func:`fetch_dataset` did and where the data now is.

    Attributes
    ----------
    dataset : str
        ``broden`` or ``stanford40``.
    root : Path
        The ready-to-use folder: ``DIR/broden1_224`` (or ``_227``) or ``DIR/Stanford40``.
    files : tuple of Path
        The archives present in ``DIR`` (downloaded now, earlier, or placed there by hand); an
        archive whose content was already extracted and which has since been deleted is omitted.
    downloaded_bytes : int
        Bytes received over the network by this call (0 when nothing had to be downloaded).
    resumed : bool
        Whether at least one download continued a partial ``.part`` file.
    """

    dataset: str
    root: Path
    files: tuple[Path, ...]
    downloaded_bytes: int
    resumed: bool

    def summary(self) -> str:
        """A few lines: where the data is and the exact command that uses it next."""
        if self.downloaded_bytes:
            how = f"downloaded {_human(self.downloaded_bytes)}" + (" (resumed a partial download)" if self.resumed else "")
        else:
            how = "nothing downloaded"
        lines = [f"{self.dataset} ready in {self.root}  ({how})"]
        for f in self.files if self.dataset != "conceptnet" else ():
            lines.append(f"  archive: {f}  (may be deleted; the extracted folder is what is used)")
        root = shlex.quote(str(self.root))
        if self.dataset == "conceptnet":
            lines.append(f"next: conceptrank relate --run runs/demo --kg {root}")
        elif self.dataset == "broden":
            lines.append("next: conceptrank dissect --model resnet18 --weights IMAGENET1K_V1 --layer layer4 "
                         f"--probe {root} --out runs/dissect-resnet18")
        else:
            lines.append("next: conceptrank extract --model resnet18 --weights IMAGENET1K_V1 --layer layer4 "
                         f"--dataset {root} --out runs/extract-resnet18")
        return "\n".join(lines)


# --------------------------------------------------------------------------- registry


def _canonical_name(name: str) -> str:
    key = re.sub(r"[\s_\-]", "", str(name).lower())
    if key in ("broden", "broden1"):
        return "broden"
    if key in ("stanford40", "stanford40actions"):
        return "stanford40"
    if key in ("conceptnet", "conceptnet5", "conceptnet57", "conceptnetassertions"):
        return "conceptnet"
    raise ConceptrankError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def _canonical_variant(variant: str | int) -> str:
    v = str(variant).strip().lower().removeprefix("broden1_").removeprefix("broden")
    if v not in _BRODEN_VARIANTS:
        raise ConceptrankError(f"unknown Broden variant {variant!r}; choose 224 or 227")
    return v


def _mirror(base_url: str | None, official: str, filename: str) -> str:
    if base_url is None:
        return official + filename
    base = str(base_url).strip()
    scheme = urllib.parse.urlsplit(base).scheme.lower()
    if scheme not in ("http", "https", "file"):
        raise ConceptrankError(f"--base-url must be an http://, https:// or file:// address, got {base_url!r}")
    return base.rstrip("/") + "/" + urllib.parse.quote(filename)


def resources(name: str, variant: str | int = "224", base_url: str | None = None) -> tuple[Resource, ...]:
    """The archives that make up a data set.

    Parameters
    ----------
    name : str
        ``broden`` or ``stanford40``.
    variant : str or int
        Broden only: ``224`` (``broden1_224``, for 224-pixel models) or ``227`` (``broden1_227``).
        Ignored for Stanford 40.
    base_url : str, optional
        A mirror that replaces the scheme, host and folder of the official address; the archive's
        file name is appended to it.

    Returns
    -------
    tuple of Resource
        In download order.
    """
    ds = _canonical_name(name)
    if ds == "conceptnet":
        fn = _CONCEPTNET_FILE
        return (Resource("conceptnet-assertions-5.7.0", _mirror(base_url, _CONCEPTNET_BASE, fn), fn, None, None, ""),)
    if ds == "broden":
        v = _canonical_variant(variant)
        fn = f"broden1_{v}.zip"
        return (Resource(f"broden1_{v}", _mirror(base_url, _BRODEN_BASE, fn), fn, None, None, f"broden1_{v}", "index.csv"),)
    out = []
    # ImageSplits/actions.txt is what marks a Stanford 40 folder (data.targets), so it comes last
    for part, marker in (("JPEGImages", "JPEGImages"), ("XMLAnnotations", "XMLAnnotations"),
                         ("ImageSplits", "ImageSplits/actions.txt")):
        fn = f"Stanford40_{part}.zip"
        out.append(Resource(f"Stanford40_{part}", _mirror(base_url, _STANFORD_BASE, fn), fn, None, None, "Stanford40", marker))
    return tuple(out)


# --------------------------------------------------------------------------- download


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def _reason(e: BaseException) -> str:
    """A short human description of a network exception."""
    if isinstance(e, urllib.error.HTTPError):
        return f"the server answered HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        inner = e.reason
        if isinstance(inner, BaseException):
            return _reason(inner)
        return str(inner)
    if isinstance(e, socket.gaierror):
        return f"the host name could not be resolved ({e.strerror or e}); is this machine offline?"
    if isinstance(e, _ResolveTimeout):
        return str(e)
    if isinstance(e, (TimeoutError, socket.timeout)):
        return "no answer from the server within the timeout"
    if isinstance(e, ConnectionRefusedError):
        return "the connection was refused"
    if isinstance(e, http.client.IncompleteRead):
        return "the server closed the connection before the file was complete"
    if isinstance(e, (http.client.HTTPException, ConnectionError)):
        return f"the connection failed ({type(e).__name__}: {e})"
    if isinstance(e, OSError):
        msg = e.strerror or str(e)
        return f"the network is unreachable ({msg})" if e.errno in (101, 113, 65, 51) else msg
    return f"{type(e).__name__}: {e}"


_NET_ERRORS = (urllib.error.URLError, OSError, http.client.HTTPException, ValueError)


def _resolve_bounded(url: str, timeout: float) -> None:
    """Resolve the URL's host name in a helper thread, giving up after ``timeout`` seconds.

    ``socket`` timeouts do not cover name resolution, which can hang far longer on a machine
    without a working resolver; this keeps the "fails within seconds" promise.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return
    if any(os.environ.get(k) for k in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")):
        return  # the proxy resolves the name; urllib handles the proxy connection itself
    box: dict[str, BaseException] = {}

    def work() -> None:
        try:
            socket.getaddrinfo(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80), type=socket.SOCK_STREAM)
        except BaseException as e:  # noqa: BLE001 - reported to the caller
            box["error"] = e

    t = threading.Thread(target=work, name="conceptrank-resolve", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise _ResolveTimeout(f"resolving the host name {parts.hostname} took longer than {timeout:g} s; is this machine offline?")
    if "error" in box:
        raise box["error"]


class _ResolveTimeout(TimeoutError):
    """Name resolution did not finish within the timeout."""


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.I)


def _open(url: str, offset: int, timeout: float):
    headers = {"User-Agent": _user_agent(), "Accept-Encoding": "identity"}
    if offset > 0:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _user_agent() -> str:
    try:
        from importlib.metadata import version

        return f"conceptrank/{version('conceptrank')} (+python-urllib)"
    except Exception:  # pragma: no cover
        return "conceptrank (+python-urllib)"


def _manual_text(items: list[tuple[str, Path]], layouts: list[str]) -> str:
    lines = ["To install without network access on this machine:",
             "  1. on a machine with internet access, download"]
    lines += [f"       {u}" for u, _ in items]
    lines.append("  2. copy " + ("each archive" if len(items) > 1 else "it") + " to")
    lines += [f"       {p}" for _, p in items]
    lines.append("     and rerun this command: it verifies and extracts the archive(s) without the network")
    if layouts:
        lines.append("  or extract them yourself so that this layout exists (the command then skips them):")
        lines += [f"       {x}" for x in layouts]
    return "\n".join(lines)


def _fail(url: str, dest: Path, part: Path, e: BaseException) -> DownloadError:
    reason = _reason(e)
    msg = [f"download failed: {url}: {reason}"]
    if part.exists() and part.stat().st_size > 0:
        msg.append(f"The {_human(part.stat().st_size)} received so far are kept in {part}; rerunning resumes from there.")
    msg.append(_manual_text([(url, dest)], []))
    return DownloadError("\n".join(msg), url=url, reason=reason, dest=dest)


def _hash_file_into(h: Any, path: Path) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


@dataclass(frozen=True)
class _Downloaded:
    path: Path
    downloaded: int
    resumed: bool
    sha256: str
    size: int


def _open_range(url: str, dest: Path, part: Path, offset: int, timeout: float):
    """Open ``url`` from byte ``offset`` (resuming ``part``): ``(response or None, offset, total, resumed)``.

    The response is None when the server answers 416 for exactly the part's size (it is complete);
    a stale part or a server that sends another range restarts from 0.
    """
    for _attempt in range(3):
        try:
            resp = _open(url, offset, timeout)
        except urllib.error.HTTPError as e:
            if e.code == 416 and offset > 0:  # range not satisfiable: complete already, or stale part
                m = re.search(r"/(\d+)", e.headers.get("Content-Range", "") or "")
                e.close()
                if m and int(m.group(1)) == offset:
                    return None, offset, offset, False
                part.unlink(missing_ok=True)
                offset = 0
                continue
            raise _fail(url, dest, part, e) from None
        except _NET_ERRORS as e:
            raise _fail(url, dest, part, e) from None
        status = getattr(resp, "status", None) or resp.getcode()
        if offset > 0 and status == 206:
            m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", "") or "")
            if not m or int(m.group(1)) != offset:  # not the range we asked for: start over
                resp.close()
                part.unlink(missing_ok=True)
                offset = 0
                continue
            return resp, offset, (int(m.group(3)) if m.group(3) != "*" else None), True
        clen = resp.headers.get("Content-Length")  # 200 (Range ignored, or a fresh download), or file://
        return resp, 0, (int(clen) if clen and clen.isdigit() else None), False
    raise _fail(url, dest, part, ConnectionError("the server kept answering with the wrong byte range"))  # pragma: no cover


def _stream_into(resp, part: Path, h, *, url: str, dest: Path, append: bool, total: int | None, offset: int,
                 progress: bool) -> int:
    """Copy the response body into ``part`` (hashing it into ``h``), fsync it; returns the bytes received."""
    from tqdm import tqdm

    received = 0
    bar = tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name,
               file=sys.stderr, disable=not progress, leave=False, dynamic_ncols=True)
    try:
        with resp, open(part, "ab" if append else "wb") as f:
            while True:
                try:
                    block = resp.read(_CHUNK)
                except _NET_ERRORS as e:
                    f.flush()
                    raise _fail(url, dest, part, e) from None
                if not block:
                    break
                try:
                    f.write(block)
                except OSError as e:
                    raise ConceptrankError(f"could not write {part}: {e.strerror or e}") from None
                h.update(block)
                received += len(block)
                bar.update(len(block))
            f.flush()
            os.fsync(f.fileno())
    finally:
        bar.close()
    return received


def _download(url: str, dest: Path, *, sha256: str | None, size: int | None, timeout: float, progress: bool,
              recorded: bool = False) -> _Downloaded:
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    sha256 = sha256.lower() if sha256 else None

    if dest.exists():  # already complete: verify and keep, no network
        actual_size = dest.stat().st_size
        digest = file_sha256(dest)
        _verify(dest, url, digest, actual_size, sha256, size, recorded=recorded)
        return _Downloaded(dest, 0, False, digest, actual_size)

    offset = part.stat().st_size if part.exists() else 0
    if size is not None and offset > size:
        part.unlink()
        offset = 0

    try:
        _resolve_bounded(url, timeout)
    except _NET_ERRORS as e:
        raise _fail(url, dest, part, e) from None

    resp, offset, total, resumed = _open_range(url, dest, part, offset, timeout)
    received = 0
    if resp is None:  # the server says the part file is complete already
        final_size = part.stat().st_size
        digest = file_sha256(part)
    else:
        if size is not None and total is not None and total != size:
            resp.close()
            raise ConceptrankError(
                f"{url} has {total} bytes but {dest.name} should have {size}; refusing to download a different file"
            )
        h = hashlib.sha256()
        if resumed:
            _hash_file_into(h, part)
        received = _stream_into(resp, part, h, url=url, dest=dest, append=resumed, total=total, offset=offset,
                                progress=progress)
        final_size = part.stat().st_size
        if total is not None and final_size != total:
            raise _fail(url, dest, part, http.client.IncompleteRead(b"", total - final_size))
        digest = h.hexdigest()

    _verify(part, url, digest, final_size, sha256, size, final=dest, recorded=recorded)
    os.replace(part, dest)
    return _Downloaded(dest, received, resumed, digest, final_size)


def _verify(path: Path, url: str, digest: str, actual_size: int, sha256: str | None, size: int | None,
            final: Path | None = None, recorded: bool = False) -> None:
    """Check size and digest; on a mismatch delete ``path`` and raise a clear error."""
    name = (final or path).name
    problem = None
    if size is not None and actual_size != size:
        problem = f"it has {actual_size} bytes, expected {size}"
    elif sha256 is not None and digest != sha256:
        problem = f"its SHA-256 is {digest}, expected {sha256}"
    if problem is None:
        return
    path.unlink(missing_ok=True)
    origin = f"as recorded in {(final or path).parent / MANIFEST_NAME} when it was first completed" if recorded else "known"
    raise ConceptrankError(
        f"checksum mismatch for {name} ({url}): {problem} ({origin}); the bad file {path} was deleted. "
        "Rerun to download it again" + (
            f"; if the server now legitimately serves a different file, delete the entry for {name} from "
            f"{(final or path).parent / MANIFEST_NAME} first" if recorded else "")
    )


def download(url: str, dest: Path, *, sha256: str | None = None, size: int | None = None, timeout: float = 10.0,
             progress: bool = True) -> tuple[Path, int, bool]:
    """Download ``url`` to ``dest``, resuming a partial ``dest.part`` and verifying the result.

    Parameters
    ----------
    url : str
        ``http://``, ``https://`` or ``file://`` address.
    dest : Path
        Final file name. Data is written to ``dest.part`` and renamed to ``dest`` only once the
        size and digest checks pass. If ``dest`` already exists it is only verified.
    sha256 : str, optional
        Expected SHA-256 hex digest.
    size : int, optional
        Expected size in bytes. The server's ``Content-Length`` / ``Content-Range`` total is checked
        in any case.
    timeout : float
        Seconds to wait for name resolution, the connection and each read.
    progress : bool
        Show a tqdm progress bar on stderr.

    Returns
    -------
    tuple of (Path, int, bool)
        ``dest``, the number of bytes received by this call, and whether a partial file was
        resumed (the server answered ``206 Partial Content`` to the ``Range`` request; a ``200``
        answer restarts from scratch).

    Raises
    ------
    DownloadError
        Network failure (no route, refused, timeout, HTTP error, transfer cut short); the message
        says why and how to place the file manually. A partial ``.part`` file is kept for resuming.
    ConceptrankError
        Size or digest mismatch; the bad file is deleted.
    """
    r = _download(url, Path(dest), sha256=sha256, size=size, timeout=timeout, progress=progress)
    return r.path, r.downloaded, r.resumed


# --------------------------------------------------------------------------- extraction


def _check_member(name: str, archive: Path) -> None:
    n = name.replace("\\", "/")
    if n.startswith("/") or re.match(r"^[A-Za-z]:", n) or ".." in PurePosixPath(n).parts or "\x00" in n:
        raise ConceptrankError(
            f"refusing to extract {archive}: member {name!r} has an absolute path or '..' and would be "
            "written outside the destination folder (zip-slip); the archive is not trustworthy"
        )


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def extract_archive(archive: Path, dest: Path, marker: str, *, progress: bool = True) -> Path:
    """Extract a zip archive into ``dest`` safely, so that ``dest/marker`` exists only when complete.

    Parameters
    ----------
    archive : Path
        The ``.zip`` file.
    dest : Path
        Folder that receives the archive's content. A single top-level folder of the same name
        inside the archive is not repeated (``broden1_224.zip`` holds ``broden1_224/...``).
    marker : str
        Path relative to ``dest`` that the archive must provide; it appears last.
    progress : bool
        Show a tqdm progress bar on stderr.

    Returns
    -------
    Path
        ``dest``.

    Raises
    ------
    ConceptrankError
        The file is not a (complete) zip archive, a member has an absolute path or ``..``, a member
        is corrupt (CRC error), or the archive lacks the marker.
    """
    archive, dest = Path(archive), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp_prefix = f".{dest.name}.extracting-"
    for stale in dest.parent.glob(tmp_prefix + "*"):  # left behind by an interrupted run
        with contextlib.suppress(OSError):
            _remove(stale)
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as e:
        raise ConceptrankError(
            f"{archive} is not a complete zip archive ({e}); delete it and rerun to download it again"
        ) from None
    tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix, dir=dest.parent))
    try:
        with zf:
            infos = zf.infolist()
            for info in infos:
                _check_member(info.filename, archive)
            from tqdm import tqdm

            total = sum(i.file_size for i in infos)
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"extract {archive.name}",
                      file=sys.stderr, disable=not progress, leave=False, dynamic_ncols=True) as bar:
                for info in infos:
                    try:
                        zf.extract(info, tmp)
                    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
                        raise ConceptrankError(
                            f"{archive} is corrupt ({info.filename}: {e}); delete it and rerun to download it again"
                        ) from None
                    except OSError as e:
                        raise ConceptrankError(f"could not extract {info.filename} from {archive}: {e.strerror or e}") from None
                    bar.update(info.file_size)
        content = tmp
        entries = list(tmp.iterdir())
        if not (tmp / marker).exists() and len(entries) == 1 and entries[0].is_dir() and entries[0].name == dest.name:
            content = entries[0]
        if not (content / marker).exists():
            raise ConceptrankError(
                f"{archive} does not have the expected layout: no {marker} inside it (expected under {dest})"
            )
        if not dest.exists():
            os.replace(content, dest)
        else:  # merge into an existing folder (Stanford 40's three archives; an incomplete earlier extraction)
            top = PurePosixPath(marker).parts[0]
            for entry in sorted(content.iterdir(), key=lambda p: p.name == top):  # the marker's entry last
                target = dest / entry.name
                if target.exists() or target.is_symlink():
                    _remove(target)
                os.replace(entry, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


# --------------------------------------------------------------------------- manifest


def _read_manifest(to: Path) -> dict[str, Any]:
    path = to / MANIFEST_NAME
    if not path.exists():
        return {"version": 1, "files": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConceptrankError(f"{path} is unreadable ({e}); delete it to record fresh checksums") from None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise ConceptrankError(f"{path} is not a conceptrank fetch record; delete it to record fresh checksums")
    return data


def _record(to: Path, manifest: dict[str, Any], res: Resource, digest: str, size: int, source: str) -> None:
    manifest["files"][res.filename] = {
        "url": res.url,
        "sha256": digest,
        "size": size,
        "source": source,
        "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_json(to / MANIFEST_NAME, manifest)


# --------------------------------------------------------------------------- fetch


def _layout(ds: str, to: Path, res: tuple[Resource, ...]) -> list[str]:
    if ds == "conceptnet":
        return [f"{to / res[0].filename}  (the .csv.gz as downloaded; it is read without unpacking)"]
    if ds == "broden":
        r = res[0]
        return [f"{to / r.extract_to / r.marker}  (plus images/, category.csv, label.csv, c_*.csv; "
                f"e.g. `unzip {r.filename} -d {to}`)"]
    root = to / "Stanford40"
    return [f"{root / 'JPEGImages'}/", f"{root / 'ImageSplits' / 'actions.txt'}  (and the *_train.txt / *_test.txt splits)",
            f"{root / 'XMLAnnotations'}/", f"(e.g. `unzip Stanford40_JPEGImages.zip -d {root}` for each archive)"]


def fetch_dataset(name: str, to: Path, *, variant: str = "224", base_url: str | None = None, timeout: float = 10.0,
                  progress: bool = True) -> FetchResult:
    """Download, verify and extract a data set into ``to``.

    Parameters
    ----------
    name : str
        ``broden`` (the probe set, ``to/broden1_<variant>/``) or ``stanford40`` (the target set,
        ``to/Stanford40/`` with ``JPEGImages/``, ``ImageSplits/`` and ``XMLAnnotations/``).
    to : Path
        Destination folder; created if missing. Archives are kept as ``to/<filename>``.
    variant : str
        Broden only: ``224`` or ``227``.
    base_url : str, optional
        A mirror replacing the official ``scheme://host/folder/`` part of every address.
    timeout : float
        Seconds to wait for name resolution, the connection and each read before failing.
    progress : bool
        Show tqdm progress bars on stderr.

    Returns
    -------
    FetchResult
        Where the data is; :meth:`FetchResult.summary` gives the next command.

    Raises
    ------
    DownloadError
        No network or the server failed; the message lists the URL(s) to fetch elsewhere and where to
        put the archives or their extracted content so that a rerun needs no network.
    ConceptrankError
        Unknown data set or variant, checksum mismatch (bad file deleted), unsafe or corrupt archive.
    """
    ds = _canonical_name(name)
    res = resources(ds, variant, base_url)
    if timeout is None or float(timeout) <= 0:
        raise ConceptrankError(f"--timeout must be a positive number of seconds, got {timeout!r}")
    to = Path(to).expanduser().absolute()
    if to.exists() and not to.is_dir():
        raise ConceptrankError(f"--to {to} is a file, not a folder")
    to.mkdir(parents=True, exist_ok=True)
    manifest = _read_manifest(to)

    # phase 1: every missing archive is downloaded (or found in place) before anything is extracted,
    # so an offline run fails at once and a data set never looks complete while an archive is missing
    todo: list[tuple[Resource, Any, bool]] = []
    files: list[Path] = []
    downloaded = 0
    resumed = False
    for i, r in enumerate(res):
        archive = to / r.filename
        if r.extract_to and (to / r.extract_to / r.marker).exists():
            if archive.exists():
                files.append(archive)
            continue
        rec = manifest["files"].get(r.filename) or {}
        expected = r.sha256 or rec.get("sha256")
        expected_size = r.size if r.size is not None else rec.get("size")
        placed = archive.exists()
        try:
            got = _download(r.url, archive, sha256=expected, size=expected_size, timeout=float(timeout),
                            progress=progress, recorded=bool(expected) and not r.sha256)
        except DownloadError as e:
            pending = [x for x in res[i:] if not (x.extract_to and (to / x.extract_to / x.marker).exists())
                       and not (to / x.filename).exists()]
            if base_url is not None:
                items = [(f"{x.url}  (official: {x.official_url})", to / x.filename) for x in pending]
            else:
                items = [(x.url, to / x.filename) for x in pending]
            msg = [f"could not download {ds}: {e.url}: {e.reason}"]
            part = archive.with_name(archive.name + ".part")
            if part.exists() and part.stat().st_size > 0:
                msg.append(f"The {_human(part.stat().st_size)} received so far are kept in {part}; rerunning resumes there.")
            msg.append(_manual_text(items, _layout(ds, to, res)))
            raise DownloadError("\n".join(msg), url=e.url, reason=e.reason, dest=e.dest) from None
        downloaded += got.downloaded
        resumed = resumed or got.resumed
        todo.append((r, got, placed))

    # phase 2: extract in registry order (the archive holding the data set's marker last)
    for r, got, placed in todo:
        archive = to / r.filename
        if r.extract_to:
            extract_archive(archive, to / r.extract_to, r.marker, progress=progress)
        if not (manifest["files"].get(r.filename) or {}).get("sha256"):  # trust on first use, once proven complete
            _record(to, manifest, r, got.sha256, got.size, "placed" if placed else "downloaded")
        files.append(archive)

    root = to / (res[0].extract_to or res[0].filename)
    return FetchResult(ds, root, tuple(sorted(files, key=lambda p: p.name)), downloaded, resumed)
