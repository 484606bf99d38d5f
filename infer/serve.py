"""python -m infer.serve: live talking-avatar video in the browser over WebRTC.

  python -m infer.serve [--config FILE] [--ckpt_dir DIR] [--host 127.0.0.1] [--port 8080] [--tpp]
      [--max_sessions N] [--cpu_devices N] [--idle_timeout S] [--max_session_s S] [--playout_delay S]
      [--max_image_mb MB] [--ice_server URL] [--config.key=value ...]

Open http://HOST:PORT/ , pick or upload a face, type a prompt, press Start and speak (or choose an audio file): the
speech goes to the server as a WebRTC audio track, and the avatar comes back as a 25 fps video track with the same
speech beside it. Without --ckpt_dir the embedded default runs (configs/tiny.py, random weights: the page shows the
pipeline working, not a face). The pipeline is built and compiled once at start-up; sessions are accepted when
/healthz says ready. /metrics reports time to first frame, fps, per-stage times, late frames and A/V offset per
session. Bad arguments exit with code 2 before anything is built. See docs/serve.md.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import types
from pathlib import Path

EXIT_BAD_INPUT = 2


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m infer.serve", description=__doc__.split("\n")[0])
    p.add_argument("--config", default=None,
                   help="ml-collections config file (default: configs/liveavatar_14b.py with --ckpt_dir, "
                        "configs/tiny.py without)")
    p.add_argument("--ckpt_dir", default=None, help="converted LiveAvatar/Wan weights (liveavatar_jax.convert)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; WebRTC media follows it)")
    p.add_argument("--port", type=int, default=8080, help="HTTP port (0: any free port, printed at start)")
    p.add_argument("--tpp", action="store_true", help="timestep-forcing pipeline parallelism over the devices")
    p.add_argument("--max_sessions", type=int, default=1, help="sessions streaming at once; one more gets 503")
    p.add_argument("--cpu_devices", type=int, default=None, help="simulate N host devices (set before JAX starts)")
    p.add_argument("--idle_timeout", type=float, default=5.0,
                   help="seconds without incoming audio after which a session counts as dropped")
    p.add_argument("--max_session_s", type=float, default=600.0, help="a session's audio is ended after this long")
    p.add_argument("--playout_delay", type=float, default=0.1,
                   help="jitter margin in seconds between a block being ready and its first frame being due")
    p.add_argument("--max_image_mb", type=float, default=8.0, help="largest accepted reference image upload")
    p.add_argument("--ice_server", action="append", default=[], metavar="URL",
                   help="STUN/TURN server for clients behind NAT (repeatable; default none: no outside traffic)")
    p.add_argument("--seed", type=int, default=None, help="stream seed (default: the config's)")
    args, overrides = p.parse_known_args(argv)
    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    if args.max_sessions < 1:
        p.error("--max_sessions must be at least 1")
    if not 0 <= args.port <= 65535:
        p.error("--port must be in 0..65535")
    for name in ("idle_timeout", "max_session_s", "max_image_mb"):
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be positive")
    if args.playout_delay < 0:
        p.error("--playout_delay must not be negative")
    return args, overrides


async def serve(args, config, ckpt) -> int:
    import jax
    from aiohttp import web

    from liveavatar_jax.pipeline import Pipeline
    from liveavatar_jax.serve.server import AvatarServer
    from liveavatar_jax.serve.session import SessionOptions
    from liveavatar_jax.serve.uploads import Limits

    log = logging.getLogger("liveavatar.serve")
    loop = asyncio.get_running_loop()
    engine_factory = None
    if args.tpp:
        from liveavatar_jax.parallel.tpp import TPPEngine
        engine_factory = TPPEngine
    pipe = await loop.run_in_executor(None, lambda: Pipeline(config, ckpt, engine_factory=engine_factory))
    if pipe.models.random_weights:
        log.warning("no --ckpt_dir: serving the embedded default (%s) with RANDOM weights; the video shows the "
                    "pipeline working, not a face", config.get("name", "tiny"))
    options = SessionOptions(seed=int(config.seed), playout_delay_s=args.playout_delay,
                             idle_timeout_s=args.idle_timeout, max_session_s=args.max_session_s,
                             ice_servers=tuple(args.ice_server))
    server = AvatarServer(pipe, max_sessions=args.max_sessions, options=options,
                          limits=Limits(max_image_bytes=int(args.max_image_mb * 2**20)))
    runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    await site.start()
    port = runner.addresses[0][1] if runner.addresses else args.port
    url = f"http://{args.host}:{port}/"
    print(f"listening on {url} (compiling the pipeline; sessions wait for ready)", flush=True)

    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        seconds = await loop.run_in_executor(None, server.warm_up)
    except Exception:
        log.exception("warm-up failed")
        await runner.cleanup()
        return 1
    h, w = server.geometry
    print(f"ready: {url} ({w}x{h} at {config.fps} fps, {jax.default_backend()}, warm-up {seconds:.1f} s, "
          f"max {args.max_sessions} session(s))", flush=True)
    await stop.wait()
    print("shutting down", flush=True)
    await runner.cleanup()
    return 0


def main(argv=None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    from infer.stream import load_config, simulate_cpu_devices
    from liveavatar_jax.runtime import prefer_onednn_on_cpu

    prefer_onednn_on_cpu()
    if args.cpu_devices:
        simulate_cpu_devices(args.cpu_devices)
    from liveavatar_jax.pipeline import CheckpointFiles, InputError

    try:
        config, _ = load_config(types.SimpleNamespace(config=args.config, ckpt_dir=args.ckpt_dir, size=None,
                                                      seed=args.seed, steps=None), overrides)
        ckpt = CheckpointFiles.find(args.ckpt_dir) if args.ckpt_dir else None
        from liveavatar_jax.serve.server import serving_geometry
        try:
            serving_geometry(config)
        except (ValueError, TypeError) as e:
            raise InputError(f"--config.size={config.size!r}: {e}") from None
    except (InputError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("aioice", "aiortc", "aiohttp.access", "jax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    import jax

    # Compiled programs are cached on disk (as infer.stream does): a restart of the same config warms up in seconds.
    cache_dir = os.environ.get("LIVEAVATAR_JAX_CACHE", str(Path.home() / ".cache" / "liveavatar-jax" / "xla"))
    if cache_dir:
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

    from liveavatar_jax.serve.server import restrict_ice_to
    restrict_ice_to(args.host)
    return asyncio.run(serve(args, config, ckpt))


if __name__ == "__main__":
    sys.exit(main())
