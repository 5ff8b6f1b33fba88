"""The batch engine: batch independence, slot refill, buckets, compile counts."""
import numpy as np
import pytest

from dynaseg_jax.engine import Engine, WorkItem, bucket_shape
from tests.conftest import smooth_image

IMAGES = [smooth_image(16, 24, s) for s in range(4)]


def run(engine, images, keys=None):
    """Results by key; an image's name (which seeds its own network) is its key."""
    keys = keys if keys is not None else list(range(len(images)))
    return {r.key: r for r in engine.run(WorkItem(k, im, 3, name=str(k)) for k, im in zip(keys, images))}


@pytest.fixture(scope="module", params=["per_image", "vmap"])
def engine(request, tiny_config):
    return Engine(tiny_config.replace({"engine.strategy": request.param, "engine.batch": 3}))


def test_per_image_networks(engine, tiny_config):
    import zlib

    import jax

    from dynaseg_jax import train
    assert engine.config.init == "per_image"
    # The key: fold_in(PRNGKey(seed), crc32(name)), the same in every process.
    assert zlib.crc32(b"img7") == 3043256201  # the CRC-32 every implementation gives
    np.testing.assert_array_equal(train.image_key(0, "img7"),
                                  jax.random.fold_in(jax.random.PRNGKey(0), 3043256201))
    a, b = (engine.initial_variables(n)["params"]["classifier"]["kernel"] for n in ("a", "b"))
    assert not np.allclose(a, b)  # each image its own network ...
    np.testing.assert_array_equal(a, engine.initial_variables("a")["params"]["classifier"]["kernel"])
    shared = Engine(tiny_config.replace({"init": "shared"}))
    np.testing.assert_array_equal(shared.initial_variables("a")["params"]["classifier"]["kernel"],
                                  train.init_params(tiny_config)["params"]["classifier"]["kernel"])
    # ... and the same image under two names gets two results.
    two = {r.key: r for r in engine.run([WorkItem("x", IMAGES[0], 1, name="x"), WorkItem("y", IMAGES[0], 1, name="y")])}
    assert not np.array_equal(two["x"].labels, two["y"].labels)


def test_batch_independence(engine):
    alone = {i: run(engine, [im], keys=[i])[i] for i, im in enumerate(IMAGES)}
    together = run(engine, IMAGES)  # 4 images, 3 slots: one slot is refilled
    reversed_ = run(engine, IMAGES[::-1], keys=[3, 2, 1, 0])  # other slots
    for i in range(len(IMAGES)):
        for other in (together[i], reversed_[i]):
            np.testing.assert_array_equal(other.labels, alone[i].labels)
            assert other.iterations == alone[i].iterations
    assert {r.iterations for r in alone.values()} <= set(range(1, engine.config.stop.max_iters + 1))


def test_pulls_an_item_only_for_a_free_slot_and_times_the_waits(engine):
    # 3 slots. Item 0 stops after its first step (k_min above q'), items 1 and 2 run to
    # max_iters (k_min 1 is never reached). Item 3 must not be pulled (its k* computed)
    # while all three slots are busy: only once item 0's result has come out. The source's
    # sleeps are lower bounds of the waits, counted as idle before any slot runs and as
    # running when items 1 and 2 are optimising.
    import time

    seen_at_pull, results = [], []

    def items():
        time.sleep(0.05)
        yield WorkItem(0, IMAGES[0], 10 ** 6, name="0")
        yield WorkItem(1, IMAGES[1], 1, name="1")
        yield WorkItem(2, IMAGES[2], 1, name="2")
        seen_at_pull.append(len(results))
        time.sleep(0.2)
        yield WorkItem(3, IMAGES[3], 10 ** 6, name="3")

    for r in engine.run(items()):
        results.append(r.key)
    assert seen_at_pull == [1] and results[0] == 0 and sorted(results) == [0, 1, 2, 3]
    assert engine.input_wait["idle"] >= 0.05 and engine.input_wait["running"] >= 0.2
    assert engine.input_wait["idle"] < 0.2  # the 0.2 s wait was counted as running only


def test_at_most_batch_images_at_once_across_buckets(engine):
    # Two bucket shapes, 3 slots: each image is pulled only when fewer than 3 are being
    # optimised, whichever bucket the running ones are in, so a pull never waits while all
    # slots are busy. Items 0-2 (bucket A) run to max_iters, except item 0 (one step);
    # items 3-5 are in bucket B.
    active_at_pull, results = [], []
    small, large = smooth_image(16, 24, 1), smooth_image(32, 40, 2)
    plan = [(small, 10 ** 6), (small, 1), (small, 1), (large, 1), (large, 10 ** 6), (large, 10 ** 6)]

    def items():
        for i, (image, k_min) in enumerate(plan):
            active_at_pull.append(i - len(results))  # images pulled and not yet finished
            yield WorkItem(i, image, k_min, name=str(i))

    for r in engine.run(items()):
        results.append(r.key)
    assert sorted(results) == list(range(6))
    assert max(active_at_pull) < 3, active_at_pull
    assert active_at_pull[3] == 2  # item 3 waited for item 0's slot


def test_compiles_once_per_bucket(engine):
    run(engine, [smooth_image(16, 24, 9), smooth_image(20, 22, 8), smooth_image(24, 16, 7)])
    # (16,24), (20,22)->(24,24) and portrait (24,16)->transposed (16,24): two buckets
    steps = {tag: n for tag, n in engine.trace_counts.items() if tag[0] in ("per_image", "vmap")}
    assert steps and all(n == 1 for n in steps.values()), steps


def test_portrait_image_is_transposed_exactly(engine):
    img = smooth_image(24, 16, 5)
    portrait = run(engine, [img])[0]
    landscape = run(engine, [img.transpose(1, 0, 2)])[0]
    assert portrait.labels.shape == (24, 16)
    np.testing.assert_array_equal(portrait.labels, landscape.labels.T)


def test_bucket_shape(tiny_config):
    assert bucket_shape(13, 18, tiny_config) == (16, 24, False)
    assert bucket_shape(18, 13, tiny_config) == (16, 24, True)
    assert bucket_shape(321, 481, tiny_config.replace({"engine.bucket_multiple": 1})) == (321, 481, False)
    assert bucket_shape(481, 321, tiny_config.replace({"engine.bucket_multiple": 1})) == (321, 481, True)
    assert bucket_shape(481, 321, tiny_config.replace({"engine.transpose_portrait": False, "engine.bucket_multiple": 1})) == (481, 321, False)


def test_sync_every_does_not_change_results(tiny_config):
    a = run(Engine(tiny_config.replace({"engine.sync_every": 1})), IMAGES[:2])
    b = run(Engine(tiny_config.replace({"engine.sync_every": 5})), IMAGES[:2])
    looped = Engine(tiny_config.replace({"engine.sync_every": 5}))
    looped.loop_chunks = True  # the accelerator path: chunks as a fori_loop
    c = run(looped, IMAGES[:2])
    for k in a:
        for other in (b[k], c[k]):
            np.testing.assert_array_equal(a[k].labels, other.labels)
            assert a[k].iterations == other.iterations


def test_segment_api_keeps_input_order(tiny_config, tmp_path):
    from PIL import Image

    from dynaseg_jax import segment
    portrait = (smooth_image(24, 16, 1) * 255).astype(np.uint8)
    Image.fromarray(portrait).save(tmp_path / "p.png")
    inputs = [IMAGES[0], str(tmp_path / "p.png"), IMAGES[2][..., 0]]  # float RGB, path, grayscale
    out = segment(inputs, tiny_config, batch=2)
    assert [r["labels"].shape for r in out] == [(16, 24), (24, 16), (16, 24)]
    for r in out:
        np.testing.assert_array_equal(np.unique(r["labels"]), np.arange(r["clusters"]))
        assert 1 <= r["iterations"] <= tiny_config.stop.max_iters and r["k_min"] == 3
    # The same image gives the same labels through the API as through the engine.
    direct = run(Engine(tiny_config.replace({"engine.batch": 2})), [IMAGES[0]])[0]
    from dynaseg_jax.images import renumber
    np.testing.assert_array_equal(out[0]["labels"], renumber(direct.labels))
    # clusters counts the labels returned: with connected regions, more than the engine's q'.
    (split,) = segment([IMAGES[0]], tiny_config.replace({"postprocess.connected": True}), batch=2)
    np.testing.assert_array_equal(np.unique(split["labels"]), np.arange(split["clusters"]))
    assert split["clusters"] > out[0]["clusters"]


def test_diverged_image_is_reported(engine):
    wild = Engine(engine.config.replace({"optim.lr": 1e30}))  # non-finite on the 2nd update (test_train)
    (r,) = run(wild, IMAGES[:1]).values()
    assert r.error.startswith("diverged: non-finite loss or parameters at iteration 2")
    assert r.iterations == 2
    assert all(r.error is None for r in run(engine, IMAGES[:2]).values())


def test_bucket_shape_consults_the_model(tiny_config):
    from types import SimpleNamespace
    strided = SimpleNamespace(input_multiple=32, transposable=False)  # e.g. a pretrained trunk
    # Sides rounded to a multiple of both bucket_multiple (8) and the model's 32 ...
    assert bucket_shape(13, 18, tiny_config, strided) == (32, 32, False)
    assert bucket_shape(40, 70, tiny_config.replace({"engine.bucket_multiple": 48}), strided) == (96, 96, False)
    # ... and a portrait image keeps its own orientation when the model forbids transposing.
    assert bucket_shape(70, 40, tiny_config, strided) == (96, 64, False)
    from dynaseg_jax.models import build_model
    cnn = build_model(tiny_config)
    assert bucket_shape(18, 13, tiny_config, cnn) == bucket_shape(18, 13, tiny_config) == (16, 24, True)


def test_per_slot_settings_share_one_compile(tiny_config):
    """Images running different optimiser/schedule/stop/seed settings in one vmap run:
    one compiled step, and each image's labels equal a run of its setting alone at the
    same slot count and strategy."""
    import pytest as _pytest

    from dynaseg_jax.config import ConfigError
    base = tiny_config.replace({"engine.strategy": "vmap", "engine.batch": 3})
    settings = [base,
                base.replace({"optim.lr": 0.05, "optim.momentum": 0.0}),
                base.replace({"schedule.kind": "fsf", "schedule.alpha": 15.0, "optim.weight_decay": 1e-3}),
                base.replace({"schedule.kind": "fixed", "schedule.mu": 5.0, "stop.max_iters": 5}),
                base.replace({"seed": 7, "schedule.uses_kstar": True}),
                base.replace({"init": "shared", "seed": 3})]
    engine = Engine(base)
    items = [WorkItem(i, IMAGES[i % 2], 3, name=f"im{i % 2}", setting=s) for i, s in enumerate(settings)]
    mixed = {r.key: r for r in engine.run(items)}
    steps = {tag: n for tag, n in engine.compile_counts().items() if tag[0] == "vmap"}
    assert steps == {("vmap", (16, 24)): 1}
    for i, s in enumerate(settings):
        alone = Engine(s)
        (r,) = alone.run([WorkItem(i, IMAGES[i % 2], 3, name=f"im{i % 2}")])
        np.testing.assert_array_equal(mixed[i].labels, r.labels)
        assert mixed[i].iterations == r.iterations
    assert mixed[3].iterations <= 5 < tiny_config.stop.max_iters
    assert len({mixed[i].labels.tobytes() for i in range(len(settings))}) == len(settings)  # all differ
    # A field that shapes the program cannot differ within a run.
    with _pytest.raises(ConfigError, match=r"model.channels = 8: differs from the run's 16, and it shapes"):
        list(engine.run([WorkItem(0, IMAGES[0], 3, setting=base.replace({"model.channels": 8}))]))


def test_segment_on_a_given_engine(tiny_config):
    from dynaseg_jax import runner
    engine = Engine(tiny_config.replace({"engine.batch": 2}))
    with pytest.raises(ValueError, match="not both"):
        runner.segment(IMAGES[:1], tiny_config, engine=engine)
    results = runner.segment(IMAGES[:3], engine=engine)
    # The same labels as through a new engine of the same config (the images' own networks).
    fresh = runner.segment(IMAGES[:3], tiny_config.replace({"engine.batch": 2}))
    for a, b in zip(results, fresh):
        np.testing.assert_array_equal(a["labels"], b["labels"])
