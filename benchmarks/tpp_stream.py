"""python -m benchmarks.tpp_stream [--steps 4] [--blocks 16] [--decode_on separate]: TPP vs one device.

Streams the embedded tiny config (random weights: DiT + streaming VAE decode) on simulated CPU devices, once with
`StreamEngine` on one device and once with `TPPEngine` over `steps` pipeline devices (+ one decode device for the
official 4 + 1 layout), and prints one JSON object:
  * single device: prefill, block time, time to first frame, steady FPS = frames per block / block time;
  * TPP: blocks per tick after the fill, per-stage time (each stage's denoising step alone on its device), the
    per-tick breakdown (tick, slowest stage, transfers, decode), time to first frame and steady FPS measured with a
    consumer that waits for every block's frames, next to the throughput model frames per block / max(tick, decode).
Simulated CPU devices share the host's cores, so the TPP figures show the schedule working, not a speed-up; run it
on a machine with S + 1 accelerators for real numbers. Appends a row to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--blocks", type=int, default=16)
    p.add_argument("--decode_on", choices=("separate", "last_stage"), default="separate")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of each stage's step and of the transfers")
    args = p.parse_args()
    devices = args.steps + (1 if args.decode_on == "separate" else 0)
    if "jax" not in __import__("sys").modules:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={devices}").strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax
    import numpy as np

    from benchmarks.common import REPO, record
    from liveavatar_jax.parallel.tpp import TPPEngine, profile_stages
    from liveavatar_jax.pipeline import Pipeline
    from liveavatar_jax.streaming.engine import StreamEngine

    spec = importlib.util.spec_from_file_location("tiny", REPO / "configs" / "tiny.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config()
    config.stream.steps = args.steps
    pipe = Pipeline(config)
    dit, decoder, scfg = pipe.models.dit, pipe.decoder, pipe.stream_cfg
    mc = dit.cfg
    h = w = 8
    ref = jax.random.normal(jax.random.key(1), (1, 16, 1, h, w))
    motion = jax.random.normal(jax.random.key(2), (1, 16, 19, h, w))
    audio = np.asarray(jax.random.normal(jax.random.key(3), (args.blocks, 1, mc.audio_layers, mc.audio_dim, 12)))
    frames_per_block = 4 * scfg.frames_per_block
    n = args.blocks

    # ---------------------------------------------------------------- one device
    single = StreamEngine(dit, scfg, decoder=decoder)
    ctx = pipe.stream_context("a person talks", ref, motion, engine=single)   # text keys/values once per prompt
    state = single.init(ctx, 0)                          # compile
    for g in range(scfg.steps + 2):
        state, out = single.step(state, ctx, audio[g])
        jax.block_until_ready(out["frames"])
    t0 = time.perf_counter()
    state = jax.block_until_ready(single.init(ctx, 0))
    prefill = time.perf_counter() - t0
    block_s, first_frame = [], None
    for g in range(n):
        t1 = time.perf_counter()
        state, out = single.step(state, ctx, audio[g])
        jax.block_until_ready(out["frames"])
        block_s.append(time.perf_counter() - t1)
        if first_frame is None:
            first_frame = time.perf_counter() - t0
    single_block = float(np.median(block_s[1:]))

    # ---------------------------------------------------------------- the pipeline
    engine = TPPEngine(dit, scfg, decoder=decoder, decode_on=args.decode_on, profile=True)
    ctx = pipe.stream_context("a person talks", ref, motion, engine=engine)
    tstate = engine.init(ctx, 0)                         # compile
    engine.run(tstate, ctx, audio[: scfg.steps + 2])
    # (a) profiled: every tick and decode awaited, giving the breakdown
    tstate = engine.init(ctx, 0)
    tstate, _ = engine.run(tstate, ctx, audio)
    breakdown = engine.tick_breakdown()
    # (b) live: a player that shows block k while tick k + 1 runs: it waits for the previous block's frames only,
    # so the decode of one block overlaps the next tick
    engine.profile = False
    t0 = time.perf_counter()
    tstate = jax.block_until_ready(engine.init(ctx, 0))
    tpp_prefill = time.perf_counter() - t0
    ready, pending = [], None
    for g in range(n + scfg.steps - 1):
        tstate, out = engine.step(tstate, ctx, audio[g] if g < n else None)
        if pending is not None:
            jax.block_until_ready(pending)
            ready.append(time.perf_counter() - t0)
        pending = out["frames"] if out["valid"] else None
    jax.block_until_ready(pending)
    ready.append(time.perf_counter() - t0)
    tpp_first = ready[0]
    live_tick = float(np.median(np.diff(ready)))
    stages = profile_stages(engine, tstate, ctx, audio[0], repeats=args.repeats)
    stage_max = max(s for s in stages.stage_s if s is not None)

    result = {
        "config": "tiny (configs/tiny.py, random weights)",
        "latent_hw": [h, w],
        "frames_per_block": frames_per_block,
        "steps": scfg.steps,
        "blocks": n,
        "devices": jax.device_count(),
        "single_device": {
            "prefill_s": round(prefill, 5),
            "block_s": round(single_block, 5),
            "time_to_first_frame_s": round(first_frame, 5),
            "steady_fps": round(frames_per_block / single_block, 2),
        },
        "tpp": {
            "decode_on": args.decode_on,
            "blocks_per_tick_after_fill": breakdown["blocks_per_tick_after_fill"],
            "fill_ticks": breakdown["fill_ticks"],
            "stage_s": [None if s is None else round(s, 5) for s in stages.stage_s],
            "per_tick": {
                "tick_s": round(breakdown["tick_s_median"], 5),
                "stage_max_s": round(stage_max, 5),
                "transfer_s": round(stages.transfer_s, 5),
                "decode_s": round(breakdown["decode_s_median"], 5),
            },
            "prefill_s": round(tpp_prefill, 5),
            "time_to_first_frame_s": round(tpp_first, 5),
            "time_to_first_frame_model_s": round(
                tpp_prefill + scfg.steps * breakdown["tick_s_median"] + breakdown["decode_s_median"], 5),
            "steady_tick_s": round(live_tick, 5),
            "steady_fps": round(frames_per_block / live_tick, 2),
            "steady_fps_model": round(breakdown["steady_fps_model"], 2),
        },
        "note": "simulated CPU devices share the host's cores: the schedule is real, a speed-up is not expected",
    }
    t, s = result["tpp"], result["single_device"]
    record("tpp_stream", f"tiny, {scfg.steps} steps: 1 device {s['steady_fps']} fps (TTFF "
           f"{s['time_to_first_frame_s']:.3f} s); TPP {scfg.steps}+{int(args.decode_on == 'separate')} simulated CPU "
           f"devices {t['steady_fps']} fps (TTFF {t['time_to_first_frame_s']:.3f} s, "
           f"{t['blocks_per_tick_after_fill']} block/tick after fill)", result)


if __name__ == "__main__":
    main()
