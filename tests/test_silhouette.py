"""The silhouette phase recovers the number of well-separated clusters."""
import numpy as np
import pytest

from dynaseg_jax.silhouette import color_position_features, estimate_k, silhouette_scores
from tests.conftest import smooth_image


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


def test_silhouette_scores_equal_scikit_learns():
    # One distance matrix for every labeling, sums by matmul: scikit-learn's scores up to
    # the order of float64 sums of <= n = 600 distances (relative error <= n * 2^-53 =
    # 7e-14 per mean, so <= ~3e-13 on a score, a ratio of their differences; 1e-12).
    from sklearn.metrics import silhouette_score

    rng = np.random.default_rng(4)
    sample = np.concatenate([rng.normal(c, 1.0, (200, 6)) for c in (-3, 0, 3)])
    labelings = [np.repeat([0, 1, 2], 200), rng.integers(0, 7, 600),
                 np.where(np.arange(600) == 5, 9, 2),  # a one-point cluster; labels 2 and 9
                 rng.permutation(np.repeat([4, 1], 300))]
    ours = silhouette_scores(sample, labelings)
    theirs = [silhouette_score(sample, labels) for labels in labelings]
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)
    assert ours[0] > 0.5 > abs(ours[1])  # the test cases do differ


def test_color_position_features():
    img = np.zeros((3, 4, 3), np.float32)
    f = color_position_features(img, position_scale=2.0)
    assert f.shape == (12, 5)
    np.testing.assert_allclose(f[-1, 3:], [2.0, 2.0])


def test_network_features_compile_once_per_padded_shape(tiny_config):
    # Two sizes inside one 8-multiple bucket: one compilation, and the features (so k*)
    # of the unpadded image (the padding is masked out of BatchNorm).
    import jax.numpy as jnp

    from dynaseg_jax import train
    from dynaseg_jax.models import build_model
    from dynaseg_jax.runner import KStarEstimator
    from tests.conftest import smooth_image

    config = tiny_config.replace({"stop.k_min": "silhouette", "silhouette.features": "network", "silhouette.k_range": (2, 6), "silhouette.samples": 300})
    params = train.init_params(config)
    estimator = KStarEstimator(config, params)
    model = build_model(config)
    for h, w in [(13, 17), (15, 20)]:  # both pad to 16 x 24
        img = smooth_image(h, w, h)
        feats = model.apply(params, jnp.asarray(img), jnp.ones((h, w)), method="features")
        feats = np.asarray(feats).reshape(h * w, -1)
        np.testing.assert_allclose(estimator.features(img), feats, rtol=1e-4, atol=1e-4)
        want, _ = estimate_k(feats, config.silhouette.k_range, config.silhouette.samples, config.seed)
        assert estimator(img) == want
    assert estimator.trace_count == 1


def test_projection_keeps_distances_of_low_dimensional_features():
    # Features on a 2-D plane inside 10-D: projecting on 2 principal directions keeps
    # every distance (an isometry up to float64 rounding), so k-means and the
    # silhouette scores are those of the plane's own coordinates.
    from dynaseg_jax.silhouette import estimate_k
    rng = np.random.default_rng(7)
    centres = np.array([[0.0, 0.0], [12.0, 0.0], [0.0, 12.0], [12.0, 12.0]])
    plane = np.concatenate([c + rng.normal(size=(150, 2)) for c in centres])
    basis, _ = np.linalg.qr(rng.normal(size=(10, 2)))
    lifted = plane @ basis.T + rng.normal(size=10)  # rotated into 10-D and shifted
    k_plane, scores_plane = estimate_k(plane, (2, 6), n_samples=600, seed=1, n_init=1)
    k_lifted, scores_lifted = estimate_k(lifted, (2, 6), n_samples=600, seed=1, n_init=1, dims=2)
    assert k_plane == k_lifted == 4  # four well-separated blobs
    assert scores_plane.keys() == scores_lifted.keys()
    for k in scores_plane:
        assert scores_lifted[k] == pytest.approx(scores_plane[k], abs=1e-9)


def test_kstar_processes_give_the_same_k_and_scores(tiny_config):
    # engine.kstar_processes moves k-means and the silhouette into spawned processes:
    # the same seeded computation on the same sample, so the same k*, for images whose
    # answers differ (stripes of 2, 3 and 5 colours).
    from dynaseg_jax import ConfigError
    from dynaseg_jax.runner import KStarEstimator, _close_kstar_pools
    from dynaseg_jax.silhouette import kstar_of_sample, pixel_sample

    config = tiny_config.replace({"stop.k_min": "silhouette", "silhouette.features": "color_position",
                                  "silhouette.k_range": (2, 6), "silhouette.samples": 400})
    in_threads = KStarEstimator(config, None)
    in_processes = KStarEstimator(config.replace({"engine.kstar_processes": 2}), None)
    rng = np.random.default_rng(3)
    ks, imgs = [], []
    try:
        for n_colours in (2, 3, 5):
            img = np.repeat(rng.uniform(0, 1, (n_colours, 1, 3)), 40, axis=1).repeat(8, axis=0)
            img = np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1).astype(np.float32)
            imgs.append(img)
            ks.append(in_threads(img))
            assert in_processes(img) == ks[-1]
            feats = in_threads.features(img)
            sample = pixel_sample(feats, 400, config.seed)
            assert kstar_of_sample(sample, (2, 6), config.seed) == estimate_k(feats, (2, 6), 400, config.seed)
            # One thread: the same k*; the scores within float64 rounding of the distance
            # sums (another thread count may add them in another order).
            k1, scores1 = kstar_of_sample(sample, (2, 6), config.seed, threads=1)
            k_all, scores_all = kstar_of_sample(sample, (2, 6), config.seed)
            assert k1 == k_all and scores1 == pytest.approx(scores_all, abs=1e-9)
        # All at once, as segment() computes them: each image's own k*, in order.
        assert in_processes.estimate_many(imgs) == ks
    finally:
        _close_kstar_pools()  # this test's processes end here, not at the suite's exit
    assert len(set(ks)) > 1  # the images do test different answers
    with pytest.raises(ConfigError, match="engine.kstar_processes = -1: must be >= 0"):
        config.replace({"engine.kstar_processes": -1})


def test_a_broken_kstar_pool_is_replaced(tiny_config, monkeypatch):
    # A k* process that dies breaks its pool: that image's k* is computed in the thread
    # (the same answer) and the next image gets a new pool.
    import concurrent.futures as cf

    from dynaseg_jax import runner

    class Broken:
        def submit(self, *args):
            raise cf.process.BrokenProcessPool("a child died")

        def shutdown(self, wait):
            self.shut = True

    config = tiny_config.replace({"stop.k_min": "silhouette", "silhouette.features": "color_position",
                                  "silhouette.k_range": (2, 5), "silhouette.samples": 200})
    broken = Broken()
    monkeypatch.setitem(runner._KSTAR_POOLS, 7, broken)
    img = smooth_image(16, 24, 2)
    assert runner.KStarEstimator(config.replace({"engine.kstar_processes": 7}), None)(img) == \
        runner.KStarEstimator(config, None)(img)
    assert 7 not in runner._KSTAR_POOLS and broken.shut
