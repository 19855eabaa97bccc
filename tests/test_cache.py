"""Cache and resume: stage keys and manifests, reuse on identical inputs, recompute on any change,
byte-identical resume after SIGKILL mid-stage, and CUDA out-of-memory handling."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from broden_fixture import make_planted_probe, planted_model
from PIL import Image

from conceptrank.errors import ConceptrankError
from conceptrank.io import cache
from conceptrank.io.broden import BrodenDataset
from conceptrank.nn.models import LoadedModel, save_model_card
from conceptrank.nn.nets import ConceptNet
from conceptrank.stages.dissect import DissectConfig, run_dissect
from conceptrank.stages.extract import ExtractConfig, run_extract

CFG = DissectConfig(workers=0, batch_size=4, progress=False)
ECFG = ExtractConfig(workers=0, batch_size=4, device="cpu")
DISSECT_OUT = ("tally.csv", "thresholds.npy", "top_images.npz", "tally_counts.npz")


# -- helpers --------------------------------------------------------------------------------------
def _card(folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    save_model_card(folder, ConceptNet(num_classes=3, width=4), "conceptnet", 3, (32, 32), (0.5,) * 3, (0.25,) * 3,
                    arch_kwargs={"width": 4})
    return folder


def _targets(root: Path, per_class: int = 5) -> Path:
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / c / f"{i:02d}.png")
    return root


def _bytes(folder: Path, names) -> dict[str, bytes]:
    return {n: (folder / n).read_bytes() for n in names}


PAUSED_CLI = Path(__file__).resolve().parent / "paused_cli.py"


def _start(args, pause_at: dict | None = None) -> subprocess.Popen:
    """The CLI in a subprocess (checkpoints after every batch); with ``pause_at`` it stops for good
    after writing the checkpoint whose metadata has those values."""
    env = {**os.environ, "CONCEPTRANK_CHECKPOINT_SECONDS": "0", "PAUSE_AT": json.dumps(pause_at or {})}
    return subprocess.Popen([sys.executable, str(PAUSED_CLI), *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill_at_checkpoint(proc: subprocess.Popen, scratch: Path, want: dict, timeout: float = 180) -> None:
    """SIGKILL ``proc`` once a checkpoint under ``scratch`` holds the metadata ``want``."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for p in scratch.glob("*/checkpoint.npz"):
            try:
                with np.load(p, allow_pickle=False) as z:
                    meta = json.loads(str(z["__meta__"]))
            except (OSError, ValueError, KeyError, EOFError):
                continue
            if all(meta.get(k) == v for k, v in want.items()):
                proc.send_signal(signal.SIGKILL)
                return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"no checkpoint with {want} under {scratch} within {timeout} s")


def _finish(proc: subprocess.Popen, expect_kill=False) -> str:
    """Wait for ``proc``; check it was SIGKILLed (or succeeded); return its stderr."""
    out, err = proc.communicate(timeout=180)
    if expect_kill:
        assert proc.returncode == -signal.SIGKILL, (proc.returncode, out, err)
    else:
        assert proc.returncode == 0, (out, err)
    return err


def _cli(args) -> str:
    return _finish(_start(args))


def _cli_killed(args, scratch: Path, at: dict) -> str:
    proc = _start(args, at)
    _kill_at_checkpoint(proc, scratch, at)
    return _finish(proc, expect_kill=True)


def _copy_model(model: LoadedModel, fingerprint: str) -> LoadedModel:
    import dataclasses

    return dataclasses.replace(model, fingerprint=fingerprint)


# -- cache.py -------------------------------------------------------------------------------------
def test_stage_key_covers_stage_fingerprints_params():
    base = cache.stage_key("dissect", {"model": "m", "layer": "a"}, {"q": 0.005})
    assert base == cache.stage_key("dissect", {"layer": "a", "model": "m"}, {"q": 0.005})  # order-free
    assert len({base,
                cache.stage_key("extract", {"model": "m", "layer": "a"}, {"q": 0.005}),
                cache.stage_key("dissect", {"model": "m", "layer": "b"}, {"q": 0.005}),
                cache.stage_key("dissect", {"model": "m2", "layer": "a"}, {"q": 0.005}),
                cache.stage_key("dissect", {"model": "m", "layer": "a"}, {"q": 0.01})}) == 5


def test_save_npz_is_deterministic_and_loadable(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    cache.save_npz(tmp_path / "a.npz", x=a, s=np.array(["é", "b"]))
    time.sleep(0.01)
    cache.save_npz(tmp_path / "b.npz", x=a, s=np.array(["é", "b"]))
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    with np.load(tmp_path / "a.npz", allow_pickle=False) as z:
        np.testing.assert_array_equal(z["x"], a)
        assert z["s"].tolist() == ["é", "b"]
    assert (tmp_path / "a.npz").stat().st_mode & 0o777 == 0o666 & ~cache._umask()  # not mkstemp's 0600


def test_manifest_reuse_needs_key_and_intact_outputs(tmp_path):
    (tmp_path / "o.txt").write_text("hello")
    fps, params = {"data": "d1"}, {"q": 1}
    key = cache.stage_key("s", fps, params)
    cache.atomic_write_json(tmp_path / "m.json", {"cache": cache.manifest_section("s", key, fps, params, tmp_path, ["o.txt"])})
    m = cache.Manifest.read(tmp_path / "m.json")
    assert m.reusable(key) and cache.lookup(tmp_path / "m.json", key) is not None
    assert m.check(cache.stage_key("s", {"data": "d2"}, params)) == "inputs changed"
    assert m.changes({"data": "d2"}, {"q": 2}) == ["data", "q"]
    (tmp_path / "o.txt").write_text("hellO")  # same size, other bytes
    assert "changed" in m.check(key)
    (tmp_path / "o.txt").unlink()
    assert "missing" in m.check(key)
    (tmp_path / "m.json").write_text("{not json")
    assert cache.Manifest.read(tmp_path / "m.json") is None


def test_checkpoint_round_trip_and_key(tmp_path):
    p = tmp_path / "ck.npz"
    cache.write_checkpoint(p, {"key": "k1", "next": 8}, {"a/b": np.arange(3)})
    meta, arrays = cache.load_checkpoint(p, "k1")
    assert meta["next"] == 8 and arrays["a/b"].tolist() == [0, 1, 2]
    assert cache.load_checkpoint(p, "k2") is None
    p.write_bytes(b"garbage")
    assert cache.load_checkpoint(p, "k1") is None


# -- dissect: reuse and invalidation --------------------------------------------------------------
def test_dissect_reuses_and_recomputes_on_any_change(tmp_path):
    probe = make_planted_probe(tmp_path / "probe", n=8)
    ds = BrodenDataset(probe)
    out = tmp_path / "out"
    (first,) = run_dissect(planted_model(), None, ["units"], ds, out, CFG)
    assert not first.reused and not (out / ".features").exists()
    before = _bytes(out, DISSECT_OUT)
    (again,) = run_dissect(planted_model(), None, ["units"], BrodenDataset(probe), out, CFG)
    assert again.reused and "reused cached result" in again.summary()
    np.testing.assert_array_equal(again.iou, first.iou)
    np.testing.assert_array_equal(again.best_label, first.best_label)
    np.testing.assert_array_equal(again.thresholds, first.thresholds)
    assert again.counts == first.counts and _bytes(out, DISSECT_OUT) == before
    # batch size, workers, progress are not part of the key
    (same,) = run_dissect(planted_model(), None, ["units"], ds, out, DissectConfig(workers=0, batch_size=3, progress=False))
    assert same.reused

    def recomputed(model=None, cfg=CFG, ds_=None, **kw):
        (r,) = run_dissect(model or planted_model(), None, ["units"], ds_ or BrodenDataset(probe), out, cfg, **kw)
        assert not r.reused
        (r2,) = run_dissect(model or planted_model(), None, ["units"], ds_ or BrodenDataset(probe), out, cfg, **kw)
        assert r2.reused
        return r

    recomputed(cfg=DissectConfig(workers=0, batch_size=4, progress=False, quantile=0.01))
    recomputed(cfg=DissectConfig(workers=0, batch_size=4, progress=False, iou_threshold=0.1))
    recomputed(cfg=DissectConfig(workers=0, batch_size=4, progress=False, preprocess="netdissect"))
    recomputed(cfg=DissectConfig(workers=0, batch_size=4, progress=False, store="float16"))
    recomputed(cfg=DissectConfig(workers=0, batch_size=4, progress=False, stability_quantile=0.02))
    recomputed(ds_=BrodenDataset(probe, ["object", "part"]))
    recomputed(model=_copy_model(planted_model(), "other-weights"))
    r = recomputed(thresholds={"units": np.full(6, 0.5)})
    np.testing.assert_array_equal(r.thresholds, np.full(6, 0.5))
    recomputed(thresholds={"units": np.full(6, 0.25)})
    recomputed()  # back to the defaults: recomputed, never the stale 0.25 thresholds
    # probe data: an image rewritten (same index), a label table edited
    img = probe / "images" / "sub" / "img003.png"
    Image.open(img).transpose(Image.FLIP_LEFT_RIGHT).save(img)
    recomputed()
    lab = probe / "label.csv"
    lab.write_text(lab.read_text().replace("redthing", "redthing2"))
    r = recomputed()
    assert "redthing2" in r.label_names
    # a tampered output is noticed
    (out / "thresholds.npy").write_bytes((out / "thresholds.npy").read_bytes()[:-1] + b"\x01")
    recomputed()


def test_layers_never_share_a_cache(tmp_path):
    probe = make_planted_probe(tmp_path / "probe", n=8)
    ds = BrodenDataset(probe)
    (a,) = run_dissect(planted_model(), None, ["units"], ds, tmp_path / "one", CFG)
    (b,) = run_dissect(planted_model(), None, ["pool"], ds, tmp_path / "one", CFG)  # same folder, other layer
    assert not b.reused and len(b.thresholds) == 4
    assert json.loads((tmp_path / "one" / "dissect.json").read_text())["layer"] == "pool"
    res = run_dissect(planted_model(), None, ["units", "pool"], ds, tmp_path / "multi", CFG)
    assert [r.reused for r in res] == [False, False]
    res = run_dissect(planted_model(), None, ["pool", "units"], ds, tmp_path / "multi", CFG)
    assert [r.layer for r in res] == ["pool", "units"] and all(r.reused for r in res)
    assert len(res[0].thresholds) == 4 and len(res[1].thresholds) == 6
    np.testing.assert_array_equal(res[1].iou, a.iou)
    # swap the two layers' outputs: each manifest names the other layer's key -> both recompute
    m = tmp_path / "multi"
    (m / "units").rename(m / "tmp")
    (m / "pool").rename(m / "units")
    (m / "tmp").rename(m / "pool")
    res = run_dissect(planted_model(), None, ["units", "pool"], ds, m, CFG)
    assert [r.reused for r in res] == [False, False]
    assert len(res[0].thresholds) == 6 and len(res[1].thresholds) == 4


# -- extract: reuse and invalidation --------------------------------------------------------------
def test_extract_reuses_and_recomputes_on_any_change(tmp_path):
    data = _targets(tmp_path / "data")
    card = _card(tmp_path / "card")
    out = tmp_path / "out"
    a = run_extract(str(card), None, "layer3", data, out, ECFG)
    assert not a.reused and not (out / ".partial").exists()
    before = (out / "activations.npz").read_bytes()
    b = run_extract(str(card), None, "layer3", data, out, ExtractConfig(workers=0, batch_size=3, device="cpu"))
    assert b.reused and "reused" in b.summary()
    assert (b.n_images, b.n_units, b.skipped) == (a.n_images, a.n_units, a.skipped)
    assert (out / "activations.npz").read_bytes() == before

    def recomputed(layer="layer3", cfg=ECFG, model=str(card), data_=data):
        r = run_extract(model, None, layer, data_, out, cfg)
        assert not r.reused
        assert run_extract(model, None, layer, data_, out, cfg).reused
        return r

    assert recomputed(layer="layer2").n_units == 8
    recomputed(cfg=ExtractConfig(workers=0, batch_size=4, device="cpu", resize=16))
    recomputed()
    Image.open(data / "cat" / "00.png").transpose(Image.FLIP_TOP_BOTTOM).save(data / "cat" / "00.png")
    recomputed()
    (data / "dog" / "04.png").unlink()
    assert recomputed().n_images == 9
    _card(tmp_path / "card", seed=1)  # new weights in the same card folder
    recomputed()


def test_rank_reuses_and_recomputes(tmp_path):
    from test_rank import FAST, make_world

    from conceptrank.stages.rank import RankConfig, run_rank

    act, tally, *_ = make_world(tmp_path)
    cfg = RankConfig(**FAST)
    a = run_rank(act, tally, tmp_path / "r", cfg)
    files = ("local_concepts.csv", "global_concepts.csv", "images.csv", "classifier.json", "svm.npz", "rank.json")
    before = _bytes(tmp_path / "r", files)
    b = run_rank(act, tally, tmp_path / "r", cfg)
    assert b.reused and not a.reused and "reused" in b.summary()
    assert (b.best_C, b.cv_scores, b.test_accuracy, b.classes, b.n_concepts) == (
        a.best_C, a.cv_scores, a.test_accuracy, a.classes, a.n_concepts)
    assert _bytes(tmp_path / "r", files) == before
    assert not run_rank(act, tally, tmp_path / "r", RankConfig(**FAST, top_local=3)).reused
    assert not run_rank(act, tally, tmp_path / "r", RankConfig(**FAST, seed=1)).reused
    assert not run_rank(act, tally, tmp_path / "r", RankConfig(**{**FAST, "folds": 4})).reused
    tally.write_text(tally.read_text().replace("dog", "wolf"))  # tally file content
    c = run_rank(act, tally, tmp_path / "r", RankConfig(**{**FAST, "folds": 4}))
    assert not c.reused and "wolf" in (tmp_path / "r" / "global_concepts.csv").read_text() + (
        tmp_path / "r" / "local_concepts.csv").read_text()


def test_evaluate_reuses_and_recomputes(tmp_path):
    from test_rank import FAST, make_world

    from conceptrank.stages.evaluate import EvaluateConfig, run_evaluate
    from conceptrank.stages.rank import RankConfig, run_rank

    act, tally, *_ = make_world(tmp_path)
    rank_dir = tmp_path / "rank"
    run_rank(act, tally, rank_dir, RankConfig(**FAST))
    vcfg = EvaluateConfig(configs="1:1", n_perm=20, n_draw=20, n_boot=20, stability_seeds=())
    files = ("precision.csv", "summary.json", "evaluation.json", "evaluate.json")
    a = run_evaluate(rank_dir, None, vcfg)
    before = _bytes(rank_dir, files)
    b = run_evaluate(rank_dir, None, vcfg)
    assert b.reused and not a.reused and "reused" in b.table()
    assert (b.per_class, b.summary, b.details) == (a.per_class, a.summary, a.details)
    assert _bytes(rank_dir, files) == before
    assert not run_evaluate(rank_dir, None, EvaluateConfig(**{**vars(vcfg), "seed": 1})).reused
    assert not run_evaluate(rank_dir, tmp_path / "elsewhere", vcfg).reused  # another folder, its own manifest
    run_rank(act, tally, rank_dir, RankConfig(**{**FAST, "top_local": 2}))  # a new ranking: recomputed
    assert not run_evaluate(rank_dir, None, vcfg).reused


def test_world_reuse(tmp_path):
    from conceptrank import pipeline

    # the synthetic world: reused only for the same parameters and untouched files
    params = dict(seed=0, size=32, probe_images=160, images_per_class=20)
    world = tmp_path / "demo" / "world"
    (world / "probe").mkdir(parents=True)
    (world / "probe" / "index.csv").write_text("image\n")
    assert not pipeline._world_is_current(tmp_path / "demo", params)
    pipeline._write_world_manifest(tmp_path / "demo", params)
    assert pipeline._world_is_current(tmp_path / "demo", params)
    assert not pipeline._world_is_current(tmp_path / "demo", {**params, "seed": 1})
    (world / "probe" / "index.csv").write_text("image,x\n")
    assert not pipeline._world_is_current(tmp_path / "demo", params)


# -- SIGKILL mid-stage, resume, byte-identical outputs --------------------------------------------
def test_killed_dissect_and_extract_resume_byte_identical(tmp_path):
    from typer.testing import CliRunner

    from conceptrank.cli import app

    probe = make_planted_probe(tmp_path / "probe", n=16)
    card = _card(tmp_path / "card")
    data = _targets(tmp_path / "data", per_class=4)
    dis = ["dissect", "--model", card, "--layer", "layer3", "--probe", probe, "--workers", "0", "--batch-size", "4",
           "--device", "cpu", "--stability-quantile", "0.02"]
    ext = ["extract", "--model", card, "--layer", "layer3", "--dataset", data, "--workers", "0", "--batch-size", "4",
           "--device", "cpu"]
    out_d, out_e = tmp_path / "d", tmp_path / "e"
    # extract, paused and killed after batch 1 of 2, runs beside the dissect runs
    killed_extract = _start(ext + ["--out", out_e], {"next": 4})

    # uninterrupted reference runs (in-process: the same code as the subprocesses)
    runner = CliRunner()
    for args in (dis + ["--out", tmp_path / "ref_d"], ext + ["--out", tmp_path / "ref_e"]):
        r = runner.invoke(app, [str(a) for a in args])
        assert r.exit_code == 0, r.output

    # dissect: killed after batch 2 of 4 in pass 1, then (resumed) after batch 3 of 4 in pass 2, then finished
    _cli_killed(dis + ["--out", out_d], out_d / ".features", {"pass": 1, "next": 8})
    assert not (out_d / "dissect.json").exists() and len(list((out_d / ".features").glob("*/checkpoint.npz"))) == 1
    err = _cli_killed(dis + ["--out", out_d], out_d / ".features", {"pass": 2, "next": 12})
    assert "resuming from a checkpoint (pass 1, image 8/16)" in err
    err = _cli(dis + ["--out", out_d])
    assert "resuming from a checkpoint (pass 2, image 12/16)" in err
    assert _bytes(out_d, DISSECT_OUT) == _bytes(tmp_path / "ref_d", DISSECT_OUT)
    assert not (out_d / ".features").exists()
    meta = json.loads((out_d / "dissect.json").read_text())
    assert meta["resumed"] == {"pass": 2, "image": 12} and meta["label_stability"] is not None

    _kill_at_checkpoint(killed_extract, out_e / ".partial", {"next": 4})
    _finish(killed_extract, expect_kill=True)
    assert not (out_e / "extract.json").exists() and (out_e / ".partial").is_dir()
    err = _cli(ext + ["--out", out_e])
    assert "resuming from a checkpoint (image 4/8)" in err
    names = ("activations.npz", "skipped.csv")
    assert _bytes(out_e, names) == _bytes(tmp_path / "ref_e", names)
    assert not (out_e / ".partial").exists()

    # rerunning with identical inputs reuses (timings belong in benchmarks, not tests)
    (res,) = run_dissect(str(card), None, ["layer3"], probe, out_d,
                         DissectConfig(workers=0, batch_size=4, device="cpu", stability_quantile=0.02, progress=False))
    eres = run_extract(str(card), None, "layer3", data, out_e, ECFG)
    assert res.reused and eres.reused


def test_stale_partial_work_is_not_resumed(tmp_path):
    """A checkpoint made for other inputs is discarded, not resumed."""
    probe = make_planted_probe(tmp_path / "probe", n=8)
    out = tmp_path / "out"
    stale = out / ".features" / "0123456789abcdef"
    stale.mkdir(parents=True)
    cache.write_checkpoint(stale / "checkpoint.npz", {"key": "other", "pass": 2, "next": 8})
    (res,) = run_dissect(planted_model(), None, ["units"], BrodenDataset(probe), out, CFG)
    assert not (out / ".features").exists()
    (ref,) = run_dissect(planted_model(), None, ["units"], BrodenDataset(probe), tmp_path / "ref", CFG)
    assert _bytes(out, DISSECT_OUT) == _bytes(tmp_path / "ref", DISSECT_OUT)


# -- CUDA out of memory ---------------------------------------------------------------------------
def _oom_above(module: torch.nn.Module, limit: int, calls: list) -> None:
    inner = module.forward

    def forward(x):
        calls.append(x.shape[0])
        if x.shape[0] > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return inner(x)

    module.forward = forward


def test_dissect_out_of_memory_halves_the_batch(tmp_path, capsys):
    probe = make_planted_probe(tmp_path / "probe", n=8)
    cfg = DissectConfig(workers=0, batch_size=8, progress=False)
    # without noise units the planted model computes every image on its own (batch-independent bytes)
    (ref,) = run_dissect(planted_model(0), None, ["units"], BrodenDataset(probe), tmp_path / "ref", cfg)
    model, calls = planted_model(0), []
    _oom_above(model.module, 2, calls)
    (res,) = run_dissect(model, None, ["units"], BrodenDataset(probe), tmp_path / "oom", cfg)
    assert calls == [8, 4, 2, 2, 2, 2]
    assert "--batch-size 2" in capsys.readouterr().err
    assert _bytes(tmp_path / "oom", DISSECT_OUT) == _bytes(tmp_path / "ref", DISSECT_OUT)
    np.testing.assert_array_equal(res.iou, ref.iou)
    model, calls = planted_model(0), []
    _oom_above(model.module, 0, calls)
    with pytest.raises(ConceptrankError, match="out of GPU memory.*single image"):
        run_dissect(model, None, ["units"], BrodenDataset(probe), tmp_path / "fail", cfg)


def test_extract_out_of_memory_halves_the_batch(tmp_path, capsys):
    from conceptrank.nn.models import load_model

    data = _targets(tmp_path / "data")
    card = _card(tmp_path / "card")
    run_extract(str(card), None, "layer3", data, tmp_path / "ref", ExtractConfig(workers=0, batch_size=10, device="cpu"))
    model, calls = load_model(str(card)), []
    _oom_above(model.module, 3, calls)
    run_extract(model, None, "layer3", data, tmp_path / "oom", ExtractConfig(workers=0, batch_size=10, device="cpu"))
    assert calls[:3] == [10, 5, 2] and max(calls[2:]) <= 2
    assert "--batch-size 2" in capsys.readouterr().err
    ref = np.load(tmp_path / "ref" / "activations.npz")
    got = np.load(tmp_path / "oom" / "activations.npz")
    np.testing.assert_allclose(got["mean"], ref["mean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got["images"], ref["images"])
    model, calls = load_model(str(card)), []
    _oom_above(model.module, 0, calls)
    with pytest.raises(ConceptrankError, match="out of GPU memory.*--device cpu"):
        run_extract(model, None, "layer3", data, tmp_path / "fail", ECFG)
