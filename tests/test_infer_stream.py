"""python -m infer.stream end to end at the embedded tiny default: the mp4, a SIGKILL mid-stream, bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile

from liveavatar_jax.io.video import probe

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
# A clip no training stage saw (tinyworld/recipe.py EVAL_SEED + 51). The committed weights score 0.76 on it (the
# guidance-3 weights at EMA 0.99 0.79; those of the afternoon of 2026-11-30 0.80; of its morning 0.79 with the
# stream's ring of 2 blocks or of 4), random ones -0.04; weights of 2026-11-28 scored 0.35 on seed 900050, too close
# to the guard's 0.3, hence 900051
SYNC_SEED = 900_051


def run_stream(*args, **kw):
    return subprocess.run([sys.executable, "-m", "infer.stream", *map(str, args)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    out = tmp / "demo.mp4"
    r = run_stream("--image", DATA / "face.png", "--audio", DATA / "speech_16k_mono.wav", "--prompt", "hello",
                   "--out", out, "--save_latents", tmp / "lat.safetensors", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp, r


def test_stream_writes_a_complete_mp4(single_run):
    tmp, r = single_run
    out = tmp / "demo.mp4"
    assert "RANDOM weights" not in r.stderr          # the embedded default carries the tiny world's trained weights
    info = probe(out)
    audio_s = soundfile.info(str(DATA / "speech_16k_mono.wav")).duration
    assert info["fps"] == 25.0
    assert info["video_frames"] == round(audio_s * 25)
    assert info["has_audio"] and abs(info["audio_s"] - info["video_s"]) <= 1 / 25 + 1e-6
    assert not (tmp / "demo.partial.ts").exists() and not (tmp / ".demo.mp4.tmp.mp4").exists()
    from safetensors.numpy import load_file
    lat = load_file(str(tmp / "lat.safetensors"))["latents"]
    assert lat.shape[0] == int(np.ceil(info["video_frames"] / 12)) and lat.shape[1:3] == (16, 3)
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["blocks"] == lat.shape[0] and summary["frames"] == info["video_frames"]


def test_embedded_default_moves_the_mouth_with_unseen_speech(tmp_path):
    """The committed tiny-world weights, streamed by the main command on a face, voice and sentences no training
    clip had: the mouth follows the speech (a guard against a broken checkpoint or loader; the headline figures are
    in docs/tinyworld.md). Random weights score about 0 (-0.04 on this clip, 0.14 on seed 900050)."""
    from liveavatar_jax.eval import evaluate
    from liveavatar_jax.tinyworld.clips import make_clip, write_clip

    truth = write_clip(make_clip(SYNC_SEED, seconds=8.0), tmp_path / "truth.mp4")
    out = tmp_path / "default.mp4"
    r = run_stream("--image", truth.with_suffix(".png"), "--audio", truth.with_suffix(".wav"), "--out", out,
                   timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    scored = evaluate(out, truth.with_suffix(".wav"), truth.with_suffix(".png"))
    assert scored["sync"] > 0.3, scored


def test_tpp_on_five_simulated_devices_writes_the_same_latents(single_run, tmp_path):
    tmp, _ = single_run
    r = run_stream("--image", DATA / "face.png", "--audio", DATA / "speech_16k_mono.wav", "--prompt", "hello",
                   "--out", tmp_path / "tpp.mp4", "--save_latents", tmp_path / "lat.safetensors",
                   "--tpp", "--cpu_devices", 5, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    from safetensors.numpy import load_file
    single = load_file(str(tmp / "lat.safetensors"))["latents"]
    tpp = load_file(str(tmp_path / "lat.safetensors"))["latents"]
    assert tpp.shape == single.shape
    # float32 sums in another order on the sharded programs, carried through ~15 autoregressive blocks (1.1e-5 with
    # the trained weights); a wrong cache, step or timestep differs at order 1
    assert np.linalg.norm(tpp - single) / np.linalg.norm(single) <= 1e-4
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["devices"] == 5 and summary["per_tick"]["blocks_per_tick_after_fill"] == 1.0


def test_sigkill_leaves_every_finished_block_playable(tmp_path):
    speech, sr = soundfile.read(str(DATA / "speech_16k_mono.wav"), dtype="float32")
    long = tmp_path / "long.wav"
    soundfile.write(str(long), np.tile(speech, 8), sr)                 # ~47 s: ~100 blocks
    out = tmp_path / "long.mp4"
    partial = tmp_path / "long.partial.ts"
    proc = subprocess.Popen([sys.executable, "-m", "infer.stream", "--image", str(DATA / "face.png"),
                             "--audio", str(long), "--out", str(out)], cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 900
        seen = 0
        while time.time() < deadline and proc.poll() is None:
            if partial.exists():
                try:
                    seen = probe(partial)["video_frames"]
                except Exception:   # the header may still be on its way
                    seen = 0
                if seen >= 12 * 4:
                    break
            time.sleep(0.05)
        assert proc.poll() is None, "the stream ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()
    info = probe(partial)
    assert info["video_frames"] >= seen >= 12 * 4
    assert info["video_frames"] % 12 == 0                         # whole blocks only (the tiny world drops none)
    import av
    with av.open(str(partial)) as c:
        decoded = sum(1 for _ in c.decode(video=0))
    assert decoded == info["video_frames"]


@pytest.mark.parametrize("case", ["missing_image", "not_an_image", "short_audio", "corrupt_audio", "no_out_dir",
                                  "bad_size", "empty_ckpt"])
def test_bad_input_exits_2_naming_the_problem(tmp_path, case):
    image, audio, out = DATA / "face.png", DATA / "speech_16k_mono.wav", tmp_path / "o.mp4"
    extra, expect = [], None
    if case == "missing_image":
        image, expect = tmp_path / "nope.png", "nope.png"
    elif case == "not_an_image":
        image = tmp_path / "fake.png"
        image.write_text("this is text")
        expect = "fake.png"
    elif case == "short_audio":
        audio = tmp_path / "short.wav"
        soundfile.write(str(audio), np.zeros(3000, np.float32), 16000)
        expect = "shorter than one block"
    elif case == "corrupt_audio":
        audio = tmp_path / "bad.wav"
        audio.write_bytes(b"RIFF\x00\x00junk" * 4)
        expect = "bad.wav"
    elif case == "no_out_dir":
        out, expect = tmp_path / "missing" / "o.mp4", "does not exist"
    elif case == "bad_size":
        extra, expect = ["--size", "32*32"], "at least 64x64"
    elif case == "empty_ckpt":
        (tmp_path / "ckpt").mkdir()
        extra, expect = ["--ckpt_dir", tmp_path / "ckpt"], "missing"
    r = run_stream("--image", image, "--audio", audio, "--out", out, *extra, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert expect in r.stderr, r.stderr[-2000:]
    assert not out.exists()
