"""python -m benchmarks.vae_train_step: one optimizer step of the tiny world's VAE training, the recipe's largest stage.

The compiled step of `train.vae --config configs/tinyworld_vae.py` (the windows phase: 2 fresh windows of 9 frames at
64x64, width 4, loss, AdamW and EMA), random weights and frames, float32, 2 CPU threads; the median of 20 steps after 3
warm-ups, printed as `median_s`. `--config` times another VAE config (configs/tinyworld_vae_images.py, 8 single
frames a step; configs/tinyworld_vae_streams.py, whose continued steps carry the caches). `--xla_conv_gradients` times
XLA's own convolution gradients in place of the CPU path's patches matmul (`models.vae._conv2d_patch_grad`), the
comparison the change was measured by.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import tempfile
import time

THREADS = 2


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/tinyworld_vae.py")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--xla_conv_gradients", action="store_true")
    args = p.parse_args()
    from benchmarks.common import pin_threads, record
    from liveavatar_jax.runtime import prefer_onednn_on_cpu

    prefer_onednn_on_cpu()
    pin_threads(THREADS)

    import jax
    import jax.numpy as jnp

    from liveavatar_jax.distill.vae_trainer import VAETrainer
    from liveavatar_jax.models import vae as vae_lib

    if args.xla_conv_gradients:
        vae_lib._conv2d_patch_grad = vae_lib._conv2d_xla
    config = importlib.import_module(args.config.removesuffix(".py").replace("/", ".")).get_config()
    d = config.data
    with tempfile.TemporaryDirectory() as workdir:
        trainer = VAETrainer(config, workdir, data=object())    # frames come from here, not from clips
        state = trainer.initial_state()
        images = int(d.stream_chunks) == 0
        first = images or int(d.chunks_per_step) == int(d.stream_chunks)  # windows: every step starts its streams
        frames = 1 if images else 4 * int(d.chunks_per_step) + (1 if first else 0)
        video = jax.random.uniform(jax.random.key(1), (int(d.batch_size), frames, int(d.height), int(d.width), 3),
                                   minval=-1.0, maxval=1.0)
        step = trainer.step_fns[first]
        times = []
        for i in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            state, metrics = step(state, video)
            jax.block_until_ready(metrics)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    shape = f"{d.batch_size} x {frames} frames {d.height}x{d.width}, width {config.vae.dim}"
    record("vae_train_step", f"{args.config} step ({shape}{', first steps' if first else ', continued'}), f32, "
           f"{THREADS} threads: median {med:.3f} s"
           + (" (XLA's convolution gradients)" if args.xla_conv_gradients else ""),
           {"median_s": round(med, 4), "min_s": round(min(times), 4), "max_s": round(max(times), 4),
            "config": args.config, "frames": frames, "batch": int(d.batch_size), "threads": THREADS,
            "xla_conv_gradients": args.xla_conv_gradients, "loss": float(jnp.asarray(metrics["loss"]))})


if __name__ == "__main__":
    main()
