"""Reproduce the paper's BSDS500 table: baselines, Kim et al. and DynaSeg, scored alike.

Segments one BSDS500 split (default ``val``: the paper reports the ``test`` split, which
this project's data folder does not hold) with every requested method, scores each
method's predictions with the BSDS protocol of docs/algorithm.md section 4 (plain and after
splitting labels into connected components), and writes, under ``--out``:

==================  =====================================================================
``<method>/``       predictions in the ``dynaseg segment`` layout: ``<id>.png`` (16-bit
                    labels at ground-truth size), ``results.jsonl`` (one record per image),
                    plus ``settings.json`` (what produced them) and ``runs.jsonl`` (wall
                    time of every run of this script on that method)
``table.md``        Markdown table: our all/fine/coarse/mean (+ Hungarian) next to the
                    paper's numbers (docs/algorithm.md section 5), with split, subset, scale,
                    settings and wall time per method
``results.json``    everything: settings, scores, per-image cluster counts, timings, host
``miou.png``        per-method mIoU bars, ours against the paper
``clusters.png``    predicted against ground-truth cluster counts per image (paper Fig. 6)
``examples.png``    a few images: image, one annotation, each method's labels
==================  =====================================================================

Methods (``--methods``, default: all but the pretrained-trunk presets):

* ``kmeans``: scikit-learn k-means on the RGB values of each image's pixels, with one
  fixed k for every image (``--kmeans-k``, default 5). k is fixed a priori, never taken
  from the ground truth (docs/algorithm.md section 4: ground truth is for scoring only).
* ``felzenszwalb``: graph-based segmentation (Felzenszwalb & Huttenlocher 2004,
  ``skimage.segmentation.felzenszwalb``; needs scikit-image, the ``bench`` extra). The
  paper does not give its graph-based settings, so the parameters are fixed a priori, not
  tuned: scikit-image's documented example values scale 100, sigma 0.5, min_size 50, taken
  to apply at full size (``--fz-scale``, ``--fz-sigma``, ``--fz-min-size``). With
  ``--scale s`` they are converted geometrically: the threshold ``scale`` (divided by a
  region's pixel count) and ``min_size`` are areas, so both are multiplied by s**2 (at
  least 1 pixel for min_size), and sigma, a length, by s. The conversion is not exact:
  neighbouring pixels differ more on a shrunken image, so small scales give more regions
  per unit of area than full size does (compare ``mean clusters`` in the table).
* ``kim_mu5``, ``dynaseg_scf``, ``dynaseg_fsf``, ``dynaseg_scf_silhouette``,
  ``dynaseg_fsf_silhouette``: the presets of the same name, run through
  :func:`dynaseg_jax.runner.segment_files` with ``--set`` overrides applied to all of them;
  likewise the pretrained-trunk presets ``efficientnet_lite0_fpn_fsf``, ``resnet18_fpn_fsf``,
  ``resnet18_fpn_scf``, ``resnet18_layer1_coco``, run only when named (they need their
  weights files), and ``dynaseg_plus`` (options beyond the paper), also only when named;
  its superpixel sizes were chosen at ``--scale 0.25`` and follow each image's area
  (``superpixels.reference_pixels`` in configs/dynaseg_plus.toml), much as the
  Felzenszwalb baseline's follow ``--scale``; superpixel sizes given with ``--set`` follow
  the area in the same way, unless ``--set superpixels.reference_pixels=0`` too.

Images are resized by ``--scale`` (bilinear) before segmenting and label maps are
resized back to the ground-truth size (nearest neighbour), for every method alike.

Resumable: a rerun with the same ``--out`` reuses every finished prediction, method by
method (DynaSeg through ``segment_files``' own resume; baselines skip ids whose PNG
exists, and PNGs are written atomically). A rerun whose settings differ from those that
produced a method's predictions stops with an error instead of mixing the two.

Examples::

    python benchmarks/reproduce_bsds500.py --out runs/bsds_val --limit 20 --scale 0.5
    python benchmarks/reproduce_bsds500.py --out runs/bsds_val --methods kmeans felzenszwalb dynaseg_fsf
    python benchmarks/reproduce_bsds500.py --out runs/tiny --limit 2 --scale 0.15 \\
        --set stop.max_iters=5 --set model.channels=16 --set model.max_clusters=16
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dynaseg_jax import images as imio  # noqa: E402
from dynaseg_jax.config import LAYOUT_FIELDS, ConfigError, load_config  # noqa: E402
from dynaseg_jax.datasets import open_dataset, read_rgb  # noqa: E402
from dynaseg_jax.evaluate import evaluate_predictions  # noqa: E402
from dynaseg_jax.metrics import resize_prediction  # noqa: E402
from dynaseg_jax.models import check_pretrained  # noqa: E402

DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "bsds500"

BASELINES = ("kmeans", "felzenszwalb")
# Presets of pretrained-trunk models: run only when asked (they need weights files).
PRETRAINED_PRESETS = ("efficientnet_lite0_fpn_fsf", "resnet18_fpn_fsf", "resnet18_fpn_scf", "resnet18_layer1_coco")
# Beyond the paper (docs/algorithm.md section 6): run only when asked, like the pretrained ones.
BEYOND_PAPER = ("dynaseg_plus",)
DYNASEG = (("kim_mu5", "dynaseg_scf", "dynaseg_fsf", "dynaseg_scf_silhouette", "dynaseg_fsf_silhouette")
           + PRETRAINED_PRESETS + BEYOND_PAPER)
METHODS = BASELINES + DYNASEG
DEFAULT_METHODS = tuple(m for m in METHODS if m not in PRETRAINED_PRESETS + BEYOND_PAPER)

# docs/algorithm.md section 5: the paper's BSDS500 mIoU (all, fine, coarse, mean), on the *test*
# split at full resolution. The silhouette variants have no BSDS500 row in the paper.
PAPER = {
    "kmeans": (0.240, 0.221, 0.265, 0.242),
    "felzenszwalb": (0.313, 0.295, 0.325, 0.311),
    "kim_mu5": (0.305, 0.259, 0.374, 0.313),
    "dynaseg_scf": (0.330, 0.290, 0.407, 0.342),
    "dynaseg_fsf": (0.349, 0.307, 0.420, 0.359),
}
PAPER_NAMES = {"kmeans": "k-means", "felzenszwalb": "graph-based", "kim_mu5": "Kim et al. mu=5",
               "dynaseg_scf": "DynaSeg-SCF", "dynaseg_fsf": "DynaSeg-FSF"}
MODES = ("all", "fine", "coarse", "mean")



# ------------------------------------------------------------------------------ helpers


def fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


# ------------------------------------------------------------------------------ baselines


def kmeans_labels(image: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k-means on the pixels' RGB values (floats in [0, 1]); labels (H, W)."""
    from sklearn.cluster import KMeans

    pixels = image.reshape(-1, 3).astype(np.float32) / 255.0
    # An image with fewer distinct colours than k cannot have k clusters (sklearn warns
    # and returns duplicates); cap k instead so the result is well defined.
    k = int(min(k, len(np.unique(pixels, axis=0))))
    km = KMeans(n_clusters=k, n_init=1, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning on flat images
        labels = km.fit_predict(pixels)
    return labels.reshape(image.shape[:2])


def baseline_felzenszwalb_params(args, scale: float) -> dict:
    """The Felzenszwalb baseline's parameters for images resized by ``scale`` (see the module
    docstring; DynaSeg's superpixels follow ``superpixels.reference_pixels`` instead)."""
    return {"scale": args.fz_scale * scale ** 2, "sigma": args.fz_sigma * scale,
            "min_size": max(1, round(args.fz_min_size * scale ** 2))}


def felzenszwalb_labels(image: np.ndarray, params: dict) -> np.ndarray:
    from skimage.segmentation import felzenszwalb

    return felzenszwalb(image, channel_axis=-1, **params)


def baseline_settings(method: str, args) -> dict:
    """What determines a baseline's predictions (the resume check compares these)."""
    settings = {"method": method, "split": args.split, "scale": args.scale}
    if method == "kmeans":
        settings.update(k=args.kmeans_k, features="rgb", n_init=1, seed=args.seed)
    else:
        settings.update(full_size={"scale": args.fz_scale, "sigma": args.fz_sigma,
                                   "min_size": args.fz_min_size},
                        used=baseline_felzenszwalb_params(args, args.scale))
    return settings


def run_baseline(method: str, ds, ids: list[str], out: Path, args) -> dict:
    """Segments ``ids`` with a baseline into ``out``, skipping ids already written.

    Returns:
      ``{"segmented", "reused", "failed"}`` counts of this run.
    """
    params = baseline_felzenszwalb_params(args, args.scale) if method == "felzenszwalb" else None
    counts = {"segmented": 0, "reused": 0, "failed": 0}
    results = out / "results.jsonl"
    for n, id_ in enumerate(ids, 1):
        if (out / f"{id_}.png").exists():  # written atomically: existing means complete
            counts["reused"] += 1
            continue
        t0 = time.perf_counter()
        try:
            original = read_rgb(ds.image_path(id_))  # not ds.load(): that also parses the .mat
            image = imio.resize_image(original, args.scale)  # as segment_files resizes
            if method == "kmeans":
                labels = kmeans_labels(image, args.kmeans_k, args.seed)
            else:
                labels = felzenszwalb_labels(image, params)
            labels = imio.renumber(resize_prediction(labels, original.shape[:2]))
            imio.save_labels(out / f"{id_}.png", labels)
        except Exception as e:  # noqa: BLE001 - one bad image must not stop the run
            counts["failed"] += 1
            print(f"  {method}: {id_}: {type(e).__name__}: {e}", file=sys.stderr)
            imio.append_jsonl(results, {"file": id_, "stem": id_, "status": "error", "error": str(e)})
            continue
        counts["segmented"] += 1
        imio.append_jsonl(results, {
            "file": id_, "stem": id_, "status": "ok", "error": None,
            "height": int(original.shape[0]), "width": int(original.shape[1]),
            "clusters": int(labels.max()) + 1, "seconds": round(time.perf_counter() - t0, 4)})
        if n % 25 == 0:
            print(f"  {method}: {n}/{len(ids)}", flush=True)
    return counts


# ------------------------------------------------------------------------------ DynaSeg


def dynaseg_settings(method: str, config, args) -> dict:
    """What determines a DynaSeg method's labels (the resume check compares these).

    Engine-only fields and fields the preset does not use (the silhouette knobs without
    the silhouette phase, mu or alpha for the other schedule) are left out, so that a
    shared ``--set`` meant for another preset does not invalidate this one's predictions.
    """
    fields = {k: v for k, v in config.flat().items() if k not in LAYOUT_FIELDS}  # layout never changes labels
    if config.stop.k_min != "silhouette":
        for k in [k for k in fields if k.startswith("silhouette.")] + ["schedule.uses_kstar"]:
            fields.pop(k)
    fields.pop("schedule.alpha" if config.schedule.kind == "fixed" else "schedule.mu")
    return {"method": method, "split": args.split, "scale": args.scale, "config": fields}


def run_dynaseg(method: str, config, ds, ids: list[str], out: Path, args) -> dict:
    """Segments ``ids`` with a DynaSeg preset through ``segment_files`` (resumable)."""
    from dynaseg_jax.runner import DatasetInput, segment_files

    # Ids already done by an earlier run, by segment_files' own rule (an ok record and the
    # label PNG); counted here because segment_files reports them only as "skipped".
    done = {r.get("stem") for r in imio.read_jsonl(out / "results.jsonl")
            if r.get("status") == "ok" and (out / f"{r.get('stem')}.png").exists()}
    todo = [i for i in ids if i not in done]
    counts = {"segmented": 0, "reused": len(ids) - len(todo), "failed": 0}
    if not todo:  # skip building an engine when there is nothing to do
        return counts
    # The loader reads only the image file: ds.load() would also parse the .mat ground truth.
    # oriented=False: ground truth is aligned with the stored pixels, whatever EXIF says.
    inputs = [DatasetInput(i, f"bsds500:{args.split}:{i}",
                           (lambda p=ds.image_path(i): imio.load_image(p, config.engine.max_pixels, oriented=False)))
              for i in todo]
    summary = segment_files(inputs, out, config, scale=args.scale, progress=None,
                            log=lambda msg: print(f"  {method}: {msg}", file=sys.stderr))
    counts["segmented"], counts["failed"] = summary.ok, summary.failed
    return counts


# ------------------------------------------------------------------------------ running


def check_settings(out: Path, settings: dict) -> None:
    """Records a method's settings, or stops if earlier predictions came from others.

    Mixing predictions made with two settings in one folder would silently score a blend,
    so a mismatch is an error (use another ``--out``, or delete the method's folder).
    """
    path = out / "settings.json"
    current = imio.json_safe(settings)
    if path.exists():
        previous = json.loads(path.read_text(encoding="utf-8"))
        if previous != current:
            diff = _differences(previous, current)
            raise SystemExit(f"error: {out} holds predictions made with other settings "
                             f"(differences in: {', '.join(diff)}); use another --out or delete {out}")
    else:
        imio.write_json_atomic(path, current)


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted names of the keys whose values differ between two nested dicts."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _differences(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out


def method_rows(out: Path) -> list[dict]:
    """The method's ok records (last one per id wins: resumed runs append)."""
    rows = {}
    for r in imio.read_jsonl(out / "results.jsonl"):
        if r.get("status") == "ok":
            rows[r.get("stem")] = r
    return list(rows.values())


def predicted_counts(out: Path, ids: list[str]) -> dict[str, int]:
    """Distinct labels per predicted label map (as scored, before connected components)."""
    counts = {}
    for id_ in ids:
        path = out / f"{id_}.png"
        if path.exists():
            counts[id_] = int(np.unique(imio.read_labels(path)).size)
    return counts


def summarise_runs(out: Path) -> dict:
    """Wall time over every run of this script on one method (a resumed run adds to it)."""
    runs = imio.read_jsonl(out / "runs.jsonl")
    seconds = sum(r.get("seconds", 0.0) for r in runs)
    segmented = sum(r.get("segmented", 0) for r in runs)
    return {"runs": len(runs), "wall_seconds": seconds, "images_segmented": segmented,
            "seconds_per_image": seconds / segmented if segmented else float("nan")}


def segment_method(method: str, ds, ids, args, out_root: Path) -> dict:
    """Segments (or reuses) one method's predictions; returns its run record."""
    out = out_root / method
    out.mkdir(parents=True, exist_ok=True)
    if method in DYNASEG:
        config = load_config(method, list(args.overrides))
        settings = dynaseg_settings(method, config, args)
    else:
        config, settings = None, baseline_settings(method, args)
    check_settings(out, settings)
    t0 = time.perf_counter()
    if method in DYNASEG:
        counts = run_dynaseg(method, config, ds, ids, out, args)
    else:
        counts = run_baseline(method, ds, ids, out, args)
    seconds = time.perf_counter() - t0
    record = {"time": datetime.datetime.now().isoformat(timespec="seconds"), "seconds": round(seconds, 3),
              "limit": args.limit, **counts}
    imio.append_jsonl(out / "runs.jsonl", record)
    return {"settings": settings, "this_run": record}


def score_method(method: str, args, out_root: Path) -> dict:
    """BSDS protocol scores of one method: plain and (unless disabled) connected."""
    out = out_root / method
    scores = {"plain": evaluate_predictions("bsds500", args.root, args.split, out, limit=args.limit)}
    if args.connected:
        scores["connected"] = evaluate_predictions("bsds500", args.root, args.split, out,
                                                   connected=True, limit=args.limit)
    return scores


# ------------------------------------------------------------------------------ reports


def describe(method: str, settings: dict, args) -> str:
    """One-line description of a method's settings for the table."""
    if method == "kmeans":
        return f"k-means on RGB, k={settings['k']} (fixed), n_init=1, seed={settings['seed']}"
    if method == "felzenszwalb":
        u = settings["used"]
        return (f"skimage felzenszwalb scale={u['scale']:.4g} sigma={u['sigma']:.4g} min_size={u['min_size']} "
                f"(full size {args.fz_scale:g} / {args.fz_sigma:g} / {args.fz_min_size}; scale and min_size "
                f"x s^2, sigma x s for --scale s)")
    c = settings["config"]
    kind = c["schedule.kind"]
    mu = f"mu={c['schedule.mu']:g}" if kind == "fixed" else f"{kind.upper()} alpha={c['schedule.alpha']:g}"
    text = (f"{mu}, k_min={c['stop.k_min']}, max_iters={c['stop.max_iters']}, p={c['model.channels']}, "
            f"q={c['model.max_clusters']}, ")
    if c.get("model.name", "cnn") == "cnn":
        text += f"n_conv={c['model.n_conv']}"
    else:
        text += (f"model {c['model.name']} (trunk {c.get('model.trunk', 'finetune')}, BatchNorm "
                 f"{c.get('model.trunk_norm', 'batch')} statistics, weights {c.get('model.weights') or 'published'})")
    if c["stop.k_min"] == "silhouette":
        text += f", features={c['silhouette.features']}, k in {list(c['silhouette.k_range'])}"
    return text


def table_markdown(report: dict) -> str:
    """The Markdown report: settings, the main table, connected-components scores, notes."""
    s = report["settings"]
    subset = f"{s['images']} images" + ("" if s["limit"] is None else f", the first {s['limit']} of the split")
    lines = [
        "# BSDS500: our runs next to the DynaSeg paper",
        "",
        f"* split: **{s['split']}** ({subset}); the paper's numbers are on the **test** split "
        f"(200 images) at full resolution",
        f"* scale: {s['scale']:g} (images resized bilinearly before segmenting; labels resized back, nearest neighbour)",
        f"* DynaSeg overrides (`--set`): {', '.join(s['overrides']) if s['overrides'] else 'none (presets as shipped)'}",
        "* protocol: BSDS best-overlap mIoU pooled over segments (docs/algorithm.md section 4); Hungarian = per-image "
        "Hungarian mIoU averaged over annotations, then images",
        f"* host: {report['host']['platform']}, {report['host']['cpus']} CPUs, JAX backend {report['host']['jax_backend']}",
        f"* generated {report['generated']}",
        "",
        "| method | all | fine | coarse | mean | Hungarian | paper all | paper fine | paper coarse | paper mean "
        "| images | mean clusters | wall s | s / image |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, m in report["methods"].items():
        sc = m["scores"]["plain"]
        paper = m["paper"]
        p = [fmt(paper.get(k)) if paper else "—" for k in MODES]
        t = m["timing"]
        missing = f" ({sc['missing']} missing)" if sc.get("missing") else ""
        lines.append(
            f"| {method} | {fmt(sc.get('all'))} | {fmt(sc.get('fine'))} | {fmt(sc.get('coarse'))} "
            f"| {fmt(sc.get('mean'))} | {fmt(sc.get('hungarian'))} | {' | '.join(p)} | {sc.get('images', 0)}{missing} "
            f"| {fmt(m['mean_clusters'], 1)} | {fmt(t['wall_seconds'], 1)} | {fmt(t['seconds_per_image'], 2)} |")
    if any("connected" in m["scores"] for m in report["methods"].values()):
        lines += ["", "Predictions split into connected components before scoring (the original authors "
                  "advise it; the paper does not say whether its table does):", "",
                  "| method | all | fine | coarse | mean | Hungarian |", "|---|---|---|---|---|---|"]
        for method, m in report["methods"].items():
            sc = m["scores"].get("connected")
            if sc:
                lines.append(f"| {method} | {fmt(sc.get('all'))} | {fmt(sc.get('fine'))} | {fmt(sc.get('coarse'))} "
                             f"| {fmt(sc.get('mean'))} | {fmt(sc.get('hungarian'))} |")
    lines += ["", "Settings per method:", ""]
    for method, m in report["methods"].items():
        name = f" (paper: {PAPER_NAMES[method]})" if method in PAPER_NAMES else " (no BSDS500 row in the paper)"
        lines.append(f"* `{method}`{name}: {m['description']}")
    lines += ["", "Wall time is summed over every run of the script on the method (resumed runs add "
              "to it; DynaSeg includes JIT compilation and the silhouette phase); s / image divides it by the "
              "images segmented (reused predictions cost nothing). Mean clusters = distinct labels per "
              "predicted map, before connected components.", ""]
    return "\n".join(lines)


def gt_counts(ds, ids: list[str]) -> dict[str, float]:
    """Ground-truth cluster count per image: mean number of segments over annotations."""
    return {i: float(np.mean([np.unique(a).size for a in ds.load_gt(i)])) for i in ids}


def plot_miou(report: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    methods = list(report["methods"])
    x = np.arange(len(methods))
    fig, axes = plt.subplots(1, 4, figsize=(max(10, 2.2 * len(methods) + 4), 3.6), sharey=True)
    width = 0.27
    for ax, mode in zip(axes, MODES):
        ours = [report["methods"][m]["scores"]["plain"].get(mode) for m in methods]
        conn = [report["methods"][m]["scores"].get("connected", {}).get(mode) for m in methods]
        paper = [(report["methods"][m]["paper"] or {}).get(mode) for m in methods]
        nan = lambda v: np.nan if v is None else v  # noqa: E731 - missing bars stay empty
        ax.bar(x - width, [nan(v) for v in ours], width, label=f"ours ({report['settings']['split']})")
        if any(v is not None for v in conn):
            ax.bar(x, [nan(v) for v in conn], width, label="ours, connected")
        ax.bar(x + width, [nan(v) for v in paper], width, label="paper (test)", color="0.6")
        ax.set_title(f"mIoU {mode}")
        ax.set_xticks(x, methods, rotation=45, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("mIoU (BSDS best overlap)")
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"BSDS500 {report['settings']['split']}, {report['settings']['images']} images, "
                 f"scale {report['settings']['scale']:g}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_clusters(report: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    gt = report["gt_clusters"]
    fig, ax = plt.subplots(figsize=(6, 5))
    hi = max([1.0] + list(gt.values()))
    for method, m in report["methods"].items():
        pairs = [(gt[i], c) for i, c in m["clusters"].items() if i in gt]
        if not pairs:
            continue
        g, p = np.array(pairs).T
        hi = max(hi, p.max())
        ax.scatter(g, p, s=14, alpha=0.7, label=method)
    ax.plot([1, hi], [1, hi], "k--", lw=0.8, label="predicted = ground truth")
    # Felzenszwalb produces hundreds of regions and DynaSeg a handful: log axes keep both legible.
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("ground-truth clusters (mean segments over annotations)")
    ax.set_ylabel("predicted clusters (distinct labels)")
    ax.set_title(f"Cluster counts per image (BSDS500 {report['settings']['split']})", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_examples(report: dict, ds, out_root: Path, path: Path, n: int) -> None:
    """A grid: one row per image; columns: image, first annotation, each method's labels."""
    import matplotlib.pyplot as plt

    methods = list(report["methods"])
    ids = [i for i in report["ids"] if all((out_root / m / f"{i}.png").exists() for m in methods)][:n]
    if not ids:
        return
    cols = 2 + len(methods)
    fig, axes = plt.subplots(len(ids), cols, figsize=(1.9 * cols, 1.5 * len(ids) + 0.3), squeeze=False)
    for r, id_ in enumerate(ids):
        rec = ds.load(id_)
        panels = [(rec.image, "image"), (colour(imio.renumber(rec.ground_truth[0])), "annotation 1")]
        for m in methods:
            labels = imio.read_labels(out_root / m / f"{id_}.png")
            panels.append((colour(labels), f"{m} ({labels.max() + 1})"))
        for c, (img, title) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0 or c >= 2:  # method columns carry each image's cluster count
                ax.set_title(title, fontsize=6)
        axes[r, 0].set_ylabel(id_, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def colour(labels: np.ndarray) -> np.ndarray:
    """Labels as a uint8 RGB picture (the palette of the segment overlays)."""
    return imio.label_colors(int(labels.max()) + 1)[labels]


def host_info() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        import jax

        info["jax"] = jax.__version__
        info["jax_backend"] = jax.default_backend()
        info["jax_devices"] = [d.device_kind for d in jax.devices()]
    except Exception as e:  # noqa: BLE001 - host info is informative only
        info["jax_backend"] = f"unavailable ({e})"
    return info


# ------------------------------------------------------------------------------ CLI


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (reused on reruns: finished predictions are kept)")
    p.add_argument("--root", default=str(DEFAULT_ROOT), help=f"BSDS500 folder (default {DEFAULT_ROOT})")
    p.add_argument("--split", default="val", help="split to segment and score (default val; the paper used test)")
    p.add_argument("--limit", type=int, default=None, help="only the first N images of the split")
    p.add_argument("--scale", type=float, default=1.0, help="resize images by this factor before segmenting")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(DEFAULT_METHODS), metavar="METHOD",
                   help=f"methods to run, in this order: {' '.join(METHODS)} (default: all but the "
                        f"pretrained-trunk presets)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field of every DynaSeg method; repeat for more "
                        "(e.g. --set stop.max_iters=300 --set engine.batch=8)")
    p.add_argument("--kmeans-k", type=int, default=5, help="k of the k-means baseline, the same for every image")
    p.add_argument("--fz-scale", type=float, default=100.0, help="Felzenszwalb scale at full size")
    p.add_argument("--fz-sigma", type=float, default=0.5, help="Felzenszwalb sigma at full size")
    p.add_argument("--fz-min-size", type=int, default=50, help="Felzenszwalb min_size at full size")
    p.add_argument("--seed", type=int, default=0, help="seed of the k-means baseline")
    p.add_argument("--no-connected", dest="connected", action="store_false",
                   help="skip the connected-components scores")
    p.add_argument("--examples", type=int, default=4, help="images in examples.png (0: no picture)")
    p.add_argument("--no-plots", dest="plots", action="store_false", help="write no PNG figures")
    args = p.parse_args(argv)
    if not args.scale > 0:
        p.error(f"--scale {args.scale}: must be > 0")
    if args.kmeans_k < 1:
        p.error("--kmeans-k must be >= 1")
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be >= 1")
    args.methods = list(dict.fromkeys(args.methods))  # keep order, drop repeats
    return args


def run(args: argparse.Namespace) -> dict:
    """Segments, scores and reports; returns the report written to results.json."""
    out_root = Path(args.out)
    out_root.mkdir(parents=True, exist_ok=True)
    ds = open_dataset("bsds500", args.root, args.split)
    ids = ds.ids()[: args.limit] if args.limit else ds.ids()
    if not ids:
        raise SystemExit(f"error: no images in {args.root} split {args.split}")
    # Check every method can run before spending time on any of them.
    for m in args.methods:
        if m in DYNASEG:
            try:
                check_pretrained(load_config(m, list(args.overrides)))
            except ConfigError as e:
                raise SystemExit(f"error: {m}: {e}") from None
    if "felzenszwalb" in args.methods:
        try:
            import skimage  # noqa: F401
        except ImportError:
            raise SystemExit("error: felzenszwalb needs scikit-image: pip install -e '.[bench]'") from None

    runs = {}
    for n, method in enumerate(args.methods, 1):
        print(f"[{n}/{len(args.methods)}] {method}: segmenting {len(ids)} images ...", flush=True)
        runs[method] = segment_method(method, ds, ids, args, out_root)
        r = runs[method]["this_run"]
        print(f"[{n}/{len(args.methods)}] {method}: {r['segmented']} segmented, {r['reused']} reused, "
              f"{r['failed']} failed in {r['seconds']:.1f} s", flush=True)

    print(f"scoring {len(args.methods)} method(s) on {len(ids)} images ...", flush=True)
    gt = gt_counts(ds, ids)
    methods = {}
    for method in args.methods:
        out = out_root / method
        scores = score_method(method, args, out_root)
        clusters = predicted_counts(out, ids)
        rows = method_rows(out)
        iters = [r["iterations"] for r in rows if r.get("iterations") is not None]
        k_min = [r["k_min"] for r in rows if isinstance(r.get("k_min"), (int, float))]
        methods[method] = {
            "description": describe(method, runs[method]["settings"], args),
            "settings": runs[method]["settings"],
            "scores": scores,
            "paper": dict(zip(MODES, PAPER[method])) if method in PAPER else None,
            "timing": summarise_runs(out),
            "this_run": runs[method]["this_run"],
            "clusters": clusters,
            "mean_clusters": float(np.mean(list(clusters.values()))) if clusters else float("nan"),
            "mean_iterations": float(np.mean(iters)) if iters else None,
            # The stopping threshold per image: the preset's k_min, or k* of the silhouette phase.
            "mean_k_min": float(np.mean(k_min)) if k_min else None,
        }
        sc = scores["plain"]
        print(f"  {method}: all {fmt(sc.get('all'))} fine {fmt(sc.get('fine'))} coarse {fmt(sc.get('coarse'))} "
              f"mean {fmt(sc.get('mean'))}" + (f" (paper mean {PAPER[method][3]:.3f})" if method in PAPER else ""),
              flush=True)

    report = {
        "generated": datetime.datetime.now().isoformat(timespec="seconds"),
        "settings": {"dataset": "bsds500", "root": str(args.root), "split": args.split, "limit": args.limit,
                     "images": len(ids), "scale": args.scale, "overrides": list(args.overrides),
                     "kmeans_k": args.kmeans_k, "felzenszwalb_full_size": {
                         "scale": args.fz_scale, "sigma": args.fz_sigma, "min_size": args.fz_min_size},
                     "seed": args.seed, "connected": args.connected, "methods": list(args.methods)},
        "host": host_info(),
        "ids": ids,
        "gt_clusters": gt,
        "methods": methods,
        "paper_note": "paper numbers: DynaSeg paper, BSDS500 test split (docs/algorithm.md section 5)",
    }
    # Not sort_keys: results.json keeps the methods in the order they were run.
    imio.write_json_atomic(out_root / "results.json", report)
    imio.write_text_atomic(out_root / "table.md", table_markdown(report))
    if args.plots:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        plot_miou(report, out_root / "miou.png")
        plot_clusters(report, out_root / "clusters.png")
        if args.examples > 0:
            plot_examples(report, ds, out_root, out_root / "examples.png", args.examples)
    print(f"wrote {out_root / 'table.md'}, {out_root / 'results.json'}"
          + (", miou.png, clusters.png, examples.png" if args.plots else ""), flush=True)
    return report


def main(argv=None) -> int:
    """Command-line entry point; returns 0, or 1 when some images failed or are missing."""
    report = run(parse_args(argv))
    incomplete = [m for m, r in report["methods"].items() if r["scores"]["plain"].get("missing")]
    if incomplete:
        print(f"warning: predictions missing for {', '.join(incomplete)} (see their results.jsonl)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
