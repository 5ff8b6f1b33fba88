"""Segmenting images: the Python API (``segment``) and the file runner behind the CLI.

Loading, validation and the silhouette phase run in background threads, ahead of the
engine, so host work overlaps with device work on other images.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import images as imio
from . import silhouette
from .config import Config, ConfigError, load_config
from .engine import Engine, WorkItem, bucket_shape, pad_to_bucket, resolve_config
from .metrics import resize_prediction
from .models import build_model, check_pretrained
from .outputs import OutputFolder, OutputFolderError, merge_results
from .postprocess import postprocess
from .superpixels import check_available as check_superpixels
from .superpixels import superpixel_map


def _as_config(config) -> Config:
    if config is None:
        return Config()
    if isinstance(config, Config):
        return config
    return load_config(config)


class KStarEstimator:
    """k_min for an image: the config's number, or k* from the silhouette phase.

    Network features are computed on the image zero-padded to a multiple of
    ``bucket_multiple`` with a validity mask (exact: BatchNorm statistics are masked),
    so a folder of mixed sizes compiles the feature function once per padded shape,
    not once per image size. ``trace_count`` counts those compilations.

    Args:
      config: a Config.
      variables: the initial network variables the images start from, or a function
        ``name -> that image's initial variables`` (``Engine.initial_variables``: under
        ``init = "per_image"`` each image's features come from its own network).
      model: the network (the engine's; default: ``build_model(config)``).
    """

    def __init__(self, config: Config, variables, model=None):
        self.config = config
        self.trace_count = 0
        self._features = None
        self._variables = variables if callable(variables) else (lambda name: variables)
        self._model = model = model or build_model(config)
        # Features of the image as given: padded, never transposed.
        self._pad_config = config.replace({"engine.transpose_portrait": False})
        if config.stop.k_min == "silhouette" and config.silhouette.features == "network":
            def features(img, mask, params):
                self.trace_count += 1  # runs at trace time only
                return model.apply(params, img, mask, method="features")

            self._features = jax.jit(features)

    def features(self, image: np.ndarray, name: str | None = None) -> np.ndarray:
        """(H*W, D) per-pixel features of the configured kind for float RGB ``image``
        (network features: from the initial network of the image called ``name``)."""
        c = self.config
        if self._features is None:
            return silhouette.color_position_features(image, c.silhouette.position_scale)
        h, w, _ = image.shape
        padded, mask = pad_to_bucket(image, bucket_shape(h, w, self._pad_config, self._model))
        feats = self._features(jnp.asarray(padded), jnp.asarray(mask), self._variables(name))
        return np.asarray(feats)[:h, :w].reshape(h * w, -1)

    def __call__(self, image: np.ndarray, name: str | None = None) -> int:
        c = self.config
        if c.stop.k_min != "silhouette":
            return int(c.stop.k_min)
        sample = silhouette.pixel_sample(self.features(image, name), c.silhouette.samples, c.seed)
        args = (sample, c.silhouette.k_range, c.seed, c.silhouette.n_init, c.silhouette.dims)
        n = c.engine.kstar_processes
        if n <= 0:
            return silhouette.kstar_of_sample(*args)[0]
        # The processes share the cores: each gets its part of them for its threads.
        threads = max(1, usable_cpus() // n)
        pool = _kstar_processes(n)
        try:
            return pool.submit(silhouette.kstar_of_sample, *args, threads).result()[0]
        except cf.process.BrokenProcessPool:
            # A k* process died (killed, out of memory): a new pool for the next images,
            # and this image's k* here, the same computation.
            _drop_kstar_pool(n, pool)
            return silhouette.kstar_of_sample(*args)[0]

    def estimate_many(self, images: Sequence[np.ndarray], names: Sequence[str] | None = None) -> list[int]:
        """k_min of every image, computed concurrently as ``segment`` computes them ahead
        of the engine (its loader threads, and the k* processes of
        ``engine.kstar_processes``).

        Args:
          images: float RGB images.
          names: each image's name (its initial network, under ``init = "per_image"``);
            default: its position, as ``segment`` names arrays.

        Returns:
          One k_min per image, in order. The first failure raises.
        """
        names = [str(i) for i in range(len(images))] if names is None else list(names)
        ks = []
        for _, k in _prefetch(range(len(images)), lambda i: self(images[i], names[i]),
                              _loader_threads(self.config)):
            if isinstance(k, Exception):
                raise k
            ks.append(k)
        return ks


_KSTAR_POOLS: dict[int, cf.ProcessPoolExecutor] = {}
_KSTAR_POOLS_LOCK = threading.Lock()


def _kstar_processes(n: int) -> cf.ProcessPoolExecutor:
    """The process pool of ``engine.kstar_processes = n`` (n > 0): started on first use and
    kept for later runs in this process (shut down at exit). Spawned, not forked: a fork
    of a process running JAX's threads is unsafe."""
    with _KSTAR_POOLS_LOCK:  # loader threads ask for it at once
        if n not in _KSTAR_POOLS:
            import atexit
            import multiprocessing
            if not _KSTAR_POOLS:  # shut down before the interpreter tears its modules down
                atexit.register(_close_kstar_pools)
            _KSTAR_POOLS[n] = cf.ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn"))
        return _KSTAR_POOLS[n]


def _drop_kstar_pool(n: int, pool: cf.ProcessPoolExecutor) -> None:
    with _KSTAR_POOLS_LOCK:
        if _KSTAR_POOLS.get(n) is pool:
            del _KSTAR_POOLS[n]
    pool.shutdown(wait=False)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, which containers and
    ``taskset`` narrow), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API (macOS, Windows)
        return os.cpu_count() or 1


def _close_kstar_pools() -> None:
    with _KSTAR_POOLS_LOCK:
        while _KSTAR_POOLS:
            _KSTAR_POOLS.popitem()[1].shutdown(wait=True)


class Finisher:
    """Runs the finishing of images (post-processing, writing outputs) one at a time in a
    thread beside the engine loop, so that the loop keeps the device stepping meanwhile
    (at BSDS500 size the finishing takes tens to hundreds of milliseconds an image).

    One thread: records are appended in completion order. ``submit`` waits when ``queue``
    images are already waiting, and re-raises an unexpected error of an earlier call, as
    running it inline would have; leaving the ``with`` block waits for the rest (also
    when the loop stops with an exception, so that finished images are kept).
    """

    def __init__(self, queue: int = 8):
        self.queue = queue
        self._pending: list[cf.Future] = []
        self._pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="dynaseg-finish")

    def submit(self, fn: Callable, *args) -> None:
        for f in [f for f in self._pending if f.done()]:
            self._pending.remove(f)
            f.result()
        if len(self._pending) >= self.queue:
            self._pending.pop(0).result()
        self._pending.append(self._pool.submit(fn, *args))

    def __enter__(self) -> "Finisher":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._pool.shutdown(wait=True)
        if exc_type is None:
            for f in self._pending:
                f.result()


def _loader_threads(config: Config) -> int:
    """Threads that prepare images ahead of the engine: 2, or enough to keep every k*
    process busy."""
    return max(2, config.engine.kstar_processes)


def _prefetch(jobs: Sequence, prepare: Callable, workers: int = 2, ahead: int = 8):
    """Yields (job, prepared or exception) in order, preparing up to ``ahead`` (at least
    two per worker) in ``workers`` threads."""
    ahead = max(ahead, 2 * workers)
    with cf.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = []
        it = iter(jobs)
        for job in it:
            futures.append((job, pool.submit(prepare, job)))
            if len(futures) >= ahead:
                break
        while futures:
            job, fut = futures.pop(0)
            nxt = next(it, None)
            if nxt is not None:
                futures.append((nxt, pool.submit(prepare, nxt)))
            try:
                yield job, fut.result()
            except Exception as e:  # noqa: BLE001 - reported per image, never fatal
                yield job, e


def segment(images: Iterable, config=None, *, batch: int | None = None,
            progress: bool = False, engine: Engine | None = None) -> list[dict]:
    """Segments images with DynaSeg, each with its own freshly initialised network
    (``init = "per_image"``: seeded by the file's stem, or an array's position).

    Args:
      images: arrays ((H, W, 3) uint8/uint16/float in [0, 1], or (H, W)) or file paths.
      config: a Config, a preset name (``"dynaseg_scf"``) or a TOML path; default Config().
      batch: number of slots (images optimised at once); default ``config.engine.batch``.
      progress: show a progress bar on stderr.
      engine: an Engine to run on instead of a new one (its compiled steps are reused;
        its ``input_wait`` then tells how long it waited for k*); ``config`` and ``batch``
        are the engine's and must not be given.

    Returns:
      One dict per input, in input order: ``labels`` ((H, W) int32, renumbered 0..K-1),
      ``iterations``, ``clusters`` (K, after post-processing), ``k_min``, ``seconds``, ``error`` (None, or why the
      optimisation failed, e.g. diverged at a too large lr; its labels are then
      meaningless). Bad inputs raise ImageError.
    """
    if engine is not None:
        if config is not None or batch is not None:
            raise ValueError("segment: give an engine or a config/batch, not both")
        config = engine.config
    config = _as_config(config)
    if batch is not None:
        config = config.replace({"engine.batch": batch})
    check_superpixels(config)
    arrays, names = [], []
    for i, img in enumerate(images):
        # An image's name seeds its own network (init = "per_image"): a file's stem, an
        # array's position.
        names.append(Path(img).stem if isinstance(img, (str, os.PathLike)) else str(i))
        if isinstance(img, (str, os.PathLike)):
            arrays.append(imio.load_image(img, config.engine.max_pixels))
        else:
            arr = imio.as_float_image(img, name=f"images[{i}]")
            imio.check_size(*arr.shape[:2], config.engine.max_pixels, f"images[{i}]")
            arrays.append(arr)
    if engine is None:
        engine = Engine(config)
    kstar = KStarEstimator(engine.config, engine.initial_variables, engine.model)
    order = sorted(range(len(arrays)),
                   key=lambda i: _bucket_order(arrays[i].shape, engine.config, engine.model))

    def prepare(i):
        return kstar(arrays[i], names[i]), superpixel_map(arrays[i], engine.config)

    segments = {}  # each image's superpixels, computed once for the targets and the vote

    def items():
        for i, prepared in _prefetch(order, prepare, _loader_threads(engine.config)):
            if isinstance(prepared, Exception):
                raise prepared
            k, segments[i] = prepared
            yield WorkItem(key=i, image=arrays[i], k_min=k, name=names[i], segments=segments[i])

    out: list[dict | None] = [None] * len(arrays)

    def finish(r, image_segments):
        labels = r.labels if r.error else postprocess(r.labels, arrays[r.key], engine.config, image_segments)
        labels = imio.renumber(labels)
        # As the command's results.jsonl: the clusters of the labels returned (after
        # post-processing), not the engine's last q'.
        out[r.key] = {"labels": labels, "iterations": r.iterations,
                      "clusters": r.clusters if r.error else int(labels.max()) + 1, "k_min": r.k_min,
                      "seconds": r.seconds, "error": r.error}

    bar = _progress(len(arrays), progress)
    with Finisher() as finisher:
        for r in engine.run(items()):
            finisher.submit(finish, r, segments.pop(r.key))
            bar.update(1)
    bar.close()
    return out


def _bucket_order(shape, config, model):
    return bucket_shape(shape[0], shape[1], config, model)[:2]


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, unit="img", disable=not enabled, file=sys.stderr,
                dynamic_ncols=True)


# --------------------------------------------------------------------------------------
# The file runner (``dynaseg segment``)


def find_images(inputs: Sequence[str | os.PathLike], exclude: str | os.PathLike | None = None
                ) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Expands files and folders (recursively, image suffixes only) into image paths.

    Args:
      inputs: files and folders.
      exclude: a folder whose contents are never inputs (the output folder, so that a
        rerun never segments its own label maps and overlays).

    Returns (paths, problems): inputs that do not exist are reported as problems.
    """
    skip = Path(exclude).resolve() if exclude is not None else None

    def wanted(q: Path) -> bool:
        return skip is None or skip not in q.resolve().parents

    paths, problems = [], []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*")
                           if q.is_file() and q.suffix.lower() in imio.IMAGE_SUFFIXES and wanted(q))
            if not found:
                where = " outside the output folder" if skip is not None and (
                    p.resolve() == skip or skip in p.resolve().parents) else ""
                problems.append((p, f"{p}: folder has no image files{where} "
                                    f"({', '.join(imio.IMAGE_SUFFIXES)})"))
            paths.extend(found)
        elif p.exists():
            paths.append(p)
        else:
            problems.append((p, f"{p}: no such file or folder"))
    return paths, problems


@dataclasses.dataclass
class DatasetInput:
    """One dataset image for ``segment_files``.

    Attributes:
      name: the image id; it names the outputs (``<name>.png``).
      source: a stable identity for resuming, e.g. ``bsds500:val:100007``.
      load: returns the image as an (H, W, 3) array.
    """
    name: str
    source: str
    load: Callable[[], np.ndarray]


@dataclasses.dataclass
class RunSummary:
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    errors: list = dataclasses.field(default_factory=list)


def segment_files(inputs: Sequence, out_dir: str | os.PathLike, config: Config, *,
                  scale: float = 1.0, progress: bool | None = None,
                  log: Callable[[str], None] | None = None, overwrite: bool = False,
                  color_labels: bool = False, process: tuple[int, int] | None = None) -> RunSummary:
    """Segments image files into ``out_dir`` (label PNG, overlay PNG, results.jsonl).

    Resumable: an image is skipped when the folder has an ``ok`` record for its source
    (resolved file path or dataset id) under the same config digest, and its label map
    (see ``outputs.py``). One bad image gets an ``error`` record and never stops the
    others. The folder is changed only once the inputs are found and the network is
    built, so a typo or a bad checkpoint never costs it its results.

    Args:
      inputs: image files and/or folders, ``DatasetInput`` items, or ``(name, loader)``
        pairs where ``loader()`` returns an (H, W, 3) array (the name is the source).
      out_dir: output folder (created); never searched for inputs.
      config: a Config.
      scale: resize images by this factor before segmenting; label maps are resized
        back (nearest neighbour) to the input size.
      progress: progress bar on stderr (default: when stderr is a terminal).
      log: where one-line messages go (default: above the progress bar, on stderr).
      overwrite: replace the results of another config in ``out_dir`` instead of
        refusing (``OutputFolderError``); results of this config are resumed.
      color_labels: write label maps as 8-bit palette PNGs (coloured in viewers, at
        most 256 labels) instead of 16-bit grayscale.
      process: (index, count) of this process in a multi-process run (default:
        ``jax.process_index()``, ``jax.process_count()``). Each process segments its
        share of the inputs: all inputs sorted by bucket and source, every count-th from
        the index-th (so each process gets the same mix of sizes), and writes its own
        results file; the last to end merges them into results.jsonl (``outputs.py``).
    """
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    if progress is None:
        progress = sys.stderr.isatty()
    # One line per finished image where no bar shows it (a batch job's log).
    per_image_lines = not sys.stdout.isatty()
    log = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
    summary = RunSummary()
    if color_labels and config.model.max_clusters > 256:
        raise ConfigError(f"--color-labels: model.max_clusters = {config.model.max_clusters} labels do not "
                          f"fit an 8-bit palette PNG (at most 256)")
    check_pretrained(config)  # a missing checkpoint fails before anything else
    check_superpixels(config)
    if process is None:
        process = (jax.process_index(), jax.process_count())
    folder = OutputFolder.open(out_dir, config, scale, overwrite=overwrite,
                               resolved=resolve_config(config), process=process)
    try:
        _check_label_format(folder, color_labels)
        if folder.dropped_bytes:
            log(f"warning: {folder.results_path}: dropped a torn last line ({folder.dropped_bytes} bytes) "
                f"left by an interrupted run")
        _run_files(inputs, folder, config, scale, progress, per_image_lines, log, summary,
                   color_labels)
        if process[1] > 1:
            merge_results(folder.path)
    finally:
        folder.close()
    summary.seconds = time.perf_counter() - t_start
    return summary


def resolve_jobs(inputs: Sequence, out: Path) -> tuple[list, list]:
    """Inputs (files, folders, ``DatasetInput``, ``(name, loader)``) -> ``(jobs, problems)``:
    jobs ``(name, source, stem, loader or Path)``, problems ``(path, message)`` of inputs
    that are not images; ``out`` is never searched."""
    jobs = []
    file_inputs = [x for x in inputs if isinstance(x, (str, os.PathLike))]
    paths, problems = find_images(file_inputs, exclude=out)
    for p in paths:
        jobs.append((str(p), str(p.resolve()), p.stem, p))
    for x in inputs:
        if isinstance(x, DatasetInput):
            jobs.append((x.name, x.source, x.name, x.load))  # a dataset id names its outputs as is
        elif isinstance(x, tuple):
            name, loader = x
            jobs.append((str(name), str(name), str(name), loader))
    return jobs, problems


def _check_label_format(folder: OutputFolder, color_labels: bool) -> None:
    """Refuses a run whose label maps would differ in format (``--color-labels``) from
    those its folder already holds: one folder, one format."""
    from PIL import Image

    for record in folder.records:
        path = folder.path / f"{record.get('stem')}.png"
        if record.get("status") != "ok" or not path.is_file():
            continue
        try:
            with Image.open(path) as img:
                palette = img.mode == "P"
        except OSError:
            continue  # a damaged map is redone, in this run's format
        if palette != color_labels:
            held = "8-bit palette (--color-labels)" if palette else "16-bit grayscale"
            raise OutputFolderError(f"--out {folder.path}: holds {held} label maps; "
                                    f"{'add' if palette else 'drop'} --color-labels to resume there, "
                                    f"or use another --out")
        return


def load_job_image(job, scale: float, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """(original, image): a job's image as read, and as the network sees it (scaled,
    then checked against the size limits under its own name)."""
    name, _, _, src = job
    original = imio.load_image(src, cfg.engine.max_pixels) if isinstance(src, Path) else \
        imio.as_float_image(src(), name)
    image = original
    if scale != 1.0:
        # Checked before resizing: a large --scale must not allocate the image first.
        imio.check_size(*imio.scaled_size(*original.shape[:2], scale), cfg.engine.max_pixels,
                        f"{name} (scaled by {scale})")
        image = imio.resize_image(original, scale)
    return original, image


def finish_labels(labels: np.ndarray, original: np.ndarray, image: np.ndarray, cfg: Config,
                  segments: np.ndarray | None = None) -> np.ndarray:
    """The label map written for an image: post-processed (``cfg.postprocess``, with the
    image's superpixels ``segments`` where already computed) at the size the network saw,
    resized to the original (nearest neighbour), numbered 0..K-1."""
    labels = postprocess(labels, image, cfg, segments)
    if labels.shape != original.shape[:2]:
        labels = resize_prediction(labels, original.shape[:2])
    return imio.renumber(labels)


def write_outputs(folder: Path, stem: str, original: np.ndarray, labels: np.ndarray,
                  color_labels: bool = False) -> None:
    """``<stem>.png`` and ``<stem>_overlay.png``, each written atomically."""
    imio.save_labels(folder / f"{stem}.png", labels, color=color_labels)
    imio.save_overlay(folder / f"{stem}_overlay.png", original, labels)


def ok_entry(job, original: np.ndarray, labels: np.ndarray, result) -> dict:
    """The results.jsonl record of an image segmented (``result``: the engine's)."""
    name, source, stem, _ = job
    return {"file": name, "source": source, "stem": stem, "status": "ok", "error": None,
            "height": int(original.shape[0]), "width": int(original.shape[1]),
            "iterations": result.iterations, "clusters": int(labels.max()) + 1,
            "k_min": result.k_min, "seconds": round(result.seconds, 4)}


def error_entry(name, err, stem=None, source=None, iterations=None) -> dict:
    """The results.jsonl record of an image that failed (``err``: its one-line message)."""
    return {"file": str(name), "source": source, "stem": stem, "status": "error",
            "error": str(err), "height": None, "width": None, "iterations": iterations,
            "clusters": None, "k_min": None, "seconds": None}


def error_message(name: str, exc: Exception) -> str:
    """One line naming the image: the message itself where it already names it."""
    msg = str(exc)
    if not isinstance(exc, ValueError) or name not in msg:
        msg = f"{name}: {type(exc).__name__}: {exc}"
    return msg


def _share(jobs: list, index: int, count: int, scale: float, cfg: Config) -> list:
    """This process's share of the jobs: all (unique by source) sorted by bucket and
    source, every ``count``-th from the ``index``-th. A function of the inputs only, so
    every process computes the same partition, whatever is already done."""
    model = build_model(cfg)
    unique = list({job[1]: job for job in jobs}.values())
    return sorted(unique, key=lambda job: (_job_bucket(job, scale, cfg, model), job[1]))[index::count]


def _job_bucket(job, scale: float, cfg: Config, model):
    """The bucket of a job's image, from its file header (a dataset image: unknown, (0, 0))."""
    src = job[3]
    try:
        h, w = imio.image_size(src) if isinstance(src, Path) else (0, 0)
    except imio.ImageError:
        h, w = 0, 0
    return _bucket_order(imio.scaled_size(h, w, scale), cfg, model)


def _run_files(inputs, folder: OutputFolder, config: Config, scale: float, progress: bool,
               per_image_lines: bool, log, summary: RunSummary, color_labels: bool) -> None:
    out = folder.path
    cfg = resolve_config(config)
    pending_errors = []  # recorded once the folder is committed
    lock = threading.Lock()  # record() runs in the engine's thread and the finishing thread

    def record(entry: dict, write: bool = True):
        with lock:
            _record(entry, write)

    def _record(entry: dict, write: bool):
        if write:
            folder.append(entry)
        if entry["status"] == "ok":
            summary.ok += 1
            if per_image_lines:
                try:
                    print(f"{entry['file']}: {entry['iterations']} iterations, {entry['clusters']} clusters, "
                          f"{entry['seconds']:.1f} s", flush=True)
                except (BrokenPipeError, ValueError):  # stdout closed (| head): the record is on disk
                    pass
        else:
            summary.failed += 1
            summary.errors.append(entry["error"])
            log(f"error: {entry['error']}")

    jobs, problems = resolve_jobs(inputs, out)
    paths = [job[3] for job in jobs if isinstance(job[3], Path)]
    index, count = folder.process
    for p, msg in problems if index == 0 else ():  # reported once
        pending_errors.append(error_entry(p, msg))

    if count > 1:
        jobs = _share(jobs, index, count, scale, cfg)
    done = folder.done_sources()
    # Output names in use, case-folded (case-insensitive file systems), each image taking
    # both <stem>.png and <stem>_overlay.png.
    taken = {}
    for source, stem in done.items():
        taken[stem.casefold()] = taken[f"{stem}_overlay".casefold()] = source
    input_files = {str(p.resolve()) for p in paths}
    todo, queued = [], set()
    for name, source, stem, src in jobs:
        if source in done:
            summary.skipped += 1
            continue
        if source in queued:
            continue  # the same file given twice (e.g. a folder and a file in it)
        names = (stem.casefold(), f"{stem}_overlay".casefold())
        clash = next((taken[n] for n in names if taken.get(n, source) != source), None)
        if clash is not None:
            pending_errors.append(error_entry(name, f"{name}: output name {stem}.png is already used by "
                                                    f"{clash}", stem, source))
            continue
        outputs = {str((out / f"{stem}{suffix}.png").resolve()) for suffix in ("", "_overlay")}
        if outputs & input_files:
            pending_errors.append(error_entry(name, f"{name}: its outputs would overwrite an input file in "
                                                    f"{out}; choose another --out", stem, source))
            continue
        for n in names:
            taken[n] = source
        queued.add(source)
        todo.append((name, source, stem, src))

    engine = Engine(config) if todo else None  # compiles the network and reads its weights
    # Only now may the folder change; with nothing to run, another config's results
    # are left alone and the problems only reported.
    committed = bool(todo) or not folder.stale
    if committed:
        folder.commit()
    for entry in pending_errors:
        record(entry, write=committed)
    if not todo:
        return
    kstar = KStarEstimator(cfg, engine.initial_variables, engine.model)

    todo.sort(key=lambda job: _job_bucket(job, scale, cfg, engine.model))

    def prepare(job):
        original, image = load_job_image(job, scale, cfg)
        return original, image, kstar(image, job[2]), superpixel_map(image, cfg)

    meta = {}
    bar = _progress(len(todo), progress)

    def items():
        for job, prepared in _prefetch(todo, prepare, _loader_threads(cfg)):
            name, source, stem, _ = job
            if isinstance(prepared, Exception):
                record(error_entry(name, error_message(name, prepared), stem, source))
                bar.update(1)
                continue
            original, image, k, segments = prepared
            meta[name] = (job, original, image, segments)
            yield WorkItem(key=name, image=image, k_min=k, name=stem, segments=segments)

    def finish(r, job, original, image, segments):
        _, source, stem, _ = job
        labels = finish_labels(r.labels, original, image, cfg, segments)
        try:
            write_outputs(out, stem, original, labels, color_labels)
        except (OSError, ValueError) as e:
            record(error_entry(r.key, f"{r.key}: cannot write outputs: {e}", stem, source))
            return
        record(ok_entry(job, original, labels, r))

    with Finisher() as finisher:
        for r in engine.run(items()):
            job, original, image, segments = meta.pop(r.key)
            _, source, stem, _ = job
            bar.update(1)
            if r.error:
                record(error_entry(r.key, f"{r.key}: {r.error}", stem, source, r.iterations))
                continue
            finisher.submit(finish, r, job, original, image, segments)
    bar.close()
