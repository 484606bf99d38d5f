"""Procedural speech-like audio: formant-synthesised syllables with pauses, pitch and loudness that vary, in numpy.

`synthesize_speech(seconds, seed)` returns 16 kHz mono float32 audio, the same samples for the same arguments on any
machine (numpy's PCG64 generator, no system synthesiser). What it makes, from the seed:

* A speaker: base pitch 85-250 Hz and a vocal-tract scale 0.9-1.2 that multiplies every formant frequency.
* Phrases of 2-7 words, 1-3 syllables per word, 0-120 ms gaps between words and 250-800 ms pauses between phrases
  (and a short silence at the start). Syllables are (consonant) + vowel + (consonant).
* Vowels: the first three formants of /a e i o u ae er/ (Peterson & Barney's adult male averages), 90-250 ms, stressed
  syllables 4 dB louder, longer and higher. Voiced consonants (nasals m n, approximants l w j r) are formant targets
  too, quieter; formant tracks glide between targets over 30 ms as real articulators do.
* Voicing is additive synthesis: every harmonic of the running pitch up to 5 kHz, amplitudes from a -6 dB/octave
  source slope times the cascade of three formant resonances, with a little vibrato and aspiration noise. The pitch
  falls through each phrase (declination) and rises on stressed syllables.
* Unvoiced consonants: fricatives (s, sh, f) are band-limited noise; plosives (p, t, k) a 40-70 ms closure followed by
  a short noise burst.
* The track is scaled to an RMS level drawn from -26 to -18 dBFS (the mouth law does not depend on it).

The result sounds like babble in an unknown language — enough to drive the mouth through the full range of loudness
and spectral shape that `mouth.mouth_openings` reads, with the timing of speech.
"""

from __future__ import annotations

import dataclasses

import numpy as np

SAMPLE_RATE = 16000
CONTROL_HOP = 80                      # samples per control frame (5 ms): formants, pitch and envelopes
MAX_HARMONIC_HZ = 5000.0
BANDWIDTHS_HZ = (90.0, 110.0, 170.0)

# (F1, F2, F3) in Hz and a relative level in dB
VOWELS = {"a": ((730, 1090, 2440), 0.0), "e": ((530, 1840, 2480), -1.0), "i": ((270, 2290, 3010), -3.0),
          "o": ((570, 840, 2410), -1.0), "u": ((300, 870, 2240), -3.0), "ae": ((660, 1720, 2410), 0.0),
          "er": ((490, 1350, 1690), -2.0)}
VOICED_CONSONANTS = {"m": ((250, 1100, 2300), -14.0), "n": ((250, 1700, 2500), -14.0),
                     "l": ((360, 1300, 2700), -8.0), "w": ((300, 700, 2200), -8.0),
                     "j": ((280, 2200, 3000), -8.0), "r": ((420, 1300, 1600), -8.0)}
FRICATIVES = {"s": ((4000.0, 7500.0), -14.0), "sh": ((2000.0, 5500.0), -14.0), "f": ((1200.0, 7500.0), -22.0)}
PLOSIVES = {"p": ((500.0, 3000.0), -16.0), "t": ((3000.0, 7000.0), -14.0), "k": ((1500.0, 4000.0), -14.0)}


@dataclasses.dataclass(frozen=True)
class Segment:
    """A stretch of the utterance: `kind` is "voiced", "noise" or "silence"; "phrase" (no duration) marks the start
    of a phrase, where the pitch declination restarts."""
    kind: str
    seconds: float
    formants: tuple = (500.0, 1500.0, 2500.0)  # voiced: targets
    band: tuple = (0.0, 0.0)                    # noise: pass band in Hz
    level_db: float = 0.0
    pitch_scale: float = 1.0


def _db(x: float) -> float:
    return float(10 ** (x / 20))


def _syllable(rng: np.random.Generator, stressed: bool, tract: float) -> list[Segment]:
    segments = []
    stress_db = 4.0 if stressed else 0.0
    pitch = 1.12 if stressed else 1.0

    def consonant():
        kind = rng.choice(["voiced", "fricative", "plosive"], p=[0.45, 0.3, 0.25])
        if kind == "voiced":
            name = rng.choice(list(VOICED_CONSONANTS))
            f, lvl = VOICED_CONSONANTS[name]
            return [Segment("voiced", rng.uniform(0.05, 0.1), tuple(tract * np.array(f)), level_db=lvl + stress_db,
                            pitch_scale=pitch)]
        if kind == "fricative":
            name = rng.choice(list(FRICATIVES))
            band, lvl = FRICATIVES[name]
            return [Segment("noise", rng.uniform(0.06, 0.13), band=band, level_db=lvl + stress_db)]
        name = rng.choice(list(PLOSIVES))
        band, lvl = PLOSIVES[name]
        return [Segment("silence", rng.uniform(0.04, 0.07)),
                Segment("noise", rng.uniform(0.012, 0.025), band=band, level_db=lvl + stress_db)]

    if rng.random() < 0.8:
        segments += consonant()
    name = rng.choice(list(VOWELS))
    f, lvl = VOWELS[name]
    length = rng.uniform(0.09, 0.2) * (1.25 if stressed else 1.0)
    segments.append(Segment("voiced", length, tuple(tract * np.array(f)), level_db=lvl + stress_db + rng.normal(0, 1.5),
                            pitch_scale=pitch))
    if rng.random() < 0.3:
        segments += consonant()
    return segments


def plan_utterance(seconds: float, rng: np.random.Generator, tract: float) -> list[Segment]:
    """Segments of phrases and pauses until `seconds` are filled (the last one is cut at render time)."""
    segments = [Segment("silence", rng.uniform(0.1, 0.4))]
    total = segments[0].seconds
    while total < seconds:
        for _ in range(int(rng.integers(2, 8))):
            syllables = int(rng.integers(1, 4))
            stress = int(rng.integers(syllables))
            for s in range(syllables):
                segments += _syllable(rng, s == stress, tract)
            if rng.random() < 0.5:
                segments.append(Segment("silence", rng.uniform(0.0, 0.12)))
        segments.append(Segment("silence", rng.uniform(0.25, 0.8)))
        segments.append(Segment("phrase", 0.0))
        total = sum(s.seconds for s in segments)
    return segments


def _control_tracks(segments: list[Segment], n_ctrl: int, base_pitch: float, rng: np.random.Generator):
    """Per control frame: formants [n, 3], voiced amplitude, noise amplitude, noise band index, pitch."""
    rate = SAMPLE_RATE / CONTROL_HOP
    formants = np.zeros((n_ctrl, 3))
    voiced = np.zeros(n_ctrl)
    noise = np.zeros(n_ctrl)
    band_id = np.zeros(n_ctrl, np.int64)
    pitch_scale = np.ones(n_ctrl)
    phrase_pos = np.zeros(n_ctrl)
    bands = []
    t = 0
    last_formants = np.array([500.0, 1500.0, 2500.0])
    phrase_start = 0
    for seg in segments:
        if seg.kind == "phrase":
            phrase_start = t
            continue
        n = int(round(seg.seconds * rate))
        end = min(t + n, n_ctrl)
        if end > t:
            if seg.kind == "voiced":
                last_formants = np.array(seg.formants, np.float64)
                voiced[t:end] = _db(seg.level_db)
                pitch_scale[t:end] = seg.pitch_scale
            elif seg.kind == "noise":
                noise[t:end] = _db(seg.level_db)
                bands.append(seg.band)
                band_id[t:end] = len(bands)
            formants[t:end] = last_formants
            phrase_pos[t:end] = (np.arange(t, end) - phrase_start) / rate
        t += n
        if t >= n_ctrl:
            break
    formants[t:] = last_formants

    def smooth(x, seconds):
        k = max(1, int(round(seconds * rate)))
        kernel = np.ones(k) / k
        pad = [(k // 2, k - 1 - k // 2)] + [(0, 0)] * (x.ndim - 1)
        xp = np.pad(x, pad, mode="edge")
        if x.ndim == 1:
            return np.convolve(xp, kernel, mode="valid")
        return np.stack([np.convolve(xp[:, i], kernel, mode="valid") for i in range(x.shape[1])], 1)

    formants = smooth(formants, 0.03)
    voiced = smooth(voiced, 0.015)
    noise = smooth(noise, 0.008)
    # declination over the phrase, stress bumps, slow wander and 5 Hz vibrato
    wander = smooth(rng.normal(0, 0.04, n_ctrl), 0.3)
    times = np.arange(n_ctrl) / rate
    pitch = (base_pitch * smooth(pitch_scale, 0.08) * (1.1 - 0.12 * np.minimum(phrase_pos, 2.5))
             * (1 + wander) * (1 + 0.006 * np.sin(2 * np.pi * 5.0 * times)))
    return formants, voiced, noise, band_id, bands, pitch


def _resonance_gain(f: np.ndarray, centre: np.ndarray, bandwidth: float) -> np.ndarray:
    """|H(f)| of a two-pole resonator with unit gain at 0 Hz."""
    c2 = centre ** 2
    return c2 / np.sqrt((c2 - f ** 2) ** 2 + (bandwidth * f) ** 2)


def _voiced(formants, amp, pitch, rng) -> np.ndarray:
    n_ctrl = len(amp)
    n = n_ctrl * CONTROL_HOP
    ctrl_t = (np.arange(n_ctrl) + 0.5) * CONTROL_HOP
    sample_t = np.arange(n)
    f0 = np.interp(sample_t, ctrl_t, pitch)
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    harmonics = np.arange(1, int(MAX_HARMONIC_HZ // max(pitch.min(), 40.0)) + 1)
    fk = pitch[:, None] * harmonics[None]                                     # [n_ctrl, K]
    gain = amp[:, None] / harmonics[None] * (fk < MAX_HARMONIC_HZ)
    for i in range(3):
        gain = gain * _resonance_gain(fk, formants[:, i:i + 1], BANDWIDTHS_HZ[i])
    out = np.zeros(n)
    # linear interpolation of every harmonic's gain between control frames, a second of audio at a time
    pos = np.clip((sample_t - ctrl_t[0]) / CONTROL_HOP, 0, n_ctrl - 1)
    lo = np.minimum(pos.astype(np.int64), n_ctrl - 1)
    hi = np.minimum(lo + 1, n_ctrl - 1)
    frac = (pos - lo)[:, None]
    for start in range(0, n, SAMPLE_RATE):
        sl = slice(start, min(start + SAMPLE_RATE, n))
        if not np.any(amp[lo[sl][0]:hi[sl][-1] + 1] > 0):
            continue
        g = gain[lo[sl]] * (1 - frac[sl]) + gain[hi[sl]] * frac[sl]
        out[sl] = np.sum(g * np.sin(phase[sl, None] * harmonics[None]), axis=1)
    # breathiness: a little noise that follows the voicing
    breath = rng.standard_normal(n) * np.interp(sample_t, ctrl_t, amp) * 0.02
    return out + breath


def _noise(noise_amp, band_id, bands, rng) -> np.ndarray:
    n = len(noise_amp) * CONTROL_HOP
    ctrl_t = (np.arange(len(noise_amp)) + 0.5) * CONTROL_HOP
    white = rng.standard_normal(n)
    spectrum = np.fft.rfft(white)
    freqs = np.fft.rfftfreq(n, 1.0 / SAMPLE_RATE)
    out = np.zeros(n)
    ids = np.interp(np.arange(n), ctrl_t, band_id.astype(np.float64)).round().astype(np.int64)
    for band in sorted(set(bands)):
        mask = np.isin(ids, [i for i, b in enumerate(bands, start=1) if b == band])
        if not mask.any():
            continue
        passed = (freqs >= band[0]) & (freqs <= band[1])
        shaped = np.fft.irfft(spectrum * passed, n)
        # unit RMS per band so the segment levels mean the same for narrow and wide bands
        shaped /= max(np.sqrt(np.mean(shaped ** 2)), 1e-12)
        out += shaped * mask
    return out * np.interp(np.arange(n), ctrl_t, noise_amp) * 3.0


def synthesize_speech(seconds: float, seed: int, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """float32 mono speech-like audio of exactly round(seconds * sample_rate) samples, deterministic in `seed`."""
    if seconds <= 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    if sample_rate != SAMPLE_RATE:
        raise ValueError(f"the synthesiser works at {SAMPLE_RATE} Hz, got sample_rate={sample_rate}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EEC]))
    base_pitch = float(rng.uniform(85.0, 250.0))
    tract = float(rng.uniform(0.9, 1.2))
    num = int(round(seconds * SAMPLE_RATE))
    n_ctrl = -(-num // CONTROL_HOP)
    segments = plan_utterance(seconds, rng, tract)
    formants, voiced_amp, noise_amp, band_id, bands, pitch = _control_tracks(segments, n_ctrl, base_pitch, rng)
    audio = _voiced(formants, voiced_amp, pitch, rng) + _noise(noise_amp, band_id, bands, rng)
    audio = audio[:num]
    rms = np.sqrt(np.mean(audio ** 2))
    level = _db(float(rng.uniform(-26.0, -18.0)))
    if rms > 0:
        audio = audio * (level / rms)
    return np.clip(audio, -1.0, 1.0).astype(np.float32)
