"""An ablation table on BSDS500: several prediction folders scored alike, each with a
95% bootstrap interval over images and a paired interval of its difference to a
reference row (a baseline such as the tuned Felzenszwalb).

A row is ``LABEL=FOLDER``, FOLDER holding ``<id>.png`` label maps: a ``dynaseg segment``
output folder, one setting's folder of a ``dynaseg sweep``, or one method's folder of
``reproduce_bsds500.py``. Rows named in ``--connected`` are scored after splitting their
labels into 4-connected regions (how "post-processing alone" is scored: the k-means
colour clusters of reproduce_bsds500.py, split into regions). Iterations come from the
folder's ``results.jsonl``; seconds per image from the run that wrote it (a sweep: its
whole wall time, all its settings together, over the images; reproduce_bsds500.py: the
method's timing).

Example (the ``dynaseg_plus`` table in the README)::

    python benchmarks/ablation_table.py --split val \\
        --row "felzenszwalb, tuned on train=runs/val/felzenszwalb" \\
        --row "dynaseg_plus=runs/val_plus/seed_0" --reference "felzenszwalb, tuned on train" \\
        --out benchmarks/results/dynaseg_plus_val_scale025
"""
from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_ROOT = REPO.parent / "shared" / "data" / "bsds500"


def run_record(folder: Path) -> dict:
    """Mean iterations and seconds per image of the run that wrote ``folder`` (None where
    it does not say)."""
    out = {"mean_iterations": None, "seconds_per_image": None}
    records = folder / "results.jsonl"
    if records.is_file():
        rows = [json.loads(line) for line in records.read_text().splitlines() if line.strip()]
        its = [r["iterations"] for r in rows if r.get("status") == "ok" and r.get("iterations") is not None]
        out["mean_iterations"] = float(np.mean(its)) if its else None
    sweep, reproduce = folder.parent / "sweep.json", folder.parent / "results.json"
    if sweep.is_file():
        # A sweep's settings run together (and settings that differ only in post-processing
        # share one optimisation): its whole wall time over the images of this setting.
        report = json.loads(sweep.read_text())
        images = {row["setting"]: row.get("images") for row in report.get("settings", [])}.get(folder.name)
        if images:
            out["seconds_per_image"] = report["seconds"] / images
    elif reproduce.is_file():
        method = json.loads(reproduce.read_text()).get("methods", {}).get(folder.name, {})
        out["seconds_per_image"] = method.get("timing", {}).get("seconds_per_image")
    return out


def regions_per_image(folder: Path, ids, connected: bool) -> float:
    """Mean number of distinct labels (after the connected split where asked)."""
    from dynaseg_jax import metrics
    from dynaseg_jax.evaluate import read_prediction

    counts = []
    for id_ in ids:
        pred = read_prediction(folder / f"{id_}.png")
        counts.append(np.unique(metrics.relabel_connected(pred) if connected else pred).size)
    return float(np.mean(counts))


def score_rows(rows, root: str, split: str, connected_labels, reference: str | None,
               n_resamples: int, limit: int | None) -> list[dict]:
    from dynaseg_jax import metrics
    from dynaseg_jax.evaluate import evaluate_predictions

    scored = []
    for label, folder in rows:
        connected = label in connected_labels
        r = evaluate_predictions("bsds500", root, split, folder, connected=connected, limit=limit,
                                 keep_ious=True)
        if r["missing"]:
            raise SystemExit(f"ablation_table: {folder}: {r['missing']} images have no prediction "
                             f"(first: {', '.join(r['missing_ids'])}); every row needs the same images")
        ids = list(r["per_image"])
        scored.append({"label": label, "folder": str(folder), "connected": connected, "ids": ids,
                       "ious": [r["per_image"][i]["ious"] for i in ids],
                       **{k: r[k] for k in ("all", "fine", "coarse", "hungarian", "images")},
                       "regions_per_image": regions_per_image(Path(folder), ids, connected),
                       **run_record(Path(folder))})
    by_label = {s["label"]: s for s in scored}
    ref = by_label.get(reference) if reference else None
    for s in scored:
        if s["ids"] != scored[0]["ids"]:
            raise SystemExit(f"ablation_table: {s['folder']} scores other images than {scored[0]['folder']}")
        s["interval_all"] = metrics.bootstrap_interval(s["ious"], n_resamples=n_resamples)
        if ref is not None and s is not ref:
            s["diff_all"] = s["all"] - ref["all"]
            s["interval_diff_all"] = metrics.bootstrap_interval(s["ious"], ref["ious"], n_resamples=n_resamples)
    return scored


def markdown(scored, reference: str | None, split: str, n_resamples: int) -> str:
    diff_head = f" all - {reference} [95%] |" if reference else ""
    lines = [f"BSDS500 {split}, {scored[0]['images']} images; intervals: percentile bootstrap over images, "
             f"{n_resamples} resamples" + ("; differences paired (the same resampled images)" if reference else "")
             + "; run s / image: the wall time of the run that wrote the row (a sweep: all its settings) "
               "over its images",
             "",
             f"| row | all [95%] |{diff_head} fine | coarse | Hungarian | regions / image | iterations | run s / image |",
             "|---|---|" + ("---|" if reference else "") + "---|---|---|---|---|---|"]

    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    for s in scored:
        lo, hi = s["interval_all"]
        diff = ""
        if reference:
            diff = (" (reference) |" if "diff_all" not in s else
                    f" {s['diff_all']:+.3f} [{s['interval_diff_all'][0]:+.3f}, {s['interval_diff_all'][1]:+.3f}] |")
        label = s["label"] + (", split into connected regions" if s["connected"] else "")
        lines.append(f"| {label} | {s['all']:.3f} [{lo:.3f}, {hi:.3f}] |{diff} {s['fine']:.3f} | "
                     f"{s['coarse']:.3f} | {s['hungarian']:.3f} | {s['regions_per_image']:.0f} | "
                     f"{num(s['mean_iterations'], '.0f')} | {num(s['seconds_per_image'], '.1f')} |")
    return "\n".join(lines) + "\n"


def plot_examples(scored, root: str, split: str, path: Path, n: int) -> None:
    """A grid, one line per image (the first ``n``): the image, its first annotation, and
    each row's segments over the image, titled with its regions and the image's
    best-overlap score."""
    import matplotlib.pyplot as plt

    from dynaseg_jax import images as imio
    from dynaseg_jax import metrics
    from dynaseg_jax.datasets import open_dataset
    from dynaseg_jax.evaluate import read_prediction

    ds = open_dataset("bsds500", root, split)
    ids = scored[0]["ids"][:n]
    cols = 2 + len(scored)
    fig, axes = plt.subplots(len(ids), cols, figsize=(1.9 * cols, 1.45 * len(ids) + 0.4), squeeze=False)
    for r, id_ in enumerate(ids):
        image = imio.as_float_image(ds.load_image(id_))
        gt = ds.load_gt(id_)[0]
        panels = [(image, "image"), (imio.label_colors(int(gt.max()) + 1)[imio.renumber(gt)], "annotation 1")]
        for s in scored:
            labels = read_prediction(Path(s["folder"]) / f"{id_}.png")
            labels = metrics.resize_prediction(labels, image.shape[:2])
            if s["connected"]:
                labels = metrics.relabel_connected(labels)
            score = float(np.mean(np.concatenate([np.asarray(a) for a in s["ious"][r]])))
            panels.append((imio.overlay(image, imio.renumber(labels)),
                           f"{textwrap.fill(s['label'], 30)}\n{np.unique(labels).size} regions, {score:.2f}"))
        for c, (img, title) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title, fontsize=5.5)
        axes[r, 0].set_ylabel(id_, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--row", action="append", required=True, metavar="LABEL=FOLDER",
                        help="a table row: its label and its folder of <id>.png label maps (repeat)")
    parser.add_argument("--connected", action="append", default=[], metavar="LABEL",
                        help="score this row after splitting its labels into connected regions")
    parser.add_argument("--reference", help="the row every other row is compared with (paired)")
    parser.add_argument("--root", default=str(DEFAULT_ROOT))
    parser.add_argument("--split", default="val")
    parser.add_argument("--limit", type=int, help="only the first N images of the split")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--examples", type=int, default=0,
                        help="also draw the first N images with every row's segments (OUT.png)")
    parser.add_argument("--draw", action="append", default=[], metavar="LABEL",
                        help="with --examples: draw only these rows (repeat; default: every row)")
    parser.add_argument("--out", required=True, help="output path prefix (.md, .json)")
    args = parser.parse_args(argv)

    rows = []
    for spec in args.row:
        label, sep, folder = spec.rpartition("=")
        if not sep or not label:
            parser.error(f"--row {spec!r}: expected LABEL=FOLDER")
        if not Path(folder).is_dir():
            parser.error(f"--row {spec!r}: {folder} is not a folder")
        rows.append((label, folder))
    labels = [label for label, _ in rows]
    if len(set(labels)) != len(labels):
        parser.error("two --row entries share a label; labels name the rows")
    for option, named in (("--connected", args.connected), ("--draw", args.draw),
                          ("--reference", [args.reference] if args.reference else [])):
        for label in named:
            if label not in labels:
                parser.error(f"{option} {label!r} is not a row label")
    scored = score_rows(rows, args.root, args.split, set(args.connected), args.reference, args.resamples,
                        args.limit)
    text = markdown(scored, args.reference, args.split, args.resamples)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    if args.examples > 0:
        drawn = [s for s in scored if not args.draw or s["label"] in args.draw]
        plot_examples(drawn, args.root, args.split, out.with_suffix(".png"), args.examples)
    for s in scored:
        del s["ious"]
    command = ["python", "benchmarks/ablation_table.py", *(sys.argv[1:] if argv is None else argv)]
    out.with_suffix(".json").write_text(json.dumps({"command": command, "split": args.split, "rows": scored},
                                                   indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
