"""python -m benchmarks.vae_decode: the streaming VAE decode of one AR block, timed like the official code was.

Shapes and call order of ../shared/golden/time_stream_reference.json ("vae"): the real-width Wan2.1 VAE (dim 96) with
random weights, float32, 2 CPU threads; a priming call on 7 latent frames [16, 7, 16, 24] from an empty cache (25
frames), then one call per block of 3 latent frames [16, 3, 16, 24] -> [3, 12, 128, 192], every call continuing
the same stream with a new random block. 2 warm-up calls, then the median of 5 timed calls.

Prints one JSON object and appends a row to BENCHMARKS.md at the repository root (`benchmarks.common.record`).

Two process-level settings, made before JAX starts:
  * the process is pinned to 2 CPUs when it may use more (XLA:CPU sizes its thread pool from the CPUs it may run on);
  * glibc malloc is told to keep freed memory instead of returning every large buffer to the kernel
    (`mallopt(M_MMAP_MAX, 0)`, `mallopt(M_TRIM_THRESHOLD, 2 GiB)`): XLA:CPU allocates each activation afresh, and
    a fresh mmap'd buffer is page-faulted in on every call, which costs more than the memory-bound ops that write
    it. `--no-malloc-tuning` times the default behaviour.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import os
import statistics
import sys
import time

from benchmarks.common import REPO, pin_threads, record

THREADS = 2
REFERENCE = REPO.parent / "shared" / "golden" / "time_stream_reference.json"
OFFICIAL_BLOCK_MEDIAN_S = 16.442246608999994  # time_stream_reference.json, vae.median_s (used when it is absent)


def _tune_malloc() -> bool:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2 ** 31 - 1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.vae_decode", description=__doc__.split("\n\n")[0])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-malloc-tuning", action="store_true", help="leave glibc malloc at its defaults")
    parser.add_argument("--no-record", action="store_true", help="print the JSON object only")
    args = parser.parse_args(argv)

    cpus = pin_threads(THREADS)
    malloc_tuned = False if args.no_malloc_tuning else _tune_malloc()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax
    import jax.numpy as jnp
    import numpy as np

    from liveavatar_jax.models.vae import VAE, VAEConfig, random_vae

    reference = json.loads(REFERENCE.read_text()) if REFERENCE.is_file() else None
    ref_vae = reference["vae"] if reference else {}
    official_s = float(ref_vae.get("median_s", OFFICIAL_BLOCK_MEDIAN_S))
    kwargs = ref_vae.get("constructor_kwargs", {"dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4],
                                                "num_res_blocks": 2, "attn_scales": [],
                                                "temperal_downsample": [False, True, True], "dropout": 0.0})
    shapes = ref_vae.get("shapes", {"prime_latents": [16, 7, 16, 24], "block_latents": [16, 3, 16, 24]})
    prime_shape, block_shape = tuple(shapes["prime_latents"]), tuple(shapes["block_latents"])

    config = VAEConfig.from_kwargs(kwargs)
    t0 = time.perf_counter()
    vae = VAE(random_vae(config, seed=0, dtype=jnp.float32))
    build_s = time.perf_counter() - t0
    rng = np.random.default_rng(1)

    def latents(shape):
        return jnp.asarray(rng.standard_normal(shape, dtype=np.float32))

    cache = vae.init_decode_cache(1, *prime_shape[2:])
    t0 = time.perf_counter()
    video, cache = vae.stream_decode(latents(prime_shape), cache)
    video.block_until_ready()
    prime_s = time.perf_counter() - t0
    prime_out = list(video.shape)

    times, cpu_times = [], []
    for i in range(args.warmup + args.runs):
        block = latents(block_shape)
        block.block_until_ready()
        t0, c0 = time.perf_counter(), time.process_time()
        video, cache = vae.stream_decode(block, cache)
        video.block_until_ready()
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        if i == 0:
            first_block_s = elapsed  # includes compiling the block decode
        if i >= args.warmup:
            times.append(elapsed)
            cpu_times.append(cpu)
    if not np.isfinite(np.asarray(video)).all():
        raise SystemExit("the decoded block is not finite")

    median = statistics.median(times)
    result = {
        "median_s": median,
        "min_s": min(times),
        "max_s": max(times),
        "runs_s": times,
        "cpu_s_median": statistics.median(cpu_times),
        # CPU seconds per wall second of the timed calls: about `threads` on a machine of our own, lower when other
        # processes take CPU time from this one.
        "effective_threads": sum(cpu_times) / sum(times),
        "warmup": args.warmup,
        "runs": args.runs,
        "official_median_s": official_s,
        "speedup_vs_official": official_s / median,
        "video_frames_per_s": block_shape[1] * 4 / median,
        "prime_call_s_incl_compile": prime_s,
        "first_block_s_incl_compile": first_block_s,
        "model_build_s": build_s,
        "prime_output": prime_out,
        "block_output": list(video.shape),
        "config": dataclass_dict(config),
        "dtype": "float32",
        "threads": len(cpus),
        "malloc_tuned": malloc_tuned,
        "jax": jax.__version__,
        "backend": jax.default_backend(),
    }
    if args.no_record:
        print(json.dumps(dict(result, benchmark="vae_decode")))
        return 0
    figure = (f"streaming decode of 1 block (3 latents 16x24 -> 12 frames 128x192), dim 96, f32, {len(cpus)} threads: "
              f"median {median:.2f} s of {args.runs} ({result['video_frames_per_s']:.2f} frames/s; official PyTorch "
              f"{official_s:.2f} s)" + ("" if malloc_tuned else ", glibc malloc defaults"))
    if result["effective_threads"] < 0.8 * len(cpus):
        figure += f"; machine shared: {result['effective_threads']:.1f} of {len(cpus)} threads effective"
    command = "python -m benchmarks.vae_decode" + (" --no-malloc-tuning" if args.no_malloc_tuning else "")
    record("vae_decode", figure, result, command)
    return 0


def dataclass_dict(config) -> dict:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if f.name not in ("latents_mean", "latents_std")}


if __name__ == "__main__":
    sys.exit(main())
