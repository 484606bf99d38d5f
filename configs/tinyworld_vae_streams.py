"""The tiny world's VAE, phase 2 of 2: configs/tinyworld_vae.py's export trained on long streams, the encoder's and
decoder's caches carried from step to step, so that it meets the cache states of a whole clip (phase 1's windows
never do, and its round trip decays past them: 10 dB after frame 100 against 18 dB on frames 0-8; after this phase
16 dB on both, and sync 0.37 -> 0.81 on unseen clips; docs/tinyworld.md, VAE).

python -m train.vae --config configs/tinyworld_vae_streams.py --workdir TW/vae --config.data.path=TW/clips \
    --config.init_from=TW/vae_windows/vae.safetensors
"""

from configs import tinyworld_vae


def get_config():
    c = tinyworld_vae.get_config()
    c.total_steps = 500
    c.log_every = 25
    # 4 streams of frame 0 + 24 chunks (97 frames, as `train.preprocess` encodes), 2 chunks a step: 12 steps a stream
    c.data.update(batch_size=4, stream_chunks=24, chunks_per_step=2)
    c.optimizer.lr = 1e-3
    c.optimizer.final_lr_fraction = 0.1
    c.optimizer.decay_steps = 0
    return c
