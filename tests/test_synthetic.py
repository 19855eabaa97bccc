"""The synthetic concept world: Broden round trip, truth, determinism, model card, Stanford 40 layout."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from conceptrank.errors import ConceptrankError
from conceptrank.io.broden import BrodenDataset
from conceptrank.synthetic.world import (
    CATEGORIES,
    TARGET_CLASSES,
    concept_vocabulary,
    downsample_labels,
    generate_world,
    probe_scene,
    random_scene_spec,
    render_scene,
    source_scene,
    target_scene,
)


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# -- the renderer ---------------------------------------------------------------------------------
def _check_scene(sc, size: int) -> None:
    vocab = concept_vocabulary()
    assert sc.image.shape == (size, size, 3) and sc.image.dtype == np.uint8
    present = set()
    for cat, planes in sc.planes.items():
        for p in planes:
            assert p.shape == (size, size)
            for v in np.unique(p):
                if v:
                    assert vocab.category[vocab.names[v]] == cat
                    present.add(vocab.names[v])
    for cat, labs in sc.image_labels.items():
        for v in labs:
            assert vocab.category[vocab.names[v]] == cat
            present.add(vocab.names[v])
    assert present == set(sc.concepts)
    obj = sc.planes["object"][0] > 0
    # Every object pixel carries its object's colour and colour labels lie on objects only (a
    # background's huge colour areas would make colours undissectable); parts and materials lie on objects.
    assert np.all(sc.planes["color"][0][obj] > 0)
    assert not np.any(sc.planes["color"][0][~obj])
    for p in sc.planes["part"] + sc.planes["material"]:
        assert not np.any((p > 0) & ~obj)
    # Visible pixels per object add up to the object plane (occluded pixels are not counted twice).
    assert sum(o.visible for o in sc.objects) == int(obj.sum())


@pytest.mark.parametrize("size", [32, 64])
def test_rendered_scenes_are_self_consistent(size):
    for i in range(12):
        _check_scene(probe_scene(5, i, size), size)
        _check_scene(target_scene(5, i % len(TARGET_CLASSES), i, size), size)
        _check_scene(source_scene(5, i, size), size)


def test_masks_show_only_visible_pixels():
    # Stack many objects so that occlusion is certain; each object's label appears only where it is visible.
    vocab = concept_vocabulary()
    rng = np.random.default_rng(0)
    spec = random_scene_spec(rng, 4, 4, scale=(0.3, 0.4))
    sc = render_scene(rng, spec, 64)
    last = sc.objects[-1]
    assert sc.planes["object"][0].max() > 0
    assert last.visible > 0
    # The last object is drawn on top: its full shape is visible, so its shape label covers >= its pixels.
    assert (sc.planes["object"][0] == vocab.number[last.spec.shape]).sum() >= last.visible
    assert sum(o.visible for o in sc.objects) <= 64 * 64


def test_source_scene_labels_follow_the_main_object():
    from conceptrank.synthetic.train import render_source_images, source_heads

    images, labels = render_source_images(2, 32, 6, "train")
    heads = source_heads()
    assert images.shape == (6, 32, 32, 3) and labels.shape == (6, 4)
    from conceptrank.synthetic.train import presence_concepts, render_source_data

    _, labels2, presence = render_source_data(2, 32, 6, "train")
    np.testing.assert_array_equal(labels2, labels)
    names = presence_concepts()
    for i in range(6):
        sc = source_scene(2, i, 32, "train")
        assert {names[j] for j in np.flatnonzero(presence[i])} == set(sc.concepts) & set(names)
        main = sc.main_object().spec
        assert heads["shape"][labels[i, 0]] == main.shape
        assert heads["color"][labels[i, 1]] == main.color
        assert heads["material"][labels[i, 2]] == (main.material or "plain")
        assert heads["scene"][labels[i, 3]] == sc.spec.scene


# -- the probe set -------------------------------------------------------------------------------
def test_probe_set_round_trips_through_the_broden_reader(tiny_world_nomodel):
    w = tiny_world_nomodel
    vocab = concept_vocabulary()
    ds = BrodenDataset(w.probe_dir)
    assert ds.categories == list(CATEGORIES)
    assert len(ds) == w.probe_images and ds.dropped_rows == 0
    assert {n: (i.name, i.categories) for n, i in ds.labels.items()} == {
        n: (name, (cat,)) for n, name, cat in vocab.labels
    }
    assert [ds.labels[n].name for n in range(1, 12)][:2] == ["black-c", "blue-c"]  # colours first
    half = w.size // 2
    n_multi = 0
    for i, rec in enumerate(ds.records):
        assert (rec.ih, rec.iw, rec.sh, rec.sw) == (w.size, w.size, half, half)
        assert ds.load_image(i).size == (w.size, w.size)
        sc = probe_scene(w.seed, i, w.size)
        # Image-level labels: exactly the scene (and the texture when there is one).
        assert sorted(rec.scalars) == sorted(sc.image_labels["scene"] + sc.image_labels["texture"])
        planes = ds.load_planes(i)
        n_multi += len(rec.planes) >= 4
        expected = {}
        for cat, ps in sc.planes.items():
            for k, p in enumerate(ps, start=1):
                name = f"_{cat}_{k}.png" if len(ps) > 1 else f"_{cat}.png"
                expected[name] = downsample_labels(p, half, half)
        written = set()
        for rel, plane in zip(rec.planes, planes):
            suffix = next(s for s in expected if rel.endswith(s))
            np.testing.assert_array_equal(plane, expected[suffix])
            written.add(suffix)
        # Planes left out are exactly the empty ones.
        for suffix, exp in expected.items():
            assert (suffix in written) == bool(exp.any())
    assert n_multi >= len(ds) // 2


def test_probe_tables(tiny_world_nomodel):
    w = tiny_world_nomodel
    root = w.probe_dir
    vocab = concept_vocabulary()
    assert [r["name"] for r in _csv(root / "category.csv")] == list(CATEGORIES)
    labels = {int(r["number"]): r for r in _csv(root / "label.csv")}
    n = w.probe_images
    for cat in CATEGORIES:
        rows = _csv(root / f"c_{cat}.csv")
        assert [int(r["code"]) for r in rows] == list(range(1, len(rows) + 1))
        assert [r["name"] for r in rows] == list(vocab.of(cat))
        for r in rows:
            assert labels[int(r["number"])]["name"] == r["name"]
            assert 0 <= int(r["frequency"]) <= n
            assert 0.0 <= float(r["coverage"]) <= n
            assert "e" not in r["coverage"] and not r["coverage"].startswith(".")
    scene_freq = sum(int(labels[vocab.number[s]]["frequency"]) for s in vocab.of("scene"))
    with_scene = sum(probe_scene(w.seed, i, w.size).spec.scene is not None for i in range(n))
    assert scene_freq == with_scene  # one scene per image, none on studio backdrops
    assert 0.4 * n < with_scene < 0.8 * n
    index = _csv(root / "index.csv")
    assert sum(r["scene"] == "" for r in index) == n - with_scene
    # Plausible frequencies: every colour, shape and scene occurs; objects cover a fair share of pixels.
    for name in vocab.of("color") + vocab.of("object"):
        assert int(labels[vocab.number[name]]["frequency"]) > 0, name
    assert sum(int(labels[vocab.number[s]]["frequency"]) > 0 for s in vocab.of("scene")) >= 9
    obj_cov = sum(float(labels[vocab.number[s]]["coverage"]) for s in vocab.of("object"))
    assert 0.05 * n < obj_cov < 0.8 * n


# -- truth ----------------------------------------------------------------------------------------
def test_truth_matches_the_target_images(tiny_world_nomodel):
    w = tiny_world_nomodel
    truth = json.loads(w.truth_path.read_text())
    vocab = concept_vocabulary()
    label_names = {r["name"]: r["category"].split("(")[0] for r in _csv(w.probe_dir / "label.csv")}
    assert truth["classes"] == {c: list(cs) for c, cs in TARGET_CLASSES}
    assert truth["categories"] == label_names
    jpgs = sorted(p.name for p in (w.target_dir / "JPEGImages").iterdir())
    assert sorted(truth["images"]) == jpgs
    for concepts in truth["images"].values():
        assert set(concepts) <= set(label_names)
    for cs in truth["classes"].values():
        assert 2 <= len(cs) <= 4 and set(cs) <= set(label_names)
        assert {label_names[c] for c in cs} <= {"object", "color", "material", "part", "scene"}
    # Unique concept sets that overlap between classes.
    sets = [frozenset(cs) for cs in truth["classes"].values()]
    assert len(set(sets)) == len(sets)
    assert any(a & b for i, a in enumerate(sets) for b in sets[i + 1:])
    # Each image's list is what the renderer saw; planted concepts are in most images of their class.
    for ci, (cls, planted) in enumerate(TARGET_CLASSES):
        names = [f"{cls}_{i + 1:03d}.jpg" for i in range(w.images_per_class)]
        for i in (0, 1):
            assert truth["images"][names[i]] == sorted(
                target_scene(w.seed, ci, i, w.size).concepts, key=vocab.number.__getitem__
            )
        for c in planted:
            frac = np.mean([c in truth["images"][nm] for nm in names])
            assert frac >= 0.6, (cls, c, frac)


def test_planted_concepts_are_frequent_over_many_images():
    # At the default size, planted concepts are visible in most of a class's images: kept with
    # probability 0.8, less what distractors hide (a material lies only where no part covers it).
    for ci, (cls, planted) in enumerate(TARGET_CLASSES):
        scenes = [target_scene(0, ci, i, 64) for i in range(60)]
        for c in planted:
            frac = np.mean([c in sc.concepts for sc in scenes])
            assert frac >= 0.65, (cls, c, frac)


# -- Stanford 40 layout ---------------------------------------------------------------------------
def test_stanford40_layout(tiny_world_nomodel):
    w = tiny_world_nomodel
    root = w.target_dir
    lines = (root / "ImageSplits" / "actions.txt").read_text().splitlines()
    assert lines[0] == "action_name\tnumber_of_images"
    actions = [ln.split("\t") for ln in lines[1:]]
    assert [a for a, _ in actions] == list(w.classes) and len(w.classes) >= 8
    assert all(int(k) == w.images_per_class for _, k in actions)
    jpgs = {p.name for p in (root / "JPEGImages").iterdir()}
    all_train, all_test = [], []
    for cls in w.classes:
        tr = (root / "ImageSplits" / f"{cls}_train.txt").read_text().split()
        te = (root / "ImageSplits" / f"{cls}_test.txt").read_text().split()
        assert not set(tr) & set(te)
        assert len(tr) == w.images_per_class // 2 and len(tr) + len(te) == w.images_per_class
        assert {n.rsplit("_", 1)[0] for n in tr + te} == {cls}
        assert sorted(tr + te) == [f"{cls}_{i:03d}.jpg" for i in range(1, w.images_per_class + 1)]
        all_train += tr
        all_test += te
    assert (root / "ImageSplits" / "train.txt").read_text().split() == all_train
    assert (root / "ImageSplits" / "test.txt").read_text().split() == all_test
    assert set(all_train) | set(all_test) == jpgs and not set(all_train) & set(all_test)
    assert (w.train_images, w.test_images) == (len(all_train), len(all_test))
    from PIL import Image

    with Image.open(root / "JPEGImages" / all_train[0]) as im:
        assert im.format == "JPEG" and im.size == (w.size, w.size) and im.mode == "RGB"


# -- determinism -----------------------------------------------------------------------------------
def test_same_seed_gives_identical_files(tmp_path):
    kw = dict(size=32, probe_images=15, images_per_class=10, progress=False)
    a = generate_world(tmp_path / "a", seed=7, **kw)
    b = generate_world(tmp_path / "b", seed=7, **kw)
    c = generate_world(tmp_path / "c", seed=8, **kw)
    ha, hb, hc = _hashes(a.out), _hashes(b.out), _hashes(c.out)
    assert ha == hb
    assert ha != hc
    differing = [k for k in ha if k in hc and ha[k] != hc[k]]
    assert any(k.endswith(".jpg") for k in differing) and "truth.json" in differing
    # Regenerating into the same folder replaces the earlier world.
    d = generate_world(tmp_path / "a", seed=7, **kw)
    assert _hashes(d.out) == ha


def test_drawing_in_processes_gives_the_same_files_as_in_one(tmp_path, monkeypatch):
    """Probe chunks and target classes drawn by worker processes: the files of a one-process run."""
    import conceptrank.synthetic.world as world

    kw = dict(size=32, probe_images=30, images_per_class=10, progress=False)
    seen = []
    real = world._in_processes
    monkeypatch.setattr(world, "_PROBE_CHUNK", 8)
    monkeypatch.setattr(world, "_in_processes", lambda fn, chunks: seen.append(len(chunks)) or real(fn, chunks, 2))
    a = generate_world(tmp_path / "a", seed=3, **kw)
    monkeypatch.setattr(world, "_in_processes", lambda fn, chunks: real(fn, chunks, 1))
    b = generate_world(tmp_path / "b", seed=3, **kw)
    assert seen == [4, 10] and _hashes(a.out) == _hashes(b.out)


# -- the model --------------------------------------------------------------------------------------
def test_model_card_reproduces_the_trained_module(tiny_world):
    import torch
    from PIL import Image

    from conceptrank.nn.models import load_model
    from conceptrank.synthetic.train import render_source_images, source_heads

    w = tiny_world
    assert w.model_dir is not None and (w.model_dir / "model.json").exists()
    card = json.loads((w.model_dir / "model.json").read_text())
    task = card["source_task"]
    heads = source_heads()
    assert task["heads"] == {h: list(v) for h, v in heads.items()}
    from conceptrank.synthetic.train import presence_concepts

    # Main-object heads first, then one presence output per concept of the world.
    assert card["num_classes"] == sum(len(v) for v in heads.values()) + len(presence_concepts())
    assert task["presence"]["concepts"] == list(presence_concepts()) == list(concept_vocabulary().names[1:])
    assert card["architecture"] == "worldnet"
    assert card["input_size"] == [w.size, w.size]
    assert card["arch_kwargs"] == {"width": 32, "stem_pool": True, "layer4_stride": 4, "concept_units": len(concept_vocabulary().names) - 1}
    assert task["config"]["train_images"] == 384 and task["config"]["epochs"] == 2
    assert set(task["heldout_accuracy"]) == set(heads) | {"mean", "presence_f1"}
    assert w.source_accuracy == task["heldout_accuracy"]

    m = load_model(str(w.model_dir))
    assert tuple(m.input_size) == (w.size, w.size)
    ref = np.asarray(task["reference"]["logits"])
    images, _ = render_source_images(w.seed, w.size, len(ref), "heldout")
    x = torch.stack([m.to_tensor(Image.fromarray(im)) for im in images])
    with torch.no_grad():
        out = m.module(x).numpy()
        feats = {}
        h = m.module.layer4.register_forward_hook(lambda mod, i, o: feats.setdefault("l4", o))
        m.module(x[:1])
        h.remove()
    np.testing.assert_allclose(out, ref, atol=1e-6, rtol=0)
    assert tuple(feats["l4"].shape) == (1, 128, w.size // 4, w.size // 4)
    assert "model:" in w.summary() and str(w.model_dir) in w.summary()


# -- bad parameters -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(size=40), "multiple of 16"),
        (dict(size=16), "multiple of 16"),
        (dict(size=64.0), "integer"),
        (dict(images_per_class=9), "at least 10"),
        (dict(probe_images=0), "probe_images"),
        (dict(seed=-1), "seed"),
    ],
)
def test_bad_parameters_raise(tmp_path, kwargs, match):
    with pytest.raises(ConceptrankError, match=match):
        generate_world(tmp_path / "w", progress=False, **kwargs)
    assert not (tmp_path / "w").exists()


def test_refuses_a_folder_that_is_not_a_world(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(ConceptrankError, match="not empty"):
        generate_world(tmp_path, size=32, probe_images=2, images_per_class=10, progress=False)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_cli_synth(tmp_path):
    from typer.testing import CliRunner

    from conceptrank.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["synth", "--out", str(tmp_path / "w"), "--size", "40"])
    assert res.exit_code == 2 and "multiple of 16" in res.output
    res = runner.invoke(
        app, ["synth", "--out", str(tmp_path / "w"), "--size", "32", "--probe-images", "5",
              "--images-per-class", "10", "--no-model"]
    )
    assert res.exit_code == 0, res.output
    assert "probe:" in res.output and (tmp_path / "w" / "truth.json").exists()
