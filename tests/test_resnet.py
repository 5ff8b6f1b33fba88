"""resnet18_fpn against PyTorch: torchvision's ResNet-18 trunk (C2..C5) and our PyTorch
version of the whole network (``benchmarks/torch_reference.py``), both from the same
random weights (no ImageNet checkpoint is needed to check the arithmetic), plus a whole
segmentation through the engine.

Tolerances: a float64 torch run of the same weights and image is the truth. JAX's
float32 error against it must be within a small multiple of torch's own float32 error
(both do the same float32 operations over reductions of the same lengths, in different
orders: a blocked against a pairwise sum changes a sum's error by about sqrt(8..16),
hence the factor 4), plus a floor u * sqrt(K) * ||truth|| (u = 2^-24, the unit roundoff;
K = 9 * 512, the longest reduction of one output, a conv3x3 over 512 channels) for the
case where torch happens to be nearly exact.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import require

torch = require("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dynaseg_jax.models import resnet  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
U = 2.0 ** -24
K_LONGEST = 9 * 512
SHAPE = (45, 70)  # odd and not a multiple of 32: every stride rounds up
BUCKET = (64, 96)


def _reference():
    spec = importlib.util.spec_from_file_location("torch_reference", REPO / "benchmarks" / "torch_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ref = _reference()


@pytest.fixture(scope="module")
def nets():
    """(torch FPN float32, the same in float64, our params float32) from one seeded init."""
    torch.manual_seed(0)
    t32 = ref.TorchResNet18FPN(16, 8).train()
    params = jax.tree.map(jnp.asarray, ref.torch_fpn_to_jax_params(t32))
    return t32, float64_twin(t32, ref.TorchResNet18FPN(16, 8)), params


def float64_twin(t32, blank):
    """``blank`` (a network of ``t32``'s class) with ``t32``'s weights, in float64 and in
    ``t32``'s train/eval mode: the truth the float32 runs are measured against."""
    blank.load_state_dict(t32.state_dict())
    return blank.double().train(t32.training)


def image():
    return np.random.default_rng(0).random(SHAPE + (3,), dtype=np.float32)


def to_torch(img, dtype):
    return torch.from_numpy(img.transpose(2, 0, 1)[None].copy()).to(dtype)


def assert_within_torch_error(ours, t32, t64, what, k_longest: int = K_LONGEST):
    """||ours - t64|| <= 4 ||t32 - t64|| + u sqrt(k_longest) ||t64|| (module docstring)."""
    ours, t32, t64 = (np.asarray(a, np.float64) for a in (ours, t32, t64))
    err_j, err_t = np.linalg.norm(ours - t64), np.linalg.norm(t32 - t64)
    bound = 4 * err_t + U * np.sqrt(k_longest) * np.linalg.norm(t64)
    print(f"{what}: |jax - truth| {err_j:.2e}, |torch32 - truth| {err_t:.2e}, "
          f"ratio {err_j / max(err_t, 1e-300):.2f}, allowed {bound:.2e}")
    assert err_j <= bound, f"{what}: |jax - truth| {err_j:.2e} > {bound:.2e}"


def test_trunk_stages_match_torchvision(nets):
    t32, t64, params = nets
    img = image()
    trunk = resnet.ResNet18Trunk(precision="float32")
    ours = jax.jit(trunk.apply)({"params": params["params"]["trunk"]}, jnp.asarray(img), jnp.ones(SHAPE))
    mean = np.array(resnet.IMAGENET_MEAN, np.float32)
    std = np.array(resnet.IMAGENET_STD, np.float32)
    x = (img - mean) / std
    with torch.no_grad():
        want32 = t32.stages(to_torch(x, torch.float32))
        want64 = t64.stages(to_torch(x, torch.float64))
    for level, (a, b, c, hw) in enumerate(zip(ours, want32, want64, resnet.stage_shapes(*SHAPE), strict=True), 2):
        assert a.shape[:2] == hw == tuple(b.shape[-2:])
        assert_within_torch_error(a, b[0].permute(1, 2, 0), c[0].permute(1, 2, 0), f"C{level}")


def test_fpn_response_matches_torch_and_is_padding_exact(nets):
    t32, t64, params = nets
    img = image()
    model = resnet.ResNet18FPN(16, 8, precision="float32")
    apply = jax.jit(model.apply)
    ours = apply(params, jnp.asarray(img), jnp.ones(SHAPE))
    with torch.no_grad():
        want32 = t32(to_torch(img, torch.float32))[0].permute(1, 2, 0)
        want64 = t64(to_torch(img, torch.float64))[0].permute(1, 2, 0)
    assert_within_torch_error(ours, want32, want64, "r'")
    # In a bucket (multiple of 32) with any padding content: the same response.
    padded = np.random.default_rng(1).random(BUCKET + (3,), dtype=np.float32)
    padded[:SHAPE[0], :SHAPE[1]] = img
    mask = np.zeros(BUCKET, np.float32)
    mask[:SHAPE[0], :SHAPE[1]] = 1
    got = np.asarray(apply(params, jnp.asarray(padded), jnp.asarray(mask)))
    assert_within_torch_error(got[:SHAPE[0], :SHAPE[1]], want32, want64, "r' in a bucket")


def test_bilinear_upsampling_clamps_at_the_real_edge():
    # torch's bilinear x4 of a 3x5 map, against ours on the map padded to 8x8.
    x = np.random.default_rng(2).normal(size=(3, 5, 2)).astype(np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(x.transpose(2, 0, 1)[None].copy()),
                                           scale_factor=4, mode="bilinear", align_corners=False)
    want = want[0].permute(1, 2, 0).numpy()
    padded = np.full((8, 8, 2), 7.0, np.float32)
    padded[:3, :5] = x
    mask = np.zeros((8, 8), np.float32)
    mask[:3, :5] = 1
    got = np.asarray(resnet.upsample_bilinear(jnp.asarray(padded), 4, jnp.asarray(mask)))[:12, :20]
    # Each output is a convex combination of 4 inputs: float32 rounding of a few
    # products and sums, a few ulps of |x| <= 4.
    np.testing.assert_allclose(got, want, atol=8 * 4 * 2 ** -23)


def test_resnet18_fpn_through_the_engine(tiny_config):
    from dynaseg_jax.engine import Engine, WorkItem
    from tests.conftest import smooth_image
    config = tiny_config.replace({"model.name": "resnet18_fpn", "model.weights": "random",
                                  "stop.max_iters": 3, "stop.k_min": 1, "engine.batch": 2})
    engine = Engine(config)
    assert engine.model.input_multiple == 32 and not engine.model.transposable
    images = {"landscape": smooth_image(40, 56, 0), "portrait": smooth_image(56, 40, 1),
              "small": smooth_image(33, 50, 2)}
    results = {r.key: r for r in engine.run(WorkItem(k, im, 1) for k, im in images.items())}
    for key, img in images.items():
        assert results[key].labels.shape == img.shape[:2] and results[key].iterations == 3
        assert results[key].error is None
    # Buckets: (64, 64) for landscape and small, (64, 64) portrait not transposed: one shape.
    steps = {tag: n for tag, n in engine.trace_counts.items() if tag[0] in ("per_image", "vmap")}
    assert steps == {("per_image", (64, 64)): 1}


def test_trunk_running_statistics_match_torchvision_eval_mode():
    """trunk_norm = 'running': C2..C5 against torchvision's ResNet-18 in eval mode, with
    random running statistics (torch's initial ones, mean 0 / var 1, would hide a swap)."""
    torch.manual_seed(1)
    t32 = ref.TorchResNet18FPN(16, 8)
    with torch.no_grad():
        for m in t32.trunk.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    t32.eval()
    t64 = float64_twin(t32, ref.TorchResNet18FPN(16, 8))
    variables = jax.tree.map(jnp.asarray, ref.torch_fpn_to_jax_params(t32, running_stats=True))
    trunk = resnet.ResNet18Trunk(precision="float32", norm=resnet.trunk_norm_layer("running"))
    trunk_vars = {c: variables[c]["trunk"] for c in ("params", "batch_stats")}
    img = image()
    ours = jax.jit(trunk.apply)(trunk_vars, jnp.asarray(img), jnp.ones(SHAPE))
    x = (img - np.array(resnet.IMAGENET_MEAN, np.float32)) / np.array(resnet.IMAGENET_STD, np.float32)
    with torch.no_grad():
        want32 = t32.stages(to_torch(x, torch.float32))
        want64 = t64.stages(to_torch(x, torch.float64))
    for level, (a, b, c) in enumerate(zip(ours, want32, want64, strict=True), 2):
        assert_within_torch_error(a, b[0].permute(1, 2, 0), c[0].permute(1, 2, 0), f"C{level} (running)")
    # The batch-statistics trunk gives another result on the same weights: the mode is used.
    batch = jax.jit(resnet.ResNet18Trunk(precision="float32").apply)(
        {"params": trunk_vars["params"]}, jnp.asarray(img), jnp.ones(SHAPE))
    assert np.linalg.norm(np.asarray(batch[-1]) - np.asarray(ours[-1])) > 0.1 * np.linalg.norm(ours[-1])


@pytest.mark.parametrize("strategy", ["per_image", "vmap"])
def test_frozen_trunk_is_shared_not_optimised(tiny_config, strategy):
    """model.trunk = 'frozen': the trunk is one unbatched copy outside every slot's
    state, with no optimiser state; the step moves only the rest, exactly as the
    fine-tuned step moves the rest on its first update."""
    from dynaseg_jax import train
    from dynaseg_jax.engine import Engine, WorkItem
    from tests.conftest import smooth_image
    base = tiny_config.replace({"model.name": "resnet18_layer1", "model.weights": "random",
                                "model.max_clusters": 8, "stop.max_iters": 2, "stop.k_min": 1,
                                "engine.batch": 2, "engine.strategy": strategy})
    frozen = base.replace({"model.trunk": "frozen", "model.trunk_norm": "running"})
    engine = Engine(frozen)
    trunk_size = sum(x.size for x in jax.tree.leaves(engine.params["params"]["trunk"]))
    assert "trunk" not in engine.fresh_state["params"]["params"]
    state_size = sum(x.size for x in jax.tree.leaves((engine.fresh_state["params"], engine.fresh_state["opt_state"])))
    assert state_size < trunk_size  # per slot: the head and its momentum only
    assert set(engine.shared) == {"params", "batch_stats"} and set(engine.shared["params"]) == {"trunk"}
    images = [smooth_image(20, 30, i) for i in range(3)]
    results = list(engine.run(WorkItem(i, im, 1) for i, im in enumerate(images)))
    assert sorted(r.key for r in results) == [0, 1, 2] and all(r.iterations == 2 for r in results)
    assert all(r.error is None and r.labels.shape == (20, 30) for r in results)

    # One update from the same variables: frozen and fine-tuned agree on the head.
    variables = train.init_params(frozen, model=engine.model)
    img, mask = jnp.asarray(images[0]), jnp.ones((20, 30))
    tuned = base.replace({"model.trunk_norm": "running"})
    new_frozen, _ = jax.jit(train.make_train_step(frozen, model=engine.model))(
        train.init_state(frozen, variables), img, mask, train.split_variables(frozen, variables)[1])
    new_tuned, _ = jax.jit(train.make_train_step(tuned, model=engine.model))(
        train.init_state(tuned, variables), img, mask, train.split_variables(tuned, variables)[1])
    assert not np.allclose(new_tuned["params"]["params"]["trunk"]["conv1"]["kernel"],
                           variables["params"]["trunk"]["conv1"]["kernel"])
    for name, leaf in new_frozen["params"]["params"].items():
        # Same float32 operations, possibly fused in another order: reassociating a
        # gradient sum over the 600 pixels moves it by at most ~600 u of its terms.
        a, b = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
                for t in (leaf, new_tuned["params"]["params"][name]))
        assert np.linalg.norm(a - b) <= 600 * U * np.linalg.norm(b) + 1e-30, name
