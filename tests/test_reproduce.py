"""benchmarks/reproduce_bsds500.py end to end on 2 real BSDS500 val images, tiny settings.

The script is not part of the package, so it is loaded from its file. DynaSeg runs with a
tiny network and 3 iterations at scale 0.15: the point is the plumbing (layout, scoring,
reports, resume), not the scores.
"""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
BSDS = Path(__file__).resolve().parents[2] / "shared" / "data" / "bsds500"
SCRIPT = REPO / "benchmarks" / "reproduce_bsds500.py"
# model.conv_impl=lax: on XLA:CPU it compiles faster than im2col, and compilation dominates here.
TINY = ["stop.max_iters=3", "model.n_conv=1", "model.channels=8", "model.max_clusters=8",
        "engine.batch=1", "model.conv_impl=lax", "engine.bucket_multiple=8"]


def _load_script():
    spec = importlib.util.spec_from_file_location("reproduce_bsds500", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    if not (BSDS / "images" / "val").is_dir():
        pytest.skip(f"BSDS500 not found at {BSDS} (the ../shared data folder is absent)")
    return _load_script()


def _argv(out: Path, methods: list[str], *extra: str) -> list[str]:
    return ["--out", str(out), "--root", str(BSDS), "--split", "val", "--limit", "2", "--scale", "0.15",
            "--methods", *methods, *[a for kv in TINY for a in ("--set", kv)], "--examples", "2", *extra]


def _prediction_mtimes(out: Path, methods: list[str]) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for m in methods for p in sorted((out / m).glob("*.png"))}


def test_reproduce_end_to_end_and_resume(script, tmp_path):
    methods = ["kmeans", "dynaseg_scf"]
    try:
        import skimage  # noqa: F401
        methods.insert(1, "felzenszwalb")
    except ImportError:  # the bench extra is optional; the rest still runs
        pass
    out = tmp_path / "run"
    assert script.main(_argv(out, methods)) == 0

    # Layout: <id>.png per method, 16-bit labels at ground-truth size.
    for m in methods:
        labels = [p for p in (out / m).glob("*.png") if not p.stem.endswith("_overlay")]
        assert len(labels) == 2, m
        for p in labels:
            with Image.open(p) as img:
                assert img.mode.startswith("I;16") or img.mode == "I", (p, img.mode)
                assert img.size in ((481, 321), (321, 481)), (p, img.size)
    for name in ("table.md", "results.json", "miou.png", "clusters.png", "examples.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name

    report = json.loads((out / "results.json").read_text())
    assert report["settings"]["split"] == "val" and report["settings"]["images"] == 2
    assert list(report["methods"]) == methods
    for m, r in report["methods"].items():
        for variant in ("plain", "connected"):
            sc = r["scores"][variant]
            assert sc["images"] == 2 and sc["missing"] == 0, (m, variant)
            for key in ("all", "fine", "coarse", "mean", "hungarian"):
                assert 0.0 <= sc[key] <= 1.0, (m, variant, key, sc[key])
            assert math.isclose(sc["mean"], (sc["all"] + sc["fine"] + sc["coarse"]) / 3)
        assert len(r["clusters"]) == 2 and all(c >= 1 for c in r["clusters"].values())
        assert r["this_run"]["segmented"] == 2
    assert report["methods"]["kmeans"]["paper"]["mean"] == pytest.approx(0.242)
    assert max(report["methods"]["kmeans"]["clusters"].values()) <= 5  # fixed k, never from ground truth
    assert len(report["gt_clusters"]) == 2 and all(g > 1 for g in report["gt_clusters"].values())
    table = (out / "table.md").read_text()
    for m in methods:
        assert f"| {m} |" in table
    assert "0.342" in table  # the paper's DynaSeg-SCF mean, next to ours

    # A rerun reuses every prediction: nothing is rewritten, the report is rebuilt.
    before = _prediction_mtimes(out, methods)
    assert script.main(_argv(out, methods)) == 0
    assert _prediction_mtimes(out, methods) == before
    again = json.loads((out / "results.json").read_text())
    for m in methods:
        assert again["methods"][m]["this_run"]["segmented"] == 0
        assert again["methods"][m]["this_run"]["reused"] == 2
        assert again["methods"][m]["timing"]["runs"] == 2
        for v in ("plain", "connected"):  # same predictions, same scores
            for k in ("all", "fine", "coarse", "mean", "hungarian"):
                assert again["methods"][m]["scores"][v][k] == report["methods"][m]["scores"][v][k]


def test_rerun_with_other_settings_is_refused(script, tmp_path):
    out = tmp_path / "run"
    fast = ["--methods", "kmeans", "--no-plots", "--no-connected"]
    base = ["--out", str(out), "--root", str(BSDS), "--split", "val", "--limit", "1", "--scale", "0.1"]
    assert script.main(base + fast) == 0
    # Another k would silently mix two baselines in one folder: refused, nothing written.
    mtimes = _prediction_mtimes(out, ["kmeans"])
    with pytest.raises(SystemExit, match="other settings"):
        script.main(base + fast + ["--kmeans-k", "7"])
    assert _prediction_mtimes(out, ["kmeans"]) == mtimes
