"""Builds a training dataset (liveavatar_jax/data/format.py) from video files with audio.

python -m train.preprocess --videos DIR --out DIR --ckpt_dir CONVERTED_CKPT [--frames 21 --height 704 --width 384]
python -m train.preprocess --videos DIR --out DIR --random_encoders        # tiny random encoders (smoke runs)
python -m train.preprocess --out DIR --synthetic 64 --frames 6 --height 8 --width 16 --like configs/pretrain_tiny.py
                                                                           # random arrays with a config's shapes
"""

from __future__ import annotations

import argparse
import logging
import runpy
import sys

from liveavatar_jax.data.format import DatasetError, ExampleSpec
from liveavatar_jax.data.preprocess import PreprocessError, build_dataset, load_encoders, write_random_dataset


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", help="folder of videos (searched recursively); captions in <video stem>.txt")
    p.add_argument("--out", required=True, help="dataset folder to write")
    p.add_argument("--ckpt_dir", help="converted checkpoint folder (VAE, wav2vec2, umT5; python -m liveavatar_jax.convert)")
    p.add_argument("--random_encoders", action="store_true", help="use the tiny random encoders of configs/tiny.py")
    p.add_argument("--tiny_vae", help="the encoders of configs/tiny.py with this trained tiny-world VAE (safetensors)")
    p.add_argument("--frames", type=int, default=21, help="latent frames per clip (4x video frames)")
    p.add_argument("--height", type=int, default=704, help="video height in pixels (multiple of 16)")
    p.add_argument("--width", type=int, default=384, help="video width in pixels (multiple of 16)")
    p.add_argument("--fps", type=int, default=25)
    p.add_argument("--text_len", type=int, default=512, help="the DiT's text length (512 for Wan; 32 for the tiny DiT)")
    p.add_argument("--stride", type=int, default=None, help="video frames between clip starts (default: clip length)")
    p.add_argument("--ref_frame", choices=("first", "random"), default="first")
    p.add_argument("--prompt", default="", help="caption for videos without a .txt file")
    p.add_argument("--negative_prompt", default="", help="the teacher's negative prompt (Stage 2)")
    p.add_argument("--on_error", choices=("skip", "raise"), default="skip")
    p.add_argument("--dtype", default="float32", help="encoder dtype (bfloat16 on accelerators)")
    p.add_argument("--synthetic", type=int, default=0, help="write this many random examples instead")
    p.add_argument("--like", help="a training config whose data.spec the synthetic examples follow")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    try:
        if args.synthetic:
            if not args.like:
                raise SystemExit("--synthetic needs --like CONFIG (the shapes of its data.spec)")
            spec = ExampleSpec.from_dict(runpy.run_path(args.like)["get_config"]().data.spec)
            index = write_random_dataset(args.out, spec, args.synthetic, seed=args.seed)
        else:
            if not args.videos:
                raise SystemExit("give --videos DIR (or --synthetic N --like CONFIG)")
            if sum(map(bool, (args.ckpt_dir, args.random_encoders, args.tiny_vae))) != 1:
                raise SystemExit("give exactly one of --ckpt_dir DIR, --random_encoders and --tiny_vae FILE")
            encoders = load_encoders(args.ckpt_dir, args.dtype, tiny_vae=args.tiny_vae)
            index = build_dataset(args.videos, args.out, encoders, latent_frames=args.frames, height=args.height,
                                  width=args.width, fps=args.fps, stride=args.stride, ref_frame=args.ref_frame,
                                  default_prompt=args.prompt, negative_prompt=args.negative_prompt,
                                  on_error=args.on_error, seed=args.seed, text_len=args.text_len)
    except (PreprocessError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
