"""Long streams for the tiny world's VAE: an export trained on, with the encoder's and decoder's caches carried from
step to step (truncated backpropagation), so that training meets the cache states of a whole clip. This was the
recipe's second phase until the VAE was trained images-first on windows whose frame 0 comes from another clip
(configs/tinyworld_vae.py); measured in docs/tinyworld.md (VAE): it removed the decay past the window (frames 100+
10 -> 16 dB) but not the colour drift, and it takes a window VAE's colours away (background 1.3 -> 15.5). Kept for
those measurements and as a fine-tuning phase; the recipe no longer runs it.

python -m train.vae --config configs/tinyworld_vae_streams.py --workdir TW/vae_streams --config.data.path=TW/clips \
    --config.init_from=TW/vae/vae.safetensors
"""

from configs import tinyworld_vae


def get_config():
    c = tinyworld_vae.get_config()
    c.total_steps = 500
    c.log_every = 25
    # 4 streams of frame 0 + 24 chunks (97 frames, as `train.preprocess` encodes), 2 chunks a step: 12 steps a stream
    c.data.update(batch_size=4, stream_chunks=24, chunks_per_step=2, max_clips=48, colour_augment=0.0,
                  cut_first_frame=0.0)
    c.time_init = "keep"    # continue the export as it is
    c.optimizer.lr = 1e-3
    c.optimizer.final_lr_fraction = 0.1
    c.optimizer.decay_steps = 0
    return c
