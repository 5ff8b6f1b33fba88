"""The silhouette phase (docs/algorithm.md section 2): pick k* per image before optimising it.

At iteration 0, take per-pixel features, draw a seeded sample of pixels, run k-means
for each k in a range and keep the k with the best scikit-learn silhouette score.
k* then replaces the fixed stopping threshold k_min. Runs on the host (the engine
calls it from its loader threads, so it overlaps with device work on other images).
"""
from __future__ import annotations

import numpy as np


def color_position_features(image: np.ndarray, position_scale: float = 1.0) -> np.ndarray:
    """(H*W, 5) features: RGB in [0, 1] and (y, x) normalised to [0, 1] times a scale."""
    h, w, _ = image.shape
    yy, xx = np.meshgrid(np.linspace(0.0, 1.0, h), np.linspace(0.0, 1.0, w), indexing="ij")
    pos = np.stack([yy, xx], axis=-1) * position_scale
    return np.concatenate([image, pos], axis=-1).reshape(h * w, -1).astype(np.float32)


def estimate_k(features: np.ndarray, k_range=(2, 12), n_samples: int = 3000,
               seed: int = 0, n_init: int = 3, dims: int = 0) -> tuple[int, dict]:
    """k* = argmax over k of the silhouette score of k-means on a pixel sample.

    Args:
      features: (N, D) per-pixel features.
      k_range: inclusive (low, high) range of k; values above the number of distinct
        sampled points are skipped.
      n_samples: pixels drawn (without replacement, seeded) for k-means and scoring.
      seed: seeds both the sample and k-means.
      n_init: k-means restarts per k (the best inertia is kept).
      dims: > 0 and < D: the sample is first projected on its ``dims`` principal
        directions (centred SVD), so that k-means and the silhouette's distances cost
        less; 0 keeps every feature.

    Returns:
      (k*, {k: silhouette score}). Falls back to the lowest k when no k can be scored
      (e.g. a flat image).
    """
    return kstar_of_sample(pixel_sample(features, n_samples, seed), k_range, seed, n_init, dims)


def pixel_sample(features: np.ndarray, n_samples: int, seed: int) -> np.ndarray:
    """The seeded sample of ``estimate_k``: ``n_samples`` rows of ``features`` drawn
    without replacement (all of them when there are fewer), as float64."""
    rng = np.random.default_rng(seed)
    n = features.shape[0]
    idx = rng.choice(n, size=min(n_samples, n), replace=False)
    return np.asarray(features[idx], np.float64)


def kstar_of_sample(sample: np.ndarray, k_range=(2, 12), seed: int = 0, n_init: int = 3,
                    dims: int = 0, threads: int | None = None) -> tuple[int, dict]:
    """``estimate_k`` on an already drawn sample (``pixel_sample``): the part worth running
    in another process, since its input is small and its cost is k-means and the
    silhouette's pairwise distances. Arguments and result as ``estimate_k``'s; ``threads``
    caps the OpenMP and BLAS threads of this call (None: their defaults, every core), so
    that several processes share the cores instead of each using all of them."""
    if threads is not None:
        from threadpoolctl import threadpool_limits  # a scikit-learn dependency

        with threadpool_limits(limits=threads):
            return kstar_of_sample(sample, k_range, seed, n_init, dims)
    # scikit-learn takes ~1 s to import: only runs that use the silhouette phase pay it.
    from sklearn.cluster import KMeans

    if 0 < dims < sample.shape[1]:
        centred = sample - sample.mean(axis=0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        sample = centred @ vt[:dims].T
    lo, hi = k_range
    n_distinct = len(np.unique(sample, axis=0))
    labelings = {}
    for k in range(lo, hi + 1):
        if k >= n_distinct:
            break
        labels = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(sample)
        if len(np.unique(labels)) >= 2:
            labelings[k] = labels
    if not labelings:
        return lo, {}
    scores = dict(zip(labelings, silhouette_scores(sample, list(labelings.values()))))
    return max(scores, key=scores.get), scores


def silhouette_scores(sample: np.ndarray, labelings: list[np.ndarray]) -> list[float]:
    """scikit-learn's ``silhouette_score`` (Euclidean) of each labeling of ``sample``, with
    the pairwise distances computed once for all of them instead of once per labeling.

    Per point i of cluster c (Rousseeuw 1987): a_i is its mean distance to the other
    points of c, b_i its least mean distance to the points of another cluster,
    s_i = (b_i - a_i) / max(a_i, b_i), and 0 in a cluster of one point. The distance sums
    to every cluster are one matmul of the distance matrix with the labels' one-hot
    matrix. Equal to scikit-learn's up to the order of those float64 sums.
    """
    from sklearn.metrics import pairwise_distances

    distances = pairwise_distances(sample)  # the Euclidean distances silhouette_score uses
    rows = np.arange(len(sample))
    scores = []
    for labels in labelings:
        _, labels = np.unique(labels, return_inverse=True)  # clusters 0..k-1, as LabelEncoder
        counts = np.bincount(labels)
        sums = distances @ np.eye(len(counts))[labels]  # (n, k): summed distance to each cluster
        with np.errstate(divide="ignore", invalid="ignore"):
            a = sums[rows, labels] / (counts[labels] - 1)  # 0 / 0 in a cluster of one point
            sums[rows, labels] = np.inf
            b = (sums / counts).min(axis=1)
            s = (b - a) / np.maximum(a, b)
        scores.append(float(np.nan_to_num(s).mean()))  # NaN (one-point cluster) -> 0
    return scores
