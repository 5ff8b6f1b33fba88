"""The DynaSeg CNN: feature extractor, 1x1 classifier and per-image BatchNorm.

All modules work on ONE image, shaped ``(H, W, C)``, with a validity mask ``(H, W)``
(1 for real pixels, 0 for bucket padding). Batches of images, each with its own
parameters, are made with ``jax.vmap`` over ``init``/``apply`` (see ``engine.py``).

Padding is exact: padded pixels are zeroed before every 3x3 convolution (so a conv
sees the zeros PyTorch's ``padding=1`` would), and BatchNorm statistics are taken
over real pixels only.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

BN_EPS = 1e-5  # torch.nn.BatchNorm2d default


def torch_uniform_init(fan_in: int):
    """PyTorch's default Conv2d init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    ``kaiming_uniform_(a=sqrt(5))`` has gain sqrt(2/(1+5)) and bound
    gain*sqrt(3/fan_in) = 1/sqrt(fan_in); the bias uses the same bound
    (torch/nn/modules/conv.py, ``reset_parameters``).
    """
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def masked_batch_norm_stats(x: jax.Array, mask: jax.Array):
    """Mean and biased variance over the real pixels of ``x`` (H, W, C)."""
    m = mask[..., None].astype(x.dtype)
    n = jnp.maximum(jnp.sum(m), 1.0)
    mean = jnp.sum(x * m, axis=(0, 1)) / n
    var = jnp.sum(jnp.square(x - mean) * m, axis=(0, 1)) / n
    return mean, var


class MaskedBatchNorm(nn.Module):
    """BatchNorm in training mode over one image's real pixels (no running stats).

    The reference never leaves train mode, so only batch statistics are ever used
    (SPEC section 1); torch normalises with the biased variance.
    """

    eps: float = BN_EPS

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        mean, var = masked_batch_norm_stats(x, mask)
        inv = jax.lax.rsqrt(var + self.eps) * scale
        return (x - mean) * inv + bias


def conv3x3_im2col(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """3x3 conv, stride 1, zero padding 1, as one matmul over 9 shifted copies.

    x: (H, W, Cin); kernel: (3, 3, Cin, Cout) in HWIO order. Same result as
    ``lax.conv_general_dilated(..., padding=((1, 1), (1, 1)))``.
    """
    h, w, _ = x.shape
    xp = jnp.pad(x, ((1, 1), (1, 1), (0, 0)))
    patches = jnp.concatenate(
        [xp[dy:dy + h, dx:dx + w, :] for dy in range(3) for dx in range(3)], axis=-1)
    return patches @ kernel.reshape(-1, kernel.shape[-1])


class Conv(nn.Module):
    """Stride-1 conv with PyTorch init and explicit zero padding (k // 2).

    ``impl`` picks the formulation: ``"lax"`` (``lax.conv_general_dilated``) or
    ``"im2col"`` (shifted copies + one matmul, faster on XLA:CPU). Both compute the
    same function; the parameter layout (kernel HWIO, bias) is identical.
    """

    features: int
    kernel_size: int = 3
    impl: str = "lax"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, cin = self.kernel_size, x.shape[-1]
        init = torch_uniform_init(cin * k * k)
        kernel = self.param("kernel", init, (k, k, cin, self.features))
        bias = self.param("bias", init, (self.features,))
        if k == 1:
            y = x @ kernel[0, 0]
        elif self.impl == "im2col" and k == 3:
            y = conv3x3_im2col(x, kernel)
        elif self.impl in ("lax", "im2col"):
            p = k // 2
            y = jax.lax.conv_general_dilated(
                x[None], kernel, window_strides=(1, 1), padding=((p, p), (p, p)),
                dimension_numbers=("NHWC", "HWIO", "NHWC"))[0]
        else:
            raise ValueError(f"unknown conv impl {self.impl!r}; use 'lax' or 'im2col'")
        return y + bias


class DynaSegCNN(nn.Module):
    """``n_conv`` x (conv3x3 -> ReLU -> BN), then conv1x1 -> BN: the response r'.

    Args (attributes):
      channels: p, the width of the feature extractor.
      n_clusters: q, the number of output channels (maximum number of labels).
      n_conv: number of conv3x3 blocks (reference BSD script: 2; paper: 3).
      conv_impl: ``"lax"`` or ``"im2col"`` (same function, different speed).

    Call with ``(image (H, W, 3), mask (H, W))``; returns r' of shape (H, W, q).
    Pass ``return_features=True`` to get the p-dim feature map instead.
    """

    channels: int = 100
    n_clusters: int = 100
    n_conv: int = 2
    conv_impl: str = "lax"

    @nn.compact
    def __call__(self, image: jax.Array, mask: jax.Array, return_features: bool = False):
        m = mask[..., None].astype(image.dtype)
        x = image * m
        for i in range(self.n_conv):
            x = Conv(self.channels, 3, self.conv_impl, name=f"conv{i}")(x)
            x = nn.relu(x)
            # Zero the padding so the next conv sees torch's zero border.
            x = MaskedBatchNorm(name=f"bn{i}")(x, mask) * m
        if return_features:
            return x
        x = Conv(self.n_clusters, 1, name="classifier")(x)
        return MaskedBatchNorm(name="bn_out")(x, mask)


def build_model(config) -> DynaSegCNN:
    """The network a config describes."""
    return DynaSegCNN(channels=config.channels, n_clusters=config.n_clusters,
                      n_conv=config.n_conv, conv_impl=config.conv_impl)
