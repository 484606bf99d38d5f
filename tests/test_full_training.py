"""Full-weight training (`train_params = "full"`) on the tiny-world configs: the bidirectional teacher, the chain
teacher -> Stage 1 -> Stage 2 through run folders and exported files, exact resume, and the official-layout export."""

import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import override
from configs import tinyworld_distill, tinyworld_student, tinyworld_teacher
from liveavatar_jax.data.format import ExampleSpec
from liveavatar_jax.data.preprocess import write_random_dataset
from liveavatar_jax.distill import steps
from liveavatar_jax.distill.trainer import DistillTrainer, PretrainTrainer
from liveavatar_jax.weights.dit_keys import load_dit

XLA_CACHE = Path(tempfile.gettempdir()) / "liveavatar_jax_test_xla_cache"


def configure(module, data, **overrides):
    c = module.get_config()
    base = {"data.path": str(data), "data.batch_size": 2, "total_steps": 2, "checkpoint_every": 2, "log_every": 1,
            "compilation_cache": str(XLA_CACHE), "async_checkpointing": False}
    return override(c, {**base, **overrides})


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def assert_trees_equal(a, b):
    assert jax.tree.structure(jax.device_get(a)) == jax.tree.structure(jax.device_get(b))
    for x, y in zip(leaves(a), leaves(b)):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("tinyworld_data")
    write_random_dataset(root, ExampleSpec.from_dict(tinyworld_teacher.get_config().data.spec), count=4, seed=3)
    return root


@pytest.fixture(scope="module")
def teacher(dataset, tmp_path_factory):
    """A 3-step teacher run (checkpoints at steps 2 and 3, export at the end)."""
    trainer = PretrainTrainer(configure(tinyworld_teacher, dataset, total_steps=3), tmp_path_factory.mktemp("teacher"))
    initial = jax.tree.map(np.asarray, jax.device_get(trainer.state.lora))
    trainer.fit()
    return trainer, initial


def test_full_training_moves_every_dit_weight(teacher):
    """LoRA training leaves the base alone (test_pretrain.py); full training updates the DiT's own weights."""
    trainer, initial = teacher
    assert_trees_equal(initial, trainer.base)           # the trained tree starts as the (random) base
    changed = [not np.array_equal(a, b) for a, b in zip(leaves(trainer.state.lora), leaves(initial))]
    assert np.mean(changed) > 0.9, np.mean(changed)
    blocks = trainer.state.lora["blocks"]
    for name in ("ffn_in", "ffn_out"):
        assert not np.array_equal(np.asarray(blocks[name]["kernel"]), initial["blocks"][name]["kernel"])
    assert len(leaves(trainer.state.opt)) > len(leaves(trainer.state.lora))     # Adam moments over all of them
    assert jax.tree.structure(trainer.state.ema) == jax.tree.structure(trainer.state.lora)


def test_teacher_attends_to_the_whole_clip_and_the_student_does_not(teacher):
    """Bidirectional teacher: the first block's velocity depends on the last frame; the causal student's does not.
    The teacher draws one noise level per clip, the student one per 3-frame block."""
    trainer, _ = teacher
    batch, _ = trainer.next_batch()
    later = dict(batch, latents=batch["latents"].at[:, :, -1].add(1.0))
    key = jax.random.key(5)
    for causal in (False, True):
        cfg = steps.PretrainConfig(causal=causal, drop_audio=0.0)
        # eager: two small forwards cost less than compiling them
        fn = lambda p, b, k: steps.pretrain_velocity(trainer.networks, p, None, b, k, cfg)  # noqa: E731
        v, _, _, sigma = fn(trainer.state.lora, batch, key)
        v_later, *_ = fn(trainer.state.lora, later, key)
        first_block = np.abs(np.asarray(v_later[:, :, :3] - v[:, :, :3])).max()
        sigma = np.asarray(sigma)
        if causal:
            assert first_block == 0.0
            assert np.all(sigma[:, :3] == sigma[:, :1]) and np.any(sigma[:, 3:] != sigma[:, :1])
        else:
            assert first_block > 1e-4
            assert np.all(sigma == sigma[:, :1])


def test_export_loads_as_official_weights_with_an_identical_forward(teacher):
    trainer, _ = teacher
    path = trainer.workdir / "dit_ema.safetensors"
    model = load_dit(path, trainer.networks.model_cfg)
    loaded = nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[1])
    assert_trees_equal(loaded, trainer.state.ema)
    batch, _ = trainer.next_batch()
    cond = steps.conditions(batch)
    x, t = batch["latents"], jnp.full((batch["latents"].shape[0],), 500.0)
    forward = jax.jit(lambda params, x, t, cond: steps._bidirectional(trainer.networks.adapted(params), x, t, cond,
                                                                      trainer.pcfg))
    np.testing.assert_array_equal(np.asarray(forward(loaded, x, t, cond)),
                                  np.asarray(forward(trainer.state.ema, x, t, cond)))


def test_resumed_full_run_equals_the_uninterrupted_run(teacher, dataset, tmp_path):
    trainer, _ = teacher
    shutil.copytree(trainer.workdir / "checkpoints", tmp_path / "resumed" / "checkpoints")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "3")         # as if the run had stopped after step 2
    resumed = PretrainTrainer(configure(tinyworld_teacher, dataset, total_steps=3), tmp_path / "resumed")
    resumed.fit()
    for item in ("lora", "ema", "opt"):
        assert_trees_equal(getattr(resumed.state, item), getattr(trainer.state, item))


def test_stage_1_and_stage_2_start_from_the_previous_runs(teacher, dataset, tmp_path):
    trainer, _ = teacher
    ema = jax.device_get(trainer.state.ema)
    # Stage 1: the student (and its frozen base) from the teacher run folder or from its exported file
    student = PretrainTrainer(configure(tinyworld_student, dataset, **{"model.checkpoint": str(trainer.workdir),
                                                                       "total_steps": 1, "checkpoint_every": 1}),
                              tmp_path / "student")
    assert_trees_equal(student.state.lora, ema)
    assert_trees_equal(student.base, ema)
    from_file = PretrainTrainer(configure(tinyworld_student, dataset, **{
        "model.checkpoint": str(trainer.workdir / "dit_ema.safetensors")}), tmp_path / "student_file")
    assert_trees_equal(from_file.state.lora, ema)
    student.fit()
    # Stage 2: real score = teacher (frozen), fake score starts from the teacher, student from Stage 1's EMA
    distill = DistillTrainer(configure(tinyworld_distill, dataset, **{
        "model.checkpoint": str(trainer.workdir), "distill.init_student": str(tmp_path / "student")}),
        tmp_path / "distill")
    assert_trees_equal(distill.base, ema)
    assert_trees_equal(distill.state.critic, ema)
    assert_trees_equal(distill.state.gen, student.state.ema)
    assert_trees_equal(distill.state.ema, student.state.ema)
    exported = DistillTrainer(configure(tinyworld_distill, dataset, **{
        "model.checkpoint": str(trainer.workdir / "dit_ema.safetensors"),
        "distill.init_student": str(tmp_path / "student" / "dit_ema.safetensors")}), tmp_path / "distill_files")
    assert_trees_equal(exported.state.gen, student.state.ema)
    assert_trees_equal(exported.state.critic, ema)
    # the critic's full weights train; the teacher stays as it was
    batch, _ = distill.next_batch()
    state = jax.tree.map(jnp.copy, distill.state)
    state, metrics = distill.critic_fn(state, distill.base, batch, batch["ref_latents"].repeat(6, axis=2))
    assert np.isfinite(float(metrics["loss"]))
    changed = [not np.array_equal(a, b) for a, b in zip(leaves(state.critic), leaves(ema))]
    assert np.mean(changed) > 0.9
    assert_trees_equal(distill.base, ema)


def test_a_run_of_the_other_kind_is_refused_naming_it(teacher, dataset, tmp_path):
    trainer, _ = teacher
    with pytest.raises(ValueError, match="train_params='full' run; this run needs LoRA adapters"):
        DistillTrainer(configure(tinyworld_distill, dataset, **{
            "train_params": "lora", "lora.rank": 4, "distill.init_student": str(trainer.workdir)}), tmp_path / "d")
