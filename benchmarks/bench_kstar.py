"""How fast the silhouette phase picks k*, and how much cheaper settings change it.

For each of the first ``--limit`` BSDS500 images of a split (scaled by ``--scale``),
takes the network features of the image's own initial network (as ``dynaseg segment``
does under ``stop.k_min = "silhouette"``), then times ``estimate_k`` under the default
silhouette settings and under each ``--variant NAME:key=value,...`` (``samples``,
``n_init``, ``dims``, ``k_range``), and reports estimates per second, and how often and
by how much each variant's k* differs from the default's. Ground truth is not read.
Writes ``--json``.

Example::

    python benchmarks/bench_kstar.py --split val --limit 20 --scale 0.5 \\
        --variant n_init_1:n_init=1 --variant dims_8:dims=8 --variant cheap:n_init=1,dims=8,samples=1500
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_ROOT = REPO.parent / "shared" / "data" / "bsds500"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=str(DEFAULT_ROOT))
    parser.add_argument("--split", default="val")
    parser.add_argument("--limit", type=int, default=12)
    parser.add_argument("--scale", type=float, default=0.5)
    parser.add_argument("--config", default="dynaseg_scf_silhouette")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:key=v,...",
                        help="silhouette fields changed (samples, n_init, dims, k_range)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    from dynaseg_jax import images as imio
    from dynaseg_jax.config import load_config, parse_value
    from dynaseg_jax.datasets import open_dataset
    from dynaseg_jax.engine import Engine
    from dynaseg_jax.runner import KStarEstimator
    from dynaseg_jax.silhouette import estimate_k
    from dynaseg_jax.sweep import split_values  # commas outside brackets separate the items

    base = load_config(args.config)
    engine = Engine(base)
    kstar = KStarEstimator(engine.config, engine.initial_variables, engine.model)
    ds = open_dataset("bsds500", args.root, args.split)
    ids = ds.ids()[: args.limit]
    variants = [("default", {})]
    for text in args.variant:
        name, _, rest = text.partition(":")
        variants.append((name, {k.strip(): parse_value(v.strip()) for k, v in
                                (item.split("=", 1) for item in split_values(rest))}))
    s = base.silhouette
    rows = {name: {"seconds": [], "k": []} for name, _ in variants}
    feature_s = []
    for i in ids:
        image = imio.resize_image(imio.as_float_image(ds.load_image(i)), args.scale)
        t0 = time.perf_counter()
        feats = kstar.features(image, i)
        feature_s.append(time.perf_counter() - t0)
        for name, changes in variants:
            kw = {"k_range": tuple(changes.get("k_range", s.k_range)), "n_samples": changes.get("samples", s.samples),
                  "seed": base.seed, "n_init": changes.get("n_init", s.n_init), "dims": changes.get("dims", s.dims)}
            t0 = time.perf_counter()
            k, _ = estimate_k(feats, **kw)
            rows[name]["seconds"].append(time.perf_counter() - t0)
            rows[name]["k"].append(int(k))
        print(f"{i}: " + ", ".join(f"{n} k*={rows[n]['k'][-1]} ({rows[n]['seconds'][-1]:.2f} s)" for n, _ in variants),
              flush=True)
    default_k = np.array(rows["default"]["k"])
    summary = []
    for name, changes in variants:
        k = np.array(rows[name]["k"])
        sec = float(np.mean(rows[name]["seconds"]))
        summary.append({"variant": name, "changes": changes, "seconds_per_estimate": sec,
                        "estimates_per_s": 1.0 / sec, "same_k": int(np.sum(k == default_k)),
                        "mean_abs_k_change": float(np.mean(np.abs(k - default_k))), "k": k.tolist()})
    print(f"features (jitted, per image): {np.mean(feature_s[1:] or feature_s):.3f} s")
    for r in summary:
        print(f"{r['variant']:>12}: {r['seconds_per_estimate']:.2f} s per estimate ({r['estimates_per_s']:.2f}/s), "
              f"k* unchanged on {r['same_k']}/{len(ids)}, mean |dk| {r['mean_abs_k_change']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "images": ids, "variants": summary,
                                               "feature_seconds": feature_s,
                                               "host": platform.platform()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
