"""Fully trained DiT weights as an official Wan2.2-S2V safetensors file: `dit_keys.RULES` read backwards.

`load_dit` (and so `infer.stream --ckpt_dir`, `model.checkpoint` of a later run) reads the file like released
weights: every official key, PyTorch layouts, per-layer tensors unstacked.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from liveavatar_jax.distill.checkpoint import flatten
from liveavatar_jax.models.dit import DiTConfig, abstract_model
from liveavatar_jax.weights import dit_keys, keymap

# Our layout -> official layout for each forward transform of the rule table.
_INVERSE = {
    keymap.IDENTITY: lambda w: w,
    keymap.LINEAR: lambda w: w.T,
    keymap.CONV1D: lambda w: w.transpose(2, 1, 0),
    keymap.CONV3D: lambda w: w.transpose(4, 3, 0, 1, 2),
    dit_keys._drop_leading: lambda w: w[None],
}
# `_flatten` forgets the official shape; these are the shapes Wan's modules create (load_dit flattens them again).
_FLATTENED = {
    "casual_audio_encoder.weights": lambda w: w.reshape(1, -1, 1, 1),
    "casual_audio_encoder.encoder.padding_tokens": lambda w: w.reshape(1, 1, 1, -1),
}


def official_tensors(params: Mapping, cfg: DiTConfig) -> dict[str, np.ndarray]:
    """{official key: array in the official layout} for a DiT parameter tree (a pure dict as `nnx.to_pure_dict`
    makes); bfloat16 leaves are written as float32 (numpy safetensors has no bfloat16; the loader casts)."""
    from flax import nnx

    _, abstract, _ = nnx.split(abstract_model(cfg), nnx.Param, ...)
    shapes = keymap.flat_paths(abstract)
    values = flatten(params)
    if set(values) != set(shapes):
        raise ValueError("the parameter tree does not match the DiT config: "
                         f"missing {sorted(set(shapes) - set(values))[:5]}, extra {sorted(set(values) - set(shapes))[:5]}")
    out = {}
    rule_of = {}
    for key, (path, index) in keymap.expected_source_keys(shapes, dit_keys.RULES).items():
        rule = rule_of.setdefault(path, next(r for r in dit_keys.RULES if r.match_target(path) is not None))
        w = np.asarray(values[path])
        if w.dtype.name == "bfloat16":
            w = w.astype(np.float32)
        if index is not None:
            w = w[index]
        inverse = _FLATTENED.get(key) if rule.transform is dit_keys._flatten else _INVERSE.get(rule.transform)
        if inverse is None:
            raise ValueError(f"no inverse layout for {key} ({rule.transform.__name__})")
        out[key] = np.ascontiguousarray(inverse(w))
    return out


def export_dit(params: Mapping, cfg: DiTConfig, path) -> Path:
    """Writes `params` as one official safetensors file that `load_dit(path, cfg)` reads back exactly."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(official_tensors(params, cfg), str(path), metadata={"format": "pt", "source": "liveavatar_jax"})
    return path
