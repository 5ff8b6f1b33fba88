"""Tests of dynaseg_jax.datasets on small fixtures written in the official file formats."""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import require
import scipy.io
from PIL import Image

from dynaseg_jax import datasets as D

REAL_BSDS = Path(__file__).resolve().parents[2] / "shared" / "data" / "bsds500"

# ---------------------------------------------------------------- fixture writers (official formats)


def write_jpg(path, rgb):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, quality=95)


def write_bsds_mat(path, annotations):
    """A groundTruth .mat as the official release stores it: a 1 x N cell array of structs
    with uint16 ``Segmentation`` (labels from 1) and logical ``Boundaries``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cell = np.empty((1, len(annotations)), dtype=object)
    for i, seg in enumerate(annotations):
        bnd = np.zeros(seg.shape, np.uint8)
        bnd[:-1] |= seg[:-1] != seg[1:]
        cell[0, i] = {"Segmentation": seg.astype(np.uint16), "Boundaries": bnd.astype(bool)}
    scipy.io.savemat(str(path), {"groundTruth": cell})


def make_bsds(root, split="val", ids=("2001", "1001"), shape=(12, 18), n_ann=(3, 5), seed=0):
    """A tiny BSDS500 layout; returns {id: (rgb, annotations)}."""
    rng = np.random.default_rng(seed)
    made = {}
    for k, id_ in enumerate(ids):
        # smooth colours: JPEG keeps them within a few levels (noise would not survive)
        yy, xx = np.mgrid[: shape[0], : shape[1]]
        rgb = np.stack([yy * 8 + 10 * k, xx * 8, np.full(shape, 60 + 40 * k)], -1).clip(0, 255).astype(np.uint8)
        anns = [rng.integers(1, 2 + j, shape).astype(np.uint16) for j in range(n_ann[k % len(n_ann)])]
        write_jpg(root / "images" / split / f"{id_}.jpg", rgb)
        write_bsds_mat(root / "groundTruth" / split / f"{id_}.mat", anns)
        made[id_] = (rgb, anns)
    return made


def voc_palette():
    # The VOC colour map (bit-interleaved), as the official devkit builds it.
    pal = np.zeros((256, 3), np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal.ravel().tolist()


def write_palette_png(path, labels):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    img.putpalette(voc_palette())
    img.save(path)


def make_voc(base, ids=("2007_000032", "2007_000039"), shape=(10, 14), split="val"):
    """A tiny VOC2012 folder at ``base``; returns {id: object map}."""
    rng = np.random.default_rng(1)
    made = {}
    for id_ in ids:
        write_jpg(base / "JPEGImages" / f"{id_}.jpg", rng.integers(0, 256, (*shape, 3), dtype=np.uint8))
        obj = rng.integers(0, 4, shape)
        obj[0, :] = 255  # void border
        write_palette_png(base / "SegmentationObject" / f"{id_}.png", obj)
        write_palette_png(base / "SegmentationClass" / f"{id_}.png", np.where(obj == 255, 255, obj * 5))
        made[id_] = obj
    lists = base / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True, exist_ok=True)
    (lists / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return made


def make_coco(root, ids=("000000000139", "000000000632"), shape=(40, 64)):
    """A tiny COCO-Stuff layout (val2017 + stuffthingmaps) and its curated list."""
    made = {}
    h, w = shape
    for k, id_ in enumerate(ids):
        sh = (h, w) if k % 2 == 0 else (w, h)  # one landscape, one portrait
        write_jpg(root / "val2017" / f"{id_}.jpg", np.full((*sh, 3), 90 + k, np.uint8))
        fine = np.zeros(sh, np.uint8)
        fine[:, : sh[1] // 2] = 0  # person -> coarse 9
        fine[:, sh[1] // 2:] = 105  # stuff class -> coarse 23
        fine[: sh[0] // 4] = 255
        path = root / "stuffthingmaps_trainval2017" / "val2017" / f"{id_}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(fine, mode="L").save(path)
        made[id_] = fine
    id_list = root / "my_curated.txt"
    id_list.write_text("\n".join(ids) + "\n")
    return made, id_list


# ---------------------------------------------------------------- BSDS500


def test_bsds_fixture_roundtrip(tmp_path):
    made = make_bsds(tmp_path)
    assert D.list_ids("bsds500", tmp_path, "val") == ["1001", "2001"]
    records = list(D.read_bsds500(tmp_path, "val"))
    assert [r.id for r in records] == ["1001", "2001"]
    for rec in records:
        rgb, anns = made[rec.id]
        assert rec.image.dtype == np.uint8 and rec.image.shape == rgb.shape
        assert np.abs(rec.image.astype(int) - rgb).mean() < 6  # JPEG, lossy
        assert len(rec.ground_truth) == len(anns)
        for got, want in zip(rec.ground_truth, anns):
            assert got.dtype == np.int32
            np.testing.assert_array_equal(got, want)


def test_bsds_official_tree_and_limit(tmp_path):
    make_bsds(tmp_path / "BSR" / "BSDS500" / "data")
    assert [r.id for r in D.iter_records("bsds500", tmp_path, "val", limit=1)] == ["1001"]


def test_bsds_errors_name_the_file(tmp_path):
    make_bsds(tmp_path)
    mat = tmp_path / "groundTruth" / "val" / "1001.mat"
    mat.unlink()
    with pytest.raises(D.DatasetError, match="1001.mat: missing"):
        D.load_record("bsds500", tmp_path, "val", "1001")
    mat.write_bytes(b"not a mat file at all")
    with pytest.raises(D.DatasetError, match="1001.mat"):
        D.load_record("bsds500", tmp_path, "val", "1001")
    scipy.io.savemat(str(mat), {"something": np.zeros(3)})
    with pytest.raises(D.DatasetError, match="1001.mat: no 'groundTruth'"):
        D.load_record("bsds500", tmp_path, "val", "1001")
    write_bsds_mat(mat, [np.ones((5, 5), np.uint16)])
    with pytest.raises(D.DatasetError, match="1001.mat: ground truth is 5x5"):
        D.load_record("bsds500", tmp_path, "val", "1001")
    (tmp_path / "images" / "val" / "2001.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(D.DatasetError, match="2001.jpg"):
        D.load_record("bsds500", tmp_path, "val", "2001")
    with pytest.raises(D.DatasetError, match="images/test: missing"):
        D.list_ids("bsds500", tmp_path, "test")
    with pytest.raises(D.DatasetError, match="unknown split"):
        D.list_ids("bsds500", tmp_path, "dev")


def test_bsds_image_with_exif_orientation_keeps_its_stored_layout(tmp_path):
    # Dataset ground truth is aligned with the stored pixels: the readers (and header_size)
    # must not apply the EXIF orientation that images.load_image applies to users' files.
    from dynaseg_jax import images as imio
    made = make_bsds(tmp_path)
    rgb, anns = made["1001"]
    path = tmp_path / "images" / "val" / "1001.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 deg clockwise to view"
    Image.fromarray(rgb).save(path, quality=95, exif=exif)
    rec = D.load_record("bsds500", tmp_path, "val", "1001")
    assert rec.image.shape == rgb.shape == (*anns[0].shape, 3)
    assert rec.ground_truth[0].shape == rgb.shape[:2]
    assert np.abs(rec.image.astype(int) - rgb).mean() < 6  # not rotated (JPEG, lossy)
    assert D.header_size(path) == rgb.shape[:2]
    assert imio.image_size(path) == imio.load_image(path).shape[:2] == rgb.shape[1::-1]  # the user path does


@pytest.mark.skipif(not REAL_BSDS.is_dir(), reason=f"real BSDS500 not found at {REAL_BSDS}")
def test_real_bsds500_val_images():
    ids = D.list_ids("bsds500", REAL_BSDS, "val")
    assert len(ids) == 100
    for rec in D.iter_records("bsds500", REAL_BSDS, "val", ids=ids[:2]):
        assert rec.image.dtype == np.uint8 and rec.image.shape[2] == 3
        assert sorted(rec.image.shape[:2]) == [321, 481]
        assert 4 <= len(rec.ground_truth) <= 8
        for seg in rec.ground_truth:
            assert seg.shape == rec.image.shape[:2] and seg.min() == 1


@pytest.mark.skipif(not REAL_BSDS.is_dir(), reason=f"real BSDS500 not found at {REAL_BSDS}")
def test_fixture_mat_has_the_real_structure(tmp_path):
    real = scipy.io.loadmat(str(next((REAL_BSDS / "groundTruth" / "val").glob("*.mat"))))["groundTruth"]
    write_bsds_mat(tmp_path / "x.mat", [np.ones((4, 4), np.uint16)] * 2)
    fake = scipy.io.loadmat(str(tmp_path / "x.mat"))["groundTruth"]
    assert fake.dtype == real.dtype == object and fake.shape[0] == real.shape[0] == 1
    assert fake[0, 0].dtype.names == real[0, 0].dtype.names
    assert fake[0, 0]["Segmentation"][0, 0].dtype == real[0, 0]["Segmentation"][0, 0].dtype


# ---------------------------------------------------------------- VOC2012


@pytest.mark.parametrize("level", ["VOC2012", "VOCdevkit", "parent"])
def test_voc_layout_levels(tmp_path, level):
    base = tmp_path / "VOCdevkit" / "VOC2012"
    made = make_voc(base)
    root = {"VOC2012": base, "VOCdevkit": tmp_path / "VOCdevkit", "parent": tmp_path}[level]
    records = list(D.read_voc2012(root, "val"))
    assert [r.id for r in records] == ["2007_000032", "2007_000039"]  # list order
    for rec in records:
        np.testing.assert_array_equal(rec.ground_truth, made[rec.id])
        assert 255 in rec.ground_truth and rec.image.shape == (10, 14, 3)


def test_voc_errors(tmp_path):
    base = tmp_path / "VOC2012"
    make_voc(base)
    with pytest.raises(D.DatasetError, match="train.txt: missing id list"):
        D.list_ids("voc2012", base, "train")
    Image.new("RGB", (14, 10)).save(base / "SegmentationObject" / "2007_000032.png")
    with pytest.raises(D.DatasetError, match="2007_000032.png: .*mode RGB"):
        D.load_record("voc2012", base, "val", "2007_000032")
    (base / "SegmentationObject" / "2007_000039.png").unlink()
    with pytest.raises(D.DatasetError, match="2007_000039.png: no such file"):
        D.load_record("voc2012", base, "val", "2007_000039")
    with pytest.raises(D.DatasetError, match="not a PASCAL VOC"):
        D.list_ids("voc2012", tmp_path / "VOC2012" / "JPEGImages", "val")


# ---------------------------------------------------------------- COCO-Stuff-27


def test_fine_to_coarse_table():
    table = D.fine_to_coarse_table()
    spec = json.loads((Path(D.__file__).parent / "data" / "cocostuff_fine_to_coarse.json").read_text())
    assert len(spec["fine_to_coarse"]) == 182 and "STEGO" in spec["source"]
    assert table[255] == 255 and table[200] == -1
    assert set(table[:91]) <= set(range(12)) and set(table[91:182]) <= set(range(12, 27))
    assert set(table[:182]) == set(range(27))
    assert table[0] == 9 and table[105] == 23  # person -> person; a stuff class


def test_coco_resize_crop_and_mapping(tmp_path):
    made, id_list = make_coco(tmp_path)
    ids = D.list_ids("cocostuff27", tmp_path, "val", id_list=id_list)
    assert ids == ["000000000139", "000000000632"]
    table = D.fine_to_coarse_table()
    for rec in D.read_cocostuff27(tmp_path, "val", id_list=id_list):
        assert rec.image.shape == (320, 320, 3) and rec.image.dtype == np.uint8
        assert rec.ground_truth.shape == (320, 320)
        assert (rec.image == rec.image[0, 0]).all()  # a flat image stays flat under bilinear
        coarse = table[made[rec.id]]
        # 40x64 -> 320x512 is an exact 8x nearest upscale; the centre crop starts 96 px in
        up = np.kron(coarse, np.ones((8, 8), np.int32))
        want = up[:, 96:416] if up.shape[1] > up.shape[0] else up[96:416, :]
        np.testing.assert_array_equal(rec.ground_truth, want)
        assert set(np.unique(rec.ground_truth)) == {9, 23, 255}


def test_coco_resize_crop_downscale_shape():
    lab = np.arange(50 * 30).reshape(50, 30)
    out = D.coco_resize_crop(lab, 20)
    assert out.shape == (20, 20) and out.dtype == np.int32
    assert set(np.unique(out)) <= set(np.unique(lab))  # nearest: no new labels


def test_coco_errors(tmp_path):
    made, id_list = make_coco(tmp_path)
    with pytest.raises(D.DatasetError, match="Coco164kFull_Stuff_Coarse_7.txt"):
        D.list_ids("cocostuff27", tmp_path, "val")
    curated = tmp_path / "curated" / "val2017" / "Coco164kFull_Stuff_Coarse_7.txt"
    curated.parent.mkdir(parents=True)
    curated.write_text("000000000632\n")
    assert D.list_ids("cocostuff27", tmp_path, "val") == ["000000000632"]
    bad = tmp_path / "stuffthingmaps_trainval2017" / "val2017" / "000000000139.png"
    Image.fromarray(np.full((40, 64), 200, np.uint8), mode="L").save(bad)
    with pytest.raises(D.DatasetError, match="000000000139.png: fine labels \\[200\\]"):
        D.load_record("cocostuff27", tmp_path, "val", "000000000139", id_list=id_list)
    Image.fromarray(np.zeros((41, 64), np.uint8), mode="L").save(bad)
    with pytest.raises(D.DatasetError, match="000000000139.png: label map is 41x64"):
        D.load_record("cocostuff27", tmp_path, "val", "000000000139", id_list=id_list)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(D.DatasetError, match="empty.txt: id list is empty"):
        D.list_ids("cocostuff27", tmp_path, "val", id_list=empty)


# ---------------------------------------------------------------- folders and dispatch


def test_folder(tmp_path):
    write_jpg(tmp_path / "b.jpg", np.zeros((4, 5, 3), np.uint8))
    Image.fromarray(np.full((3, 3), 7, np.uint8), mode="L").save(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("not an image")
    records = list(D.read_folder(tmp_path))
    assert [r.id for r in records] == ["a", "b"]
    assert records[0].image.shape == (3, 3, 3) and records[0].ground_truth is None
    write_jpg(tmp_path / "a.jpeg", np.zeros((4, 5, 3), np.uint8))
    with pytest.raises(D.DatasetError, match="share the id 'a'"):
        D.list_ids("folder", tmp_path)


def test_unknown_dataset_and_missing_root(tmp_path):
    with pytest.raises(D.DatasetError, match="unknown dataset"):
        D.list_ids("imagenet", tmp_path)
    with pytest.raises(D.DatasetError, match="does not exist"):
        D.list_ids("bsds500", tmp_path / "nope", "val")


# ---------------------------------------------------------------- TFDS (ArrayRecord, no TensorFlow)


def test_bsds500_tfds_builder_roundtrip(tmp_path):
    # The test command installs the tfds extra: in CI this test must run, not skip.
    require("tensorflow_datasets")
    require("array_record")
    manual = tmp_path / "manual"
    made = make_bsds(manual, split="val", ids=("3", "1", "2"), n_ann=(4, 5, 6))
    make_bsds(manual, split="train", ids=("9",), seed=3)
    builder = D.bsds500_tfds_builder(manual, tmp_path / "tfds")
    assert sorted(builder.info.splits.keys()) == ["train", "val"]
    assert list((tmp_path / "tfds" / "bsds500" / "1.0.0").glob("bsds500-val.array_record-*"))
    source = builder.as_data_source()
    assert len(source["val"]) == 3 and len(source["train"]) == 1
    records = {r.id: r for r in D.read_bsds500_tfds(manual, tmp_path / "tfds", "val")}
    direct = {r.id: r for r in D.read_bsds500(manual, "val")}
    assert sorted(records) == ["1", "2", "3"]
    for id_, rec in records.items():
        np.testing.assert_array_equal(rec.image, direct[id_].image)  # same decoded JPEG
        assert len(rec.ground_truth) == len(made[id_][1])
        for got, want in zip(rec.ground_truth, made[id_][1]):
            np.testing.assert_array_equal(got, want)
    if importlib.util.find_spec("tensorflow") is None:
        assert "tensorflow" not in sys.modules  # the whole path ran without TensorFlow


def test_tfds_reader_names_its_extra_when_missing(tmp_path, monkeypatch):
    # A None entry in sys.modules makes the import fail, as when the extra is absent.
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    D._bsds500_builder_class.cache_clear()
    try:
        with pytest.raises(D.DatasetError, match=r"pip install 'dynaseg_jax\[tfds\]'"):
            D.bsds500_tfds_builder(tmp_path, tmp_path / "tfds")
    finally:
        D._bsds500_builder_class.cache_clear()
