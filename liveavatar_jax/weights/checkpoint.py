"""Reading official checkpoints stored as safetensors: one file, a folder of shards with an index json, or a folder.

Tensors are read one at a time through memory maps, so a 14B checkpoint is never held twice on the host. Every
problem with a file (missing, truncated, not safetensors) ends in a `CheckpointError` that names the file.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import safe_open

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is: the message names the file and the offending keys."""


def format_key_list(keys, limit: int = 20) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{len(keys)} key(s): {shown}{more}"


def mismatch_error(title: str, missing=(), unexpected=(), misshaped=()) -> CheckpointError | None:
    """One error listing every missing, unexpected and mis-shaped key under `title` (None when all match)."""
    if not (missing or unexpected or misshaped):
        return None
    lines = [title]
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
        if keys:
            lines.append(f"  {label} " + format_key_list(keys))
    return CheckpointError("\n".join(lines))


def read_safetensors_header(path: Path) -> dict:
    """Parses and validates the header of one safetensors file without reading the tensors.

    Checks that the file is large enough for every tensor the header announces, which catches truncated downloads
    before any weight is read.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n <= 0 or n > min(size - 8, 100 * 2**20):
            raise CheckpointError(f"{path}: not a safetensors file (header length {n} does not fit a {size}-byte file)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(info, dict) or "data_offsets" not in info or info.get("dtype") not in _ST_DTYPES:
            raise CheckpointError(f"{path}: malformed header entry for tensor {key!r}")
        end = max(end, int(info["data_offsets"][1]))
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path}: truncated: the header announces {8 + n + end} bytes of data, the file has {size}")
    return header


class Checkpoint:
    """A read-only view of the tensors of one or more safetensors files, keyed by their official names."""

    def __init__(self, files: list[Path]):
        self.files = [Path(f) for f in files]
        self._where: dict[str, Path] = {}
        self._info: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        for f in self.files:
            header = read_safetensors_header(f)
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                if key in self._where:
                    raise CheckpointError(f"{f}: tensor {key!r} also appears in {self._where[key]}")
                self._where[key] = f
                self._info[key] = (tuple(info["shape"]), np.dtype(_ST_DTYPES[info["dtype"]]))
        self._handles: dict[Path, object] = {}

    @property
    def name(self) -> str:
        if len(self.files) == 1:
            return str(self.files[0])
        return f"{self.files[0].parent} ({len(self.files)} files)"

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        return self._info[key][0]

    def dtype(self, key: str) -> np.dtype:
        return self._info[key][1]

    def file_of(self, key: str) -> Path:
        return self._where[key]

    def get(self, key: str) -> np.ndarray:
        """Reads one tensor as a numpy array in its stored dtype (bfloat16 through ml_dtypes)."""
        f = self._where[key]
        if f not in self._handles:
            self._handles[f] = safe_open(str(f), framework="numpy")
        try:
            return self._handles[f].get_tensor(key)
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{f}: cannot read tensor {key!r}: {e}") from None

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for key in self._where:
            yield key, self.get(key)

    def to_dict(self) -> dict[str, np.ndarray]:
        return dict(self.items())


def open_checkpoint(path: str | os.PathLike, pattern: str = "*.safetensors") -> Checkpoint:
    """Opens a safetensors file, an index json, or a folder (its index json if there is one, else every match)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_file() and path.name.endswith(".index.json"):
        return _from_index(path)
    if path.is_file():
        return Checkpoint([path])
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return _from_index(indexes[0])
    files = sorted(path.glob(pattern))
    if not files:
        raise CheckpointError(f"{path}: holds no {pattern} file")
    return Checkpoint(files)


def _from_index(index_path: Path) -> Checkpoint:
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: not a safetensors index ({e})") from None
    files = sorted({index_path.parent / name for name in weight_map.values()})
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{index_path}: names shard files that do not exist: {', '.join(missing)}")
    ckpt = Checkpoint(files)
    absent = set(weight_map) - set(ckpt.keys())
    if absent:
        raise CheckpointError(f"{index_path}: the index lists tensors its shards do not hold: "
                              + format_key_list(absent))
    return ckpt
