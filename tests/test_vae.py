"""The Wan2.1 VAE: golden parity, streaming == one decode, no retracing across streamed blocks, strict loading."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax
from safetensors.numpy import load_file, save_file

from conftest import golden_dir
from liveavatar_jax.golden import rel_l2, run_fixture
from liveavatar_jax.golden.vae import config_from_manifest
from liveavatar_jax.models import vae as vae_lib
from liveavatar_jax.models.vae import VAE, VAEConfig
from liveavatar_jax.weights.checkpoint import CheckpointError
from liveavatar_jax.weights.vae_keys import abstract_vae, load_vae


@pytest.fixture(scope="module")
def fixture_dir():
    return golden_dir("vae")


@pytest.fixture(scope="module")
def manifest(fixture_dir):
    return json.loads((fixture_dir / "manifest.json").read_text())


@pytest.fixture(scope="module")
def tiny_config(manifest):
    return config_from_manifest(manifest)


@pytest.fixture(scope="module")
def tiny_vae(fixture_dir, tiny_config):
    # Built exactly as the golden kind builds it (the config is part of the jit cache key), so the decoders compiled
    # by test_golden_vae are reused here.
    return VAE(load_vae(fixture_dir / "weights.safetensors", tiny_config))


def test_golden_vae(fixture_dir):
    _, rows = run_fixture(fixture_dir)
    assert rows and all(r.ok for r in rows), "\n".join(r.line() for r in rows)


def test_stream_in_other_chunks_equals_one_decode(fixture_dir, tiny_vae):
    latents = load_file(str(fixture_dir / "inputs.safetensors"))["stream_decode.latents"]  # [16, 10, h, w]
    full = np.asarray(tiny_vae.decode(latents, clamp=False))
    cache = tiny_vae.init_decode_cache(1, *latents.shape[2:])
    pieces, start = [], 0
    # The fixture streams [4, 3, 3]; these chunk sizes reuse the decoders the golden test compiled.
    for n in (3, 3, 2, 2):
        video, cache = tiny_vae.stream_decode(latents[:, start:start + n], cache, clamp=False)
        assert video.shape[1] == (1 + 4 * (n - 1) if start == 0 else 4 * n)
        pieces.append(np.asarray(video))
        start += n
    streamed = np.concatenate(pieces, axis=1)
    assert streamed.shape == full.shape == (3, 37, 32, 32)
    # float32 sums in another order (other chunk shapes): 2.3e-6 measured on one CPU, below 1e-6 on another; a
    # wrong cache shows as errors orders of magnitude larger
    assert rel_l2(streamed, full) < 1e-5


def test_streamed_blocks_reuse_one_compiled_decoder():
    """Priming + blocks as the TPP VAE rank calls it: after the priming call, no block call traces the decoder.

    A small VAE of its own (one resolution change, with time upsampling) so that nothing here was compiled before.
    """
    config = VAEConfig(dim=4, z_dim=4, dim_mult=(1, 2), num_res_blocks=1, temporal_downsample=(True,),
                       latents_mean=(0.1, -0.2, 0.3, 0.0), latents_std=(1.5, 0.5, 2.0, 1.0))
    vae = VAE(vae_lib.random_vae(config, seed=0))
    latents = np.random.default_rng(0).standard_normal((4, 10, 3, 5)).astype(np.float32)
    traced = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/jaxpr_trace_duration" and "decode" in str(kwargs.get("fun_name", "")):
            traced.append(kwargs["fun_name"])

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        cache = vae.init_decode_cache(1, 3, 5)
        video, cache = vae.stream_decode(latents[:, :4], cache)  # primes: latent 0 alone, then a scan of 3
        assert video.shape == (3, 1 + 2 * 3, 6, 10)
        primed = len(traced)
        structure = jax.tree.map(lambda a: (a.shape, a.dtype), cache.feats)
        for start in (4, 7):
            video, cache = vae.stream_decode(latents[:, start:start + 3], cache)
            assert video.shape == (3, 2 * 3, 6, 10)
            assert jax.tree.map(lambda a: (a.shape, a.dtype), cache.feats) == structure
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert primed == 2 and len(traced) == primed, f"traced {traced}: the block calls should reuse the priming's"


def test_winograd_time_conv_matches_direct():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 6, 5, 7, 4)), jnp.float32)  # 2 cached + 4 new frames

    @jax.jit
    def apply_all(x):
        out = {}
        for kernel_size, tile, t in [((3, 3, 3), 1, 6), ((3, 3, 3), 2, 6), ((3, 3, 3), 4, 6),  # F(4,3), F(2,3) x2
                                     ((3, 3, 3), 1, 4), ((3, 3, 3), 4, 4),  # F(2,3) for T = 2
                                     ((3, 1, 1), 1, 6), ((3, 1, 1), 4, 6)]:  # upsample3d's time_conv
            conv = vae_lib.CausalConv3d(4, 5, kernel_size, dtype=jnp.float32, rngs=nnx.Rngs(1), time_tile=tile)
            out[kernel_size, tile, t] = conv._apply(x[:, :t])
        return out

    out = apply_all(x)
    for (kernel_size, tile, t), got in out.items():
        assert got.shape == (2, t - 2, 5, 7, 5)
        assert rel_l2(np.asarray(got), np.asarray(out[kernel_size, 1, t])) < 1e-6, (kernel_size, tile, t)


def test_upsample_conv_at_low_resolution_matches_nearest_then_conv():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 5, 6, 4)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, 4, 3)), jnp.float32)
    up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    want = lax.conv_general_dilated(up, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert rel_l2(np.asarray(vae_lib._upsample2x_conv3x3(x, k)), np.asarray(want)) < 1e-6


@pytest.mark.parametrize("kernel_hw, padding, stride, out_dtype", [
    (3, ((1, 1), (1, 1)), 1, None),                 # the 3x3 convs (and the Winograd products, float32 out)
    (3, ((1, 1), (1, 1)), 1, jnp.float32),
    (2, ((1, 0), (0, 1)), 1, None),                 # an upsampling phase's 2x2 taps
    (3, ((0, 1), (0, 1)), 2, None),                 # the downsampling conv
])
def test_conv_gradients_equal_xlas(kernel_hw, padding, stride, out_dtype):
    # The CPU path's own VJP (kernel gradient as a patches matmul, input gradient as a forward conv) against the
    # gradients XLA derives for its convolution: same function, so any slip in tap order or padding shows.
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 9, 7, 5)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((kernel_hw, kernel_hw, 5, 6)), jnp.float32)

    def loss(conv):
        return lambda x, k: jnp.sum(jnp.sin(conv(x, k, padding, stride, out_dtype)) * jnp.arange(6.0))

    got = jax.jit(jax.grad(loss(vae_lib._conv2d_patch_grad), (0, 1)))(x, k)
    want = jax.jit(jax.grad(loss(vae_lib._conv2d_xla), (0, 1)))(x, k)
    for g, w in zip(got, want):
        assert g.shape == w.shape and rel_l2(np.asarray(g), np.asarray(w)) < 1e-6


def test_real_config_matches_the_official_model():
    model = abstract_vae(vae_lib.WAN21_VAE)
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    decoder = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model.decoder, nnx.Param)))
    assert count == 126_892_531 and decoder == 73_295_331
    cache = vae_lib.init_decode_cache(vae_lib.WAN21_VAE, 1, 16, 24)
    leaves = jax.tree.leaves(cache.feats)
    assert len(leaves) == 32  # 33 causal convs in the decoder, one of them a 1x1x1 shortcut
    assert cache.feats["conv1"].shape == (1, 2, 16, 24, 16)
    assert cache.feats["head"].shape == (1, 2, 128, 192, 96)


def test_config_from_kwargs_and_errors(manifest):
    config = VAEConfig.from_kwargs(manifest["constructor_kwargs"])
    assert config.dim == 8 and config.temporal_downsample == (False, True, True) and config.dim_mult == (1, 2, 4, 4)
    assert config.spatial_stride == 8 and config.temporal_stride == 4
    assert config.latents_mean == pytest.approx(manifest["latent_normalization"]["mean"], abs=1e-6)
    with pytest.raises(ValueError, match="unknown VAEConfig field"):
        VAEConfig.from_config({"dim": 8, "zdim": 16})
    with pytest.raises(ValueError, match="winograd_time_tile"):
        VAEConfig(winograd_time_tile=3)


def test_stream_decode_rejects_latents_of_another_stream(tiny_vae):
    cache = tiny_vae.init_decode_cache(1, 4, 4)
    with pytest.raises(ValueError, match="do not continue a stream"):
        tiny_vae.stream_decode(np.zeros((16, 3, 4, 6), np.float32), cache)
    with pytest.raises(ValueError, match=r"\[C, T, H, W\]"):
        tiny_vae.stream_decode(np.zeros((16, 4, 4), np.float32), cache)


def test_pth_and_safetensors_load_the_same_weights(fixture_dir, tiny_config, tiny_vae):
    pth = fixture_dir.parent / "pth" / "Wan2.1_VAE.pth"
    if not pth.is_file():
        pytest.skip(f"{pth} not present")
    from_pth = nnx.state(load_vae(pth, tiny_config), nnx.Param)
    for a, b in zip(jax.tree.leaves(from_pth), jax.tree.leaves(tiny_vae.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture(scope="module")
def official_tensors(fixture_dir):
    return load_file(str(fixture_dir / "weights.safetensors"))


def test_loader_names_the_file_and_the_missing_key(tmp_path, official_tensors, tiny_config):
    tensors = dict(official_tensors)
    del tensors["decoder.upsamples.3.time_conv.weight"]
    path = tmp_path / "vae_missing.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError) as err:
        load_vae(path, tiny_config)
    assert str(path) in str(err.value) and "decoder.upsamples.3.time_conv.weight" in str(err.value)
    assert "missing" in str(err.value)


def test_loader_names_the_misshaped_and_unexpected_keys(tmp_path, official_tensors, tiny_config):
    tensors = dict(official_tensors)
    tensors["encoder.middle.1.to_qkv.weight"] = np.zeros((96, 32, 3, 3), np.float32)
    tensors["decoder.extra.weight"] = np.zeros((2,), np.float32)
    path = tmp_path / "vae_bad.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError) as err:
        load_vae(path, tiny_config)
    message = str(err.value)
    assert str(path) in message
    assert "wrong shape" in message and "encoder.middle.1.to_qkv.weight" in message
    assert "unexpected" in message and "decoder.extra.weight" in message
