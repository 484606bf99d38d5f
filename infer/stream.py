"""python -m infer.stream: a reference image, a speech track and a prompt in; a talking-avatar mp4 out, block by block.

  python -m infer.stream --image IMG --audio AUDIO --prompt TEXT --out OUT.mp4 [--ckpt_dir DIR] [--config FILE]
      [--size 720*400] [--seed N] [--steps 4] [--max_seconds S] [--save_latents FILE.safetensors]
      [--tpp] [--cpu_devices N] [--profile DIR] [--config.key=value ...]

Without --ckpt_dir the embedded default runs (configs/tiny.py: toy networks on the CPU; see its docstring for what
its weights are). The video is written progressively (OUT.partial.ts, playable after a crash or a kill) and OUT.mp4
appears only when the stream is complete; a JSON summary (time to first frame, steady frames per second, peak
memory, blocks) is printed at the end.
Bad input exits with code 2 and a message naming the file, before any network is built.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXIT_BAD_INPUT = 2


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m infer.stream", description=__doc__.split("\n")[0])
    p.add_argument("--image", required=True, help="reference image (any format Pillow reads)")
    p.add_argument("--audio", required=True, help="speech track (wav, flac, mp3, ogg, ...)")
    p.add_argument("--prompt", default="A person is talking to the camera.", help="text prompt")
    p.add_argument("--out", required=True, help="output mp4 path")
    p.add_argument("--ckpt_dir", default=None, help="converted LiveAvatar/Wan weights (liveavatar_jax.convert)")
    p.add_argument("--config", default=None,
                   help="ml-collections config file (default: configs/liveavatar_14b.py with --ckpt_dir, "
                        "configs/tiny.py without)")
    p.add_argument("--size", default=None, help="maximum area, e.g. 720*400 (default: the config's)")
    p.add_argument("--seed", type=int, default=None, help="stream seed (default: the config's)")
    p.add_argument("--steps", type=int, default=None, choices=(2, 3, 4), help="denoising steps per block")
    p.add_argument("--max_seconds", type=float, default=None, help="stop after this much audio")
    p.add_argument("--save_latents", default=None, help="write every block's final latents to this safetensors")
    p.add_argument("--tpp", action="store_true", help="timestep-forcing pipeline parallelism over the devices")
    p.add_argument("--cpu_devices", type=int, default=None, help="simulate N host devices (set before JAX starts)")
    p.add_argument("--profile", default=None, help="write a JAX profiler trace to this folder")
    args, overrides = p.parse_known_args(argv)
    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    return args, overrides


def load_config(args, overrides):
    import importlib.util

    path = Path(args.config) if args.config else REPO / "configs" / (
        "liveavatar_14b.py" if args.ckpt_dir else "tiny.py")
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for item in overrides:
        key, _, value = item[len("--config."):].partition("=")
        apply_override(config, key, value)
    if args.size:
        config.size = args.size
    if args.seed is not None:
        config.seed = args.seed
    if args.steps is not None:
        config.stream["steps"] = args.steps
    return config, path


def apply_override(config, dotted: str, value: str):
    """--config.a.b=value: the value is parsed as a Python literal when it is one, else kept as a string."""
    import ast

    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value
    node = config
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node[part]
    if parts[-1] not in node:
        raise KeyError(f"--config.{dotted}: the config has no such field")
    node[parts[-1]] = parsed


def simulate_cpu_devices(n: int) -> None:
    """N simulated host devices (to try TPP on a laptop); must run before JAX initialises its backend."""
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={n}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def peak_memory_bytes() -> dict:
    import resource

    import jax

    out = {"host_max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["device_peak_mb"] = stats["peak_bytes_in_use"] / 2**20
    return out


def main(argv=None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    from liveavatar_jax.runtime import prefer_onednn_on_cpu

    prefer_onednn_on_cpu()
    if args.cpu_devices:
        simulate_cpu_devices(args.cpu_devices)

    from liveavatar_jax.pipeline import InputError, check_output_path, plan_stream

    try:
        config, config_path = load_config(args, overrides)
        out = check_output_path(args.out)
        if args.save_latents:
            check_output_path(args.save_latents)
        plan, image = plan_stream(config, args.image, args.audio, max_seconds=args.max_seconds)
        if args.ckpt_dir:
            from liveavatar_jax.pipeline import CheckpointFiles
            ckpt = CheckpointFiles.find(args.ckpt_dir)
        else:
            from liveavatar_jax.pipeline import trained_weights_dir
            ckpt = None
            trained_weights_dir(config)     # a named folder must hold its files: fail before heavy work
    except (InputError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT

    import jax
    import numpy as np
    from tqdm import tqdm

    # Compiled programs are cached on disk, so a second stream of the same shapes starts without compiling.
    cache_dir = os.environ.get("LIVEAVATAR_JAX_CACHE", str(Path.home() / ".cache" / "liveavatar-jax" / "xla"))
    if cache_dir:
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

    from liveavatar_jax.io.video import StreamingMP4Writer
    from liveavatar_jax.pipeline import Pipeline

    t_start = time.perf_counter()
    engine_factory = None
    if args.tpp:
        from liveavatar_jax.parallel.tpp import TPPEngine
        engine_factory = TPPEngine
    pipe = Pipeline(config, ckpt, engine_factory=engine_factory)
    if pipe.models.random_weights:
        print(f"note: no --ckpt_dir: running the embedded default ({config_path.name}) with RANDOM weights; "
              "the video shows the pipeline working, not a face", file=sys.stderr)
    prepared = pipe.prepare(image, args.audio, args.prompt, plan=plan)
    t_ready = time.perf_counter()

    writer = StreamingMP4Writer(out, plan.width, plan.height, fps=config.fps, audio=prepared.waveform,
                                frames_per_block=4 * pipe.stream_cfg.frames_per_block,
                                total_frames=plan.video_frames)
    latents, times = [], []
    first_frame_at = None
    if args.profile:
        jax.profiler.start_trace(args.profile)
    bar = tqdm(total=plan.video_frames, unit="frame", desc="streaming", file=sys.stderr)
    try:
        for block in pipe.stream(prepared, config.seed):
            writer.write(block["frames"])
            if first_frame_at is None and len(block["frames"]):
                first_frame_at = time.perf_counter()
            times.append(block["seconds"])
            if args.save_latents:
                latents.append(block["latents"])
            steady = times[1:] or times
            fps = 4 * pipe.stream_cfg.frames_per_block / (sum(steady) / len(steady))
            left = (plan.blocks - block["index"] - 1) * (sum(steady) / len(steady))
            bar.set_postfix(block=f"{block['index'] + 1}/{plan.blocks}", ms_per_block=f"{1000 * times[-1]:.0f}",
                            fps=f"{fps:.1f}", left=f"{left:.0f}s")
            bar.update(len(block["frames"]))
    except KeyboardInterrupt:
        bar.close()
        partial = writer.abort()
        print(f"interrupted: {writer.frames_written} finished frames are in {partial}", file=sys.stderr)
        return 130
    bar.close()
    if args.profile:
        jax.profiler.stop_trace()
    writer.close()
    if args.save_latents:
        from safetensors.numpy import save_file
        save_file({"latents": np.stack(latents), "seed": np.asarray([config.seed], np.int64)}, args.save_latents)

    steady = times[1:]
    summary = {
        "out": str(out),
        "blocks": len(times),
        "frames": writer.frames_written,
        "seconds_of_video": writer.frames_written / config.fps,
        "load_s": round(pipe.load_seconds, 3),
        "prepare_s": round(t_ready - t_start - pipe.load_seconds, 3),
        "time_to_first_frame_s": round(first_frame_at - t_ready, 3) if first_frame_at else None,
        "first_block_s": round(times[0], 3),
        "steady_block_s": round(float(np.median(steady)), 4) if steady else None,
        "steady_fps": round(4 * pipe.stream_cfg.frames_per_block / float(np.median(steady)), 2) if steady else None,
        "tpp": bool(args.tpp),
        "devices": len(jax.devices()),
        "backend": jax.default_backend(),
        **{k: round(v, 1) for k, v in peak_memory_bytes().items()},
    }
    if args.tpp and hasattr(pipe.engine, "tick_breakdown"):
        # blocks leave a pipeline one per tick, so the tick period, not the per-call time, gives the rate
        summary["per_tick"] = pipe.engine.tick_breakdown()
        summary["steady_fps"] = round(summary["per_tick"].get("steady_fps_measured") or 0.0, 2) or None
        summary["steady_block_s"] = summary["per_tick"].get("tick_period_s_median")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
