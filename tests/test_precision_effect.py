"""benchmarks/precision_effect.py: scores and label agreement of output folders."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from dynaseg_jax.images import save_labels
from tests.conftest import BSDS, bsds_val_images

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import precision_effect  # noqa: E402


def write_folder(folder: Path, maps: dict) -> Path:
    folder.mkdir()
    lines = []
    for stem, labels in maps.items():
        save_labels(folder / f"{stem}.png", labels)
        lines.append(json.dumps({"stem": stem, "status": "ok", "iterations": 7, "clusters": int(labels.max()) + 1}))
    (folder / "results.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_permuted_labels_agree_and_other_partitions_do_not(tmp_path):
    from PIL import Image
    stems = [p.stem for p in bsds_val_images(2)]
    maps = {}
    for s in stems:
        w, h = Image.open(BSDS / "images" / "val" / f"{s}.jpg").size
        yy, xx = np.mgrid[0:h, 0:w]
        maps[s] = (yy * 3 // h) * 2 + (xx * 2 // w)  # a 3 x 2 grid of regions
    ref = write_folder(tmp_path / "ref", maps)
    permuted = write_folder(tmp_path / "perm", {s: 5 - m for s, m in maps.items()})  # same partition
    halves = write_folder(tmp_path / "halves", {s: (m >= 2).astype(np.int32) for s, m in maps.items()})
    out = tmp_path / "out"
    assert precision_effect.main(["--reference", str(ref), "--seed", str(permuted), "--variant", f"halves={halves}",
                                  "--root", str(BSDS), "--out", str(out)]) == 0
    rows = {r["row"]: r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    ref_row, perm_row, halves_row = rows["reference: float32"], rows["seed perm: float32"], rows["halves"]
    assert ref_row["ari_vs_reference"] == 1.0 and perm_row["ari_vs_reference"] == pytest.approx(1.0)
    assert perm_row["all"] == pytest.approx(ref_row["all"])  # scores ignore label ids
    # Merging the 6 regions into 2 is another partition: agreement below 1.
    assert halves_row["ari_vs_reference"] < 0.9
    assert halves_row["mean_iterations"] == 7 and ref_row["mean_clusters"] == 6


def test_a_folder_without_results_is_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        precision_effect.main(["--reference", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert "no results.jsonl" in capsys.readouterr().err


def test_rows_score_the_images_every_folder_finished(tmp_path):
    from PIL import Image
    stems = [p.stem for p in bsds_val_images(2)]
    maps = {}
    for s in stems:
        w, h = Image.open(BSDS / "images" / "val" / f"{s}.jpg").size
        maps[s] = (np.mgrid[0:h, 0:w][1] * 4 // w).astype(np.int32)
    both = write_folder(tmp_path / "both", maps)
    first = write_folder(tmp_path / "first", {stems[0]: maps[stems[0]]})
    out = tmp_path / "out"
    assert precision_effect.main(["--reference", str(first), "--seed", str(both), "--root", str(BSDS),
                                  "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    # The folder with both images is scored on the first alone, like the other folder.
    assert rows[0]["images"] == rows[1]["images"] == 1 and rows[1]["all"] == pytest.approx(rows[0]["all"])
