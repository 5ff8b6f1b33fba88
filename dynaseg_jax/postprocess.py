"""Clean-up of a finished label map on the host (docs/algorithm.md section 6).

DynaSeg's labels are cluster ids: one id may cover several separate regions, and the
optimisation leaves many tiny regions (a few pixels of a cluster inside another). Three
steps, each optional (``[postprocess]`` in the config), in this order:

* ``superpixel_vote``: every superpixel of the image (``[superpixels]``, the targets'
  superpixels, or computed here as for them) takes its most frequent label;
* ``connected``: every 4-connected region of a cluster gets its own label;
* ``min_region``: regions smaller than that fraction of the image are merged, smallest
  first, into the adjacent region whose mean colour is closest (Euclidean, in the RGB of
  the image the network saw), as region-merging segmenters do (e.g. Felzenszwalb and
  Huttenlocher's minimum-size pass, here by colour instead of edge weight).
"""
from __future__ import annotations

import heapq
import math

import numpy as np

from .images import renumber
from .metrics import relabel_connected

__all__ = ["region_adjacency", "merge_small_regions", "postprocess"]


def region_adjacency(regions: np.ndarray) -> list[set]:
    """The 4-neighbour adjacency of a label map: ``neighbours[i]`` = labels touching i."""
    n = int(regions.max()) + 1
    pairs = [np.stack([regions[:, :-1].ravel(), regions[:, 1:].ravel()], 1),
             np.stack([regions[:-1, :].ravel(), regions[1:, :].ravel()], 1)]
    pairs = np.concatenate(pairs)
    pairs = np.unique(pairs[pairs[:, 0] != pairs[:, 1]], axis=0)
    neighbours = [set() for _ in range(n)]
    for a, b in pairs.tolist():
        neighbours[a].add(b)
        neighbours[b].add(a)
    return neighbours


def merge_small_regions(regions: np.ndarray, image: np.ndarray, min_pixels: int) -> np.ndarray:
    """Merges every region of fewer than ``min_pixels`` pixels into a neighbour.

    The smallest region goes first (ties: the lower label); it joins the adjacent region
    with the closest mean colour (ties: the lower label), the merged region's size and
    mean are updated, and the loop goes on until no region is below ``min_pixels`` or
    only one region is left.

    Args:
      regions: (H, W) labels 0..N-1, each a connected region (``relabel_connected``).
      image: (H, W, C) float image, the colours compared.
      min_pixels: the smallest region kept as it is.

    Returns:
      (H, W) int32 labels 0..M-1 (M <= N), in the order of the surviving regions' labels.
    """
    regions = np.asarray(regions)
    n = int(regions.max()) + 1
    flat = regions.ravel()
    sizes = np.bincount(flat, minlength=n).astype(np.int64)
    colours = image.reshape(-1, image.shape[-1]).astype(np.float64)
    sums = np.stack([np.bincount(flat, colours[:, c], minlength=n) for c in range(colours.shape[1])], 1)
    neighbours = region_adjacency(regions)
    parent = np.arange(n)
    heap = [(int(sizes[i]), i) for i in range(n) if 0 < sizes[i] < min_pixels]
    heapq.heapify(heap)
    while heap:
        size, i = heapq.heappop(heap)
        if parent[i] != i or sizes[i] != size or not neighbours[i]:
            continue  # merged away, grown since it was pushed, or the whole image
        mean = sums[i] / size
        j = min(sorted(neighbours[i]), key=lambda k: float(np.sum((sums[k] / sizes[k] - mean) ** 2)))
        parent[i] = j
        sizes[j] += sizes[i]
        sums[j] += sums[i]
        for k in neighbours[i]:
            neighbours[k].discard(i)
            if k != j:
                neighbours[k].add(j)
                neighbours[j].add(k)
        neighbours[i] = set()
        if sizes[j] < min_pixels:
            heapq.heappush(heap, (int(sizes[j]), j))
    root = parent.copy()  # parents point at regions alive when merged: follow to the end
    while True:
        nxt = root[root]
        if np.array_equal(nxt, root):
            break
        root = nxt
    return renumber(root[regions])


def postprocess(labels: np.ndarray, image: np.ndarray, config, segments: np.ndarray | None = None) -> np.ndarray:
    """Applies a config's ``[postprocess]`` to a label map of ``image``'s size.

    Args:
      labels: (H, W) integer labels.
      image: (H, W, 3) float RGB, the image the labels belong to.
      config: a Config (its ``postprocess`` section).
      segments: the image's superpixels, ``superpixel_map(image, config)``, where already
        computed (for the targets); computed here otherwise.

    Returns:
      (H, W) int32 labels: unchanged (as int32) when every step is off.
    """
    post = config.postprocess
    labels = np.asarray(labels, np.int32)
    if post.superpixel_vote:
        from .superpixels import majority_labels, superpixel_map
        labels = majority_labels(labels, superpixel_map(image, config) if segments is None else segments)
    if not post.connected:
        return labels
    regions = relabel_connected(labels)
    if post.min_region > 0:
        min_pixels = math.ceil(post.min_region * labels.size)
        regions = merge_small_regions(regions, image, min_pixels)
    return regions
