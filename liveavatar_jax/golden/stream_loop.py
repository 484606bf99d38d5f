"""Golden kind `stream_loop`: the official TPP streaming loop over several clips (ring wrap, sink replacement).

Noise, cond states and rolling distances are replayed from the fixture; everything else runs through the same
`StreamEngine.run` users run (one jitted scan over all blocks).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from liveavatar_jax.golden.dit import load_fixture_model
from liveavatar_jax.streaming.engine import StreamConfig, StreamContext, StreamEngine, split_audio_blocks


def run(fixture) -> dict[str, np.ndarray]:
    m, inp = fixture.manifest, fixture.inputs
    cfg, model = load_fixture_model(fixture)
    geo = m["geometry"]
    fpb, bpc, clips = geo["num_frames_per_block"], geo["blocks_per_clip"], geo["num_clips"]
    n_frame = geo["frame_seq_length"]
    ring_frames = geo["kv_len"] // n_frame
    steps = m["sampler"]["set_timesteps"]
    stream_cfg = StreamConfig(steps=steps, shift=float(m["sampler"]["shift"]), frames_per_block=fpb,
                              ring_blocks=ring_frames // fpb, sink_replace_block=bpc if clips > 1 else None)
    engine = StreamEngine(model, stream_cfg)
    np.testing.assert_allclose(engine.timesteps, inp["timesteps"], rtol=0, atol=0)

    text = model.embed_text(jnp.asarray(inp["context"])[None])
    ctx = StreamContext(text=text, ref_latents=jnp.asarray(inp["ref_latents"]),
                        motion_latents=jnp.asarray(inp["motion_latents"]))
    ctx = engine.with_text_kv(ctx, text_tokens=len(inp["context"]))   # padding folded into one key, as infer.stream
    n_blocks = clips * bpc
    noise = np.concatenate([inp[f"clip{r}.noise"] for r in range(clips)], axis=1)        # [16, T, h, w]
    noise = noise.reshape(16, n_blocks, fpb, *noise.shape[2:]).transpose(1, 0, 2, 3, 4)[:, None]
    cond = np.concatenate([inp[f"clip{r}.cond_states"] for r in range(clips)], axis=2)     # [1, 16, T, h, w]
    cond = cond.reshape(1, 16, n_blocks, fpb, *cond.shape[3:]).transpose(2, 0, 1, 3, 4, 5)
    dists = np.asarray(m["random_python_draws"]["relative_dist_per_inference_call_in_order"], np.int32)
    dists = dists.reshape(n_blocks, steps)
    audio = split_audio_blocks(jnp.asarray(inp["audio_emb"]), fpb, 0, n_blocks)

    state = engine.init(ctx, 0)
    state, outs = engine.run(state, ctx, audio, noise=jnp.asarray(noise), dists=jnp.asarray(dists),
                             cond=jnp.asarray(cond), trace=True)

    out: dict[str, np.ndarray] = {}
    lat = np.asarray(outs["latents"][:, 0])                                      # [N, 16, F, h, w]
    x_in = np.asarray(outs["trace"]["x_in"][:, :, 0])                            # [N, steps, 16, F, h, w]
    flow = np.asarray(outs["trace"]["flow_pred"][:, :, 0])
    sink_k = outs["trace"]["roped_sink_k"]                                       # [N, steps, L, B, Lc, n, d]
    for g in range(n_blocks):
        out[f"block{g}.final_latents"] = lat[g]
        for i in range(steps):
            out[f"block{g}.step{i}.flow_pred"] = flow[g, i]
            out[f"block{g}.step{i}.x_in"] = x_in[g, i]
    for g, i in m["roped_sink_keys_calls"]:
        for l in range(cfg.num_layers):
            out[f"block{g}.step{i}.layer{l}.roped_sink_k"] = np.asarray(sink_k[g, i, l])
    out["clip_output"] = np.concatenate(list(lat), axis=1)
    for i in range(steps):
        for l in range(cfg.num_layers):
            out[f"cache{i}.layer{l}.k"] = np.asarray(state.rings.k[i, l])
            out[f"cache{i}.layer{l}.v"] = np.asarray(state.rings.v[i, l])
    for l in range(cfg.num_layers):
        out[f"cond_cache.layer{l}.cond_k"] = np.asarray(state.sink.k[l])
        out[f"cond_cache.layer{l}.cond_v"] = np.asarray(state.sink.v[l])
    # x_in is stored for the first blocks only; every other compared output is produced above
    return out
