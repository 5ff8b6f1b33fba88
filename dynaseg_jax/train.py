"""One image's optimisation state and its training step, as pure functions.

The state is a plain dict (big_vision style):
  params, opt_state: the network's trainable variables (``{"params": ...}``) and their
              SGD-momentum state, whose hyper-parameters (lr, momentum, weight decay)
              are values in the state (``optax.inject_hyperparams``);
  setting:    this image's schedule and stop values (``slot_setting``): with the
              optimiser's, every per-slot field (``PER_SLOT_FIELDS``) is a value, not a
              constant of the compiled step, so one compile serves every setting;
  step:       updates done so far (int32);
  n_clusters: q' of the last forward pass (int32);
  q_low:      the lowest q' so far (int32), and ``since_low`` the updates since q'
              last fell below it: the plateau stop rule (``stop.plateau``) reads them;
  k_min:      this image's stopping threshold (int32; k* under the silhouette phase);
  done:       True once the stop rule fired; a done state is frozen by ``train_step``;
  diverged:   True when an update met a non-finite loss or produced non-finite
              parameters (too large a learning rate); it also sets ``done``, and
              ``step`` then counts the update that diverged.

A model's variables split in two (``split_variables``): the trainable part, which each
image optimises in its own state, and the *shared* part, the same for every image and
never updated: a frozen trunk (``model.trunk = "frozen"``) and fixed BatchNorm statistics
(``model.trunk_norm = "running"``). The shared part is passed to the step and to predict
as an argument (``shared``), once for all images: it is not copied per image and has no
optimiser state.

``make_train_step`` returns an unjitted, unbatched function: jit it, or vmap it over
images that each carry their own state (``engine.py`` does both; ``shared`` is not
batched).
"""
from __future__ import annotations

import zlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import losses
from .models import build_model, load_pretrained, uses_pretrained
from .schedules import SCHEDULE_KINDS, per_slot
from .superpixels import majority_targets

# Config fields that may differ between the slots of one run (one compiled step): the
# optimiser's and the schedule's values and the stop rule live in each slot's state;
# seed, init and the silhouette phase act on the host before an image enters its slot.
PER_SLOT_FIELDS = ("seed", "init", "optim.lr", "optim.momentum", "optim.weight_decay", "schedule.kind",
                   "schedule.alpha", "schedule.mu", "schedule.uses_kstar", "stop.k_min", "stop.max_iters",
                   "stop.plateau",
                   "silhouette.features", "silhouette.k_range", "silhouette.samples", "silhouette.n_init",
                   "silhouette.dims",
                   "silhouette.position_scale")

INIT_SHAPE = (8, 8)  # parameter shapes do not depend on the image size


def _torch_sgd(learning_rate, momentum, weight_decay):
    # torch.optim.SGD: decay added to the gradient before the momentum trace; the trace
    # starts at zero, so the first trace equals the first gradient (torch's first
    # buffer); momentum 0 gives trace = gradient, plain SGD, with one state structure.
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.trace(decay=momentum),
                       optax.scale_by_learning_rate(learning_rate))


def make_optimizer(config) -> optax.GradientTransformation:
    """torch.optim.SGD(lr, momentum, weight_decay), its hyper-parameters held in the
    optimiser state (``optax.inject_hyperparams``), where each slot may set its own."""
    return optax.inject_hyperparams(_torch_sgd)(
        learning_rate=config.optim.lr, momentum=config.optim.momentum,
        weight_decay=config.optim.weight_decay)


def slot_setting(config) -> dict:
    """A config's per-slot values (``PER_SLOT_FIELDS`` that the step reads) as arrays:
    the optimiser's hyper-parameters and the schedule and stop values."""
    return {"learning_rate": jnp.asarray(config.optim.lr, jnp.float32),
            "momentum": jnp.asarray(config.optim.momentum, jnp.float32),
            "weight_decay": jnp.asarray(config.optim.weight_decay, jnp.float32),
            "schedule_kind": jnp.asarray(SCHEDULE_KINDS.index(config.schedule.kind), jnp.int32),
            "alpha": jnp.asarray(config.schedule.alpha, jnp.float32),
            "mu": jnp.asarray(config.schedule.mu, jnp.float32),
            "uses_kstar": jnp.asarray(bool(config.schedule.uses_kstar)),
            "max_iters": jnp.asarray(int(config.stop.max_iters), jnp.int32),
            "plateau": jnp.asarray(int(config.stop.plateau), jnp.int32)}


OPTIMIZER_HYPERPARAMS = ("learning_rate", "momentum", "weight_decay")


def image_key(seed: int, name: str) -> jax.Array:
    """The PRNG key of an image's own initial network (``init = "per_image"``):
    ``fold_in(PRNGKey(seed), crc32(name))``, ``name`` the image's output name (file stem
    or dataset id). CRC-32 of the UTF-8 bytes, not Python's ``hash()`` (salted per
    process), so the key is the same in every run, process and machine."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), np.uint32(zlib.crc32(name.encode("utf-8"))))


def _dummy_input(model):
    """A tiny image and mask to initialise ``model`` (parameter shapes do not depend on
    the image size; strided models need a minimum size)."""
    shape = (max(INIT_SHAPE[0], model.input_multiple),) * 2
    return jnp.zeros(shape + (3,), jnp.float32), jnp.ones(shape, jnp.float32)


def init_params(config, key: jax.Array | None = None, model=None):
    """Initial network variables (PyTorch-default init, pretrained trunk loaded) from
    ``key`` (default: ``PRNGKey(config.seed)``: the network every image shares under
    ``init = "shared"``, and the source of the pretrained trunk under "per_image").

    Args:
      config: a Config.
      key: PRNG key; default ``PRNGKey(config.seed)``.
      model: the network (default: ``build_model(config)``).
    """
    if key is None:
        key = jax.random.PRNGKey(config.seed)
    model = model or build_model(config)
    # jit: eager flax init dispatches op by op and takes seconds on CPU.
    params = jax.jit(model.init)(key, *_dummy_input(model))
    return load_pretrained(config, params)


def image_variables(config, model, base, key: jax.Array) -> dict:
    """An image's own initial variables (``init = "per_image"``; traceable): the model's
    init from ``key`` (``image_key``), with ``base``'s pretrained trunk (its weights and
    statistics) where the config loads one, since a checkpoint is the same for every image.

    Args:
      config: a Config.
      model: the network.
      base: ``init_params(config)``, the loaded pretrained trunk's source.
      key: the image's key.
    """
    fresh = model.init(key, *_dummy_input(model))
    if uses_pretrained(config):
        fresh = {c: {**tree, "trunk": base[c]["trunk"]} for c, tree in fresh.items()}
    return fresh


def split_variables(config, variables) -> tuple[dict, dict]:
    """(trainable, shared): a model's variables split as the config says.

    Shared: every collection other than ``params`` (``batch_stats``: fixed BatchNorm
    statistics), and the ``trunk`` sub-tree of ``params`` when ``model.trunk`` is
    "frozen". Trainable: the rest of ``params``. ``merge_variables`` undoes it.
    """
    shared = {k: v for k, v in variables.items() if k != "params"}
    trainable = dict(variables["params"])
    if config.model.trunk == "frozen":
        if "trunk" not in trainable:
            raise ValueError(f"model.trunk = 'frozen': model {config.model.name!r} has no trunk")
        shared["params"] = {"trunk": trainable.pop("trunk")}
    return {"params": trainable}, shared


def merge_variables(trainable: dict, shared: dict | None) -> dict:
    """The model's full variables from ``split_variables``' two parts (disjoint trees)."""
    if not shared:
        return trainable
    merged = dict(trainable)
    for collection, tree in shared.items():
        merged[collection] = {**merged.get(collection, {}), **tree}
    return merged


def init_state(config, params=None, k_min: int | jax.Array | None = None, setting: dict | None = None) -> dict:
    """A fresh per-image state from the model's full variables ``params`` (default:
    ``init_params(config)``); it keeps their trainable part (``split_variables``).
    ``setting``: the slot's values (``slot_setting``; default the config's), which may
    be traced arrays."""
    if params is None:
        params = init_params(config)
    params, _ = split_variables(config, params)
    if k_min is None:
        k_min = config.stop.k_min if isinstance(config.stop.k_min, int) else 1
    setting = slot_setting(config) if setting is None else setting
    opt_state = make_optimizer(config).init(params)
    opt_state = opt_state._replace(hyperparams={k: setting[k] for k in OPTIMIZER_HYPERPARAMS})
    return {
        "params": params,
        "opt_state": opt_state,
        "setting": {k: v for k, v in setting.items() if k not in OPTIMIZER_HYPERPARAMS},
        "step": jnp.zeros((), jnp.int32),
        "n_clusters": jnp.zeros((), jnp.int32),
        "q_low": jnp.asarray(np.iinfo(np.int32).max, jnp.int32),
        "since_low": jnp.zeros((), jnp.int32),
        "k_min": jnp.asarray(k_min, jnp.int32),
        "done": jnp.zeros((), jnp.bool_),
        "diverged": jnp.zeros((), jnp.bool_),
    }


def all_finite(tree) -> jax.Array:
    """True when every element of every leaf of ``tree`` is finite (one fused reduction)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def loss_terms(params, image, mask, *, model, schedule, step, k_min=None,
               mu_uses_kstar: bool | jax.Array = False, shared=None, segments=None,
               max_segments: int | None = None):
    """Forward pass and the DynaSeg loss. Returns (loss, aux dict).

    ``params``: the trainable variables; ``shared``: the rest (``split_variables``).
    ``segments``: the image's superpixel ids (< ``max_segments``), or None: the targets
    of L_sim are then the superpixels' majority labels (``superpixels.majority_targets``)
    instead of the argmax labels; q' still counts the argmax labels."""
    response = model.apply(merge_variables(params, shared), image, mask)
    labels = jax.lax.stop_gradient(losses.labels_from_response(response))
    n_clusters = losses.count_clusters(labels, mask, response.shape[-1])
    targets = labels
    if segments is not None:
        targets = majority_targets(labels, segments, mask, max_segments, response.shape[-1])
    l_sim = losses.similarity_loss(response, targets, mask)
    l_con = losses.continuity_loss(response, mask)
    # mu from max(q', k*) under uses_kstar (a per-slot value: a select, not a branch)
    seen = n_clusters if k_min is None else jnp.where(mu_uses_kstar, jnp.maximum(n_clusters, k_min), n_clusters)
    mu = schedule(seen, step)
    loss = l_sim + mu * l_con
    return loss, {"loss": loss, "l_sim": l_sim, "l_con": l_con, "mu": mu,
                  "n_clusters": n_clusters, "labels": labels}


def make_train_step(config, schedule: Callable | None = None, model=None):
    """Builds ``train_step(state, image, mask, shared=None, segments=None) -> (state, metrics)``
    for one image (``segments``: its superpixel ids, given exactly when the config's
    ``superpixels.method`` is not 'none').

    One step: forward pass, labels c = argmax r', q' = distinct labels, loss
    L_sim + mu(q', step) * L_con, SGD-momentum update, then the stop rule
    ``done = q' <= k_min or step + 1 == max_iters`` (docs/algorithm.md section 1.9), or
    q' has not fallen below its lowest value for ``plateau`` updates (``stop.plateau``
    > 0; section 6.4). A state that is
    already done is returned unchanged, so extra steps on finished slots are no-ops.
    A non-finite loss or updated parameters set ``diverged`` (and ``done``) inside the
    step, with no host sync: the engine reports that image as failed. ``shared``: the
    variables every image shares (``split_variables``; None when there are none).

    The optimiser's hyper-parameters, the schedule, ``max_iters`` and ``uses_kstar``
    are read from the state (``init_state``'s ``setting``), so the step compiled once
    runs every setting; only the model is fixed by ``config``.

    Args:
      config: a Config (its model; the rest is the default of ``init_state``).
      schedule: optional mu schedule ``(q', step) -> mu`` used instead of each slot's.
      model: optional flax module; default ``build_model(config)``.
    """
    model = model or build_model(config)
    optimizer = make_optimizer(config)

    uses_superpixels = config.superpixels.method != "none"

    def train_step(state, image, mask, shared=None, segments=None):
        if uses_superpixels != (segments is not None):
            raise ValueError(f"superpixels.method = {config.superpixels.method!r}: the step needs "
                             f"{'the image superpixels' if uses_superpixels else 'no superpixels'}")
        setting = state["setting"]
        mu_schedule = schedule or per_slot(setting["schedule_kind"], setting["alpha"], setting["mu"])

        def loss_fn(params):
            return loss_terms(params, image, mask, model=model, schedule=mu_schedule,
                              step=state["step"], k_min=state["k_min"],
                              mu_uses_kstar=setting["uses_kstar"], shared=shared, segments=segments,
                              max_segments=config.superpixels.max_segments)

        grads, aux = jax.grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        q = aux["n_clusters"]
        diverged = ~(jnp.isfinite(aux["loss"]) & all_finite(params))
        fell = q < state["q_low"]
        since_low = jnp.where(fell, 0, state["since_low"] + 1)
        plateaued = (setting["plateau"] > 0) & (since_low >= setting["plateau"])
        new = {
            "params": params,
            "opt_state": opt_state,
            "step": state["step"] + 1,
            "n_clusters": q,
            "q_low": jnp.minimum(q, state["q_low"]),
            "since_low": since_low,
            "k_min": state["k_min"],
            "setting": setting,
            "done": ((q <= state["k_min"]) | (state["step"] + 1 >= setting["max_iters"]) | plateaued
                     | diverged),
            "diverged": diverged,
        }
        frozen = state["done"]
        new = jax.tree.map(lambda old, upd: jnp.where(frozen, old, upd), state, new)
        metrics = {k: v for k, v in aux.items() if k != "labels"}
        return new, metrics

    return train_step


def make_predict(config, model=None):
    """``predict(params, image, mask, shared=None) -> labels (H, W) int32``: the final
    forward pass (``params`` trainable, ``shared`` the rest: ``split_variables``)."""
    model = model or build_model(config)

    def predict(params, image, mask, shared=None):
        return losses.labels_from_response(model.apply(merge_variables(params, shared), image, mask))

    return predict
