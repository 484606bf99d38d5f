"""Training-time forwards of the causal S2V DiT, built from `CausalS2VDiT`'s own submodules.

Two entry points, both pure functions of a (merged) model, with per-layer rematerialisation (`remat`, a policy name
from `dit.REMAT_POLICIES`; the inference forwards run without):

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
* `block_step`: one block at one denoising step against a `RingCache` and the sink (the student's rollout):
  `CausalS2VDiT.block_forward` itself, with remat.

`attention_impl` selects the kernel (`"xla"` exact math, `"cudnn"` fused flash attention on GPU, required at 14B
sequence lengths: none of the calls here needs a mask).
"""

from __future__ import annotations

import jax.numpy as jnp

from liveavatar_jax.models import rope
from liveavatar_jax.models.attention import attention
from liveavatar_jax.models.dit import CausalS2VDiT

MODES = ("block_causal", "bidirectional")
from liveavatar_jax.streaming.caches import RingCache, SinkCache

def scan_layers(model: CausalS2VDiT, x, e0, text, attend, cache_xs, inject=None, remat: str | None = None):
    """All transformer blocks under `lax.scan` (`CausalS2VDiT.scan_blocks`), each optionally rematerialised.
    Returns (x, the stacked new cache slices)."""
    x, new_cache, _ = model.scan_blocks(x, e0, text, attend, cache_xs, inject=inject, remat=remat)
    return x, new_cache


def head(model: CausalS2VDiT, out, e, f: int, h: int, w: int):
    return model.head_out(out, e, f, h, w)


def embed_noisy(model: CausalS2VDiT, x, cond_states=None):
    return model.embed_noisy(x, cond_states)


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
    """One denoising step of one block against this step's ring: `CausalS2VDiT.block_forward` with remat and an
    attention kernel choice.

    x [B, 16, F, h, w]; t [B] or [B, F]; text [B, text_len, D]; audio [B, layers, C_a, 4F], or its
    `encode_audio` output (the steps of a block share it); first_frame: global latent index of the block's first
    frame; relative_dist: the rolling-sink distance of this call.
    Returns (velocity [B, 16, F, h, w], ring with this block's keys and values written at its slot).
    """
    return model.block_forward(x, t, text, audio, cache, sink, first_frame, relative_dist,
                               cond_states=cond_states, remat=remat, attention_impl=attention_impl)
