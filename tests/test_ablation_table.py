"""benchmarks/ablation_table.py on a fixture BSDS500 layout, with hand-computed scores."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from dynaseg_jax import metrics

from tests.test_evaluate import H, W, write_bsds_item, write_pred

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "ablation_table.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("ablation_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rows_intervals_and_run_records(tmp_path):
    # Four images, annotations: left/right halves, and one segment. "exact" predicts the
    # halves on three of them and one label on the fourth; "one" one label everywhere.
    halves = np.ones((H, W), np.uint16)
    halves[:, W // 2:] = 2
    whole = np.ones((H, W), np.uint16)
    root = tmp_path / "bsds"
    ids = ("1", "2", "3", "4")
    for id_ in ids:
        write_bsds_item(root, "val", id_, [halves, whole])
    stripes = np.zeros((H, W), np.int32)
    stripes[:, 3:9] = 1  # label 0 in two separate strips: 3 connected regions, 2 labels
    for id_ in ids:
        write_pred(tmp_path / "sweep" / "exact" / f"{id_}.png", halves - 1 if id_ != "4" else np.zeros((H, W)))
        write_pred(tmp_path / "one" / f"{id_}.png", np.zeros((H, W)))
        write_pred(tmp_path / "stripes" / f"{id_}.png", stripes)
    # The run records: a sweep's wall time over its pairs, and each image's iterations.
    (tmp_path / "sweep" / "sweep.json").write_text(json.dumps(
        {"seconds": 16.0, "segmented": 8, "settings": [{"setting": "exact", "images": 4}, {"setting": "x", "images": 4}]}))
    (tmp_path / "sweep" / "exact" / "results.jsonl").write_text("".join(
        json.dumps({"status": "ok", "iterations": it}) + "\n" for it in (10, 20, 60, 30)))

    module = _load_script()
    out = tmp_path / "table"
    assert module.main(["--root", str(root), "--split", "val", "--resamples", "200",
                        "--row", f"exact={tmp_path / 'sweep' / 'exact'}", "--row", f"one={tmp_path / 'one'}",
                        "--row", f"stripes={tmp_path / 'stripes'}", "--connected", "stripes",
                        "--reference", "exact", "--examples", "2", "--draw", "one", "--draw", "exact",
                        "--out", str(out)]) == 0
    rows = {r["label"]: r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    # Per image and annotation, by hand: the halves found exactly give IoUs [1, 1] and the
    # whole against a half [1/2]; one label gives [1/2, 1/2] and [1].
    found, merged = [[1.0, 1.0], [0.5]], [[0.5, 0.5], [1.0]]
    exact, one = [found, found, found, merged], [merged] * 4
    assert rows["exact"]["all"] == pytest.approx((3 * 2.5 + 2) / 12)
    assert rows["one"]["all"] == pytest.approx(2 / 3)
    # The intervals: the same resampling (seed 0, 200 resamples) of the hand-made lists.
    assert rows["exact"]["interval_all"] == list(metrics.bootstrap_interval(exact, n_resamples=200))
    assert rows["one"]["interval_diff_all"] == list(metrics.bootstrap_interval(one, exact, n_resamples=200))
    assert rows["one"]["diff_all"] == pytest.approx(2 / 3 - 9.5 / 12)
    lo, hi = rows["exact"]["interval_all"]
    assert lo < rows["exact"]["all"] < hi  # the images differ: a real interval
    assert "diff_all" not in rows["exact"]
    assert (rows["exact"]["seconds_per_image"], rows["exact"]["mean_iterations"]) == (4.0, 30.0)
    assert rows["one"]["seconds_per_image"] is None and rows["one"]["mean_iterations"] is None
    assert rows["stripes"]["regions_per_image"] == 3 and rows["exact"]["regions_per_image"] == (3 * 2 + 1) / 4
    assert rows["stripes"]["connected"] and not rows["exact"]["connected"]
    table = out.with_suffix(".md").read_text()
    assert "| one | 0.667 [0.667, 0.667] | -0.125 [" in table
    assert "stripes, split into connected regions" in table
    from PIL import Image
    with Image.open(out.with_suffix(".png")) as picture:  # the examples grid: 2 images x (2 + 2 rows drawn)
        assert picture.format == "PNG" and picture.width > picture.height


def test_a_row_missing_images_is_an_error(tmp_path):
    root = tmp_path / "bsds"
    seg = np.ones((H, W), np.uint16)
    for id_ in ("1", "2"):
        write_bsds_item(root, "val", id_, [seg])
    write_pred(tmp_path / "p" / "1.png", np.zeros((H, W)))
    with pytest.raises(SystemExit, match="1 images have no prediction"):
        _load_script().main(["--root", str(root), "--row", f"p={tmp_path / 'p'}", "--out", str(tmp_path / "t")])


def test_unknown_labels_are_errors_before_any_scoring(tmp_path, capsys):
    (tmp_path / "p").mkdir()
    for extra in (["--connected", "q"], ["--draw", "q"], ["--reference", "q"], ["--row", f"p={tmp_path}"]):
        with pytest.raises(SystemExit):
            _load_script().main(["--row", f"p={tmp_path / 'p'}", "--out", str(tmp_path / "t"), *extra])
        err = capsys.readouterr().err
        assert ("share a label" if extra[0] == "--row" else f"{extra[0]} 'q' is not a row label") in err
