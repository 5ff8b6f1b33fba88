"""The ``dynaseg`` command line: ``segment``, ``evaluate``, ``sample`` and ``config``."""
from __future__ import annotations

import argparse
import os
import sys

from .config import FIELD_DOCS, ConfigError, list_presets, load_config


def _add_segment(sub) -> None:
    p = sub.add_parser("segment", help="segment image files or folders",
                       description="Segment images with DynaSeg; writes <stem>.png label maps, "
                                   "<stem>_overlay.png and results.jsonl into --out. "
                                   "Re-running skips images already done.")
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="image files or folders")
    p.add_argument("--dataset", choices=("bsds500", "voc2012", "cocostuff27", "folder"),
                   help="segment a dataset split in its official layout instead of INPUTs")
    p.add_argument("--root", help="dataset folder (with --dataset)")
    p.add_argument("--split", help="dataset split (default: bsds500 test, voc2012 trainval, cocostuff27 val)")
    p.add_argument("--id-list", help="cocostuff27: the curated id list file")
    p.add_argument("--limit", type=int, help="with --dataset: only the first N images")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--config", default="dynaseg_scf",
                   help=f"preset name ({', '.join(list_presets())}) or a .toml file (default: dynaseg_scf)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override config fields, e.g. --set max_iters=30 k_min=silhouette")
    p.add_argument("--batch", type=int, help="images optimised at once (config field 'batch')")
    p.add_argument("--seed", type=int, help="seed (config field 'seed')")
    p.add_argument("--scale", type=float, default=1.0,
                   help="resize images by this factor before segmenting (labels are resized back)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run_segment(args) -> int:
    from .segment import segment_files
    overrides = list(args.overrides)
    if args.batch is not None:
        overrides.append(f"batch={args.batch}")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    config = load_config(args.config, overrides)
    if not args.scale > 0:
        raise ConfigError(f"--scale {args.scale}: must be > 0")
    inputs = list(args.inputs)
    if args.dataset:
        from .datasets import open_dataset
        if not args.root:
            raise ConfigError("--dataset needs --root DIR")
        ds = open_dataset(args.dataset, args.root, args.split, id_list=args.id_list)
        ids = ds.ids()[: args.limit] if args.limit else ds.ids()
        inputs += [(i, (lambda i=i: ds.load(i).image)) for i in ids]
    elif args.limit or args.root or args.split:
        raise ConfigError("--root, --split and --limit need --dataset")
    if not inputs:
        raise ConfigError("nothing to segment: give INPUT files/folders or --dataset/--root")
    summary = segment_files(inputs, args.out, config, scale=args.scale,
                            progress=None if not args.no_progress else False)
    print(f"{summary.ok} segmented, {summary.skipped} already done, {summary.failed} failed "
          f"in {summary.seconds:.1f} s -> {os.path.join(args.out, 'results.jsonl')}")
    if summary.failed:
        print(f"{summary.failed} image(s) failed:", file=sys.stderr)
        for err in summary.errors:
            print(f"  {err}", file=sys.stderr)
        return 1
    return 0


def _run_sample(args) -> int:
    from .sample import write_sample
    write_sample(args.path)
    print(f"wrote {args.path}")
    return 0


def _run_config(args) -> int:
    import dataclasses
    config = load_config(args.name, args.overrides)
    for f in dataclasses.fields(config):
        print(f"{f.name} = {getattr(config, f.name)!r}  # {FIELD_DOCS[f.name]}")
    return 0


def _add_evaluate(sub) -> None:
    from .evaluate import add_evaluate_arguments
    p = sub.add_parser("evaluate", help="score a predictions folder against a dataset's ground truth",
                       description="Score <id>.png label maps (the `dynaseg segment` layout) with the "
                                   "protocols of SPEC section 4; prints a table, optionally writes JSON.")
    add_evaluate_arguments(p)


def _run_evaluate(args) -> int:
    from .evaluate import run_evaluate
    return run_evaluate(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dynaseg", description="DynaSeg unsupervised segmentation in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_segment(sub)
    _add_evaluate(sub)
    p = sub.add_parser("sample", help="write the synthetic sample image")
    p.add_argument("path", nargs="?", default="sample.png")
    p = sub.add_parser("config", help="print a config with every field documented")
    p.add_argument("name", nargs="?", default=None, help="preset name or .toml file (default: defaults)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides")
    return parser


COMMANDS = {"segment": _run_segment, "evaluate": _run_evaluate, "sample": _run_sample, "config": _run_config}


def main(argv=None) -> int:
    if argv is None:  # the console script: restart once with huge pages (runtime.py)
        from .runtime import reexec_with_hugepages
        reexec_with_hugepages("dynaseg_jax.cli", sys.argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as e:
        print(f"dynaseg: config error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # DatasetError: a dataset layout that cannot be read
        from .datasets import DatasetError
        if not isinstance(e, DatasetError):
            raise
        print(f"dynaseg: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dynaseg: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
