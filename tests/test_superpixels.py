"""Superpixel-constrained targets: majority votes, the maps, the engine's plumbing."""
import builtins

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynaseg_jax import losses, train
from dynaseg_jax.config import Config, ConfigError
from dynaseg_jax.engine import pad_segments, pad_to_bucket
from dynaseg_jax.config import load_config
from dynaseg_jax.superpixels import (check_available, felzenszwalb_params, majority_labels, majority_targets,
                                     superpixel_map)
from tests.conftest import require, smooth_image


def majority_brute_force(labels, segments, mask):
    """Per superpixel, the most frequent label among its real pixels (ties: lower)."""
    out = np.zeros_like(labels)
    for s in np.unique(segments):
        inside = segments == s
        votes = labels[inside & (mask > 0)]
        winner = np.bincount(votes).argmax() if votes.size else 0
        out[inside] = winner
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_majority_targets_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, (9, 11)).astype(np.int32)
    segments = rng.integers(0, 7, (9, 11)).astype(np.int32)
    mask = (rng.random((9, 11)) < 0.8).astype(np.float32)
    got = np.asarray(majority_targets(jnp.asarray(labels), jnp.asarray(segments), jnp.asarray(mask), 8, 5))
    np.testing.assert_array_equal(got, majority_brute_force(labels, segments, mask))


@pytest.mark.parametrize("seed", [0, 1])
def test_majority_labels_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 6, (10, 13))
    segments = rng.integers(0, 9, (10, 13)).astype(np.int32)
    got = majority_labels(labels, segments)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, majority_brute_force(labels, segments, np.ones((10, 13))))
    np.testing.assert_array_equal(majority_labels([[3, 1, 1, 3]], np.zeros((1, 4), np.int32)), [[1, 1, 1, 1]])


def test_superpixel_vote_of_the_final_labels():
    # postprocess.superpixel_vote: each superpixel of [superpixels] takes its majority
    # label, then connected splits; without superpixels it is a config error.
    require("skimage")
    from dynaseg_jax.postprocess import postprocess
    image = smooth_image(24, 32, 1)
    config = Config().replace({"superpixels.method": "felzenszwalb", "superpixels.scale": 5.0,
                               "postprocess.superpixel_vote": True})
    segments = superpixel_map(image, config)
    labels = np.random.default_rng(0).integers(0, 4, (24, 32))
    voted = postprocess(labels, image, config)
    np.testing.assert_array_equal(voted, majority_brute_force(labels, segments, np.ones((24, 32))))
    split = postprocess(labels, image, config.replace({"postprocess.connected": True}))
    from dynaseg_jax.metrics import relabel_connected
    np.testing.assert_array_equal(split, relabel_connected(voted))
    with pytest.raises(ConfigError, match="superpixel_vote = true: votes in the superpixels of superpixels.method"):
        Config().replace({"postprocess.superpixel_vote": True})


def test_majority_tie_takes_the_lower_label():
    labels = jnp.asarray([[3, 1, 1, 3]], jnp.int32)
    got = majority_targets(labels, jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4)), 1, 4)
    np.testing.assert_array_equal(got, [[1, 1, 1, 1]])


def test_superpixel_maps():
    require("skimage")
    image = smooth_image(24, 32, 0)
    assert superpixel_map(image, Config()) is None
    for method in ("felzenszwalb", "slic"):
        config = Config().replace({"superpixels.method": method, "superpixels.n_segments": 12})
        segments = superpixel_map(image, config)
        assert segments.shape == (24, 32) and segments.dtype == np.int32
        np.testing.assert_array_equal(np.unique(segments), np.arange(segments.max() + 1))  # no gaps
        assert 2 <= segments.max() + 1 < 24 * 32
    tight = Config().replace({"superpixels.method": "felzenszwalb", "superpixels.max_segments": 2,
                              "superpixels.scale": 1.0, "superpixels.min_size": 1})
    with pytest.raises(ValueError, match="superpixels, more than superpixels.max_segments = 2"):
        superpixel_map(image, tight)


def test_felzenszwalb_sizes_follow_the_image_area():
    # reference_pixels R: an image of A pixels gets min_size x A / R and scale and sigma
    # x (A / R) ** (1/4) (hand-computed below, with areas 16x and 1/16x so that the fourth
    # root is exact); R = 0 keeps the sizes as given.
    config = Config().replace({"superpixels.scale": 100.0, "superpixels.sigma": 0.5,
                               "superpixels.min_size": 3, "superpixels.reference_pixels": 9600})
    assert felzenszwalb_params(80, 120, config) == {"scale": 100.0, "sigma": 0.5, "min_size": 3}
    assert felzenszwalb_params(320, 480, config) == {"scale": 200.0, "sigma": 1.0, "min_size": 48}
    small = felzenszwalb_params(20, 30, config)  # 1/16 of the area: 50, 0.25, round(0.1875) -> 1
    assert small == {"scale": 50.0, "sigma": 0.25, "min_size": 1}
    as_given = config.replace({"superpixels.reference_pixels": 0})
    assert felzenszwalb_params(240, 160, as_given) == {"scale": 100.0, "sigma": 0.5, "min_size": 3}
    with pytest.raises(ConfigError, match="superpixels.reference_pixels = -1: must be >= 0"):
        config.replace({"superpixels.reference_pixels": -1})
    # The dynaseg_plus preset's sizes were chosen on BSDS500 at scale 0.25 (120 x 80 either
    # way up): unchanged there.
    plus = load_config("dynaseg_plus")
    sp = plus.superpixels
    for shape in ((80, 120), (120, 80)):
        assert felzenszwalb_params(*shape, plus) == {"scale": sp.scale, "sigma": sp.sigma, "min_size": sp.min_size}


def test_superpixel_map_uses_the_area_scaled_sizes():
    require("skimage")
    from skimage.segmentation import felzenszwalb
    image = smooth_image(32, 48, 2)
    config = Config().replace({"superpixels.method": "felzenszwalb", "superpixels.scale": 3.0,
                               "superpixels.min_size": 2, "superpixels.reference_pixels": 32 * 48 // 4})
    direct = felzenszwalb(image, scale=3.0 * 4 ** 0.25, sigma=0.5 * 4 ** 0.25, min_size=8, channel_axis=-1)
    _, direct = np.unique(direct, return_inverse=True)
    np.testing.assert_array_equal(superpixel_map(image, config), direct.reshape(32, 48))
    as_given = superpixel_map(image, config.replace({"superpixels.reference_pixels": 0}))
    assert as_given.max() > superpixel_map(image, config).max()  # smaller sizes: more superpixels


def test_missing_scikit_image_is_a_config_error(monkeypatch):
    real_import = builtins.__import__

    def no_skimage(name, *args, **kwargs):
        if name.startswith("skimage"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_skimage)
    check_available(Config())  # not asked for: fine
    with pytest.raises(ConfigError, match=r"superpixels.method = 'slic' needs scikit-image: pip install "
                                          r"'dynaseg_jax\[superpixels\]'"):
        check_available(Config().replace({"superpixels.method": "slic"}))


@pytest.mark.parametrize("transposed", [False, True])
def test_segments_are_padded_like_the_image(transposed):
    image = smooth_image(13, 9, 1)
    segments = (image[..., 0] * 5).astype(np.int32)  # a function of the pixels
    padded, mask = pad_to_bucket(image, (16, 16, transposed))
    got = pad_segments(segments, (16, 16, transposed))
    real = mask > 0
    np.testing.assert_array_equal(got[real], (padded[..., 0] * 5).astype(np.int32)[real])
    assert not got[~real].any()


def test_step_uses_the_superpixel_targets(tiny_config):
    # One step's L_sim equals the cross-entropy against the brute-force majority targets
    # of the same forward pass; q' still counts the argmax labels.
    config = tiny_config.replace({"superpixels.method": "slic", "superpixels.max_segments": 64})
    image = smooth_image(16, 16, 3)
    segments = np.repeat(np.repeat(np.arange(16).reshape(4, 4), 4, 0), 4, 1).astype(np.int32)
    mask = np.ones((16, 16), np.float32)
    state = train.init_state(config)
    _, metrics = jax.jit(train.make_train_step(config))(state, jnp.asarray(image), jnp.asarray(mask),
                                                       None, jnp.asarray(segments))
    response = train.build_model(config).apply(state["params"], jnp.asarray(image), jnp.asarray(mask))
    labels = np.asarray(losses.labels_from_response(response))
    targets = majority_brute_force(labels, segments, mask)
    assert (targets != labels).any()  # the targets differ from the labels here
    want = float(losses.similarity_loss(response, jnp.asarray(targets), jnp.asarray(mask)))
    # Two float32 evaluations of one mean of 256 log-softmax terms: a few ulps of the sum.
    assert float(metrics["l_sim"]) == pytest.approx(want, rel=1e-5)
    assert int(metrics["n_clusters"]) == np.unique(labels).size
    with pytest.raises(ValueError, match="the step needs the image superpixels"):
        train.make_train_step(config)(state, jnp.asarray(image), jnp.asarray(mask))


def test_segment_and_sweep_with_superpixels(tmp_path, capsys):
    # vmap: the slot arrays, their donation and refill carry the superpixels too.
    strategy = "vmap"
    require("skimage")
    from PIL import Image

    from dynaseg_jax import images as imio
    from dynaseg_jax.cli import main
    from tests.conftest import tiny_toml

    (tmp_path / "in").mkdir()
    for i, (h, w) in enumerate([(16, 24), (24, 16)]):  # a portrait one is transposed
        Image.fromarray((smooth_image(h, w, i) * 255).astype(np.uint8)).save(tmp_path / "in" / f"im{i}.png")
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(tiny_toml(max_iters=6, k_min=1, strategy=strategy, batch=2))
    base = ["--config", str(cfg), "--no-progress"]
    assert main(["segment", str(tmp_path / "in"), "--out", str(tmp_path / "plain"), *base]) == 0
    assert main(["segment", str(tmp_path / "in"), "--out", str(tmp_path / "sp"), *base,
                 "--set", "superpixels.method=felzenszwalb", "--set", "superpixels.scale=5"]) == 0
    # The superpixels reach the step: the labels change (6 updates of a 16-channel CNN).
    assert any(not np.array_equal(imio.read_labels(tmp_path / "plain" / f"im{i}.png"),
                                  imio.read_labels(tmp_path / "sp" / f"im{i}.png")) for i in range(2))
    # Host-side superpixel fields vary within one sweep; one setting equals its segment run.
    assert main(["sweep", str(tmp_path / "in"), "--out", str(tmp_path / "sweep"), *base,
                 "--set", "superpixels.method=felzenszwalb", "--grid", "superpixels.scale=5,50"]) == 0
    assert "2 settings: 4 segmented" in capsys.readouterr().out
    for i in range(2):
        np.testing.assert_array_equal(imio.read_labels(tmp_path / "sweep" / "superpixels.scale_5" / f"im{i}.png"),
                                      imio.read_labels(tmp_path / "sp" / f"im{i}.png"))
    # A setting whose superpixels fail (scale 0.01: about one per pixel, over the 64
    # allowed) loses the images for itself only.
    code = main(["sweep", str(tmp_path / "in"), "--out", str(tmp_path / "fail"), *base,
                 "--set", "superpixels.method=felzenszwalb", "--set", "superpixels.max_segments=64",
                 "--set", "superpixels.min_size=1", "--grid", "superpixels.scale=0.01,50"])
    captured = capsys.readouterr()
    assert "2 settings: 2 segmented, 0 already done, 2 failed" in captured.out, captured.out
    assert captured.err.count("more than superpixels.max_segments = 64") == 2 and code != 0
    assert sorted(p.name for p in (tmp_path / "fail" / "superpixels.scale_50").glob("im?.png")) == ["im0.png", "im1.png"]
    assert not list((tmp_path / "fail" / "superpixels.scale_0.01").glob("im?.png"))


def test_the_vote_reuses_the_targets_superpixels(tmp_path, tiny_config, monkeypatch):
    # segment_files and sweep compute each image's superpixels once, for the targets and
    # the vote; the vote's labels are those of a vote in freshly computed superpixels.
    require("skimage")
    from PIL import Image

    from dynaseg_jax import postprocess as post_module
    from dynaseg_jax import runner, superpixels
    from dynaseg_jax.images import read_labels
    from dynaseg_jax.sweep import run_sweep
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(2):
        Image.fromarray((smooth_image(16, 24, i) * 255).astype(np.uint8)).save(inputs / f"im{i}.png")
    config = tiny_config.replace({"stop.max_iters": 3, "superpixels.method": "felzenszwalb",
                                  "superpixels.scale": 5.0, "postprocess.superpixel_vote": True})
    calls, real = [], superpixels.superpixel_map

    def counted(image, cfg):
        calls.append(image.shape)
        return real(image, cfg)

    monkeypatch.setattr(superpixels, "superpixel_map", counted)
    monkeypatch.setattr(runner, "superpixel_map", counted)
    summary = runner.segment_files([inputs], tmp_path / "out", config, progress=False, log=lambda m: None)
    assert summary.ok == 2 and len(calls) == 2
    for i in range(2):
        image = np.asarray(Image.open(inputs / f"im{i}.png"), np.float32) / 255
        got = read_labels(tmp_path / "out" / f"im{i}.png")
        # Voting again in freshly computed superpixels changes nothing: same partition.
        again = post_module.postprocess(got, image, config.replace({"postprocess.superpixel_vote": True}))
        np.testing.assert_array_equal(again, got)
    calls.clear()
    run_sweep([inputs], tmp_path / "sweep", config, {"seed": [0, 1]}, progress=False, log=lambda m: None)
    assert len(calls) == 2  # once per image for both settings (their superpixels agree)
