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
