from pathlib import Path

import pytest

from conceptrank.errors import ConceptrankError
from conceptrank.pipeline import load_run_config

ROOT = Path(__file__).resolve().parents[1]


def test_example_config_parses():
    cfg = load_run_config(ROOT / "examples" / "resnet152_broden_stanford40.toml")
    assert cfg.model == "resnet152" and cfg.weights == "IMAGENET1K_V1" and cfg.layer == "layer4"
    assert cfg.categories == ("object", "part", "material", "color")
    assert cfg.resize == 224 and cfg.protocol == "standard"
    assert cfg.probe == ROOT / "examples" / ".." / "data" / "broden1_224"  # relative to the file


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('out = "o"\n[model]\nname = "resnet18"\nlayer = "layer4"\nweigths = "none"\n')
    with pytest.raises(ConceptrankError, match="unknown key 'weigths' in \\[model\\]"):
        load_run_config(p)


def test_missing_required(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('out = "o"\n[model]\nname = "resnet18"\nlayer = "layer4"\n[target]\npath = "t"\n')
    with pytest.raises(ConceptrankError, match="missing required setting 'probe'"):
        load_run_config(p)


def test_existing_tally_replaces_probe(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('out = "o"\n[model]\nname = "resnet18"\nlayer = "layer4"\n'
                 '[probe]\ntally = "nd/tally.csv"\n[target]\npath = "t"\n')
    cfg = load_run_config(p)
    assert cfg.tally == tmp_path / "nd" / "tally.csv" and cfg.probe is None
