"""A synthetic sample image, so a fresh install can segment something at once."""
from __future__ import annotations

import numpy as np


def sample_image(height: int = 96, width: int = 128, seed: int = 0) -> np.ndarray:
    """uint8 RGB (H, W, 3): sky, a sun, hills and a house, with mild noise.

    Five regions of distinct colour with smooth shading, a scene a segmenter should
    split into a handful of clusters.
    """
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    y, x = yy / height, xx / width
    img = np.empty((height, width, 3), np.float32)
    img[:] = np.stack([0.45 + 0.2 * y, 0.65 + 0.15 * y, 0.95 - 0.1 * y], -1)        # sky
    hill = y > 0.62 + 0.08 * np.sin(6.0 * x)
    img[hill] = np.stack([0.25 + 0.1 * x, 0.55 + 0.1 * y, 0.2 + 0 * x], -1)[hill]   # hills
    sun = (x - 0.8) ** 2 + ((y - 0.22) * height / width) ** 2 < 0.09 ** 2
    img[sun] = (1.0, 0.85, 0.2)
    wall = (x > 0.2) & (x < 0.45) & (y > 0.5) & (y < 0.85)
    img[wall] = (0.8, 0.3, 0.25)
    roof = (y <= 0.5) & (y > 0.35) & (np.abs(x - 0.325) < (y - 0.35) * 1.1)
    img[roof] = (0.35, 0.2, 0.15)
    noise = np.random.default_rng(seed).normal(0.0, 0.02, img.shape)
    return (np.clip(img + noise, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


SAMPLE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")


def write_sample(path) -> None:
    """Writes ``sample_image()`` to ``path``, atomically, in the format its suffix names.

    Raises:
      ValueError: ``path`` is a folder, has no image suffix, or its folder does not exist.
    """
    from pathlib import Path

    from PIL import Image

    from .images import atomic_write

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a folder; give a file name such as {path / 'sample.png'}")
    if path.suffix.lower() not in SAMPLE_SUFFIXES:
        raise ValueError(f"{path}: unknown image type {path.suffix or '(no suffix)'!r}; "
                         f"use one of {', '.join(SAMPLE_SUFFIXES)}")
    if not path.parent.is_dir():
        raise ValueError(f"{path}: folder {path.parent} does not exist")
    fmt = Image.registered_extensions()[path.suffix.lower()]
    img = Image.fromarray(sample_image())
    atomic_write(path, lambda tmp: img.save(tmp, format=fmt))
