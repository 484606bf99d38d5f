"""TPP across processes: two CPU processes on localhost (jax.distributed, gloo collectives), one pipeline stage each
with its weights split over the process's two devices, give the single-device StreamEngine stream; plus the
resolution of the distributed settings from flags, JAX_* variables and launchers."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import golden_dir
from liveavatar_jax.golden import Fixture
from liveavatar_jax.golden.dit import load_fixture_model
from liveavatar_jax.parallel.distributed import resolve
from liveavatar_jax.parallel.tpp import LinearPreviewDecoder, draw_block_noise
from liveavatar_jax.streaming.engine import StreamConfig, StreamContext, StreamEngine, split_audio_blocks

WORKER = Path(__file__).with_name("tpp_worker.py")
STEPS, BLOCKS, SEED, PROCESSES = 2, 8, 11, 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rel_l2(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def seed_noise():
    """The seed's block noise, exactly as StreamEngine draws it."""
    key = jax.random.key(SEED)
    return np.stack([np.asarray(draw_block_noise(key, g, (1, 16, 3, 8, 16))) for g in range(BLOCKS)])


def single_device_reference(noise):
    fixture = Fixture.open(golden_dir("stream_loop"))
    _, model = load_fixture_model(Fixture.open(golden_dir("dit_s2v_causal")))
    inp = fixture.inputs
    ctx = StreamContext(text=model.embed_text(jnp.asarray(inp["context"])[None]),
                        ref_latents=jnp.asarray(inp["ref_latents"]), motion_latents=jnp.asarray(inp["motion_latents"]))
    audio = split_audio_blocks(jnp.asarray(inp["audio_emb"]), 3, 0, BLOCKS)
    engine = StreamEngine(model, StreamConfig(steps=STEPS, ring_blocks=4, sink_replace_block=4),
                          decoder=LinearPreviewDecoder())
    state, out = engine.run(engine.init(ctx, SEED), ctx, audio, noise=noise)
    return np.asarray(out["latents"]), np.asarray(out["frames"]), np.asarray(state.rings.k)


def test_two_processes_one_stage_each_match_single_device(tmp_path):
    golden_dir("dit_s2v_causal")
    noise = seed_noise()       # drawn once here and handed to the workers (the sampler is slow to compile on CPU)
    np.save(tmp_path / "noise.npy", noise)
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
               PYTHONUNBUFFERED="1")
    procs = [subprocess.Popen(
        [sys.executable, str(WORKER), "--coordinator_address", f"127.0.0.1:{port}", "--num_processes",
         str(PROCESSES), "--process_id", str(i), "--steps", str(STEPS), "--tensor", "2", "--blocks", str(BLOCKS),
         "--seed", str(SEED), "--noise", str(tmp_path / "noise.npy"), "--out", str(tmp_path)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(PROCESSES)]
    try:
        # The reference compiles while the workers do.
        ref_latents, ref_frames, ref_rings = single_device_reference(noise)
        deadline = time.monotonic() + 150
        logs = []
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            logs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"worker {i} failed:\n{log[-4000:]}"

    results = [dict(np.load(tmp_path / f"process{i}.npz")) for i in range(PROCESSES)]
    assert results[0]["num_processes"] == PROCESSES
    np.testing.assert_array_equal(results[0]["stage_processes"], [0, 1])     # stage i lives in process i
    for r in results:                                                        # every process holds the stream
        np.testing.assert_array_equal(r["blocks"], np.arange(BLOCKS))
        assert rel_l2(r["latents"], ref_latents) <= 1e-5
    # the last stage's process decodes (decode_on="last_stage"); the other has no frames
    assert "frames" not in results[0] and rel_l2(results[1]["frames"], ref_frames) <= 1e-5
    assert rel_l2(results[0]["rings_k"], ref_rings) <= 1e-5


@pytest.mark.parametrize("kwargs, env, expected", [
    ({}, {}, (None, 1, 0, "single")),
    ({"coordinator_address": "10.0.0.1:1234", "num_processes": 5, "process_id": 4}, {},
     ("10.0.0.1:1234", 5, 4, "args")),
    ({}, {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}, ("h:1", 2, 1, "env")),
    ({"process_id": 0}, {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"},
     ("h:1", 2, 0, "args")),                                                 # a flag beats the variable
    ({}, {"SLURM_NTASKS": "5", "SLURM_PROCID": "3"}, (None, 5, 3, "slurm")),  # JAX finds the coordinator
    ({}, {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1", "JAX_COORDINATOR_ADDRESS": "h:9"},
     ("h:9", 2, 1, "ompi")),
])
def test_settings_resolve_from_flags_env_and_launchers(kwargs, env, expected):
    cfg = resolve(**kwargs, environ=env)
    assert (cfg.coordinator_address, cfg.num_processes, cfg.process_id, cfg.source) == expected


@pytest.mark.parametrize("kwargs, env, message", [
    ({"num_processes": 2, "process_id": 0}, {}, "no coordinator address"),
    ({"coordinator_address": "h:1", "num_processes": 2}, {}, "no process id"),
    ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, {}, r"outside 0\.\.1"),
    ({}, {"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES must be an integer"),
])
def test_bad_settings_are_refused(kwargs, env, message):
    with pytest.raises(ValueError, match=message):
        resolve(**kwargs, environ=env)
