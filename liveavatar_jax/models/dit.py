"""The causal Wan2.2-S2V DiT with LiveAvatar's streaming forward, in Flax NNX.

Parts, in the order a token meets them (architecture.md sections 1-3):
  patch / cond / text / time embeddings -> `num_layers` transformer blocks (stacked parameters, `lax.scan`), each with
  self-attention over [sink | ring cache | block], text cross-attention and a modulated FFN; the audio injection after
  the configured layers -> the head -> unpatchify to a velocity [B, 16, F, h, w].

Two entry points, both pure given the module state, both jit cleanly:
  * `sink_prefill`: reference + FramePack motion tokens at t=0; returns their un-rotated per-layer K/V (`SinkCache`).
  * `block_forward`: one block of noisy latents at one denoising step; writes the block's rotated K/V into the
    step's `RingCache` at its frame offset and attends to the ring plus the sink re-rotated at the rolling distance.

Precision follows the official code: modulation, gates, the residual inside a block, norm statistics, time and
audio encoders and the head in float32; matmuls and the residual between blocks in `dtype` (bfloat16 in
production); RoPE cos/sin rounded to float16; the text cross-attention pre-norm input rounded to bfloat16.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from liveavatar_jax.models import rope
from liveavatar_jax.models.attention import attention
from liveavatar_jax.streaming.caches import RingCache, SinkCache


TEXT_KEY_BUCKET = 32   # text keys kept per prompt are a multiple of this (see CausalS2VDiT.text_kv)

# Per-layer rematerialisation policies for training (`remat=` of the forwards); inference runs without.
REMAT_POLICIES = {
    "none": None,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}


def remat_policy(remat: str | None):
    if remat is not None and remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {remat!r}; choose one of {tuple(REMAT_POLICIES)}")
    return None if remat is None else REMAT_POLICIES[remat]


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    dim: int = 5120
    ffn_dim: int = 13824
    num_heads: int = 40
    num_layers: int = 40
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    text_len: int = 512
    freq_dim: int = 256
    eps: float = 1e-6
    patch_size: tuple[int, int, int] = (1, 2, 2)
    cond_dim: int = 16
    audio_dim: int = 1024
    audio_layers: int = 25               # wav2vec2 hidden states mixed by the causal audio encoder
    num_audio_token: int = 4
    audio_inject_layers: tuple[int, ...] = (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39)
    motion_frames: tuple[int, int] = (73, 19)   # (video frames, latent frames) of the motion context
    zip_frame_buckets: tuple[int, int, int] = (1, 2, 16)
    sink_position: int = 30              # temporal RoPE index of the reference frame at prefill
    dtype: str = "bfloat16"

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    @classmethod
    def from_official(cls, kwargs: Mapping, dtype: str = "float32") -> "DiTConfig":
        """From the official constructor kwargs (a fixture manifest or a config.json); unknown keys are ignored."""
        unsupported = {"enable_motioner": True, "enable_framepack": False, "enable_adain": False,
                       "zero_timestep": False, "slide_motion_frames": True, "add_last_motion": False}
        for key, bad in unsupported.items():
            if key in kwargs and bool(kwargs[key]) == bad:
                raise ValueError(f"unsupported S2V option {key}={kwargs[key]!r} (LiveAvatar uses the opposite)")
        if tuple(kwargs.get("zip_frame_buckets", (1, 2, 16))) != (1, 2, 16):
            raise ValueError("only the official FramePack buckets (1, 2, 16) are supported")
        if kwargs.get("adain_mode", "attn_norm") != "attn_norm":
            raise ValueError(f"unsupported adain_mode {kwargs['adain_mode']!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        out = {k: kwargs[k] for k in fields if k in kwargs}
        for k in ("patch_size", "audio_inject_layers", "motion_frames", "zip_frame_buckets"):
            if k in out:
                out[k] = tuple(out[k])
        return cls(**out, dtype=dtype)

    def validate(self) -> None:
        if self.dim % self.num_heads or self.head_dim % 2:
            raise ValueError(f"dim {self.dim} must split into {self.num_heads} heads of even size")
        layers = sorted(set(self.audio_inject_layers))
        if any(not 0 <= i < self.num_layers for i in layers):
            raise ValueError(f"audio_inject_layers {self.audio_inject_layers} outside 0..{self.num_layers - 1}")
        # The official code finds injection blocks by substring ('transformer_blocks.1' also hits block 12);
        # refuse layer lists where that would differ from exact matching rather than silently diverging.
        for a in layers:
            hits = [b for b in range(self.num_layers) if f"transformer_blocks.{a}" in f"root.transformer_blocks.{b}"]
            if hits != [a]:
                raise ValueError(f"audio_inject_layers {self.audio_inject_layers}: layer {a} would also match "
                                 f"blocks {hits} in the official code")


# ----------------------------------------------------------------------------------------------- building blocks

class Dense(nnx.Module):
    """A Linear layer whose matmul runs in a chosen dtype (the official autocast regions pick float32)."""

    def __init__(self, din: int, dout: int, *, dtype, rngs: nnx.Rngs, bias: bool = True):
        init = nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(init(rngs.params(), (din, dout), dtype))
        self.bias = nnx.Param(jnp.zeros((dout,), dtype)) if bias else None
        self.dtype = dtype

    def __call__(self, x, dtype=None):
        dt = dtype or self.dtype
        y = jnp.dot(x.astype(dt), self.kernel[...].astype(dt), preferred_element_type=jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(dt)


class PatchEmbed(nnx.Module):
    """Conv3d with kernel == stride, as a reshape and one matmul; trailing rows that do not fill a patch are dropped,
    like PyTorch's floor."""

    def __init__(self, din: int, dout: int, patch: Sequence[int], *, dtype, rngs: nnx.Rngs):
        self.patch = tuple(patch)
        init = nnx.initializers.lecun_normal(in_axis=(0, 1, 2, 3), out_axis=4)
        self.kernel = nnx.Param(init(rngs.params(), (*self.patch, din, dout), dtype))
        self.bias = nnx.Param(jnp.zeros((dout,), dtype))
        self.dtype = dtype

    def __call__(self, x):
        """x [B, C, F, H, W] -> tokens [B, f, h, w, D]."""
        pt, ph, pw = self.patch
        b, c, f, h, w = x.shape
        f, h, w = f // pt, h // ph, w // pw
        x = x[:, :, : f * pt, : h * ph, : w * pw].reshape(b, c, f, pt, h, ph, w, pw)
        x = x.transpose(0, 2, 4, 6, 3, 5, 7, 1).reshape(b, f, h, w, pt * ph * pw * c)
        kernel = self.kernel[...].reshape(-1, self.kernel.shape[-1])
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype), preferred_element_type=jnp.float32)
        return (y + self.bias[...].astype(jnp.float32)).astype(self.dtype)


def layer_norm(x, eps, scale=None, bias=None):
    """LayerNorm with float32 statistics; returns float32 (callers round where the official code does)."""
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + eps)
    if scale is not None:
        y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y


def rms_norm(x, weight, eps):
    """WanRMSNorm: normalise in float32, round to x's dtype, then scale (in x's dtype)."""
    xf = x.astype(jnp.float32)
    y = (xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + eps)).astype(x.dtype)
    return y * weight.astype(x.dtype)


def modulate(x, shift, scale):
    """x [B, L, D] (float32) * (1 + scale) + shift with per-frame [B, F, D] shift/scale over L = F * tokens."""
    b, l, d = x.shape
    f = shift.shape[1]
    x = x.reshape(b, f, l // f, d)
    return (x * (1 + scale[:, :, None]) + shift[:, :, None]).reshape(b, l, d)


def gate(y, g):
    b, l, d = y.shape
    f = g.shape[1]
    return (y.astype(jnp.float32).reshape(b, f, l // f, d) * g[:, :, None]).reshape(b, l, d)


class Attention(nnx.Module):
    """q, k, v, o projections with RMSNorm on the full q and k vectors (WanSelfAttention / WanCrossAttention)."""

    def __init__(self, dim: int, num_heads: int, eps: float, *, dtype, rngs: nnx.Rngs):
        self.q = Dense(dim, dim, dtype=dtype, rngs=rngs)
        self.k = Dense(dim, dim, dtype=dtype, rngs=rngs)
        self.v = Dense(dim, dim, dtype=dtype, rngs=rngs)
        self.o = Dense(dim, dim, dtype=dtype, rngs=rngs)
        self.norm_q = nnx.Param(jnp.ones((dim,), dtype))
        self.norm_k = nnx.Param(jnp.ones((dim,), dtype))
        self.num_heads, self.eps = num_heads, eps

    def heads(self, x):
        return x.reshape(*x.shape[:-1], self.num_heads, x.shape[-1] // self.num_heads)

    def project_q(self, x):
        return self.heads(rms_norm(self.q(x), self.norm_q[...], self.eps))

    def project_kv(self, x):
        return self.heads(rms_norm(self.k(x), self.norm_k[...], self.eps)), self.heads(self.v(x))

    def out(self, y):
        return self.o(y.reshape(*y.shape[:-2], -1))

    def cross(self, x, ctx=None, kv=None):
        """Cross-attention of x to `ctx`, or to its keys, values and key bias `kv` when they were projected
        beforehand (see `CausalS2VDiT.text_kv`)."""
        k, v, bias = kv if kv is not None else (*self.project_kv(ctx), None)
        return self.out(attention(self.project_q(x), k, v, key_bias=bias))


class Block(nnx.Module):
    """CausalWanS2VAttentionBlock: modulated self-attention, text cross-attention, modulated FFN."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        dt = cfg.jnp_dtype
        self.modulation = nnx.Param(jax.random.normal(rngs.params(), (6, cfg.dim), dt) * cfg.dim ** -0.5)
        self.self_attn = Attention(cfg.dim, cfg.num_heads, cfg.eps, dtype=dt, rngs=rngs)
        self.norm3_scale = nnx.Param(jnp.ones((cfg.dim,), dt))
        self.norm3_bias = nnx.Param(jnp.zeros((cfg.dim,), dt))
        self.cross_attn = Attention(cfg.dim, cfg.num_heads, cfg.eps, dtype=dt, rngs=rngs)
        self.ffn_in = Dense(cfg.dim, cfg.ffn_dim, dtype=dt, rngs=rngs)
        self.ffn_out = Dense(cfg.ffn_dim, cfg.dim, dtype=dt, rngs=rngs)
        self.eps = cfg.eps

    def __call__(self, x, e0, text, self_attention, text_kv=None):
        """x [B, L, D] in the block dtype; e0 [B, F, 6, D] float32 per-frame time rows; `self_attention(h) -> y`
        runs the attention (the caller decides which keys: the sink prefill and the streaming block differ);
        `text_kv`, when given, is this layer's projected text keys, values and key bias (`CausalS2VDiT.text_kv`)."""
        dt = x.dtype
        m = self.modulation[...].astype(jnp.float32)[None, None] + e0
        shift1, scale1, gate1, shift2, scale2, gate2 = (m[:, :, i] for i in range(6))
        h = modulate(layer_norm(x, self.eps).astype(dt).astype(jnp.float32), shift1, scale1)
        y = self_attention(self.self_attn, h.astype(dt))
        x = x.astype(jnp.float32) + gate(y, gate1)
        # The official block rounds the cross-attention pre-norm input and output to bfloat16, even in float32.
        normed = layer_norm(x.astype(jnp.bfloat16), self.eps, self.norm3_scale[...], self.norm3_bias[...])
        normed = normed.astype(jnp.bfloat16).astype(dt)
        x = x + self.cross_attn.cross(normed, text, kv=text_kv).astype(jnp.float32)
        h = modulate(layer_norm(x, self.eps), shift2, scale2)
        y = self.ffn_out(jax.nn.gelu(self.ffn_in(h.astype(dt)), approximate=True))
        x = x + gate(y, gate2)
        return x.astype(dt), normed


class AudioInjector(nnx.Module):
    """AdaLN of the block tokens by the frame's global audio vector, then cross-attention to the frame's 5 audio
    tokens, added without a gate (AudioInjector_WAN in "attn_norm" mode)."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        dt = cfg.jnp_dtype
        self.attn = Attention(cfg.dim, cfg.num_heads, cfg.eps, dtype=dt, rngs=rngs)
        self.adain = Dense(cfg.dim, 2 * cfg.dim, dtype=dt, rngs=rngs)

    def __call__(self, x, audio_tokens, audio_global):
        """x [B, F*N, D]; audio_tokens [B, F, 5, D]; audio_global [B, F, 1, D]. Returns x + residual."""
        b, l, d = x.shape
        f = audio_tokens.shape[1]
        hs = x.reshape(b * f, l // f, d)
        ada = self.adain(jax.nn.silu(audio_global.reshape(b * f, d))).astype(jnp.float32)
        shift, scale = ada[:, None, :d], ada[:, None, d:]
        q_in = layer_norm(hs, 1e-5) * (1 + scale) + shift
        res = self.attn.cross(q_in.astype(x.dtype), audio_tokens.reshape(b * f, -1, d))
        return x + res.reshape(b, l, d).astype(x.dtype)


class CausalConv1d(nnx.Module):
    def __init__(self, din: int, dout: int, stride: int, *, dtype, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)
        self.kernel = nnx.Param(init(rngs.params(), (3, din, dout), dtype))
        self.bias = nnx.Param(jnp.zeros((dout,), dtype))
        self.stride = stride

    def __call__(self, x):
        """x [B, T, C] float32 -> [B, T', C']; left replicate padding by 2 keeps it causal."""
        x = jnp.concatenate([jnp.repeat(x[:, :1], 2, axis=1), x], axis=1)
        y = jax.lax.conv_general_dilated(x, self.kernel[...].astype(jnp.float32), (self.stride,), "VALID",
                                         dimension_numbers=("NWC", "WIO", "NWC"))
        return y + self.bias[...].astype(jnp.float32)


class CausalAudioEncoder(nnx.Module):
    """Mixes the wav2vec2 hidden states with learned weights and compresses them 4x in time with causal convs into
    per-latent-frame audio tokens (4 local + 1 padding token) and one global vector (MotionEncoder_tc)."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        dt, d, n = cfg.jnp_dtype, cfg.dim, cfg.num_audio_token
        self.weights = nnx.Param(jnp.full((cfg.audio_layers,), 0.01, dt))
        self.conv1_local = CausalConv1d(cfg.audio_dim, d // 4 * n, 1, dtype=dt, rngs=rngs)
        self.conv1_global = CausalConv1d(cfg.audio_dim, d // 4, 1, dtype=dt, rngs=rngs)
        self.conv2 = CausalConv1d(d // 4, d // 2, 2, dtype=dt, rngs=rngs)
        self.conv3 = CausalConv1d(d // 2, d, 2, dtype=dt, rngs=rngs)
        self.final_linear = Dense(d, d, dtype=dt, rngs=rngs)
        self.padding_tokens = nnx.Param(jnp.zeros((d,), dt))
        self.num_tokens = n

    def __call__(self, features):
        """features [B, layers, C_a, T] -> (tokens [B, T', n+1, D], global [B, T', 1, D]) in float32."""
        w = jax.nn.silu(self.weights[...].astype(jnp.float32))
        feat = jnp.einsum("blct,l->btc", features.astype(jnp.float32), w / w.sum())
        b = feat.shape[0]

        def shared(x):  # norm1 -> SiLU -> conv2 -> norm2 -> SiLU -> conv3 -> norm3 -> SiLU
            x = jax.nn.silu(layer_norm(x, 1e-6))
            x = jax.nn.silu(layer_norm(self.conv2(x), 1e-6))
            return jax.nn.silu(layer_norm(self.conv3(x), 1e-6))

        local = self.conv1_local(feat)                                  # [B, T, n*C]
        t, nc = local.shape[1], local.shape[2]
        local = local.reshape(b, t, self.num_tokens, nc // self.num_tokens).transpose(0, 2, 1, 3)
        local = shared(local.reshape(b * self.num_tokens, t, -1))       # [(B n), T', D]
        local = local.reshape(b, self.num_tokens, -1, local.shape[-1]).transpose(0, 2, 1, 3)
        pad = jnp.broadcast_to(self.padding_tokens[...].astype(jnp.float32), (b, local.shape[1], 1, local.shape[-1]))
        tokens = jnp.concatenate([local, pad], axis=2)
        glob = self.final_linear(shared(self.conv1_global(feat)), dtype=jnp.float32)
        return tokens, glob[:, :, None, :]


class FramePacker(nnx.Module):
    """FramePack motion tokens: the last 19 motion latents split 16 / 2 / 1 (oldest to newest) and patchified
    4x, 2x and 1x coarser in time and space."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        dt = cfg.jnp_dtype
        self.proj = PatchEmbed(cfg.in_dim, cfg.dim, (1, 2, 2), dtype=dt, rngs=rngs)
        self.proj_2x = PatchEmbed(cfg.in_dim, cfg.dim, (2, 4, 4), dtype=dt, rngs=rngs)
        self.proj_4x = PatchEmbed(cfg.in_dim, cfg.dim, (4, 8, 8), dtype=dt, rngs=rngs)
        self.buckets = tuple(cfg.zip_frame_buckets)

    def __call__(self, motion):
        """motion [B, 16, T_m, h, w] -> tokens [B, L_m, D] (order: post, 2x, 4x)."""
        total = sum(self.buckets)
        b, c, t, h, w = motion.shape
        keep = min(total, t)
        padded = jnp.zeros((b, c, total, h, w), motion.dtype).at[:, :, total - keep:].set(motion[:, :, t - keep:])
        n4, n2, _ = self.buckets[2], self.buckets[1], self.buckets[0]
        parts = [self.proj(padded[:, :, n4 + n2:]), self.proj_2x(padded[:, :, n4:n4 + n2]),
                 self.proj_4x(padded[:, :, :n4])]
        return jnp.concatenate([p.reshape(b, -1, p.shape[-1]) for p in parts], axis=1)

    def positions(self, h: int, w: int):
        """Static (t, h, w) RoPE positions of the motion tokens (official negative-time grids)."""
        b1, b2, b4 = self.buckets
        groups = [
            rope.sampled_grid_positions(-np.linspace(b1, 1, 1).astype(int), h // 2, w // 2, h // 2, w // 2),
            rope.sampled_grid_positions(-np.linspace(b1 + b2, b1 + 1, 1).astype(int), h // 2, w // 2, h // 4, w // 4),
            rope.sampled_grid_positions(-np.linspace(b1 + b2 + b4, b1 + b2 + 1, b4 // 4).astype(int),
                                        h // 2, w // 2, h // 8, w // 8),
        ]
        return tuple(np.concatenate([g[i] for g in groups]) for i in range(3))


# ----------------------------------------------------------------------------------------------------- the model

def _stacked(factory, n: int, rngs: nnx.Rngs):
    """n copies of a module with parameters stacked on a leading axis (for lax.scan over layers)."""
    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(r):
        return factory(r)
    return make(rngs)


def sinusoidal_embedding(t, dim: int):
    """[cos(t w_j), sin(t w_j)] with w_j = 10000^(-j/half), t float32 [...].

    Official code evaluates this in float64. The integer part of t goes through the exact digit tables of `rope`
    and only the fractional part's phase is computed in float32, so the result stays float64-accurate to a few ulp.
    """
    half = dim // 2
    freqs = np.power(10000.0, -np.arange(half, dtype=np.float64) / half)
    t = jnp.asarray(t, jnp.float32)
    t_int = jnp.floor(t)
    ci, si = rope.int_phase_cos_sin(t_int.astype(jnp.int32), freqs)
    frac_phase = (t - t_int)[..., None] * jnp.asarray(freqs, jnp.float32)
    cf, sf = jnp.cos(frac_phase), jnp.sin(frac_phase)
    return jnp.concatenate([ci * cf - si * sf, si * cf + ci * sf], axis=-1)


class CausalS2VDiT(nnx.Module):

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        dt, d = cfg.jnp_dtype, cfg.dim
        self.patch_embedding = PatchEmbed(cfg.in_dim, d, cfg.patch_size, dtype=dt, rngs=rngs)
        self.cond_encoder = PatchEmbed(cfg.cond_dim, d, cfg.patch_size, dtype=dt, rngs=rngs)
        self.trainable_cond_mask = nnx.Param(jnp.zeros((3, d), dt))
        self.text_in = Dense(cfg.text_dim, d, dtype=dt, rngs=rngs)
        self.text_out = Dense(d, d, dtype=dt, rngs=rngs)
        self.time_in = Dense(cfg.freq_dim, d, dtype=dt, rngs=rngs)
        self.time_out = Dense(d, d, dtype=dt, rngs=rngs)
        self.time_projection = Dense(d, 6 * d, dtype=dt, rngs=rngs)
        self.blocks = _stacked(lambda r: Block(cfg, rngs=r), cfg.num_layers, rngs)
        self.audio_encoder = CausalAudioEncoder(cfg, rngs=rngs)
        self.audio_injectors = _stacked(lambda r: AudioInjector(cfg, rngs=r), len(cfg.audio_inject_layers), rngs)
        self.frame_packer = FramePacker(cfg, rngs=rngs)
        self.head_modulation = nnx.Param(jax.random.normal(rngs.params(), (2, d), dt) * d ** -0.5)
        out = int(np.prod(cfg.patch_size)) * cfg.out_dim
        self.head = Dense(d, out, dtype=dt, rngs=rngs)

    # ------------------------------------------------------------------------------------------------ embeddings

    def embed_text(self, context):
        """context [B, L<=text_len, text_dim] -> [B, text_len, D]; zero-padded rows are embedded too (official)."""
        cfg = self.cfg
        b, l, _ = context.shape
        if l > cfg.text_len:
            raise ValueError(f"text context has {l} tokens, more than text_len {cfg.text_len}")
        padded = jnp.zeros((b, cfg.text_len, cfg.text_dim), cfg.jnp_dtype).at[:, :l].set(context.astype(cfg.jnp_dtype))
        return self.text_out(jax.nn.gelu(self.text_in(padded), approximate=True))

    def time_embed(self, t):
        """t [B, F] -> (e [B, F, D], e0 [B, F, 6, D]), float32 (official float32 autocast region)."""
        s = sinusoidal_embedding(t, self.cfg.freq_dim)
        e = self.time_out(jax.nn.silu(self.time_in(s, dtype=jnp.float32)), dtype=jnp.float32)
        e0 = self.time_projection(jax.nn.silu(e), dtype=jnp.float32)
        return e, e0.reshape(*e0.shape[:-1], 6, self.cfg.dim)

    def encode_audio(self, audio):
        """audio [B, layers, C_a, T] per-video-frame features -> tokens [B, F, 5, D], global [B, F, 1, D].

        Officially the block's first frame is repeated `motion_frames[0]` times in front and the first
        `motion_frames[1]` outputs are dropped, leaving one entry per latent frame. The repeated frames are one
        constant, and the encoder's causal convolutions (kernel 3, replicate padding, strides 1, 2, 2) map a constant
        run to a constant run, so all but the last few copies can be left out: dropping 4k of them (a multiple of
        the total stride keeps the output grid aligned) drops exactly k outputs and changes no value.
        """
        pre, drop = self.cfg.motion_frames
        skip = 4 * max(0, (pre - 9) // 4)   # keep >= 9 copies: covers the receptive field of the kept outputs
        skip = min(skip, 4 * drop)
        audio = jnp.concatenate([jnp.repeat(audio[..., :1], pre - skip, axis=-1), audio], axis=-1)
        tokens, glob = self.audio_encoder(audio)
        dt = self.cfg.jnp_dtype
        return tokens[:, drop - skip // 4:].astype(dt), glob[:, drop - skip // 4:].astype(dt)

    def text_kv(self, text, num_tokens: int | None = None):
        """Every layer's text cross-attention keys and values [layers, B, keys, heads, head_dim] and a per-key logit
        bias [layers, keys] (or None), computed once per prompt instead of in every call (the official code
        recomputes them).

        `num_tokens` (static), the prompt's real token count, lets most of the text_len - num_tokens padding rows
        fold into one key: they are all the embedding of a zero row, hence identical, and softmax over c identical
        keys equals softmax over one of them with log(c) added to its logit. The keys kept are the first
        num_tokens + 1 rows rounded up to a multiple of TEXT_KEY_BUCKET (so prompts of similar length share one
        compiled step); the last kept row, a padding row, carries the weight of the padding dropped after it.
        """
        block_def, block_state = nnx.split(self.blocks)
        text_len = text.shape[1]
        kept = text_len if num_tokens is None else min(text_len, -(-(int(num_tokens) + 1) // TEXT_KEY_BUCKET)
                                                       * TEXT_KEY_BUCKET)

        def body(_, layer_state):
            return None, nnx.merge(block_def, layer_state).cross_attn.project_kv(text[:, :kept])

        k, v = jax.lax.scan(body, None, block_state)[1]
        if kept == text_len:
            return k, v, None
        bias = jnp.zeros((kept,), jnp.float32).at[-1].set(np.log(text_len - kept + 1))
        return k, v, jnp.broadcast_to(bias, (self.cfg.num_layers, kept))

    # ------------------------------------------------------------------------------------------------ positions

    def sink_positions(self, h: int, w: int, ref_position):
        """(t, h, w) RoPE positions of the sink tokens [reference | motion]; the reference frame sits at
        `ref_position` (traced), the motion tokens at their fixed negative times."""
        ph, pw = h // self.cfg.patch_size[1], w // self.cfg.patch_size[2]
        n_ref = ph * pw
        mt, mh, mw = self.frame_packer.positions(h, w)
        t = jnp.concatenate([jnp.full((n_ref,), ref_position, jnp.int32), jnp.asarray(mt, jnp.int32)])
        hh = jnp.concatenate([jnp.repeat(jnp.arange(ph, dtype=jnp.int32), pw), jnp.asarray(mh, jnp.int32)])
        ww = jnp.concatenate([jnp.tile(jnp.arange(pw, dtype=jnp.int32), ph), jnp.asarray(mw, jnp.int32)])
        return t, hh, ww

    def sink_table(self, h: int, w: int, ref_position):
        return rope.token_table(*self.sink_positions(h, w, ref_position), self.cfg.head_dim)

    def block_table(self, first_frame, frames: int, h: int, w: int):
        ph, pw = h // self.cfg.patch_size[1], w // self.cfg.patch_size[2]
        frames_pos = first_frame + jnp.arange(frames, dtype=jnp.int32)
        return rope.token_table(*rope.grid_positions(frames_pos, ph, pw), self.cfg.head_dim)

    # ---------------------------------------------------------------------------------------------- entry points

    def scan_blocks(self, x, e0, text, attend, cache_xs, inject=None, debug=False, text_kv=None,
                    remat: str | None = None, carried=None):
        """Runs every block under lax.scan. `attend(attn, h, cache_l) -> (y, new_cache_l)` is the self-attention
        of one layer given that layer's slice of `cache_xs`; `inject(injector, x)` the audio injection after the
        configured layers; `remat` names a policy of `REMAT_POLICIES` to rematerialise each layer (training).
        `carried`, when given, is a pytree threaded through every layer whole (the streaming ring, updated in
        place): attend is then called as `attend(attn, h, cache_l, carried, layer_index) -> (y, new_cache_l,
        carried)`.
        Returns (x, the stacked new cache slices, debug outputs or None); with `carried`, the second item is
        (the stacked new cache slices, the final carried)."""
        cfg = self.cfg
        block_def, block_state = nnx.split(self.blocks)
        inj_def, inj_state = nnx.split(self.audio_injectors)
        inj_index = np.full((cfg.num_layers,), -1, np.int32)
        for j, layer_id in enumerate(sorted(set(cfg.audio_inject_layers))):
            inj_index[layer_id] = j

        def layer(x, layer_state, cache_l, j, kv_l, inj_state, carried, li):
            block = nnx.merge(block_def, layer_state)
            side = {}

            def self_attention(attn, h):
                if carried is None:
                    y, side["cache"] = attend(attn, h, cache_l)
                else:
                    y, side["cache"], side["carried"] = attend(attn, h, cache_l, carried, li)
                return y

            x, normed = block(x, e0, text, self_attention, text_kv=kv_l)
            block_out = x
            if inject is not None:
                def do_inject(x):
                    injector = nnx.merge(inj_def, jax.tree.map(lambda p: p[jnp.maximum(j, 0)], inj_state))
                    return inject(injector, x)
                x = jax.lax.cond(j >= 0, do_inject, lambda x: x, x)
            return (x, side.get("carried")), (side["cache"], (block_out, normed) if debug else None)

        if remat not in (None, "none"):
            # explicit arguments and outputs only, so no tracer crosses the remat boundary
            layer = jax.checkpoint(layer, policy=remat_policy(remat), prevent_cse=False)

        def body(carry, xs):
            x, carried = carry
            layer_state, cache_l, j, kv_l, li = xs
            return layer(x, layer_state, cache_l, j, kv_l, inj_state, carried, li)

        (x, carried), (new_cache, dbg) = jax.lax.scan(
            body, (x, carried), (block_state, cache_xs, jnp.asarray(inj_index), text_kv,
                                 jnp.arange(cfg.num_layers, dtype=jnp.int32)))
        if carried is not None:
            return x, (new_cache, carried), dbg
        return x, new_cache, dbg

    def embed_noisy(self, x, cond_states=None):
        """Noisy latents [B, 16, F, h, w] -> tokens [B, F*N, D]: patch embedding, the pose latents through
        `cond_encoder` (without a pose video the official pipeline feeds zeros, which leaves its bias), segment 0."""
        cfg = self.cfg
        dt = cfg.jnp_dtype
        tokens = self.patch_embedding(x.astype(dt))
        if cond_states is not None:
            tokens = tokens + self.cond_encoder(cond_states.astype(dt))
        else:
            tokens = tokens + self.cond_encoder.bias[...].astype(dt)
        return tokens.reshape(x.shape[0], -1, cfg.dim) + self.trainable_cond_mask[0].astype(dt)

    def head_out(self, out, e, f: int, h: int, w: int):
        """The head on the noisy tokens, in its float32 region (LN(x) in x's dtype, then modulation and projection
        in float32), and unpatchify -> velocity [B, 16, F, h, w]."""
        cfg = self.cfg
        dt = cfg.jnp_dtype
        m = self.head_modulation[...].astype(jnp.float32)[None, None] + e[:, :, None]
        normed = layer_norm(out, cfg.eps).astype(dt).astype(jnp.float32)
        y = self.head(modulate(normed, m[:, :, 0], m[:, :, 1]), dtype=jnp.float32).astype(dt)
        return self.unpatchify(y, f, h // cfg.patch_size[1], w // cfg.patch_size[2])

    def sink_prefill(self, ref_latents, motion_latents, text):
        """Runs the sink (reference + motion) tokens through every block at t=0.

        ref_latents [B, 16, 1, h, w]; motion_latents [B, 16, T_m, h, w]; text [B, text_len, D] from `embed_text`.
        Returns the per-layer un-rotated keys and the values of the sink tokens.
        """
        cfg = self.cfg
        dt = cfg.jnp_dtype
        b, _, _, h, w = ref_latents.shape
        ref = self.patch_embedding(ref_latents.astype(dt))
        ref = ref.reshape(b, -1, cfg.dim) + self.trainable_cond_mask[1].astype(dt)
        mot = self.frame_packer(motion_latents.astype(dt)) + self.trainable_cond_mask[2].astype(dt)
        x = jnp.concatenate([ref, mot], axis=1)
        _, e0 = self.time_embed(jnp.zeros((b, 1), jnp.float32))
        table = self.sink_table(h, w, cfg.sink_position)

        def attend(attn, hs, _):
            q = attn.project_q(hs)
            k, v = attn.project_kv(hs)
            qr = rope.apply(q, table).astype(v.dtype)
            kr = rope.apply(k, table).astype(v.dtype)
            return attn.out(attention(qr, kr, v)), (k, v)

        _, (k, v), _ = self.scan_blocks(x, e0, text, attend, None)
        return SinkCache(k=k, v=v)

    def block_forward(self, x, t, text, audio, cache: RingCache, sink: SinkCache, first_frame, relative_dist,
                      cond_states=None, debug: bool = False, text_kv=None, remat: str | None = None,
                      attention_impl: str | None = None):
        """One denoising step of one block.

        x [B, 16, F, h, w] noisy latents; t [B] or [B, F] timesteps; text [B, text_len, D] (or None with `text_kv`
        from `text_kv(text)`, computed once per prompt); audio [B, layers, C_a, 4F] features of the block's video
        frames, or their `encode_audio` output (computed once per block: the 4 steps share it); cache: this
        step's ring; sink: the sink K/V;
        first_frame: global latent index g of the block's first frame (int32, never wrapped); relative_dist: the
        rolling-sink distance d of this call (the reference is re-rotated to max(sink_position, g + d)).
        `remat` (training) rematerialises each layer; `attention_impl` overrides the attention kernel.
        Returns (velocity [B, 16, F, h, w], updated ring[, debug dict]).
        """
        cfg = self.cfg
        b, _, f, h, w = x.shape
        hs = self.embed_noisy(x, cond_states)
        n_block = hs.shape[1]
        n_frame = n_block // f

        t = jnp.asarray(t, jnp.float32)
        t = jnp.broadcast_to(t[:, None] if t.ndim == 1 else t, (b, f))
        e, e0 = self.time_embed(t)
        audio_tokens, audio_global = audio if isinstance(audio, tuple) else self.encode_audio(audio)

        first_frame = jnp.asarray(first_frame, jnp.int32)
        block_tab = self.block_table(first_frame, f, h, w)
        start_idx = cfg.sink_position - jnp.asarray(relative_dist, jnp.int32)
        rollout = jnp.maximum(0, first_frame - start_idx)
        sink_tab = self.sink_table(h, w, cfg.sink_position + rollout)

        capacity = cache.capacity
        if capacity % n_frame:
            raise ValueError(f"ring capacity {capacity} is not a whole number of {n_frame}-token frames")
        ring_frames = capacity // n_frame
        # Slot arithmetic in frames, never in tokens, so that int32 holds for any stream length.
        offset = (first_frame % ring_frames) * n_frame
        valid = jnp.minimum(first_frame + f, ring_frames) * n_frame
        n_sink = sink.length
        prefixes = sorted({min(m * f, ring_frames) * n_frame for m in range(1, -(-ring_frames // f) + 1)})

        def attend(attn, hs, cache_l, ring=None, li=None):
            if ring is None:        # this layer's ring slice in cache_l, its update returned as a scan output
                ring_k, ring_v, sink_k, sink_v = cache_l
            else:                   # the stacked ring carried through the layer scan, layer `li` written in place
                (sink_k, sink_v), (ring_k, ring_v) = cache_l, ring
            q = attn.project_q(hs)
            k, v = attn.project_kv(hs)
            qr = rope.apply(q, block_tab).astype(v.dtype)
            kr = rope.apply(k, block_tab).astype(v.dtype)
            if ring is None:
                ring_k = jax.lax.dynamic_update_slice_in_dim(ring_k, kr.astype(ring_k.dtype), offset, axis=1)
                ring_v = jax.lax.dynamic_update_slice_in_dim(ring_v, v.astype(ring_v.dtype), offset, axis=1)
            else:
                at = (li, 0, offset, 0, 0)
                ring_k = jax.lax.dynamic_update_slice(ring_k, kr.astype(ring_k.dtype)[None], at)
                ring_v = jax.lax.dynamic_update_slice(ring_v, v.astype(ring_v.dtype)[None], at)
            sink_kr = rope.apply(sink_k, sink_tab).astype(v.dtype)

            def attend_prefix(length, ring_k, ring_v):
                if ring is not None:
                    ring_k, ring_v = (jax.lax.dynamic_index_in_dim(a, li, 0, keepdims=False) for a in (ring_k, ring_v))
                keys = jnp.concatenate([sink_kr, ring_k[:, :length].astype(v.dtype)], axis=1)
                vals = jnp.concatenate([sink_v.astype(v.dtype), ring_v[:, :length].astype(v.dtype)], axis=1)
                return attention(qr, keys, vals, num_valid_keys=n_sink + valid, implementation=attention_impl)

            # While the ring fills, its valid slots are a prefix: attend the shortest whole-block prefix that holds
            # them (one switch branch per fill level), so a filling ring costs only the keys it has.
            shortest = jnp.sum(jnp.asarray(prefixes[:-1]) < valid)      # the first prefix holding `valid` keys
            y = jax.lax.switch(shortest,
                               [functools.partial(attend_prefix, n) for n in prefixes], ring_k, ring_v)
            if ring is None:
                return attn.out(y), (ring_k, ring_v, sink_kr if debug else None)
            return attn.out(y), (sink_kr if debug else None), (ring_k, ring_v)

        def inject(injector, x):
            return injector(x, audio_tokens, audio_global)

        if remat in (None, "none"):
            # Inference: the stacked ring rides in the scan's carry and each layer writes its slot in place (one
            # buffer, no per-layer slice copied in and stacked out: 2.6 % of benchmarks.dit_forward, paired). Under
            # remat each layer's saved inputs would include the whole stack, so training passes per-layer slices.
            out, (sink_kr, (ring_k, ring_v)), dbg = self.scan_blocks(
                hs, e0, text, attend, (sink.k, sink.v), inject=inject, debug=debug, text_kv=text_kv,
                carried=(cache.k, cache.v))
        else:
            out, (ring_k, ring_v, sink_kr), dbg = self.scan_blocks(
                hs, e0, text, attend, (cache.k, cache.v, sink.k, sink.v), inject=inject, debug=debug,
                text_kv=text_kv, remat=remat)
        velocity = self.head_out(out, e, f, h, w)
        new_cache = RingCache(k=ring_k, v=ring_v)
        if not debug:
            return velocity, new_cache
        return velocity, new_cache, {"block_out": dbg[0], "norm3_out": dbg[1], "rope": block_tab,
                                     "roped_sink_k": sink_kr}

    def unpatchify(self, y, f: int, ph: int, pw: int):
        """[B, f*ph*pw, pt*2*2*C] -> [B, C, f*pt, ph*2, pw*2] ('fhwpqrc->cfphqwr')."""
        pt, qh, qw = self.cfg.patch_size
        c = self.cfg.out_dim
        b = y.shape[0]
        y = y.reshape(b, f, ph, pw, pt, qh, qw, c).transpose(0, 7, 1, 4, 2, 5, 3, 6)
        return y.reshape(b, c, f * pt, ph * qh, pw * qw)


def build(cfg: DiTConfig, seed: int = 0) -> CausalS2VDiT:
    return CausalS2VDiT(cfg, rngs=nnx.Rngs(seed))


def abstract_model(cfg: DiTConfig) -> CausalS2VDiT:
    """The model's structure with shapes only (nothing allocated): for loading and for counting parameters."""
    return nnx.eval_shape(lambda: CausalS2VDiT(cfg, rngs=nnx.Rngs(0)))


def count_params(model) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
