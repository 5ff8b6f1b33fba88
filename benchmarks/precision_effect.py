"""How much reduced-precision products change DynaSeg's labels, against the seed spread.

Reads output folders of ``dynaseg segment`` or ``dynaseg sweep`` (one setting each) on
BSDS500: a reference (float32 products, one seed), the reference's preset with other
seeds (the yardstick: how much labels change for no reason but the initial network), and
variants (the reference's seed with other products: ``model.emulate_precision = true``
with ``model.matmul_precision`` 'tensorfloat32' or 'bfloat16', or a GPU run's real TF32).
Per folder: mIoU "all" (plain and split into connected regions), the mean iterations and
clusters, and the adjusted Rand index of each image's labels against the reference's
(1: the same partition), averaged over images.

A precision changes the results no more than a seed does when its scores sit inside the
seeds' range and its agreement with the reference is at least the seeds' agreement.

Example::

    python benchmarks/precision_effect.py --reference runs/spread_scf/seed_0 \\
        --seed runs/spread_scf/seed_1 --seed runs/spread_scf/seed_2 \\
        --variant "TF32 (emulated)=runs/emulate_tensorfloat32/seed_0" \\
        --variant "bfloat16 (emulated)=runs/emulate_bfloat16/seed_0" \\
        --out benchmarks/results/precision_scf_val12_scale025
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_ROOT = REPO.parent / "shared" / "data" / "bsds500"


def finished(folder: Path) -> dict:
    """stem -> results.jsonl entry, for the images that finished without error."""
    entries = {}
    for line in (folder / "results.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if entry.get("status") == "ok":
            entries[entry["stem"]] = entry
    return entries


def folder_row(label: str, folder: Path, reference: Path, stems: list, root: str, split: str) -> dict:
    from sklearn.metrics import adjusted_rand_score

    from dynaseg_jax.evaluate import evaluate_predictions
    from dynaseg_jax.images import read_labels
    from dynaseg_jax.metrics import bsds_scores

    def score(connected: bool) -> float:  # mIoU "all" over the images every folder finished
        per_image = evaluate_predictions("bsds500", root, split, folder, connected=connected,
                                         keep_ious=True)["per_image"]
        return bsds_scores([per_image[s]["ious"] for s in stems])["all"]

    entries = finished(folder)
    ari = [adjusted_rand_score(read_labels(reference / f"{s}.png").ravel(), read_labels(folder / f"{s}.png").ravel())
           for s in stems]
    return {"row": label, "folder": str(folder), "all": score(False), "all_connected": score(True),
            "images": len(stems), "mean_iterations": float(np.mean([entries[s]["iterations"] for s in stems])),
            "mean_clusters": float(np.mean([entries[s]["clusters"] for s in stems])),
            "ari_vs_reference": float(np.mean(ari)), "ari_per_image": dict(zip(stems, map(float, ari)))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", required=True, help="folder: float32 products, one seed")
    parser.add_argument("--seed", action="append", default=[], dest="seeds", metavar="FOLDER",
                        help="the reference's preset with another seed (repeat)")
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL=FOLDER",
                        help="the reference's seed with other products (repeat)")
    parser.add_argument("--root", default=str(DEFAULT_ROOT))
    parser.add_argument("--split", default="val")
    parser.add_argument("--out", required=True, help="output path prefix (.md, .json)")
    args = parser.parse_args(argv)

    reference = Path(args.reference)
    folders = [("reference: float32", reference)] + [(f"seed {Path(f).name}: float32", Path(f)) for f in args.seeds]
    for spec in args.variant:
        label, sep, folder = spec.partition("=")
        if not sep:
            parser.error(f"--variant {spec!r}: expected LABEL=FOLDER")
        folders.append((label, Path(folder)))
    for _, folder in folders:
        if not (folder / "results.jsonl").is_file():
            parser.error(f"{folder}: no results.jsonl (not a segment or sweep setting folder)")
    # The images every folder finished: the rows compare the same images.
    stems = sorted(set.intersection(*(set(finished(f)) for _, f in folders)))
    if not stems:
        parser.error("no image finished in every folder")
    rows = [folder_row(label, folder, reference, stems, args.root, args.split) for label, folder in folders]

    lines = [f"BSDS500 {args.split}, {len(stems)} images; ARI: adjusted Rand index of each image's labels "
             "against the reference's, mean over images (1: the same partition)", "",
             "| row | all | all, connected regions | ARI vs reference | iterations | clusters |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['row']} | {r['all']:.3f} | {r['all_connected']:.3f} | {r['ari_vs_reference']:.3f} | "
                     f"{r['mean_iterations']:.0f} | {r['mean_clusters']:.1f} |")
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"split": args.split, "images": stems, "command": sys.argv,
                                                    "rows": rows}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
