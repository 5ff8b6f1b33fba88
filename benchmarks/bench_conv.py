"""The 3x3 conv alone: forward and both gradients, per-image kernels under vmap.

Times one ``vjp`` of each formulation (``lax``, ``im2col``, ``winograd``, and ``pallas`` at
several tile sizes) over ``--batch`` images, each with its own kernel, as the engine's
vmap strategy runs the network's inner conv (p -> p channels). Reports ms per image, the
direct convolution's TFLOP/s (forward + input gradient + weight gradient = 3 x 2 H W 9
Cin Cout) and its fraction of the card's peak for the products' precision, the compile
time, and each result's relative difference from ``lax.conv`` in strict float32 (a
correctness check of the compiled kernels where they run). Pallas rows are named
``pallas/<block_rows>x<block_channels>``.

Examples::

    python benchmarks/bench_conv.py --size 240x160 --batch 32 --precision float32 tensorfloat32
    python benchmarks/bench_conv.py --size 24x16 --batch 2 --channels 16 --impl lax pallas/16x16
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench_speed import card_peak_tflops, platform_version  # noqa: E402
from dynaseg_jax.images import write_text_atomic  # noqa: E402
from dynaseg_jax.models.conv3x3 import CONV3X3, conv3x3_pallas  # noqa: E402

DEFAULT_IMPLS = ["lax", "im2col", "winograd", "pallas/64x64", "pallas/128x64", "pallas/128x128", "pallas/256x64"]


def conv_of(impl: str):
    """The formulation named ``impl`` as f(x, kernel, precision)."""
    if impl.startswith("pallas/"):
        rows, channels = (int(v) for v in impl.split("/", 1)[1].split("x"))
        return lambda x, k, precision: conv3x3_pallas(x, k, precision, rows, channels)
    return CONV3X3[impl]


def batched_vjp(conv, precision):
    """(xs, ks, gs) -> (ys, dxs, dks): per image, the conv and its vjp with cotangent g."""
    def one(x, k, g):
        y, vjp = jax.vjp(lambda x, k: conv(x, k, precision), x, k)
        return (y, *vjp(g))
    return jax.jit(jax.vmap(one))


def relative_difference(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="240x160", help="W x H")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--channels", type=int, default=100, help="Cin = Cout")
    parser.add_argument("--precision", nargs="+", default=["float32"],
                        help="float32, tensorfloat32, bfloat16 (the products' precision)")
    parser.add_argument("--impl", nargs="+", default=DEFAULT_IMPLS)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    w, h = (int(v) for v in args.size.lower().split("x"))
    b, c = args.batch, args.channels
    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.normal(size=(b, h, w, c)), jnp.float32)
    ks = jnp.asarray(rng.normal(size=(b, 3, 3, c, c)) / np.sqrt(9 * c), jnp.float32)
    gs = jnp.asarray(rng.normal(size=(b, h, w, c)), jnp.float32)
    flops = 3 * 2 * h * w * 9 * c * c  # per image: forward, input and weight gradients
    device = jax.devices()[0]
    truth = batched_vjp(CONV3X3["lax"], "float32")(xs, ks, gs)
    machine = {"jax": jax.__version__, "backend": jax.default_backend(),
               "jax_platform_version": platform_version(device),
               "device": str(device.device_kind),
               "size": args.size, "batch": b, "channels": c, "direct_flops_per_image": flops}
    print(f"# {machine['device']} ({machine['backend']}), jax {jax.__version__}: {args.size}, batch {b}, "
          f"{c} -> {c} channels, vjp of the conv")
    print(f"{'impl':>16} {'precision':>13} {'ms/image':>9} {'TFLOP/s':>8} {'of peak':>8} {'compile s':>9} "
          f"{'rel. diff':>9}")
    rows = []
    for precision in args.precision:
        peak = card_peak_tflops(machine["device"], precision)
        for impl in args.impl:
            try:
                f = batched_vjp(conv_of(impl), precision)
                t = time.perf_counter()
                out = jax.block_until_ready(f(xs, ks, gs))
                compile_s = time.perf_counter() - t
                times = []
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    jax.block_until_ready(f(xs, ks, gs))
                    times.append(time.perf_counter() - t)
            except Exception as e:  # noqa: BLE001 - e.g. a tile the compiler rejects: report, go on
                print(f"{impl:>16} {precision:>13}  failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                rows.append({"impl": impl, "precision": precision, "error": f"{type(e).__name__}: {e}"[:2000]})
                continue
            ms = statistics.median(times) / b * 1e3
            tflops = flops / (ms * 1e-3) / 1e12
            diff = max(relative_difference(o, t) for o, t in zip(out, truth))
            row = {"impl": impl, "precision": precision, "ms_per_image": ms, "tflops_direct": tflops,
                   "card_peak_tflops": peak, "peak_fraction": tflops / peak if peak else None,
                   "compile_s": compile_s, "max_relative_difference_vs_lax_float32": diff,
                   "ms_all": [t / b * 1e3 for t in times]}
            rows.append(row)
            frac = f"{row['peak_fraction']:.1%}" if peak else "-"
            print(f"{impl:>16} {precision:>13} {ms:9.3f} {tflops:8.2f} {frac:>8} {compile_s:9.1f} {diff:9.1e}",
                  flush=True)
            if args.json:  # after every row, so that a run cut short keeps its rows
                write_text_atomic(args.json, json.dumps({**machine, "rows": rows, "partial": True}, indent=1))
    if args.json:
        write_text_atomic(args.json, json.dumps({**machine, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
