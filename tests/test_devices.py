"""The slot axis split over several local devices (engine.devices), on forced CPU devices.

The device count of a process is fixed when JAX starts, so the multi-device runs happen in
a subprocess started with ``jax_num_cpu_devices = 4``.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from dynaseg_jax.config import ConfigError
from dynaseg_jax.engine import resolve_config

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_num_cpu_devices", 4)
    import jax.numpy as jnp
    import numpy as np
    from dynaseg_jax.engine import Engine, WorkItem, pad_to_bucket
    from tests.conftest import smooth_image
    from dynaseg_jax.config import Config

    base = Config().replace({"model.channels": 16, "model.max_clusters": 16, "model.conv_impl": "lax",
                             "stop.max_iters": 8, "stop.k_min": 1, "engine.bucket_multiple": 8,
                             "engine.strategy": "vmap"})
    # 11 images in two buckets (24x32 and 32x32): every device gets work, slots refill.
    images = [smooth_image(24 + 8 * (i % 2), 32, i) for i in range(11)]

    def run(devices, batch):
        engine = Engine(base.replace({"engine.devices": devices, "engine.batch": batch}))
        results = {r.key: r for r in engine.run(WorkItem(i, im, 1) for i, im in enumerate(images))}
        step_compiles = {str(tag[1]): n for tag, n in engine.compile_counts().items()
                         if tag[0] == "vmap"}
        devices_used = sorted({d.id for d in engine.mesh.devices.flat}) if engine.mesh is not None else [0]
        return engine, results, step_compiles, devices_used

    e4, r4, compiles4, used4 = run(4, 8)   # 4 devices x 2 slots
    e1, r1, compiles1, _ = run(1, 2)       # 1 device x 2 slots: the same program per device

    # One step from the same states: slots 6, 7 (device 3) of the 4-device step against
    # the 1-device step of the same two images.
    padded = [pad_to_bucket(images[i], (32, 32, False)) for i in range(8)]
    def stacked(engine, idx):
        st = jax.tree.map(lambda x: jnp.stack([x] * len(idx)), engine.fresh_state)
        return (st, jnp.stack([padded[i][0] for i in idx]), jnp.stack([padded[i][1] for i in idx]))
    s4 = jax.device_put(stacked(e4, range(8)), e4.sharding())
    s1 = stacked(e1, [6, 7])
    n4 = e4.step_fn((32, 32, False), True)(*s4, e4.shared, None)["params"]
    n1 = e1.step_fn((32, 32, False), True)(*s1, e1.shared, None)["params"]
    flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
    p4, p1 = flat(jax.tree.map(lambda x: x[6:], n4)), flat(n1)
    print(json.dumps({
        "keys": sorted(r4),
        "pixels_differing": [float(np.mean(r4[k].labels != r1[k].labels)) for k in sorted(r1)],
        "iterations": [[r4[k].iterations, r1[k].iterations] for k in sorted(r1)],
        "errors": [r4[k].error for k in sorted(r4)],
        "compiles4": compiles4, "compiles1": compiles1, "devices_used": used4,
        "step_diff_norm": float(np.linalg.norm(p4.astype(np.float64) - p1)),
        "params_norm": float(np.linalg.norm(p1.astype(np.float64))), "n_pixels": 32 * 32,
    }))
""")


@pytest.fixture(scope="module")
def four_devices():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_four_devices_agree_with_one(four_devices):
    out = four_devices
    assert out["keys"] == list(range(11)) and out["devices_used"] == [0, 1, 2, 3]
    assert all(e is None for e in out["errors"])
    assert all(a == b == 8 for a, b in out["iterations"])
    # Each device runs a one-device program of 2 slots, but XLA compiles it inside a
    # 4-device module with other fusions, so sums are taken in another order: one step
    # agrees to float32 rounding of the gradient's sums over the image's pixels,
    # ||diff|| <= sqrt(n_pixels) * u * ||params|| (u = 2^-24).
    bound = np.sqrt(out["n_pixels"]) * 2.0 ** -24 * out["params_norm"]
    assert 0 <= out["step_diff_norm"] <= bound, (out["step_diff_norm"], bound)
    # Whole runs: rounding flips only near-tied argmax pixels (measured: 0 to 0.07% of the
    # pixels of an image; 1% leaves room for another CPU's rounding).
    assert max(out["pixels_differing"]) < 0.01, out["pixels_differing"]


def test_one_compilation_per_bucket(four_devices):
    # Two bucket shapes; refills and the 11 images never recompile the step.
    assert four_devices["compiles4"] == {"(24, 32)": 1, "(32, 32)": 1}
    assert four_devices["compiles1"] == {"(24, 32)": 1, "(32, 32)": 1}


def test_device_layout_errors(tiny_config):
    with pytest.raises(ConfigError, match=r"engine.devices = 2: this process has 1 local cpu device$"):
        resolve_config(tiny_config.replace({"engine.devices": 2}), "cpu")
    assert resolve_config(tiny_config.replace({"engine.devices": 0}), "cpu").engine.devices == 1
    auto = resolve_config(tiny_config.replace({"engine.batch": 0}), "cpu")
    assert auto.engine.batch == 4 and auto.engine.strategy == "per_image"


def test_device_layout_errors_with_several_devices():
    # The checks that need several devices, in the subprocess's world of 4.
    code = textwrap.dedent("""
        import jax
        jax.config.update("jax_num_cpu_devices", 4)
        from dynaseg_jax.config import Config, ConfigError
        from dynaseg_jax.engine import resolve_config
        c = Config()
        auto = resolve_config(c.replace({"engine.devices": 0, "engine.batch": 0}), "cpu")
        print(auto.engine.devices, auto.engine.batch, auto.engine.strategy)
        for change in ({"engine.devices": 4, "engine.batch": 6},
                       {"engine.devices": 2, "engine.strategy": "per_image", "engine.batch": 4}):
            try:
                resolve_config(c.replace(change), "cpu")
            except ConfigError as e:
                print(e)
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "4 16 vmap"  # all 4 devices, 4 slots each, vmap
    assert lines[1] == "engine.batch = 6: not a multiple of engine.devices = 4"
    assert lines[2] == "engine.devices = 2: several devices need engine.strategy = 'vmap'"
