"""LiveAvatar at full size: Wan2.2-S2V-14B DiT + LiveAvatar LoRA, Wan2.1 VAE, wav2vec2-large-xlsr-53, umT5-XXL.

Run (a GPU machine with the official weights converted by `python -m liveavatar_jax.convert`):
  python -m infer.stream --config configs/liveavatar_14b.py --ckpt_dir CKPT \
      --image face.jpg --audio speech.wav --prompt "A woman talks to the camera" --out out.mp4
Override any field from the command line, e.g. --config.stream.steps=3 or --config.dtype=float32.
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.name = "liveavatar_14b"
    c.dtype = "bfloat16"
    c.size = "720*400"            # maximum area; width and height follow the image in multiples of 64
    c.seed = 420
    c.fps = 25
    c.attention = "cudnn"         # "xla" on CPU

    # Wan2.2-S2V-14B (architecture.md 1.1); the official config.json in the checkpoint must agree.
    c.model = dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=16, out_dim=16, text_dim=4096,
                   text_len=512, freq_dim=256, eps=1e-6, patch_size=(1, 2, 2), cond_dim=16, audio_dim=1024,
                   audio_layers=25, num_audio_token=4,
                   audio_inject_layers=(0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39),
                   motion_frames=(73, 19), zip_frame_buckets=(1, 2, 16), sink_position=30)
    c.lora = dict(rank=128, alpha=64.0)

    # Wan2.1 VAE (architecture.md 6)
    c.vae = dict(dim=96, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2, temporal_downsample=(False, True, True))

    # Streaming (architecture.md 3-5): 4 Euler steps per block of 3 latent frames, one clip of KV history.
    c.stream = dict(steps=4, shift=3.0, frames_per_block=3, ring_blocks=4, sink_replace_block=4,
                    rolling_sink=True, relative_dist=(4, 30), prime_latents=7, drop_first_frames=3)
    return c
