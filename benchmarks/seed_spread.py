"""The seed-to-seed spread of a preset's score: the yardstick for "did this change matter".

Reads ``dynaseg sweep ... --grid seed=0,1,2`` output folders (one per preset) and scores
every seed's predictions on the dataset, plain and split into connected components.
Writes a Markdown table (per preset: each seed's mIoU "all", their mean, sample
standard deviation and range, the mean per-image spread, iterations and clusters) and
the numbers as JSON.

Example::

    dynaseg sweep --dataset bsds500 --root ../shared/data/bsds500 --split val --limit 12 --scale 0.25 \\
        --config dynaseg_fsf --grid seed=0,1,2 --out runs/spread_fsf
    python benchmarks/seed_spread.py runs/spread_fsf runs/spread_scf --split val \\
        --out benchmarks/results/seed_spread_val12_scale025
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


def spread_of(sweep_dir: Path, root: str, split: str) -> dict:
    from dynaseg_jax.evaluate import evaluate_predictions

    report = json.loads((sweep_dir / "sweep.json").read_text())
    rows = []
    for row in report["settings"]:
        folder = sweep_dir / row["setting"]
        plain = evaluate_predictions("bsds500", root, split, folder)
        connected = evaluate_predictions("bsds500", root, split, folder, connected=True)
        rows.append({"seed": row.get("seed"), "all": plain["all"], "all_connected": connected["all"],
                     "hungarian": plain["hungarian"], "images": plain["images"],
                     "mean_iterations": row["mean_iterations"], "mean_clusters": row["mean_clusters"],
                     "per_image": {k: v["best_overlap"] for k, v in plain["per_image"].items()}})
    ids = sorted(set.intersection(*(set(r["per_image"]) for r in rows)))
    per_image_std = float(np.mean([np.std([r["per_image"][i] for r in rows], ddof=1) for i in ids]))

    def stats(key):
        v = np.array([r[key] for r in rows])
        return {"mean": float(v.mean()), "std": float(v.std(ddof=1)), "min": float(v.min()), "max": float(v.max())}

    config = sweep_dir / report["settings"][0]["setting"] / "config.toml"
    return {"sweep": str(sweep_dir), "seeds": rows, "all": stats("all"), "all_connected": stats("all_connected"),
            "per_image_std_all": per_image_std, "images": len(ids), "scale": report.get("scale"),
            "config_head": config.read_text().splitlines()[:2] if config.is_file() else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweeps", nargs="+", help="sweep output folders, one per preset")
    parser.add_argument("--root", default=str(DEFAULT_ROOT))
    parser.add_argument("--split", default="val")
    parser.add_argument("--out", required=True, help="output path prefix (.md, .json)")
    args = parser.parse_args(argv)

    results = [spread_of(Path(s), args.root, args.split) for s in args.sweeps]
    lines = ["| sweep | seeds: all | mean | std | range | all, connected: mean +- std | per-image std | "
             "iterations | clusters |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        per_seed = ", ".join(f"{s['all']:.3f}" for s in r["seeds"])
        a, c = r["all"], r["all_connected"]
        lines.append(f"| {Path(r['sweep']).name} | {per_seed} | {a['mean']:.3f} | {a['std']:.4f} | "
                     f"{a['max'] - a['min']:.3f} | {c['mean']:.3f} +- {c['std']:.4f} | "
                     f"{r['per_image_std_all']:.3f} | "
                     f"{np.mean([s['mean_iterations'] for s in r['seeds']]):.0f} | "
                     f"{np.mean([s['mean_clusters'] for s in r['seeds']]):.1f} |")
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"split": args.split, "results": results}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
