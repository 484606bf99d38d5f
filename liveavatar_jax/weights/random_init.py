"""Random weights without running any initialiser: fill an abstract model's parameters from numpy.

Building a model eagerly runs one small device op per parameter (and compiles the stacked-layer initialisers),
which costs minutes on a busy CPU; a model built with `nnx.eval_shape` and filled here costs milliseconds. The
values follow the usual fan-in scaling; 1-D gains (norm scales) are ones and biases zeros, so activations stay
in range. Used for the embedded default before trained weights exist, for benchmarks, and in tests.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from liveavatar_jax.weights.keymap import _nest, flat_paths


def _fill(path: str, shape, dtype, rng: np.random.Generator) -> np.ndarray:
    name = path.rsplit(".", 1)[-1]
    if name == "bias" or "bias" in name:
        return np.zeros(shape, dtype)
    if len(shape) == 1 or name in ("scale", "gamma") or "norm" in name:
        return np.ones(shape, dtype)
    fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    return (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(max(fan_in, 1))).astype(dtype)


def randomize(abstract_module, seed: int = 0):
    """A concrete copy of `abstract_module` (from `nnx.eval_shape`) with random parameters and zeroed other state."""
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(abstract_module)
    flat = flat_paths(state)
    values = {path: _fill(path, leaf.shape, np.dtype(leaf.dtype), rng) for path, leaf in flat.items()}
    # Device arrays, not numpy: a jitted call would otherwise copy every numpy leaf to the device on every call.
    nnx.replace_by_pure_dict(state, _nest(jax.device_put(values)))
    return nnx.merge(graphdef, state)
