"""Offline sampling of the bidirectional teacher: many-step flow matching over whole clips, no cache, no stream.

The teacher cannot stream (every frame attends to every frame), so it is evaluated the way it is trained: the
audio is cut into windows of `frames` latent frames, each window is sampled from noise with Euler steps on the
shift-`shift` grid, with classifier-free guidance against zero audio (the null condition of the DMD teacher,
`distill.steps.teacher_x0`), and the windows are decoded one after another by the streaming VAE decoder primed as in
a stream. Used for the teacher's figures beside the student's (`tinyworld/recipe.py`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from liveavatar_jax.models import dit_sequence
from liveavatar_jax.sampling.flow_match import euler_step, flow_match_schedule


def sample_teacher_frames(pipe, teacher, prepared, prompt: str, *, frames: int, steps: int = 20,
                          shift: float = 3.0, guidance: float = 3.0, seed: int = 0):
    """uint8 frames [4 * frames * windows, H, W, 3] of the teacher DiT `teacher` on `prepared` (`Pipeline.prepare`
    with `prompt`), decoded by the pipeline's VAE; the caller trims them to the audio's length."""
    ctx = prepared.ctx
    # The prompt through the teacher's own text embedding: `ctx.text` went through the pipeline's DiT (the student),
    # whose embedding layers full-weight training has made different (relative difference ~1 in the tiny world).
    text_emb = jax.jit(teacher.embed_text)(pipe.prompt_context(prompt))
    fpb = pipe.stream_cfg.frames_per_block
    if frames % fpb:
        raise ValueError(f"frames {frames} is not a whole number of {fpb}-frame blocks")
    per_window = frames // fpb
    audio = jnp.concatenate(list(prepared.audio_blocks), axis=-1)          # [1, L, C, 4 * fpb * blocks]
    windows = -(-int(prepared.audio_blocks.shape[0]) // per_window)
    need = windows * 4 * frames
    audio = jnp.pad(audio, [(0, 0)] * 3 + [(0, need - audio.shape[-1])])
    sched = flow_match_schedule(steps, shift)
    graphdef, params = nnx.split(teacher)
    _, _, _, h, w = ctx.ref_latents.shape

    @jax.jit
    def sample_window(params, audio_w, key):
        model = nnx.merge(graphdef, params)
        both_audio = jnp.concatenate([audio_w, jnp.zeros_like(audio_w)])
        text = jnp.concatenate([text_emb] * 2)
        ref = jnp.concatenate([ctx.ref_latents] * 2)
        motion = jnp.concatenate([ctx.motion_latents] * 2)
        x = jax.random.normal(key, (1, 16, frames, h, w), jnp.float32)

        def body(x, i):
            t = jnp.full((2, frames), jnp.asarray(sched.timesteps)[i])
            v = dit_sequence.sequence_forward(model, jnp.concatenate([x, x]), t, text, both_audio, ref, motion,
                                              mode="bidirectional", audio_per_block=False)
            v = v[1:] + guidance * (v[:1] - v[1:])
            sig = jnp.asarray(sched.sigmas)
            return euler_step(x, v, sig[i], sig[i + 1]), None

        return jax.lax.scan(body, x, jnp.arange(steps))[0]

    dec = pipe.decoder
    feats = dec.prime(dec.params, dec.init(dec.params, (1, 16, fpb, h, w)), ctx.motion_latents)
    decode = jax.jit(dec.decode)
    out = []
    key = jax.random.key(seed)
    for i in range(windows):
        audio_w = audio[..., i * 4 * frames:(i + 1) * 4 * frames]
        latents = sample_window(params, audio_w, jax.random.fold_in(key, i))
        for b in range(per_window):
            video, feats = decode(dec.params, feats, latents[:, :, b * fpb:(b + 1) * fpb])
            out.append(np.asarray(video[0]))
    return np.concatenate(out)
