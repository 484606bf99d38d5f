"""Weight names of HF `Wav2Vec2ForCTC` (wav2vec2-large-xlsr-53-english) onto `models.wav2vec2`, and its loader.

Two things do not map one tensor to one parameter, and are handled by a read-only view of the checkpoint before the
generic `load_params` sees it:

* the positional conv is stored weight-normed, as `...pos_conv_embed.conv.weight_g` [1, 1, K] and `weight_v`
  [C, C/G, K] (or, from newer transformers, `parametrizations.weight.original0/1`); the view presents the folded
  `...pos_conv_embed.conv.weight = g * v / ||v||`, the norm taken over dims (0, 1) (torch weight norm with dim=2);
* tensors inference never reads are dropped, but only those listed in `IGNORED_KEYS` (and `lm_head.*` when the
  model is built without its CTC head). Anything else unknown is an error.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from liveavatar_jax.models.wav2vec2 import Wav2Vec2Config, Wav2Vec2ForCTC
from liveavatar_jax.weights.checkpoint import Checkpoint, CheckpointError, open_checkpoint
from liveavatar_jax.weights.keymap import CONV1D, LINEAR, Rule, fill_model

_W = "wav2vec2"
_POS = f"{_W}.encoder.pos_conv_embed.conv"
_LAYER = f"{_W}.encoder.layers.{{i}}"


def _norm(src: str, dst: str, **kw) -> list[Rule]:
    return [Rule(f"{src}.weight", f"{dst}.scale", **kw), Rule(f"{src}.bias", f"{dst}.bias", **kw)]


def _linear(src: str, dst: str, **kw) -> list[Rule]:
    return [Rule(f"{src}.weight", f"{dst}.kernel", LINEAR, **kw), Rule(f"{src}.bias", f"{dst}.bias", **kw)]


WAV2VEC2_RULES: tuple[Rule, ...] = (
    Rule(f"{_W}.feature_extractor.conv_layers.{{j}}.conv.weight",
         f"{_W}.feature_extractor.conv_layers.{{j}}.conv.kernel", CONV1D),
    Rule(f"{_W}.feature_extractor.conv_layers.{{j}}.conv.bias", f"{_W}.feature_extractor.conv_layers.{{j}}.conv.bias"),
    *_norm(f"{_W}.feature_extractor.conv_layers.{{j}}.layer_norm",
           f"{_W}.feature_extractor.conv_layers.{{j}}.layer_norm"),
    *_norm(f"{_W}.feature_projection.layer_norm", f"{_W}.feature_projection.layer_norm"),
    *_linear(f"{_W}.feature_projection.projection", f"{_W}.feature_projection.projection"),
    Rule(f"{_POS}.weight", f"{_POS}.kernel", CONV1D),   # the folded weight the checkpoint view provides
    Rule(f"{_POS}.bias", f"{_POS}.bias"),
    *[r for name in ("q_proj", "k_proj", "v_proj", "out_proj")
      for r in _linear(f"{_LAYER}.attention.{name}", f"{_W}.encoder.layers.attention.{name}", stack="i")],
    *_norm(f"{_LAYER}.layer_norm", f"{_W}.encoder.layers.layer_norm", stack="i"),
    *_norm(f"{_LAYER}.final_layer_norm", f"{_W}.encoder.layers.final_layer_norm", stack="i"),
    *_linear(f"{_LAYER}.feed_forward.intermediate_dense", f"{_W}.encoder.layers.feed_forward.intermediate_dense",
             stack="i"),
    *_linear(f"{_LAYER}.feed_forward.output_dense", f"{_W}.encoder.layers.feed_forward.output_dense", stack="i"),
    *_norm(f"{_W}.encoder.layer_norm", f"{_W}.encoder.layer_norm"),
    *_linear("lm_head", "lm_head"),
)

# Present in released checkpoints, unused at inference: the SpecAugment mask embedding (training-time only).
IGNORED_KEYS: frozenset[str] = frozenset({f"{_W}.masked_spec_embed"})
CTC_HEAD_KEYS: frozenset[str] = frozenset({"lm_head.weight", "lm_head.bias"})

# (g, v) names of the weight-normed positional conv: legacy weight_norm, then torch parametrizations.
_WEIGHT_NORM_NAMES = (
    (f"{_POS}.weight_g", f"{_POS}.weight_v"),
    (f"{_POS}.parametrizations.weight.original0", f"{_POS}.parametrizations.weight.original1"),
)


def fold_weight_norm(g: np.ndarray, v: np.ndarray) -> np.ndarray:
    """torch weight norm with dim=2: w = g * v / ||v||, the norm over every axis but the last (the kernel tap)."""
    v32 = np.asarray(v, np.float32)
    norm = np.sqrt(np.sum(v32 * v32, axis=(0, 1), keepdims=True))
    return (np.asarray(g, np.float32) * v32 / norm).astype(v.dtype)


class _Wav2Vec2CheckpointView:
    """The checkpoint as the rule table sees it: weight norm folded, listed extras hidden."""

    def __init__(self, ckpt: Checkpoint, ignored: frozenset[str]):
        self._ckpt = ckpt
        self.name = ckpt.name
        self._fold: tuple[str, str] | None = None
        for g, v in _WEIGHT_NORM_NAMES:
            if g in ckpt and v in ckpt:
                self._fold = (g, v)
                break
            if (g in ckpt) != (v in ckpt):
                have, lack = (g, v) if g in ckpt else (v, g)
                raise CheckpointError(f"{ckpt.name}: holds {have} but not {lack} (the weight-normed positional "
                                      f"conv needs both)")
        hidden = set(ignored) | (set(self._fold) if self._fold else set())
        self._keys = [k for k in ckpt.keys() if k not in hidden]
        if self._fold:
            if f"{_POS}.weight" in ckpt:
                raise CheckpointError(f"{ckpt.name}: holds both {_POS}.weight and its weight-norm factors")
            g, v = self._fold
            v_shape = ckpt.shape(v)
            if len(v_shape) != 3 or ckpt.shape(g) != (1, 1, v_shape[2]):
                raise CheckpointError(f"{ckpt.name}: {g} {list(ckpt.shape(g))} and {v} {list(v_shape)} are not the "
                                      f"factors of a Conv1d weight norm over dims (0, 1)")
            self._keys.append(f"{_POS}.weight")

    def keys(self) -> list[str]:
        return list(self._keys)

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def shape(self, key: str) -> tuple[int, ...]:
        if self._fold and key == f"{_POS}.weight":
            return self._ckpt.shape(self._fold[1])
        return self._ckpt.shape(key)

    def get(self, key: str) -> np.ndarray:
        if self._fold and key == f"{_POS}.weight":
            g, v = self._fold
            return fold_weight_norm(self._ckpt.get(g), self._ckpt.get(v))
        return self._ckpt.get(key)


def _resolve(path: Path) -> tuple[Path, Path | None]:
    """(weights file, config.json or None) for an HF folder or a safetensors file."""
    if path.is_dir():
        weights = path / "model.safetensors"
        if not weights.is_file():
            extra = " (only pytorch_model.bin is there: convert it to safetensors first)" \
                if (path / "pytorch_model.bin").is_file() else ""
            raise CheckpointError(f"{path}: holds no model.safetensors{extra}")
        config = path / "config.json"
        return weights, config if config.is_file() else None
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    config = path.parent / "config.json"
    return path, config if config.is_file() else None


def load_wav2vec2(path: str | os.PathLike, config: Wav2Vec2Config | None = None, dtype=jnp.float32,
                  ctc_head: bool | None = None) -> Wav2Vec2ForCTC:
    """Builds `Wav2Vec2ForCTC` abstractly and fills it from an HF folder (model.safetensors + config.json) or a file.

    `config` defaults to the config.json of the folder (or beside the file). `ctc_head=None` keeps the CTC head
    exactly when the checkpoint has one; with `ctc_head=False` its tensors are ignored. Missing, unexpected or
    mis-shaped tensors raise `CheckpointError` naming the file.
    """
    weights, config_json = _resolve(Path(path))
    if config is None:
        if config_json is None:
            raise CheckpointError(f"{path}: no config given and no config.json found beside the weights")
        try:
            config = Wav2Vec2Config.from_json(config_json)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    ckpt = open_checkpoint(weights)
    has_head = any(k in ckpt for k in CTC_HEAD_KEYS)
    if ctc_head is None:
        ctc_head = has_head
    view = _Wav2Vec2CheckpointView(ckpt, IGNORED_KEYS if ctc_head else IGNORED_KEYS | CTC_HEAD_KEYS)

    abstract = nnx.eval_shape(lambda: Wav2Vec2ForCTC(config, dtype=dtype, ctc_head=ctc_head, rngs=nnx.Rngs(0)))
    return fill_model(abstract, view, WAV2VEC2_RULES, dtype=dtype)
