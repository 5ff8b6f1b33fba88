"""The silhouette phase recovers the number of well-separated clusters."""
import numpy as np
import pytest

from dynaseg_jax.silhouette import color_position_features, estimate_k


@pytest.mark.parametrize("k_true", [3, 5])
def test_estimate_k_recovers_blobs(k_true):
    rng = np.random.default_rng(k_true)
    centers = rng.uniform(-10, 10, (k_true, 4))
    feats = np.concatenate([c + rng.normal(0, 0.3, (400, 4)) for c in centers])
    k, scores = estimate_k(feats, (2, 8), n_samples=800, seed=0)
    assert k == k_true
    assert max(scores, key=scores.get) == k_true and len(scores) == 7


def test_estimate_k_is_seeded_and_handles_flat_images():
    feats = np.random.default_rng(0).normal(size=(2000, 3))
    assert estimate_k(feats, (2, 5), 500, seed=1) == estimate_k(feats, (2, 5), 500, seed=1)
    k, scores = estimate_k(np.zeros((100, 3)), (2, 6), 50, seed=0)
    assert k == 2 and scores == {}


def test_color_position_features():
    img = np.zeros((3, 4, 3), np.float32)
    f = color_position_features(img, position_scale=2.0)
    assert f.shape == (12, 5)
    np.testing.assert_allclose(f[-1, 3:], [2.0, 2.0])
