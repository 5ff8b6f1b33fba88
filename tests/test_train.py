"""The train step: exact padding step for step, compile-once, stop rule, frozen states."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dynaseg_jax import train
from tests.conftest import smooth_image


@pytest.fixture(scope="module")
def step(tiny_config):
    return jax.jit(train.make_train_step(tiny_config))


def run_steps(step, config, image, mask, n):
    state = train.init_state(config)
    predict = jax.jit(train.make_predict(config))  # built once, not per step
    history = []
    for _ in range(n):
        labels = predict(state["params"], image, mask)
        state, metrics = step(state, image, mask)
        history.append((np.asarray(labels), float(metrics["loss"]), int(metrics["n_clusters"])))
    return state, history


def test_padding_is_exact_step_for_step(tiny_config, step):
    config = tiny_config.replace({"stop.k_min": 1})  # never stop early
    img = smooth_image(13, 18, 3)
    padded = np.zeros((16, 24, 3), np.float32)
    padded[:13, :18] = img
    mask = np.zeros((16, 24), np.float32)
    mask[:13, :18] = 1
    _, plain = run_steps(step, config, jnp.asarray(img), jnp.ones((13, 18)), 8)
    _, padh = run_steps(step, config, jnp.asarray(padded), jnp.asarray(mask), 8)
    for t, ((l1, loss1, q1), (l2, loss2, q2)) in enumerate(zip(plain, padh)):
        np.testing.assert_array_equal(l2[:13, :18], l1, err_msg=f"labels differ at step {t}")
        np.testing.assert_allclose(loss2, loss1, rtol=1e-4, err_msg=f"loss differs at step {t}")
        assert q1 == q2


def test_compiles_once_per_shape(tiny_config):
    step = jax.jit(chex.assert_max_traces(train.make_train_step(tiny_config), n=2))
    for shape in [(8, 16), (16, 16)]:  # two buckets -> two traces, never more
        state = train.init_state(tiny_config)
        img = jnp.asarray(smooth_image(*shape, 0))
        for _ in range(3):
            state, _ = step(state, img, jnp.ones(shape))
    with pytest.raises(AssertionError):
        step(train.init_state(tiny_config), jnp.zeros((8, 8, 3)), jnp.ones((8, 8)))


def test_stop_rule_and_frozen_state(tiny_config, step):
    img, mask = jnp.asarray(smooth_image(16, 16, 1)), jnp.ones((16, 16))
    # k_min >= n_clusters: q' <= k_min holds at once, so the first update is the last.
    state = train.init_state(tiny_config, k_min=tiny_config.model.max_clusters)
    state, _ = step(state, img, mask)
    assert bool(state["done"]) and int(state["step"]) == 1
    frozen, _ = step(state, img, mask)
    chex.assert_trees_all_equal(frozen, state)
    # k_min = 1 on a busy image: stops at max_iters.
    state = train.init_state(tiny_config, k_min=1)
    for t in range(tiny_config.stop.max_iters):
        assert not bool(state["done"])
        state, _ = step(state, img, mask)
    assert bool(state["done"]) and int(state["step"]) == tiny_config.stop.max_iters


def test_optimizer_is_torch_sgd():
    # torch.optim.SGD: buf = momentum * buf + (g + wd * p); p -= lr * buf; first buf = g + wd * p
    from dynaseg_jax.config import Config
    cfg = Config().replace({"optim.lr": 0.1, "optim.momentum": 0.9, "optim.weight_decay": 0.01})
    opt = train.make_optimizer(cfg)
    p = jnp.array([1.0, -2.0])
    state = opt.init(p)
    grads = [jnp.array([0.5, 0.25]), jnp.array([-1.0, 2.0])]
    buf, want = None, np.array([1.0, -2.0])
    for g in grads:
        d = np.asarray(g) + 0.01 * want
        buf = d if buf is None else 0.9 * buf + d
        want = want - 0.1 * buf
        updates, state = opt.update(g, state, p)
        p = optax.apply_updates(p, updates)
    np.testing.assert_allclose(p, want, rtol=1e-6)


def test_mu_uses_kstar_changes_only_the_stopping_update(tiny_config):
    # max(q', k*) differs from q' only when q' < k*, and then the stop rule fires on that
    # same step: the option can change the final update, never the trajectory before it.
    img = jnp.asarray(smooth_image(12, 16, 3))
    mask = jnp.ones((12, 16))
    # The option is a per-slot value in the state: one compiled step serves both.
    step = jax.jit(train.make_train_step(tiny_config))
    steps = {False: step, True: step}
    states = {flag: train.init_state(tiny_config.replace({"schedule.uses_kstar": flag}), k_min=1)
              for flag in (False, True)}
    assert bool(states[True]["setting"]["uses_kstar"]) and not bool(states[False]["setting"]["uses_kstar"])
    without_setting = lambda st: {k: v for k, v in st.items() if k != "setting"}
    for _ in range(4):  # k* = 1: q' < k* never holds, the option is inert
        metrics = {}
        for flag in (False, True):
            states[flag], metrics[flag] = steps[flag](states[flag], img, mask)
        chex.assert_trees_all_equal(without_setting(states[False]), without_setting(states[True]))
        assert float(metrics[False]["mu"]) == float(metrics[True]["mu"])
    # Now k* above q': that step stops, and its mu is alpha / k* instead of alpha / q'.
    q = int(states[False]["n_clusters"])
    k_star = q + 5
    metrics = {}
    for flag in (False, True):
        state = {**states[flag], "k_min": jnp.asarray(k_star, jnp.int32)}
        states[flag], metrics[flag] = steps[flag](state, img, mask)
        assert bool(states[flag]["done"])
    q_now = int(metrics[False]["n_clusters"])
    assert q_now < k_star
    assert float(metrics[False]["mu"]) == pytest.approx(tiny_config.schedule.alpha / q_now)
    assert float(metrics[True]["mu"]) == pytest.approx(tiny_config.schedule.alpha / k_star)


def test_nonfinite_update_marks_divergence(tiny_config, step):
    img, mask = jnp.asarray(smooth_image(16, 16, 1)), jnp.ones((16, 16))
    state = train.init_state(tiny_config, k_min=1)
    for _ in range(3):  # the normal step never flags divergence
        state, _ = step(state, img, mask)
        assert not bool(state["diverged"])
    # lr 1e30: the first update leaves finite parameters of size ~1e30, whose squares in
    # BatchNorm's variance overflow float32 (max 3.4e38) on the second forward pass.
    config = tiny_config.replace({"stop.k_min": 1, "optim.lr": 1e30})
    wild = jax.jit(train.make_train_step(config))
    state = train.init_state(config)
    state, metrics = wild(state, img, mask)
    assert np.isfinite(float(metrics["loss"])) and not bool(state["diverged"])
    state, metrics = wild(state, img, mask)
    assert not np.isfinite(float(metrics["loss"]))
    assert bool(state["diverged"]) and bool(state["done"]) and int(state["step"]) == 2
    frozen, _ = wild(state, img, mask)
    chex.assert_trees_all_equal(frozen, state)


def test_plateau_stop_fires_where_the_trace_says(tiny_config, step):
    # The q' trace of a run without the plateau rule says, by hand, where a plateau of n
    # updates first ends; the same compiled step with stop.plateau = n stops exactly there.
    img, mask = jnp.asarray(smooth_image(16, 16, 2)), jnp.ones((16, 16))
    free = tiny_config.replace({"stop.k_min": 1})
    state = train.init_state(free, k_min=1)
    trace = []
    for _ in range(free.stop.max_iters):
        state, metrics = step(state, img, mask)
        trace.append(int(metrics["n_clusters"]))
    for n in (1, 2, 3):
        low, since, want = None, 0, len(trace)
        for t, q in enumerate(trace):
            since = 0 if low is None or q < low else since + 1
            low = q if low is None else min(low, q)
            if since >= n:
                want = t + 1
                break
        config = free.replace({"stop.plateau": n})
        state = train.init_state(config, k_min=1)
        while not bool(state["done"]):
            state, _ = step(state, img, mask)
        assert int(state["step"]) == want, (n, trace)
    assert any(b >= a for a, b in zip(trace, trace[1:]))  # the trace has a plateau to find
