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


def attention(q, k, v, *, num_valid_keys=None, key_bias=None, implementation: str | None = None):
    """softmax(q k^T / sqrt(d) + key_bias) v over [B, L, heads, d] arrays; keys at index >= num_valid_keys are
    ignored; `key_bias` [keys] (float32) is added to every query's logits (see `CausalS2VDiT.text_kv`).

    Softmax statistics are float32; the result has q's dtype.
    """
    impl = implementation or _impl
    if impl == "cudnn":
        if key_bias is not None:
            # cuDNN takes no per-key bias vector; a [B, H, Lq, Lk] bias would be the dense mask this module avoids
            return _xla_attention(q, k, v, num_valid_keys, key_bias)
        lengths = None
        if num_valid_keys is not None:
            lengths = jnp.full((q.shape[0],), num_valid_keys, jnp.int32)
        return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation="cudnn")
    return _xla_attention(q, k, v, num_valid_keys, key_bias)


def _xla_attention(q, k, v, num_valid_keys, key_bias):
    # Head-major operands for batched matmuls, the scale folded into q, one [keys] bias vector for the mask, and
    # normalisation after the PV product (on [Lq, d] instead of [Lq, Lk]): on XLA:CPU this runs 1.3x faster than
    # the einsum-and-softmax form at the DiT's shapes, with the same float32 statistics.
    d = q.shape[-1]
    lk = k.shape[1]
    qh = jnp.swapaxes(q * jnp.asarray(d ** -0.5, q.dtype), 1, 2)          # [B, H, Lq, d]
    kt = jnp.transpose(k, (0, 2, 3, 1))                                    # [B, H, d, Lk]
    vh = jnp.swapaxes(v, 1, 2)                                             # [B, H, Lk, d]
    logits = jnp.matmul(qh, kt, preferred_element_type=jnp.float32)
    if key_bias is not None or num_valid_keys is not None:
        bias = jnp.zeros((lk,), jnp.float32) if key_bias is None else key_bias.astype(jnp.float32)
        if num_valid_keys is not None:
            bias = jnp.where(jnp.arange(lk) < num_valid_keys, bias, -jnp.inf)
        logits = logits + bias
    m = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.exp(logits - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.matmul(p.astype(v.dtype), vh, preferred_element_type=jnp.float32) / denom
    return jnp.swapaxes(out, 1, 2).astype(q.dtype)
