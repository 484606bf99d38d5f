"""Training-time forwards of the causal S2V DiT, built from `CausalS2VDiT`'s own submodules.

Two entry points, both pure functions of a (merged) model, with per-layer rematerialisation (`remat`, a policy name
from `REMAT_POLICIES`) because the inference forwards in `dit.py` scan their layers without it:

* `sequence_forward`: the whole clip at once (Stage 1 student, Stage 2 teacher and critic). Token layout
  `[pad | reference, motion | noisy frames]`: the condition tokens (t = 0 modulation, reference at RoPE time 30,
  FramePack motion tokens at their negative times) ride in the same sequence as the noisy frames, padded at the front
  to whole frames so that the block's per-frame modulation applies unchanged. Two attention patterns:
    - `"block_causal"` (the official training mask, architecture.md 3.7): condition queries see condition keys only;
      the noisy queries of block b see the condition keys and the noisy keys of blocks 0..b. Computed as one
      attention call per query block over a growing key prefix (static slices), never with a query-by-key mask.
      The condition tokens therefore compute exactly what `sink_prefill` computes, and block b computes what the
      streaming `block_forward` computes with every earlier block's keys in its ring.
    - `"bidirectional"` (native Wan-S2V, teacher and critic): one attention call in which every token sees every
      token.
* `block_step`: one block at one denoising step against a `RingCache` and the sink (the student's rollout); the
  same computation as `CausalS2VDiT.block_forward` (tests hold them equal), with remat.

`attention_impl` selects the kernel (`"xla"` exact math, `"cudnn"` fused flash attention on GPU, required at 14B
sequence lengths: none of the calls here needs a mask).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from liveavatar_jax.models import rope
from liveavatar_jax.models.attention import attention
from liveavatar_jax.models.dit import CausalS2VDiT, layer_norm, modulate
from liveavatar_jax.streaming.caches import RingCache, SinkCache

REMAT_POLICIES = {
    "none": None,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}
MODES = ("block_causal", "bidirectional")


def _policy(remat: str | None):
    if remat is None:
        return None
    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {remat!r}; choose one of {tuple(REMAT_POLICIES)}")
    return REMAT_POLICIES[remat]


def scan_layers(model: CausalS2VDiT, x, e0, text, attend, cache_xs, inject=None, remat: str | None = None):
    """All transformer blocks under `lax.scan`, each optionally rematerialised.

    `attend(attn, h, cache_l) -> (y, new_cache_l)` is one layer's self-attention; `inject(injector, x)` the audio
    injection after the configured layers. The new cache slices are returned as scan outputs (explicit values, so the
    remat boundary never leaks a tracer).
    """
    cfg = model.cfg
    block_def, block_state = nnx.split(model.blocks)
    inj_def, inj_state = nnx.split(model.audio_injectors)
    inj_index = np.full((cfg.num_layers,), -1, np.int32)
    for j, layer_id in enumerate(sorted(set(cfg.audio_inject_layers))):
        inj_index[layer_id] = j

    def layer(x, layer_state, cache_l, j, inj_state):
        block = nnx.merge(block_def, layer_state)
        side = {}

        def self_attention(attn, h):
            y, side["cache"] = attend(attn, h, cache_l)
            return y

        x, _ = block(x, e0, text, self_attention)
        if inject is not None:
            def do_inject(x):
                injector = nnx.merge(inj_def, jax.tree.map(lambda p: p[jnp.maximum(j, 0)], inj_state))
                return inject(injector, x)
            x = jax.lax.cond(j >= 0, do_inject, lambda x: x, x)
        return x, side["cache"]

    policy = _policy(remat)
    if remat not in (None, "none"):
        layer = jax.checkpoint(layer, policy=policy, prevent_cse=False)

    def body(x, xs):
        layer_state, cache_l, j = xs
        return layer(x, layer_state, cache_l, j, inj_state)

    return jax.lax.scan(body, x, (block_state, cache_xs, jnp.asarray(inj_index)))


def head(model: CausalS2VDiT, out, e, f: int, h: int, w: int):
    """Output head on the noisy tokens (float32 region, as `block_forward`) and unpatchify -> [B, C, F, h, w]."""
    cfg = model.cfg
    dt = cfg.jnp_dtype
    m = model.head_modulation[...].astype(jnp.float32)[None, None] + e[:, :, None]
    normed = layer_norm(out, cfg.eps).astype(dt).astype(jnp.float32)
    y = model.head(modulate(normed, m[:, :, 0], m[:, :, 1]), dtype=jnp.float32).astype(dt)
    return model.unpatchify(y, f, h // cfg.patch_size[1], w // cfg.patch_size[2])


def embed_noisy(model: CausalS2VDiT, x, cond_states=None):
    """Noisy latents [B, 16, F, h, w] -> tokens [B, F*N, D] (patch + pose/cond bias + segment embedding 0)."""
    cfg = model.cfg
    dt = cfg.jnp_dtype
    b = x.shape[0]
    tokens = model.patch_embedding(x.astype(dt))
    if cond_states is not None:
        tokens = tokens + model.cond_encoder(cond_states.astype(dt))
    else:  # no pose video: the official pipeline feeds zeros, leaving only the bias
        tokens = tokens + model.cond_encoder.bias[...].astype(dt)
    return tokens.reshape(b, -1, cfg.dim) + model.trainable_cond_mask[0].astype(dt)


def embed_condition(model: CausalS2VDiT, ref_latents, motion_latents):
    """Reference [B, 16, 1, h, w] and motion [B, 16, T_m, h, w] latents -> condition tokens [B, Nc, D]."""
    cfg = model.cfg
    dt = cfg.jnp_dtype
    b = ref_latents.shape[0]
    ref = model.patch_embedding(ref_latents.astype(dt)).reshape(b, -1, cfg.dim) + model.trainable_cond_mask[1].astype(dt)
    mot = model.frame_packer(motion_latents.astype(dt)) + model.trainable_cond_mask[2].astype(dt)
    return jnp.concatenate([ref, mot], axis=1)


def encode_audio_blocks(model: CausalS2VDiT, audio, frames_per_block: int | None):
    """audio [B, layers, C_a, 4F] -> (tokens [B, F, 5, D], global [B, F, 1, D]).

    With `frames_per_block`, every block's audio is encoded on its own, exactly as the streaming forward encodes it
    (the causal convolutions then never see an earlier block); without, the clip is encoded in one piece (native).
    """
    if frames_per_block is None:
        return model.encode_audio(audio)
    b, layers, ca, t = audio.shape
    per = 4 * frames_per_block
    if t % per:
        raise ValueError(f"audio has {t} frames, not a whole number of {per}-frame blocks")
    nb = t // per
    chunks = jnp.moveaxis(audio.reshape(b, layers, ca, nb, per), 3, 1).reshape(b * nb, layers, ca, per)
    tokens, glob = model.encode_audio(chunks)
    return (tokens.reshape(b, nb * frames_per_block, *tokens.shape[2:]),
            glob.reshape(b, nb * frames_per_block, *glob.shape[2:]))


def sequence_forward(model: CausalS2VDiT, x, t, text, audio, ref_latents, motion_latents, *, mode: str,
                     frames_per_block: int = 3, first_frame=0, ref_positions=None, audio_per_block: bool = True,
                     remat: str | None = None, attention_impl: str | None = None, cond_states=None):
    """Velocity of a whole clip.

    x [B, 16, F, h, w] noisy latents; t [B, F] per-frame timesteps (a block's frames share a value in training);
    text [B, text_len, D] from `embed_text`; audio [B, layers, C_a, 4F]; ref_latents [B, 16, 1, h, w];
    motion_latents [B, 16, T_m, h, w]. first_frame: RoPE time of the first noisy frame. ref_positions: block-causal
    mode only, [F / frames_per_block] int32 RoPE times of the reference seen by each query block (the rolling sink);
    default: the prefill position for every block. Returns [B, 16, F, h, w].
    """
    if mode not in MODES:
        raise ValueError(f"unknown attention mode {mode!r}; choose one of {MODES}")
    cfg = model.cfg
    b, _, f, h, w = x.shape
    if mode == "block_causal" and f % frames_per_block:
        raise ValueError(f"{f} frames are not a whole number of {frames_per_block}-frame blocks")
    nb = f // frames_per_block if mode == "block_causal" else 1

    noisy = embed_noisy(model, x, cond_states)
    cond = embed_condition(model, ref_latents, motion_latents)
    n_frame = noisy.shape[1] // f
    n_cond = cond.shape[1]
    cond_frames = -(-n_cond // n_frame)
    pad = cond_frames * n_frame - n_cond
    start = pad + n_cond                      # first noisy token
    seq = jnp.concatenate([jnp.zeros((b, pad, cfg.dim), noisy.dtype), cond, noisy], axis=1)

    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b, f))
    e, e0 = model.time_embed(t)
    _, e0_cond = model.time_embed(jnp.zeros((b, 1), jnp.float32))
    e0_seq = jnp.concatenate([jnp.broadcast_to(e0_cond, (b, cond_frames, *e0_cond.shape[2:])), e0], axis=1)

    audio_tokens, audio_global = encode_audio_blocks(model, audio, frames_per_block if audio_per_block else None)
    noisy_tab = model.block_table(jnp.asarray(first_frame, jnp.int32), f, h, w)
    prefill_tab = model.sink_table(h, w, cfg.sink_position)
    if ref_positions is None:
        block_tabs = [prefill_tab] * nb
    else:
        ref_positions = jnp.asarray(ref_positions, jnp.int32)
        block_tabs = [model.sink_table(h, w, ref_positions[i]) for i in range(nb)]
    block_tokens = frames_per_block * n_frame

    def attend(attn, hs, _):
        q = attn.project_q(hs)
        k, v = attn.project_kv(hs)
        dt = v.dtype
        qc, kc, vc = q[:, pad:start], k[:, pad:start], v[:, pad:start]
        qn = rope.apply(q[:, start:], noisy_tab).astype(dt)
        kn = rope.apply(k[:, start:], noisy_tab).astype(dt)
        vn = v[:, start:]
        qc_r = rope.apply(qc, prefill_tab).astype(dt)
        kc_r = rope.apply(kc, prefill_tab).astype(dt)
        if mode == "bidirectional":
            y = attention(jnp.concatenate([qc_r, qn], 1), jnp.concatenate([kc_r, kn], 1),
                          jnp.concatenate([vc, vn], 1), implementation=attention_impl)
            outs = [y]
        else:
            outs = [attention(qc_r, kc_r, vc, implementation=attention_impl)]
            for i in range(nb):
                ks = kc_r if block_tabs[i] is prefill_tab else rope.apply(kc, block_tabs[i]).astype(dt)
                end = (i + 1) * block_tokens
                outs.append(attention(qn[:, i * block_tokens:end], jnp.concatenate([ks, kn[:, :end]], 1),
                                      jnp.concatenate([vc, vn[:, :end]], 1), implementation=attention_impl))
        y = jnp.concatenate([jnp.zeros((b, pad, *q.shape[2:]), q.dtype), *outs], axis=1)
        return attn.out(y), None

    def inject(injector, xs):
        return jnp.concatenate([xs[:, :start], injector(xs[:, start:], audio_tokens, audio_global)], axis=1)

    out, _ = scan_layers(model, seq, e0_seq, text, attend, None, inject=inject, remat=remat)
    return head(model, out[:, start:], e, f, h, w)


def block_step(model: CausalS2VDiT, x, t, text, audio, cache: RingCache, sink: SinkCache, first_frame,
               relative_dist, *, remat: str | None = None, attention_impl: str | None = None, cond_states=None):
    """One denoising step of one block against this step's ring: `CausalS2VDiT.block_forward` with remat.

    x [B, 16, F, h, w]; t [B] or [B, F]; text [B, text_len, D]; audio [B, layers, C_a, 4F], or its
    `encode_audio` output (the steps of a block share it); first_frame: global latent index of the block's first
    frame; relative_dist: the rolling-sink distance of this call.
    Returns (velocity [B, 16, F, h, w], ring with this block's keys and values written at its slot).
    """
    cfg = model.cfg
    b, _, f, h, w = x.shape
    hs = embed_noisy(model, x, cond_states)
    n_frame = hs.shape[1] // f
    t = jnp.asarray(t, jnp.float32)
    t = jnp.broadcast_to(t[:, None] if t.ndim == 1 else t, (b, f))
    e, e0 = model.time_embed(t)
    audio_tokens, audio_global = audio if isinstance(audio, tuple) else model.encode_audio(audio)

    first_frame = jnp.asarray(first_frame, jnp.int32)
    block_tab = model.block_table(first_frame, f, h, w)
    start_idx = cfg.sink_position - jnp.asarray(relative_dist, jnp.int32)
    sink_tab = model.sink_table(h, w, cfg.sink_position + jnp.maximum(0, first_frame - start_idx))

    capacity = cache.capacity
    if capacity % n_frame:
        raise ValueError(f"ring capacity {capacity} is not a whole number of {n_frame}-token frames")
    ring_frames = capacity // n_frame
    offset = (first_frame % ring_frames) * n_frame
    valid = jnp.minimum(first_frame + f, ring_frames) * n_frame
    n_sink = sink.length

    def attend(attn, hs, cache_l):
        ring_k, ring_v, sink_k, sink_v = cache_l
        q = attn.project_q(hs)
        k, v = attn.project_kv(hs)
        qr = rope.apply(q, block_tab).astype(v.dtype)
        kr = rope.apply(k, block_tab).astype(v.dtype)
        ring_k = jax.lax.dynamic_update_slice_in_dim(ring_k, kr.astype(ring_k.dtype), offset, axis=1)
        ring_v = jax.lax.dynamic_update_slice_in_dim(ring_v, v.astype(ring_v.dtype), offset, axis=1)
        sink_kr = rope.apply(sink_k, sink_tab).astype(v.dtype)
        keys = jnp.concatenate([sink_kr, ring_k.astype(v.dtype)], axis=1)
        vals = jnp.concatenate([sink_v.astype(v.dtype), ring_v.astype(v.dtype)], axis=1)
        # A filling ring needs the valid-key count; once full every key is valid and the cuDNN path can drop it.
        y = attention(qr, keys, vals, num_valid_keys=n_sink + valid, implementation=attention_impl)
        return attn.out(y), (ring_k, ring_v)

    def inject(injector, xs):
        return injector(xs, audio_tokens, audio_global)

    out, (ring_k, ring_v) = scan_layers(model, hs, e0, text, attend, (cache.k, cache.v, sink.k, sink.v),
                                        inject=inject, remat=remat)
    return head(model, out, e, f, h, w), RingCache(k=ring_k, v=ring_v)
