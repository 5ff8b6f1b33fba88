"""Segmentation scores for unsupervised label maps (numpy/scipy only).

Everything here is built on one contingency (confusion) matrix per image, computed in a
single ``np.bincount`` over combined label indices, so no Python loop ever visits pixels.

Protocols (see docs/algorithm.md section 4):

* Best-overlap IoU (BSDS500, PASCAL VOC 2012): every ground-truth segment g is scored by
  ``max_p |g & p| / |g | p|`` over the predicted labels p, the measure computed by the DynaSeg
  reference script ``tools/calculate_mIOU.py`` (RyersonMultimediaLab/DynaSeg) and, before it,
  by Kim, Kanezaki and Tanaka (IEEE TIP 2020). Scores are pooled over *segments*: the
  dataset mean is the mean of the per-segment IoUs of all chosen annotations of all images.
  ``all`` uses every annotation, ``fine`` per image the annotation with the most segments,
  ``coarse`` the one with the fewest, and ``mean`` is the average of those three numbers.
* Per-image Hungarian mIoU: a one-to-one matching of predicted labels to ground-truth
  classes that maximises the summed IoU (``scipy.optimize.linear_sum_assignment`` on the
  rectangular IoU matrix); ground-truth classes left unmatched score 0.
* COCO-Stuff-27 (DynaSeg's per-image protocol): per image, clusters are matched one-to-one
  to the ground-truth classes present by a Hungarian assignment that maximises the matched
  pixel count; pixels of unmatched clusters are counted as wrong. One 27x27 confusion is
  accumulated over the dataset, from which the class IoUs (TP / (TP + FP + FN)), mIoU over
  all / thing (0-11) / stuff (12-26) classes and pixel accuracy are taken.

Pixels whose ground truth is an ignore label are removed before anything is counted, from
the predicted labels' areas too (a predicted label's area is measured on scored pixels only).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

__all__ = [
    "contingency",
    "iou_matrix",
    "best_overlap_ious",
    "bsds_image_ious",
    "bsds_scores",
    "bootstrap_interval",
    "hungarian_miou",
    "overlap_scores",
    "relabel_connected",
    "resize_prediction",
    "CocoStuffAccumulator",
    "COCO_NUM_CLASSES",
    "COCO_THING_CLASSES",
    "COCO_STUFF_CLASSES",
]

COCO_NUM_CLASSES = 27
# COCO-Stuff's 91 thing classes fold into coarse classes 0-11, its 91 stuff classes into
# 12-26 (PiCIE, data/coco_eval_dataset.py; STEGO, src/data.py: first_stuff_index = 12).
COCO_THING_CLASSES = tuple(range(12))
COCO_STUFF_CLASSES = tuple(range(12, 27))


def _as_label_map(a, name: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D label map, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        if np.issubdtype(arr.dtype, np.floating) and np.all(np.mod(arr, 1) == 0):
            arr = arr.astype(np.int64)  # integral floats, e.g. labels read from CSV
        else:
            raise ValueError(f"{name}: expected integer labels, got dtype {arr.dtype}")
    return arr


def _ignore_values(ignore) -> np.ndarray:
    if ignore is None:
        return np.zeros(0, np.int64)
    if isinstance(ignore, (set, frozenset)):
        ignore = sorted(ignore)
    return np.atleast_1d(np.asarray(ignore, dtype=np.int64))


def _compact(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct values, index of each element into them), like np.unique.

    For non-negative labels with a modest maximum (the usual case: cluster ids, segment
    numbers) a bincount presence table replaces np.unique's O(n log n) argsort, which is
    the dominant cost of scoring a BSDS image otherwise.
    """
    if values.size and np.issubdtype(values.dtype, np.integer):
        lo, hi = int(values.min()), int(values.max())
        if lo >= 0 and hi <= max(1 << 16, values.size):
            present = np.bincount(values, minlength=hi + 1) > 0
            lut = np.cumsum(present) - 1
            return np.flatnonzero(present).astype(values.dtype), lut[values]
    labels, idx = np.unique(values, return_inverse=True)
    return labels, idx.ravel()


def contingency(pred, gt, ignore=None, return_labels: bool = False):
    """Pixel counts of every (ground-truth label, predicted label) pair.

    Labels are first compacted to 0..G-1 and 0..P-1 (so arbitrary, large or negative label
    ids cost nothing); the matrix is then one ``np.bincount`` over ``g * P + p``.

    Args:
      pred: (H, W) integer predicted labels.
      gt: (H, W) integer ground-truth labels, same shape as ``pred``.
      ignore: a ground-truth label or a sequence of them whose pixels are left out
        (e.g. 255 for VOC void); ``None`` keeps every pixel.
      return_labels: also return the label values of the rows and columns.

    Returns:
      ``counts`` (G, P) int64, rows = ground-truth labels present on scored pixels,
      columns = predicted labels present on scored pixels, both in increasing order; with
      ``return_labels``, the tuple ``(counts, gt_labels, pred_labels)``.
    """
    pred = _as_label_map(pred, "pred")
    gt = _as_label_map(gt, "gt")
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth {gt.shape}; "
                         f"use resize_prediction first")
    p = pred.ravel()
    g = gt.ravel()
    ign = _ignore_values(ignore)
    if ign.size:
        keep = ~np.isin(g, ign)
        p, g = p[keep], g[keep]
    g_labels, g_idx = _compact(g)
    p_labels, p_idx = _compact(p)
    n_g, n_p = g_labels.size, p_labels.size
    counts = np.bincount(g_idx.astype(np.int64) * n_p + p_idx, minlength=n_g * n_p).reshape(n_g, n_p)
    if return_labels:
        return counts, g_labels, p_labels
    return counts


def iou_matrix(counts: np.ndarray) -> np.ndarray:
    """IoU of every (ground-truth, predicted) label pair from a contingency matrix.

    IoU = |g & p| / (|g| + |p| - |g & p|) (Jaccard index), with the areas the row and
    column sums, i.e. measured on scored pixels only.

    Args:
      counts: (G, P) contingency matrix as returned by :func:`contingency`.

    Returns:
      (G, P) float64 IoUs; 0 where a pair does not overlap.
    """
    counts = np.asarray(counts, np.float64)
    union = counts.sum(1, keepdims=True) + counts.sum(0, keepdims=True) - counts
    # Every row and column of a compacted contingency matrix has a positive sum, so the
    # union is > 0; the guard only protects hand-made matrices with empty rows/columns.
    return np.divide(counts, union, out=np.zeros_like(counts), where=union > 0)


def best_overlap_ious(pred, gt, ignore_labels: Iterable[int] = ()) -> np.ndarray:
    """For every ground-truth segment, its IoU with the best-matching predicted label.

    This is the per-segment score of the BSDS500 / VOC protocol (DynaSeg
    ``tools/calculate_mIOU.py``): ``max_p IoU(g, p)``; several segments may pick the same
    predicted label.

    Args:
      pred: (H, W) integer predicted labels.
      gt: (H, W) integer ground-truth segment labels.
      ignore_labels: ground-truth values that are not segments (their pixels are dropped).

    Returns:
      float64 array with one IoU per ground-truth segment present, in increasing label order
      (empty when every pixel is ignored).
    """
    counts = contingency(pred, gt, ignore=tuple(ignore_labels) or None)
    if counts.size == 0:
        return np.zeros(0, np.float64)
    return iou_matrix(counts).max(axis=1)


def relabel_connected(pred, connectivity: int = 4) -> np.ndarray:
    """Splits every predicted label into its spatially connected components.

    Unsupervised labels are cluster ids, so one id may cover several separate regions; the
    BSDS protocol's authors advise scoring connected regions instead. Each label value is
    labelled with ``scipy.ndimage.label`` inside its own bounding box (found for all labels
    at once by ``ndimage.find_objects``), so the cost is the sum of the boxes' areas.

    Args:
      pred: (H, W) integer labels.
      connectivity: 4 (edge neighbours, scipy's default) or 8 (edges and corners).

    Returns:
      (H, W) int32 labels 0..N-1, one per connected component.
    """
    pred = _as_label_map(pred, "pred")
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    structure = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    _, compact = np.unique(pred, return_inverse=True)
    compact = compact.reshape(pred.shape).astype(np.int32)
    out = np.empty(pred.shape, np.int32)
    offset = 0
    # A loop over label values (not pixels): each iteration touches only its bounding box.
    for value, box in enumerate(ndimage.find_objects(compact + 1)):
        if box is None:
            continue
        mask = compact[box] == value
        comp, n = ndimage.label(mask, structure=structure)
        region = out[box]
        region[mask] = comp[mask] + (offset - 1)
        offset += n
    return out


def bsds_image_ious(pred, annotations: Sequence, connected: bool = False,
                    ignore_labels: Iterable[int] = ()) -> list[np.ndarray]:
    """Per-segment best-overlap IoUs of one prediction against each of its annotations.

    Args:
      pred: (H, W) integer predicted labels.
      annotations: the image's human segmentations, each (H, W) integer.
      connected: relabel the prediction into connected components first.
      ignore_labels: ground-truth values that are not segments.

    Returns:
      One IoU array per annotation (see :func:`best_overlap_ious`).
    """
    if connected:
        pred = relabel_connected(pred)
    return [best_overlap_ious(pred, ann, ignore_labels) for ann in annotations]


def bsds_scores(per_image: Sequence[Sequence[np.ndarray]]) -> dict:
    """BSDS500 ``all`` / ``fine`` / ``coarse`` / ``mean`` scores from per-segment IoUs.

    ``fine`` takes, per image, the annotation with the most segments and ``coarse`` the one
    with the fewest (ties: the first, as ``np.argmax`` in the reference script). Each score
    pools the segments of the chosen annotations of all images and averages them (a mean
    over segments, not over images); ``mean`` is the average of the three scores.

    Args:
      per_image: for each image, one IoU array per annotation (:func:`bsds_image_ious`).

    Returns:
      dict with float ``all``, ``fine``, ``coarse``, ``mean`` (NaN when nothing was scored)
      and the pooled segment counts ``segments_all``, ``segments_fine``, ``segments_coarse``.
    """
    pools: dict[str, list[np.ndarray]] = {"all": [], "fine": [], "coarse": []}
    for anns in per_image:
        anns = [np.asarray(a, np.float64).ravel() for a in anns]
        if not anns:
            continue
        sizes = np.array([a.size for a in anns])
        pools["all"].extend(anns)
        pools["fine"].append(anns[int(np.argmax(sizes))])
        pools["coarse"].append(anns[int(np.argmin(sizes))])
    out: dict = {}
    for mode, arrays in pools.items():
        pooled = np.concatenate(arrays) if arrays else np.zeros(0)
        out[mode] = float(pooled.mean()) if pooled.size else float("nan")
        out[f"segments_{mode}"] = int(pooled.size)
    out["mean"] = (out["all"] + out["fine"] + out["coarse"]) / 3.0
    return out


def bootstrap_interval(per_image: Sequence, other: Sequence | None = None, score: str = "all",
                       n_resamples: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of a BSDS score over images (resampled with
    replacement, the pooled score recomputed each time).

    Args:
      per_image: per image, one IoU array per annotation (as for :func:`bsds_scores`).
      other: the same for a second method on the same images: the interval is then of
        the paired difference ``score(per_image) - score(other)`` (one resample of the
        images for both), so it excludes 0 when the two differ beyond image sampling.
      score: which of :func:`bsds_scores`' pooled scores ("all", "fine", "coarse").
      n_resamples: bootstrap resamples.
      level: the interval's coverage.
      seed: the resampling seed.

    Returns:
      (low, high): the (1 - level)/2 and (1 + level)/2 quantiles (lower and higher
      order statistics, no interpolation).
    """
    n = len(per_image)
    if other is not None and len(other) != n:
        raise ValueError(f"paired bootstrap over {n} and {len(other)} images: the same images are needed")
    rng = np.random.default_rng(seed)
    values = np.empty(n_resamples)
    for b in range(n_resamples):
        idx = rng.integers(0, n, n)
        values[b] = bsds_scores([per_image[i] for i in idx])[score]
        if other is not None:
            values[b] -= bsds_scores([other[i] for i in idx])[score]
    alpha = (1.0 - level) / 2.0
    return (float(np.quantile(values, alpha, method="lower")),
            float(np.quantile(values, 1.0 - alpha, method="higher")))


def hungarian_miou(pred, gt, ignore=None) -> float:
    """Per-image mIoU under the best one-to-one matching of predicted labels to classes.

    The matching maximises the summed IoU (``linear_sum_assignment`` accepts the
    rectangular G x P matrix: with more predicted labels than classes the surplus labels
    stay unmatched, with fewer the surplus classes do). Every ground-truth class present
    counts in the mean; an unmatched one scores 0.

    Args:
      pred: (H, W) integer predicted labels.
      gt: (H, W) integer ground-truth labels.
      ignore: ground-truth value(s) left out (e.g. 255).

    Returns:
      The mean IoU over the ground-truth classes present; NaN if every pixel is ignored.
    """
    counts = contingency(pred, gt, ignore=ignore)
    if counts.size == 0:
        return float("nan")
    iou = iou_matrix(counts)
    rows, cols = linear_sum_assignment(iou, maximize=True)
    per_class = np.zeros(iou.shape[0])
    per_class[rows] = iou[rows, cols]
    return float(per_class.mean())


def overlap_scores(pred, gt, ignore=None) -> tuple[np.ndarray, float]:
    """Best-overlap IoUs and Hungarian mIoU from one shared contingency matrix.

    Equivalent to ``(best_overlap_ious(pred, gt, ignore), hungarian_miou(pred, gt, ignore))``
    at half the cost; the evaluation loop reports both for every annotation.

    Args:
      pred: (H, W) integer predicted labels.
      gt: (H, W) integer ground-truth labels.
      ignore: ground-truth value(s) left out.

    Returns:
      (per-segment IoUs, mIoU); an empty array and NaN when every pixel is ignored.
    """
    counts = contingency(pred, gt, ignore=ignore)
    if counts.size == 0:
        return np.zeros(0, np.float64), float("nan")
    iou = iou_matrix(counts)
    rows, cols = linear_sum_assignment(iou, maximize=True)
    return iou.max(axis=1), float(iou[rows, cols].sum() / iou.shape[0])


def _transposed(pred_shape, shape, tol: float = 0.02) -> bool:
    (ph, pw), (h, w) = pred_shape, shape
    if h == w or ph == pw:
        return False
    if (ph, pw) == (w, h):
        return True
    # A rescaled transposed prediction: the orientation flips and the aspect ratio equals
    # the transposed one (within tol) but not the right one.
    flipped = (ph > pw) != (h > w)
    return flipped and abs(ph / pw - w / h) <= tol * (w / h) and abs(ph / pw - h / w) > tol * (h / w)


def resize_prediction(pred, shape) -> np.ndarray:
    """Nearest-neighbour resize of a label map to the ground truth's (H, W).

    The source index of output row i is ``floor((i + 0.5) * H_in / H_out)`` (pixel centres
    aligned, as PIL's NEAREST and OpenCV's INTER_NEAREST_EXACT), likewise for columns; labels
    are never blended.

    Args:
      pred: (h, w) integer labels.
      shape: target (H, W).

    Returns:
      (H, W) labels, the input itself when the shapes already match.

    Raises:
      ValueError: the prediction is the transpose of the target (H, W) != (W, H) (or a
        rescaled transpose): an image was read rotated, e.g. by width/height confusion.
    """
    pred = _as_label_map(pred, "pred")
    h, w = (int(s) for s in shape)
    if pred.shape == (h, w):
        return pred
    if _transposed(pred.shape, (h, w)):
        raise ValueError(f"prediction of shape {pred.shape} is transposed with respect to the ground "
                         f"truth {(h, w)} (height and width swapped); fix how it was written")
    rows = np.minimum(((np.arange(h) + 0.5) * (pred.shape[0] / h)).astype(np.int64), pred.shape[0] - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * (pred.shape[1] / w)).astype(np.int64), pred.shape[1] - 1)
    return pred[np.ix_(rows, cols)]


class CocoStuffAccumulator:
    """Dataset-level COCO-Stuff-27 scores with per-image Hungarian cluster matching.

    Per image, the clusters are matched one-to-one to the classes present in its ground
    truth so that the matched pixel count is maximal (Hungarian assignment on the image's
    rectangular confusion matrix). Matched clusters take their class; pixels of unmatched
    clusters get no class and count as errors (a false negative of their true class, no
    false positive anywhere). The mapped pixels accumulate into one confusion matrix
    ``conf[true, predicted]`` with an extra last column for "no class".

    Example::

        acc = CocoStuffAccumulator()
        for pred, gt in pairs:
            acc.add(pred, gt)
        scores = acc.result()
    """

    def __init__(self, num_classes: int = COCO_NUM_CLASSES, ignore: int = 255,
                 thing_classes: Sequence[int] = COCO_THING_CLASSES,
                 stuff_classes: Sequence[int] = COCO_STUFF_CLASSES):
        """Args:
          num_classes: number of ground-truth classes (27).
          ignore: ground-truth value of unlabelled pixels.
          thing_classes, stuff_classes: class ids of the two reported subsets.
        """
        self.num_classes = int(num_classes)
        self.ignore = int(ignore)
        self.thing_classes = tuple(thing_classes)
        self.stuff_classes = tuple(stuff_classes)
        self.confusion = np.zeros((self.num_classes, self.num_classes + 1), np.int64)
        self.images = 0

    def add(self, pred, gt) -> None:
        """Matches one image's clusters to its classes and accumulates its pixels.

        Args:
          pred: (H, W) integer cluster ids (any values).
          gt: (H, W) coarse class ids 0..num_classes-1, or ``ignore``.
        """
        counts, g_labels, p_labels = contingency(pred, gt, ignore=self.ignore, return_labels=True)
        if g_labels.size and (g_labels.min() < 0 or g_labels.max() >= self.num_classes):
            bad = g_labels[(g_labels < 0) | (g_labels >= self.num_classes)]
            raise ValueError(f"ground truth has labels {bad.tolist()} outside 0..{self.num_classes - 1} "
                             f"and the ignore value {self.ignore}")
        self.images += 1
        if counts.size == 0:
            return
        rows, cols = linear_sum_assignment(counts, maximize=True)
        # cluster (column) -> class id, or num_classes ("no class") when unmatched
        mapped = np.full(p_labels.size, self.num_classes, np.int64)
        mapped[cols] = g_labels[rows]
        true = np.repeat(g_labels.astype(np.int64), p_labels.size)
        predicted = np.tile(mapped, g_labels.size)
        np.add.at(self.confusion, (true, predicted), counts.ravel())

    def result(self) -> dict:
        """Scores of everything added so far.

        Returns:
          dict with ``miou``, ``things``, ``stuff`` (means over the classes that occurred in
          the ground truth; NaN if none did), ``pixel_accuracy``, ``per_class_iou`` (list,
          NaN for classes never seen), ``images`` and ``pixels``.
        """
        conf = self.confusion
        tp = np.diag(conf[:, : self.num_classes]).astype(np.float64)
        gt_area = conf.sum(axis=1).astype(np.float64)
        pred_area = conf[:, : self.num_classes].sum(axis=0).astype(np.float64)
        union = gt_area + pred_area - tp
        iou = np.full(self.num_classes, np.nan)
        np.divide(tp, union, out=iou, where=union > 0)

        def mean(classes) -> float:
            vals = iou[list(classes)]
            vals = vals[~np.isnan(vals)]
            return float(vals.mean()) if vals.size else float("nan")

        total = conf.sum()
        return {
            "miou": mean(range(self.num_classes)),
            "things": mean(self.thing_classes),
            "stuff": mean(self.stuff_classes),
            "pixel_accuracy": float(tp.sum() / total) if total else float("nan"),
            "per_class_iou": [float(v) for v in iou],
            "images": int(self.images),
            "pixels": int(total),
        }
