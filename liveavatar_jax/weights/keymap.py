"""One table of name rules per model, from official state-dict keys to NNX parameter paths, and the loader using it.

A rule reads like the two names it joins:

    Rule("blocks.{i}.self_attn.q.weight", "blocks.self_attn.q.kernel", LINEAR, stack="i")

`{name}` fields match integers. The field named by `stack` is the index along the leading axis of a parameter that
stacks all layers (scan over layers); the other fields must appear in the target too. Because a rule can be read in
both directions, a missing tensor is reported under its official name.

`load_params` fills an abstract NNX parameter state (from `nnx.eval_shape`) tensor by tensor: each stacked leaf is
assembled in one host buffer of the target dtype and moved to the device before the next leaf is read, so the host
never holds a second copy of the model.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import jax
import numpy as np
from flax import nnx

from liveavatar_jax.weights.checkpoint import format_key_list, mismatch_error

Transform = Callable[[np.ndarray], np.ndarray]


def IDENTITY(w):
    return w


def LINEAR(w):
    """PyTorch Linear [out, in] -> Flax kernel [in, out]."""
    return w.T


def CONV1D(w):
    """PyTorch Conv1d [O, I, K] -> [K, I, O]."""
    return w.transpose(2, 1, 0)


def CONV2D(w):
    """PyTorch Conv2d [O, I, H, W] -> [H, W, I, O]."""
    return w.transpose(2, 3, 1, 0)


def CONV3D(w):
    """PyTorch Conv3d [O, I, T, H, W] -> [T, H, W, I, O]."""
    return w.transpose(2, 3, 4, 1, 0)


def squeeze_to(*shape_axes: int) -> Transform:
    """Drops the given size-1 axes (e.g. `modulation` [1, 6, D] -> [6, D])."""
    return lambda w: np.squeeze(w, axis=shape_axes)


_FIELD = re.compile(r"\{(\w+)\}")


def _template_regex(template: str) -> re.Pattern:
    parts, pos = [], 0
    for m in _FIELD.finditer(template):
        parts.append(re.escape(template[pos:m.start()]))
        parts.append(f"(?P<{m.group(1)}>\\d+)")
        pos = m.end()
    parts.append(re.escape(template[pos:]))
    return re.compile("".join(parts) + r"\Z")


@dataclass(frozen=True)
class Rule:
    source: str                       # official key template, e.g. "blocks.{i}.ffn.0.weight"
    target: str                       # NNX path template (dotted), e.g. "blocks.ffn_in.kernel"
    transform: Transform = IDENTITY   # official layout -> our layout, per tensor (per layer when stacked)
    stack: str | None = None          # field that indexes the leading (layer) axis of the target

    def match_source(self, key: str) -> dict[str, int] | None:
        m = _template_regex(self.source).match(key)
        return None if m is None else {k: int(v) for k, v in m.groupdict().items()}

    def match_target(self, path: str) -> dict[str, int] | None:
        m = _template_regex(self.target).match(path)
        return None if m is None else {k: int(v) for k, v in m.groupdict().items()}


def flat_paths(state) -> dict[str, jax.ShapeDtypeStruct]:
    """{dotted path: abstract leaf} of an (abstract) NNX state."""
    out = {}
    for path, var in nnx.to_flat_state(state):
        value = var.get_value() if hasattr(var, "get_value") else var
        out[".".join(str(p) for p in path)] = value
    return out


def _nest(flat: Mapping[str, object]) -> dict:
    tree: dict = {}
    for dotted, value in flat.items():
        node = tree
        parts = [int(p) if p.isdigit() else p for p in dotted.split(".")]
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return tree


def expected_source_keys(abstract_flat: Mapping[str, jax.ShapeDtypeStruct], rules: Iterable[Rule]) -> dict[str, tuple]:
    """{official key: (target path, stack index or None)} for every parameter the abstract state holds."""
    rules = list(rules)
    out: dict[str, tuple] = {}
    unmapped = []
    for path, leaf in abstract_flat.items():
        for rule in rules:
            fields = rule.match_target(path)
            if fields is None:
                continue
            if rule.stack is None:
                out[rule.source.format(**fields)] = (path, None)
            else:
                for i in range(leaf.shape[0]):
                    out[rule.source.format(**fields, **{rule.stack: i})] = (path, i)
            break
        else:
            unmapped.append(path)
    if unmapped:
        raise ValueError("no weight-name rule produces these model parameters (a gap in the rule table): "
                         + format_key_list(unmapped))
    return out


def check_params(abstract_state, ckpt, rules: Iterable[Rule], *, what: str = "the model", strict: bool = True):
    """Checks `ckpt` against `abstract_state` from headers only: every official key must map to a parameter and every
    parameter must be covered with the right shape; otherwise one `CheckpointError` lists the missing, unexpected
    and mis-shaped keys and names the checkpoint. Returns (flat abstract leaves, {path: [(key, stack index)]},
    {path: rule}) for loading."""
    rules = list(rules)
    flat = flat_paths(abstract_state)
    expected = expected_source_keys(flat, rules)
    present = set(ckpt.keys())
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected)) if strict else []

    by_target: dict[str, list[tuple[str, int | None]]] = defaultdict(list)
    rule_of: dict[str, Rule] = {}
    for key, (path, index) in expected.items():
        if key in present:
            by_target[path].append((key, index))
    for path in flat:
        rule_of[path] = next(r for r in rules if r.match_target(path) is not None)

    misshaped = []
    for path, entries in by_target.items():
        rule, leaf = rule_of[path], flat[path]
        want = leaf.shape[1:] if rule.stack else leaf.shape
        for key, _ in entries:
            probe = np.broadcast_to(np.zeros((), np.bool_), ckpt.shape(key))   # a shape without memory
            if tuple(rule.transform(probe).shape) != tuple(want):
                misshaped.append(f"{key}: {list(ckpt.shape(key))} (expected {list(_untransformed_shape(rule, want))})")
    error = mismatch_error(f"{ckpt.name}: does not match {what}", missing, unexpected, misshaped)
    if error is not None:
        raise error
    return flat, by_target, rule_of


def load_params(abstract_state, ckpt, rules: Iterable[Rule], *, dtype=None,
                sharding: Callable[[str], jax.sharding.Sharding] | None = None,
                strict: bool = True, what: str = "the model") -> dict:
    """Reads `ckpt` (a `Checkpoint`-like object: keys(), shape(), get(), name) into a pure dict for `abstract_state`,
    after `check_params` (so a bad checkpoint fails before any tensor is read). `dtype` overrides the abstract
    leaves' dtype (floating leaves only)."""
    flat, by_target, rule_of = check_params(abstract_state, ckpt, rules, what=what, strict=strict)

    def target_dtype(leaf):
        if dtype is not None and np.issubdtype(leaf.dtype, np.floating):
            return np.dtype(dtype)
        return np.dtype(leaf.dtype)

    out = {}
    for path, leaf in flat.items():
        rule, dt = rule_of[path], target_dtype(leaf)
        entries = by_target[path]
        if rule.stack is None:
            (key, _), = entries
            host = np.asarray(rule.transform(ckpt.get(key)), dtype=dt)
        else:
            host = np.empty(leaf.shape, dtype=dt)
            for key, index in entries:
                host[index] = rule.transform(ckpt.get(key))
        out[path] = jax.device_put(host, sharding(path)) if sharding is not None else jax.device_put(host)
        del host
    return _nest(out)


def _untransformed_shape(rule: Rule, want) -> tuple:
    """The official shape that maps onto `want`, for error messages (transposes are their own inverse here)."""
    probe = np.empty(want, dtype=np.bool_)
    if rule.transform in (LINEAR, IDENTITY):
        return rule.transform(probe).shape
    inverse = {CONV1D: (2, 1, 0), CONV2D: (3, 2, 0, 1), CONV3D: (4, 3, 0, 1, 2)}.get(rule.transform)
    return probe.transpose(inverse).shape if inverse else tuple(want)


def merge_into(abstract_state, pure: dict):
    """Returns a concrete NNX state: `abstract_state` with its leaves replaced by the loaded arrays."""
    nnx.replace_by_pure_dict(abstract_state, pure)
    return abstract_state


def fill_model(abstract_model, ckpt, rules: Iterable[Rule], *, dtype=None, sharding=None):
    """The model of `abstract_model` (from `nnx.eval_shape`) with its parameters read from `ckpt` through `rules`
    (`load_params`: strict, one error for every mismatch); state that is not a parameter is kept as it is."""
    graphdef, params, rest = nnx.split(abstract_model, nnx.Param, ...)
    pure = load_params(params, ckpt, rules, dtype=dtype, sharding=sharding)
    return nnx.merge(graphdef, merge_into(params, pure), rest)
