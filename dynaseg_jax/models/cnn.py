"""The DynaSeg CNN (docs/algorithm.md section 1.2): ``n_conv`` x (conv3x3 -> ReLU -> BN),
then conv1x1 -> BN, the response r'. Full resolution throughout (no strides), so any
input size works and a transposed image is as good an input as any."""
from __future__ import annotations

import functools
import warnings
from typing import Callable

import flax.linen as nn
import jax

from .conv3x3 import CONV3X3, default_conv_impl, pad_about_edge
from .inputs import encode_input
from .layers import Conv, MaskedBatchNorm


class DynaSegCNN(nn.Module):
    """The CNN of the authors' BSDS500 script.

    Attributes:
      channels: p, the width of the feature extractor.
      max_clusters: q, output channels = the most labels (clusters) an image can get.
      n_conv: number of conv3x3 blocks (reference BSD script: 2; paper: 3).
      conv: the conv layer, ``conv(features, kernel_size, name=...)``; default ``Conv``
        with ``lax.conv``; ``build`` injects the configured formulation and precision.
      norm: the normalisation, ``norm(name=...)(x, mask)``; default ``MaskedBatchNorm``.
      padding: what the 3x3 convs read past each image's real edge: 'zeros', 'reflect'
        or 'replicate' (``conv3x3.pad_about_edge``).
      input_space, position: the first layer's input (``inputs.encode_input``): the
        image in 'rgb' or 'lab', with (row, column) channels when ``position`` > 0.
      output_norm: BatchNorm on r' (the authors'); False: the classifier's output.

    Call with ``(image (H, W, 3), mask (H, W))``; returns r' of shape (H, W, q).
    ``features`` (``apply(..., method="features")``) gives the p-dim feature map.
    """

    channels: int = 100
    max_clusters: int = 100
    n_conv: int = 2
    conv: Callable = Conv
    norm: Callable = MaskedBatchNorm
    padding: str = "zeros"
    input_space: str = "rgb"
    position: float = 0.0
    output_norm: bool = True

    # The model contract (models/__init__.py): no strides, and transposition is harmless.
    input_multiple = 1
    transposable = True

    def setup(self):
        self.convs = [self.conv(self.channels, 3, name=f"conv{i}") for i in range(self.n_conv)]
        self.norms = [self.norm(name=f"bn{i}") for i in range(self.n_conv)]
        self.classifier = self.conv(self.max_clusters, 1, name="classifier")
        if self.output_norm:
            self.norm_out = self.norm(name="bn_out")

    def features(self, image: jax.Array, mask: jax.Array) -> jax.Array:
        """The p-dim feature map (H, W, p) before the classifier, zero on padding."""
        m = mask[..., None].astype(image.dtype)
        x = encode_input(image, mask, self.input_space, self.position) * m
        for conv, norm in zip(self.convs, self.norms):
            if self.padding == "zeros":
                y = conv(x)
            else:  # the conv's own zero padding then only touches the cropped ring
                y = conv(pad_about_edge(x, mask, self.padding))[1:-1, 1:-1]
            # Zero the padding after each block so the next conv sees torch's zero border.
            x = norm(nn.relu(y), mask) * m
        return x

    def __call__(self, image: jax.Array, mask: jax.Array) -> jax.Array:
        response = self.classifier(self.features(image, mask))
        return self.norm_out(response, mask) if self.output_norm else response


def build(config) -> DynaSegCNN:
    """The CNN a config describes (``conv_impl="auto"`` resolved for the default backend)."""
    impl = default_conv_impl() if config.model.conv_impl == "auto" else config.model.conv_impl
    if impl == "pallas" and jax.default_backend() != "gpu":
        warnings.warn(f"model.conv_impl = 'pallas' on {jax.default_backend()}: its kernels run in "
                      "Pallas's interpreter there, exact but far slower than 'winograd'", stacklevel=2)
    conv = functools.partial(Conv, conv3x3=CONV3X3[impl], precision=config.model.matmul_precision,
                             emulate_precision=config.model.emulate_precision,
                             channel_multiple=config.model.channel_multiple)
    return DynaSegCNN(channels=config.model.channels, max_clusters=config.model.max_clusters,
                      n_conv=config.model.n_conv, conv=conv, padding=config.model.padding,
                      input_space=config.model.input_space, position=config.model.position,
                      output_norm=config.model.output_norm)
