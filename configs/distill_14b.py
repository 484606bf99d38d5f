"""Stage 2 (Self-Forcing DMD with History Corrupt) on Wan2.2-S2V-14B: student from Stage 1, frozen teacher and a LoRA
critic on one shared base, 7-block rollouts with a 4-block ring, blockwise exit-step gradients, bf16, FSDP.

python -m train.distill --config configs/distill_14b.py --workdir gs://.../stage2 \
    --config.model.checkpoint=/ckpt/Wan2.2-S2V-14B --config.data.path=/data/avspeech_train \
    --config.distill.init_student=gs://.../stage1
"""

from liveavatar_jax.distill import config as defaults


def get_config():
    c = defaults.distill(defaults.model_14b(), blocks=7, height=88, width=48)
    c.total_steps = 500                 # paper
    c.checkpoint_every = 50
    c.data.batch_size = 8
    c.data.worker_count = 2
    c.remat = "nothing_saveable"
    c.attention_impl = "cudnn"
    c.ema.start_step = 200              # Self-Forcing's EMA start
    c.compilation_cache = "/tmp/liveavatar_jax_xla_cache"
    return c
