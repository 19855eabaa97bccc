"""The Broden reader on hand-written tables (independent of our writer) and its edge cases."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conceptrank.io.broden import BrodenDataset, BrodenError, decode_mask, encode_mask


def _w(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.lstrip())


def make_handwritten(root: Path) -> Path:
    # label 'glass' (5) is in object and material; material coverage is larger → primary material.
    # label 'wood' (6) is in object and material with equal coverage → later category (material) wins.
    # label number 4 is a gap.
    _w(root / "category.csv", """
name,first,last,count,frequency
color,1,2,2,3
object,3,6,3,3
material,5,6,2,2
scene,7,8,2,2
""")
    _w(root / "label.csv", """
number,name,category,frequency,coverage,syns
1,red-c,color(2),2,0.5,
2,blue-c,color(1),1,0.25,
3,dog,object(2),2,0.5,hound;puppy
5,glass,object(1);material(2),3,0.75,
6,wood,object(1);material(1),2,0.5,
7,street-s,scene(2),2,2.0,
8,park-s,scene(1),1,1.0,
""")
    _w(root / "c_color.csv", "code,number,name,frequency,coverage\n1,1,red-c,2,0.5\n2,2,blue-c,1,0.25\n")
    _w(root / "c_object.csv", "code,number,name,frequency,coverage\n1,3,dog,2,0.5\n2,5,glass,1,0.1\n3,6,wood,1,0.2\n")
    _w(root / "c_material.csv", "code,number,name,frequency,coverage\n1,5,glass,2,0.65\n2,6,wood,1,0.2\n")
    _w(root / "c_scene.csv", "code,number,name,frequency,coverage\n1,7,street-s,2,2.0\n2,8,park-s,1,1.0\n")
    _w(root / "index.csv", """
image,split,ih,iw,sh,sw,color,object,material,scene
a/one.jpg,train,8,8,4,4,a/one_color.png,a/one_object.png;a/one_part2.png,,7
b/c/two.jpg,val,8,8,4,4,,b/c/two_object.png,b/c/two_mat.png,7;8
three.jpg,train,8,8,4,4,,,,
""")
    imgs = root / "images"
    for rel in ["a/one.jpg", "b/c/two.jpg", "three.jpg"]:
        (imgs / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (10, 20, 30)).save(imgs / rel)
    encode_mask(np.array([[1, 1, 0, 0]] * 2 + [[2, 2, 0, 0]] * 2)).save(imgs / "a/one_color.png")
    encode_mask(np.array([[3, 3, 3, 0]] * 4)).save(imgs / "a/one_object.png")
    encode_mask(np.array([[0, 0, 5, 5]] * 4)).save(imgs / "a/one_part2.png")
    encode_mask(np.full((4, 4), 6)).save(imgs / "b/c/two_object.png")
    encode_mask(np.full((4, 4), 5)).save(imgs / "b/c/two_mat.png")
    return root


def test_tables_and_primary_categories(tmp_path):
    ds = BrodenDataset(make_handwritten(tmp_path / "b"))
    assert ds.categories == ["color", "object", "material", "scene"]
    assert ds.label_names[4] == "" and ds.label_names[5] == "glass"  # gap stays empty
    assert ds.labels[3].syns == ("hound", "puppy")
    assert ds.category_of_label(5) == "material"  # larger coverage
    assert ds.category_of_label(6) == "material"  # tie → later category
    assert ds.category_of_label(3) == "object"
    assert ds.category_of_label(7) == "scene"


def test_rows_planes_and_image_level_labels(tmp_path):
    ds = BrodenDataset(make_handwritten(tmp_path / "b"))
    assert len(ds) == 2 and ds.dropped_rows == 1  # three.jpg has no data
    r0, r1 = ds.records
    assert r0.planes == ("a/one_color.png", "a/one_object.png", "a/one_part2.png")
    assert r0.scalars == (7,)
    assert r1.scalars == (7, 8)
    p = ds.load_planes(0)
    assert p.shape == (3, 4, 4)
    assert p[1, 0].tolist() == [3, 3, 3, 0] and p[2, 0].tolist() == [0, 0, 5, 5]  # overlapping planes
    assert ds.load_image(1).size == (8, 8)


def test_category_subset_drops_rows(tmp_path):
    ds = BrodenDataset(make_handwritten(tmp_path / "b"), ["color"])
    assert len(ds) == 1 and ds.dropped_rows == 2
    assert ds.records[0].scalars == ()
    # with object removed, 'glass' and 'wood' still resolve to material
    ds2 = BrodenDataset(tmp_path / "b", ["object", "scene"])
    assert ds2.category_of_label(5) == "object"


def test_grayscale_mask_is_accepted(tmp_path):
    p = tmp_path / "m.png"
    Image.fromarray(np.full((4, 4), 3, np.uint8), "L").save(p)
    assert (decode_mask(p) == 3 + 256 * 3).all()


@pytest.mark.parametrize("bad", ["../escape.png", "/etc/passwd"])
def test_path_traversal_rejected(tmp_path, bad):
    root = make_handwritten(tmp_path / "b")
    idx = (root / "index.csv").read_text().replace("a/one_part2.png", bad)
    (root / "index.csv").write_text(idx)
    with pytest.raises(BrodenError, match="escapes the dataset root"):
        BrodenDataset(root)


def test_scalar_label_absent(tmp_path):
    root = make_handwritten(tmp_path / "b")
    (root / "index.csv").write_text((root / "index.csv").read_text().replace(",7;8", ",7;9"))
    with pytest.raises(BrodenError, match=r"line 3: image-level label 9"):
        BrodenDataset(root)


def test_missing_image_named(tmp_path):
    root = make_handwritten(tmp_path / "b")
    (root / "images" / "b/c/two.jpg").unlink()
    ds = BrodenDataset(root)
    with pytest.raises(BrodenError, match="line 3: image file missing.*two.jpg"):
        ds.load_image(1)


def test_missing_table(tmp_path):
    root = make_handwritten(tmp_path / "b")
    (root / "c_scene.csv").unlink()
    with pytest.raises(BrodenError, match="c_scene.csv"):
        BrodenDataset(root)
