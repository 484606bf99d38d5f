"""The tiny world's law of speech: how far the mouth is open at each video frame, given the audio.

`mouth_openings(samples, sample_rate, fps)` returns one value in [0, 1] per video frame (0 closed, 1 fully open).
It is deterministic, uses only numpy, and is the ground truth both for the clips the world renders and for the
`sync` figure of `liveavatar_jax.eval`. Step by step:

1. Level. The audio is made mono at 16 kHz (`io.audio.mix_and_resample`) and its mean removed; it is then divided by
   its RMS over the whole track, but never by less than `LEVEL_FLOOR` (-45 dBFS). The model's audio front end
   normalises the track the same way (`io.audio.normalize_waveform`), so it cannot tell a quiet recording from a loud
   one; the opening must not depend on the recording level either (for tracks above -45 dBFS RMS: all real speech
   recordings). The floor keeps a silent or near-silent track closed instead of amplifying it: with step 3, sound
   more than 30 dB below max(track RMS, -45 dBFS), hence anything below -75 dBFS, closes the mouth.
2. Window. Video frame t (at `fps`) is centred at (t + 1/2) / fps seconds. Its window is the `WINDOW_FRAMES` = 2
   frame periods of audio (80 ms at 25 fps) centred there, Hann-weighted, zero outside the track.
3. Loudness. `loud_db` = 10 log10 of the window's mean power in the band `LOUDNESS_BAND_HZ` (80-5000 Hz), in dB
   relative to the track's level (0 dB = the level the track was normalised to in step 1). It is mapped linearly to
   `amount` in [0, 1]: `CLOSED_DB` (-30 dB) and below -> 0, `OPEN_DB` (0 dB) and above -> 1.
4. Spectral shape. Open vowels (/a/, /o/) put their first two formants between 300 and 1000 Hz; close vowels
   (/i/, /u/) and nasals put most of their energy below 300 Hz or above 1500 Hz, fricatives above 2 kHz. `share` is
   the fraction of the 80-5000 Hz power that lies in `OPEN_BAND_HZ` (300-1000 Hz); `openness` maps it linearly to
   [0, 1] (`SHARE_CLOSE` 0.2 -> 0, `SHARE_OPEN` 0.8 -> 1).
5. Opening = amount * (`SHAPE_FLOOR` + (1 - `SHAPE_FLOOR`) * openness), `SHAPE_FLOOR` = 0.35: loudness decides
   whether and how much the mouth opens, the spectral shape how wide (a loud /i/ opens to 0.35, a loud /a/ to 1).

The number of frames defaults to round(duration * fps), the count `infer.stream` renders for the same audio.
"""

from __future__ import annotations

import numpy as np

SAMPLE_RATE = 16000
FPS = 25
LEVEL_FLOOR = 10 ** (-45 / 20)      # -45 dBFS: the smallest track RMS the level normalisation divides by
WINDOW_FRAMES = 2                   # analysis window length, in video frame periods
LOUDNESS_BAND_HZ = (80.0, 5000.0)
OPEN_BAND_HZ = (300.0, 1000.0)
CLOSED_DB = -30.0
OPEN_DB = 0.0
SHARE_CLOSE = 0.2
SHARE_OPEN = 0.8
SHAPE_FLOOR = 0.35


def num_frames_for(num_samples: int, sample_rate: int = SAMPLE_RATE, fps: float = FPS) -> int:
    """Video frames the audio spans: round(duration * fps), as `infer.stream` plans them."""
    return int(round(num_samples / sample_rate * fps))


def _to_16k_mono(samples, sample_rate: int) -> np.ndarray:
    x = np.asarray(samples, np.float32)
    if x.ndim == 2 or sample_rate != SAMPLE_RATE:
        from liveavatar_jax.io.audio import mix_and_resample

        x = mix_and_resample(x, sample_rate, SAMPLE_RATE)
    if x.ndim != 1:
        raise ValueError(f"audio samples must be [frames] or [frames, channels], got shape {x.shape}")
    return x.astype(np.float64)


def _frame_spectra(x: np.ndarray, fps: float, num_frames: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(power spectra [N, bins] of the Hann windows centred on each frame, bin frequencies, window power sum)."""
    win = int(round(WINDOW_FRAMES * SAMPLE_RATE / fps))
    hann = np.hanning(win + 2)[1:-1]                 # no zero end points: every sample in the window counts
    centres = np.round((np.arange(num_frames) + 0.5) * SAMPLE_RATE / fps).astype(np.int64)
    starts = centres - win // 2
    pad_left = max(0, -int(starts.min(initial=0)))
    pad_right = max(0, int(starts.max(initial=0)) + win - len(x))
    padded = np.pad(x, (pad_left, pad_right))
    idx = (starts + pad_left)[:, None] + np.arange(win)[None]
    spectra = np.abs(np.fft.rfft(padded[idx] * hann, axis=-1)) ** 2
    freqs = np.fft.rfftfreq(win, 1.0 / SAMPLE_RATE)
    return spectra, freqs, float(win * np.sum(hann ** 2))


def mouth_features(samples, sample_rate: int = SAMPLE_RATE, fps: float = FPS,
                   num_frames: int | None = None) -> dict[str, np.ndarray]:
    """The intermediate quantities of steps 3-5 per frame: loud_db, amount, share, openness, opening."""
    x = _to_16k_mono(samples, sample_rate)
    if num_frames is None:
        num_frames = num_frames_for(len(x), SAMPLE_RATE, fps)
    if num_frames <= 0:
        empty = np.zeros(0, np.float32)
        return {k: empty for k in ("loud_db", "amount", "share", "openness", "opening")}
    if len(x):
        x = x - x.mean()
        x = x / max(float(np.sqrt(np.mean(x ** 2))), LEVEL_FLOOR)
    else:
        x = np.zeros(1)
    spectra, freqs, norm = _frame_spectra(x, fps, num_frames)
    band = (freqs >= LOUDNESS_BAND_HZ[0]) & (freqs <= LOUDNESS_BAND_HZ[1])
    open_band = (freqs >= OPEN_BAND_HZ[0]) & (freqs <= OPEN_BAND_HZ[1])
    # one-sided spectrum: each bin stands for itself and its negative-frequency twin
    band_power = 2 * spectra[:, band].sum(-1) / norm
    open_power = 2 * spectra[:, open_band].sum(-1) / norm
    loud_db = 10 * np.log10(band_power + 1e-12)
    amount = np.clip((loud_db - CLOSED_DB) / (OPEN_DB - CLOSED_DB), 0, 1)
    share = np.where(band_power > 0, open_power / np.maximum(band_power, 1e-30), 0.0)
    openness = np.clip((share - SHARE_CLOSE) / (SHARE_OPEN - SHARE_CLOSE), 0, 1)
    opening = amount * (SHAPE_FLOOR + (1 - SHAPE_FLOOR) * openness)
    return {k: np.asarray(v, np.float32) for k, v in
            dict(loud_db=loud_db, amount=amount, share=share, openness=openness, opening=opening).items()}


def mouth_openings(samples, sample_rate: int = SAMPLE_RATE, fps: float = FPS,
                   num_frames: int | None = None) -> np.ndarray:
    """float32 [num_frames] mouth opening in [0, 1] per video frame (module docstring: the exact definition).

    samples: mono [S] or [S, channels] audio at `sample_rate`. num_frames: default round(S / sample_rate * fps);
    frames past the end of the audio see silence (closed).
    """
    return mouth_features(samples, sample_rate, fps, num_frames)["opening"]
