"""Audio front end: loading, wav2vec2 (weights by official names), the feature chain and the streaming encoder."""

import json
from pathlib import Path

import librosa
import numpy as np
import pytest
import soundfile
from safetensors.numpy import load_file, save_file

from conftest import golden_dir
from liveavatar_jax.golden import run_fixture
from liveavatar_jax.io import audio as A
from liveavatar_jax.io.audio import AudioError, StreamingAudioEncoder
from liveavatar_jax.models.wav2vec2 import Wav2Vec2Config, Wav2Vec2Runner
from liveavatar_jax.weights.checkpoint import CheckpointError
from liveavatar_jax.weights.wav2vec2_keys import fold_weight_norm, load_wav2vec2

SPEECH = Path(__file__).parent / "data" / "speech_16k_mono.wav"
POS = "wav2vec2.encoder.pos_conv_embed.conv"


@pytest.fixture(scope="module")
def fixture_dir():
    return golden_dir("audio")


@pytest.fixture(scope="module")
def config(fixture_dir):
    return Wav2Vec2Config.from_dict(json.loads((fixture_dir / "manifest.json").read_text())["wav2vec2"]["config"])


@pytest.fixture(scope="module")
def weights(fixture_dir):
    return load_file(str(fixture_dir / "weights.safetensors"))


@pytest.fixture(scope="module")
def runner(fixture_dir, config):
    return Wav2Vec2Runner(load_wav2vec2(fixture_dir / "weights.safetensors", config))


@pytest.fixture(scope="module")
def speech():
    return A.load_audio(SPEECH)


@pytest.fixture(scope="module")
def whole_file(speech, runner):
    return A.encode_audio(speech, runner, sample_rate=A.SAMPLE_RATE)


# --- golden -------------------------------------------------------------------------------------------------------

def test_golden_audio_fixture(fixture_dir):
    fixture, rows = run_fixture(fixture_dir)
    bad = [r.line() for r in rows if not r.ok]
    assert not bad, "\n".join(bad)
    assert len(rows) == len(fixture.outputs) == 15


# --- loading ------------------------------------------------------------------------------------------------------

def test_load_matches_librosa_load_for_stereo_at_another_rate(tmp_path):
    rng = np.random.default_rng(0)
    stereo = (0.3 * rng.standard_normal((24000, 2))).astype(np.float32)
    path = tmp_path / "stereo.flac"
    soundfile.write(str(path), stereo, 24000, subtype="PCM_24")
    expected, _ = librosa.load(str(path), sr=16000)
    got = A.load_audio(path)
    assert got.dtype == np.float32 and got.shape == expected.shape == (16000,)
    np.testing.assert_array_equal(got, expected)


def test_audioread_fallback(tmp_path, monkeypatch):
    path = tmp_path / "pcm16.wav"
    tone = (0.5 * np.sin(np.arange(8000) * 0.05)).astype(np.float32)
    soundfile.write(str(path), tone, 16000, subtype="PCM_16")
    direct = A.load_audio(path)

    def refuse(*args, **kwargs):
        raise RuntimeError("format not supported")

    monkeypatch.setattr(A.soundfile, "info", refuse)
    info = A.probe_audio(path)
    assert info.backend == "audioread" and info.sample_rate == 16000 and info.channels == 1
    np.testing.assert_allclose(A.load_audio(path), direct, atol=1e-7)


def test_normalisation_matches_feature_extractor_formula(speech):
    x = A.normalize_waveform(speech)
    assert x.dtype == np.float32
    np.testing.assert_allclose(x, (speech - speech.mean()) / np.sqrt(speech.var() + 1e-7), rtol=0, atol=0)


@pytest.mark.parametrize("case", ["missing", "empty", "corrupt", "no_samples", "too_short", "directory"])
def test_bad_audio_files_name_the_file(tmp_path, case):
    path = tmp_path / f"{case}.wav"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "corrupt":
        path.write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk" + bytes(range(200)))
    elif case == "no_samples":
        soundfile.write(str(path), np.zeros((0,), np.float32), 16000)
    elif case == "too_short":
        soundfile.write(str(path), np.zeros(int(0.03 * 16000), np.float32), 16000)  # 30 ms < 40 ms
    elif case == "directory":
        path.mkdir()
    with pytest.raises(AudioError, match=str(path).replace("\\", "\\\\")) as info:
        A.load_audio(path)
    assert isinstance(info.value, ValueError)


def test_too_short_for_the_feature_chain(tmp_path, runner):
    # 42 ms passes the one-video-frame check but gives a single wav2vec2 frame: no 30 Hz frame.
    path = tmp_path / "blip.wav"
    soundfile.write(str(path), np.full(672, 0.1, np.float32), 16000)
    with pytest.raises(AudioError, match="blip.wav.*too short"):
        A.encode_audio(path, runner)


# --- chain --------------------------------------------------------------------------------------------------------

def test_bucketing_semantics():
    idx, nr = A.bucket_frame_indices(89)          # the fixture: 149 wav2vec2 frames -> 89 at 30 Hz
    assert nr == 2 and idx.shape == (96,)
    np.testing.assert_array_equal(idx[:6], [0, 1, 2, 4, 5, 6])    # round(k * 1.2)
    assert (idx < 89).sum() == 74                                  # frames 74.. are past the audio (zeros)
    assert A.num_clips(57) == 1 and A.num_clips(58) == 2           # int(T30 / 57.6) + 1
    assert [A.num_feature_frames(t) for t in (2, 5, 149, 295)] == [1, 3, 89, 177]


def test_bucket_features_zero_past_audio(whole_file):
    bucket = np.asarray(whole_file.audio_embed_bucket)
    idx, nr = A.bucket_frame_indices(whole_file.features.shape[1])
    assert nr == whole_file.num_repeat and bucket.shape[0] == nr * 48
    past = idx >= whole_file.features.shape[1]
    assert past.any() and not np.any(bucket[past])
    np.testing.assert_array_equal(bucket[~past], np.asarray(whole_file.features).transpose(1, 0, 2)[idx[~past]])
    blocks = whole_file.block_inputs()
    assert len(blocks) == 4 * nr and blocks[(1, 2)].shape == (1, 25, 32, 12)
    np.testing.assert_array_equal(blocks[(1, 2)], np.asarray(whole_file.audio_emb)[..., 72:84])


def test_streaming_frame_indices_match_official_linspace():
    enc = StreamingAudioEncoder.__new__(StreamingAudioEncoder)
    enc.frames_per_block, enc.fps, enc._known_scale = 12, 25, None
    for t30 in (60, 577, 2881):
        idx, nr = A.bucket_frame_indices(t30)
        ours = np.concatenate([enc._frames_of(g)[0] for g in range(nr * 4)])
        np.testing.assert_array_equal(np.minimum(ours, idx.max()), idx)


# --- config and weights -------------------------------------------------------------------------------------------

def test_config_from_manifest_hf_json_and_ml_collections(fixture_dir, config, tmp_path):
    import ml_collections
    raw = json.loads((fixture_dir / "manifest.json").read_text())["wav2vec2"]["config"]
    assert Wav2Vec2Config.from_dict(ml_collections.ConfigDict(raw)) == config
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert Wav2Vec2Config.from_json(tmp_path) == config
    assert config.num_hidden_states == 25 and config.samples_per_frame == 320 and config.receptive_field == 400
    with pytest.raises(ValueError, match="do_stable_layer_norm"):
        Wav2Vec2Config.from_dict({**raw, "do_stable_layer_norm": False, "feat_extract_norm": "group"})


def test_weight_norm_fold_matches_definition(weights):
    g, v = weights[f"{POS}.weight_g"], weights[f"{POS}.weight_v"]
    w = fold_weight_norm(g, v)
    for k in range(v.shape[2]):
        np.testing.assert_allclose(w[:, :, k], g[0, 0, k] * v[:, :, k] / np.linalg.norm(v[:, :, k]), rtol=1e-6)


def _write_folder(tmp_path, tensors, config_dict):
    folder = tmp_path / "wav2vec2-large-xlsr-53-english"
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config_dict))
    return folder


def test_load_from_hf_folder_with_parametrized_weight_norm_and_no_head(tmp_path, weights, fixture_dir, runner):
    tensors = dict(weights)
    tensors[f"{POS}.parametrizations.weight.original0"] = tensors.pop(f"{POS}.weight_g")
    tensors[f"{POS}.parametrizations.weight.original1"] = tensors.pop(f"{POS}.weight_v")
    cfg = json.loads((fixture_dir / "manifest.json").read_text())["wav2vec2"]["config"]
    folder = _write_folder(tmp_path, tensors, cfg)
    model = load_wav2vec2(folder, ctc_head=False)
    assert model.lm_head is None and model.config.num_hidden_layers == 24
    x = np.random.default_rng(1).standard_normal((1, 3200)).astype(np.float32)
    got = Wav2Vec2Runner(model)(x).hidden_states
    np.testing.assert_allclose(np.asarray(got), np.asarray(runner(x).hidden_states), rtol=0, atol=0)


@pytest.mark.parametrize("change", ["missing", "unexpected", "wrong_shape", "half_weight_norm"])
def test_bad_checkpoints_name_the_file(tmp_path, weights, config, change):
    tensors = dict(weights)
    if change == "missing":
        del tensors["wav2vec2.encoder.layers.7.attention.k_proj.weight"]
    elif change == "unexpected":
        tensors["wav2vec2.quantizer.codevectors"] = np.zeros((1, 4, 8), np.float32)
    elif change == "wrong_shape":
        tensors["wav2vec2.feature_projection.projection.bias"] = np.zeros((31,), np.float32)
    else:
        del tensors[f"{POS}.weight_g"]
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=str(path)) as info:
        load_wav2vec2(path, config)
    if change == "missing":
        assert "wav2vec2.encoder.layers.7.attention.k_proj.weight" in str(info.value)
    if change == "unexpected":
        assert "wav2vec2.quantizer.codevectors" in str(info.value)


def test_padding_mask_is_exact(runner):
    x = np.random.default_rng(2).standard_normal((1, 6400)).astype(np.float32)
    t = runner.config.num_frames(x.shape[1])
    padded = np.concatenate([x, np.random.default_rng(3).standard_normal((1, 3200)).astype(np.float32)], axis=1)
    a = np.asarray(runner(x).hidden_states)
    b = np.asarray(runner(padded, t).hidden_states)[:, :, :t]
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)


# --- streaming ----------------------------------------------------------------------------------------------------

def _stream(runner, wav, chunk, **kw):
    enc = StreamingAudioEncoder(runner, **kw)
    state, blocks, emitted_at = enc.init(), [], []
    for i in range(0, len(wav), chunk):
        state, new = enc.push(state, wav[i:i + chunk])
        blocks += new
        emitted_at += [state.received] * len(new)
        assert state.buffer.shape[0] <= enc.window_samples + 2 * chunk
    state, new = enc.finish(state)
    return enc, state, blocks + new, emitted_at


def _per_block_rel_l2(blocks, reference):
    ref = np.asarray(reference)
    errs = []
    for blk in blocks:
        e = ref[..., 12 * blk.index:12 * blk.index + 12]
        n = np.linalg.norm(e)
        errs.append(np.linalg.norm(np.asarray(blk.features) - e) / n if n else np.linalg.norm(blk.features))
    return np.array(errs)


@pytest.mark.parametrize("mode", ["known_length", "live"])
def test_streaming_stays_within_documented_bound(runner, speech, whole_file, mode):
    total = len(speech) if mode == "known_length" else None
    enc, state, blocks, emitted_at = _stream(runner, speech, 1600, total_samples=total)
    assert [b.index for b in blocks] == list(range(4 * whole_file.num_repeat))
    assert state.finished
    errs = _per_block_rel_l2(blocks, whole_file.audio_emb)
    assert errs.max() <= StreamingAudioEncoder.DOCUMENTED_BOUND[mode], errs
    # Blocks come out while the audio is still arriving, not at the end.
    assert emitted_at and emitted_at[0] < len(speech) / 2
    if mode == "known_length":
        assert errs[-7:].max() < 1e-3   # once the running statistics cover the clip, only attention truncation is left


def test_streaming_is_independent_of_chunking(runner, speech):
    _, _, a, _ = _stream(runner, speech, 1600)
    _, _, b, _ = _stream(runner, speech, 7919)
    assert [x.index for x in a] == [x.index for x in b]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x.features), np.asarray(y.features))


def test_streaming_errors(runner):
    enc = StreamingAudioEncoder(runner)
    state, _ = enc.push(enc.init(), np.zeros(500, np.float32))
    with pytest.raises(AudioError, match="stream.*too short"):
        enc.finish(state)
    with pytest.raises(AudioError, match="non-finite"):
        enc.push(enc.init(), np.array([0.0, np.nan], np.float32))
    fixed = StreamingAudioEncoder(runner, total_samples=16000)
    with pytest.raises(AudioError, match="more than total_samples"):
        fixed.push(fixed.init(), np.zeros(16001, np.float32))
