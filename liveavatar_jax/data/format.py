"""On-disk format of precomputed training examples ("liveavatar-train-v1").

A dataset is a folder:

    DATASET/
      index.json                    {"format": "liveavatar-train-v1", "spec": {...}, "examples": [...],
                                     "negative_text": "negative_text.safetensors"}
      negative_text.safetensors     text [L, text_dim]: the negative-prompt context of the teacher's null branch
      examples/<id>.safetensors     one clip per file

Every example file holds six float tensors (float32 or bfloat16) and string metadata:

    latents         [16, F, h, w]         normalised VAE latents of the clip (F = blocks x 3 latent frames)
    audio           [A_l, A_c, 4F]        wav2vec2 hidden states (all A_l layers) at the video frame rate, one per
                                          video frame of the clip (the per-frame features the DiT's audio encoder
                                          takes; 4 video frames per latent frame)
    text            [L, text_dim]         umT5 context of the caption, L <= text_len (not padded)
    ref_latents     [16, 1, h, w]         the reference (sink) image latent
    motion_latents  [16, M, h, w]         latents of the motion frames that precede the clip (FramePack input;
                                          Stage 1 noises them into its scaffold)
    static_motion_latents [16, M, h, w]   latents of the reference image repeated over the motion frames: what
                                          the released inference feeds the FramePack tokens (Stage 2's default)
    __metadata__    {"id", "source", "caption", "fps", "start_frame"} (strings)

`spec` fixes the shapes every example must have (`ExampleSpec`); an example that does not match it, cannot be read, or
holds non-finite values is malformed (`validate`). `index.json` lists the files in a fixed order: the loader's
shuffling, sharding and resuming are all defined on positions in that list.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

FORMAT = "liveavatar-train-v1"
INDEX = "index.json"
NEGATIVE_TEXT = "negative_text.safetensors"
FIELDS = ("latents", "audio", "text", "ref_latents", "motion_latents", "static_motion_latents")


class DatasetError(ValueError):
    """A dataset folder or example file that cannot be used; the message names the file."""


@dataclasses.dataclass(frozen=True)
class ExampleSpec:
    channels: int = 16
    frames: int = 21              # latent frames of a clip
    height: int = 90              # latent grid
    width: int = 50
    motion_frames: int = 19       # motion latents
    audio_layers: int = 25
    audio_dim: int = 1024
    text_dim: int = 4096
    text_len: int = 512

    def shapes(self) -> dict[str, tuple]:
        """Expected shapes; `None` marks the variable text length."""
        c, f, h, w = self.channels, self.frames, self.height, self.width
        return {"latents": (c, f, h, w), "audio": (self.audio_layers, self.audio_dim, 4 * f),
                "text": (None, self.text_dim), "ref_latents": (c, 1, h, w),
                "motion_latents": (c, self.motion_frames, h, w),
                "static_motion_latents": (c, self.motion_frames, h, w)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "ExampleSpec":
        return cls(**{f.name: int(d[f.name]) for f in dataclasses.fields(cls) if f.name in d})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def validate(arrays: Mapping[str, np.ndarray], spec: ExampleSpec, check_finite: bool = True) -> list[str]:
    """Problems of one example against `spec` (empty when it is well formed)."""
    problems = []
    for name, want in spec.shapes().items():
        if name not in arrays:
            problems.append(f"missing tensor {name!r}")
            continue
        a = arrays[name]
        got = tuple(a.shape)
        if len(got) != len(want) or any(w is not None and g != w for g, w in zip(got, want)):
            shown = tuple("L" if w is None else w for w in want)
            problems.append(f"{name} has shape {list(got)}, expected {list(shown)}")
            continue
        if name == "text" and not 0 < got[0] <= spec.text_len:
            problems.append(f"text has {got[0]} tokens, expected 1..{spec.text_len}")
        if not np.issubdtype(np.asarray(a).dtype, np.floating) and str(np.asarray(a).dtype) != "bfloat16":
            problems.append(f"{name} has dtype {a.dtype}, expected a float type")
        elif check_finite and not np.all(np.isfinite(np.asarray(a, np.float32))):
            problems.append(f"{name} holds non-finite values")
    extra = sorted(set(arrays) - set(FIELDS))
    if extra:
        problems.append(f"unexpected tensors {extra}")
    return problems


def write_example(path, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None,
                  dtype=np.float32) -> Path:
    """Writes one example file atomically (temporary name, then rename)."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.ascontiguousarray(np.asarray(arrays[k]).astype(dtype)) for k in FIELDS}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, path)
    return path


def read_example(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(arrays as float32, metadata); a file that cannot be parsed raises DatasetError naming it."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: example file not found")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = dict(f.metadata() or {})
            arrays = {k: np.asarray(f.get_tensor(k), np.float32) for k in f.keys()}
    except DatasetError:
        raise
    except Exception as e:  # safetensors raises several types for damaged files
        raise DatasetError(f"{path}: not a readable safetensors example ({type(e).__name__}: {e})") from None
    return arrays, meta


class DatasetWriter:
    """Builds a dataset folder: `add` writes example files, `close` writes the index (and the negative prompt)."""

    def __init__(self, root, spec: ExampleSpec, dtype=np.float32):
        self.root = Path(root)
        self.spec = spec
        self.dtype = dtype
        self.entries: list[dict] = []
        (self.root / "examples").mkdir(parents=True, exist_ok=True)

    def add(self, example_id: str, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None,
            check: bool = True) -> Path:
        if check:
            problems = validate(arrays, self.spec)
            if problems:
                raise DatasetError(f"example {example_id!r}: " + "; ".join(problems))
        rel = f"examples/{example_id}.safetensors"
        write_example(self.root / rel, arrays, {"id": example_id, **(metadata or {})}, self.dtype)
        self.entries.append({"id": example_id, "file": rel})
        return self.root / rel

    def set_negative_text(self, context: np.ndarray):
        from safetensors.numpy import save_file

        context = np.asarray(context, np.float32)
        if context.ndim != 2 or context.shape[1] != self.spec.text_dim:
            raise DatasetError(f"negative text context has shape {list(context.shape)}, expected [L, "
                               f"{self.spec.text_dim}]")
        save_file({"text": context}, str(self.root / NEGATIVE_TEXT))

    def close(self) -> Path:
        index = {"format": FORMAT, "spec": self.spec.to_dict(), "examples": self.entries,
                 "negative_text": NEGATIVE_TEXT if (self.root / NEGATIVE_TEXT).is_file() else None}
        tmp = self.root / (INDEX + ".tmp")
        tmp.write_text(json.dumps(index, indent=1))
        os.replace(tmp, self.root / INDEX)
        return self.root / INDEX


def read_index(root) -> dict:
    root = Path(root)
    path = root / INDEX
    if not path.is_file():
        raise DatasetError(f"{path}: dataset index not found (build one with `python -m train.preprocess`)")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from None
    if index.get("format") != FORMAT:
        raise DatasetError(f"{path}: format {index.get('format')!r}, expected {FORMAT!r}")
    for key in ("spec", "examples"):
        if key not in index:
            raise DatasetError(f"{path}: no {key!r} entry")
    if not index["examples"]:
        raise DatasetError(f"{path}: lists no examples")
    return index


def read_negative_text(root) -> np.ndarray | None:
    root = Path(root)
    index = read_index(root)
    name = index.get("negative_text")
    if not name:
        return None
    from safetensors.numpy import load_file

    try:
        return np.asarray(load_file(str(root / name))["text"], np.float32)
    except Exception as e:
        raise DatasetError(f"{root / name}: cannot read the negative prompt context ({e})") from None
