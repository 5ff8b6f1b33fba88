"""Tune the Felzenszwalb baseline on BSDS500 train: the classical opponent, chosen fairly.

A grid over scikit-image's ``felzenszwalb(scale, sigma, min_size)``, applied at the
working size (images resized by ``--scale``), each setting scored by the BSDS protocol
(best-overlap mIoU "all", pooled over segments) on the train split, never on the split a
table reports. Prints the grid sorted by score and writes ``<out>.json``, with the best
setting both in working-size units and in the full-size units that
``reproduce_bsds500.py --fz-scale/--fz-sigma/--fz-min-size`` take (it multiplies scale
and min_size by ``scale**2`` and sigma by ``scale``).

Example::

    python benchmarks/tune_felzenszwalb.py --split train --scale 0.25 \\
        --out benchmarks/results/felzenszwalb_train_scale025
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_ROOT = REPO.parent / "shared" / "data" / "bsds500"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=str(DEFAULT_ROOT), help="BSDS500 folder")
    parser.add_argument("--split", default="train")
    parser.add_argument("--limit", type=int, default=None, help="the first N images (default: all)")
    parser.add_argument("--scale", type=float, default=0.25)
    parser.add_argument("--fz-scales", type=float, nargs="+", default=[6.25, 12.5, 25, 50, 100, 200])
    parser.add_argument("--fz-sigmas", type=float, nargs="+", default=[0.2, 0.5, 0.8])
    parser.add_argument("--fz-min-sizes", type=int, nargs="+", default=[3, 5, 10, 20, 40])
    parser.add_argument("--out", required=True, help="output path prefix (.json)")
    args = parser.parse_args(argv)

    from skimage.segmentation import felzenszwalb

    from dynaseg_jax import images as imio
    from dynaseg_jax import metrics
    from dynaseg_jax.datasets import open_dataset

    ds = open_dataset("bsds500", args.root, args.split)
    ids = ds.ids()[: args.limit] if args.limit else ds.ids()
    images = [imio.resize_image(imio.as_float_image(ds.load_image(i)), args.scale) for i in ids]
    gts = [ds.load_gt(i) for i in ids]
    t0 = time.perf_counter()
    rows = []
    for fz_scale, sigma, min_size in itertools.product(args.fz_scales, args.fz_sigmas, args.fz_min_sizes):
        per_image, regions = [], []
        for image, anns in zip(images, gts):
            labels = felzenszwalb(image, scale=fz_scale, sigma=sigma, min_size=min_size, channel_axis=-1)
            regions.append(int(labels.max()) + 1)
            labels = metrics.resize_prediction(labels, anns[0].shape)
            per_image.append([metrics.overlap_scores(labels, a)[0] for a in anns])
        score = metrics.bsds_scores(per_image)
        rows.append({"scale": fz_scale, "sigma": sigma, "min_size": min_size, "all": score["all"],
                     "fine": score["fine"], "coarse": score["coarse"], "regions": float(np.mean(regions))})
        print(f"scale {fz_scale:g} sigma {sigma:g} min_size {min_size}: all {score['all']:.4f} "
              f"({rows[-1]['regions']:.0f} regions)", flush=True)
    rows.sort(key=lambda r: -r["all"])
    best = rows[0]
    s = args.scale
    full = {"fz_scale": best["scale"] / s ** 2, "fz_sigma": best["sigma"] / s, "fz_min_size": best["min_size"] / s ** 2}
    report = {"args": vars(args), "images": len(ids), "seconds": round(time.perf_counter() - t0, 1),
              "best_at_working_size": {k: best[k] for k in ("scale", "sigma", "min_size")},
              "best_full_size_units": full, "rows": rows}
    out = Path(args.out).with_suffix(".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"best on {args.split} ({len(ids)} images, scale {s}): scale {best['scale']:g}, sigma {best['sigma']:g}, "
          f"min_size {best['min_size']} -> all {best['all']:.4f}; reproduce_bsds500.py --fz-scale {full['fz_scale']:g} "
          f"--fz-sigma {full['fz_sigma']:g} --fz-min-size {full['fz_min_size']:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
