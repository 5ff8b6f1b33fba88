"""The batch engine: many images optimised at once on one device.

A fixed number of *slots* each hold one image's state (parameters, optimiser state,
stop flag), padded into a *bucket* shape so that jit compiles once per bucket. The
iteration loop runs on the host (XLA:CPU runs convolutions far slower inside
``lax.while_loop``; jax-ml/jax#12868): the engine dispatches ``sync_every`` steps,
reads the done flags, finalises finished slots and refills them with new images,
so a slow image never holds the others back. A finished slot is frozen by the step
itself, so steps run past its stop change nothing.

Strategies:
  ``per_image``: one jitted unbatched step per slot (fastest on XLA:CPU, where a vmap
      over per-image weights becomes a slower grouped convolution);
  ``vmap``: one jitted step over all slots, state buffers donated (accelerators).
``auto`` picks per_image on CPU with one device and vmap elsewhere.

Devices (``engine.devices``): with several, the slot axis of the vmap strategy is split
over a one-axis mesh of local devices (``jax.sharding.Mesh``, axis "slots"), and the step
runs under ``shard_map``, so each device steps its own slots with the computation of a
one-device run of ``batch / devices`` slots (fused differently by XLA inside the
multi-device program: equal to float32 rounding); the shared variables are replicated. An
automatically partitioned step could instead gather a batch-sharded grouped convolution
and compute it on every device (openxla/xla#47945). Refill stays per slot.
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter
from typing import Any, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import Mesh, NamedSharding, PartitionSpec

from . import train
from .config import HOST_FIELDS, LAYOUT_FIELDS, Config, ConfigError, config_digest, field_paths
from .models import build_model, default_conv_impl

SLOTS = "slots"  # the mesh axis the slots are split over


def resolve_config(config: Config, backend: str | None = None) -> Config:
    """Replaces 'auto' strategy/conv_impl and sync_every/batch/devices = 0 with the
    backend's choice, and checks the layout against the local devices.

    Raises:
      ConfigError: more devices than there are, a batch the devices do not divide, or
        several devices with the per_image strategy.
    """
    backend = backend or jax.default_backend()
    on_cpu = backend == "cpu"
    n_local = len(jax.local_devices(backend=backend))
    devices = config.engine.devices or n_local
    if devices > n_local:
        raise ConfigError(f"engine.devices = {devices}: this process has {n_local} local "
                          f"{backend} device{'s' * (n_local != 1)}")
    changes = {"engine.devices": devices} if devices != config.engine.devices else {}
    if config.engine.strategy == "auto":
        changes["engine.strategy"] = "per_image" if on_cpu and devices == 1 else "vmap"
    elif config.engine.strategy == "per_image" and devices > 1:
        raise ConfigError(f"engine.devices = {devices}: several devices need engine.strategy = 'vmap'")
    if config.model.conv_impl == "auto":
        changes["model.conv_impl"] = default_conv_impl(backend)
    if config.engine.sync_every == 0:
        changes["engine.sync_every"] = 1 if on_cpu else 10
    if config.engine.batch == 0:
        changes["engine.batch"] = (4 if on_cpu else 32) * devices
    elif config.engine.batch % devices:
        raise ConfigError(f"engine.batch = {config.engine.batch}: not a multiple of engine.devices = {devices}")
    return config.replace(changes) if changes else config


def bucket_shape(height: int, width: int, config: Config, model=None) -> tuple[int, int, bool]:
    """(bucket_h, bucket_w, transposed) for an image: a function of its own shape only,
    so its result never depends on the other images of a run.

    Args:
      height, width: the image's size.
      config: gives ``bucket_multiple`` and ``transpose_portrait``.
      model: the network (models/__init__.py contract): sides are rounded to a multiple
        of both ``bucket_multiple`` and its ``input_multiple``, and a portrait image is
        transposed only if the model is ``transposable``. None: a stride-free,
        transposable model (the CNN).
    """
    transposable = getattr(model, "transposable", True)
    transposed = bool(config.engine.transpose_portrait and transposable and height > width)
    if transposed:
        height, width = width, height
    m = math.lcm(config.engine.bucket_multiple, getattr(model, "input_multiple", 1))
    return -(-height // m) * m, -(-width // m) * m, transposed


@dataclasses.dataclass
class WorkItem:
    """One image to optimise: ``image`` is float32 RGB (H, W, 3) in [0, 1].

    ``name`` is the image's output name (file stem or dataset id): under ``init =
    "per_image"`` its initial network comes from ``train.image_key(seed, name)``; None
    starts it from the network shared by all (``init = "shared"``'s). ``setting``: the
    config this image runs with, which may differ from the engine's in the per-slot
    fields only (``train.PER_SLOT_FIELDS``: optimiser, schedule, stop rule, seed, init);
    None: the engine's. ``segments``: the image's superpixel ids
    (``superpixels.superpixel_map``), exactly when the config uses superpixels.
    """
    key: Any
    image: np.ndarray
    k_min: int
    name: str | None = None
    setting: Config | None = None
    segments: np.ndarray | None = None  # (H, W) superpixel ids, with superpixels.method


@dataclasses.dataclass
class SlotResult:
    key: Any
    labels: np.ndarray      # (H, W) int32, raw argmax ids (not renumbered)
    iterations: int         # updates performed
    clusters: int           # distinct labels in ``labels``
    k_min: int
    seconds: float          # wall time the image held its slot
    error: str | None = None  # set when the optimisation diverged (labels meaningless)


def pad_to_bucket(image: np.ndarray, bucket: tuple[int, int, bool]):
    """Image and mask padded (bottom/right) into the bucket, transposed if asked."""
    bh, bw, transposed = bucket
    if transposed:
        image = image.transpose(1, 0, 2)
    h, w, _ = image.shape
    padded = np.zeros((bh, bw, 3), np.float32)
    padded[:h, :w] = image
    mask = np.zeros((bh, bw), np.float32)
    mask[:h, :w] = 1.0
    return padded, mask


def pad_segments(segments: np.ndarray, bucket: tuple[int, int, bool]) -> np.ndarray:
    """Superpixel ids padded like ``pad_to_bucket``'s image (padding: id 0, masked)."""
    bh, bw, transposed = bucket
    if transposed:
        segments = segments.T
    padded = np.zeros((bh, bw), np.int32)
    padded[: segments.shape[0], : segments.shape[1]] = segments
    return padded


def unpad_labels(labels: np.ndarray, shape: tuple[int, int], transposed: bool) -> np.ndarray:
    h, w = shape
    if transposed:
        return np.ascontiguousarray(labels[:w, :h].T)
    return labels[:h, :w]


class Engine:
    """Runs DynaSeg on a stream of images with ``config.engine.batch`` slots.

    Args:
      config: a Config; 'auto' strategy/conv_impl are resolved for the default backend.
      params: initial network parameters (default: ``train.init_params(config)``).
      model: the network, built once and shared with the train step and predict
        (default: ``build_model(config)``).
      mesh: the device mesh of the vmap strategy, axis "slots" (default: the first
        ``engine.devices`` local devices when there are several, else none); a
        one-device mesh runs the sharded path on one device (benchmarks).

    ``run(items)`` yields a SlotResult per WorkItem, in completion order.
    ``trace_counts`` counts how often each (strategy, bucket) step was traced.
    At most ``engine.batch`` images are optimised at once, whatever their buckets; the next
    item is pulled only when one of them has finished. ``input_wait`` (reset by each
    ``run``): seconds spent waiting for the next item (its k*, its file) while optimised
    slots waited for it (``"running"``: the device stood still mid-run) and otherwise
    (``"idle"``: filling the first batch, or no slot left running).
    """

    def __init__(self, config: Config, params=None, model=None, mesh: Mesh | None = None):
        self.config = resolve_config(config)
        self.model = model or build_model(self.config)
        self.params = params if params is not None else train.init_params(self.config, model=self.model)
        self.fresh_state = train.init_state(self.config, self.params)
        self._image_variables = jax.jit(
            lambda key, base: train.image_variables(self.config, self.model, base, key))
        self._image_state = jax.jit(
            lambda key, base, setting: train.init_state(
                self.config, train.image_variables(self.config, self.model, base, key), setting=setting))
        self._checked_settings: set = set()
        # One-axis mesh over the local devices the slots are spread over (None: one device).
        n_devices = self.config.engine.devices
        if mesh is None and n_devices > 1:
            mesh = Mesh(np.array(jax.local_devices()[:n_devices]), (SLOTS,))
        if mesh is not None and (mesh.axis_names != (SLOTS,) or self.config.engine.batch % mesh.size):
            raise ConfigError(f"mesh: one axis named {SLOTS!r} whose size divides engine.batch")
        self.mesh = mesh
        # Variables every slot shares (a frozen trunk, fixed BatchNorm statistics): on the
        # device(s) once, passed unbatched to every step.
        shared = train.split_variables(self.config, self.params)[1]
        self.shared = jax.device_put(shared, self.sharding(replicated=True))
        self.trace_counts: Counter = Counter()
        # Chunks of sync_every steps as a fori_loop (accelerators) or unrolled (CPU).
        self.loop_chunks = jax.default_backend() != "cpu"
        self._fns: dict = {}
        self._train_step = train.make_train_step(self.config, model=self.model)
        self.uses_superpixels = self.config.superpixels.method != "none"
        self._predict = train.make_predict(self.config, model=self.model)
        self.input_wait = {"running": 0.0, "idle": 0.0}

    def sharding(self, replicated: bool = False):
        """Where slot-stacked arrays live: split over the mesh's slot axis (replicated:
        a copy on every device); None (the default device) without a mesh."""
        if self.mesh is None:
            return None
        return NamedSharding(self.mesh, PartitionSpec() if replicated else PartitionSpec(SLOTS))

    def compile_counts(self) -> dict:
        """Compiled executables per cached function (tag -> count): a retrace that hits
        the cache is not counted, a recompilation is."""
        return {tag: fn._cache_size() for tag, fn in self._fns.items()}

    # -- compiled functions, cached per bucket ------------------------------------------
    def _counted(self, fn, tag):
        def wrapped(*args):
            self.trace_counts[tag] += 1  # runs at trace time only
            return fn(*args)
        return wrapped

    def step_fn(self, bucket, vectorized: bool):
        tag = ("vmap" if vectorized else "per_image", bucket[:2])
        if tag not in self._fns:
            n = self.config.engine.sync_every
            base = (jax.vmap(self._train_step, in_axes=(0, 0, 0, None, 0)) if vectorized
                    else self._train_step)

            unroll = not self.loop_chunks

            def steps(state, image, mask, shared, segments):
                # A chunk of n steps per dispatch: no host sync in between. Unrolled on
                # CPU, where convs inside lax loops run far slower (jax-ml/jax#12868);
                # a fori_loop elsewhere, so compile time does not grow with n.
                if unroll or n == 1:
                    for _ in range(n):
                        state, _ = base(state, image, mask, shared, segments)
                    return state
                return jax.lax.fori_loop(0, n, lambda _, s: base(s, image, mask, shared, segments)[0], state)

            if vectorized and self.mesh is not None:
                # Each device steps its own block of slots (module docstring).
                split, whole = PartitionSpec(SLOTS), PartitionSpec()
                steps = jax.shard_map(steps, mesh=self.mesh, in_specs=(split, split, split, whole, split),
                                      out_specs=split)
            self._fns[tag] = jax.jit(self._counted(steps, tag), donate_argnums=0)
        return self._fns[tag]

    def predict_fn(self, vectorized: bool):
        tag = ("predict", vectorized)
        if tag not in self._fns:
            if vectorized:
                whole = self.sharding(replicated=True)

                def predict(params, images, masks, slot, shared):
                    picked = jax.tree.map(lambda x: x[slot], (params, images, masks))
                    if whole is not None:
                        # One image's forward pass, whole on every device: never split
                        # by the partitioner (which would change its rounding).
                        picked = jax.lax.with_sharding_constraint(picked, whole)
                    return self._predict(*picked, shared)
            else:
                predict = self._predict
            self._fns[tag] = jax.jit(predict)
        return self._fns[tag]

    def set_slot_fn(self):
        if "set_slot" not in self._fns:
            def set_slot(states, images, masks, segments, slot, state, image, mask, segment_map):
                put = lambda big, one: big.at[slot].set(one)
                return (jax.tree.map(put, states, state), put(images, image), put(masks, mask),
                        jax.tree.map(put, segments, segment_map))  # None without superpixels
            split = self.sharding()  # keep the slot axis where it is
            out = None if split is None else (split, split, split, split)
            self._fns["set_slot"] = jax.jit(set_slot, donate_argnums=(0, 1, 2, 3), out_shardings=out)
        return self._fns["set_slot"]

    def check_setting(self, setting: Config) -> None:
        """Raises ConfigError unless ``setting`` differs from the engine's config in
        per-slot and layout fields only (the rest shapes the compiled program)."""
        digest = config_digest(setting)
        if digest in self._checked_settings:
            return
        resolved = resolve_config(setting.replace({p: self.config.get(p) for p in LAYOUT_FIELDS}))
        free = train.PER_SLOT_FIELDS + HOST_FIELDS  # per-slot values, host-side steps
        for path in field_paths():
            if path not in free and resolved.get(path) != self.config.get(path):
                raise ConfigError(f"{path} = {setting.get(path)!r}: differs from the run's "
                                  f"{self.config.get(path)!r}, and it shapes the compiled program; only "
                                  f"{', '.join(free)} may differ between the images of a run")
        self._checked_settings.add(digest)

    def _key(self, setting: Config, name: str | None) -> jax.Array | None:
        """The PRNG key of an image's initial network; None: the engine's own network."""
        if setting.init == "per_image" and name is not None:
            return train.image_key(setting.seed, name)
        return None if setting.seed == self.config.seed else jax.random.PRNGKey(setting.seed)

    def initial_variables(self, name: str | None = None, setting: Config | None = None) -> dict:
        """The full initial variables of the image called ``name`` (its own network under
        ``init = "per_image"``; the shared one under "shared" or for ``name`` None)."""
        key = self._key(setting or self.config, name)
        return self.params if key is None else self._image_variables(key, self.params)

    def new_state(self, k_min: int, name: str | None = None, setting: Config | None = None):
        """A fresh slot state for the image called ``name``, running ``setting`` (default:
        the engine's config; ``initial_variables``, ``train.slot_setting``)."""
        if setting is None or setting is self.config:
            setting = self.config
        else:
            self.check_setting(setting)
        key = self._key(setting, name)
        if key is None and setting is self.config:
            state = self.fresh_state
        else:
            if key is None:
                key = jax.random.PRNGKey(setting.seed)
            state = self._image_state(key, self.params, train.slot_setting(setting))
        return {**state, "k_min": jnp.asarray(k_min, jnp.int32)}

    # -- the host loop ------------------------------------------------------------------
    def run(self, items: Iterable[WorkItem]) -> Iterator[SlotResult]:
        """Optimises every item; yields results as images finish."""
        groups: dict[tuple, _SlotGroup] = {}
        source = iter(items)
        exhausted = False
        self.input_wait = {"running": 0.0, "idle": 0.0}
        stepped = False  # whether a step has run: waits before the first fill the batch
        while True:
            # At most engine.batch images are optimised at once, over all buckets (so an
            # item's group always has a free slot). Pull only when one of them is free:
            # waiting for an item (its k*) with every slot busy would stop the device for
            # an item it could not take.
            while not exhausted:
                n_active = sum(g.n_active for g in groups.values())
                if n_active >= self.config.engine.batch:
                    break
                t0 = time.perf_counter()
                item = next(source, None)
                self.input_wait["running" if stepped and n_active else "idle"] += time.perf_counter() - t0
                if item is None:
                    exhausted = True
                    break
                h, w, _ = item.image.shape
                bucket = bucket_shape(h, w, self.config, self.model)
                group = groups.get(bucket[:2])
                if group is None:
                    # Free the slot memory of drained buckets before opening a new one.
                    for k in [k for k, g in groups.items() if g.n_active == 0]:
                        del groups[k]
                    group = groups[bucket[:2]] = _SlotGroup(self, bucket[:2])
                group.load(item, bucket[2])
            active = [g for g in groups.values() if g.n_active]
            if not active:
                return
            for g in active:
                g.advance()
            stepped = True
            for g in active:
                yield from g.collect()


class _SlotGroup:
    """``batch`` slots of one bucket shape, per_image (list of states) or vmap (stacked)."""

    def __init__(self, engine: Engine, shape: tuple[int, int]):
        self.engine = engine
        self.shape = shape
        self.vectorized = engine.config.engine.strategy == "vmap"
        self.n_slots = engine.config.engine.batch
        self.items: list[tuple | None] = [None] * self.n_slots  # (item, transposed, t0)
        bh, bw = shape
        self.step = engine.step_fn(shape + (False,), self.vectorized)
        self.predict = engine.predict_fn(self.vectorized)
        if self.vectorized:
            empty = {**engine.fresh_state, "done": jnp.ones((), jnp.bool_)}
            stack = lambda x: jnp.broadcast_to(x, (self.n_slots,) + x.shape)
            split = engine.sharding()
            self.states = jax.device_put(jax.tree.map(lambda x: jnp.array(stack(x)), empty), split)
            self.images = jax.device_put(jnp.zeros((self.n_slots, bh, bw, 3), jnp.float32), split)
            self.masks = jax.device_put(jnp.zeros((self.n_slots, bh, bw), jnp.float32), split)
            self.segments = (jax.device_put(jnp.zeros((self.n_slots, bh, bw), jnp.int32), split)
                             if engine.uses_superpixels else None)
        else:
            self.states = [None] * self.n_slots
            self.images = [None] * self.n_slots
            self.masks = [None] * self.n_slots
            self.segments = [None] * self.n_slots

    @property
    def n_active(self) -> int:
        return sum(it is not None for it in self.items)

    def load(self, item: WorkItem, transposed: bool) -> None:
        slot = self.items.index(None)
        image, mask = pad_to_bucket(item.image, self.shape + (transposed,))
        if self.engine.uses_superpixels != (item.segments is not None):
            raise ValueError(f"{item.key}: superpixels.method = "
                             f"{self.engine.config.superpixels.method!r}, but the item "
                             f"{'has no' if item.segments is None else 'has'} superpixels")
        segments = None if item.segments is None else pad_segments(item.segments, self.shape + (transposed,))
        state = self.engine.new_state(item.k_min, item.name, item.setting)
        if self.vectorized:
            self.states, self.images, self.masks, self.segments = self.engine.set_slot_fn()(
                self.states, self.images, self.masks, self.segments, slot, state, image, mask, segments)
        else:
            # A private copy: the step donates (and so invalidates) its input state.
            self.states[slot] = jax.tree.map(jnp.array, state)
            self.images[slot] = jnp.asarray(image)
            self.masks[slot] = jnp.asarray(mask)
            self.segments[slot] = None if segments is None else jnp.asarray(segments)
        self.items[slot] = (item, transposed, time.perf_counter())

    def advance(self) -> None:
        if self.vectorized:
            self.states = self.step(self.states, self.images, self.masks, self.engine.shared, self.segments)
        else:
            for slot, it in enumerate(self.items):
                if it is not None:
                    self.states[slot] = self.step(self.states[slot], self.images[slot], self.masks[slot],
                                                  self.engine.shared, self.segments[slot])

    def collect(self) -> Iterator[SlotResult]:
        if self.vectorized:
            done = np.asarray(self.states["done"])
            if any(it is not None and done[s] for s, it in enumerate(self.items)):
                # One transfer for all finished slots, not a device index per slot.
                steps_all, diverged_all = jax.device_get((self.states["step"], self.states["diverged"]))
        else:
            done = [it is not None and bool(self.states[s]["done"]) for s, it in enumerate(self.items)]
        for slot, it in enumerate(self.items):
            if it is None or not done[slot]:
                continue
            item, transposed, t0 = it
            if self.vectorized:
                labels = self.predict(self.states["params"], self.images, self.masks, slot,
                                      self.engine.shared)
                steps, diverged = int(steps_all[slot]), bool(diverged_all[slot])
            else:
                state = self.states[slot]
                labels = self.predict(state["params"], self.images[slot], self.masks[slot],
                                      self.engine.shared)
                steps = int(state["step"])
                diverged = bool(state["diverged"])
                self.states[slot] = self.images[slot] = self.masks[slot] = self.segments[slot] = None
            error = None
            if diverged:
                error = (f"diverged: non-finite loss or parameters at iteration {steps} "
                         f"(lr = {self.engine.config.optim.lr}; try a smaller lr)")
            labels = unpad_labels(np.asarray(labels), item.image.shape[:2], transposed)
            self.items[slot] = None
            yield SlotResult(key=item.key, labels=labels, iterations=steps,
                             clusters=int(len(np.unique(labels))), k_min=int(item.k_min),
                             seconds=time.perf_counter() - t0, error=error)
