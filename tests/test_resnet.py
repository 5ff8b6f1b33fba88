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

torch = pytest.importorskip("torch")

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
    t64 = ref.TorchResNet18FPN(16, 8).train()
    t64.load_state_dict(t32.state_dict())
    t64.double()
    params = jax.tree.map(jnp.asarray, ref.torch_fpn_to_jax_params(t32))
    return t32, t64, params


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
    for level, (a, b, c, hw) in enumerate(zip(ours, want32, want64, resnet.stage_shapes(*SHAPE)), 2):
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
