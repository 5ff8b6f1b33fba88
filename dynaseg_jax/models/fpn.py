"""The FPN decoder shared by the trunk models (docs/algorithm.md section 3.1), and the
resampling helpers of strided networks under bucket padding.

The decoder: a lateral 1x1 conv (bias) to p channels on each of C2..C5, top-down x2
nearest upsampling and addition, a 3x3 smoothing conv (padding 1, bias) on the
stride-4 map, that map upsampled bilinearly by the fixed factor 4 (align_corners=False)
and cropped to the image, then the classifier 1x1 + BatchNorm of section 1.

Bucket padding stays exact (the image's real part is a top-left rectangle given by the
mask; every map is zero beyond it): a stride-s map's mask is the image mask subsampled
(``mask[::s, ::s]``: ceil(n / s) real rows, as torch and TF "SAME" compute them), the
top-down x2 upsampling repeats each position (index i // 2), independent of the bucket,
and the bilinear upsampling clamps its source indices at the last real row and column,
as torch clamps at the border of the unpadded map.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .layers import MaskedBatchNorm, TorchConv


def subsample(mask: jax.Array, stride: int) -> jax.Array:
    """The mask of a stride-``stride`` map: real where the window's centre pixel is."""
    return mask[::stride, ::stride]



def upsample_nearest_2x(x: jax.Array) -> jax.Array:
    return jnp.repeat(jnp.repeat(x, 2, axis=0), 2, axis=1)


def _bilinear_taps(n_out: int, factor: int, n_real: jax.Array):
    """Source rows and weights of torch's bilinear upsampling (align_corners=False) by a
    fixed factor, clamped at the last real row ``n_real - 1`` (torch clamps at the border
    of the unpadded map)."""
    src = (np.arange(n_out) + 0.5) / factor - 0.5
    src = np.maximum(src, 0.0)
    i0 = np.floor(src).astype(np.int32)
    frac = jnp.asarray((src - i0).astype(np.float32))
    last = n_real - 1
    lo = jnp.minimum(jnp.asarray(i0), last)
    hi = jnp.minimum(jnp.asarray(i0 + 1), last)
    return lo, hi, frac


def upsample_bilinear(x: jax.Array, factor: int, mask: jax.Array) -> jax.Array:
    """Bilinear x``factor`` (torch ``interpolate(..., mode='bilinear', align_corners=False)``)
    of the real part of ``x`` (a top-left rectangle given by ``mask``), padded size kept."""
    n_rows = jnp.sum(mask[:, 0]).astype(jnp.int32)
    n_cols = jnp.sum(mask[0, :]).astype(jnp.int32)
    h, w, _ = x.shape
    lo, hi, f = _bilinear_taps(h * factor, factor, jnp.maximum(n_rows, 1))
    x = x[lo] * (1 - f)[:, None, None] + x[hi] * f[:, None, None]
    lo, hi, f = _bilinear_taps(w * factor, factor, jnp.maximum(n_cols, 1))
    return x[:, lo] * (1 - f)[None, :, None] + x[:, hi] * f[None, :, None]


class TrunkFPN(nn.Module):
    """A stride-4..32 trunk + FPN + classifier: ``(image, mask) -> r' (H, W, q)``.

    A subclass names its trunk in ``make_trunk``: a module ``(image, mask) -> [C2, C3,
    C4, C5]`` (strides 4, 8, 16, 32), zero on padding; the FPN has the same layers
    whatever the trunk's widths.

    Attributes:
      channels: p, the FPN width.
      max_clusters: q, classifier channels.
      precision: precision of the products with learned weights.
      trunk_norm: the trunk's BatchNorm, 'batch' or 'running' (``layers.trunk_norm_layer``).
    """

    channels: int = 100
    max_clusters: int = 100
    precision: str | None = None
    trunk_norm: str = "batch"

    # The model contract (models/__init__.py).
    input_multiple = 32
    transposable = False

    def make_trunk(self) -> nn.Module:
        raise NotImplementedError

    def setup(self):
        self.trunk = self.make_trunk()
        self.laterals = [TorchConv(self.channels, 1, use_bias=True, precision=self.precision,
                                   name=f"lateral{i + 2}") for i in range(4)]
        self.smooth = TorchConv(self.channels, 3, 1, 1, use_bias=True, precision=self.precision,
                                name="smooth2")
        self.classifier = TorchConv(self.max_clusters, 1, use_bias=True, precision=self.precision,
                                    name="classifier")
        self.norm_out = MaskedBatchNorm(name="bn_out")

    def features(self, image: jax.Array, mask: jax.Array) -> jax.Array:
        """The p-dim FPN map upsampled to the image (H, W, p), zero on padding."""
        c2, c3, c4, c5 = self.trunk(image, mask)
        masks = [subsample(mask, s) for s in (4, 8, 16, 32)]
        p = self.laterals[3](c5) * masks[3][..., None]
        for level in (2, 1, 0):  # C4, C3, C2: top-down x2 and add
            lateral = self.laterals[level]((c2, c3, c4)[level])
            h, w, _ = lateral.shape  # in a bucket exactly twice p's; cropped for any other size
            p = (lateral + upsample_nearest_2x(p)[:h, :w]) * masks[level][..., None]
        p = self.smooth(p) * masks[0][..., None]
        h, w = mask.shape
        return upsample_bilinear(p, 4, masks[0])[:h, :w] * mask[..., None]

    def __call__(self, image: jax.Array, mask: jax.Array) -> jax.Array:
        x = self.classifier(self.features(image, mask))
        return self.norm_out(x, mask)
