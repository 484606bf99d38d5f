"""Training data: the on-disk format, the grain loader (order, resume, host sharding, malformed examples) and the
preprocessing of real video files into examples."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from liveavatar_jax.data.format import (DatasetError, DatasetWriter, ExampleSpec, read_example, read_index,
                                        read_negative_text, validate)
from liveavatar_jax.data.loader import BadExampleError, make_iterator
from liveavatar_jax.data.preprocess import (PreprocessError, build_dataset, clip_starts, load_encoders,
                                            random_example, write_random_dataset)

SPEC = ExampleSpec(channels=16, frames=6, height=8, width=16, motion_frames=19, audio_layers=25, audio_dim=32,
                   text_dim=32, text_len=32)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_random_dataset(root, SPEC, count=10, seed=3)
    return root


def test_writer_and_reader_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    arrays = random_example(SPEC, rng)
    writer = DatasetWriter(tmp_path, SPEC)
    writer.add("clip0", arrays, {"caption": "hello"})
    writer.set_negative_text(rng.standard_normal((5, 32)))
    writer.close()
    index = read_index(tmp_path)
    assert index["examples"] == [{"id": "clip0", "file": "examples/clip0.safetensors"}]
    back, meta = read_example(tmp_path / "examples/clip0.safetensors")
    for k, v in arrays.items():
        np.testing.assert_allclose(back[k], v.astype(np.float32))
    assert meta["caption"] == "hello" and meta["id"] == "clip0"
    assert read_negative_text(tmp_path).shape == (5, 32)


def test_validation_names_every_problem():
    rng = np.random.default_rng(1)
    bad = random_example(SPEC, rng)
    bad["latents"] = bad["latents"][:, :5]
    bad["audio"][0, 0, 0] = np.nan
    del bad["motion_latents"]
    problems = validate(bad, SPEC)
    assert any("latents has shape [16, 5, 8, 16], expected [16, 6, 8, 16]" in p for p in problems)
    assert any("audio holds non-finite values" in p for p in problems)
    assert any("missing tensor 'motion_latents'" in p for p in problems)


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_loader_order_is_deterministic_and_resumes_exactly(dataset):
    kw = dict(global_batch=2, seed=7)
    a = make_iterator(dataset, SPEC, **kw)
    first = _take(a, 3)
    assert first[0]["latents"].shape == (2, 16, 6, 8, 16) and first[0]["text"].shape == (2, 32, 32)
    state = a.get_state()
    rest = _take(a, 4)                                  # crosses the epoch boundary (10 examples)
    b = make_iterator(dataset, SPEC, **kw)
    assert [x["index"].tolist() for x in _take(b, 3)] == [x["index"].tolist() for x in first]
    c = make_iterator(dataset, SPEC, **kw)
    c.set_state(state)
    for x, y in zip(_take(c, 4), rest):
        np.testing.assert_array_equal(x["index"], y["index"])
        np.testing.assert_array_equal(x["latents"], y["latents"])
    seen = np.concatenate([x["index"] for x in first + rest[:2]])
    assert sorted(seen.tolist()) == list(range(10))    # one epoch is a permutation


def test_loader_shards_over_processes(dataset):
    parts = [np.concatenate([x["index"] for x in _take(
        make_iterator(dataset, SPEC, global_batch=4, seed=0, process_index=p, process_count=2), 2)]) for p in (0, 1)]
    assert len(parts[0]) == len(parts[1]) == 4             # 2 examples per process and batch
    assert not set(parts[0]) & set(parts[1])               # disjoint shards of one epoch


def test_loader_rejects_a_dataset_of_other_shapes(dataset):
    other = ExampleSpec(**{**SPEC.to_dict(), "frames": 9, "audio_dim": 16})
    with pytest.raises(DatasetError, match=r"audio_dim: dataset 32 vs config 16.*frames: dataset 6 vs config 9"):
        make_iterator(dataset, other, global_batch=2, seed=0)


@pytest.fixture()
def damaged(tmp_path):
    write_random_dataset(tmp_path, SPEC, count=4, seed=5)
    index = json.loads((tmp_path / "index.json").read_text())
    bad = tmp_path / index["examples"][1]["file"]
    bad.write_bytes(bad.read_bytes()[:100])             # truncated
    return tmp_path, bad


def test_malformed_example_is_skipped_and_counted(damaged):
    root, bad = damaged
    it = make_iterator(root, SPEC, global_batch=4, seed=0, shuffle=False, on_bad_example="skip")
    batch = next(it)
    assert batch["index"].tolist() == [0, 2, 2, 3]      # position 1 is replaced by the next good example
    assert batch["skipped"].tolist() == [0, 1, 0, 0]


def test_malformed_example_stops_the_run_when_asked(damaged):
    root, bad = damaged
    it = make_iterator(root, SPEC, global_batch=4, seed=0, shuffle=False, on_bad_example="raise")
    with pytest.raises(BadExampleError, match=rf"{bad.name}: malformed training example: .*not a readable"):
        next(it)


def test_missing_index_is_reported(tmp_path):
    with pytest.raises(DatasetError, match=r"index.json: dataset index not found"):
        read_index(tmp_path)


def _write_video(path, frames, h=64, w=128, fps=25, sr=16000, audio=True):
    import av

    c = av.open(str(path), "w")
    vs = c.add_stream("libx264", rate=fps)
    vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
    aus = c.add_stream("aac", rate=sr) if audio else None
    if aus is not None:
        aus.layout = "mono"
    for i in range(frames):
        img = np.zeros((h, w, 3), np.uint8)
        img[:, (3 * i) % w:(3 * i) % w + 10] = 255
        for p in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            c.mux(p)
    for p in vs.encode():
        c.mux(p)
    if aus is not None:
        t = np.arange(int(frames / fps * sr)) / sr
        wave = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
        for k in range(0, len(wave), 1024):
            fr = av.AudioFrame.from_ndarray(wave[None, k:k + 1024], format="fltp", layout="mono")
            fr.sample_rate, fr.pts = sr, k
            for p in aus.encode(fr):
                c.mux(p)
        for p in aus.encode():
            c.mux(p)
    c.close()


def test_clip_windows_leave_room_for_the_motion_frames():
    assert clip_starts(73 + 24, 24, 24) == [73]
    assert clip_starts(73 + 24 + 30, 24, 24) == [73, 97]
    assert clip_starts(90, 24, 24) == []


def test_preprocess_builds_examples_from_videos(tmp_path):
    import tempfile

    import jax

    # the encoders' programs go to the on-disk cache the training tests use
    jax.config.update("jax_compilation_cache_dir", str(Path(tempfile.gettempdir()) / "liveavatar_jax_test_xla_cache"))
    videos = tmp_path / "videos"
    videos.mkdir()
    _write_video(videos / "talk.mp4", frames=73 + 24 + 3)
    (videos / "talk.txt").write_text("a woman talks")
    _write_video(videos / "short.mp4", frames=40)               # too short for one clip: reported, skipped
    _write_video(videos / "mute.mp4", frames=100, audio=False)  # no audio track: reported, skipped
    encoders = load_encoders(None)
    out = tmp_path / "ds"
    build_dataset(videos, out, encoders, latent_frames=6, height=64, width=128, text_len=32)
    index = read_index(out)
    assert [e["id"] for e in index["examples"]] == ["talk_000073"]
    # the tiny encoders' audio front end gives one 32-wide feature row per frame (configs/tiny.py)
    spec = dataclasses.replace(SPEC, audio_layers=1)
    assert ExampleSpec.from_dict(index["spec"]) == spec
    arrays, meta = read_example(out / index["examples"][0]["file"])
    assert validate(arrays, spec) == [] and meta["caption"] == "a woman talks"
    assert np.abs(arrays["audio"]).sum() > 0
    with pytest.raises(PreprocessError, match=r"mute.mp4: no audio track"):
        build_dataset([videos / "mute.mp4"], tmp_path / "ds2", encoders, latent_frames=6, height=64, width=128,
                      on_error="raise")


def test_preprocess_command_writes_synthetic_examples_for_a_config(tmp_path, capsys):
    from train.preprocess import main

    assert main(["--out", str(tmp_path / "syn"), "--synthetic", "3", "--like", str(Path(__file__).resolve().parents[1] / "configs" / "distill_tiny.py")]) == 0
    index = read_index(tmp_path / "syn")
    assert len(index["examples"]) == 3 and index["spec"]["frames"] == 9
    assert main(["--out", str(tmp_path / "x"), "--videos", str(tmp_path / "nothing"), "--random_encoders"]) == 2
    assert "not a folder" in capsys.readouterr().err
