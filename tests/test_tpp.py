"""Timestep-forcing pipeline parallelism on simulated CPU devices: the pipeline reproduces `StreamEngine` for the same
seed (2, 3 and 4 steps, 8 blocks: ring wrap, sink replacement, rolling distances, decoding), replays the official
stream loop, keeps bubbles out of the rings, and refuses layouts that cannot work."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import golden_dir
from liveavatar_jax.models.dit import DiTConfig
from liveavatar_jax.parallel import mesh as mesh_lib
from liveavatar_jax.parallel.tpp import LinearPreviewDecoder, TPPEngine, draw_block_noise
from liveavatar_jax.streaming.engine import StreamConfig, StreamContext, StreamEngine, split_audio_blocks
from liveavatar_jax.weights.dit_keys import load_dit

SEED = 11
N_BLOCKS = 8


def rel_l2(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.fixture(scope="module")
def model():
    path = golden_dir("dit_s2v_causal")
    cfg = DiTConfig.from_official(json.loads((path / "manifest.json").read_text())["constructor_kwargs"],
                                  dtype="float32")
    return load_dit(path / "weights.safetensors", cfg)


@pytest.fixture(scope="module")
def loop_fixture():
    path = golden_dir("stream_loop")
    return json.loads((path / "manifest.json").read_text()), load_file(str(path / "inputs.safetensors")), \
        load_file(str(path / "outputs.safetensors"))


@pytest.fixture(scope="module")
def stream(model, loop_fixture):
    """The official loop's geometry and conditioning: a ring of 4 blocks (wraps at block 4), sink replaced at 4."""
    _, inp, _ = loop_fixture
    ctx = StreamContext(text=model.embed_text(jnp.asarray(inp["context"])[None]),
                        ref_latents=jnp.asarray(inp["ref_latents"]), motion_latents=jnp.asarray(inp["motion_latents"]))
    audio = split_audio_blocks(jnp.asarray(inp["audio_emb"]), 3, 0, N_BLOCKS)
    return ctx, audio


def stream_cfg(steps):
    return StreamConfig(steps=steps, ring_blocks=4, sink_replace_block=4)


_references = {}


def reference(model, stream, steps):
    """StreamEngine on one device, same seed. Its noise is passed in (drawn with the very function StreamEngine uses)
    only so that the Gaussian sampler is compiled once per test module; the pipeline draws its own from the seed."""
    if steps not in _references:
        ctx, audio = stream
        shape = (1, 16, 3, *ctx.ref_latents.shape[3:])
        key = jax.random.key(SEED)
        noise = jnp.stack([draw_block_noise(key, g, shape) for g in range(N_BLOCKS)])
        engine = StreamEngine(model, stream_cfg(steps), decoder=LinearPreviewDecoder())
        state = engine.init(ctx, SEED)
        state, out = engine.run(state, ctx, audio, noise=noise)
        _references[steps] = (jax.device_get(state.replace(key=None, decoder=None)), jax.device_get(out))
    return _references[steps]


def assert_same_stream(tpp_state, tpp_out, ref_state, ref_out, frames=True):
    assert rel_l2(tpp_out["latents"], ref_out["latents"]) <= 1e-5
    for g in range(N_BLOCKS):   # every block, not only the stream as a whole
        assert rel_l2(tpp_out["latents"][g], ref_out["latents"][g]) <= 1e-5, f"block {g}"
    if frames:
        assert tpp_out["frames"].shape == ref_out["frames"].shape
        assert rel_l2(tpp_out["frames"], ref_out["frames"]) <= 1e-5
    # stage i's ring is StreamEngine's step-i ring; every stage's sink is the (replaced) sink
    assert rel_l2(tpp_state.rings.k, ref_state.rings.k) <= 1e-5
    assert rel_l2(tpp_state.rings.v, ref_state.rings.v) <= 1e-5
    for stage_sink in np.asarray(tpp_state.sink.k):
        assert rel_l2(stage_sink, ref_state.sink.k) <= 1e-5


@pytest.fixture(scope="module")
def engine4(model):
    return TPPEngine(model, stream_cfg(4), decoder=LinearPreviewDecoder(), decode_on="separate")


def test_four_stages_match_stream_engine_with_separate_decoder(model, stream, engine4):
    ctx, audio = stream
    assert engine4.decode_device not in set(engine4.mesh.devices.flat)      # the official 4 + 1 layout
    state = engine4.init(ctx, SEED)
    state, out = engine4.run(state, ctx, audio)
    np.testing.assert_array_equal(out["blocks"], np.arange(N_BLOCKS))
    ref_state, ref_out = reference(model, stream, 4)
    assert_same_stream(state, out, ref_state, ref_out)
    assert state.block == N_BLOCKS and state.in_flight == 0
    assert not np.asarray(state.slots.live).any()                            # drained


def test_two_stages_decoding_on_the_last_stage_match(model, stream):
    ctx, audio = stream
    engine = TPPEngine(model, stream_cfg(2), decoder=LinearPreviewDecoder(), decode_on="last_stage")
    assert engine.decode_device == engine.mesh.devices[-1, 0]
    state = engine.init(ctx, SEED)
    state, out = engine.run(state, ctx, audio)
    ref_state, ref_out = reference(model, stream, 2)
    assert_same_stream(state, out, ref_state, ref_out)


def test_three_stages_live_ticks_match(model, stream):
    """The per-tick API: S - 1 fill ticks emit nothing, then one block per tick, then `flush` drains."""
    ctx, audio = stream
    engine = TPPEngine(model, stream_cfg(3), mesh=mesh_lib.make_tpp_mesh(3, devices=jax.devices()[5:8]))
    ctx = engine.with_text_kv(ctx)      # text keys/values projected once per prompt (the CLI's fast path)
    assert ctx.text_kv is not None
    state = engine.init(ctx, SEED)
    outs = []
    for g in range(N_BLOCKS):
        state, out = engine.step(state, ctx, audio[g])
        outs.append(out)
    state, tail = engine.flush(state, ctx)
    outs += tail
    assert [o["valid"] for o in outs] == [False, False] + [True] * N_BLOCKS
    assert [o["block"] for o in outs] == [None, None] + list(range(N_BLOCKS))
    latents = np.stack([np.asarray(o["latents"]) for o in outs[2:]])
    ref_state, ref_out = reference(model, stream, 3)
    assert_same_stream(state, {"latents": latents}, ref_state, ref_out, frames=False)


def test_replays_the_official_stream_loop(engine4, loop_fixture, stream):
    """Fixture noise, pose latents and rolling distances through the pipeline give the official clean latents and
    step caches (two clips: ring wrap and the sink refresh from the first generated frame)."""
    m, inp, ref = loop_fixture
    ctx, audio = stream
    n, steps = m["geometry"]["num_blocks"], m["sampler"]["set_timesteps"]
    assert n == N_BLOCKS and steps == 4
    noise = np.concatenate([inp["clip0.noise"], inp["clip1.noise"]], axis=1)
    noise = noise.reshape(16, n, 3, *noise.shape[2:]).transpose(1, 0, 2, 3, 4)[:, None]
    cond = np.concatenate([inp["clip0.cond_states"], inp["clip1.cond_states"]], axis=2)
    cond = cond.reshape(1, 16, n, 3, *cond.shape[3:]).transpose(2, 0, 1, 3, 4, 5)
    dists = np.asarray(m["random_python_draws"]["relative_dist_per_inference_call_in_order"], np.int32)
    state = engine4.init(ctx, 0)
    state, out = engine4.run(state, ctx, audio, noise=noise, dists=dists.reshape(n, steps), cond=cond)
    for g in range(n):
        assert rel_l2(out["latents"][g, 0], ref[f"block{g}.final_latents"]) <= 1e-4, f"block {g}"
    for i in range(steps):
        for layer in range(2):
            assert rel_l2(state.rings.k[i, layer], ref[f"cache{i}.layer{layer}.k"]) <= 1e-4
            assert rel_l2(state.rings.v[i, layer], ref[f"cache{i}.layer{layer}.v"]) <= 1e-4


def test_bubble_ticks_write_nothing(engine4, stream):
    ctx, audio = stream
    state = engine4.init(ctx, SEED)
    state, _ = engine4.run(state, ctx, audio[:2])
    before = jax.device_get((state.rings, state.sink, state.first_latent, state.block))
    for _ in range(3):   # a drained pipeline fed only bubbles
        state, out = engine4.step(state, ctx, None)
        assert not out["valid"] and out["block"] is None
    after = jax.device_get((state.rings, state.sink, state.first_latent, state.block))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, b)
    # the written slots hold the two blocks, the other two slots are still empty
    filled = np.any(np.asarray(state.rings.k) != 0, axis=(0, 1, 2, 4, 5))
    assert filled.reshape(4, -1).all(axis=1).tolist() == [True, True, False, False]


def test_profiled_ticks_give_a_timing_breakdown(engine4, stream):
    ctx, audio = stream
    engine4.profile = True
    try:
        state = engine4.init(ctx, SEED)
        engine4.run(state, ctx, audio[:6])
    finally:
        engine4.profile = False
    summary = engine4.tick_breakdown()
    assert summary["ticks"] == 6 + 3 and summary["fill_ticks"] == 3
    assert summary["blocks_per_tick_after_fill"] == 1.0
    assert summary["tick_s_median"] > 0 and summary["decode_s_median"] > 0 and summary["steady_fps_model"] > 0
    json.dumps(summary)


def test_layouts_that_cannot_work_are_refused(model):
    with pytest.raises(ValueError, match="'pipeline' axis must have size steps=4"):
        TPPEngine(model, stream_cfg(4), mesh=mesh_lib.make_tpp_mesh(3))
    with pytest.raises(ValueError, match="sink_replace_block=2 comes before block 0 has left"):
        TPPEngine(model, StreamConfig(steps=3, sink_replace_block=2))
    with pytest.raises(ValueError, match="needs a device outside the 8-device mesh"):
        TPPEngine(model, stream_cfg(4), mesh=mesh_lib.make_tpp_mesh(4, tensor=2), decoder=LinearPreviewDecoder())
    with pytest.raises(ValueError, match="decode_on must be one of"):
        TPPEngine(model, stream_cfg(4), decoder=LinearPreviewDecoder(), decode_on="vae_rank")
    with pytest.raises(ValueError, match="needs 18 devices, only 8 available"):
        mesh_lib.make_tpp_mesh(9, tensor=2)


def test_sharding_rules_split_weights_over_tensor_and_degrade_to_replication(model):
    """(Execution with split weights, one stage per process, is in test_multiprocess.py.)"""
    mesh = mesh_lib.make_tpp_mesh(2, tensor=2)
    P = jax.sharding.PartitionSpec
    from flax import nnx
    shardings = mesh_lib.param_shardings(nnx.state(model), mesh)
    assert shardings["blocks"]["self_attn"]["q"]["kernel"].spec == P(None, None, "tensor")
    assert shardings["audio_injectors"]["attn"]["o"]["kernel"].spec == P(None, "tensor")
    assert shardings["patch_embedding"]["kernel"].spec == P()
    assert mesh_lib.fit_spec(mesh_lib.RING_SPEC, (2, 2, 1, 384, 2, 32), mesh) == P("pipeline", None, None, None,
                                                                                      "tensor")
    assert mesh_lib.param_spec("blocks.ffn_out.kernel", (2, 128, 64), mesh) == P(None, "tensor")
    assert mesh_lib.param_spec("blocks.ffn_in.bias", (2, 127), mesh) == P()          # 127 not divisible by 2
    assert mesh_lib.param_spec("head.kernel", (64, 64), mesh) == P()
    assert mesh_lib.param_spec("blocks.ffn_in.kernel", (2, 64, 128), mesh_lib.make_tpp_mesh(4)) == P()
