"""Readers for the evaluation datasets in their official on-disk layouts.

Every reader yields :class:`Record` tuples ``(id, image, ground_truth)`` with ``image`` a
uint8 (H, W, 3) RGB array and ``ground_truth`` in the form its protocol scores
(docs/algorithm.md section 4):

* ``bsds500``: ``<root>/images/<split>/<id>.jpg`` and ``<root>/groundTruth/<split>/<id>.mat``
  (Arbelaez et al., TPAMI 2011). The .mat holds a 1 x N MATLAB cell array ``groundTruth`` of
  structs whose ``Segmentation`` field is a uint16 label map numbered from 1. Ground truth:
  a list of N int32 (H, W) arrays. ``root`` may also be the folder holding the official
  ``BSR/BSDS500/data`` tree.
* ``voc2012``: ``JPEGImages/<id>.jpg``, ``SegmentationObject/<id>.png`` (palette PNG: 0
  background, 1..n objects, 255 void) and ``ImageSets/Segmentation/<split>.txt`` under
  ``VOC2012``; ``root`` may be that folder, ``VOCdevkit`` or the folder above it.
  Ground truth: the int32 object map, 255 kept (the protocol ignores it).
* ``cocostuff27``: COCO 2017 images ``<root>/val2017/<id>.jpg`` (or ``images/val2017``)
  with the COCO-Stuff ``stuffthingmaps_trainval2017/val2017/<id>.png`` label maps (fine
  labels 0-181, 255 unlabelled; ``stuffthingmaps/`` and PiCIE's ``annotations/`` also
  work), restricted to a curated id list (PiCIE's ``Coco164kFull_Stuff_Coarse_7.txt``,
  2175 val images, which users supply). Fine labels map to the 27 coarse classes with the
  table in ``data/cocostuff_fine_to_coarse.json``; image and labels are resized so the
  shorter side is 320 (image bilinear, labels nearest) and centre-cropped to 320 x 320, as
  PiCIE's ``data/coco_eval_dataset.py``. Ground truth: int32 (320, 320), 255 ignored.
* ``folder``: every image file directly inside ``root``; ground truth ``None``.

A missing or malformed file raises :class:`DatasetError` naming the file.

The BSDS500 reader is also available as a TensorFlow Datasets builder
(:func:`bsds500_tfds_builder`) that converts the manual-download directory to ArrayRecord
files and reads them back with ``as_data_source()``; it works without TensorFlow because
it uses only ``Tensor`` features (zlib-compressed), never the ``Image`` feature.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
from PIL import Image

from . import images as imio

__all__ = [
    "DatasetError",
    "Record",
    "DATASETS",
    "DEFAULT_SPLITS",
    "COCO_CROP",
    "open_dataset",
    "list_ids",
    "load_record",
    "iter_records",
    "read_bsds500",
    "read_voc2012",
    "read_cocostuff27",
    "read_folder",
    "read_rgb",
    "load_bsds_annotations",
    "load_voc_objects",
    "load_cocostuff_labels",
    "fine_to_coarse_table",
    "coco_resize_crop",
    "bsds500_tfds_builder",
    "read_bsds500_tfds",
]

DATASETS = ("bsds500", "voc2012", "cocostuff27", "folder")
# The splits the protocols of docs/algorithm.md section 4 are reported on.
DEFAULT_SPLITS = {"bsds500": "test", "voc2012": "trainval", "cocostuff27": "val", "folder": None}
COCO_CROP = 320
# The file name PiCIE and DynaSeg give the curated COCO-Stuff-27 list.
COCO_CURATED_NAME = "Coco164kFull_Stuff_Coarse_7.txt"
FOLDER_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif")
_DATA_DIR = Path(__file__).resolve().parent / "data"


class DatasetError(ValueError):
    """A dataset file or folder that is missing or malformed; the message names it."""


class Record(NamedTuple):
    """One evaluation example.

    Attributes:
      id: the image id (file stem).
      image: uint8 (H, W, 3) RGB.
      ground_truth: dataset-specific (see the module docstring); ``None`` for folders.
    """

    id: str
    image: np.ndarray
    ground_truth: Any


# ---------------------------------------------------------------- file readers


def _open_image(path: Path) -> Image.Image:
    """An opened and decoded image; DatasetError naming the file otherwise."""
    img = imio.open_image(path, error=DatasetError)
    try:
        imio.decode_now(img, path, error=DatasetError)
    except DatasetError:
        img.close()
        raise
    return img


def header_size(path: str | os.PathLike) -> tuple[int, int]:
    """(H, W) of an image file from its header, without decoding the pixels.

    The stored pixel layout: the EXIF orientation is not applied (dataset ground truth
    is aligned with the stored pixels, and the readers here do not rotate them either).
    """
    return imio.image_size(path, error=DatasetError, oriented=False)


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """Reads an image file as uint8 (H, W, 3) RGB.

    Args:
      path: image file.

    Returns:
      The pixels; grayscale and palette images are expanded, alpha dropped.

    Raises:
      DatasetError: missing, unreadable or truncated file.
    """
    path = Path(path)
    with _open_image(path) as img:
        return np.asarray(img.convert("RGB"), np.uint8).copy()


def load_bsds_annotations(path: str | os.PathLike) -> list[np.ndarray]:
    """Reads a BSDS500 ``groundTruth/<split>/<id>.mat`` file.

    Args:
      path: the .mat file.

    Returns:
      One int32 (H, W) label map per human annotation (labels from 1, as stored).

    Raises:
      DatasetError: missing file, not a MATLAB file, or not the BSDS cell-array structure.
    """
    from scipy.io import loadmat

    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: missing ground-truth file")
    try:
        mat = loadmat(str(path))
    except Exception as e:  # scipy raises several types (ValueError, MatReadError, ...)
        raise DatasetError(f"{path}: not a readable MATLAB .mat file ({e})") from None
    if "groundTruth" not in mat:
        raise DatasetError(f"{path}: no 'groundTruth' variable (found {sorted(k for k in mat if not k.startswith('__'))})")
    cell = mat["groundTruth"]
    if cell.dtype != object or cell.size == 0:
        raise DatasetError(f"{path}: 'groundTruth' is not a non-empty cell array")
    annotations = []
    for i, entry in enumerate(cell.ravel()):
        try:
            seg = entry["Segmentation"]
            # A struct inside a cell loads as a (1, 1) record array whose field is an object
            # array holding the matrix; unwrap both levels.
            while isinstance(seg, np.ndarray) and seg.dtype == object:
                seg = seg.ravel()[0]
            seg = np.asarray(seg)
        except (ValueError, IndexError, KeyError, TypeError):
            raise DatasetError(f"{path}: annotation {i} has no 'Segmentation' field") from None
        if seg.ndim != 2 or not np.issubdtype(seg.dtype, np.integer):
            raise DatasetError(f"{path}: annotation {i} 'Segmentation' is not a 2-D integer matrix "
                               f"(shape {seg.shape}, dtype {seg.dtype})")
        annotations.append(seg.astype(np.int32))
    shapes = {a.shape for a in annotations}
    if len(shapes) != 1:
        raise DatasetError(f"{path}: annotations have different shapes {sorted(shapes)}")
    return annotations


def load_voc_objects(path: str | os.PathLike) -> np.ndarray:
    """Reads a VOC2012 ``SegmentationObject/<id>.png`` (palette indices; 255 = void).

    Returns:
      int32 (H, W) object ids: 0 background, 1..n objects, 255 void.
    """
    return imio.read_labels(path, ("P", "L"), "a VOC object map", error=DatasetError)


@functools.lru_cache(maxsize=1)
def fine_to_coarse_table() -> np.ndarray:
    """Lookup table from COCO-Stuff fine labels to the 27 coarse classes.

    Returns:
      int32 array of 256 entries: ``table[fine]`` for fine 0-181, 255 for 255 (ignored),
      -1 for the values 182-254 that COCO-Stuff never uses.
    """
    path = _DATA_DIR / "cocostuff_fine_to_coarse.json"
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    fine = np.asarray(spec["fine_to_coarse"], np.int32)
    table = np.full(256, -1, np.int32)
    table[: fine.size] = fine
    table[int(spec["ignore"])] = int(spec["ignore"])
    table.setflags(write=False)
    return table


def _resize_shorter_crop(img: Image.Image, size: int, resample) -> Image.Image:
    # torchvision's resize(img, size) on PIL images: shorter side -> size, longer side
    # int(size * long / short); then CenterCrop with PiCIE's rounding of the offsets.
    w, h = img.size
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), resample)
    left = int(round((nw - size) / 2.0))
    top = int(round((nh - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def coco_resize_crop(labels: np.ndarray, size: int = COCO_CROP) -> np.ndarray:
    """Applies the COCO-Stuff-27 ground-truth transform to a label map (nearest).

    Used to bring a prediction made on the full-size image onto the evaluated crop.

    Args:
      labels: (H, W) integer labels of the full image.
      size: the crop side (320).

    Returns:
      int32 (size, size) labels.
    """
    img = Image.fromarray(np.asarray(labels).astype(np.int32), mode="I")
    return np.asarray(_resize_shorter_crop(img, size, Image.NEAREST)).astype(np.int32)


def load_cocostuff_labels(path: str | os.PathLike, crop: int | None = COCO_CROP) -> np.ndarray:
    """Reads a COCO-Stuff stuffthingmaps PNG as coarse COCO-Stuff-27 labels.

    Args:
      path: ``stuffthingmaps_trainval2017/<split>2017/<id>.png``.
      crop: resize shorter side to ``crop`` and centre-crop (nearest); ``None`` keeps the size.

    Returns:
      int32 labels 0-26, 255 unlabelled.

    Raises:
      DatasetError: missing file, wrong mode, or values outside 0-181 and 255.
    """
    path = Path(path)
    with _open_image(path) as img:
        if img.mode not in ("L", "P"):
            raise DatasetError(f"{path}: a stuffthingmaps label PNG must be 8-bit single-channel, got mode {img.mode}")
        if crop is not None:
            img = _resize_shorter_crop(img, crop, Image.NEAREST)
        fine = np.asarray(img)
    coarse = fine_to_coarse_table()[fine]
    if (coarse < 0).any():
        bad = np.unique(fine[coarse < 0])
        raise DatasetError(f"{path}: fine labels {bad.tolist()[:10]} are outside COCO-Stuff's 0-181 (and 255)")
    return coarse


# ---------------------------------------------------------------- dataset layouts


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{path}: missing {what} folder")
    return path


def _read_id_list(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"{path}: missing id list") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read id list ({e})") from None
    ids = []
    for n, line in enumerate(text.splitlines(), 1):
        token = line.strip()
        if not token:
            continue
        if len(token.split()) != 1:
            raise DatasetError(f"{path}:{n}: expected one id per line, got {line!r}")
        ids.append(Path(token).stem if token.lower().endswith((".jpg", ".png")) else token)
    if not ids:
        raise DatasetError(f"{path}: id list is empty")
    return ids


def _check_same_size(image: np.ndarray, gt: np.ndarray, gt_path: Path, image_path: Path) -> None:
    if gt.shape != image.shape[:2]:
        raise DatasetError(f"{gt_path}: ground truth is {gt.shape[0]}x{gt.shape[1]} but the image "
                           f"{image_path} is {image.shape[0]}x{image.shape[1]}")


class _Bsds500:
    name = "bsds500"

    def __init__(self, root: Path, split: str):
        if split not in ("train", "val", "test"):
            raise DatasetError(f"bsds500: unknown split {split!r}; use train, val or test")
        base = root
        for cand in (root, root / "BSR" / "BSDS500" / "data", root / "BSDS500" / "data", root / "data"):
            if (cand / "images").is_dir() and (cand / "groundTruth").is_dir():
                base = cand
                break
        self.image_dir = base / "images" / split
        self.gt_dir = base / "groundTruth" / split

    def ids(self) -> list[str]:
        _require_dir(self.image_dir, "BSDS500 image")
        return sorted(p.stem for p in self.image_dir.iterdir() if p.suffix.lower() == ".jpg")

    def image_path(self, id_: str) -> Path:
        return self.image_dir / f"{id_}.jpg"

    def gt_path(self, id_: str) -> Path:
        return self.gt_dir / f"{id_}.mat"

    def load_gt(self, id_: str) -> list[np.ndarray]:
        return load_bsds_annotations(self.gt_path(id_))

    def load_image(self, id_: str) -> np.ndarray:
        return read_rgb(self.image_path(id_))

    def load(self, id_: str) -> Record:
        image = self.load_image(id_)
        gt = self.load_gt(id_)
        _check_same_size(image, gt[0], self.gt_path(id_), self.image_path(id_))
        return Record(id_, image, gt)


class _Voc2012:
    name = "voc2012"

    def __init__(self, root: Path, split: str):
        for cand in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
            if (cand / "JPEGImages").is_dir() and (cand / "ImageSets").is_dir():
                self.base = cand
                break
        else:
            raise DatasetError(f"{root}: not a PASCAL VOC 2012 folder (no JPEGImages/ and ImageSets/ in it, "
                               f"in VOC2012/ or in VOCdevkit/VOC2012/)")
        self.list_path = self.base / "ImageSets" / "Segmentation" / f"{split}.txt"

    def ids(self) -> list[str]:
        return _read_id_list(self.list_path)

    def image_path(self, id_: str) -> Path:
        return self.base / "JPEGImages" / f"{id_}.jpg"

    def gt_path(self, id_: str) -> Path:
        return self.base / "SegmentationObject" / f"{id_}.png"

    def load_gt(self, id_: str) -> np.ndarray:
        return load_voc_objects(self.gt_path(id_))

    def load_image(self, id_: str) -> np.ndarray:
        return read_rgb(self.image_path(id_))

    def load(self, id_: str) -> Record:
        image = self.load_image(id_)
        gt = self.load_gt(id_)
        _check_same_size(image, gt, self.gt_path(id_), self.image_path(id_))
        return Record(id_, image, gt)


class _CocoStuff27:
    name = "cocostuff27"

    def __init__(self, root: Path, split: str, id_list: str | os.PathLike | None, crop: int = COCO_CROP):
        if split not in ("train", "val"):
            raise DatasetError(f"cocostuff27: unknown split {split!r}; use val (or train)")
        sub = f"{split}2017"
        self.crop = crop
        self.image_dir = next((d for d in (root / sub, root / "images" / sub) if d.is_dir()), root / sub)
        label_dirs = (root / "stuffthingmaps_trainval2017" / sub, root / "stuffthingmaps" / sub,
                      root / "annotations" / sub)
        self.label_dir = next((d for d in label_dirs if d.is_dir()), label_dirs[0])
        if id_list is None:
            default = root / "curated" / sub / COCO_CURATED_NAME
            if not default.is_file():
                raise DatasetError(f"cocostuff27: no id list given and {default} does not exist; pass the curated "
                                   f"list ({COCO_CURATED_NAME}, 2175 val images in PiCIE's protocol)")
            id_list = default
        self.list_path = Path(id_list)

    def ids(self) -> list[str]:
        return _read_id_list(self.list_path)

    def image_path(self, id_: str) -> Path:
        return self.image_dir / f"{id_}.jpg"

    def gt_path(self, id_: str) -> Path:
        return self.label_dir / f"{id_}.png"

    def load_gt(self, id_: str) -> np.ndarray:
        return load_cocostuff_labels(self.gt_path(id_), crop=self.crop)

    def gt_full_size(self, id_: str) -> tuple[int, int]:
        """(H, W) of the uncropped label map, read from the PNG header."""
        return header_size(self.gt_path(id_))

    def _read_image(self, id_: str) -> tuple[np.ndarray, tuple[int, int]]:
        """(the image as segmented: resized and centre-cropped as the labels are, its
        stored (H, W))."""
        with _open_image(self.image_path(id_)) as img:
            full = (img.size[1], img.size[0])
            rgb = img.convert("RGB")
            if self.crop is not None:
                rgb = _resize_shorter_crop(rgb, self.crop, Image.BILINEAR)
            return np.asarray(rgb, np.uint8).copy(), full

    def load_image(self, id_: str) -> np.ndarray:
        return self._read_image(id_)[0]

    def load(self, id_: str) -> Record:
        image, full = self._read_image(id_)
        gt_full = self.gt_full_size(id_)
        if gt_full != full:
            raise DatasetError(f"{self.gt_path(id_)}: label map is {gt_full[0]}x{gt_full[1]} but the image "
                               f"{self.image_path(id_)} is {full[0]}x{full[1]}")
        return Record(id_, image, self.load_gt(id_))


class _Folder:
    name = "folder"

    def __init__(self, root: Path):
        self.root = root

    def _files(self) -> dict[str, Path]:
        _require_dir(self.root, "image")
        files: dict[str, Path] = {}
        for p in sorted(self.root.iterdir()):
            if p.is_file() and p.suffix.lower() in FOLDER_SUFFIXES:
                if p.stem in files:
                    raise DatasetError(f"{p}: two images share the id {p.stem!r} ({files[p.stem].name}); rename one")
                files[p.stem] = p
        return files

    def ids(self) -> list[str]:
        return sorted(self._files())

    def image_path(self, id_: str) -> Path:
        path = self._files().get(id_)
        if path is None:
            raise DatasetError(f"{self.root}: no image with id {id_!r}")
        return path

    def load_gt(self, id_: str) -> None:
        return None

    def load_image(self, id_: str) -> np.ndarray:
        return read_rgb(self.image_path(id_))

    def load(self, id_: str) -> Record:
        return Record(id_, self.load_image(id_), None)


def open_dataset(dataset: str, root: str | os.PathLike, split: str | None = None,
                 id_list: str | os.PathLike | None = None):
    """A dataset layout object with ``ids()``, ``load_image(id)`` (the image alone), ``load(id)`` (image
    and ground truth), ``load_gt(id)`` and ``image_path(id)``.

    Args:
      dataset: one of :data:`DATASETS`.
      root: the dataset folder (see the module docstring for each layout).
      split: split name; ``None`` picks :data:`DEFAULT_SPLITS` (ignored for folders).
      id_list: COCO-Stuff only: the curated id list file.

    Raises:
      DatasetError: unknown dataset or split, or a folder that is not the expected layout.
    """
    if dataset not in DATASETS:
        raise DatasetError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder does not exist")
    split = split or DEFAULT_SPLITS[dataset]
    if dataset == "bsds500":
        return _Bsds500(root, split)
    if dataset == "voc2012":
        return _Voc2012(root, split)
    if dataset == "cocostuff27":
        return _CocoStuff27(root, split, id_list)
    return _Folder(root)


def list_ids(dataset: str, root: str | os.PathLike, split: str | None = None,
             id_list: str | os.PathLike | None = None) -> list[str]:
    """The image ids of a dataset split, in the order they are read.

    Args:
      dataset, root, split, id_list: as for :func:`open_dataset`.

    Returns:
      ids (file stems): sorted for BSDS500 and folders, list order for VOC and COCO-Stuff.
    """
    return open_dataset(dataset, root, split, id_list).ids()


def load_record(dataset: str, root: str | os.PathLike, split: str | None, id_: str,
                id_list: str | os.PathLike | None = None) -> Record:
    """Reads one example by id (see :func:`open_dataset` for the arguments)."""
    return open_dataset(dataset, root, split, id_list).load(id_)


def iter_records(dataset: str, root: str | os.PathLike, split: str | None = None,
                 ids: Iterable[str] | None = None, limit: int | None = None,
                 id_list: str | os.PathLike | None = None) -> Iterator[Record]:
    """Yields the records of a dataset split.

    Args:
      dataset, root, split, id_list: as for :func:`open_dataset`.
      ids: read only these ids (default: all of the split).
      limit: stop after this many records.

    Yields:
      :class:`Record` ``(id, image, ground_truth)``.
    """
    ds = open_dataset(dataset, root, split, id_list)
    ids = list(ds.ids() if ids is None else ids)
    if limit is not None:
        ids = ids[: max(int(limit), 0)]
    for id_ in ids:
        yield ds.load(id_)


def read_bsds500(root, split: str = "test", **kwargs) -> Iterator[Record]:
    """BSDS500 records; ground truth is a list of int32 annotations (labels from 1)."""
    return iter_records("bsds500", root, split, **kwargs)


def read_voc2012(root, split: str = "trainval", **kwargs) -> Iterator[Record]:
    """VOC2012 segmentation records; ground truth is the SegmentationObject map (255 void)."""
    return iter_records("voc2012", root, split, **kwargs)


def read_cocostuff27(root, split: str = "val", id_list=None, **kwargs) -> Iterator[Record]:
    """COCO-Stuff-27 records (320 x 320 crops); ground truth is coarse 0-26, 255 ignored."""
    return iter_records("cocostuff27", root, split, id_list=id_list, **kwargs)


def read_folder(root, **kwargs) -> Iterator[Record]:
    """Records of every image directly inside ``root``; ground truth ``None``."""
    return iter_records("folder", root, None, **kwargs)


# ---------------------------------------------------------------- TFDS (ArrayRecord, no TensorFlow)


def _import_tfds():
    """tensorflow_datasets, imported on first use (it takes ~1 s and is an optional extra)."""
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DatasetError("the TFDS dataset reader needs tensorflow-datasets: "
                           "pip install 'dynaseg_jax[tfds]'") from None
    return tfds


@functools.lru_cache(maxsize=1)
def _bsds500_builder_class():
    tfds = _import_tfds()

    class Bsds500(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """BSDS500 from the official layout, stored as zlib-compressed tensors.

        Features are plain ``Tensor``s: TFDS's ``Image`` feature encodes/decodes through
        TensorFlow, which this project does not depend on. ``ground_truth`` stacks the
        image's annotations as uint16 (A, H, W), the dtype the .mat files store.
        """

        VERSION = tfds.core.Version("1.0.0")
        # Nothing is downloaded, so there is no checksums file. Saying so here also keeps
        # TFDS 4.9.x from computing ``code_path``, which for a class defined inside a package
        # imports the ``importlib_resources`` backport, a module TFDS declares as a
        # dependency only for Python < 3.9 (ModuleNotFoundError on 3.11 without it).
        _checksums_path = None
        RELEASE_NOTES = {"1.0.0": "Official BSDS500 layout read from the manual directory."}
        MANUAL_DOWNLOAD_INSTRUCTIONS = (
            "Extract BSR_bsds500.tgz and point manual_dir at BSR/BSDS500/data (or any folder "
            "with images/{train,val,test}/*.jpg and groundTruth/{train,val,test}/*.mat).")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description="Berkeley Segmentation Data Set 500 (Arbelaez et al., TPAMI 2011).",
                features=tfds.features.FeaturesDict({
                    "id": tfds.features.Text(),
                    "image": tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8, encoding="zlib"),
                    "ground_truth": tfds.features.Tensor(shape=(None, None, None), dtype=np.uint16,
                                                         encoding="zlib"),
                }),
                homepage="https://www2.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/resources.html",
                citation="Arbelaez, Maire, Fowlkes, Malik. Contour Detection and Hierarchical Image "
                         "Segmentation. IEEE TPAMI 33(5), 2011.",
            )

        def _split_generators(self, dl_manager):
            root = Path(dl_manager.manual_dir)
            splits = {s: self._generate_examples(root, s) for s in ("train", "val", "test")
                      if (root / "images" / s).is_dir()}
            if not splits:
                raise DatasetError(f"{root}: no images/{{train,val,test}} folder for BSDS500")
            return splits

        def _generate_examples(self, root, split):
            for rec in iter_records("bsds500", root, split):
                gt = np.stack(rec.ground_truth)
                if gt.min() < 0 or gt.max() > np.iinfo(np.uint16).max:
                    raise DatasetError(f"{root}/groundTruth/{split}/{rec.id}.mat: labels outside uint16")
                yield rec.id, {"id": rec.id, "image": rec.image, "ground_truth": gt.astype(np.uint16)}

    return Bsds500


def bsds500_tfds_builder(manual_dir: str | os.PathLike, data_dir: str | os.PathLike, prepare: bool = True):
    """A TFDS builder for BSDS500 writing ArrayRecord files, prepared from the official layout.

    Args:
      manual_dir: folder with ``images/<split>/*.jpg`` and ``groundTruth/<split>/*.mat``.
      data_dir: where TFDS writes ``bsds500/1.0.0/*.array_record`` (reused when present).
      prepare: run ``download_and_prepare`` (nothing is downloaded; it reads ``manual_dir``).

    Returns:
      The builder; ``builder.as_data_source()[split][i]`` is a dict with ``id`` (bytes),
      ``image`` uint8 (H, W, 3) and ``ground_truth`` uint16 (A, H, W).

    Raises:
      DatasetError: tensorflow-datasets is not installed (the ``tfds`` extra).
    """
    tfds = _import_tfds()

    builder = _bsds500_builder_class()(data_dir=os.fspath(data_dir), file_format="array_record")
    if prepare:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)))
    return builder


def read_bsds500_tfds(manual_dir: str | os.PathLike, data_dir: str | os.PathLike,
                      split: str = "test") -> Iterator[Record]:
    """BSDS500 records read back from the TFDS ArrayRecord files (random-access source).

    Args:
      manual_dir, data_dir: as for :func:`bsds500_tfds_builder`.
      split: train, val or test (must exist in ``manual_dir``).

    Yields:
      :class:`Record` with the same contents as :func:`read_bsds500`, in the stored order
      (TFDS's deterministic shuffle of the ids, not sorted).
    """
    source = bsds500_tfds_builder(manual_dir, data_dir).as_data_source()
    if split not in source:
        raise DatasetError(f"{manual_dir}: BSDS500 split {split!r} was not prepared (have {sorted(source)})")
    data = source[split]
    for i in range(len(data)):
        ex = data[i]
        id_ = ex["id"].decode("utf-8") if isinstance(ex["id"], bytes) else str(ex["id"])
        gt = [np.asarray(a, np.int32) for a in ex["ground_truth"]]
        yield Record(id_, np.asarray(ex["image"], np.uint8), gt)
