"""Configs: sections and dotted paths, presets, overrides, TOML round trips, ranges, digest."""
import math
import re
import tomllib

import pytest

from dynaseg_jax.config import (LAYOUT_FIELDS, MODEL_NAMES, SECTIONS, Config, ConfigError, config_digest,
                                field_doc, field_paths, list_presets, load_config, to_toml)


def test_presets():
    assert {"kim_mu5", "dynaseg_fsf", "dynaseg_scf", "dynaseg_fsf_silhouette",
            "dynaseg_scf_silhouette"} <= set(list_presets())
    kim = load_config("kim_mu5")
    assert (kim.schedule.kind, kim.schedule.mu, kim.stop.k_min) == ("fixed", 5.0, 3)
    fsf = load_config("dynaseg_fsf")
    assert (fsf.schedule.kind, fsf.schedule.alpha) == ("fsf", 15.0)
    assert load_config("dynaseg_scf") == Config()  # the default run is the scf preset
    assert load_config("dynaseg_scf_silhouette").stop.k_min == "silhouette"
    plus = load_config("dynaseg_plus")
    assert (plus.schedule.kind, plus.model.padding, plus.model.input_space, plus.superpixels.method,
            plus.postprocess.superpixel_vote, plus.postprocess.connected) == ("fsf", "reflect", "lab", "felzenszwalb",
                                                                             True, True)
    for kind in ("fsf", "scf"):
        c = load_config(f"resnet18_fpn_{kind}")
        assert (c.model.name, c.schedule.kind) == ("resnet18_fpn", kind)


def test_dotted_overrides():
    c = load_config("dynaseg_scf", ["stop.max_iters=30", "stop.k_min=silhouette", "optim.lr=0.05",
                                    "silhouette.k_range=[2, 8]", "engine.transpose_portrait=false",
                                    "seed=4"])
    assert (c.stop.max_iters, c.stop.k_min, c.optim.lr, c.silhouette.k_range, c.engine.transpose_portrait,
            c.seed) == (30, "silhouette", 0.05, (2, 8), False, 4)
    assert load_config(None, {"stop.k_min": "5"}).stop.k_min == 5
    # One namespace: replace() takes the same dotted paths; get() reads them.
    d = Config().replace({"optim.lr": 0.05, "engine.batch": 3}, seed=2)
    assert (d.get("optim.lr"), d.get("engine.batch"), d.seed) == (0.05, 3, 2)
    assert d.flat()["optim.lr"] == 0.05 and list(d.flat()) == field_paths()


def test_every_field_documented_and_in_a_section():
    paths = field_paths()
    assert len(paths) == len(set(paths))
    assert {p.split(".")[0] for p in paths if "." in p} == set(SECTIONS)
    for p in paths:
        assert len(field_doc(p)) > 10, p


def test_registry_names_agree():
    from dynaseg_jax.models import MODELS
    assert set(MODELS) == set(MODEL_NAMES)


@pytest.mark.parametrize("overrides, message", [
    (["nonsense=1"], "unknown field nonsense"),
    (["optim.nonsense=1"], "unknown field optim.nonsense"),
    (["stop.max_iters=abc"], "expected an integer"),
    (["schedule.kind=cosine"], "choose one of"),
    (["stop.k_min=often"], "stop.k_min"),
    (["stop.max_iters"], "key=value"),
    (["engine.batch=-1"], "must be >= 0"),
    (["model.channels=0"], "must be >= 1"),
    (["model.name=vgg"], "model.name = 'vgg': choose one of cnn"),
])
def test_bad_overrides(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("dynaseg_scf", overrides)


@pytest.mark.parametrize("old, new", [("lr", "optim.lr"), ("max_iters", "stop.max_iters"),
                                      ("batch", "engine.batch"), ("n_clusters", "model.max_clusters"),
                                      ("mu_uses_kstar", "schedule.uses_kstar"),
                                      ("silhouette_k_range", "silhouette.k_range"),
                                      ("schedule", "schedule.kind"), ("optim.lrr", "optim.lr")])
def test_flat_keys_of_earlier_releases_get_a_suggestion(old, new):
    with pytest.raises(ConfigError, match=re.escape(f"did you mean {new}?")):
        load_config("dynaseg_scf", [f"{old}=1"])


def test_config_file(tmp_path):
    good = tmp_path / "mine.toml"
    good.write_text('[schedule]\nkind = "fsf"\nalpha = 12.0\n[stop]\nmax_iters = 7\n')
    c = load_config(str(good))
    assert (c.schedule.alpha, c.stop.max_iters) == (12.0, 7)
    flat = tmp_path / "flat.toml"
    flat.write_text('alpha = 12.0\n')
    with pytest.raises(ConfigError, match=r"flat.toml: unknown field alpha \(did you mean schedule.alpha\?\)"):
        load_config(str(flat))
    bad = tmp_path / "bad.toml"
    bad.write_text("schedule = \n")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="unknown config"):
        load_config("no_such_preset")


# --- TOML output, ranges, digest ---------------------------------------------------------


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_round_trips_through_toml(name, tmp_path):
    config = load_config(name)
    text = to_toml(config, header=f"preset {name}")
    parsed = tomllib.loads(text)  # valid TOML, every field present, sections as tables
    assert set(parsed) == {"seed", "init", *SECTIONS}
    assert sum(len(v) if isinstance(v, dict) else 1 for v in parsed.values()) == len(field_paths())
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    assert load_config(str(path)) == config
    for p in field_paths():  # each field's doc is the comment above it
        assert f"# {field_doc(p)}\n{p.rsplit('.', 1)[-1]} = " in text


def test_toml_round_trip_of_unusual_values(tmp_path):
    config = load_config(None, ["stop.k_min=silhouette", "optim.lr=1e-05", "schedule.alpha=3",
                                "schedule.mu=0.1", "silhouette.k_range=[3, 7]",
                                "engine.transpose_portrait=false"])
    path = tmp_path / "c.toml"
    path.write_text(to_toml(config))
    again = load_config(str(path))
    assert again == config and isinstance(again.schedule.alpha, float) and again.optim.lr == 1e-05


def test_cli_config_output_is_loadable(tmp_path, capsys):
    from dynaseg_jax.cli import main
    assert main(["config", "dynaseg_fsf_silhouette", "--set", "stop.max_iters=7",
                 "--set", "optim.lr=0.05"]) == 0
    path = tmp_path / "mine.toml"
    path.write_text(capsys.readouterr().out)
    c = load_config(str(path))
    assert c == load_config("dynaseg_fsf_silhouette", ["stop.max_iters=7", "optim.lr=0.05"])


@pytest.mark.parametrize("override, message", [
    ("optim.lr=-1", "optim.lr = -1.0: must be finite and > 0"),
    ("optim.lr=0", "optim.lr = 0.0: must be finite and > 0"),
    ("optim.lr=inf", "optim.lr = inf"),
    ("optim.lr=nan", "optim.lr = nan"),
    ("optim.momentum=2", "optim.momentum = 2.0: must be in [0, 1)"),
    ("optim.momentum=1", "optim.momentum = 1.0"),
    ("optim.momentum=-0.1", "optim.momentum"),
    ("optim.weight_decay=-5", "optim.weight_decay = -5.0: must be finite and >= 0"),
    ("schedule.alpha=1e308", "schedule.alpha = 1e+308"),  # finite in float64, inf in float32
    ("schedule.alpha=0", "schedule.alpha = 0.0"),
    ("schedule.mu=-1", "schedule.mu = -1.0"),
    ("schedule.mu=1e39", "schedule.mu = 1e+39"),
])
def test_nonsense_optimiser_settings_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("dynaseg_scf", [override])


def test_range_edges_are_accepted():
    c = load_config("dynaseg_scf", ["optim.momentum=0", "optim.weight_decay=0", "optim.lr=1e-30",
                                    "schedule.alpha=3.4e38"])
    assert c.optim.momentum == 0 and math.isfinite(c.schedule.alpha)


def test_digest_covers_labels_not_layout():
    base = load_config("dynaseg_scf")
    d = config_digest(base)
    assert len(d) == 16 and d == config_digest(load_config("dynaseg_scf"))
    # Layout: same digest.
    layout = {"engine.strategy": "vmap", "engine.batch": 9, "engine.devices": 2, "engine.sync_every": 5,
              "engine.bucket_multiple": 32, "engine.max_pixels": 10, "engine.kstar_processes": 3}
    assert set(layout) == set(LAYOUT_FIELDS)
    for path, value in layout.items():
        assert config_digest(base.replace({path: value})) == d, path
    # Everything else: a different digest, field by field, and the scale too.
    changed = {"seed": 1, "init": "shared", "model.name": "resnet18_fpn", "model.weights": "random", "model.n_conv": 3, "model.channels": 64, "model.max_clusters": 50,
               "model.conv_impl": "lax", "model.padding": "reflect", "model.output_norm": False,
               "model.input_space": "lab", "model.position": 1.0, "model.matmul_precision": "bfloat16",
               "model.emulate_precision": True, "model.channel_multiple": 8,
               "schedule.kind": "fsf",
               "schedule.alpha": 15.0, "schedule.mu": 4.0, "schedule.uses_kstar": True, "optim.lr": 0.05,
               "optim.momentum": 0.5, "optim.weight_decay": 1e-4, "stop.k_min": 4, "stop.max_iters": 10, "stop.plateau": 50,
               "silhouette.features": "color_position", "silhouette.k_range": (2, 9),
               "silhouette.samples": 100, "silhouette.position_scale": 2.0, "silhouette.n_init": 1,
               "silhouette.dims": 8,
               "superpixels.method": "slic", "superpixels.max_segments": 100, "superpixels.scale": 5.0,
               "superpixels.sigma": 0.1, "superpixels.min_size": 3, "superpixels.reference_pixels": 9600, "superpixels.n_segments": 50,
               "superpixels.compactness": 20.0, "postprocess.connected": True, "engine.transpose_portrait": False}
    trunk = {"model.trunk": "frozen", "model.trunk_norm": "running"}  # fields of trunk models only
    needs_other_fields = {"postprocess.min_region", "postprocess.superpixel_vote"}  # checked below
    assert set(changed) | set(layout) | set(trunk) | needs_other_fields == set(field_paths())
    for path, value in changed.items():
        assert config_digest(base.replace({path: value})) != d, path
    merged = base.replace({"postprocess.connected": True})
    assert config_digest(merged.replace({"postprocess.min_region": 0.01})) != config_digest(merged)
    # A field added later, at the value of the labels from before it: left out of the
    # digest (the digest of the config without that field), so older folders resume.
    from dynaseg_jax.config import DIGEST_SCHEMA, HASHED_WHEN_SET
    import hashlib
    import json
    older = {p: v for p, v in base.flat().items() if p not in LAYOUT_FIELDS and p not in HASHED_WHEN_SET}
    text = json.dumps({"schema": DIGEST_SCHEMA, "scale": 1.0, "config": older}, sort_keys=True, default=list)
    assert d == hashlib.sha256(text.encode()).hexdigest()[:16]
    # Emulated products hash the emulation's own schema too: a folder of an earlier
    # emulation is not resumed into.
    from dynaseg_jax.config import EMULATION_SCHEMA
    emulated = base.replace({"model.emulate_precision": True})
    fields = {p: v for p, v in emulated.flat().items()
              if p not in LAYOUT_FIELDS and not (p in HASHED_WHEN_SET and v == HASHED_WHEN_SET[p])}
    for extra, equal in (({"emulation_schema": EMULATION_SCHEMA}, True), ({}, False)):  # {}: the earlier form
        payload = {"schema": DIGEST_SCHEMA, "scale": 1.0, "config": fields, **extra}
        text = json.dumps(payload, sort_keys=True, default=list)
        assert (config_digest(emulated) == hashlib.sha256(text.encode()).hexdigest()[:16]) == equal
    # Other convs' emulation did not change: their digests keep the earlier form.
    lax = emulated.replace({"model.conv_impl": "lax"})
    lax_fields = {p: v for p, v in lax.flat().items()
                  if p not in LAYOUT_FIELDS and not (p in HASHED_WHEN_SET and v == HASHED_WHEN_SET[p])}
    text = json.dumps({"schema": DIGEST_SCHEMA, "scale": 1.0, "config": lax_fields}, sort_keys=True, default=list)
    assert config_digest(lax) == hashlib.sha256(text.encode()).hexdigest()[:16]
    with_superpixels = base.replace({"superpixels.method": "felzenszwalb"})
    assert (config_digest(with_superpixels.replace({"postprocess.superpixel_vote": True}))
            != config_digest(with_superpixels))
    fpn = base.replace({"model.name": "resnet18_fpn"})
    for path, value in trunk.items():
        assert config_digest(fpn.replace({path: value})) != config_digest(fpn), path
    assert config_digest(base, scale=0.5) != d


def test_trunk_fields_need_a_trunk_model():
    from dynaseg_jax.config import TRUNK_MODELS
    from dynaseg_jax.models import PRETRAINED
    assert set(TRUNK_MODELS) == set(PRETRAINED)
    with pytest.raises(ConfigError, match="model.trunk = 'frozen': model 'cnn' has no pretrained trunk"):
        Config().replace({"model.trunk": "frozen"})
    with pytest.raises(ConfigError, match="model.trunk_norm"):
        Config().replace({"model.trunk_norm": "running"})
    for name in TRUNK_MODELS:
        Config().replace({"model.name": name, "model.trunk": "frozen", "model.trunk_norm": "running"})


def test_padding_and_output_norm_are_the_cnns():
    for mode in ("zeros", "reflect", "replicate"):
        assert Config().replace({"model.padding": mode}).model.padding == mode
    with pytest.raises(ConfigError, match="model.padding = 'reflect': applies to model 'cnn' only"):
        Config().replace({"model.name": "resnet18_fpn", "model.padding": "reflect"})
    with pytest.raises(ConfigError, match="model.position = 1.0: applies to model 'cnn' only"):
        Config().replace({"model.name": "resnet18_fpn", "model.position": 1.0})
    with pytest.raises(ConfigError, match="model.output_norm = False: applies to model 'cnn' only"):
        Config().replace({"model.name": "efficientnet_lite0_fpn", "model.output_norm": False})
    with pytest.raises(ConfigError, match="model.emulate_precision = True: applies to model 'cnn' only"):
        Config().replace({"model.name": "resnet18_fpn", "model.emulate_precision": True})
    with pytest.raises(ConfigError, match="model.channel_multiple = 8: applies to model 'cnn' only"):
        Config().replace({"model.name": "resnet18_layer1", "model.channel_multiple": 8})
    with pytest.raises(ConfigError, match="model.padding = 'circular': choose one of zeros, reflect, replicate"):
        Config().replace({"model.padding": "circular"})
