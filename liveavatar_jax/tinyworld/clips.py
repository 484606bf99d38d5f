"""Talking-head clips of the tiny world: a face, an audio track, the mouth the audio dictates, sway and blinks.

`make_clip(seed)` draws the face of `seed`, synthesises `seconds` of procedural speech (or takes the audio you
give), computes the mouth opening of every frame with `mouth.mouth_openings` and the head motion of
`head_motion(seed)`, and renders the frames; `write_clip` stores it as

    OUT.mp4    H.264 frames + AAC audio at 25 fps (the training data format's input, `train.preprocess --videos`)
    OUT.wav    the exact audio, 16 kHz mono PCM (the `--audio` of `liveavatar_jax.eval`)
    OUT.png    the face at rest (`--image` of the stream and of the eval)
    OUT.json   the face parameters, the seeds and the per-frame opening, sway and blink (the ground truth)

The head motion does not depend on the audio (a model has to produce it, not infer it): sway is a sum of two slow
sines per axis (0.1-0.35 Hz, peak at most `face.MAX_SWAY` of the height); blinks come every 1.5 s plus an exponential
wait of mean 2.5 s and close the eyes over five frames.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from liveavatar_jax.tinyworld import face as face_lib
from liveavatar_jax.tinyworld.mouth import FPS, SAMPLE_RATE, mouth_openings, num_frames_for
from liveavatar_jax.tinyworld.speech import synthesize_speech

BLINK_PROFILE = (0.5, 1.0, 1.0, 0.6, 0.25)


@dataclasses.dataclass
class Clip:
    frames: np.ndarray        # uint8 [N, H, W, 3]
    audio: np.ndarray         # float32 mono at SAMPLE_RATE
    openings: np.ndarray      # float32 [N]: the mouth each frame shows
    sway: np.ndarray          # float32 [N, 2]: (dy, dx) in fractions of the height
    blinks: np.ndarray        # float32 [N]
    face: face_lib.FaceParams
    reference: np.ndarray     # uint8 [H, W, 3]: the face at rest
    meta: dict


def head_motion(seed: int, num_frames: int, fps: float = FPS) -> tuple[np.ndarray, np.ndarray]:
    """(sway [N, 2] as (dy, dx) fractions of the height, eyelid closure [N]) of `seed`."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xB1E]))
    t = np.arange(num_frames) / fps
    sway = np.zeros((num_frames, 2))
    for axis, scale in ((0, 0.6), (1, 1.0)):
        freqs = rng.uniform(0.1, 0.35, 2)
        phases = rng.uniform(0, 2 * np.pi, 2)
        weights = rng.dirichlet([2.0, 2.0])
        peak = face_lib.MAX_SWAY * scale * rng.uniform(0.5, 1.0)
        sway[:, axis] = peak * (weights[:, None] * np.sin(2 * np.pi * freqs[:, None] * t + phases[:, None])).sum(0)
    blinks = np.zeros(num_frames)
    time_s = rng.uniform(0.5, 3.0)
    while True:
        start = int(round(time_s * fps))
        if start >= num_frames:
            break
        profile = np.asarray(BLINK_PROFILE)[: num_frames - start]
        blinks[start:start + len(profile)] = np.maximum(blinks[start:start + len(profile)], profile)
        time_s += 1.5 + rng.exponential(2.5)
    return sway.astype(np.float32), blinks.astype(np.float32)


def render_frames(params: face_lib.FaceParams, openings, sway, blinks, size=face_lib.DEFAULT_SIZE) -> np.ndarray:
    """uint8 [N, H, W, 3]: one `face.draw_face` per frame."""
    return np.stack([face_lib.draw_face(params, size, float(o), (float(s[0]), float(s[1])), float(b))
                     for o, s, b in zip(openings, sway, blinks)])


def make_clip(seed: int, seconds: float = 8.0, *, audio: np.ndarray | None = None, face_seed: int | None = None,
              size=face_lib.DEFAULT_SIZE, fps: float = FPS, frozen_mouth: float | None = None) -> Clip:
    """The clip of `seed`: face `face_seed` (default `seed`), procedural speech of `seed` (or `audio`, 16 kHz mono),
    motion of `seed`. `frozen_mouth` holds the mouth at that opening instead of following the audio (a control
    for the sync metric)."""
    face_seed = seed if face_seed is None else face_seed
    params = face_lib.sample_face(face_seed)
    if audio is None:
        audio = synthesize_speech(seconds, seed)
        source = f"procedural speech, seed {seed}"
    else:
        audio = np.asarray(audio, np.float32).reshape(-1)
        source = "given audio"
    n = num_frames_for(len(audio), SAMPLE_RATE, fps)
    if n < 1:
        raise ValueError(f"{len(audio)} samples of audio are shorter than one video frame")
    openings = mouth_openings(audio, SAMPLE_RATE, fps, n)
    shown = openings if frozen_mouth is None else np.full(n, float(frozen_mouth), np.float32)
    sway, blinks = head_motion(seed, n, fps)
    frames = render_frames(params, shown, sway, blinks, size)
    meta = {"seed": int(seed), "face_seed": int(face_seed), "audio": source, "fps": fps,
            "size": list(frames.shape[1:3]), "frames": int(n), "frozen_mouth": frozen_mouth}
    return Clip(frames, audio, shown, sway, blinks, params, face_lib.reference_face(params, size), meta)


def write_mp4(path, frames: np.ndarray, audio: np.ndarray | None, fps: int = FPS, crf: int = 18) -> Path:
    """frames uint8 [N, H, W, 3] + mono audio at 16 kHz -> H.264/AAC mp4, through the project's stream writer."""
    from liveavatar_jax.io.video import StreamingMP4Writer

    path = Path(path)
    height, width = frames.shape[1:3]
    writer = StreamingMP4Writer(path, width, height, fps=int(fps), audio=audio, sample_rate=SAMPLE_RATE,
                                crf=crf, total_frames=len(frames))
    try:
        writer.write(frames)
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def write_clip(clip: Clip, out) -> Path:
    """OUT.mp4 plus OUT.wav, OUT.png and OUT.json beside it (module docstring); returns the mp4 path."""
    import soundfile

    out = Path(out)
    if out.suffix.lower() != ".mp4":
        raise ValueError(f"{out}: the clip is written as an .mp4")
    out.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(out.with_suffix(".wav")), clip.audio, SAMPLE_RATE, subtype="PCM_16")
    face_lib.save_png(clip.reference, out.with_suffix(".png"))
    truth = {**clip.meta, "face": clip.face.to_dict(),
             "opening": np.round(clip.openings, 5).tolist(), "sway": np.round(clip.sway, 5).tolist(),
             "blink": np.round(clip.blinks, 3).tolist()}
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(truth))
    os.replace(tmp, out.with_suffix(".json"))
    return write_mp4(out, clip.frames, clip.audio, int(clip.meta["fps"]))


def write_clips(out_dir, count: int, first_seed: int = 0, seconds: float = 8.0,
                size=face_lib.DEFAULT_SIZE) -> list[Path]:
    """`count` clips with seeds first_seed, first_seed + 1, ... as out_dir/tiny_<seed>.mp4 (+ .wav, .png, .json)."""
    out_dir = Path(out_dir)
    paths = []
    for seed in range(first_seed, first_seed + count):
        paths.append(write_clip(make_clip(seed, seconds, size=size), out_dir / f"tiny_{seed:06d}.mp4"))
    return paths
