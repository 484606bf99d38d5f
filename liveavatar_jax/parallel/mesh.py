"""Device meshes for timestep-forcing pipeline parallelism, and every sharding rule in one place.

The mesh has two axes:
  * `pipeline` (size = denoising steps S): stage i runs denoising step i and owns step i's KV ring and its own copy
    of the sink cache. Everything a stage holds is stacked on a leading step axis and sharded `P("pipeline")`.
  * `tensor` (size 1 unless configured): the DiT weights can additionally be split over it (Megatron-style column /
    row splits of the attention and FFN matmuls, heads of the KV ring). Inside the pipeline's `shard_map` only
    `pipeline` is manual, so XLA's partitioner inserts the `tensor` collectives; the rules below only choose the
    layout, never the maths.

Rules are (regex over the dotted parameter path, PartitionSpec) pairs, first match wins; a rule that names an axis of
size 1, or a dimension the axis does not divide, degrades to replication of that dimension.
"""

from __future__ import annotations

import re

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

PIPELINE = "pipeline"
TENSOR = "tensor"

# DiT parameters are stacked over layers (leading axis), so a kernel is [layers, in, out] and a bias [layers, out].
# The audio injectors are stacked the same way ([injectors, in, out]).
PARAM_RULES: tuple[tuple[str, P], ...] = (
    (r"^(blocks\.(self_attn|cross_attn)|audio_injectors\.attn)\.(q|k|v)\.kernel$", P(None, None, TENSOR)),
    (r"^(blocks\.(self_attn|cross_attn)|audio_injectors\.attn)\.(q|k|v)\.bias$", P(None, TENSOR)),
    (r"^(blocks\.(self_attn|cross_attn)|audio_injectors\.attn)\.o\.kernel$", P(None, TENSOR, None)),
    (r"^blocks\.ffn_in\.kernel$", P(None, None, TENSOR)),
    (r"^blocks\.ffn_in\.bias$", P(None, TENSOR)),
    (r"^blocks\.ffn_out\.kernel$", P(None, TENSOR, None)),
    (r".*", P()),
)

# Per-stage state, stacked [S, ...]. KV caches are [S, layers, B, tokens, heads, head_dim]: heads split over tensor.
RING_SPEC = P(PIPELINE, None, None, None, TENSOR, None)
SINK_SPEC = RING_SPEC
STAGE_SPEC = P(PIPELINE)        # anything else a stage holds (in-flight latents, audio, block index)
REPLICATED = P()


def make_tpp_mesh(steps: int, *, tensor: int = 1, devices=None) -> Mesh:
    """A (pipeline=steps, tensor) mesh over the first steps*tensor devices (default: all processes' devices, in
    process order, so neighbouring stages share a host whenever possible)."""
    devices = list(_process_ordered(jax.devices()) if devices is None else devices)
    need = steps * tensor
    if steps < 1 or tensor < 1:
        raise ValueError(f"mesh sizes must be positive, got pipeline={steps} tensor={tensor}")
    if len(devices) < need:
        raise ValueError(f"a pipeline of {steps} stages x tensor {tensor} needs {need} devices, "
                         f"only {len(devices)} available")
    grid = np.asarray(devices[:need], dtype=object).reshape(steps, tensor)
    # Auto axes: the tensor axis is left to the partitioner inside the pipeline's shard_map.
    return Mesh(grid, (PIPELINE, TENSOR), axis_types=(AxisType.Auto, AxisType.Auto))


def _process_ordered(devices):
    return sorted(devices, key=lambda d: (d.process_index, d.id))


def fit_spec(spec: P, shape, mesh: Mesh) -> P:
    """`spec` with every axis dropped that is absent from `mesh`, of size 1, or does not divide its dimension."""
    sizes = dict(mesh.shape)
    out = []
    for i, axis in enumerate(tuple(spec)[: len(shape)]):
        names = axis if isinstance(axis, tuple) else (axis,) if axis is not None else ()
        kept = tuple(n for n in names if sizes.get(n, 1) > 1)
        total = int(np.prod([sizes[n] for n in kept])) if kept else 1
        if not kept or shape[i] % total:
            out.append(None)
        else:
            out.append(kept if len(kept) > 1 else kept[0])
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def param_spec(path: str, shape, mesh: Mesh, rules=PARAM_RULES) -> P:
    for pattern, spec in rules:
        if re.search(pattern, path):
            return fit_spec(spec, shape, mesh)
    return P()


def _path_str(path) -> str:
    """'blocks.self_attn.q.kernel' for a pytree path into an NNX state (the Variable's own `.value` is dropped)."""
    parts = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    if parts and parts[-1] == "value":
        parts.pop()
    return ".".join(parts)


def param_shardings(params, mesh: Mesh, rules=PARAM_RULES):
    """NamedShardings for an NNX state (or any pytree of arrays) from the rules table."""
    def one(path, leaf):
        return NamedSharding(mesh, param_spec(_path_str(path), np.shape(leaf), mesh, rules))
    return jax.tree_util.tree_map_with_path(one, params)


def put_global(tree, shardings):
    """Places host or single-device arrays onto (possibly multi-process) shardings. Every process must pass the same
    values: a multi-process array is assembled from each process's own copy, nothing is sent between hosts."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def one(x, sharding):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
    return jax.tree.map(one, tree, shardings)


def replicate(tree, mesh: Mesh):
    """Every leaf replicated over the whole mesh (leaves already laid out that way are left alone)."""
    target = NamedSharding(mesh, REPLICATED)

    def one(x):
        if isinstance(x, jax.Array) and x.sharding == target:
            return x
        return put_global(x, target)
    return jax.tree.map(one, tree)


def stage_devices(mesh: Mesh) -> list:
    """The first device of each pipeline stage (stage i's tensor group leader)."""
    return [mesh.devices[i, 0] for i in range(mesh.shape[PIPELINE])]


def spare_device(mesh: Mesh, devices=None):
    """The first device outside `mesh` (the official layout's separate VAE rank), or None."""
    used = {d.id for d in mesh.devices.flat}
    for d in (_process_ordered(jax.devices()) if devices is None else devices):
        if d.id not in used:
            return d
    return None
