"""A spectral audio front end for the tiny world: log mel band energies in place of wav2vec2's hidden states.

The tiny world's mouth follows loudness and spectral shape (`tinyworld/mouth.py`), which a mel spectrogram carries
directly, while a toy-sized wav2vec2 needs training data and time this world does not have (a linear probe of a
random 24-layer, 32-wide wav2vec2 predicts the mouth with r 0.62 on unseen procedural speech; of these features,
r 0.95). It speaks the wav2vec2 runner's protocol (`config.num_frames`, `samples_per_frame`, `receptive_field`,
`num_hidden_states`, `hidden_size`; `runner(input_values [B, S]) -> hidden states [1, B, T50, C]`), so the official
chain after it (30 Hz interpolation, bucketing per video frame, the DiT's audio encoder) and the live streaming
encoder run unchanged. It has no weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from liveavatar_jax.models.wav2vec2 import Wav2Vec2Output

SAMPLE_RATE = 16000


@dataclasses.dataclass(frozen=True)
class SpectralConfig:
    bands: int = 32             # mel bands = the feature width the DiT's audio encoder reads (its audio_dim)
    window: int = 1280          # 80 ms Hann window: the span the mouth law looks at around each video frame
    hop: int = 320              # 20 ms, wav2vec2's 50 Hz frame rate
    span: int = 400             # frame i is centred where wav2vec2's is (i * hop + span / 2) and as many frames are
                                # made of a track as wav2vec2 makes; the window reaches past, into zero padding
    fmin: float = 80.0          # the law's band
    fmax: float = 5000.0
    log_floor: float = 1e-6     # power floor before the log (input is normalised to unit RMS)
    # log power mapped to roughly zero mean, unit spread on speech (measured on procedural speech)
    offset: float = 5.5
    scale: float = 0.17

    @property
    def hidden_size(self) -> int:
        return self.bands

    @property
    def num_hidden_layers(self) -> int:
        return 0

    @property
    def num_hidden_states(self) -> int:
        return 1

    @property
    def samples_per_frame(self) -> int:
        return self.hop

    @property
    def receptive_field(self) -> int:
        return self.span

    def num_frames(self, num_samples: int) -> int:
        n = int(num_samples)
        return 0 if n < self.span else (n - self.span) // self.hop + 1

    @classmethod
    def from_dict(cls, d: Mapping) -> "SpectralConfig":
        d = d.to_dict() if hasattr(d, "to_dict") else dict(d)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields - {"kind"})
        if unknown:
            raise ValueError(f"spectral front end: unknown config keys {unknown}; known: {sorted(fields)}")
        return cls(**{k: v for k, v in d.items() if k in fields})


class SpectralFrontEnd:
    """Log mel energies of Hann-windowed frames, as a wav2vec2 runner (see the module docstring)."""

    has_ctc_head = False

    def __init__(self, config: SpectralConfig = SpectralConfig()):
        import librosa

        self.config = config
        mel = librosa.filters.mel(sr=SAMPLE_RATE, n_fft=config.window, n_mels=config.bands, fmin=config.fmin,
                                  fmax=config.fmax, htk=True, norm=None)
        self._mel = jnp.asarray(mel.T, jnp.float32)                                  # [window // 2 + 1, bands]
        self._hann = jnp.asarray(np.hanning(config.window + 1)[:-1], jnp.float32)    # periodic Hann
        self._forward = jax.jit(self._features)

    def _features(self, input_values, num_valid_frames):
        cfg = self.config
        t = cfg.num_frames(input_values.shape[-1])
        pad = (cfg.window - cfg.span) // 2
        padded = jnp.pad(input_values, [(0, 0), (pad, pad)])
        idx = np.arange(t)[:, None] * cfg.hop + np.arange(cfg.window)[None, :]
        frames = padded[:, idx] * self._hann                                         # [B, T, window]
        power = jnp.abs(jnp.fft.rfft(frames, axis=-1)) ** 2 / cfg.window
        feats = (jnp.log(power @ self._mel + cfg.log_floor) + cfg.offset) * cfg.scale
        if num_valid_frames is not None:
            valid = jnp.arange(t)[None, :] < jnp.reshape(jnp.asarray(num_valid_frames), (-1, 1))
            feats = jnp.where(valid[..., None], feats, 0.0)
        return feats[None]

    def __call__(self, input_values, num_valid_frames=None) -> Wav2Vec2Output:
        return Wav2Vec2Output(self._forward(jnp.asarray(input_values, jnp.float32), num_valid_frames), None)
