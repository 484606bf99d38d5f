"""python -m liveavatar_jax.eval --video OUT.mp4 --audio AUDIO --image IMG: lip sync and colour drift of a video.

Prints one JSON object:

  sync      Pearson correlation, over the video's frames, between the mouth opening measured from the pixels and the
            opening the tiny world's law (`tinyworld.mouth.mouth_openings`) gives for AUDIO. 1: the mouth follows
            the audio as the world's faces do; 0: no relation. null when the law's opening is constant (silence).
  sync_lag  the best correlation within +-5 frames and its lag (positive: the video is late), to tell a model that
            is in sync from one that is consistently early or late.
  drift     CIEDE2000 colour difference between the mean colour of the face region (and of the background region)
            in each minute of video and in the reference image: lists per minute, and `max` over both.
  quiet_face_psnr
            PSNR (dB) of the face and mouth regions against the reference image over the frames where the law keeps
            the mouth closed (opening < `QUIET_OPENING`): there the right frame is the reference itself, up to the
            head's sway, so a face that blurs, recolours or breaks up in the pauses of the speech scores low, which
            neither sync nor drift (a minute's mean colour) shows. null when no frame is quiet; `quiet_frames` counts
            them.
  frames    video frames evaluated; also fps, seconds and the regions used.

How the pixels are measured (docs/tinyworld.md has the full account and how to check it):

1. Regions, from IMG alone. IMG is resized and centre-cropped to the video's size exactly as the stream prepares a
   reference (`io.image.preprocess_reference`). Background: pixels within CIE76 distance `BACKGROUND_TOLERANCE` of
   the median border colour that connect to the border. Skin colour: the commonest colour (CIE L*a*b* in bins of
   `COLOUR_BIN`) in the centre of the image; skin: the largest connected area within `SKIN_TOLERANCE` of it. The
   holes in the skin are eyes, brows and mouth; the mouth is the largest hole below the skin's centre (if there is
   none, a box at the usual place). Mouth box: the mouth hole's centre, half-width = the hole's half-width + margin,
   half-height = max(the hole's half-height, `MOUTH_HEIGHT_RATIO` x its half-width) + margin, where margin =
   max(2, round(`MARGIN_RATIO` x the shorter side)) covers the head's sway. Only pixels of the filled face (skin and
   its holes), shrunk by the margin, count. Face region: the skin shrunk by the margin (so that sway and blinks do
   not move its edge into eyes or hair), less the mouth box. Background region: the background shrunk by the margin.
2. Mouth opening of a frame: the number of dark pixels in the mouth region, each pixel weighted by
   clip((`DARK_LUMA_HIGH` - Y') / (`DARK_LUMA_HIGH` - `DARK_LUMA_LOW`), 0, 1), Y' the BT.601 luma of its sRGB values
   (0-255). The world's open mouth is luma 21 and its skin and lips at least 100, so the count is the area of the open
   mouth in pixels; a pixel the edge of the mouth crosses counts in proportion.
3. Colour of a region: the mean CIE L*a*b* (D65) of its pixels over the frames of one minute.
4. Quiet face: the mean squared difference between the sRGB values (0-255) of the face and mouth regions and the
   reference's, over the frames whose true opening is below `QUIET_OPENING`; quiet_face_psnr = 10 log10(255^2 / it).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from liveavatar_jax.tinyworld.colour import delta_e_cie76, delta_e_ciede2000, srgb8_to_lab
from liveavatar_jax.tinyworld.face import luma601
from liveavatar_jax.tinyworld.mouth import SAMPLE_RATE, mouth_openings

BACKGROUND_TOLERANCE = 12.0
SKIN_TOLERANCE = 10.0
COLOUR_BIN = 4.0
MOUTH_HEIGHT_RATIO = 1.1
MARGIN_RATIO = 0.035
DARK_LUMA_LOW = 30.0
DARK_LUMA_HIGH = 90.0
MAX_LAG_FRAMES = 5
QUIET_OPENING = 0.05
EXIT_BAD_INPUT = 2


class EvalError(ValueError):
    """Input the evaluation cannot use; the message names the file."""


@dataclass
class Regions:
    mouth: np.ndarray          # bool [H, W]
    face: np.ndarray
    background: np.ndarray
    mouth_box: tuple           # (top, bottom, left, right), bottom/right exclusive
    mouth_found: bool          # False: the box is at the default place (no mouth hole in the reference)
    margin: int

    def summary(self) -> dict:
        return {"mouth_box": [int(v) for v in self.mouth_box], "mouth_found": self.mouth_found,
                "mouth_pixels": int(self.mouth.sum()), "face_pixels": int(self.face.sum()),
                "background_pixels": int(self.background.sum()), "margin": self.margin}


def _largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return labels == 1 + int(np.argmax(sizes))


def locate_regions(reference: np.ndarray) -> Regions:
    """Mouth, face and background regions of a uint8 [H, W, 3] reference (module docstring, step 1)."""
    from scipy import ndimage

    h, w = reference.shape[:2]
    lab = srgb8_to_lab(reference)
    margin = max(2, int(round(MARGIN_RATIO * min(h, w))))

    border = np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]])
    near_border_colour = delta_e_cie76(lab, np.median(border, axis=0)) < BACKGROUND_TOLERANCE
    labels, _ = ndimage.label(near_border_colour)
    edge_labels = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    background = np.isin(labels, edge_labels[edge_labels > 0])

    centre = (slice(int(0.45 * h), max(int(0.62 * h), int(0.45 * h) + 1)),
              slice(int(0.4 * w), max(int(0.6 * w), int(0.4 * w) + 1)))
    centre_lab = lab[centre].reshape(-1, 3)[~background[centre].ravel()]
    if len(centre_lab) == 0:
        raise EvalError("the centre of the reference image is background: no face found")
    bins, counts = np.unique(np.floor(centre_lab / COLOUR_BIN).astype(np.int64), axis=0, return_counts=True)
    skin_bin = (bins[np.argmax(counts)] + 0.5) * COLOUR_BIN
    skin_colour = np.median(centre_lab[delta_e_cie76(centre_lab, skin_bin) < SKIN_TOLERANCE], axis=0)
    skin = _largest_component((delta_e_cie76(lab, skin_colour) < SKIN_TOLERANCE) & ~background)
    filled = ndimage.binary_fill_holes(skin)

    ys, xs = np.nonzero(skin)
    face_cy, face_cx = ys.mean(), xs.mean()
    holes, count = ndimage.label(filled & ~skin)
    best, best_size = None, 0
    for i in range(1, count + 1):
        hy, hx = np.nonzero(holes == i)
        if hy.mean() > face_cy and len(hy) > best_size:
            best, best_size = (hy, hx), len(hy)
    if best is not None:
        hy, hx = best
        cy, cx = (hy.min() + hy.max() + 1) / 2, (hx.min() + hx.max() + 1) / 2
        half_w, half_h = (hx.max() + 1 - hx.min()) / 2, (hy.max() + 1 - hy.min()) / 2
    else:
        face_h, face_w = ys.max() + 1 - ys.min(), xs.max() + 1 - xs.min()
        cy, cx = face_cy + 0.25 * face_h, face_cx
        half_w, half_h = 0.18 * face_w, 0.05 * face_h
    half_h = max(half_h, MOUTH_HEIGHT_RATIO * half_w) + margin
    half_w = half_w + margin
    box = (max(0, int(math.floor(cy - half_h))), min(h, int(math.ceil(cy + half_h))),
           max(0, int(math.floor(cx - half_w))), min(w, int(math.ceil(cx + half_w))))
    in_box = np.zeros((h, w), bool)
    in_box[box[0]:box[1], box[2]:box[3]] = True
    mouth = in_box & ndimage.binary_erosion(filled, iterations=margin)
    face = ndimage.binary_erosion(skin, iterations=margin) & ~in_box
    bg = ndimage.binary_erosion(background, iterations=margin, border_value=1)
    if not mouth.any() or not face.any():
        raise EvalError("found no face in the reference image (no skin-coloured area around its centre)")
    return Regions(mouth, face, bg, box, best is not None, margin)


def regions_overlay(reference: np.ndarray, regions: Regions, scale: int = 4) -> np.ndarray:
    """The reference with the mouth region tinted yellow, the face region green and the background blue, enlarged
    `scale` times (what `--regions` writes, to check the regions by eye)."""
    out = reference.astype(np.float32)
    for mask, colour in ((regions.mouth, (255, 230, 0)), (regions.face, (0, 220, 0)),
                         (regions.background, (40, 40, 255))):
        out[mask] = 0.5 * out[mask] + 0.5 * np.asarray(colour, np.float32)
    side_by_side = np.concatenate([reference, out.round().astype(np.uint8)], axis=1)
    return side_by_side.repeat(scale, axis=0).repeat(scale, axis=1)


def mouth_darkness(frame: np.ndarray, mouth: np.ndarray) -> float:
    """Dark-pixel count of the mouth region (module docstring, step 2)."""
    y = luma601(frame[mouth])
    return float(np.clip((DARK_LUMA_HIGH - y) / (DARK_LUMA_HIGH - DARK_LUMA_LOW), 0, 1).sum())


def pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    """Correlation of two series; 0 when `a` (the measurement) is constant, None when `b` (the truth) is."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if len(a) < 2 or np.ptp(b) == 0:
        return None
    if np.ptp(a) == 0:
        return 0.0
    a, b = a - a.mean(), b - b.mean()
    return float(np.dot(a, b) / math.sqrt(np.dot(a, a) * np.dot(b, b)))


def best_lag(measured: np.ndarray, truth: np.ndarray, max_lag: int = MAX_LAG_FRAMES) -> dict | None:
    """The lag (video frames; positive: the video is late) in [-max_lag, max_lag] with the highest correlation."""
    best = None
    for lag in range(-max_lag, max_lag + 1):
        if lag >= 0:
            m, t = measured[lag:], truth[:len(truth) - lag]
        else:
            m, t = measured[:lag], truth[-lag:]
        r = pearson(m, t)
        if r is not None and (best is None or r > best["sync"]):
            best = {"frames": lag, "sync": r}
    return best


def _open_video(path: Path):
    import av

    if not path.exists():
        raise EvalError(f"{path}: no such video file")
    if not path.is_file():
        raise EvalError(f"{path}: not a file")
    try:
        container = av.open(str(path))
    except Exception as e:  # PyAV raises many types for files it cannot parse
        raise EvalError(f"{path}: not a readable video ({type(e).__name__}: {e})") from None
    if not container.streams.video:
        container.close()
        raise EvalError(f"{path}: holds no video stream")
    return container


def video_rate(path) -> float:
    """Nominal frame rate of the video's first video stream."""
    path = Path(path)
    container = _open_video(path)
    try:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.base_rate or stream.guessed_rate or 0)
    finally:
        container.close()
    if fps <= 0:
        raise EvalError(f"{path}: the video stream has no frame rate")
    return fps


def iter_frames(path):
    """uint8 [H, W, 3] frames of the first video stream, in order."""
    path = Path(path)
    container = _open_video(path)
    try:
        for frame in container.decode(video=0):
            yield frame.to_ndarray(format="rgb24")
    except Exception as e:  # PyAV raises many types for damaged streams
        raise EvalError(f"{path}: decoding failed ({type(e).__name__}: {e})") from None
    finally:
        container.close()


def load_reference(path, height: int, width: int) -> np.ndarray:
    from liveavatar_jax.io.image import ImageError, load_image, preprocess_reference

    try:
        x = preprocess_reference(load_image(path), height, width)[:, 0]
    except ImageError as e:
        raise EvalError(str(e)) from None
    return np.round((x.transpose(1, 2, 0) + 1) / 2 * 255).clip(0, 255).astype(np.uint8)


def load_eval_audio(path) -> np.ndarray:
    from liveavatar_jax.io.audio import AudioError, load_audio

    try:
        return load_audio(path, SAMPLE_RATE)
    except AudioError as e:
        raise EvalError(str(e)) from None


def evaluate(video, audio, image, *, tolerance_s: float = 0.5, max_seconds: float | None = None,
             series: dict | None = None, overlay=None) -> dict:
    """The metrics of `video` against `audio` and the reference `image` (module docstring).

    Raises EvalError naming the file for a video that cannot be read, audio whose length does not match the video's
    (by more than `tolerance_s`, after both are cut to `max_seconds`) and images without a face. Fills `series`,
    when given, with the per-frame measured and true openings; writes `regions_overlay` to the PNG `overlay`.
    """
    video, audio, image = Path(video), Path(audio), Path(image)
    fps = video_rate(video)
    samples = load_eval_audio(audio)
    limit = None if max_seconds is None else max(1, int(round(max_seconds * fps)))
    if max_seconds is not None:
        samples = samples[:int(round(max_seconds * SAMPLE_RATE))]

    reference = regions = None
    measured, face_lab, background_lab, still_error = [], [], [], []
    for i, frame in enumerate(iter_frames(video)):
        if limit is not None and i >= limit:
            break
        if regions is None:
            # the reference is prepared at the video's size, as the stream prepared it
            height, width = frame.shape[:2]
            reference = load_reference(image, height, width)
            try:
                regions = locate_regions(reference)
            except EvalError as e:
                raise EvalError(f"{image}: {e}") from None
            still = regions.face | regions.mouth       # in a quiet frame, the reference's pixels
            still_reference = reference[still].astype(np.float64)
            if overlay is not None:
                from PIL import Image

                Image.fromarray(regions_overlay(reference, regions)).save(str(overlay), format="PNG")
        elif frame.shape[:2] != (height, width):
            raise EvalError(f"{video}: frame {i} is {frame.shape[1]}x{frame.shape[0]}, the first was {width}x{height}")
        measured.append(mouth_darkness(frame, regions.mouth))
        still_error.append(float(np.mean((frame[still] - still_reference) ** 2)))
        if regions.face.any():
            face_lab.append(srgb8_to_lab(frame[regions.face]).mean(axis=0))
        if regions.background.any():
            background_lab.append(srgb8_to_lab(frame[regions.background]).mean(axis=0))
    if not measured:
        raise EvalError(f"{video}: holds no decodable video frames")
    frames = len(measured)
    video_s, audio_s = frames / fps, len(samples) / SAMPLE_RATE
    if abs(video_s - audio_s) > tolerance_s:
        raise EvalError(f"{audio}: {audio_s:.2f} s of audio does not match the {video_s:.2f} s of {video} "
                        f"(more than {tolerance_s} s apart): give the audio the video was made from"
                        + ("" if max_seconds is not None else ", or --max_seconds for a cut stream"))
    measured = np.asarray(measured)
    truth = mouth_openings(samples, SAMPLE_RATE, fps, frames)
    per_minute = max(1, int(round(60 * fps)))
    minute_of_frame = np.arange(frames) // per_minute

    ref_lab = srgb8_to_lab(reference)
    drift = {"metric": "CIEDE2000"}
    worst = 0.0
    for name, mask, per_frame in (("face", regions.face, face_lab), ("background", regions.background,
                                                                        background_lab)):
        if not mask.any():
            drift[f"{name}_per_minute"] = None
            continue
        per_frame = np.asarray(per_frame)
        means = np.stack([per_frame[minute_of_frame == m].mean(axis=0) for m in range(minute_of_frame[-1] + 1)])
        values = delta_e_ciede2000(means, ref_lab[mask].mean(axis=0))
        drift[f"{name}_per_minute"] = [round(float(v), 4) for v in values]
        worst = max(worst, float(values.max()))
    drift["max"] = round(worst, 4)

    if series is not None:
        series.update({"fps": fps, "measured_dark_pixels": measured.round(4).tolist(),
                       "truth_opening": truth.round(5).tolist()})
    quiet = truth < QUIET_OPENING
    quiet_error = float(np.mean(np.asarray(still_error)[quiet])) if quiet.any() else None
    quiet_psnr = None if quiet_error is None else round(10 * math.log10(255.0 ** 2 / max(quiet_error, 1e-10)), 3)
    sync = pearson(measured, truth)
    lag = best_lag(measured, truth)
    if lag is not None:
        lag["sync"] = round(lag["sync"], 4)
    return {"sync": None if sync is None else round(sync, 4), "sync_lag": lag,
            "drift": drift, "quiet_face_psnr": quiet_psnr, "quiet_frames": int(quiet.sum()),
            "frames": int(frames), "fps": fps, "seconds": round(video_s, 3),
            "regions": regions.summary()}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m liveavatar_jax.eval", description=__doc__.split("\n")[0])
    p.add_argument("--video", required=True, help="the video to score (mp4 or anything PyAV reads)")
    p.add_argument("--audio", required=True, help="the audio the video was made from")
    p.add_argument("--image", required=True, help="the reference image the video was made from")
    p.add_argument("--tolerance_s", type=float, default=0.5,
                   help="largest accepted difference between the video's and the audio's durations")
    p.add_argument("--max_seconds", type=float, default=None, help="evaluate only the first S seconds of both")
    p.add_argument("--series", default=None, help="also write the per-frame measured and true openings (JSON)")
    p.add_argument("--regions", default=None, help="also write the reference with the regions tinted (PNG)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    series = {} if args.series else None
    try:
        result = evaluate(args.video, args.audio, args.image, tolerance_s=args.tolerance_s,
                          max_seconds=args.max_seconds, series=series, overlay=args.regions)
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if series is not None:
        Path(args.series).write_text(json.dumps(series))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
