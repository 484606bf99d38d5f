"""liveavatar_jax.eval: sync of ground-truth, frozen and late renders; drift of colour-shifted renders; the quiet face
of a render broken in the pauses; bad input."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

from liveavatar_jax import eval as metrics
from liveavatar_jax.tinyworld import clips, face
from liveavatar_jax.tinyworld.colour import delta_e_ciede2000, srgb8_to_lab

REPO = Path(__file__).resolve().parents[1]
REAL_SPEECH = REPO / "tests" / "data" / "speech_16k_mono.wav"


def run_eval(capsys, *args) -> tuple[int, dict | None, str]:
    code = metrics.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if code == 0 else None), captured.err


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 6 s ground-truth clip of procedural speech and variants of its frames, written as mp4s."""
    root = tmp_path_factory.mktemp("eval")
    clip = clips.make_clip(21, 6.0)
    truth = clips.write_clip(clip, root / "truth.mp4")
    out = {"root": root, "clip": clip, "truth": truth, "audio": truth.with_suffix(".wav"),
           "image": truth.with_suffix(".png")}
    frozen = clips.make_clip(21, 6.0, frozen_mouth=0.5)
    out["frozen"] = clips.write_mp4(root / "frozen.mp4", frozen.frames, frozen.audio)
    late = np.concatenate([clip.frames[:1].repeat(3, 0), clip.frames[:-3]])
    out["late"] = clips.write_mp4(root / "late.mp4", late, clip.audio)
    shifted = np.clip(clip.frames.astype(np.int16) + np.array([18, 0, -18]), 0, 255).astype(np.uint8)
    out["shifted"] = clips.write_mp4(root / "shifted.mp4", shifted, clip.audio)
    # the face broken into 4x4 tiles of +-20 in the frames where the law keeps the mouth shut: the mean colour and
    # the opening stay, as in a student whose face breaks up in the pauses of speech
    tiles = np.where((np.indices((64, 64)) // 4).sum(0) % 2 == 0, 20, -20)[..., None]
    broken = clip.frames.astype(np.int16)
    quiet = clip.openings < metrics.QUIET_OPENING
    broken[quiet, 16:56, 12:52] += tiles[16:56, 12:52]
    out["broken"] = clips.write_mp4(root / "broken.mp4", np.clip(broken, 0, 255).astype(np.uint8), clip.audio)
    out["quiet_frames"] = int(quiet.sum())
    return out


def test_ground_truth_render_is_in_sync_without_drift(world, capsys, tmp_path):
    series, overlay = tmp_path / "series.json", tmp_path / "regions.png"
    code, result, err = run_eval(capsys, "--video", world["truth"], "--audio", world["audio"],
                                 "--image", world["image"], "--series", series, "--regions", overlay)
    assert code == 0, err
    assert result["sync"] > 0.9
    assert result["sync_lag"]["frames"] == 0
    assert result["frames"] == 150 and result["fps"] == 25
    assert result["drift"]["metric"] == "CIEDE2000"
    assert len(result["drift"]["face_per_minute"]) == 1 and len(result["drift"]["background_per_minute"]) == 1
    assert result["drift"]["max"] < 2.0
    assert result["regions"]["mouth_found"]
    assert result["quiet_face_psnr"] > 28 and result["quiet_frames"] == world["quiet_frames"] > 10
    s = json.loads(series.read_text())
    assert len(s["measured_dark_pixels"]) == len(s["truth_opening"]) == 150
    np.testing.assert_allclose(s["truth_opening"], world["clip"].openings, atol=2e-3)
    from PIL import Image

    assert Image.open(overlay).size == (2 * 64 * 4, 64 * 4)


def test_frozen_mouth_scores_no_sync(world):
    result = metrics.evaluate(world["frozen"], world["audio"], world["image"])
    assert abs(result["sync"]) < 0.3
    assert result["drift"]["max"] < 2.0


def test_late_video_is_found_by_the_lag_search(world):
    result = metrics.evaluate(world["late"], world["audio"], world["image"])
    assert result["sync"] < 0.8
    assert result["sync_lag"]["frames"] == 3 and result["sync_lag"]["sync"] > 0.9


def test_colour_shift_shows_as_drift(world):
    result = metrics.evaluate(world["shifted"], world["audio"], world["image"])
    assert min(result["drift"]["face_per_minute"][0], result["drift"]["background_per_minute"][0]) > 5
    assert result["drift"]["max"] > 5
    assert result["sync"] > 0.9               # the mouth is still where it should be


def test_a_face_that_breaks_up_in_the_pauses_shows_in_quiet_face_psnr(world):
    truth = metrics.evaluate(world["truth"], world["audio"], world["image"])
    broken = metrics.evaluate(world["broken"], world["audio"], world["image"])
    assert broken["quiet_face_psnr"] < truth["quiet_face_psnr"] - 8
    assert broken["sync"] > 0.9 and broken["drift"]["max"] < 2.0      # what sync and drift alone would not show


def test_ground_truth_render_of_real_speech_is_in_sync(tmp_path):
    clip = clips.make_clip(3, audio=soundfile.read(REAL_SPEECH, dtype="float32")[0])
    video = clips.write_mp4(tmp_path / "real.mp4", clip.frames, clip.audio)
    face.save_png(clip.reference, tmp_path / "ref.png")
    result = metrics.evaluate(video, REAL_SPEECH, tmp_path / "ref.png")
    assert result["frames"] == 148
    assert result["sync"] > 0.9


def test_drift_is_reported_per_minute(tmp_path):
    """A still face for 2 min 10 s with its colours shifted in the second minute; silent audio."""
    reference = face.reference_face(face.sample_face(8), 48)
    shifted = np.clip(reference.astype(np.int16) + np.array([0, 25, 25]), 0, 255).astype(np.uint8)
    frames = np.stack([reference] * 1500 + [shifted] * 1500 + [reference] * 250)
    video = clips.write_mp4(tmp_path / "long.mp4", frames, None)
    soundfile.write(tmp_path / "silence.wav", np.zeros(130 * 16000, np.float32), 16000)
    face.save_png(reference, tmp_path / "ref.png")
    result = metrics.evaluate(video, tmp_path / "silence.wav", tmp_path / "ref.png")
    assert result["frames"] == 3250
    assert result["sync"] is None              # silence: the true opening is constant
    for name in ("face_per_minute", "background_per_minute"):
        first, second, third = result["drift"][name]
        assert first < 2 and third < 2 and second > 5
    assert result["drift"]["max"] == max(result["drift"]["face_per_minute"] + result["drift"]["background_per_minute"])


def test_cli_prints_one_json_object(world):
    proc = subprocess.run([sys.executable, "-m", "liveavatar_jax.eval", "--video", str(world["truth"]),
                           "--audio", str(world["audio"]), "--image", str(world["image"])],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert {"sync", "drift", "frames"} <= set(result)


def test_regions_of_the_sample_face_are_found():
    reference = metrics.load_reference(REPO / "tests" / "data" / "face.png", 64, 64)
    regions = metrics.locate_regions(reference)
    top, bottom, left, right = regions.mouth_box
    assert regions.mouth_found and top > 32 and left < 32 < right
    assert regions.face.sum() > 100 and regions.background.sum() > 100
    assert not (regions.face & regions.mouth).any() and not (regions.face & regions.background).any()


def test_ciede2000_matches_published_pairs():
    # Sharma, Wu and Dalal (2005), table 1: pairs 1, 7, 13, 17, 20
    pairs = [((50, 2.6772, -79.7751), (50, 0, -82.7485), 2.0425), ((50, 0, 0), (50, -1, 2), 2.3669),
             ((50, -0.001, 2.49), (50, 0.0009, -2.49), 4.8045), ((50, 2.5, 0), (73, 25, -18), 27.1492),
             ((50, 2.5, 0), (58, 24, 15), 19.4535)]
    for lab1, lab2, expected in pairs:
        assert float(delta_e_ciede2000(lab1, lab2)) == pytest.approx(expected, abs=1e-4)
        assert float(delta_e_ciede2000(lab2, lab1)) == pytest.approx(expected, abs=1e-4)
    np.testing.assert_allclose(srgb8_to_lab([255, 0, 0]), [53.2408, 80.0925, 67.2032], atol=1e-3)
    np.testing.assert_allclose(srgb8_to_lab([255, 255, 255]), [100, 0, 0], atol=1e-3)


def test_not_a_video_is_an_error_naming_the_file(world, capsys, tmp_path):
    fake = tmp_path / "fake.mp4"
    fake.write_text("this is not a video")
    code, _, err = run_eval(capsys, "--video", fake, "--audio", world["audio"], "--image", world["image"])
    assert code == 2 and str(fake) in err
    code, _, err = run_eval(capsys, "--video", tmp_path / "missing.mp4", "--audio", world["audio"],
                            "--image", world["image"])
    assert code == 2 and "missing.mp4" in err
    only_audio = tmp_path / "audio_only.wav"
    soundfile.write(only_audio, np.zeros(16000, np.float32), 16000)
    code, _, err = run_eval(capsys, "--video", only_audio, "--audio", world["audio"], "--image", world["image"])
    assert code == 2 and str(only_audio) in err


def test_mismatched_audio_is_an_error_naming_the_file(world, capsys, tmp_path):
    short = tmp_path / "short.wav"
    soundfile.write(short, world["clip"].audio[:3 * 16000], 16000)
    code, _, err = run_eval(capsys, "--video", world["truth"], "--audio", short, "--image", world["image"])
    assert code == 2 and str(short) in err and "does not match" in err
    # cutting both to the audio's length is allowed
    code, result, err = run_eval(capsys, "--video", world["truth"], "--audio", short, "--image", world["image"],
                                 "--max_seconds", "3")
    assert code == 0 and result["frames"] == 75
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF....WAVE")
    code, _, err = run_eval(capsys, "--video", world["truth"], "--audio", bad, "--image", world["image"])
    assert code == 2 and str(bad) in err


def test_image_without_a_face_is_an_error_naming_the_file(world, capsys, tmp_path):
    from PIL import Image

    plain = tmp_path / "plain.png"
    Image.new("RGB", (64, 64), (30, 120, 200)).save(plain)
    code, _, err = run_eval(capsys, "--video", world["truth"], "--audio", world["audio"], "--image", plain)
    assert code == 2 and str(plain) in err
    code, _, err = run_eval(capsys, "--video", world["truth"], "--audio", world["audio"],
                            "--image", tmp_path / "none.png")
    assert code == 2 and "none.png" in err
