"""The model contract (dynaseg_jax/models/__init__.py), checked for every registered model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynaseg_jax import train
from dynaseg_jax.models import MODELS, build_model
from tests.conftest import smooth_image


@pytest.mark.parametrize("name", sorted(MODELS))
def test_contract(name, tiny_config):
    model = build_model(tiny_config, name)
    assert isinstance(model.input_multiple, int) and model.input_multiple >= 1
    assert isinstance(model.transposable, bool)
    params = train.init_params(tiny_config, model=model)
    m = model.input_multiple
    h, w = 2 * m + 3, 3 * m + 1  # not a multiple: padding is needed
    bh, bw = -(-h // m) * m + m, -(-w // m) * m
    img = smooth_image(h, w, 0)
    # jit: eager apply dispatches op by op, which for the deep trunks is the test's cost.
    apply = jax.jit(model.apply, static_argnames="method")
    response = apply(params, jnp.asarray(img), jnp.ones((h, w)))
    features = apply(params, jnp.asarray(img), jnp.ones((h, w)), method="features")
    assert response.shape == (h, w, tiny_config.model.max_clusters)
    assert features.shape[:2] == (h, w) and features.ndim == 3
    # Padding with any content, masked out, leaves the real pixels' response unchanged.
    padded = np.random.default_rng(0).random((bh, bw, 3), dtype=np.float32)
    padded[:h, :w] = img
    mask = np.zeros((bh, bw), np.float32)
    mask[:h, :w] = 1
    got = apply(params, jnp.asarray(padded), jnp.asarray(mask))
    # BatchNorm outputs are O(1); a float32 reduction over h*w pixels in another order
    # (the padded sums) differs by ~sqrt(h*w) * 2^-24 relative: 1e-4 leaves a wide margin.
    np.testing.assert_allclose(np.asarray(got)[:h, :w], response, atol=1e-4)


def test_unknown_model_is_a_clear_error(tiny_config):
    with pytest.raises(ValueError, match="unknown model 'resnet'; registered: cnn"):
        build_model(tiny_config, "resnet")
