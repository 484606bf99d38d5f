"""Stage 2 (Self-Forcing DMD with History Corrupt) at the tiny config, on 4 simulated devices (FSDP-sharded state).

The trainer's jitted programs are compiled once for the module (and cached on disk for test_train_resume.py, which
runs the same config in subprocesses).
"""

import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import override
from configs import distill_tiny
from liveavatar_jax.data.format import ExampleSpec
from liveavatar_jax.data.preprocess import write_random_dataset
from liveavatar_jax.distill import lora as lora_lib
from liveavatar_jax.distill import steps
from liveavatar_jax.distill.rollout import make_plan, rollout
from liveavatar_jax.distill.trainer import DistillTrainer
from liveavatar_jax.models.dit import DiTConfig, abstract_model

XLA_CACHE = Path(tempfile.gettempdir()) / "liveavatar_jax_test_xla_cache"


# The Stage-2 setting the distillation tests share (test_train_resume.py passes the same values on the command line,
# so its subprocesses find these programs in the on-disk compilation cache).
TINY_OVERRIDES = {"data.batch_size": 4, "mesh.fsdp": 4, "compilation_cache": str(XLA_CACHE), "total_steps": 6,
                  "checkpoint_every": 2}


def tiny_config(data_path):
    c = distill_tiny.get_config()
    return override(c, {**TINY_OVERRIDES, "data.path": str(data_path)})


def write_dataset(root):
    c = distill_tiny.get_config()
    return write_random_dataset(root, ExampleSpec.from_dict(c.data.spec), count=12, seed=0)


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    data = tmp_path_factory.mktemp("distill_data")
    write_dataset(data)
    return DistillTrainer(tiny_config(data), tmp_path_factory.mktemp("distill_run"))


@pytest.fixture(scope="module")
def batch(trainer):
    return trainer.next_batch()[0]


def fresh(state):
    """A copy: the update programs donate their input state."""
    return jax.tree.map(jnp.copy, state)


def test_state_is_sharded_over_the_mesh(trainer):
    assert dict(trainer.mesh.shape) == {"data": 1, "fsdp": 4}
    q = trainer.state.gen["blocks"]["self_attn"]["q"]["lora_a"]            # [layers, 64, rank]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    mu = jax.tree.leaves(trainer.state.gen_opt)
    assert any(len(a.sharding.device_set) == 4 and a.ndim == 3 for a in mu)
    kernel = trainer.base["blocks"]["ffn_in"]["kernel"]                     # [layers, 64, 128]
    assert len(kernel.sharding.device_set) == 4 and not kernel.sharding.is_fully_replicated


def test_generator_updates_descend_the_dmd_objective_on_a_fixed_batch(trainer, batch):
    """Everything random held fixed (batch, rollout noise, exit step, DMD time and noise): the student's clip moves
    towards the DMD target x - grad of the first iteration. (The reported surrogate 1/2 mean(grad^2) is scale-free by
    the DMD normaliser and is not itself a descent objective, so the distance to the fixed target is what falls.)"""
    state = fresh(trainer.state)
    rng, step = jnp.copy(state.rng), jnp.copy(state.step)
    plan = trainer.plan_fn(batch, rng, step, 0)                             # the generator iteration's draws
    first = trainer.rollout_fn(state.gen, trainer.base, batch, plan)
    direction, _ = trainer.direction_fn(state.critic, trainer.base, batch, first.video, rng, step,
                                        trainer.negative_text)
    target = first.video - direction
    distances = [float(0.5 * jnp.mean(jnp.square(first.video - target)))]
    reported = []
    for _ in range(4):
        state, metrics = trainer.generator_iteration(state, batch)          # the step counter is not advanced
        reported.append(float(metrics["loss"]))
        result = trainer.rollout_fn(state.gen, trainer.base, batch, plan)
        distances.append(float(0.5 * jnp.mean(jnp.square(result.video - target))))
    assert reported[0] == pytest.approx(distances[0], rel=1e-5)
    assert all(b < a for a, b in zip(distances, distances[1:])), distances
    assert distances[-1] < 0.98 * distances[0], distances


def test_critic_regression_loss_falls_on_a_fixed_batch(trainer, batch):
    state = fresh(trainer.state)
    result = trainer.rollout_fn(state.gen, trainer.base, batch, trainer.plan_fn(batch, state.rng, state.step, 1))
    losses = []
    for _ in range(4):
        state, metrics = trainer.critic_fn(state.replace(step=jnp.zeros_like(state.step)), trainer.base, batch,
                                           result.video)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0], losses


def test_the_anchor_reads_the_real_clip_and_its_gradient_descends_stage_1s_loss(trainer, batch):
    """distill.anchor: with weight 0 the run reads no real latents and the generator's gradient is DMD's alone; with
    weight w the real clip is read and w x the flow-matching gradient is added, in the direction that lowers Stage 1's
    loss on that clip (a sign or scale slip makes the step raise it, or move by the wrong amount)."""
    def reads(weight):
        c = override(tiny_config("unused"), {"distill.anchor.weight": weight})
        probe = DistillTrainer.__new__(DistillTrainer)      # only the config: the properties read nothing else
        probe.config = c
        return probe.fields

    assert "latents" not in reads(0.0) and "latents" in reads(0.5)
    assert "latents" not in batch

    gen = trainer.state.gen
    video_shape = batch["ref_latents"].shape[:2] + (trainer.rcfg.num_frames,) + batch["ref_latents"].shape[3:]
    real = dict(batch, latents=jax.random.normal(jax.random.key(3), video_shape, jnp.float32))
    pcfg = steps.anchor_pretrain_config(trainer.rcfg, trainer.config.distill.anchor)
    assert (pcfg.causal, pcfg.frames_per_block, pcfg.relative_dist) == (True, 3, tuple(trainer.rcfg.relative_dist))
    key = jax.random.key(5)
    dmd = jax.tree.map(lambda x: jnp.full_like(x, 0.25), gen)
    anchored = jax.jit(lambda g, w, d: steps.anchored_grads(trainer.networks, pcfg, w, g, trainer.base, real, key, d))
    loss_at = jax.jit(lambda g: steps.pretrain_loss(trainer.networks, g, trainer.base, real, key, pcfg)[0])

    loss, same = anchored(gen, 0.0, dmd)
    for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(dmd)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    zero = jax.tree.map(jnp.zeros_like, gen)
    _, g1 = anchored(gen, 1.0, zero)
    _, g2 = anchored(gen, 2.0, dmd)
    for a, b, d in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), jax.tree.leaves(dmd)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(d + 2 * a), rtol=1e-5, atol=1e-7)
    norm = float(jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(g1))))
    assert norm > 0 and float(loss) == pytest.approx(float(loss_at(gen)), rel=1e-6)
    stepped = jax.tree.map(lambda p, d: p - 1e-2 / norm * d, gen, g1)
    assert float(loss_at(stepped)) < float(loss)


def test_null_branch_texts_and_the_guidance_interval(trainer, batch):
    """dmd.null_text="prompt": the null branch differs from the conditional one only by its zero audio, so on silent
    audio the guided x0 is the conditional x0 whatever the guidance; the official null branch (negative prompt) is
    not, except at levels outside `dmd.guidance_interval`; "dropped" is the official branch with a zero negative
    prompt. Unknown values are refused by name."""
    import dataclasses

    silent = dict(steps.conditions(batch), audio=jnp.zeros_like(batch["audio"]))
    video = trainer.rollout_fn(trainer.state.gen, trainer.base, batch,
                               trainer.plan_fn(batch, trainer.state.rng, trainer.state.step, 0)).video
    t, sigma, _, x_t = steps._score_inputs(video, jax.random.key(2), trainer.dcfg)

    def guided(null_text, guidance):
        cfg = dataclasses.replace(trainer.dcfg, null_text=null_text, guidance=guidance)
        return np.asarray(jax.jit(lambda: steps.teacher_x0(trainer.networks, trainer.base, x_t, t, sigma, silent,
                                                         trainer.negative_text, cfg))())

    conditional = guided("prompt", 0.0)
    np.testing.assert_allclose(guided("prompt", 3.0), conditional, rtol=1e-5, atol=1e-5)
    assert np.max(np.abs(guided("negative", 3.0) - conditional)) > 1e-3
    # "dropped" is the negative branch with an all-zero negative prompt, whatever the negative prompt is
    zero_negative = dataclasses.replace(trainer.dcfg, null_text="negative", guidance=3.0)
    np.testing.assert_allclose(
        guided("dropped", 3.0),
        np.asarray(jax.jit(lambda: steps.teacher_x0(trainer.networks, trainer.base, x_t, t, sigma, silent,
                                                    jnp.zeros_like(trainer.negative_text), zero_negative))()),
        rtol=1e-5, atol=1e-5)
    assert np.max(np.abs(guided("dropped", 3.0) - guided("negative", 3.0))) > 1e-3
    with pytest.raises(ValueError, match="null_text 'none'"):
        guided("none", 3.0)
    # dmd.guidance_interval: scores at levels outside it are the conditional x0 (DMD draws t in [min_t, max_t])
    assert float(jnp.min(t)) > 10.0
    interval = lambda lo_hi: dataclasses.replace(trainer.dcfg, null_text="negative", guidance=3.0,
                                                 guidance_interval=lo_hi)
    outside = np.asarray(jax.jit(lambda: steps.teacher_x0(trainer.networks, trainer.base, x_t, t, sigma, silent,
                                                          trainer.negative_text, interval((0.0, 10.0))))())
    np.testing.assert_allclose(outside, conditional, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="guidance_interval"):
        interval((500.0, 100.0))


def test_guidance_rules_drop_what_they_name_and_keep_the_rest():
    """losses.cfg_x0 on [B, C, F, H, W]: a null branch off by a scale of `c` moves the plain guidance and not the
    orthogonal one, while a difference orthogonal to `c` is guided as plainly; one off by a whole-frame colour (a
    constant per channel and frame) moves the plain guidance and not the high-pass one, while a one-cell difference
    keeps 8/9 of its guidance at its cell. An unknown rule is refused."""
    from liveavatar_jax.distill import losses

    rng = np.random.default_rng(0)
    c = jnp.asarray(rng.normal(size=(2, 4, 3, 5, 5)), jnp.float32)
    g = 3.0
    pattern = jnp.asarray(rng.normal(size=c.shape), jnp.float32)
    pattern = pattern - jnp.sum(pattern * c, axis=(1, 3, 4), keepdims=True) / jnp.sum(c * c, axis=(1, 3, 4),
                                                                                          keepdims=True) * c
    np.testing.assert_allclose(losses.cfg_x0(c, c - pattern, g, "orthogonal"), c + g * pattern, atol=1e-5)
    np.testing.assert_allclose(losses.cfg_x0(c, 0.7 * c, g, "orthogonal"), c, atol=1e-5)
    assert float(jnp.max(jnp.abs(losses.cfg_x0(c, 0.7 * c, g, "plain") - c))) > 1.0

    colour = jnp.asarray(rng.normal(size=(2, 4, 3, 1, 1)), jnp.float32)
    np.testing.assert_allclose(losses.cfg_x0(c, c - colour, g, "high_pass"), c, atol=1e-5)
    assert float(jnp.max(jnp.abs(losses.cfg_x0(c, c - colour, g, "plain") - c))) > 1.0
    cell = jnp.zeros(c.shape).at[:, :, :, 2, 2].set(1.0)
    guided = losses.cfg_x0(c, c - cell, g, "high_pass") - c
    np.testing.assert_allclose(guided[:, :, :, 2, 2], g * 8 / 9, rtol=1e-5)
    np.testing.assert_allclose(guided[:, :, :, 1, 1], -g / 9, rtol=1e-5)
    with pytest.raises(ValueError, match="guidance_rule 'apg'"):
        steps.DMDConfig(guidance_rule="apg")


def _changed(a, b):
    return jax.tree.map(lambda x, y: bool(jnp.any(x != y)), a, b)


def test_only_lora_parameters_train(trainer, batch):
    before = fresh(trainer.state)
    base_before = jax.tree.map(np.asarray, trainer.base)
    state, _ = trainer.generator_iteration(fresh(before), batch)
    once = fresh(state)
    state, _ = trainer.generator_iteration(state, batch)
    state, _ = trainer.critic_iteration(state, batch)
    state, _ = trainer.critic_iteration(state, batch)
    for path, leaf in jax.tree.flatten_with_path(trainer.base)[0]:
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(_get(base_before, path)), err_msg=str(path))
    # B starts at zero, so the first update moves every B and no A; from the second on every adapter trains.
    first = _changed(before.gen, once.gen)
    assert all(v for p, v in _leaves(first) if p.endswith("lora_b")) and not any(
        v for p, v in _leaves(first) if p.endswith("lora_a"))
    assert all(v for _, v in _leaves(_changed(before.gen, state.gen)))
    assert all(v for _, v in _leaves(_changed(before.critic, state.critic)))
    assert not any(v for _, v in _leaves(_changed(once.critic, before.critic)))   # the generator leaves the critic


def _get(tree, path):
    for p in path:
        tree = tree[p.key]
    return tree


def _leaves(tree):
    return [("/".join(str(p.key) for p in path), v) for path, v in jax.tree.flatten_with_path(tree)[0]]


def test_non_exit_forwards_carry_no_gradient_and_blockwise_equals_full(trainer, batch):
    """Forward-mode derivatives of the differentiable rollout (`grad=True`) along a random adapter direction: through
    the non-exit forwards' adapters the clip does not move at all; through the exit forwards it moves exactly as the
    trainer's blockwise exit-VJP gradient predicts, <cotangent, d video> = <gradient, direction>."""
    net, rcfg, base = trainer.networks, trainer.rcfg, trainer.base
    cond = steps.conditions(batch)
    state = trainer.state
    gen = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(1), a.shape), state.gen)  # B != 0
    tangent = jax.tree.map(lambda a: jax.random.normal(jax.random.key(4), a.shape), gen)
    plan = make_plan(jax.random.key(3), rcfg, 4, 16, 8, 16, exit_step=2)    # 2 non-exit steps before the exit

    @jax.jit
    def derivatives(gen, tangent, base, cond):
        def video(exit_lora, nonexit_lora):
            return rollout(net, exit_lora, base, cond, plan, rcfg, grad=True, nonexit_lora=nonexit_lora).video

        d_exit = jax.jvp(lambda e: video(e, gen), (gen,), (tangent,))[1]
        d_nonexit = jax.jvp(lambda n: video(gen, n), (gen,), (tangent,))[1]
        return d_exit, d_nonexit

    one_device = jax.devices()[0]                      # unsharded: the check is about the math, not the layout
    d_exit, d_nonexit = derivatives(*jax.device_put((gen, tangent, base, cond), one_device))
    assert float(jnp.max(jnp.abs(d_nonexit))) == 0.0
    assert float(jnp.max(jnp.abs(d_exit))) > 0.0

    result = trainer.rollout_fn(gen, base, batch, plan)
    cotangent = jax.random.normal(jax.random.key(2), result.video.shape)
    # The trainer differentiates the surrogate 1/2 mean(x - sg(x - d))^2, whose gradient in x is d / numel.
    _, g = trainer.generator_grads_fn(gen, base, batch, plan, result, cotangent * cotangent.size)
    predicted = sum(float(jnp.vdot(a, b)) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(tangent)))
    actual = float(jnp.vdot(cotangent, d_exit))
    magnitude = float(jnp.sum(jnp.abs(cotangent * d_exit)))          # float32 sums of that size cancel to ~1e-6
    assert abs(predicted - actual) < 1e-5 * magnitude, (predicted, actual, magnitude)


def test_rollout_exiting_at_the_last_step_is_the_inference_stream(trainer, batch):
    """With the exit at the last step the student's training rollout is the streaming engine's output for the same
    noise and rolling-sink draws: per-step rings, Euler updates, no clean refresh (History Corrupt), ring wrap-around
    (2-block ring, 3 blocks)."""
    from liveavatar_jax.streaming.engine import StreamConfig, StreamContext, StreamEngine, split_audio_blocks

    net, rcfg, base = trainer.networks, trainer.rcfg, trainer.base
    gen = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(5), a.shape), trainer.state.gen)
    plan = make_plan(jax.random.key(6), rcfg, 4, 16, 8, 16, exit_step=rcfg.steps - 1)
    video = trainer.rollout_fn(gen, base, batch, plan).video

    host = jax.device_get((gen, base, batch))
    model = net.adapted(*host[:2])
    engine = StreamEngine(model, StreamConfig(steps=rcfg.steps, shift=rcfg.shift, frames_per_block=3,
                                              ring_blocks=rcfg.ring_blocks, sink_replace_block=None,
                                              rolling_sink=True, relative_dist=rcfg.relative_dist))
    ctx = StreamContext(text=model.embed_text(host[2]["text"]), ref_latents=host[2]["ref_latents"],
                        motion_latents=host[2]["motion_latents"])
    _, out = engine.run(engine.init(ctx, 0), ctx, split_audio_blocks(host[2]["audio"], 3),
                        noise=jax.device_get(plan.noise), dists=jax.device_get(plan.dists))
    stream = jnp.moveaxis(out["latents"], 0, 2).reshape(video.shape)      # [blocks, B, C, 3, h, w] -> clip
    err = float(jnp.linalg.norm(stream - video) / jnp.linalg.norm(stream))
    assert err < 1e-5, err


def test_lora_targets_match_liveavatar_at_14b():
    """448 adapted Linears (self/cross q, k, v, o and ffn.0/ffn.2 of 40 blocks, q, k, v, o of 12 audio injectors),
    676,331,520 adapter parameters at rank 128 (training.md 7.3)."""
    net = lora_lib.build_networks(abstract_model(DiTConfig()), lora_lib.LoRAConfig())
    assert lora_lib.count(net.lora_template) == 676_331_520
    layers = sum(leaf.shape[0] for path, leaf in _leaves(net.lora_template) if path.endswith("lora_a"))
    assert layers == 448


def test_14b_config_traces_every_stage_2_program():
    """configs/distill_14b.py, abstractly (no memory, no compile): the rollout, the DMD direction, the blockwise
    generator gradient and the critic update of the 14B student/teacher/critic at 704x384, 7 blocks."""
    from configs import distill_14b
    from liveavatar_jax.distill import train_state as ts
    from liveavatar_jax.distill.rollout import RolloutConfig
    from liveavatar_jax.distill.trainer import example_spec, model_config

    c = distill_14b.get_config()
    net = lora_lib.build_networks(abstract_model(model_config(c)), lora_lib.LoRAConfig.from_dict(c.lora))
    rcfg = RolloutConfig.from_dict({**c.distill.rollout.to_dict(), "remat": c.remat})
    dcfg = steps.DMDConfig.from_dict({**c.distill.dmd.to_dict(), "remat": c.remat})
    spec = example_spec(c)
    S = jax.ShapeDtypeStruct
    batch = {"text": S((1, spec.text_len, spec.text_dim), jnp.float32),
             "audio": S((1, spec.audio_layers, spec.audio_dim, 4 * spec.frames), jnp.float32),
             "ref_latents": S((1, 16, 1, spec.height, spec.width), jnp.float32),
             "motion_latents": S((1, 16, spec.motion_frames, spec.height, spec.width), jnp.float32)}
    lora = net.abstract_lora()
    tx = ts.make_optimizer(c.distill.critic_optimizer)
    key = jax.random.key(0)
    plan = jax.eval_shape(lambda b: steps.draw_plan(rcfg, b, key), batch)
    result = jax.eval_shape(lambda *a: steps.generate(net, rcfg, *a), lora, net.base, batch, plan)
    assert result.video.shape == (1, 16, 21, 88, 48) and result.exit_inputs.dtype == jnp.bfloat16
    direction, _ = jax.eval_shape(lambda *a: steps.dmd_direction(net, *a, dcfg), lora, net.base, result.video, key,
                                  steps.conditions(batch), S((spec.text_len, spec.text_dim), jnp.float32))
    _, grads = jax.eval_shape(lambda *a: steps.generator_grads(net, rcfg, dcfg, *a), lora, net.base, batch, plan,
                              result, direction)
    assert jax.tree.structure(grads) == jax.tree.structure(lora)
    state = jax.eval_shape(lambda g: ts.init_distill_state(g, g, tx, tx, 0), lora)
    new_state, _ = jax.eval_shape(lambda *a: steps.critic_update(net, dcfg, tx, *a, key), state, net.base, batch,
                                  result.video)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)


def test_adapters_export_to_the_peft_layout_the_inference_loader_merges(tmp_path, trainer):
    cfg = lora_lib.LoRAConfig.from_dict(trainer.config.lora)
    tree = jax.tree.map(lambda a: np.asarray(a) + np.float32(0.01), jax.device_get(trainer.state.gen))
    path = lora_lib.export_peft(tree, cfg, tmp_path / "student.safetensors")
    back = lora_lib.import_peft(path, trainer.networks.abstract_lora(), cfg)
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(back)):
        np.testing.assert_array_equal(a, np.asarray(b))
    from safetensors.numpy import load_file

    names = load_file(str(path))
    a = names["base_model.model.blocks.1.ffn.0.lora_A.default.weight"]
    assert a.shape == (cfg.rank, 64)
    np.testing.assert_array_equal(a, tree["blocks"]["ffn_in"]["lora_a"][1].T)
