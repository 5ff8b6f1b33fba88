"""Reading input images and writing label maps, overlays and result records.

Every failure on an input raises ``ImageError`` with the file name and the problem
in one line; outputs are written to a temporary file and renamed into place, so an
interrupted run never leaves a half-written PNG behind.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif")
MIN_SIDE = 2


class ImageError(ValueError):
    """An input image that cannot be segmented; the message names the file."""


def open_image(path: Path, error: type[Exception] = ImageError) -> Image.Image:
    """``Image.open`` with one-line errors of type ``error`` that name the file."""
    try:
        img = Image.open(path)
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory") from None
    except UnidentifiedImageError:
        raise error(f"{path}: not an image file (unrecognised format)") from None
    except OSError as e:
        raise error(f"{path}: cannot open image: truncated or corrupt file ({e})") from None
    return img


def decode_now(img: Image.Image, path: Path, error: type[Exception] = ImageError) -> None:
    """Decodes the pixels now, so that a truncated file fails here, with its name."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
    except (OSError, SyntaxError, ValueError) as e:
        msg = str(e) or type(e).__name__
        raise error(f"{path}: cannot decode image: truncated or corrupt file ({msg})") from None


def image_size(path: str | os.PathLike, error: type[Exception] = ImageError) -> tuple[int, int]:
    """(height, width) from the file header, without decoding the pixels."""
    with open_image(Path(path), error) as img:
        w, h = img.size
    return h, w


def to_float_rgb(img: Image.Image) -> np.ndarray:
    """A PIL image of any common mode as float32 RGB in [0, 1], shape (H, W, 3).

    Grayscale is repeated over the channels, alpha is dropped, palettes are expanded,
    and 16/32-bit integer images are scaled by their bit depth.
    """
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img).astype(np.float32)
        # 'I' is how PIL opens 16-bit grayscale PNGs; values above 16 bits are clipped.
        arr = np.clip(arr / 65535.0, 0.0, 1.0)
        return np.repeat(arr[..., None], 3, axis=-1)
    if mode == "F":
        arr = np.nan_to_num(np.asarray(img, np.float32))
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        return np.repeat(arr[..., None], 3, axis=-1)
    if mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, np.float32) / 255.0


def check_size(h: int, w: int, max_pixels: int, name: str) -> None:
    if h < MIN_SIDE or w < MIN_SIDE:
        raise ImageError(f"{name}: image is {h}x{w} pixels; at least {MIN_SIDE}x{MIN_SIDE} is needed")
    if h * w > max_pixels:
        raise ImageError(f"{name}: image is {h}x{w} = {h * w} pixels, above max_pixels = {max_pixels}; "
                         f"resize it or raise max_pixels")


def load_image(path: str | os.PathLike, max_pixels: int = 4_000_000) -> np.ndarray:
    """Reads an image file as float32 RGB in [0, 1], shape (H, W, 3).

    Raises:
      ImageError: unreadable, truncated or non-image files, images under 2x2 pixels
        or above ``max_pixels``.
    """
    path = Path(path)
    with open_image(path) as img:
        h, w = img.size[1], img.size[0]
        check_size(h, w, max_pixels, str(path))
        decode_now(img, path)
        return to_float_rgb(img)


def as_float_image(image, name: str = "image") -> np.ndarray:
    """An array (H, W), (H, W, 1|3|4) of uint8/uint16/float as float32 RGB in [0, 1]."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ImageError(f"{name}: expected an (H, W), (H, W, 3) or (H, W, 4) array, got shape {arr.shape}")
    if arr.shape[-1] == 4:
        arr = arr[..., :3]
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255.0
    elif arr.dtype == np.uint16:
        arr = arr.astype(np.float32) / 65535.0
    elif np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)
        if not np.all(np.isfinite(arr)):
            raise ImageError(f"{name}: image has NaN or infinite values")
    else:
        raise ImageError(f"{name}: unsupported dtype {arr.dtype}; use uint8, uint16 or float in [0, 1]")
    return np.ascontiguousarray(arr)


def renumber(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered 0..K-1 (in increasing order of the original ids)."""
    _, inverse = np.unique(labels, return_inverse=True)
    return inverse.reshape(labels.shape).astype(np.int32)


def atomic_write(path: str | os.PathLike, write) -> None:
    """Calls ``write(tmp_path)`` on a temporary file beside ``path``, then renames it into
    place: readers (and an interrupted run) never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; outputs are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def json_safe(obj):
    """NaN/inf -> None, tuples -> lists, numpy scalars -> Python, keys -> str (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json_atomic(path: str | os.PathLike, data, sort_keys: bool = False) -> None:
    """``data`` as indented JSON (through ``json_safe``), written atomically."""
    text = json.dumps(json_safe(data), indent=2, sort_keys=sort_keys, allow_nan=False) + "\n"
    write_text_atomic(path, text)


def save_labels(path: str | os.PathLike, labels: np.ndarray) -> None:
    """Writes a label map as a 16-bit grayscale PNG, atomically."""
    if labels.max(initial=0) > 65535:
        raise ValueError(f"{path}: {labels.max()} labels do not fit a 16-bit PNG")
    img = Image.fromarray(labels.astype(np.uint16))
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def read_labels(path: str | os.PathLike) -> np.ndarray:
    """Reads a label PNG written by ``save_labels`` (or any integer PNG) as int32."""
    with Image.open(path) as img:
        return np.asarray(img).astype(np.int32)


def label_colors(n: int, seed: int = 0) -> np.ndarray:
    """n distinct-ish colours, uint8 (n, 3)."""
    return np.random.default_rng(seed).integers(40, 256, size=(max(n, 1), 3), dtype=np.uint8)


def boundaries(labels: np.ndarray) -> np.ndarray:
    """Boolean map of pixels whose right or lower neighbour has another label."""
    edge = np.zeros(labels.shape, bool)
    edge[:-1] |= labels[:-1] != labels[1:]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    return edge


def overlay(image: np.ndarray, labels: np.ndarray, blend: float = 0.45) -> np.ndarray:
    """uint8 picture: segment colours blended over the image, boundaries in white."""
    base = np.clip(image * 255.0, 0, 255)
    colors = label_colors(int(labels.max()) + 1)[labels].astype(np.float32)
    out = (1 - blend) * base + blend * colors
    out[boundaries(labels)] = 255.0
    return out.astype(np.uint8)


def save_overlay(path: str | os.PathLike, image: np.ndarray, labels: np.ndarray) -> None:
    img = Image.fromarray(overlay(image, labels))
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Appends one JSON line and flushes it to disk (a crash loses at most this line)."""
    line = json.dumps(record, sort_keys=True) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records of a results file; a torn last line (interrupted write) is skipped."""
    records = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    except FileNotFoundError:
        pass
    return records


def resize_image(image: np.ndarray, scale: float) -> np.ndarray:
    """Bilinear resize of an RGB image by ``scale``; each side is at least 1 pixel.

    uint8 images come back as uint8; float images in [0, 1] go through 8 bits (as they
    were read) and come back as float32, so both give the same pixels.
    """
    if scale == 1.0:
        return image
    h, w = image.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if image.dtype == np.uint8:
        return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR), np.uint8)
    pil = Image.fromarray(np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8))
    return np.asarray(pil.resize(size, Image.BILINEAR), np.float32) / 255.0
