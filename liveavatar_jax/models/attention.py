"""Multi-head softmax attention behind one switch: exact XLA math on any backend, cuDNN fused attention on GPU.

No dense query-by-key mask is ever built: the only masking this model needs is a count of valid keys (a ring
buffer that is still filling), and the valid keys are always a prefix of the key sequence, which both paths express
natively (a [keys] bias vector in XLA, `key_value_seq_lengths` in cuDNN).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "cudnn")
_impl = "xla"


def set_implementation(name: str) -> None:
    """Selects the attention kernel for subsequently traced functions ("xla" or "cudnn")."""
    global _impl
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {name!r}; choose one of {IMPLEMENTATIONS}")
    _impl = name


def get_implementation() -> str:
    return _impl


def attention(q, k, v, *, num_valid_keys=None, implementation: str | None = None):
    """softmax(q k^T / sqrt(d)) v over [B, L, heads, d] arrays; keys at index >= num_valid_keys are ignored.

    Softmax statistics are float32; the result has q's dtype.
    """
    impl = implementation or _impl
    if impl == "cudnn":
        lengths = None
        if num_valid_keys is not None:
            lengths = jnp.full((q.shape[0],), num_valid_keys, jnp.int32)
        return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation="cudnn")
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if num_valid_keys is not None:
        valid = jnp.arange(k.shape[1]) < num_valid_keys
        logits = jnp.where(valid, logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype)
