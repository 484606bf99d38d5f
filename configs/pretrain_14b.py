"""Stage 1 (diffusion forcing with the motion-frame scaffold) on Wan2.2-S2V-14B: LoRA r128/a64, 21 latent frames
(7 blocks) at 704x384, bf16, FSDP over every device, per-layer remat, cuDNN flash attention.

python -m train.pretrain --config configs/pretrain_14b.py --workdir gs://.../stage1 \
    --config.model.checkpoint=/ckpt/Wan2.2-S2V-14B --config.data.path=/data/avspeech_train
"""

from liveavatar_jax.distill import config as defaults


def get_config():
    c = defaults.pretrain(defaults.model_14b(), frames=21, height=88, width=48)
    c.total_steps = 25_000              # paper (the released config says 100K)
    c.checkpoint_every = 500
    c.data.batch_size = 8               # one per device on an 8-GPU host; raise with hosts
    c.data.worker_count = 4
    c.remat = "nothing_saveable"
    c.attention_impl = "cudnn"
    c.optimizer.mu_dtype = "bfloat16"
    c.compilation_cache = "/tmp/liveavatar_jax_xla_cache"
    return c
