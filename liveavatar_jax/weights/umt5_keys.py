"""Official key names of `models_t5_umt5-xxl-enc-bf16.pth` (Wan's own T5 code, not the HF layout) -> UMT5Encoder."""

from __future__ import annotations

import os

import jax.numpy as jnp
from flax import nnx

from liveavatar_jax.models.umt5 import UMT5Config, UMT5Encoder
from liveavatar_jax.weights.keymap import IDENTITY, LINEAR, Rule, fill_model
from liveavatar_jax.weights.pth import open_weights

UMT5_RULES = (
    Rule("token_embedding.weight", "token_embedding.embedding", IDENTITY),
    Rule("blocks.{i}.norm1.weight", "blocks.norm1.weight", IDENTITY, stack="i"),
    Rule("blocks.{i}.norm2.weight", "blocks.norm2.weight", IDENTITY, stack="i"),
    Rule("blocks.{i}.attn.q.weight", "blocks.attn.q.kernel", LINEAR, stack="i"),
    Rule("blocks.{i}.attn.k.weight", "blocks.attn.k.kernel", LINEAR, stack="i"),
    Rule("blocks.{i}.attn.v.weight", "blocks.attn.v.kernel", LINEAR, stack="i"),
    Rule("blocks.{i}.attn.o.weight", "blocks.attn.o.kernel", LINEAR, stack="i"),
    Rule("blocks.{i}.ffn.gate.0.weight", "blocks.ffn.gate.kernel", LINEAR, stack="i"),
    Rule("blocks.{i}.ffn.fc1.weight", "blocks.ffn.fc1.kernel", LINEAR, stack="i"),
    Rule("blocks.{i}.ffn.fc2.weight", "blocks.ffn.fc2.kernel", LINEAR, stack="i"),
    # [num_buckets, num_heads] in both layouts.
    Rule("blocks.{i}.pos_embedding.embedding.weight", "blocks.pos_embedding.embedding.embedding", IDENTITY,
         stack="i"),
    Rule("norm.weight", "norm.weight", IDENTITY),
)


def abstract_umt5(config: UMT5Config, dtype=jnp.float32) -> UMT5Encoder:
    """The encoder with shape-only parameters (nothing allocated)."""
    return nnx.eval_shape(lambda: UMT5Encoder(config, dtype=dtype, rngs=nnx.Rngs(0)))


def load_umt5(path: str | os.PathLike, config: UMT5Config, dtype=jnp.float32) -> UMT5Encoder:
    """The encoder with the weights of `path`: a safetensors file (converted) or the official .pth (read safely).

    Strict: a missing, unexpected or mis-shaped tensor raises `CheckpointError` naming the file.
    """
    ckpt = open_weights(path)
    try:
        return fill_model(abstract_umt5(config, dtype), ckpt, UMT5_RULES, dtype=dtype)
    finally:
        if hasattr(ckpt, "close"):
            ckpt.close()
