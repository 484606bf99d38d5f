"""The DiT's attention caches: explicit pytrees the caller carries from call to call.

`RingCache` holds one denoising step's keys (rotated at absolute positions) and values of the last
`capacity // tokens_per_frame` latent frames; block g writes at `(g * tokens_per_frame) mod capacity`, so the buffer
never grows. `SinkCache` holds the un-rotated keys and the values of the reference (sink) and motion tokens, written by
the sink prefill and re-rotated on every read. All arrays are [layers, batch, tokens, heads, head_dim].
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import struct


@struct.dataclass
class RingCache:
    k: jnp.ndarray
    v: jnp.ndarray

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @classmethod
    def zeros(cls, layers: int, batch: int, capacity: int, heads: int, head_dim: int, dtype=jnp.float32):
        shape = (layers, batch, capacity, heads, head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


@struct.dataclass
class SinkCache:
    k: jnp.ndarray  # un-rotated
    v: jnp.ndarray

    @property
    def length(self) -> int:
        return self.k.shape[2]
