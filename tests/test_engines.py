"""Sharded engines: the shards' partial statistics merge into the local engine's exact bytes; the
driver resumes from its checkpoint; on Ray (2 workers) a killed worker is retried."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from broden_fixture import make_planted_probe, planted_model
from PIL import Image

import broden_fixture
from conceptrank.engines.local import LocalEngine
from conceptrank.engines.shards import make_shards
from conceptrank.io.broden import BrodenDataset
from conceptrank.io.targets import load_targets
from conceptrank.stages import dissect as dissect_stage
from conceptrank.stages import extract as extract_stage
from conceptrank.stages.dissect import DissectConfig, dissect_layers, run_dissect
from conceptrank.stages.extract import ExtractConfig, run_extract

CFG = DissectConfig(workers=0, batch_size=4, progress=False, stability_quantile=0.02)
DISSECT_OUT = ("tally.csv", "thresholds.npy", "top_images.npz", "tally_counts.npz")


def _targets(root: Path, per_class: int = 5) -> Path:
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / c / f"{i:02d}.png")
    (root / "cat" / "broken.png").write_bytes(b"not an image")  # skipped, and listed, by both engines
    return root


def _bytes(folder: Path, names) -> dict[str, bytes]:
    return {n: (folder / n).read_bytes() for n in names}


def test_make_shards_fall_on_batch_boundaries():
    shards = make_shards(23, 4, 3)
    assert [(s.start, s.stop) for s in shards] == [(0, 8), (8, 16), (16, 23)]
    assert [len(s) for s in make_shards(5, 4, 8)] == [4, 1]  # never more shards than batches


class _Crash(RuntimeError):
    pass


class _CrashingEngine(LocalEngine):
    """A driver that dies after ``after`` shards of pass ``phase`` were merged."""

    def __init__(self, after: int):
        self.after, self.seen = after, 0

    def map(self, work, shards, progress=None):
        for item in super().map(work, shards, progress):
            if self.seen == self.after:
                raise _Crash
            self.seen += 1
            yield item


def _runs_bytes(runs) -> dict:
    meta, arrays = dissect_stage.runs_state(runs)
    return {k: v.tobytes() for k, v in arrays.items() if "threshold_seconds" not in k}


def test_sharded_dissect_merges_to_the_local_result_and_the_driver_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("CONCEPTRANK_CHECKPOINT_SECONDS", "0")
    ds = BrodenDataset(make_planted_probe(tmp_path / "probe", n=20))
    local = dissect_layers(planted_model(), ["units", "pool"], ds, CFG)
    plan = dissect_stage._make_plan(planted_model(), ["units", "pool"], ds, CFG, None)
    work = tmp_path / "work"
    with pytest.raises(_Crash):  # pass 1 dies after 3 of the shards
        dissect_stage.sharded_runs(_CrashingEngine(3), planted_model(), plan, ds, CFG, work, "k")
    with pytest.raises(_Crash):  # resumed, then pass 2 dies after 2 shards
        dissect_stage.sharded_runs(_CrashingEngine(1 + 2), planted_model(), plan, ds, CFG, work, "k")
    runs, _, resumed = dissect_stage.sharded_runs(LocalEngine(), planted_model(), plan, ds, CFG, work, "k")
    assert resumed == {"pass": 2, "shards_done": 2}
    for res in local:
        run = runs[res.layer]
        np.testing.assert_array_equal(run.thr, res.thresholds)
        for name in ("truth", "intersect", "activation"):
            np.testing.assert_array_equal(getattr(run.acc, name).numpy(), getattr(res, name))
        np.testing.assert_array_equal(run.top.index, res.top_index)
        assert dissect_stage._label_stability(run.acc, run.alt, ds, CFG) == res.stability


def test_sharded_extract_gives_the_local_rows(tmp_path, monkeypatch, capsys):
    from conceptrank.nn.models import load_model, save_model_card
    from conceptrank.nn.nets import ConceptNet

    torch.manual_seed(0)
    save_model_card(tmp_path / "card", ConceptNet(num_classes=3, width=4), "conceptnet", 3, (32, 32), (0.5,) * 3,
                    (0.25,) * 3, arch_kwargs={"width": 4})
    model = load_model(str(tmp_path / "card"))
    targets = load_targets(_targets(tmp_path / "data"))
    cfg = ExtractConfig(workers=0, batch_size=3, device="cpu")
    local = extract_stage.extract_activations(model, "layer3", targets, cfg)
    stream = extract_stage.image_stream(model, targets, cfg)
    monkeypatch.setenv("CONCEPTRANK_CHECKPOINT_SECONDS", "0")
    with pytest.raises(_Crash):  # the driver dies after 2 of 4 shards
        extract_stage.sharded_rows(_CrashingEngine(2), model, "layer3", stream, targets, cfg, tmp_path / "w", "k")
    rows = extract_stage.sharded_rows(LocalEngine(), model, "layer3", stream, targets, cfg, tmp_path / "w", "k")
    assert "resuming from a checkpoint (2 shards done)" in capsys.readouterr().err
    got = extract_stage._activations(rows, targets, "layer3")
    assert got.mean.tobytes() == local.mean.tobytes() and got.max.tobytes() == local.max.tobytes()
    assert got.images.tolist() == local.images.tolist() and got.skipped == local.skipped and len(got.skipped) == 1


# -- Ray: a local cluster of 2 CPUs, 2 workers ----------------------------------------------------
@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    import ray.cloudpickle

    for mod in (broden_fixture, __import__(__name__)):
        ray.cloudpickle.register_pickle_by_value(mod)  # the workers cannot import the tests folder
    yield ray
    ray.shutdown()


class SuicidalNet(broden_fixture.PlantedNet):
    """The planted model, whose worker process SIGKILLs itself in its 2nd forward pass (the 2nd batch
    of its first shard) until ``marker`` says a worker was killed; the driver process never does."""

    def __init__(self, marker: str, driver: int):
        super().__init__()
        self.marker, self.driver, self.calls = marker, driver, 0

    def forward(self, x):
        if os.getpid() != self.driver and not os.path.exists(self.marker):
            self.calls += 1
            if self.calls == 2:
                Path(self.marker).touch()
                os.kill(os.getpid(), signal.SIGKILL)
        return super().forward(x)


def test_ray_engine_writes_the_local_bytes_and_survives_a_killed_worker(tmp_path, ray_cluster):
    from conceptrank.nn.models import LoadedModel

    probe = make_planted_probe(tmp_path / "probe", n=48)  # 12 batches: 8 shards, the first 4 of 2 batches
    (ref,) = run_dissect(planted_model(), None, "units", probe, tmp_path / "local", CFG)
    ray_cfg = DissectConfig(**{**CFG.__dict__, "engine": "ray", "ray_workers": 2})
    marker = str(tmp_path / "killed")
    net = SuicidalNet(marker, os.getpid()).eval()
    model = LoadedModel(net, "planted", "none", (32, 32), (0.0,) * 3, (1.0,) * 3, "planted-fingerprint")
    (res,) = run_dissect(model, None, "units", probe, tmp_path / "ray", ray_cfg)
    assert os.path.exists(marker)  # a worker process really was killed mid-shard, restarted and retried
    assert _bytes(tmp_path / "ray", DISSECT_OUT) == _bytes(tmp_path / "local", DISSECT_OUT)
    assert not res.reused and ref.counts == res.counts

    data = _targets(tmp_path / "data")
    ecfg = ExtractConfig(workers=0, batch_size=3, device="cpu")
    run_extract(model, None, "units", data, tmp_path / "e_local", ecfg)
    run_extract(model, None, "units", data, tmp_path / "e_ray", ExtractConfig(**{**ecfg.__dict__, "engine": "ray",
                                                                                "ray_workers": 2}))
    names = ("activations.npz", "skipped.csv")
    assert _bytes(tmp_path / "e_ray", names) == _bytes(tmp_path / "e_local", names)


class _CountingWork:
    """Reports every image of its shard in two halves and returns the shard's pid and range."""

    def setup(self):
        self.pid = os.getpid()

    def __call__(self, shard, report):
        half = len(shard) // 2
        report(half)
        report(len(shard) - half)
        return self.pid, shard.start, shard.stop


def test_ray_worker_progress_reaches_the_driver_display(ray_cluster):
    import io

    from conceptrank.engines.ray import RayEngine
    from conceptrank.progress import Progress

    engine = RayEngine(workers=2)
    stream = io.StringIO()
    shards = make_shards(40, 5, 8)
    try:
        with Progress(40, "work", "img", stream=stream, interval=0) as bar:
            results = [r for _, r in engine.map(_CountingWork(), shards, bar)]
    finally:
        engine.close()
    assert bar.count == 40 and "work 40/40 img (100%)" in stream.getvalue()
    assert sorted((a, b) for _, a, b in results) == [(s.start, s.stop) for s in shards]
    assert len({pid for pid, _, _ in results}) == 2 and os.getpid() not in {pid for pid, _, _ in results}
