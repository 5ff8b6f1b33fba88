"""A sweep's throughput against the same settings run one after another.

Runs, on the same images and in this order, (a) one ``dynaseg sweep`` over a grid and
(b) one ``dynaseg segment`` per setting of that grid, each a fresh process (start-up,
compilation and all, as a user would run them), and prints (image, setting) pairs per
second of both and their ratio, measured in the same run. Every command's wall time
and the labels' agreement (the sweep's pairs equal the single runs') are written to
``--json``.

Example::

    python benchmarks/bench_sweep.py --limit 4 --scale 0.25 --max-iters 100 --seeds 0 1 2 \\
        --json benchmarks/results/sweep_throughput_cpu.json
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_ROOT = REPO.parent / "shared" / "data" / "bsds500"


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=str(DEFAULT_ROOT), help="BSDS500 folder")
    parser.add_argument("--split", default="val")
    parser.add_argument("--limit", type=int, default=4)
    parser.add_argument("--scale", type=float, default=0.25)
    parser.add_argument("--config", default="dynaseg_fsf")
    parser.add_argument("--max-iters", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch", type=int, default=None, help="slots (default: the engine's auto)")
    parser.add_argument("--json", default=None, help="write the measurements here")
    args = parser.parse_args(argv)

    from dynaseg_jax import images as imio

    cli = [sys.executable, "-m", "dynaseg_jax.cli"]
    common = ["--dataset", "bsds500", "--root", args.root, "--split", args.split, "--limit", str(args.limit),
              "--scale", str(args.scale), "--config", args.config, "--set", f"stop.max_iters={args.max_iters}",
              "--no-progress"] + (["--batch", str(args.batch)] if args.batch else [])
    work = Path(tempfile.mkdtemp(prefix="bench_sweep_"))
    try:
        sweep_s = timed(cli + ["sweep", *common, "--out", str(work / "sweep"),
                               "--grid", "seed=" + ",".join(map(str, args.seeds))])
        single_s = [timed(cli + ["segment", *common, "--seed", str(s), "--out", str(work / f"seed_{s}")])
                    for s in args.seeds]
        same = all(np.array_equal(imio.read_labels(p), imio.read_labels(work / f"seed_{s}" / p.name))
                   for s in args.seeds for p in (work / "sweep" / f"seed_{s}").glob("*.png")
                   if not p.name.endswith("_overlay.png"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    pairs = args.limit * len(args.seeds)
    result = {"args": vars(args), "pairs": pairs, "sweep_seconds": round(sweep_s, 2),
              "one_after_another_seconds": [round(s, 2) for s in single_s],
              "sweep_pairs_per_s": pairs / sweep_s, "one_after_another_pairs_per_s": pairs / sum(single_s),
              "speedup": sum(single_s) / sweep_s, "labels_equal": bool(same),
              "host": f"{platform.platform()}, {platform.processor() or platform.machine()}"}
    print(f"{pairs} pairs ({args.limit} images x {len(args.seeds)} seeds, {args.max_iters} updates, scale "
          f"{args.scale}): sweep {sweep_s:.1f} s ({result['sweep_pairs_per_s']:.3f} pairs/s), one after another "
          f"{sum(single_s):.1f} s ({result['one_after_another_pairs_per_s']:.3f} pairs/s): "
          f"{result['speedup']:.2f}x; labels equal: {same}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
