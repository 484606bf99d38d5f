"""Stage 1 (diffusion forcing) on the tiny DiT of the dit_s2v_causal fixture: seconds per step on a laptop CPU.

python -m train.pretrain --config configs/pretrain_tiny.py --workdir /tmp/pre --config.data.path=DATASET
"""

from liveavatar_jax.distill import config as defaults


def get_config():
    c = defaults.pretrain(defaults.model_tiny(), frames=6, height=8, width=16)   # 2 blocks of 3 latent frames
    c.total_steps = 20
    c.checkpoint_every = 5
    c.lora.rank = 8
    c.lora.alpha = 4.0                  # alpha / rank = 0.5 as in LiveAvatar's 128 / 64
    c.data.batch_size = 2
    c.optimizer.lr = 1e-3
    c.mesh.fsdp = 1                     # one device; --config.mesh.fsdp=-1 shards over all devices
    return c
