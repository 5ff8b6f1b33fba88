"""Scoring a folder of predicted label maps against a dataset's ground truth.

Predictions are ``<pred_dir>/<id>.png`` label PNGs (16-bit, as ``dynaseg segment`` writes
them; any single-channel integer PNG works). The protocols are those of docs/algorithm.md section 4,
computed by :mod:`dynaseg_jax.metrics`:

* ``bsds`` (BSDS500): best-overlap IoU per ground-truth segment, pooled over segments into
  ``all`` / ``fine`` / ``coarse`` / ``mean``, plus ``hungarian``: per image, the Hungarian
  mIoU against each annotation averaged over the annotations, then averaged over images.
* ``best_overlap`` (VOC2012): the same per-segment score against SegmentationObject (255
  void ignored, 0 background is a segment), pooled over all segments into ``miou``; plus
  the per-image ``hungarian`` mean.
* ``cocostuff27``: per-image Hungarian matching of clusters to classes, one dataset
  confusion; ``miou``, ``things``, ``stuff``, ``pixel_accuracy``.
* ``none`` (plain folders): no ground truth; only checks that predictions exist and match
  the images' sizes, and reports the mean number of segments.

The command line (``dynaseg evaluate``) is defined here by :func:`add_evaluate_arguments`
and :func:`run_evaluate` and wired into ``dynaseg_jax/cli.py``.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from . import images as imio
from .datasets import (COCO_CROP, DATASETS, DEFAULT_SPLITS, DatasetError, coco_resize_crop, header_size,
                       open_dataset)

__all__ = [
    "PROTOCOLS",
    "DEFAULT_PROTOCOLS",
    "read_prediction",
    "evaluate_predictions",
    "format_table",
    "add_evaluate_arguments",
    "run_evaluate",
]

PROTOCOLS = ("bsds", "best_overlap", "cocostuff27", "none")
DEFAULT_PROTOCOLS = {"bsds500": "bsds", "voc2012": "best_overlap", "cocostuff27": "cocostuff27",
                     "folder": "none"}
# Which protocols make sense for which ground truth: BSDS has several annotations per
# image, VOC one object map, COCO-Stuff class maps, folders none.
_ALLOWED = {"bsds500": ("bsds", "none"), "voc2012": ("best_overlap", "none"),
            "cocostuff27": ("cocostuff27", "none"), "folder": ("none",)}
VOC_VOID = 255
# How many missing ids the result lists by name (the count is always complete).
_MISSING_LISTED = 20


def read_prediction(path: str | os.PathLike) -> np.ndarray:
    """Reads a predicted label map.

    Args:
      path: a single-channel integer PNG (16-bit grayscale as written by ``save_labels``,
        8-bit grayscale or palette).

    Returns:
      int32 (H, W) labels.

    Raises:
      DatasetError: missing or unreadable file, or a colour (multi-channel) image.
    """
    return imio.read_labels(path, what="prediction", error=DatasetError)


def _nanmean(values) -> float:
    vals = np.asarray(values, np.float64)
    vals = vals[~np.isnan(vals)]
    return float(vals.mean()) if vals.size else float("nan")


class _Protocol:
    """One protocol's scoring: ``add`` takes each image's prediction, ``result`` gives
    the dataset's scores. ``per_image``: {id: scores} where the protocol has them."""

    def __init__(self, ds, connected: bool):
        self.ds = ds
        self.connected = connected
        self.per_image: dict | None = None

    def _fit(self, pred: np.ndarray, shape) -> np.ndarray:
        from . import metrics
        pred = metrics.resize_prediction(pred, shape)
        return metrics.relabel_connected(pred) if self.connected else pred


class _NoProtocol(_Protocol):
    """Plain folders: the prediction's size against the image's; segments per image."""

    def __init__(self, ds, connected):
        super().__init__(ds, connected)
        self.segments: list[int] = []

    def add(self, id_, pred):
        pred = self._fit(pred, header_size(self.ds.image_path(id_)))
        self.segments.append(int(np.unique(pred).size))

    def result(self) -> dict:
        return {"segments_per_image": float(np.mean(self.segments)) if self.segments else float("nan")}


class _BsdsProtocol(_Protocol):
    """BSDS500: best-overlap IoUs against every annotation, pooled by ``metrics.bsds_scores``."""

    def __init__(self, ds, connected):
        super().__init__(ds, connected)
        self.ious: list[list[np.ndarray]] = []
        self.hungarian: list[float] = []
        self.per_image = {}

    def add(self, id_, pred):
        from . import metrics
        annotations = self.ds.load_gt(id_)
        pred = self._fit(pred, annotations[0].shape)
        scores = [metrics.overlap_scores(pred, a) for a in annotations]
        self.ious.append([ious for ious, _ in scores])
        self.hungarian.append(_nanmean([h for _, h in scores]))
        self.per_image[id_] = {"best_overlap": float(np.concatenate(self.ious[-1]).mean()),
                               "hungarian": self.hungarian[-1]}

    def result(self) -> dict:
        from . import metrics
        scores = metrics.bsds_scores(self.ious)
        return {**{k: scores[k] for k in ("all", "fine", "coarse", "mean")},
                "hungarian": _nanmean(self.hungarian), "segments": scores["segments_all"]}


class _BestOverlapProtocol(_Protocol):
    """VOC2012 objects: best-overlap IoU per object (255 void ignored), pooled."""

    def __init__(self, ds, connected):
        super().__init__(ds, connected)
        self.ious: list[np.ndarray] = []
        self.hungarian: list[float] = []
        self.per_image = {}

    def add(self, id_, pred):
        from . import metrics
        gt = self.ds.load_gt(id_)
        ious, h = metrics.overlap_scores(self._fit(pred, gt.shape), gt, ignore=VOC_VOID)
        self.ious.append(ious)
        self.hungarian.append(h)
        self.per_image[id_] = {"best_overlap": float(ious.mean()) if ious.size else float("nan"),
                               "hungarian": h}

    def result(self) -> dict:
        pooled = np.concatenate(self.ious) if self.ious else np.zeros(0)
        return {"miou": float(pooled.mean()) if pooled.size else float("nan"),
                "hungarian": _nanmean(self.hungarian), "segments": int(pooled.size)}


class _CocoStuffProtocol(_Protocol):
    """COCO-Stuff-27: per-image Hungarian matching into one dataset confusion."""

    def __init__(self, ds, connected):
        from . import metrics
        super().__init__(ds, connected)
        self.confusion = metrics.CocoStuffAccumulator()

    def add(self, id_, pred):
        gt = self.ds.load_gt(id_)
        if pred.shape != gt.shape:
            # A prediction of the whole image: check its orientation against the full
            # label map, then crop it exactly as the ground truth was cropped.
            from . import metrics
            pred = coco_resize_crop(metrics.resize_prediction(pred, self.ds.gt_full_size(id_)), COCO_CROP)
        self.confusion.add(self._fit(pred, gt.shape), gt)

    def result(self) -> dict:
        return self.confusion.result()


_PROTOCOL_SCORING = {"bsds": _BsdsProtocol, "best_overlap": _BestOverlapProtocol,
                     "cocostuff27": _CocoStuffProtocol, "none": _NoProtocol}


def evaluate_predictions(dataset: str, root: str | os.PathLike, split: str | None,
                         pred_dir: str | os.PathLike, protocol: str | None = None,
                         connected: bool = False, limit: int | None = None,
                         id_list: str | os.PathLike | None = None, keep_ious: bool = False,
                         on_failure: str = "raise") -> dict:
    """Scores ``<pred_dir>/<id>.png`` for every id of a dataset split.

    Predictions whose size differs from the ground truth are resized nearest-neighbour; a
    transposed one raises. For COCO-Stuff, a prediction of the full (uncropped) image gets
    the ground truth's resize-and-centre-crop first.

    Args:
      dataset: ``bsds500``, ``voc2012``, ``cocostuff27`` or ``folder``.
      root: the dataset folder in its official layout (see :mod:`dynaseg_jax.datasets`).
      split: split name; ``None`` takes the protocol's default (BSDS500 test, VOC trainval,
        COCO-Stuff val).
      pred_dir: folder of predicted label PNGs named by image id.
      protocol: one of :data:`PROTOCOLS`; ``None`` takes the dataset's
        (:data:`DEFAULT_PROTOCOLS`).
      connected: split predicted labels into connected components before scoring.
      limit: score only the first ``limit`` ids of the split.
      id_list: COCO-Stuff's curated id list file.
      on_failure: what an image that cannot be scored does (an unreadable prediction or
        ground-truth file, a transposed prediction): ``"raise"`` its error, or
        ``"record"`` it in the result's ``failed``/``failures`` and score the others
        (``dynaseg evaluate``).
      keep_ious: ``bsds`` protocol: also give each image's per-segment IoUs,
        ``per_image[id]["ious"]``, one list per annotation (the input of
        ``metrics.bsds_scores`` and ``metrics.bootstrap_interval``).

    Returns:
      A JSON-serialisable dict: the protocol's scores (see the module docstring), ``images``
      (how many were scored), ``missing`` (ids without a prediction), ``missing_ids`` (the
      first few of them), ``failed`` and ``failures`` (``on_failure="record"``: the images
      that could not be scored, one line each naming the file), the run's settings, and for the ``bsds`` and ``best_overlap``
      protocols ``per_image``: ``{id: {"best_overlap": mean best-overlap IoU of the
      image's ground-truth segments (all annotations), "hungarian": its Hungarian mIoU}}``
      (for looking at images; the dataset scores pool segments, not images).

    Raises:
      DatasetError: unknown dataset/protocol pair, a missing prediction folder, a
        missing or malformed dataset layout; with ``on_failure="raise"``, unreadable
        predictions or ground-truth files.
      ValueError: with ``on_failure="raise"``, a prediction transposed with respect to
        its ground truth.
    """
    from . import metrics  # scipy: imported here so that `dynaseg --help` starts fast

    if on_failure not in ("raise", "record"):
        raise ValueError(f"on_failure = {on_failure!r}: 'raise' or 'record'")
    if dataset not in DATASETS:
        raise DatasetError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    protocol = protocol or DEFAULT_PROTOCOLS[dataset]
    if protocol not in _ALLOWED[dataset]:
        raise DatasetError(f"protocol {protocol!r} does not apply to {dataset}; use {' or '.join(_ALLOWED[dataset])}")
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise DatasetError(f"{pred_dir}: prediction folder does not exist")
    ds = open_dataset(dataset, root, split, id_list)
    ids = ds.ids()
    if limit is not None:
        ids = ids[: max(int(limit), 0)]

    start = time.perf_counter()
    missing: list[str] = []
    failed: list[str] = []  # one line per image that could not be scored
    scored = 0
    scoring = _PROTOCOL_SCORING[protocol](ds, connected)
    for id_ in ids:
        pred_path = pred_dir / f"{id_}.png"
        if not pred_path.is_file():
            missing.append(id_)
            continue
        # An unreadable prediction or ground-truth file, or a transposed prediction:
        # raised, or recorded as that image's failure while the others are scored.
        try:
            scoring.add(id_, read_prediction(pred_path))
        except ValueError as e:
            error = e if isinstance(e, DatasetError) else ValueError(f"{pred_path}: {e}")
            if on_failure == "raise":
                raise error from None
            failed.append(str(error))
            continue
        scored += 1

    result: dict = {
        "dataset": dataset,
        "split": None if dataset == "folder" else (split or DEFAULT_SPLITS[dataset]),
        "protocol": protocol,
        "connected": bool(connected),
        "pred_dir": str(pred_dir),
        **scoring.result(),
    }
    if scoring.per_image is not None:
        result["per_image"] = scoring.per_image
    if keep_ious and protocol == "bsds":
        for id_, image_ious in zip(scoring.per_image, scoring.ious):
            scoring.per_image[id_]["ious"] = [ious.tolist() for ious in image_ious]
    result["images"] = scored
    result["missing"] = len(missing)
    result["missing_ids"] = missing[:_MISSING_LISTED]
    result["failed"] = len(failed)
    result["failures"] = failed
    result["seconds"] = round(time.perf_counter() - start, 3)
    return result


_TABLE_KEYS = {
    "bsds": (("all", "mIoU all"), ("fine", "mIoU fine"), ("coarse", "mIoU coarse"),
             ("mean", "mIoU mean"), ("hungarian", "Hungarian mIoU (per image)"), ("segments", "gt segments")),
    "best_overlap": (("miou", "mIoU (best overlap)"), ("hungarian", "Hungarian mIoU (per image)"),
                     ("segments", "gt segments")),
    "cocostuff27": (("miou", "mIoU all"), ("things", "mIoU things"), ("stuff", "mIoU stuff"),
                    ("pixel_accuracy", "pixel accuracy")),
    "none": (("segments_per_image", "segments per image"),),
}


def format_table(result: dict) -> str:
    """A plain-text table of an :func:`evaluate_predictions` result.

    Args:
      result: the dict returned by :func:`evaluate_predictions`.

    Returns:
      Multi-line text, one metric per row (scores with 4 decimals), ending with the image
      and missing-prediction counts.
    """
    protocol = result.get("protocol", "bsds")
    split = result.get("split")
    rows = [("dataset", f"{result.get('dataset')}" + (f" ({split})" if split else "")),
            ("protocol", protocol + (" + connected components" if result.get("connected") else ""))]
    for key, label in _TABLE_KEYS.get(protocol, ()):
        if key not in result:
            continue
        value = result[key]
        if isinstance(value, float):
            text = "n/a" if math.isnan(value) else f"{value:.4f}"
        else:
            text = str(value)
        rows.append((label, text))
    rows.append(("images scored", str(result.get("images", 0))))
    rows.append(("predictions missing", str(result.get("missing", 0))))
    if result.get("failed"):
        rows.append(("images failed", str(result["failed"])))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the ``dynaseg evaluate`` options to a (sub)parser.

    Args:
      parser: the parser of the ``evaluate`` subcommand.

    Returns:
      The same parser.
    """
    parser.add_argument("--dataset", required=True, choices=DATASETS, help="dataset layout under --root")
    parser.add_argument("--root", required=True, help="dataset folder (official layout)")
    parser.add_argument("--split", default=None,
                        help="split (default: bsds500 test, voc2012 trainval, cocostuff27 val)")
    parser.add_argument("--pred", required=True, help="folder of predicted label PNGs named <id>.png")
    parser.add_argument("--protocol", choices=PROTOCOLS, default=None,
                        help="scoring protocol (default: the dataset's: bsds, best_overlap, cocostuff27, none)")
    parser.add_argument("--connected", action="store_true",
                        help="split predicted labels into connected components before scoring")
    parser.add_argument("--id-list", default=None,
                        help="cocostuff27: curated id list (default: <root>/curated/val2017/Coco164kFull_Stuff_Coarse_7.txt)")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N ids")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the result as JSON")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 when any image of the split has no prediction (default: score "
                             "the predictions that exist, report the missing count, exit 0)")
    return parser


def run_evaluate(args: argparse.Namespace) -> int:
    """Runs ``dynaseg evaluate``: prints the table and writes the JSON.

    Args:
      args: parsed options from :func:`add_evaluate_arguments`.

    Returns:
      Exit code: 0 when the predictions found were scored (missing ones are counted and
      reported: a run over the first N images of a split scores those N), 1 when some
      could not be scored (each named on stderr) or, with ``--strict``, were missing, 2
      on errors or when none was scored.
    """
    if args.limit is not None and args.limit < 1:
        print(f"dynaseg: error: --limit {args.limit}: must be >= 1", file=sys.stderr)
        return 2
    if args.json and os.path.isdir(args.json):  # found before the scoring, not after
        print(f"dynaseg: error: --json {args.json}: is a folder; give a file name", file=sys.stderr)
        return 2
    try:
        result = evaluate_predictions(args.dataset, args.root, args.split, args.pred,
                                      protocol=args.protocol, connected=args.connected,
                                      limit=args.limit, id_list=args.id_list, on_failure="record")
    except ValueError as e:  # DatasetError included
        print(f"dynaseg: error: {e}", file=sys.stderr)
        return 2
    print(format_table(result))
    if args.json:
        imio.write_json_atomic(args.json, result, sort_keys=True)  # NaN -> null
        print(f"wrote {args.json}")
    for failure in result["failures"]:
        print(f"dynaseg: error: {failure}", file=sys.stderr)
    if result["images"] == 0:
        found = "none could be scored" if result["failed"] else "no predictions found"
        print(f"dynaseg: error: {found} in {args.pred} for this split", file=sys.stderr)
        return 2
    if result["missing"]:
        shown = ", ".join(result["missing_ids"][:5])
        print(f"dynaseg: {'error' if args.strict else 'note'}: {result['missing']} of "
              f"{result['missing'] + result['images'] + result['failed']} prediction(s) missing (e.g. {shown}); "
              f"the scores cover the {result['images']} scored", file=sys.stderr)
    if result["failed"]:
        print(f"dynaseg: error: {result['failed']} of {result['failed'] + result['images']} prediction(s) "
              f"could not be scored (above); the scores cover the {result['images']} scored", file=sys.stderr)
    return 1 if result["failed"] or (result["missing"] and args.strict) else 0
