"""python -m benchmarks.stream_memory [--blocks 1000]: memory over a long stream at the tiny config.

Streams `--blocks` blocks (DiT + streaming VAE decode) through `StreamEngine.step` with random tiny weights and
samples, every 100 blocks, the bytes of all live device arrays and the process RSS. Flat is the claim: the state is
fixed-size rings, a fixed-size sink and cache, and a block counter, so block 1,000 holds what block 10 holds.
"""

from __future__ import annotations

import argparse
import importlib.util
import resource
import time

from benchmarks.common import REPO, record


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--blocks", type=int, default=1000)
    p.add_argument("--every", type=int, default=100)
    args = p.parse_args()

    import jax

    from liveavatar_jax.pipeline import Pipeline

    spec = importlib.util.spec_from_file_location("tiny", REPO / "configs" / "tiny.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config()
    pipe = Pipeline(config)
    mc = pipe.models.dit.cfg
    h = w = 8
    ref = jax.random.normal(jax.random.key(1), (1, 16, 1, h, w))
    motion = jax.random.normal(jax.random.key(2), (1, 16, 19, h, w))
    ctx = pipe.stream_context("a person talks", ref, motion)
    audio = jax.random.normal(jax.random.key(3), (1, mc.audio_layers, mc.audio_dim, 12))
    state = pipe.engine.init(ctx, 0)
    samples = []
    t0 = time.perf_counter()
    for g in range(args.blocks):
        state, out = pipe.engine.step(state, ctx, audio)
        out["frames"].block_until_ready()
        if g == 9 or (g + 1) % args.every == 0:
            live = sum(a.nbytes for a in jax.live_arrays())
            samples.append({"block": g + 1, "live_device_mb": round(live / 2**20, 3), "rss_mb": round(rss_mb(), 1)})
    seconds = time.perf_counter() - t0
    at10 = samples[0]
    last = samples[-1]
    flat = last["live_device_mb"] == at10["live_device_mb"]
    record("stream_memory", f"live arrays {at10['live_device_mb']} MB at block 10, {last['live_device_mb']} MB at "
           f"block {last['block']} ({'flat' if flat else 'NOT flat'}); RSS {at10['rss_mb']} -> {last['rss_mb']} MB",
           {"blocks": args.blocks, "samples": samples, "flat_device_memory": flat, "seconds": round(seconds, 1),
            "blocks_per_s": round(args.blocks / seconds, 2)})


if __name__ == "__main__":
    main()
