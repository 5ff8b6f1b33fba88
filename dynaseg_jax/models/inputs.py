"""What the CNN's first layer sees: the image in a colour space, optionally with its
pixel positions (docs/algorithm.md section 6.6)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

INPUT_SPACES = ("rgb", "lab")

# sRGB (D65) -> CIE XYZ, IEC 61966-2-1; the D65 white point (Xn, Yn, Zn).
_SRGB_TO_XYZ = ((0.412453, 0.357580, 0.180423),
                (0.212671, 0.715160, 0.072169),
                (0.019334, 0.119193, 0.950227))
_WHITE = (0.95047, 1.0, 1.08883)


def rgb_to_lab(image: jax.Array) -> jax.Array:
    """sRGB in [0, 1] -> CIE L*a*b* (D65), scaled to L/100, a/128, b/128 (about [-1, 1]).

    The formulas and constants of scikit-image's ``rgb2lab`` (sRGB gamma, the matrix
    above, the D65 white, the CIE f(t) with its linear segment), so the two agree to
    float rounding.
    """
    linear = jnp.where(image > 0.04045, ((image + 0.055) / 1.055) ** 2.4, image / 12.92)
    xyz = linear @ jnp.asarray(_SRGB_TO_XYZ, image.dtype).T / jnp.asarray(_WHITE, image.dtype)
    # CIE's rounded constants, as scikit-image uses them: (6/29)^3 ~ 0.008856, 1/(3 (6/29)^2) ~ 7.787.
    f = jnp.where(xyz > 0.008856, jnp.cbrt(jnp.maximum(xyz, 0.008856)), 7.787 * xyz + 16.0 / 116.0)
    fx, fy, fz = f[..., 0], f[..., 1], f[..., 2]
    lab = jnp.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], axis=-1)
    return lab / jnp.asarray((100.0, 128.0, 128.0), image.dtype)


def position_channels(mask: jax.Array, weight: float, dtype=jnp.float32) -> jax.Array:
    """(H, W, 2): row and column of each pixel, 0 at the first and ``weight`` at the last
    real row/column of the image (``mask``, a top-left rectangle in its bucket)."""
    h = jnp.sum(jnp.any(mask, axis=1))
    w = jnp.sum(jnp.any(mask, axis=0))
    rows = jnp.arange(mask.shape[0], dtype=dtype) / jnp.maximum(h - 1, 1).astype(dtype)
    cols = jnp.arange(mask.shape[1], dtype=dtype) / jnp.maximum(w - 1, 1).astype(dtype)
    yy, xx = jnp.meshgrid(rows, cols, indexing="ij")
    return jnp.stack([yy, xx], axis=-1) * weight


def encode_input(image: jax.Array, mask: jax.Array, space: str = "rgb", position: float = 0.0) -> jax.Array:
    """The network's input: ``image`` in ``space``, with position channels when
    ``position`` > 0 (3 or 5 channels)."""
    x = rgb_to_lab(image) if space == "lab" else image
    if position > 0:
        x = jnp.concatenate([x, position_channels(mask, position, x.dtype)], axis=-1)
    return x
