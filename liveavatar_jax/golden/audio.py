"""Golden kind `audio`: the official audio chain from the raw native-rate crop to the per-block DiT audio inputs.

Follows the manifest's pipeline: the crop is written as a float32 wav at its native rate and loaded back through
`load_audio` (decode, mono mix, soxr_hq resample to 16 kHz), then normalised, run through the tiny `Wav2Vec2ForCTC`
(weights loaded by the user-facing loader under their checkpoint names), interpolated to 30 Hz, bucketed at the
manifest's fps into clips of `infer_frames`, permuted to `audio_emb` and sliced per AR block.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import soundfile

from liveavatar_jax.golden import Fixture, FixtureError
from liveavatar_jax.io.audio import FRAMES_PER_BLOCK, SAMPLE_RATE, encode_audio
from liveavatar_jax.models.wav2vec2 import Wav2Vec2Config, Wav2Vec2Runner
from liveavatar_jax.weights.wav2vec2_keys import load_wav2vec2


def run(fixture: Fixture) -> dict[str, np.ndarray]:
    mf = fixture.manifest
    config = Wav2Vec2Config.from_dict(mf["wav2vec2"]["config"])
    if int(mf.get("feature_extractor", {}).get("sampling_rate", SAMPLE_RATE)) != SAMPLE_RATE:
        raise FixtureError(f"{fixture.path}: the chain runs wav2vec2 at {SAMPLE_RATE} Hz only")
    native_rate = int(mf["source_clip"]["native_sample_rate"])
    infer_frames, fps = int(mf["infer_frames"]), int(mf["fps"])
    waveform = fixture.inputs["waveform_native_all_channels"]

    model = load_wav2vec2(fixture.weights_path, config, dtype=jnp.float32)
    with jax.default_matmul_precision("highest"), tempfile.TemporaryDirectory() as tmp:
        wav_path = Path(tmp) / "crop.wav"
        soundfile.write(str(wav_path), waveform, native_rate, subtype="FLOAT")
        enc = encode_audio(wav_path, Wav2Vec2Runner(model), infer_frames=infer_frames, fps=fps,
                           frames_per_block=FRAMES_PER_BLOCK)

    if "num_repeat" in mf and int(mf["num_repeat"]) != enc.num_repeat:
        raise FixtureError(f"{fixture.path}: num_repeat {enc.num_repeat} != manifest {mf['num_repeat']}")
    out = {
        "wav16k": enc.waveform,
        "input_values": enc.input_values,
        "hidden_states_all_layers": enc.hidden_states,
        "features_30fps": enc.features,
        "audio_embed_bucket": enc.audio_embed_bucket,
        "audio_emb": enc.audio_emb,
    }
    if enc.logits is not None:
        out["logits"] = enc.logits
    for (r, b), x in enc.block_inputs().items():
        out[f"clip{r}.block{b}.audio_input"] = x
    return {k: np.asarray(v, np.float32) for k, v in out.items()}
