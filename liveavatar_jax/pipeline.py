"""From files to a stream: loads every network for a config (from a converted checkpoint folder, or at random for
the embedded tiny default), turns an image, a speech track and a prompt into the engine's inputs, and yields
video frames block by block.

Input problems raise `InputError` (a ValueError naming the file and the problem) before any network is built or
run, so a command line can exit early with a clear message.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from liveavatar_jax.io import audio as audio_io
from liveavatar_jax.io import image as image_io
from liveavatar_jax.models import attention as attention_lib
from liveavatar_jax.models.dit import CausalS2VDiT, DiTConfig
from liveavatar_jax.streaming.engine import StreamConfig, StreamContext, StreamEngine

FRAMES_PER_LATENT = 4


class InputError(ValueError):
    """Unusable user input (a file, a size, a folder): the message names it and says what is wrong."""


# -------------------------------------------------------------------------------------------------- checkpoints

@dataclasses.dataclass(frozen=True)
class CheckpointFiles:
    """Where each network's weights sit in a converted folder (`python -m liveavatar_jax.convert`)."""
    root: Path
    dit: Path
    lora: Path | None
    vae: Path
    t5: Path
    tokenizer: Path
    wav2vec2: Path

    @classmethod
    def find(cls, ckpt_dir) -> "CheckpointFiles":
        from liveavatar_jax.weights import convert_lib as names

        root = Path(ckpt_dir)
        if not root.is_dir():
            raise InputError(f"--ckpt_dir {root}: not a folder")
        base = root / names.BASE_SUBDIR if (root / names.BASE_SUBDIR).is_dir() else root
        dit = next(iter(sorted(base.glob("*.safetensors.index.json"))), None) or base / names.DIT_SINGLE
        wanted = {
            "Wan2.2-S2V-14B DiT (diffusion_pytorch_model*.safetensors + index)": dit,
            "Wan2.1 VAE (Wan2.1_VAE.safetensors)": base / f"{names.VAE_NAME}.safetensors",
            "umT5 encoder (models_t5_umt5-xxl-enc-bf16.safetensors)": base / f"{names.T5_NAME}.safetensors",
            "umT5 tokenizer (google/umt5-xxl/tokenizer.json)": base / names.TOKENIZER_DIR / "tokenizer.json",
            "wav2vec2 (wav2vec2-large-xlsr-53-english/config.json)": base / names.WAV2VEC2_DIR / "config.json",
        }
        missing = [f"{what}: {path}" for what, path in wanted.items() if not path.is_file()]
        if missing:
            hint = ""
            if list(base.glob("*.pth")):
                hint = ("\n  the folder holds .pth files: convert it once with "
                        f"`python -m liveavatar_jax.convert --ckpt_dir {root} --out CONVERTED`")
            raise InputError(f"--ckpt_dir {root} holds no usable LiveAvatar/Wan weights; missing:\n  "
                             + "\n  ".join(missing) + hint)
        lora = next((p for p in (base / names.LORA_NAME, root / names.LORA_NAME) if p.is_file()), None)
        return cls(root=root, dit=dit, lora=lora, vae=base / f"{names.VAE_NAME}.safetensors",
                   t5=base / f"{names.T5_NAME}.safetensors", tokenizer=base / names.TOKENIZER_DIR,
                   wav2vec2=base / names.WAV2VEC2_DIR)


# -------------------------------------------------------------------------------------------------- text

class ByteTokenizer:
    """The tiny world's tokenizer: UTF-8 bytes shifted past the pad (0) and EOS (1) ids, EOS appended, padded."""

    def __init__(self, vocab: int, text_len: int):
        if vocab < 258:
            raise ValueError(f"a byte tokenizer needs a vocabulary of at least 258 ids, got {vocab}")
        self.text_len = text_len

    def __call__(self, text: str):
        tokens = [b + 2 for b in " ".join(text.split()).encode("utf-8")][: self.text_len - 1] + [1]
        ids = np.zeros((1, self.text_len), np.int32)
        mask = np.zeros((1, self.text_len), np.int32)
        ids[0, : len(tokens)] = tokens
        mask[0, : len(tokens)] = 1
        return ids, mask


class RandomPromptEncoder:
    """A randomly initialised umT5 with the byte tokenizer: the text path of the embedded tiny default."""

    def __init__(self, model):
        config = model.config
        graphdef, state = nnx.split(model)
        self._fn = jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state)(ids, mask))
        self._state = state
        self.tokenizer = ByteTokenizer(config.vocab, config.text_len)

    def encode(self, prompt: str) -> np.ndarray:
        ids, mask = self.tokenizer(prompt)
        out = self._fn(self._state, ids, mask)
        return np.asarray(out[0, : int(mask[0].sum())])


# -------------------------------------------------------------------------------------------------- models

@dataclasses.dataclass
class Models:
    dit: CausalS2VDiT
    vae: object            # liveavatar_jax.models.vae.VAE
    audio: object          # Wav2Vec2Runner
    text: object           # .encode(prompt) -> [L, text_dim]
    random_weights: bool


TRAINED_DIT, TRAINED_VAE = "dit.safetensors", "vae.safetensors"


def trained_weights_dir(config) -> Path | None:
    """The folder of trained small-config weights `config.trained_weights` names (relative paths from the
    liveavatar_jax package: the tiny world's committed checkpoints live in liveavatar_jax/assets/), or None when
    the config names none. A named folder without both files is an error, not a silent fall-back to noise."""
    name = config.get("trained_weights") if hasattr(config, "get") else None
    if not name:
        return None
    folder = Path(name) if Path(name).is_absolute() else Path(__file__).parent / name
    missing = [f for f in (TRAINED_DIT, TRAINED_VAE) if not (folder / f).is_file()]
    if missing:
        raise InputError(f"config.trained_weights {folder}: missing {', '.join(missing)} (the tiny world's recipe "
                         "writes them: python -m liveavatar_jax.tinyworld recipe)")
    return folder


def build_models(config, ckpt_dir=None) -> Models:
    from liveavatar_jax.models.vae import VAE, VAEConfig, WanVAE
    from liveavatar_jax.models.wav2vec2 import Wav2Vec2Config, Wav2Vec2ForCTC, Wav2Vec2Runner

    dtype = jnp.dtype(config.dtype)
    dit_cfg = DiTConfig(**_as_dict(config.model), dtype=config.dtype)
    vae_cfg = VAEConfig.from_config(_as_dict(config.vae))
    if ckpt_dir is None:
        from liveavatar_jax.models.umt5 import UMT5Config, UMT5Encoder
        from liveavatar_jax.weights.random_init import randomize

        seed = int(config.get("weights_seed", 0))

        def random(factory, offset):
            return randomize(nnx.eval_shape(lambda: factory(nnx.Rngs(0))), seed + offset)

        trained = trained_weights_dir(config)
        if trained is not None:
            from liveavatar_jax.weights.dit_keys import load_dit
            from liveavatar_jax.weights.vae_keys import load_vae

            # The tiny world's trained DiT and VAE; the prompt encoder stays random (one fixed prompt in that world)
            dit = load_dit(trained / TRAINED_DIT, dit_cfg)
            vae = VAE(load_vae(trained / TRAINED_VAE, vae_cfg, dtype=dtype))
        else:
            dit = random(lambda r: CausalS2VDiT(dit_cfg, rngs=r), 0)
            vae = VAE(random(lambda r: WanVAE(vae_cfg, dtype=dtype, rngs=r), 1))
        audio_cfg = _as_dict(config.audio)
        if audio_cfg.get("kind") == "spectral":
            from liveavatar_jax.models.spectral import SpectralConfig, SpectralFrontEnd
            audio = SpectralFrontEnd(SpectralConfig.from_dict(audio_cfg))
        else:
            w2v_cfg = Wav2Vec2Config.from_dict(audio_cfg)
            audio = Wav2Vec2Runner(random(lambda r: Wav2Vec2ForCTC(w2v_cfg, dtype=dtype, ctc_head=False, rngs=r), 2))
        t5_cfg = UMT5Config.from_config(_as_dict(config.text))
        text = RandomPromptEncoder(random(lambda r: UMT5Encoder(t5_cfg, dtype=dtype, rngs=r), 3))
        return Models(dit=dit, vae=vae, audio=audio, text=text, random_weights=trained is None)

    from liveavatar_jax.text import PromptEncoder
    from liveavatar_jax.weights.dit_keys import load_dit
    from liveavatar_jax.weights.vae_keys import load_vae
    from liveavatar_jax.weights.wav2vec2_keys import load_wav2vec2

    files = ckpt_dir if isinstance(ckpt_dir, CheckpointFiles) else CheckpointFiles.find(ckpt_dir)
    dit = load_dit(files.dit, dit_cfg, lora=files.lora)
    vae = VAE(load_vae(files.vae, vae_cfg, dtype=dtype))
    w2v = load_wav2vec2(files.wav2vec2, dtype=dtype, ctc_head=False)
    from liveavatar_jax.models.umt5 import UMT5_XXL
    text = PromptEncoder(files.t5, files.tokenizer, UMT5_XXL, dtype=dtype,
                         cache_dir=files.root / ".prompt_cache")
    return Models(dit=dit, vae=vae, audio=Wav2Vec2Runner(w2v), text=text, random_weights=False)


def _as_dict(section) -> dict:
    d = section.to_dict() if hasattr(section, "to_dict") else dict(section)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def stream_config(config) -> StreamConfig:
    s = _as_dict(config.stream)
    fields = {f.name for f in dataclasses.fields(StreamConfig)}
    return StreamConfig(**{k: v for k, v in s.items() if k in fields})


# -------------------------------------------------------------------------------------------------- inputs

@dataclasses.dataclass(frozen=True)
class Plan:
    """What a stream will produce, decided from the inputs before any heavy work."""
    height: int
    width: int
    audio_seconds: float
    video_frames: int           # as long as the audio
    blocks: int                 # the last one padded, its extra frames trimmed
    drop_first_frames: int


def check_output_path(out) -> Path:
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"--out {out}: the folder {parent} does not exist")
    import os
    if not os.access(parent, os.W_OK):
        raise InputError(f"--out {out}: the folder {parent} is not writable")
    if out.is_dir():
        raise InputError(f"--out {out}: is a folder, not a file name")
    return out


def plan_stream(config, image_path, audio_path, size=None, max_seconds=None) -> tuple[Plan, object]:
    """Validates the image and the audio (headers only) and fixes the geometry; returns (plan, image)."""
    try:
        img = image_io.load_image(image_path)
    except image_io.ImageError as e:
        raise InputError(str(e)) from None
    area = size or config.size
    try:
        h, w = image_io.size_for_area(img.height, img.width, area)
    except (ValueError, TypeError) as e:
        raise InputError(f"--size {area!r}: {e}") from None
    s = stream_config(config)
    mc = config.model
    unit = 8 * mc["patch_size"][1] * 4          # VAE stride x patch x the 4x8x8 FramePack patch
    if h < unit or w < unit:
        raise InputError(f"--size {area!r} gives {w}x{h} for {image_path}; the model needs at least {unit}x{unit}")
    try:
        info = audio_io.probe_audio(audio_path)
    except audio_io.AudioError as e:
        raise InputError(str(e)) from None
    seconds = info.duration_s
    if max_seconds is not None:
        seconds = min(seconds, float(max_seconds))
    frames_per_block = FRAMES_PER_LATENT * s.frames_per_block
    block_s = frames_per_block / config.fps
    if seconds < block_s:
        raise InputError(f"{audio_path}: {seconds:.2f} s of audio is shorter than one block "
                         f"({frames_per_block} frames = {block_s:.2f} s at {config.fps} fps)")
    drop = int(config.stream.get("drop_first_frames", 3))
    video_frames = int(round(seconds * config.fps))
    blocks = math.ceil((video_frames + drop) / frames_per_block)
    return Plan(h, w, seconds, video_frames, blocks, drop), img


@dataclasses.dataclass
class Prepared:
    plan: Plan
    ctx: StreamContext
    audio_blocks: jnp.ndarray      # [N, 1, layers, C, 4F]
    waveform: np.ndarray           # 16 kHz mono, cut to the plan


class Pipeline:
    """Networks + engine for one config. `prepare` encodes the inputs; `stream` yields frames block by block."""

    def __init__(self, config, ckpt_dir=None, *, engine_factory=None):
        attention_lib.set_implementation(config.get("attention", "xla") if jax.default_backend() == "gpu" else "xla")
        self.config = config
        self.stream_cfg = stream_config(config)
        t0 = time.perf_counter()
        self.models = build_models(config, ckpt_dir)
        from liveavatar_jax.streaming.decode import VAEStreamDecoder

        self.decoder = VAEStreamDecoder(self.models.vae, prime_latents=int(config.stream.get("prime_latents", 7)))
        factory = engine_factory or StreamEngine
        self.engine = factory(self.models.dit, self.stream_cfg, decoder=self.decoder)
        self._embed_text = jax.jit(self.models.dit.embed_text)
        self.load_seconds = time.perf_counter() - t0

    def reference_latents(self, ref_pixels: np.ndarray):
        """[3, 1, H, W] in [-1, 1] -> (ref [1, 16, 1, h, w], motion [1, 16, 19, h, w]) as the TPP pipeline encodes
        them: the single frame, and the frame repeated `motion_frames[0]` (73) times."""
        vae = self.models.vae
        ref = vae.encode(jnp.asarray(ref_pixels)[None])
        repeats = self.config.model["motion_frames"][0]
        motion = vae.encode(jnp.repeat(jnp.asarray(ref_pixels)[None], repeats, axis=2))
        return ref, motion

    def stream_context(self, prompt: str, ref_latents, motion_latents, engine=None) -> StreamContext:
        """The stream's fixed inputs: the embedded prompt and its per-layer text keys/values (once per prompt, on
        `engine`, the pipeline's own by default), the reference and motion latents."""
        context = self.prompt_context(prompt)
        ctx = StreamContext(text=self._embed_text(context), ref_latents=ref_latents, motion_latents=motion_latents)
        return (engine or self.engine).with_text_kv(ctx, text_tokens=int(context.shape[1]))

    def prompt_context(self, prompt: str):
        """The prompt encoder's output [1, tokens, text_dim], before any DiT's text embedding."""
        return jnp.asarray(self.models.text.encode(prompt), self.models.dit.cfg.jnp_dtype)[None]

    def prepare(self, image, audio, prompt: str, *, plan: Plan) -> Prepared:
        pixels = image_io.preprocess_reference(image, plan.height, plan.width)
        ref, motion = self.reference_latents(pixels)
        wav = audio_io.load_audio(audio)[: int(round(plan.audio_seconds * audio_io.SAMPLE_RATE))]
        enc = audio_io.encode_audio(wav, self.models.audio, sample_rate=audio_io.SAMPLE_RATE)
        emb = enc.audio_emb
        per = FRAMES_PER_LATENT * self.stream_cfg.frames_per_block
        need = plan.blocks * per
        if emb.shape[-1] < need:   # zero features past the audio, as the official bucketing pads
            emb = jnp.pad(emb, [(0, 0)] * 3 + [(0, need - emb.shape[-1])])
        from liveavatar_jax.streaming.engine import split_audio_blocks
        blocks = split_audio_blocks(emb.astype(self.models.dit.cfg.jnp_dtype), self.stream_cfg.frames_per_block,
                                    0, plan.blocks)
        ctx = self.stream_context(prompt, ref, motion)
        return Prepared(plan=plan, ctx=ctx, audio_blocks=blocks, waveform=wav)

    def _emitted(self, state, ctx, feed):
        """Runs `feed` (an iterable of per-block audio inputs) through the engine and yields (state, block index,
        output) for every block that leaves it, in order. A pipelined engine (TPP) returns nothing during its fill
        ticks and holds the last blocks until `flush`; the single-device engine returns each block at once."""
        g = 0
        for audio in feed:
            t0 = time.perf_counter()
            state, out = self.engine.step(state, ctx, audio)
            g += 1
            if out.get("valid", True):
                # the step returns before the device is done: time the block until its frames exist
                jax.block_until_ready(out.get("frames", out))
                yield state, out.get("block", g - 1), out, time.perf_counter() - t0
        if hasattr(self.engine, "flush"):
            t0 = time.perf_counter()
            state, rest = self.engine.flush(state, ctx)
            for out in rest:
                yield state, out["block"], out, (time.perf_counter() - t0) / max(len(rest), 1)

    def stream(self, prepared: Prepared, seed: int) -> Iterator[dict]:
        """Yields, per block: {"index", "frames" uint8 [n, H, W, 3] (first frames dropped, last block trimmed),
        "latents" [16, F, h, w], "seconds" (wall time since the previous block, compile included for the first)}."""
        plan = prepared.plan
        state = self.engine.init(prepared.ctx, seed)
        emitted = 0
        feed = (prepared.audio_blocks[g] for g in range(plan.blocks))
        for state, g, out, dt in self._emitted(state, prepared.ctx, feed):
            frames = np.asarray(out["frames"][0])
            if g == 0:
                frames = frames[plan.drop_first_frames:]
            frames = frames[: plan.video_frames - emitted]
            emitted += len(frames)
            yield {"index": g, "frames": frames, "latents": np.asarray(out["latents"][0]), "seconds": dt}

    def live(self, image, prompt: str, chunks: Iterable[np.ndarray], *, seed: int = 0,
             total_samples: int | None = None, lookahead_s: float = 1.5) -> Iterator[dict]:
        """The embedding API: audio arrives in chunks of 16 kHz mono samples; yields per block
        {"index", "frames" uint8 [n, H, W, 3], "audio_span" (start_s, end_s) of the speech these frames show}.

        The reference image (a PIL image or uint8 array) is prepared once at the config's size. `lookahead_s` is the
        audio the encoder waits for past a block before encoding it (wav2vec2 context; less starts sooner and
        departs further from whole-file features, see `StreamingAudioEncoder`).
        """
        if isinstance(image, np.ndarray):
            from PIL import Image
            image = Image.fromarray(image)
        h, w = image_io.size_for_area(image.height, image.width, self.config.size)
        pixels = image_io.preprocess_reference(image, h, w)
        ref, motion = self.reference_latents(pixels)
        ctx = self.stream_context(prompt, ref, motion)
        enc = audio_io.StreamingAudioEncoder(self.models.audio, total_samples=total_samples,
                                             right_context_frames=max(1, int(round(lookahead_s * 50))),
                                             frames_per_block=FRAMES_PER_LATENT * self.stream_cfg.frames_per_block)
        state = self.engine.init(ctx, seed)
        astate = enc.init()
        drop = int(self.config.stream.get("drop_first_frames", 3))
        per = FRAMES_PER_LATENT * self.stream_cfg.frames_per_block
        fps = self.config.fps

        dt = self.models.dit.cfg.jnp_dtype

        def feed():
            nonlocal astate
            for chunk in chunks:
                astate, blocks = enc.push(astate, np.asarray(chunk, np.float32))
                for blk in blocks:
                    yield blk.features.astype(dt)
            astate, blocks = enc.finish(astate)
            for blk in blocks:
                yield blk.features.astype(dt)

        for state, g, out, _ in self._emitted(state, ctx, feed()):
            frames = np.asarray(out["frames"][0])
            first = g * per + (drop if g == 0 else 0)
            if g == 0:
                frames = frames[drop:]
            # displayed frame i shows the content generated for audio frame i + drop (official quirk)
            yield {"index": g, "frames": frames, "audio_span": (first / fps, (g + 1) * per / fps)}
