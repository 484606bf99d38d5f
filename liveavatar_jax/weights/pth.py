"""Reading PyTorch `.pth`/`.bin` state dicts without torch and without running the code a pickle can name.

`torch.save` writes a pickle whose tensors are calls to `torch._utils._rebuild_tensor_v2(storage, offset, size,
stride, ...)` and whose storages are "persistent ids" pointing at raw little-endian buffers: files `<archive>/data/<key>`
inside a zip (the format since torch 1.6), or, in the legacy format, buffers appended after the pickles. A pickle can
name any importable callable, so unpickling an untrusted file is code execution. Here every global the pickle names
is looked up in an allow-list of the few that plain state dicts need, and each one resolves to a function of this
module that builds a description of the tensor instead of calling into torch; anything else raises `CheckpointError`
naming the file and the refused callable, before it could be called.

Tensors are read lazily through a memory map of the file, so an 11 GB text encoder is converted one tensor at a time.
bfloat16 and float8 come from ml_dtypes.
"""

from __future__ import annotations

import io
import math
import mmap
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from liveavatar_jax.weights.checkpoint import Checkpoint, CheckpointError, open_checkpoint

PTH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")

# Storage classes `torch.save` names (`torch.<Name>Storage`), by element type.
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "ComplexFloatStorage": np.complex64, "ComplexDoubleStorage": np.complex128,
    "Float8_e4m3fnStorage": ml_dtypes.float8_e4m3fn, "Float8_e5m2Storage": ml_dtypes.float8_e5m2,
    "UntypedStorage": np.uint8,
}
# `torch.<dtype>` globals, passed to `_rebuild_tensor_v3` together with an untyped (byte) storage.
_TORCH_DTYPES = {
    "float32": np.float32, "float": np.float32, "float64": np.float64, "double": np.float64,
    "float16": np.float16, "half": np.float16, "bfloat16": ml_dtypes.bfloat16, "int64": np.int64,
    "long": np.int64, "int32": np.int32, "int": np.int32, "int16": np.int16, "int8": np.int8, "uint8": np.uint8,
    "bool": np.bool_, "complex64": np.complex64, "complex128": np.complex128,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2,
    "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class _StorageType:
    """What `torch.FloatStorage` & co. resolve to: only their element type matters."""
    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype):
        self.name, self.dtype = name, np.dtype(dtype)

    def __setstate__(self, state):
        raise pickle.UnpicklingError("storage types carry no state")


class _TorchDtype:
    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype):
        self.name, self.dtype = name, np.dtype(dtype)

    def __setstate__(self, state):
        raise pickle.UnpicklingError("dtypes carry no state")


class _Storage:
    """A flat buffer of `numel` elements; `array()` maps it from the file on demand."""
    __slots__ = ("key", "dtype", "numel", "_reader")

    def __init__(self, key: str, dtype: np.dtype, numel: int, reader):
        self.key, self.dtype, self.numel, self._reader = key, np.dtype(dtype), int(numel), reader

    def array(self) -> np.ndarray:
        return self._reader(self)

    def __setstate__(self, state):
        raise pickle.UnpicklingError("storages carry no state")


class PthTensor:
    """A tensor of a .pth file described by its storage, element offset, shape and strides; `numpy()` reads it."""
    __slots__ = ("storage", "offset", "shape", "stride", "dtype")

    def __init__(self, storage: _Storage, offset: int, shape, stride, dtype=None):
        self.storage = storage
        self.offset = int(offset)
        self.shape = tuple(int(s) for s in shape)
        self.stride = tuple(int(s) for s in stride)
        self.dtype = np.dtype(dtype if dtype is not None else storage.dtype)

    def __setstate__(self, state):
        raise pickle.UnpicklingError("tensors carry no pickled state")

    def _element_count(self) -> int:
        """Number of storage elements (of self.dtype) from offset to the last one the view touches."""
        if any(s == 0 for s in self.shape):
            return 0
        return 1 + sum((n - 1) * st for n, st in zip(self.shape, self.stride))

    def numpy(self) -> np.ndarray:
        """The tensor as a C-contiguous array; a read-only view of the file when the tensor is contiguous."""
        flat = self.storage.array()
        if self.dtype != self.storage.dtype:  # `_rebuild_tensor_v3`: a byte storage viewed as the tensor's dtype
            flat = flat.view(self.dtype)
        count = self._element_count()
        if self.offset < 0 or any(st < 0 for st in self.stride) or self.offset + count > flat.size:
            raise ValueError(f"tensor view (offset {self.offset}, shape {self.shape}, stride {self.stride}) "
                             f"exceeds its storage of {flat.size} elements")
        if count == 0:
            return np.zeros(self.shape, self.dtype)
        contiguous = tuple(math.prod(self.shape[i + 1:]) for i in range(len(self.shape)))
        if self.stride == contiguous:
            return flat[self.offset:self.offset + math.prod(self.shape)].reshape(self.shape)
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset:], shape=self.shape, strides=[s * self.dtype.itemsize for s in self.stride],
            writeable=False)
        return np.ascontiguousarray(view)


# The allow-list. Each entry stands in for the torch function of the same name and takes the same arguments.
def _rebuild_tensor(storage, storage_offset, size, stride):
    return PthTensor(_check_storage(storage), storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    return PthTensor(_check_storage(storage), storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    if not isinstance(dtype, _TorchDtype):
        raise pickle.UnpicklingError(f"_rebuild_tensor_v3 got {type(dtype).__name__} instead of a torch dtype")
    return PthTensor(_check_storage(storage), storage_offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, requires_grad, backward_hooks, *state):
    if not isinstance(data, PthTensor):
        raise pickle.UnpicklingError("_rebuild_parameter expects a tensor")
    return data


def _check_storage(storage):
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError(f"tensor rebuild got {type(storage).__name__} instead of a storage")
    return storage


_ALLOWED_CALLABLES = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path, load_storage):
        super().__init__(file)
        self._path = path
        self._load_storage = load_storage

    def find_class(self, module, name):
        if (module, name) in _ALLOWED_CALLABLES:
            return _ALLOWED_CALLABLES[(module, name)]
        if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        if module == "torch" and name in _TORCH_DTYPES:
            return _TorchDtype(name, _TORCH_DTYPES[name])
        raise CheckpointError(
            f"{self._path}: refused to load: its pickle names the callable {module}.{name}, which is not one of the "
            f"tensor-rebuild functions or storage types a plain state dict uses (unpickling it could run arbitrary "
            f"code, so nothing from this file was executed)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise CheckpointError(f"{self._path}: unexpected persistent id in the pickle: {pid!r:.200}")
        return self._load_storage(pid)


def _unpickle(path: Path, data, load_storage):
    try:
        return _RestrictedUnpickler(data, path, load_storage).load()
    except CheckpointError:
        raise
    except Exception as e:  # malformed pickles raise many types
        raise CheckpointError(f"{path}: not a readable torch pickle ({type(e).__name__}: {e})") from None


def _flatten(obj, path: Path, prefix: str = "") -> dict[str, PthTensor]:
    """The tensors of a (possibly nested) dict, with nested keys joined by dots; other leaves are skipped."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    out: dict[str, PthTensor] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, PthTensor):
            out[name] = value
        elif isinstance(value, dict):
            out.update(_flatten(value, path, name + "."))
    return out


class PthCheckpoint:
    """A read-only `Checkpoint`-like view of a torch.save'd state dict (keys, shape, dtype, get, items, name)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: file not found")
        self._file = open(self.path, "rb")
        try:
            size = os.fstat(self._file.fileno()).st_size
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
            if zipfile.is_zipfile(self.path):
                self._tensors = self._open_zip()
            else:
                self._tensors = self._open_legacy()
        except BaseException:
            self.close()
            raise
        if not self._tensors:
            raise CheckpointError(f"{self.path}: holds no tensors")

    # -- formats -----------------------------------------------------------------------------------------------
    def _open_zip(self) -> dict[str, PthTensor]:
        try:
            archive = zipfile.ZipFile(self._file)
            infos = {info.filename: info for info in archive.infolist()}
        except (zipfile.BadZipFile, OSError) as e:
            raise CheckpointError(f"{self.path}: damaged zip archive ({e})") from None
        pickles = [n for n in infos if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise CheckpointError(f"{self.path}: a torch zip checkpoint holds one data.pkl, this one has "
                                  f"{len(pickles)}")
        root = pickles[0][: -len("data.pkl")]
        byteorder = infos.get(root + "byteorder")
        if byteorder is not None and archive.read(byteorder).strip() not in (b"little", b""):
            raise CheckpointError(f"{self.path}: big-endian tensors are not supported")

        def load_storage(pid):
            _, storage_type, key, _location, numel = pid[:5]
            info = infos.get(f"{root}data/{key}")
            if info is None:
                raise CheckpointError(f"{self.path}: the pickle refers to storage {key!r}, which the archive lacks")
            return _Storage(str(key), storage_type.dtype, numel, lambda s, info=info: self._zip_member(info, s))

        pickled = archive.read(infos[pickles[0]])
        return _flatten(_unpickle(self.path, io.BytesIO(pickled), load_storage), self.path)

    def _zip_member(self, info: zipfile.ZipInfo, storage: _Storage) -> np.ndarray:
        nbytes = storage.numel * storage.dtype.itemsize
        if info.file_size < nbytes:
            raise CheckpointError(f"{self.path}: storage {storage.key} holds {info.file_size} bytes, its tensors "
                                  f"need {nbytes}")
        if info.compress_type != zipfile.ZIP_STORED:  # torch never compresses, but a re-zipped file might be
            with zipfile.ZipFile(self.path) as archive:
                raw = archive.read(info)
            return np.frombuffer(raw, storage.dtype, storage.numel)
        local = self._map[info.header_offset:info.header_offset + 30]
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            raise CheckpointError(f"{self.path}: damaged zip entry {info.filename}")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        if start + nbytes > len(self._map):
            raise CheckpointError(f"{self.path}: truncated: storage {storage.key} runs past the end of the file")
        return np.frombuffer(self._map, storage.dtype, storage.numel, offset=start)

    def _open_legacy(self) -> dict[str, PthTensor]:
        f = self._file
        f.seek(0)
        storages: dict[str, _Storage] = {}
        views: list[tuple[_Storage, str, int]] = []

        def no_storage(pid):
            raise CheckpointError(f"{self.path}: unexpected storage reference in the file header")

        def load_storage(pid):
            _, storage_type, root_key, _location, numel = pid[:5]
            view_metadata = pid[5] if len(pid) > 5 else None
            root_key = str(root_key)
            if root_key not in storages:
                storages[root_key] = _Storage(root_key, storage_type.dtype, numel, self._legacy_member)
            root = storages[root_key]
            if view_metadata is None:
                return root
            view_key, offset, view_numel = view_metadata
            view = _Storage(str(view_key), root.dtype, view_numel, self._legacy_member)
            views.append((view, root_key, int(offset)))
            return view

        magic = _unpickle(self.path, f, no_storage)
        if magic != _LEGACY_MAGIC:
            raise CheckpointError(f"{self.path}: neither a torch zip checkpoint nor a legacy torch file")
        protocol = _unpickle(self.path, f, no_storage)
        if protocol != _LEGACY_PROTOCOL:
            raise CheckpointError(f"{self.path}: unsupported legacy torch protocol {protocol!r}")
        _unpickle(self.path, f, no_storage)  # sys_info: endianness and type sizes of the writer
        result = _unpickle(self.path, f, load_storage)
        keys = _unpickle(self.path, f, no_storage)
        if not isinstance(keys, list):
            raise CheckpointError(f"{self.path}: damaged legacy torch file (no storage key list)")
        self._legacy_offsets: dict[str, int] = {}
        pos = f.tell()
        for key in keys:
            storage = storages.get(str(key))
            if storage is None:
                raise CheckpointError(f"{self.path}: storage {key!r} is listed but no tensor uses it")
            header = self._map[pos:pos + 8]
            if len(header) < 8:
                raise CheckpointError(f"{self.path}: truncated before storage {key!r}")
            (numel,) = struct.unpack("<q", header)
            if numel != storage.numel:
                raise CheckpointError(f"{self.path}: storage {key!r} has {numel} elements, the pickle says "
                                      f"{storage.numel}")
            self._legacy_offsets[str(key)] = pos + 8
            pos += 8 + numel * storage.dtype.itemsize
            if pos > len(self._map):
                raise CheckpointError(f"{self.path}: truncated inside storage {key!r}")
        for view, root_key, offset in views:
            self._legacy_offsets[view.key] = self._legacy_offsets[root_key] + offset * view.dtype.itemsize
        return _flatten(result, self.path)

    def _legacy_member(self, storage: _Storage) -> np.ndarray:
        return np.frombuffer(self._map, storage.dtype, storage.numel, offset=self._legacy_offsets[storage.key])

    # -- Checkpoint interface ----------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return str(self.path)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._tensors[key].shape

    def dtype(self, key: str) -> np.dtype:
        return self._tensors[key].dtype

    def get(self, key: str) -> np.ndarray:
        """One tensor in its stored dtype; contiguous tensors are read-only views of the memory-mapped file."""
        try:
            return self._tensors[key].numpy()
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{self.path}: cannot read tensor {key!r}: {e}") from None

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for key in self._tensors:
            yield key, self.get(key)

    def to_dict(self) -> dict[str, np.ndarray]:
        """Every tensor as an independent (copied) array."""
        return {key: np.array(value) for key, value in self.items()}

    def close(self):
        """Releases the file; arrays handed out as views must not be used afterwards."""
        m = getattr(self, "_map", None)
        if isinstance(m, mmap.mmap):
            try:
                m.close()
            except BufferError:  # views still alive: the map is freed with the last of them
                pass
        if getattr(self, "_file", None) is not None:
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------------------------------------------
# Writing (for tests and for handing weights back to PyTorch users): the same formats torch.save writes.
class _Global:
    """Pickled as `GLOBAL module name` without importing it (torch is not installed here)."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle insists that a reduce function be callable; this one is only written
        raise TypeError(f"{self.module}.{self.name} is a placeholder for pickling")


class _StorageRecord:
    def __init__(self, key: str, array: np.ndarray):
        self.key, self.array = key, array


class _TensorRecord:
    def __init__(self, storage: _StorageRecord):
        self.storage = storage

    def __reduce_ex__(self, protocol):
        shape = tuple(int(s) for s in self.storage.array.shape)
        stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
        return (_Global("torch._utils", "_rebuild_tensor_v2"),
                (self.storage, 0, shape, stride, False, OrderedDict()))


_STORAGE_NAMES = {np.dtype(v): k for k, v in _STORAGE_DTYPES.items() if k != "UntypedStorage"}


class _StateDictPickler(pickle._Pickler):  # the Python pickler lets `save` emit arbitrary GLOBALs
    def __init__(self, file, legacy: bool):
        super().__init__(file, protocol=2)
        self.legacy = legacy

    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, _Global):
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
            return
        super().save(obj, save_persistent_id)

    def persistent_id(self, obj):
        if not isinstance(obj, _StorageRecord):
            return None
        storage = _Global("torch", _STORAGE_NAMES[obj.array.dtype])
        pid = ("storage", storage, obj.key, "cpu", int(obj.array.size))
        return pid + (None,) if self.legacy else pid


def save_pth(state_dict: dict, path: str | os.PathLike, *, legacy: bool = False) -> None:
    """Writes {name: array} as torch.save would (zip format, or the pre-1.6 legacy format), one storage per tensor."""
    path = Path(path)
    records = OrderedDict()
    for i, (name, value) in enumerate(state_dict.items()):
        array = np.asarray(value, order="C")  # (ascontiguousarray would turn a 0-d tensor into 1-d)
        if array.dtype not in _STORAGE_NAMES:
            raise ValueError(f"{name}: dtype {array.dtype} has no torch storage type")
        records[name] = _StorageRecord(str(i), array)
    pickled = io.BytesIO()
    _StateDictPickler(pickled, legacy).dump(OrderedDict((k, _TensorRecord(r)) for k, r in records.items()))
    if legacy:
        with open(path, "wb") as f:
            for header in (_LEGACY_MAGIC, _LEGACY_PROTOCOL,
                           {"protocol_version": _LEGACY_PROTOCOL, "little_endian": True,
                            "type_sizes": {"short": 2, "int": 4, "long": 8}}):
                pickle.dump(header, f, protocol=2)
            f.write(pickled.getvalue())
            pickle.dump([r.key for r in records.values()], f, protocol=2)
            for r in records.values():
                f.write(struct.pack("<q", r.array.size))
                f.write(r.array.astype(r.array.dtype.newbyteorder("<"), copy=False).tobytes())
        return
    root = path.stem
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr(f"{root}/data.pkl", pickled.getvalue())
        z.writestr(f"{root}/byteorder", "little")
        for r in records.values():
            z.writestr(f"{root}/data/{r.key}", r.array.tobytes())
        z.writestr(f"{root}/version", "3\n")


def load_pth(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a torch state-dict file as numpy arrays (copies), read without torch or pickled code."""
    with PthCheckpoint(path) as ckpt:
        return ckpt.to_dict()


def is_pth(path: str | os.PathLike) -> bool:
    return Path(path).suffix in PTH_SUFFIXES


def open_weights(path: str | os.PathLike) -> Checkpoint | PthCheckpoint:
    """A safetensors file/folder/index, or a torch .pth/.bin read through the restricted unpickler."""
    path = Path(path)
    if path.is_file() and is_pth(path):
        return PthCheckpoint(path)
    return open_checkpoint(path)
