"""Trainable LoRA adapters on one shared, frozen DiT base (training.md 7.3, 8.5).

The teacher, the student and the critic are the same `CausalS2VDiT` weights: the teacher is the plain base, the student
and the critic are the base plus their own low-rank adapters. `Networks` holds one copy of the base and two graph
definitions (plain and adapted) whose base parameter paths are identical, so a forward of any of the three networks is
`nnx.merge(graphdef, adapters, base)` inside the jitted function; only the small adapter trees are trained, saved and
sharded per network.

Adapters follow PEFT's LoRA as LiveAvatar configures it: targets chosen by suffix match on the official module names
(`q, k, v, o, ffn.0, ffn.2`: self- and cross-attention, FFN in/out of every block and the audio injectors' attention,
448 layers at 14B), `y = base(x) + (alpha / rank) * (x A) B` added after the base output is rounded to the compute
dtype, A kaiming-uniform(a=sqrt 5) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)), B zero, so a fresh adapter is the identity.
Adapters are float32 masters; they are cast to the compute dtype for the matmuls. `export_peft` / `import_peft`
convert to and from the released `liveavatar.safetensors` layout that `weights.lora.LoraMergedCheckpoint` merges.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from liveavatar_jax.models.dit import CausalS2VDiT, Dense, DiTConfig
from liveavatar_jax.weights.checkpoint import CheckpointError, mismatch_error

DEFAULT_TARGETS = ("q", "k", "v", "o", "ffn.0", "ffn.2")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    rank: int = 128
    alpha: float = 64.0
    targets: tuple[str, ...] = DEFAULT_TARGETS   # PEFT `target_modules`: suffixes of official module names
    dtype: str = "float32"                       # master dtype of A and B

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_dict(cls, d: Mapping) -> "LoRAConfig":
        d = dict(d)
        if "targets" in d:
            d["targets"] = tuple(d["targets"])
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


# Every Linear of the DiT that PEFT could wrap: (official module name with the layer index as {i}, our module path).
_LINEAR_MODULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    *[(f"blocks.{{i}}.self_attn.{p}", ("blocks", "self_attn", p)) for p in "qkvo"],
    *[(f"blocks.{{i}}.cross_attn.{p}", ("blocks", "cross_attn", p)) for p in "qkvo"],
    ("blocks.{i}.ffn.0", ("blocks", "ffn_in")),
    ("blocks.{i}.ffn.2", ("blocks", "ffn_out")),
    *[(f"audio_injector.injector.{{i}}.{p}", ("audio_injectors", "attn", p)) for p in "qkvo"],
    ("audio_injector.injector_adain_layers.{i}.linear", ("audio_injectors", "adain")),
    ("text_embedding.0", ("text_in",)),
    ("text_embedding.2", ("text_out",)),
    ("time_embedding.0", ("time_in",)),
    ("time_embedding.2", ("time_out",)),
    ("time_projection.1", ("time_projection",)),
    ("head.head", ("head",)),
    ("casual_audio_encoder.encoder.final_linear", ("audio_encoder", "final_linear")),
)


def _peft_match(official: str, targets: Sequence[str]) -> bool:
    return any(official == t or official.endswith("." + t) for t in targets)


def target_modules(targets: Sequence[str] = DEFAULT_TARGETS) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The (official name template, module path) pairs PEFT's suffix match selects; the same for every layer."""
    chosen = tuple((name, path) for name, path in _LINEAR_MODULES if _peft_match(name.replace("{i}", "0"), targets))
    if not chosen:
        raise ValueError(f"LoRA targets {tuple(targets)} match no Linear layer of the DiT")
    return chosen


class LoRADense(Dense):
    """A `Dense` whose base kernel/bias stay where they were (same parameter paths) plus stacked adapters."""

    def __init__(self, base: Dense, rank: int, scale: float, *, key, lora_dtype):
        self.kernel = base.kernel
        self.bias = base.bias
        self.dtype = base.dtype
        *lead, din, dout = base.kernel.shape
        bound = 1.0 / np.sqrt(din)
        self.lora_a = nnx.LoRAParam(jax.random.uniform(key, (*lead, din, rank), lora_dtype, -bound, bound))
        self.lora_b = nnx.LoRAParam(jnp.zeros((*lead, rank, dout), lora_dtype))
        self.scale = float(scale)

    def __call__(self, x, dtype=None):
        dt = dtype or self.dtype
        y = super().__call__(x, dtype)
        low = jnp.dot(x.astype(dt), self.lora_a[...].astype(dt), preferred_element_type=jnp.float32).astype(dt)
        delta = jnp.dot(low, self.lora_b[...].astype(dt), preferred_element_type=jnp.float32) * self.scale
        return (y.astype(jnp.float32) + delta.astype(dt).astype(jnp.float32)).astype(dt)


def _get(module, path):
    for p in path:
        module = getattr(module, p)
    return module


def _set(module, path, value):
    setattr(_get(module, path[:-1]), path[-1], value)


def add_lora(model: CausalS2VDiT, cfg: LoRAConfig, key) -> CausalS2VDiT:
    """Wraps the target Linears of `model` in place; returns the model."""
    targets = target_modules(cfg.targets)
    keys = jax.random.split(key, len(targets))
    for k, (_, path) in zip(keys, targets):
        base = _get(model, path)
        if isinstance(base, LoRADense):
            raise ValueError(f"{'.'.join(path)} already carries a LoRA adapter")
        _set(model, path, LoRADense(base, cfg.rank, cfg.scale, key=k, lora_dtype=jnp.dtype(cfg.dtype)))
    return model


@dataclasses.dataclass
class Networks:
    """One frozen base and the two graph definitions that run it with and without adapters.

    With `full` (config `train_params = "full"`, for networks trained from scratch) the trained tree is every DiT
    parameter instead of adapters: `adapted(params, base)` runs `params` alone and the base only seeds the trees and
    serves as the frozen teacher (`plain`). Everything that takes "adapters" (steps, rollout, checkpoints) then takes
    the full parameter tree unchanged.
    """

    plain_def: nnx.GraphDef
    lora_def: nnx.GraphDef
    base: dict              # pure dict of the base parameters (frozen, shared by all networks)
    lora_template: dict     # pure dict of ShapeDtypeStructs: the adapter tree's shapes and dtypes
    model_cfg: DiTConfig
    lora_cfg: LoRAConfig
    full: bool = False

    def plain(self, base=None) -> CausalS2VDiT:
        return nnx.merge(self.plain_def, self.base if base is None else base)

    def adapted(self, lora, base=None) -> CausalS2VDiT:
        """The trained network: base + adapters, or (full) the parameter tree `lora` itself."""
        if self.full:
            return nnx.merge(self.plain_def, lora)
        return nnx.merge(self.lora_def, lora, self.base if base is None else base)

    @property
    def trainable_template(self) -> dict:
        """Shapes and dtypes of the trained tree: the adapters, or (full) the base parameters."""
        return self.abstract_base() if self.full else self.lora_template

    def abstract_base(self) -> dict:
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), self.base)

    def abstract_trainable(self) -> dict:
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), self.trainable_template)

    def init_lora(self, key) -> dict:
        """A fresh adapter tree: A kaiming-uniform from `key`, B zero (the adapted network equals the base)."""
        leaves, treedef = jax.tree.flatten_with_path(self.lora_template)
        keys = jax.random.split(key, len(leaves))
        out = []
        for k, (path, leaf) in zip(keys, leaves):
            name = str(path[-1].key)
            if name == "lora_b":
                out.append(jnp.zeros(leaf.shape, leaf.dtype))
            else:
                bound = 1.0 / np.sqrt(leaf.shape[-2])
                out.append(jax.random.uniform(k, leaf.shape, leaf.dtype, -bound, bound))
        return jax.tree.unflatten(treedef, out)

    def abstract_lora(self) -> dict:
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), self.lora_template)


def build_networks(model: CausalS2VDiT, lora_cfg: LoRAConfig, full: bool = False) -> Networks:
    """Splits `model` (concrete or abstract, from `nnx.eval_shape`) into its frozen base and the adapted/plain graph
    definitions. The adapter template is abstract: `Networks.init_lora` makes the arrays (under jit, sharded).
    `full`: the trained tree is the whole parameter set (see `Networks`)."""
    plain_def, base_state = nnx.split(model, nnx.Param)
    adapted = nnx.eval_shape(lambda: add_lora(nnx.merge(plain_def, base_state), lora_cfg, jax.random.key(0)))
    lora_def, lora_state, _ = nnx.split(adapted, nnx.LoRAParam, nnx.Param)
    return Networks(plain_def=plain_def, lora_def=lora_def, base=nnx.to_pure_dict(base_state),
                    lora_template=nnx.to_pure_dict(lora_state), model_cfg=model.cfg, lora_cfg=lora_cfg, full=full)


def count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


# ------------------------------------------------------------------------------------------- PEFT file layout

_PREFIX = "base_model.model."


def _node(tree: Mapping, path: Sequence[str]):
    for p in path:
        tree = tree[p]
    return tree


def peft_tensors(lora: Mapping, cfg: LoRAConfig) -> dict[str, np.ndarray]:
    """{official PEFT name: array} in PyTorch layout (A [rank, in], B [out, rank]), float32."""
    out = {}
    for template, path in target_modules(cfg.targets):
        node = _node(lora, path)
        a, b = np.asarray(node["lora_a"], np.float32), np.asarray(node["lora_b"], np.float32)
        for i in range(a.shape[0]):
            name = _PREFIX + template.format(i=i)
            out[f"{name}.lora_A.default.weight"] = np.ascontiguousarray(a[i].T)
            out[f"{name}.lora_B.default.weight"] = np.ascontiguousarray(b[i].T)
    return out


def export_peft(lora: Mapping, cfg: LoRAConfig, path) -> Path:
    """Writes the adapters as a PEFT safetensors file that `load_dit(..., lora=path)` merges at alpha/rank."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(peft_tensors(lora, cfg), str(path),
              metadata={"rank": str(cfg.rank), "alpha": str(cfg.alpha), "format": "peft-lora"})
    return path


_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")


def import_peft(path, template: Mapping, cfg: LoRAConfig) -> dict:
    """Reads a PEFT LoRA file into an adapter tree shaped like `template` (strict: every adapter of the template must
    be present with the right shape and no file entry may be left over; errors name the file)."""
    from liveavatar_jax.weights.checkpoint import open_checkpoint

    ckpt = open_checkpoint(path)
    found = {}
    for key in ckpt.keys():
        m = _PEFT_KEY.match(key)
        if m is None:
            raise CheckpointError(f"{ckpt.name}: {key} is not a LoRA adapter tensor")
        found[(m["module"], m["ab"])] = key
    used, missing, misshaped = set(), [], []
    out = jax.tree.map(lambda a: np.zeros(a.shape, np.float32), dict(template))
    for template_name, path_ in target_modules(cfg.targets):
        node_t, node_o = _node(template, path_), _node(out, path_)
        layers = node_t["lora_a"].shape[0]
        for i in range(layers):
            module = template_name.format(i=i)
            for ab, leaf in (("A", "lora_a"), ("B", "lora_b")):
                key = found.get((module, ab))
                if key is None:
                    missing.append(f"{module}.lora_{ab}")
                    continue
                used.add((module, ab))
                w = np.asarray(ckpt.get(key), np.float32).T
                if w.shape != tuple(node_t[leaf].shape[1:]):
                    misshaped.append(f"{key}: {list(w.T.shape)}")
                    continue
                node_o[leaf][i] = w
    extra = [found[k] for k in found if k not in used]
    error = mismatch_error(f"{ckpt.name}: the LoRA file does not fit adapters of rank {cfg.rank} on {cfg.targets}",
                           missing, extra, misshaped)
    if error is not None:
        raise error
    return jax.tree.map(lambda a, t: jnp.asarray(a, t.dtype), out, dict(template))
