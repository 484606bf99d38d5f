"""Golden kind `t5`: the umT5 encoder on (ids, mask), full output and the official trimmed context."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from liveavatar_jax.models.umt5 import UMT5Config, trim_to_mask
from liveavatar_jax.weights.umt5_keys import load_umt5


def run(fixture) -> dict[str, np.ndarray]:
    config = UMT5Config.from_kwargs(fixture.manifest["constructor_kwargs"])
    model = load_umt5(fixture.weights_path, config, dtype=jnp.float32)
    ids = np.asarray(fixture.inputs["ids"])
    mask = np.asarray(fixture.inputs["mask"])
    graphdef, state = nnx.split(model)
    encode = jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state)(ids, mask))
    out = np.asarray(encode(state, ids.astype(np.int32), mask.astype(np.int32)))
    return {"encoder_out": out, "context_trimmed": np.asarray(trim_to_mask(out, mask)[0])}
