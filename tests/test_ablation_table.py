"""benchmarks/ablation_table.py on a fixture BSDS500 layout, with hand-computed scores."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from tests.test_evaluate import H, W, write_bsds_item, write_pred

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "ablation_table.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("ablation_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rows_intervals_and_run_records(tmp_path):
    # Three identical images, annotations: left/right halves, and one segment.
    halves = np.ones((H, W), np.uint16)
    halves[:, W // 2:] = 2
    whole = np.ones((H, W), np.uint16)
    root = tmp_path / "bsds"
    ids = ("1", "2", "3")
    for id_ in ids:
        write_bsds_item(root, "val", id_, [halves, whole])
    stripes = np.zeros((H, W), np.int32)
    stripes[:, 3:9] = 1  # label 0 in two separate strips: 3 connected regions, 2 labels
    for id_ in ids:
        write_pred(tmp_path / "sweep" / "exact" / f"{id_}.png", halves - 1)
        write_pred(tmp_path / "one" / f"{id_}.png", np.zeros((H, W)))
        write_pred(tmp_path / "stripes" / f"{id_}.png", stripes)
    # The run records: a sweep's wall time over its pairs, and each image's iterations.
    (tmp_path / "sweep" / "sweep.json").write_text(json.dumps(
        {"seconds": 12.0, "segmented": 6, "settings": [{"setting": "exact", "images": 3}, {"setting": "x", "images": 3}]}))
    (tmp_path / "sweep" / "exact" / "results.jsonl").write_text("".join(
        json.dumps({"status": "ok", "iterations": it}) + "\n" for it in (10, 20, 60)))

    module = _load_script()
    out = tmp_path / "table"
    assert module.main(["--root", str(root), "--split", "val", "--resamples", "200",
                        "--row", f"exact={tmp_path / 'sweep' / 'exact'}", "--row", f"one={tmp_path / 'one'}",
                        "--row", f"stripes={tmp_path / 'stripes'}", "--connected", "stripes",
                        "--reference", "exact", "--examples", "2", "--draw", "one", "--draw", "exact",
                        "--out", str(out)]) == 0
    rows = {r["label"]: r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    # exact: halves IoU 1, 1 and the whole vs a half 1/2 -> 2.5/3; one label: halves 1/2
    # each, the whole 1 -> 2/3. Every image alike: each bootstrap resample is the same.
    assert rows["exact"]["all"] == pytest.approx(2.5 / 3)
    assert rows["one"]["all"] == pytest.approx(2 / 3)
    assert rows["exact"]["interval_all"] == pytest.approx([2.5 / 3] * 2)
    assert rows["one"]["diff_all"] == pytest.approx(2 / 3 - 2.5 / 3)
    assert rows["one"]["interval_diff_all"] == pytest.approx([2 / 3 - 2.5 / 3] * 2)
    assert "diff_all" not in rows["exact"]
    assert (rows["exact"]["seconds_per_image"], rows["exact"]["mean_iterations"]) == (4.0, 30.0)
    assert rows["one"]["seconds_per_image"] is None and rows["one"]["mean_iterations"] is None
    assert rows["stripes"]["regions_per_image"] == 3 and rows["exact"]["regions_per_image"] == 2
    assert rows["stripes"]["connected"] and not rows["exact"]["connected"]
    table = out.with_suffix(".md").read_text()
    assert "| one | 0.667 [0.667, 0.667] | -0.167 [-0.167, -0.167] |" in table
    assert "stripes (connected regions)" in table
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
