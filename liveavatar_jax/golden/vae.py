"""Golden kind `vae`: Wan2.1 VAE encode, decode (raw and clamped), and the streaming decode chunk by chunk.

The manifest gives the constructor kwargs, the latent normalisation constants and the chunking of the streaming
call; the stream is decoded call by call from one empty cache, and `full_decode_reference` is one decode of all
its latents.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from liveavatar_jax.models import vae as vae_lib
from liveavatar_jax.models.vae import VAEConfig
from liveavatar_jax.weights.vae_keys import load_vae


def _stream_call(manifest) -> dict:
    for call in manifest["calls_in_order"]:
        if call["name"] == "stream_decode":
            return call
    raise KeyError("the manifest has no stream_decode call")


def config_from_manifest(manifest: dict) -> VAEConfig:
    """The constructor kwargs, with the manifest's latent statistics when it records them."""
    config = VAEConfig.from_kwargs(manifest["constructor_kwargs"])
    stats = manifest.get("latent_normalization")
    if stats:
        config = dataclasses.replace(config, latents_mean=tuple(stats["mean"]), latents_std=tuple(stats["std"]))
    return config


def run(fixture) -> dict[str, np.ndarray]:
    manifest = fixture.manifest
    config = config_from_manifest(manifest)
    vae = vae_lib.VAE(load_vae(fixture.weights_path, config, dtype=jnp.float32))
    inputs = fixture.inputs
    out: dict[str, np.ndarray] = {
        "latents_mean": np.asarray(config.latents_mean, np.float32),
        "latents_std": np.asarray(config.latents_std, np.float32),
        "encode.latents": np.asarray(vae.encode(inputs["encode.video"])),
    }
    raw = np.asarray(vae.decode(inputs["decode.latents"], clamp=False))
    out["decode.video_raw"] = raw
    out["decode.video_clamped"] = np.clip(raw, -1.0, 1.0)

    latents = inputs["stream_decode.latents"]
    chunks = _stream_call(manifest)["chunks_latent_frames"]
    if sum(chunks) != latents.shape[1]:
        raise ValueError(f"stream_decode chunks {chunks} do not cover the {latents.shape[1]} latent frames")
    cache = vae.init_decode_cache(1, *latents.shape[2:])
    start = 0
    for i, n in enumerate(chunks):
        video, cache = vae.stream_decode(latents[:, start:start + n], cache)
        out[f"stream_decode.chunk{i}.video"] = np.asarray(video)
        start += n
    out["stream_decode.full_decode_reference"] = np.asarray(vae.decode(latents))
    return out
