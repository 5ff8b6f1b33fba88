"""``dynaseg sweep``: grid parsing, one engine run for all (image, setting) pairs whose
labels equal single ``segment`` runs, resume, scoring against ground truth."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from dynaseg_jax import images as imio
from dynaseg_jax.cli import main
from dynaseg_jax.config import ConfigError
from dynaseg_jax.metrics import relabel_connected
from dynaseg_jax.sweep import expand, parse_grid, split_values
from tests.conftest import smooth_image, tiny_toml
from tests.test_datasets import make_bsds

TINY = tiny_toml(max_iters=12, k_min=3, strategy="vmap", batch=3)


def test_grid_parsing(tiny_config):
    assert split_values("10,15,50") == [10, 15, 50]
    assert split_values("[2,12],[2, 8]") == [[2, 12], [2, 8]]
    assert split_values('fsf,scf,"a,b"') == ["fsf", "scf", "a,b"]
    grid = parse_grid(["schedule.alpha=10,15", "seed=0,1", "schedule.kind=fsf"])
    assert grid == {"schedule.alpha": [10, 15], "seed": [0, 1], "schedule.kind": ["fsf"]}
    settings = expand(tiny_config, grid)
    assert [s.name for s in settings][:2] == ["schedule.alpha_10__seed_0__schedule.kind_fsf",
                                             "schedule.alpha_10__seed_1__schedule.kind_fsf"]
    # Values that resolve to the same config are run once: alpha 10 and 10.0.
    assert len(expand(tiny_config, parse_grid(["schedule.alpha=10,10.0,15"]))) == 2
    with pytest.raises(ConfigError, match="^--grid: seed = 'a': expected an integer"):
        expand(tiny_config, parse_grid(["seed=a,b"]))
    for bad, msg in (("optim.lr", "expected key=v1,v2"), ("optim.lrr=1", "unknown field"),
                     ("model.channels=8,16", "shapes the compiled program")):
        with pytest.raises(ConfigError, match=msg):
            parse_grid([bad])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    (root / "in").mkdir()
    for i, (h, w) in enumerate([(16, 24), (20, 24), (16, 24)]):
        Image.fromarray((smooth_image(h, w, i) * 255).astype(np.uint8)).save(root / "in" / f"im{i}.png")
    (root / "tiny.toml").write_text(TINY)
    return root


def test_sweep_pairs_equal_single_runs_and_resume(folder, capsys):
    out = folder / "sweep"
    args = ["sweep", str(folder / "in"), "--out", str(out), "--config", str(folder / "tiny.toml"), "--no-progress",
            "--grid", "optim.lr=0.05,0.1", "--grid", "seed=0,1"]
    assert main(args) == 0
    assert capsys.readouterr().out.startswith("4 settings: 12 segmented, 0 already done, 0 failed")
    # One setting of the four, as a single segment run (same slot count and strategy).
    single = folder / "single"
    assert main(["segment", str(folder / "in"), "--out", str(single), "--config", str(folder / "tiny.toml"),
                 "--no-progress", "--set", "optim.lr=0.05", "--set", "seed=1"]) == 0
    capsys.readouterr()
    swept = out / "optim.lr_0.05__seed_1"
    for i in range(3):
        np.testing.assert_array_equal(imio.read_labels(swept / f"im{i}.png"), imio.read_labels(single / f"im{i}.png"))
    assert (swept / "config.toml").read_text().splitlines()[1] == (single / "config.toml").read_text().splitlines()[1]
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [r["setting"] for r in rows] == ["optim.lr_0.05__seed_0", "optim.lr_0.05__seed_1",
                                           "optim.lr_0.1__seed_0", "optim.lr_0.1__seed_1"]
    assert all(r["images"] == "3" for r in rows)
    # The rerun does nothing; an input that is not there fails in every setting (exit 1).
    assert main(args) == 0
    assert capsys.readouterr().out.startswith("4 settings: 0 segmented, 12 already done")
    assert main(args[:2] + [str(folder / "nope.png")] + args[2:]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith("4 settings: 0 segmented, 12 already done, 4 failed")
    assert "nope.png: no such file or folder" in captured.err
    # Another config in the same folders is refused, naming --overwrite, which replaces it.
    other = args[:-4] + ["--grid", "optim.lr=0.05", "--grid", "seed=1", "--set", "stop.max_iters=11"]
    assert main(other) == 2
    assert "use --overwrite to replace them" in capsys.readouterr().err
    digest = (swept / "config.toml").read_text().splitlines()[1]  # "config digest: ..."
    assert main(other + ["--overwrite"]) == 0
    assert capsys.readouterr().out.startswith("1 settings: 3 segmented, 0 already done, 0 failed")
    new_digest = (swept / "config.toml").read_text().splitlines()[1]
    records = [json.loads(line) for line in (swept / "results.jsonl").read_text().splitlines()]
    assert new_digest != digest and len(records) == 3
    assert all(new_digest.endswith(r["config"]) for r in records)


def test_sweep_varies_postprocessing_on_the_host(folder, capsys):
    out = folder / "sweep_post"
    assert main(["sweep", str(folder / "in"), "--out", str(out), "--config", str(folder / "tiny.toml"),
                 "--no-progress", "--grid", "postprocess.connected=false,true"]) == 0
    assert capsys.readouterr().out.startswith("2 settings: 6 segmented")
    # One optimisation per image serves both settings: the same iteration counts and
    # seconds (the engine's own record of the slot), post-processed two ways.
    records = [{r["stem"]: (r["iterations"], r["seconds"]) for r in map(json.loads, (out / name / "results.jsonl")
                .read_text().splitlines())} for name in ("postprocess.connected_false", "postprocess.connected_true")]
    assert records[0] == records[1]
    for i in range(3):
        raw = imio.read_labels(out / "postprocess.connected_false" / f"im{i}.png")
        split = imio.read_labels(out / "postprocess.connected_true" / f"im{i}.png")
        np.testing.assert_array_equal(split, relabel_connected(raw))


def test_sweep_scores_a_dataset(tmp_path, capsys):
    root = tmp_path / "bsds"
    make_bsds(root, "val", ids=("11", "22"), shape=(16, 24))
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY)
    out = tmp_path / "out"
    assert main(["sweep", "--dataset", "bsds500", "--root", str(root), "--split", "val", "--out", str(out),
                 "--config", str(cfg), "--no-progress", "--grid", "schedule.alpha=10,50"]) == 0
    capsys.readouterr()
    report = json.loads((out / "sweep.json").read_text())
    assert len(report["settings"]) == 2
    from dynaseg_jax.evaluate import evaluate_predictions
    for row in report["settings"]:
        want = evaluate_predictions("bsds500", root, "val", out / row["setting"])
        assert row["all"] == want["all"] and row["hungarian"] == want["hungarian"] and row["images"] == 2
    assert (out / "sweep.png").stat().st_size > 0  # the plot (matplotlib: the bench extra)


def test_report_of_a_sweep(tmp_path, capsys):
    from tests.test_report import Page
    root = tmp_path / "bsds"
    make_bsds(root, "val", ids=("11",), shape=(16, 24))
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY)
    out = tmp_path / "out"
    common = ["--dataset", "bsds500", "--root", str(root), "--split", "val"]
    assert main(["sweep", *common, "--out", str(out), "--config", str(cfg), "--no-progress",
                 "--grid", "seed=0,1,2"]) == 0
    assert main(["report", str(out), *common]) == 0
    capsys.readouterr()
    text = (out / "report.html").read_text()
    page = Page()
    page.feed(text)
    assert len(page.rows) == 3 and 'src="data:image/png;base64,' in text  # the plot, inlined
    for seed in range(3):
        assert f'href="seed_{seed}/report.html"' in text and (out / f"seed_{seed}" / "report.html").is_file()
    rows = json.loads((out / "sweep.json").read_text())["settings"]
    by_name = {r[0][1]: r for r in page.rows}
    for row in rows:  # the page's numbers are the table's
        cells = by_name[row["setting"]]
        assert float(cells[list(row).index("all")][0]) == row["all"]


def test_settings_that_agree_on_kstar_share_it(folder, monkeypatch, capsys):
    # k* depends on stop.k_min, silhouette.*, seed and init only: over lr x seed, it is
    # estimated once per image and seed, by one estimator per seed.
    from dynaseg_jax import runner
    calls = []
    real = runner.KStarEstimator.__call__
    monkeypatch.setattr(runner.KStarEstimator, "__call__",
                        lambda self, image, name: calls.append((id(self), name)) or real(self, image, name))
    assert main(["sweep", str(folder / "in"), "--out", str(folder / "kstar"), "--config", str(folder / "tiny.toml"),
                 "--no-progress", "--set", "stop.k_min=\"silhouette\"", "--set", "silhouette.samples=50",
                 "--set", "silhouette.k_range=[2, 3]", "--set", "stop.max_iters=2",
                 "--grid", "optim.lr=0.05,0.1", "--grid", "seed=0,1"]) == 0
    assert "4 settings: 12 segmented" in capsys.readouterr().out
    assert len(calls) == 6 and len(set(calls)) == 6 and len({c[0] for c in calls}) == 2
