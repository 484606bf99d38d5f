"""The embedding API: audio in chunks, frames out per block, each with the span of speech it shows."""

import importlib.util

import numpy as np
import pytest
import soundfile
from PIL import Image

from conftest import REPO


@pytest.fixture(scope="module")
def pipe():
    from liveavatar_jax.pipeline import Pipeline

    spec = importlib.util.spec_from_file_location("tiny", REPO / "configs" / "tiny.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return Pipeline(mod.get_config())


def test_live_generator_yields_blocks_as_audio_arrives(pipe):
    speech, sr = soundfile.read(str(REPO / "tests" / "data" / "speech_16k_mono.wav"), dtype="float32")
    speech = speech[: 3 * sr]
    chunks = [speech[i:i + 4800] for i in range(0, len(speech), 4800)]      # 0.3 s pieces
    image = Image.open(REPO / "tests" / "data" / "face.png")
    blocks = list(pipe.live(image, "a person talks", chunks, seed=1, total_samples=len(speech)))
    assert [b["index"] for b in blocks] == list(range(len(blocks)))
    frames = np.concatenate([b["frames"] for b in blocks])
    assert frames.dtype == np.uint8 and frames.shape[1:] == (64, 64, 3)
    assert len(blocks[0]["frames"]) == 9 and all(len(b["frames"]) == 12 for b in blocks[1:])
    spans = [b["audio_span"] for b in blocks]
    assert spans[0] == (3 / 25, 12 / 25)
    assert all(abs(a[1] - b[0]) < 1e-9 for a, b in zip(spans, spans[1:]))       # contiguous
    assert spans[-1][1] >= 3.0                                                  # covers the speech
