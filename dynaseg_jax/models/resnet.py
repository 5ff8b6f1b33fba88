"""ResNet-18 + FPN (docs/algorithm.md section 3): the paper's second feature extractor.

The trunk is torchvision's ResNet-18 (conv1 7x7/2, max-pool 3x3/2, layer1-4 of two
BasicBlocks each), with PyTorch's padding reproduced exactly (explicit amounts, never
'SAME'); an FPN over C2..C5 (lateral 1x1 convs to p channels, top-down x2 nearest
upsampling and addition, a 3x3 smoothing conv on the stride-4 map); that map upsampled
bilinearly by the fixed factor 4 and cropped; then the classifier 1x1 + BatchNorm of
section 1.

Padding is exact, as for the CNN. The bucket is a multiple of 32 (``input_multiple``),
so every stride-2 layer halves it exactly, and the validity mask is subsampled with it
(``mask[::2, ::2]``: an output is real iff the input pixel at its window's centre is):

* every conv and pool output is multiplied by its mask before the next layer reads it
  (a strided window just past the real image still overlaps it, so its output is not
  zero by itself), so each window sees zeros beyond the real image, as torch's zero
  padding; the max-pool's bucket padding is zeros where torch pads with -inf, but its
  inputs follow a ReLU (>= 0), so the maximum is the same;
* BatchNorm statistics (per-image batch statistics, the authors' train mode) count the
  real positions of each stride only: those are exactly the positions torch computes
  on the unpadded image (ceil(H / s) rows);
* the top-down x2 upsampling repeats each position (index i // 2), so it does not
  depend on the bucket; the final x4 bilinear upsampling clamps its source indices at
  the last real row and column, as torch clamps at the border of the unpadded map.

A pretrained trunk's features are not transpose-invariant: ``transposable = False``.
Weights: ``torchvision_trunk_variables`` converts a torchvision ResNet-18 state dict.
"""
from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .fpn import TrunkFPN, subsample, upsample_bilinear, upsample_nearest_2x
from .layers import MaskedBatchNorm, TorchConv, TorchStateDict, trunk_norm_layer

# ImageNet statistics of torchvision's ResNet weights (RGB, for inputs in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESNET18_STAGES = (64, 128, 256, 512)  # channels of C2..C5


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """torch ``MaxPool2d(3, 2, padding=1)``: padded with -inf, as torch (the -inf init
    value is also what makes ``reduce_window`` a differentiable max-pool in JAX)."""
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (3, 3, 1), (2, 2, 1),
                                 ((1, 1), (1, 1), (0, 0)))


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: conv3x3-BN-ReLU-conv3x3-BN, plus the (downsampled)
    input, then ReLU. Takes and returns (x, mask) at the block's output stride."""

    features: int
    stride: int = 1
    precision: str | None = None
    norm: Callable = MaskedBatchNorm

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array):
        out_mask = subsample(mask, self.stride)
        m = out_mask[..., None]
        y = TorchConv(self.features, 3, self.stride, 1, precision=self.precision, name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y, out_mask)) * m
        y = TorchConv(self.features, 3, 1, 1, precision=self.precision, name="conv2")(y)
        y = self.norm(name="bn2")(y, out_mask)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = TorchConv(self.features, 1, self.stride, 0, precision=self.precision,
                          name="downsample_conv")(x)
            x = self.norm(name="downsample_bn")(x, out_mask)
        return nn.relu(y + x) * m, out_mask


class ResNet18Trunk(nn.Module):
    """torchvision ResNet-18 without its pooling and classifier: (image, mask) -> C2..C5.

    ``norm`` is the trunk's BatchNorm (``trunk_norm``): each image's own statistics over
    its real positions (the authors' train mode, default) or the checkpoint's running
    statistics. The image is normalised with the ImageNet mean/std.
    """

    precision: str | None = None
    norm: Callable = MaskedBatchNorm

    @nn.compact
    def __call__(self, image: jax.Array, mask: jax.Array) -> list[jax.Array]:
        x = (image - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
        x = x * mask[..., None]
        mask = subsample(mask, 2)
        x = TorchConv(64, 7, 2, 3, precision=self.precision, name="conv1")(x)
        x = nn.relu(self.norm(name="bn1")(x, mask)) * mask[..., None]
        # The pool's first padded output can still see the last real row: zero it.
        mask = subsample(mask, 2)
        x = max_pool_3x3_s2(x) * mask[..., None]
        stages = []
        for i, features in enumerate(RESNET18_STAGES):
            for j in range(2):
                stride = 2 if (i > 0 and j == 0) else 1
                x, mask = BasicBlock(features, stride, self.precision, self.norm,
                                     name=f"layer{i + 1}_{j}")(x, mask)
            stages.append(x)
        return stages


class ResNet18FPN(TrunkFPN):
    """ResNet-18 trunk + FPN + classifier: ``(image, mask) -> r' (H, W, q)`` (``TrunkFPN``)."""

    def make_trunk(self) -> nn.Module:
        return ResNet18Trunk(self.precision, trunk_norm_layer(self.trunk_norm))


def build_fpn(config) -> ResNet18FPN:
    """``resnet18_fpn`` from a config (model.channels = p, model.max_clusters = q)."""
    return ResNet18FPN(channels=config.model.channels, max_clusters=config.model.max_clusters,
                       precision=config.model.matmul_precision, trunk_norm=config.model.trunk_norm)


# ----------------------------------------------------------------------------- weights


def torchvision_trunk_variables(state_dict, dtype=np.float32, stages: int = 4) -> dict:
    """A torchvision ResNet-18 state dict (name -> array) -> our trunk's variables.

    Conv weights go from OIHW to HWIO; BatchNorm weight/bias become ``params``
    scale/bias, running_mean/running_var the ``batch_stats`` mean/var (read by
    ``trunk_norm = 'running'`` only); ``fc`` and the stages beyond ``stages`` are not read.

    Args:
      state_dict: ``torchvision.models.resnet18().state_dict()`` or a checkpoint's dict;
        values are torch tensors or numpy arrays.
      dtype: of the numpy leaves (float64 keeps a float64 model's values exact).
      stages: how many of ``layer1``..``layer4`` the trunk has (``ResNet18Trunk``: 4,
        ``ResNet18Layer1Trunk``: 1).

    Returns:
      ``{"params": trunk tree, "batch_stats": trunk tree}``, bare (not under ``trunk``).

    Raises:
      KeyError: a tensor the trunk needs is missing (its name).
    """
    sd = TorchStateDict(state_dict, dtype)
    sd.conv(("conv1",), "conv1")
    sd.bn(("bn1",), "bn1")
    for i in range(1, stages + 1):
        for j in range(2):
            src, block = f"layer{i}.{j}", f"layer{i}_{j}"
            sd.conv((block, "conv1"), f"{src}.conv1")
            sd.bn((block, "bn1"), f"{src}.bn1")
            sd.conv((block, "conv2"), f"{src}.conv2")
            sd.bn((block, "bn2"), f"{src}.bn2")
            if f"{src}.downsample.0.weight" in state_dict:
                sd.conv((block, "downsample_conv"), f"{src}.downsample.0")
                sd.bn((block, "downsample_bn"), f"{src}.downsample.1")
    return sd.variables()


def load_trunk(variables, path, stages: int = 4) -> dict:
    """``variables`` with their ``trunk`` replaced by a torchvision ResNet-18 checkpoint's
    first ``stages`` stages (4: ``ResNet18FPN``; 1: ``ResNet18Layer1``): its weights, and
    its running BatchNorm statistics where the model has a ``batch_stats`` collection
    (``trunk_norm = 'running'``).

    Raises:
      WeightsError: the file cannot be read or is not a ResNet-18 (missing names or
        other shapes), naming the file.
    """
    from ..weights import WeightsError, read_state_dict

    sd = read_state_dict(path)
    try:
        trunk = torchvision_trunk_variables(sd, stages=stages)
    except KeyError as e:
        raise WeightsError(f"{path}: not a torchvision ResNet-18 checkpoint (no {e.args[0]})") from None
    return replace_subtree(variables, "trunk", trunk, path, "a ResNet-18 checkpoint")


def replace_subtree(variables: dict, name: str, loaded: dict, path, what: str) -> dict:
    """``variables`` with sub-module ``name`` of each of its collections taken from
    ``loaded`` (collection -> tree); shapes must agree.

    Raises:
      WeightsError: the shapes differ (``path`` is not ``what``).
    """
    from ..weights import WeightsError

    out = dict(variables)
    for collection, tree in variables.items():
        want = jax.tree.map(lambda a: tuple(a.shape), tree[name])
        got = jax.tree.map(lambda a: tuple(a.shape), loaded.get(collection, {}))
        if want != got:
            raise WeightsError(f"{path}: not {what} (parameter shapes differ)")
        out[collection] = {**tree, name: jax.tree.map(jnp.asarray, loaded[collection])}
    return out


def stage_shapes(height: int, width: int) -> Sequence[tuple[int, int]]:
    """(h, w) of C2..C5 for an unpadded image, as torch computes them."""
    def down(n, k, s, p):
        return (n + 2 * p - k) // s + 1
    h, w = down(height, 7, 2, 3), down(width, 7, 2, 3)
    h, w = down(h, 3, 2, 1), down(w, 3, 2, 1)
    shapes = [(h, w)]
    for _ in range(3):
        h, w = down(h, 3, 2, 1), down(w, 3, 2, 1)
        shapes.append((h, w))
    return shapes


# ------------------------------------------------------------------- resnet18_layer1


class ResNet18Layer1Trunk(nn.Module):
    """torchvision ResNet-18's ``conv1``, ``bn1``, ReLU and ``layer1``, with no max-pool:
    ``(image, mask) -> (stride-2 map (ceil(H/2), ceil(W/2), 64), its mask)``.

    Parameter names are those of ``ResNet18Trunk`` (``conv1``, ``bn1``, ``layer1_0``,
    ``layer1_1``), so a torchvision checkpoint's tensors load by the same names.
    """

    precision: str | None = None
    norm: Callable = MaskedBatchNorm

    @nn.compact
    def __call__(self, image: jax.Array, mask: jax.Array):
        x = (image - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
        x = x * mask[..., None]
        mask = subsample(mask, 2)
        x = TorchConv(64, 7, 2, 3, precision=self.precision, name="conv1")(x)
        x = nn.relu(self.norm(name="bn1")(x, mask)) * mask[..., None]
        for j in range(2):
            x, mask = BasicBlock(64, 1, self.precision, self.norm, name=f"layer1_{j}")(x, mask)
        return x, mask


class ResNet18Layer1(nn.Module):
    """The authors' COCO-Stuff network (docs/algorithm.md section 3.2): ``(image, mask) -> r' (H, W, q)``.

    ImageNet-normalised input; ResNet-18 ``conv1`` (7x7/2), ``bn1``, ReLU, ``layer1`` (no
    max-pool; stride 2, 64 channels); bilinear x2 upsampling (align_corners=False); a 3x3
    conv (padding 1, bias) 64 -> q; then ONE 1x1 conv (bias) + BatchNorm applied twice,
    the same weights both times, with no ReLU anywhere after ``layer1``:
    ``r' = bn(conv1x1(bn(conv1x1(conv3x3(up2(layer1(...)))))))``, each BatchNorm with the
    statistics of its own input; finally cropped to the image.

    As in the authors' code, everything after the upsampling runs on the 2 * ceil(H / 2)
    by 2 * ceil(W / 2) map and the crop comes last: for an odd H the extra row is seen by
    the 3x3 conv and counted in both BatchNorms' statistics. Its mask (``up_mask``) is
    the stride-2 mask repeated x2, which depends only on H, W, so padding stays exact:
    in a bucket (a multiple of 2, ``input_multiple``) every layer reads zeros beyond its
    real part, the x2 upsampling clamps at the stride-2 map's last real row/column, and
    BatchNorm counts only the ``up_mask`` positions.

    The authors fix q = 64, the width of ``layer1`` (their 3x3 conv is num_channels ->
    num_channels with num_channels = qdy, which only runs for qdy = 64); here the 3x3
    conv maps 64 -> q, which is the same network for q = 64 and keeps the shared 1x1
    square (q -> q) for any other q.

    Attributes:
      max_clusters: q (the authors: 64).
      precision: precision of the products with learned weights.
    """

    max_clusters: int = 64
    precision: str | None = None
    trunk_norm: str = "batch"

    # The model contract (models/__init__.py).
    input_multiple = 2
    transposable = False

    def setup(self):
        self.trunk = ResNet18Layer1Trunk(self.precision, trunk_norm_layer(self.trunk_norm))
        self.conv6 = TorchConv(self.max_clusters, 3, 1, 1, use_bias=True, precision=self.precision,
                               name="conv6")
        self.classifier = TorchConv(self.max_clusters, 1, use_bias=True, precision=self.precision,
                                    name="classifier")
        self.norm_out = MaskedBatchNorm(name="bn_out")

    def _upsampled_features(self, image: jax.Array, mask: jax.Array):
        """The 3x3 conv's output on the x2 map, before the crop, and that map's mask."""
        x, mask2 = self.trunk(image, mask)
        up_mask = upsample_nearest_2x(mask2)[..., None]  # 2 * ceil(H / 2) real rows
        x = upsample_bilinear(x, 2, mask2) * up_mask
        return self.conv6(x) * up_mask, up_mask[..., 0]

    def features(self, image: jax.Array, mask: jax.Array) -> jax.Array:
        """The q-dim map before the shared 1x1 + BatchNorm stage, cropped to the image
        (H, W, q), zero on padding."""
        y, _ = self._upsampled_features(image, mask)
        h, w = mask.shape
        return y[:h, :w] * mask[..., None]

    def __call__(self, image: jax.Array, mask: jax.Array) -> jax.Array:
        y, up_mask = self._upsampled_features(image, mask)
        for _ in range(2):  # the same module twice: shared weights, separate statistics
            y = self.norm_out(self.classifier(y), up_mask)
        h, w = mask.shape
        return y[:h, :w]


def build_layer1(config) -> ResNet18Layer1:
    """``resnet18_layer1`` from a config (model.max_clusters = q; model.channels unused)."""
    return ResNet18Layer1(max_clusters=config.model.max_clusters,
                          precision=config.model.matmul_precision, trunk_norm=config.model.trunk_norm)


