"""Default ml-collections configs of both training stages; `configs/*.py` start from these and override.

Every hyper-parameter of a run lives here (and in the checkpoint's saved copy). Values follow training.md: Stage 1
from the released `s2v_causal_sft.yaml` and the paper (LoRA lr 5e-5, drop_audio 0.15, motion frames noised with
t ~ U[0, 1000], shift-5 training grid); Stage 2 from the paper and the Self-Forcing / LongLive lineage (student lr
1e-5, critic lr 2e-6, AdamW betas (0, 0.999), clip 10, generator every 5th iteration, DMD time shift 5 clamped to
[20, 980], guidance 3 in the Self-Forcing convention, inference step list 1000 / 857.7 / 602.2 / 8.9 with Euler
updates, no clean refresh pass).
"""

from __future__ import annotations

import ml_collections

from liveavatar_jax.distill.lora import DEFAULT_TARGETS


def model_14b() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, text_dim=4096, text_len=512, audio_dim=1024,
        audio_layers=25, audio_inject_layers=(0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39), dtype="bfloat16",
        checkpoint="", checkpoint_item="ema", init_seed=0))


def model_tiny() -> ml_collections.ConfigDict:
    """The DiT of the dit_s2v_causal fixture: dim 64, 2 heads, 2 layers, float32."""
    return ml_collections.ConfigDict(dict(
        dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32, text_len=32, audio_dim=32, audio_layers=25,
        audio_inject_layers=(0, 1), dtype="float32", checkpoint="", checkpoint_item="ema", init_seed=0))


def model_from(model: dict, dtype: str = "float32") -> ml_collections.ConfigDict:
    """A training `model` entry for the DiT of an inference config's `model` dict (e.g. configs/tiny.py), so the
    trained weights have exactly the shapes `infer.stream` builds."""
    return ml_collections.ConfigDict(dict(model, dtype=dtype, checkpoint="", checkpoint_item="ema", init_seed=0))


def spec_for(model: ml_collections.ConfigDict, frames: int, height: int, width: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        channels=16, frames=frames, height=height, width=width, motion_frames=19, audio_layers=model.audio_layers,
        audio_dim=model.audio_dim, text_dim=model.text_dim, text_len=model.text_len))


def optimizer(lr: float, b1: float, b2: float = 0.999, weight_decay: float = 0.0, clip_norm: float = 10.0,
              accumulate: int = 1) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(lr=lr, b1=b1, b2=b2, eps=1e-8, weight_decay=weight_decay,
                                          clip_norm=clip_norm, accumulate=accumulate, mu_dtype="",
                                          # < 1: a cosine from lr to this fraction of it over decay_steps (0: the run)
                                          final_lr_fraction=1.0, decay_steps=0))


def common(stage: str, model: ml_collections.ConfigDict, frames: int, height: int, width: int):
    c = ml_collections.ConfigDict()
    c.stage = stage
    c.seed = 0
    c.total_steps = 100
    c.checkpoint_every = 50
    c.keep_checkpoints = 3
    c.async_checkpointing = True
    c.log_every = 1
    c.tensorboard = True
    c.export_lora = True               # write the trained weights at the end (PEFT adapters or official DiT file)
    # "lora": adapters on the frozen base (LiveAvatar at 14B); "full": every DiT parameter (trained from scratch)
    c.train_params = "lora"
    c.compilation_cache = ""           # a folder for XLA's persistent compilation cache (restarts skip compiles)
    c.attention_impl = "xla"           # "cudnn": fused flash attention on GPU (needed at 14B sequence lengths)
    c.remat = "none"                   # per-layer rematerialisation: see dit.REMAT_POLICIES
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1))
    c.model = model
    c.lora = ml_collections.ConfigDict(dict(rank=128, alpha=64.0, targets=DEFAULT_TARGETS, dtype="float32"))
    c.data = ml_collections.ConfigDict(dict(
        path="", batch_size=1, shuffle_seed=0, worker_count=0, on_bad_example="skip",
        spec=spec_for(model, frames, height, width)))
    c.ema = ml_collections.ConfigDict(dict(decay=0.99, start_step=0))
    return c


def pretrain(model, frames: int, height: int, width: int) -> ml_collections.ConfigDict:
    c = common("pretrain", model, frames, height, width)
    c.pretrain = ml_collections.ConfigDict(dict(
        causal=True,                   # False: the bidirectional teacher (one level per clip, full attention)
        frames_per_block=3, shift=5.0, motion_noise=True, motion_max_t=1000.0, drop_audio=0.15, drop_text=0.0,
        rope_offset_max=0, rolling_sink=True, relative_dist=(4, 30)))
    c.optimizer = optimizer(5e-5, b1=0.9, weight_decay=0.01, clip_norm=1.0)
    return c


def distill(model, blocks: int, height: int, width: int) -> ml_collections.ConfigDict:
    c = common("distill", model, 3 * blocks, height, width)
    c.distill = ml_collections.ConfigDict()
    d = c.distill
    d.generator_every = 5
    d.motion = "static"                # FramePack input: the reference repeated (as at inference) or "clip" frames
    d.init_student = ""                # Stage-1 workdir / checkpoints folder, or a PEFT LoRA (full: DiT) file
    d.init_student_item = "ema"        # which Stage-1 item seeds the student: "ema" or "lora"
    d.rollout = ml_collections.ConfigDict(dict(
        num_blocks=blocks, frames_per_block=3, ring_blocks=4, steps=4, shift=3.0, update="euler", cache="per_step",
        rolling_sink=True, relative_dist=(4, 30)))
    d.dmd = ml_collections.ConfigDict(dict(guidance=3.0, timestep_shift=5.0, min_t=20.0, max_t=980.0,
                                           gradient="blockwise", null_text="negative",
                                           guidance_rule="plain", guidance_interval=(0.0, 1000.0)))
    # weight > 0: the generator's gradient adds weight x Stage 1's flow-matching gradient on the batch's real clip
    # (steps.anchored_grads), with this noise-level shift, motion scaffold and audio dropout
    d.anchor = ml_collections.ConfigDict(dict(weight=0.0, shift=5.0, motion_noise=True, drop_audio=0.15))
    d.generator_optimizer = optimizer(1e-5, b1=0.0, weight_decay=0.0, clip_norm=10.0)
    d.critic_optimizer = optimizer(2e-6, b1=0.0, weight_decay=0.0, clip_norm=10.0)
    return c
