"""Training the Wan2.1 causal VAE (`models.vae.WanVAE`) from scratch on a folder of tiny-world clips.

Data. Every `*.mp4` of `data.path` is decoded once into uint8 frames held in memory (the tiny world's clips are
64x64, 200 frames each). Training runs on streams, as the VAE is used: `batch_size` streams, each frame 0 and
`data.stream_chunks` chunks of 4 frames from a random clip and start frame, advanced `data.chunks_per_step` chunks a
step with the encoder's and decoder's caches carried from step to step in the train state (no gradient through
them: truncated backpropagation). A stream's first step also carries frame 0 through the first-frame paths, so both
programs of the causal VAE are trained, and the later steps meet the cache states of long streams (one-window
training decays past the window: the caches reach states it never saw). `stream_chunks` 0 trains on single frames
(images); `data.cut_first_frame` takes frame 0 from another clip, so that the chunks cannot borrow its colours; and
`time_init = "inflated"` starts the time axis of the init per-frame (`inflate_time`). The tiny world's recipe uses
those three instead of long streams (configs/tinyworld_vae_images.py, configs/tinyworld_vae.py). The frames of step
s come from numpy's generator seeded with (seed, s // steps per stream), and the caches are checkpointed, so a
resumed run sees exactly what an uninterrupted one does.

Loss. L1 + MSE between the decoded sample and the input (pixel weights: `loss.mouth_weight` inside
`loss.mouth_box`, a box in fractions of the frame around the tiny world's mouth, 1 elsewhere) + `loss.kl_weight` x the
mean KL of the posterior N(mu, exp(log_var)) to N(0, 1) per latent element + `loss.colour_weight` x the L1 of the
mean colours of `loss.colour_pool`-pixel tiles. During training the model's latent statistics are the identity
(mean 0, std 1); at export they are measured on the training clips (per-channel mean and std of mu) and written with
the weights, so the DiT sees unit-scale latents as it does with the Wan constants. `trainable = "decoder"` freezes
the encoder and its moments conv (a decoder-only phase after `init_from`): the export then keeps the init's
statistics, and its latents are exactly the init's.

State and checkpoints: the parameters, AdamW's state, an EMA of the parameters and the streams' caches are lists of
arrays (`nnx.split` / tree leaves, in order); `distill.checkpoint.Checkpointer` saves them with the step and the config. The export
is `WORKDIR/vae.safetensors` under the official Wan key names (`weights.vae_keys.save_vae`), loadable by `load_vae`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax import lax

from liveavatar_jax.distill import train_state as ts
from liveavatar_jax.distill.checkpoint import Checkpointer
from liveavatar_jax.distill.metrics import MetricsLogger
from liveavatar_jax.models.vae import CausalConv3d, VAEConfig, WanVAE, random_vae

log = logging.getLogger("liveavatar_jax.train")

LOG_VAR_RANGE = (-30.0, 20.0)   # the official `WanVAE_.reparameterize` clamp


# ------------------------------------------------------------------------------------------------------------ data

def read_clip_frames(path, size: tuple[int, int] | None) -> np.ndarray:
    """uint8 [N, H, W, 3] of one video; a frame of another size than `size` is an error naming the file."""
    from liveavatar_jax.eval import iter_frames

    frames = np.stack(list(iter_frames(path)))
    if size is not None and frames.shape[1:3] != tuple(size):
        raise ValueError(f"{path}: frames are {frames.shape[2]}x{frames.shape[1]}, the config wants "
                         f"{size[1]}x{size[0]} (data.height/data.width)")
    return frames


class ClipWindows:
    """Windows of consecutive frames from every `*.mp4` of a folder, drawn per step."""

    def __init__(self, folder, frames: int, height: int, width: int, max_clips: int = 0, colour_augment: float = 0.0,
                 cut_first_frame: float = 0.0, cut_every_step: bool = False):
        for key, value in (("colour_augment", colour_augment), ("cut_first_frame", cut_first_frame)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"data.{key} must be a fraction in [0, 1], got {value}")
        self.colour_augment = colour_augment
        self.cut_first_frame = cut_first_frame
        self.cut_every_step = cut_every_step
        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"data.path {folder}: not a folder")
        paths = sorted(folder.glob("*.mp4"))
        if max_clips:
            paths = paths[:max_clips]
        if not paths:
            raise ValueError(f"data.path {folder}: holds no .mp4 clips (make some with "
                             "`python -m liveavatar_jax.tinyworld clips --count N --out DIR`)")
        if frames < 1 or (frames - 1) % 4:
            raise ValueError(f"data.frames must be 1 + 4k (the VAE encodes frame 0, then chunks of 4), got {frames}")
        self.paths = paths
        self.frames = frames
        self.clips = [read_clip_frames(p, (height, width)) for p in paths]
        short = [f"{p} ({len(c)} frames)" for p, c in zip(paths, self.clips) if len(c) < frames]
        if short:
            raise ValueError(f"clips shorter than data.frames={frames}: " + ", ".join(short))

    def stream_batch(self, seed: int, step: int, batch_size: int, stream_chunks: int, chunks_per_step: int):
        """(float32 [B, T, H, W, 3] in [-1, 1], first): the frames of `step` in the training streams.

        A stream is frame 0 and `stream_chunks` chunks of 4 frames from a random clip and start frame; it takes
        `stream_chunks // chunks_per_step` steps, the first of which (`first`) also carries frame 0. A fraction
        `colour_augment` of the streams have their colours transformed (`recolour`), the same way in all their
        steps. A fraction `cut_first_frame` take frame 0 from another clip: trained on whole windows, the chunks
        borrow frame 0's colours through the caches instead of carrying their own, and lose them once frame 0 leaves
        the receptive field (docs/tinyworld.md, VAE). With `cut_every_step` each continued step takes its chunks
        from a new clip and start, the caches carried across the cut. `stream_chunks` 0: single frames (images).
        The streams of step s depend only on (seed, s // steps per stream), so a resumed run sees the same
        frames."""
        per_stream = max(1, stream_chunks // chunks_per_step)    # stream_chunks 0: single frames (images)
        segment, phase = divmod(step, per_stream)
        rng = np.random.default_rng([seed, segment])
        colour_rng = np.random.default_rng([seed, segment, 1])   # its own draws: the same clips with or without
        cut_rng = np.random.default_rng([seed, segment, 2])
        if self.cut_every_step and phase:
            rng = colour_rng = np.random.default_rng([seed, segment, phase, 3])
        length = 1 + 4 * stream_chunks
        lo = 0 if phase == 0 else 1 + 4 * chunks_per_step * phase
        hi = 1 + 4 * min(chunks_per_step * (phase + 1), stream_chunks)
        out = []
        for _ in range(batch_size):
            index = rng.integers(len(self.clips))
            clip = self.clips[index]
            if len(clip) < length:
                raise ValueError(f"data.stream_chunks={stream_chunks} needs clips of {length} frames, one has "
                                 f"{len(clip)}")
            start = rng.integers(len(clip) - length + 1)
            frames = to_unit(clip[start + lo:start + hi])
            draw, angle, saturation = colour_rng.uniform((0.0, -np.pi, 0.6), (1.0, np.pi, 1.4))
            if draw < self.colour_augment:
                frames = recolour(frames, angle, saturation)
            cut, other, at, angle, saturation, recoloured = cut_rng.uniform((0, 0, 0, -np.pi, 0.6, 0),
                                                                             (1, 1, 1, np.pi, 1.4, 1))
            if phase == 0 and cut < self.cut_first_frame:
                donor = int(other * (len(self.clips) - 1))
                donor = self.clips[donor + (donor >= index and len(self.clips) > 1)]
                first = to_unit(donor[int(at * len(donor))])
                frames[0] = recolour(first, angle, saturation) if recoloured < self.colour_augment else first
            out.append(frames)
        return np.stack(out), phase == 0

    def batch(self, seed: int, step: int, batch_size: int) -> np.ndarray:
        """float32 [B, T, H, W, 3] in [-1, 1]: the windows of `step` (a function of (seed, step) only)."""
        rng = np.random.default_rng([seed, step])
        out = []
        for _ in range(batch_size):
            clip = self.clips[rng.integers(len(self.clips))]
            start = rng.integers(len(clip) - self.frames + 1)
            out.append(clip[start:start + self.frames])
        return to_unit(np.stack(out))


# BT.601 full-range RGB -> (Y, Cb, Cr) on [-1, 1] values (Cb, Cr centred on 0)
_RGB_TO_YCC = np.array([[0.299, 0.587, 0.114],
                        [-0.168736, -0.331264, 0.5],
                        [0.5, -0.418688, -0.081312]], np.float32)


def recolour(frames: np.ndarray, angle: float, saturation: float) -> np.ndarray:
    """frames [..., 3] in [-1, 1] with their chroma turned by `angle` (radians) and scaled by `saturation` (luma
    kept, so the dark mouth stays dark), clipped to [-1, 1].

    The VAE must keep the colours of faces and backgrounds it never saw: trained on a few dozen faces it learns their
    colours and shifts new ones towards them (docs/tinyworld.md, VAE). Recoloured streams show it every hue."""
    c, s = np.cos(angle) * saturation, np.sin(angle) * saturation
    chroma = np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]], np.float32)
    m = np.linalg.inv(_RGB_TO_YCC) @ chroma @ _RGB_TO_YCC
    return np.clip(frames @ m.T.astype(np.float32), -1.0, 1.0)


def to_unit(frames_uint8: np.ndarray) -> np.ndarray:
    return frames_uint8.astype(np.float32) / 127.5 - 1.0


def to_uint8(video: np.ndarray) -> np.ndarray:
    return np.clip(np.round((np.asarray(video, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------------ the model

def model_config(config) -> VAEConfig:
    """The config's `vae` section as a VAEConfig with identity latent statistics (those of training)."""
    section = dict(config.vae.to_dict() if hasattr(config.vae, "to_dict") else config.vae)
    z_dim = int(section.get("z_dim", VAEConfig.z_dim))
    return VAEConfig.from_config({**section, "latents_mean": (0.0,) * z_dim, "latents_std": (1.0,) * z_dim})


def inflate_time(model: WanVAE, rescale: bool = True) -> None:
    """Start the causal 3-D convolutions as per-frame 2-D ones, in place: each 3x3x3 kernel keeps only its current-frame
    tap (rescaled to a 3x3 kernel's fan-in when `rescale`, for random weights), and the time resampling convs copy
    frames (downsampling keeps the later frame of each pair, upsampling repeats each frame).

    Frame 0's path reads only the current-frame taps (the earlier ones see zero padding) and skips the time convs, so
    after inflating an image-trained VAE (configs/tinyworld_vae_images.py) every chunk decodes its last frame as that
    VAE decodes an image, colours included, and video training only has to add the motion (docs/tinyworld.md,
    VAE)."""
    for path, conv in nnx.iter_graph(model):
        if not isinstance(conv, CausalConv3d) or conv.taps != 3:
            continue
        kernel = conv.kernel[...]
        kt, kh, kw, ci, co = kernel.shape
        if "time_conv" in path:
            copy = jnp.tile(jnp.eye(ci, dtype=kernel.dtype), (1, co // ci))
            conv.kernel[...] = jnp.zeros_like(kernel).at[-1, 0, 0].set(copy)
        else:
            conv.kernel[...] = jnp.zeros_like(kernel).at[-1].set(kernel[-1] * (math.sqrt(kt) if rescale else 1.0))
        conv.bias[...] = jnp.zeros_like(conv.bias[...])


def init_caches(model: WanVAE, batch: int, height: int, width: int) -> dict:
    """Empty encoder and decoder caches for `batch` streams of height x width frames."""
    dtype = model.conv1.kernel.dtype
    stride = model.config.spatial_stride
    return {"encoder": model.encoder.init_cache(batch, height, width, dtype),
            "decoder": model.decoder.init_cache(batch, height // stride, width // stride, dtype)}


def reconstruct(model: WanVAE, video: jax.Array, key: jax.Array | None = None, caches: dict | None = None,
                frozen_encoder: bool = False):
    """The next frames of B streams through the encoder and the decoder -> (decoded, mu, log_var, caches after them).

    With `caches` None, `video` [B, 1 + 4k, H, W, 3] starts the streams (frame 0 through the first-frame paths, then k
    chunks); otherwise `video` [B, 4k, H, W, 3] continues them from `caches`, as the streaming encoder and decoder do
    with their carried features. Decodes mu + sigma eps (eps ~ N(0, 1) from `key`; mu when `key` is None). The
    returned caches carry no gradient: training backpropagates through the chunks of one call only.
    `frozen_encoder` stops the gradient at the moments, so no backward pass runs through the encoder."""
    b, t, h, w, _ = video.shape
    dtype = model.conv1.kernel.dtype
    video = video.astype(dtype)
    first = caches is None
    if first:
        caches = init_caches(model, b, h, w)
    enc, pieces = caches["encoder"], []
    if first:
        out, enc = model.encoder(video[:, :1], enc, first=True)
        pieces.append(out)
        video = video[:, 1:]
    n = video.shape[1] // 4

    def encode_chunk(cache, chunk):
        out, cache = model.encoder(chunk, cache, first=False)
        return cache, out

    if n:
        enc, rest = lax.scan(encode_chunk, enc, video[:, :4 * n].reshape(b, n, 4, h, w, 3).swapaxes(0, 1))
        pieces.append(rest.swapaxes(0, 1).reshape((b, -1) + rest.shape[3:]))
    moments = model.conv1(jnp.concatenate(pieces, axis=1))[0].astype(jnp.float32)
    if frozen_encoder:
        moments = lax.stop_gradient(moments)
    mu, log_var = moments[..., :model.config.z_dim], jnp.clip(moments[..., model.config.z_dim:], *LOG_VAR_RANGE)
    z = mu if key is None else mu + jnp.exp(0.5 * log_var) * jax.random.normal(key, mu.shape, mu.dtype)
    dec, frames = caches["decoder"], []
    if first:
        out, dec = model.decode_first_latent(z[:, :1], dec)
        frames.append(out)
        z = z[:, 1:]
    if z.shape[1]:
        out, dec = model.decode_latents(z, dec)
        frames.append(out)
    recon = jnp.concatenate(frames, axis=1).astype(jnp.float32)
    return recon, mu, log_var, jax.lax.stop_gradient({"encoder": enc, "decoder": dec})


def pixel_weights(height: int, width: int, mouth_weight: float, box) -> np.ndarray:
    """[H, W, 1] loss weights: `mouth_weight` inside `box` = (top, bottom, left, right) fractions, 1 elsewhere."""
    w = np.ones((height, width, 1), np.float32)
    if mouth_weight != 1.0:
        top, bottom, left, right = box
        w[int(round(top * height)):int(round(bottom * height)), int(round(left * width)):int(round(right * width))] \
            = mouth_weight
    return w / w.mean()   # the mean weight is 1, so loss scales do not move with the mouth weight


def psnr(a, b) -> jax.Array:
    """PSNR in dB of videos in [-1, 1] (peak-to-peak 2)."""
    mse = jnp.mean((jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32)) ** 2)
    return 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-12))


@struct.dataclass
class VAETrainState:
    step: jnp.ndarray       # int32: completed optimizer steps
    params: list            # the model's leaves in `nnx.split` order
    opt: optax.OptState
    ema: list
    streams: list           # the training streams' encoder and decoder caches (leaves of `init_caches`)
    rng: jnp.ndarray        # uint32 key data of the run's root key


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """The static settings of `loss_fn` (config `loss` and `trainable`)."""
    kl_weight: float
    colour_weight: float = 0.0
    colour_pool: int = 8
    frozen_encoder: bool = False


def pooled_colour(video, pool: int):
    """[B, T, H, W, 3] -> the mean colour of each pool x pool tile [B, T, H / pool, W / pool, 3]."""
    b, t, h, w, c = video.shape
    return video.reshape(b, t, h // pool, pool, w // pool, pool, c).mean(axis=(3, 5))


def loss_fn(params, graphdef, treedef, video, key, caches, weights, settings: LossSettings):
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, params))
    recon, mu, log_var, caches = reconstruct(model, video, key, caches, frozen_encoder=settings.frozen_encoder)
    if recon.shape != video.shape:
        raise ValueError(f"the VAE decodes {recon.shape[1]} frames from {video.shape[1]}: data.frames must be "
                         f"1 + {model.config.temporal_stride}k for this config")
    diff = recon - video
    l1 = jnp.mean(jnp.abs(diff) * weights)
    mse = jnp.mean(diff * diff * weights)
    kl = 0.5 * jnp.mean(mu * mu + jnp.exp(log_var) - 1.0 - log_var)
    # The mean colour of each tile: per-pixel losses let a blurry decoder trade a hue shift over a whole region for
    # sharper edges; this term prices the region's colour itself (eval's drift measures region means).
    colour = jnp.mean(jnp.abs(pooled_colour(recon, settings.colour_pool) - pooled_colour(video, settings.colour_pool)))
    loss = l1 + mse + settings.kl_weight * kl + settings.colour_weight * colour
    return loss, ({"loss": loss, "l1": l1, "mse": mse, "kl": kl, "colour": colour, "psnr": psnr(recon, video),
                   "latent_std": jnp.std(mu)}, caches)


def train_step(graphdef, treedef, cache_treedef, tx, weights, settings: LossSettings, trainable: list,
               ema_decay: float, first: bool, state: VAETrainState, video):
    """One optimizer step on the next frames of the training streams; `first` starts new streams (their caches in
    `state.streams` are ignored). `trainable`: a bool per parameter leaf; the others never change (their updates,
    weight decay included, are dropped)."""
    key = ts.step_key(state.rng, state.step)
    caches = None if first else jax.tree.unflatten(cache_treedef, state.streams)
    grads, (metrics, caches) = jax.grad(loss_fn, has_aux=True)(state.params, graphdef, treedef, video, key, caches,
                                                               weights, settings)
    updates, opt = tx.update(grads, state.opt, state.params)
    updates = [u if keep else jnp.zeros_like(u) for u, keep in zip(updates, trainable)]
    params = optax.apply_updates(state.params, updates)
    ema = ts.ema_update(state.ema, params, ema_decay, state.step, 0)
    metrics = {**metrics, "grad_norm": ts.global_norm(grads)}
    return state.replace(step=state.step + 1, params=params, opt=opt, ema=ema, streams=jax.tree.leaves(caches)), \
        metrics


# ------------------------------------------------------------------------------------------------------ trainer

class VAETrainer:
    """fit(): train (resuming from WORKDIR/checkpoints), measure the latent statistics, export the weights.

    One trainer compiles its step once; `fit` may be called again (e.g. with a larger `total_steps`) and resumes."""

    item_names = ("params", "opt", "ema", "streams")

    def __init__(self, config, workdir, data: ClipWindows | None = None):
        from liveavatar_jax.distill.trainer import setup_runtime

        setup_runtime(config)
        self.config = config
        self.workdir = Path(workdir)
        c = config
        self.model_cfg = model_config(c)
        stride = self.model_cfg.spatial_stride
        if c.data.height % stride or c.data.width % stride:
            raise ValueError(f"data.height/data.width must be multiples of the VAE stride {stride}")
        self.data = data if data is not None else ClipWindows(c.data.path, int(c.data.frames), int(c.data.height),
                                                              int(c.data.width), int(c.data.get("max_clips", 0)),
                                                              float(c.data.get("colour_augment", 0.0)),
                                                              float(c.data.get("cut_first_frame", 0.0)),
                                                              bool(c.data.get("cut_every_step", False)))
        self.stream_chunks = int(c.data.stream_chunks)
        self.chunks_per_step = int(c.data.chunks_per_step)
        if self.chunks_per_step < 1 or self.stream_chunks % self.chunks_per_step:
            raise ValueError(f"data.stream_chunks ({self.stream_chunks}) must be a multiple of data.chunks_per_step "
                             f"({self.chunks_per_step} >= 1)")
        abstract = nnx.eval_shape(lambda: WanVAE(self.model_cfg, rngs=nnx.Rngs(0)))
        self.graphdef, nnx_state = nnx.split(abstract)
        self.treedef = jax.tree.structure(nnx_state)
        b = int(c.data.batch_size)
        caches = jax.eval_shape(lambda: init_caches(abstract, b, int(c.data.height), int(c.data.width)))
        self.cache_treedef = jax.tree.structure(caches)
        self.cache_shapes = jax.tree.leaves(caches)
        self.tx = ts.make_optimizer(self.config.optimizer, self.config.total_steps)
        weights = jnp.asarray(pixel_weights(int(c.data.height), int(c.data.width), float(c.loss.mouth_weight),
                                            tuple(c.loss.mouth_box)))
        trainable_part = str(c.trainable)
        if trainable_part not in ("all", "decoder"):
            raise ValueError(f"trainable={trainable_part!r}: choose 'all' or 'decoder'")
        frozen = ("encoder", "conv1") if trainable_part == "decoder" else ()
        self.trainable = [not (path and getattr(path[0], "key", None) in frozen)
                          for path, _ in jax.tree_util.tree_flatten_with_path(nnx_state)[0]]
        settings = LossSettings(kl_weight=float(c.loss.kl_weight),
                                colour_weight=float(c.loss.colour_weight), colour_pool=int(c.loss.colour_pool),
                                frozen_encoder=bool(frozen))
        if c.data.height % settings.colour_pool or c.data.width % settings.colour_pool:
            raise ValueError(f"loss.colour_pool={settings.colour_pool} must divide data.height and data.width")
        step = partial(train_step, self.graphdef, self.treedef, self.cache_treedef, self.tx, weights, settings,
                       self.trainable, float(c.ema.decay))
        # two programs: the first step of a stream (frame 0 and fresh caches) and every later one (carried caches)
        self.step_fns = {first: jax.jit(partial(step, first), donate_argnums=(0,)) for first in (True, False)}
        self.checkpointer = None
        self.init_stats = None      # the latent statistics of `init_from`, set by `initial_state`

    def initial_state(self) -> VAETrainState:
        """The state before step 1: the weights of `init_from` (an exported vae.safetensors, for a second phase with
        other data settings, e.g. streams after windows; fresh optimizer moments), else PyTorch-default-like
        random weights drawn from `seed`."""
        seed = int(self.config.seed)
        init_from = str(self.config.get("init_from", "") or "")
        if init_from:
            from liveavatar_jax.weights.vae_keys import load_vae

            if not Path(init_from).is_file():
                raise FileNotFoundError(f"init_from={init_from}: no such VAE file (an exported vae.safetensors)")
            model = load_vae(init_from, self.model_cfg, dtype=jnp.float32)
            self.init_stats = {"latents_mean": tuple(model.config.latents_mean),
                               "latents_std": tuple(model.config.latents_std)}
        else:
            model = random_vae(self.model_cfg, seed=seed, dtype=jnp.float32)
            # A zero log_var bias starts the posterior at sigma ~ 1, drowning mu (~0.1 at init) in noise: the decoder
            # learns nothing from the latents until Adam has walked the bias down by ~lr per step. Starting it at
            # `init_log_var` trains a near-deterministic autoencoder from step 1; the KL term can still widen it.
            bias = model.conv1.bias[...]
            model.conv1.bias[...] = bias.at[self.model_cfg.z_dim:].set(float(self.config.loss.init_log_var))
        time_init = str(self.config.get("time_init", "keep"))
        if time_init == "inflated":
            inflate_time(model, rescale=not init_from)
        elif time_init != "keep":
            raise ValueError(f"time_init={time_init!r}: choose 'keep' or 'inflated'")
        params = jax.tree.leaves(nnx.state(model))
        return VAETrainState(step=jnp.zeros((), jnp.int32), params=params, opt=self.tx.init(params),
                             ema=jax.tree.map(jnp.copy, params),
                             streams=[jnp.zeros(a.shape, a.dtype) for a in self.cache_shapes], rng=ts.root_key(seed))

    # -- checkpoints
    def resume(self, state: VAETrainState):
        abstract = {k: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), getattr(state, k))
                    for k in self.item_names}
        found = self.checkpointer.restore_latest(abstract, config=self.config.to_dict())
        if found is None:
            return state, 0
        step, items, meta = found
        # Orbax's arrays carry their own sharding: as arguments they make XLA compile the step programs again
        items = jax.tree.map(lambda a: jnp.asarray(np.asarray(a)), items)
        state = state.replace(step=jnp.asarray(step, jnp.int32), rng=jnp.asarray(np.asarray(meta["rng"], np.uint32)),
                              **{k: list(v) if k != "opt" else v for k, v in items.items()})
        log.info("resumed from %s/%d", self.checkpointer.directory, step)
        return state, step

    def save(self, step: int, state: VAETrainState):
        meta = {"step": step, "rng": np.asarray(state.rng).tolist(), "config": self.config.to_dict()}
        self.checkpointer.save(step, {k: getattr(state, k) for k in self.item_names}, meta)

    # -- the model of a state
    def model(self, params, stats: Mapping | None = None) -> WanVAE:
        model = nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, list(params)))
        if stats:
            model.config = dataclasses.replace(model.config, **stats)
        return model

    def measure_stats(self, params, windows: int) -> dict:
        """Per-channel mean and std of mu over `windows` training windows (fixed draws, independent of the run)."""
        model = self.model(params)
        graphdef, state = nnx.split(model)
        moments = jax.jit(lambda s, v: nnx.merge(graphdef, s).moments(v)[0])
        mus = []
        for i in range(max(1, windows // 8)):
            video = self.data.batch(int(self.config.seed) + 7919, i, min(8, windows))
            mus.append(np.asarray(moments(state, jnp.asarray(video))).reshape(-1, self.model_cfg.z_dim))
        mu = np.concatenate(mus).astype(np.float64)
        std = np.maximum(mu.std(axis=0), 1e-4)
        return {"latents_mean": tuple(float(v) for v in mu.mean(axis=0)), "latents_std": tuple(float(v) for v in std)}

    def export(self, state: VAETrainState) -> Path:
        from liveavatar_jax.weights.vae_keys import save_vae

        c = self.config
        params = state.ema if c.export_ema else state.params
        if all(self.trainable) or self.init_stats is None:
            stats = self.measure_stats(params, int(c.stats_windows))
        else:   # the frozen encoder's latents are the init's: keep its statistics bit for bit, as the DiT saw them
            stats = self.init_stats
        path = save_vae(self.model(params, stats), self.workdir / str(c.export_name),
                        dtype=np.dtype(str(c.export_dtype)))
        log.info("wrote %s (%.2f MB); latent mean %s, std %s", path, path.stat().st_size / 1e6,
                 np.round(stats["latents_mean"], 3).tolist(), np.round(stats["latents_std"], 3).tolist())
        return path

    def fit(self) -> VAETrainState:
        c = self.config
        self.checkpointer = Checkpointer(self.workdir / "checkpoints", self.item_names,
                                         keep=int(c.keep_checkpoints), async_save=bool(c.async_checkpointing))
        state, start = self.resume(self.initial_state())
        total = int(c.total_steps)
        metrics_log = MetricsLogger(self.workdir, total, start, log_every=int(c.log_every),
                                    tensorboard=bool(c.tensorboard), headline=("loss", "psnr"))
        b = int(c.data.batch_size)
        # a step's mean frame count
        frames = 4 * self.chunks_per_step + self.chunks_per_step / self.stream_chunks if self.stream_chunks else 1
        pixels = b * frames * int(c.data.height) * int(c.data.width)
        t_start = time.perf_counter()
        try:
            for step in range(start, total):
                t0 = time.perf_counter()
                video, first = self.data.stream_batch(int(c.seed), step, b, self.stream_chunks, self.chunks_per_step)
                state, metrics = self.step_fns[first](state, jnp.asarray(video))
                metrics = jax.device_get(metrics)
                if not math.isfinite(float(metrics["loss"])):
                    raise FloatingPointError(f"step {step + 1}: non-finite VAE loss {metrics['loss']}")
                dt = time.perf_counter() - t0
                metrics_log.write(step + 1, {**metrics, "step_time": dt, "steps_per_s": 1.0 / dt,
                                             "frames_per_s": b * frames / dt,
                                             "megapixels_per_s": pixels / dt / 1e6})
                if (step + 1) % int(c.checkpoint_every) == 0 or step + 1 == total:
                    self.save(step + 1, state)
            self.checkpointer.wait()
            log.info("trained steps %d..%d in %.1f s", start, total, time.perf_counter() - t_start)
            if c.export and total > 0:
                self.export(state)
        finally:
            metrics_log.close()
            self.checkpointer.close()
        return state


# ------------------------------------------------------------------------------------------------------ evaluation

def roundtrip_clip(vae, clip_path, out_path=None) -> dict:
    """Encodes and decodes a whole clip (`vae`: a `models.vae.VAE`) in one stream; returns {"clip", "frames",
    "psnr", "psnr_frames_0_8", "psnr_frames_100_end"} (dB, uint8 frames against the clip's decoded frames) and,
    with `out_path`, writes the reconstruction as an mp4 with the clip's audio (the `.wav` beside the clip, when
    there is one), adding `eval`'s "sync" and "drift_max" of it for a tiny-world clip (.wav and .png beside it)."""
    frames = read_clip_frames(clip_path, None)
    n = 1 + 4 * ((len(frames) - 1) // 4)
    frames = frames[:n]
    video = jnp.asarray(to_unit(frames)).transpose(3, 0, 1, 2)          # [3, T, H, W]
    recon = to_uint8(np.asarray(vae.decode(vae.encode(video))).transpose(1, 2, 3, 0))
    diff = recon.astype(np.float64) - frames.astype(np.float64)

    def db(d):
        return float(10.0 * np.log10(255.0 ** 2 / max(np.mean(d * d), 1e-12))) if d.size else float("nan")

    # early vs late frames: a stream whose carried caches drift decays after the first chunks
    out = {"clip": str(clip_path), "frames": int(n), "psnr": db(diff), "psnr_frames_0_8": db(diff[:9]),
           "psnr_frames_100_end": db(diff[100:])}
    if out_path is not None:
        from liveavatar_jax.tinyworld.clips import write_mp4

        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        wav, face = Path(clip_path).with_suffix(".wav"), Path(clip_path).with_suffix(".png")
        audio = None
        if wav.is_file():
            from liveavatar_jax.io.audio import load_audio
            audio = load_audio(wav)
        out["video"] = str(write_mp4(out_path, recon, audio))
        if wav.is_file() and face.is_file():
            # a tiny-world clip: does the round trip keep the mouth (sync) and the colours (drift)?
            from liveavatar_jax.eval import evaluate
            scores = evaluate(out_path, wav, face)
            out.update(sync=scores["sync"], drift_max=scores["drift"]["max"])
    return out
