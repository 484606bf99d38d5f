"""The Wan2.1 video VAE (architecture.md section 6) in Flax NNX, with a streaming decoder whose cache is a pytree.

Layout. Inside, every activation is channels-last, `[B, T, H, W, C]`, and a causal 3x3x3 convolution is a few 2-D
convolutions over frames. On chunks of 4 or 2 frames (every latent after a stream's first, at the resolutions where
nearly all the work is) it runs as Winograd F(4,3) / F(2,3) along time: 6 frame convolutions for 4 output frames
instead of 12. On single frames the three time taps are stacked along channels into one 2-D convolution. A nearest 2x
upsampling followed by a 3x3 convolution is computed at the low resolution as four 2x2 phase convolutions. At the
API (`encode`, `decode`, `stream_decode`, `VAE`) videos and latents use the official layout: `[C, T, H, W]`, or
`[B, C, T, H, W]` with a batch axis; videos are in [-1, 1]; latents are the normalised ones the DiT sees,
`(mu - mean) / std` with the 16 official constants.

Causality. A causal convolution sees its input stream left-padded with two zero frames. Carrying the last two input
frames of every such convolution from one call to the next (`DecodeCache`, zeros at the start of a stream) makes
decoding chunk by chunk equal to decoding everything at once, which is what the official `stream_decode` relies
on. The official code grows its cache from `None` to one frame to two; zeros are the same arithmetic.

The first latent frame of a stream is special in the official decoder: the two `upsample3d` blocks mark their cache
`'Rep'` and skip their time convolution, so that latent becomes 1 video frame instead of 4, and the next latent
meets a zero-padded time convolution. Here that is the static flag `DecodeCache.started`: a stream's first call
decodes latent 0 with a jitted program of its own, then the other latents with a second one, a `lax.scan` over
latent frames whose carry is the cache; later calls run the scan only. Both have static shapes, so in the TPP
pattern (7 priming latents, then blocks of 3) the block decode compiles on the first block and never again.
The encoder mirrors this: frame 0 alone (its `downsample3d` blocks pass it through and keep it as their cache), then
a scan over chunks of 4 frames.

Precision: RMS norms, the attention softmax and the Winograd transforms in float32, convolutions in `dtype`
(bfloat16 on accelerators, as LiveAvatar runs the VAE; float32 for parity). Below float32 the time tiles are capped
at F(2,3), whose transforms only add and halve.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax import lax

# `Wan2_1_VAE.__init__`: per-channel statistics of the 16 latent channels.
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)

CACHE_T = 2  # frames a causal 3-tap convolution carries between chunks
_CONV_DIMS = ("NHWC", "HWIO", "NHWC")


@dataclass(frozen=True)
class VAEConfig:
    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD
    # Not architecture: the largest Winograd tile F(m, 3) the causal convs may use along time (4, 2, or 1 = direct).
    # Below float32 it is capped at 2, whose transforms are exact in any dtype.
    winograd_time_tile: int = 4

    def __post_init__(self):
        if self.winograd_time_tile not in (1, 2, 4):
            raise ValueError(f"winograd_time_tile must be 1, 2 or 4, got {self.winograd_time_tile}")
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"temporal_downsample needs {len(self.dim_mult) - 1} entries (one per resolution "
                             f"change), got {len(self.temporal_downsample)}")
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(f"latents_mean/latents_std need z_dim={self.z_dim} values each, got "
                             f"{len(self.latents_mean)}/{len(self.latents_std)}")

    @property
    def spatial_stride(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_stride(self) -> int:
        return 2 ** sum(bool(t) for t in self.temporal_downsample)

    @classmethod
    def from_kwargs(cls, kwargs: Mapping) -> "VAEConfig":
        """From the official `WanVAE_(...)` constructor kwargs (e.g. a fixture manifest's `constructor_kwargs`).

        `temperal_downsample` (the official spelling) is accepted; `dropout` is a training knob and is ignored.
        """
        kw = dict(kwargs)
        kw.pop("dropout", None)
        if "temperal_downsample" in kw:
            kw["temporal_downsample"] = kw.pop("temperal_downsample")
        return cls.from_config(kw)

    @classmethod
    def from_config(cls, config) -> "VAEConfig":
        """From a mapping or an ml-collections ConfigDict; keys that are not fields are an error."""
        data = dict(config.to_dict() if hasattr(config, "to_dict") else config)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown VAEConfig field(s): {', '.join(unknown)}")
        for key in ("dim_mult", "attn_scales", "latents_mean", "latents_std"):
            if key in data:
                data[key] = tuple(data[key])
        if "temporal_downsample" in data:
            data["temporal_downsample"] = tuple(bool(t) for t in data["temporal_downsample"])
        return cls(**data)


WAN21_VAE = VAEConfig()


# ---------------------------------------------------------------------------------------------------------------
# Convolution kernels in the layouts the official ones are converted to (see weights/vae_keys.py).

def _torch_default_init(key, shape, dtype, fan_in):
    # PyTorch's default conv init (kaiming-uniform with a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


def _fold_time(xs: jax.Array, taps: int, stride: int) -> jax.Array:
    """[B, T, H, W, C] -> [B, T', H, W, taps*C]: output frame j gets input frames stride*j .. stride*j+taps-1."""
    t_out = (xs.shape[1] - taps) // stride + 1
    frames = [lax.slice_in_dim(xs, k, k + stride * (t_out - 1) + 1, stride, axis=1) for k in range(taps)]
    return frames[0] if taps == 1 else jnp.concatenate(frames, axis=-1)


def _conv2d(x: jax.Array, kernel: jax.Array, padding, stride: int = 1, out_dtype=None) -> jax.Array:
    """x [N, H, W, C] * kernel [kh, kw, C, O]; 1x1 kernels as a matmul (XLA's 1x1 convolution is slower)."""
    if kernel.shape[:2] == (1, 1) and stride == 1:
        return jnp.einsum("nhwc,co->nhwo", x, kernel[0, 0], preferred_element_type=out_dtype)
    padding = tuple(tuple(p) for p in padding)
    if jax.default_backend() == "cpu":
        return _conv2d_patch_grad(x, kernel, padding, stride, out_dtype)
    return _conv2d_xla(x, kernel, padding, stride, out_dtype)


def _conv2d_xla(x, kernel, padding, stride, out_dtype):
    return lax.conv_general_dilated(x, kernel, (stride, stride), padding, dimension_numbers=_CONV_DIMS,
                                    preferred_element_type=out_dtype)


# XLA:CPU computes a convolution's kernel gradient with its generic loop emitter, not a library kernel: at the tiny
# world's widths (4-32 channels) that was about two thirds of a VAE training step. As a matmul of the input's patches
# with the output gradient it runs on the matmul library instead (1.7-2.1x faster steps, `benchmarks.vae_train_step`).
# The forward stays XLA's convolution, and so does the input gradient of the strided (downsampling) convs.
@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv2d_patch_grad(x, kernel, padding, stride, out_dtype):
    return _conv2d_xla(x, kernel, padding, stride, out_dtype)


def _conv2d_patch_grad_fwd(x, kernel, padding, stride, out_dtype):
    return _conv2d_xla(x, kernel, padding, stride, out_dtype), (x, kernel)


def _conv2d_patch_grad_bwd(padding, stride, out_dtype, residuals, dy):
    x, kernel = residuals
    kh, kw, c, o = kernel.shape
    if stride == 1:
        # the input gradient as a forward convolution (flipped taps, in and out swapped): XLA's own transposed form
        # of it also fell to the loop emitter at some shapes (the decoder's one-frame, time-folded 96-channel convs)
        back_pad = tuple((k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip((kh, kw), padding))
        dx = _conv2d_xla(dy.astype(x.dtype), jnp.swapaxes(kernel[::-1, ::-1], 2, 3), back_pad, 1,
                         jnp.float32).astype(x.dtype)
    else:
        _, vjp_x = jax.vjp(lambda x: _conv2d_xla(x, kernel, padding, stride, out_dtype), x)
        (dx,) = vjp_x(dy)
    ho, wo = dy.shape[1:3]
    xp = jnp.pad(x, ((0, 0),) + padding + ((0, 0),))
    # tap (i, j) of output pixel (a, b) reads xp[stride a + i, stride b + j]; taps ordered like the kernel's (kh, kw)
    patches = jnp.concatenate(
        [lax.slice(xp, (0, i, j, 0), (xp.shape[0], i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, c),
                   (1, stride, stride, 1)) for i in range(kh) for j in range(kw)], axis=-1)
    dk = jnp.einsum("nhwk,nhwo->ko", patches, dy.astype(x.dtype), preferred_element_type=jnp.float32)
    return dx, dk.reshape(kh, kw, c, o).astype(kernel.dtype)


_conv2d_patch_grad.defvjp(_conv2d_patch_grad_fwd, _conv2d_patch_grad_bwd)


# Winograd F(m, 3) for the cross-correlation y[t] = sum_k g[k] x[t+k] (Lavin & Gray 2016): m outputs from m + 2
# inputs with m + 2 products instead of 3m. Along time each "product" is a whole 2-D convolution of a transformed
# frame with a transformed kernel, so a chunk of 4 frames costs 6 frame convolutions instead of 12.
_WINOGRAD_TIME = {
    2: (((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),                       # B^T (inputs)
        ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1)),                          # G (kernel)
        ((1, 1, 1, 0), (0, 1, -1, -1))),                                                    # A^T (outputs)
    4: (((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
         (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1)),
        ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
         (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1)),
        ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))),
}


def _combine(coefficients, arrays):
    """sum_i c_i * a_i over the non-zero coefficients, without multiplying by +-1."""
    out = None
    for c, a in zip(coefficients, arrays):
        if c == 0:
            continue
        if out is None:
            out = a if c == 1 else a * c
        elif c == 1:
            out = out + a
        elif c == -1:
            out = out - a
        else:
            out = out + a * c
    return out


def _time_tile(config: VAEConfig, dtype) -> int:
    return config.winograd_time_tile if jnp.dtype(dtype) == jnp.float32 else min(config.winograd_time_tile, 2)


def _per_frame(fn, x: jax.Array) -> jax.Array:
    b, t = x.shape[:2]
    y = fn(x.reshape((b * t,) + x.shape[2:]))
    return y.reshape((b, t) + y.shape[1:])


class CausalConv3d(nnx.Module):
    """`CausalConv3d`: zero (or cached) frames before the input in time, symmetric zero padding in space.

    kernel [kt, kh, kw, C_in, C_out]. With kt == 3 the call takes the `CACHE_T` frames that precede `x` in the stream
    and returns the frames that precede the next chunk; the time-strided downsampling conv is driven by `Resample`.
    """

    def __init__(self, in_dim: int, out_dim: int, kernel: Sequence[int], *, dtype, rngs: nnx.Rngs,
                 time_tile: int = 4):
        kt, kh, kw = kernel
        self.time_tile = time_tile
        fan_in = in_dim * kt * kh * kw
        self.kernel = nnx.Param(_torch_default_init(rngs.params(), (kt, kh, kw, in_dim, out_dim), dtype, fan_in))
        self.bias = nnx.Param(jnp.zeros((out_dim,), dtype))

    @property
    def taps(self) -> int:
        return self.kernel.shape[0]

    def _apply(self, xs: jax.Array, stride: int = 1) -> jax.Array:
        kt, kh, kw, ci, co = self.kernel.shape
        t_out = (xs.shape[1] - kt) // stride + 1
        if kt == 3 and stride == 1:
            for m in (4, 2):
                if m <= self.time_tile and t_out % m == 0:
                    return self._apply_winograd(xs, m)
        folded = _fold_time(xs, kt, stride)
        # Time taps outermost in the folded channels, matching the concatenation order of `_fold_time`.
        kernel = jnp.transpose(self.kernel[...], (1, 2, 0, 3, 4)).reshape(kh, kw, kt * ci, co)
        pad = ((kh // 2, kh // 2), (kw // 2, kw // 2))
        return _per_frame(lambda f: _conv2d(f, kernel, pad), folded) + self.bias[...]

    def _apply_winograd(self, xs: jax.Array, m: int) -> jax.Array:
        """The stride-1 3-tap conv over xs [B, T+2, H, W, C] as Winograd F(m, 3) tiles along time (m divides T).

        Transforms run in float32 (exact for m = 2); the frame convolutions in the activation dtype.
        """
        b_t, g_t, a_t = _WINOGRAD_TIME[m]
        _, kh, kw, _, co = self.kernel.shape
        b, t2, h, w, _ = xs.shape
        tiles = (t2 - 2) // m
        taps = [lax.slice_in_dim(xs, i, i + m * (tiles - 1) + 1, m, axis=1).astype(jnp.float32) for i in range(m + 2)]
        kernel = self.kernel[...].astype(jnp.float32)
        g = [kernel[k] for k in range(3)]
        pad = ((kh // 2, kh // 2), (kw // 2, kw // 2))
        products = []
        for row_b, row_g in zip(b_t, g_t):
            v = _combine(row_b, taps).astype(xs.dtype)
            u = _combine(row_g, g).astype(xs.dtype)
            products.append(_per_frame(lambda f, u=u: _conv2d(f, u, pad, out_dtype=jnp.float32), v))
        ys = [_combine(row_a, products) for row_a in a_t]  # each [B, tiles, H, W, O]: frame r of every tile
        y = jnp.stack(ys, axis=2).reshape(b, tiles * m, h, w, co)
        return y.astype(xs.dtype) + self.bias[...]

    def __call__(self, x: jax.Array, cache: jax.Array | None = None):
        """x [B, T, H, W, C] -> (y [B, T, H, W, O], new cache or None for a 1-tap conv)."""
        if self.taps == 1:
            return self._apply(x), None
        xs = jnp.concatenate([cache.astype(x.dtype), x], axis=1)
        return self._apply(xs), xs[:, -CACHE_T:]

    def init_cache(self, batch: int, h: int, w: int, dtype):
        if self.taps == 1:
            return None
        return jnp.zeros((batch, CACHE_T, h, w, self.kernel.shape[3]), dtype)


class Conv2d(nnx.Module):
    """A per-frame 2-D convolution, kernel [kh, kw, C_in, C_out]."""

    def __init__(self, in_dim: int, out_dim: int, size: int, *, dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(_torch_default_init(rngs.params(), (size, size, in_dim, out_dim), dtype,
                                                    in_dim * size * size))
        self.bias = nnx.Param(jnp.zeros((out_dim,), dtype))


class RMSNorm(nnx.Module):
    """`RMS_norm`: x / max(||x||_2, 1e-12) * sqrt(C) * gamma over the channel axis (F.normalize), in float32."""

    def __init__(self, dim: int, *, dtype):
        self.scale = nnx.Param(jnp.ones((dim,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True))
        y = x32 / jnp.maximum(norm, 1e-12) * math.sqrt(x.shape[-1]) * self.scale[...].astype(jnp.float32)
        return y.astype(x.dtype)


class ResidualBlock(nnx.Module):
    """RMS_norm -> SiLU -> CausalConv3d 3^3 -> RMS_norm -> SiLU -> (dropout) -> CausalConv3d 3^3, plus a shortcut."""

    def __init__(self, in_dim: int, out_dim: int, *, dtype, rngs: nnx.Rngs, time_tile: int = 4):
        self.norm1 = RMSNorm(in_dim, dtype=dtype)
        self.conv1 = CausalConv3d(in_dim, out_dim, (3, 3, 3), dtype=dtype, rngs=rngs, time_tile=time_tile)
        self.norm2 = RMSNorm(out_dim, dtype=dtype)
        self.conv2 = CausalConv3d(out_dim, out_dim, (3, 3, 3), dtype=dtype, rngs=rngs, time_tile=time_tile)
        self.shortcut = (CausalConv3d(in_dim, out_dim, (1, 1, 1), dtype=dtype, rngs=rngs)
                         if in_dim != out_dim else None)

    def __call__(self, x, cache, first: bool = False):
        del first  # a residual block treats the first chunk like any other
        h = x if self.shortcut is None else self.shortcut(x)[0]
        y, c1 = self.conv1(jax.nn.silu(self.norm1(x)), cache[0])
        y, c2 = self.conv2(jax.nn.silu(self.norm2(y)), cache[1])
        return y + h, (c1, c2)

    def init_cache(self, batch, h, w, dtype):
        return (self.conv1.init_cache(batch, h, w, dtype), self.conv2.init_cache(batch, h, w, dtype)), (h, w)


class AttentionBlock(nnx.Module):
    """Single-head self-attention over the h*w positions of each frame (the middle blocks), with a residual."""

    def __init__(self, dim: int, *, dtype, rngs: nnx.Rngs):
        self.norm = RMSNorm(dim, dtype=dtype)
        self.to_qkv = Conv2d(dim, 3 * dim, 1, dtype=dtype, rngs=rngs)
        self.proj = Conv2d(dim, dim, 1, dtype=dtype, rngs=rngs)

    def __call__(self, x, cache=None, first: bool = False):
        b, t, h, w, c = x.shape
        tokens = self.norm(x).reshape(b * t, h * w, c)
        qkv = jnp.einsum("nsc,cd->nsd", tokens, self.to_qkv.kernel[0, 0]) + self.to_qkv.bias[...]
        q, k, v = jnp.split(qkv, 3, axis=-1)
        logits = jnp.einsum("nqc,nkc->nqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(c)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("nqk,nkc->nqc", weights, v)
        out = jnp.einsum("nsc,cd->nsd", out, self.proj.kernel[0, 0]) + self.proj.bias[...]
        return x + out.reshape(b, t, h, w, c), cache

    def init_cache(self, batch, h, w, dtype):
        return None, (h, w)


def _upsample2x_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """conv3x3(nearest_2x(x), padding 1) computed at the input resolution, x [N, H, W, C] -> [N, 2H, 2W, O].

    Output pixel (2i+a, 2j+b) only sees input rows i-1..i (a=0) or i..i+1 (a=1), and the same for columns, so each of
    the four phases is a 2x2 convolution with summed taps: 16 instead of 36 multiply-adds per input pixel.
    """
    k = kernel.astype(jnp.float32)  # the summed taps are rounded once, to the activation dtype

    def phase_taps(k, axis):
        k0, k1, k2 = (lax.index_in_dim(k, i, axis, keepdims=False) for i in range(3))
        return (jnp.stack([k0, k1 + k2], axis), ((1, 0))), (jnp.stack([k0 + k1, k2], axis), (0, 1))

    rows = []
    for k_row, pad_row in phase_taps(k, 0):
        cols = [_conv2d(x, k_rc.astype(x.dtype), (pad_row, pad_col)) for k_rc, pad_col in phase_taps(k_row, 1)]
        n, h, w, o = cols[0].shape
        rows.append(jnp.stack(cols, axis=3).reshape(n, h, 2 * w, o))
    n, h, w2, o = rows[0].shape
    return jnp.stack(rows, axis=2).reshape(n, 2 * h, w2, o)


class Resample(nnx.Module):
    """`Resample`: 2x spatial up/down sampling per frame, with a 2x time change for the 3d modes.

    upsample3d: a (3,1,1) causal conv C -> 2C whose two halves become two consecutive frames, then nearest 2x and a
    3x3 conv C -> C/2; skipped on the first latent of a stream (the official 'Rep' cache). downsample3d: a zero pad
    (right, bottom) and a stride-2 3x3 conv, then a (3,1,1) conv of stride 2 in time over [last frame of the previous
    chunk, this chunk]; the first chunk passes through unchanged.
    """

    def __init__(self, dim: int, mode: str, *, dtype, rngs: nnx.Rngs, time_tile: int = 4):
        if mode not in ("upsample2d", "upsample3d", "downsample2d", "downsample3d"):
            raise ValueError(f"unknown Resample mode {mode!r}")
        self.mode = mode
        up = mode.startswith("up")
        self.resample = Conv2d(dim, dim // 2 if up else dim, 3, dtype=dtype, rngs=rngs)
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), dtype=dtype, rngs=rngs, time_tile=time_tile)
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), dtype=dtype, rngs=rngs)
        else:
            self.time_conv = None

    def __call__(self, x, cache, first: bool = False):
        kernel, bias = self.resample.kernel[...], self.resample.bias[...]
        if self.mode == "upsample3d" and not first:
            y, cache = self.time_conv(x, cache)
            b, t, h, w, c2 = y.shape
            # channels [0, C) are the earlier of the two frames, [C, 2C) the later one
            x = y.reshape(b, t, h, w, 2, c2 // 2).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c2 // 2)
        if self.mode.startswith("up"):
            return _per_frame(lambda f: _upsample2x_conv3x3(f, kernel), x) + bias, cache
        y = _per_frame(lambda f: _conv2d(f, kernel, ((0, 1), (0, 1)), stride=2), x) + bias
        if self.mode == "downsample3d":
            if first:
                cache = y[:, -1:]
            else:
                y, cache = self.time_conv._apply(jnp.concatenate([cache.astype(y.dtype), y], axis=1), 2), y[:, -1:]
        return y, cache

    def init_cache(self, batch, h, w, dtype):
        c = self.resample.kernel.shape[2]
        if self.mode == "upsample3d":
            return jnp.zeros((batch, CACHE_T, h, w, c), dtype), (2 * h, 2 * w)
        if self.mode == "downsample3d":
            return jnp.zeros((batch, 1, h // 2, w // 2, c), dtype), (h // 2, w // 2)
        return None, ((2 * h, 2 * w) if self.mode == "upsample2d" else (h // 2, w // 2))


def _run_blocks(blocks, x, caches, first):
    new = []
    for block, cache in zip(blocks, caches):
        x, cache = block(x, cache, first)
        new.append(cache)
    return x, tuple(new)


def _init_block_caches(blocks, batch, h, w, dtype):
    caches = []
    for block in blocks:
        cache, (h, w) = block.init_cache(batch, h, w, dtype)
        caches.append(cache)
    return tuple(caches), (h, w)


class Encoder3d(nnx.Module):
    def __init__(self, c: VAEConfig, *, dtype, rngs: nnx.Rngs):
        tile = _time_tile(c, dtype)
        dims = [c.dim * u for u in (1,) + tuple(c.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], (3, 3, 3), dtype=dtype, rngs=rngs, time_tile=tile)
        blocks, scale = [], 1.0
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(c.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim, dtype=dtype, rngs=rngs, time_tile=tile))
                if scale in c.attn_scales:
                    blocks.append(AttentionBlock(out_dim, dtype=dtype, rngs=rngs))
                in_dim = out_dim
            if i != len(c.dim_mult) - 1:
                mode = "downsample3d" if c.temporal_downsample[i] else "downsample2d"
                blocks.append(Resample(out_dim, mode, dtype=dtype, rngs=rngs, time_tile=tile))
                scale /= 2.0
        self.downsamples = nnx.List(blocks)
        self.middle = nnx.List([ResidualBlock(out_dim, out_dim, dtype=dtype, rngs=rngs, time_tile=tile),
                                AttentionBlock(out_dim, dtype=dtype, rngs=rngs),
                                ResidualBlock(out_dim, out_dim, dtype=dtype, rngs=rngs, time_tile=tile)])
        self.head_norm = RMSNorm(out_dim, dtype=dtype)
        self.head_conv = CausalConv3d(out_dim, 2 * c.z_dim, (3, 3, 3), dtype=dtype, rngs=rngs, time_tile=tile)

    def __call__(self, x, cache: dict, first: bool):
        x, conv1 = self.conv1(x, cache["conv1"])
        x, downsamples = _run_blocks(self.downsamples, x, cache["downsamples"], first)
        x, middle = _run_blocks(self.middle, x, cache["middle"], first)
        x, head = self.head_conv(jax.nn.silu(self.head_norm(x)), cache["head"])
        return x, {"conv1": conv1, "downsamples": downsamples, "middle": middle, "head": head}

    def init_cache(self, batch, h, w, dtype) -> dict:
        conv1 = self.conv1.init_cache(batch, h, w, dtype)
        downsamples, (h, w) = _init_block_caches(self.downsamples, batch, h, w, dtype)
        middle, (h, w) = _init_block_caches(self.middle, batch, h, w, dtype)
        return {"conv1": conv1, "downsamples": downsamples, "middle": middle,
                "head": self.head_conv.init_cache(batch, h, w, dtype)}


class Decoder3d(nnx.Module):
    def __init__(self, c: VAEConfig, *, dtype, rngs: nnx.Rngs):
        tile = _time_tile(c, dtype)
        mult = tuple(c.dim_mult)
        dims = [c.dim * u for u in (mult[-1],) + mult[::-1]]
        temporal_upsample = tuple(c.temporal_downsample)[::-1]
        scale = 1.0 / 2 ** (len(mult) - 2)
        self.conv1 = CausalConv3d(c.z_dim, dims[0], (3, 3, 3), dtype=dtype, rngs=rngs, time_tile=tile)
        self.middle = nnx.List([ResidualBlock(dims[0], dims[0], dtype=dtype, rngs=rngs, time_tile=tile),
                                AttentionBlock(dims[0], dtype=dtype, rngs=rngs),
                                ResidualBlock(dims[0], dims[0], dtype=dtype, rngs=rngs, time_tile=tile)])
        blocks = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # every upsampling conv halves the channels
            for _ in range(c.num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim, dtype=dtype, rngs=rngs, time_tile=tile))
                if scale in c.attn_scales:
                    blocks.append(AttentionBlock(out_dim, dtype=dtype, rngs=rngs))
                in_dim = out_dim
            if i != len(mult) - 1:
                mode = "upsample3d" if temporal_upsample[i] else "upsample2d"
                blocks.append(Resample(out_dim, mode, dtype=dtype, rngs=rngs, time_tile=tile))
                scale *= 2.0
        self.upsamples = nnx.List(blocks)
        self.head_norm = RMSNorm(out_dim, dtype=dtype)
        self.head_conv = CausalConv3d(out_dim, 3, (3, 3, 3), dtype=dtype, rngs=rngs, time_tile=tile)

    def __call__(self, x, cache: dict, first: bool):
        """One latent frame x [B, 1, h, w, z] -> video frames [B, 1 if first else 4, H, W, 3] and the new cache."""
        x, conv1 = self.conv1(x, cache["conv1"])
        x, middle = _run_blocks(self.middle, x, cache["middle"], first)
        x, upsamples = _run_blocks(self.upsamples, x, cache["upsamples"], first)
        x, head = self.head_conv(jax.nn.silu(self.head_norm(x)), cache["head"])
        return x, {"conv1": conv1, "middle": middle, "upsamples": upsamples, "head": head}

    def init_cache(self, batch, h, w, dtype) -> dict:
        conv1 = self.conv1.init_cache(batch, h, w, dtype)
        middle, (h, w) = _init_block_caches(self.middle, batch, h, w, dtype)
        upsamples, (h, w) = _init_block_caches(self.upsamples, batch, h, w, dtype)
        return {"conv1": conv1, "middle": middle, "upsamples": upsamples,
                "head": self.head_conv.init_cache(batch, h, w, dtype)}


class WanVAE(nnx.Module):
    """`WanVAE_`: encoder, the 1x1x1 `conv1` (-> mu, log_var) and `conv2` (latent -> decoder), decoder.

    Methods take and return channels-last arrays; the module-level functions below give the official layout.
    """

    def __init__(self, config: VAEConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.encoder = Encoder3d(config, dtype=dtype, rngs=rngs)
        self.conv1 = CausalConv3d(2 * config.z_dim, 2 * config.z_dim, (1, 1, 1), dtype=dtype, rngs=rngs)
        self.conv2 = CausalConv3d(config.z_dim, config.z_dim, (1, 1, 1), dtype=dtype, rngs=rngs)
        self.decoder = Decoder3d(config, dtype=dtype, rngs=rngs)

    def _stats(self):
        mean = jnp.asarray(self.config.latents_mean, jnp.float32)
        inv_std = 1.0 / jnp.asarray(self.config.latents_std, jnp.float32)
        return mean, inv_std

    def encode(self, video: jax.Array) -> jax.Array:
        """video [B, T, H, W, 3] -> normalised mu [B, 1 + (T-1)//4, H/8, W/8, z] (trailing frames are dropped)."""
        mu, _ = self.moments(video)
        mean, inv_std = self._stats()
        return (mu - mean) * inv_std

    def moments(self, video: jax.Array) -> tuple[jax.Array, jax.Array]:
        """video [B, T, H, W, 3] -> the posterior's raw (unnormalised) mu and log_var, float32 [B, n, h, w, z] each;
        training samples from them, `encode` normalises mu."""
        b, t, h, w, _ = video.shape
        n_chunks = (t - 1) // 4
        dtype = self.conv1.kernel.dtype
        video = video.astype(dtype)
        cache = self.encoder.init_cache(b, h, w, dtype)
        first, cache = self.encoder(video[:, :1], cache, first=True)
        chunks = video[:, 1:1 + 4 * n_chunks].reshape(b, n_chunks, 4, h, w, 3).swapaxes(0, 1)

        def step(cache, chunk):
            out, cache = self.encoder(chunk, cache, first=False)
            return cache, out

        _, rest = lax.scan(step, cache, chunks)
        rest = rest.swapaxes(0, 1).reshape((b, -1) + rest.shape[3:])
        out = jnp.concatenate([first, rest], axis=1)
        moments = self.conv1(out)[0].astype(jnp.float32)
        return moments[..., :self.config.z_dim], moments[..., self.config.z_dim:]

    def decode_first_latent(self, latent: jax.Array, feats: dict) -> tuple[jax.Array, dict]:
        """The first latent of a stream, [B, 1, h, w, z] (normalised) -> (1 video frame [B, 1, H, W, 3], feats)."""
        return self.decoder(self._decoder_input(latent), feats, first=True)

    def decode_latents(self, latents: jax.Array, feats: dict) -> tuple[jax.Array, dict]:
        """Latents [B, n, h, w, z] after a stream's first -> (4n video frames [B, 4n, H, W, 3], feats), by a scan."""
        def step(feats, latent):
            frames, feats = self.decoder(latent[:, None], feats, first=False)
            return feats, frames

        feats, frames = lax.scan(step, feats, self._decoder_input(latents).swapaxes(0, 1))
        frames = frames.swapaxes(0, 1)
        return frames.reshape((frames.shape[0], -1) + frames.shape[3:]), feats

    def _decoder_input(self, latents):
        mean, inv_std = self._stats()
        # The official wrapper passes 1/std and divides by it: z / (1/std) + mean.
        z = (latents.astype(jnp.float32) / inv_std + mean).astype(self.conv2.kernel.dtype)
        return self.conv2(z)[0]


def random_vae(config: VAEConfig, seed: int = 0, dtype=jnp.float32) -> WanVAE:
    """A WanVAE with PyTorch-default-like random weights (U(+-1/sqrt(fan_in)) kernels, zero biases, unit gains),
    drawn on the host with numpy: building with `nnx.Rngs` draws every tensor eagerly and compiles a sampler per
    distinct shape, which takes minutes for the real model on a small CPU."""
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: WanVAE(config, dtype=dtype, rngs=nnx.Rngs(0))))

    def draw(path, leaf):
        name = getattr(path[-1], "key", path[-1])
        if name == "scale":
            return jnp.ones(leaf.shape, leaf.dtype)
        if name == "bias":
            return jnp.zeros(leaf.shape, leaf.dtype)
        bound = 1.0 / math.sqrt(math.prod(leaf.shape[:-1]))  # every axis but the output channels is fan-in
        return jnp.asarray(rng.uniform(-bound, bound, leaf.shape).astype(np.float32), leaf.dtype)

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state)))
    return nnx.merge(graphdef, state)


@struct.dataclass
class DecodeCache:
    """The streaming decoder's state: for every causal conv of the decoder, the last `CACHE_T` frames of its input
    (channels-last [B, 2, h, w, C], zeros before the stream starts), and whether the stream has started (static)."""

    feats: dict
    started: bool = struct.field(pytree_node=False, default=False)

    @property
    def batch_hw(self) -> tuple[int, int, int]:
        b, _, h, w, _ = self.feats["conv1"].shape
        return b, h, w


# ---------------------------------------------------------------------------------------------------------------
# Functional API in the official layout. `params_or_model` is a `WanVAE`, its `nnx.split` pair, or a `VAE`.

def _split(params_or_model):
    """(graphdef, state, config) of a `VAE`, a `WanVAE` or a `(graphdef, state)` pair."""
    if isinstance(params_or_model, VAE):
        return params_or_model.graphdef, params_or_model.state, params_or_model.config
    if isinstance(params_or_model, WanVAE):
        return (*nnx.split(params_or_model), params_or_model.config)
    graphdef, state = params_or_model
    return graphdef, state, nnx.merge(graphdef, state).config


def _param_dtype(state):
    return jax.tree.leaves(state)[0].dtype


def _to_channels_last(x: jax.Array, name: str) -> tuple[jax.Array, bool]:
    if x.ndim == 4:
        return jnp.moveaxis(x, 0, -1)[None], False
    if x.ndim == 5:
        return jnp.moveaxis(x, 1, -1), True
    raise ValueError(f"{name} must be [C, T, H, W] or [B, C, T, H, W], got shape {tuple(x.shape)}")


def _to_official(x: jax.Array, batched: bool) -> jax.Array:
    x = jnp.moveaxis(x, -1, 1)
    return x if batched else x[0]


def init_decode_cache(config: VAEConfig, batch: int, h: int, w: int, dtype=jnp.float32) -> DecodeCache:
    """An empty decoder cache for a stream of latents of `batch` x [z, *, h, w] (before the stream's first call)."""
    decoder = nnx.eval_shape(lambda: Decoder3d(config, dtype=dtype, rngs=nnx.Rngs(0)))
    return DecodeCache(feats=decoder.init_cache(batch, h, w, dtype), started=False)


@partial(jax.jit, static_argnames=("graphdef",))
def _encode_jit(graphdef, state, video):
    return nnx.merge(graphdef, state).encode(video)


@partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("feats",))
def _decode_first_jit(graphdef, state, latent, feats):
    frames, feats = nnx.merge(graphdef, state).decode_first_latent(latent, feats)
    return frames.astype(jnp.float32), feats


@partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("feats",))
def _decode_latents_jit(graphdef, state, latents, feats):
    frames, feats = nnx.merge(graphdef, state).decode_latents(latents, feats)
    return frames.astype(jnp.float32), feats


def encode(params_or_model, video: jax.Array) -> jax.Array:
    """video [3, T, H, W] (or [B, 3, T, H, W]) in [-1, 1] -> normalised latents [z, 1 + (T-1)//4, H/8, W/8].

    The official chunking: frame 0, then chunks of 4 frames; frames after the last whole chunk are dropped.
    """
    graphdef, state, config = _split(params_or_model)
    x, batched = _to_channels_last(jnp.asarray(video), "video")
    if x.shape[-1] != 3:
        raise ValueError(f"video must have 3 channels, got shape {tuple(video.shape)}")
    stride = config.spatial_stride
    if x.shape[2] % stride or x.shape[3] % stride:
        raise ValueError(f"video height and width must be multiples of {stride}, got {x.shape[2]}x{x.shape[3]}")
    return _to_official(_encode_jit(graphdef, state, x), batched)


def stream_decode(params_or_model, latents: jax.Array, cache: DecodeCache, *, clamp: bool = True
                  ) -> tuple[jax.Array, DecodeCache]:
    """Decodes the next latents of a stream: [z, n, h, w] (or [B, z, n, h, w]) -> (video [3, T, 8h, 8w], cache).

    T = 1 + 4(n-1) on the stream's first call (an empty cache), 4n on every later call. The input cache is donated:
    use the returned one. `clamp` clips to [-1, 1] like the official `WanVAE.stream_decode`.
    """
    graphdef, state, _ = _split(params_or_model)
    x, batched = _to_channels_last(jnp.asarray(latents), "latents")
    b, _, h, w, z = x.shape
    if (b, h, w) != cache.batch_hw or z != cache.feats["conv1"].shape[-1]:
        raise ValueError(f"latents of shape {tuple(latents.shape)} do not continue a stream of batch "
                         f"{cache.batch_hw[0]}, z_dim {cache.feats['conv1'].shape[-1]} at {cache.batch_hw[1:]}")
    if x.shape[1] == 0:
        raise ValueError("stream_decode needs at least one latent frame")
    feats, pieces = cache.feats, []
    if not cache.started:
        first, feats = _decode_first_jit(graphdef, state, x[:, :1], feats)
        pieces.append(first)
        x = x[:, 1:]
    if x.shape[1]:
        frames, feats = _decode_latents_jit(graphdef, state, x, feats)
        pieces.append(frames)
    video = pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=1)
    if clamp:
        video = jnp.clip(video, -1.0, 1.0)
    return _to_official(video, batched), DecodeCache(feats=feats, started=True)


def decode(params_or_model, latents: jax.Array, *, clamp: bool = True) -> jax.Array:
    """Latents [z, n, h, w] (or batched) -> video [3, 1 + 4(n-1), 8h, 8w]: one stream from an empty cache."""
    graphdef, state, config = _split(params_or_model)
    x = jnp.asarray(latents)
    b, h, w = (1,) + x.shape[-2:] if x.ndim == 4 else (x.shape[0],) + x.shape[-2:]
    cache = init_decode_cache(config, b, h, w, _param_dtype(state))
    return stream_decode((graphdef, state), x, cache, clamp=clamp)[0]


class VAE:
    """The model split once, with the official-layout API: encode(video) -> latents, decode(latents) -> video,
    and the streaming decoder (`init_decode_cache` / `stream_decode`)."""

    def __init__(self, model: WanVAE):
        self.config = model.config
        self.dtype = model.conv2.kernel.dtype
        self.graphdef, self.state = nnx.split(model)

    def encode(self, video: jax.Array) -> jax.Array:
        return encode(self, video)

    def decode(self, latents: jax.Array, *, clamp: bool = True) -> jax.Array:
        return decode(self, latents, clamp=clamp)

    def init_decode_cache(self, batch: int, h: int, w: int) -> DecodeCache:
        return init_decode_cache(self.config, batch, h, w, self.dtype)

    def stream_decode(self, latents: jax.Array, cache: DecodeCache, *, clamp: bool = True):
        return stream_decode(self, latents, cache, clamp=clamp)
