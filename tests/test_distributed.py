"""Two processes on JAX's distributed runtime (127.0.0.1, CPU) into one output folder, one
of them killed mid-run; a rerun with another process count (3) finishes the rest without
redoing anything, and the merged folder equals a one-process run, label for label.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dynaseg_jax import images as imio
from dynaseg_jax.outputs import merge_results
from tests.conftest import smooth_image, tiny_toml

REPO = Path(__file__).resolve().parents[1]
TINY = tiny_toml(max_iters=150, k_min=1, strategy="per_image", batch=1)
N_IMAGES = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def wait_for(condition, what: str, procs, timeout: float = 240.0) -> None:
    t0 = time.monotonic()
    while not condition():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        for p in procs:
            if p.poll() is not None and not condition():
                out = p.stdout.read() if p.stdout else ""
                raise AssertionError(f"a process ended (rc {p.returncode}) before {what}: {out[-2000:]}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    (root / "in").mkdir()
    for i in range(N_IMAGES):
        img = smooth_image(24 + 8 * (i % 2), 32, i)  # two buckets
        Image.fromarray((img * 255).astype(np.uint8)).save(root / "in" / f"img{i}.png")
    (root / "tiny.toml").write_text(TINY)
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}

    def cmd(out, *extra):
        return [sys.executable, "-m", "dynaseg_jax.cli", "segment", str(root / "in"), "--out", str(out),
                "--config", str(root / "tiny.toml"), "--no-progress", *extra]

    def start(out, port, index, count=2):
        return subprocess.Popen(cmd(out, "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(count),
                                    "--process-id", str(index)),
                                cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    dist = root / "two"
    port = free_port()
    procs = [start(dist, port, i) for i in range(2)]
    try:
        # Kill process 1 once it has finished an image, then let process 0 finish its
        # share and merge; the coordination service would abort it ~100 s after its peer
        # died, so the job going down is simulated by killing it too.
        wait_for(lambda: lines(dist / "results.1.jsonl") >= 1, "process 1's first image", procs)
        procs[1].send_signal(signal.SIGKILL)
        wait_for(lambda: lines(dist / "results.0.jsonl") >= N_IMAGES // 2 and lines(dist / "results.jsonl") >= 1,
                 "process 0's share and merge", procs[:1])
        procs[0].send_signal(signal.SIGKILL)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    first = {"share0": lines(dist / "results.0.jsonl"), "share1": lines(dist / "results.1.jsonl")}
    # The command again, with 3 processes: the shares change, finished images are skipped.
    port = free_port()
    procs = [start(dist, port, i, count=3) for i in range(3)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    single = root / "one"
    proc = subprocess.run(cmd(single), cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return dist, single, first, outs


def ok_records(path: Path) -> dict:
    return {Path(r["source"]).name: r for r in imio.read_jsonl(path / "results.jsonl") if r["status"] == "ok"}


def test_killed_run_resumes_and_merges_to_a_one_process_run(folders):
    dist, single, first, outs = folders
    assert first["share0"] == N_IMAGES // 2 and 1 <= first["share1"] < N_IMAGES // 2
    merged, alone = ok_records(dist), ok_records(single)
    assert sorted(merged) == sorted(alone) == [f"img{i}.png" for i in range(N_IMAGES)]
    assert len(imio.read_jsonl(dist / "results.jsonl")) == N_IMAGES  # one record per image
    for name, rec in alone.items():
        assert merged[name]["config"] == rec["config"] and merged[name]["iterations"] == rec["iterations"]
        stem = Path(name).stem
        np.testing.assert_array_equal(imio.read_labels(dist / f"{stem}.png"), imio.read_labels(single / f"{stem}.png"))
    # The rerun did exactly the images left: "<k> segmented, <m> already done" per process.
    counts = [tuple(int(w) for w in out.strip().splitlines()[-1].replace(",", "").split()[0:3:2]) for out in outs]
    assert sum(k for k, _ in counts) == N_IMAGES - first["share0"] - first["share1"]
    assert sum(k + m for k, m in counts) == N_IMAGES
    all_ok = [json.loads(x) for f in sorted(dist.glob("results.*.jsonl")) for x in f.read_text().splitlines()]
    assert len(all_ok) == N_IMAGES and all(r["status"] == "ok" for r in all_ok)  # nothing twice


def test_merge_is_idempotent_and_prefers_ok_records(tmp_path):
    rec = {"file": "a.png", "source": "/x/a.png", "stem": "a", "config": "d1"}
    imio.append_jsonl(tmp_path / "results.0.jsonl", {**rec, "status": "error", "error": "boom"})
    imio.append_jsonl(tmp_path / "results.1.jsonl", {**rec, "status": "ok", "error": None})
    imio.append_jsonl(tmp_path / "results.1.jsonl", {**rec, "source": "/x/b.png", "file": "b.png",
                                                     "status": "error", "error": "bad"})
    assert merge_results(tmp_path) == 2
    first = (tmp_path / "results.jsonl").read_text()
    assert merge_results(tmp_path) == 2 and (tmp_path / "results.jsonl").read_text() == first
    got = {r["source"]: r["status"] for r in imio.read_jsonl(tmp_path / "results.jsonl")}
    assert got == {"/x/a.png": "ok", "/x/b.png": "error"}


def test_distributed_flags_errors(tmp_path, capsys):
    from dynaseg_jax.cli import main
    base = ["segment", str(tmp_path), "--out", str(tmp_path / "out")]
    assert main(base + ["--coordinator", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("dynaseg: error: --coordinator, --num-processes and --process-id go together "
                   "(or --distributed, to read them from the launcher)")
    assert main(base + ["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"]) == 2
    assert capsys.readouterr().err.strip() == "dynaseg: error: --process-id 2: must be in 0..1"
    assert main(["merge", str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_overwrite_is_refused_with_several_processes(tmp_path, tiny_config):
    from dynaseg_jax.outputs import OutputFolder, OutputFolderError
    with pytest.raises(OutputFolderError, match="--overwrite needs a one-process run"):
        OutputFolder.open(tmp_path, tiny_config, overwrite=True, process=(0, 2))
    # Two processes share the folder; a one-process run cannot start beside them.
    a = OutputFolder.open(tmp_path, tiny_config, process=(0, 2))
    b = OutputFolder.open(tmp_path, tiny_config, process=(1, 2))
    assert a.results_path.name == "results.0.jsonl" and b.results_path.name == "results.1.jsonl"
    with pytest.raises(OutputFolderError, match="another dynaseg run"):
        OutputFolder.open(tmp_path, tiny_config)
    with pytest.raises(OutputFolderError, match="another dynaseg run"):
        OutputFolder.open(tmp_path, tiny_config, process=(1, 2))  # the same index twice
    a.close(), b.close()
    OutputFolder.open(tmp_path, tiny_config).close()
