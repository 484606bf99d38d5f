"""Stage 1 (diffusion forcing): the block-causal whole-clip forward, per-block noise levels, FSDP on simulated
devices and the non-finite-loss stop."""

import json
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import override
from configs import pretrain_tiny
from liveavatar_jax.data.format import ExampleSpec
from liveavatar_jax.data.preprocess import write_random_dataset
from liveavatar_jax.distill import losses
from liveavatar_jax.distill.trainer import NonFiniteLossError, PretrainTrainer
from liveavatar_jax.models import dit_sequence
from liveavatar_jax.models.dit import DiTConfig, build
from liveavatar_jax.streaming.caches import RingCache

XLA_CACHE = Path(tempfile.gettempdir()) / "liveavatar_jax_test_xla_cache"
TINY = DiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32, text_len=32, audio_dim=32,
                 audio_layers=25, audio_inject_layers=(0, 1), dtype="float32")


@pytest.fixture(scope="module")
def clip():
    rng = np.random.default_rng(0)
    f, h, w = 9, 8, 16
    arr = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    return {"x": arr(1, 16, f, h, w), "ref": arr(1, 16, 1, h, w), "motion": arr(1, 16, 19, h, w),
            "context": arr(1, 30, 32), "audio": arr(1, 25, 32, 4 * f),
            "t": jnp.asarray([[900.0] * 3 + [500.0] * 3 + [120.0] * 3]), "dists": (29, 5, 17)}


@pytest.fixture(scope="module")
def model():
    return build(TINY, seed=0)


@pytest.fixture(scope="module")
def block_causal(model, clip):
    text = model.embed_text(clip["context"])
    sp = TINY.sink_position
    ref_positions = jnp.asarray([sp + max(0, 3 * b - (sp - d)) for b, d in enumerate(clip["dists"])])
    return jax.jit(lambda x: dit_sequence.sequence_forward(
        model, x, clip["t"], text, clip["audio"], clip["ref"], clip["motion"], mode="block_causal",
        ref_positions=ref_positions, remat="nothing_saveable"))


def test_block_causal_clip_equals_the_streaming_rollout(model, clip, block_causal):
    """A whole clip with the training mask computes what the inference engine computes block by block when every
    block's history sits in the ring at that block's own noise level (History Corrupt), rolling sink included."""
    text = model.embed_text(clip["context"])
    sink = model.sink_prefill(clip["ref"], clip["motion"], text)
    ring = RingCache.zeros(2, 1, 12 * 32, 2, 32)
    step = jax.jit(model.block_forward)
    outs = []
    for b, d in enumerate(clip["dists"]):
        v, ring = step(clip["x"][:, :, 3 * b:3 * b + 3], clip["t"][:, 3 * b], text,
                       clip["audio"][..., 12 * b:12 * b + 12], ring, sink, 3 * b, d)
        outs.append(v)
    stream = jnp.concatenate(outs, axis=2)
    whole = block_causal(clip["x"])
    err = float(jnp.linalg.norm(whole - stream) / jnp.linalg.norm(stream))
    assert err < 2e-5, err


def test_training_block_step_is_the_inference_block_forward(model, clip):
    """The rollout's per-step forward (with per-layer remat) computes bit for bit what inference computes."""
    text = model.embed_text(clip["context"])
    sink = model.sink_prefill(clip["ref"], clip["motion"], text)
    rng = np.random.default_rng(1)
    ring = RingCache(k=jnp.asarray(rng.standard_normal((2, 1, 6 * 32, 2, 32)), jnp.float32),
                     v=jnp.asarray(rng.standard_normal((2, 1, 6 * 32, 2, 32)), jnp.float32))
    args = (clip["x"][:, :, :3], jnp.asarray([857.7]), text, clip["audio"][..., :12], ring, sink, 9, 23)
    v_ref, ring_ref = jax.jit(model.block_forward)(*args)
    v, new_ring = jax.jit(lambda *a: dit_sequence.block_step(model, *a, remat="dots_saveable"))(*args)
    np.testing.assert_array_equal(np.asarray(v), np.asarray(v_ref))
    np.testing.assert_array_equal(np.asarray(new_ring.k), np.asarray(ring_ref.k))
    np.testing.assert_array_equal(np.asarray(new_ring.v), np.asarray(ring_ref.v))


def test_block_causal_blocks_never_see_later_blocks(clip, block_causal):
    base = block_causal(clip["x"])
    moved = block_causal(clip["x"].at[:, :, 6:].add(3.0))
    np.testing.assert_array_equal(np.asarray(moved[:, :, :6]), np.asarray(base[:, :, :6]))
    assert float(jnp.max(jnp.abs(moved[:, :, 6:] - base[:, :, 6:]))) > 1e-3


def test_noise_levels_are_drawn_per_block_on_the_shifted_training_grid():
    s = np.asarray(losses.block_sigmas(jax.random.key(0), 64, 7, 3, shift=5.0))
    assert s.shape == (64, 21)
    blocks = s.reshape(64, 7, 3)
    assert np.all(blocks == blocks[..., :1])                     # one level per block
    assert len(np.unique(blocks[..., 0])) > 200                  # independent across blocks and samples
    grid = 5 * (1 - np.arange(1000) / 1000) / (1 + 4 * (1 - np.arange(1000) / 1000))
    assert np.all(np.min(np.abs(blocks[..., :1] - grid), axis=-1) < 1e-6)


def test_14b_config_traces_the_stage_1_step():
    """configs/pretrain_14b.py, abstractly: the diffusion-forcing gradient of the 14B student at 704x384, 21 frames."""
    from configs import pretrain_14b
    from liveavatar_jax.distill import lora as lora_lib
    from liveavatar_jax.distill import steps
    from liveavatar_jax.distill import train_state as ts
    from liveavatar_jax.distill.trainer import example_spec, model_config
    from liveavatar_jax.models.dit import abstract_model

    c = pretrain_14b.get_config()
    net = lora_lib.build_networks(abstract_model(model_config(c)), lora_lib.LoRAConfig.from_dict(c.lora))
    pcfg = steps.PretrainConfig.from_dict({**c.pretrain.to_dict(), "remat": c.remat})
    spec = example_spec(c)
    S = jax.ShapeDtypeStruct
    batch = {"latents": S((1, 16, spec.frames, spec.height, spec.width), jnp.float32),
             "text": S((1, spec.text_len, spec.text_dim), jnp.float32),
             "audio": S((1, spec.audio_layers, spec.audio_dim, 4 * spec.frames), jnp.float32),
             "ref_latents": S((1, 16, 1, spec.height, spec.width), jnp.float32),
             "motion_latents": S((1, 16, spec.motion_frames, spec.height, spec.width), jnp.float32)}
    tx = ts.make_optimizer(c.optimizer)
    state = jax.eval_shape(lambda lora: ts.init_pretrain_state(lora, tx, 0), net.abstract_lora())
    new_state, metrics = jax.eval_shape(lambda *a: steps.pretrain_step(net, tx, pcfg, 0.99, 0, *a), state, net.base,
                                        batch)
    assert jax.tree.structure(new_state) == jax.tree.structure(state) and metrics["loss"].shape == ()
    assert new_state.opt[1][0].mu["blocks"]["ffn_in"]["lora_a"].dtype == jnp.bfloat16     # mu_dtype from the config


def tiny_config(data, workdir_name="", **overrides):
    c = pretrain_tiny.get_config()
    c.data.path = str(data)
    c.data.batch_size = 4
    c.total_steps = 3
    c.checkpoint_every = 2
    c.compilation_cache = str(XLA_CACHE)
    return override(c, overrides)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain_data")
    write_random_dataset(root, ExampleSpec.from_dict(pretrain_tiny.get_config().data.spec), count=8, seed=1)
    return root


def _losses(workdir):
    return [json.loads(line)["loss"] for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def test_fsdp_run_on_4_devices_matches_the_1_device_run(dataset, tmp_path):
    # Adam divides by the gradient's running RMS, so with its default eps (1e-8) an adapter entry whose gradient is ~0
    # (lora_a while lora_b is still ~0) moves by up to the learning rate on float32 reduction-order noise, by an
    # amount that depends on the CPU XLA compiles for (3 % of one leaf off by 7e-5 on one machine, < 1 % on another).
    # eps 1e-3 keeps those entries still, so every entry of the two runs must agree to float32 noise.
    adam = {"optimizer.eps": 1e-3}
    single = PretrainTrainer(tiny_config(dataset, **{"mesh.fsdp": 1}, **adam), tmp_path / "one")
    base_before = jax.tree.map(np.asarray, single.base)
    lora_before = jax.tree.map(np.asarray, single.state.lora)
    s1 = single.fit()
    sharded = PretrainTrainer(tiny_config(dataset, **{"mesh.fsdp": 4}, **adam), tmp_path / "four")
    lora_a = sharded.state.lora["blocks"]["ffn_in"]["lora_a"]
    assert len(lora_a.sharding.device_set) == 4 and not lora_a.sharding.is_fully_replicated
    s4 = sharded.fit()
    l1, l4 = _losses(tmp_path / "one"), _losses(tmp_path / "four")
    assert len(l1) == 3 and l1[0] != l1[1]
    np.testing.assert_allclose(l4, l1, rtol=1e-5)
    moved = 0
    for a, b, before in zip(jax.tree.leaves(s1.lora), jax.tree.leaves(s4.lora), jax.tree.leaves(lora_before)):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)      # measured: at most 3e-8 apart
        moved += int(np.max(np.abs(a - before)) > 1e-6)
    assert moved == len(jax.tree.leaves(s1.lora))                   # every adapter trained, so the match means something
    for path, leaf in jax.tree.flatten_with_path(single.base)[0]:   # the frozen base never moves
        ref = base_before
        for p in path:
            ref = ref[p.key]
        np.testing.assert_array_equal(np.asarray(leaf), ref)
    assert sorted(p.name for p in (tmp_path / "one" / "checkpoints").iterdir()) == ["2", "3"]
    assert (tmp_path / "one" / "lora.safetensors").is_file()
    assert list((tmp_path / "one" / "tensorboard").iterdir())


def test_non_finite_loss_stops_the_run_naming_step_and_batch(tmp_path):
    data = tmp_path / "poisoned"
    spec = ExampleSpec.from_dict(pretrain_tiny.get_config().data.spec)
    write_random_dataset(data, spec, count=4, seed=2, scale=1e30)    # finite inputs that overflow float32 inside
    trainer = PretrainTrainer(tiny_config(data, **{"mesh.fsdp": 1}), tmp_path / "run")
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(.*\) at step 1; .*Batch examples: random0000"):
        trainer.fit()
    assert not list((tmp_path / "run" / "checkpoints").iterdir())


def test_cosine_learning_rate_falls_to_its_final_fraction_and_stays():
    """`final_lr_fraction` < 1: AdamW's rate follows a cosine from lr to the fraction over `decay_steps`."""
    import math

    from liveavatar_jax.distill import config as defaults
    from liveavatar_jax.distill import train_state as ts

    c = defaults.optimizer(1e-2, b1=0.0, clip_norm=1e9)
    c.final_lr_fraction, c.decay_steps = 0.1, 4
    tx = ts.make_optimizer(c)
    params = {"w": jnp.ones(3)}
    opt = tx.init(params)
    rates = []
    for _ in range(6):      # Adam without momentum on a constant gradient moves each weight by the rate itself
        updates, opt = tx.update({"w": jnp.ones(3)}, opt, params)
        rates.append(-float(updates["w"][0]))
    expected = [1e-2 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(k, 4) / 4))) for k in range(6)]
    np.testing.assert_allclose(rates, expected, rtol=1e-4)
    c.decay_steps = 0
    with pytest.raises(ValueError, match="decay_steps"):
        ts.make_optimizer(c)
    assert ts.make_optimizer(c, total_steps=4) is not None
