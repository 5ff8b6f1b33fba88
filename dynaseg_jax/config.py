"""Run configuration: sections of fields, presets as TOML files, dotted ``key=value`` overrides.

A config is a tree of frozen dataclasses, one per TOML table::

    seed = 0      init = "per_image"
    [model]       the network                      model.name, model.channels, ...
    [schedule]    mu as a function of q'           schedule.kind, schedule.alpha, ...
    [optim]       SGD                              optim.lr, optim.momentum, ...
    [stop]        when an image is finished        stop.k_min, stop.max_iters
    [silhouette]  the k* phase                     silhouette.features, ...
    [superpixels] superpixel-constrained targets   superpixels.method, ...
    [postprocess] clean-up of the final labels     postprocess.connected, ...
    [engine]      how a run is laid out            engine.batch, engine.strategy, ...

A field is named by its dotted path everywhere: in TOML files, in ``--set optim.lr=0.05``,
in ``Config.replace({"optim.lr": 0.05})``, in the config digest. Each field carries its
doc (``dataclasses.field`` metadata), which ``to_toml`` writes as a comment above it.
TOML (not Python) so that a config file received from someone else cannot run code.
``config_digest`` fingerprints the fields that decide the labels, so an output folder
can tell whether a resume uses the same settings.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.resources
import json
import math
import tomllib
from pathlib import Path
from typing import Any, Iterator, Mapping, Union


class ConfigError(ValueError):
    """A config file or override that cannot be used."""


def _field(default, doc: str, choices: tuple | None = None):
    return dataclasses.field(default=default, metadata={"doc": doc, "choices": choices})


# Model names of the registry (dynaseg_jax/models); kept here so that reading a config
# does not import jax (tests check that the two agree).
MODEL_NAMES = ("cnn", "resnet18_fpn", "resnet18_layer1", "efficientnet_lite0_fpn")
# The models with a pretrained trunk (model.trunk, model.trunk_norm apply to these).
TRUNK_MODELS = ("resnet18_fpn", "resnet18_layer1", "efficientnet_lite0_fpn")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The network (docs/algorithm.md section 1.2)."""

    name: str = _field("cnn", "network from the model registry: 'cnn' (the authors' BSDS500 CNN), "
                              "'resnet18_fpn' (ResNet-18 trunk + FPN), 'resnet18_layer1' (the "
                              "authors' COCO network) or 'efficientnet_lite0_fpn' (EfficientNet-Lite0 "
                              "trunk + FPN), docs/algorithm.md section 3; model.n_conv and "
                              "model.conv_impl, model.padding, model.input_space, model.position, model.output_norm, "
                              "model.emulate_precision and model.channel_multiple apply to 'cnn' only.", MODEL_NAMES)
    n_conv: int = _field(2, "number of conv3x3-ReLU-BN blocks (reference BSD script: 2).")
    channels: int = _field(100, "p, width of the feature extractor.")
    max_clusters: int = _field(100, "q, channels of the classifier = the most clusters (labels) an image "
                                    "can get (q', the number present, falls during the optimisation).")
    conv_impl: str = _field("auto", "3x3 conv formulation: 'lax', 'im2col', 'winograd' (F(4x4,3x3)), "
                                    "'pallas' (implicit-GEMM kernel: Triton on GPUs, interpreted "
                                    "elsewhere), or 'auto' (the measured fastest: winograd).",
                            ("auto", "lax", "im2col", "winograd", "pallas"))
    padding: str = _field("zeros", "what the 3x3 convs read beyond each image's edge: 'zeros' (the "
                                   "authors' network, torch's default), 'reflect' or 'replicate' (torch's "
                                   "padding_mode of the same name, about each image's own edge in a "
                                   "bucket too).", ("zeros", "reflect", "replicate"))
    input_space: str = _field("rgb", "colour space of the CNN's input: 'rgb' (the authors') or 'lab' "
                                     "(CIE L*a*b*, scaled to about [-1, 1]).", ("rgb", "lab"))
    position: float = _field(0.0, "> 0: two more input channels, each pixel's row and column, from 0 at "
                                  "the image's first to this value at its last (CNN only); 0 = none.")
    output_norm: bool = _field(True, "BatchNorm on the response r' (the authors' network); false: the "
                                     "classifier's output as it is.")
    weights: str = _field("", "pretrained trunk weights of the models that have them: a checkpoint "
                              "file (.pth, .safetensors, .npz); '' = the model's published file (ResNet: "
                              "torchvision's, in PyTorch's hub cache; EfficientNet-Lite0: from the "
                              "efficientnet extra's package), never downloaded; 'random' = no "
                              "pretrained weights.")
    trunk: str = _field("finetune", "pretrained trunk: 'finetune' (optimised with the rest, per image: "
                                    "the authors' default) or 'frozen' (fixed, one copy shared by all "
                                    "images, no optimiser state).", ("finetune", "frozen"))
    trunk_norm: str = _field("batch", "BatchNorm of the pretrained trunk: 'batch' (each image's own "
                                      "statistics, the authors' train mode) or 'running' (the "
                                      "checkpoint's running statistics, torch's eval mode).",
                             ("batch", "running"))
    matmul_precision: str = _field("float32", "precision of the network's products with learned weights: "
                                              "'float32' (exact, as the PyTorch reference's matmuls), "
                                              "'tensorfloat32' or 'bfloat16' (faster on GPU/TPU; no effect "
                                              "on CPU). 'bfloat16' is JAX's fastest precision: bfloat16 "
                                              "products on TPUs but TF32 on NVIDIA GPUs, except in the "
                                              "'pallas' conv, which multiplies bfloat16 there.",
                                   ("float32", "tensorfloat32", "bfloat16"))
    emulate_precision: bool = _field(False, "'cnn' only: round both operands of every product with "
                                            "learned weights (forward and backward) to "
                                            "model.matmul_precision's format and multiply in float32 "
                                            "(winograd: the transformed tiles, as its dots would), "
                                            "on any backend: the effect of TF32 or bfloat16 products, "
                                            "studied on a CPU (models/conv3x3.py, emulated_products).")
    channel_multiple: int = _field(1, "'cnn' only: inside each conv, pad the channels with zeros to a "
                                      "multiple of this (GPU tensor cores want multiples of 4 for TF32, "
                                      "8 for bfloat16) "
                                      "and crop the output; the same function and parameters, other "
                                      "matmul shapes.")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """mu, the weight of the continuity loss, as a function of q' (docs/algorithm.md section 1.7)."""

    kind: str = _field("scf", "'fixed' (mu constant, Kim et al.), 'fsf' (mu = q'/alpha) or 'scf' "
                              "(mu = alpha/q').", ("fixed", "fsf", "scf"))
    alpha: float = _field(50.0, "alpha of 'fsf' (paper: 15) or 'scf' (paper: 50).")
    mu: float = _field(5.0, "the constant mu of 'fixed'.")
    uses_kstar: bool = _field(False, "with stop.k_min = 'silhouette': the schedule sees max(q', k*) instead "
                                     "of q' (as the reference COCO code); it can only change the update on "
                                     "which the run stops (docs/algorithm.md section 2.3).")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """SGD with momentum, torch semantics (docs/algorithm.md section 1.8)."""

    lr: float = _field(0.1, "learning rate (> 0).")
    momentum: float = _field(0.9, "momentum, in [0, 1).")
    weight_decay: float = _field(0.0, "L2 weight decay added to the gradient before the momentum (>= 0).")


@dataclasses.dataclass(frozen=True)
class StopConfig:
    """When an image is finished (docs/algorithm.md section 1.9)."""

    k_min: Union[int, str] = _field(3, "stop once q' <= k_min: an integer, or 'silhouette' to pick k* per "
                                       "image (docs/algorithm.md section 2).")
    max_iters: int = _field(1000, "stop after this many updates at most.")
    plateau: int = _field(0, "also stop once q' has not fallen below its lowest value for this many "
                             "updates (docs/algorithm.md section 6.4); 0 = off (the paper's rule).")


@dataclasses.dataclass(frozen=True)
class SilhouetteConfig:
    """The k* phase, used when stop.k_min = 'silhouette' (docs/algorithm.md section 2)."""

    features: str = _field("network", "features for k*: 'network' (initial p-dim feature map) or "
                                      "'color_position' (RGB + scaled xy).", ("network", "color_position"))
    k_range: tuple = _field((2, 12), "inclusive [low, high] range of k tried.")
    samples: int = _field(3000, "pixels sampled (seeded) for k-means and the silhouette score.")
    n_init: int = _field(3, "k-means restarts per k (the best is kept).")
    dims: int = _field(0, "> 0: project the sampled features on this many principal directions first "
                          "(cheaper k-means and distances); 0 = all features.")
    position_scale: float = _field(1.0, "weight of the (0..1 normalised) xy position in 'color_position' "
                                        "features.")


@dataclasses.dataclass(frozen=True)
class SuperpixelsConfig:
    """Superpixel-constrained targets (Kanezaki 2018; docs/algorithm.md section 6.5)."""

    method: str = _field("none", "'none' (the paper: each update's targets are the argmax labels), "
                                 "'felzenszwalb' or 'slic' (scikit-image, the superpixels extra): the "
                                 "targets are made constant inside each superpixel of the image, by "
                                 "majority.", ("none", "felzenszwalb", "slic"))
    max_segments: int = _field(4096, "the most superpixels an image may have (a static size of the "
                                     "compiled step; an image with more is an error).")
    scale: float = _field(25.0, "felzenszwalb: scale (larger: larger segments), at the size the network "
                                "sees.")
    sigma: float = _field(0.5, "felzenszwalb: width of the Gaussian smoothing first, in pixels.")
    min_size: int = _field(10, "felzenszwalb: smallest segment, in pixels.")
    reference_pixels: int = _field(0, "felzenszwalb: > 0: scale, sigma and min_size are for an image of "
                                      "this many pixels (as the network sees it); an image of r times as "
                                      "many pixels gets min_size times r and scale and sigma times "
                                      "r^(1/4), which keeps the number of superpixels about the same "
                                      "(measured on BSDS500). 0: they apply as given to every image.")
    n_segments: int = _field(400, "slic: approximate number of superpixels.")
    compactness: float = _field(10.0, "slic: colour against space (larger: squarer superpixels).")


# The superpixel fields read on the host only (the superpixels an image gets).
SUPERPIXEL_HOST_FIELDS = tuple(f"superpixels.{f.name}" for f in dataclasses.fields(SuperpixelsConfig)
                               if f.name not in ("method", "max_segments"))


@dataclasses.dataclass(frozen=True)
class PostprocessConfig:
    """Clean-up of each label map on the host, after the optimisation (docs/algorithm.md section 6.3)."""

    superpixel_vote: bool = _field(False, "with superpixels.method set: the final labels too are made "
                                          "constant in each superpixel (its most frequent label; ties: "
                                          "the lower), before the steps below.")
    connected: bool = _field(False, "give every 4-connected region of a cluster its own label (the "
                                    "BSDS authors advise scoring regions this way).")
    min_region: float = _field(0.0, "with connected = true: merge regions smaller than this fraction of "
                                    "the image's pixels into the adjacent region of the closest mean "
                                    "colour, smallest first; 0 = off.")


# Fields read on the host only, before an image enters its slot or after it leaves:
# they may differ between the images of one run.
POSTPROCESS_FIELDS = tuple(f"postprocess.{f.name}" for f in dataclasses.fields(PostprocessConfig))
HOST_FIELDS = SUPERPIXEL_HOST_FIELDS + POSTPROCESS_FIELDS


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How a run is laid out: slots, buckets, host syncs (README: How the engine works)."""

    strategy: str = _field("auto", "'per_image' (one jitted step per slot), 'vmap' (one step over all "
                                   "slots), or 'auto' (per_image on CPU, vmap on accelerators).",
                           ("auto", "per_image", "vmap"))
    batch: int = _field(0, "number of slots: images optimised at once, over all devices; 0 = auto: 4 "
                           "per device on CPU, 32 per device on accelerators (measured best on an H200).")
    devices: int = _field(1, "local devices the slots are spread over (jax.local_devices(); each holds "
                             "batch / devices slots, with the vmap strategy); 0 = all of them.")
    sync_every: int = _field(0, "read the done flags every this many steps (finished slots are frozen in "
                                "between, so results do not change); 0 = auto: 1 on CPU, 10 on "
                                "accelerators.")
    bucket_multiple: int = _field(16, "pad image height/width up to a multiple of this, so jit compiles "
                                      "once per bucket (1 = exact shapes).")
    transpose_portrait: bool = _field(True, "optimise portrait images transposed so that they share "
                                            "landscape buckets (changes their labels: the initial kernels "
                                            "meet the image transposed).")
    max_pixels: int = _field(4_000_000, "images with more pixels than this are rejected with an error "
                                        "(resize them first).")
    kstar_processes: int = _field(0, "with stop.k_min = 'silhouette': processes that run the k-means and "
                                     "silhouette scores of the silhouette phase beside the engine (0: in "
                                     "the engine process's loader threads). The features are still "
                                     "computed in the engine process. The processes are spawned: a "
                                     "Python script that sets this must guard its entry point with "
                                     "if __name__ == '__main__'.")


SECTIONS = {"model": ModelConfig, "schedule": ScheduleConfig, "optim": OptimConfig, "stop": StopConfig,
            "silhouette": SilhouetteConfig, "superpixels": SuperpixelsConfig, "postprocess": PostprocessConfig,
            "engine": EngineConfig}


@dataclasses.dataclass(frozen=True)
class Config:
    """Every knob of a DynaSeg run, in sections; fields are named by dotted paths.

    ``Config()`` is the default run (the ``dynaseg_scf`` preset). Change fields with
    ``config.replace({"optim.lr": 0.05, "engine.batch": 8})``; read them as
    ``config.optim.lr``. Every path and its doc: ``dynaseg config``.
    """

    seed: int = _field(0, "PRNG seed of the initial networks and of the silhouette sample.")
    init: str = _field("per_image", "initial network of each image: 'per_image' (its own, from "
                                    "fold_in(seed, crc32 of the image's output name): a fresh network "
                                    "per image as in the authors' script, reproducible and independent "
                                    "of the batch) or 'shared' (one network from seed for every image).",
                       ("per_image", "shared"))
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    stop: StopConfig = dataclasses.field(default_factory=StopConfig)
    silhouette: SilhouetteConfig = dataclasses.field(default_factory=SilhouetteConfig)
    superpixels: SuperpixelsConfig = dataclasses.field(default_factory=SuperpixelsConfig)
    postprocess: PostprocessConfig = dataclasses.field(default_factory=PostprocessConfig)
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)

    def replace(self, changes: Mapping[str, Any] | None = None, /, *, source: str = "replace",
                **sections) -> "Config":
        """A validated copy with fields changed.

        Args:
          changes: ``{dotted path: value}``, e.g. ``{"optim.lr": 0.05}`` (values are
            checked and coerced as from TOML).
          source: where the changes come from, for error messages (e.g. ``--grid``).
          **sections: whole sections or top-level fields, e.g. ``seed=1`` or
            ``optim=OptimConfig(lr=0.05)``.
        """
        config = dataclasses.replace(self, **sections) if sections else self
        if changes:
            config = _apply(config, dict(changes), source)
        return validate(config)

    def get(self, path: str) -> Any:
        """The value at a dotted path, e.g. ``config.get("optim.lr")``."""
        node = self
        for part in path.split("."):
            node = getattr(node, part)
        return node

    def flat(self) -> dict[str, Any]:
        """``{dotted path: value}`` of every field, in declaration order."""
        return {path: self.get(path) for path in field_paths()}


def _leaves(cls, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field]]:
    for f in dataclasses.fields(cls):
        if f.name in SECTIONS and cls is Config:
            yield from _leaves(SECTIONS[f.name], f"{f.name}.")
        else:
            yield prefix + f.name, f


def field_paths() -> list[str]:
    """Every dotted field path, in declaration order."""
    return [path for path, _ in _leaves(Config)]


def field_doc(path: str) -> str:
    """The doc of a dotted field path."""
    return _FIELDS[path].metadata["doc"]


_FIELDS = dict(_leaves(Config))
_DEFAULTS = Config()
# Flat names of earlier releases -> their dotted path (for "did you mean").
_RENAMED = {"schedule": "schedule.kind", "mu_uses_kstar": "schedule.uses_kstar",
            "n_clusters": "model.max_clusters", "silhouette_features": "silhouette.features",
            "silhouette_k_range": "silhouette.k_range", "silhouette_samples": "silhouette.samples",
            "silhouette_position_scale": "silhouette.position_scale"}


def _suggest(key: str) -> str:
    """' (did you mean optim.lr?)' for an unknown key, or ''."""
    if key in _RENAMED:
        return f" (did you mean {_RENAMED[key]}?)"
    by_leaf = [p for p in _FIELDS if p.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]]
    if by_leaf:
        return f" (did you mean {' or '.join(by_leaf)}?)"
    close = difflib.get_close_matches(key, list(_FIELDS), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _coerce(path: str, value: Any) -> Any:
    default = _FIELDS[path].default
    if path == "stop.k_min":
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{path} = {value!r}: an integer or 'silhouette'")
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{path} = {value!r}: expected true or false")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path} = {value!r}: expected an integer")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} = {value!r}: expected a number")
        return float(value)
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)) or len(value) != len(default):
            raise ConfigError(f"{path} = {value!r}: expected a list of {len(default)} items")
        return tuple(value)
    if not isinstance(value, str):
        raise ConfigError(f"{path} = {value!r}: expected a string")
    return value


def _flatten(values: Mapping, source: str, prefix: str = "") -> dict[str, Any]:
    """A TOML-style nested dict -> {dotted path: value}; unknown keys are errors."""
    flat = {}
    for key, value in values.items():
        path = prefix + str(key)
        if path in SECTIONS and prefix == "":
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: {path} = {value!r} is a section ([{path}]), not a value"
                                  f"{_suggest(path)}")
            flat.update(_flatten(value, source, f"{path}."))
        elif path in _FIELDS:
            flat[path] = value
        else:
            raise ConfigError(f"{source}: unknown field {path}{_suggest(path)}")
    return flat


def _apply(config: Config, changes: Mapping[str, Any], source: str) -> Config:
    """``config`` with ``{dotted path: value}`` (or nested dicts) applied, coerced."""
    nested = {}
    for key, value in changes.items():
        node = nested
        *parents, leaf = str(key).split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{source}: {key} conflicts with another value")
        node[leaf] = value
    flat = _flatten(nested, source)
    try:
        coerced = {path: _coerce(path, value) for path, value in flat.items()}
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    top = {p: v for p, v in coerced.items() if "." not in p}
    sections = {}
    for name in SECTIONS:
        fields = {p.split(".", 1)[1]: v for p, v in coerced.items() if p.startswith(f"{name}.")}
        if fields:
            sections[name] = dataclasses.replace(getattr(config, name), **fields)
    return dataclasses.replace(config, **top, **sections)


# The largest finite float32: mu, alpha and lr are float32 inside the step, so a value
# beyond it would become inf there (and alpha/q' or q'/alpha overflow with it).
_FLOAT32_MAX = 3.4028234663852886e38


def validate(config: Config) -> Config:
    """Checks every field; returns the config (with stop.k_min normalised).

    Raises:
      ConfigError: the first field out of its range, named by its dotted path.
    """
    for path, f in _FIELDS.items():
        choices = f.metadata["choices"]
        if choices and config.get(path) not in choices:
            raise ConfigError(f"{path} = {config.get(path)!r}: choose one of {', '.join(choices)}")
    k_min = config.stop.k_min
    if isinstance(k_min, str) and k_min != "silhouette":
        try:
            k_min = int(k_min)
        except ValueError:
            raise ConfigError(f"stop.k_min = {k_min!r}: an integer or 'silhouette'") from None
        config = dataclasses.replace(config, stop=dataclasses.replace(config.stop, k_min=k_min))
    if isinstance(k_min, int) and k_min < 1:
        raise ConfigError(f"stop.k_min = {k_min}: must be >= 1")
    if config.model.name not in TRUNK_MODELS:
        for path, default in (("model.trunk", "finetune"), ("model.trunk_norm", "batch")):
            if config.get(path) != default:
                raise ConfigError(f"{path} = {config.get(path)!r}: model {config.model.name!r} has no "
                                  f"pretrained trunk (only {', '.join(TRUNK_MODELS)})")
    if not (config.model.position >= 0 and math.isfinite(config.model.position)):
        raise ConfigError(f"model.position = {config.model.position}: a finite weight >= 0 (0 = no position channels)")
    min_region = config.postprocess.min_region
    if not 0.0 <= min_region < 1.0:
        raise ConfigError(f"postprocess.min_region = {min_region}: a fraction of the image, in [0, 1)")
    if config.postprocess.superpixel_vote and config.superpixels.method == "none":
        raise ConfigError("postprocess.superpixel_vote = true: votes in the superpixels of superpixels.method; "
                          "set it to 'felzenszwalb' or 'slic'")
    if min_region > 0 and not config.postprocess.connected:
        raise ConfigError(f"postprocess.min_region = {min_region}: merges connected regions; set "
                          f"postprocess.connected = true")
    if config.model.name != "cnn":
        for path, default in (("model.padding", "zeros"), ("model.output_norm", True),
                              ("model.input_space", "rgb"), ("model.position", 0.0),
                              ("model.emulate_precision", False), ("model.channel_multiple", 1)):
            if config.get(path) != default:
                raise ConfigError(f"{path} = {config.get(path)!r}: applies to model 'cnn' only (model "
                                  f"{config.model.name!r} keeps its published layers)")
    for path in ("engine.sync_every", "engine.batch", "engine.devices"):
        if config.get(path) < 0:
            raise ConfigError(f"{path} = {config.get(path)}: must be >= 0 (0 = auto)")
    if config.engine.kstar_processes < 0:
        raise ConfigError(f"engine.kstar_processes = {config.engine.kstar_processes}: must be >= 0 (0 = none)")
    if config.stop.plateau < 0:
        raise ConfigError(f"stop.plateau = {config.stop.plateau}: must be >= 0 (0 = off)")
    for path in ("superpixels.max_segments", "superpixels.n_segments", "superpixels.min_size",
                 "model.channel_multiple"):
        if int(config.get(path)) < 1:
            raise ConfigError(f"{path} = {config.get(path)}: must be >= 1")
    if config.superpixels.reference_pixels < 0:
        raise ConfigError(f"superpixels.reference_pixels = {config.superpixels.reference_pixels}: "
                          f"must be >= 0 (0 = sizes in pixels of every image)")
    for path in ("superpixels.scale", "superpixels.compactness"):
        if not config.get(path) > 0 or not math.isfinite(config.get(path)):
            raise ConfigError(f"{path} = {config.get(path)}: must be a finite number > 0")
    if not config.superpixels.sigma >= 0 or not math.isfinite(config.superpixels.sigma):
        raise ConfigError(f"superpixels.sigma = {config.superpixels.sigma}: must be a finite number >= 0")
    for path in ("stop.max_iters", "model.n_conv", "model.channels", "model.max_clusters",
                 "engine.bucket_multiple", "silhouette.samples", "silhouette.n_init", "engine.max_pixels"):
        if int(config.get(path)) < 1:
            raise ConfigError(f"{path} = {config.get(path)}: must be >= 1")
    for path in _FIELDS:
        value = config.get(path)
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ConfigError(f"{path} = {value!r}: not valid Unicode text") from None
    if not (0 <= config.seed < 2 ** 32):  # numpy's and scikit-learn's seeds are 32-bit
        raise ConfigError(f"seed = {config.seed}: must be in [0, 2^32)")
    if config.silhouette.dims < 0:
        raise ConfigError(f"silhouette.dims = {config.silhouette.dims}: must be >= 0 (0 = all features)")
    if any(isinstance(k, bool) or not isinstance(k, int) for k in config.silhouette.k_range):
        raise ConfigError(f"silhouette.k_range = {list(config.silhouette.k_range)}: two integers")
    lo, hi = config.silhouette.k_range
    if not 2 <= lo <= hi:
        raise ConfigError(f"silhouette.k_range = {list(config.silhouette.k_range)}: need 2 <= low <= high")
    for path in ("optim.lr", "schedule.mu", "schedule.alpha"):
        # mu and alpha are read by the schedule that uses them only, but a preset that
        # carries a nonsense value is refused even when another schedule is chosen.
        v = config.get(path)
        if not (math.isfinite(v) and 0 < v <= _FLOAT32_MAX):
            raise ConfigError(f"{path} = {v}: must be finite and > 0 (at most {_FLOAT32_MAX:.3g}, float32)")
    if not (math.isfinite(config.optim.momentum) and 0 <= config.optim.momentum < 1):
        raise ConfigError(f"optim.momentum = {config.optim.momentum}: must be in [0, 1)")
    wd = config.optim.weight_decay
    if not (math.isfinite(wd) and 0 <= wd <= _FLOAT32_MAX):
        raise ConfigError(f"optim.weight_decay = {wd}: must be finite and >= 0")
    return config


def from_dict(values: Mapping, base: Config | None = None, source: str = "config") -> Config:
    """A Config from ``base`` (default: defaults) with ``values`` (nested as in TOML, or
    ``{dotted path: value}``) applied and validated."""
    return validate(_apply(base or Config(), values, source))


def preset_dir() -> Path:
    """Where the named presets live (``configs/`` in the repository, shipped with the package)."""
    try:
        return Path(str(importlib.resources.files("dynaseg_jax.configs")))
    except ModuleNotFoundError:  # running from a source checkout without install
        return Path(__file__).resolve().parent.parent / "configs"


def list_presets() -> list[str]:
    return sorted(p.stem for p in preset_dir().glob("*.toml"))


def preset_description(name: str) -> str:
    """The first comment line of a preset file (what it is), without the '#'."""
    for line in (preset_dir() / f"{name}.toml").read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""


def load_config(name_or_path: str | None = None, overrides: list[str] | Mapping | None = None) -> Config:
    """Loads a preset by name (e.g. ``dynaseg_scf``) or a TOML file, then applies overrides.

    Args:
      name_or_path: a preset name, a path to a ``.toml`` file, or None for the defaults.
      overrides: ``["optim.lr=0.05", ...]`` (values parsed as TOML, else as strings) or
        a ``{dotted path: value}`` dict.

    Returns:
      The validated Config. Raises ConfigError with the file and field on bad input.
    """
    config = Config()
    if name_or_path is not None and not str(name_or_path).strip():
        raise ConfigError("--config '': give a preset name or a .toml file")
    if name_or_path:
        path = Path(name_or_path)
        if not path.suffix == ".toml" or not path.exists():
            candidate = preset_dir() / f"{name_or_path}.toml"
            if not candidate.exists():
                if path.suffix == ".toml":
                    raise ConfigError(f"{name_or_path}: no such config file")
                raise ConfigError(f"unknown config {name_or_path!r}; presets: {', '.join(list_presets())}")
            path = candidate
        try:
            values = tomllib.loads(path.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"{path}: cannot read config: {e}") from None
        config = from_dict(values, config, source=str(path))
    if overrides:
        if isinstance(overrides, Mapping):
            values = dict(overrides)
        else:
            values = {}
            for item in overrides:
                key, sep, raw = item.partition("=")
                if not sep or not key.strip():
                    raise ConfigError(f"--set {item!r}: expected key=value, e.g. optim.lr=0.05")
                values[key.strip()] = parse_value(raw.strip())
        config = from_dict(values, config, source="--set")
    return config


def parse_value(raw: str) -> Any:
    """'30' -> 30, '0.5' -> 0.5, 'true' -> True, '[2, 8]' -> [2, 8], other text -> str."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _toml_string(text: str) -> str:
    """A TOML basic string: backslash, quote and control characters escaped, everything
    else (any Unicode scalar value) written as itself."""
    out = []
    for ch in text:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04x}")
        elif 0xD800 <= code <= 0xDFFF:
            raise ConfigError(f"{text!r}: not valid Unicode text (a lone surrogate)")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(value: Any) -> str:
    """One TOML value: strings quoted (JSON escapes are valid TOML), booleans lower-case,
    floats always with a '.' or an exponent (so they read back as floats), tuples as arrays."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        text = repr(value)  # shortest round-tripping form, e.g. 0.1, 1e-05, 50.0
        return text if any(c in text for c in ".en") else text + ".0"
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def to_toml(config: Config, header: str = "") -> str:
    """The config as a TOML document that ``load_config`` reads back to an equal Config.

    Args:
      config: the Config to write.
      header: optional comment text put first (each line prefixed with '# ').

    Returns:
      TOML text: top-level fields, then one table per section; every field's doc is the
      comment above it.
    """
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    section = None
    for path in field_paths():
        name, _, leaf = path.rpartition(".")
        if name != section and name:
            section = name
            lines += ["", f"[{name}]", f"# {SECTIONS[name].__doc__.strip()}"]
        lines.append(f"# {field_doc(path)}")
        lines.append(f"{leaf} = {_toml_value(config.get(path))}")
    return "\n".join(lines) + "\n"


# Fields that decide how a run is laid out (how many images at once, how they are
# batched and padded, which images are admitted), not which labels an image gets:
# left out of the digest, so that a resume on another machine or with another batch
# size still resumes. Padding into buckets is exact (docs/algorithm.md section 1.10),
# so bucket_multiple changes only float rounding, as batch does. transpose_portrait is
# NOT layout: the initial kernels meet a transposed image, which changes its labels.
LAYOUT_FIELDS = ("engine.strategy", "engine.batch", "engine.devices", "engine.sync_every",
                 "engine.bucket_multiple", "engine.max_pixels", "engine.kstar_processes")
# Fields added after DIGEST_SCHEMA 2, with the value that reproduces the labels from
# before they existed: hashed only when set to something else, so that output folders
# written before a field existed still resume.
HASHED_WHEN_SET = {"postprocess.superpixel_vote": False, "model.emulate_precision": False,
                   "model.channel_multiple": 1, "superpixels.reference_pixels": 0}
# Bumped whenever the meaning of a field or the algorithm changes the labels of an
# unchanged config, or the digest's form changes, so that old output folders are not
# resumed into. 2: fields named by dotted paths.
DIGEST_SCHEMA = 2
# The same for what model.emulate_precision = true computes with the Winograd conv (and
# 'auto', which picks it), hashed only then, so that no other folder is invalidated.
# 2: Winograd convs round their transformed tiles.
EMULATION_SCHEMA = 2


def config_digest(config: Config, scale: float = 1.0) -> str:
    """A short fingerprint of everything that decides an image's labels.

    Args:
      config: the run's Config (as given: 'auto' fields are hashed as 'auto').
      scale: the resize factor applied before segmenting (``--scale``).

    Returns:
      16 hex digits of the SHA-256 of every field's dotted path and value except
      ``LAYOUT_FIELDS`` (and ``HASHED_WHEN_SET`` fields at that value), the scale and
      ``DIGEST_SCHEMA`` (and ``EMULATION_SCHEMA`` with ``model.emulate_precision`` and the
      Winograd conv).
    """
    fields = {p: v for p, v in config.flat().items()
              if p not in LAYOUT_FIELDS and not (p in HASHED_WHEN_SET and v == HASHED_WHEN_SET[p])}
    payload = {"schema": DIGEST_SCHEMA, "scale": float(scale), "config": fields}
    if config.model.emulate_precision and config.model.conv_impl in ("winograd", "auto"):
        payload["emulation_schema"] = EMULATION_SCHEMA
    text = json.dumps(payload, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
