"""How fast the silhouette phase picks k*, and how much cheaper settings change it.

For each of the first ``--limit`` BSDS500 images of a split (scaled by ``--scale``),
takes the network features of the image's own initial network (as ``dynaseg segment``
does under ``stop.k_min = "silhouette"``), then times ``estimate_k`` under the default
silhouette settings and under each ``--variant NAME:key=value,...`` (``samples``,
``n_init``, ``dims``, ``k_range``), and reports estimates per second, and how often and
by how much each variant's k* differs from the default's. With ``--processes N``, also
times the default estimates of all images run through a pool of N spawned processes (as
``engine.kstar_processes = N`` does), against the one-at-a-time rate. Ground truth is not
read. Writes ``--json``.

Example::

    python benchmarks/bench_kstar.py --split val --limit 20 --scale 0.5 \\
        --variant n_init_1:n_init=1 --variant dims_8:dims=8 --variant cheap:n_init=1,dims=8,samples=1500 \\
        --processes 2
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
    parser.add_argument("--processes", type=int, default=0,
                        help="also time the default estimates through a pool of this many processes")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    from dynaseg_jax import images as imio
    from dynaseg_jax.config import load_config, parse_value
    from dynaseg_jax.datasets import open_dataset
    from dynaseg_jax.engine import Engine
    from dynaseg_jax.runner import KStarEstimator, usable_cpus
    from dynaseg_jax.silhouette import estimate_k, kstar_of_sample, pixel_sample
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
    feature_s, samples = [], []
    for i in ids:
        image = imio.resize_image(imio.as_float_image(ds.load_image(i)), args.scale)
        t0 = time.perf_counter()
        feats = kstar.features(image, i)
        feature_s.append(time.perf_counter() - t0)
        samples.append(pixel_sample(feats, s.samples, base.seed))
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
    pool_rate = None
    if args.processes > 0:
        import concurrent.futures as cf
        import multiprocessing
        with cf.ProcessPoolExecutor(args.processes, mp_context=multiprocessing.get_context("spawn")) as pool:
            # Start every process (interpreter, numpy, scikit-learn) before timing.
            list(pool.map(kstar_of_sample, [samples[0][:50]] * args.processes, [(2, 3)] * args.processes))
            t0 = time.perf_counter()
            threads = max(1, usable_cpus() // args.processes)  # as engine.kstar_processes does
            n = len(samples)
            pooled = list(pool.map(kstar_of_sample, samples, [tuple(s.k_range)] * n, [base.seed] * n,
                                   [s.n_init] * n, [s.dims] * n, [threads] * n))
            wall = time.perf_counter() - t0
        same = [int(k) for k, _ in pooled] == rows["default"]["k"]
        pool_rate = {"processes": args.processes, "threads_each": threads, "wall_s": wall, "estimates_per_s": len(samples) / wall,
                     "one_at_a_time_estimates_per_s": len(samples) / float(np.sum(rows["default"]["seconds"])),
                     "same_k_as_one_at_a_time": same}
    print(f"features (jitted, per image): {np.mean(feature_s[1:] or feature_s):.3f} s")
    if pool_rate:
        print(f"{pool_rate['processes']} processes: {pool_rate['estimates_per_s']:.3f} estimates/s against "
              f"{pool_rate['one_at_a_time_estimates_per_s']:.3f}/s one at a time "
              f"({pool_rate['estimates_per_s'] / pool_rate['one_at_a_time_estimates_per_s']:.2f}x); "
              f"same k*: {pool_rate['same_k_as_one_at_a_time']}")
    for r in summary:
        print(f"{r['variant']:>12}: {r['seconds_per_estimate']:.2f} s per estimate ({r['estimates_per_s']:.2f}/s), "
              f"k* unchanged on {r['same_k']}/{len(ids)}, mean |dk| {r['mean_abs_k_change']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "images": ids, "variants": summary,
                                               "feature_seconds": feature_s, "pool": pool_rate,
                                               "host": platform.platform()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
