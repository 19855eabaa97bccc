"""`conceptrank fetch conceptnet`: the assertions file is downloaded as is (resume/checksum as for the others)."""

from __future__ import annotations

import gzip

import pytest

from conceptrank.errors import ConceptrankError, DownloadError
from conceptrank.fetch import fetch_dataset, resources
from conceptrank.io.kg import load_kg


def test_registry_entry():
    (r,) = resources("conceptnet")
    assert r.url == "https://s3.amazonaws.com/conceptnet/downloads/2019/edges/conceptnet-assertions-5.7.0.csv.gz"
    assert r.official_url == r.url and r.extract_to == ""


def _mirror(tmp_path):
    src = tmp_path / "mirror"
    src.mkdir()
    line = "/a/[/r/PartOf/,/c/en/wheel/,/c/en/bicycle/]\t/r/PartOf\t/c/en/wheel\t/c/en/bicycle\t{\"weight\": 1.0}\n"
    (src / "conceptnet-assertions-5.7.0.csv.gz").write_bytes(gzip.compress(line.encode(), mtime=0))
    return src


def test_fetch_keeps_the_gzip_records_digest_and_reuses_it_offline(tmp_path):
    src = _mirror(tmp_path)
    to = tmp_path / "data"
    res = fetch_dataset("conceptnet", to, base_url=src.as_uri(), progress=False)
    assert res.root == to / "conceptnet-assertions-5.7.0.csv.gz" and res.root.is_file() and res.downloaded_bytes > 0
    assert "relate --run" in res.summary()
    assert {(e.head, e.relation, e.tail) for e in load_kg(res.root, {"wheel", "bicycle"}).edges} == {("wheel", "PartOf", "bicycle")}
    again = fetch_dataset("conceptnet", to, base_url="http://127.0.0.1:9/", timeout=1, progress=False)
    assert again.downloaded_bytes == 0
    res.root.write_bytes(b"tampered")  # a changed file no longer matches the recorded digest
    with pytest.raises(ConceptrankError):
        fetch_dataset("conceptnet", to, base_url="http://127.0.0.1:9/", timeout=1, progress=False)


def test_offline_fails_fast_naming_the_url_and_destination(tmp_path):
    with pytest.raises(DownloadError) as e:
        fetch_dataset("conceptnet", tmp_path / "d", base_url="http://127.0.0.1:9/", timeout=1, progress=False)
    msg = str(e.value)
    assert "conceptnet-assertions-5.7.0.csv.gz" in msg and str(tmp_path / "d") in msg
