"""End to end: `dynaseg segment` on a folder of good and bad files, then a resume."""
import json
import sys

import numpy as np
import pytest
from PIL import Image

from dynaseg_jax.cli import main
from tests.conftest import smooth_image

TINY = ["model.channels=16", "model.max_clusters=16", "stop.max_iters=8", "engine.bucket_multiple=8",
        "engine.max_pixels=5000"]


def sets(*pairs):
    """--set KEY=VALUE once per pair, as the CLI takes them."""
    return [a for kv in pairs for a in ("--set", kv)]
REQUIRED = {"file", "source", "config", "height", "width", "iterations", "clusters", "k_min", "seconds",
            "status", "error"}


def u8(img):
    return (img * 255).astype(np.uint8)


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    Image.fromarray(u8(smooth_image(20, 30, 0))).save(d / "good.png")
    Image.fromarray(u8(smooth_image(30, 20, 1))).save(d / "sub" / "portrait.jpg", quality=95)
    Image.fromarray(u8(smooth_image(20, 30, 2))[..., 0]).save(d / "gray.png")
    rgba = np.dstack([u8(smooth_image(20, 30, 3)), np.full((20, 30), 128, np.uint8)])
    Image.fromarray(rgba).save(d / "rgba.png")
    Image.fromarray(u8(smooth_image(20, 30, 4))).convert("P").save(d / "palette.png")
    Image.fromarray((smooth_image(20, 30, 5)[..., 0] * 65535).astype(np.uint16)).save(d / "deep16.png")
    (d / "notes.jpg").write_text("this is not a jpeg")
    full = d / "full.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(full)
    (d / "truncated.jpg").write_bytes(full.read_bytes()[:300])
    full.unlink()
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(d / "dot.png")
    Image.fromarray(np.zeros((80, 80, 3), np.uint8)).save(d / "huge.png")  # > max_pixels
    return d


GOOD = {"good", "portrait", "gray", "rgba", "palette", "deep16"}
BAD = {"notes": "not an image", "truncated": "truncated or corrupt", "dot": "1x1", "huge": "max_pixels"}


def test_segment_folder_end_to_end(folder, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["segment", str(folder), "--out", str(out), "--batch", "2", "--no-progress",
                 *sets(*TINY)])
    assert code == 1  # some images failed
    captured = capsys.readouterr()
    err = captured.err
    # stdout is not a terminal here: one line per finished image, as a batch job's log.
    logged = [line for line in captured.out.splitlines() if " iterations, " in line]
    assert len(logged) == len(GOOD) and all(line.endswith(" s") for line in logged)
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == len(GOOD) + len(BAD)
    by_stem = {r["stem"]: r for r in records}
    for r in records:
        assert REQUIRED <= set(r)
    for stem in GOOD:
        r = by_stem[stem]
        assert r["status"] == "ok" and r["error"] is None
        labels = np.asarray(Image.open(out / f"{stem}.png"))
        assert labels.dtype == np.uint16
        assert labels.shape == (r["height"], r["width"])
        assert (r["height"], r["width"]) == ((30, 20) if stem == "portrait" else (20, 30))
        np.testing.assert_array_equal(np.unique(labels), np.arange(r["clusters"]))
        assert 1 <= r["iterations"] <= 8 and r["k_min"] == 3
        assert Image.open(out / f"{stem}_overlay.png").size == (r["width"], r["height"])
    for stem, words in BAD.items():
        r = by_stem[stem]
        assert r["status"] == "error" and words in r["error"] and stem in r["error"]
        assert stem in err
        assert not (out / f"{stem}.png").exists()

    # Rerun: nothing finished is redone; a lost output is redone.
    (out / "good.png").unlink()
    code = main(["segment", str(folder), "--out", str(out), "--batch", "2", "--no-progress",
                 *sets(*TINY)])
    assert code == 1
    summary = capsys.readouterr().out
    assert f"1 segmented, {len(GOOD) - 1} already done, {len(BAD)} failed" in summary
    assert (out / "good.png").exists()


def test_segment_silhouette_and_clean_exit(tmp_path, capsys):
    img = tmp_path / "one.png"
    Image.fromarray(u8(smooth_image(20, 30, 6))).save(img)
    out = tmp_path / "out"
    code = main(["segment", str(img), "--out", str(out), "--no-progress", "--config", "dynaseg_fsf_silhouette",
                 *sets(*TINY, "silhouette.k_range=[2, 5]")])
    assert code == 0
    (r,) = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert r["status"] == "ok" and 2 <= r["k_min"] <= 5


def test_config_errors_exit_cleanly(tmp_path, capsys):
    code = main(["segment", str(tmp_path), "--out", str(tmp_path / "o"), "--set", "bogus=1"])
    assert code == 2
    assert "unknown field bogus" in capsys.readouterr().err


def test_hugepages_reexec_is_conditional(monkeypatch):
    from dynaseg_jax import runtime
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("DYNASEG_REEXECED", raising=False)
    monkeypatch.setenv("DYNASEG_HUGEPAGES", "1")
    assert runtime.hugepages_wanted() == sys.platform.startswith("linux")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")  # the user's choice wins
    assert not runtime.hugepages_wanted()
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setenv("DYNASEG_HUGEPAGES", "0")
    assert not runtime.hugepages_wanted()


# --- options, resume rules, the output folder ---------------------------------------------


def test_set_is_repeatable_and_takes_one_pair():
    from dynaseg_jax.cli import build_parser
    args = build_parser().parse_args(["segment", "--set", "stop.max_iters=20", "dir", "--out", "x"])
    assert args.inputs == ["dir"] and args.overrides == ["stop.max_iters=20"]
    pairs = ["model.conv_impl=lax", "engine.bucket_multiple=1", "stop.max_iters=3"]
    args = build_parser().parse_args(["segment", "dir", "--out", "x", *sets(*pairs)])
    assert args.overrides == pairs


def test_every_repeated_set_is_applied(capsys):
    import tomllib
    assert main(["config", *sets("model.conv_impl=lax", "engine.bucket_multiple=1", "stop.max_iters=3")]) == 0
    config = tomllib.loads(capsys.readouterr().out)
    assert (config["model"]["conv_impl"], config["engine"]["bucket_multiple"], config["stop"]["max_iters"]) == \
        ("lax", 1, 3)


def one_line_error(capsys, code, expected_code, words):
    err = capsys.readouterr().err
    assert code == expected_code
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and words in lines[0], err
    return lines[0]


def test_cli_paths_end_in_one_line(tmp_path, capsys):
    afile = tmp_path / "a.txt"
    afile.write_text("x")
    one_line_error(capsys, main(["segment", str(afile), "--out", str(afile)]), 2, "not a folder")
    one_line_error(capsys, main(["sample", str(tmp_path / "nodir" / "x.png")]), 2, "does not exist")
    one_line_error(capsys, main(["sample", str(tmp_path)]), 2, "is a folder")
    one_line_error(capsys, main(["sample", str(tmp_path / "x.txt")]), 2, "unknown image type")
    one_line_error(capsys, main(["segment", str(afile), "--out", str(tmp_path / "o"), "--scale", "0"]),
                   2, "--scale")
    one_line_error(capsys, main(["segment", str(afile), "--out", str(tmp_path / "o"), "--devices", "two"]),
                   2, "--devices two: expected a number of devices or 'all'")
    one_line_error(capsys, main(["segment", str(afile), "--out", str(tmp_path / "o"), "--config", ""]),
                   2, "--config '': give a preset name or a .toml file")
    for command in ("report", "merge"):
        one_line_error(capsys, main([command, str(afile)]), 2, f"{afile}: not a folder")
    (tmp_path / "empty").mkdir()
    one_line_error(capsys, main(["merge", str(tmp_path / "empty")]), 2, "no results files")
    assert not (tmp_path / "empty" / "results.jsonl").exists()
    assert main(["sample", str(tmp_path / "s.jpg")]) == 0
    assert Image.open(tmp_path / "s.jpg").format == "JPEG"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    from dynaseg_jax import __version__
    assert capsys.readouterr().out.strip() == f"dynaseg {__version__}"


def test_resume_keys_on_resolved_path_and_config(tmp_path, capsys, monkeypatch):
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(u8(smooth_image(20, 30, 0))).save(d / "a.png")
    out = tmp_path / "out"
    base = ["--out", str(out), "--no-progress", *sets(*TINY)]
    assert main(["segment", str(d.resolve()), *base, "--color-labels"]) == 0
    assert Image.open(out / "a.png").mode == "P"  # --color-labels: a palette PNG
    capsys.readouterr()
    # One folder, one label format: without --color-labels the resume is refused.
    monkeypatch.chdir(tmp_path)
    one_line_error(capsys, main(["segment", "in", *base]), 2,
                   "holds 8-bit palette (--color-labels) label maps; add --color-labels to resume")
    base = [*base, "--color-labels"]
    # Another spelling of the same folder: nothing is redone.
    assert main(["segment", "in", *base]) == 0
    assert "0 segmented, 1 already done" in capsys.readouterr().out
    assert main(["segment", "./in/../in/a.png", *base]) == 0
    assert "0 segmented, 1 already done" in capsys.readouterr().out
    records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["source"] == str((d / "a.png").resolve())
    # The folder's config is written down; another config is refused...
    from dynaseg_jax.config import config_digest, load_config
    written = load_config(str(out / "config.toml"))
    assert written == load_config("dynaseg_scf", TINY)
    assert records[0]["config"] == config_digest(written)
    line = one_line_error(capsys, main(["segment", "in", *base, "--set", "stop.max_iters=9"]), 2,
                          "holds results of another config")
    assert "--overwrite" in line
    one_line_error(capsys, main(["segment", "in", *base, "--scale", "0.5"]), 2, "another config")
    # ... but another layout (batch, strategy) of the same config resumes.
    assert main(["segment", "in", *base, "--batch", "3", "--set", "engine.strategy=vmap"]) == 0
    assert "0 segmented, 1 already done" in capsys.readouterr().out
    # --overwrite replaces the folder's results with the new config's.
    assert main(["segment", "in", *base[:-1], "--set", "stop.max_iters=2", "--overwrite"]) == 0
    assert "1 segmented, 0 already done" in capsys.readouterr().out
    (r,) = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert r["iterations"] <= 2 and r["config"] == config_digest(load_config(str(out / "config.toml")))
    assert Image.open(out / "a.png").mode != "P"  # rewritten without --color-labels


def test_torn_last_line_is_dropped_before_appending(tmp_path, tiny_config):
    from dynaseg_jax.outputs import OutputFolder
    out = tmp_path / "out"
    with OutputFolder.open(out, tiny_config) as folder:
        folder.append({"source": "/x/a.png", "stem": "a", "status": "ok"})
        digest = folder.digest
    good = (out / "results.jsonl").read_bytes()
    (out / "results.jsonl").write_bytes(good + b'{"source": "/x/b.png", "stem": "b", "sta')
    (out / "a.png").write_bytes(b"")
    with OutputFolder.open(out, tiny_config) as folder:
        assert folder.dropped_bytes == len(b'{"source": "/x/b.png", "stem": "b", "sta')
        assert (out / "results.jsonl").read_bytes() == good
        assert folder.done_sources() == {"/x/a.png": "a"}
        folder.append({"source": "/x/b.png", "stem": "b", "status": "ok"})
    lines = (out / "results.jsonl").read_text().splitlines()
    assert [json.loads(x)["source"] for x in lines] == ["/x/a.png", "/x/b.png"]
    assert all(json.loads(x)["config"] == digest for x in lines)
    # A file that is all torn tail (no newline at all) is emptied.
    (out / "results.jsonl").write_bytes(b'{"sour')
    with OutputFolder.open(out, tiny_config) as folder:
        assert folder.records == [] and (out / "results.jsonl").read_bytes() == b""


def test_one_run_per_output_folder(tmp_path, tiny_config):
    from dynaseg_jax.outputs import OutputFolder, OutputFolderError
    out = tmp_path / "out"
    first = OutputFolder.open(out, tiny_config)
    # A second run into the folder (flock locks conflict across open files, even in
    # one process) is refused before it touches anything.
    (out / "results.jsonl").write_bytes(b'{"torn')
    with pytest.raises(OutputFolderError, match="another dynaseg run is writing"):
        OutputFolder.open(out, tiny_config)
    assert (out / "results.jsonl").read_bytes() == b'{"torn'
    first.close()
    with OutputFolder.open(out, tiny_config) as again:
        assert again.dropped_bytes == len(b'{"torn')


def test_folder_from_an_older_version_needs_overwrite(tmp_path, tiny_config):
    from dynaseg_jax.outputs import OutputFolder, OutputFolderError
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.jsonl").write_text('{"file": "a.png", "stem": "a", "status": "ok"}\n')
    (out / "a.png").write_bytes(b"")
    with pytest.raises(OutputFolderError, match="older dynaseg"):
        OutputFolder.open(out, tiny_config)
    with OutputFolder.open(out, tiny_config, overwrite=True) as folder:
        assert folder.records == [] and (out / "a.png").exists()  # nothing changes before commit
        folder.commit()
        assert not (out / "a.png").exists() and (out / "results.jsonl").read_text() == ""


def test_light_commands_do_not_import_jax():
    # `dynaseg --help`, `config`, `sample` must start fast: the package and the CLI import
    # jax and scikit-learn only for commands that train (timed in benchmarks/bench_startup.py).
    import subprocess
    code = ("import sys, dynaseg_jax, dynaseg_jax.cli as c; c.build_parser(); "
            "heavy = [m for m in ('jax', 'sklearn', 'flax', 'scipy') if m in sys.modules]; "
            "assert not heavy, heavy; "
            "import dynaseg_jax.runner; assert callable(dynaseg_jax.segment), dynaseg_jax.segment")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_errors_are_written_above_the_progress_bar(tmp_path, capsys, tiny_config):
    from dynaseg_jax.runner import segment_files
    d = tmp_path / "in"
    d.mkdir()
    (d / "bad.jpg").write_text("not a jpeg")
    summary = segment_files([d], tmp_path / "out", tiny_config, progress=True)
    assert summary.failed == 1
    err = capsys.readouterr().err
    assert "%|" in err  # the bar was drawn
    i = err.index("error: ")
    # tqdm.write clears the bar's line first: the message starts a line of its own
    # instead of being glued after the bar's text ("...img/s]error: ...").
    assert err[i - 1] in "\r\n", repr(err[max(0, i - 40): i + 20])


# --- the output folder against mistakes (found in review) ---------------------------------


def tiny_args(out, *extra):
    return ["--out", str(out), "--no-progress", *sets(*TINY), *extra]


def test_output_folder_inside_or_equal_to_the_input_folder(tmp_path, capsys):
    d = tmp_path / "imgs"
    d.mkdir()
    Image.fromarray(u8(smooth_image(20, 30, 0))).save(d / "a.png")
    original = (d / "a.png").read_bytes()
    # --out inside the input folder: its own outputs are never inputs, on any rerun.
    for _ in range(2):
        assert main(["segment", str(d), *tiny_args(d / "seg")]) == 0
    assert sorted(p.name for p in (d / "seg").glob("*.png")) == ["a.png", "a_overlay.png"]
    # --out equal to the input folder: nothing in it is an input; a file given by name
    # is refused because its label map would replace it. The input is left untouched.
    capsys.readouterr()
    assert main(["segment", str(d), *tiny_args(d)]) == 1
    assert "has no image files outside the output folder" in capsys.readouterr().err
    assert main(["segment", str(d / "a.png"), *tiny_args(d)]) == 1
    assert "would overwrite an input file" in capsys.readouterr().err
    assert (d / "a.png").read_bytes() == original


def test_overwrite_changes_nothing_before_the_inputs_are_found(tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(u8(smooth_image(20, 30, 0))).save(d / "a.png")
    out = tmp_path / "out"
    assert main(["segment", str(d), *tiny_args(out)]) == 0
    before = (out / "results.jsonl").read_text()
    # A typo with another config and --overwrite: nothing to run, nothing deleted.
    assert main(["segment", str(tmp_path / "typo"), *tiny_args(out, "--set", "stop.max_iters=3",
                                                                "--overwrite")]) == 1
    assert (out / "results.jsonl").read_text() == before and (out / "a.png").exists()
    # --overwrite with the same config resumes instead of recomputing.
    capsys.readouterr()
    assert main(["segment", str(d), *tiny_args(out, "--overwrite")]) == 0
    assert "0 segmented, 1 already done" in capsys.readouterr().out


def test_a_folder_without_results_takes_any_config(tmp_path, tiny_config):
    from dynaseg_jax.outputs import OutputFolder
    out = tmp_path / "out"
    with OutputFolder.open(out, tiny_config) as folder:  # a run that failed before any result
        folder.commit()
        folder.append({"source": "/x/a.png", "stem": "a", "status": "error"})
    with OutputFolder.open(out, tiny_config.replace({"optim.lr": 0.05})) as folder:
        assert folder.records == []  # the other config's error record is not this config's


def test_dataset_resume_key_names_root_and_split(tmp_path, monkeypatch):
    from dynaseg_jax import cli
    seen = []
    monkeypatch.setattr("dynaseg_jax.runner.segment_files",
                        lambda inputs, *a, **k: seen.extend(inputs) or type("S", (), {
                            "ok": 0, "skipped": 0, "failed": 0, "seconds": 0.0, "errors": []})())
    root = tmp_path / "photos"
    root.mkdir()
    Image.fromarray(u8(smooth_image(20, 30, 0))).save(root / "p.v2.png")
    assert cli.main(["segment", "--dataset", "folder", "--root", str(root), "--out", str(tmp_path / "o")]) == 0
    (item,) = seen
    assert item.name == "p.v2"  # the id names the outputs unchanged (dots kept)
    assert item.source == f"folder:{root.resolve()}::p.v2"


def test_bad_seed_and_k_range_are_config_errors(tmp_path, capsys):
    for bad in ("seed=-1", "seed=4294967296", "silhouette.k_range=[2.5, 8]", 'silhouette.k_range=["a", "b"]'):
        code = main(["segment", str(tmp_path), "--out", str(tmp_path / "o"), "--set", bad])
        one_line_error(capsys, code, 2, bad.split("=")[0])


def test_segment_dataset_reads_no_ground_truth(tmp_path, capsys):
    # segment needs the images only: with every annotation file unreadable, the run still
    # segments the split (evaluate is what reads ground truth).
    from tests.test_datasets import make_bsds
    root = tmp_path / "bsds"
    make_bsds(root, "val", ids=("11", "22"), shape=(16, 24))
    for mat in (root / "groundTruth" / "val").iterdir():
        mat.write_bytes(b"not a MATLAB file")
    out = tmp_path / "out"
    assert main(["segment", "--dataset", "bsds500", "--root", str(root), "--split", "val", "--out", str(out),
                 "--no-progress", *sets(*TINY)]) == 0
    assert sorted(p.name for p in out.glob("??.png")) == ["11.png", "22.png"]


def test_outputs_are_finished_beside_the_engine_and_a_failed_write_is_one_error(tmp_path, tiny_config, monkeypatch):
    # Post-processing and writing run in the finishing thread, not the engine's loop; an
    # image whose outputs cannot be written gets an error record, the others are kept.
    import threading

    from PIL import Image

    from dynaseg_jax import runner
    for i in range(3):
        Image.fromarray(u8(smooth_image(16, 24, i))).save(tmp_path / f"im{i}.png")
    threads, real_write = [], runner.write_outputs

    def write(folder, stem, *args, **kwargs):
        threads.append(threading.current_thread().name)
        if stem == "im1":
            raise OSError("disk full")
        return real_write(folder, stem, *args, **kwargs)

    monkeypatch.setattr(runner, "write_outputs", write)
    summary = runner.segment_files([tmp_path], tmp_path / "out", tiny_config.replace({"stop.max_iters": 3}),
                                   progress=False, log=lambda msg: None)
    assert summary.ok == 2 and summary.failed == 1
    assert len(threads) == 3 and all(t.startswith("dynaseg-finish") for t in threads)
    entries = [json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert {e["stem"]: e["status"] for e in entries} == {"im0": "ok", "im1": "error", "im2": "ok"}
    assert "im1.png: cannot write outputs: disk full" in next(e["error"] for e in entries if e["stem"] == "im1")
    assert (tmp_path / "out" / "im0.png").is_file() and not (tmp_path / "out" / "im1.png").exists()


def test_finisher_keeps_order_bounds_its_queue_and_surfaces_errors():
    import time

    from dynaseg_jax.runner import Finisher
    done, waiting = [], []
    with Finisher(queue=2) as finisher:
        for i in range(6):
            finisher.submit(lambda i: (time.sleep(0.02), done.append(i)), i)
            waiting.append(sum(not f.done() for f in finisher._pending))
    assert done == list(range(6)) and max(waiting) <= 2  # one thread, in order; at most 2 queued

    def boom():
        raise RuntimeError("unexpected")

    with pytest.raises(RuntimeError, match="unexpected"):  # at the next submit, as inline
        with Finisher() as finisher:
            finisher.submit(boom)
            time.sleep(0.05)
            finisher.submit(lambda: None)
    with pytest.raises(RuntimeError, match="unexpected"):  # or on leaving the block
        with Finisher() as finisher:
            finisher.submit(boom)


def test_warnings_are_one_line_and_precision_on_cpu_is_named(tmp_path, capsys):
    # A precision the CPU ignores is named, once, as the command's other messages are.
    import warnings

    import jax

    if jax.default_backend() != "cpu":
        pytest.skip("the warning is about the CPU backend")
    d = tmp_path / "imgs"
    d.mkdir()
    Image.fromarray(u8(smooth_image(20, 30, 0))).save(d / "a.png")
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # this suite's own filters ignore the warning
        assert main(["segment", str(d), *tiny_args(tmp_path / "out"),
                     *sets("model.matmul_precision=tensorfloat32")]) == 0
    err = capsys.readouterr().err.splitlines()
    named = [line for line in err if "model.matmul_precision = 'tensorfloat32' has no effect on cpu" in line]
    assert named and all(line.startswith("dynaseg: warning: ") for line in named)
    assert not any("UserWarning" in line or "warnings.warn" in line for line in err)


@pytest.mark.parametrize("changes,warned", [({"model.matmul_precision": "tensorfloat32"}, True),
                                            ({"model.matmul_precision": "float32"}, False),
                                            ({"model.matmul_precision": "bfloat16",
                                              "model.emulate_precision": True}, False),
                                            ({"model.matmul_precision": "bfloat16",
                                              "model.conv_impl": "pallas"}, False),
                                            ({"model.matmul_precision": "tensorfloat32",
                                              "model.conv_impl": "pallas"}, True)])
def test_ignored_precision_warning(tiny_config, changes, warned):
    # Emulation and the Pallas conv's bfloat16 do change the products on a CPU.
    import warnings

    import jax

    from dynaseg_jax.models import build_model

    if jax.default_backend() != "cpu":
        pytest.skip("the warning is about the CPU backend")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_model(tiny_config.replace(changes))
    assert any("has no effect on cpu" in str(w.message) for w in caught) == warned


def test_executed_products_name_what_the_hardware_multiplies(tiny_config):
    # One rule for the warning above and the benchmarks' "products" column: the CPU
    # multiplies float32 whatever is asked, except in the Pallas conv (bfloat16 casts);
    # JAX's bfloat16 is TF32 on NVIDIA GPUs; emulation names itself.
    from dynaseg_jax.models import executed_products
    cases = [({"model.matmul_precision": "tensorfloat32"}, "float32", "tensorfloat32"),
             ({"model.matmul_precision": "bfloat16"}, "float32", "tensorfloat32"),
             ({"model.matmul_precision": "bfloat16", "model.conv_impl": "pallas"}, "bfloat16", "bfloat16"),
             ({"model.matmul_precision": "bfloat16", "model.emulate_precision": True},
              "bfloat16 (emulated)", "bfloat16 (emulated)"),
             ({}, "float32", "float32")]
    for changes, on_cpu, on_gpu in cases:
        config = tiny_config.replace(changes)
        assert (executed_products(config, "cpu"), executed_products(config, "gpu")) == (on_cpu, on_gpu), changes
