"""The speed benchmark's scripting contract (tiny size: checks keys, not speed)."""
import json
import sys
from pathlib import Path

import pytest

from tests.conftest import require

require("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_speed  # noqa: E402
import speed_tables  # noqa: E402


def table_rows(markdown: str, title: str) -> list[list[str]]:
    """The cells of the data rows of the table under ``### title``."""
    block = markdown.split(f"### {title}\n\n", 1)[1].split("\n\n", 1)[0]
    return [[c.strip() for c in line.strip("|").split("|")] for line in block.splitlines()[2:]]


def test_json_contract(tmp_path):
    out = tmp_path / "speed.json"
    code = bench_speed.main(["--size", "24x16", "--batch", "1", "--iters", "2", "--repeats", "1",
                             "--warmup", "1", "--set", "model.channels=8", "--set", "model.max_clusters=8", "--json", str(out)])
    assert code == 0
    row = json.loads(out.read_text())
    for key in ("jax_ms_per_image_iter", "torch_ms_per_image_iter", "ratio", "strategy", "device"):
        assert key in row
    assert row["ratio"] == pytest.approx(row["jax_ms_per_image_iter"] / row["torch_ms_per_image_iter"])
    assert row["strategy"] in ("per_image", "vmap") and row["device"] == "cpu"
    # 24x16: 2 * (2*384*27*8) + 3 * (2*384*9*8*8 + 2*384*8*8) algorithmic FLOPs
    assert bench_speed.model_flops(16, 24, bench_speed.load_config("dynaseg_scf", ["model.channels=8", "model.max_clusters=8"])) \
        == 2 * (2 * 384 * 27 * 8) + 3 * (2 * 384 * 9 * 64 + 2 * 384 * 64)


def test_full_run_scaled_with_fewer_torch_images(tmp_path, monkeypatch):
    from tests.conftest import bsds_val_images
    monkeypatch.setattr(bench_speed, "BSDS_VAL", bsds_val_images(2)[0].parent)
    out = tmp_path / "full.json"
    code = bench_speed.main(["--size", "24x16", "--batch", "1", "--iters", "1", "--repeats", "1",
                             "--warmup", "1", "--set", "model.channels=8", "--set", "model.max_clusters=8", "--set", "stop.max_iters=3",
                             "--full-run", "2", "--full-batch", "2", "--full-scale", "0.1",
                             "--full-torch", "1", "--full-tuned", "2", "--torch-conv", "bmm", "grouped",
                             "--json", str(out)])
    assert code == 0
    full = json.loads(out.read_text())["full_run"]
    # The tuned PyTorch ran with the faster of its conv forms, on --full-tuned images.
    pick = full["torch_batched_pick_ms_by_conv"]
    assert set(pick) == {"bmm", "grouped"} and pick[full["torch_batched_conv"]] == min(pick.values())
    assert full["torch_batched_images"] == 2 and len(full["torch_batched_iterations"]) == 2
    assert full["images"] == 2 and full["torch_images"] == 1
    assert full["size"] in ("48x32", "32x48")  # BSDS 481x321 scaled by 0.1
    assert len(full["jax_iterations"]) == 2 and max(full["jax_iterations"]) <= 3
    assert len(full["torch_iterations"]) == 1 and max(full["torch_iterations"]) <= 3
    assert full["speedup"] == pytest.approx(full["jax_images_per_s"] / full["torch_images_per_s"])
    assert full["products"] == full["torch_products"] == "float32"

    # The README's tables from this file: JAX, the reference and the tuned PyTorch, each
    # row with its precision and versions, the ratios recomputed from images per second.
    md = speed_tables.tables([out])
    jax_row, ref_row, tuned_row = table_rows(md, "Whole runs with early stopping")
    assert jax_row[1].startswith("JAX") and ref_row[1] == "PyTorch reference"
    assert tuned_row[1] == f"PyTorch tuned ({full['torch_batched_conv']})"
    assert jax_row[3] == "2" and ref_row[3] == "1" and tuned_row[3] == "2"  # images at once
    assert ref_row[0] == "first 1" and tuned_row[0] == "first 2"
    assert float(ref_row[6].rstrip("x")) == pytest.approx(full["speedup"], abs=0.005)
    assert float(tuned_row[6].rstrip("x")) == pytest.approx(
        full["jax_images_per_s"] / full["torch_batched_images_per_s"], abs=0.005)
    assert all(r[2] == "float32" and "jax " in r[7] and "torch " in r[7] for r in (jax_row, ref_row, tuned_row))
    (step,) = table_rows(md, "Steps (no early stop)")
    row = json.loads(out.read_text())
    assert step[3] == f"{row['jax_ms_per_image_iter']:.2f}"
    assert float(step[6].rstrip("x")) == pytest.approx(row["torch_ms_per_image_iter"] / row["jax_ms_per_image_iter"],
                                                       abs=0.005)
    assert float(step[7].rstrip("x")) == pytest.approx(
        row["torch_batched_ms_per_image_iter"] / row["jax_ms_per_image_iter"], abs=0.005)
    assert row["torch_batched_ms_per_image_iter"] == min(row["torch_batched_ms_by_conv"].values())
    assert f", {row['torch_batched_conv']})" in step[5]
    # The same file as a picture (steps and whole runs), where matplotlib is installed.
    pytest.importorskip("matplotlib")
    png = tmp_path / "speed.png"
    assert speed_tables.main([str(out), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_kstar_run_times_the_silhouette_phase_against_the_engine(tmp_path, monkeypatch):
    from tests.conftest import bsds_val_images
    monkeypatch.setattr(bench_speed, "BSDS_VAL", bsds_val_images(2)[0].parent)
    out = tmp_path / "kstar.json"
    code = bench_speed.main(["--size", "--no-torch", "--set", "model.channels=8", "--set", "model.max_clusters=8",
                             "--set", "stop.max_iters=3", "--kstar-run", "2", "--full-batch", "2",
                             "--full-scale", "0.1", "--json", str(out)])
    assert code == 0
    run = json.loads(out.read_text())["kstar_run"]
    assert run["images"] == 2 and run["config"] == "dynaseg_scf_silhouette"
    assert len(run["kstar"]) == 2 and all(2 <= k <= 12 for k in run["kstar"])  # silhouette.k_range
    # The pipeline got the same k* as the timed estimates: the same iterations per image.
    assert run["same_iterations"] and max(run["iterations"]) <= 3
    assert run["kstar_per_s"] == pytest.approx(2 / run["kstar_seconds"])
    assert run["device_images_per_s"] == pytest.approx(2 / run["device_seconds"])
    # The waits are parts of the pipelined run's wall time.
    assert run["wait_for_kstar_while_running_s"] + run["wait_for_kstar_while_idle_s"] <= run["pipeline_seconds"]
    (row,) = table_rows(speed_tables.tables([out]), "The silhouette phase against the device")
    assert row[:3] == ["2 (scale 0.1)", "2", f"0 ({run['cpu_count']})"]
    assert row[3] == f"{run['kstar_per_s']:.3g}"


def test_card_peaks():
    assert bench_speed.card_peak_tflops("NVIDIA H200", "tensorfloat32") == 495.0
    assert bench_speed.card_peak_tflops("NVIDIA H100 80GB HBM3", None) == 67.0  # default: float32
    assert bench_speed.card_peak_tflops("NVIDIA H100 PCIe", "float32") == 51.0  # not the SXM part's 67
    assert bench_speed.card_peak_tflops("cpu", "float32") is None
    assert bench_speed.card_peak_tflops("cpu", "float32", override=1.5) == 1.5


def test_step_memory_counts_the_slots_arguments():
    import jax

    config = bench_speed.load_config("dynaseg_scf", ["model.channels=8", "model.max_clusters=8",
                                                     "engine.bucket_multiple=1", "engine.strategy=vmap"])
    runner = bench_speed.JaxRunner(config, 16, 24, 2)
    mem = runner.step_memory_mb()
    g = runner.group
    # The arguments are exactly these arrays (XLA's sizes are their byte counts).
    leaves = jax.tree_util.tree_leaves((g.states, g.images, g.masks, runner.engine.shared, g.segments))
    assert mem["step_arguments_mb"] * 2 ** 20 == sum(x.nbytes for x in leaves)
    # The donated states come back in place: the total is at least the temporaries.
    assert 0 < mem["step_temporaries_mb"] <= mem["step_total_mb"]


def test_bench_conv_rows_and_failures(tmp_path):
    import bench_conv
    out = tmp_path / "conv.json"
    assert bench_conv.main(["--size", "12x8", "--batch", "2", "--channels", "16", "--repeats", "2",
                            "--impl", "lax", "winograd", "pallas/16x16", "pallas/48x16", "--json", str(out)]) == 0
    rows = {r["impl"]: r for r in json.loads(out.read_text())["rows"]}
    assert "power of two" in rows["pallas/48x16"]["error"]  # a rejected tile is a row, not a crash
    assert rows["lax"]["max_relative_difference_vs_lax_float32"] == 0.0
    # Direct evaluation: float32 sums of <= 9 * 16 (dx) or 96 (dk) terms on both sides,
    # each within 4 U32 sqrt(144) ~ 3e-6 relative of the exact value: within 1e-5 of each
    # other. Winograd's transforms enlarge that bound ~95x (test_torch_parity's kappa): 3e-4.
    assert rows["pallas/16x16"]["max_relative_difference_vs_lax_float32"] < 1e-5
    assert rows["winograd"]["max_relative_difference_vs_lax_float32"] < 3e-4
    assert rows["lax"]["tflops_direct"] == pytest.approx(3 * 2 * 12 * 8 * 9 * 16 * 16 / (rows["lax"]["ms_per_image"] * 1e9))
    table = {r[1]: r for r in table_rows(speed_tables.tables([out]), "The 3x3 conv alone (forward and both gradients)")}
    assert table["pallas/48x16"][3].startswith("failed:") and table["lax"][6] == "0.0e+00"
    assert table["winograd"][3] == f"{rows['winograd']['ms_per_image']:.3f}"


def test_speed_tables_refuses_other_files(tmp_path):
    other = tmp_path / "other.json"
    other.write_text('{"a": 1}')
    assert speed_tables.main([str(other)]) == 2
    with pytest.raises(ValueError, match="not a bench_speed.py or bench_conv.py"):
        speed_tables.tables([other])
