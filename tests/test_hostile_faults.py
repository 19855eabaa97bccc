"""Hostile input, part 2: faults. Full and read-only disks, kill -9, two writers, stale caches, and
half-written or foreign run folders (part 1 is ``test_hostile.py``).

==========================================  ==================================================
case                                        behaviour
==========================================  ==================================================
too little free space for the feature       one line: how much, where, ``--store float16``;
cache (dissect, also ``--store float16``)    previous outputs byte-identical
no space when reserving a memmap's blocks   DiskSpaceError (never a ``Bus error`` later)
ENOSPC while extract writes (fault-         one line naming the file; previous extract.json and
injected writer)                            activations.npz byte-identical, no temp files left
read-only ``--out`` (EROFS)                  one line naming the file, "choose a writable --out"
ENOSPC while report writes a thumbnail      one line; previous report and all its files intact
kill -9 during ``report``                    previous report and all its files intact; the next
                                            report publishes and removes the staging folder
a user's file among the thumbnails          kept (report deletes only what it recorded)
second writer of one ``--out``               one line naming the holder's pid; lock freed on kill
two same-size files swapped, mtimes kept    new fingerprint (content hashed where cheap, or
                                            ``CONCEPTRANK_VERIFY_CONTENT=1``)
run folder: no rank.json / foreign folder   report and explain refuse, naming what is missing
output shorter than its manifest records    refused naming the file and both sizes
truncated .npz in a run folder              refused naming the file (report, explain, evaluate)
images.csv rows != rank.json n_images       refused naming both counts
==========================================  ==================================================
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
import torch
from test_hostile import error_line
from test_report import local_refs, make_tiny_run, parse_html
from typer.testing import CliRunner

from conceptrank.cli import app
from conceptrank.errors import DiskSpaceError, FolderBusyError, RunFolderError
from conceptrank.io import cache
from conceptrank.io.runfolder import check_run_folder
from conceptrank.nn.models import save_model_card
from conceptrank.nn.nets import ConceptNet
from conceptrank.report import write_report

FIX = Path(__file__).resolve().parent / "fixtures"
B224 = FIX / "broden_quirks" / "broden1_224"
S40 = FIX / "stanford40_quirks" / "Stanford40"
SRC = Path(__file__).resolve().parents[1] / "src"
runner = CliRunner()


@pytest.fixture
def card(tmp_path) -> Path:
    torch.manual_seed(0)
    save_model_card(tmp_path / "card", ConceptNet(num_classes=3, width=4), "conceptnet", 3, (32, 32),
                    (0.5,) * 3, (0.25,) * 3, arch_kwargs={"width": 4})
    return tmp_path / "card"


def _snapshot(folder: Path) -> dict[str, str]:
    """SHA-256 of every file below ``folder`` (relative POSIX path → digest)."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _report_files(run: Path) -> dict[str, str]:
    """report.html and every local file it links to, with their digests (all must exist)."""
    doc = parse_html((run / "report.html").read_text(encoding="utf-8"))
    files = {"report.html": hashlib.sha256((run / "report.html").read_bytes()).hexdigest()}
    for ref in local_refs(doc):
        p = run / unquote(urlsplit(ref).path)
        assert p.is_file(), ref
        files[ref] = hashlib.sha256(p.read_bytes()).hexdigest()
    return files


def _usage(free: int):
    return lambda path: shutil._ntuple_diskusage(10**12, 10**12 - free, free)


# -- disk space -------------------------------------------------------------------------------------
def test_ensure_free_space_says_how_much_where_and_the_way_out(tmp_path, monkeypatch):
    monkeypatch.setattr(cache.shutil, "disk_usage", _usage(5 << 20))
    with pytest.raises(DiskSpaceError) as e:
        cache.ensure_free_space(tmp_path / "new" / "f.npy", 100 << 20, "the feature cache", "pass --store float16")
    msg = str(e.value)
    assert f"not enough free space for the feature cache: needs 132.0 MiB at {tmp_path}, only 5.0 MiB free" in msg
    assert msg.endswith("; pass --store float16 (previous outputs are kept)")
    monkeypatch.setattr(cache.shutil, "disk_usage", _usage(200 << 20))
    cache.ensure_free_space(tmp_path / "new" / "f.npy", 100 << 20, "the feature cache")  # enough: no error


def test_memmap_blocks_are_reserved_or_disk_full_is_an_error(tmp_path, monkeypatch):
    mm = cache.create_memmap(tmp_path / "a.npy", np.float32, (4, 8), "test")
    assert mm.shape == (4, 8) and os.stat(tmp_path / "a.npy").st_blocks * 512 >= 4 * 8 * 4

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache.os, "posix_fallocate", full)
    with pytest.raises(DiskSpaceError, match=r"cannot write .*b.npy: No space left on device; free some space"):
        cache.create_memmap(tmp_path / "b.npy", np.float32, (4, 8), "test")


def _dissect(card: Path, out: Path, *extra: str) -> list[str]:
    return ["dissect", "--model", str(card), "--layer", "layer4", "--probe", str(B224), "--out", str(out),
            "--workers", "0", "--batch-size", "4", "--device", "cpu", *extra]


def test_dissect_without_room_for_the_feature_cache_keeps_previous_outputs(card, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real, asked = cache.ensure_free_space, []

    def recording(path, nbytes, what, hint=""):
        asked.append((what, nbytes, hint))
        return real(path, nbytes, what, hint)

    monkeypatch.setattr(cache, "ensure_free_space", recording)
    for store in ("float16", "float32"):
        r = runner.invoke(app, _dissect(card, out, "--store", store))
        assert r.exit_code == 0, r.output
    feature = [(n, h) for w, n, h in asked if w == "the feature cache of layer 'layer4'"]
    assert len(feature) == 2 and feature[1][0] == 2 * feature[0][0]  # float16 is half the estimate
    assert "pass --store float16 (half the bytes)" in feature[0][1]
    before = _snapshot(out)
    monkeypatch.setattr(cache.shutil, "disk_usage", _usage(1 << 20))
    r = runner.invoke(app, _dissect(card, out, "--quantile", "0.01"))
    error_line(r, "not enough free space for the ", f"at {out}", "only 1.0 MiB free", "(previous outputs are kept)")
    assert _snapshot(out) == before  # nothing lost, nothing half-written


def _fake_ranking_inputs(folder: Path) -> tuple[Path, Path]:
    from conceptrank.io.tally_csv import format_tally

    folder.mkdir(parents=True, exist_ok=True)
    n, U = 24, 4
    cache.save_npz(folder / "activations.npz", mean=np.random.default_rng(0).random((n, U)).astype(np.float32),
                   images=np.array([f"c{i % 2}/{i}.jpg" for i in range(n)]),
                   classes=np.array([f"c{i % 2}" for i in range(n)]),
                   splits=np.array([("train", "test")[(i // 2) % 2] for i in range(n)]))
    best = np.ones((U, 1), int)
    z = np.zeros_like(best)
    (folder / "tally.csv").write_text(format_tally(["object"], best, z, z, z, np.full((U, 1), 0.1), ["", "dog"]))
    return folder / "activations.npz", folder / "tally.csv"


def test_extract_disk_full_mid_write_keeps_previous_outputs(card, tmp_path, monkeypatch):
    out = tmp_path / "ext"
    args = ["extract", "--model", str(card), "--layer", "layer4", "--dataset", str(S40), "--out", str(out),
            "--workers", "0", "--device", "cpu"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    before = _snapshot(out)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache.os, "fsync", full)  # every atomic write now fails as on a full disk
    r = runner.invoke(app, args + ["--resize", "40"])
    error_line(r, "No space left on device", "free some space or choose an --out on a disk with more room")
    after = _snapshot(out)
    assert {k: after.get(k) for k in ("extract.json", "activations.npz")} == \
           {k: before[k] for k in ("extract.json", "activations.npz")}
    assert not [p for p in out.rglob("*.tmp")]


def test_read_only_out_is_one_line(tmp_path, monkeypatch):
    act, tally = _fake_ranking_inputs(tmp_path / "in")

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "rank"))

    monkeypatch.setattr(cache.tempfile, "mkstemp", read_only)
    r = runner.invoke(app, ["rank", "--activations", str(act), "--tally", str(tally), "--out", str(tmp_path / "rank")])
    error_line(r, f"cannot write {tmp_path / 'rank'}: Read-only file system; choose a writable --out")


# -- report -----------------------------------------------------------------------------------------
@pytest.fixture
def reported(tmp_path) -> Path:
    run = make_tiny_run(tmp_path)
    write_report(run)
    (run / "figures" / "units" / "my_notes.txt").write_text("mine")  # a user's file among the thumbnails
    return run


def test_report_disk_full_keeps_previous_report(reported, monkeypatch):
    from conceptrank.report import visuals

    before = _report_files(reported)
    real, calls = visuals.save_jpeg, []

    def fills_up(rgb, path, quality=85):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(rgb, path, quality)

    monkeypatch.setattr(visuals, "save_jpeg", fills_up)
    r = runner.invoke(app, ["report", "--run", str(reported)])
    error_line(r, "No space left on device")
    assert _report_files(reported) == before
    assert (reported / "figures" / "units" / "my_notes.txt").read_text() == "mine"


def test_kill_9_during_report_keeps_previous_report(reported):
    before = _report_files(reported)
    env = {**os.environ, "PYTHONPATH": str(SRC), "CONCEPTRANK_QUIET": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "conceptrank.cli", "report", "--run", str(reported)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = reported / ".report-staging"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if staging.is_dir() and any(p.suffix == ".jpg" for p in staging.rglob("*")):
                break
            time.sleep(0.005)
        assert proc.poll() is None, "report finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert _report_files(reported) == before  # every file of the previous report, byte for byte
    write_report(reported)  # the next report cleans up after the killed one
    assert not staging.exists()
    _report_files(reported)
    assert (reported / "figures" / "units" / "my_notes.txt").read_text() == "mine"


# -- one writer per folder --------------------------------------------------------------------------
def test_second_writer_exits_naming_the_holder(tmp_path):
    act, tally = _fake_ranking_inputs(tmp_path / "in")
    out = tmp_path / "rank"
    args = ["rank", "--activations", str(act), "--tally", str(tally), "--out", str(out)]
    with cache.folder_lock(out):
        r = runner.invoke(app, args)
        error_line(r, f"{out} is being written by another conceptrank process (pid {os.getpid()})",
                   "wait for it to finish or choose another --out")
        with pytest.raises(FolderBusyError):
            with cache.folder_lock(out):
                pass
    assert not (out / "rank.json").exists()
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output


def test_lock_of_a_killed_writer_is_released(tmp_path):
    out = tmp_path / "out"
    code = ("import sys, time; sys.path.insert(0, sys.argv[2]); from conceptrank.io.cache import folder_lock\n"
            "with folder_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out), str(SRC)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(FolderBusyError, match=rf"pid {proc.pid}\)"):
            with cache.folder_lock(out):
                pass
    finally:
        proc.kill()
        proc.wait(30)
    with cache.folder_lock(out):  # the kernel dropped the dead writer's lock
        assert (out / ".conceptrank.lock").read_text().strip() == str(os.getpid())


# -- cache keys -------------------------------------------------------------------------------------
def test_swapped_same_size_files_with_restored_mtimes_change_the_fingerprint(tmp_path, monkeypatch):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(b"AAAA")
    b.write_bytes(b"BBBB")
    stats = {p: os.stat(p) for p in (a, b)}
    before = cache.files_fingerprint(tmp_path, ["a.png", "b.png"])
    before_stat = cache.files_fingerprint(tmp_path, ["a.png", "b.png"], content=False)
    a.write_bytes(b"BBBB")
    b.write_bytes(b"AAAA")
    for p, st in stats.items():
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cache.files_fingerprint(tmp_path, ["a.png", "b.png"]) != before  # small inputs: bytes hashed
    assert cache.files_fingerprint(tmp_path, ["a.png", "b.png"], content=False) == before_stat  # the documented limit
    monkeypatch.setattr(cache, "CONTENT_HASH_MAX_BYTES", 0)  # "large" inputs: size + mtime ...
    assert cache.files_fingerprint(tmp_path, ["a.png", "b.png"]) == before_stat
    monkeypatch.setenv("CONCEPTRANK_VERIFY_CONTENT", "1")  # ... unless --verify-content
    assert cache.files_fingerprint(tmp_path, ["a.png", "b.png"]) != before_stat


# -- run folders ------------------------------------------------------------------------------------
def _add_cache_section(run: Path) -> None:
    rj = json.loads((run / "rank" / "rank.json").read_text())
    names = ["local_concepts.csv", "global_concepts.csv", "images.csv", "svm.npz"]
    rj["cache"] = {"outputs": cache.output_digests(run / "rank", names)}
    rj["n_images"] = 12
    (run / "rank" / "rank.json").write_text(json.dumps(rj))


@pytest.mark.parametrize("damage,message", [
    (lambda run: (run / "rank" / "rank.json").unlink(), "rank.json is missing: rank/ was half-written"),
    (lambda run: shutil.rmtree(run / "rank"), "rank is missing (run `conceptrank rank` into it"),
    (lambda run: (run / "rank" / "global_concepts.csv").unlink(), "global_concepts.csv is missing"),
    (lambda run: (run / "rank" / "local_concepts.csv").write_text("image,class\n"),
     "local_concepts.csv has 12 bytes, its manifest recorded"),
    (lambda run: (run / "rank" / "svm.npz").write_bytes((run / "rank" / "svm.npz").read_bytes()[:100]),
     "svm.npz has 100 bytes, its manifest recorded"),
    (lambda run: (run / "dissect" / "top_images.npz").write_bytes(b"PK\x03\x04cut"),
     "top_images.npz is not a readable .npz archive"),
    (lambda run: (run / "rank" / "images.csv").write_text("image,class,split,n_concepts\nx,y,test,1\n"),
     "images.csv has 1 rows, rank.json records 12 images"),
])
def test_incomplete_run_folder_is_refused_and_previous_report_kept(reported, damage, message):
    _add_cache_section(reported)
    before = {k: v for k, v in _snapshot(reported).items() if k.startswith("figures/") or k == "report.html"}
    if "images.csv has 1 rows" in message:  # keep the recorded sizes true, so only the row count is wrong
        damage(reported)
        _add_cache_section(reported)
    else:
        damage(reported)
    r = runner.invoke(app, ["report", "--run", str(reported)])
    error_line(r, "is not a complete run folder for a report", message)
    assert {k: v for k, v in _snapshot(reported).items() if k.startswith("figures/") or k == "report.html"} == before


def test_foreign_folder_is_not_a_report(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"x")
    r = runner.invoke(app, ["report", "--run", str(tmp_path)])
    error_line(r, "rank is missing")
    assert not (tmp_path / "report.html").exists() and not (tmp_path / "figures").exists()


def test_explain_needs_extract_and_rank(reported):
    shutil.rmtree(reported / "extract")
    with pytest.raises(RunFolderError, match=r"complete run folder for explain: .*extract is missing"):
        check_run_folder(reported, ("rank", "extract"), "explain")
    r = runner.invoke(app, ["explain", "--run", str(reported), "x.jpg"])
    error_line(r, "extract is missing")


def test_truncated_npz_to_evaluate_is_one_line(tmp_path):
    act, tally = _fake_ranking_inputs(tmp_path / "in")
    r = runner.invoke(app, ["rank", "--activations", str(act), "--tally", str(tally), "--out", str(tmp_path / "rank")])
    assert r.exit_code == 0, r.output
    svm = tmp_path / "rank" / "svm.npz"
    whole = svm.read_bytes()
    svm.write_bytes(whole[:64])
    r = runner.invoke(app, ["evaluate", "--ranking", str(tmp_path / "rank"), "--permutations", "10"])
    error_line(r, str(svm))
    svm.write_bytes(whole)
    act.write_bytes(act.read_bytes()[:64])
    r = runner.invoke(app, ["evaluate", "--ranking", str(tmp_path / "rank"), "--permutations", "10"])
    error_line(r, str(act))
