"""``dynaseg sweep``: a grid of settings over a folder or a dataset, in one engine run.

Every (image, setting) pair is one slot of one engine: settings differ in per-slot fields
only (``train.PER_SLOT_FIELDS``: optimiser, schedule, stop rule, seed, init, silhouette)
and in the host's superpixel parameters and post-processing (``config.HOST_FIELDS``), so
one compiled step serves the whole grid, and refill works as for ``segment``. Each
setting gets its own output folder ``OUT/<setting>/`` (the ``segment`` layout: label
maps, overlays, results, config.toml; resumable the same way). With a dataset that has
ground truth, every setting is scored and ``OUT/sweep.csv``, ``OUT/sweep.json`` and
``OUT/sweep.png`` (score against each swept value, seeds as error bars) are written.
Settings that differ only in post-processing share one optimisation per image.
"""
from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from . import images as imio
from .config import POSTPROCESS_FIELDS, Config, ConfigError, config_digest, field_paths, parse_value

SWEEP_CSV, SWEEP_JSON, SWEEP_PNG = "sweep.csv", "sweep.json", "sweep.png"


def split_values(raw: str) -> list:
    """``"10,15,50"`` -> [10, 15, 50]; ``"[2,12],[2,8]"`` -> [[2, 12], [2, 8]];
    ``"fsf,scf"`` -> ["fsf", "scf"]: commas outside brackets and quotes separate values,
    each parsed as TOML (else kept as a string), as ``--set`` parses one."""
    parts, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(raw):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(raw[start:i])
            start = i + 1
    parts.append(raw[start:])
    return [parse_value(p.strip()) for p in parts if p.strip()]


def parse_grid(items: Sequence[str]) -> dict[str, list]:
    """``["schedule.alpha=10,15", "seed=0,1"]`` -> ``{"schedule.alpha": [10, 15], "seed": [0, 1]}``.

    Raises:
      ConfigError: a malformed item, an unknown key, a key given twice, or a key that
        shapes the compiled program (not per-slot: run such values as separate sweeps).
    """
    from .config import HOST_FIELDS
    from .train import PER_SLOT_FIELDS

    free = PER_SLOT_FIELDS + HOST_FIELDS

    grid: dict[str, list] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or not raw.strip():
            raise ConfigError(f"--grid {item!r}: expected key=v1,v2,..., e.g. schedule.alpha=10,15,50")
        if key not in field_paths():
            raise ConfigError(f"--grid {key}: unknown field (dynaseg config lists them)")
        if key in grid:
            raise ConfigError(f"--grid {key}: given twice")
        if key not in free:
            raise ConfigError(f"--grid {key}: shapes the compiled program, so it cannot vary within one "
                              f"run; sweep it with separate runs (fields that can: {', '.join(free)})")
        grid[key] = split_values(raw)
    return grid


def setting_name(values: dict) -> str:
    """A folder name for a setting: ``schedule.alpha_10__seed_0`` (characters other than
    letters, digits, '.', '-' and '_' replaced by '_')."""
    def clean(v):
        text = json.dumps(v) if isinstance(v, (list, tuple, bool)) else str(v)  # TOML spellings
        return re.sub(r"[^A-Za-z0-9.\-]+", "_", text).strip("_") or "_"
    return "__".join(f"{k}_{clean(v)}" for k, v in values.items()) or "base"


@dataclasses.dataclass
class Setting:
    name: str
    values: dict       # the swept fields' values
    config: Config


def expand(base: Config, grid: dict[str, list]) -> list[Setting]:
    """Every combination of the grid applied to ``base``, in grid order; combinations
    that resolve to the same config (same digest) are kept once, first first."""
    settings, seen = [], set()
    keys = list(grid)
    for combo in itertools.product(*(grid[k] for k in keys)):
        values = dict(zip(keys, combo))
        config = base.replace(values, source="--grid")
        digest = config_digest(config)
        if digest in seen:
            continue
        seen.add(digest)
        settings.append(Setting(setting_name(values), values, config))
    return settings


def run_sweep(inputs: Sequence, out_dir: str | os.PathLike, base: Config, grid: dict[str, list], *,
              scale: float = 1.0, dataset: tuple | None = None, progress: bool = False,
              overwrite: bool = False, log=None) -> dict:
    """Runs every (image, setting) pair in one engine, writes each setting's folder,
    then (with ``dataset = (name, root, split)``) scores them and writes the table.

    Returns:
      ``{"settings": [...rows...], "segmented": n, "skipped": n, "failed": n, "seconds": s}``.
    """
    from tqdm.auto import tqdm

    from .engine import Engine, WorkItem, resolve_config
    from .outputs import OutputFolder
    from .runner import (Finisher, KStarEstimator, _job_bucket, _loader_threads, _prefetch, error_entry,
                         error_message, finish_labels, load_job_image, ok_entry, resolve_jobs, write_outputs)
    from .superpixels import check_available, superpixel_map

    t0 = time.perf_counter()
    log = log or (lambda msg: print(msg, file=sys.stderr))
    out = Path(out_dir)
    settings = expand(base, grid)
    check_available(base)
    names = [s.name for s in settings]
    if len(set(n.casefold() for n in names)) != len(names):
        raise ConfigError("--grid: two settings get the same folder name; use distinct values")
    folders = []
    try:
        for s in settings:
            folders.append(OutputFolder.open(out / s.name, s.config, scale, overwrite=overwrite))
        jobs, problems = resolve_jobs(inputs, out)
        for _, msg in problems:
            log(f"error: {msg}")
        engine = Engine(base)
        cfg = engine.config
        for s in settings:
            engine.check_setting(s.config)
        # k_min of an image depends on these fields only: settings that agree on them
        # share one estimator (one compiled feature function) and one k* per image.
        kstar_key = lambda c: (c.stop.k_min, c.silhouette, c.seed, c.init)
        shared_estimators: dict = {}
        for s in settings:
            if kstar_key(s.config) not in shared_estimators:
                shared_estimators[kstar_key(s.config)] = KStarEstimator(
                    resolve_config(s.config), lambda n, s=s: engine.initial_variables(n, s.config), engine.model)
        estimators = [shared_estimators[kstar_key(s.config)] for s in settings]
        defaults = Config()
        optimisation_key = [config_digest(s.config.replace({p: defaults.get(p) for p in POSTPROCESS_FIELDS}))
                            for s in settings]
        done = [f.done_sources() for f in folders]  # read once, not per image
        # Counted in (image, setting) pairs, as everything the run reports: an input that
        # is not there, or whose output name is taken, fails in every setting.
        unusable = len(problems)
        stems, todo, queued, skipped = {}, [], set(), 0
        for job in jobs:
            name, source, stem, _ = job
            if source in queued:
                continue  # the same file given twice (a folder and a file in it)
            queued.add(source)
            if stems.setdefault(stem.casefold(), source) != source:
                log(f"error: {name}: output name {stem}.png is already used by {stems[stem.casefold()]}")
                unusable += 1
                continue
            pending = [i for i, d in enumerate(done) if source not in d]
            skipped += len(settings) - len(pending)
            if pending:
                todo.append((job, pending))
        for f in folders:
            f.commit()
        todo.sort(key=lambda t: _job_bucket(t[0], scale, cfg, engine.model))
        counts = {"segmented": 0, "failed": unusable * len(settings), "skipped": skipped}
        bar = tqdm(total=sum(len(p) for _, p in todo), unit="pair", disable=not progress, file=sys.stderr)
        meta = {}

        def prepare(entry):
            """The image, and per pending setting its (k_min, superpixels), or the exception
            that setting's inputs raised: a setting whose superpixels or k* fail loses
            this image for itself only."""
            job, pending = entry
            original, image = load_job_image(job, scale, cfg)
            cache = {}  # computed once per image for settings that agree

            def once(key, compute):
                if key not in cache:
                    try:
                        cache[key] = compute()
                    except Exception as e:  # recorded against each setting that needs it
                        cache[key] = e
                if isinstance(cache[key], Exception):
                    raise cache[key]
                return cache[key]

            per_setting = []
            for i in pending:
                c = settings[i].config
                try:
                    per_setting.append((once(("k", id(estimators[i])), lambda: estimators[i](image, job[2])),
                                        once(("sp", c.superpixels), lambda: superpixel_map(image, c))))
                except Exception as e:
                    per_setting.append(e)
            return original, image, per_setting

        lock = threading.Lock()  # records come from the engine's thread and the finisher's

        def record_error(i, job, msg, iterations=None):
            name, source, stem, _ = job
            with lock:
                folders[i].append(error_entry(name, msg, stem, source, iterations))
                counts["failed"] += 1
            log(f"error: {msg}")

        def items():
            for entry, prepared in _prefetch(todo, prepare, _loader_threads(cfg)):
                job, pending = entry
                if isinstance(prepared, Exception):
                    for i in pending:
                        record_error(i, job, error_message(job[0], prepared))
                        bar.update(1)
                    continue
                original, image, per_setting = prepared
                # Settings that differ in post-processing only share one optimisation.
                groups: dict = {}
                for i, inputs_or_error in zip(pending, per_setting):
                    if isinstance(inputs_or_error, Exception):
                        record_error(i, job, error_message(job[0], inputs_or_error))
                        bar.update(1)
                        continue
                    groups.setdefault(optimisation_key[i], []).append((i, *inputs_or_error))
                for group in groups.values():
                    i, k, segments = group[0]
                    key = (tuple(g[0] for g in group), job[1])
                    # Each setting's superpixels, for its vote (settings may differ in them).
                    meta[key] = (job, original, image, {g[0]: g[2] for g in group})
                    yield WorkItem(key=key, image=image, k_min=k, name=job[2],
                                   setting=settings[i].config, segments=segments)

        def finish(r, group, job, original, image, segments):
            name, _, stem, _ = job
            for i in group:
                if r.error:
                    record_error(i, job, f"{name}: {r.error}", r.iterations)
                    continue
                labels = finish_labels(r.labels, original, image, settings[i].config, segments[i])
                try:
                    write_outputs(folders[i].path, stem, original, labels)
                except (OSError, ValueError) as e:
                    record_error(i, job, f"{name}: cannot write outputs: {e}")
                    continue
                with lock:
                    folders[i].append(ok_entry(job, original, labels, r))
                    counts["segmented"] += 1

        with Finisher() as finisher:
            for r in engine.run(items()):
                group, _ = r.key
                job, original, image, segments = meta.pop(r.key)
                bar.update(len(group))
                finisher.submit(finish, r, group, job, original, image, segments)
        bar.close()
    finally:
        for f in folders:
            f.close()
    rows = summarize(out, settings, dataset)
    report = {"grid": grid, "base_config_digest": config_digest(base), "scale": scale, "settings": rows,
              **counts, "seconds": round(time.perf_counter() - t0, 3)}
    write_table(out, rows, report)
    return report


def summarize(out: Path, settings: list[Setting], dataset: tuple | None) -> list[dict]:
    """One row per setting: its swept values, mean iterations and clusters, and its
    scores against the dataset's ground truth (if given)."""
    from .evaluate import evaluate_predictions
    from .outputs import one_record_per_image, read_all_records

    rows = []
    for s in settings:
        ok = [r for r in one_record_per_image(read_all_records(out / s.name)) if r.get("status") == "ok"]
        row = {"setting": s.name, **{k: s.values[k] for k in s.values}, "images": len(ok),
               "mean_iterations": float(np.mean([r["iterations"] for r in ok])) if ok else math.nan,
               "mean_clusters": float(np.mean([r["clusters"] for r in ok])) if ok else math.nan}
        if dataset is not None and ok:
            name, root, split = dataset
            result = evaluate_predictions(name, root, split, out / s.name)
            for key in ("all", "fine", "coarse", "mean", "miou", "hungarian"):
                if key in result:
                    row[key] = result[key]
        rows.append(row)
    return rows


def write_table(out: Path, rows: list[dict], report: dict) -> None:
    """``sweep.csv`` (one row per setting), ``sweep.json`` (everything) and, when
    matplotlib is installed, ``sweep.png``."""
    columns = list(dict.fromkeys(k for row in rows for k in row))

    def cell(v):
        return json.dumps(v) if isinstance(v, (list, tuple)) else v

    def write_csv(f):
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for row in rows:
            w.writerow({k: cell(row.get(k, "")) for k in columns})

    import io
    buf = io.StringIO()
    write_csv(buf)
    imio.write_text_atomic(out / SWEEP_CSV, buf.getvalue())
    imio.write_json_atomic(out / SWEEP_JSON, report)
    try:
        plot_sweep(out / SWEEP_PNG, rows, report["grid"])
    except ImportError:
        pass  # matplotlib is the bench extra's; the table is the result


def plot_sweep(path: Path, rows: list[dict], grid: dict) -> None:
    """Score (or, without ground truth, clusters) against each swept value other than the
    seed, averaged over seeds with their spread as error bars; iterations and final
    clusters beside it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    score = next((k for k in ("all", "miou") if any(k in r for r in rows)), None)
    keys = [k for k in grid if k != "seed"] or list(grid)
    metrics = ([score] if score else []) + ["mean_iterations", "mean_clusters"]
    fig, axes = plt.subplots(len(metrics), len(keys), figsize=(4.2 * len(keys), 2.8 * len(metrics)),
                             squeeze=False)
    for col, key in enumerate(keys):
        values = list(dict.fromkeys(json.dumps(r[key]) for r in rows))
        for row_i, metric in enumerate(metrics):
            means, spreads = [], []
            for v in values:
                xs = [r[metric] for r in rows if json.dumps(r[key]) == v and metric in r
                      and not math.isnan(r[metric])]
                means.append(np.mean(xs) if xs else np.nan)
                spreads.append(np.std(xs) if len(xs) > 1 else 0.0)
            ax = axes[row_i][col]
            ax.errorbar(range(len(values)), means, yerr=spreads, fmt="o-", capsize=3)
            ax.set_xticks(range(len(values)), values)
            ax.set_xlabel(key)
            ax.set_ylabel({"all": "mIoU (all)", "miou": "mIoU"}.get(metric, metric.replace("_", " ")))
    fig.suptitle("dynaseg sweep" + (" (error bars: spread over seeds)" if "seed" in grid else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
