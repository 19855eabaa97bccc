"""Knowledge-graph readers on fixtures in the exact real formats, and their bad-input behaviour."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest

from conceptrank.errors import KnowledgeGraphError
from conceptrank.io.kg import detect_format, load_kg, map_concepts, normalise_concept, read_overrides
from conceptrank.io.kg.conceptnet import read_conceptnet

FIX = Path(__file__).parent / "fixtures" / "kg"
CN = FIX / "conceptnet-sample.csv.gz"
TERMS = {"wheel", "bicycle", "road", "red", "green", "fire_truck"}


def _edges(res):
    return {(e.head, e.relation, e.tail): e for e in res.edges}


def test_conceptnet_filters_english_merges_and_counts():
    res = read_conceptnet(CN, TERMS)
    e = _edges(res)
    assert set(e) == {
        ("wheel", "PartOf", "bicycle"), ("bicycle", "AtLocation", "road"), ("fire_truck", "HasProperty", "red"),
        ("road", "dbpedia/genre", "bicycle"), ("red", "Antonym", "green"), ("wheel", "LooksLike", "road"),
        ("bicycle", "NotHasProperty", "red"),
    }
    merged = e[("wheel", "PartOf", "bicycle")]
    assert merged.weight == 2.0 and merged.source == "/d/conceptnet/4/en|/d/verbosity"
    assert res.lines == 14 and res.kept == 8
    assert res.other_language == 3  # Abkhaz line, French end, URL end
    assert res.malformed == 2 and [n for n, _ in res.malformed_lines] == [9, 12]
    assert res.unknown_relations == {"LooksLike": 1}
    assert res.matched_terms == TERMS


def test_conceptnet_cache_is_keyed_by_dump_and_terms(tmp_path):
    cache = tmp_path / "cache"
    first = read_conceptnet(CN, TERMS, cache)
    again = read_conceptnet(CN, TERMS, cache)
    assert not first.cached and again.cached
    assert again.edges == first.edges and again.malformed_lines == first.malformed_lines
    assert again.digest == first.digest and len(first.digest) == 64
    other = read_conceptnet(CN, TERMS - {"road"}, cache)
    assert not other.cached and ("bicycle", "AtLocation", "road") not in _edges(other)
    copy = tmp_path / "copy.csv.gz"
    shutil.copy(CN, copy)
    with gzip.open(copy, "ab") as f:  # a changed dump is filtered again
        f.write(b"/a/[x]\t/r/IsA\t/c/en/wheel\t/c/en/road\t{\"weight\": 1.0}\n")
    changed = read_conceptnet(copy, TERMS, cache)
    assert not changed.cached and ("wheel", "IsA", "road") in _edges(changed)


def test_truncated_gzip_names_the_file(tmp_path):
    data = CN.read_bytes()
    bad = tmp_path / "cut.csv.gz"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(KnowledgeGraphError, match=r"cut\.csv\.gz.*truncated"):
        read_conceptnet(bad, TERMS)


def test_not_utf8_names_file_and_line(tmp_path):
    lines = gzip.decompress(CN.read_bytes()).split(b"\n")
    lines[3] = lines[3].replace(b"road", b"ro\xffad")
    bad = tmp_path / "latin.csv.gz"
    bad.write_bytes(gzip.compress(b"\n".join(lines)))
    with pytest.raises(KnowledgeGraphError, match=r"latin\.csv\.gz: line 4 is not UTF-8"):
        read_conceptnet(bad, TERMS)


def test_not_gzip_is_a_clear_error(tmp_path):
    bad = tmp_path / "plain.csv.gz"
    bad.write_text("hello\n")
    with pytest.raises(KnowledgeGraphError, match="plain.csv.gz"):
        read_conceptnet(bad, TERMS)


def test_kgtk_labels_relations_and_malformed():
    res = load_kg(FIX / "cskg-sample.tsv", {"wheel", "bicycle", "machine", "road", "wet", "red", "fire_truck", "steering_wheel"})
    assert res.format == "kgtk"
    e = _edges(res)
    assert set(e) == {("wheel", "PartOf", "bicycle"), ("wheel", "IsA", "machine"), ("steering_wheel", "IsA", "machine"),
                      ("road", "MayHaveProperty", "wet"), ("fire_truck", "fn:HasFrameElement", "red")}
    assert res.unknown_relations == {"fn:HasFrameElement": 1}
    assert res.other_language == 1
    assert res.malformed == 1 and res.malformed_lines[0][0] == 7


def test_kgtk_without_header_is_refused(tmp_path):
    bad = tmp_path / "noheader.tsv"
    bad.write_text("/c/en/a\t/r/IsA\t/c/en/b\n")
    with pytest.raises(KnowledgeGraphError, match=r"noheader\.tsv: line 1 is not a KGTK header"):
        load_kg(bad, {"a", "b"})


def test_detect_format(tmp_path):
    assert detect_format(CN)[0] == "conceptnet"
    assert detect_format(FIX / "cskg-sample.tsv")[0] == "kgtk"
    d = tmp_path / "one"
    d.mkdir()
    shutil.copy(CN, d / "knowledge.csv.gz")
    assert detect_format(d) == ("conceptnet", d / "knowledge.csv.gz")
    with pytest.raises(KnowledgeGraphError, match="no such file"):
        detect_format(tmp_path / "missing.csv.gz")
    with pytest.raises(KnowledgeGraphError, match="--kg-format"):
        load_kg(CN, TERMS, fmt="rdf")


def test_normalisation_and_overrides(tmp_path):
    assert normalise_concept("green-c") == "green"
    assert normalise_concept("ocean-s") == "ocean"
    assert normalise_concept("Traffic Light") == "traffic_light"
    assert normalise_concept("fire-hydrant") == "fire_hydrant"
    ov = tmp_path / "map.csv"
    ov.write_text("concept,term\nrim,wheel_rim\ncore,\n")
    m = map_concepts(["rim", "core", "red-c", "ocean-s"], read_overrides(ov))
    assert m.terms == {"rim": "wheel_rim", "core": "", "red-c": "red", "ocean-s": "ocean"}
    assert m.overridden == ("core", "rim")
    assert m.unmatched({"red", "wheel_rim"}) == ("core", "ocean-s")
    bad = tmp_path / "bad.csv"
    bad.write_text("name,kg\nx,y\n")
    with pytest.raises(KnowledgeGraphError, match="bad.csv: line 1"):
        read_overrides(bad)


WORDNET = Path("/usr/share/wordnet")


@pytest.mark.skipif(not (WORDNET / "data.noun").is_file(), reason="Debian's wordnet-base is not installed (.ci/run installs it)")
def test_wordnet_base_without_lexnames():
    pytest.importorskip("nltk")
    assert not (WORDNET / "lexnames").exists()
    res = load_kg(WORDNET, {"wheel", "rim", "bicycle", "vehicle", "car", "window", "circle", "shape", "glass", "xyzzy"})
    e = set((x.head, x.relation, x.tail) for x in res.edges)
    assert res.format == "wordnet"
    assert {("rim", "PartOf", "wheel"), ("window", "PartOf", "car"), ("bicycle", "IsA", "vehicle"),
            ("circle", "IsA", "shape")} <= e
    assert "xyzzy" not in res.matched_terms and "wheel" in res.matched_terms
