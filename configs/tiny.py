"""The embedded default: every network of LiveAvatar at toy width, small enough to stream on a laptop CPU.

`python -m infer.stream --image IMG --audio AUDIO --prompt TEXT --out OUT.mp4` uses this when no --ckpt_dir is
given, with the tiny world's trained DiT and VAE (`trained_weights`, 3 MB, made by `python -m liveavatar_jax.tinyworld
recipe`): on a tiny-world face (`python -m liveavatar_jax.tinyworld face --seed N --out FACE.png`) the mouth follows
the speech. `--config.trained_weights=` (empty) streams random weights from `weights_seed` instead.
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.name = "tiny"
    c.dtype = "float32"
    c.size = "64*64"
    c.seed = 0
    c.fps = 25
    c.attention = "xla"
    c.weights_seed = 0
    # the tiny world's trained DiT and VAE (relative to the liveavatar_jax package); "" = random from weights_seed
    c.trained_weights = "assets/tinyworld"

    c.model = dict(dim=64, ffn_dim=128, num_heads=2, num_layers=2, in_dim=16, out_dim=16, text_dim=32, text_len=32,
                   freq_dim=256, eps=1e-6, patch_size=(1, 2, 2), cond_dim=16, audio_dim=32, audio_layers=1,
                   num_audio_token=4, audio_inject_layers=(0, 1), motion_frames=(73, 19),
                   zip_frame_buckets=(1, 2, 16), sink_position=30)
    # the tiny world's VAE (configs/tinyworld_vae.py trains it): channels 4/8/16/32, 8x8x4 compression to 16
    c.vae = dict(dim=4, z_dim=16, dim_mult=(1, 2, 4, 8), num_res_blocks=1, temporal_downsample=(False, True, True))
    # The tiny world's audio front end: 32 log mel bands at wav2vec2's 50 Hz (models/spectral.py says why), one
    # "hidden state" for the audio encoder (audio_layers=1, audio_dim=32).
    c.audio = dict(kind="spectral", bands=32, window=1280, hop=320, fmin=80.0, fmax=5000.0)
    c.text = dict(vocab=384, dim=32, dim_attn=32, dim_ffn=64, num_heads=4, num_layers=2, num_buckets=32,
                  max_dist=128, text_len=32)
    # drop_first_frames: the official stream hides 3 generated frames (architecture.md quirk 5), so displayed frame i
    # was generated for audio frame i + 3. The tiny world's training clips pair latent frame j with the audio of its
    # own video frames, so its streams keep every frame and the mouth lands on the audio (docs/tinyworld.md).
    # sink_replace_block=None: no sink content recalibration (AAS). The tiny VAE's running latents and an image's
    # first-frame latent are different distributions (std 1.3 vs 0.6, other channel means), so the first generated
    # latent as the sink is unlike any reference the DiT was trained on, and the mouth follows the audio less
    # (unseen-speech sync of the committed student 0.51 with it, 0.64 without; Stage 1's 0.15 and 0.41:
    # docs/tinyworld.md). The rolling RoPE half of RSFM stays on.
    # ring_blocks=2: every stage of the tiny world trains on 6-latent-frame clips (tinyworld_teacher.FRAMES), two
    # blocks, so no block ever attended to more than one block before it; a ring of 4 shows the student contexts it
    # never trained on, and its colours move further (unseen-speech drift 5.7 with 4, 5.2 with 2, sync 0.64 both, on
    # the weights of the morning of 2026-11-30; docs/tinyworld.md, "Where the colours move"). Stage 2's rollout
    # follows it and trains exactly as with 4.
    c.stream = dict(steps=4, shift=3.0, frames_per_block=3, ring_blocks=2, sink_replace_block=None,
                    rolling_sink=True, relative_dist=(4, 30), prime_latents=7, drop_first_frames=0)
    return c
