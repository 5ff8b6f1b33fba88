"""Tests of dynaseg_jax.evaluate on fixture dataset layouts with a predictions folder."""
import argparse
import json

import numpy as np
import pytest
import scipy.io
from PIL import Image

from dynaseg_jax import evaluate as E
from dynaseg_jax import metrics
from dynaseg_jax.datasets import DatasetError

H, W = 8, 12


def write_pred(path, labels):
    """A 16-bit label PNG, as ``dynaseg segment`` writes predictions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(labels).astype(np.uint16)).save(path)


def write_bsds_item(root, split, id_, annotations):
    img_dir, gt_dir = root / "images" / split, root / "groundTruth" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    gt_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*annotations[0].shape, 3), 128, np.uint8)).save(img_dir / f"{id_}.jpg")
    cell = np.empty((1, len(annotations)), dtype=object)
    for i, seg in enumerate(annotations):
        cell[0, i] = {"Segmentation": seg.astype(np.uint16), "Boundaries": np.zeros(seg.shape, bool)}
    scipy.io.savemat(str(gt_dir / f"{id_}.mat"), {"groundTruth": cell})


@pytest.fixture
def bsds(tmp_path):
    """Three images; annotation A = left/right halves, B = one segment. Predictions are the
    halves for two images, the third is missing."""
    root, pred_dir = tmp_path / "bsds", tmp_path / "pred"
    halves = np.ones((H, W), np.uint16)
    halves[:, W // 2:] = 2
    whole = np.ones((H, W), np.uint16)
    for id_ in ("10", "20", "30"):
        write_bsds_item(root, "val", id_, [halves, whole])
    pred = (halves - 1).astype(np.int32) * 40  # arbitrary label ids
    write_pred(pred_dir / "10.png", pred)
    write_pred(pred_dir / "20.png", pred)
    return root, pred_dir


def test_bsds_scores_hand_worked(bsds):
    root, pred_dir = bsds
    r = E.evaluate_predictions("bsds500", root, "val", pred_dir)
    # A: both halves found exactly (IoU 1, 1); B: the whole image vs a half (IoU 1/2).
    assert r["all"] == pytest.approx(2.5 / 3)
    assert r["fine"] == pytest.approx(1.0)
    assert r["coarse"] == pytest.approx(0.5)
    assert r["mean"] == pytest.approx((2.5 / 3 + 1.0 + 0.5) / 3)
    assert r["hungarian"] == pytest.approx(0.75)  # (1 + 1/2) / 2 per image
    assert (r["images"], r["missing"], r["missing_ids"]) == (2, 1, ["30"])
    assert r["segments"] == 6 and r["protocol"] == "bsds" and r["split"] == "val"
    json.dumps(r)  # serialisable
    assert "mIoU all" in E.format_table(r) and "0.8333" in E.format_table(r)
    assert E.evaluate_predictions("bsds500", root, "val", pred_dir, limit=1)["images"] == 1
    assert "ious" not in r["per_image"]["10"]
    # keep_ious: each image's IoUs per annotation, by hand: A's two halves 1, 1; B's whole 1/2.
    kept = E.evaluate_predictions("bsds500", root, "val", pred_dir, keep_ious=True)
    assert kept["per_image"]["10"]["ious"] == [[1.0, 1.0], [0.5]]
    json.dumps(kept)
    assert metrics.bsds_scores([kept["per_image"][i]["ious"] for i in ("10", "20")])["all"] == r["all"]


def test_bsds_connected_and_resized(tmp_path):
    root, pred_dir = tmp_path / "bsds", tmp_path / "pred"
    stripes = np.repeat(np.array([[1, 2, 3]]), H, 0).repeat(W // 3, 1).astype(np.uint16)
    write_bsds_item(root, "val", "1", [stripes])
    pred = np.where(stripes == 2, 1, 0)  # outer stripes share one label
    write_pred(pred_dir / "1.png", pred)
    plain = E.evaluate_predictions("bsds500", root, "val", pred_dir)
    assert plain["all"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    conn = E.evaluate_predictions("bsds500", root, "val", pred_dir, connected=True)
    assert conn["all"] == pytest.approx(1.0) and conn["connected"]
    write_pred(pred_dir / "1.png", pred[::2, ::2])  # half resolution: nearest upscaling
    assert E.evaluate_predictions("bsds500", root, "val", pred_dir, connected=True)["all"] == pytest.approx(1.0)


def _only_20_scored(r):
    """Image 20 alone scored, as by hand in test_bsds_scores_hand_worked: A's halves found
    exactly (1, 1), B's whole image by a half (1/2)."""
    return r["images"] == 1 and r["all"] == pytest.approx(2.5 / 3) and list(r["per_image"]) == ["20"]


def test_transposed_prediction_fails_that_image_only(bsds):
    root, pred_dir = bsds
    write_pred(pred_dir / "10.png", np.zeros((W, H), np.int32))
    with pytest.raises(ValueError, match="10.png: .*transposed"):  # the library's default
        E.evaluate_predictions("bsds500", root, "val", pred_dir)
    r = E.evaluate_predictions("bsds500", root, "val", pred_dir, on_failure="record")
    assert r["failed"] == 1 and "10.png: " in r["failures"][0] and "transposed" in r["failures"][0]
    assert _only_20_scored(r)


@pytest.mark.parametrize("bad", ["rgb", "garbage", "ground_truth"])
def test_bad_file_fails_that_image_only(bsds, bad, capsys):
    # An unreadable or colour prediction, or a corrupt ground-truth file, is one image's
    # failure, named on one line; the others are scored, and the command exits 1.
    root, pred_dir = bsds
    if bad == "rgb":
        Image.new("RGB", (W, H)).save(pred_dir / "10.png")
        words = "10.png: prediction must be a single-channel"
    elif bad == "garbage":
        (pred_dir / "10.png").write_bytes(b"garbage")
        words = "10.png: not an image file"
    else:
        (root / "groundTruth" / "val" / "10.mat").write_bytes(b"garbage")
        words = "10.mat: "
    with pytest.raises(DatasetError, match=words):
        E.evaluate_predictions("bsds500", root, "val", pred_dir)
    r = E.evaluate_predictions("bsds500", root, "val", pred_dir, on_failure="record")
    assert r["failed"] == 1 and words in r["failures"][0] and _only_20_scored(r)
    parser = E.add_evaluate_arguments(argparse.ArgumentParser(prog="dynaseg evaluate"))
    assert E.run_evaluate(parser.parse_args(["--dataset", "bsds500", "--root", str(root), "--split", "val",
                                             "--pred", str(pred_dir)])) == 1
    captured = capsys.readouterr()
    assert "images failed" in captured.out and "Traceback" not in captured.err
    lines = captured.err.splitlines()
    assert any(line.startswith("dynaseg: error: ") and words in line for line in lines)
    assert "dynaseg: error: 1 of 2 prediction(s) could not be scored" in captured.err
    assert "dynaseg: note: 1 of 3 prediction(s) missing" in captured.err  # 30.png: both are said


def test_protocol_checks(bsds, tmp_path):
    root, pred_dir = bsds
    with pytest.raises(DatasetError, match="does not apply"):
        E.evaluate_predictions("bsds500", root, "val", pred_dir, protocol="cocostuff27")
    with pytest.raises(DatasetError, match="prediction folder does not exist"):
        E.evaluate_predictions("bsds500", root, "val", tmp_path / "nothing")
    r = E.evaluate_predictions("bsds500", root, "val", pred_dir, protocol="none")
    assert r["segments_per_image"] == 2 and r["images"] == 2


def test_voc_best_overlap(tmp_path):
    base, pred_dir = tmp_path / "VOCdevkit" / "VOC2012", tmp_path / "pred"
    (base / "JPEGImages").mkdir(parents=True)
    (base / "SegmentationObject").mkdir()
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    obj = np.zeros((H, W), np.uint8)
    obj[2:6, 2:6] = 1
    obj[2:6, 6] = 255  # void band next to the object
    Image.fromarray(np.full((H, W, 3), 50, np.uint8)).save(base / "JPEGImages" / "a.jpg")
    png = Image.fromarray(obj, mode="P")
    png.putpalette([0, 0, 0, 128, 0, 0] + [224, 224, 192] * 254)
    png.save(base / "SegmentationObject" / "a.png")
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("a\n")
    pred = np.zeros((H, W), np.int32)
    pred[2:6, 2:7] = 3  # covers the object and the void band: void pixels do not count
    write_pred(pred_dir / "a.png", pred)
    r = E.evaluate_predictions("voc2012", tmp_path, "val", pred_dir)
    assert r["miou"] == pytest.approx(1.0) and r["hungarian"] == pytest.approx(1.0)
    assert r["segments"] == 2 and r["protocol"] == "best_overlap"
    pred[2:6, 2:4] = 0  # now half the object is called background
    write_pred(pred_dir / "a.png", pred)
    r = E.evaluate_predictions("voc2012", tmp_path, "val", pred_dir)
    # object (16 px): label 3 has 8 scored px, all inside -> IoU 8/16. Background (76 px):
    # label 0 has 84 scored px (76 + 8 of the object) -> IoU 76/84. Void never counts.
    want = metrics.best_overlap_ious(pred, obj, ignore_labels=(255,)).mean()
    assert r["miou"] == pytest.approx(want) == pytest.approx((0.5 + 76 / 84) / 2)


def make_coco_fixture(root):
    h, w = 40, 64
    (root / "val2017").mkdir(parents=True)
    lab_dir = root / "stuffthingmaps_trainval2017" / "val2017"
    lab_dir.mkdir(parents=True)
    fine = np.full((h, w), 105, np.uint8)  # coarse 23 (stuff)
    fine[:, :36] = 0  # person -> coarse 9 (thing); in the crop 24 columns of 40
    fine[:4] = 255
    Image.fromarray(np.full((h, w, 3), 77, np.uint8)).save(root / "val2017" / "000000000139.jpg")
    Image.fromarray(fine, mode="L").save(lab_dir / "000000000139.png")
    ids = root / "ids.txt"
    ids.write_text("000000000139\n")
    return fine, ids


def test_cocostuff27_perfect_and_full_size_prediction(tmp_path):
    fine, ids = make_coco_fixture(tmp_path)
    pred_dir = tmp_path / "pred"
    full = np.where(fine[:, :] == 0, 5, 8)  # two clusters, ids unrelated to classes
    write_pred(pred_dir / "000000000139.png", full)  # full image size: cropped like the gt
    r = E.evaluate_predictions("cocostuff27", tmp_path, "val", pred_dir, id_list=ids)
    assert r["miou"] == pytest.approx(1.0) and r["pixel_accuracy"] == pytest.approx(1.0)
    assert r["things"] == pytest.approx(1.0) and r["stuff"] == pytest.approx(1.0)
    assert r["images"] == 1 and "pixel accuracy" in E.format_table(r)
    crop = np.zeros((320, 320), np.int32)  # one cluster on the 320 crop: matched to the thing
    write_pred(pred_dir / "000000000139.png", crop)
    r = E.evaluate_predictions("cocostuff27", tmp_path, "val", pred_dir, id_list=ids)
    assert r["things"] == pytest.approx(0.6) and r["stuff"] == pytest.approx(0.0)
    assert r["miou"] == pytest.approx(0.3) and r["pixel_accuracy"] == pytest.approx(0.6)
    write_pred(pred_dir / "000000000139.png", full.T)
    with pytest.raises(ValueError, match="transposed"):
        E.evaluate_predictions("cocostuff27", tmp_path, "val", pred_dir, id_list=ids)


def test_cli_writes_json_atomically(bsds, tmp_path, capsys):
    root, pred_dir = bsds
    parser = E.add_evaluate_arguments(argparse.ArgumentParser(prog="dynaseg evaluate"))
    out = tmp_path / "results" / "scores.json"
    args = parser.parse_args(["--dataset", "bsds500", "--root", str(root), "--split", "val",
                              "--pred", str(pred_dir), "--json", str(out)])
    # One prediction missing (a run over the first images of a split): the others are
    # scored and the count reported; exit 1 only with --strict.
    assert E.run_evaluate(args) == 0
    captured = capsys.readouterr()
    assert "mIoU fine" in captured.out and "1 of 3 prediction(s) missing" in captured.err
    rows = {line.rsplit(None, 1)[0].strip(): line.split()[-1] for line in captured.out.splitlines()}
    assert rows["images scored"] == "2" and rows["predictions missing"] == "1"
    data = json.loads(out.read_text())
    assert data["fine"] == pytest.approx(1.0) and data["missing"] == 1
    assert [p.name for p in out.parent.iterdir()] == ["scores.json"]  # no temp file left
    strict = parser.parse_args(["--dataset", "bsds500", "--root", str(root), "--split", "val",
                                "--pred", str(pred_dir), "--strict"])
    assert E.run_evaluate(strict) == 1
    assert "error: 1 of 3" in capsys.readouterr().err
    write_pred(pred_dir / "30.png", np.zeros((H, W), np.int32))
    assert E.run_evaluate(args) == 0
    bad = parser.parse_args(["--dataset", "bsds500", "--root", str(tmp_path / "nope"),
                             "--pred", str(pred_dir)])
    assert E.run_evaluate(bad) == 2
    assert "does not exist" in capsys.readouterr().err
    assert E.run_evaluate(parser.parse_args(["--dataset", "bsds500", "--root", str(root), "--pred", str(pred_dir),
                                             "--json", str(tmp_path)])) == 2
    assert "is a folder; give a file name" in capsys.readouterr().err
    for limit in ("0", "-1"):
        assert E.run_evaluate(parser.parse_args(["--dataset", "bsds500", "--root", str(root),
                                                 "--pred", str(pred_dir), "--limit", limit])) == 2
        assert f"--limit {limit}: must be >= 1" in capsys.readouterr().err


def test_table_names_a_split_only_where_there_is_one():
    table = E.format_table({"dataset": "folder", "split": None, "protocol": "none",
                            "segments_per_image": 4.0, "images": 2, "missing": 0})
    assert table.splitlines()[0].split() == ["dataset", "folder"]
    assert "None" not in table
    table = E.format_table({"dataset": "bsds500", "split": "val", "protocol": "bsds"})
    assert table.splitlines()[0].split() == ["dataset", "bsds500", "(val)"]
