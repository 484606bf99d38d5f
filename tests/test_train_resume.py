"""Checkpoints and restarts: SIGKILL of `python -m train.distill` and restart reproduces the uninterrupted run; a
checkpoint restores onto another mesh; a workdir of another config is refused; a damaged latest checkpoint falls back.

The subprocesses run the Stage-2 config of test_distill.py and share its on-disk compilation cache.
"""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from safetensors.numpy import load_file

from liveavatar_jax.distill import train_state as ts
from liveavatar_jax.distill.checkpoint import Checkpointer, ConfigMismatchError, NoUsableCheckpointError
from test_distill import TINY_OVERRIDES, write_dataset

REPO = Path(__file__).resolve().parents[1]


def _flags(data, workdir, **extra):
    overrides = {**TINY_OVERRIDES, "data.path": str(data), **extra}
    return [sys.executable, "-m", "train.distill", "--config", "configs/distill_tiny.py", "--workdir", str(workdir),
            *[f"--config.{k}={v}" for k, v in overrides.items()]]


def _run(cmd, log):
    with open(log, "w") as err:
        return subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err, timeout=900).returncode


def _rows(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_data")
    write_dataset(root)
    return root


def test_sigkill_and_restart_reproduce_the_uninterrupted_run(dataset, tmp_path):
    steps = {"total_steps": 8, "checkpoint_every": 2}
    assert _run(_flags(dataset, tmp_path / "straight", **steps), tmp_path / "straight.log") == 0, \
        (tmp_path / "straight.log").read_text()[-3000:]

    work = tmp_path / "killed"
    with open(tmp_path / "killed.log", "w") as err:
        proc = subprocess.Popen(_flags(dataset, work, **steps), cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.time() + 900
        while proc.poll() is None and time.time() < deadline:
            metrics = work / "metrics.jsonl"
            if metrics.is_file() and any(r["step"] >= 5 for r in _rows(work)):
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    logged = max(r["step"] for r in _rows(work))
    assert logged < 8

    assert _run(_flags(dataset, work, **steps), tmp_path / "restart.log") == 0, \
        (tmp_path / "restart.log").read_text()[-3000:]
    assert "resumed from" in (tmp_path / "restart.log").read_text()
    straight, resumed = _rows(tmp_path / "straight"), _rows(work)
    assert [r["step"] for r in resumed] == list(range(1, 9))
    for key in ("loss", "dmd_loss", "critic/grad_norm", "gen/exit_step"):
        assert [r.get(key) for r in resumed] == [r.get(key) for r in straight], key
    a, b = (load_file(str(w / "student_lora.safetensors")) for w in (work, tmp_path / "straight"))
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def _state_on(mesh, seed=0):
    rng = np.random.default_rng(seed)
    tree = {"lora": {"a": rng.standard_normal((2, 8, 4)).astype(np.float32),
                     "b": rng.standard_normal((2, 4, 16)).astype(np.float32)},
            "count": np.int32(3)}
    return jax.device_put(tree, ts.tree_shardings(tree, mesh))


def test_checkpoint_restores_onto_a_different_mesh(tmp_path):
    devices = jax.devices()
    saved_on = ts.make_mesh(1, 4, devices[:4])
    state = _state_on(saved_on)
    ckpt = Checkpointer(tmp_path, ("state",), keep=2)
    ckpt.save(10, {"state": state}, {"step": 10})
    ckpt.wait()
    target = ts.make_mesh(1, 2, devices[4:6])
    abstract = ts.abstract_with_sharding(state, ts.tree_shardings(state, target))
    step, items, meta = ckpt.restore_latest({"state": abstract})
    ckpt.close()
    assert step == 10 and meta["step"] == 10
    a = items["state"]["lora"]["a"]
    assert a.sharding == NamedSharding(target, P(None, "fsdp", None))
    assert set(a.sharding.device_set) == set(devices[4:6])
    for x, y in zip(jax.tree.leaves(items["state"]), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _config(rank=8, guidance=3.0, total=20):
    return {"total_steps": total, "lora": {"rank": rank, "alpha": 4.0},
            "distill": {"dmd": {"guidance": guidance, "gradient": "blockwise"}}, "mesh": {"fsdp": 4}}


def test_a_workdir_of_another_config_is_refused_naming_the_keys(tmp_path):
    mesh = ts.make_mesh(1, 1, jax.devices()[:1])
    state = _state_on(mesh)
    ckpt = Checkpointer(tmp_path, ("state",), keep=2, async_save=False)
    ckpt.save(4, {"state": state}, {"step": 4, "config": _config()})
    abstract = ts.abstract_with_sharding(state, ts.tree_shardings(state, mesh))
    # run length and mesh may change on resume
    assert ckpt.restore_latest({"state": abstract}, config=_config(total=40) | {"mesh": {"fsdp": 2}})[0] == 4
    with pytest.raises(ConfigMismatchError) as e:
        ckpt.restore_latest({"state": abstract}, config=_config(rank=16, guidance=4.5))
    ckpt.close()
    msg = str(e.value)
    assert "different config" in msg and str(tmp_path) in msg
    assert "lora.rank: 8 -> 16" in msg and "distill.dmd.guidance: 3.0 -> 4.5" in msg and "total_steps" not in msg


# A failed Orbax restore leaves a callback for its closed event loop; Python reports it when it is collected.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    mesh = ts.make_mesh(1, 1, jax.devices()[:1])
    ckpt = Checkpointer(tmp_path, ("state",), keep=3, async_save=False)
    for step in (2, 4):
        ckpt.save(step, {"state": _state_on(mesh, seed=step)}, {"step": step})
    for f in (tmp_path / "4" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"\0" * 7)                                   # damaged array data
    state = _state_on(mesh, seed=2)
    abstract = ts.abstract_with_sharding(state, ts.tree_shardings(state, mesh))
    with caplog.at_level(logging.WARNING, logger="liveavatar_jax.train"):
        step, items, _ = ckpt.restore_latest({"state": abstract})
    assert step == 2
    np.testing.assert_array_equal(np.asarray(items["state"]["lora"]["a"]), np.asarray(state["lora"]["a"]))
    assert "checkpoint" in caplog.text and "/4 cannot be restored" in caplog.text and "falling back" in caplog.text
    assert ckpt.steps() == [2]                                         # the damaged one is set aside
    for f in (tmp_path / "2" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"\0" * 7)
    with pytest.raises(NoUsableCheckpointError, match="no checkpoint could be restored"):
        ckpt.restore_latest({"state": abstract})
    ckpt.close()


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    mesh = ts.make_mesh(1, 1, jax.devices()[:1])
    ckpt = Checkpointer(tmp_path, ("state",), keep=2)
    for step in (2, 4, 6):
        ckpt.save(step, {"state": _state_on(mesh, seed=step)}, {"step": step})
    ckpt.close()
    assert ckpt.steps() == [4, 6]


def test_stage_2_student_starts_from_the_stage_1_checkpoint(tmp_path):
    from liveavatar_jax.distill.lora import LoRAConfig, build_networks, export_peft
    from liveavatar_jax.distill.trainer import PretrainTrainer, load_student_init
    from liveavatar_jax.models.dit import DiTConfig, abstract_model

    cfg = LoRAConfig(rank=4, alpha=2.0)
    net = build_networks(abstract_model(DiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32,
                                                  text_len=32, audio_dim=32, audio_inject_layers=(0, 1),
                                                  dtype="float32")), cfg)
    mesh = ts.make_mesh(1, 1, jax.devices()[:1])
    shardings = ts.tree_shardings(net.abstract_lora(), mesh)
    ema = net.init_lora(jax.random.key(1))
    ema = jax.tree.map(lambda a: a + 1.0, ema)
    stage1 = Checkpointer(tmp_path / "stage1" / "checkpoints", PretrainTrainer.item_names, async_save=False)
    stage1.save(25, {"lora": net.init_lora(jax.random.key(2)), "opt": {"count": jnp.zeros(())}, "ema": ema},
                {"step": 25})
    stage1.close()
    restored = load_student_init(str(tmp_path / "stage1"), "ema", net, shardings, cfg)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(ema)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    from_file = load_student_init(str(export_peft(jax.device_get(ema), cfg, tmp_path / "s1.safetensors")), "ema",
                                  net, shardings, cfg)
    for a, b in zip(jax.tree.leaves(from_file), jax.tree.leaves(ema)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
