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
    config = mod.get_config()
    config.stream.drop_first_frames = 3         # the official trimming (the tiny world keeps every frame)
    return Pipeline(config)


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
    # a second session with a prompt of another length (same text-key bucket) reuses every compiled program
    compiled = pipe.engine._step._cache_size(), pipe.engine._init._cache_size()
    again = list(pipe.live(image, "somebody says something else entirely", chunks[:4], seed=2,
                           total_samples=4 * 4800))
    assert again and (pipe.engine._step._cache_size(), pipe.engine._init._cache_size()) == compiled


def test_trained_weights_folder_is_loaded_and_a_missing_file_is_named(tmp_path):
    """config.trained_weights: the DiT and VAE come from the folder (official key names), not from the seed."""
    import jax
    from flax import nnx

    from liveavatar_jax.distill.export import export_dit
    from liveavatar_jax.pipeline import InputError, build_models
    from liveavatar_jax.weights.random_init import randomize
    from liveavatar_jax.weights.vae_keys import save_vae

    spec = importlib.util.spec_from_file_location("tiny", REPO / "configs" / "tiny.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config()
    config.trained_weights = ""                 # the embedded default's committed folder aside: random from the seed
    seeded = build_models(config)
    # "trained" = another seed's weights, written the way the recipe writes them
    config.weights_seed = 7
    other = build_models(config)
    assert other.random_weights
    export_dit(nnx.to_pure_dict(nnx.state(other.dit, nnx.Param)), other.dit.cfg, tmp_path / "dit.safetensors")
    config.trained_weights = str(tmp_path)
    with pytest.raises(InputError, match=r"missing vae\.safetensors"):
        build_models(config)
    save_vae(nnx.merge(other.vae.graphdef, other.vae.state), tmp_path / "vae.safetensors", dtype=np.float32)
    config.weights_seed = 0
    loaded = build_models(config)
    assert not loaded.random_weights and seeded.random_weights
    same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                        nnx.state(loaded.dit, nnx.Param), nnx.state(other.dit, nnx.Param))
    assert all(jax.tree.leaves(same))
    leaves = lambda m: [np.asarray(a, np.float32) for a in jax.tree.leaves(nnx.state(m.vae.state, nnx.Param))]  # noqa
    for a, b in zip(leaves(loaded), leaves(other)):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(leaves(loaded), leaves(seeded)))


def test_teacher_sampling_embeds_the_prompt_with_the_teacher(pipe, tmp_path):
    """`sample_teacher_frames` gives the teacher the prompt through the teacher's own text embedding: changing the
    pipeline's DiT (the student, which embeds the stream context's text) leaves the teacher's frames unchanged."""
    import jax
    from flax import nnx

    from liveavatar_jax.models.dit import CausalS2VDiT
    from liveavatar_jax.pipeline import plan_stream
    from liveavatar_jax.sampling.teacher import sample_teacher_frames
    from liveavatar_jax.weights.random_init import randomize

    speech, sr = soundfile.read(str(REPO / "tests" / "data" / "speech_16k_mono.wav"), dtype="float32")
    wav = tmp_path / "speech.wav"
    soundfile.write(str(wav), speech[: sr], sr)                     # 1 s: one 6-frame window
    image = REPO / "tests" / "data" / "face.png"
    plan, img = plan_stream(pipe.config, image, wav)
    teacher = randomize(nnx.eval_shape(lambda: CausalS2VDiT(pipe.models.dit.cfg, rngs=nnx.Rngs(0))), 11)

    def frames():
        prepared = pipe.prepare(img, wav, "a person talks", plan=plan)
        return sample_teacher_frames(pipe, teacher, prepared, "a person talks", frames=6, steps=2, seed=0)

    before = frames()
    embedding = pipe.models.dit.text_in.kernel
    saved = embedding[...]
    embedding[...] = saved * 3.0                                   # the student's text embedding changes
    try:
        pipe._embed_text = jax.jit(pipe.models.dit.embed_text)
        np.testing.assert_array_equal(frames(), before)
    finally:
        embedding[...] = saved
        pipe._embed_text = jax.jit(pipe.models.dit.embed_text)
