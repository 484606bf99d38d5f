"""Official key names of `Wan2.1_VAE.pth` (`WanVAE_.state_dict()`, 194 tensors) -> `models.vae.WanVAE`.

The official encoder/decoder keep their blocks in `nn.Sequential`s (`downsamples`, `middle`, `upsamples`) whose
indices we keep; inside a block the Sequential positions become names: `residual.0` -> `norm1`, `residual.2` ->
`conv1`, `residual.3` -> `norm2`, `residual.6` -> `conv2`, `resample.1` -> `resample` (position 0 is the parameterless
upsample or zero pad), `head.0` -> `head_norm`, `head.2` -> `head_conv`. RMS_norm gains lose their broadcast axes,
1x1 Conv2d kernels of the attention block stay [1, 1, C_in, C_out].
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from liveavatar_jax.models.vae import VAEConfig, WanVAE
from liveavatar_jax.weights.keymap import CONV2D, CONV3D, IDENTITY, Rule, fill_model, flat_paths
from liveavatar_jax.weights.pth import open_weights


def GAIN(w):
    """RMS_norm gamma [C, 1, 1, 1] (or [C, 1, 1] for images) -> [C]."""
    return np.reshape(w, w.shape[:1])


def _conv3d(source: str, target: str) -> tuple[Rule, Rule]:
    return Rule(f"{source}.weight", f"{target}.kernel", CONV3D), Rule(f"{source}.bias", f"{target}.bias", IDENTITY)


def _conv2d(source: str, target: str) -> tuple[Rule, Rule]:
    return Rule(f"{source}.weight", f"{target}.kernel", CONV2D), Rule(f"{source}.bias", f"{target}.bias", IDENTITY)


def _block_rules(prefix: str) -> list[Rule]:
    """Residual, attention and resample blocks of one official Sequential, e.g. `decoder.upsamples.{i}`."""
    return [
        Rule(f"{prefix}.residual.0.gamma", f"{prefix}.norm1.scale", GAIN),
        *_conv3d(f"{prefix}.residual.2", f"{prefix}.conv1"),
        Rule(f"{prefix}.residual.3.gamma", f"{prefix}.norm2.scale", GAIN),
        *_conv3d(f"{prefix}.residual.6", f"{prefix}.conv2"),
        *_conv3d(f"{prefix}.shortcut", f"{prefix}.shortcut"),
        Rule(f"{prefix}.norm.gamma", f"{prefix}.norm.scale", GAIN),
        *_conv2d(f"{prefix}.to_qkv", f"{prefix}.to_qkv"),
        *_conv2d(f"{prefix}.proj", f"{prefix}.proj"),
        *_conv2d(f"{prefix}.resample.1", f"{prefix}.resample"),
        *_conv3d(f"{prefix}.time_conv", f"{prefix}.time_conv"),
    ]


def _coder_rules(part: str, blocks: str) -> list[Rule]:
    return [
        *_conv3d(f"{part}.conv1", f"{part}.conv1"),
        *_block_rules(f"{part}.{blocks}.{{i}}"),
        *_block_rules(f"{part}.middle.{{i}}"),
        Rule(f"{part}.head.0.gamma", f"{part}.head_norm.scale", GAIN),
        *_conv3d(f"{part}.head.2", f"{part}.head_conv"),
    ]


VAE_RULES = (
    *_conv3d("conv1", "conv1"),
    *_conv3d("conv2", "conv2"),
    *_coder_rules("encoder", "downsamples"),
    *_coder_rules("decoder", "upsamples"),
)


def abstract_vae(config: VAEConfig, dtype=jnp.float32) -> WanVAE:
    """The VAE with shape-only parameters (nothing allocated)."""
    return nnx.eval_shape(lambda: WanVAE(config, dtype=dtype, rngs=nnx.Rngs(0)))


# safetensors metadata keys of a VAE trained here (`save_vae`): its own latent statistics, JSON lists of z_dim floats.
STATS_METADATA = ("latents_mean", "latents_std")


def latent_stats(path: str | os.PathLike) -> dict[str, tuple[float, ...]]:
    """The latent statistics stored in a safetensors VAE's metadata ({} for the official files, which have none)."""
    from liveavatar_jax.weights.checkpoint import CheckpointError, read_safetensors_header

    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    meta = read_safetensors_header(path).get("__metadata__") or {}
    out = {}
    for key in STATS_METADATA:
        if key in meta:
            try:
                out[key] = tuple(float(v) for v in json.loads(meta[key]))
            except (ValueError, TypeError) as e:
                raise CheckpointError(f"{path}: metadata {key!r} is not a JSON list of numbers ({e})") from None
    return out


def load_vae(path: str | os.PathLike, config: VAEConfig, dtype=jnp.float32) -> WanVAE:
    """The VAE with the weights of `path`: the official `Wan2.1_VAE.pth` (read without torch) or a safetensors file.

    Latent statistics stored in the file (`save_vae`) replace the config's, so a VAE trained here normalises its
    latents with its own figures; the official files carry none and keep the config's (the Wan constants).
    Strict: a missing, unexpected or mis-shaped tensor raises `CheckpointError` naming the file.
    """
    stats = latent_stats(path)
    if stats:
        try:
            config = dataclasses.replace(config, **stats)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    ckpt = open_weights(path)
    try:
        return fill_model(abstract_vae(config, dtype), ckpt, VAE_RULES, dtype=dtype)
    finally:
        if hasattr(ckpt, "close"):
            ckpt.close()


# Our layout -> the official one: the inverse of each transform in VAE_RULES.
_TO_OFFICIAL = {CONV3D: lambda w: w.transpose(4, 3, 0, 1, 2), CONV2D: lambda w: w.transpose(3, 2, 0, 1),
                IDENTITY: lambda w: w}


def official_state_dict(model: WanVAE) -> dict[str, np.ndarray]:
    """{official key: numpy array in the official layout} of `model`: `VAE_RULES` read backwards, so that
    `load_vae` of the result gives back the same parameters."""
    params = nnx.state(model, nnx.Param)
    out = {}
    for path, value in flat_paths(params).items():
        rule = next(r for r in VAE_RULES if r.match_target(path) is not None)
        key = rule.source.format(**rule.match_target(path))
        w = np.asarray(value)
        if rule.transform is GAIN:
            # RMS_norm(images=True) in the attention blocks broadcasts over [C, 1, 1], the others over [C, 1, 1, 1]
            w = w.reshape(w.shape + ((1, 1) if key.endswith(".norm.gamma") else (1, 1, 1)))
        else:
            w = _TO_OFFICIAL[rule.transform](w)
        out[key] = np.ascontiguousarray(w)
    return out


def save_vae(model: WanVAE, path: str | os.PathLike, dtype=np.float16) -> Path:
    """Writes `model` as a safetensors file under the official key names, in `dtype` (`load_vae` casts back), with
    its latent statistics in the metadata."""
    from safetensors.numpy import save_file

    path = Path(path)
    tensors = {k: v.astype(dtype) for k, v in official_state_dict(model).items()}
    meta = {"format": "pt", "latents_mean": json.dumps([float(v) for v in model.config.latents_mean]),
            "latents_std": json.dumps([float(v) for v in model.config.latents_std])}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path
