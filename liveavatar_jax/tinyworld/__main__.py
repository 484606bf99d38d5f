"""python -m liveavatar_jax.tinyworld: faces, clips and training data of the tiny world.

  face     --seed N --out FACE.png [--size 64]            one reference face (mouth closed, eyes open, head still)
  clip     --seed N --out CLIP.mp4 [--seconds 8] [--audio AUDIO] [--face_seed M] [--size 64] [--frozen_mouth X]
                                                          one clip + CLIP.wav, CLIP.png, CLIP.json (ground truth)
  clips    --count K --out DIR [--seed S] [--seconds 8] [--size 64]
                                                          clips of seeds S .. S+K-1 as DIR/tiny_<seed>.mp4 (+ ...)
  dataset  --count K --out DIR [--seed S] [--seconds 8] [--size 64] -- PREPROCESS ARGS
                                                          clips in DIR/videos, then `python -m train.preprocess
                                                          --videos DIR/videos --out DIR/data --height H --width W`
                                                          with the arguments after `--` (e.g. --random_encoders
                                                          --frames 6 --text_len 32, or --ckpt_dir CKPT)
  recipe   --out RUN [--clips K] [--vae FILE] [--install] [--stages a,b]
                                                          the whole training recipe (tinyworld/recipe.py): clips,
                                                          VAE, dataset, teacher, student Stage 1 and 2, weights,
                                                          evaluation on unseen speech; --install makes the weights
                                                          the embedded default of infer.stream

--size is H (square) or H*W. Bad input exits with code 2 and a message naming the file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2


def parse_size(text: str) -> tuple[int, int]:
    parts = text.lower().replace("x", "*").split("*")
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"--size {text!r}: expected H or H*W, e.g. 64 or 64*48")
    h, w = (int(p) for p in parts)
    if h < 16 or w < 16:
        raise argparse.ArgumentTypeError(f"--size {text!r}: faces need at least 16x16 pixels")
    return h, w


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m liveavatar_jax.tinyworld", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("face", help="draw one reference face")
    f.add_argument("--seed", type=int, required=True)
    f.add_argument("--out", required=True, help="PNG file to write")
    f.add_argument("--size", type=parse_size, default=(64, 64), help="H or H*W (default 64)")

    c = sub.add_parser("clip", help="render one clip (mp4 + wav + png + json)")
    c.add_argument("--seed", type=int, required=True, help="speech and head motion (and the face, by default)")
    c.add_argument("--out", required=True, help="mp4 file to write; .wav, .png and .json go beside it")
    c.add_argument("--seconds", type=float, default=8.0, help="length of the procedural speech")
    c.add_argument("--audio", default=None, help="use this audio file instead of procedural speech")
    c.add_argument("--face_seed", type=int, default=None, help="draw this seed's face (default: --seed)")
    c.add_argument("--size", type=parse_size, default=(64, 64), help="H or H*W (default 64)")
    c.add_argument("--frozen_mouth", type=float, default=None,
                   help="hold the mouth at this opening (a control that must score no sync)")

    for name, helptext in (("clips", "render clips of consecutive seeds into a folder"),
                           ("dataset", "render clips, then build a training dataset with train.preprocess")):
        d = sub.add_parser(name, help=helptext)
        d.add_argument("--count", type=int, required=True)
        d.add_argument("--out", required=True, help="folder to write")
        d.add_argument("--seed", type=int, default=0, help="first seed")
        d.add_argument("--seconds", type=float, default=8.0)
        d.add_argument("--size", type=parse_size, default=(64, 64), help="H or H*W (default 64)")
        if name == "dataset":
            d.add_argument("preprocess_args", nargs=argparse.REMAINDER,
                           help="arguments for train.preprocess, after --")
    r = sub.add_parser("recipe", help="train the tiny world's VAE, teacher and student from scratch")
    r.add_argument("--out", required=True, help="run folder (a killed recipe resumes from it)")
    r.add_argument("--clips", type=int, default=192, help="training clips")
    r.add_argument("--seconds", type=float, default=8.0, help="length of each training clip")
    r.add_argument("--eval_clips", type=int, default=3, help="evaluation clips (unseen faces, voices, sentences)")
    r.add_argument("--eval_seconds", type=float, default=20.0)
    r.add_argument("--stages", default=None, help="comma-separated stages, in order (default: every stage but "
                   "ablation, the 10-minute table; \"\" runs none, e.g. with --install)")
    r.add_argument("--vae", default=None, help="a trained vae.safetensors to use instead of training one (for "
                   "example liveavatar_jax/assets/tinyworld/vae.safetensors, the embedded default's)")
    r.add_argument("--install", action="store_true", help="copy the weights to liveavatar_jax/assets/tinyworld")
    return p.parse_args(argv)


def _load_audio(path) -> "np.ndarray":
    from liveavatar_jax.io.audio import load_audio

    return load_audio(path, 16000)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from liveavatar_jax.io.audio import AudioError
    from liveavatar_jax.tinyworld import clips as clips_lib
    from liveavatar_jax.tinyworld import face as face_lib

    try:
        if args.command == "recipe":
            from liveavatar_jax.tinyworld.recipe import Recipe

            stages = (list(Recipe.DEFAULT_STAGES) if args.stages is None
                      else [s for s in args.stages.split(",") if s])
            unknown = sorted(set(stages) - set(Recipe.STAGES))
            if unknown:
                raise ValueError(f"--stages: unknown stage(s) {unknown}; known: {list(Recipe.STAGES)}")
            recipe = Recipe(args.out, clips=args.clips, seconds=args.seconds, eval_clips=args.eval_clips,
                            eval_seconds=args.eval_seconds, vae_from=args.vae,
                            log=lambda line: print(line, flush=True))
            try:
                print(json.dumps(recipe(stages, install=args.install)))
            except RuntimeError as e:      # a stage's command failed; its log is named in the message
                print(f"error: {e}", file=sys.stderr)
                return 1
            return 0
        if args.command == "face":
            out = Path(args.out)
            if out.is_dir():
                raise ValueError(f"--out {out}: is a folder, not a file name")
            out.parent.mkdir(parents=True, exist_ok=True)
            face_lib.save_png(face_lib.reference_face(face_lib.sample_face(args.seed), args.size), out)
            print(f"wrote {out}")
        elif args.command == "clip":
            audio = None if args.audio is None else _load_audio(args.audio)
            clip = clips_lib.make_clip(args.seed, args.seconds, audio=audio, face_seed=args.face_seed,
                                       size=args.size, frozen_mouth=args.frozen_mouth)
            path = clips_lib.write_clip(clip, args.out)
            print(json.dumps({"video": str(path), "audio": str(path.with_suffix(".wav")),
                              "image": str(path.with_suffix(".png")), "truth": str(path.with_suffix(".json")),
                              "frames": int(len(clip.frames))}))
        else:
            if args.count < 1:
                raise ValueError(f"--count must be at least 1, got {args.count}")
            out = Path(args.out)
            video_dir = out if args.command == "clips" else out / "videos"
            paths = clips_lib.write_clips(video_dir, args.count, args.seed, args.seconds, args.size)
            print(f"wrote {len(paths)} clip(s) to {video_dir}")
            if args.command == "dataset":
                from train.preprocess import main as preprocess

                extra = [a for a in args.preprocess_args if a != "--"]
                h, w = args.size
                return preprocess(["--videos", str(video_dir), "--out", str(out / "data"), "--height", str(h),
                                   "--width", str(w), "--fps", str(clips_lib.FPS),
                                   "--prompt", "A person is talking to the camera."] + extra)
    except AudioError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
