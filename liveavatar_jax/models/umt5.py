"""The umT5 text encoder of Wan2.2 (architecture.md section 2.6), in Flax NNX.

A pre-norm T5 encoder: T5 RMS-LayerNorm (no mean, no bias, eps 1e-6), self-attention without the 1/sqrt(d) scale
and without biases, a gated-GELU(tanh) feed-forward, and, as umT5 does (`shared_pos=False`), a relative position
bias table of its own in every layer (32 buckets, bidirectional, max distance 128). Padded positions are masked out
as keys by putting the dtype's most negative value into the bias.

The layers are stacked along a leading axis and run with `jax.lax.scan`, so the 24-layer XXL model compiles one layer.
Casts follow the official module run in bf16: norm statistics and the softmax in float32, everything else in `dtype`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclass(frozen=True)
class UMT5Config:
    vocab: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_dist: int = 128
    eps: float = 1e-6
    text_len: int = 512  # the pipeline pads or truncates every prompt to this many tokens

    def __post_init__(self):
        if self.dim_attn % self.num_heads:
            raise ValueError(f"dim_attn {self.dim_attn} is not divisible by num_heads {self.num_heads}")

    @property
    def head_dim(self) -> int:
        return self.dim_attn // self.num_heads

    @classmethod
    def from_kwargs(cls, kwargs: Mapping) -> "UMT5Config":
        """From the official constructor kwargs (`T5Encoder(...)`, or `umt5_xxl`'s with vocab_size/encoder_layers).

        `dropout` is a training-time knob and is ignored; `shared_pos=True` (plain T5) is not umT5 and is refused.
        """
        kw = dict(kwargs)
        if kw.pop("shared_pos", False):
            raise ValueError("shared_pos=True is the T5 layout with one position table; umT5 has one per layer")
        kw.pop("dropout", None)
        kw.pop("decoder_layers", None)
        if "vocab_size" in kw:
            kw["vocab"] = kw.pop("vocab_size")
        if "encoder_layers" in kw:
            kw["num_layers"] = kw.pop("encoder_layers")
        return cls.from_config(kw)

    @classmethod
    def from_config(cls, config) -> "UMT5Config":
        """From a mapping or an ml-collections ConfigDict; keys that are not fields are an error."""
        data = dict(config.to_dict() if hasattr(config, "to_dict") else config)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown UMT5Config field(s): {', '.join(unknown)}")
        return cls(**data)


UMT5_XXL = UMT5Config()


def relative_position_buckets(len_q: int, len_k: int, num_buckets: int, max_dist: int) -> np.ndarray:
    """Bidirectional T5 buckets [len_q, len_k] of `key position - query position`.

    Half the buckets are for keys after the query. Distances below a quarter of the buckets get one bucket each, the
    rest are spaced logarithmically up to `max_dist`. The logarithm is taken in float32 and truncated, exactly like
    the official code, so the bucket boundaries at distances 16, 32 and 64 land where they land there.
    """
    rel = np.arange(len_k)[None, :] - np.arange(len_q)[:, None]
    half = num_buckets // 2
    buckets = (rel > 0).astype(np.int64) * half
    dist = np.abs(rel)
    max_exact = half // 2
    with np.errstate(divide="ignore"):
        log_ratio = np.log(dist.astype(np.float32) / np.float32(max_exact))
    scaled = log_ratio / np.float32(math.log(max_dist / max_exact)) * np.float32(half - max_exact)
    scaled = np.where(dist < max_exact, 0, scaled)  # keeps -inf (distance 0) out of the integer cast
    large = np.minimum(max_exact + scaled.astype(np.int64), half - 1)
    return buckets + np.where(dist < max_exact, dist, large)


class T5RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), dtype))

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        weight = self.weight[...]
        return weight * y.astype(weight.dtype)


class T5Attention(nnx.Module):
    def __init__(self, config: UMT5Config, dtype, rngs: nnx.Rngs):
        c = config
        self.num_heads, self.head_dim = c.num_heads, c.head_dim

        def linear(n_in, n_out):
            return nnx.Linear(n_in, n_out, use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs)

        self.q = linear(c.dim, c.dim_attn)
        self.k = linear(c.dim, c.dim_attn)
        self.v = linear(c.dim, c.dim_attn)
        self.o = linear(c.dim_attn, c.dim)

    def __call__(self, x, bias):
        """x [B, L, dim]; bias [B or 1, heads, L, L] (position bias with the key mask already folded in)."""
        b, n = x.shape[0], x.shape[1]
        q = self.q(x).reshape(b, n, self.num_heads, self.head_dim)
        k = self.k(x).reshape(b, n, self.num_heads, self.head_dim)
        v = self.v(x).reshape(b, n, self.num_heads, self.head_dim)
        logits = jnp.einsum("binc,bjnc->bnij", q, k) + bias.astype(x.dtype)  # T5: no 1/sqrt(d) scale
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(x.dtype)
        out = jnp.einsum("bnij,bjnc->binc", weights, v).reshape(b, n, self.num_heads * self.head_dim)
        return self.o(out)


class T5FeedForward(nnx.Module):
    def __init__(self, config: UMT5Config, dtype, rngs: nnx.Rngs):
        c = config

        def linear(n_in, n_out):
            return nnx.Linear(n_in, n_out, use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs)

        self.gate = linear(c.dim, c.dim_ffn)
        self.fc1 = linear(c.dim, c.dim_ffn)
        self.fc2 = linear(c.dim_ffn, c.dim)

    def __call__(self, x):
        return self.fc2(self.fc1(x) * jax.nn.gelu(self.gate(x), approximate=True))


class RelativePositionBias(nnx.Module):
    def __init__(self, config: UMT5Config, dtype, rngs: nnx.Rngs):
        self.num_buckets, self.max_dist = config.num_buckets, config.max_dist
        self.embedding = nnx.Embed(config.num_buckets, config.num_heads, dtype=dtype, param_dtype=dtype, rngs=rngs)

    def __call__(self, length: int):
        """[1, heads, length, length]."""
        buckets = relative_position_buckets(length, length, self.num_buckets, self.max_dist)
        return jnp.transpose(self.embedding(jnp.asarray(buckets)), (2, 0, 1))[None]


class T5EncoderLayer(nnx.Module):
    def __init__(self, config: UMT5Config, dtype, rngs: nnx.Rngs):
        self.norm1 = T5RMSNorm(config.dim, config.eps, dtype)
        self.attn = T5Attention(config, dtype, rngs)
        self.norm2 = T5RMSNorm(config.dim, config.eps, dtype)
        self.ffn = T5FeedForward(config, dtype, rngs)
        self.pos_embedding = RelativePositionBias(config, dtype, rngs)

    def __call__(self, x, key_is_pad):
        bias = self.pos_embedding(x.shape[1])
        bias = jnp.where(key_is_pad[:, None, None, :], jnp.finfo(x.dtype).min, bias.astype(x.dtype))
        x = x + self.attn(self.norm1(x), bias)
        return x + self.ffn(self.norm2(x))


class UMT5Encoder(nnx.Module):
    """`T5Encoder(ids, mask) -> [B, L, dim]`; padded positions still produce outputs (the caller trims them)."""

    def __init__(self, config: UMT5Config, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        self.token_embedding = nnx.Embed(config.vocab, config.dim, dtype=dtype, param_dtype=dtype, rngs=rngs)

        @nnx.split_rngs(splits=config.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_layers(rngs):
            return T5EncoderLayer(config, dtype, rngs)

        self.blocks = make_layers(rngs)
        self.norm = T5RMSNorm(config.dim, config.eps, dtype)

    def __call__(self, ids, mask=None):
        ids = jnp.asarray(ids)
        x = self.token_embedding(ids)
        key_is_pad = jnp.zeros(ids.shape, bool) if mask is None else (jnp.asarray(mask) == 0)
        graphdef, layers = nnx.split(self.blocks)

        def one_layer(x, layer_state):
            return nnx.merge(graphdef, layer_state)(x, key_is_pad), None

        x, _ = jax.lax.scan(one_layer, x, layers)
        return self.norm(x)


def trim_to_mask(encoder_out, mask) -> list:
    """The official `T5EncoderModel.__call__` output: each prompt's rows cut to its number of valid tokens."""
    lengths = np.asarray(mask).astype(bool).sum(axis=-1)
    return [encoder_out[i, : int(n)] for i, n in enumerate(lengths)]
