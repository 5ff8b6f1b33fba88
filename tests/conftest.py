"""Shared fixtures: a tiny config, so each compiled step is cheap and compiled once."""
from __future__ import annotations

import atexit
import importlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from dynaseg_jax.config import Config

# Many tests build the same tiny programs again (a new engine, a new model instance, a
# child process of the multi-process tests): XLA's persistent compilation cache lets each
# compile once per suite run. A fresh folder per run (removed at exit), so no test ever
# reads a cache that an older version of the code wrote; the environment variables also
# reach the child processes. A user's own JAX_COMPILATION_CACHE_DIR is left alone.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="dynaseg-tests-xla-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    import jax

    jax.config.update("jax_compilation_cache_dir", _cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))

SHARED = Path(__file__).resolve().parents[2] / "shared"
BSDS = SHARED / "data" / "bsds500"


def require(module: str):
    """``module`` imported, or the test skipped when it is missing; under CI (``CI=true``,
    where the test command installs every extra) a missing module fails instead."""
    if os.environ.get("CI") == "true":
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"{module} is not installed (an optional extra)")


@pytest.fixture(scope="session")
def tiny_config() -> Config:
    """Small network and few iterations: the algorithm unchanged, the cost tiny."""
    return Config().replace({"model.channels": 16, "model.max_clusters": 16, "model.n_conv": 2,
                             "model.conv_impl": "lax", "stop.max_iters": 12, "stop.k_min": 3,
                             "schedule.kind": "scf", "schedule.alpha": 50.0, "engine.batch": 3,
                             "engine.bucket_multiple": 8})


def tiny_toml(max_iters: int, k_min: int, strategy: str, batch: int) -> str:
    """A config file for command-line tests: the tiny network of ``tiny_config``."""
    return (f'[model]\nchannels = 16\nmax_clusters = 16\nconv_impl = "lax"\n'
            f'[stop]\nmax_iters = {max_iters}\nk_min = {k_min}\n'
            f'[engine]\nbucket_multiple = 8\nstrategy = "{strategy}"\nbatch = {batch}\n')


def smooth_image(h: int, w: int, seed: int) -> np.ndarray:
    """A float RGB image with a few smooth regions (tiny, deterministic)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.zeros((h, w, 3), np.float32)
    for _ in range(4):
        cy, cx, r = rng.uniform(0, 1, 3)
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2) < (0.2 + 0.3 * r) ** 2
        img[blob] = rng.uniform(0, 1, 3)
    return np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1).astype(np.float32)


def bsds_val_images(n: int):
    """Paths of the first n BSDS500 val images, or skip when ../shared is absent."""
    folder = BSDS / "images" / "val"
    if not folder.is_dir():
        pytest.skip(f"BSDS500 not found at {folder} (the ../shared data folder is absent)")
    return sorted(folder.glob("*.jpg"))[:n]
