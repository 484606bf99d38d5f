"""The tiny world's VAE, phase 1 of 2: the Wan2.1 causal VAE at width 4 trained from random weights on single frames
(images, through the first-frame paths), which learn the colours quickly and without borrowing them from another
frame. Phase 2 (configs/tinyworld_vae.py) inflates it in time (`time_init = "inflated"`) and trains on 9-frame
windows. Measured in docs/tinyworld.md (VAE, "Images first").

python -m liveavatar_jax.tinyworld clips --count 192 --seconds 8 --out TW/clips
python -m train.vae --config configs/tinyworld_vae_images.py --workdir TW/vae_images --config.data.path=TW/clips
python -m train.vae --config configs/tinyworld_vae.py --workdir TW/vae --config.data.path=TW/clips \
    --config.init_from=TW/vae_images/vae.safetensors
"""

from configs import tinyworld_vae


def get_config():
    c = tinyworld_vae.get_config()
    c.init_from = ""
    c.time_init = "keep"
    c.total_steps = 2000
    # stream_chunks 0: every step a batch of single frames; 8 images cost ~0.2 s a step on 2 cores
    c.data.update(frames=1, stream_chunks=0, chunks_per_step=1, batch_size=8, cut_first_frame=0.0)
    c.optimizer.lr = 3e-3
    c.optimizer.final_lr_fraction = 0.05
    return c
