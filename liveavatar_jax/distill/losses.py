"""Flow-matching and distribution-matching losses (training.md 2, 4, 5.2).

Conventions: `x_sigma = (1 - sigma) x0 + sigma eps`, velocity target `eps - x0`, `t = 1000 sigma`,
`x0 = x_sigma - sigma v`. Everything here is float32 and pure.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def shift_sigma(sigma, shift: float):
    """The flow-matching time shift `k s / (1 + (k - 1) s)`."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def add_noise(x0, noise, sigma):
    """`(1 - sigma) x0 + sigma noise` in float32; `sigma` must already broadcast against x0 (see `per_sample`)."""
    sigma = jnp.asarray(sigma, jnp.float32)
    return (1.0 - sigma) * x0.astype(jnp.float32) + sigma * noise.astype(jnp.float32)


def per_sample(sigma, ndim: int):
    """[B] -> [B, 1, ..., 1] with `ndim` axes."""
    return jnp.reshape(sigma, (-1,) + (1,) * (ndim - 1))


def per_frame(sigma_frames):
    """[B, F] -> [B, 1, F, 1, 1] for latents [B, C, F, h, w]."""
    return sigma_frames[:, None, :, None, None]


def training_grid_sigma(key, shape, shift: float, num_train_timesteps: int = 1000):
    """sigma drawn uniformly from the shifted 1000-point training grid `shift(1 - i / 1000)`, i = 0..999
    (Self-Forcing / LiveAvatar `FlowMatchScheduler(shift, sigma_min=0, extra_one_step=True)`)."""
    i = jax.random.randint(key, shape, 0, num_train_timesteps)
    return shift_sigma(1.0 - i.astype(jnp.float32) / num_train_timesteps, shift)


def block_sigmas(key, batch: int, num_blocks: int, frames_per_block: int, shift: float):
    """Diffusion forcing: an independent noise level per block, shared by the block's frames -> [B, F]."""
    s = training_grid_sigma(key, (batch, num_blocks), shift)
    return jnp.repeat(s, frames_per_block, axis=1)


def dmd_timestep(key, batch: int, shift: float, min_t: float, max_t: float, num_train_timesteps: int = 1000):
    """The score-evaluation time of DMD and the critic: integer uniform in [0, 1000), shifted, then clamped to
    [min_t, max_t] (in that order). Returns t [B] float32 (sigma = t / 1000)."""
    u = jax.random.randint(key, (batch,), 0, num_train_timesteps).astype(jnp.float32) / num_train_timesteps
    return jnp.clip(num_train_timesteps * shift_sigma(u, shift), min_t, max_t)


def flow_matching_loss(v_pred, noise, x0, weights=None):
    """mean ||v - (eps - x0)||^2 (optionally weighted per element, broadcasting)."""
    err = jnp.square(v_pred.astype(jnp.float32) - (noise.astype(jnp.float32) - x0.astype(jnp.float32)))
    if weights is None:
        return jnp.mean(err)
    weights = jnp.broadcast_to(weights, err.shape)
    return jnp.sum(err * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def x0_from_velocity(x_t, v, sigma):
    return x_t.astype(jnp.float32) - sigma * v.astype(jnp.float32)


GUIDANCE_RULES = ("plain", "orthogonal", "high_pass")


def _box_blur(x, size: int = 3):
    """Mean over each `size` x `size` spatial neighbourhood (the last two axes) that lies inside the frame."""
    window = (1,) * (x.ndim - 2) + (size, size)
    sums = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, (1,) * x.ndim, "SAME")
    counts = jax.lax.reduce_window(jnp.ones(x.shape[-2:], x.dtype), 0.0, jax.lax.add, (size, size), (1, 1), "SAME")
    return sums / counts


def cfg_x0(x0_cond, x0_uncond, guidance, rule: str = "plain"):
    """Self-Forcing convention `c + g (c - u)` (Wan convention scale 1 + g), on [B, C, F, H, W]; `guidance` a
    scalar or one per sample, broadcasting.

    The other rules keep only part of `c - u`, for a null branch whose difference carries the colours too (a text
    the teacher never trained with): "orthogonal" the part orthogonal to `c` in each frame (adaptive projected
    guidance, Sadat et al. 2024, with eta 0: the parallel part is what over-saturates); "high_pass" what differs
    from its 3x3 spatial neighbourhood mean (a region's colour is guided less, a latent cell's detail, such as the
    tiny world's mouth, keeps 8/9 of its guidance).
    """
    delta = x0_cond - x0_uncond
    if rule == "orthogonal":
        along = jnp.sum(delta * x0_cond, axis=(1, -2, -1), keepdims=True)
        along = along / jnp.maximum(jnp.sum(x0_cond * x0_cond, axis=(1, -2, -1), keepdims=True), 1e-12)
        delta = delta - along * x0_cond
    elif rule == "high_pass":
        delta = delta - _box_blur(delta)
    elif rule != "plain":
        raise ValueError(f"unknown guidance rule {rule!r} ({', '.join(GUIDANCE_RULES)})")
    return x0_cond + guidance * delta


def dmd_direction(x, x0_fake, x0_real):
    """DMD gradient `(x0_fake - x0_real) / mean_{C,F,h,w} |x - x0_real|` per sample, NaN-free."""
    x = x.astype(jnp.float32)
    axes = tuple(range(1, x.ndim))
    norm = jnp.mean(jnp.abs(x - x0_real), axis=axes, keepdims=True)
    return jnp.nan_to_num((x0_fake - x0_real) / norm)


def dmd_surrogate(x, direction):
    """`1/2 mean (x - sg(x - grad))^2`: its gradient with respect to x is `grad / numel`."""
    x = x.astype(jnp.float32)
    target = jax.lax.stop_gradient(x - direction)
    return 0.5 * jnp.mean(jnp.square(x - target))
