"""Why DynaSeg leaves a frame of segments along the border and never reaches k_min.

Runs the per-image optimisation of a preset and of variants of it (``--variant
NAME:key=value,key=value``, config fields) on a few BSDS500 images for a fixed number of
iterations, with the stop rule off, and records for every (variant, image):

* q' (clusters present) after every update, and the first update at which q' <= k_min
  (where the stop rule would have fired);
* the final label map's clusters, and how many of them lie entirely within ``--band``
  pixels of the image border (the "frame");
* the BSDS best-overlap mIoU (all) of the final labels, plain, split into connected
  regions, and after merging regions below ``--min-region`` of the image (the
  ``[postprocess]`` steps), pooled over the images of the variant.

Ground truth only scores here; it is meant for the train split (settings are chosen on
train, reported on val). Writes ``<out>.json`` (everything, with the traces), ``<out>.md``
(the table) and ``<out>.png`` (q' against iteration per variant).

Example::

    python benchmarks/diagnose_quality.py --split train --limit 4 --scale 0.25 --iters 1000 \\
        --variant reflect:model.padding=reflect --variant no_output_bn:model.output_norm=false \\
        --out benchmarks/results/diagnose_train4
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


def border_only_clusters(labels: np.ndarray, band: int) -> int:
    """Clusters every pixel of which lies within ``band`` pixels of the image border."""
    inner = np.zeros(labels.shape, bool)
    inner[band:-band, band:-band] = True
    present = np.unique(labels)
    inside = np.unique(labels[inner])
    return int(np.setdiff1d(present, inside).size)


def parse_variant(text: str) -> tuple[str, dict]:
    """``"reflect:model.padding=reflect,optim.lr=0.05"`` -> ("reflect", {...}) (TOML values)."""
    from dynaseg_jax.config import parse_value
    from dynaseg_jax.sweep import split_values  # commas inside [lists] stay in their item

    name, _, rest = text.partition(":")
    changes = {}
    for item in split_values(rest):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --variant {text!r}: expected NAME:key=value,key=value")
        changes[key.strip()] = parse_value(value.strip())
    return name, changes


def run_one(config, image: np.ndarray, name: str, iters: int, cache: dict):
    """Optimises one image for ``iters`` updates; returns (q' trace, final labels)."""
    import jax
    import jax.numpy as jnp

    from dynaseg_jax import train
    from dynaseg_jax.models import build_model
    from dynaseg_jax.superpixels import superpixel_map

    key = (config.model, config.superpixels.method, config.superpixels.max_segments)
    if key not in cache:
        model = build_model(config)
        cache[key] = (model, train.init_params(config, model=model),
                      jax.jit(train.make_train_step(config, model=model)),
                      jax.jit(train.make_predict(config, model=model)))
    model, base, step, predict = cache[key]
    variables = train.image_variables(config, model, base, train.image_key(config.seed, name))
    state = train.init_state(config, variables, k_min=0)  # q' <= 0 never: no early stop
    x = jnp.asarray(image)
    mask = jnp.ones(image.shape[:2], jnp.float32)
    segments = superpixel_map(image, config)
    segments = None if segments is None else jnp.asarray(segments)
    counts = []  # q' stays on the device until the run ends: no host sync per update
    for _ in range(iters):
        state, metrics = step(state, x, mask, None, segments)
        counts.append(metrics["n_clusters"])
    labels = np.asarray(predict(state["params"], x, mask))
    return [int(q) for q in jax.device_get(counts)], labels


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=str(DEFAULT_ROOT), help="BSDS500 folder")
    parser.add_argument("--split", default="train")
    parser.add_argument("--limit", type=int, default=4, help="the first N images of the split")
    parser.add_argument("--scale", type=float, default=0.25)
    parser.add_argument("--iters", type=int, default=1000)
    parser.add_argument("--config", default="dynaseg_fsf", help="the base preset")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:key=v,...",
                        help="a variant of the preset (repeat); the preset itself runs as 'base'")
    parser.add_argument("--band", type=int, default=3, help="border band width in pixels")
    parser.add_argument("--min-region", type=float, default=0.005,
                        help="postprocess.min_region of the merged row")
    parser.add_argument("--out", required=True, help="output path prefix (.json, .md, .png)")
    args = parser.parse_args(argv)

    from dynaseg_jax import images as imio
    from dynaseg_jax import metrics
    from dynaseg_jax.config import load_config
    from dynaseg_jax.datasets import open_dataset
    from dynaseg_jax.postprocess import postprocess

    base = load_config(args.config, {"stop.max_iters": args.iters})
    variants = [("base", {})] + [parse_variant(v) for v in args.variant]
    ds = open_dataset("bsds500", args.root, args.split)
    ids = ds.ids()[: args.limit]
    images = {i: imio.resize_image(imio.as_float_image(ds.load_image(i)), args.scale) for i in ids}
    gts = {i: ds.load_gt(i) for i in ids}
    post = {"connected": base.replace({"postprocess.connected": True}),
            "merged": base.replace({"postprocess.connected": True, "postprocess.min_region": args.min_region})}

    rows, runs, cache = [], [], {}
    for vname, changes in variants:
        config = base.replace(changes)
        t0 = time.perf_counter()
        ious = {"plain": [], "connected": [], "merged": []}
        for i in ids:
            trace, labels = run_one(config, images[i], i, args.iters, cache)
            fired = next((t + 1 for t, q in enumerate(trace) if q <= base.stop.k_min), None)
            maps = {"plain": labels, **{k: postprocess(labels, images[i], c) for k, c in post.items()}}
            for kind, lab in maps.items():
                lab = metrics.resize_prediction(lab, gts[i][0].shape)
                ious[kind].append([metrics.overlap_scores(lab, a)[0] for a in gts[i]])
            runs.append({"variant": vname, "id": i, "trace": trace, "stop_fires_at": fired,
                         "clusters": int(np.unique(labels).size),
                         "border_only": border_only_clusters(labels, args.band),
                         "regions_merged": int(maps["merged"].max()) + 1})
            print(f"{vname} {i}: q' {trace[0]} -> {trace[-1]}, border-only {runs[-1]['border_only']} of "
                  f"{runs[-1]['clusters']}", flush=True)
        mine = [r for r in runs if r["variant"] == vname]
        rows.append({"variant": vname, "changes": changes,
                     "all": metrics.bsds_scores(ious["plain"])["all"],
                     "all_connected": metrics.bsds_scores(ious["connected"])["all"],
                     "all_merged": metrics.bsds_scores(ious["merged"])["all"],
                     "clusters": float(np.mean([r["clusters"] for r in mine])),
                     "border_only": float(np.mean([r["border_only"] for r in mine])),
                     "regions_merged": float(np.mean([r["regions_merged"] for r in mine])),
                     "stopped": sum(r["stop_fires_at"] is not None for r in mine),
                     "seconds_per_image": (time.perf_counter() - t0) / len(ids)})

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    import jax
    report = {"args": vars(args), "ids": ids, "rows": rows, "runs": runs,
              "host": f"{platform.platform()}, {jax.device_count()} {jax.default_backend()} device(s), "
                      f"jax {jax.__version__}"}
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    lines = [f"# Border frame and stop rule: `{args.config}` and variants",
             "",
             f"* BSDS500 {args.split}, first {len(ids)} images ({', '.join(ids)}), scale {args.scale}, "
             f"{args.iters} updates, stop rule off; best-overlap mIoU (all) pooled over the images",
             f"* border-only: clusters lying entirely within {args.band} px of the border; stopped: images "
             f"whose q' reached k_min = {base.stop.k_min} within the updates",
             f"* merged: connected regions, those below {args.min_region} of the image merged by colour",
             f"* host: {report['host']}",
             f"* command: `python benchmarks/diagnose_quality.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
             "",
             "| variant | changes | all | all, connected | all, merged | clusters | border-only | "
             "regions merged | stopped | s / image |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        changes = ", ".join(f"{k} = {json.dumps(v)}" for k, v in r["changes"].items()) or "(preset)"
        lines.append(f"| {r['variant']} | {changes} | {r['all']:.3f} | {r['all_connected']:.3f} | "
                     f"{r['all_merged']:.3f} | {r['clusters']:.1f} | {r['border_only']:.1f} | "
                     f"{r['regions_merged']:.1f} | {r['stopped']}/{len(ids)} | {r['seconds_per_image']:.0f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    try:
        plot_traces(out.with_suffix(".png"), runs, [v for v, _ in variants], base.stop.k_min)
    except ImportError:
        pass
    print("\n".join(lines))
    return 0


def plot_traces(path: Path, runs: list[dict], variants: list[str], k_min: int) -> None:
    """q' against iteration: per variant, each image thin, the mean thick (log y)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for n, v in enumerate(variants):
        color = f"C{n % 10}"
        traces = [np.asarray(r["trace"]) for r in runs if r["variant"] == v]
        for t in traces:
            ax.plot(np.arange(1, t.size + 1), t, color=color, alpha=0.25, lw=0.8)
        ax.plot(np.arange(1, traces[0].size + 1), np.mean(traces, 0), color=color, lw=2, label=v)
    ax.axhline(k_min, color="k", ls="--", lw=1, label=f"k_min = {k_min}")
    ax.set_yscale("log")
    ax.set_xlabel("update")
    ax.set_ylabel("q' (clusters present)")
    ax.legend(fontsize=8)
    ax.set_title("q' per update (thin: images, thick: mean)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
