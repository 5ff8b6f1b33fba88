"""Image reading: conversions and clear errors."""
import numpy as np
import pytest
from PIL import Image, ImageOps

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


def test_decompression_bomb_is_a_one_line_error(tmp_path, monkeypatch):
    # Pillow refuses to open an image of more than 2 MAX_IMAGE_PIXELS pixels: a one-line
    # ImageError naming the file, as for other unreadable files (one image of a run).
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1600 pixels > 2 x 100
    with pytest.raises(imio.ImageError, match="bomb.png: image is larger than 200 pixels"):
        imio.load_image(tmp_path / "bomb.png", max_pixels=10 ** 9)


def test_scaled_size_is_checked_before_resizing(tmp_path, monkeypatch):
    # A large --scale is refused from the image's size, before the resized image exists.
    from pathlib import Path

    from dynaseg_jax.config import Config
    from dynaseg_jax.runner import load_job_image
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "a.png")
    assert imio.scaled_size(20, 30, 20.0) == (400, 600) and imio.scaled_size(20, 30, 1e-3) == (1, 1)
    monkeypatch.setattr(imio, "resize_image", lambda *a: pytest.fail("resized before the size check"))
    cfg = Config().replace({"engine.max_pixels": 5000})
    job = ("a.png", str(tmp_path / "a.png"), "a", Path(tmp_path / "a.png"))
    with pytest.raises(imio.ImageError, match=r"a.png \(scaled by 20.0\): image is 400x600 = 240000 pixels"):
        load_job_image(job, 20.0, cfg)


def test_read_jsonl_skips_damaged_lines_with_a_warning(tmp_path):
    # Only JSON objects are records. A damaged line in the middle is skipped with a
    # warning naming the file and line; a torn last line (no newline) and blank lines
    # silently.
    path = tmp_path / "results.jsonl"
    path.write_bytes(b'{"stem": "a"}\n[1, 2]\n{"bad json\n\n\xff\xfe\n{"stem": "b"}\n{"stem": "c", "sta')
    with pytest.warns(UserWarning) as caught:
        records = imio.read_jsonl(path)
    assert records == [{"stem": "a"}, {"stem": "b"}]
    assert [str(w.message) for w in caught] == [f"{path}:{n}: not a JSON object (a damaged record); skipped"
                                                for n in (2, 3, 5)]
    assert imio.read_jsonl(tmp_path / "none.jsonl") == []


def test_atomic_write_errors_name_the_file_asked_for(tmp_path):
    # Not the temporary file beside it; and none is left behind.
    (tmp_path / "taken").mkdir()
    with pytest.raises(IsADirectoryError) as e:
        imio.write_text_atomic(tmp_path / "taken", "x")
    assert e.value.filename == str(tmp_path / "taken")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError) as e:
        imio.write_json_atomic(tmp_path / "file" / "out.json", {})  # a file where a folder must be
    assert e.value.filename == str(tmp_path / "file")  # the culprit, as the OS names it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "taken"]


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


# ---------------------------------------------------------------- EXIF orientation


def _pattern(h=4, w=7):
    """A pattern with no symmetry: every transposition of it differs."""
    return np.random.default_rng(3).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save_oriented(path, rgb, orientation, **kw):
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(rgb).save(path, exif=exif, **kw)


def _exif_transposed(path):
    with Image.open(path) as img:
        return np.asarray(ImageOps.exif_transpose(img).convert("RGB"), np.float32) / 255.0


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_load_image_applies_exif_orientation(tmp_path, ext, orientation):
    rgb = _pattern()
    path = tmp_path / f"o{orientation}.{ext}"
    _save_oriented(path, rgb, orientation, **({"quality": 95} if ext == "jpg" else {}))
    got = imio.load_image(path)
    np.testing.assert_array_equal(got, _exif_transposed(path))
    upright = (7, 4) if orientation in (5, 6, 7, 8) else (4, 7)
    assert got.shape == (*upright, 3)
    assert imio.image_size(path) == upright  # header only, agrees with load_image
    raw = imio.load_image(path, oriented=False)
    assert raw.shape == (4, 7, 3) and imio.image_size(path, oriented=False) == (4, 7)
    if orientation != 1:
        assert got.shape != raw.shape or not np.array_equal(got, raw)
    if ext == "png":  # lossless: the raw pixels are the stored ones
        np.testing.assert_array_equal(raw, rgb / np.float32(255.0))


def test_orientation_6_is_a_quarter_turn_clockwise_for_viewing(tmp_path):
    # Orientation=6: the camera was turned; viewers rotate the stored pixels 90 deg clockwise.
    rgb = _pattern()
    _save_oriented(tmp_path / "phone.png", rgb, 6)
    got = imio.load_image(tmp_path / "phone.png")
    np.testing.assert_array_equal(got, np.rot90(rgb, k=-1) / np.float32(255.0))


def test_image_size_reads_orientation_without_decoding(tmp_path):
    # A truncated file: decoding it fails, its header still gives the oriented size.
    rgb = np.random.default_rng(0).integers(0, 256, (64, 40, 3), dtype=np.uint8)
    _save_oriented(tmp_path / "full.jpg", rgb, 6, quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    assert imio.image_size(tmp_path / "cut.jpg") == (40, 64)
    assert imio.image_size(tmp_path / "cut.jpg", oriented=False) == (64, 40)
    with pytest.raises(imio.ImageError, match="cut.jpg.*truncated or corrupt"):
        imio.load_image(tmp_path / "cut.jpg")


def test_png_exif_chunk_after_the_pixels(tmp_path):
    # eXIf after IDAT: Pillow sees it only once the pixels are decoded; image_size finds it
    # by walking the chunk headers, so both still agree with exif_transpose.
    import struct
    import zlib
    rgb = _pattern()
    Image.fromarray(rgb).save(tmp_path / "plain.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    body = exif.tobytes()
    body = body[6:] if body.startswith(b"Exif\x00\x00") else body
    chunk = struct.pack(">I", len(body)) + b"eXIf" + body + struct.pack(">I", zlib.crc32(b"eXIf" + body))
    data = (tmp_path / "plain.png").read_bytes()
    end = data.rindex(b"IEND") - 4
    (tmp_path / "late.png").write_bytes(data[:end] + chunk + data[end:])
    with Image.open(tmp_path / "late.png") as img:
        assert "exif" not in img.info  # not in the header
    assert imio.image_size(tmp_path / "late.png") == (7, 4)
    np.testing.assert_array_equal(imio.load_image(tmp_path / "late.png"), _exif_transposed(tmp_path / "late.png"))


def test_orientation_swaps_sides_in_size_errors(tmp_path):
    _save_oriented(tmp_path / "thin.png", np.zeros((1, 5, 3), np.uint8), 6)
    with pytest.raises(imio.ImageError, match="thin.png.*5x1"):
        imio.load_image(tmp_path / "thin.png")


# ---------------------------------------------------------------- float range of the Python API


def test_as_float_image_rejects_0_255_floats():
    img = np.zeros((4, 5, 3), np.float32)
    img[0, 0] = 255.0
    with pytest.raises(imio.ImageError, match=r"^images\[0\]: float image has values in \[0, 255\]; "
                                              r"expected \[0, 1\] \(divide by 255, or pass uint8\)$"):
        imio.as_float_image(img, name="images[0]")
    with pytest.raises(imio.ImageError, match=r"img: float image has values in \[-0.5, 0.5\]; expected \[0, 1\] \(rescale"):
        imio.as_float_image(np.array([[-0.5, 0.5], [0.0, 0.25]]), name="img")


def test_as_float_image_accepts_rounding_and_clips():
    img = np.full((3, 4, 3), 0.5, np.float32)
    img[0, 0] = np.nextafter(np.float32(1.0), np.float32(2.0))  # 1 + 1 ulp
    img[0, 1] = -1e-7
    out = imio.as_float_image(img)
    assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == 1.0
    np.testing.assert_array_equal(out[1:], img[1:])
    out64 = imio.as_float_image(np.linspace(0, 1, 12).reshape(3, 4))  # float64, (H, W)
    assert out64.shape == (3, 4, 3) and out64.dtype == np.float32
    u8 = imio.as_float_image(np.full((2, 2, 3), 255, np.uint8))  # integers are scaled, not checked
    assert u8.max() == 1.0


# ---------------------------------------------------------------- palette label PNGs


def test_save_labels_color_palette_roundtrip(tmp_path):
    labels = np.array([[0, 0, 3, 3], [1, 2, 2, 3], [1, 1, 0, 2]])
    imio.save_labels(tmp_path / "gray.png", labels)
    imio.save_labels(tmp_path / "color.png", labels, color=True)
    for name in ("gray.png", "color.png"):
        back = imio.read_labels(tmp_path / name)
        assert back.dtype == np.int32
        np.testing.assert_array_equal(back, labels)
    with Image.open(tmp_path / "color.png") as img:
        assert img.mode == "P"
        rgb = np.asarray(img.convert("RGB"))
    np.testing.assert_array_equal(rgb, imio.label_colors(4)[labels])  # as in the overlays
    assert not list(tmp_path.glob(".*tmp"))


def test_save_labels_color_limits(tmp_path):
    labels = np.arange(256).reshape(16, 16)
    imio.save_labels(tmp_path / "full.png", labels, color=True)  # 256 labels: fits
    np.testing.assert_array_equal(imio.read_labels(tmp_path / "full.png"), labels)
    with pytest.raises(ValueError, match="many.png: 257 labels .* 8-bit palette PNG"):
        imio.save_labels(tmp_path / "many.png", np.arange(257).reshape(1, 257), color=True)
    assert not (tmp_path / "many.png").exists()
    imio.save_labels(tmp_path / "many.png", np.arange(257).reshape(1, 257))  # 16-bit still fits
    with pytest.raises(ValueError, match="neg.png: negative label"):
        imio.save_labels(tmp_path / "neg.png", np.array([[0, -1]]), color=True)
