"""A colour phase for the tiny world's VAE (measured, not in the recipe): the decoder of a streams export
(configs/tinyworld_vae_streams.py) fine-tuned on streams with a colour term, the encoder frozen. The latents are
unchanged, so a DiT trained on that export's latents stays valid; only the pixels they decode to change
(docs/tinyworld.md, VAE).

python -m train.vae --config configs/tinyworld_vae_colour.py --workdir TW/vae_colour --config.data.path=TW/clips \
    --config.init_from=TW/vae_streams/vae.safetensors
"""

from configs import tinyworld_vae_streams


def get_config():
    c = tinyworld_vae_streams.get_config()
    c.total_steps = 400
    # "decoder": the encoder and its moments conv are frozen (no gradient reaches them, no update changes them)
    c.trainable = "decoder"
    # colour_weight x the L1 of the mean colours of 8x8 tiles (`vae_trainer.pooled_colour`)
    c.loss.colour_weight = 4.0
    c.loss.colour_pool = 8
    return c
