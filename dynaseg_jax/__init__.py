"""dynaseg_jax: DynaSeg unsupervised image segmentation in JAX/Flax.

Pure pieces for research (models, losses, mu schedules, the train step) and a batch
engine that optimises many images at once, each with its own network.
"""
from .config import Config, ConfigError, load_config
from .engine import Engine, SlotResult, WorkItem, bucket_shape
from .images import ImageError, load_image
from .losses import continuity_loss, count_clusters, labels_from_response, similarity_loss
from .model import DynaSegCNN, MaskedBatchNorm, build_model
from .schedules import fixed, fsf, make_schedule, scf
from .segment import segment, segment_files
from .silhouette import estimate_k
from .train import init_params, init_state, make_optimizer, make_predict, make_train_step

__version__ = "0.1.0"
