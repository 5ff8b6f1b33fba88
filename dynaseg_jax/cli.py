"""The ``dynaseg`` command line: ``segment``, ``sweep``, ``evaluate``, ``report``, ``merge``,
``sample``, ``config`` and ``weights``.

Every command ends in one line and an exit code: 0 success, 1 some images or
predictions failed, 2 a bad config, option or input folder, 3 an unexpected error
(set ``DYNASEG_DEBUG=1`` for its traceback), 130 interrupted. Heavy modules (jax,
scikit-learn) are imported only by the commands that use them, so ``--help``,
``config`` and ``sample`` start fast.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from . import __version__
from .config import ConfigError, list_presets, load_config


def _add_set(p) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override one config field by its dotted path (value parsed as TOML); "
                        "repeat for more, e.g. --set stop.max_iters=30 --set optim.lr=0.05")


def _add_segment(sub) -> None:
    p = sub.add_parser("segment", help="segment image files or folders",
                       description="Segment images with DynaSeg; writes <stem>.png label maps, "
                                   "<stem>_overlay.png, results.jsonl and config.toml into --out. "
                                   "Re-running the same command skips images already done.")
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="image files or folders")
    p.add_argument("--dataset", choices=("bsds500", "voc2012", "cocostuff27", "folder"),
                   help="segment a dataset split in its official layout instead of INPUTs")
    p.add_argument("--root", help="dataset folder (with --dataset)")
    p.add_argument("--split", help="dataset split (default: bsds500 test, voc2012 trainval, cocostuff27 val)")
    p.add_argument("--id-list", help="cocostuff27: the curated id list file")
    p.add_argument("--limit", type=int, help="with --dataset: only the first N images")
    p.add_argument("--out", required=True, help="output folder (one config per folder)")
    p.add_argument("--config", default="dynaseg_scf",
                   help=f"preset name ({', '.join(list_presets())}) or a .toml file (default: dynaseg_scf)")
    _add_set(p)
    p.add_argument("--batch", type=int, help="images optimised at once (config field engine.batch)")
    p.add_argument("--devices", metavar="N|all",
                   help="spread the slots over N local devices, or all of them (config field "
                        "engine.devices; N divides the batch)")
    p.add_argument("--seed", type=int, help="seed (config field 'seed')")
    p.add_argument("--scale", type=float, default=1.0,
                   help="resize images by this factor before segmenting (labels are resized back)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results of another config in --out (default: refuse)")
    p.add_argument("--color-labels", action="store_true",
                   help="write label maps as 8-bit palette PNGs that viewers show in colour "
                        "(at most 256 labels) instead of 16-bit grayscale")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("several processes (hosts), on JAX's distributed runtime")
    g.add_argument("--distributed", action="store_true",
                   help="join a multi-process run set up by the launcher (Slurm, Open MPI: JAX reads "
                        "its environment)")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0's coordinator")
    g.add_argument("--num-processes", type=int, metavar="N", help="processes in the run")
    g.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0..N-1")


def _init_distributed(args) -> None:
    """``jax.distributed.initialize`` from the flags (or the launcher's environment)."""
    explicit = (args.coordinator, args.num_processes, args.process_id)
    if not args.distributed and all(v is None for v in explicit):
        return
    if not args.distributed and any(v is None for v in explicit):
        raise ConfigError("--coordinator, --num-processes and --process-id go together "
                          "(or --distributed, to read them from the launcher)")
    if None not in (args.num_processes, args.process_id) and not 0 <= args.process_id < args.num_processes:
        raise ConfigError(f"--process-id {args.process_id}: must be in 0..{args.num_processes - 1}")
    import jax
    try:
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"cannot join the distributed run: {str(e).splitlines()[0]}") from None


def _run_segment(args) -> int:
    overrides = list(args.overrides)
    if args.batch is not None:
        overrides.append(f"engine.batch={args.batch}")
    if args.devices is not None:
        if args.devices != "all" and not args.devices.isdigit():
            raise ConfigError(f"--devices {args.devices}: expected a number of devices or 'all'")
        overrides.append(f"engine.devices={0 if args.devices == 'all' else args.devices}")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    config = load_config(args.config, overrides)
    if not (args.scale > 0 and args.scale < float("inf")):
        raise ConfigError(f"--scale {args.scale}: must be finite and > 0")
    inputs = list(args.inputs) + _dataset_inputs(args)
    if not inputs:
        raise ConfigError("nothing to segment: give INPUT files/folders or --dataset/--root")
    _init_distributed(args)
    from .runner import segment_files
    summary = segment_files(inputs, args.out, config, scale=args.scale,
                            progress=None if not args.no_progress else False,
                            overwrite=args.overwrite, color_labels=args.color_labels)
    print(f"{summary.ok} segmented, {summary.skipped} already done, {summary.failed} failed "
          f"in {summary.seconds:.1f} s -> {os.path.join(args.out, 'results.jsonl')}")
    if summary.failed:
        print(f"{summary.failed} image(s) failed:", file=sys.stderr)
        for err in summary.errors:
            print(f"  {err}", file=sys.stderr)
        return 1
    return 0


def _dataset_inputs(args) -> list:
    """``--dataset/--root/--split/--limit/--id-list`` as ``DatasetInput`` items ([] without --dataset)."""
    if not args.dataset:
        if args.limit or args.root or args.split:
            raise ConfigError("--root, --split and --limit need --dataset")
        return []
    from .datasets import DEFAULT_SPLITS, open_dataset
    from .runner import DatasetInput
    if not args.root:
        raise ConfigError("--dataset needs --root DIR")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit {args.limit}: must be >= 1")
    ds = open_dataset(args.dataset, args.root, args.split, id_list=getattr(args, "id_list", None))
    ids = ds.ids()[: args.limit] if args.limit else ds.ids()
    # The resume key of an image: dataset, resolved root, the split actually read, id.
    split = args.split or DEFAULT_SPLITS[args.dataset] or ""
    root = os.path.realpath(args.root)
    return [DatasetInput(i, f"{args.dataset}:{root}:{split}:{i}", (lambda i=i: ds.load_image(i))) for i in ids]


def _run_sweep(args) -> int:
    from .sweep import parse_grid, run_sweep
    overrides = list(args.overrides)
    if args.batch is not None:
        overrides.append(f"engine.batch={args.batch}")
    config = load_config(args.config, overrides)
    grid = parse_grid(args.grid)
    if not grid:
        raise ConfigError("--grid key=v1,v2,...: give at least one")
    if not (args.scale > 0 and args.scale < float("inf")):
        raise ConfigError(f"--scale {args.scale}: must be finite and > 0")
    inputs = list(args.inputs) + _dataset_inputs(args)
    if not inputs:
        raise ConfigError("nothing to segment: give INPUT files/folders or --dataset/--root")
    scored = args.dataset if args.dataset in ("bsds500", "voc2012") else None
    report = run_sweep(inputs, args.out, config, grid, scale=args.scale,
                       dataset=(scored, args.root, args.split) if scored else None,
                       progress=not args.no_progress and sys.stderr.isatty(), overwrite=args.overwrite)
    print(f"{len(report['settings'])} settings: {report['segmented']} segmented, {report['skipped']} already "
          f"done, {report['failed']} failed in {report['seconds']:.1f} s -> {os.path.join(args.out, 'sweep.csv')}")
    return 1 if report["failed"] else 0


def _require_folder(path: str) -> None:
    if not os.path.isdir(path):
        raise ConfigError(f"{path}: {'not a folder' if os.path.exists(path) else 'no such folder'}")


def _run_merge(args) -> int:
    from .outputs import merge_results, results_files
    _require_folder(args.out)
    if not results_files(Path(args.out)):
        raise ConfigError(f"{args.out}: no results files (results.jsonl, results.<i>.jsonl) to merge")
    n = merge_results(args.out)
    print(f"{n} records -> {os.path.join(args.out, 'results.jsonl')}")
    return 0


def _run_report(args) -> int:
    from .report import build_report
    _require_folder(args.out)
    if args.dataset and not args.root:
        raise ConfigError("--dataset needs --root DIR")
    try:
        path = build_report(args.out, args.dataset, args.root, args.split, args.html)
    except ValueError as e:
        from .datasets import DatasetError
        if isinstance(e, DatasetError) or "no results" in str(e):
            raise ConfigError(str(e)) from None
        raise
    print(f"wrote {path}")
    return 0


def _run_sample(args) -> int:
    from .sample import write_sample
    try:
        write_sample(args.path)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    print(f"wrote {args.path}")
    return 0


def _run_config(args) -> int:
    from .config import preset_description, to_toml
    if args.list:
        names = list_presets()
        width = max(len(n) for n in names)
        for name in names:
            print(f"{name:<{width}}  {preset_description(name)}")
        return 0
    config = load_config(args.name, args.overrides)
    source = args.name or "the defaults"
    header = (f"dynaseg config: {source}" + (f" with {', '.join(args.overrides)}" if args.overrides else "")
              + "\nLoad it with: dynaseg segment ... --config THIS_FILE.toml")
    sys.stdout.write(to_toml(config, header))
    return 0


def _run_weights(args) -> int:
    from .weights import read_state_dict, write_npz
    state_dict = read_state_dict(args.src)
    write_npz(args.out, state_dict)
    n = sum(int(v.size) for v in state_dict.values())
    print(f"wrote {args.out}: {len(state_dict)} arrays, {n} values (from {args.src})")
    return 0


def _add_evaluate(sub) -> None:
    from .evaluate import add_evaluate_arguments
    p = sub.add_parser("evaluate", help="score a predictions folder against a dataset's ground truth",
                       description="Score <id>.png label maps (the `dynaseg segment` layout) with the "
                                   "protocols of docs/algorithm.md section 4; prints a table, "
                                   "optionally writes JSON.")
    add_evaluate_arguments(p)


def _run_evaluate(args) -> int:
    from .evaluate import run_evaluate
    return run_evaluate(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dynaseg", description="DynaSeg unsupervised segmentation in JAX")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_segment(sub)
    _add_evaluate(sub)
    p = sub.add_parser("report", help="write one self-contained HTML page for an output folder",
                       description="Write OUT/report.html: the run's config, a summary and a sortable "
                                   "grid of every image (image, overlay, label colours, iterations, "
                                   "clusters, seconds; with --dataset, per-image scores), with the "
                                   "images inlined.")
    p.add_argument("out", help="the output folder of dynaseg segment")
    p.add_argument("--dataset", choices=("bsds500", "voc2012"), help="score the images against this dataset")
    p.add_argument("--root", help="dataset folder (with --dataset)")
    p.add_argument("--split", help="dataset split (default: the dataset's)")
    p.add_argument("--html", help="where to write the page (default OUT/report.html)")
    p = sub.add_parser("sweep", help="run a grid of settings over images in one engine run",
                       description="Segment every image with every combination of the --grid values "
                                   "(per-slot fields: optimiser, schedule, stop rule, seed, init, "
                                   "silhouette, post-processing), all pairs in one engine run; writes OUT/<setting>/ "
                                   "per setting and, with a dataset with ground truth, OUT/sweep.csv, "
                                   "sweep.json and sweep.png. Resumable like segment.")
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="image files or folders")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="a swept field and its values (parsed as TOML: a list is [2, 12]); repeat "
                        "for more, e.g. --grid schedule.alpha=10,15,50 --grid seed=0,1,2")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--config", default="dynaseg_scf", help="the base preset or .toml file")
    _add_set(p)
    p.add_argument("--batch", type=int, help="slots (config field engine.batch)")
    p.add_argument("--scale", type=float, default=1.0, help="resize images by this factor first")
    p.add_argument("--dataset", choices=("bsds500", "voc2012", "cocostuff27", "folder"),
                   help="sweep over a dataset split (scored when it has ground truth: bsds500, voc2012)")
    p.add_argument("--root", help="dataset folder (with --dataset)")
    p.add_argument("--split", help="dataset split")
    p.add_argument("--limit", type=int, help="with --dataset: only the first N images")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results of another config in a setting's folder (default: refuse)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p = sub.add_parser("merge", help="merge the results files of a multi-process run",
                       description="Write the union of OUT/results.jsonl and every process's "
                                   "OUT/results.<i>.jsonl to OUT/results.jsonl, one record per image. "
                                   "Each process of a run does it when it ends; this does it by hand.")
    p.add_argument("out", help="the output folder")
    p = sub.add_parser("sample", help="write the synthetic sample image")
    p.add_argument("path", nargs="?", default="sample.png", help="file to write (.png, .jpg, ...)")
    p = sub.add_parser("config", help="print a config as TOML, every field documented",
                       description="Print a preset or config file, with overrides applied, as TOML "
                                   "that --config reads back: dynaseg config dynaseg_scf > my.toml")
    p.add_argument("name", nargs="?", default=None, help="preset name or .toml file (default: defaults)")
    p.add_argument("--list", action="store_true", help="list the presets, one line each")
    _add_set(p)
    p = sub.add_parser("weights", help="convert a checkpoint into this project's weights format",
                       description="dynaseg weights convert SRC --out FILE.npz: read a PyTorch .pth "
                                   "(without running code: tensors only), a .safetensors or an .npz "
                                   "file and write its arrays as .npz, which needs neither torch nor "
                                   "pickle to read.")
    p.add_argument("action", choices=("convert",))
    p.add_argument("src", help="checkpoint file (.pth, .pt, .safetensors, .npz)")
    p.add_argument("--out", required=True, help="output .npz file")
    return parser


COMMANDS = {"segment": _run_segment, "evaluate": _run_evaluate, "sweep": _run_sweep, "report": _run_report,
            "merge": _run_merge,
            "sample": _run_sample, "config": _run_config, "weights": _run_weights}
# Commands that train networks: only they pay for the huge-page restart (runtime.py).
TRAINING_COMMANDS = ("segment", "sweep")


def main(argv=None) -> int:
    console = argv is None
    args = build_parser().parse_args(argv)
    if console and args.command in TRAINING_COMMANDS:
        from .runtime import reexec_with_hugepages
        reexec_with_hugepages("dynaseg_jax.cli", sys.argv[1:])
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            return COMMANDS[args.command](args)
    except ConfigError as e:  # bad config, option, output folder (OutputFolderError)
        print(f"dynaseg: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dynaseg: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except ValueError as e:  # DatasetError: a dataset layout that cannot be read
        from .datasets import DatasetError
        if not isinstance(e, DatasetError):
            return _unexpected(e)
        print(f"dynaseg: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file system problem outside any one image
        where = f"{e.filename}: " if e.filename else ""
        print(f"dynaseg: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - one line, not a traceback
        return _unexpected(e)


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    """Warnings as the command's other messages: one line, no source location."""
    print(f"dynaseg: warning: {message}", file=file or sys.stderr)


def _unexpected(e: BaseException) -> int:
    if os.environ.get("DYNASEG_DEBUG"):
        raise e
    print(f"dynaseg: unexpected error: {type(e).__name__}: {e} (set DYNASEG_DEBUG=1 for a traceback)",
          file=sys.stderr)
    return 3


if __name__ == "__main__":
    sys.exit(main())
