"""The training loops of both stages: model and adapters on a mesh, data, jitted steps, checkpoints, metrics.

`PretrainTrainer` (Stage 1) and `DistillTrainer` (Stage 2) are built from an ml-collections config (see
`liveavatar_jax/distill/config.py` and `configs/*.py`) and a work directory; `fit()` resumes from the newest usable
checkpoint in WORKDIR/checkpoints (config checked, data position and RNG restored) and runs to `total_steps`.

`config.train_params` picks what trains: "lora" (LiveAvatar's recipe: adapters on one frozen base) or "full" (every
DiT parameter, for networks trained from scratch such as the tiny world's; the frozen base then seeds the trees and
is the teacher). `model.checkpoint` and `distill.init_student` take released/exported safetensors or a previous
run's folder (its newest checkpoint's `model.checkpoint_item` / `distill.init_student_item`, "ema" by default), so
the recipe chains: teacher run -> Stage 1 (student from the teacher) -> Stage 2 (student from Stage 1, teacher and
critic from the teacher run).

Every iteration fetches its metrics, so a non-finite loss stops the run at once (`NonFiniteLossError` naming the step
and the batch's examples) before anything is checkpointed. Stage 2 runs as jitted programs that the host chains:
`rollout` (gradient-free student clip, shared by the generator and the critic iterations), `direction` (teacher with
CFG and critic at the DMD time), `generator_grads` (blockwise exit VJPs), `generator_apply` (AdamW, EMA) and
`critic_update`; every `generator_every`-th iteration
(0 included) updates the generator first, on its own batch, then every iteration updates the critic.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from liveavatar_jax.data.format import FIELDS, ExampleSpec, read_index, read_negative_text
from liveavatar_jax.data.loader import make_iterator
from liveavatar_jax.distill import steps as steps_lib
from liveavatar_jax.distill import train_state as ts
from liveavatar_jax.distill.checkpoint import Checkpointer
from liveavatar_jax.distill.export import export_dit
from liveavatar_jax.distill.lora import LoRAConfig, Networks, build_networks, export_peft, import_peft
from liveavatar_jax.distill.metrics import MetricsLogger
from liveavatar_jax.distill.rollout import RolloutConfig
from liveavatar_jax.models import attention as attention_lib
from liveavatar_jax.models.dit import DiTConfig, abstract_model, build, count_params

log = logging.getLogger("liveavatar_jax.train")
CHECKPOINT_DIR = "checkpoints"
RANDOM_INIT_LIMIT = 2_000_000_000      # parameters; larger bases must come from a checkpoint
TRAIN_PARAMS = ("lora", "full")


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite: the message names the step and the examples of the batch."""


# ------------------------------------------------------------------------------------------------------ set-up

def setup_runtime(config):
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("liveavatar_jax").setLevel(logging.INFO)
    # Orbax reports every file operation at INFO through absl; keep the run's own lines readable.
    logging.getLogger("absl").setLevel(logging.WARNING)
    if config.get("compilation_cache"):
        jax.config.update("jax_compilation_cache_dir", str(config.compilation_cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    attention_lib.set_implementation(config.attention_impl)


def model_config(config) -> DiTConfig:
    m = config.model
    fields = {f for f in DiTConfig.__dataclass_fields__}
    kwargs = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in m.items() if k in fields}
    return DiTConfig(**kwargs)


def example_spec(config) -> ExampleSpec:
    return ExampleSpec.from_dict(config.data.spec)


def make_mesh(config):
    data, fsdp = int(config.mesh.data), int(config.mesh.fsdp)
    devices = jax.devices()
    if data > 0 and fsdp > 0:
        devices = devices[: data * fsdp]
    return ts.make_mesh(data, fsdp, devices)


def _param_sharding_fn(model_cfg: DiTConfig, mesh):
    from flax import nnx

    from liveavatar_jax.weights import keymap

    _, params, _ = nnx.split(abstract_model(model_cfg), nnx.Param, ...)
    flat = keymap.flat_paths(params)
    size = mesh.shape["fsdp"]
    return lambda path: jax.sharding.NamedSharding(mesh, ts.fsdp_spec(tuple(flat[path].shape), size))


def train_params(config) -> str:
    mode = config.get("train_params", "lora")
    if mode not in TRAIN_PARAMS:
        raise ValueError(f"config.train_params must be one of {TRAIN_PARAMS}, got {mode!r}")
    return mode


def run_checkpoints(path) -> Path | None:
    """The checkpoints folder of a training run (given as WORKDIR or WORKDIR/checkpoints), or None."""
    p = Path(path)
    if (p / CHECKPOINT_DIR).is_dir():
        return p / CHECKPOINT_DIR
    if p.is_dir() and any(c.is_dir() and c.name.isdigit() for c in p.iterdir()):
        return p
    return None


def restore_from_run(path, item: str, abstract, *, full: bool) -> dict:
    """`item` ("ema", "lora", "gen", "critic", ...) of the newest checkpoint of the run at `path`, restored into
    `abstract` (ShapeDtypeStructs carrying the target shardings). `full`: whether full DiT weights are wanted (the
    run must have trained the same kind of tree)."""
    import orbax.checkpoint as ocp

    ckpt_dir = run_checkpoints(path)
    if ckpt_dir is None:
        raise FileNotFoundError(f"{path}: not a training run folder (no {CHECKPOINT_DIR}/<step>/ inside)")
    ckpt = Checkpointer(ckpt_dir, (item,), keep=1000, async_save=False)
    try:
        steps = ckpt.steps()
        if not steps:
            raise FileNotFoundError(f"{ckpt_dir}: the run has no checkpoint yet")
        step = steps[-1]
        items = sorted(c.name for c in (ckpt_dir / str(step)).iterdir() if c.is_dir() and c.name != "meta")
        if item not in items:
            raise KeyError(f"{ckpt_dir}/{step} has no item {item!r} (it holds {', '.join(items)})")
        saved = ckpt.read_meta(step).get("config", {}).get("train_params", "lora")
        if (saved == "full") != full:
            want = "full DiT weights" if full else "LoRA adapters"
            raise ValueError(f"{ckpt_dir}/{step} is a train_params={saved!r} run; this run needs {want} from it")
        out = ckpt.manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(abstract)}))
    finally:
        ckpt.close()
    log.info("%s from %s/%d", item, ckpt_dir, step)
    return out[item]


def _abstract_params(mcfg: DiTConfig, mesh) -> dict:
    from flax import nnx

    _, params, _ = nnx.split(abstract_model(mcfg), nnx.Param, ...)
    tree = nnx.to_pure_dict(params)
    return ts.abstract_with_sharding(tree, ts.tree_shardings(tree, mesh))


def _model_from_params(mcfg: DiTConfig, tree: dict):
    from flax import nnx

    from liveavatar_jax.weights import keymap

    graphdef, params, rest = nnx.split(abstract_model(mcfg), nnx.Param, ...)
    return nnx.merge(graphdef, keymap.merge_into(params, tree), rest)


def build_networks_on_mesh(config, mesh) -> Networks:
    """The frozen base (loaded from `model.checkpoint`: official safetensors or a full-training run folder; or
    randomly initialised from `model.init_seed` when empty), sharded over the mesh, and the graph definitions."""
    mcfg = model_config(config)
    lora_cfg = LoRAConfig.from_dict(config.lora)
    source = config.model.checkpoint
    if source and run_checkpoints(source) is not None:
        # a previous full-training run (the teacher run for Stage 1 and Stage 2)
        tree = restore_from_run(source, config.model.get("checkpoint_item", "ema"), _abstract_params(mcfg, mesh),
                                full=True)
        model = _model_from_params(mcfg, tree)
    elif source:
        from liveavatar_jax.weights.dit_keys import load_dit

        model = load_dit(source, mcfg, sharding=_param_sharding_fn(mcfg, mesh))
    else:
        size = count_params(abstract_model(mcfg))
        if size > RANDOM_INIT_LIMIT:
            raise ValueError(f"config.model.checkpoint is empty: a {size / 1e9:.1f}B-parameter base needs its weights "
                             "(--config.model.checkpoint=DIR); random initialisation is for small test models")
        model = build(mcfg, seed=int(config.model.init_seed))
    networks = build_networks(model, lora_cfg, full=train_params(config) == "full")
    networks.base = jax.device_put(networks.base, ts.tree_shardings(networks.base, mesh))
    return networks


def _to_config_dict(config) -> dict:
    return json.loads(json.dumps(config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config))


class _Trainer:
    stage = ""
    item_names: tuple = ()
    fields = FIELDS
    headline = ("loss",)

    def __init__(self, config, workdir, mesh=None):
        setup_runtime(config)
        self.config = config
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        if config.stage != self.stage:
            raise ValueError(f"config stage {config.stage!r} given to the {self.stage} trainer")
        if not config.data.path:
            raise ValueError("config.data.path is empty: point it at a dataset folder (see train.preprocess)")
        self.full = train_params(config) == "full"
        self.mesh = make_mesh(config) if mesh is None else mesh
        self.spec = example_spec(config)
        index = read_index(config.data.path)
        self.example_ids = [e["id"] for e in index["examples"]]
        dp = ts.data_parallel_size(self.mesh)
        if config.data.batch_size % dp:
            raise ValueError(f"data.batch_size {config.data.batch_size} does not split over the {dp} data-parallel "
                             f"devices of the mesh {dict(self.mesh.shape)}")
        self.networks = build_networks_on_mesh(config, self.mesh)
        self.base = self.networks.base
        # the trained tree's shardings: adapters, or (full) the whole parameter set
        self.lora_shardings = ts.tree_shardings(self.networks.trainable_template, self.mesh)
        # the data first: a dataset that does not fit stops the run before Orbax starts its threads
        self.data = make_iterator(config.data.path, self.spec, global_batch=int(config.data.batch_size),
                                  seed=int(config.data.shuffle_seed), worker_count=int(config.data.worker_count),
                                  on_bad_example=config.data.on_bad_example, fields=self.fields)
        self.checkpointer = Checkpointer(self.workdir / CHECKPOINT_DIR, self.item_names,
                                         keep=int(config.keep_checkpoints), async_save=bool(config.async_checkpointing))
        self.skipped = 0
        _, ph, pw = self.networks.model_cfg.patch_size
        self.tokens_per_frame = (self.spec.height // ph) * (self.spec.width // pw)

    # -------------------------------------------------------------------------------------------- helpers

    def init_trainable(self, seed: int):
        """A fresh trained tree: new adapters (identity), or (full) a copy of the base."""
        if self.full:
            return jax.jit(lambda b: jax.tree.map(jnp.copy, b), out_shardings=self.lora_shardings)(self.base)
        return jax.jit(self.networks.init_lora, out_shardings=self.lora_shardings)(jax.random.key(seed))

    def next_batch(self):
        batch = next(self.data)
        self.skipped += int(np.sum(batch["skipped"]))
        ids = [self.example_ids[int(i)] for i in batch["index"]]
        arrays = self.select_fields({k: v for k, v in batch.items() if k not in ("index", "skipped")})
        return ts.shard_batch(arrays, self.mesh), ids

    def select_fields(self, arrays: dict) -> dict:
        return arrays

    def check_finite(self, step: int, metrics: Mapping, ids, names=("loss",)):
        for name in names:
            if name in metrics and not math.isfinite(float(metrics[name])):
                raise NonFiniteLossError(f"non-finite {name} ({float(metrics[name])}) at step {step}; the run stops "
                                         f"here (nothing of this step is saved). Batch examples: {', '.join(ids)}")

    def meta(self, step: int, state) -> dict:
        return {"step": int(step), "stage": self.stage, "rng": np.asarray(jax.device_get(state.rng)).tolist(),
                "data_state": self.data.get_state(), "skipped_examples": int(self.skipped),
                "config": _to_config_dict(self.config)}

    def abstract_state(self, state):
        return ts.abstract_with_sharding(state, jax.tree.map(lambda a: a.sharding, state))

    def resume(self, state):
        """Restores the newest usable checkpoint into `state`'s structure and shardings; returns (state, step)."""
        abstract = self.abstract_state(state)
        items = {k: getattr(abstract, k) for k in self.item_names}
        found = self.checkpointer.restore_latest(items, config=_to_config_dict(self.config))
        if found is None:
            return state, 0
        step, restored, meta = found
        state = state.replace(step=jnp.asarray(step, jnp.int32),
                              rng=jnp.asarray(np.asarray(meta["rng"], np.uint32)),
                              **restored)
        state = jax.device_put(state, self.state_shardings)
        self.data.set_state(meta["data_state"])
        self.skipped = int(meta.get("skipped_examples", 0))
        log.info("resumed from %s/%d", self.checkpointer.directory, step)
        return state, step

    def save(self, step: int, state):
        items = {k: getattr(state, k) for k in self.item_names}
        self.checkpointer.save(step, items, self.meta(step, state))

    @property
    def kind(self) -> str:
        return "dit" if self.full else "lora"

    def export(self, state):
        """WORKDIR/<name>.safetensors for every exported tree: PEFT adapters, or (full) official DiT weights."""
        if self.config.get("export_lora") and jax.process_index() == 0:
            lora_cfg = LoRAConfig.from_dict(self.config.lora)
            for name, tree in self.exports(state).items():
                out = self.workdir / f"{name}.safetensors"
                tree = jax.device_get(tree)
                path = export_dit(tree, self.networks.model_cfg, out) if self.full else export_peft(tree, lora_cfg, out)
                log.info("wrote %s", path)

    def train_step(self, step: int, state):
        """One iteration: (state, metrics row, tokens processed)."""
        raise NotImplementedError

    def fit(self):
        c = self.config
        state, start = self.resume(self.state)
        total = int(c.total_steps)
        metrics_log = MetricsLogger(self.workdir, total, start, log_every=int(c.log_every),
                                    tensorboard=bool(c.tensorboard), headline=self.headline)
        try:
            for step in range(start, total):
                t0 = time.perf_counter()
                state, row, tokens = self.train_step(step, state)
                dt = time.perf_counter() - t0
                metrics_log.write(step + 1, {**row, "step_time": dt, "tokens_per_s": tokens / dt,
                                             "data/skipped": self.skipped})
                if (step + 1) % int(c.checkpoint_every) == 0 or step + 1 == total:
                    self.save(step + 1, state)
            self.checkpointer.wait()
            self.export(state)
        finally:
            metrics_log.close()
            self.checkpointer.close()
        self.state = state
        return state


# ------------------------------------------------------------------------------------------------------ Stage 1

class PretrainTrainer(_Trainer):
    stage = "pretrain"
    item_names = ("lora", "opt", "ema")
    fields = tuple(f for f in FIELDS if f != "static_motion_latents")

    def __init__(self, config, workdir, mesh=None):
        super().__init__(config, workdir, mesh)
        c = config
        self.pcfg = steps_lib.PretrainConfig.from_dict({**c.pretrain.to_dict(), "remat": c.remat,
                                                        "attention_impl": c.attention_impl})
        if self.pcfg.causal and self.spec.frames % self.pcfg.frames_per_block:
            raise ValueError(f"data.spec.frames {self.spec.frames} is not a whole number of "
                             f"{self.pcfg.frames_per_block}-frame blocks")
        self.tx = ts.make_optimizer(c.optimizer, c.total_steps)
        lora = self.init_trainable(int(c.seed))
        state = jax.jit(partial(ts.init_pretrain_state, tx=self.tx, seed=int(c.seed)))(lora)
        self.state_shardings = ts.tree_shardings(state, self.mesh)
        self.state = jax.device_put(state, self.state_shardings)
        self.step_fn = jax.jit(
            partial(steps_lib.pretrain_step, self.networks, self.tx, self.pcfg, float(c.ema.decay),
                    int(c.ema.start_step)),
            out_shardings=(self.state_shardings, ts.replicated(self.mesh)), donate_argnums=(0,))

    def exports(self, state):
        return {self.kind: state.lora, f"{self.kind}_ema": state.ema}

    def train_step(self, step: int, state):
        batch, ids = self.next_batch()
        state, metrics = self.step_fn(state, self.base, batch)
        metrics = jax.device_get(metrics)
        self.check_finite(step + 1, metrics, ids)
        return state, dict(metrics), int(self.config.data.batch_size) * self.spec.frames * self.tokens_per_frame


# ------------------------------------------------------------------------------------------------------ Stage 2

def load_student_init(path: str, item: str, networks: Networks, shardings, lora_cfg: LoRAConfig):
    """Stage-1 weights for the student: a safetensors file (PEFT adapters; with full training, official DiT weights
    as `export_dit` writes them) or a Stage-1 workdir / checkpoints folder (its newest checkpoint's `item`)."""
    p = Path(path)
    if p.is_file():
        if networks.full:
            from liveavatar_jax.weights import keymap
            from liveavatar_jax.weights.checkpoint import open_checkpoint
            from liveavatar_jax.weights.dit_keys import RULES
            from flax import nnx

            _, params, _ = nnx.split(abstract_model(networks.model_cfg), nnx.Param, ...)
            tree = keymap.load_params(params, open_checkpoint(p), RULES, what="the student DiT")
        else:
            tree = import_peft(p, networks.abstract_lora(), lora_cfg)
        return jax.device_put(tree, shardings)
    if run_checkpoints(p) is None:
        kind = "an official DiT safetensors file" if networks.full else "a LoRA safetensors file"
        raise FileNotFoundError(f"{path}: neither {kind} nor a folder with Stage-1 checkpoints")
    abstract = ts.abstract_with_sharding(networks.abstract_trainable(), shardings)
    return restore_from_run(p, item, abstract, full=networks.full)


class DistillTrainer(_Trainer):
    stage = "distill"
    item_names = ("gen", "critic", "ema", "gen_opt", "critic_opt")
    headline = ("loss", "dmd_loss")

    @property
    def anchor_weight(self) -> float:
        return float(self.config.distill.anchor.weight)

    @property
    def fields(self):
        """The real clip's latents are read only for the flow-matching anchor."""
        if self.anchor_weight > 0:
            return FIELDS
        return tuple(f for f in FIELDS if f != "latents")

    def select_fields(self, arrays: dict) -> dict:
        """The student, teacher and critic all see `distill.motion`'s motion latents: "static" (the reference image
        over the motion frames, as the released inference feeds them) or "clip" (the frames before the clip)."""
        static = arrays.pop("static_motion_latents")
        if self.config.distill.motion == "static":
            arrays["motion_latents"] = static
        return arrays

    def __init__(self, config, workdir, mesh=None):
        super().__init__(config, workdir, mesh)
        c = config
        d = c.distill
        self.rcfg = RolloutConfig.from_dict({**d.rollout.to_dict(), "remat": c.remat,
                                             "attention_impl": c.attention_impl})
        self.dcfg = steps_lib.DMDConfig.from_dict({**d.dmd.to_dict(), "ema_decay": c.ema.decay,
                                                   "ema_start": c.ema.start_step, "remat": c.remat,
                                                   "attention_impl": c.attention_impl})
        if d.motion not in ("static", "clip"):
            raise ValueError(f"distill.motion must be 'static' or 'clip', got {d.motion!r}")
        if self.spec.frames != self.rcfg.num_frames:
            raise ValueError(f"data.spec.frames {self.spec.frames} differs from the rollout length "
                             f"{self.rcfg.num_blocks} x {self.rcfg.frames_per_block} = {self.rcfg.num_frames}")
        self.generator_every = int(d.generator_every)
        self.tx_gen = ts.make_optimizer(d.generator_optimizer, max(1, c.total_steps // d.generator_every))
        self.tx_critic = ts.make_optimizer(d.critic_optimizer, c.total_steps)
        lora_cfg = LoRAConfig.from_dict(c.lora)
        if d.init_student:
            gen = load_student_init(d.init_student, d.init_student_item, self.networks, self.lora_shardings, lora_cfg)
        else:
            gen = self.init_trainable(int(c.seed))
        # full: the fake score starts as the real score (the teacher run's weights), as in DMD
        critic = self.init_trainable(int(c.seed) + 1)
        state = jax.jit(partial(ts.init_distill_state, tx_gen=self.tx_gen, tx_critic=self.tx_critic,
                                seed=int(c.seed)))(gen, critic)
        self.state_shardings = ts.tree_shardings(state, self.mesh)
        self.state = jax.device_put(state, self.state_shardings)
        negative = read_negative_text(c.data.path)
        if negative is None:
            negative = np.zeros((1, self.spec.text_dim), np.float32)
            log.warning("%s has no negative prompt context; the teacher's null branch uses an empty one", c.data.path)
        text = np.zeros((self.spec.text_len, self.spec.text_dim), np.float32)
        text[: negative.shape[0]] = negative[: self.spec.text_len]
        self.negative_text = jax.device_put(jnp.asarray(text), ts.replicated(self.mesh))

        net, rcfg, dcfg = self.networks, self.rcfg, self.dcfg
        rep = ts.replicated(self.mesh)

        def plan_fn(batch, rng, step, stream):
            return steps_lib.draw_plan(rcfg, batch, ts.step_key(rng, step, stream))

        def direction_fn(critic, base, batch, video, rng, step, negative_text):
            return steps_lib.dmd_direction(net, critic, base, video, ts.step_key(rng, step, 0),
                                           steps_lib.conditions(batch), negative_text, dcfg)

        def critic_fn(state, base, batch, video):
            return steps_lib.critic_update(net, dcfg, self.tx_critic, state, base, batch, video,
                                           steps_lib.critic_key(state))

        self.plan_fn = jax.jit(plan_fn)
        self.rollout_fn = jax.jit(partial(steps_lib.generate, net, rcfg))
        self.direction_fn = jax.jit(direction_fn)
        self.generator_grads_fn = jax.jit(partial(steps_lib.generator_grads, net, rcfg, dcfg),
                                          out_shardings=(rep, self.lora_shardings))
        self.generator_apply_fn = jax.jit(partial(steps_lib.generator_apply, dcfg, self.tx_gen),
                                          out_shardings=(self.state_shardings, rep), donate_argnums=(0,))
        self.critic_fn = jax.jit(critic_fn, out_shardings=(self.state_shardings, rep), donate_argnums=(0,))
        if self.anchor_weight > 0:
            pcfg = steps_lib.anchor_pretrain_config(rcfg, d.anchor)

            def anchor_fn(gen, base, batch, rng, step, dmd_grads):
                return steps_lib.anchored_grads(net, pcfg, self.anchor_weight, gen, base, batch,
                                                ts.step_key(rng, step, steps_lib.ANCHOR_STREAM), dmd_grads)

            self.anchor_fn = jax.jit(anchor_fn, out_shardings=(rep, self.lora_shardings), donate_argnums=(5,))

    def exports(self, state):
        k = self.kind
        return {f"student_{k}": state.gen, f"student_{k}_ema": state.ema, f"critic_{k}": state.critic}

    def generator_iteration(self, state, batch):
        plan = self.plan_fn(batch, state.rng, state.step, 0)
        result = self.rollout_fn(state.gen, self.base, batch, plan)
        direction, aux = self.direction_fn(state.critic, self.base, batch, result.video, state.rng, state.step,
                                           self.negative_text)
        loss, grads = self.generator_grads_fn(state.gen, self.base, batch, plan, result, direction)
        if self.anchor_weight > 0:
            aux["anchor_loss"], grads = self.anchor_fn(state.gen, self.base, batch, state.rng, state.step, grads)
        state, metrics = self.generator_apply_fn(state, grads, loss, plan)
        return state, {**metrics, **aux}

    def critic_iteration(self, state, batch):
        plan = self.plan_fn(batch, state.rng, state.step, steps_lib.CRITIC_STREAM)
        result = self.rollout_fn(state.gen, self.base, batch, plan)
        return self.critic_fn(state, self.base, batch, result.video)

    def train_step(self, step: int, state):
        row, tokens = {}, 0
        video_tokens = int(self.config.data.batch_size) * self.spec.frames * self.tokens_per_frame
        if step % self.generator_every == 0:
            batch, ids = self.next_batch()
            state, gm = self.generator_iteration(state, batch)
            gm = jax.device_get(gm)
            self.check_finite(step + 1, {"dmd_loss": gm["loss"]}, ids, names=("dmd_loss",))
            row.update({"dmd_loss": gm["loss"], "gen/grad_norm": gm["grad_norm"],
                        "gen/update_norm": gm["update_norm"], "gen/exit_step": gm["exit_step"],
                        "gen/dmd_t": gm["dmd_t"]})
            if "anchor_loss" in gm:
                row["gen/anchor_loss"] = gm["anchor_loss"]
            tokens += video_tokens
        batch, ids = self.next_batch()
        state, cm = self.critic_iteration(state, batch)
        cm = jax.device_get(cm)
        self.check_finite(step + 1, cm, ids)
        row.update({"loss": cm["loss"], "critic/grad_norm": cm["grad_norm"],
                    "critic/update_norm": cm["update_norm"], "critic/dmd_t": cm["dmd_t"]})
        return state, row, tokens + video_tokens


TRAINERS = {"pretrain": PretrainTrainer, "distill": DistillTrainer}


def run(config, workdir):
    return TRAINERS[config.stage](config, workdir).fit()


def main(stage: str):
    """The shared entry point of `python -m train.<stage> --config FILE --workdir DIR [--config.key=value ...]`."""
    from absl import app, flags
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file("config", None, "a configs/*.py file", lock_config=True)
    workdir = flags.DEFINE_string("workdir", None, "run folder: checkpoints, metrics.jsonl, tensorboard, exports")
    flags.mark_flags_as_required(["config", "workdir"])

    def _main(argv):
        del argv
        TRAINERS[stage](config.value, workdir.value).fit()

    app.run(_main)
