"""The model family behind one contract, and the registry that builds them by name.

The contract, which the engine, the train step and the silhouette phase rely on:

* a Flax module applied to ONE image: ``model.apply(params, image (H, W, 3), mask (H, W))``
  returns the response r' of shape (H, W, q), with ``mask`` 1 on real pixels and 0 on
  bucket padding, which must not change r' on the real pixels;
* ``model.apply(params, image, mask, method="features")`` returns per-pixel features
  (H, W, D) for the silhouette phase;
* ``model.input_multiple``: the multiple its strides need of the input height and width
  (bucket shapes are rounded to it); ``model.transposable``: whether a portrait image may
  be optimised transposed (not for a pretrained trunk: its features are not
  transpose-invariant).

A model is built once (``build_model(config)``) and handed to everything that runs it.
"""
from __future__ import annotations

from typing import Callable

from . import cnn, resnet
from .conv3x3 import CONV_IMPLS, MATMUL_PRECISIONS, default_conv_impl
from .layers import Conv, MaskedBatchNorm

# model name -> builder(config) -> flax module
MODELS: dict[str, Callable] = {"cnn": cnn.build, "resnet18_fpn": resnet.build_fpn}


def build_model(config, name: str | None = None):
    """The network a config describes: the registry's ``name`` (default: ``config.model.name``)."""
    name = name or config.model.name
    try:
        builder = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(sorted(MODELS))}") from None
    return builder(config)


__all__ = ["MODELS", "build_model", "Conv", "MaskedBatchNorm", "CONV_IMPLS", "MATMUL_PRECISIONS",
           "default_conv_impl", "cnn", "resnet"]
