"""Image reading: conversions and clear errors."""
import numpy as np
import pytest
from PIL import Image

from dynaseg_jax import images as imio


def test_modes_become_rgb(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_allclose(imio.load_image(tmp_path / "rgb.png"), rgb / 255.0, atol=1e-6)
    gray = rgb[..., 0]
    Image.fromarray(gray).save(tmp_path / "gray.png")
    got = imio.load_image(tmp_path / "gray.png")
    assert got.shape == (6, 5, 3)
    np.testing.assert_allclose(got[..., 2], gray / 255.0, atol=1e-6)
    Image.fromarray(np.dstack([rgb, np.full((6, 5), 7, np.uint8)])).save(tmp_path / "rgba.png")
    np.testing.assert_allclose(imio.load_image(tmp_path / "rgba.png"), rgb / 255.0, atol=1e-6)
    Image.fromarray(rgb).convert("P").save(tmp_path / "pal.png")
    assert imio.load_image(tmp_path / "pal.png").shape == (6, 5, 3)
    g16 = (np.arange(30).reshape(6, 5) * 2000).astype(np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    np.testing.assert_allclose(imio.load_image(tmp_path / "g16.png")[..., 0], g16 / 65535.0, atol=1e-6)


def test_errors_name_the_file(tmp_path):
    (tmp_path / "notes.jpg").write_text("not an image")
    with pytest.raises(imio.ImageError, match="notes.jpg.*not an image"):
        imio.load_image(tmp_path / "notes.jpg")
    Image.fromarray(np.zeros((1, 5, 3), np.uint8)).save(tmp_path / "thin.png")
    with pytest.raises(imio.ImageError, match="thin.png.*1x5"):
        imio.load_image(tmp_path / "thin.png")
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "big.png")
    with pytest.raises(imio.ImageError, match="big.png.*max_pixels"):
        imio.load_image(tmp_path / "big.png", max_pixels=1000)
    img = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(imio.ImageError, match="cut.jpg.*truncated or corrupt"):
        imio.load_image(tmp_path / "cut.jpg")
    with pytest.raises(imio.ImageError, match="missing.png.*no such file"):
        imio.load_image(tmp_path / "missing.png")


def test_renumber_and_label_png_roundtrip(tmp_path):
    labels = np.array([[7, 7, 300], [42, 300, 7]])
    ren = imio.renumber(labels)
    np.testing.assert_array_equal(ren, [[0, 0, 2], [1, 2, 0]])
    imio.save_labels(tmp_path / "l.png", ren + 1000)
    back = imio.read_labels(tmp_path / "l.png")
    np.testing.assert_array_equal(back, ren + 1000)
    assert Image.open(tmp_path / "l.png").mode.startswith("I;16")
    assert not list(tmp_path.glob(".*tmp"))  # no temp files left behind


def test_resize_image_same_pixels_for_uint8_and_float():
    rng = np.random.default_rng(5)
    u8 = rng.integers(0, 256, (7, 11, 3), dtype=np.uint8)
    small_u8 = imio.resize_image(u8, 0.5)
    small_f = imio.resize_image(u8.astype(np.float32) / 255.0, 0.5)
    assert small_u8.dtype == np.uint8 and small_f.dtype == np.float32
    assert small_u8.shape == small_f.shape == (4, 6, 3)  # round(3.5) = 4, round(5.5) = 6
    np.testing.assert_array_equal(np.round(small_f * 255).astype(np.uint8), small_u8)
    assert imio.resize_image(u8, 1.0) is u8


def test_write_json_atomic_makes_values_json_safe(tmp_path):
    # The writer of `dynaseg evaluate --json` and the reproduction's results.json.
    import json
    path = tmp_path / "sub" / "r.json"
    imio.write_json_atomic(path, {"b": float("nan"), "a": (np.int64(3), float("inf"), float("nan")), 1: np.float32(0.5)},
                           sort_keys=True)
    text = path.read_text()
    assert json.loads(text) == {"1": 0.5, "a": [3, None, None], "b": None}
    assert text.index('"1"') < text.index('"a"') < text.index('"b"')
