"""The tiny world's VAE: the Wan2.1 causal VAE at width 4, trained from scratch on tiny-world clips (64x64).

python -m liveavatar_jax.tinyworld clips --count 32 --seconds 8 --out TW/clips
python -m train.vae --config configs/tinyworld_vae.py --workdir TW/vae --config.data.path=TW/clips

Writes TW/vae/vae.safetensors (official Wan key names, float16, its latent statistics in the metadata).
The architecture is configs/tiny.py's `vae` section (the embedded default loads this file with it).
"""

import ml_collections

from configs import tiny
from liveavatar_jax.distill import config as defaults


def get_config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.init_from = ""        # an exported vae.safetensors to start from (a second phase), else random weights
    c.total_steps = 600
    c.checkpoint_every = 100
    c.keep_checkpoints = 2
    c.async_checkpointing = True
    c.log_every = 25
    c.tensorboard = False
    c.compilation_cache = ""
    c.attention_impl = "xla"
    c.vae = dict(tiny.get_config().vae)
    # Training on streams: `batch_size` streams of frame 0 + `stream_chunks` 4-frame chunks, `chunks_per_step` chunks
    # a step with the encoder's and decoder's caches carried from step to step (no gradient through them), so that
    # training meets the cache states of a long stream. The default (stream_chunks = chunks_per_step = 2) is one
    # fresh 9-frame window a step, the measured baseline: 18-20 dB on frames 0-8 of a held-out clip, 6-12 dB after.
    # Long streams are not yet measured better (docs/tinyworld.md, VAE): ahead of the windows for 150 steps (13-14 vs
    # 12 dB training PSNR), but no stream run without posterior collapse has reached 600 steps yet.
    # `frames`: the windows the latent statistics are measured on at export.
    c.data = dict(path="", frames=9, height=64, width=64, batch_size=2, max_clips=0, stream_chunks=2,
                  chunks_per_step=2)
    # final_lr_fraction < 1: cosine decay of the learning rate over decay_steps (0: total_steps)
    c.optimizer = defaults.optimizer(2e-3, b1=0.9, b2=0.99, weight_decay=1e-4, clip_norm=1.0)
    c.optimizer.final_lr_fraction = 1.0
    c.optimizer.decay_steps = 0
    # kl_weight: on 48-chunk streams 1e-4 walked the log-variance up to 0 within ~200 steps (KL 3.5 -> 0.02, mu's
    # std 0.12 under unit noise); 1e-6 kept the posterior narrow there (KL ~2-4). 1e-4 is the windows' measured value.
    # mouth_box: (top, bottom, left, right) in fractions of the frame, around the tiny world's mouth with its sway
    c.loss = dict(kl_weight=1e-4, init_log_var=-8.0, mouth_weight=1.0, mouth_box=(0.5, 0.9, 0.3, 0.7))
    c.ema = dict(decay=0.99)
    c.export = True
    c.export_ema = True
    c.export_name = "vae.safetensors"
    c.export_dtype = "float16"
    c.stats_windows = 64
    return ml_collections.ConfigDict(c)
