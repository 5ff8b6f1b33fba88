"""Markdown tables from the speed benchmarks' JSON files, as the README shows them.

Reads any mix of ``bench_speed.py`` files (step timings, ``full_run`` and ``kstar_run``)
and ``bench_conv.py`` files (the conv alone) and prints one table per kind: every row
names the products' precision of each side and the versions (jax, torch, and the CUDA
each one runs on), so that a row copied elsewhere still says what was measured.
Ratios are images per second of JAX over the opponent (> 1: JAX is faster), computed
from the times of one run, where both sides were interleaved.

``--plot`` also draws each side's speed as bars (steps and whole runs).

Example::

    python benchmarks/speed_tables.py runs/gpu/*.json --plot runs/gpu/speed.png > runs/gpu/tables.md
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np


def versions(run: dict) -> str:
    """'jax V (platform), torch V (CUDA V)' of one benchmark file."""
    plat = run.get("jax_platform_version") or run.get("jax_backend") or run.get("backend") or "?"
    out = f"jax {run.get('jax', '?')} ({plat})"
    if run.get("torch"):
        cuda = f", CUDA {run['torch_cuda']}" if run.get("torch_cuda") else ""
        out += f"; torch {run['torch']}{cuda}"
    return out


def card(run: dict) -> str:
    """The device both sides ran on: the GPU's name, or the CPU's cores."""
    if "cpu" in (run.get("jax_backend"), run.get("backend")):
        return f"CPU, {run['cpu_count']} cores" if run.get("cpu_count") else "CPU"
    return run.get("torch_device") or run.get("jax_device") or run.get("device") or "?"


def _f(x, fmt: str = ".2f", none: str = "—") -> str:
    return none if x is None else format(x, fmt)


def _ratio(ms_other, ms_jax) -> str:
    """Images per second of JAX over the other side, from ms per image-iteration."""
    return "—" if not ms_other or not ms_jax else f"{ms_other / ms_jax:.2f}x"


def _strict_or_tf32(run: dict) -> str:
    """Products of files written before the benchmarks recorded them: bench_speed ran
    both sides in strict float32 unless --tf32."""
    return "tensorfloat32" if run.get("tf32") else "float32"


def _peak(row: dict) -> str:
    gflops, peak = row.get("jax_gflops"), row.get("card_peak_tflops")
    if gflops is None:
        return "—"
    text = f"{gflops / 1e3:.3g}"
    if peak:
        text += f", {row['jax_peak_fraction_direct']:.0%} of {peak:g}"
        if row.get("jax_peak_fraction_executed"):
            text += f" ({row['jax_peak_fraction_executed']:.0%} executed)"
    return text


def _row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _header(*cells: str) -> list[str]:
    """A markdown table's header and rule."""
    return [_row(*cells), "|" + "---|" * len(cells)]


def step_table(runs: list[tuple[str, dict]]) -> list[str]:
    lines = _header("size", "batch", "JAX: strategy, conv, products", "JAX ms / image-iter",
                    "reference ms (products)", "tuned ms (products, conv)", "JAX over reference",
                    "JAX over tuned", "JAX TFLOP/s (direct), of peak", "step MiB", "card; versions")
    for _, run in runs:
        for row in run.get("results", []):
            torch_p = row.get("torch_products") or _strict_or_tf32(row)
            ref = row.get("torch_ms_per_image_iter")
            tuned = row.get("torch_batched_ms_per_image_iter")
            compiled = f", {row.get('torch_batched_conv') or 'bmm'}"
            compiled += ", compiled" if row.get("torch_batched_compiled") else ""
            lines.append(
                f"| {row['size']} | {row['batch']} | {row['strategy']}, {row['conv_impl']}, "
                f"{row.get('products') or _strict_or_tf32(row)} | {row['jax_ms_per_image_iter']:.2f} "
                f"| {_f(ref)}{f' ({torch_p})' if ref else ''} "
                f"| {_f(tuned)}{f' ({torch_p}{compiled})' if tuned else ''} "
                f"| {_ratio(ref, row['jax_ms_per_image_iter'])} | {_ratio(tuned, row['jax_ms_per_image_iter'])} "
                f"| {_peak(row)} | {_f(row.get('step_total_mb'), '.0f')} | {card(run)}; {versions(run)} |")
    return lines if len(lines) > 2 else []


def _iterations(its) -> str:
    return f"{min(its)} / {statistics.median(its):g} / {max(its)}" if its else "—"


def _phases(runs: list[tuple[str, dict]], key: str, required: str):
    """(file's run, its ``key`` phase) of each file whose phase got as far as ``required``."""
    for _, run in runs:
        phase = run.get(key)
        if phase and required in phase:
            yield run, phase


def full_run_table(runs: list[tuple[str, dict]]) -> list[str]:
    lines = _header("images (size)", "side", "products", "images at once", "images / s",
                    "iterations min / median / max", "JAX over it", "card; versions")
    for run, fr in _phases(runs, "full_run", "jax_seconds"):
        what = f"{fr['images']} BSDS500 val ({fr['size']}, scale {fr['scale']:g})"
        tail = f"{card(run)}; {versions(run)}"
        jax_ips = fr["jax_images_per_s"]
        lines.append(f"| {what} | JAX {fr['strategy']}, {fr['conv_impl']} | {fr.get('products') or _strict_or_tf32(run)} "
                     f"| {fr['batch']} | {jax_ips:.4g} | {_iterations(fr['jax_iterations'])} | | {tail} |")
        torch_products = fr.get("torch_products") or _strict_or_tf32(run)
        if "torch_images_per_s" in fr:
            lines.append(_row(f"first {fr['torch_images']}", "PyTorch reference", torch_products, 1,
                              f"{fr['torch_images_per_s']:.4g}", _iterations(fr["torch_iterations"]),
                              f"{jax_ips / fr['torch_images_per_s']:.2f}x", tail))
        if "torch_batched_images_per_s" in fr:
            n_tuned = fr.get("torch_batched_images", fr["torch_images"])
            lines.append(_row(f"first {n_tuned}", f"PyTorch tuned ({fr.get('torch_batched_conv', 'bmm')})",
                              torch_products, min(fr["batch"], n_tuned), f"{fr['torch_batched_images_per_s']:.4g}",
                              _iterations(fr["torch_batched_iterations"]),
                              f"{jax_ips / fr['torch_batched_images_per_s']:.2f}x", tail))
    return lines if len(lines) > 2 else []


def kstar_table(runs: list[tuple[str, dict]]) -> list[str]:
    lines = _header("images", "slots", "k* processes (CPUs)", "k* / s", "device images / s (k* given)",
                    "pipeline images / s", "wait for k*, slots running / idle (s)", "card; versions")
    for run, k in _phases(runs, "kstar_run", "kstar_per_s"):
        waits = f"{_f(k.get('wait_for_kstar_while_running_s'))} / {_f(k.get('wait_for_kstar_while_idle_s'))}"
        lines.append(_row(f"{k['images']} (scale {k['scale']:g})", k["batch"],
                          f"{k['kstar_processes']} ({k['cpu_count']})", f"{k['kstar_per_s']:.3g}",
                          _f(k.get("device_images_per_s"), ".3g"), _f(k.get("pipeline_images_per_s"), ".3g"),
                          waits, f"{card(run)}; {versions(run)}"))
    return lines if len(lines) > 2 else []


def conv_table(runs: list[tuple[str, dict]]) -> list[str]:
    lines = _header("size, batch, channels", "impl", "products", "ms / image", "TFLOP/s (direct)", "of peak",
                    "rel. diff vs lax float32", "card; versions")
    for _, run in runs:
        for row in run.get("rows", []):
            what = f"{run['size']}, {run['batch']}, {run['channels']}"
            tail = f"{run.get('device', '?')}; {versions(run)}"
            if "error" in row:
                lines.append(f"| {what} | {row['impl']} | {row['precision']} | failed: "
                             f"{row['error'].splitlines()[0][:80]} | | | | {tail} |")
                continue
            lines.append(f"| {what} | {row['impl']} | {row['precision']} | {row['ms_per_image']:.3f} "
                         f"| {row['tflops_direct']:.2f} | {_f(row.get('peak_fraction'), '.0%')} "
                         f"| {row['max_relative_difference_vs_lax_float32']:.1e} | {tail} |")
    return lines if len(lines) > 2 else []


def read_runs(paths: list[Path]) -> tuple[list, list]:
    """(bench_speed files, bench_conv files), each as (path, its JSON); raises ValueError
    on a file that is neither kind."""
    speed, conv = [], []
    for path in paths:
        try:
            run = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read: {e}") from None
        if "results" in run or "full_run" in run or "kstar_run" in run:
            speed.append((str(path), run))
        elif "rows" in run and {"size", "batch", "channels"} <= run.keys():
            conv.append((str(path), run))
        else:
            raise ValueError(f"{path}: not a bench_speed.py or bench_conv.py JSON file")
    return speed, conv


def plot(speed: list[tuple[str, dict]], path) -> bool:
    """Bars of each side's speed, higher is better: image-iterations per second of the
    step rows, and images per second of whole runs, one panel each. False (and a note on
    stderr) without matplotlib (the ``bench`` extra) or without data."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e '.[bench]'): no plot", file=sys.stderr)
        return False
    sides = (("JAX", "tab:blue"), ("PyTorch reference", "tab:gray"), ("PyTorch tuned", "tab:orange"))
    steps = sorted(((run, row) for _, run in speed for row in run.get("results", [])),
                   key=lambda item: (item[1]["height"] * item[1]["width"], item[1]["batch"]))
    whole = list(_phases(speed, "full_run", "jax_seconds"))
    panels = [p for p in (("steps", steps), ("whole runs", whole)) if p[1]]
    if not panels:
        print("no step rows or whole runs to plot", file=sys.stderr)
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (kind, items) in zip(axes[0], panels):
        labels, values = [], []
        for run, item in items:
            if kind == "steps":
                products = (item.get("products") or _strict_or_tf32(item)).replace("tensorfloat32", "TF32")
                labels.append(f"{item['size']}\nbatch {item['batch']}\n{item['conv_impl']}\n{products}")
                ms = (item["jax_ms_per_image_iter"], item.get("torch_ms_per_image_iter"),
                      item.get("torch_batched_ms_per_image_iter"))
                values.append([1e3 / m if m else 0.0 for m in ms])
            else:
                labels.append(f"{item['images']} images\n{item['size']}")
                values.append([item["jax_images_per_s"], item.get("torch_images_per_s") or 0.0,
                               item.get("torch_batched_images_per_s") or 0.0])
        x = np.arange(len(labels))
        for i, (side, color) in enumerate(sides):
            bars = ax.bar(x + (i - 1) * 0.27, [v[i] for v in values], 0.27, label=side, color=color)
            if i:  # JAX over this side, above its bar
                ax.bar_label(bars, [f"{v[0] / v[i]:.2g}x" if v[i] else "" for v in values], fontsize=7)
        ax.set_xticks(x, labels, fontsize=8)
        if kind == "steps":  # sizes differ by orders of magnitude
            ax.set_yscale("log")
        ax.set_ylabel("image-iterations per second" if kind == "steps" else "images per second")
        ax.set_title(f"{kind}: {card(items[0][0])} (higher is better; labels: JAX over that side)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def tables(paths: list[Path]) -> str:
    """The markdown of every table the files have data for; raises ValueError on a file
    that is neither kind."""
    return render(*read_runs(paths))


def render(speed: list[tuple[str, dict]], conv: list[tuple[str, dict]]) -> str:
    """The markdown of ``read_runs``' files."""
    parts = []
    for title, lines in (("Steps (no early stop)", step_table(speed)),
                         ("Whole runs with early stopping", full_run_table(speed)),
                         ("The silhouette phase against the device", kstar_table(speed)),
                         ("The 3x3 conv alone (forward and both gradients)", conv_table(conv))):
        if lines:
            parts.append(f"### {title}\n\n" + "\n".join(lines))
    partial = [p for p, r in speed + conv if r.get("partial")]
    if partial:  # the benchmark stopped before its last row or phase
        parts.insert(0, f"Cut short, rows or phases missing: {', '.join(partial)}.")
    sources = " ".join(p for p, _ in speed + conv)
    return f"<!-- python benchmarks/speed_tables.py {sources} -->\n\n" + "\n\n".join(parts) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+", type=Path, help="bench_speed.py / bench_conv.py JSON files")
    parser.add_argument("--plot", type=Path, help="also draw each side's speed (PNG; needs matplotlib)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        speed, conv = read_runs(args.json)  # each file read once, for the tables and the plot
        sys.stdout.write(render(speed, conv))
        if args.plot and plot(speed, args.plot):
            print(f"plot -> {args.plot}", file=sys.stderr)
    except ValueError as e:
        print(f"speed_tables: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
