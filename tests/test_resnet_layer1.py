"""resnet18_layer1 (the authors' COCO-Stuff network) against our PyTorch version of it
(``benchmarks/torch_reference.py``: torchvision's conv1/bn1/layer1 and the authors' ops),
both from the same random weights (no ImageNet checkpoint is needed to check the
arithmetic); its torchvision-checkpoint loader; and a whole train step.

Tolerances, as in tests/test_resnet.py: a float64 torch run of the same weights and image
is the truth. JAX's float32 error against it must be within a small multiple of torch's
own float32 error (both do the same float32 operations over reductions of the same
lengths, in different orders: a blocked against a pairwise sum changes a sum's error by
about sqrt(8..16), hence the factor 4), plus a floor u * sqrt(K) * ||truth|| (u = 2^-24,
the unit roundoff; K = 9 * 64, the longest reduction of one output, a conv3x3 over 64
channels) for the case where torch happens to be nearly exact.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest

from tests.conftest import require

torch = require("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dynaseg_jax.models import resnet  # noqa: E402
from tests import test_resnet  # noqa: E402
from tests.test_resnet import ref, to_torch  # noqa: E402

SHAPE = (45, 70)  # odd height: the x2 map has an extra row, cropped at the end
BUCKET = (48, 80)  # an engine bucket (multiple of 16)
Q = 16
# The longest reduction of one output here: a conv3x3 over 64 channels.
assert_within_torch_error = functools.partial(test_resnet.assert_within_torch_error, k_longest=9 * 64)


@pytest.fixture(scope="module")
def nets():
    """(torch net float32, the same in float64, our params float32) from one seeded init."""
    torch.manual_seed(0)
    t32 = ref.TorchResNet18Layer1(Q).train()
    params = jax.tree.map(jnp.asarray, ref.torch_layer1_to_jax_params(t32))
    return t32, test_resnet.float64_twin(t32, ref.TorchResNet18Layer1(Q)), params


def image():
    return np.random.default_rng(0).random(SHAPE + (3,), dtype=np.float32)


def test_layer1_response_matches_torch_and_is_padding_exact(nets):
    t32, t64, params = nets
    img = image()
    model = resnet.ResNet18Layer1(max_clusters=Q, precision="float32")
    assert model.input_multiple == 2 and not model.transposable

    def both(image, mask):
        return model.apply(params, image, mask), model.apply(params, image, mask, method="features")

    apply = jax.jit(both)
    ours, feats = apply(jnp.asarray(img), jnp.ones(SHAPE))
    assert ours.shape == SHAPE + (Q,) and feats.shape == SHAPE + (Q,)
    with torch.no_grad():
        want32 = t32(to_torch(img, torch.float32))[0].permute(1, 2, 0)
        want64 = t64(to_torch(img, torch.float64))[0].permute(1, 2, 0)
        f32 = t32.features(to_torch(img, torch.float32))[0].permute(1, 2, 0)
        f64 = t64.features(to_torch(img, torch.float64))[0].permute(1, 2, 0)
    assert_within_torch_error(feats, f32, f64, "features")
    assert_within_torch_error(ours, want32, want64, "r'")
    # In a bucket with any padding content: the same response and features, zero features
    # on padding.
    padded = np.random.default_rng(1).random(BUCKET + (3,), dtype=np.float32)
    padded[:SHAPE[0], :SHAPE[1]] = img
    mask = np.zeros(BUCKET, np.float32)
    mask[:SHAPE[0], :SHAPE[1]] = 1
    got, got_feats = (np.asarray(a) for a in apply(jnp.asarray(padded), jnp.asarray(mask)))
    assert got.shape == BUCKET + (Q,)
    assert_within_torch_error(got[:SHAPE[0], :SHAPE[1]], want32, want64, "r' in a bucket")
    assert_within_torch_error(got_feats[:SHAPE[0], :SHAPE[1]], f32, f64, "features in a bucket")
    assert not np.any(got_feats[SHAPE[0]:]) and not np.any(got_feats[:, SHAPE[1]:])


def test_layer1_trunk_loads_from_a_torchvision_checkpoint(nets, tmp_path):
    from dynaseg_jax.models import PRETRAINED
    from dynaseg_jax.weights import WeightsError
    load_layer1_trunk = PRETRAINED["resnet18_layer1"].load  # the registry's loader

    t32, _, params = nets
    sd = {k: v.numpy() for k, v in t32.trunk.state_dict().items()}  # a whole ResNet-18
    path = tmp_path / "resnet18.npz"
    np.savez(path, **sd)
    model = resnet.ResNet18Layer1(max_clusters=Q)
    fresh = jax.jit(model.init)(jax.random.PRNGKey(1), jnp.zeros((8, 8, 3)), jnp.ones((8, 8)))
    loaded = load_layer1_trunk(fresh, path)
    assert set(loaded["params"]["trunk"]) == {"conv1", "bn1", "layer1_0", "layer1_1"}
    jax.tree.map(np.testing.assert_array_equal, loaded["params"]["trunk"], params["params"]["trunk"])
    jax.tree.map(np.testing.assert_array_equal, loaded["params"]["conv6"], fresh["params"]["conv6"])
    # layer2..4 are not needed; layer1 is.
    np.savez(tmp_path / "part.npz", **{k: v for k, v in sd.items() if not k.startswith(("layer2", "fc"))})
    load_layer1_trunk(fresh, tmp_path / "part.npz")
    np.savez(tmp_path / "bad.npz", **{k: v for k, v in sd.items() if not k.startswith("layer1.1.")})
    with pytest.raises(WeightsError, match="bad.npz.*layer1.1"):
        load_layer1_trunk(fresh, tmp_path / "bad.npz")


def test_layer1_train_step_runs(tiny_config):
    from dynaseg_jax import train
    from tests.conftest import smooth_image

    config = tiny_config.replace({"model.weights": "random", "stop.max_iters": 3, "stop.k_min": 1})
    model = resnet.build_layer1(config)
    assert isinstance(model, resnet.ResNet18Layer1) and model.max_clusters == config.model.max_clusters
    state = train.init_state(config, params=train.init_params(config, model=model))
    step = jax.jit(train.make_train_step(config, model=model))
    h, w = 13, 18  # in a (16, 24) bucket
    img = np.zeros((16, 24, 3), np.float32)
    img[:h, :w] = smooth_image(h, w, 0)
    mask = np.zeros((16, 24), np.float32)
    mask[:h, :w] = 1
    before = state["params"]
    for _ in range(3):
        state, metrics = step(state, jnp.asarray(img), jnp.asarray(mask))
        assert np.isfinite(float(metrics["loss"]))
    assert int(state["step"]) == 3 and bool(state["done"]) and not bool(state["diverged"])
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), before, state["params"])
    assert all(jax.tree.leaves(changed))  # every parameter, trunk included, is trained
