"""Superpixel-constrained targets (Kanezaki, "Unsupervised image segmentation by
backpropagation", ICASSP 2018; docs/algorithm.md section 6.5).

Before the optimisation, each image is cut into superpixels on the host (scikit-image's
Felzenszwalb or SLIC, the ``superpixels`` extra). In every update the target of the
similarity loss is then no longer the argmax label of each pixel but the most frequent
argmax label of its superpixel (ties: the lower label), so the targets follow the
superpixels' edges. q' and the final labels are still the argmax labels.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .config import Config, ConfigError

__all__ = ["check_available", "felzenszwalb_params", "superpixel_map", "majority_targets", "majority_labels"]


def check_available(config: Config) -> None:
    """Raises ConfigError, with the install command, when the config asks for
    superpixels and scikit-image is missing."""
    if config.superpixels.method == "none":
        return
    try:
        import skimage.segmentation  # noqa: F401
    except ImportError:
        raise ConfigError(f"superpixels.method = {config.superpixels.method!r} needs scikit-image: "
                          f"pip install 'dynaseg_jax[superpixels]'") from None


# How Felzenszwalb's merge threshold ``scale`` and ``sigma`` follow an image's area A
# against superpixels.reference_pixels R: times (A / R) ** FELZENSZWALB_AREA_POWER.
# Geometry alone would say A / R for the threshold (an area) and sqrt(A / R) for sigma (a
# length), but neighbouring pixels of a larger image differ less, so its regions merge
# more easily: that rule gave 0.31x (2x the side) and 0.11x (4x) the superpixels of
# BSDS500 train at scale 0.25, while the power 1/4 for both gave 1.04x and 0.98x, and 0.81x
# at half the side (geometric means over 24 train images, no ground truth used;
# benchmarks/results/superpixel_size_rule_train24.json).
FELZENSZWALB_AREA_POWER = 0.25


def felzenszwalb_params(height: int, width: int, config: Config) -> dict:
    """The Felzenszwalb parameters an image of ``height`` x ``width`` pixels gets.

    With ``superpixels.reference_pixels`` = R > 0, the configured parameters are for an
    image of R pixels, and an image of A pixels gets about as many superpixels:
    ``min_size`` (an area) times A / R, ``scale`` and ``sigma`` times (A / R) ** (1/4)
    (``FELZENSZWALB_AREA_POWER``, measured). With R = 0 they apply as given.

    Args:
      height, width: the image's size as the network sees it.
      config: a Config (its ``superpixels`` section).

    Returns:
      ``scale``, ``sigma`` and ``min_size`` (>= 1) for ``skimage.segmentation.felzenszwalb``.
    """
    sp = config.superpixels
    ratio = height * width / sp.reference_pixels if sp.reference_pixels > 0 else 1.0
    grow = ratio ** FELZENSZWALB_AREA_POWER
    return {"scale": sp.scale * grow, "sigma": sp.sigma * grow, "min_size": max(1, round(sp.min_size * ratio))}


def superpixel_map(image: np.ndarray, config: Config) -> np.ndarray | None:
    """An image's superpixels as int32 ids 0..S-1, or None when ``method`` is 'none'.

    Args:
      image: (H, W, 3) float RGB in [0, 1], the image as the network sees it.
      config: a Config (its ``superpixels`` section).

    Raises:
      ValueError: more than ``superpixels.max_segments`` superpixels.
    """
    sp = config.superpixels
    if sp.method == "none":
        return None
    from skimage import segmentation

    if sp.method == "felzenszwalb":
        segments = segmentation.felzenszwalb(image, channel_axis=-1, **felzenszwalb_params(*image.shape[:2], config))
    else:
        segments = segmentation.slic(image, n_segments=sp.n_segments, compactness=sp.compactness,
                                     start_label=0, channel_axis=-1)
    _, segments = np.unique(segments, return_inverse=True)  # ids 0..S-1, none skipped
    segments = segments.reshape(image.shape[:2]).astype(np.int32)
    count = int(segments.max()) + 1
    if count > sp.max_segments:
        raise ValueError(f"{count} superpixels, more than superpixels.max_segments = {sp.max_segments} "
                         f"(raise it, or make the superpixels larger)")
    return segments


def majority_targets(labels: jax.Array, segments: jax.Array, mask: jax.Array, n_segments: int,
                     n_labels: int) -> jax.Array:
    """Each pixel's target: the most frequent label among the real pixels of its
    superpixel (ties: the lower label).

    Args:
      labels: (H, W) int32 argmax labels, in [0, n_labels).
      segments: (H, W) int32 superpixel ids, in [0, n_segments).
      mask: (H, W), 1 on real pixels (padding neither votes nor matters).
      n_segments: a static bound on the ids (``superpixels.max_segments``).
      n_labels: q.

    Returns:
      (H, W) int32 targets.
    """
    votes = jax.ops.segment_sum(mask.reshape(-1).astype(jnp.int32),
                                (segments * n_labels + labels).reshape(-1),
                                num_segments=n_segments * n_labels)
    winner = jnp.argmax(votes.reshape(n_segments, n_labels), axis=-1).astype(jnp.int32)
    return winner[segments]


def majority_labels(labels: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """``majority_targets`` on the host, for a finished label map
    (``postprocess.superpixel_vote``): every pixel gets the most frequent label of its
    superpixel (ties: the lower label).

    Args:
      labels: (H, W) integer labels >= 0.
      segments: (H, W) superpixel ids 0..S-1 (``superpixel_map``).

    Returns:
      (H, W) int32 labels, constant in each superpixel.
    """
    labels = np.asarray(labels, np.int64)
    n_labels, n_segments = int(labels.max()) + 1, int(segments.max()) + 1
    votes = np.bincount((segments.astype(np.int64) * n_labels + labels).ravel(), minlength=n_segments * n_labels)
    return votes.reshape(n_segments, n_labels).argmax(axis=1).astype(np.int32)[segments]
