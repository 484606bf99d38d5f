"""python -m benchmarks.dit_forward: one streaming block forward of the DiT at the CPU shapes of
../shared/golden/time_reference.json, timed like the official code was (float32, 2 threads, median of 10 runs after
3 warm-ups).

Shapes: dim 512, 4 layers, 8 heads, ffn 2048, text 512 x 4096, audio 25 x 1024, injection after layers 0 and 2; one
AR block of 3 latent frames at 16x24 (288 query tokens) at global block 1, so the block's keys follow one cached
block (576 self keys) and 240 sink keys; rolling distance 30. Random weights. What is timed is the call the stream
engine makes per denoising step: `block_forward` with the prompt embedded once per stream (`--with_text` also
times the text embedding and projection inside every call, as the official forward does).
The engine's call takes the prompt's per-layer text keys/values (computed once per stream) and the block's encoded
audio (computed once per block and shared by its 4 denoising steps; `--per_call_audio` times it inside the call).
"""

from __future__ import annotations

import argparse
import statistics
import time

THREADS = 2


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--with_text", action="store_true",
                   help="embed the 512 text tokens and project them in every call, as the official forward does")
    p.add_argument("--per_call_audio", action="store_true",
                   help="encode the block's audio in the call (the engine encodes it once per block, for 4 calls)")
    args = p.parse_args()
    from benchmarks.common import REPO, pin_threads, record
    from liveavatar_jax.runtime import prefer_onednn_on_cpu

    prefer_onednn_on_cpu()   # XLA_FLAGS=--xla_cpu_use_onednn=false times the default XLA:CPU kernels
    pin_threads(THREADS)

    import json
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from liveavatar_jax.models.dit import CausalS2VDiT, DiTConfig
    from liveavatar_jax.streaming.caches import RingCache
    from liveavatar_jax.weights.random_init import randomize

    ref = json.loads((REPO.parent / "shared" / "golden" / "time_reference.json").read_text()) \
        if (REPO.parent / "shared" / "golden" / "time_reference.json").exists() else None
    official = ref["median_s"] if ref else 0.16485086399995907
    kw = ref["constructor_kwargs"] if ref else dict(dim=512, ffn_dim=2048, num_heads=8, num_layers=4, text_dim=4096,
                                                    text_len=512, audio_dim=1024, audio_inject_layers=[0, 2])
    cfg = DiTConfig.from_official(kw, dtype="float32")
    model = randomize(nnx.eval_shape(lambda: CausalS2VDiT(cfg, rngs=nnx.Rngs(0))), 0)
    h, w, frames = 16, 24, 3
    n_frame = (h // 2) * (w // 2)
    k = jax.random.split(jax.random.key(0), 8)
    x = jax.random.normal(k[0], (1, 16, frames, h, w))
    context = jax.random.normal(k[1], (1, 64, cfg.text_dim))
    audio = jax.random.normal(k[2], (1, cfg.audio_layers, cfg.audio_dim, 4 * frames))
    ref_lat = jax.random.normal(k[3], (1, 16, 1, h, w))
    motion = jax.random.normal(k[4], (1, 16, 19, h, w))
    text = jax.jit(model.embed_text)(context)
    sink = jax.jit(model.sink_prefill)(ref_lat, motion, text)
    ring = RingCache.zeros(cfg.num_layers, 1, 9 * n_frame, cfg.num_heads, cfg.head_dim)   # 864 allocated, as timed
    text_kv = jax.jit(model.text_kv, static_argnums=1)(text, context.shape[1])
    audio_enc = jax.jit(model.encode_audio)(audio)
    graphdef, state = nnx.split(model)

    if args.with_text:
        @jax.jit
        def step(state, x, ring):
            m = nnx.merge(graphdef, state)
            return m.block_forward(x, jnp.full((1,), 1000.0), m.embed_text(context), audio, ring, sink, 3, 30)
    elif args.per_call_audio:
        @jax.jit
        def step(state, x, ring):
            return nnx.merge(graphdef, state).block_forward(x, jnp.full((1,), 1000.0), None, audio, ring, sink, 3, 30,
                                                            text_kv=text_kv)
    else:
        @jax.jit
        def step(state, x, ring):
            return nnx.merge(graphdef, state).block_forward(x, jnp.full((1,), 1000.0), None, audio_enc, ring, sink,
                                                            3, 30, text_kv=text_kv)

    for _ in range(args.warmup):
        jax.block_until_ready(step(state, x, ring))
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        jax.block_until_ready(step(state, x, ring))
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    name = "dit_forward" + ("_with_text" if args.with_text else "") + ("_per_call_audio" if args.per_call_audio else "")
    record(name, f"median {med:.4f} s per block forward (official PyTorch {official:.3f} s)",
           {"median_s": round(med, 5), "min_s": round(min(times), 5), "max_s": round(max(times), 5),
            "runs_s": [round(t, 5) for t in times], "official_median_s": official, "threads": THREADS,
            "with_text_embedding": args.with_text, "per_call_audio": args.per_call_audio, "goal_s": 0.08})


if __name__ == "__main__":
    main()
