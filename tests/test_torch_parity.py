"""Parity of ``dynaseg_jax`` with our PyTorch reference (``benchmarks/torch_reference.py``).

Both sides start from the same weights (torch's default init, converted to our flax
layout) and see the same float32 image. What is checked, and why the tolerances differ:

* step 0: response r' (atol 1e-4), labels, q', the loss terms and the first SGD
  update agree;
* teacher-forced, 20 steps: before every step the JAX state is set from torch's
  parameters and momentum, so each step is compared as a map on its own: losses agree
  to 1e-4 relative (measured: <= 4e-7), updated parameters to 1e-5 and the momentum
  (the gradients) to 1e-3 in norm: float32 gradients are ill-conditioned in channels
  that ReLU leaves almost empty before a BatchNorm, and jump to ~2e-4 at a few steps;
* free-running, 20 steps: the trajectories agree to float32 rounding for the first
  steps, then drift apart: the argmax labels flip at near-ties and the dynamics
  amplify rounding differences by up to ~10x per step. (In float64, with mu rounded
  the same way, the two agree to 1e-10 over 40 steps, so the drift is rounding, not a
  difference in the algorithm.) Hence a tight bound on the first steps, loose after;
* whole runs on real BSDS500 val images (downscaled): the iteration at which the stop
  rule fires, and the final labels, are close.

Run with ``-s`` to see the measured differences.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from dynaseg_jax import train  # noqa: E402
from dynaseg_jax.config import load_config  # noqa: E402
from dynaseg_jax.model import build_model  # noqa: E402
from dynaseg_jax.schedules import make_schedule  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BSDS_VAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "bsds500" / "images" / "val"

# The fsf preset (mu = q'/15): q' falls fast, so short runs reach a stop threshold.
# max_iters is static in the jitted step, so one value serves the whole module.
CONFIG = load_config("dynaseg_fsf", {"max_iters": 60, "conv_impl": "lax"})
IMPLS = ("lax", "im2col", "winograd")
TINY = (24, 32)
REAL = (48, 72)  # BSDS500 (321 x 481) downscaled ~6.7x, to keep the test fast on 2 cores
N_REAL = 4
N_STEPS = 20
EXACT_STEPS = 3  # free-running steps that must still agree to rounding
WHOLE_RUN_K_MIN = 20  # reached within ~8-20 iterations at REAL size under fsf
PASSAGE_THRESHOLDS = (80, 60, 40, 30, 25, 20)


def _import_reference():
    """benchmarks/ is not a package: load torch_reference.py from its path."""
    spec = importlib.util.spec_from_file_location(
        "torch_reference", REPO / "benchmarks" / "torch_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ref = _import_reference()


def _to_jax(tree):
    return jax.tree.map(jnp.asarray, tree)


def smooth_image(h: int, w: int) -> np.ndarray:
    """A smooth synthetic RGB image in [0, 1]: few near-ties, stable dynamics."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy, xx = yy / h, xx / w
    img = np.stack([np.sin(3 * xx + yy), np.cos(2 * yy - xx), xx * yy], axis=-1)
    return (0.5 + 0.5 * img).astype(np.float32)


def random_image(h: int, w: int) -> np.ndarray:
    """Uniform noise in [0, 1] (seeded)."""
    return np.random.default_rng(0).random((h, w, 3), dtype=np.float32)


@pytest.fixture(scope="module")
def real_images():
    """The first N_REAL BSDS500 val images as float32 RGB, landscape, REAL-sized."""
    if not BSDS_VAL.is_dir():
        pytest.skip(f"BSDS500 val images not found at {BSDS_VAL} "
                    "(expected in the 'shared' folder beside the repository)")
    from PIL import Image

    images = []
    for path in sorted(BSDS_VAL.glob("*.jpg"))[:N_REAL]:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if img.height > img.width:  # one shape for all: one compile
                img = img.transpose(Image.Transpose.ROTATE_90)
            img = img.resize((REAL[1], REAL[0]), Image.Resampling.BILINEAR)
            images.append((path.stem, np.asarray(img, np.float32) / 255.0))
    if not images:
        pytest.skip(f"no .jpg images in {BSDS_VAL}")
    return images


def get_image(kind: str, request) -> np.ndarray:
    """The test image named ``kind``: 'smooth', 'random' (both TINY) or 'real' (REAL)."""
    if kind == "smooth":
        return smooth_image(*TINY)
    if kind == "random":
        return random_image(*TINY)
    return request.getfixturevalue("real_images")[0][1]


@pytest.fixture(scope="module")
def init_weights():
    """(torch state dict, our params): the same seeded torch-default initial network."""
    torch.manual_seed(CONFIG.seed)
    state_dict = {k: v.clone() for k, v in ref.build_model(CONFIG).state_dict().items()}
    return state_dict, _to_jax(ref.torch_state_dict_to_jax_params(state_dict))


@pytest.fixture(scope="module")
def jax_fns():
    """Per conv impl: (jitted train step, jitted predict, jitted forward pass r').
    Module-scoped so that each (impl, image shape) compiles once for the whole file."""
    fns = {}
    for impl in IMPLS:
        config = CONFIG.replace(conv_impl=impl)
        fns[impl] = (jax.jit(train.make_train_step(config)),
                     jax.jit(train.make_predict(config)), jax.jit(build_model(config).apply))
    return fns


class TorchRun:
    """A torch network and optimiser from given weights, stepped one iteration at a time."""

    def __init__(self, state_dict, image: np.ndarray, config=CONFIG):
        self.model = ref.build_model(config)
        self.model.load_state_dict(state_dict)
        self.model.train()
        self.optimizer = ref.make_optimizer(self.model, config)
        self.schedule = ref.make_schedule(config)
        self.x = ref.image_to_tensor(image)
        self.t = 0

    def response(self) -> np.ndarray:
        """r' as (H, W, q)."""
        with torch.no_grad():
            return self.model(self.x)[0].permute(1, 2, 0).numpy()

    def step(self):
        """One DynaSeg iteration; returns (loss, aux) of its forward pass."""
        self.optimizer.zero_grad(set_to_none=True)
        loss, aux = ref.loss_terms(self.model(self.x), self.schedule, self.t)
        loss.backward()
        self.optimizer.step()
        self.t += 1
        return loss.item(), aux

    def params(self):
        return ref.torch_state_dict_to_jax_params(self.model.state_dict())

    def momentum(self):
        """The SGD momentum buffers, in our params layout (= optax's trace)."""
        buffers = {name: self.optimizer.state[p]["momentum_buffer"]
                   for name, p in self.model.named_parameters()}
        return ref.torch_state_dict_to_jax_params(buffers)

    def jax_state(self, k_min: int = 0) -> dict:
        """Our train state holding exactly this run's parameters, momentum and step."""
        state = train.init_state(CONFIG, _to_jax(self.params()), k_min=k_min)
        if self.t > 0:
            state["opt_state"] = optax.tree_utils.tree_set(
                state["opt_state"], trace=_to_jax(self.momentum()))
        state["step"] = jnp.asarray(self.t, jnp.int32)
        return state


def assert_trees_close(actual, expected, rtol: float, atol: float, what: str):
    """Per leaf: ||actual - expected|| <= rtol * ||expected|| + atol * sqrt(size).

    A norm, not an elementwise bound: single elements of a gradient are sums over all
    pixels with cancellation, so their relative rounding error is unbounded; and some
    gradients are exactly zero in exact arithmetic (a bias right before a BatchNorm),
    leaving only rounding noise, which ``atol`` absorbs.
    """
    flat_a = jax.tree_util.tree_flatten_with_path(actual)[0]
    flat_e = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    assert len(flat_a) == len(flat_e), f"{what}: trees differ"
    for path, a in flat_a:
        a, e = np.asarray(a, np.float64), np.asarray(flat_e[path], np.float64)
        assert a.shape == e.shape, f"{what} {jax.tree_util.keystr(path)}: shapes"
        err, scale = np.linalg.norm(a - e), np.linalg.norm(e)
        assert err <= rtol * scale + atol * np.sqrt(e.size), (
            f"{what} {jax.tree_util.keystr(path)}: |diff| {err:.2e} vs |expected| {scale:.2e}")


def assert_labels_match(labels, expected, response, margin: float = 1e-4):
    """Labels equal, except at pixels whose top-2 response gap is below ``margin``
    (there float32 rounding alone may pick the other channel)."""
    mismatch = np.asarray(labels) != np.asarray(expected)
    if mismatch.any():
        top2 = np.sort(response[mismatch], axis=-1)[:, -2:]
        gaps = top2[:, 1] - top2[:, 0]
        assert (gaps < margin).all(), (
            f"{mismatch.sum()} labels differ, top-2 gaps up to {gaps.max():.2e}")


def rel_diff(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b) / np.maximum(np.abs(b), 1e-12)


def first_passage(history, threshold: int):
    """Iterations a run with k_min = threshold would make: 1 + the first t with q'_t <= threshold.
    (A run with a higher k_min is a prefix of the same trajectory.)"""
    for t, q in enumerate(history):
        if q <= threshold:
            return t + 1
    return None


# ---------------------------------------------------------------------------------------


def test_converters_round_trip_and_match_our_layout(init_weights):
    state_dict, params = init_weights
    # Our init's tree and shapes, without running it (eager flax init is slow on CPU).
    ours = jax.eval_shape(lambda: train.init_params(CONFIG))
    shapes = lambda tree: jax.tree.map(lambda a: tuple(a.shape), tree)
    assert shapes(params) == shapes(ours)
    back = ref.jax_params_to_torch_state_dict(params)
    assert back.keys() == state_dict.keys()
    for k in state_dict:
        assert torch.equal(back[k], state_dict[k]), k
    again = ref.torch_state_dict_to_jax_params(back)
    jax.tree.map(np.testing.assert_array_equal, again, jax.tree.map(np.asarray, params))
    # Our layout converts into a model the reference loads strictly (every key and shape).
    zeros = jax.tree.map(lambda a: np.zeros(a.shape, np.float32), ours)
    ref.build_model(CONFIG).load_state_dict(ref.jax_params_to_torch_state_dict(zeros))


@pytest.mark.parametrize("schedule", ["fixed", "fsf", "scf"])
def test_schedules_match(schedule):
    config = CONFIG.replace(schedule=schedule, alpha=15.0 if schedule == "fsf" else 50.0)
    ours, theirs = make_schedule(config), ref.make_schedule(config)
    for q in (1, 3, 7, 50, 100):
        assert float(ours(jnp.int32(q), 0)) == pytest.approx(theirs(q, 0), rel=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["smooth", "random", "real"])
def test_step0_parity(kind, impl, init_weights, jax_fns, request):
    """Same weights, same image: the same response, labels, q', loss and first update."""
    image = get_image(kind, request)
    state_dict, params = init_weights
    step, _, forward = jax_fns[impl]
    mask = jnp.ones(image.shape[:2], jnp.float32)
    run = TorchRun(state_dict, image)

    response_t = run.response()
    response_j = np.asarray(forward(params, jnp.asarray(image), mask))
    print(f"\n[{kind}/{impl}] step 0: max |r'_jax - r'_torch| = "
          f"{np.abs(response_j - response_t).max():.2e}")
    np.testing.assert_allclose(response_j, response_t, atol=1e-4, rtol=0)
    # make_predict is this argmax; compiling it too would only cost time.
    assert_labels_match(response_j.argmax(-1), response_t.argmax(-1), response_t)

    loss_t, aux = run.step()
    new_state, metrics = step(train.init_state(CONFIG, params), jnp.asarray(image), mask)
    assert int(metrics["n_clusters"]) == aux["n_clusters"]
    assert float(metrics["mu"]) == pytest.approx(aux["mu"], rel=1e-6)
    assert float(metrics["l_sim"]) == pytest.approx(aux["l_sim"].item(), rel=1e-5)
    assert float(metrics["l_con"]) == pytest.approx(aux["l_con"].item(), rel=1e-5)
    assert float(metrics["loss"]) == pytest.approx(loss_t, rel=1e-5)
    assert_trees_close(new_state["params"], run.params(), rtol=1e-5, atol=1e-6,
                       what="params after the first update")


@pytest.mark.parametrize("impl", IMPLS)
def test_teacher_forced_steps(impl, init_weights, jax_fns):
    """Each of 20 steps, started from torch's exact state, gives torch's loss and update."""
    image = smooth_image(*TINY)
    state_dict, _ = init_weights
    step = jax_fns[impl][0]
    mask = jnp.ones(TINY, jnp.float32)
    run = TorchRun(state_dict, image)
    worst = 0.0
    for t in range(N_STEPS):
        new_state, metrics = step(run.jax_state(), jnp.asarray(image), mask)
        loss_t, aux = run.step()
        rel = float(rel_diff(metrics["loss"], loss_t))
        worst = max(worst, rel)
        assert rel < 1e-4, f"step {t}: loss {float(metrics['loss'])} vs torch {loss_t}"
        assert int(metrics["n_clusters"]) == aux["n_clusters"], f"step {t}"
        assert_trees_close(new_state["params"], run.params(), rtol=1e-5, atol=1e-6,
                           what=f"params after step {t}")
        # The momentum buffer holds the (decayed) gradients: the update itself.
        assert_trees_close(optax.tree_utils.tree_get(new_state["opt_state"], "trace"),
                           run.momentum(), rtol=1e-3, atol=1e-6, what=f"momentum after step {t}")
    print(f"\n[teacher-forced/{impl}] worst relative loss difference over {N_STEPS} steps: "
          f"{worst:.2e}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["smooth", "random"])
def test_free_running_losses(kind, impl, init_weights, jax_fns, request):
    """20 free-running steps: equal to rounding at first, then close (see module doc)."""
    image = get_image(kind, request)
    state_dict, params = init_weights
    step = jax_fns[impl][0]
    mask = jnp.ones(image.shape[:2], jnp.float32)
    result = ref.segment_image(image, CONFIG.replace(max_iters=N_STEPS), k_min=0,
                               init_state_dict=state_dict, record_losses=True)
    assert result["iterations"] == N_STEPS
    state = train.init_state(CONFIG, params, k_min=0)  # k_min 0: never stop early
    losses_j, clusters_j = [], []
    for _ in range(N_STEPS):
        state, metrics = step(state, jnp.asarray(image), mask)
        losses_j.append(float(metrics["loss"]))
        clusters_j.append(int(metrics["n_clusters"]))
    rel = rel_diff(losses_j, result["history"]["loss"])
    clusters_t = np.array(result["history"]["n_clusters"])
    print(f"\n[{kind}/{impl}] free-running relative loss differences: "
          + " ".join(f"{r:.0e}" for r in rel))
    print(f"  q' torch {clusters_t.tolist()}\n  q' jax   {clusters_j}")
    assert rel[:EXACT_STEPS].max() < 1e-4
    # Loose: measured medians 1e-4..3e-3 and maxima up to 4e-2 once trajectories drift.
    assert np.median(rel) < 1e-2 and rel.max() < 0.2
    assert np.all(np.abs(np.array(clusters_j) - clusters_t) <= np.maximum(2, 0.1 * clusters_t))


def test_whole_runs_real_images(real_images, init_weights, jax_fns):
    """Whole runs (real stop rule) on BSDS500 val images: similar stop iterations and labels."""
    state_dict, params = init_weights
    step, predict, _ = jax_fns["im2col"]  # CPU's default formulation
    config = CONFIG.replace(k_min=WHOLE_RUN_K_MIN)
    mask = jnp.ones(REAL, jnp.float32)
    stop_rel, passage_rel, agreement, stopped_early = [], [], [], 0
    print(f"\nwhole runs at {REAL[0]}x{REAL[1]}, fsf, k_min {WHOLE_RUN_K_MIN}, "
          f"max_iters {config.max_iters}:")
    for name, image in real_images:
        result = ref.segment_image(image, config, init_state_dict=state_dict, record_losses=True)
        x = jnp.asarray(image)
        state = train.init_state(config, params)
        clusters_j = []
        while not bool(state["done"]):
            state, metrics = step(state, x, mask)
            clusters_j.append(int(metrics["n_clusters"]))
        labels_j = np.asarray(predict(state["params"], x, mask))
        iters_t, iters_j = result["iterations"], int(state["step"])
        stop_rel.append(abs(iters_j - iters_t) / iters_t)
        stopped_early += iters_t < config.max_iters and iters_j < config.max_iters
        # Same initial network, so cluster ids are comparable pixel by pixel.
        agreement.append(float(np.mean(labels_j == result["labels"])))
        passages = []
        for k in PASSAGE_THRESHOLDS:
            pt, pj = first_passage(result["history"]["n_clusters"], k), first_passage(clusters_j, k)
            passages.append(f"{k}:{pt}/{pj}")
            if pt is not None and pj is not None:
                passage_rel.append(abs(pj - pt) / pt)
        print(f"  {name}: iterations torch {iters_t} jax {iters_j}; final clusters torch "
              f"{result['clusters']} jax {len(np.unique(labels_j))}; label agreement "
              f"{agreement[-1]:.3f}; first passage q'<=K (torch/jax) {' '.join(passages)}")
    print(f"  stop-iteration relative differences {np.round(stop_rel, 3).tolist()}; "
          f"first-passage: median {np.median(passage_rel):.3f} max {np.max(passage_rel):.3f}")
    assert stopped_early >= len(real_images) // 2, "too few runs reached k_min: test is vacuous"
    assert np.median(stop_rel) <= 0.1 and np.max(stop_rel) <= 0.35
    assert np.median(passage_rel) <= 0.1
    assert np.median(agreement) >= 0.8
