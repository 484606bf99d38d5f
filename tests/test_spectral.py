"""The tiny world's spectral audio front end: band energies in the right bands, the runner protocol, live = file."""

import numpy as np
import pytest

from liveavatar_jax.io.audio import StreamingAudioEncoder, encode_audio, normalize_waveform
from liveavatar_jax.models.spectral import SAMPLE_RATE, SpectralConfig, SpectralFrontEnd


@pytest.fixture(scope="module")
def front_end():
    return SpectralFrontEnd(SpectralConfig())


def _tone(freq, seconds=1.0):
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return np.sin(2 * np.pi * freq * t).astype(np.float32)


def test_a_tone_lights_the_band_that_holds_it(front_end):
    import librosa

    centres = librosa.mel_frequencies(n_mels=front_end.config.bands + 2, fmin=front_end.config.fmin,
                                      fmax=front_end.config.fmax, htk=True)[1:-1]
    for freq in (200.0, 700.0, 3000.0):
        h = np.asarray(front_end(normalize_waveform(_tone(freq))[None]).hidden_states)[0, 0]
        assert int(np.argmax(h.mean(0))) == int(np.argmin(np.abs(centres - freq))), freq


def test_frames_follow_the_runner_protocol(front_end):
    cfg = front_end.config
    n = SAMPLE_RATE
    h = front_end(np.zeros((2, n), np.float32)).hidden_states
    assert h.shape == (cfg.num_hidden_states, 2, cfg.num_frames(n), cfg.hidden_size)
    # as many frames as wav2vec2 makes of the same track (the official feature chain's lengths stay the same)
    from liveavatar_jax.models.wav2vec2 import Wav2Vec2Config

    w2v = Wav2Vec2Config()
    for samples in (400, 719, 720, 16000, 62399):
        assert cfg.num_frames(samples) == w2v.num_frames(samples), samples


def test_live_chunks_match_the_whole_file(front_end):
    rng = np.random.default_rng(0)
    # a babble of loud and quiet 100 ms segments
    wav = (rng.standard_normal(3 * SAMPLE_RATE) * np.repeat(rng.uniform(0.01, 1, 30), SAMPLE_RATE // 10))
    wav = wav.astype(np.float32)
    whole = np.asarray(encode_audio(wav, front_end, sample_rate=SAMPLE_RATE).audio_emb)
    enc = StreamingAudioEncoder(front_end, total_samples=len(wav))
    state, blocks = enc.init(), []
    for i in range(0, len(wav), 1600):
        state, out = enc.push(state, wav[i:i + 1600])
        blocks += out
    state, out = enc.finish(state)
    live = np.concatenate([np.asarray(b.features) for b in blocks + out], axis=-1)
    assert live.shape == whole.shape
    # the only difference: running normalisation statistics instead of the whole file's
    assert np.linalg.norm(live - whole) / np.linalg.norm(whole) < 0.05


def test_unknown_keys_are_named():
    with pytest.raises(ValueError, match="bandz"):
        SpectralConfig.from_dict({"kind": "spectral", "bandz": 3})
