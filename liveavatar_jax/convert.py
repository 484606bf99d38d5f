"""python -m liveavatar_jax.convert --ckpt_dir DIR --out DIR [--lora FILE]

Converts the official checkpoint folder (`ckpt/` holding `Wan2.2-S2V-14B/`, or that folder itself) into a folder that
run time loads without unpickling: the .pth files become safetensors with the same key names and dtypes, the DiT
shards, configs, tokenizer and wav2vec2 files are copied, and manifest.json records every file with its sha256 and
source. Re-running after an interruption skips the finished files. See liveavatar_jax/weights/convert_lib.py.
"""

from __future__ import annotations

import argparse
import sys

from liveavatar_jax.weights.checkpoint import CheckpointError
from liveavatar_jax.weights.convert_lib import convert


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m liveavatar_jax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_dir", required=True, help="official ckpt/ or ckpt/Wan2.2-S2V-14B/ folder")
    parser.add_argument("--out", required=True, help="output folder (created; an earlier partial run is resumed)")
    parser.add_argument("--lora", default=None, help="LiveAvatar LoRA (liveavatar.safetensors) to include")
    parser.add_argument("--allow_missing", action="store_true",
                        help="convert what is there when a component (DiT, VAE, T5, tokenizer, wav2vec2) is absent")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        report = convert(args.ckpt_dir, args.out, args.lora, allow_missing=args.allow_missing,
                         progress=not args.no_progress)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{report.out_dir}: wrote {len(report.written)} file(s), kept {len(report.skipped)} finished earlier")
    for name, result in report.components.items():
        state = "verified" if result.get("verified") else f"NOT verified ({result.get('reason')})"
        tensors = f", {result['tensors']} tensors" if "tensors" in result else ""
        print(f"  {name}: {len(result['files'])} file(s){tensors}, {state}")
    if report.missing:
        print(f"  missing from the checkpoint: {', '.join(report.missing)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
