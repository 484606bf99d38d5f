"""The streaming Wan VAE decoder as the stream engine sees it: pure functions of (VAE parameters, cache, latents).

As in the official TPP pipeline, the decoder cache is primed once with the first `prime_latents` motion latents
(the static reference; output discarded), after which every block of 3 latents decodes to 12 frames. Frames leave
as uint8 [B, 4F, H, W, 3] so that only bytes cross to the host.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from liveavatar_jax.models.vae import VAE, init_decode_cache


def to_uint8(video):
    """[-1, 1] -> uint8, rounding like (x + 1) * 127.5."""
    return jnp.clip(jnp.round((video.astype(jnp.float32) + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


class VAEStreamDecoder:
    def __init__(self, vae: VAE, prime_latents: int = 7):
        self.graphdef, self.params = vae.graphdef, vae.state
        self.config, self.dtype = vae.config, vae.dtype
        self.prime_latents = prime_latents

    def _model(self, params):
        return nnx.merge(self.graphdef, params)

    def init(self, params, latents_shape) -> dict:
        """The empty per-conv feature cache (a pytree of [B, 2, h, w, C] arrays)."""
        b, _, _, h, w = latents_shape
        return init_decode_cache(self.config, b, h, w, self.dtype).feats

    def prime(self, params, feats: dict, motion_latents) -> dict:
        """motion_latents [B, 16, T, h, w]: the first `prime_latents` start the stream (output discarded)."""
        model = self._model(params)
        z = jnp.moveaxis(motion_latents[:, :, : self.prime_latents], 1, -1)
        _, feats = model.decode_first_latent(z[:, :1], feats)
        if z.shape[1] > 1:
            _, feats = model.decode_latents(z[:, 1:], feats)
        return feats

    def decode(self, params, feats: dict, latents):
        """latents [B, 16, F, h, w] continuing the primed stream -> (uint8 frames [B, 4F, 8h, 8w, 3], feats)."""
        video, feats = self._model(params).decode_latents(jnp.moveaxis(latents, 1, -1), feats)
        return to_uint8(jnp.clip(video.astype(jnp.float32), -1.0, 1.0)), feats
