"""The pure train steps of both stages: Stage 1 diffusion forcing, Stage 2 generator (DMD) and critic updates.

Every public function here is pure and meant for `jax.jit` (the trainer adds shardings and donation): Stage 1 is one
program (`pretrain_step`); Stage 2 is a chain of programs (`draw_plan`, `generate`, `dmd_direction`,
`generator_grads`, `generator_apply`, `critic_update`) so that the rollout compiles once for the generator and the
critic iterations. Every random draw comes from `train_state.step_key(state.rng, state.step, stream)`.

Stage 1 (training.md 5.2): a real clip is noised with an independent level per block (shifted training grid), the
motion latents with an independent level per motion frame (uniform, the "scaffold"), audio and text are dropped
per sample, and the student (base + adapters) predicts the velocity with block-causal attention over the whole clip.
With `causal=False` the same step trains the bidirectional teacher instead (Wan's flow matching: one level per clip,
the whole clip attends to the whole clip, the forward DMD's teacher and critic run).

Stage 2 (training.md 3-4): the student rolls out (`rollout.py`); the frozen bidirectional teacher with classifier-free
guidance (negative prompt and zero audio for the null branch) gives x0_real, the critic (base + its own adapters)
gives x0_fake, both at a shared DMD time; the generator descends `1/2 ||x - sg(x - grad)||^2` with
`grad = (x0_fake - x0_real) / mean|x - x0_real|`; the critic regresses the flow of fresh rollouts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax

from liveavatar_jax.distill import losses
from liveavatar_jax.distill.lora import Networks
from liveavatar_jax.distill.rollout import Rollout, RolloutConfig, RolloutPlan, exit_vjp, make_plan, rollout
from liveavatar_jax.distill.train_state import DistillState, PretrainState, ema_update, global_norm, step_key
from liveavatar_jax.models import dit_sequence

# random streams of one step
_S_NOISE, _S_TIME, _S_MOTION, _S_DROP, _S_ROPE, _S_PLAN, _S_DMD_T, _S_DMD_EPS = range(8)
CRITIC_STREAM = 100                 # key stream of the critic's iteration (the generator's is 0)
ANCHOR_STREAM = 200                 # key stream of the generator's flow-matching anchor
NULL_TEXTS = ("negative", "prompt", "dropped")     # DMDConfig.null_text, read by teacher_x0


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    causal: bool = True                 # False: the bidirectional teacher (one noise level per clip, full attention)
    frames_per_block: int = 3
    shift: float = 5.0                  # training-grid shift of the per-block noise levels
    motion_noise: bool = True           # the noisy motion-frame scaffold
    motion_max_t: float = 1000.0        # motion frames noised with t ~ U[0, motion_max_t]
    drop_audio: float = 0.15
    drop_text: float = 0.0
    rope_offset_max: int = 0            # random shift of the noisy frames' RoPE time, in frames
    rolling_sink: bool = True
    relative_dist: tuple[int, int] = (4, 30)
    remat: str = "none"
    attention_impl: str | None = None

    @classmethod
    def from_dict(cls, d: Mapping) -> "PretrainConfig":
        d = dict(d)
        if "relative_dist" in d:
            d["relative_dist"] = tuple(d["relative_dist"])
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


@dataclasses.dataclass(frozen=True)
class DMDConfig:
    guidance: float = 3.0               # Self-Forcing convention: x0 = c + g (c - u)
    timestep_shift: float = 5.0
    min_t: float = 20.0
    max_t: float = 980.0
    gradient: str = "blockwise"         # "blockwise" (per-block VJPs, memory of one block) or "full" (one grad)
    null_text: str = "negative"         # the null branch's text: "negative" (the negative prompt, as the official),
                                        # "prompt" (the sample's own text: guidance on the audio alone) or "dropped"
                                        # (zeros, the text Stage 1 / the teacher train with under `drop_text`)
    guidance_rule: str = "plain"        # losses.cfg_x0: "plain" (official), "orthogonal" or "high_pass"
    # guide only the scores at t in [lo, hi] (of 1000); outside, the conditional x0 alone (Kynkaanniemi et al. 2024)
    guidance_interval: tuple[float, float] = (0.0, 1000.0)
    ema_decay: float = 0.99
    ema_start: int = 0
    remat: str = "none"                 # teacher / critic forwards
    attention_impl: str | None = None

    def __post_init__(self):
        if self.null_text not in NULL_TEXTS:
            raise ValueError(f"unknown dmd.null_text {self.null_text!r} ({', '.join(NULL_TEXTS)})")
        if self.guidance_rule not in losses.GUIDANCE_RULES:
            raise ValueError(f"unknown dmd.guidance_rule {self.guidance_rule!r} ({', '.join(losses.GUIDANCE_RULES)})")
        interval = self.guidance_interval
        if len(interval) != 2 or not 0.0 <= interval[0] <= interval[1]:
            raise ValueError(f"dmd.guidance_interval {interval!r} needs (lo, hi) with 0 <= lo <= hi")

    @classmethod
    def from_dict(cls, d: Mapping) -> "DMDConfig":
        d = dict(d)
        if "guidance_interval" in d:
            d["guidance_interval"] = tuple(float(v) for v in d["guidance_interval"])
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


def _bernoulli_keep(key, batch: int, drop: float):
    return (jax.random.uniform(key, (batch,)) >= drop).astype(jnp.float32)


def _bcast(v, ndim):
    return v.reshape((-1,) + (1,) * (ndim - 1))


# ----------------------------------------------------------------------------------------------------- Stage 1

def pretrain_velocity(networks: Networks, lora, base, batch: Mapping, key, cfg: PretrainConfig):
    """The noised clip's predicted velocity and its target parts: (v, noise, x0, sigma [B, F])."""
    x0 = batch["latents"].astype(jnp.float32)
    b, c, f, h, w = x0.shape
    fpb = cfg.frames_per_block if cfg.causal else f     # the teacher's clip is one block: one level per clip
    nb = f // fpb
    k_noise, k_time, k_motion, k_drop, k_rope = (jax.random.fold_in(key, s)
                                                 for s in (_S_NOISE, _S_TIME, _S_MOTION, _S_DROP, _S_ROPE))
    sigma = losses.block_sigmas(k_time, b, nb, fpb, cfg.shift)              # [B, F]
    noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
    x_t = losses.add_noise(x0, noise, losses.per_frame(sigma))

    motion = batch["motion_latents"]
    if cfg.motion_noise:
        k_ms, k_me = jax.random.split(k_motion)
        m_sigma = jax.random.uniform(k_ms, (b, 1, motion.shape[2], 1, 1), maxval=cfg.motion_max_t / 1000.0)
        motion = losses.add_noise(motion, jax.random.normal(k_me, motion.shape, jnp.float32), m_sigma)

    k_da, k_dt = jax.random.split(k_drop)
    audio = batch["audio"] * _bcast(_bernoulli_keep(k_da, b, cfg.drop_audio), batch["audio"].ndim)
    text = batch["text"] * _bcast(_bernoulli_keep(k_dt, b, cfg.drop_text), batch["text"].ndim)
    model = networks.adapted(lora, base)
    if not cfg.causal:
        cond = {"text": text, "audio": audio, "ref_latents": batch["ref_latents"], "motion_latents": motion}
        return _bidirectional(model, x_t, 1000.0 * sigma[:, 0], cond, cfg), noise, x0, sigma

    k_off, k_dist = jax.random.split(k_rope)
    first = jax.random.randint(k_off, (), 0, cfg.rope_offset_max + 1)
    ref_positions = None
    if cfg.rolling_sink:
        lo, hi = cfg.relative_dist
        d = jax.random.randint(k_dist, (nb,), lo, hi + 1)
        g = first + fpb * jnp.arange(nb)
        sp = model.cfg.sink_position
        ref_positions = sp + jnp.maximum(0, g - (sp - d))
    dt = model.cfg.jnp_dtype
    v = dit_sequence.sequence_forward(
        model, x_t.astype(dt), 1000.0 * sigma, model.embed_text(text), audio, batch["ref_latents"], motion,
        mode="block_causal", frames_per_block=fpb, first_frame=first, ref_positions=ref_positions,
        audio_per_block=True, remat=cfg.remat, attention_impl=cfg.attention_impl)
    return v, noise, x0, sigma


def pretrain_loss(networks: Networks, lora, base, batch: Mapping, key, cfg: PretrainConfig):
    v, noise, x0, sigma = pretrain_velocity(networks, lora, base, batch, key, cfg)
    return losses.flow_matching_loss(v, noise, x0), {"sigma_mean": jnp.mean(sigma)}


def pretrain_step(networks: Networks, tx: optax.GradientTransformation, cfg: PretrainConfig, ema_decay: float,
                  ema_start: int, state: PretrainState, base, batch):
    key = step_key(state.rng, state.step)
    (loss, aux), grads = jax.value_and_grad(pretrain_loss, argnums=1, has_aux=True)(
        networks, state.lora, base, batch, key, cfg)
    updates, opt = tx.update(grads, state.opt, state.lora)
    lora = optax.apply_updates(state.lora, updates)
    ema = ema_update(state.ema, lora, ema_decay, state.step, ema_start)
    metrics = {"loss": loss, "grad_norm": global_norm(grads), "param_norm": global_norm(lora),
               "update_norm": global_norm(updates), **aux}
    return state.replace(step=state.step + 1, lora=lora, opt=opt, ema=ema), metrics


# ----------------------------------------------------------------------------------------------------- Stage 2

def conditions(batch: Mapping) -> dict:
    return {k: batch[k] for k in ("text", "audio", "ref_latents", "motion_latents")}


def _score_inputs(video, key, cfg: DMDConfig):
    b = video.shape[0]
    k_t, k_eps = jax.random.fold_in(key, _S_DMD_T), jax.random.fold_in(key, _S_DMD_EPS)
    t = losses.dmd_timestep(k_t, b, cfg.timestep_shift, cfg.min_t, cfg.max_t)
    sigma = losses.per_sample(t / 1000.0, video.ndim)
    eps = jax.random.normal(k_eps, video.shape, jnp.float32)
    return t, sigma, eps, losses.add_noise(video, eps, sigma)


def _bidirectional(model, x_t, t, cond, cfg):
    """The teacher's forward: one level `t` [B] per clip, every token attends to every token."""
    dt = model.cfg.jnp_dtype
    f = x_t.shape[2]
    return dit_sequence.sequence_forward(
        model, x_t.astype(dt), jnp.broadcast_to(t[:, None], (x_t.shape[0], f)), model.embed_text(cond["text"]),
        cond["audio"], cond["ref_latents"], cond["motion_latents"], mode="bidirectional", audio_per_block=False,
        remat=cfg.remat, attention_impl=cfg.attention_impl)


def teacher_x0(networks: Networks, base, x_t, t, sigma, cond, negative_text, cfg: DMDConfig):
    """Frozen teacher with classifier-free guidance; the null branch has zero audio and the negative prompt (or, with
    `null_text="prompt"`, the sample's own text, for a teacher that never trained without it; with "dropped", the
    zeros a teacher trained with `drop_text` > 0 knows as no text). Samples whose level lies outside
    `guidance_interval` get the conditional x0; `guidance_rule` picks the part of `c - u` that is guided."""
    b = x_t.shape[0]
    if cfg.null_text == "prompt":
        neg = cond["text"]
    elif cfg.null_text == "dropped":
        neg = jnp.zeros_like(cond["text"])
    else:
        neg = jnp.broadcast_to(negative_text, cond["text"].shape).astype(cond["text"].dtype)
    both = {"text": jnp.concatenate([cond["text"], neg]),
            "audio": jnp.concatenate([cond["audio"], jnp.zeros_like(cond["audio"])]),
            "ref_latents": jnp.concatenate([cond["ref_latents"]] * 2),
            "motion_latents": jnp.concatenate([cond["motion_latents"]] * 2)}
    v = _bidirectional(networks.plain(base), jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]), both, cfg)
    x0 = losses.x0_from_velocity(jnp.concatenate([x_t, x_t]), v, jnp.concatenate([sigma, sigma]))
    lo, hi = cfg.guidance_interval
    guidance = cfg.guidance * ((t >= lo) & (t <= hi)).astype(jnp.float32)
    return losses.cfg_x0(x0[:b], x0[b:], losses.per_sample(guidance, x_t.ndim), cfg.guidance_rule)


def critic_velocity(networks: Networks, critic, base, x_t, t, cond, cfg: DMDConfig):
    return _bidirectional(networks.adapted(critic, base), x_t, t, cond, cfg)


def dmd_direction(networks: Networks, critic, base, video, key, cond, negative_text, cfg: DMDConfig):
    """(direction, metrics); nothing here carries gradient."""
    video = jax.lax.stop_gradient(video)
    t, sigma, _, x_t = _score_inputs(video, key, cfg)
    x0_real = teacher_x0(networks, base, x_t, t, sigma, cond, negative_text, cfg)
    x0_fake = losses.x0_from_velocity(x_t, critic_velocity(networks, critic, base, x_t, t, cond, cfg), sigma)
    direction = jax.lax.stop_gradient(losses.dmd_direction(video, x0_fake, x0_real))
    return direction, {"dmd_t": jnp.mean(t)}


def draw_plan(rcfg: RolloutConfig, batch, key) -> RolloutPlan:
    """Every random draw of one student rollout (exit step, noises, rolling-sink distances), from `key`."""
    b, c, _, h, w = batch["ref_latents"].shape
    return make_plan(jax.random.fold_in(key, _S_PLAN), rcfg, b, c, h, w)


def generate(networks: Networks, rcfg: RolloutConfig, gen, base, batch, plan: RolloutPlan) -> Rollout:
    """A gradient-free student rollout following `plan`."""
    return rollout(networks, gen, base, conditions(batch), plan, rcfg, grad=False)


def generator_grads(networks: Networks, rcfg: RolloutConfig, cfg: DMDConfig, gen, base, batch, plan: RolloutPlan,
                    result: Rollout, direction):
    """Gradient of the DMD surrogate with respect to the student adapters, given the rollout and the direction.

    "blockwise": per-block exit VJPs on the recorded rollout (memory of one block's backward). "full": one
    `value_and_grad` through a differentiable replay of the rollout. Both are exact; tests hold them equal.
    """
    cond = conditions(batch)
    if cfg.gradient == "blockwise":
        grads, _ = exit_vjp(networks, gen, base, cond, plan, result, direction / direction.size, rcfg)
        return losses.dmd_surrogate(result.video, direction), grads
    if cfg.gradient == "full":
        def loss_fn(gen_):
            video = rollout(networks, gen_, base, cond, plan, rcfg, grad=True).video
            return losses.dmd_surrogate(video, direction)
        return jax.value_and_grad(loss_fn)(gen)
    raise ValueError(f"unknown generator gradient mode {cfg.gradient!r} (blockwise or full)")


def anchor_pretrain_config(rcfg: RolloutConfig, anchor: Mapping) -> PretrainConfig:
    """Stage 1's diffusion forcing as the student rolls out (its blocks, rolling sink and distances), with the
    noise schedule, motion scaffold and audio dropout of `anchor` (the `distill.anchor` config)."""
    return PretrainConfig(causal=True, frames_per_block=rcfg.frames_per_block, shift=float(anchor["shift"]),
                          motion_noise=bool(anchor["motion_noise"]), drop_audio=float(anchor["drop_audio"]),
                          rolling_sink=rcfg.rolling_sink, relative_dist=tuple(rcfg.relative_dist),
                          remat=rcfg.remat, attention_impl=rcfg.attention_impl)


def anchored_grads(networks: Networks, pcfg: PretrainConfig, weight: float, gen, base, batch: Mapping, key,
                   dmd_grads):
    """`dmd_grads` + `weight` x the gradient of Stage 1's flow-matching loss on the batch's real clip: an anchor to
    the data against what DMD alone drifts away from. (loss, grads). In the tiny world it brought the colours back
    to Stage 1's and the sync below it (docs/tinyworld.md, "Where the colours move"), so it is off by default."""
    loss, grads = jax.value_and_grad(lambda g: pretrain_loss(networks, g, base, batch, key, pcfg)[0])(gen)
    return loss, jax.tree.map(lambda d, r: d + weight * r.astype(d.dtype), dmd_grads, grads)


def generator_apply(cfg: DMDConfig, tx: optax.GradientTransformation, state: DistillState, grads, loss,
                    plan: RolloutPlan):
    """The optimizer and EMA step of the generator, given its DMD gradient."""
    updates, gen_opt = tx.update(grads, state.gen_opt, state.gen)
    gen = optax.apply_updates(state.gen, updates)
    ema = ema_update(state.ema, gen, cfg.ema_decay, state.step, cfg.ema_start)
    metrics = {"loss": loss, "grad_norm": global_norm(grads), "update_norm": global_norm(updates),
               "exit_step": plan.exit_step}
    return state.replace(gen=gen, ema=ema, gen_opt=gen_opt), metrics


def critic_loss(networks: Networks, cfg: DMDConfig, critic, base, batch, video, key):
    """Flow-matching loss of the critic on a (gradient-free) student clip."""
    cond = conditions(batch)
    video = jax.lax.stop_gradient(video)
    t, _, eps, x_t = _score_inputs(video, key, cfg)
    v = critic_velocity(networks, critic, base, x_t, t, cond, cfg)
    return losses.flow_matching_loss(v, eps, video), {"dmd_t": jnp.mean(t)}


def critic_update(networks: Networks, cfg: DMDConfig, tx: optax.GradientTransformation, state: DistillState, base,
                  batch, video, key):
    (loss, aux), grads = jax.value_and_grad(critic_loss, argnums=2, has_aux=True)(
        networks, cfg, state.critic, base, batch, video, key)
    updates, critic_opt = tx.update(grads, state.critic_opt, state.critic)
    critic = optax.apply_updates(state.critic, updates)
    metrics = {"loss": loss, "grad_norm": global_norm(grads), "update_norm": global_norm(updates), **aux}
    return state.replace(step=state.step + 1, critic=critic, critic_opt=critic_opt), metrics


def critic_key(state: DistillState):
    return step_key(state.rng, state.step, CRITIC_STREAM)
