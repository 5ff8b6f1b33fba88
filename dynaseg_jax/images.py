"""Reading input images and writing label maps, overlays and result records.

Every failure on an input raises ``ImageError`` with the file name and the problem
in one line; outputs are written to a temporary file and renamed into place, so an
interrupted run never leaves a half-written PNG behind.
"""
from __future__ import annotations

import json
import math
import os
import struct
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, TiffImagePlugin, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif")
MIN_SIDE = 2

EXIF_ORIENTATION = 0x0112
# The EXIF orientations that are a quarter turn (or a transposition): upright, the image
# has its stored width as height.
_SWAPS_SIDES = (5, 6, 7, 8)


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
    except Image.DecompressionBombError:
        raise error(f"{path}: image is larger than {2 * Image.MAX_IMAGE_PIXELS} pixels (Pillow's "
                    f"decompression-bomb limit); resize it") from None
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


def _png_late_exif(path: Path) -> bytes | None:
    """The eXIf chunk of a PNG that stores it after the pixel data, found by walking the
    chunk headers (seeking over IDAT, so nothing is decompressed); None if there is none."""
    try:
        with open(path, "rb") as f:
            f.seek(8)  # PNG signature
            while True:
                head = f.read(8)
                if len(head) < 8:
                    return None
                length, kind = struct.unpack(">I4s", head)
                if kind == b"eXIf":
                    return f.read(length)
                if kind == b"IEND":
                    return None
                f.seek(length + 4, os.SEEK_CUR)  # chunk data and CRC
    except OSError:
        return None


def exif_orientation(img: Image.Image, path: Path) -> int:
    """The EXIF orientation (1-8) of an opened image, read without decoding its pixels.

    1 when the file has none, or an unreadable one (viewers then show the stored pixels).
    Reads what ``ImageOps.exif_transpose`` would after decoding: the EXIF block (or XMP
    orientation) in the header, or a PNG eXIf chunk after the pixel data.
    """
    try:
        if isinstance(img, PngImagePlugin.PngImageFile) and "exif" not in img.info:
            late = _png_late_exif(path)
            if late is not None:
                exif = Image.Exif()
                exif.load(late)
                return _valid_orientation(exif.get(EXIF_ORIENTATION, 1))
        # Image.getexif of the base class: PngImageFile.getexif would decode the pixels
        # to look for a late eXIf chunk, which was looked for above without decoding.
        return _valid_orientation(Image.Image.getexif(img).get(EXIF_ORIENTATION, 1))
    except Exception:  # a malformed EXIF block must not make a readable image unreadable
        return 1


def _valid_orientation(value) -> int:
    try:
        value = int(value)
    except (TypeError, ValueError):
        return 1
    return value if 1 <= value <= 8 else 1


def _swaps_sides(img: Image.Image, path: Path, oriented: bool) -> bool:
    """Whether the pixels, once read (and put upright when ``oriented``), have the height
    and width of ``img.size`` swapped. Never for TIFF: Pillow gives the upright size and
    decodes upright pixels itself (``TiffImageFile.load_end``), whatever ``oriented`` says."""
    if not oriented or isinstance(img, TiffImagePlugin.TiffImageFile):
        return False
    return exif_orientation(img, path) in _SWAPS_SIDES


def image_size(path: str | os.PathLike, error: type[Exception] = ImageError,
               oriented: bool = True) -> tuple[int, int]:
    """(height, width) from the file header, without decoding the pixels.

    Args:
      path: image file.
      error: exception type raised (with the file name) for unreadable files.
      oriented: the size that ``load_image`` returns, after the EXIF orientation
        (sides swapped for orientations 5-8). False: the stored pixel layout, which the
        dataset readers (``open_image`` + ``decode_now``) return (for TIFF, whose
        decoder in Pillow applies the orientation itself, the upright one).

    Returns:
      (height, width).
    """
    path = Path(path)
    with open_image(path, error) as img:
        w, h = img.size
        if _swaps_sides(img, path, oriented):
            h, w = w, h
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


def load_image(path: str | os.PathLike, max_pixels: int = 4_000_000, oriented: bool = True) -> np.ndarray:
    """Reads an image file as float32 RGB in [0, 1], shape (H, W, 3).

    Args:
      path: image file.
      max_pixels: larger images are refused (before their pixels are decoded).
      oriented: apply the EXIF orientation, as viewers do (a phone photo stored sideways
        with Orientation=6 comes back upright, through ``ImageOps.exif_transpose``);
        False: the stored pixel layout (dataset images, whose ground truth is aligned
        with it; Pillow puts TIFF files upright whatever this says).

    Returns:
      The pixels; ``image_size(path, oriented=oriented)`` gives their (H, W).

    Raises:
      ImageError: unreadable, truncated or non-image files, images under 2x2 pixels
        or above ``max_pixels``.
    """
    path = Path(path)
    with open_image(path) as img:
        h, w = img.size[1], img.size[0]
        # The size checks come before decoding, on the size image_size gives.
        if _swaps_sides(img, path, oriented):
            h, w = w, h
        check_size(h, w, max_pixels, str(path))
        decode_now(img, path)
        upright = _exif_transpose(img) if oriented else None
        if upright is not None:
            with upright:
                return to_float_rgb(upright)
        return to_float_rgb(img)


def _exif_transpose(img: Image.Image) -> Image.Image | None:
    """``ImageOps.exif_transpose`` of a decoded image; None when it is upright already
    (no copy made), or its EXIF block is unreadable (as ``exif_orientation`` says then)."""
    try:
        if _valid_orientation(img.getexif().get(EXIF_ORIENTATION, 1)) == 1:
            return None
        return ImageOps.exif_transpose(img)
    except Exception:  # a malformed EXIF block must not make a readable image unreadable
        return None


_FLOAT_TOLERANCE = 1e-6


def as_float_image(image, name: str = "image") -> np.ndarray:
    """An array (H, W), (H, W, 1|3|4) of uint8/uint16/float as float32 RGB in [0, 1].

    Raises:
      ImageError: (naming ``name``) a wrong shape or dtype, NaN/inf values, or float
        values outside [0, 1] (beyond rounding), such as an image in 0..255.
    """
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
        if arr.size:
            lo, hi = float(arr.min()), float(arr.max())
            # Tolerance: images computed in float32 (x / 255, resampling, colour-space
            # round trips) overshoot [0, 1] by a few units in the last place (1 ulp at 1.0
            # is 1.2e-7), so 1e-6 (~8 ulps) accepts rounding; an image in 0..255 has
            # values of 1 or more on any pixel that is not black, far outside it. The
            # overshoot is then clipped, so the rest of the pipeline sees exactly [0, 1].
            if lo < -_FLOAT_TOLERANCE or hi > 1.0 + _FLOAT_TOLERANCE:
                hint = "divide by 255, or pass uint8" if hi > 1.0 else "rescale it to [0, 1]"
                raise ImageError(f"{name}: float image has values in [{lo:.6g}, {hi:.6g}]; expected [0, 1] ({hint})")
            arr = np.clip(arr, 0.0, 1.0)
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
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; outputs are meant to be shared
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno is not None and e.filename == tmp:
            # Named by the file asked for, not the temporary one beside it.
            raise OSError(e.errno, e.strerror, str(path)) from None
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


def save_labels(path: str | os.PathLike, labels: np.ndarray, color: bool = False) -> None:
    """Writes a label map as a PNG, atomically; ``read_labels`` reads back the same integers.

    Args:
      path: the PNG to write.
      labels: integer (H, W) labels, 0 or more.
      color: False: a 16-bit grayscale PNG (labels up to 65535; viewers show it almost
        black). True: an 8-bit palette PNG (mode 'P'), label i = palette index i in the
        colour ``label_colors`` gives it (as in the overlays): viewable as it is, for at
        most 256 labels (0-255).

    Raises:
      ValueError: (naming the file) negative labels, or labels that do not fit the format.
    """
    labels = np.asarray(labels)
    if labels.min(initial=0) < 0:
        raise ValueError(f"{path}: negative label {labels.min()}; labels must be 0 or more")
    top = int(labels.max(initial=0))
    if color:
        if top > 255:
            raise ValueError(f"{path}: {top + 1} labels (0-{top}) do not fit an 8-bit palette PNG (at most 256); "
                             f"save it without color")
        img = Image.fromarray(labels.astype(np.uint8))
        palette = np.zeros((256, 3), np.uint8)
        palette[: top + 1] = label_colors(top + 1)
        img.putpalette(palette.ravel().tolist())  # mode 'L' -> 'P'
    else:
        if top > 65535:
            raise ValueError(f"{path}: label {top} does not fit a 16-bit PNG (at most 65535)")
        img = Image.fromarray(labels.astype(np.uint16))
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


# Single-channel integer modes: 16-bit and 32-bit grayscale, 8-bit grayscale, palette.
LABEL_MODES = ("I;16", "I;16B", "I;16L", "I", "L", "P")


def read_labels(path: str | os.PathLike, modes: Sequence[str] = LABEL_MODES, what: str = "label map",
                error: type[Exception] = ImageError) -> np.ndarray:
    """Reads a label PNG (as ``save_labels`` writes it, or any single-channel integer
    image) as int32; a palette PNG gives its palette indices, not its colours. The one
    reader of label maps: predictions, VOC object maps, our own outputs.

    Args:
      path: the file.
      modes: the PIL modes accepted (default: every single-channel integer mode).
      what: what the file is, for the error message.
      error: the exception type raised (``ImageError``; the datasets use theirs).

    Raises:
      ``error``: missing, unreadable or truncated file, or a mode not in ``modes``
        (e.g. an RGB image), in one line naming the file.
    """
    path = Path(path)
    with open_image(path, error=error) as img:
        decode_now(img, path, error=error)
        if img.mode not in modes:
            raise error(f"{path}: {what} must be a single-channel label PNG (mode {'/'.join(modes)}), "
                        f"got mode {img.mode}")
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
    """Records of a results file: its lines that are JSON objects. Others are skipped:
    silently a torn last line (an interrupted write leaves no newline) and blank lines,
    with a one-line warning naming the file and line anything else."""
    records = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    record = None
                if isinstance(record, dict):
                    records.append(record)
                elif line.endswith("\n") and line.strip():
                    warnings.warn(f"{path}:{number}: not a JSON object (a damaged record); skipped",
                                  stacklevel=2)
    except FileNotFoundError:
        pass
    return records


def scaled_size(h: int, w: int, scale: float) -> tuple[int, int]:
    """(height, width) of an h x w image resized by ``scale``: each side rounded, at least 1."""
    return max(1, round(h * scale)), max(1, round(w * scale))


def resize_image(image: np.ndarray, scale: float) -> np.ndarray:
    """Bilinear resize of an RGB image by ``scale`` to ``scaled_size``.

    uint8 images come back as uint8; float images in [0, 1] go through 8 bits (as they
    were read) and come back as float32, so both give the same pixels.
    """
    if scale == 1.0:
        return image
    h, w = scaled_size(*image.shape[:2], scale)
    size = (w, h)
    if image.dtype == np.uint8:
        return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR), np.uint8)
    pil = Image.fromarray(np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8))
    return np.asarray(pil.resize(size, Image.BILINEAR), np.float32) / 255.0
