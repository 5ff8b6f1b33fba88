"""Run configuration: a flat dataclass, presets as TOML files, ``key=value`` overrides.

TOML (not Python) so that a config file received from someone else cannot run code.
``to_toml`` writes a config back as TOML (with the field docs as comments) that
``load_config`` reads again; ``config_digest`` fingerprints the fields that decide
the labels, so an output folder can tell whether a resume uses the same settings.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import json
import math
import tomllib
from pathlib import Path
from typing import Any, Union


@dataclasses.dataclass(frozen=True)
class Config:
    """Every knob of a DynaSeg run. Field docs are in ``FIELD_DOCS`` and the README."""

    # Algorithm (docs/algorithm.md section 1).
    schedule: str = "scf"
    mu: float = 5.0
    alpha: float = 50.0
    k_min: Union[int, str] = 3
    max_iters: int = 1000
    n_conv: int = 2
    channels: int = 100
    n_clusters: int = 100
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    # Silhouette phase (docs/algorithm.md section 2), used when k_min = "silhouette".
    silhouette_features: str = "network"
    silhouette_k_range: tuple = (2, 12)
    silhouette_samples: int = 3000
    silhouette_position_scale: float = 1.0
    mu_uses_kstar: bool = False
    # Engine.
    strategy: str = "auto"
    conv_impl: str = "auto"
    matmul_precision: str = "float32"
    batch: int = 0
    sync_every: int = 0
    bucket_multiple: int = 16
    transpose_portrait: bool = True
    max_pixels: int = 4_000_000

    def replace(self, **changes) -> "Config":
        return validate(dataclasses.replace(self, **changes))


FIELD_DOCS = {
    "schedule": "mu schedule: 'fixed' (mu constant, Kim et al.), 'fsf' (mu = q'/alpha), 'scf' (mu = alpha/q').",
    "mu": "the constant mu of the 'fixed' schedule.",
    "alpha": "alpha of 'fsf' (paper: 15) or 'scf' (paper: 50).",
    "k_min": "stop once q' <= k_min: an integer, or 'silhouette' to pick k* per image (docs/algorithm.md section 2).",
    "max_iters": "stop after this many updates at most.",
    "n_conv": "number of conv3x3-ReLU-BN blocks (reference BSD script: 2).",
    "channels": "p, width of the feature extractor.",
    "n_clusters": "q, channels of the classifier = the most labels an image can get.",
    "lr": "SGD learning rate.",
    "momentum": "SGD momentum.",
    "weight_decay": "L2 weight decay added to the gradient (torch SGD semantics).",
    "seed": "PRNG seed of the initial network (the same for every image) and the silhouette sample.",
    "silhouette_features": "features for k*: 'network' (initial p-dim feature map) or 'color_position' (RGB + scaled xy).",
    "silhouette_k_range": "inclusive [low, high] range of k tried by the silhouette phase.",
    "silhouette_samples": "pixels sampled (seeded) for k-means and the silhouette score.",
    "silhouette_position_scale": "weight of the (0..1 normalised) xy position in 'color_position' features.",
    "mu_uses_kstar": "with silhouette: schedules see max(q', k*) instead of q' (as the reference COCO code); "
                     "it can only change the update on which the run stops (README: Configs).",
    "strategy": "'per_image' (one jitted step per slot), 'vmap' (one step over all slots), or 'auto' (per_image on CPU, vmap on accelerators).",
    "conv_impl": "3x3 conv formulation: 'lax', 'im2col', 'winograd' (F(4x4,3x3)), or 'auto' (the measured fastest: winograd).",
    "matmul_precision": "precision of the network's products with learned weights: 'float32' (exact, as the PyTorch reference's matmuls), 'tensorfloat32' or 'bfloat16' (faster on GPU/TPU; no effect on CPU).",
    "batch": "number of slots: images optimised at once; 0 = auto: 4 on CPU, 32 on accelerators (measured best on an H200).",
    "sync_every": "read the done flags every this many steps (finished slots are frozen in between, so results do not change); 0 = auto: 1 on CPU, 10 on accelerators.",
    "bucket_multiple": "pad image height/width up to a multiple of this, so jit compiles once per bucket (1 = exact shapes).",
    "transpose_portrait": "optimise portrait images transposed so that they share landscape buckets.",
    "max_pixels": "images with more pixels than this are rejected with an error (resize them first).",
}

CHOICES = {
    "schedule": ("fixed", "fsf", "scf"),
    "silhouette_features": ("network", "color_position"),
    "strategy": ("auto", "per_image", "vmap"),
    "conv_impl": ("auto", "lax", "im2col", "winograd"),
    "matmul_precision": ("float32", "tensorfloat32", "bfloat16"),
}


class ConfigError(ValueError):
    """A config file or override that cannot be used."""


def validate(config: Config) -> Config:
    """Checks every field; returns the config (with k_min normalised)."""
    for name, choices in CHOICES.items():
        if getattr(config, name) not in choices:
            raise ConfigError(f"{name} = {getattr(config, name)!r}: choose one of {', '.join(choices)}")
    k_min = config.k_min
    if isinstance(k_min, str) and k_min != "silhouette":
        try:
            k_min = int(k_min)
        except ValueError:
            raise ConfigError(f"k_min = {config.k_min!r}: an integer or 'silhouette'") from None
        config = dataclasses.replace(config, k_min=k_min)
    if isinstance(k_min, int) and k_min < 1:
        raise ConfigError(f"k_min = {k_min}: must be >= 1")
    for name in ("sync_every", "batch"):
        if getattr(config, name) < 0:
            raise ConfigError(f"{name} = {getattr(config, name)}: must be >= 0 (0 = auto)")
    positive = ("max_iters", "n_conv", "channels", "n_clusters",
                "bucket_multiple", "silhouette_samples", "max_pixels")
    for name in positive:
        if int(getattr(config, name)) < 1:
            raise ConfigError(f"{name} = {getattr(config, name)}: must be >= 1")
    lo, hi = config.silhouette_k_range
    if not 2 <= lo <= hi:
        raise ConfigError(f"silhouette_k_range = {config.silhouette_k_range}: need 2 <= low <= high")
    _check_optimiser(config)
    return config


# The largest finite float32: mu, alpha and lr are float32 inside the step, so a value
# beyond it would become inf there (and alpha/q' or q'/alpha overflow with it).
_FLOAT32_MAX = 3.4028234663852886e38


def _check_optimiser(config: Config) -> None:
    def finite_positive(name):
        v = getattr(config, name)
        if not (math.isfinite(v) and 0 < v <= _FLOAT32_MAX):
            raise ConfigError(f"{name} = {v}: must be finite and > 0 (at most {_FLOAT32_MAX:.3g}, float32)")

    finite_positive("lr")
    # mu and alpha are read by the schedule that uses them only, but a preset that
    # carries a nonsense value is checked even when another schedule is chosen.
    finite_positive("mu")
    finite_positive("alpha")
    if not (math.isfinite(config.momentum) and 0 <= config.momentum < 1):
        raise ConfigError(f"momentum = {config.momentum}: must be in [0, 1)")
    if not (math.isfinite(config.weight_decay) and 0 <= config.weight_decay <= _FLOAT32_MAX):
        raise ConfigError(f"weight_decay = {config.weight_decay}: must be finite and >= 0")


def _coerce(name: str, value: Any) -> Any:
    field = {f.name: f for f in dataclasses.fields(Config)}[name]
    default = field.default
    if name == "k_min":
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{name} = {value!r}: expected true or false")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} = {value!r}: expected an integer")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} = {value!r}: expected a number")
        return float(value)
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)) or len(value) != len(default):
            raise ConfigError(f"{name} = {value!r}: expected a list of {len(default)} items")
        return tuple(value)
    if not isinstance(value, str):
        raise ConfigError(f"{name} = {value!r}: expected a string")
    return value


def from_dict(values: dict, base: Config | None = None, source: str = "config") -> Config:
    """A Config from ``base`` (default: defaults) with ``values`` applied."""
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    try:
        coerced = {k: _coerce(k, v) for k, v in values.items()}
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return validate(dataclasses.replace(base or Config(), **coerced))


def preset_dir() -> Path:
    """Where the named presets live (``configs/`` in the repository, shipped with the package)."""
    try:
        return Path(str(importlib.resources.files("dynaseg_jax.configs")))
    except ModuleNotFoundError:  # running from a source checkout without install
        return Path(__file__).resolve().parent.parent / "configs"


def list_presets() -> list[str]:
    return sorted(p.stem for p in preset_dir().glob("*.toml"))


def load_config(name_or_path: str | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Loads a preset by name (e.g. ``dynaseg_scf``) or a TOML file, then applies overrides.

    Args:
      name_or_path: a preset name, a path to a ``.toml`` file, or None for the defaults.
      overrides: ``["key=value", ...]`` (values parsed as TOML, else as strings) or a dict.

    Returns:
      The validated Config. Raises ConfigError with the file and field on bad input.
    """
    config = Config()
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
        if isinstance(overrides, dict):
            values = dict(overrides)
        else:
            values = {}
            for item in overrides:
                key, sep, raw = item.partition("=")
                if not sep or not key.strip():
                    raise ConfigError(f"--set {item!r}: expected key=value")
                values[key.strip()] = parse_value(raw.strip())
        config = from_dict(values, config, source="--set")
    return config


def parse_value(raw: str) -> Any:
    """'30' -> 30, '0.5' -> 0.5, 'true' -> True, '[2, 8]' -> [2, 8], other text -> str."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


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
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def to_toml(config: Config, header: str = "") -> str:
    """The config as a TOML document that ``load_config`` reads back to an equal Config.

    Args:
      config: the Config to write.
      header: optional comment text put first (each line prefixed with '# ').

    Returns:
      TOML text: one ``name = value`` line per field, its doc as a comment above it.
    """
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    for f in dataclasses.fields(config):
        lines.append(f"# {FIELD_DOCS[f.name]}")
        lines.append(f"{f.name} = {_toml_value(getattr(config, f.name))}")
    return "\n".join(lines) + "\n"


# Fields that decide how a run is laid out (how many images at once, how they are
# batched and padded, which images are admitted), not which labels an image gets:
# left out of the digest, so that a resume on another machine or with another batch
# size still resumes. Padding into buckets is exact (docs/algorithm.md section 1.10),
# so bucket_multiple changes only float rounding, as batch does. transpose_portrait is
# NOT layout: the initial kernels meet a transposed image, which changes its labels.
LAYOUT_FIELDS = ("strategy", "batch", "sync_every", "bucket_multiple", "max_pixels")
# Bumped whenever the meaning of a field or the algorithm changes the labels of an
# unchanged config, so that old output folders are not resumed into.
DIGEST_SCHEMA = 1


def config_digest(config: Config, scale: float = 1.0) -> str:
    """A short fingerprint of everything that decides an image's labels.

    Args:
      config: the run's Config (as given: 'auto' fields are hashed as 'auto').
      scale: the resize factor applied before segmenting (``--scale``).

    Returns:
      16 hex digits of the SHA-256 of the algorithm, model, optimiser, seed and
      precision fields, the scale and ``DIGEST_SCHEMA``; ``LAYOUT_FIELDS`` are left out.
    """
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
              if f.name not in LAYOUT_FIELDS}
    payload = {"schema": DIGEST_SCHEMA, "scale": float(scale), "config": fields}
    text = json.dumps(payload, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
