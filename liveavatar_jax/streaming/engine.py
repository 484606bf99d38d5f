"""The streaming engine: sink prefill, then block after block of timestep-forced denoising with the Rolling Sink
Frame Mechanism, as the official TPP loop does it (architecture.md section 3 and appendix A).

Everything that changes from block to block lives in `StreamState`, a pytree carried by `lax.scan` (whole streams,
`run`) or by a jitted per-block step (live use, `step`):
  * `rings`: one KV ring per denoising step (step i's cache holds step i's noisy keys: timestep forcing), stacked on a
    leading step axis;
  * `sink`: the reference + motion K/V, re-rotated on every call at the rolling distance;
  * `first_latent`: the first generated latent frame, which replaces the reference at the start of clip 1 (AAS);
  * `block`: the global block index; `key`: the PRNG key from which the block noise and the rolling distances are
    derived (`fold_in` of the block index), so a seed reproduces a stream exactly and nothing grows with its length;
  * `decoder`: the streaming VAE's convolution cache (or None when latents are all that is wanted).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from liveavatar_jax.models.dit import CausalS2VDiT
from liveavatar_jax.sampling.flow_match import euler_step, flow_match_schedule
from liveavatar_jax.streaming.caches import RingCache, SinkCache

_NOISE_STREAM, _DIST_STREAM = 0, 1


@dataclasses.dataclass(frozen=True)
class StreamConfig:
    steps: int = 4                      # denoising steps per block (2, 3 or 4)
    shift: float = 3.0                  # flow-matching schedule shift (official: hard-coded 3)
    frames_per_block: int = 3           # latent frames per block (12 video frames)
    ring_blocks: int = 4                # blocks held by each KV ring (one 48-frame clip, official)
    sink_replace_block: int | None = 4  # global block before which the sink becomes the first generated frame
    rolling_sink: bool = True           # re-position the sink in RoPE ahead of the current block
    relative_dist: tuple[int, int] = (4, 30)  # inclusive range of the rolling distance (official random.randint)

    @property
    def ring_frames(self) -> int:
        return self.ring_blocks * self.frames_per_block


@struct.dataclass
class StreamState:
    rings: RingCache            # [steps, layers, B, capacity, heads, head_dim]
    sink: SinkCache
    first_latent: jnp.ndarray   # [B, 16, 1, h, w]
    block: jnp.ndarray          # int32 scalar: global index of the next block
    key: jax.Array
    decoder: Any = None


@struct.dataclass
class StreamContext:
    """Per-stream inputs that never change: the embedded prompt (and, once `with_text_kv` ran, every layer's text
    keys/values), the original reference and motion latents."""
    text: jnp.ndarray
    ref_latents: jnp.ndarray
    motion_latents: jnp.ndarray
    text_kv: tuple | None = None


def block_noise(key, block, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, _NOISE_STREAM), block), shape, dtype)


def rolling_distances(key, block, steps: int, dist_range: tuple[int, int]):
    """One rolling distance per denoising step of `block`, uniform over the inclusive range (official randint)."""
    lo, hi = dist_range
    k = jax.random.fold_in(jax.random.fold_in(key, _DIST_STREAM), block)
    return jax.random.randint(k, (steps,), lo, hi + 1, dtype=jnp.int32)


class StreamEngine:
    """Runs the DiT over a stream. The model is split once; jitted functions merge it inside.

    `decoder`, when given, is the streaming VAE seen as pure functions of its parameters `decoder.params`:
    `init(params, latents_shape) -> cache`, `prime(params, cache, motion_latents) -> cache` and
    `decode(params, cache, latents) -> (frames, cache)`; its cache rides in the state.
    """

    def __init__(self, model: CausalS2VDiT, cfg: StreamConfig = StreamConfig(), decoder=None):
        if not 1 <= cfg.steps <= 8:
            raise ValueError(f"steps must be a small positive integer, got {cfg.steps}")
        self.cfg = cfg
        self.model_cfg = model.cfg
        self.graphdef, self.params = nnx.split(model)
        sched = flow_match_schedule(cfg.steps, shift=cfg.shift)
        self.timesteps = np.asarray(sched.timesteps, np.float32)
        self.sigmas = np.asarray(sched.sigmas, np.float32)
        self.decoder = decoder
        self.decoder_params = None if decoder is None else decoder.params
        self._step = jax.jit(self._step_impl, static_argnames=("trace",), donate_argnums=(1,))
        self._run = jax.jit(self._run_impl, static_argnames=("trace",), donate_argnums=(1,))
        self._init = jax.jit(self._init_impl)
        self._text_kv = jax.jit(lambda params, text, n: self.merged(params).text_kv(text, n), static_argnums=2)
        self._replace_sink = jax.jit(self._replace_sink_impl, donate_argnums=(1,))

    def merged(self, params):
        return nnx.merge(self.graphdef, params)

    # ----------------------------------------------------------------------------------------------- state

    def _init_impl(self, params, dec_params, ctx: StreamContext, key):
        model = self.merged(params)
        mc, cfg = self.model_cfg, self.cfg
        b, _, _, h, w = ctx.ref_latents.shape
        sink = model.sink_prefill(ctx.ref_latents, ctx.motion_latents, ctx.text)
        n_frame = (h // mc.patch_size[1]) * (w // mc.patch_size[2])
        ring = RingCache.zeros(mc.num_layers, b, cfg.ring_frames * n_frame, mc.num_heads, mc.head_dim, mc.jnp_dtype)
        rings = jax.tree.map(lambda a: jnp.broadcast_to(a, (cfg.steps, *a.shape)), ring)
        decoder = None
        if self.decoder is not None:
            cache = self.decoder.init(dec_params, (b, mc.in_dim, cfg.frames_per_block, h, w))
            decoder = self.decoder.prime(dec_params, cache, ctx.motion_latents)
        return StreamState(rings=rings, sink=sink, first_latent=jnp.zeros_like(ctx.ref_latents, mc.jnp_dtype),
                           block=jnp.zeros((), jnp.int32), key=key, decoder=decoder)

    def with_text_kv(self, ctx: StreamContext, text_tokens: int | None = None) -> StreamContext:
        """The context with every layer's text keys/values computed once (they never change within a stream).
        `text_tokens`, the prompt's real token count (the rest of `text` is padding), folds the padding rows into
        one key (`CausalS2VDiT.text_kv`). It is not kept in the context: a static field there would recompile the
        jitted step for every prompt length."""
        if ctx.text_kv is not None:
            return ctx
        return ctx.replace(text_kv=self._text_kv(self.params, ctx.text, text_tokens))

    def init(self, ctx: StreamContext, seed_or_key) -> StreamState:
        key = jax.random.key(seed_or_key) if isinstance(seed_or_key, int) else seed_or_key
        return self._init(self.params, self.decoder_params, ctx, key)

    # ----------------------------------------------------------------------------------------------- one block

    def _block(self, model, dec_params, state: StreamState, ctx: StreamContext, audio, noise, dists, cond,
               trace: bool, in_scan: bool):
        """One block. In a scan the sink replacement is a `lax.cond`; the per-block step leaves it to the host
        (`_replace_sink`), which keeps a second compiled prefill out of every step."""
        cfg, mc = self.cfg, self.model_cfg
        g = state.block
        b, _, _, h, w = ctx.ref_latents.shape
        shape = (b, mc.in_dim, cfg.frames_per_block, h, w)
        if noise is None:
            noise = block_noise(state.key, g, shape)
        if dists is None:
            dists = rolling_distances(state.key, g, cfg.steps, cfg.relative_dist)
        if not cfg.rolling_sink:
            # distance 30 - g... keeps the reference at its prefill position: rollout = max(0, g - (30 - d)) = 0
            dists = jnp.full((cfg.steps,), -(2 ** 30), jnp.int32)

        sink = state.sink
        if in_scan and cfg.sink_replace_block is not None:
            sink = jax.lax.cond(
                g == cfg.sink_replace_block,
                lambda: model.sink_prefill(state.first_latent, ctx.motion_latents, ctx.text),
                lambda: sink)

        first_frame = g * cfg.frames_per_block
        x = noise.astype(mc.jnp_dtype)

        audio = model.encode_audio(audio)   # once per block: the denoising steps share it

        def denoise(x, xs):
            ring_k, ring_v, t, s0, s1, d = xs
            out = model.block_forward(x, jnp.full((b,), t), ctx.text, audio, RingCache(ring_k, ring_v), sink,
                                      first_frame, d, cond_states=cond, debug=trace, text_kv=ctx.text_kv)
            v, ring = out[0], out[1]
            x_next = euler_step(x, v, s0, s1)
            aux = {"x_in": x, "flow_pred": v, "roped_sink_k": out[2]["roped_sink_k"]} if trace else None
            return x_next, ((ring.k, ring.v), aux)

        xs = (state.rings.k, state.rings.v, jnp.asarray(self.timesteps), jnp.asarray(self.sigmas[:-1]),
              jnp.asarray(self.sigmas[1:]), dists)
        x, ((ring_k, ring_v), aux) = jax.lax.scan(denoise, x, xs)

        first_latent = jnp.where(g == 0, x[:, :, :1], state.first_latent)
        out = {"latents": x}
        decoder = state.decoder
        if self.decoder is not None:
            out["frames"], decoder = self.decoder.decode(dec_params, decoder, x)
        if trace:
            out["trace"] = aux
            out["dists"] = dists
        new_state = state.replace(rings=RingCache(ring_k, ring_v), sink=sink, first_latent=first_latent,
                                  block=g + 1, decoder=decoder)
        return new_state, out

    def _step_impl(self, params, state, dec_params, ctx, audio, noise, dists, cond, trace=False):
        return self._block(self.merged(params), dec_params, state, ctx, audio, noise, dists, cond, trace, False)

    def _replace_sink_impl(self, params, state, ctx):
        sink = self.merged(params).sink_prefill(state.first_latent, ctx.motion_latents, ctx.text)
        return state.replace(sink=sink)

    def step(self, state: StreamState, ctx: StreamContext, audio, *, noise=None, dists=None, cond=None,
             trace: bool = False):
        """One block (live use). audio [B, layers, C_a, 4 * frames_per_block]. The state is donated."""
        if self.cfg.sink_replace_block is not None and int(state.block) == self.cfg.sink_replace_block:
            state = self._replace_sink(self.params, state, ctx)
        return self._step(self.params, state, self.decoder_params, ctx, audio, noise, dists, cond, trace=trace)

    # ----------------------------------------------------------------------------------------------- a stream

    def _run_impl(self, params, state, dec_params, ctx, audio_blocks, noise, dists, cond, trace=False):
        model = self.merged(params)

        def body(state, xs):
            audio, nz, d, c = xs
            return self._block(model, dec_params, state, ctx, audio, nz, d, c, trace, True)

        return jax.lax.scan(body, state, (audio_blocks, noise, dists, cond))

    def run(self, state: StreamState, ctx: StreamContext, audio_blocks, *, noise=None, dists=None, cond=None,
            trace: bool = False):
        """Many blocks in one jitted scan. audio_blocks [N, B, layers, C_a, 4F]; optional per-block noise
        [N, B, 16, F, h, w], rolling distances [N, steps] (to replay a reference) and pose latents."""
        return self._run(self.params, state, self.decoder_params, ctx, audio_blocks, noise, dists, cond, trace=trace)


def split_audio_blocks(audio_emb, frames_per_block: int = 3, start_block: int = 0, num_blocks: int | None = None):
    """audio_emb [B, layers, C_a, T] -> [N, B, layers, C_a, 4F]: the per-block slices the DiT receives."""
    per = 4 * frames_per_block
    total = audio_emb.shape[-1] // per
    n = total - start_block if num_blocks is None else num_blocks
    a = audio_emb[..., start_block * per:(start_block + n) * per]
    a = a.reshape(*a.shape[:-1], n, per)
    return jnp.moveaxis(a, -2, 0)
