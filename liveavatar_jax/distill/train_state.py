"""Training state, optimizers, the EMA and the FSDP sharding of both training stages.

The states are flat pytrees of arrays (adapter trees are pure dicts, optimizer states optax NamedTuples), so that
Orbax saves and restores them item by item and `jax.jit` shards them with ordinary `NamedSharding`s. Randomness is a
single saved key: step k uses `fold_in(key, k)`, so a resumed run draws exactly what the uninterrupted run drew.

Sharding: a 2-D mesh `("data", "fsdp")`. The batch is split over both axes; every parameter, adapter, EMA and
optimizer-moment array is split over `"fsdp"` along its largest dimension that the axis size divides (replicated when
none does), so the frozen base, the adapters and Adam's moments are all sharded ZeRO-3 style.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXES = ("data", "fsdp")


# ----------------------------------------------------------------------------------------------------- optimizers

def make_optimizer(cfg: Mapping, total_steps: int | None = None) -> optax.GradientTransformation:
    """clip_by_global_norm -> AdamW, optionally accumulated over `accumulate` micro-steps.

    The learning rate is constant unless `final_lr_fraction` < 1: then a cosine takes it from `lr` to
    `final_lr_fraction * lr` over `decay_steps` optimizer steps (0 or absent: `total_steps`) and holds it there.
    """
    mu_dtype = cfg.get("mu_dtype") or None
    lr = float(cfg["lr"])
    final = float(cfg.get("final_lr_fraction", 1.0))
    if final != 1.0:
        horizon = int(cfg.get("decay_steps", 0)) or int(total_steps or 0)
        if horizon <= 0:
            raise ValueError("optimizer.final_lr_fraction < 1 needs optimizer.decay_steps or the run's total_steps")
        lr = optax.cosine_decay_schedule(lr, horizon, alpha=final)
    tx = optax.chain(
        optax.clip_by_global_norm(float(cfg["clip_norm"])),
        optax.adamw(lr, b1=float(cfg["b1"]), b2=float(cfg["b2"]), eps=float(cfg["eps"]),
                    weight_decay=float(cfg["weight_decay"]), mu_dtype=jnp.dtype(mu_dtype) if mu_dtype else None),
    )
    accumulate = int(cfg.get("accumulate", 1))
    if accumulate > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accumulate)
    return tx


def ema_update(ema, params, decay: float, step, start_step: int):
    """Before `start_step` the shadow tracks the parameters exactly (it is created as a copy at `start_step`), then
    `decay * ema + (1 - decay) * params`."""
    started = jnp.asarray(step) >= start_step
    return jax.tree.map(lambda e, p: jnp.where(started, decay * e + (1.0 - decay) * p, p).astype(e.dtype), ema, params)


def global_norm(tree):
    return optax.tree.norm(tree)


# ---------------------------------------------------------------------------------------------------------- states

@struct.dataclass
class PretrainState:
    step: jnp.ndarray           # int32: completed optimizer steps
    lora: dict
    opt: optax.OptState
    ema: dict
    rng: jnp.ndarray            # uint32 key data of the run's root key


@struct.dataclass
class DistillState:
    step: jnp.ndarray           # int32: completed iterations (one critic update each)
    gen: dict                   # student adapters
    critic: dict                # critic adapters
    ema: dict                   # EMA of the student adapters
    gen_opt: optax.OptState
    critic_opt: optax.OptState
    rng: jnp.ndarray


def root_key(seed: int):
    return jax.random.key_data(jax.random.key(seed))


def step_key(rng, step, stream: int = 0):
    """The key of `stream` at `step`; independent of how many steps ran in this process."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(rng), step), stream)


def init_pretrain_state(lora, tx, seed: int) -> PretrainState:
    return PretrainState(step=jnp.zeros((), jnp.int32), lora=lora, opt=tx.init(lora),
                         ema=jax.tree.map(jnp.copy, lora), rng=root_key(seed))


def init_distill_state(gen, critic, tx_gen, tx_critic, seed: int) -> DistillState:
    return DistillState(step=jnp.zeros((), jnp.int32), gen=gen, critic=critic, ema=jax.tree.map(jnp.copy, gen),
                        gen_opt=tx_gen.init(gen), critic_opt=tx_critic.init(critic), rng=root_key(seed))


# --------------------------------------------------------------------------------------------------------- sharding

def make_mesh(data: int = 1, fsdp: int = -1, devices=None) -> Mesh:
    """A ("data", "fsdp") mesh; -1 takes the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if data == -1 and fsdp == -1:
        raise ValueError("at most one mesh axis may be -1")
    if data == -1:
        data = n // fsdp
    if fsdp == -1:
        fsdp = n // data
    if data * fsdp != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} does not use the {n} available devices")
    return Mesh(np.asarray(devices).reshape(data, fsdp), DATA_AXES)


def fsdp_spec(shape, fsdp_size: int) -> P:
    """Shard the largest dimension the fsdp axis divides; replicate small or indivisible arrays."""
    if fsdp_size <= 1 or not shape:
        return P()
    order = sorted(range(len(shape)), key=lambda i: -shape[i])
    for i in order:
        if shape[i] % fsdp_size == 0 and shape[i] >= fsdp_size:
            spec = [None] * len(shape)
            spec[i] = "fsdp"
            return P(*spec)
    return P()


def tree_shardings(tree, mesh: Mesh):
    size = mesh.shape["fsdp"]
    return jax.tree.map(lambda a: NamedSharding(mesh, fsdp_spec(tuple(a.shape), size)), tree)


def batch_sharding(mesh: Mesh, ndim: int = 1):
    return NamedSharding(mesh, P(DATA_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh):
    return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in DATA_AXES)


def shard_batch(batch: Mapping, mesh: Mesh) -> dict:
    """Host-local numpy batch -> global arrays split over the data axes (works on one or many processes)."""
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
    return out


def abstract_with_sharding(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)
