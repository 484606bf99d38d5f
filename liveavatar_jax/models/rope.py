"""3-D rotary position embedding of the Wan S2V DiT, computed from integer positions without a position table.

The official code indexes a 45,000-row table (positions past it raise, capping a stream at two hours) and rounds the
per-token cos/sin to float16 before use (`s2v_utils.rope_precompute` builds a complex32 buffer). We compute
exp(i * pos * w) for any int32 position as a product of four factors, one per base-256 digit of |pos|, each read from
a float64-accurate table: the float32 error stays at a few ulp however long the stream runs, and for positions below
256 the single non-trivial factor is exactly the float32 rounding of the float64 value, so the float16 rounding that
follows matches the official table except where float64 -> float32 -> float16 double rounding differs from a direct
float64 -> float16 rounding (about 1 entry in 5,000, by one float16 ulp). Negative positions (motion frames) use the complex conjugate, as officially.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

THETA = 10000.0
_DIGIT_BITS = 8
_LEVELS = 4  # 4 base-256 digits cover every int32 position


def axis_pairs(head_dim: int) -> tuple[int, int, int]:
    """Complex pairs per head given to (time, height, width): 22/21/21 at head_dim 128, 6/5/5 at 32."""
    c = head_dim // 2
    return c - 2 * (c // 3), c // 3, c // 3


def rope_freqs(pairs: int) -> np.ndarray:
    """w_j = theta^(-2j / (2 pairs)), float64, as `rope_params` builds them."""
    return 1.0 / np.power(THETA, np.arange(0, 2 * pairs, 2, dtype=np.float64) / (2 * pairs))


@functools.lru_cache(maxsize=None)
def _digit_tables(freqs: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin of digit * 256**level * w_j, [levels, 256, len(freqs)] float32, computed in float64."""
    w = np.asarray(freqs, dtype=np.float64)
    digits = np.arange(2 ** _DIGIT_BITS, dtype=np.float64)
    scale = np.float64(2 ** _DIGIT_BITS) ** np.arange(_LEVELS, dtype=np.float64)
    angle = scale[:, None, None] * digits[None, :, None] * w[None, None, :]
    return np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)


def int_phase_cos_sin(pos, freqs: np.ndarray):
    """cos, sin of pos * w for int32 `pos` [...] and float64 frequencies w [n] -> two [..., n] float32 arrays."""
    pos = jnp.asarray(pos, jnp.int32)
    cos_t, sin_t = (jnp.asarray(t) for t in _digit_tables(tuple(float(f) for f in freqs)))
    mag = jnp.abs(pos)
    c = s = None
    for level in range(_LEVELS):
        d = (mag >> (_DIGIT_BITS * level)) & (2 ** _DIGIT_BITS - 1)
        cl, sl = cos_t[level][d], sin_t[level][d]
        if c is None:
            c, s = cl, sl
        else:
            c, s = c * cl - s * sl, c * sl + s * cl
    s = jnp.where((pos < 0)[..., None], -s, s)
    return c, s


def axis_cos_sin(pos, pairs: int):
    """cos, sin of pos * w_j for one RoPE axis with `pairs` frequencies (not yet rounded to float16)."""
    return int_phase_cos_sin(pos, rope_freqs(pairs))


def token_table(t_pos, h_pos, w_pos, head_dim: int):
    """Per-token cos/sin [L, head_dim/2] from per-token (t, h, w) integer positions, rounded to float16 as officially."""
    pt, ph, pw = axis_pairs(head_dim)
    parts = [axis_cos_sin(t_pos, pt), axis_cos_sin(h_pos, ph), axis_cos_sin(w_pos, pw)]
    cos = jnp.concatenate([p[0] for p in parts], axis=-1)
    sin = jnp.concatenate([p[1] for p in parts], axis=-1)
    return (cos.astype(jnp.float16).astype(jnp.float32), sin.astype(jnp.float16).astype(jnp.float32))


def apply(x, table):
    """Rotates interleaved pairs (2k, 2k+1) of x [..., L, heads, head_dim] by table [L, head_dim/2]; float32 out."""
    cos, sin = table
    cos = cos[:, None, :]
    sin = sin[:, None, :]
    x = x.astype(jnp.float32)
    a, b = x[..., 0::2], x[..., 1::2]
    out = jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1)
    return out.reshape(x.shape)


def grid_positions(frames, h: int, w: int):
    """(t, h, w) positions of tokens of a full grid, flattened (f, h, w) row-major; `frames` [F] int positions."""
    frames = jnp.asarray(frames, jnp.int32)
    f = frames.shape[0]
    t_pos = jnp.broadcast_to(frames[:, None, None], (f, h, w)).reshape(-1)
    h_pos = jnp.broadcast_to(jnp.arange(h, dtype=jnp.int32)[None, :, None], (f, h, w)).reshape(-1)
    w_pos = jnp.broadcast_to(jnp.arange(w, dtype=jnp.int32)[None, None, :], (f, h, w)).reshape(-1)
    return t_pos, h_pos, w_pos


def sampled_grid_positions(t_values, h_range: int, w_range: int, h_tokens: int, w_tokens: int):
    """Positions of a down-sampled token grid, as `rope_precompute` samples them with np.linspace(...).astype(int).

    Static (numpy): the FramePack motion groups cover a (h_range, w_range) position range with fewer tokens.
    """
    h_sam = np.linspace(0, h_range - 1, h_tokens).astype(int)
    w_sam = np.linspace(0, w_range - 1, w_tokens).astype(int)
    t_values = np.asarray(t_values, dtype=np.int64)
    t, hh, ww = np.meshgrid(t_values, h_sam, w_sam, indexing="ij")
    return t.reshape(-1), hh.reshape(-1), ww.reshape(-1)
