"""The golden checker: runs a fixture of the official PyTorch code (see ../shared/golden/README.md) through our code.

A fixture folder holds `manifest.json` (its "fixture" field names the kind), `weights.safetensors`,
`inputs.safetensors` and `outputs.safetensors`. Each kind lives in its own module of this package and exposes
`run(fixture) -> {output name: array}`; the checker compares every array of `outputs.safetensors` in float32 at the
relative L2 error the manifest's `tolerances` gives it (1e-4 by default). A reference output that the kind did not
produce is a failure, so a kind cannot pass by leaving outputs out.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

DEFAULT_REL_L2 = 1e-4

# kind -> module implementing run(fixture)
KINDS = {
    "dit_s2v_causal": "liveavatar_jax.golden.dit",
    "stream_loop": "liveavatar_jax.golden.stream_loop",
    "vae": "liveavatar_jax.golden.vae",
    "audio": "liveavatar_jax.golden.audio",
    "t5": "liveavatar_jax.golden.t5",
    "scheduler": "liveavatar_jax.golden.scheduler",
}


class FixtureError(ValueError):
    pass


@dataclass
class Fixture:
    path: Path
    manifest: dict = field(repr=False)

    @classmethod
    def open(cls, path) -> "Fixture":
        path = Path(path)
        mf = path / "manifest.json"
        if not mf.is_file():
            raise FixtureError(f"{path}: no manifest.json (not a golden fixture folder)")
        try:
            manifest = json.loads(mf.read_text())
        except json.JSONDecodeError as e:
            raise FixtureError(f"{mf}: not valid JSON ({e})") from None
        if "fixture" not in manifest:
            raise FixtureError(f"{mf}: has no 'fixture' field naming its kind")
        return cls(path, manifest)

    @property
    def kind(self) -> str:
        return self.manifest["fixture"]

    @property
    def weights_path(self) -> Path:
        return self.path / "weights.safetensors"

    @cached_property
    def inputs(self) -> dict[str, np.ndarray]:
        return load_file(str(self.path / "inputs.safetensors"))

    @cached_property
    def outputs(self) -> dict[str, np.ndarray]:
        return load_file(str(self.path / "outputs.safetensors"))

    def tolerance(self, name: str) -> float:
        tol = self.manifest.get("tolerances") or {}
        return float(tol.get(name, tol.get("default_rel_l2", DEFAULT_REL_L2)))


@dataclass
class Row:
    name: str
    max_abs: float
    rel_l2: float
    tol: float
    ok: bool
    note: str = ""

    def line(self) -> str:
        status = "PASS" if self.ok else "FAIL"
        note = f"  ({self.note})" if self.note else ""
        return f"{self.name:<48} max_abs={self.max_abs:.3e}  rel_l2={self.rel_l2:.3e}  tol={self.tol:.0e}  {status}{note}"


def rel_l2(actual: np.ndarray, expected: np.ndarray) -> float:
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    denom = np.linalg.norm(e)
    num = np.linalg.norm(a - e)
    return float(num / denom) if denom > 0 else float(num)


def compare(fixture: Fixture, actual: dict[str, np.ndarray]) -> list[Row]:
    rows = []
    for name, expected in sorted(fixture.outputs.items()):
        tol = fixture.tolerance(name)
        if name not in actual:
            rows.append(Row(name, float("nan"), float("nan"), tol, False, "not produced"))
            continue
        got = np.asarray(actual[name], np.float32)
        exp = np.asarray(expected, np.float32)
        if got.shape != exp.shape:
            rows.append(Row(name, float("nan"), float("nan"), tol, False, f"shape {got.shape} != {exp.shape}"))
            continue
        err = rel_l2(got, exp)
        max_abs = float(np.max(np.abs(got.astype(np.float64) - exp))) if exp.size else 0.0
        rows.append(Row(name, max_abs, err, tol, bool(np.isfinite(err) and err <= tol)))
    return rows


def run_fixture(path) -> tuple[Fixture, list[Row]]:
    fixture = Fixture.open(path)
    if fixture.kind not in KINDS:
        raise FixtureError(f"{path}: unknown fixture kind {fixture.kind!r} (known: {', '.join(sorted(KINDS))})")
    module = importlib.import_module(KINDS[fixture.kind])
    actual = module.run(fixture)
    return fixture, compare(fixture, actual)
