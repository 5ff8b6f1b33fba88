"""Configs: presets, overrides, and clear errors."""
import pytest

from dynaseg_jax.config import FIELD_DOCS, Config, ConfigError, list_presets, load_config


def test_presets():
    assert {"kim_mu5", "dynaseg_fsf", "dynaseg_scf", "dynaseg_fsf_silhouette",
            "dynaseg_scf_silhouette"} <= set(list_presets())
    kim = load_config("kim_mu5")
    assert (kim.schedule, kim.mu, kim.k_min) == ("fixed", 5.0, 3)
    assert (load_config("dynaseg_fsf").schedule, load_config("dynaseg_fsf").alpha) == ("fsf", 15.0)
    assert (load_config("dynaseg_scf").schedule, load_config("dynaseg_scf").alpha) == ("scf", 50.0)
    assert load_config("dynaseg_scf_silhouette").k_min == "silhouette"


def test_overrides():
    c = load_config("dynaseg_scf", ["max_iters=30", "k_min=silhouette", "lr=0.05",
                                    "silhouette_k_range=[2, 8]", "transpose_portrait=false"])
    assert (c.max_iters, c.k_min, c.lr, c.silhouette_k_range, c.transpose_portrait) == \
        (30, "silhouette", 0.05, (2, 8), False)
    assert load_config(None, {"k_min": "5"}).k_min == 5


def test_every_field_documented():
    import dataclasses
    assert {f.name for f in dataclasses.fields(Config)} == set(FIELD_DOCS)


@pytest.mark.parametrize("overrides, message", [
    (["nonsense=1"], "unknown field"),
    (["max_iters=abc"], "expected an integer"),
    (["schedule=cosine"], "choose one of"),
    (["k_min=often"], "k_min"),
    (["max_iters"], "key=value"),
    (["batch=-1"], "must be >= 0"),
    (["channels=0"], "must be >= 1"),
])
def test_bad_overrides(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("dynaseg_scf", overrides)


def test_config_file(tmp_path):
    good = tmp_path / "mine.toml"
    good.write_text('schedule = "fsf"\nalpha = 12.0\nmax_iters = 7\n')
    assert load_config(str(good)).alpha == 12.0
    bad = tmp_path / "bad.toml"
    bad.write_text("schedule = \n")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="unknown config"):
        load_config("no_such_preset")


# --- TOML output, ranges, digest ---------------------------------------------------------

import dataclasses  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import tomllib  # noqa: E402

from dynaseg_jax.config import LAYOUT_FIELDS, config_digest, to_toml  # noqa: E402


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_round_trips_through_toml(name, tmp_path):
    config = load_config(name)
    text = to_toml(config, header=f"preset {name}")
    parsed = tomllib.loads(text)  # valid TOML, every field present
    assert set(parsed) == {f.name for f in dataclasses.fields(Config)}
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    assert load_config(str(path)) == config
    for f in dataclasses.fields(Config):  # each field's doc is the comment above it
        assert f"# {FIELD_DOCS[f.name]}\n{f.name} = " in text


def test_toml_round_trip_of_unusual_values(tmp_path):
    config = load_config(None, ["k_min=silhouette", "lr=1e-05", "alpha=3", "mu=0.1",
                                "silhouette_k_range=[3, 7]", "transpose_portrait=false"])
    path = tmp_path / "c.toml"
    path.write_text(to_toml(config))
    again = load_config(str(path))
    assert again == config and isinstance(again.alpha, float) and again.lr == 1e-05


def test_cli_config_output_is_loadable(tmp_path, capsys):
    from dynaseg_jax.cli import main
    assert main(["config", "dynaseg_fsf_silhouette", "--set", "max_iters=7", "--set", "lr=0.05"]) == 0
    path = tmp_path / "mine.toml"
    path.write_text(capsys.readouterr().out)
    c = load_config(str(path))
    assert c == load_config("dynaseg_fsf_silhouette", ["max_iters=7", "lr=0.05"])


@pytest.mark.parametrize("override, message", [
    ("lr=-1", "lr = -1.0: must be finite and > 0"),
    ("lr=0", "lr = 0.0: must be finite and > 0"),
    ("lr=inf", "lr = inf"),
    ("lr=nan", "lr = nan"),
    ("momentum=2", "momentum = 2.0: must be in [0, 1)"),
    ("momentum=1", "momentum = 1.0"),
    ("momentum=-0.1", "momentum"),
    ("weight_decay=-5", "weight_decay = -5.0: must be finite and >= 0"),
    ("alpha=1e308", "alpha = 1e+308"),  # finite in float64, inf in float32
    ("alpha=0", "alpha = 0.0"),
    ("mu=-1", "mu = -1.0"),
    ("mu=1e39", "mu = 1e+39"),
])
def test_nonsense_optimiser_settings_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("dynaseg_scf", [override])


def test_range_edges_are_accepted():
    c = load_config("dynaseg_scf", ["momentum=0", "weight_decay=0", "lr=1e-30", "alpha=3.4e38"])
    assert c.momentum == 0 and math.isfinite(c.alpha)


def test_digest_covers_labels_not_layout():
    base = load_config("dynaseg_scf")
    d = config_digest(base)
    assert len(d) == 16 and d == config_digest(load_config("dynaseg_scf"))
    # Layout: same digest.
    layout = {"strategy": "vmap", "batch": 9, "sync_every": 5, "bucket_multiple": 32, "max_pixels": 10}
    assert set(layout) == set(LAYOUT_FIELDS)
    for name, value in layout.items():
        assert config_digest(base.replace(**{name: value})) == d, name
    # Everything else: a different digest, field by field, and the scale too.
    changed = {"schedule": "fsf", "mu": 4.0, "alpha": 15.0, "k_min": 4, "max_iters": 10, "n_conv": 3,
               "channels": 64, "n_clusters": 50, "lr": 0.05, "momentum": 0.5, "weight_decay": 1e-4,
               "seed": 1, "silhouette_features": "color_position", "silhouette_k_range": (2, 9),
               "silhouette_samples": 100, "silhouette_position_scale": 2.0, "mu_uses_kstar": True,
               "conv_impl": "lax", "matmul_precision": "bfloat16", "transpose_portrait": False}
    assert set(changed) | set(layout) == {f.name for f in dataclasses.fields(Config)}
    for name, value in changed.items():
        assert config_digest(base.replace(**{name: value})) != d, name
    assert config_digest(base, scale=0.5) != d
