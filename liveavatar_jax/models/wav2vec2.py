"""Wav2Vec2 (XLSR-53 family) in Flax NNX: the speech encoder of the S2V audio front end (architecture.md §2.1).

Only the "stable layer norm" variant is implemented, which is what `wav2vec2-large-xlsr-53-english` is:

    input_values [B, S] (16 kHz, zero-mean/unit-variance)
      -> 7 strided convs, each Conv1d -> LayerNorm over channels -> GELU          (320x down: 50 Hz)
      -> feature projection: LayerNorm -> Linear to hidden_size
      -> + GELU(grouped positional conv), a weight-normed Conv1d whose last output step is dropped for even kernels
      -> L pre-LN transformer layers, then a final LayerNorm
      -> optional CTC head (lm_head)

`hidden_states` follows the HF definition of `output_hidden_states=True`: entry 0 is the input of layer 0 (after the
positional conv, no LayerNorm), entries 1..L-1 are the raw outputs of layers 0..L-2, and entry L is the *final
LayerNorm* of the last layer's output. The S2V DiT's CausalAudioEncoder weighs exactly these L+1 tensors.

The layers are stored stacked (leading axis = layer) and applied with `jax.lax.scan`, so a 24-layer model compiles
one layer body.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

_ACTIVATIONS = {
    "gelu": partial(jax.nn.gelu, approximate=False),
    "gelu_new": partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


@dataclass(frozen=True)
class Wav2Vec2Config:
    """The architecture fields of an HF `Wav2Vec2Config` (defaults: wav2vec2-large-xlsr-53-english)."""

    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    conv_dim: tuple[int, ...] = (512,) * 7
    conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_bias: bool = True
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    layer_norm_eps: float = 1e-5
    feat_extract_norm: str = "layer"
    feat_extract_activation: str = "gelu"
    hidden_act: str = "gelu"
    do_stable_layer_norm: bool = True
    vocab_size: int = 33

    def __post_init__(self):
        for name in ("conv_dim", "conv_stride", "conv_kernel"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if not (len(self.conv_dim) == len(self.conv_stride) == len(self.conv_kernel)):
            raise ValueError(f"Wav2Vec2Config: conv_dim, conv_stride and conv_kernel must have the same length, got "
                             f"{len(self.conv_dim)}, {len(self.conv_stride)}, {len(self.conv_kernel)}")
        if self.feat_extract_norm != "layer" or not self.do_stable_layer_norm:
            raise ValueError("Wav2Vec2Config: only the XLSR-style model (feat_extract_norm='layer', "
                             f"do_stable_layer_norm=True) is implemented, got feat_extract_norm="
                             f"{self.feat_extract_norm!r}, do_stable_layer_norm={self.do_stable_layer_norm}")
        for name in ("feat_extract_activation", "hidden_act"):
            if getattr(self, name) not in _ACTIVATIONS:
                raise ValueError(f"Wav2Vec2Config: unsupported {name}={getattr(self, name)!r} "
                                 f"(known: {', '.join(sorted(_ACTIVATIONS))})")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"Wav2Vec2Config: hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.hidden_size % self.num_conv_pos_embedding_groups:
            raise ValueError(f"Wav2Vec2Config: hidden_size {self.hidden_size} is not divisible by "
                             f"num_conv_pos_embedding_groups {self.num_conv_pos_embedding_groups}")

    @property
    def num_hidden_states(self) -> int:
        return self.num_hidden_layers + 1

    @property
    def samples_per_frame(self) -> int:
        """Hop of the conv front end in samples (320 for 16 kHz -> 50 Hz)."""
        hop = 1
        for s in self.conv_stride:
            hop *= s
        return hop

    @property
    def receptive_field(self) -> int:
        """Input samples seen by one output frame of the conv front end (400 for the XLSR stack)."""
        field, hop = 1, 1
        for k, s in zip(self.conv_kernel, self.conv_stride):
            field += (k - 1) * hop
            hop *= s
        return field

    def num_frames(self, num_samples: int) -> int:
        """Frames the conv front end makes of `num_samples` (HF `_get_feat_extract_output_lengths`); 0 if too short."""
        n = int(num_samples)
        for k, s in zip(self.conv_kernel, self.conv_stride):
            if n < k:
                return 0
            n = (n - k) // s + 1
        return n

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | Any) -> "Wav2Vec2Config":
        """From an HF config.json dict, the fixture manifest's config or an ml-collections ConfigDict.

        Unknown keys (dropout rates, SpecAugment, adapter and pretraining fields) do not change inference and are
        ignored.
        """
        if hasattr(d, "to_dict"):
            d = d.to_dict()
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dict(d).items() if k in names and v is not None})

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "Wav2Vec2Config":
        """From an HF config.json file, or a checkpoint folder holding one."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise ValueError(f"{path}: no such file (an HF wav2vec2 folder holds config.json)") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None


def _layer_norm(features: int, eps: float, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # Two-pass variance as torch computes it; the one-pass form loses digits on large activations.
    return nnx.LayerNorm(features, epsilon=eps, dtype=dtype, param_dtype=dtype, use_fast_variance=False, rngs=rngs)


class FeatureExtractorConv(nnx.Module):
    """One conv block of the front end: strided Conv1d, LayerNorm over channels, activation."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, config: Wav2Vec2Config, dtype,
                 rngs: nnx.Rngs):
        self.conv = nnx.Conv(in_ch, out_ch, (kernel,), (stride,), padding="VALID", use_bias=config.conv_bias,
                             dtype=dtype, param_dtype=dtype, rngs=rngs)
        # The HF conv blocks build nn.LayerNorm with torch's default eps, not config.layer_norm_eps.
        self.layer_norm = _layer_norm(out_ch, 1e-5, dtype, rngs)
        self.activation = _ACTIVATIONS[config.feat_extract_activation]

    def __call__(self, x):
        return self.activation(self.layer_norm(self.conv(x)))


class FeatureExtractor(nnx.Module):
    """Raw waveform [B, S] -> conv features [B, T50, conv_dim[-1]]."""

    def __init__(self, config: Wav2Vec2Config, dtype, rngs: nnx.Rngs):
        chans = (1,) + config.conv_dim
        self.conv_layers = nnx.List([
            FeatureExtractorConv(chans[i], chans[i + 1], k, s, config, dtype, rngs)
            for i, (k, s) in enumerate(zip(config.conv_kernel, config.conv_stride))])

    def __call__(self, input_values):
        x = input_values[..., None]
        for layer in self.conv_layers:
            x = layer(x)
        return x


class FeatureProjection(nnx.Module):
    def __init__(self, config: Wav2Vec2Config, dtype, rngs: nnx.Rngs):
        self.layer_norm = _layer_norm(config.conv_dim[-1], config.layer_norm_eps, dtype, rngs)
        self.projection = nnx.Linear(config.conv_dim[-1], config.hidden_size, dtype=dtype, param_dtype=dtype,
                                     rngs=rngs)

    def __call__(self, x):
        return self.projection(self.layer_norm(x))


class PositionalConvEmbedding(nnx.Module):
    """Grouped Conv1d over time ("same" padding, last step dropped for even kernels) followed by GELU.

    The checkpoint stores its weight as weight norm (`weight_g`, `weight_v`); the loader folds it into `conv.kernel`.
    """

    def __init__(self, config: Wav2Vec2Config, dtype, rngs: nnx.Rngs):
        k = config.num_conv_pos_embeddings
        self.conv = nnx.Conv(config.hidden_size, config.hidden_size, (k,), padding=[(k // 2, k // 2)],
                             feature_group_count=config.num_conv_pos_embedding_groups, dtype=dtype,
                             param_dtype=dtype, rngs=rngs)
        self.drop_last = k % 2 == 0
        self.activation = _ACTIVATIONS[config.feat_extract_activation]

    def __call__(self, x):
        y = self.conv(x)
        if self.drop_last:
            y = y[:, :-1]
        return self.activation(y)


class SelfAttention(nnx.Module):
    def __init__(self, config: Wav2Vec2Config, dtype, rngs: nnx.Rngs):
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        lin = partial(nnx.Linear, d, d, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = lin(), lin(), lin(), lin()

    def __call__(self, x, key_mask=None):
        b, t, d = x.shape
        h = self.num_heads
        split = lambda y: y.reshape(b, t, h, d // h)
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(d // h)
        if key_mask is not None:
            logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, d)
        return self.out_proj(out)


class FeedForward(nnx.Module):
    def __init__(self, config: Wav2Vec2Config, dtype, rngs: nnx.Rngs):
        self.intermediate_dense = nnx.Linear(config.hidden_size, config.intermediate_size, dtype=dtype,
                                             param_dtype=dtype, rngs=rngs)
        self.output_dense = nnx.Linear(config.intermediate_size, config.hidden_size, dtype=dtype,
                                       param_dtype=dtype, rngs=rngs)
        self.activation = _ACTIVATIONS[config.hidden_act]

    def __call__(self, x):
        return self.output_dense(self.activation(self.intermediate_dense(x)))


class EncoderLayer(nnx.Module):
    """Pre-LN transformer layer: x + Attn(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, config: Wav2Vec2Config, dtype, rngs: nnx.Rngs):
        self.layer_norm = _layer_norm(config.hidden_size, config.layer_norm_eps, dtype, rngs)
        self.attention = SelfAttention(config, dtype, rngs)
        self.final_layer_norm = _layer_norm(config.hidden_size, config.layer_norm_eps, dtype, rngs)
        self.feed_forward = FeedForward(config, dtype, rngs)

    def __call__(self, x, key_mask=None):
        x = x + self.attention(self.layer_norm(x), key_mask)
        return x + self.feed_forward(self.final_layer_norm(x))


class Encoder(nnx.Module):
    """Positional conv, the stacked layers (scanned) and the final LayerNorm; returns all L+1 hidden states."""

    def __init__(self, config: Wav2Vec2Config, dtype, rngs: nnx.Rngs):
        self.pos_conv_embed = PositionalConvEmbedding(config, dtype, rngs)

        @nnx.split_rngs(splits=config.num_hidden_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_layers(r):
            return EncoderLayer(config, dtype, r)

        self.layers = make_layers(rngs)
        self.layer_norm = _layer_norm(config.hidden_size, config.layer_norm_eps, dtype, rngs)

    def __call__(self, x, mask=None):
        """x [B, T, C]; `mask` [B, T] marks real frames (padding is zeroed and never attended, as in HF)."""
        if mask is not None:
            x = jnp.where(mask[..., None], x, 0)
        x = x + self.pos_conv_embed(x)
        graphdef, stacked = nnx.split(self.layers)

        def body(h, layer_state):
            out = nnx.merge(graphdef, layer_state)(h, mask)
            return out, h  # collect each layer's input: hidden_states[0..L-1]

        last, inputs = jax.lax.scan(body, x, stacked)
        return jnp.concatenate([inputs, self.layer_norm(last)[None]], axis=0)


class Wav2Vec2Model(nnx.Module):
    def __init__(self, config: Wav2Vec2Config, dtype, rngs: nnx.Rngs):
        self.feature_extractor = FeatureExtractor(config, dtype, rngs)
        self.feature_projection = FeatureProjection(config, dtype, rngs)
        self.encoder = Encoder(config, dtype, rngs)

    def __call__(self, input_values, mask=None):
        return self.encoder(self.feature_projection(self.feature_extractor(input_values)), mask)


class Wav2Vec2Output(NamedTuple):
    hidden_states: jax.Array      # [L+1, B, T50, C]
    logits: jax.Array | None      # [B, T50, vocab] when the model has its CTC head


class Wav2Vec2ForCTC(nnx.Module):
    """The HF `Wav2Vec2ForCTC` layout (parameter paths mirror its state-dict names); `ctc_head=False` drops lm_head."""

    def __init__(self, config: Wav2Vec2Config, *, dtype=jnp.float32, ctc_head: bool = True,
                 rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        self.wav2vec2 = Wav2Vec2Model(config, dtype, rngs)
        self.lm_head = (nnx.Linear(config.hidden_size, config.vocab_size, dtype=dtype, param_dtype=dtype, rngs=rngs)
                        if ctc_head else None)

    def __call__(self, input_values, num_valid_frames=None) -> Wav2Vec2Output:
        """input_values [B, S] (already normalised) -> hidden states [L+1, B, T50, C] and the CTC logits.

        `num_valid_frames` (scalar or [B]) marks right padding: frames from that index on are zeroed before the
        positional conv and never attended, so the first frames equal those of the unpadded input (padded
        samples only reach frames past it). It lets inputs of different lengths share one compiled shape.
        """
        mask = None
        if num_valid_frames is not None:
            t = self.config.num_frames(input_values.shape[-1])
            mask = jnp.arange(t)[None, :] < jnp.reshape(jnp.asarray(num_valid_frames), (-1, 1))
        hidden = self.wav2vec2(input_values, mask)
        logits = self.lm_head(hidden[-1]) if self.lm_head is not None else None
        return Wav2Vec2Output(hidden, logits)


def _forward(graphdef, state, input_values, num_valid_frames):
    return nnx.merge(graphdef, state)(input_values, num_valid_frames)


class Wav2Vec2Runner:
    """A loaded model split once, with a jitted forward: `runner(input_values [B, S]) -> Wav2Vec2Output`.

    Each distinct input length compiles once and stays cached in the runner, so keep one runner per model.
    """

    def __init__(self, model: Wav2Vec2ForCTC):
        self.config: Wav2Vec2Config = model.config
        self.has_ctc_head = model.lm_head is not None
        graphdef, self._state = nnx.split(model)
        self._forward = jax.jit(partial(_forward, graphdef))

    def __call__(self, input_values, num_valid_frames=None) -> Wav2Vec2Output:
        return self._forward(self._state, jnp.asarray(input_values), num_valid_frames)
