"""Golden kind `dit_s2v_causal`: a sink prefill and streaming block calls sharing one cache.

The manifest's `calls_in_order` drive the run: each call names its inputs (`block{b}.x`, `block{b}.audio_input`,
`block{b}.cond_states`) and its `current_start` / `relative_dist`; sizes come from the manifest and the inputs.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from liveavatar_jax.models.dit import DiTConfig
from liveavatar_jax.streaming.caches import RingCache
from liveavatar_jax.weights.dit_keys import load_dit


def _input_name(arg: str) -> str:
    """'inputs.block0.x  [16,3,H,W]' or '[inputs.block0.x] ...' -> 'block0.x'."""
    m = re.search(r"inputs\.([\w.]+?)(?=[\s\]\[,]|$)", arg)
    if not m:
        raise ValueError(f"cannot find an input name in manifest argument {arg!r}")
    return m.group(1)


def load_fixture_model(fixture):
    cfg = DiTConfig.from_official(fixture.manifest["constructor_kwargs"], dtype="float32")
    return cfg, load_dit(fixture.weights_path, cfg)


def run(fixture) -> dict[str, np.ndarray]:
    m, inp = fixture.manifest, fixture.inputs
    cfg, model = load_fixture_model(fixture)
    grid = m["latent_grid"]
    n_frame = grid["frame_seq_length"]
    capacity = grid["kv_len"]
    text = jax.jit(model.embed_text)(jnp.asarray(inp["context"])[None])
    sink_fn = jax.jit(model.sink_prefill)
    block_fn = jax.jit(model.block_forward, static_argnames=("debug",))

    out: dict[str, np.ndarray] = {}
    ring = None
    sink = None
    for call in m["calls_in_order"]:
        args = call["args"]
        if args.get("sink_flag"):
            ref = jnp.asarray(inp[_input_name(args["ref_latents"])])
            motion = jnp.asarray(inp[_input_name(args["motion_latents"])])
            sink = sink_fn(ref, motion, text)
            for l in range(cfg.num_layers):
                out[f"cache.after_sink.layer{l}.cond_k"] = np.asarray(sink.k[l])
                out[f"cache.after_sink.layer{l}.cond_v"] = np.asarray(sink.v[l])
            out["sink.return"] = np.zeros_like(inp[_input_name(args["cond_states"])])
            continue
        x = jnp.asarray(inp[_input_name(args["x"])])[None]
        if ring is None:
            ring = RingCache.zeros(cfg.num_layers, 1, capacity, cfg.num_heads, cfg.head_dim, jnp.float32)
        start, end = args["current_start"], args["current_end"]
        velocity, ring, dbg = block_fn(
            x, jnp.asarray(inp[_input_name(args["t"])]), text, jnp.asarray(inp[_input_name(args["audio_input"])]),
            ring, sink, start // n_frame, args["relative_dist"],
            cond_states=jnp.asarray(inp[_input_name(args["cond_states"])]), debug=True)
        b = call["name"].split("_")[-1]  # "B_block0" -> "block0"
        out[f"{b}.flow_pred"] = np.asarray(velocity[0])
        filled = min(end, capacity)
        for l in range(cfg.num_layers):
            out[f"cache.after_{b}.layer{l}.k"] = np.asarray(ring.k[l][:, :filled])
            out[f"cache.after_{b}.layer{l}.v"] = np.asarray(ring.v[l][:, :filled])
            out[f"debug.{b}.block{l}_out"] = np.asarray(dbg["block_out"][l])
        out[f"debug.{b}.layer0.norm3_out"] = np.asarray(dbg["norm3_out"][0])
        cos, sin = (np.asarray(a) for a in dbg["rope"])
        heads = (1, cos.shape[0], cfg.num_heads, cos.shape[1])
        out[f"debug.{b}.rope_freqs_real"] = np.broadcast_to(cos[None, :, None, :], heads)
        out[f"debug.{b}.rope_freqs_imag"] = np.broadcast_to(sin[None, :, None, :], heads)
    return out
