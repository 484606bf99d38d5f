"""Trains the causal VAE from scratch on a folder of clips and exports it under the official Wan key names.

python -m train.vae --config configs/tinyworld_vae.py --workdir DIR --config.data.path=CLIPS [--config.key=value ...]

With --roundtrip CLIPS2, nothing is trained: DIR's exported VAE encodes and decodes every clip of CLIPS2, writes the
reconstructions to DIR/roundtrip/ (mp4 with the clip's audio) and prints one JSON line per clip (its PSNR over all
frames, frames 0-8 and frames 100 on: a stream that decays shows it; for tiny-world clips, with their .wav and .png
beside them, also `liveavatar_jax.eval`'s sync and maximum drift of the reconstruction) and the means.
"""

import json
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run folder: checkpoints, metrics.jsonl, vae.safetensors")
_ROUNDTRIP = flags.DEFINE_string("roundtrip", None, "a folder of clips to encode and decode with the exported VAE")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    from liveavatar_jax.distill import vae_trainer

    if _ROUNDTRIP.value is None:
        vae_trainer.VAETrainer(_CONFIG.value, _WORKDIR.value).fit()
        return
    from liveavatar_jax.models.vae import VAE, VAEConfig
    from liveavatar_jax.weights.vae_keys import load_vae

    workdir = Path(_WORKDIR.value)
    vae = VAE(load_vae(workdir / _CONFIG.value.export_name, vae_trainer.model_config(_CONFIG.value)))
    clips = sorted(Path(_ROUNDTRIP.value).glob("*.mp4"))
    if not clips:
        raise SystemExit(f"--roundtrip {_ROUNDTRIP.value}: no .mp4 clips")
    rows = [vae_trainer.roundtrip_clip(vae, clip, workdir / "roundtrip" / clip.name) for clip in clips]
    for row in rows:
        print(json.dumps(row))
    keys = [k for k in ("psnr", "psnr_frames_0_8", "psnr_frames_100_end", "sync", "drift_max")
            if all(r.get(k) is not None for r in rows)]
    print(json.dumps({"clips": len(rows), **{f"{k}_mean": sum(r[k] for r in rows) / len(rows) for k in keys}}))


if __name__ == "__main__":
    app.run(main)
