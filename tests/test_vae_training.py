"""VAE training (distill/vae_trainer.py, train/vae.py): the loss falls, a resumed run is bit-identical to an
uninterrupted one, and the export under the official key names loads back to the same decoder and statistics.

One small VAE (stride 2 in space and time) on one 1-second tiny-world clip at 32x32; one trainer, so the
step compiles once for the whole module.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.tinyworld_vae import get_config
from liveavatar_jax.distill.vae_trainer import (ClipWindows, VAETrainer, inflate_time, reconstruct, recolour,
                                                to_unit)
from liveavatar_jax.models.vae import VAE, VAEConfig, random_vae
from liveavatar_jax.tinyworld.clips import write_clips
from liveavatar_jax.weights.checkpoint import CheckpointError
from liveavatar_jax.weights.vae_keys import load_vae, official_state_dict

STEPS = 24


def small_config(path):
    c = get_config()
    # one resolution change (stride 2 in space and time) and direct time convolutions: a small graph compiles fast
    c.vae = dict(dim=4, z_dim=4, dim_mult=(1, 2), num_res_blocks=1, temporal_downsample=(True,),
                 winograd_time_tile=1)
    # streams of 5 chunks, one a step: the checkpoint at STEPS // 2 falls inside a stream, whose caches it carries
    c.data.update(path=str(path), frames=5, height=32, width=32, batch_size=2, stream_chunks=5, chunks_per_step=1,
                  colour_augment=0.0, cut_first_frame=0.0)   # each has its own test below
    c.total_steps = STEPS
    c.checkpoint_every = STEPS // 2
    c.async_checkpointing = False
    c.log_every = 1000
    c.optimizer.update(lr=3e-3, final_lr_fraction=1.0)   # a constant rate: 24 steps show the fall
    c.loss.mouth_weight = 3.0
    c.time_init = "keep"
    c.stats_windows = 8
    c.export_dtype = "float32"
    return c


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    clips = tmp_path_factory.mktemp("clips")
    write_clips(clips, 1, seconds=1.0, size=32)   # one face: the loss falls within a few dozen steps
    return VAETrainer(small_config(clips), tmp_path_factory.mktemp("unused"))


@pytest.fixture(scope="module")
def straight_run(trainer, tmp_path_factory):
    trainer.workdir = tmp_path_factory.mktemp("straight")
    trainer.config.total_steps = STEPS
    state = trainer.fit()
    return trainer.workdir, jax.device_get(state)


def _losses(workdir):
    return [json.loads(line)["loss"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls(straight_run):
    losses = _losses(straight_run[0])
    assert len(losses) == STEPS
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < 0.8 * first, (first, last)


def test_resume_is_bit_exact(trainer, straight_run, tmp_path):
    trainer.workdir = tmp_path
    trainer.config.total_steps = STEPS // 2
    trainer.fit()
    trainer.config.total_steps = STEPS                  # a new run of the same config resumes at STEPS // 2
    resumed = jax.device_get(trainer.fit())
    want = straight_run[1]
    assert int(resumed.step) == STEPS
    for a, b in zip(jax.tree.leaves((resumed.params, resumed.ema, resumed.opt)),
                    jax.tree.leaves((want.params, want.ema, want.opt))):
        np.testing.assert_array_equal(a, b)
    assert _losses(tmp_path) == _losses(straight_run[0])


def test_export_loads_to_the_same_decoder(trainer, straight_run):
    workdir, state = straight_run
    path = workdir / "vae.safetensors"
    # placeholder statistics in the config: the file's replace them
    config = VAEConfig.from_config({**trainer.config.vae, "latents_mean": (0.5,) * 4, "latents_std": (2.0,) * 4})
    loaded = VAE(load_vae(path, config))
    assert loaded.config.latents_mean != config.latents_mean
    np.testing.assert_allclose(loaded.config.latents_std, trainer.measure_stats(state.ema, 8)["latents_std"])
    trained = trainer.model(state.ema, {"latents_mean": loaded.config.latents_mean,
                                        "latents_std": loaded.config.latents_std})
    keys = official_state_dict(trained)
    assert "decoder.middle.1.norm.gamma" in keys and keys["decoder.middle.1.norm.gamma"].ndim == 3
    assert keys["encoder.conv1.weight"].shape == (4, 3, 3, 3, 3)      # torch Conv3d [O, I, T, H, W]

    video = jnp.asarray(trainer.data.batch(123, 0, 1)).transpose(0, 4, 1, 2, 3)      # [B, 3, T, H, W]
    latents = loaded.encode(video)
    np.testing.assert_array_equal(np.asarray(latents), np.asarray(VAE(trained).encode(video)))
    np.testing.assert_array_equal(np.asarray(loaded.decode(latents)), np.asarray(VAE(trained).decode(latents)))
    # the stored statistics make the latents of training-like clips roughly zero-mean and unit-scale
    assert abs(float(latents.mean())) < 0.5 and 0.4 < float(latents.std()) < 2.5


def test_init_from_starts_at_an_exported_vae(trainer, straight_run, tmp_path):
    """A second phase (`init_from`) starts from the exported weights, not from random ones."""
    workdir, state = straight_run
    c = small_config(trainer.config.data.path)
    c.init_from = str(workdir / "vae.safetensors")
    start = VAETrainer(c, tmp_path).initial_state()
    for a, b in zip(start.params, state.ema):           # the export holds the EMA weights, in float32 here
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # "inflated": the export's current-frame taps kept as they are, the earlier taps zero
    c.time_init = "inflated"
    inflated = VAETrainer(c, tmp_path).initial_state()
    kernels = [(a, b) for a, b in zip(inflated.params, state.ema) if a.ndim == 5 and a.shape[:3] == (3, 3, 3)]
    assert kernels
    for a, b in kernels:
        np.testing.assert_array_equal(np.asarray(a[-1]), np.asarray(b[-1]))
        assert not np.asarray(a[:-1]).any() and np.asarray(b[:-1]).any()
    c.init_from = str(tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        VAETrainer(c, tmp_path).initial_state()


def test_roundtrip_scores_tiny_world_clips(trainer, straight_run, tmp_path):
    """`train.vae --roundtrip`: the reconstruction is written with the clip's frame count, and a tiny-world clip (its
    .wav and .png beside it) is scored by the eval metrics; a bare clip only by PSNR."""
    from liveavatar_jax.data.preprocess import read_video
    from liveavatar_jax.distill.vae_trainer import roundtrip_clip

    clip = sorted(Path(trainer.config.data.path).glob("*.mp4"))[0]
    vae = VAE(load_vae(straight_run[0] / "vae.safetensors", VAEConfig.from_config(
        {**trainer.config.vae, "latents_mean": (0.0,) * 4, "latents_std": (1.0,) * 4})))
    row = roundtrip_clip(vae, clip, tmp_path / "out.mp4")
    assert row["frames"] == 25 and np.isfinite(row["psnr_frames_0_8"])
    assert len(read_video(row["video"], 25, 32, 32)[0]) == 25
    assert -1.0 <= row["sync"] <= 1.0 and row["drift_max"] >= 0.0
    bare = tmp_path / "bare" / clip.name
    bare.parent.mkdir()
    bare.write_bytes(clip.read_bytes())
    row = roundtrip_clip(vae, bare, tmp_path / "bare_out.mp4")
    assert "sync" not in row and np.isfinite(row["psnr"])


def test_streams_continue_across_steps(trainer):
    """The steps of one training stream hand on consecutive frames, and a stream continued from carried caches
    decodes what one pass over all its frames decodes (the streaming encoder and decoder)."""
    data = trainer.data
    pieces = [data.stream_batch(7, step, 2, 5, 1) for step in range(5)]
    assert [first for _, first in pieces] == [True, False, False, False, False]
    assert [v.shape[1] for v, _ in pieces] == [5, 4, 4, 4, 4]
    stream = np.concatenate([v for v, _ in pieces], axis=1)
    clip = to_unit(data.clips[0])       # one clip: both streams come from it, each at its own start frame
    for s in stream:
        assert any(np.array_equal(clip[i:i + 21], s) for i in range(len(clip) - 20))
    assert data.stream_batch(7, 5, 2, 5, 1)[1]           # step 5 starts the next streams

    model = trainer.model(trainer.initial_state().params)
    video = jnp.asarray(stream[:, :9])
    whole, mu, _, _ = reconstruct(model, video)
    head, mu_head, _, caches = reconstruct(model, video[:, :5])
    tail, mu_tail, _, _ = reconstruct(model, video[:, 5:], caches=caches)
    np.testing.assert_allclose(np.concatenate([head, tail], 1), whole, atol=1e-5)
    np.testing.assert_allclose(np.concatenate([mu_head, mu_tail], 1), mu, atol=1e-5)


def test_recoloured_streams_keep_their_colours_across_steps(trainer):
    """Colour augmentation: the same clips and frames as without it, each recoloured stream transformed the same
    way in all its steps, luma kept, and no transform at all when off."""
    folder = trainer.data.paths[0].parent
    plain = ClipWindows(folder, 5, 32, 32)
    every = ClipWindows(folder, 5, 32, 32, colour_augment=1.0)
    pieces = [every.stream_batch(7, step, 2, 5, 1)[0] for step in range(5)]
    plain_pieces = [plain.stream_batch(7, step, 2, 5, 1)[0] for step in range(5)]
    luma = np.array([0.299, 0.587, 0.114], np.float32)
    for got, want in zip(pieces, plain_pieces):
        np.testing.assert_allclose(got @ luma, want @ luma, atol=0.05)   # recolour's clipping moves a few pixels
        assert np.abs(got - want).max() > 0.1
    # one transform per stream: the frames of steps 1-4 are the stream's frames under step 0's matrix
    stream, plain_stream = np.concatenate(pieces, 1), np.concatenate(plain_pieces, 1)
    for s in range(2):
        x, y = plain_stream[s].reshape(-1, 3), stream[s].reshape(-1, 3)
        inside = np.all(np.abs(y) < 0.999, axis=1)
        m, *_ = np.linalg.lstsq(x[inside], y[inside], rcond=None)
        np.testing.assert_allclose(x[inside] @ m, y[inside], atol=1e-4)
    np.testing.assert_allclose(recolour(plain_stream, 0.0, 1.0), plain_stream, atol=1e-6)
    with pytest.raises(ValueError, match="colour_augment"):
        ClipWindows(folder, 5, 32, 32, colour_augment=1.5)


def _find_run(clips, frames):
    """(clip index, start) of `frames` as consecutive frames of one of `clips`, else None."""
    for i, clip in enumerate(clips):
        for start in range(len(clip) - len(frames) + 1):
            if np.array_equal(clip[start:start + len(frames)], frames):
                return i, start
    return None


def test_cut_streams_take_frame_0_or_every_step_from_another_clip(tmp_path):
    """`cut_first_frame`: frame 0 of a stream from another clip, everything else as without the cut.
    `cut_every_step`: each continued step's chunks from a fresh clip and start, the first step as without it."""
    write_clips(tmp_path, 2, seconds=1.0, size=32)
    plain = ClipWindows(tmp_path, 5, 32, 32)
    clips = [to_unit(c) for c in plain.clips]
    cut = ClipWindows(tmp_path, 5, 32, 32, cut_first_frame=1.0)
    for step in range(3):
        got, first = cut.stream_batch(7, step, 2, 3, 1)
        want, _ = plain.stream_batch(7, step, 2, 3, 1)
        if not first:
            np.testing.assert_array_equal(got, want)
            continue
        np.testing.assert_array_equal(got[:, 1:], want[:, 1:])
        for s in range(2):
            own, _ = _find_run(clips, want[s])
            donor = _find_run(clips, got[s, :1])
            assert donor is not None and donor[0] != own
    fresh = ClipWindows(tmp_path, 5, 32, 32, cut_every_step=True)
    pieces = [fresh.stream_batch(7, step, 2, 6, 1)[0] for step in range(6)]
    plain_pieces = [plain.stream_batch(7, step, 2, 6, 1)[0] for step in range(6)]
    np.testing.assert_array_equal(pieces[0], plain_pieces[0])
    for got in pieces[1:]:
        assert all(_find_run(clips, s) is not None for s in got)
    assert any(not np.array_equal(a, b) for a, b in zip(pieces[1:], plain_pieces[1:]))
    with pytest.raises(ValueError, match="cut_first_frame"):
        ClipWindows(tmp_path, 5, 32, 32, cut_first_frame=-0.1)
    # stream_chunks 0: every step a batch of single frames (images) through the first-frame paths
    images = [plain.stream_batch(7, step, 3, 0, 1) for step in range(3)]
    assert all(first and v.shape == (3, 1, 32, 32, 3) for v, first in images)
    assert all(_find_run(clips, v[i]) is not None for v, _ in images for i in range(3))
    assert not np.array_equal(images[0][0], images[1][0])


def test_inflated_time_starts_every_chunk_like_frame_0():
    """With `inflate_time` a still video encodes to the same latent in every chunk as in frame 0 and decodes to the
    same frame throughout; the random 3-D init does not (the control)."""
    config = VAEConfig(dim=4, z_dim=4, dim_mult=(1, 2, 2), num_res_blocks=1, temporal_downsample=(True, True),
                       latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4, winograd_time_tile=1)
    frame = np.random.default_rng(0).uniform(-1, 1, (32, 32, 3)).astype(np.float32)
    video = jnp.asarray(np.broadcast_to(frame, (9, 32, 32, 3))).transpose(3, 0, 1, 2)[None]
    spread = {}
    for name in ("random", "inflated"):
        model = random_vae(config, seed=0)
        if name == "inflated":
            inflate_time(model)
        vae = VAE(model)
        z = vae.encode(video)
        out = vae.decode(z)
        spread[name] = (float(jnp.abs(z - z[:, :, :1]).max()), float(jnp.abs(out - out[:, :, :1]).max()))
    assert spread["inflated"][0] < 1e-5 and spread["inflated"][1] < 1e-4
    assert spread["random"][0] > 0.05 and spread["random"][1] > 0.05


def test_bad_inputs_are_named(tmp_path, trainer):
    with pytest.raises(ValueError, match="holds no .mp4"):
        ClipWindows(tmp_path, 5, 32, 32)
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        ClipWindows(trainer.data.paths[0].parent, 6, 32, 32)
    with pytest.raises(ValueError, match="frames are 32x32"):
        ClipWindows(trainer.data.paths[0].parent, 5, 64, 64)
    bad = tmp_path / "vae.safetensors"
    from safetensors.numpy import save_file
    save_file({"x": np.zeros(1, np.float32)}, str(bad), metadata={"latents_mean": "[1, oops]"})
    with pytest.raises(CheckpointError, match="latents_mean"):
        load_vae(bad, VAEConfig())


def test_official_state_dict_gives_back_the_official_file():
    """The Rule table read backwards reproduces the official keys, shapes and values of the golden fixture."""
    from safetensors.numpy import load_file

    from conftest import golden_dir
    from liveavatar_jax.golden.vae import config_from_manifest

    fixture = golden_dir("vae")
    config = config_from_manifest(json.loads((fixture / "manifest.json").read_text()))
    official = load_file(str(fixture / "weights.safetensors"))
    ours = official_state_dict(load_vae(fixture / "weights.safetensors", config))
    assert sorted(ours) == sorted(official)
    for key, value in official.items():
        assert ours[key].shape == value.shape, key
        np.testing.assert_array_equal(ours[key], value.astype(np.float32), err_msg=key)


def test_decoder_only_phase_keeps_the_latents(trainer, straight_run, tmp_path):
    """`trainable = "decoder"` (configs/tinyworld_vae_colour.py): the encoder and its moments conv never change, so
    the export encodes exactly as its init did, with the init's latent statistics; the decoder does train."""
    workdir, _ = straight_run
    init = workdir / "vae.safetensors"
    c = small_config(trainer.config.data.path)
    c.update(init_from=str(init), trainable="decoder", total_steps=3, checkpoint_every=3)
    c.loss.update(colour_weight=4.0, colour_pool=8)
    tuned = VAETrainer(c, tmp_path)
    start = tuned.initial_state()
    state = jax.device_get(tuned.fit())
    frozen = [keep is False for keep in tuned.trainable]
    assert any(frozen) and not all(frozen)
    for a, b, keep in zip(state.params, start.params, tuned.trainable):
        if not keep:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b, keep in zip(state.params, start.params, tuned.trainable) if keep)
    assert all(json.loads(line)["colour"] > 0 for line in (tmp_path / "metrics.jsonl").read_text().splitlines())

    config = VAEConfig.from_config({**trainer.config.vae, "latents_mean": (0.5,) * 4, "latents_std": (2.0,) * 4})
    before, after = VAE(load_vae(init, config)), VAE(load_vae(tmp_path / "vae.safetensors", config))
    assert after.config.latents_mean == before.config.latents_mean
    assert after.config.latents_std == before.config.latents_std
    video = jnp.asarray(trainer.data.batch(123, 0, 1)).transpose(0, 4, 1, 2, 3)
    latents = before.encode(video)
    np.testing.assert_array_equal(np.asarray(after.encode(video)), np.asarray(latents))
    assert not np.array_equal(np.asarray(after.decode(latents)), np.asarray(before.decode(latents)))

    c.trainable = "encoder"
    with pytest.raises(ValueError, match="trainable='encoder'"):
        VAETrainer(c, tmp_path)
