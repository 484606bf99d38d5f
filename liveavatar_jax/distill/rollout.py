"""The Stage-2 student rollout: Self-Forcing with History Corrupt and timestep forcing (training.md 3.2-3.4, 8.2, 8.3).

The causal student generates a clip block by block exactly as the streaming engine does at inference: a sink prefill
(reference + motion tokens at t = 0, no gradient), then a `lax.scan` over blocks that carries the KV rings and runs the
denoising steps with `dit_sequence.block_step` (the inference `block_forward`, with remat). One exit step `s` is drawn
per iteration and shared by all blocks:

* steps `j < s` run without gradient (the adapters pass through `stop_gradient`) and move the block from sigma_j to
  sigma_{j+1}, by the inference Euler step or by re-noising the x0 guess with fresh noise (`update`);
* step `s` is the only forward that carries gradient; its x0 guess is the block's output;
* there is no clean refresh pass (History Corrupt): the keys and values a step writes stay in the ring as they are,
  noisy, detached with `stop_gradient`, so no gradient flows from block to block.

`cache` chooses the rings. `"per_step"` (default) keeps one ring per denoising step, as the inference engine and TPP
do: step j of every block attends to the earlier blocks' step-j keys, at its own noise level (timestep forcing); with
the exit at the last step the rollout reproduces the engine's stream exactly (tested). `"exit"` keeps the single ring
of the paper's Alg. 1, which holds each block's exit-step keys, so non-exit steps see history at t_s (T times less
ring memory). In both, the exit forward of block b sees the earlier blocks' exit-step keys.

Because history is detached, the generator gradient is a sum of per-block vector-Jacobian products. `exit_vjp`
computes it that way (Phase C of training.md 8.3): given the exit inputs recorded by a gradient-free rollout and the
loss cotangent of each block, it rebuilds the exit ring block by block and pulls the cotangent back through one block's
exit forward at a time, so peak memory is one block's backward however long the clip. `rollout(..., grad=True)` is the
direct form, differentiable end to end; tests hold the two equal.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from liveavatar_jax.distill.lora import Networks
from liveavatar_jax.models import dit_sequence
from liveavatar_jax.sampling.flow_match import euler_step, flow_match_schedule
from liveavatar_jax.streaming.caches import RingCache

UPDATES = ("euler", "renoise")
CACHES = ("per_step", "exit")


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    num_blocks: int = 7                 # blocks per training clip (7 x 3 = 21 latent frames)
    frames_per_block: int = 3
    ring_blocks: int = 4                # KV ring of the inference engine: current block + 3 previous
    steps: int = 4                      # denoising steps (the exit step is drawn from 0..steps-1)
    shift: float = 3.0                  # step list of the released sampler: t = 1000, 857.7, 602.2, 8.9
    update: str = "euler"               # "euler" (released inference) or "renoise" (paper Alg. 1)
    cache: str = "per_step"             # "per_step": one ring per denoising step, as inference and TPP keep them;
                                        # "exit": one ring holding the exit step's keys (paper Alg. 1)
    rolling_sink: bool = True
    relative_dist: tuple[int, int] = (4, 30)   # inclusive range of the rolling-sink distance, drawn per forward
    remat: str = "none"
    attention_impl: str | None = None

    def __post_init__(self):
        if self.update not in UPDATES:
            raise ValueError(f"rollout update must be one of {UPDATES}, got {self.update!r}")
        if self.cache not in CACHES:
            raise ValueError(f"rollout cache must be one of {CACHES}, got {self.cache!r}")
        if self.ring_blocks < 1 or self.num_blocks < 1 or self.steps < 1:
            raise ValueError("num_blocks, ring_blocks and steps must be positive")

    @property
    def num_frames(self) -> int:
        return self.num_blocks * self.frames_per_block

    def schedule(self):
        sched = flow_match_schedule(self.steps, shift=self.shift)
        return np.asarray(sched.timesteps, np.float32), np.asarray(sched.sigmas, np.float32)

    @classmethod
    def from_dict(cls, d: Mapping) -> "RolloutConfig":
        d = dict(d)
        if "relative_dist" in d:
            d["relative_dist"] = tuple(d["relative_dist"])
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


@struct.dataclass
class RolloutPlan:
    """Every random draw of one rollout, made up front so that a rollout can be replayed exactly."""
    exit_step: jnp.ndarray      # int32 scalar, shared by all blocks
    noise: jnp.ndarray          # [blocks, B, C, F_b, h, w] initial noise of each block
    renoise: jnp.ndarray        # [blocks, steps, B, C, F_b, h, w] fresh noise for "renoise" updates (else [blocks, 0])
    dists: jnp.ndarray          # [blocks, steps] int32 rolling-sink distances


def make_plan(key, cfg: RolloutConfig, batch: int, channels: int, h: int, w: int, exit_step=None) -> RolloutPlan:
    k_exit, k_noise, k_renoise, k_dist = jax.random.split(key, 4)
    shape = (cfg.num_blocks, batch, channels, cfg.frames_per_block, h, w)
    if exit_step is None:
        exit_step = jax.random.randint(k_exit, (), 0, cfg.steps)
    renoise = (jax.random.normal(k_renoise, (cfg.num_blocks, cfg.steps, *shape[1:]), jnp.float32)
               if cfg.update == "renoise" else jnp.zeros((cfg.num_blocks, 0), jnp.float32))
    lo, hi = cfg.relative_dist
    if cfg.rolling_sink:
        dists = jax.random.randint(k_dist, (cfg.num_blocks, cfg.steps), lo, hi + 1, dtype=jnp.int32)
    else:  # keeps the reference at its prefill position: rollout = max(0, g - (30 - d)) = 0
        dists = jnp.full((cfg.num_blocks, cfg.steps), -(2 ** 30), jnp.int32)
    return RolloutPlan(exit_step=jnp.asarray(exit_step, jnp.int32),
                       noise=jax.random.normal(k_noise, shape, jnp.float32), renoise=renoise, dists=dists)


@struct.dataclass
class Rollout:
    video: jnp.ndarray          # [B, C, F, h, w] float32: the exit-step x0 guesses of all blocks
    exit_inputs: jnp.ndarray    # [blocks, B, C, F_b, h, w]: each block's input to its exit forward
    sink: object                # the student's sink K/V (no gradient)


def audio_blocks(audio, cfg: RolloutConfig):
    """[B, layers, C_a, 4F] -> [blocks, B, layers, C_a, 4 F_b]."""
    per = 4 * cfg.frames_per_block
    if audio.shape[-1] != per * cfg.num_blocks:
        raise ValueError(f"audio has {audio.shape[-1]} frames; the rollout needs {per * cfg.num_blocks}")
    a = audio.reshape(*audio.shape[:-1], cfg.num_blocks, per)
    return jnp.moveaxis(a, -2, 0)


def _blocks_to_video(blocks):
    """[blocks, B, C, F_b, h, w] -> [B, C, blocks * F_b, h, w]."""
    n, b, c, f, h, w = blocks.shape
    return jnp.moveaxis(blocks, 0, 2).reshape(b, c, n * f, h, w)


def video_to_blocks(video, frames_per_block: int):
    b, c, f, h, w = video.shape
    return jnp.moveaxis(video.reshape(b, c, f // frames_per_block, frames_per_block, h, w), 2, 0)


def _empty_ring(networks: Networks, cfg: RolloutConfig, batch: int, h: int, w: int):
    mc = networks.model_cfg
    n_frame = (h // mc.patch_size[1]) * (w // mc.patch_size[2])
    return RingCache.zeros(mc.num_layers, batch, cfg.ring_blocks * cfg.frames_per_block * n_frame, mc.num_heads,
                           mc.head_dim, mc.jnp_dtype)


def _ring_at(rings: RingCache, i):
    return RingCache(k=rings.k[i], v=rings.v[i])


def _ring_put(rings: RingCache, i, ring: RingCache) -> RingCache:
    return RingCache(k=rings.k.at[i].set(ring.k), v=rings.v.at[i].set(ring.v))


def rollout(networks: Networks, lora, base, cond: Mapping, plan: RolloutPlan, cfg: RolloutConfig, *,
            grad: bool = False, nonexit_lora=None) -> Rollout:
    """Generates a clip with the student `base + lora`.

    cond: {"text": [B, L, text_dim] raw T5 context, "audio": [B, layers, C_a, 4F], "ref_latents", "motion_latents"}.
    With `grad=False` nothing carries gradient. With `grad=True` the exit forwards carry gradient with respect to
    `lora`; the non-exit forwards use `stop_gradient(nonexit_lora)` (default: `lora`, i.e. the same weights).
    """
    timesteps, sigmas = (jnp.asarray(a) for a in cfg.schedule())
    frozen = jax.lax.stop_gradient(lora if nonexit_lora is None else nonexit_lora)
    frozen_model = networks.adapted(frozen, base)
    dt = networks.model_cfg.jnp_dtype
    ref, motion = cond["ref_latents"], cond["motion_latents"]
    b, _, _, h, w = ref.shape
    frozen_text = jax.lax.stop_gradient(frozen_model.embed_text(cond["text"]))
    sink = jax.lax.stop_gradient(frozen_model.sink_prefill(ref, motion, frozen_text))
    s = plan.exit_step
    steps = cfg.steps
    fwd = dict(remat=cfg.remat, attention_impl=cfg.attention_impl)
    per_step = cfg.cache == "per_step"

    def ring_of(j):
        return j if per_step else 0

    def advance(j, x, v, renoise):
        if cfg.update == "euler":
            return euler_step(x, v, sigmas[j], sigmas[j + 1])
        x0 = x.astype(jnp.float32) - sigmas[j] * v.astype(jnp.float32)
        return ((1 - sigmas[j + 1]) * x0 + sigmas[j + 1] * renoise[j]).astype(x.dtype)

    def frozen_step(j, x, rings, first_frame, audio, dists):
        v, ring = dit_sequence.block_step(frozen_model, x, jnp.full((b,), timesteps[j]), frozen_text, audio,
                                          _ring_at(rings, ring_of(j)), sink, first_frame, dists[j], **fwd)
        return v, _ring_put(rings, ring_of(j), ring)

    def block_no_grad(rings, xs):
        # One traced forward serves every step: steps after the exit are skipped and the exit step records its input
        # and x0 guess. The exit forward's keys are the last written to the exit step's ring.
        index, noise, renoise, audio, dists = xs
        first_frame = index * cfg.frames_per_block
        audio = jax.lax.stop_gradient(frozen_model.encode_audio(audio))    # shared by the block's steps

        def step(j, state):
            def run(state):
                x, rings, x0, x_in = state
                v, rings = frozen_step(j, x, rings, first_frame, audio, dists)
                guess = x.astype(jnp.float32) - sigmas[j] * v.astype(jnp.float32)
                exiting = j == s
                return (jnp.where(exiting, x, advance(j, x, v, renoise)), rings, jnp.where(exiting, guess, x0),
                        jnp.where(exiting, x, x_in))
            return jax.lax.cond(j <= s, run, lambda st: st, state)

        x = noise.astype(dt)
        _, rings, x0, x_in = jax.lax.fori_loop(0, steps, step, (x, rings, jnp.zeros(x.shape, jnp.float32), x))
        return rings, (x0, x_in)

    if grad:
        exit_model = networks.adapted(lora, base)
        exit_text = exit_model.embed_text(cond["text"])

    def block_grad(rings, xs):
        index, noise, renoise, raw_audio, dists = xs
        first_frame = index * cfg.frames_per_block
        audio = jax.lax.stop_gradient(frozen_model.encode_audio(raw_audio))

        def maybe_denoise(j, state):
            def run(state):
                x, rings = state
                v, rings = frozen_step(j, x, rings, first_frame, audio, dists)
                return advance(j, x, v, renoise), rings
            return jax.lax.cond(j < s, run, lambda st: st, state)

        x = noise.astype(dt)
        if steps > 1:
            x, rings = jax.lax.fori_loop(0, steps - 1, maybe_denoise, (x, rings))
        x = jax.lax.stop_gradient(x)
        v, ring = dit_sequence.block_step(exit_model, x, jnp.full((b,), timesteps[s]), exit_text, raw_audio,
                                          _ring_at(rings, ring_of(s)), sink, first_frame, dists[s], **fwd)
        x0 = x.astype(jnp.float32) - sigmas[s] * v.astype(jnp.float32)
        return _ring_put(rings, ring_of(s), jax.lax.stop_gradient(ring)), (x0, x)

    ring = _empty_ring(networks, cfg, b, h, w)
    n_rings = steps if per_step else 1
    rings = jax.tree.map(lambda a: jnp.broadcast_to(a, (n_rings, *a.shape)), ring)
    xs = (jnp.arange(cfg.num_blocks, dtype=jnp.int32), plan.noise,
          plan.renoise if cfg.update == "renoise" else jnp.zeros((cfg.num_blocks, 0)),
          audio_blocks(cond["audio"], cfg), plan.dists)
    _, (x0s, inputs) = jax.lax.scan(block_grad if grad else block_no_grad, rings, xs)
    return Rollout(video=_blocks_to_video(x0s), exit_inputs=inputs, sink=sink)


def exit_vjp(networks: Networks, lora, base, cond: Mapping, plan: RolloutPlan, result: Rollout, cotangent,
             cfg: RolloutConfig):
    """Gradient of `sum(cotangent * video)` with respect to `lora`, one block's exit forward at a time.

    `result` comes from `rollout(..., grad=False)` with the same `lora` and `plan`; its exit inputs are replayed and
    the ring is rebuilt from the recomputed exit forwards, which reproduces the rollout exactly.
    Returns (gradient tree, video recomputed by the exit forwards).
    """
    timesteps, sigmas = (jnp.asarray(a) for a in cfg.schedule())
    s = plan.exit_step
    b, _, _, h, w = cond["ref_latents"].shape
    cot_blocks = video_to_blocks(cotangent.astype(jnp.float32), cfg.frames_per_block)
    fwd = dict(remat=cfg.remat, attention_impl=cfg.attention_impl)
    sink = result.sink

    def block(carry, xs):
        ring, acc = carry
        index, x, audio, dists, cot = xs

        def exit_forward(lora_):
            model = networks.adapted(lora_, base)
            text = model.embed_text(cond["text"])
            v, new_ring = dit_sequence.block_step(model, x, jnp.full((b,), timesteps[s]), text, audio, ring, sink,
                                                  index * cfg.frames_per_block, dists[s], **fwd)
            return x.astype(jnp.float32) - sigmas[s] * v.astype(jnp.float32), new_ring

        x0, pullback, new_ring = jax.vjp(exit_forward, lora, has_aux=True)
        (g,) = pullback(cot)
        acc = jax.tree.map(jnp.add, acc, g)
        return (jax.lax.stop_gradient(new_ring), acc), x0

    acc = jax.tree.map(jnp.zeros_like, lora)
    ring = _empty_ring(networks, cfg, b, h, w)
    xs = (jnp.arange(cfg.num_blocks, dtype=jnp.int32), result.exit_inputs, audio_blocks(cond["audio"], cfg),
          plan.dists, cot_blocks)
    (_, grads), x0s = jax.lax.scan(block, (ring, acc), xs)
    return grads, _blocks_to_video(x0s)
