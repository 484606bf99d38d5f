"""Video files with audio -> a `liveavatar-train-v1` dataset (format.py), with this package's encoders.

For every video (and for every window of it, `stride` video frames apart):

    frames         decoded with PyAV, resampled to `fps` by nearest timestamp, resized on the shorter side and
                   centre-cropped to height x width (the official reference preprocessing), scaled to [-1, 1]
    latents        the VAE encodes [73 motion frames | 4F clip frames] as one causal stream -> 19 + F latents; the
                   first 19 are `motion_latents`, the last F the clip's `latents` (as the clip continues its motion)
    ref_latents    the clip's first frame (or a random frame of the video) encoded alone: one first-frame latent
    static_motion_latents   that reference frame repeated over the 73 motion frames and encoded (the motion input
                   the released inference builds from the reference image)
    audio          the track decoded with PyAV, wav2vec2 hidden states bucketed to one vector per video frame
                   (`io.audio.encode_audio`, the official chain), the clip's 4F frames
    text           umT5 context of the caption in `<video stem>.txt` beside the video, else `default_prompt`
Plus the dataset-wide negative prompt. Videos that cannot be used (no audio track, too short, undecodable) are
reported and skipped, or stop the run with `on_error="raise"`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from liveavatar_jax.data.format import DatasetError, DatasetWriter, ExampleSpec

log = logging.getLogger(__name__)
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")
MOTION_VIDEO_FRAMES = 73            # 19 latent frames through the causal VAE (1 + 4 * 18)


class PreprocessError(ValueError):
    """A video that cannot become training examples; the message names the file."""


# ------------------------------------------------------------------------------------------------ random data

def random_example(spec: ExampleSpec, rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    """One example of the spec's shapes with N(0, scale) entries and a random caption length."""
    c, f, h, w = spec.channels, spec.frames, spec.height, spec.width
    length = int(rng.integers(1, spec.text_len + 1))
    return {"latents": scale * rng.standard_normal((c, f, h, w)),
            "audio": scale * rng.standard_normal((spec.audio_layers, spec.audio_dim, 4 * f)),
            "text": scale * rng.standard_normal((length, spec.text_dim)),
            "ref_latents": scale * rng.standard_normal((c, 1, h, w)),
            "motion_latents": scale * rng.standard_normal((c, spec.motion_frames, h, w)),
            "static_motion_latents": scale * rng.standard_normal((c, spec.motion_frames, h, w))}


def write_random_dataset(root, spec: ExampleSpec, count: int, seed: int = 0, scale: float = 1.0) -> Path:
    """A dataset of random arrays through the real writer (for tests and smoke runs)."""
    rng = np.random.default_rng(seed)
    writer = DatasetWriter(root, spec)
    for i in range(count):
        writer.add(f"random{i:05d}", random_example(spec, rng, scale), {"source": "random", "caption": ""})
    writer.set_negative_text(rng.standard_normal((max(1, spec.text_len // 4), spec.text_dim)))
    return writer.close()


# ------------------------------------------------------------------------------------------------ decoding

def read_video(path, fps: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(frames float32 [N, 3, height, width] in [-1, 1] at `fps`, mono audio float32 [S], sample rate)."""
    import av

    from liveavatar_jax.io.image import preprocess_reference

    path = Path(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise PreprocessError(f"{path}: no video stream")
            if not container.streams.audio:
                raise PreprocessError(f"{path}: no audio track")
            stamps, images = [], []
            for frame in container.decode(video=0):
                if frame.time is None:
                    continue
                stamps.append(float(frame.time))
                images.append(frame.to_ndarray(format="rgb24"))
        with av.open(str(path)) as container:
            stream = container.streams.audio[0]
            rate = int(stream.rate)
            chunks = [f.to_ndarray().astype(np.float32) for f in container.decode(audio=0)]
    except PreprocessError:
        raise
    except Exception as e:  # PyAV raises many types for damaged files
        raise PreprocessError(f"{path}: cannot decode ({type(e).__name__}: {e})") from None
    if not images or not chunks:
        raise PreprocessError(f"{path}: holds no decodable frames or audio")
    samples = np.concatenate([c if c.ndim == 2 else c[None] for c in chunks], axis=1)
    if samples.shape[0] > 1 and chunks[0].ndim == 2 and chunks[0].shape[0] > 1:
        samples = samples.mean(axis=0)          # planar channels
    else:
        samples = samples.reshape(-1)
    if np.issubdtype(chunks[0].dtype, np.integer):
        samples = samples / np.float32(np.iinfo(chunks[0].dtype).max)
    stamps = np.asarray(stamps)
    duration = stamps[-1] - stamps[0] + (stamps[1] - stamps[0] if len(stamps) > 1 else 1.0 / fps)
    n_out = int(np.floor(duration * fps + 1e-6))
    wanted = stamps[0] + np.arange(n_out) / fps
    pick = np.clip(np.searchsorted(stamps, wanted, side="right") - 1, 0, len(images) - 1)
    frames = np.stack([preprocess_reference(images[i], height, width)[:, 0] for i in pick])
    return frames.astype(np.float32), samples.astype(np.float32), rate


def clip_starts(num_frames: int, clip_frames: int, stride: int, motion_frames: int = MOTION_VIDEO_FRAMES) -> list[int]:
    """First video frame of every clip that has `motion_frames` frames before it and fits in the video."""
    first = motion_frames
    last = num_frames - clip_frames
    return list(range(first, last + 1, max(1, stride))) if last >= first else []


# ------------------------------------------------------------------------------------------------ encoders

@dataclasses.dataclass
class Encoders:
    vae: object      # liveavatar_jax.models.vae.VAE: encode([3, T, H, W]) -> [16, 1 + (T-1)//4, H/8, W/8]
    audio: object    # liveavatar_jax.models.wav2vec2.Wav2Vec2Runner
    text: object     # .encode(prompt) -> [L, text_dim]

    @property
    def text_dim(self) -> int:
        return int(np.asarray(self.text.encode("")).shape[-1])


def load_encoders(ckpt_dir=None, dtype: str = "float32", tiny_vae=None) -> Encoders:
    """The VAE, wav2vec2 and umT5 of a converted checkpoint folder (the DiT is not loaded), or, with `ckpt_dir=None`,
    the encoders of `configs/tiny.py`: its audio front end, its random prompt encoder and a random VAE (smoke runs:
    well-formed examples that carry no meaning), or the VAE trained for the tiny world in the file `tiny_vae`."""
    import jax.numpy as jnp

    if ckpt_dir is None:
        from configs.tiny import get_config

        from liveavatar_jax.pipeline import build_models

        config = get_config()
        config.trained_weights = ""        # the DiT is not needed here, and may not be trained yet
        models = build_models(config, None)
        vae = models.vae
        if tiny_vae is not None:
            from liveavatar_jax.models.vae import VAE, VAEConfig
            from liveavatar_jax.weights.vae_keys import load_vae

            vae = VAE(load_vae(tiny_vae, VAEConfig.from_config(dict(config.vae)), dtype=jnp.dtype(config.dtype)))
        return Encoders(vae=vae, audio=models.audio, text=models.text)

    from configs.liveavatar_14b import get_config

    from liveavatar_jax.models.umt5 import UMT5_XXL
    from liveavatar_jax.models.vae import VAE, VAEConfig
    from liveavatar_jax.models.wav2vec2 import Wav2Vec2Runner
    from liveavatar_jax.pipeline import CheckpointFiles
    from liveavatar_jax.text import PromptEncoder
    from liveavatar_jax.weights.vae_keys import load_vae
    from liveavatar_jax.weights.wav2vec2_keys import load_wav2vec2

    files = CheckpointFiles.find(ckpt_dir)
    dt = jnp.dtype(dtype)
    vae = VAE(load_vae(files.vae, VAEConfig.from_config(dict(get_config().vae)), dtype=dt))
    audio = Wav2Vec2Runner(load_wav2vec2(files.wav2vec2, dtype=dt, ctc_head=False))
    text = PromptEncoder(files.t5, files.tokenizer, UMT5_XXL, dtype=dt, cache_dir=files.root / ".prompt_cache")
    return Encoders(vae=vae, audio=audio, text=text)


# ------------------------------------------------------------------------------------------------ examples

def encode_clip(encoders: Encoders, frames: np.ndarray, audio_emb: np.ndarray, start: int, clip_frames: int,
                ref_index: int) -> dict[str, np.ndarray]:
    """The latents, motion latents, reference latent, static motion latents and audio of the clip at `start`."""
    motion = MOTION_VIDEO_FRAMES
    window = frames[start - motion: start + clip_frames]                      # [73 + 4F, 3, H, W]
    latents = np.asarray(encoders.vae.encode(np.ascontiguousarray(window.transpose(1, 0, 2, 3))), np.float32)
    n_motion = 1 + (motion - 1) // 4
    ref = np.asarray(encoders.vae.encode(frames[ref_index][:, None]), np.float32)
    static = np.repeat(frames[ref_index][:, None], motion, axis=1)
    static = np.asarray(encoders.vae.encode(np.ascontiguousarray(static)), np.float32)
    audio = np.asarray(audio_emb[..., start: start + clip_frames], np.float32)
    return {"latents": latents[:, n_motion:], "motion_latents": latents[:, :n_motion], "ref_latents": ref,
            "static_motion_latents": static, "audio": audio}


def build_dataset(videos: Sequence[Path] | Path, out, encoders: Encoders, *, latent_frames: int = 21,
                  height: int = 704, width: int = 384, fps: int = 25, stride: int | None = None,
                  ref_frame: str = "first", default_prompt: str = "", negative_prompt: str = "",
                  on_error: str = "skip", seed: int = 0, text_len: int = 512) -> Path:
    """Encodes every clip of `videos` (a folder or a list of files) into a dataset at `out`; returns index.json."""
    from liveavatar_jax.io.audio import encode_audio

    if ref_frame not in ("first", "random"):
        raise ValueError(f"ref_frame must be 'first' or 'random', got {ref_frame!r}")
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    if isinstance(videos, (str, Path)):
        folder = Path(videos)
        if not folder.is_dir():
            raise PreprocessError(f"--videos {folder}: not a folder")
        videos = sorted(p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)
    videos = [Path(v) for v in videos]
    if not videos:
        raise PreprocessError("no video files found (looked for " + ", ".join(VIDEO_SUFFIXES) + ")")
    clip_frames = 4 * latent_frames
    stride = clip_frames if stride is None else stride
    rng = np.random.default_rng(seed)

    negative = np.asarray(encoders.text.encode(negative_prompt), np.float32)
    spec = None
    writer = None
    failures = 0
    for video in videos:
        try:
            frames, samples, rate = read_video(video, fps, height, width)
            starts = clip_starts(len(frames), clip_frames, stride)
            if not starts:
                raise PreprocessError(f"{video}: {len(frames)} frames at {fps} fps are fewer than the "
                                      f"{MOTION_VIDEO_FRAMES} motion + {clip_frames} clip frames one example needs")
            audio_emb = np.asarray(encode_audio(samples, encoders.audio, sample_rate=rate, infer_frames=clip_frames,
                                                fps=fps).audio_emb[0], np.float32)
            caption_file = video.with_suffix(".txt")
            caption = caption_file.read_text().strip() if caption_file.is_file() else default_prompt
            text = np.asarray(encoders.text.encode(caption), np.float32)
            for k, start in enumerate(starts):
                ref_index = start if ref_frame == "first" else int(rng.integers(len(frames)))
                arrays = encode_clip(encoders, frames, audio_emb, start, clip_frames, ref_index)
                arrays["text"] = text
                if spec is None:
                    c, f, h, w = arrays["latents"].shape
                    spec = ExampleSpec(channels=c, frames=f, height=h, width=w,
                                       motion_frames=arrays["motion_latents"].shape[1],
                                       audio_layers=arrays["audio"].shape[0], audio_dim=arrays["audio"].shape[1],
                                       text_dim=text.shape[1], text_len=text_len)
                    writer = DatasetWriter(out, spec)
                writer.add(f"{video.stem}_{start:06d}", arrays,
                           {"source": str(video), "caption": caption, "fps": str(fps), "start_frame": str(start)})
            log.info("%s: %d clip(s)", video, len(starts))
        except (PreprocessError, DatasetError) as e:
            if on_error == "raise":
                raise
            failures += 1
            log.warning("%s (skipped)", e)
    if writer is None:
        raise PreprocessError(f"none of the {len(videos)} video(s) gave a usable clip ({failures} failed)")
    writer.set_negative_text(negative)
    return writer.close()
