"""Layers shared by the model family: PyTorch-default init, masked BatchNorm, a conv
that takes its 3x3 formulation as an injected function.

Every layer works on ONE image ``(H, W, C)``; a validity mask ``(H, W)`` (1 on real
pixels, 0 on bucket padding) keeps padded pixels out of every statistic
(docs/algorithm.md section 1.10). Batches of images, each with its own parameters, are
made with ``jax.vmap`` over ``init``/``apply``.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .conv3x3 import conv3x3_lax, emulated_products

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
    """BatchNorm over one image's real pixels, as torch's ``BatchNorm2d``.

    By default in training mode with no running statistics: the reference never leaves
    train mode, so only the image's own statistics are ever used (docs/algorithm.md
    section 1.3); torch normalises with the biased variance.

    With ``use_running_average`` it normalises with fixed statistics instead (torch's
    eval mode), held in the ``batch_stats`` collection as ``mean`` and ``var`` (a
    checkpoint's ``running_mean`` / ``running_var``); they are never updated.
    """

    eps: float = BN_EPS
    use_running_average: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        if self.use_running_average:
            # torch's initial running statistics: mean 0, var 1.
            mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), x.dtype).value
            var = self.variable("batch_stats", "var", jnp.ones, (c,), x.dtype).value
        else:
            mean, var = masked_batch_norm_stats(x, mask)
        inv = jax.lax.rsqrt(var + self.eps) * scale
        return (x - mean) * inv + bias


class Conv(nn.Module):
    """Stride-1 conv with PyTorch's default init and torch's zero padding (k // 2).

    Attributes:
      features: output channels.
      kernel_size: 1 or 3.
      conv3x3: the 3x3 formulation, ``f(x, kernel, precision) -> y`` (``conv3x3.CONV3X3``);
        all compute the same function, and the parameter layout (kernel HWIO, bias) is
        the same for each.
      precision: precision of the products with the learned kernel
        (``conv3x3.MATMUL_PRECISIONS``; None: JAX's default).
      emulate_precision: multiply in float32 with the operands rounded to ``precision``'s
        format instead (``conv3x3.emulated_products``): its effect, on any backend.
      channel_multiple: inside the product, input and output channels are zero-padded to
        a multiple of this (tensor cores want multiples of 8) and the output cropped: the
        same function (the zero channels add exact zeros), the same parameters.
    """

    features: int
    kernel_size: int = 3
    conv3x3: Callable = conv3x3_lax
    precision: str | None = None
    emulate_precision: bool = False
    channel_multiple: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, cin = self.kernel_size, x.shape[-1]
        init = torch_uniform_init(cin * k * k)
        kernel = self.param("kernel", init, (k, k, cin, self.features))
        bias = self.param("bias", init, (self.features,))
        if k == 1:
            product = lambda x, kernel, precision: jnp.dot(x, kernel[0, 0], precision=precision)
        elif k == 3:
            product = self.conv3x3
        else:
            raise ValueError(f"Conv: kernel_size {k} is not supported (1 or 3)")
        if self.emulate_precision:
            product = emulated_products(product, self.precision)
        if self.channel_multiple > 1:
            product = padded_channels(product, self.channel_multiple)
        return product(x, kernel, self.precision) + bias


def padded_channels(product: Callable, multiple: int) -> Callable:
    """``product(x, kernel, precision)`` computed with x's channels and the kernel's input
    and output channels zero-padded to multiples of ``multiple``, the output cropped."""
    up = lambda c: -(-c // multiple) * multiple

    def padded(x, kernel, precision=None):
        cin, cout = kernel.shape[-2:]
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, up(cin) - cin)])
        kernel = jnp.pad(kernel, [(0, 0)] * (kernel.ndim - 2) + [(0, up(cin) - cin), (0, up(cout) - cout)])
        return product(x, kernel, precision)[..., :cout]

    return padded


def trunk_norm_layer(trunk_norm: str, eps: float = BN_EPS) -> Callable:
    """A pretrained trunk's BatchNorm for ``model.trunk_norm``: 'batch' (each image's own
    statistics, the authors' train mode) or 'running' (the checkpoint's statistics)."""
    if trunk_norm not in ("batch", "running"):
        raise ValueError(f"trunk_norm must be 'batch' or 'running', not {trunk_norm!r}")
    return functools.partial(MaskedBatchNorm, eps=eps, use_running_average=trunk_norm == "running")


def kaiming_fan_out_init(k: int, features: int):
    """torchvision's ResNet conv init: normal(0, sqrt(2 / fan_out)), fan_out = k*k*Cout."""
    std = math.sqrt(2.0 / (k * k * features))

    def init(key, shape, dtype=jnp.float32):
        return std * jax.random.normal(key, shape, dtype)

    return init


class TorchConv(nn.Module):
    """A ``torch.nn.Conv2d`` with explicit symmetric padding and optional stride/bias.

    Attributes:
      features, kernel_size, stride, padding: as torch's (``padding`` on every side).
      use_bias: torch's ``bias``; a biased conv gets torch's default uniform init, an
        unbiased one (the ResNet trunk) torchvision's kaiming fan-out init.
      precision: precision of the products with the kernel.
    """

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    use_bias: bool = False
    precision: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, cin = self.kernel_size, x.shape[-1]
        init = (torch_uniform_init(cin * k * k) if self.use_bias
                else kaiming_fan_out_init(k, self.features))
        kernel = self.param("kernel", init, (k, k, cin, self.features))
        p = self.padding
        y = jax.lax.conv_general_dilated(
            x[None], kernel, window_strides=(self.stride, self.stride), padding=((p, p), (p, p)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=self.precision)[0]
        if self.use_bias:
            y = y + self.param("bias", torch_uniform_init(cin * k * k), (self.features,))
        return y


class TorchStateDict:
    """Reads a PyTorch state dict into flax variables, layer by layer.

    ``conv(dst, name)`` puts ``name.weight`` (OIHW; a depthwise conv's (C, 1, k, k)) as an
    HWIO ``kernel`` at the path ``dst``; ``bn(dst, name)`` puts weight/bias as ``params``
    scale/bias and running_mean/running_var as ``batch_stats`` mean/var. Values may be
    torch tensors or numpy arrays; a missing name raises KeyError (with the name).
    """

    def __init__(self, state_dict, dtype=np.float32):
        self.state_dict = state_dict
        self.dtype = dtype
        self.params: dict = {}
        self.stats: dict = {}

    def array(self, name: str):
        v = self.state_dict[name]
        v = v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
        return v.astype(self.dtype)

    def conv(self, dst: tuple, name: str) -> None:
        _put(self.params, dst, {"kernel": self.array(f"{name}.weight").transpose(2, 3, 1, 0)})

    def bn(self, dst: tuple, name: str) -> None:
        _put(self.params, dst, {"scale": self.array(f"{name}.weight"), "bias": self.array(f"{name}.bias")})
        _put(self.stats, dst, {"mean": self.array(f"{name}.running_mean"),
                               "var": self.array(f"{name}.running_var")})

    def variables(self) -> dict:
        return {"params": self.params, "batch_stats": self.stats}


def _put(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
