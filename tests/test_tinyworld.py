"""The tiny world: the mouth law, procedural speech, faces, head motion, clips and the command line."""

import json

import numpy as np
import pytest
import soundfile

from liveavatar_jax.tinyworld import clips, face, mouth, speech
from liveavatar_jax.tinyworld.__main__ import main as tinyworld_main
from liveavatar_jax.tinyworld.colour import delta_e_cie76, srgb8_to_lab

SR = mouth.SAMPLE_RATE


def tone(freq, seconds, amplitude=0.3):
    t = np.arange(int(seconds * SR)) / SR
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def frames_of(t0, t1, fps=mouth.FPS):
    """Frames whose whole analysis window lies in [t0, t1) seconds."""
    return slice(int(np.ceil(t0 * fps)) + 1, int(t1 * fps) - 1)


# ------------------------------------------------------------------------------------------------ mouth law

def test_mouth_is_deterministic_and_one_value_per_frame():
    audio = speech.synthesize_speech(3.0, seed=4)
    a = mouth.mouth_openings(audio)
    b = mouth.mouth_openings(audio.copy())
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.float32 and a.shape == (75,)
    assert a.min() >= 0 and a.max() <= 1
    assert len(mouth.mouth_openings(audio[:SR + 300])) == round((SR + 300) / SR * 25)
    # frames past the end of the audio hear silence
    longer = mouth.mouth_openings(audio, num_frames=100)
    np.testing.assert_array_equal(longer[:70], a[:70])
    assert np.all(longer[80:] == 0)


def test_silence_and_near_silence_keep_the_mouth_closed():
    assert np.all(mouth.mouth_openings(np.zeros(2 * SR, np.float32)) == 0)
    hiss = np.random.default_rng(0).normal(0, 10 ** (-80 / 20), 2 * SR).astype(np.float32)
    assert np.all(mouth.mouth_openings(hiss) == 0)
    # the pauses between words of a speech track close the mouth
    track = np.concatenate([tone(700, 0.5), np.zeros(SR // 2, np.float32), tone(700, 0.5)])
    o = mouth.mouth_openings(track)
    assert np.all(o[frames_of(0.5, 1.0)] == 0)
    assert np.all(o[frames_of(0.0, 0.5)] > 0.5)


def test_louder_opens_wider_and_the_recording_level_does_not_matter():
    track = np.concatenate([tone(700, 0.6, 0.3), np.zeros(SR // 5, np.float32), tone(700, 0.6, 0.03)])
    o = mouth.mouth_openings(track)
    loud, quiet = o[frames_of(0.0, 0.6)], o[frames_of(0.8, 1.4)]
    assert quiet.max() > 0
    assert loud.min() > quiet.max()
    np.testing.assert_allclose(mouth.mouth_openings(track * 0.05), o, atol=1e-5)


def test_open_vowel_band_opens_wider_than_high_frequencies():
    track = np.concatenate([tone(700, 0.6), tone(2500, 0.6)])
    f = mouth.mouth_features(track)
    open_part, close_part = frames_of(0.0, 0.6), frames_of(0.6, 1.2)
    assert np.allclose(f["amount"][open_part], f["amount"][close_part], atol=0.05)
    assert f["opening"][open_part].min() > f["opening"][close_part].max()
    assert f["opening"][close_part].max() <= mouth.SHAPE_FLOOR + 1e-6


def test_mouth_resamples_and_mixes_other_formats():
    import librosa

    audio = speech.synthesize_speech(2.0, seed=1)
    up = librosa.resample(audio, orig_sr=SR, target_sr=32000)
    o16 = mouth.mouth_openings(audio)
    o32 = mouth.mouth_openings(np.stack([up, up], 1), sample_rate=32000)     # stereo at 32 kHz
    assert o32.shape == o16.shape
    assert np.corrcoef(o16, o32)[0, 1] > 0.99


# ------------------------------------------------------------------------------------------------ speech

def test_speech_is_deterministic_and_speech_like():
    a = speech.synthesize_speech(6.0, seed=7)
    np.testing.assert_array_equal(a, speech.synthesize_speech(6.0, seed=7))
    assert not np.array_equal(a, speech.synthesize_speech(6.0, seed=8))
    assert a.dtype == np.float32 and a.shape == (6 * SR,)
    assert np.all(np.isfinite(a)) and np.abs(a).max() <= 1.0
    o = mouth.mouth_openings(a)
    # pauses, half-open and fully open frames all occur
    assert (o == 0).mean() > 0.05
    assert ((o > 0.2) & (o < 0.7)).mean() > 0.1
    assert (o > 0.8).mean() > 0.05
    # syllables: the opening changes direction several times a second
    turns = np.sum(np.diff(np.sign(np.diff(o))) != 0)
    assert turns / 6.0 > 3
    with pytest.raises(ValueError, match="positive"):
        speech.synthesize_speech(0, seed=1)


# ------------------------------------------------------------------------------------------------ faces

def test_faces_respect_the_worlds_colour_rules():
    for seed in range(40):
        p = face.sample_face(seed)
        assert face.luma601(p.skin) >= face.MIN_FACE_LUMA and face.luma601(p.lips) >= face.MIN_FACE_LUMA
        skin = srgb8_to_lab(p.skin)
        for other in (p.hair, p.background, p.lips, face.EYE_WHITE):
            assert delta_e_cie76(skin, srgb8_to_lab(other)) >= face.MIN_COLOUR_GAP
        assert face.FaceParams.from_dict(json.loads(json.dumps(p.to_dict()))) == p


def dark_pixels(img):
    return int((face.luma601(img) < 60).sum())


def test_drawing_follows_opening_blink_and_sway():
    p = face.sample_face(2)
    rest = face.reference_face(p)
    assert rest.shape == (64, 64, 3) and rest.dtype == np.uint8
    np.testing.assert_array_equal(rest, face.draw_face(p, 64))
    areas = [float((face.luma601(face.draw_face(p, 64, opening=o)) < 60).sum()) for o in (0, 0.25, 0.5, 1.0)]
    assert areas == sorted(areas) and areas[-1] - areas[0] > 20
    blinked = face.draw_face(p, 64, blink=1.0)
    changed = np.any(blinked != rest, axis=-1)
    assert changed.any() and changed[int(0.7 * 64):].sum() == 0   # only the eyes change
    swayed = face.draw_face(p, 64, sway=(0.0, 1.0))             # clipped to MAX_SWAY
    np.testing.assert_array_equal(swayed, face.draw_face(p, 64, sway=(0.0, face.MAX_SWAY)))
    big = face.draw_face(p, (128, 96))
    assert big.shape == (128, 96, 3)
    with pytest.raises(ValueError, match="16x16"):
        face.draw_face(p, 8)


def test_head_motion_is_bounded_and_blinks():
    sway, blinks = clips.head_motion(3, 500)
    np.testing.assert_array_equal(sway, clips.head_motion(3, 500)[0])
    assert np.abs(sway).max() <= face.MAX_SWAY + 1e-7
    assert np.abs(sway[:, 1]).max() > 0.3 * face.MAX_SWAY
    assert 2 <= np.sum(np.diff((blinks > 0.9).astype(int)) == 1) <= 10     # 20 s: a blink every 1.5-6 s


# ------------------------------------------------------------------------------------------------ CLI

def test_face_cli_is_deterministic_and_differs_across_seeds(tmp_path):
    from PIL import Image

    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        assert tinyworld_main(["face", "--seed", str(seed), "--out", str(tmp_path / f"{name}.png")]) == 0
    a, b, c = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in "abc")
    assert a.shape == (64, 64, 3)
    np.testing.assert_array_equal(a, b)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert np.abs(a.astype(int) - c).mean() > 5
    assert tinyworld_main(["face", "--seed", "5", "--size", "96*80", "--out", str(tmp_path / "d.png")]) == 0
    assert np.asarray(Image.open(tmp_path / "d.png")).shape == (96, 80, 3)


@pytest.fixture(scope="module")
def written_clip(tmp_path_factory):
    out = tmp_path_factory.mktemp("clip") / "c.mp4"
    assert tinyworld_main(["clip", "--seed", "11", "--seconds", "3", "--out", str(out)]) == 0
    return out


def test_clip_cli_writes_video_audio_face_and_truth(written_clip):
    from liveavatar_jax.io.video import probe

    info = probe(written_clip)
    assert info["video_frames"] == 75 and info["fps"] == 25 and info["has_audio"]
    assert (info["width"], info["height"]) == (64, 64)
    assert not written_clip.with_name(written_clip.stem + ".partial.ts").exists()
    audio, sr = soundfile.read(written_clip.with_suffix(".wav"), dtype="float32")
    assert sr == SR and len(audio) == 3 * SR
    truth = json.loads(written_clip.with_suffix(".json").read_text())
    assert truth["frames"] == 75 and truth["seed"] == 11 and len(truth["opening"]) == 75
    # the truth follows from the written audio (16-bit rounding aside)
    np.testing.assert_allclose(truth["opening"], mouth.mouth_openings(audio), atol=2e-3)
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(written_clip.with_suffix(".png"))),
                                  face.reference_face(face.sample_face(11)))


def test_clip_audio_in_the_mp4_lines_up_with_the_wav(written_clip):
    from liveavatar_jax.data.preprocess import read_video

    frames, samples, rate = read_video(written_clip, 25, 64, 64)
    wav, _ = soundfile.read(written_clip.with_suffix(".wav"), dtype="float32")
    assert frames.shape == (75, 3, 64, 64) and rate == SR
    n = min(len(wav), len(samples)) - 2000
    scores = [np.dot(wav[1000:n], samples[1000 + lag:n + lag]) for lag in range(-400, 401)]
    assert int(np.argmax(scores)) - 400 == 0


def test_clip_cli_bad_input_names_the_file(tmp_path, capsys):
    missing = tmp_path / "nope.wav"
    assert tinyworld_main(["clip", "--seed", "1", "--audio", str(missing), "--out", str(tmp_path / "x.mp4")]) == 2
    assert str(missing) in capsys.readouterr().err
    not_audio = tmp_path / "text.wav"
    not_audio.write_text("hello")
    assert tinyworld_main(["clip", "--seed", "1", "--audio", str(not_audio), "--out", str(tmp_path / "x.mp4")]) == 2
    assert str(not_audio) in capsys.readouterr().err
    assert tinyworld_main(["clip", "--seed", "1", "--seconds", "1", "--out", str(tmp_path / "x.avi")]) == 2
    assert "x.avi" in capsys.readouterr().err
    assert tinyworld_main(["face", "--seed", "1", "--out", str(tmp_path)]) == 2
    assert str(tmp_path) in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tinyworld_main(["face", "--seed", "1", "--size", "8", "--out", str(tmp_path / "f.png")])


def test_dataset_cli_builds_training_examples_through_preprocess(tmp_path):
    from liveavatar_jax.data.format import read_example, read_index

    assert tinyworld_main(["dataset", "--count", "1", "--seconds", "3.9", "--out", str(tmp_path), "--",
                           "--random_encoders", "--frames", "6", "--text_len", "32"]) == 0
    index = read_index(tmp_path / "data")
    assert len(index["examples"]) == 1
    assert (index["spec"]["height"], index["spec"]["width"], index["spec"]["frames"]) == (8, 8, 6)
    arrays, meta = read_example(tmp_path / "data" / index["examples"][0]["file"])
    assert arrays["audio"].shape[-1] == 24 and meta["fps"] == "25"


def test_recipe_vae_flag_uses_the_given_vae_instead_of_training_one(tmp_path, capsys):
    """`recipe --vae FILE`: the vae stage copies the file (no training) and records where it came from; a missing
    file, or a run that already holds a different VAE, is refused before any stage runs."""
    vae = tmp_path / "trained_vae.safetensors"
    vae.write_bytes(b"stand-in bytes: the stage copies, it does not load")
    run = tmp_path / "run"
    assert tinyworld_main(["recipe", "--out", str(run), "--stages", "vae", "--vae", str(vae)]) == 0
    assert (run / "vae" / "vae.safetensors").read_bytes() == vae.read_bytes()
    assert not (run / "vae_images").exists()
    recorded = json.loads((run / "recipe.json").read_text())["stages"]["vae"]
    assert recorded["copied_from"] == str(vae.resolve()) and len(recorded["sha256"]) == 64
    assert tinyworld_main(["recipe", "--out", str(run), "--stages", "vae", "--vae", str(vae)]) == 0   # same file
    other = tmp_path / "other_vae.safetensors"
    other.write_bytes(b"another VAE")
    assert tinyworld_main(["recipe", "--out", str(run), "--stages", "vae", "--vae", str(other)]) == 2
    assert "different VAE" in capsys.readouterr().err
    assert (run / "vae" / "vae.safetensors").read_bytes() == vae.read_bytes()
    missing = tmp_path / "nope.safetensors"
    assert tinyworld_main(["recipe", "--out", str(tmp_path / "run2"), "--vae", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
    assert not (tmp_path / "run2" / "clips").exists()


def test_recipe_time_is_recorded_only_for_the_whole_recipe(tmp_path, monkeypatch):
    """`recipe.json`'s "recipe" seconds time the default stages run in one call; a later partial call (the ablation,
    an install, one stage again) keeps that figure instead of replacing it with its own few seconds."""
    from liveavatar_jax.tinyworld.recipe import Recipe

    run = tmp_path / "run"
    for stage in Recipe.STAGES:
        monkeypatch.setattr(Recipe, f"stage_{stage}", lambda self: None)
    recipe = Recipe(run, clips=1, seconds=1.0, eval_clips=1, eval_seconds=1.0, log=lambda line: None)
    recipe()
    whole = json.loads((run / "recipe.json").read_text())["stages"]["recipe"]
    (run / "recipe.json").write_text(json.dumps({"stages": {"recipe": {"seconds": 3283.0}}}))
    assert tinyworld_main(["recipe", "--out", str(run), "--stages", "eval,ablation"]) == 0
    assert json.loads((run / "recipe.json").read_text())["stages"]["recipe"] == {"seconds": 3283.0}
    assert set(whole) == {"seconds"}
