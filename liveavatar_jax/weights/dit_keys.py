"""Official Wan2.2-S2V / LiveAvatar DiT state-dict names -> `CausalS2VDiT` parameters, and the loader.

Per-layer tensors (`blocks.{i}.*`, `audio_injector.*.{j}.*`) land in parameters stacked on a leading layer axis.
"""

from __future__ import annotations

import jax.numpy as jnp

from liveavatar_jax.models.dit import CausalS2VDiT, DiTConfig, abstract_model
from liveavatar_jax.weights import keymap
from liveavatar_jax.weights.checkpoint import open_checkpoint
from liveavatar_jax.weights.keymap import CONV1D, CONV3D, IDENTITY, LINEAR, Rule


def _flatten(w):
    return w.reshape(-1)


def _drop_leading(w):
    return w[0]


def _linear(src: str, dst: str, stack: str | None = None) -> list[Rule]:
    return [Rule(f"{src}.weight", f"{dst}.kernel", LINEAR, stack), Rule(f"{src}.bias", f"{dst}.bias", IDENTITY, stack)]


def _conv(src: str, dst: str, transform) -> list[Rule]:
    return [Rule(f"{src}.weight", f"{dst}.kernel", transform), Rule(f"{src}.bias", f"{dst}.bias")]


def _attention(src: str, dst: str, stack: str) -> list[Rule]:
    rules = [r for name in "qkvo" for r in _linear(f"{src}.{name}", f"{dst}.{name}", stack)]
    return rules + [Rule(f"{src}.norm_q.weight", f"{dst}.norm_q", IDENTITY, stack),
                    Rule(f"{src}.norm_k.weight", f"{dst}.norm_k", IDENTITY, stack)]


RULES: tuple[Rule, ...] = tuple([
    *_conv("patch_embedding", "patch_embedding", CONV3D),
    *_conv("cond_encoder", "cond_encoder", CONV3D),
    Rule("trainable_cond_mask.weight", "trainable_cond_mask"),
    *_linear("text_embedding.0", "text_in"),
    *_linear("text_embedding.2", "text_out"),
    *_linear("time_embedding.0", "time_in"),
    *_linear("time_embedding.2", "time_out"),
    *_linear("time_projection.1", "time_projection"),
    Rule("blocks.{i}.modulation", "blocks.modulation", _drop_leading, "i"),
    *_attention("blocks.{i}.self_attn", "blocks.self_attn", "i"),
    Rule("blocks.{i}.norm3.weight", "blocks.norm3_scale", IDENTITY, "i"),
    Rule("blocks.{i}.norm3.bias", "blocks.norm3_bias", IDENTITY, "i"),
    *_attention("blocks.{i}.cross_attn", "blocks.cross_attn", "i"),
    *_linear("blocks.{i}.ffn.0", "blocks.ffn_in", "i"),
    *_linear("blocks.{i}.ffn.2", "blocks.ffn_out", "i"),
    Rule("head.modulation", "head_modulation", _drop_leading),
    *_linear("head.head", "head"),
    Rule("casual_audio_encoder.weights", "audio_encoder.weights", _flatten),
    *_conv("casual_audio_encoder.encoder.conv1_local.conv", "audio_encoder.conv1_local", CONV1D),
    *_conv("casual_audio_encoder.encoder.conv1_global.conv", "audio_encoder.conv1_global", CONV1D),
    *_conv("casual_audio_encoder.encoder.conv2.conv", "audio_encoder.conv2", CONV1D),
    *_conv("casual_audio_encoder.encoder.conv3.conv", "audio_encoder.conv3", CONV1D),
    *_linear("casual_audio_encoder.encoder.final_linear", "audio_encoder.final_linear"),
    Rule("casual_audio_encoder.encoder.padding_tokens", "audio_encoder.padding_tokens", _flatten),
    *_attention("audio_injector.injector.{j}", "audio_injectors.attn", "j"),
    *_linear("audio_injector.injector_adain_layers.{j}.linear", "audio_injectors.adain", "j"),
    *_conv("frame_packer.proj", "frame_packer.proj", CONV3D),
    *_conv("frame_packer.proj_2x", "frame_packer.proj_2x", CONV3D),
    *_conv("frame_packer.proj_4x", "frame_packer.proj_4x", CONV3D),
])

# PEFT targets of the LiveAvatar LoRA (suffix match on module names, as `LoraConfig(target_modules=...)` does).
LORA_TARGET_SUFFIXES = ("q", "k", "v", "o", "ffn.0", "ffn.2")


def load_dit(path, cfg: DiTConfig, *, lora=None, sharding=None) -> CausalS2VDiT:
    """Builds the DiT abstractly and fills it from official safetensors (a file, an index json or a folder).

    `lora`: an optional LiveAvatar LoRA safetensors file merged into its targets on the fly
    (W += alpha/rank * B @ A, in float32, then cast to the model dtype).
    """
    from liveavatar_jax.weights.lora import LoraMergedCheckpoint

    ckpt = open_checkpoint(path)
    if lora is not None:
        ckpt = LoraMergedCheckpoint(ckpt, open_checkpoint(lora))
    return keymap.fill_model(abstract_model(cfg), ckpt, RULES, dtype=jnp.dtype(cfg.dtype), sharding=sharding)
