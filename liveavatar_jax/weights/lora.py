"""Merging the LiveAvatar LoRA (PEFT layout, rank 128, alpha 64) into base weights as they are read.

The LoRA file holds `<module>.lora_A.default.weight` [rank, in] and `<module>.lora_B.default.weight` [out, rank],
usually under a `base_model.model.` prefix. Each target weight becomes W + (alpha / rank) * B @ A, computed in
float32 (PEFT's `merge_and_unload`) and cast by the loader to the model dtype. Unlike the official loader, which
silently skips names that do not land, every adapter must hit a base weight or loading stops with the list.
Any non-LoRA tensor in the file replaces the base tensor of the same name (official `load_state_dict(strict=False)`).
"""

from __future__ import annotations

import re

import numpy as np

from liveavatar_jax.weights.checkpoint import CheckpointError, format_key_list

DEFAULT_ALPHA = 64.0
_LORA = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")
_PREFIX = "base_model.model."


def merge_delta(weight: np.ndarray, a: np.ndarray, b: np.ndarray, alpha: float) -> np.ndarray:
    """W + (alpha / rank) * B @ A in float32; PyTorch layouts (W [out, in], A [rank, in], B [out, rank])."""
    rank = a.shape[0]
    delta = (alpha / rank) * (b.astype(np.float32) @ a.astype(np.float32))
    return weight.astype(np.float32) + delta


class LoraMergedCheckpoint:
    """A checkpoint view whose target weights come out with the LoRA merged in (same interface as `Checkpoint`)."""

    def __init__(self, base, lora, alpha: float = DEFAULT_ALPHA):
        self.base, self.lora, self.alpha = base, lora, alpha
        pairs: dict[str, dict[str, str]] = {}
        self.overrides: dict[str, str] = {}
        for key in lora.keys():
            m = _LORA.match(key)
            if m:
                pairs.setdefault(m["module"] + ".weight", {})[m["ab"]] = key
            else:
                name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
                self.overrides[name] = key
        incomplete = [k for k, ab in pairs.items() if set(ab) != {"A", "B"}]
        unmatched = [k for k in pairs if k not in base]
        unknown = [k for k in self.overrides if k not in base]
        bad_shape = []
        for k, ab in pairs.items():
            if k in base and set(ab) == {"A", "B"}:
                (r, i), (o, r2) = lora.shape(ab["A"]), lora.shape(ab["B"])
                if r != r2 or tuple(base.shape(k)) != (o, i):
                    bad_shape.append(f"{k}: A {[r, i]} B {[o, r2]} vs weight {list(base.shape(k))}")
        if incomplete or unmatched or unknown or bad_shape:
            lines = [f"{lora.name}: the LoRA does not fit the base checkpoint {base.name}"]
            if incomplete:
                lines.append("  adapters without both lora_A and lora_B: " + format_key_list(incomplete))
            if unmatched or unknown:
                lines.append("  names with no base weight: " + format_key_list(unmatched + unknown))
            if bad_shape:
                lines.append("  wrong shape: " + format_key_list(bad_shape))
            raise CheckpointError("\n".join(lines))
        self.pairs = pairs

    @property
    def name(self) -> str:
        return f"{self.base.name} + LoRA {self.lora.name}"

    def keys(self):
        return self.base.keys()

    def __contains__(self, key):
        return key in self.base

    def shape(self, key):
        return self.base.shape(key)

    def get(self, key):
        if key in self.overrides:
            return self.lora.get(self.overrides[key])
        w = self.base.get(key)
        if key in self.pairs:
            ab = self.pairs[key]
            return merge_delta(w, self.lora.get(ab["A"]), self.lora.get(ab["B"]), self.alpha)
        return w
