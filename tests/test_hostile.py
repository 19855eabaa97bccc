"""Hostile input, part 1: malformed files, out-of-range options and model cards, the CLI's error path.

Every case is generated here from the small fixtures under ``tests/fixtures`` and pins the exact
outcome: one ``error: …`` line naming the file, line, field or option (exit code 2, no traceback),
or a counted, listed skip. Part 2 (``test_hostile_faults.py``) covers faults: full and read-only
disks, kills, locks, stale caches and half-written run folders.

==========================================  ==================================================
case                                        behaviour
==========================================  ==================================================
index.csv row with too few / many fields    BrodenError: file, line, field counts
index.csv image listed twice                BrodenError: both lines (never counted twice)
``dissect --probe`` on a target set          "not a Broden probe set: missing …; looks like …"
unknown ``dissect --categories``             one line listing category.csv's names
unknown ``rank --categories``                one line listing the tally's categories
tally.csv score nan / inf / 7                TallyError: file, line, column
thresholds.npy with NaN                     one line naming the file and the unit
``--iou-threshold nan``, ``--resize 100000``  one line naming the option, before the model loads
bad CONCEPTRANK_CHECKPOINT_SECONDS          one line naming the variable
actions.txt class with empty split files    TargetError naming the class
looping / broken symlink (imagefolder)      counted in ``TargetSet.skipped``, in skipped.csv
symlinked class folder                      skipped with reason, not a duplicate class
model card: num_classes -1 / "3" / 1e12     ModelError naming the field
model card: input_size [0,0], arch_kwargs   ModelError naming the field / the accepted kwargs
card weights outside its folder             refused unless --weights names the file
card weights_sha256 mismatch                refused naming both digests
truncated .safetensors                      "not a complete .safetensors file"
binary TOML, wrongly typed TOML field       one line naming file and field, before any stage
OSError on a given path / full disk         one line; an OSError elsewhere keeps its traceback
explain output names                        ``a/img 0.jpg`` and ``a/img_0.jpg`` never collide
==========================================  ==================================================
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from conceptrank.cli import _run, app
from conceptrank.errors import BrodenError, ConceptrankError, ModelError, TallyError, TargetError
from conceptrank.io.broden import BrodenDataset
from conceptrank.io.tally_csv import format_tally, read_tally, read_thresholds
from conceptrank.io.targets import load_targets
from conceptrank.nn.models import load_model, save_model_card
from conceptrank.nn.nets import ConceptNet
from conceptrank.pipeline import load_run_config
from conceptrank.stages.explain import _safe_name

FIX = Path(__file__).resolve().parent / "fixtures"
B224 = FIX / "broden_quirks" / "broden1_224"
S40 = FIX / "stanford40_quirks" / "Stanford40"
runner = CliRunner()


@pytest.fixture
def probe(tmp_path) -> Path:
    return Path(shutil.copytree(B224, tmp_path / "probe"))


@pytest.fixture
def s40(tmp_path) -> Path:
    return Path(shutil.copytree(S40, tmp_path / "S40"))


@pytest.fixture
def card(tmp_path) -> Path:
    torch.manual_seed(0)
    save_model_card(tmp_path / "card", ConceptNet(num_classes=3, width=4), "conceptnet", 3, (32, 32),
                    (0.5,) * 3, (0.25,) * 3, arch_kwargs={"width": 4})
    return tmp_path / "card"


def error_line(result, *needles: str) -> str:
    """Exit code 2, no traceback, and exactly one ``error:`` line that holds every needle."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, result.output
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


def _rewrite_index(root: Path, edit) -> None:
    lines = (root / "index.csv").read_text().splitlines()
    (root / "index.csv").write_text("\n".join(edit(lines)) + "\n")


# -- Broden probe sets ----------------------------------------------------------------------------
@pytest.mark.parametrize("change,fields", [(lambda row: row.rsplit(",", 2)[0], 10),
                                           (lambda row: row + ",extra,cells", 14)])
def test_index_row_with_wrong_field_count_names_line(probe, change, fields):
    _rewrite_index(probe, lambda ls: ls[:2] + [change(ls[2])] + ls[3:])
    with pytest.raises(BrodenError, match=rf"index.csv line 3: {fields} fields, the header has 12"):
        BrodenDataset(probe)


def test_index_duplicate_row_is_refused_naming_both_lines(probe):
    _rewrite_index(probe, lambda ls: ls + [ls[2]])
    n = len((probe / "index.csv").read_text().splitlines())
    with pytest.raises(BrodenError, match=rf"line {n}: image 'pascal/2008_000002.jpg' is listed again \(first on line 3\)"):
        BrodenDataset(probe)


def test_target_folder_given_as_probe_says_what_is_missing(s40, card, tmp_path):
    r = runner.invoke(app, ["dissect", "--model", str(card), "--layer", "layer4", "--probe", str(s40),
                            "--out", str(tmp_path / "out"), "--device", "cpu", "--workers", "0"])
    error_line(r, f"{s40} is not a Broden probe set: missing index.csv, category.csv, label.csv",
               "looks like a Stanford 40 target set", "extract --dataset")


def test_unknown_dissect_category_is_named(probe):
    with pytest.raises(BrodenError, match=r"unknown category \['colour'\]; category.csv lists"):
        BrodenDataset(probe, ["object", "colour"])


# -- tallies and thresholds -------------------------------------------------------------------------
def _tally(path: Path, scores) -> Path:
    U = len(scores)
    best = np.ones((U, 1), int)
    z = np.zeros_like(best)
    path.write_text(format_tally(["object"], best, z, z, z, np.array(scores, float)[:, None], ["", "dog"]))
    return path


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "7"])
def test_tally_non_finite_or_out_of_range_score_is_refused(tmp_path, bad):
    p = _tally(tmp_path / "tally.csv", [0.1, 0.2, 0.3])
    text = p.read_text().splitlines()
    text[2] = text[2].replace("0.2", bad, 1)
    p.write_text("\n".join(text) + "\n")
    with pytest.raises(TallyError, match=rf"tally.csv line 3: column '(score|object-iou)' must be an IoU in \[0, 1\], got '{bad}'"):
        read_tally(p)


def test_unknown_rank_category_is_refused(tmp_path):
    labels = read_tally(_tally(tmp_path / "tally.csv", [0.1, 0.2]))
    assert [c[0] for c in labels.concepts(0.04, ["object"])] == ["dog", "dog"]
    with pytest.raises(TallyError, match=r"unknown category \['objekt'\]: the tally .* has \['object'\]"):
        labels.concepts(0.04, ["object", "objekt"])


def test_nan_thresholds_are_refused(tmp_path):
    np.save(tmp_path / "thr.npy", np.array([0.5, math.nan, 1.0]))
    with pytest.raises(TallyError, match=r"thr.npy: 1 threshold\(s\) are NaN or infinite \(first: unit 2\)"):
        read_thresholds(tmp_path / "thr.npy")
    np.save(tmp_path / "thr2.npy", np.ones((2, 2)))
    with pytest.raises(TallyError, match="1-D numeric array"):
        read_thresholds(tmp_path / "thr2.npy")
    np.save(tmp_path / "ok.npy", np.array([0.5, 1.0]))
    assert read_thresholds(tmp_path / "ok.npy", units=2).tolist() == [0.5, 1.0]


def test_cli_nan_thresholds_file(probe, card, tmp_path):
    np.save(tmp_path / "thr.npy", np.full(16, math.nan))
    r = runner.invoke(app, ["dissect", "--model", str(card), "--layer", "layer4", "--probe", str(probe),
                            "--out", str(tmp_path / "out"), "--thresholds", str(tmp_path / "thr.npy"),
                            "--device", "cpu", "--workers", "0"])
    error_line(r, "thr.npy: 16 threshold(s) are NaN or infinite (first: unit 1)")
    assert not (tmp_path / "out" / "tally.csv").exists()


# -- options and environment ------------------------------------------------------------------------
def test_cli_nan_iou_threshold(probe, tmp_path):
    r = runner.invoke(app, ["dissect", "--model", "no-such-model", "--layer", "layer4", "--probe", str(probe),
                            "--out", str(tmp_path / "out"), "--iou-threshold", "nan"])
    error_line(r, "--iou-threshold must lie in [0, 1], got nan")  # before the (unknown) model is looked up


def test_cli_huge_resize_is_refused_before_loading(s40, tmp_path):
    r = runner.invoke(app, ["extract", "--model", "no-such-model", "--layer", "layer4", "--dataset", str(s40),
                            "--out", str(tmp_path / "out"), "--resize", "100000"])
    error_line(r, "--resize must be a number of pixels in [1, 4096], got 100000")


@pytest.mark.parametrize("value", ["abc", "-1", "nan", "inf"])
def test_bad_checkpoint_seconds_is_refused(s40, tmp_path, monkeypatch, value):
    monkeypatch.setenv("CONCEPTRANK_CHECKPOINT_SECONDS", value)
    r = runner.invoke(app, ["extract", "--model", "no-such-model", "--layer", "layer4", "--dataset", str(s40),
                            "--out", str(tmp_path / "out")])
    error_line(r, f"CONCEPTRANK_CHECKPOINT_SECONDS={value!r}: expected a number of seconds >= 0")


def test_rank_unknown_category_cli(tmp_path):
    from conceptrank.io.cache import save_npz

    _tally(tmp_path / "tally.csv", [0.1, 0.2])
    n = 12
    save_npz(tmp_path / "activations.npz", mean=np.random.default_rng(0).random((n, 2)).astype(np.float32),
             images=np.array([f"c{i % 2}/{i}.jpg" for i in range(n)]), classes=np.array([f"c{i % 2}" for i in range(n)]),
             splits=np.array(["train", "test"] * (n // 2)))
    r = runner.invoke(app, ["rank", "--activations", str(tmp_path / "activations.npz"), "--tally",
                            str(tmp_path / "tally.csv"), "--out", str(tmp_path / "rank"), "--categories", "object,objekt"])
    error_line(r, "unknown category ['objekt']", "has ['object']")


# -- target sets ------------------------------------------------------------------------------------
def test_action_with_empty_split_files_is_reported(s40):
    for split in ("train", "test"):
        (s40 / "ImageSplits" / f"applauding_{split}.txt").write_text("")
    with pytest.raises(TargetError, match=r"action 'applauding' is listed in .*actions.txt but applauding_train.txt "
                                          r"and applauding_test.txt list no images"):
        load_targets(s40)


def test_imagefolder_symlinks_are_counted_not_dropped(tmp_path):
    from PIL import Image

    root = tmp_path / "data"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (i * 100, 0, 0)).save(root / cls / f"{i}.png")
    (root / "cat" / "loop.png").symlink_to(root / "cat" / "loop.png")  # ELOOP
    (root / "dog" / "gone.png").symlink_to(root / "nowhere.png")
    (root / "kitten").symlink_to(root / "cat", target_is_directory=True)  # same folder under a second name
    (root / "empty").mkdir()
    ts = load_targets(root, "imagefolder")
    assert ts.classes == ("cat", "dog")
    assert len(ts.items) == 4
    assert dict(ts.skipped) == {
        "cat/loop.png": "broken or looping symlink",
        "dog/gone.png": "broken or looping symlink",
        "kitten": "symlink to class folder 'cat', not a class of its own",
        "empty": "class folder without images",
    }


def test_imagefolder_symlink_to_a_folder_elsewhere_is_a_class(tmp_path):
    from PIL import Image

    (tmp_path / "elsewhere").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "elsewhere" / "a.png")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "bird").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    ts = load_targets(tmp_path / "data", "imagefolder")
    assert ts.classes == ("bird",) and ts.skipped == ()


# -- model cards ------------------------------------------------------------------------------------
def _edit_card(card: Path, **fields) -> None:
    data = json.loads((card / "model.json").read_text())
    for k, v in fields.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    (card / "model.json").write_text(json.dumps(data))


@pytest.mark.parametrize("fields,message", [
    ({"num_classes": -1}, "field 'num_classes' must be an integer in [1, 1000000], got -1"),
    ({"num_classes": "3"}, "field 'num_classes' must be an integer in [1, 1000000], got '3'"),
    ({"num_classes": 10**12}, "field 'num_classes' must be an integer in [1, 1000000], got 1000000000000"),
    ({"num_classes": True}, "field 'num_classes' must be an integer"),
    ({"input_size": [0, 0]}, "field 'input_size' must be [height, width] in pixels, each in [1, 4096], got [0, 0]"),
    ({"input_size": [32]}, "field 'input_size' must be [height, width]"),
    ({"arch_kwargs": {"depth": 3}}, "unknown arch_kwargs ['depth'] for 'conceptnet'; it accepts ['width', 'stem_pool'"),
    ({"arch_kwargs": {"width": 10**9}}, "arch_kwargs.width must be an integer in [0, 4096]"),
    ({"arch_kwargs": [1]}, "field 'arch_kwargs' must be an object"),
    ({"normalization": {"mean": [0.5] * 3, "std": [0, 1, 1]}}, "field 'std' must be a list of 3 numbers"),
    ({"weights_sha256": "xyz"}, "field 'weights_sha256' must be 64 hex digits"),
    ({"architecture": 5}, "field 'architecture' must be a name"),
])
def test_card_fields_out_of_range(card, fields, message):
    _edit_card(card, **fields)
    with pytest.raises(ModelError) as e:
        load_model(str(card))
    assert message in str(e.value) and str(card / "model.json") in str(e.value)
    r = runner.invoke(app, ["layers", "--model", str(card)])
    error_line(r, message)


def test_card_weights_outside_its_folder_need_explicit_weights(card, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(card / "weights.safetensors", outside)
    _edit_card(card, weights="../elsewhere.safetensors")
    with pytest.raises(ModelError, match=r"weights '../elsewhere.safetensors' lie outside the card's folder"):
        load_model(str(card))
    assert load_model(str(card), str(outside)).weights == str(outside)  # named explicitly: allowed


def test_card_weights_sha256_is_verified(card):
    good = load_model(str(card)).fingerprint
    sd = {k: v.clone() for k, v in load_model(str(card)).module.state_dict().items()}
    first = next(iter(sd))
    sd[first] += 1
    from safetensors.torch import save_file

    save_file(sd, str(card / "weights.safetensors"))  # same shapes, other numbers: a swapped file
    with pytest.raises(ModelError, match=r"have SHA-256 .* but .*model.json records .*: the file was changed or replaced"):
        load_model(str(card))
    assert load_model(str(card), str(card / "weights.safetensors")).fingerprint != good  # explicit: loads


def test_truncated_safetensors_is_one_line(card):
    w = card / "weights.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    _edit_card(card, weights_sha256=None)  # without the digest the file itself is read
    r = runner.invoke(app, ["layers", "--model", str(card)])
    error_line(r, f"cannot read weights {w}: not a complete .safetensors file")
    with pytest.raises(ModelError, match="not a complete .safetensors file"):
        load_model("resnet18", str(w))


# -- run configurations -----------------------------------------------------------------------------
def _toml(tmp_path: Path, section: str, key: str, raw: str) -> Path:
    """A valid run config with ``[section] key = raw`` (raw TOML) added."""
    sections = {"model": {"name": '"m"', "layer": '"layer4"'}, "probe": {"path": '"p"'}, "target": {"path": '"t"'}}
    sections.setdefault(section, {})[key] = raw
    text = 'out = "out"\n' + "".join(f"[{s}]\n" + "".join(f"{k} = {v}\n" for k, v in kv.items())
                                     for s, kv in sections.items())
    p = tmp_path / "run.toml"
    p.write_text(text)
    return p


def test_binary_toml_is_one_line(tmp_path):
    p = tmp_path / "run.toml"
    p.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00binary")
    r = runner.invoke(app, ["run", str(p)])
    error_line(r, f"{p}: not a TOML file (not UTF-8 text")


@pytest.mark.parametrize("section,key,raw,message", [
    ("rank", "top_local", '"ten"', "[rank] top_local must be an integer >= 1, got 'ten' (str)"),
    ("run", "batch_size", "1.5", "[run] batch_size must be an integer >= 1, got 1.5 (float)"),
    ("run", "report", "1", "[run] report must be true or false, got 1 (int)"),
    ("probe", "quantile", "nan", "[probe] quantile must be a number in (0, 1), got nan (float)"),
    ("probe", "categories", "[1, 2]", "[probe] categories must be a list of names"),
    ("evaluate", "configs", '"5:x"', "run.toml: "),
    ("rank", "top_global", "0", "run.toml: --top-local and --top-global must be ≥ 1"),
    ("target", "resize", "100000", "run.toml: --resize must be a number of pixels in [1, 4096]"),
])
def test_toml_field_errors_before_any_stage(tmp_path, section, key, raw, message):
    p = _toml(tmp_path, section, key, raw)
    with pytest.raises(ConceptrankError) as e:
        load_run_config(p)
    assert message in str(e.value)
    r = runner.invoke(app, ["run", str(p)])
    error_line(r, message)
    assert not (tmp_path / "out").exists()  # nothing ran, nothing was created


# -- the CLI's error path -----------------------------------------------------------------------------
def test_os_error_on_a_given_path_is_one_line(tmp_path):
    given = tmp_path / "out"

    def fails(out):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(out / "x.csv"))

    with pytest.raises(typer.Exit):
        _run(fails, given)


def test_os_error_elsewhere_keeps_its_traceback(tmp_path):
    def bug(out):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/nonexistent/internal/file")

    with pytest.raises(FileNotFoundError):
        _run(bug, tmp_path / "out")


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_environment_os_errors_are_one_line_anywhere(code, capsys):
    def fails():
        raise OSError(code, os.strerror(code), "/somewhere/else")

    with pytest.raises(typer.Exit) as e:
        _run(fails)
    assert e.value.exit_code == 2
    assert f"error: /somewhere/else: {os.strerror(code)}" in capsys.readouterr().err


def test_memory_error_is_one_line(capsys):
    def hungry():
        raise MemoryError()

    with pytest.raises(typer.Exit):
        _run(hungry)
    assert "error: out of memory: lower --batch-size" in capsys.readouterr().err


def test_a_bug_keeps_its_traceback():
    def bug():
        raise KeyError("internal")

    with pytest.raises(KeyError):
        _run(bug)


# -- explain output names -----------------------------------------------------------------------------
def test_explain_names_never_collide():
    names = ["a/img 0.jpg", "a/img_0.jpg", "a__img_0.jpg", "a/img_0.png", "a/IMG_0.jpg", "a/b/c.jpg", "a/b__c.jpg",
             "caf\u00e9.jpg", "cafe\u0301.jpg", "x/..hidden.jpg"]
    safe = [_safe_name(n) for n in names]
    assert len(set(safe)) == len(names)
    assert all(s == _safe_name(n) for s, n in zip(safe, names))  # deterministic
    assert all(all(ch.isascii() and (ch.isalnum() or ch in "-_.") for ch in s) and not s.startswith(".") for s in safe)
    assert safe[0].startswith("a__img_0-")


def test_every_toml_key_has_a_checked_type():
    from conceptrank import pipeline

    keys = {k for section in pipeline._SECTIONS.values() for k in section} | {"out"}
    assert keys <= set(pipeline._FIELD_TYPES), keys - set(pipeline._FIELD_TYPES)
