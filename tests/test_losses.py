"""Losses, cluster count and mu schedules against hand-computed values and brute force."""
import jax.numpy as jnp
import numpy as np
import pytest

from dynaseg_jax import losses, schedules
from dynaseg_jax.config import Config


def test_similarity_loss_hand_computed():
    # Two pixels, two channels: pixel 0 logits (0, 0) label 0 -> -log(1/2);
    # pixel 1 logits (ln 3, 0) label 0 -> -log(3/4).
    r = jnp.array([[[0.0, 0.0], [np.log(3.0), 0.0]]])
    labels = jnp.array([[0, 0]])
    mask = jnp.ones((1, 2))
    expected = (np.log(2.0) + np.log(4.0 / 3.0)) / 2
    np.testing.assert_allclose(losses.similarity_loss(r, labels, mask), expected, rtol=1e-6)
    # Masking pixel 1 leaves only pixel 0's term.
    np.testing.assert_allclose(losses.similarity_loss(r, labels, jnp.array([[1.0, 0.0]])),
                               np.log(2.0), rtol=1e-6)


def test_continuity_loss_hand_computed():
    # 2x2 image, 1 channel: [[0, 1], [3, 5]]
    r = jnp.array([[[0.0], [1.0]], [[3.0], [5.0]]])
    # vertical |3-0|, |5-1| -> mean 3.5 ; horizontal |1-0|, |5-3| -> mean 1.5
    np.testing.assert_allclose(losses.continuity_loss(r, jnp.ones((2, 2))), 5.0, rtol=1e-6)


def test_continuity_loss_matches_unpadded():
    rng = np.random.default_rng(0)
    r = rng.normal(size=(5, 7, 3)).astype(np.float32)
    padded = np.zeros((8, 9, 3), np.float32)
    padded[:5, :7] = r
    padded[5:] = 100.0  # garbage in the padding must not count
    mask = np.zeros((8, 9), np.float32)
    mask[:5, :7] = 1
    want = np.abs(np.diff(r, axis=0)).mean() + np.abs(np.diff(r, axis=1)).mean()
    np.testing.assert_allclose(losses.continuity_loss(jnp.asarray(r), jnp.ones((5, 7))), want, rtol=1e-5)
    np.testing.assert_allclose(losses.continuity_loss(jnp.asarray(padded), jnp.asarray(mask)), want, rtol=1e-5)


@pytest.mark.parametrize("seed", range(5))
def test_count_clusters_brute_force(seed):
    rng = np.random.default_rng(seed)
    q = 10
    labels = rng.integers(0, rng.integers(1, q + 1), size=(6, 7))
    mask = rng.random((6, 7)) < 0.6
    want = len(np.unique(labels[mask]))
    got = losses.count_clusters(jnp.asarray(labels), jnp.asarray(mask, jnp.float32), q)
    assert int(got) == want


def test_labels_are_argmax():
    r = jnp.array([[[0.1, 0.5, 0.2], [0.9, 0.0, -1.0]]])
    np.testing.assert_array_equal(losses.labels_from_response(r), [[1, 0]])


@pytest.mark.parametrize("q", [1, 3, 7, 100])
def test_schedules(q):
    assert float(schedules.fixed(5.0)(q, 0)) == 5.0
    np.testing.assert_allclose(float(schedules.fsf(15.0)(q, 3)), q / 15.0, rtol=1e-6)
    np.testing.assert_allclose(float(schedules.scf(50.0)(q, 3)), 50.0 / q, rtol=1e-6)


def test_make_schedule_from_config():
    np.testing.assert_allclose(float(schedules.make_schedule(Config().replace({"schedule.kind": "fsf", "schedule.alpha": 10.0}))(20, 0)), 2.0)
    np.testing.assert_allclose(float(schedules.make_schedule(Config().replace({"schedule.kind": "scf", "schedule.alpha": 40.0}))(20, 0)), 2.0)
    assert float(schedules.make_schedule(Config().replace({"schedule.kind": "fixed", "schedule.mu": 3.0}))(20, 0)) == 3.0
