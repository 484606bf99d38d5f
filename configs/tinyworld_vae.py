"""The tiny world's VAE, phase 1 of 2: the Wan2.1 causal VAE at width 4 trained from random weights on 9-frame
windows of tiny-world clips (64x64). Phase 2 (configs/tinyworld_vae_streams.py) continues from this export on long
streams. Measured in docs/tinyworld.md (VAE): after both phases, an unseen clip's round trip follows the speech
(sync 0.81); after this phase alone it decays past the window (sync 0.37).

python -m liveavatar_jax.tinyworld clips --count 48 --seconds 8 --out TW/clips
python -m train.vae --config configs/tinyworld_vae.py --workdir TW/vae_windows --config.data.path=TW/clips
python -m train.vae --config configs/tinyworld_vae_streams.py --workdir TW/vae --config.data.path=TW/clips \
    --config.init_from=TW/vae_windows/vae.safetensors

Writes WORKDIR/vae.safetensors (official Wan key names, float16, its latent statistics in the metadata).
The architecture is configs/tiny.py's `vae` section (the embedded default loads this file with it).
"""

import ml_collections

from configs import tiny
from liveavatar_jax.distill import config as defaults


def get_config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.init_from = ""        # an exported vae.safetensors to start from (a second phase), else random weights
    # 2,500 steps of a cosine laid out over 5,000: the measured run was stopped there (docs/tinyworld.md, VAE)
    c.total_steps = 2500
    c.checkpoint_every = 250
    c.keep_checkpoints = 2
    c.async_checkpointing = True
    c.log_every = 50
    c.tensorboard = False
    c.compilation_cache = ""
    c.attention_impl = "xla"
    c.vae = dict(tiny.get_config().vae)
    # Training on streams: `batch_size` streams of frame 0 + `stream_chunks` 4-frame chunks, `chunks_per_step` chunks
    # a step with the encoder's and decoder's caches carried from step to step (no gradient through them), so that
    # training meets the cache states of a long stream. Here (stream_chunks = chunks_per_step = 2) one fresh 9-frame
    # window a step: from random weights windows learn faster than streams (10-12 dB after 150 stream steps), but
    # alone they decay past the window in long streams, which phase 2 fixes.
    # `frames`: the windows the latent statistics are measured on at export. `max_clips` 48: the first 48 clips
    # (seeds 0-47, the embedded default's VAE); the recipe's 192 clips are for the DiT. Trained on all 192 at the same
    # steps, the VAE's round trip of unseen clips was worse (sync 0.54, drift 25 against 0.75, 14; docs/tinyworld.md).
    # `colour_augment`: the fraction of streams recoloured (chroma turned and scaled, `vae_trainer.recolour`)
    c.data = dict(path="", frames=9, height=64, width=64, batch_size=2, max_clips=48, stream_chunks=2,
                  chunks_per_step=2, colour_augment=0.0)
    c.optimizer = defaults.optimizer(3e-3, b1=0.9, b2=0.99, weight_decay=1e-4, clip_norm=1.0)
    c.optimizer.final_lr_fraction = 0.05
    c.optimizer.decay_steps = 5000
    # kl_weight 1e-6: on long streams 1e-4 walked the log-variance up to 0 within ~200 steps (posterior collapse);
    # 1e-6 keeps the posterior narrow (KL ~2-4). mouth_weight: without it the mouth is the last thing learned (a
    # 300-step overfit of one clip draws a face with no mouth; with weight 10 the mouth is there by step 300).
    # mouth_box: (top, bottom, left, right) in fractions of the frame, around the tiny world's mouth with its sway
    # colour_weight: x the L1 of the mean colours of colour_pool-pixel tiles (off here; configs/tinyworld_vae_colour.py)
    c.loss = dict(kl_weight=1e-6, init_log_var=-8.0, mouth_weight=4.0, mouth_box=(0.5, 0.9, 0.3, 0.7),
                  colour_weight=0.0, colour_pool=8)
    c.trainable = "all"     # or "decoder": the encoder and its moments conv frozen, the latents unchanged
    c.ema = dict(decay=0.99)
    c.export = True
    c.export_ema = True
    c.export_name = "vae.safetensors"
    c.export_dtype = "float16"
    c.stats_windows = 64
    return ml_collections.ConfigDict(c)
