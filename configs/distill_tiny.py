"""Stage 2 (Self-Forcing DMD with History Corrupt) on the tiny DiT of the dit_s2v_causal fixture.

python -m train.distill --config configs/distill_tiny.py --workdir /tmp/dmd --config.data.path=DATASET
"""

from liveavatar_jax.distill import config as defaults


def get_config():
    c = defaults.distill(defaults.model_tiny(), blocks=3, height=8, width=16)
    c.total_steps = 20
    c.checkpoint_every = 5
    c.lora.rank = 8
    c.lora.alpha = 4.0
    c.data.batch_size = 2
    c.distill.rollout.ring_blocks = 2    # the ring wraps inside the 3-block clip, as in long streams
    c.distill.generator_optimizer.lr = 1e-3
    c.distill.critic_optimizer.lr = 1e-3
    c.mesh.fsdp = 1
    return c
