"""dynaseg_jax: DynaSeg unsupervised image segmentation in JAX/Flax.

Pure pieces for research (models, losses, mu schedules, the train step) and a batch
engine that optimises many images at once, each with its own network.

Names are imported on first use (PEP 562), so that ``import dynaseg_jax`` and the
command line's light commands do not pay for importing jax and scikit-learn.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS = {
    "Config": "config", "ConfigError": "config", "load_config": "config",
    "Engine": "engine", "SlotResult": "engine", "WorkItem": "engine", "bucket_shape": "engine",
    "ImageError": "images", "load_image": "images",
    "continuity_loss": "losses", "count_clusters": "losses", "labels_from_response": "losses",
    "similarity_loss": "losses",
    "DynaSegCNN": "models.cnn", "MaskedBatchNorm": "models.layers", "build_model": "models",
    "fixed": "schedules", "fsf": "schedules", "make_schedule": "schedules", "scf": "schedules",
    "segment": "runner", "segment_files": "runner",
    "estimate_k": "silhouette",
    "init_params": "train", "init_state": "train", "make_optimizer": "train",
    "make_predict": "train", "make_train_step": "train",
}
__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dynaseg_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return __all__
