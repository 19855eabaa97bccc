"""Tests for ``conceptrank fetch``: against a local HTTP server on 127.0.0.1 only, never the network."""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import socket
import threading
import time
import zipfile
from pathlib import Path

import pytest

from conceptrank.errors import ConceptrankError
from conceptrank.fetch import (
    MANIFEST_NAME,
    DownloadError,
    FetchResult,
    download,
    extract_archive,
    fetch_dataset,
    resources,
)

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    """urllib honours *_proxy variables; 127.0.0.1 must be reached directly."""
    for k in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(k, raising=False)


class _Server:
    """A tiny HTTP server on 127.0.0.1 that serves in-memory files and (optionally) byte ranges."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.honor_range = True
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.truncate_after: int | None = None  # close the connection after this many body bytes
        srv = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                srv.requests.append((self.path, rng))
                data = srv.files.get(self.path.split("?")[0])
                if data is None:
                    self.send_error(404, "Not Found")
                    return
                start, status = 0, 200
                if rng and srv.honor_range:
                    m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
                    if m:
                        start = int(m.group(1))
                        if start >= len(data):
                            self.send_response(416)
                            self.send_header("Content-Range", f"bytes */{len(data)}")
                            self.send_header("Content-Length", "0")
                            self.end_headers()
                            return
                        status = 206
                body = data[start:]
                self.send_response(status)
                self.send_header("Content-Type", "application/zip")
                self.send_header("Content-Length", str(len(body)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Accept-Ranges", "bytes" if srv.honor_range else "none")
                self.end_headers()
                if srv.truncate_after is not None:
                    body = body[: srv.truncate_after]
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/mirror/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def add(self, name: str, data: bytes) -> None:
        self.files[f"/mirror/{name}"] = data

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


def _zip_bytes(tmp_path: Path, members: dict[str, bytes], name: str = "a.zip") -> bytes:
    path = tmp_path / "build" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for n, data in members.items():
            zf.writestr(n, data)
    return path.read_bytes()


def _broden_zip(tmp_path: Path, variant: str = "224") -> bytes:
    root = f"broden1_{variant}"
    # incompressible filler so that the archive is big enough for a meaningful half
    filler = hashlib.sha256(b"x").digest() * 2048
    return _zip_bytes(tmp_path, {
        f"{root}/index.csv": b"image,split,ih,iw,sh,sw,color\nimages/a.jpg,train,224,224,112,112,images/a_color.png\n",
        f"{root}/category.csv": b"name,first,last,count,frequency\ncolor,1,1,1,1\n",
        f"{root}/images/a.jpg": filler,
    }, f"{root}.zip")


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- registry


def test_registry_official_addresses_and_layout():
    (b224,) = resources("broden")
    assert b224.url == "http://netdissect.csail.mit.edu/data/broden1_224.zip"
    assert (b224.extract_to, b224.marker, b224.sha256) == ("broden1_224", "index.csv", None)
    (b227,) = resources("Broden", variant="227")
    assert b227.url == "http://netdissect.csail.mit.edu/data/broden1_227.zip"
    st = resources("stanford-40")
    assert {r.url for r in st} == {
        f"http://vision.stanford.edu/Datasets/Stanford40_{p}.zip" for p in ("JPEGImages", "ImageSplits", "XMLAnnotations")
    }
    assert {r.extract_to for r in st} == {"Stanford40"}
    assert st[-1].marker == "ImageSplits/actions.txt"  # the data set's marker is extracted last
    mirrored = resources("broden", base_url="http://127.0.0.1:9/some/dir")
    assert mirrored[0].url == "http://127.0.0.1:9/some/dir/broden1_224.zip"
    assert mirrored[0].official_url == b224.url
    with pytest.raises(ConceptrankError, match="unknown dataset"):
        resources("imagenet")
    with pytest.raises(ConceptrankError, match="variant"):
        resources("broden", variant="300")
    with pytest.raises(ConceptrankError, match="base-url"):
        resources("broden", base_url="ftp://127.0.0.1/")


# --------------------------------------------------------------------------- full fetch


def test_full_fetch_extracts_records_digest_and_second_run_is_offline(tmp_path, server):
    data = _broden_zip(tmp_path)
    server.add("broden1_224.zip", data)
    to = tmp_path / "data"
    res = fetch_dataset("broden", to, base_url=server.url, timeout=5, progress=False)

    assert isinstance(res, FetchResult)
    assert res.root == (to / "broden1_224").absolute()
    assert (res.root / "index.csv").read_bytes().startswith(b"image,split")
    assert (res.root / "images" / "a.jpg").exists()
    assert not (res.root / "broden1_224").exists()  # the archive's top folder is not repeated
    assert (to / "broden1_224.zip").read_bytes() == data
    assert not (to / "broden1_224.zip.part").exists()
    assert res.files == ((to / "broden1_224.zip").absolute(),)
    assert res.downloaded_bytes == len(data) and not res.resumed
    assert [p for p in to.iterdir() if ".extracting-" in p.name] == []
    rec = json.loads((to / MANIFEST_NAME).read_text())["files"]["broden1_224.zip"]
    assert rec["sha256"] == hashlib.sha256(data).hexdigest() and rec["size"] == len(data)
    assert rec["url"] == server.url + "broden1_224.zip"
    text = res.summary()
    assert str(res.root) in text
    assert f"conceptrank dissect --model resnet18 --weights IMAGENET1K_V1 --layer layer4 --probe {res.root}" in text

    # second run: everything is there, nothing is requested
    n = len(server.requests)
    again = fetch_dataset("broden", to, base_url=server.url, timeout=5, progress=False)
    assert len(server.requests) == n
    assert again.downloaded_bytes == 0 and again.root == res.root


def test_stanford40_three_archives_into_one_folder(tmp_path, server):
    parts = {
        "JPEGImages": {"JPEGImages/applauding_001.jpg": b"\xff\xd8jpeg"},
        "ImageSplits": {"ImageSplits/actions.txt": b"action_name\tnumber_of_images\napplauding\t1\n",
                        "ImageSplits/applauding_train.txt": b"applauding_001.jpg\n"},
        "XMLAnnotations": {"XMLAnnotations/applauding_001.xml": b"<annotation/>"},
    }
    for p, members in parts.items():
        server.add(f"Stanford40_{p}.zip", _zip_bytes(tmp_path, members, f"{p}.zip"))
    res = fetch_dataset("stanford40", tmp_path / "d", base_url=server.url, timeout=5, progress=False)
    root = tmp_path / "d" / "Stanford40"
    assert res.root == root
    assert sorted(p.name for p in root.iterdir()) == ["ImageSplits", "JPEGImages", "XMLAnnotations"]
    assert (root / "ImageSplits" / "actions.txt").exists()
    assert len(res.files) == 3
    assert f"conceptrank extract --model resnet18 --weights IMAGENET1K_V1 --layer layer4 --dataset {root}" in res.summary()


# --------------------------------------------------------------------------- resume


def test_resume_partial_download_with_range(tmp_path, server):
    data = _broden_zip(tmp_path)
    server.add("broden1_224.zip", data)
    to = tmp_path / "data"
    to.mkdir()
    half = len(data) // 2
    (to / "broden1_224.zip.part").write_bytes(data[:half])

    res = fetch_dataset("broden", to, base_url=server.url, timeout=5, progress=False)
    assert ("/mirror/broden1_224.zip", f"bytes={half}-") in server.requests
    assert res.resumed and res.downloaded_bytes == len(data) - half
    assert (to / "broden1_224.zip").read_bytes() == data
    assert (res.root / "index.csv").exists()
    assert json.loads((to / MANIFEST_NAME).read_text())["files"]["broden1_224.zip"]["sha256"] == hashlib.sha256(data).hexdigest()


def test_server_ignoring_range_restarts_cleanly(tmp_path, server):
    data = _broden_zip(tmp_path)
    server.add("f.zip", data)
    server.honor_range = False
    dest = tmp_path / "f.zip"
    dest.with_name("f.zip.part").write_bytes(b"garbage that is not a prefix" * 10)
    path, n, resumed = download(server.url + "f.zip", dest, sha256=hashlib.sha256(data).hexdigest(), timeout=5, progress=False)
    assert server.requests[-1][1] is not None  # a Range was asked for ...
    assert not resumed and n == len(data)  # ... answered with 200: started over
    assert path == dest and dest.read_bytes() == data
    assert not dest.with_name("f.zip.part").exists()


def test_complete_part_answered_416_is_finished(tmp_path, server):
    data = b"0123456789" * 100
    server.add("f.bin", data)
    dest = tmp_path / "f.bin"
    dest.with_name("f.bin.part").write_bytes(data)
    path, n, _ = download(server.url + "f.bin", dest, size=len(data), timeout=5, progress=False)
    assert n == 0 and path.read_bytes() == data


def test_cut_connection_keeps_part_and_rerun_resumes(tmp_path, server):
    data = bytes(range(256)) * 64
    server.add("f.bin", data)
    server.truncate_after = 5000
    dest = tmp_path / "f.bin"
    with pytest.raises(DownloadError, match="closed the connection"):
        download(server.url + "f.bin", dest, timeout=5, progress=False)
    assert dest.with_name("f.bin.part").stat().st_size == 5000 and not dest.exists()
    server.truncate_after = None
    _, n, resumed = download(server.url + "f.bin", dest, timeout=5, progress=False)
    assert resumed and n == len(data) - 5000 and dest.read_bytes() == data


# --------------------------------------------------------------------------- checksums


def test_checksum_mismatch_deletes_bad_file(tmp_path, server):
    server.add("f.bin", b"the real content")
    dest = tmp_path / "f.bin"
    with pytest.raises(ConceptrankError, match="checksum mismatch") as ei:
        download(server.url + "f.bin", dest, sha256="0" * 64, timeout=5, progress=False)
    assert "deleted" in str(ei.value) and "f.bin" in str(ei.value)
    assert not dest.exists() and not dest.with_name("f.bin.part").exists()
    with pytest.raises(ConceptrankError, match="has 16 bytes but f.bin should have 3"):
        download(server.url + "f.bin", dest, size=3, timeout=5, progress=False)
    assert not dest.exists() and not dest.with_name("f.bin.part").exists()


def test_recorded_digest_is_verified_on_later_runs(tmp_path, server):
    data = _broden_zip(tmp_path)
    server.add("broden1_224.zip", data)
    to = tmp_path / "data"
    fetch_dataset("broden", to, base_url=server.url, timeout=5, progress=False)
    # the extracted folder goes away and the kept archive gets corrupted
    import shutil

    shutil.rmtree(to / "broden1_224")
    (to / "broden1_224.zip").write_bytes(data[:-10] + b"0123456789")
    with pytest.raises(ConceptrankError, match="checksum mismatch") as ei:
        fetch_dataset("broden", to, base_url=server.url, timeout=5, progress=False)
    assert MANIFEST_NAME in str(ei.value)
    assert not (to / "broden1_224.zip").exists() and not (to / "broden1_224").exists()
    # a rerun downloads the good file again and it verifies against the record
    res = fetch_dataset("broden", to, base_url=server.url, timeout=5, progress=False)
    assert (res.root / "index.csv").exists() and res.downloaded_bytes == len(data)


# --------------------------------------------------------------------------- extraction safety


@pytest.mark.parametrize("evil", ["../evil.txt", "broden1_224/../../evil.txt", "/tmp/conceptrank-evil.txt"])
def test_zip_slip_member_is_rejected(tmp_path, server, evil):
    data = _zip_bytes(tmp_path, {"broden1_224/index.csv": b"image\n", evil: b"pwned"})
    server.add("broden1_224.zip", data)
    to = tmp_path / "deep" / "data"
    with pytest.raises(ConceptrankError, match="zip-slip"):
        fetch_dataset("broden", to, base_url=server.url, timeout=5, progress=False)
    assert not (to / "broden1_224").exists()
    assert not (tmp_path / "deep" / "evil.txt").exists() and not (to / "evil.txt").exists()
    assert [p for p in to.iterdir() if ".extracting-" in p.name] == []
    assert not (to / MANIFEST_NAME).exists()  # an untrustworthy archive is not recorded


def test_archive_without_marker_or_truncated_is_refused(tmp_path):
    to = tmp_path / "data"
    to.mkdir()
    (to / "broden1_224.zip").write_bytes(_zip_bytes(tmp_path, {"something/else.txt": b"x"}))
    with pytest.raises(ConceptrankError, match="index.csv"):
        fetch_dataset("broden", to, timeout=5, progress=False)
    assert not (to / "broden1_224").exists()
    (to / "broden1_224.zip").write_bytes(_broden_zip(tmp_path)[:-100])
    with pytest.raises(ConceptrankError, match="not a complete zip"):
        fetch_dataset("broden", to, timeout=5, progress=False)
    assert not (to / "broden1_224").exists()


def test_incomplete_earlier_extraction_is_replaced(tmp_path):
    to = tmp_path / "data"
    (to / "broden1_224" / "images").mkdir(parents=True)
    (to / "broden1_224" / "images" / "stale.jpg").write_bytes(b"half")
    (to / "broden1_224.zip").write_bytes(_broden_zip(tmp_path))
    res = fetch_dataset("broden", to, timeout=5, progress=False)
    assert (res.root / "index.csv").exists()
    assert sorted(p.name for p in (res.root / "images").iterdir()) == ["a.jpg"]


def test_extract_archive_flat_layout(tmp_path):
    archive = tmp_path / "x.zip"
    archive.write_bytes(_zip_bytes(tmp_path, {"index.csv": b"i\n", "images/a.jpg": b"a"}))
    out = extract_archive(archive, tmp_path / "out" / "broden1_224", "index.csv", progress=False)
    assert (out / "index.csv").exists() and (out / "images" / "a.jpg").exists()


# --------------------------------------------------------------------------- offline


def test_no_network_fails_fast_with_manual_instructions(tmp_path):
    base = f"http://127.0.0.1:{_closed_port()}/"
    to = tmp_path / "data"
    t0 = time.monotonic()
    with pytest.raises(ConceptrankError) as ei:
        fetch_dataset("broden", to, base_url=base, timeout=5, progress=False)
    assert time.monotonic() - t0 < 5
    msg = str(ei.value)
    assert isinstance(ei.value, DownloadError)
    assert base + "broden1_224.zip" in msg
    assert "http://netdissect.csail.mit.edu/data/broden1_224.zip" in msg  # the official address to fetch elsewhere
    assert str((to / "broden1_224.zip").absolute()) in msg  # where to put the archive
    assert str((to / "broden1_224" / "index.csv").absolute()) in msg  # or the extracted layout
    assert "refused" in msg
    assert not (to / "broden1_224").exists()


def test_hung_server_times_out(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # accepts connections, never answers
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        base = f"http://127.0.0.1:{s.getsockname()[1]}/"
        t0 = time.monotonic()
        with pytest.raises(DownloadError, match="timeout") as ei:
            download(base + "f.zip", tmp_path / "f.zip", timeout=0.5, progress=False)
        assert time.monotonic() - t0 < 3
        assert str(tmp_path / "f.zip") in str(ei.value)


def test_unresolvable_host_message(tmp_path, monkeypatch):
    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)  # nothing leaves the machine
    with pytest.raises(DownloadError, match="could not be resolved") as ei:
        fetch_dataset("stanford40", tmp_path / "d", timeout=5, progress=False)
    msg = str(ei.value)
    for p in ("JPEGImages", "ImageSplits", "XMLAnnotations"):
        assert f"http://vision.stanford.edu/Datasets/Stanford40_{p}.zip" in msg
        assert str(tmp_path / "d" / f"Stanford40_{p}.zip") in msg
    assert str(tmp_path / "d" / "Stanford40" / "ImageSplits" / "actions.txt") in msg


def test_hanging_name_resolution_is_bounded_by_timeout(tmp_path, monkeypatch):
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: time.sleep(3))  # a resolver that hangs
    t0 = time.monotonic()
    with pytest.raises(DownloadError, match="resolving the host name"):
        fetch_dataset("broden", tmp_path / "d", timeout=0.3, progress=False)
    assert time.monotonic() - t0 < 2


def test_http_404_is_a_clear_error(tmp_path, server):
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch_dataset("broden", tmp_path / "d", variant="227", base_url=server.url, timeout=5, progress=False)


def test_manually_placed_archive_is_extracted_without_network(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the network must not be used")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    to = tmp_path / "data"
    to.mkdir()
    data = _broden_zip(tmp_path, "227")
    (to / "broden1_227.zip").write_bytes(data)
    res = fetch_dataset("broden", to, variant="227", timeout=5, progress=False)
    assert (to / "broden1_227" / "index.csv").exists() and res.downloaded_bytes == 0
    rec = json.loads((to / MANIFEST_NAME).read_text())["files"]["broden1_227.zip"]
    assert rec["source"] == "placed" and rec["sha256"] == hashlib.sha256(data).hexdigest()


def test_manually_extracted_folder_is_used_as_is(tmp_path, monkeypatch):
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: pytest.fail("network used"))
    root = tmp_path / "d" / "Stanford40"
    for sub in ("JPEGImages", "XMLAnnotations", "ImageSplits"):
        (root / sub).mkdir(parents=True)
    (root / "ImageSplits" / "actions.txt").write_text("action_name\n")
    res = fetch_dataset("stanford40", tmp_path / "d", timeout=5, progress=False)
    assert res.root == root and res.files == () and res.downloaded_bytes == 0


# --------------------------------------------------------------------------- CLI


def test_cli_fetch_prints_summary(tmp_path, server):
    from typer.testing import CliRunner

    from conceptrank.cli import app

    server.add("broden1_224.zip", _broden_zip(tmp_path))
    to = tmp_path / "cli"
    result = CliRunner().invoke(app, ["fetch", "broden", "--to", str(to), "--base-url", server.url, "--timeout", "5"])
    assert result.exit_code == 0, result.output
    assert f"--probe {(to / 'broden1_224').absolute()}" in result.stdout
    assert "conceptrank dissect" in result.stdout
    assert (to / "broden1_224" / "index.csv").exists()


def test_cli_fetch_offline_is_one_clear_error(tmp_path):
    from typer.testing import CliRunner

    from conceptrank.cli import app

    base = f"http://127.0.0.1:{_closed_port()}/"
    result = CliRunner().invoke(app, ["fetch", "broden", "--to", str(tmp_path / "x"), "--base-url", base, "--timeout", "3"])
    assert result.exit_code == 2
    assert "error: could not download broden" in result.output
    assert "Traceback" not in result.output
