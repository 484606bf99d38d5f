"""Timestep-forcing pipeline parallelism (TPP, architecture.md section 5) with `jax.shard_map` and `lax.ppermute`.

Stage i of the `pipeline` mesh axis runs denoising step i of every block, with its own KV ring (step i's keys: timestep
forcing) and its own sink cache (each stage runs the sink prefill itself, like the official DiT ranks). One *tick*:

  1. stage 0 takes in a fresh block (noise, encoded audio, pose latents, the block's rolling distances); the audio
     is encoded once per block, as `StreamEngine` does, and travels with the latents (it is smaller than the raw
     wav2vec2 features);
  2. every stage runs its denoising step on the block it holds (a bubble slot computes but writes nothing back);
  3. the block leaving the last stage is made visible to every device with a `psum` of the masked value (it is the
     tick's output, and block 0's first frame is the new sink latent that every stage prefills before block
     `sink_replace_block`);
  4. `ppermute` moves every stage's latents, and the block's audio, pose and distances with them, one stage on.

After S - 1 fill ticks one clean block leaves per tick. Block noise and rolling distances come from the same
functions and keys as `StreamEngine` (`block_noise`, `rolling_distances` of the block index), so a seed gives the same
stream on one device and on a pipeline.

Decoding runs outside the pipeline program on a decode device: a device outside the mesh (`decode_on="separate"`, the
official 4+1 layout; the host dispatches the decode of the block that left at tick t and immediately dispatches tick
t + 1, so the decode overlaps the next tick) or the last stage's device (`decode_on="last_stage"`, where the decode
queues behind that stage's work). The decoder has `StreamEngine`'s interface: `params`, `init(params, latents_shape)
-> cache`, `prime(params, cache, motion_latents) -> cache`, `decode(params, cache, latents) -> (frames, cache)`.

Multi-process (stages on several hosts): call `liveavatar_jax.parallel.distributed.initialize()` first; every
process then runs the same host loop (the same calls in the same order). Only the process owning the decode device
decodes; the others get `frames = None`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from liveavatar_jax.models.dit import CausalS2VDiT
from liveavatar_jax.parallel import mesh as mesh_lib
from liveavatar_jax.parallel.mesh import PIPELINE
from liveavatar_jax.sampling.flow_match import euler_step, flow_match_schedule
from liveavatar_jax.streaming.caches import RingCache, SinkCache
from liveavatar_jax.streaming.engine import StreamConfig, StreamContext, block_noise, rolling_distances

DECODE_PLACEMENTS = ("separate", "last_stage")
_NO_ROLL = -(2 ** 30)   # a rolling distance that keeps the reference at its prefill position (as StreamEngine)


@struct.dataclass
class StageSlots:
    """What each stage holds between ticks, stacked [S, ...] over stages and sharded over `pipeline`."""
    x: jnp.ndarray        # [S, B, 16, F, h, w] the latents stage i denoises next
    audio_tokens: jnp.ndarray   # [S, B, F, 5, D] that block's encoded audio (it travels with the latents)
    audio_global: jnp.ndarray   # [S, B, F, 1, D]
    cond: jnp.ndarray     # [S, B, 16, F, h, w] its pose latents (zeros without a pose video: same maths as none)
    dists: jnp.ndarray    # [S, steps] its rolling distance per step
    block: jnp.ndarray    # [S] its global block index
    live: jnp.ndarray     # [S] 1 for a real block, 0 for a bubble


@struct.dataclass
class Inflow:
    """The block entering stage 0 this tick (replicated)."""
    x: jnp.ndarray
    audio_tokens: jnp.ndarray
    audio_global: jnp.ndarray
    cond: jnp.ndarray
    dists: jnp.ndarray
    block: jnp.ndarray
    live: jnp.ndarray


@struct.dataclass
class TPPState:
    rings: RingCache            # [S, layers, B, capacity, heads, head_dim]: stage i's ring = step i's ring
    sink: SinkCache             # [S, layers, B, L_c, heads, head_dim]: one prefill per stage
    slots: StageSlots
    first_latent: jnp.ndarray   # [B, 16, 1, h, w] replicated: block 0's first clean frame (the AAS sink)
    key: jax.Array
    decoder: Any = None         # the decoder's cache, on the decode device (None elsewhere)
    # Host-side schedule (static, identical on every process): the global index of the next block to enter stage 0,
    # and the block each stage worked on in the last tick (None: a bubble). The host loop reads these instead of
    # device values, so it never waits on the pipeline to know which tick emits which block.
    block: int = struct.field(pytree_node=False, default=0)
    stages: tuple = struct.field(pytree_node=False, default=())

    @property
    def in_flight(self) -> int:
        """Blocks that entered but have not left yet."""
        return sum(b is not None for b in self.stages[:-1])


def _as_float32(x):
    return x if getattr(x, "dtype", None) == np.float32 else (x.astype(jnp.float32) if isinstance(x, jax.Array) else
                                            np.asarray(x, np.float32))


def _squeeze(tree):
    return jax.tree.map(lambda a: a[0], tree)


def _unsqueeze(tree):
    return jax.tree.map(lambda a: a[None], tree)


def _replica(x):
    """This process's copy of a replicated array (an array on one of its devices)."""
    return x.addressable_shards[0].data if isinstance(x, jax.Array) else x


def _local_on(x, device):
    """A copy of (a replica of) `x` committed to `device`, taken from a local shard when one is there (committed,
    so that jitted functions see the same placement whatever `x` was, and compile once)."""
    if isinstance(x, jax.Array):
        shards = x.addressable_shards
        for s in shards:
            if s.device == device:
                return jax.device_put(s.data, device)
        if shards and x.is_fully_replicated:
            return jax.device_put(shards[0].data, device)
    return jax.device_put(x, device)


class LinearPreviewDecoder:
    """A cheap stateful stand-in for the streaming VAE, with `StreamEngine`'s decoder interface (`params`,
    `init(params, shape)`, `prime(params, cache, motion)`, `decode(params, cache, latents)`): each latent frame becomes
    4 video frames of a fixed random 16 -> 3 channel projection of (latent + half the previous latent frame). The
    previous frame rides in the cache, so the output depends on decode order and on nothing else advancing it; tests
    and benchmarks use it where the real VAE is not wanted."""

    def __init__(self, channels: int = 16, seed: int = 0, frames_per_latent: int = 4):
        self.params = np.random.default_rng(seed).normal(size=(3, channels)).astype(np.float32) / np.sqrt(channels)
        self.frames_per_latent = frames_per_latent

    def init(self, params, latents_shape):
        b, c, _, h, w = latents_shape
        return jnp.zeros((b, c, 1, h, w), jnp.float32)

    def prime(self, params, cache, motion_latents):
        return motion_latents[:, :, -1:].astype(jnp.float32)

    def decode(self, params, cache, latents):
        x = latents.astype(jnp.float32)
        prev = jnp.concatenate([cache, x[:, :, :-1]], axis=2)
        y = jnp.einsum("oc,bcfhw->bofhw", params, x + 0.5 * prev)
        return jnp.repeat(y, self.frames_per_latent, axis=2), x[:, :, -1:]


class TPPEngine:
    """`StreamEngine`'s interface (`init`, `run`, `step`) on an S-stage pipeline, S = `stream_cfg.steps`.

    mesh: a mesh from `make_tpp_mesh` (default: the first S devices); its `pipeline` axis must equal the step count.
    decoder / decode_on / decode_device: see the module docstring; `decode_device` overrides the choice.
    profile: block on every tick and decode and record their wall times (`tick_breakdown`); without it the host never
    waits, so decodes overlap later ticks (only the host loop's period is recorded then).
    """

    def __init__(self, model: CausalS2VDiT, stream_cfg: StreamConfig = StreamConfig(), mesh=None, decoder=None,
                 decode_on: str = "separate", decode_device=None, profile: bool = False):
        cfg = stream_cfg
        if cfg.steps < 1:
            raise ValueError(f"steps must be positive, got {cfg.steps}")
        if cfg.sink_replace_block is not None and cfg.sink_replace_block < cfg.steps:
            # Stage 0 meets block R at tick R, but block 0 leaves the last stage only at the end of tick S - 1.
            raise ValueError(f"sink_replace_block={cfg.sink_replace_block} comes before block 0 has left a "
                             f"{cfg.steps}-stage pipeline; it must be >= steps (the official value is 4)")
        if decode_on not in DECODE_PLACEMENTS:
            raise ValueError(f"decode_on must be one of {DECODE_PLACEMENTS}, got {decode_on!r}")
        self.mesh = mesh_lib.make_tpp_mesh(cfg.steps) if mesh is None else mesh
        if PIPELINE not in self.mesh.shape or self.mesh.shape[PIPELINE] != cfg.steps:
            raise ValueError(f"the mesh's '{PIPELINE}' axis must have size steps={cfg.steps}, "
                             f"mesh shape is {dict(self.mesh.shape)}")
        if not any(d.process_index == jax.process_index() for d in self.mesh.devices.flat):
            raise ValueError(f"process {jax.process_index()} holds no device of the pipeline mesh; every process "
                             f"that runs the host loop must own at least one stage")
        self.cfg = cfg
        self.model_cfg = model.cfg
        self.graphdef, params = nnx.split(model)
        self.params = mesh_lib.put_global(params, mesh_lib.param_shardings(params, self.mesh))
        sched = flow_match_schedule(cfg.steps, shift=cfg.shift)
        self.timesteps = np.asarray(sched.timesteps, np.float32)
        self.sigmas = np.asarray(sched.sigmas, np.float32)

        self.decoder = decoder
        self.decode_on = decode_on
        self.decode_device = None
        if decoder is not None:
            if decode_device is not None:
                self.decode_device = decode_device
            elif decode_on == "last_stage":
                self.decode_device = mesh_lib.stage_devices(self.mesh)[-1]
            else:
                self.decode_device = mesh_lib.spare_device(self.mesh)
                if self.decode_device is None:
                    raise ValueError(f"decode_on='separate' needs a device outside the {self.mesh.devices.size}-"
                                     f"device mesh; none is left (use decode_on='last_stage')")
        self.decodes_here = self.decode_device is not None and \
            self.decode_device.process_index == jax.process_index()
        self.decoder_params = jax.device_put(decoder.params, self.decode_device) if self.decodes_here else None
        self.profile = profile
        self.timings: list[dict] = []

        self._init = jax.jit(self._init_impl, static_argnames=("key_impl",))
        self._tick = jax.jit(self._tick_impl, donate_argnums=(1,))
        self._prime = jax.jit(self._prime_impl, static_argnums=(2,))
        self._decode = jax.jit(self._decode_impl, donate_argnums=(1,))
        self._text_kv = jax.jit(lambda params, text, n: self.merged(params).text_kv(text, n), static_argnums=2)

    def merged(self, params):
        return nnx.merge(self.graphdef, params)

    # ------------------------------------------------------------------------------------------------- shapes

    def _shapes(self, ctx: StreamContext):
        mc, cfg = self.model_cfg, self.cfg
        b, _, _, h, w = ctx.ref_latents.shape
        latent = (b, mc.in_dim, cfg.frames_per_block, h, w)
        audio = (b, mc.audio_layers, mc.audio_dim, 4 * cfg.frames_per_block)
        return latent, audio

    def _stage_sharding(self, tree, spec):
        return jax.tree.map(lambda a: NamedSharding(self.mesh, mesh_lib.fit_spec(spec, a.shape, self.mesh)), tree)

    # -------------------------------------------------------------------------------------------------- init

    def _init_impl(self, params, ctx: StreamContext, key_data, key_impl):
        mc, cfg, S = self.model_cfg, self.cfg, self.cfg.steps
        latent, _ = self._shapes(ctx)
        b, _, f, h, w = latent
        n_frame = (h // mc.patch_size[1]) * (w // mc.patch_size[2])

        def prefill(params, text, ref, motion):
            # Every stage prefills its own sink, as every official DiT rank does (no transfer of the cond cache).
            return _unsqueeze(self.merged(params).sink_prefill(ref, motion, text))

        sink = jax.shard_map(prefill, mesh=self.mesh, in_specs=P(), out_specs=P(PIPELINE),
                             axis_names={PIPELINE})(params, ctx.text, ctx.ref_latents, ctx.motion_latents)
        sink = jax.lax.with_sharding_constraint(sink, self._stage_sharding(sink, mesh_lib.SINK_SPEC))
        ring = RingCache.zeros(mc.num_layers, b, cfg.ring_frames * n_frame, mc.num_heads, mc.head_dim, mc.jnp_dtype)
        rings = jax.tree.map(lambda a: jnp.zeros((S, *a.shape), a.dtype), ring)
        rings = jax.lax.with_sharding_constraint(rings, self._stage_sharding(rings, mesh_lib.RING_SPEC))
        slots = StageSlots(x=jnp.zeros((S, *latent), mc.jnp_dtype),
                           audio_tokens=jnp.zeros((S, b, f, mc.num_audio_token + 1, mc.dim), mc.jnp_dtype),
                           audio_global=jnp.zeros((S, b, f, 1, mc.dim), mc.jnp_dtype),
                           cond=jnp.zeros((S, *latent), jnp.float32), dists=jnp.zeros((S, S), jnp.int32),
                           block=jnp.zeros((S,), jnp.int32), live=jnp.zeros((S,), jnp.int32))
        slots = jax.lax.with_sharding_constraint(slots, self._stage_sharding(slots, mesh_lib.STAGE_SPEC))
        return TPPState(rings=rings, sink=sink, slots=slots, first_latent=jnp.zeros_like(ctx.ref_latents, mc.jnp_dtype),
                        key=jax.random.wrap_key_data(key_data, impl=key_impl))

    def with_text_kv(self, ctx: StreamContext, text_tokens: int | None = None) -> StreamContext:
        """The context with every layer's text keys/values computed once (as `StreamEngine.with_text_kv`)."""
        ctx = self.prepare(ctx)
        if ctx.text_kv is not None:
            return ctx
        return ctx.replace(text_kv=self._text_kv(self.params, ctx.text, text_tokens))

    def prepare(self, ctx: StreamContext) -> StreamContext:
        """The context replicated over the mesh (done once; `init`, `run` and `step` accept either form)."""
        return mesh_lib.replicate(ctx, self.mesh)

    def init(self, ctx: StreamContext, seed_or_key) -> TPPState:
        key = jax.random.key(seed_or_key) if isinstance(seed_or_key, int) else seed_or_key
        ctx = self.prepare(ctx)
        # Raw key bits, so that every process can assemble the same replicated key.
        key_data = mesh_lib.replicate(np.asarray(jax.random.key_data(key)), self.mesh)
        state = self._init(self.params, ctx, key_data, key_impl=jax.random.key_impl(key))
        state = state.replace(block=0, stages=(None,) * self.cfg.steps)
        self.timings = []
        if self.decodes_here:
            motion = _local_on(ctx.motion_latents, self.decode_device)
            state = state.replace(decoder=self._prime(self.decoder_params, motion, self._shapes(ctx)[0]))
        return state

    # ------------------------------------------------------------------------------------------------ one tick

    def _stage_tick(self, params, text, text_kv, motion, slots, rings, sink, first_latent, inflow):
        """One tick on one stage (inside shard_map: leading stage axes have size 1)."""
        cfg, mc, S = self.cfg, self.model_cfg, self.cfg.steps
        model = self.merged(params)
        slots, ring, sink = _squeeze(slots), _squeeze(rings), _squeeze(sink)
        stage = jax.lax.axis_index(PIPELINE)
        entering = stage == 0
        x = jnp.where(entering, inflow.x, slots.x)
        audio = (jnp.where(entering, inflow.audio_tokens, slots.audio_tokens),
                 jnp.where(entering, inflow.audio_global, slots.audio_global))
        cond = jnp.where(entering, inflow.cond, slots.cond)
        dists = jnp.where(entering, inflow.dists, slots.dists)
        blk = jnp.where(entering, inflow.block, slots.block)
        live = jnp.where(entering, inflow.live, slots.live) > 0

        if cfg.sink_replace_block is not None:
            def refill():
                new = model.sink_prefill(first_latent, motion, text)
                return jax.lax.pcast(new, (PIPELINE,), to="varying")
            sink = jax.lax.cond(live & (blk == cfg.sink_replace_block), refill, lambda: sink)

        b, _, f, h, w = x.shape
        first_frame = blk * f
        t = jnp.asarray(self.timesteps)[stage]
        v, written = model.block_forward(x, jnp.full((b,), t), text, audio, ring, sink, first_frame, dists[stage],
                                         cond_states=cond, text_kv=text_kv)
        ring = _keep_slot_if(live, ring, written, first_frame, f, mc, h, w)
        x = euler_step(x, v, jnp.asarray(self.sigmas)[stage], jnp.asarray(self.sigmas)[stage + 1])

        # The leaving block, replicated: the tick's output, and (block 0) the new sink latent of every stage.
        leaving = (stage == S - 1) & live
        out_x = jax.lax.psum(jnp.where(leaving, x, jnp.zeros_like(x)), PIPELINE)
        first_left = jax.lax.psum((leaving & (blk == 0)).astype(jnp.int32), PIPELINE) > 0
        first_latent = jnp.where(first_left, out_x[:, :, :1], first_latent)

        moved = StageSlots(x=x, audio_tokens=audio[0], audio_global=audio[1], cond=cond, dists=dists, block=blk,
                           live=live.astype(jnp.int32))
        if S > 1:
            # Non-cyclic shift: stage 0 receives zeros and always overwrites them with the inflow.
            moved = jax.lax.ppermute(moved, PIPELINE, [(i, i + 1) for i in range(S - 1)])
        return _unsqueeze(moved), _unsqueeze(ring), _unsqueeze(sink), first_latent, out_x

    def _tick_impl(self, params, core: TPPState, ctx: StreamContext, audio, noise, dists, cond, block, live):
        cfg, mc = self.cfg, self.model_cfg
        if not cfg.rolling_sink:
            dists = jnp.full((cfg.steps,), _NO_ROLL, jnp.int32)
        tokens, glob = self.merged(params).encode_audio(audio)
        inflow = Inflow(x=noise.astype(mc.jnp_dtype), audio_tokens=tokens, audio_global=glob, cond=cond,
                        dists=dists.astype(jnp.int32), block=block, live=live)
        stage_spec = P(PIPELINE)
        slots, rings, sink, first_latent, out_x = jax.shard_map(
            self._stage_tick, mesh=self.mesh, axis_names={PIPELINE},
            in_specs=(P(), P(), P(), P(), stage_spec, stage_spec, stage_spec, P(), P()),
            out_specs=(stage_spec, stage_spec, stage_spec, P(), P()),
        )(params, ctx.text, ctx.text_kv, ctx.motion_latents, core.slots, core.rings, core.sink, core.first_latent,
          inflow)
        return core.replace(slots=slots, rings=rings, sink=sink, first_latent=first_latent), out_x

    # -------------------------------------------------------------------------------------------------- decode

    def _prime_impl(self, dec_params, motion, latent_shape):
        return self.decoder.prime(dec_params, self.decoder.init(dec_params, latent_shape), motion)

    def _decode_impl(self, dec_params, cache, x):
        return self.decoder.decode(dec_params, cache, x)

    # ------------------------------------------------------------------------------------------------ host loop

    def _advance(self, state: TPPState, ctx, audio, noise, dists, cond):
        t0 = time.perf_counter()
        cfg = self.cfg
        latent, audio_shape = self._shapes(ctx)
        live = audio is not None
        g = state.block
        if live:
            if noise is None:
                noise = draw_block_noise(state.key, g, latent)
            if dists is None:
                dists = draw_rolling_distances(state.key, g, cfg.steps, cfg.relative_dist)
        else:   # a bubble: nothing enters, nothing is written
            audio, noise, dists = (np.zeros(audio_shape, np.float32), np.zeros(latent, np.float32),
                                   np.zeros((cfg.steps,), np.int32))
        if cond is None:
            cond = np.zeros(latent, np.float32)
        # One dtype whatever the caller passes (exact: the encoder and the model read them in float32 or lower), so
        # that live and bubble ticks share one compiled program.
        audio, noise, cond = (_as_float32(a) for a in (audio, noise, cond))
        inputs = mesh_lib.replicate((audio, noise, dists, cond, np.int32(g), np.int32(live)), self.mesh)
        # Static fields stay out of the jitted call, or every tick would retrace.
        core = state.replace(decoder=None, block=0, stages=())
        core, out_x = self._tick(self.params, core, ctx, *inputs)
        stages = ((g if live else None),) + state.stages[:-1]
        leaving = stages[-1]
        out = {"latents": out_x, "block": leaving, "valid": leaving is not None}
        record = {"start": t0, "valid": leaving is not None}
        if self.profile:
            jax.block_until_ready(out_x)
            record["tick_s"] = time.perf_counter() - t0
        decoder_cache = state.decoder
        if self.decoder is not None:
            out["frames"] = None
            if self.decodes_here and leaving is not None:
                t1 = time.perf_counter()
                # Dispatched, not awaited: the decode device works on this block while the next tick runs.
                out["frames"], decoder_cache = self._decode(self.decoder_params, decoder_cache,
                                                            _local_on(out_x, self.decode_device))
                if self.profile:
                    jax.block_until_ready(out["frames"])
                    record["decode_s"] = time.perf_counter() - t1
        if self.profile:
            record["end"] = time.perf_counter()
        self.timings.append(record)
        return core.replace(decoder=decoder_cache, block=g + int(live), stages=stages), out

    def step(self, state: TPPState, ctx: StreamContext, audio=None, *, noise=None, dists=None, cond=None):
        """One tick (live use). `audio` [B, layers, C_a, 4F] feeds block `state.block` into stage 0 (noise, distances
        and pose latents as in `StreamEngine.step`); `audio=None` feeds a bubble, to drain the pipeline. Returns the
        block that left the last stage: {"latents" [B, 16, F, h, w] (replicated), "block" (its index, None during the
        S - 1 fill ticks), "valid", "frames" (with a decoder, on the decoding process)}. The state is donated."""
        return self._advance(state, self.prepare(ctx), audio, noise, dists, cond)

    def flush(self, state: TPPState, ctx: StreamContext):
        """Bubble ticks until every block in flight has left. Returns (state, [their outputs, in block order])."""
        ctx = self.prepare(ctx)
        outs = []
        while state.in_flight:
            state, out = self._advance(state, ctx, None, None, None, None)
            outs.append(out)
        return state, outs

    def run(self, state: TPPState, ctx: StreamContext, audio_blocks, *, noise=None, dists=None, cond=None):
        """Feeds N blocks, then drains. audio_blocks [N, B, layers, C_a, 4F]; optional per-block noise
        [N, B, 16, F, h, w], rolling distances [N, steps] and pose latents [N, B, 16, F, h, w]. Returns
        (state, {"latents": [N, B, 16, F, h, w], "blocks": their indices, "frames": [N, ...] (with a decoder, on the
        decoding process)}) in block order (blocks already in flight come first); the pipeline is empty afterwards.
        The results are this process's local copies (every process holds every leaving block)."""
        ctx = self.prepare(ctx)
        outs = []
        for i in range(int(audio_blocks.shape[0])):
            state, out = self._advance(state, ctx, audio_blocks[i], None if noise is None else noise[i],
                                       None if dists is None else dists[i], None if cond is None else cond[i])
            outs.append(out)
        state, tail = self.flush(state, ctx)
        outs = [o for o in outs + tail if o["valid"]]
        result = {"latents": jnp.stack([_replica(o["latents"]) for o in outs]),
                  "blocks": np.asarray([o["block"] for o in outs], np.int32)}
        if self.decoder is not None:
            result["frames"] = jnp.stack([o["frames"] for o in outs]) if self.decodes_here else None
        return state, result

    # ------------------------------------------------------------------------------------------------- timings

    def tick_breakdown(self) -> dict:
        """Per-tick timing summary of the ticks since `init` (for a CLI's JSON summary); see `timing_summary`."""
        out = timing_summary(self.timings, 4 * self.cfg.frames_per_block)
        out.update(decode_on=self.decode_on if self.decoder is not None else None,
                   stage_devices=[str(d) for d in mesh_lib.stage_devices(self.mesh)],
                   decode_device=None if self.decode_device is None else str(self.decode_device))
        return out


_block_noise_jit = jax.jit(block_noise, static_argnums=(2,))
_rolling_distances_jit = jax.jit(rolling_distances, static_argnums=(2, 3))


def _index(block):
    """A strongly typed int32 block index (a weakly typed Python int would compile a second sampler)."""
    return block if isinstance(block, jax.Array) else np.int32(block)


def draw_block_noise(key, block, shape):
    """`StreamEngine`'s noise of block `block` (`block_noise`), drawn on this process's first device. Outside the
    pipeline program because the Gaussian sampler is slow to compile on CPU and this way one compilation serves
    every mesh; threefry is exact, so every process draws the same values."""
    dev = jax.local_devices()[0]
    return _block_noise_jit(_local_on(key, dev), _local_on(_index(block), dev), tuple(shape))


def draw_rolling_distances(key, block, steps: int, dist_range):
    """`StreamEngine`'s rolling distances of block `block` (one per step), drawn like `draw_block_noise`."""
    dev = jax.local_devices()[0]
    return _rolling_distances_jit(_local_on(key, dev), _local_on(_index(block), dev), steps, tuple(dist_range))


def _keep_slot_if(live, old: RingCache, new: RingCache, first_frame, f: int, mc, h: int, w: int) -> RingCache:
    """`new`, with the slot `block_forward` wrote put back to `old` when the stage held no block (`live` false), so a
    bubble tick leaves the ring as it was. Only that slot is selected, never the whole ring (11 GB per stage at
    720x400)."""
    n_frame = (h // mc.patch_size[1]) * (w // mc.patch_size[2])
    ring_frames = old.k.shape[2] // n_frame
    offset = (first_frame % ring_frames) * n_frame     # the slot block_forward wrote
    size = f * n_frame

    def one(o, nw):
        fresh = jax.lax.dynamic_slice_in_dim(nw, offset, size, axis=2)
        stale = jax.lax.dynamic_slice_in_dim(o, offset, size, axis=2)
        return jax.lax.dynamic_update_slice_in_dim(nw, jnp.where(live, fresh, stale), offset, axis=2)
    return jax.tree.map(one, old, new)


def _median(xs):
    return float(np.median(xs)) if len(xs) else None


def timing_summary(records: list[dict], frames_per_block: int) -> dict:
    """Summarises per-tick records of a stream that started from an empty pipeline.

    Always: the tick count, fill ticks, blocks per tick after the fill (1.0 for a full pipeline) and the host loop's
    period per tick (the steady tick time when the consumer waits for each block, as a live player does). With
    `profile=True` also the blocking tick and decode times, the time to the first decoded block and the throughput
    model's steady FPS = frames_per_block / max(tick, decode) (the decode overlaps the next tick on its own device).
    The first tick compiles, so steady figures use the ticks after the first block left."""
    if not records:
        return {"ticks": 0}
    valid = [r["valid"] for r in records]
    first = valid.index(True) if True in valid else len(valid)
    after = valid[first:]
    starts = [r["start"] for r in records]
    periods = np.diff(starts)[first:] if len(starts) > first + 1 else np.zeros(0)
    out = {
        "ticks": len(records),
        "fill_ticks": first,
        "blocks_per_tick_after_fill": (sum(after) / len(after)) if after else 0.0,
        "tick_period_s_median": _median(periods),
    }
    if "tick_s" in records[0]:
        tick = [r["tick_s"] for r in records[first + 1:]]
        decode = [r["decode_s"] for r in records[first + 1:] if "decode_s" in r]
        t_tick, t_dec = _median(tick), _median(decode)
        bound = max(t_tick or 0.0, t_dec or 0.0)
        out.update({
            "tick_s": [round(r["tick_s"], 6) for r in records],
            "tick_s_median": t_tick,
            "decode_s_median": t_dec,
            "time_to_first_block_s": records[first]["end"] - records[0]["start"] if first < len(records) else None,
            "steady_fps_model": frames_per_block / bound if bound else None,
        })
    elif out["tick_period_s_median"]:
        out["steady_fps_measured"] = frames_per_block / out["tick_period_s_median"]
    return out


@dataclasses.dataclass
class StageProfile:
    stage_s: list        # one denoising step of one block on each stage's device, alone
    transfer_s: float    # the tick's collectives alone (ppermute of the slots + the psum of the leaving block)


def profile_stages(engine: TPPEngine, state: TPPState, ctx: StreamContext, audio, *, repeats: int = 3) -> StageProfile:
    """Times each stage's compute alone on its own device (addressable stages only) and the tick's transfers alone,
    so that a tick = max(stage) + transfers can be checked against the measured tick time."""
    cfg, mc, S = engine.cfg, engine.model_cfg, engine.cfg.steps
    ctx = engine.prepare(ctx)
    latent, audio_shape = engine._shapes(ctx)

    def stage_compute(params, x, t, s0, s1, text, text_kv, audio, ring, sink, block, dist):
        model = engine.merged(params)
        v, ring = model.block_forward(x, jnp.full((x.shape[0],), t), text, audio, ring, sink, block * x.shape[2],
                                      dist, cond_states=jnp.zeros(x.shape, jnp.float32), text_kv=text_kv)
        return euler_step(x, v, s0, s1), ring

    fn = jax.jit(stage_compute)
    encode = jax.jit(lambda params, audio: engine.merged(params).encode_audio(audio))
    # Ring and sink contents do not change the work: zeros of the right shapes, with a full ring (block ring_blocks).
    ring_shape = state.rings.k.shape[1:]
    sink_shape = state.sink.k.shape[1:]
    stage_s = []
    for i, dev in enumerate(mesh_lib.stage_devices(engine.mesh)):
        if dev.process_index != jax.process_index():
            stage_s.append(None)
            continue
        with jax.default_device(dev):
            ring = RingCache(jnp.zeros(ring_shape, state.rings.k.dtype), jnp.zeros(ring_shape, state.rings.v.dtype))
            sink = SinkCache(jnp.zeros(sink_shape, state.sink.k.dtype), jnp.zeros(sink_shape, state.sink.v.dtype))
        params = jax.device_put(engine.params, dev)
        # each stage receives its block's audio already encoded (stage 0 encodes it once per block)
        tokens = encode(params, jax.device_put(np.asarray(audio, np.float32).reshape(audio_shape), dev))
        text_kv = None if ctx.text_kv is None else jax.tree.map(lambda a: _local_on(a, dev), ctx.text_kv)
        args = (params, jax.device_put(np.zeros(latent, mc.jnp_dtype), dev), engine.timesteps[i],
                engine.sigmas[i], engine.sigmas[i + 1], _local_on(ctx.text, dev), text_kv, tokens, ring, sink,
                np.int32(cfg.ring_blocks), np.int32(cfg.relative_dist[1]))
        jax.block_until_ready(fn(*args))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times.append(time.perf_counter() - t0)
        stage_s.append(float(np.median(times)))

    def transfers(slots, x):
        moved = jax.lax.ppermute(_squeeze(slots), PIPELINE, [(i, i + 1) for i in range(S - 1)]) if S > 1 \
            else _squeeze(slots)
        return _unsqueeze(moved), jax.lax.psum(x[0], PIPELINE)

    move = jax.jit(jax.shard_map(transfers, mesh=engine.mesh, axis_names={PIPELINE},
                                 in_specs=(P(PIPELINE), P(PIPELINE)), out_specs=(P(PIPELINE), P())))
    xs = state.slots.x
    jax.block_until_ready(move(state.slots, xs))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(move(state.slots, xs))
        times.append(time.perf_counter() - t0)
    return StageProfile(stage_s=stage_s, transfer_s=float(np.median(times)))
