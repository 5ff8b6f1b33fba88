"""How Felzenszwalb's parameters should follow an image's size (``superpixels.reference_pixels``).

Felzenszwalb parameters chosen at one working size (``--reference-scale``) are applied
at larger sizes (``--scales``) under several rules, and each rule's number of superpixels
is compared with the reference size's, image by image: a rule that keeps the count keeps
what the network is given to merge. A rule multiplies ``scale``, ``sigma`` and
``min_size`` by the area ratio r to the powers it names:

* ``as_given``: 0, 0, 0 (the sizes in pixels of every image);
* ``geometric``: 1, 1/2, 1 (the threshold ``scale`` and ``min_size`` are areas, sigma a
  length);
* ``fourth_root``: 1/4, 1/4, 1 (``superpixels.reference_pixels``:
  ``dynaseg_jax.superpixels.FELZENSZWALB_AREA_POWER``);
* any ``--rule NAME:SCALE_POWER,SIGMA_POWER,MIN_SIZE_POWER``.

No ground truth is read: only the images. Prints one line per rule and scale (geometric
mean of the per-image count ratios and their range) and writes ``<out>.json``.

Example::

    python benchmarks/superpixel_size_rule.py --root BSDS500_DIR --split train --skip 12 --limit 24 \\
        --scales 0.125 0.5 1.0 --out benchmarks/results/superpixel_size_rule_train24
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from dynaseg_jax.superpixels import FELZENSZWALB_AREA_POWER  # noqa: E402

DEFAULT_ROOT = REPO.parent / "shared" / "data" / "bsds500"
# fourth_root: the rule superpixels.reference_pixels applies.
RULES = {"as_given": (0.0, 0.0, 0.0), "geometric": (1.0, 0.5, 1.0),
         "fourth_root": (FELZENSZWALB_AREA_POWER, FELZENSZWALB_AREA_POWER, 1.0)}


def parse_rule(text: str) -> tuple[str, tuple[float, float, float]]:
    name, _, powers = text.partition(":")
    try:
        scale_power, sigma_power, min_size_power = (float(p) for p in powers.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME:SCALE_POWER,SIGMA_POWER,MIN_SIZE_POWER") from None
    return name, (scale_power, sigma_power, min_size_power)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=str(DEFAULT_ROOT), help="BSDS500 folder")
    parser.add_argument("--split", default="train")
    parser.add_argument("--skip", type=int, default=0, help="leave out the first N images")
    parser.add_argument("--limit", type=int, default=24, help="then take this many images")
    parser.add_argument("--reference-scale", type=float, default=0.25,
                        help="the working size the parameters were chosen at (dynaseg_plus: 0.25)")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.5, 1.0])
    parser.add_argument("--fz-scale", type=float, default=100.0, help="at the reference size (dynaseg_plus: 100)")
    parser.add_argument("--fz-sigma", type=float, default=0.5, help="at the reference size (dynaseg_plus: 0.5)")
    parser.add_argument("--fz-min-size", type=int, default=3, help="at the reference size (dynaseg_plus: 3)")
    parser.add_argument("--rule", type=parse_rule, action="append", default=[],
                        help="NAME:SCALE_POWER,SIGMA_POWER,MIN_SIZE_POWER, besides " + ", ".join(RULES))
    parser.add_argument("--out", required=True, help="output path prefix (.json)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from skimage.segmentation import felzenszwalb

    from dynaseg_jax import images as imio
    from dynaseg_jax.datasets import open_dataset

    ds = open_dataset("bsds500", args.root, args.split)
    ids = ds.ids()[args.skip:args.skip + args.limit]
    originals = [imio.as_float_image(ds.load_image(i)) for i in ids]
    rules = {**RULES, **dict(args.rule)}

    def counts(scale, scale_power, sigma_power, min_size_power):
        out = []
        for image, pixels in zip(originals, reference_pixels):
            image = imio.resize_image(image, scale)
            ratio = image.shape[0] * image.shape[1] / pixels
            labels = felzenszwalb(image, scale=args.fz_scale * ratio ** scale_power,
                                  sigma=args.fz_sigma * ratio ** sigma_power,
                                  min_size=max(1, round(args.fz_min_size * ratio ** min_size_power)), channel_axis=-1)
            out.append(int(labels.max()) + 1)
        return np.array(out)

    t0 = time.perf_counter()
    reference_pixels = [int(np.prod(imio.resize_image(im, args.reference_scale).shape[:2])) for im in originals]
    reference = counts(args.reference_scale, 0.0, 0.0, 0.0)
    print(f"{len(ids)} {args.split} images at scale {args.reference_scale}: superpixels "
          f"{reference.min()}-{reference.max()} (median {np.median(reference):g})")
    rows = []
    for scale in args.scales:
        for name, powers in rules.items():
            log_ratio = np.log(counts(scale, *powers) / reference)
            row = {"scale": scale, "rule": name, "powers": {"scale": powers[0], "sigma": powers[1], "min_size": powers[2]},
                   "count_ratio_geomean": float(np.exp(log_ratio.mean())),
                   "count_ratio_min": float(np.exp(log_ratio.min())), "count_ratio_max": float(np.exp(log_ratio.max()))}
            rows.append(row)
            print(f"scale {scale:g}, {name} (powers {', '.join(f'{p:g}' for p in powers)}): superpixels x "
                  f"{row['count_ratio_geomean']:.2f} ({row['count_ratio_min']:.2f}-{row['count_ratio_max']:.2f} "
                  f"per image)", flush=True)
    report = {"command": "python benchmarks/superpixel_size_rule.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "args": {k: v for k, v in vars(args).items() if k != "root"}, "ids": ids,
              "reference_counts": reference.tolist(), "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
    out = Path(args.out).with_suffix(".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
