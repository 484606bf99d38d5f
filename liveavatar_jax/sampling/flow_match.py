"""The distilled 4-step flow-matching Euler sampler (architecture.md section 4).

The official pipeline builds diffusers' `FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3)` and calls
`set_timesteps(n)`. That computation mixes float32 (the training grid, held in torch tensors) and float64 (numpy's
linspace and the second shift), and the shift ends up applied twice: once to the training grid, whose smallest sigma
becomes the end point of the inference grid, and once to the inference grid itself. `flow_match_schedule` repeats the
same operations in the same precisions, so the arrays it returns are bit-identical to the ones the official sampler
feeds the DiT (timesteps enter the time embedding as floats, never rounded).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np


@dataclass(frozen=True)
class FlowMatchSchedule:
    """`timesteps[i]` is the DiT's time input at step i; step i moves the latent from `sigmas[i]` to `sigmas[i+1]`."""

    timesteps: np.ndarray   # float32 [num_steps]
    sigmas: np.ndarray      # float32 [num_steps + 1], ending with 0

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])


def _shift(sigma, shift):
    return shift * sigma / (1 + (shift - 1) * sigma)


def flow_match_schedule(num_steps: int, shift: float = 3.0, num_train_timesteps: int = 1000) -> FlowMatchSchedule:
    """Timesteps and sigmas of `FlowMatchEulerDiscreteScheduler(num_train_timesteps, shift).set_timesteps(num_steps)`.

    4 steps, shift 3: timesteps [1000, 857.6923, 602.1506, 8.928572], sigmas [1, 0.8576923, 0.60215056, 0.00892857, 0].
    """
    if int(num_steps) < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    n_train = int(num_train_timesteps)
    f32 = np.float32
    # The training grid lives in float32 torch tensors; arithmetic with Python scalars stays float32 there.
    train_t = np.linspace(1, n_train, n_train, dtype=f32)[::-1]
    train_sigmas = _shift(train_t / f32(n_train), f32(shift)).astype(f32)
    sigma_max, sigma_min = float(train_sigmas[0]), float(train_sigmas[-1])
    # set_timesteps works in float64 numpy, then converts to float32 once.
    grid = np.linspace(sigma_max * n_train, sigma_min * n_train, int(num_steps)) / n_train
    sigmas = _shift(grid, float(shift)).astype(f32)
    timesteps = (sigmas * f32(n_train)).astype(f32)
    return FlowMatchSchedule(timesteps=timesteps, sigmas=np.concatenate([sigmas, np.zeros(1, f32)]))


def euler_step(x, v, sigma, sigma_next):
    """One flow-matching Euler update `x + (sigma_next - sigma) * v`, rounded the way the official sampler rounds it.

    diffusers upcasts the sample to float32, but `dt` is a 0-dim float32 tensor, so PyTorch's type promotion makes
    `dt * v` a product in the model output's dtype; the float32 sum is then cast back to that dtype. With a bf16 model
    output this gives `bf16(fp32(x) + bf16(dt * v))`; with float32 it is the plain float32 update. `dt` is the float32
    difference of the float32 sigmas. The result has the dtype of `v`, and is the same eagerly and under jit.
    """
    v = jnp.asarray(v)
    out_dtype = v.dtype
    dt = jnp.asarray(sigma_next, jnp.float32) - jnp.asarray(sigma, jnp.float32)
    step = (dt * v.astype(jnp.float32)).astype(out_dtype)
    # Under jit XLA would contract the product and the sum into one FMA (one rounding instead of PyTorch's two,
    # 1 ulp off in float32); the barrier keeps the product rounded on its own.
    step = jax.lax.optimization_barrier(step)
    return (jnp.asarray(x).astype(jnp.float32) + step.astype(jnp.float32)).astype(out_dtype)
