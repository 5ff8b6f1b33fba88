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

import functools
import warnings
from typing import Callable, NamedTuple

import jax

from . import cnn, efficientnet, resnet
from .conv3x3 import CONV_IMPLS, MATMUL_PRECISIONS, default_conv_impl
from .layers import Conv, MaskedBatchNorm
from ..weights import EFFICIENTNET_LITE0, RESNET18, Checkpoint, find_checkpoint

# model name -> builder(config) -> flax module
MODELS: dict[str, Callable] = {"cnn": cnn.build, "resnet18_fpn": resnet.build_fpn,
                               "resnet18_layer1": resnet.build_layer1,
                               "efficientnet_lite0_fpn": efficientnet.build_fpn}


class Pretrained(NamedTuple):
    """A model's pretrained trunk: ``load(variables, path) -> variables`` with the trunk
    read from the checkpoint at ``path``, and where its default checkpoint lives."""
    load: Callable
    checkpoint: Checkpoint


# model name -> its pretrained trunk
PRETRAINED: dict[str, Pretrained] = {
    "resnet18_fpn": Pretrained(resnet.load_trunk, RESNET18),
    "resnet18_layer1": Pretrained(functools.partial(resnet.load_trunk, stages=1), RESNET18),
    "efficientnet_lite0_fpn": Pretrained(efficientnet.load_trunk, EFFICIENTNET_LITE0),
}


def uses_pretrained(config) -> bool:
    """Whether the config's model starts from a checkpoint's trunk."""
    return config.model.name in PRETRAINED and config.model.weights != "random"


def check_pretrained(config) -> None:
    """Raises WeightsError now if the config's pretrained weights file cannot be found
    (before a run opens, or overwrites, its output folder)."""
    if uses_pretrained(config):
        find_checkpoint(config.model.weights or None, PRETRAINED[config.model.name].checkpoint)


def load_pretrained(config, params):
    """``params`` with the model's pretrained part read from ``config.model.weights``.

    Unchanged for models without pretrained weights and for ``model.weights = "random"``.

    Raises:
      WeightsError: the checkpoint is missing, unreadable, or does not fit the model.
    """
    if not uses_pretrained(config):
        return params
    pretrained = PRETRAINED[config.model.name]
    return pretrained.load(params, find_checkpoint(config.model.weights or None, pretrained.checkpoint))


def build_model(config, name: str | None = None):
    """The network a config describes: the registry's ``name`` (default: ``config.model.name``)."""
    name = name or config.model.name
    try:
        builder = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(sorted(MODELS))}") from None
    m = config.model
    if jax.default_backend() == "cpu" and executed_products(config) != m.matmul_precision and not m.emulate_precision:
        advice = "; model.emulate_precision = true emulates it" if name == "cnn" else ""
        warnings.warn(f"model.matmul_precision = {m.matmul_precision!r} has no effect on cpu, where XLA "
                      f"multiplies in float32{advice}")
    return builder(config)


def executed_products(config, backend: str | None = None) -> str:
    """The precision the network's products with learned weights run in on ``backend``
    (default: JAX's): ``model.matmul_precision`` as the hardware executes it.

    XLA:CPU multiplies float32 at every precision setting; JAX's 'bfloat16' (its DEFAULT
    precision) is TF32 on NVIDIA GPUs; the Pallas conv casts its operands to bfloat16
    itself, on any backend. Emulated precisions are named as such.
    """
    m, backend = config.model, backend or jax.default_backend()
    if m.emulate_precision:
        return f"{m.matmul_precision} (emulated)"
    if m.conv_impl == "pallas" and m.matmul_precision == "bfloat16":
        return "bfloat16"
    if backend == "cpu":
        return "float32"
    if m.matmul_precision == "bfloat16" and backend == "gpu":
        return "tensorfloat32"
    return m.matmul_precision


__all__ = ["MODELS", "PRETRAINED", "build_model", "executed_products", "check_pretrained", "load_pretrained", "uses_pretrained", "Conv", "MaskedBatchNorm", "CONV_IMPLS", "MATMUL_PRECISIONS",
           "default_conv_impl", "cnn", "efficientnet", "resnet", "Pretrained"]
