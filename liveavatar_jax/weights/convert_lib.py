"""Turning an official LiveAvatar checkpoint folder into one that run time loads without unpickling anything.

Input (`ckpt_dir`): the official `ckpt/` folder that holds `Wan2.2-S2V-14B/`, or the `Wan2.2-S2V-14B/` folder itself
(architecture.md 7.1); when `ckpt_dir/Wan2.2-S2V-14B/` exists it is used. The LiveAvatar LoRA is passed explicitly,
because `hf_hub_download` leaves it deep inside a hub cache folder.

Output (`out_dir`), the same names as the official folder with every pickle replaced by safetensors:

    config.json, configuration.json                                    copied
    diffusion_pytorch_model-0000k-of-0000n.safetensors + .index.json  copied (or one diffusion_pytorch_model.safetensors)
    Wan2.1_VAE.safetensors                                             from Wan2.1_VAE.pth, same keys and dtypes (fp32)
    models_t5_umt5-xxl-enc-bf16.safetensors                            from the .pth, same keys and dtypes (bf16)
    google/umt5-xxl/                                                   tokenizer files, copied
    wav2vec2-large-xlsr-53-english/                                    config/preprocessor/vocab files + model.safetensors
                                                                       (copied, or made from pytorch_model.bin)
    liveavatar.safetensors                                             the LoRA, copied (with --lora)
    manifest.json                                                      what was converted, from what, with sha256

Every output file is written under a temporary name and renamed into place when complete; only then is it recorded in
manifest.json (itself replaced atomically). A killed conversion therefore leaves at most a stale temporary file, and
the next run skips every recorded file whose size and source (size, mtime) still match.

After its files are written each component is checked against its model: every tensor of the output must be one that
the model's rule table (liveavatar_jax.weights.*_keys) expects, with the shape the model needs, and none may be
missing (wav2vec2, small, is loaded for real through its loader, which also folds its weight norm; the LoRA must fit
the converted DiT). `REGISTRY` maps each component to that check, which builds the model abstractly (no memory) and
applies the model's rule table; the models' modules are imported lazily, so a model that is not available yet leaves
its component recorded in the manifest as unverified, with the reason, instead of failing the conversion.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from liveavatar_jax.weights.checkpoint import CheckpointError, open_checkpoint
from liveavatar_jax.weights.pth import PthCheckpoint

BASE_SUBDIR = "Wan2.2-S2V-14B"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "liveavatar-jax-converted/1"
VAE_NAME = "Wan2.1_VAE"
T5_NAME = "models_t5_umt5-xxl-enc-bf16"
TOKENIZER_DIR = "google/umt5-xxl"
WAV2VEC2_DIR = "wav2vec2-large-xlsr-53-english"
LORA_NAME = "liveavatar.safetensors"
DIT_SINGLE = "diffusion_pytorch_model.safetensors"
PARTIAL_SUFFIX = ".partial"
_CHUNK = 64 * 2**20
# Files of the HF wav2vec2 folder run time needs besides the weights (the flax/tf weights are not copied).
_WAV2VEC2_SMALL_FILES = re.compile(r".*\.(json|txt)\Z")

_ST_NAMES = {
    np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
    np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int16): "I16", np.dtype(np.int8): "I8",
    np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL",
}


def _st_dtype_name(dtype) -> str:
    import ml_dtypes

    dtype = np.dtype(dtype)
    extra = {np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3",
             np.dtype(ml_dtypes.float8_e5m2): "F8_E5M2"}
    name = _ST_NAMES.get(dtype) or extra.get(dtype)
    if name is None:
        raise CheckpointError(f"dtype {dtype} cannot be stored in safetensors")
    return name


class ConversionError(CheckpointError):
    """A checkpoint folder that cannot be converted as it is; the message names the folder or file."""


# ---------------------------------------------------------------------------------------------------------------
# Writing
class _HashingWriter:
    def __init__(self, f, progress=None):
        self.f, self.sha, self.bytes, self.progress = f, hashlib.sha256(), 0, progress

    def write(self, data):
        data = memoryview(data).cast("B")
        self.f.write(data)
        self.sha.update(data)
        self.bytes += len(data)
        if self.progress is not None:
            self.progress(len(data))


def _atomic_output(path: Path, write: Callable[[_HashingWriter], None], progress=None) -> tuple[int, str]:
    """Runs `write` into `path.partial`, then renames it to `path`; returns (bytes, sha256)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + PARTIAL_SUFFIX)
    try:
        with open(tmp, "wb") as f:
            writer = _HashingWriter(f, progress)
            write(writer)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return writer.bytes, writer.sha.hexdigest()


def write_safetensors(out, tensors: Iterable[tuple[str, tuple, np.dtype, Callable[[], np.ndarray]]],
                      metadata: dict[str, str] | None = None) -> int:
    """Streams tensors into safetensors format, one at a time: each entry is (name, shape, dtype, read function).

    The header is built from shapes and dtypes first, so no tensor has to be held while the others are written.
    Returns the number of tensors.
    """
    tensors = list(tensors)
    header: dict = {"__metadata__": dict(metadata or {})} if metadata else {}
    offset = 0
    for name, shape, dtype, _ in tensors:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _st_dtype_name(dtype), "shape": [int(s) for s in shape],
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    out.write(len(raw).to_bytes(8, "little"))
    out.write(raw)
    for name, shape, dtype, read in tensors:
        array = read()
        if tuple(array.shape) != tuple(shape) or array.dtype != np.dtype(dtype):
            raise CheckpointError(f"tensor {name!r} changed while it was written ({array.shape} {array.dtype})")
        array = np.ascontiguousarray(array)
        if array.nbytes:
            out.write(array.reshape(-1).view(np.uint8))
    return len(tensors)


# ---------------------------------------------------------------------------------------------------------------
# Shape checks of a converted file against a model
def check_against_rules(ckpt, abstract_state, rules, what: str) -> int:
    """Every tensor of `ckpt` must be a parameter of `abstract_state` under `rules`, with the model's shape, and every
    parameter must be present. Reads headers only. Returns the number of tensors checked."""
    from liveavatar_jax.weights.keymap import check_params

    check_params(abstract_state, ckpt, rules, what=what)
    return len(ckpt.keys())


class ModelUnavailable(Exception):
    """The model a component is checked against cannot be built (its module is not there yet)."""


@dataclass(frozen=True)
class Component:
    """How one converted component is checked against its model.

    `check(ckpt, out_dir, files, config)` raises `CheckpointError` on a mismatch, `ModelUnavailable` when the model
    cannot be built, and otherwise returns a one-line description of what was checked. `module` names the weight-rule
    module it imports (lazily, so a model written later plugs in without touching this table). `config=None` means
    the real model sizes (or the checkpoint's own config.json where the official folder has one).
    """
    name: str
    module: str
    check: Callable


def _import(module: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):  # the module itself is absent, not one of its imports
            raise ModelUnavailable(f"{module} is not available yet") from None
        raise


def _attr(module, *names):
    for name in names:
        if hasattr(module, name):
            return getattr(module, name)
    raise ModelUnavailable(f"{module.__name__} has none of {', '.join(names)}")


def _params(abstract):
    from flax import nnx

    return abstract if isinstance(abstract, nnx.State) else nnx.split(abstract, nnx.Param, ...)[1]


def _check_t5(ckpt, out_dir: Path, files, config) -> str:
    keys = _import("liveavatar_jax.weights.umt5_keys")
    from liveavatar_jax.models.umt5 import UMT5_XXL

    config = config or UMT5_XXL
    what = f"UMT5Encoder({config})"
    check_against_rules(ckpt, _params(keys.abstract_umt5(config)), keys.UMT5_RULES, what)
    return what


def _check_dit(ckpt, out_dir: Path, files, config) -> str:
    keys = _import("liveavatar_jax.weights.dit_keys")
    dit = _import("liveavatar_jax.models.dit")
    if config is None:
        try:
            config = dit.DiTConfig.from_official(json.loads((out_dir / "config.json").read_text()),
                                                 dtype="bfloat16")
        except (OSError, json.JSONDecodeError, ValueError, TypeError) as e:
            raise CheckpointError(f"{out_dir / 'config.json'}: cannot build the DiT config from it ({e})") from None
    what = f"CausalS2VDiT({config})"
    check_against_rules(ckpt, _params(dit.abstract_model(config)), keys.RULES, what)
    return what


def _check_wav2vec2(ckpt, out_dir: Path, files, config) -> str:
    keys = _import("liveavatar_jax.weights.wav2vec2_keys")
    import jax

    folder = out_dir / Path(next(f for f in files if f.endswith(".safetensors"))).parent
    # Its loader folds the weight-normed positional conv and knows which extras to ignore; the model is small
    # (0.3B), so it is loaded for real, on the host.
    with jax.default_device(jax.devices("cpu")[0]):
        keys.load_wav2vec2(folder, config)
    return f"Wav2Vec2ForCTC({config or folder / 'config.json'}), loaded through load_wav2vec2"


def _check_vae(ckpt, out_dir: Path, files, config) -> str:
    """Against `models.vae.WanVAE` at the real Wan2.1 sizes (`WAN21_VAE`) with the rule table of `vae_keys`
    (`VAE_RULES` or `RULES`; its `abstract_vae(config)` when it has one)."""
    keys = _import("liveavatar_jax.weights.vae_keys")
    vae = _import("liveavatar_jax.models.vae")
    from flax import nnx

    config = config or vae.WAN21_VAE
    rules = _attr(keys, "VAE_RULES", "RULES")
    if hasattr(keys, "abstract_vae"):
        abstract = keys.abstract_vae(config)
    else:
        abstract = nnx.eval_shape(lambda: vae.WanVAE(config, rngs=nnx.Rngs(0)))
    what = f"WanVAE({config})"
    check_against_rules(ckpt, _params(abstract), rules, what)
    return what


REGISTRY: dict[str, Component] = {
    "t5": Component("t5", "liveavatar_jax.weights.umt5_keys", _check_t5),
    "dit": Component("dit", "liveavatar_jax.weights.dit_keys", _check_dit),
    "wav2vec2": Component("wav2vec2", "liveavatar_jax.weights.wav2vec2_keys", _check_wav2vec2),
    "vae": Component("vae", "liveavatar_jax.weights.vae_keys", _check_vae),
}


# ---------------------------------------------------------------------------------------------------------------
# Planning
@dataclass
class Unit:
    """One output file: `action` is 'copy' or 'pth' (torch pickle -> safetensors)."""
    component: str
    out: str           # path relative to out_dir, with forward slashes
    source: Path
    action: str

    @property
    def is_tensors(self) -> bool:
        return self.out.endswith(".safetensors")


@dataclass
class Plan:
    base: Path
    units: list[Unit] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def component_files(self, name: str) -> list[str]:
        return [u.out for u in self.units if u.component == name]


def find_base(ckpt_dir: Path) -> Path:
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise ConversionError(f"{ckpt_dir}: no such folder")
    nested = ckpt_dir / BASE_SUBDIR
    return nested if nested.is_dir() else ckpt_dir


def plan_conversion(ckpt_dir: Path, lora: Path | None = None) -> Plan:
    base = find_base(ckpt_dir)
    plan = Plan(base)
    add = plan.units.append

    # DiT: the sharded index names its shards; a single file has no index.
    indexes = sorted(base.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise ConversionError(f"{base}: holds {len(indexes)} safetensors index files, expected one")
    if indexes:
        try:
            shards = sorted(set(json.loads(indexes[0].read_text())["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ConversionError(f"{indexes[0]}: not a safetensors index ({e})") from None
        for shard in shards:
            if not (base / shard).is_file():
                raise ConversionError(f"{indexes[0]}: names {shard}, which is not in {base}")
            add(Unit("dit", shard, base / shard, "copy"))
        add(Unit("dit", indexes[0].name, indexes[0], "copy"))
    elif (base / DIT_SINGLE).is_file():
        add(Unit("dit", DIT_SINGLE, base / DIT_SINGLE, "copy"))
    else:
        plan.missing.append("dit")
    for name in ("config.json", "configuration.json"):
        if (base / name).is_file():
            add(Unit("dit", name, base / name, "copy"))
    if "dit" not in plan.missing and not (base / "config.json").is_file():
        raise ConversionError(f"{base}: has DiT weights but no config.json")

    for component, stem in (("vae", VAE_NAME), ("t5", T5_NAME)):
        if (base / f"{stem}.pth").is_file():
            add(Unit(component, f"{stem}.safetensors", base / f"{stem}.pth", "pth"))
        elif (base / f"{stem}.safetensors").is_file():  # an already converted folder
            add(Unit(component, f"{stem}.safetensors", base / f"{stem}.safetensors", "copy"))
        else:
            plan.missing.append(component)

    tok = base / TOKENIZER_DIR
    tok_files = sorted(p for p in tok.iterdir() if p.is_file()) if tok.is_dir() else []
    if not tok_files:
        plan.missing.append("tokenizer")
    for p in tok_files:
        add(Unit("tokenizer", f"{TOKENIZER_DIR}/{p.name}", p, "copy"))

    w2v = base / WAV2VEC2_DIR
    if not w2v.is_dir():
        candidates = sorted(p for p in base.glob("wav2vec2*") if p.is_dir())
        w2v = candidates[0] if candidates else w2v
    if w2v.is_dir():
        rel = w2v.name
        for p in sorted(w2v.iterdir()):
            if p.is_file() and _WAV2VEC2_SMALL_FILES.match(p.name):
                add(Unit("wav2vec2", f"{rel}/{p.name}", p, "copy"))
        if (w2v / "model.safetensors").is_file():
            add(Unit("wav2vec2", f"{rel}/model.safetensors", w2v / "model.safetensors", "copy"))
        elif (w2v / "pytorch_model.bin").is_file():
            add(Unit("wav2vec2", f"{rel}/model.safetensors", w2v / "pytorch_model.bin", "pth"))
        else:
            raise ConversionError(f"{w2v}: holds neither model.safetensors nor pytorch_model.bin")
        if not (w2v / "config.json").is_file():
            raise ConversionError(f"{w2v}: has no config.json")
    else:
        plan.missing.append("wav2vec2")

    if lora is not None:
        lora = Path(lora)
        if not lora.is_file():
            raise ConversionError(f"{lora}: LoRA file not found")
        add(Unit("lora", LORA_NAME, lora, "pth" if lora.suffix in (".pth", ".pt", ".bin") else "copy"))
    return plan


# ---------------------------------------------------------------------------------------------------------------
# The manifest
def _source_stat(path: Path) -> dict:
    st = path.stat()
    return {"source": str(path.resolve()), "source_bytes": st.st_size, "source_mtime_ns": st.st_mtime_ns}


class Manifest:
    def __init__(self, out_dir: Path):
        self.path = out_dir / MANIFEST
        self.data = {"format": MANIFEST_FORMAT, "files": {}, "components": {}}
        if self.path.is_file():
            try:
                loaded = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError):
                loaded = None  # an unreadable manifest only costs a full re-conversion
            if isinstance(loaded, dict) and loaded.get("format") == MANIFEST_FORMAT:
                self.data = loaded
                self.data.setdefault("files", {})
                self.data.setdefault("components", {})

    @property
    def files(self) -> dict:
        return self.data["files"]

    def is_done(self, unit: Unit, out_dir: Path) -> bool:
        entry = self.files.get(unit.out)
        out = out_dir / unit.out
        if not entry or not out.is_file() or out.stat().st_size != entry.get("bytes"):
            return False
        current = _source_stat(unit.source)
        return all(entry.get(k) == v for k, v in current.items()) and entry.get("action") == unit.action

    def save(self):
        tmp = self.path.with_name(self.path.name + PARTIAL_SUFFIX)
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        os.replace(tmp, self.path)


# ---------------------------------------------------------------------------------------------------------------
# Conversion
@dataclass
class Report:
    out_dir: Path
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    components: dict = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)


def _copy(source: Path):
    def write(out: _HashingWriter):
        with open(source, "rb") as f:
            while chunk := f.read(_CHUNK):
                out.write(chunk)
    return write


def convert_pth_to_safetensors(source: Path, out: _HashingWriter, progress_bytes: Callable[[int], None] | None = None,
                               ) -> int:
    """Writes the tensors of a torch file as safetensors (same names, same dtypes); returns the tensor count."""
    with PthCheckpoint(source) as ckpt:
        def reader(key):
            def read():
                array = ckpt.get(key)
                if progress_bytes is not None:
                    progress_bytes(array.nbytes)
                return array
            return read

        entries = [(k, ckpt.shape(k), ckpt.dtype(k), reader(k)) for k in ckpt.keys()]
        return write_safetensors(out, entries, {"format": "pt", "source": source.name})


def _verify_tokenizer(out_dir: Path) -> dict:
    from liveavatar_jax.text import UMT5Tokenizer

    tok = UMT5Tokenizer(out_dir / TOKENIZER_DIR)
    return {"verified": True, "check": f"tokenizer.json loads; eos id {tok.eos_id}, pad id {tok.pad_id}"}


def verify_lora(lora_path: Path, dit_path: Path | None) -> dict:
    """Every LoRA pair must sit on a DiT weight with matching shapes (the DiT's own LoRA merge view checks this)."""
    lora = open_checkpoint(lora_path)
    if dit_path is None:
        return {"verified": False, "tensors": len(lora.keys()),
                "reason": "no DiT in this conversion to check the LoRA against"}
    try:
        merged = _import("liveavatar_jax.weights.lora")
    except ModelUnavailable as e:
        return {"verified": False, "tensors": len(lora.keys()), "reason": str(e)}
    view = merged.LoraMergedCheckpoint(open_checkpoint(dit_path), lora)
    return {"verified": True, "tensors": len(lora.keys()),
            "check": f"{len(view.pairs)} LoRA pairs, each on a DiT weight of matching shape"}


def verify_component(name: str, out_dir: Path, files: list[str], config=None) -> dict:
    """Checks the converted files of one component against its model; raises CheckpointError on a mismatch."""
    if name == "tokenizer":
        return _verify_tokenizer(out_dir)
    if name == "lora":
        dit_index = sorted(out_dir.glob("*.safetensors.index.json"))
        dit = dit_index[0] if dit_index else (out_dir / DIT_SINGLE if (out_dir / DIT_SINGLE).is_file() else None)
        return verify_lora(out_dir / LORA_NAME, dit)
    if name == "dit":
        index = [f for f in files if f.endswith(".index.json")]
        ckpt = open_checkpoint(out_dir / index[0]) if index else open_checkpoint(out_dir / DIT_SINGLE)
    else:
        (only,) = [f for f in files if f.endswith(".safetensors")]
        ckpt = open_checkpoint(out_dir / only)
    result = {"tensors": len(ckpt.keys())}
    component = REGISTRY.get(name)
    if component is None:
        return {**result, "verified": False, "reason": f"no model registered for {name}"}
    try:
        what = component.check(ckpt, out_dir, files, config)
    except ModelUnavailable as e:
        return {**result, "verified": False, "reason": str(e)}
    return {**result, "verified": True, "check": f"every tensor's name and shape match {what}"}


def convert(ckpt_dir, out_dir, lora=None, *, configs: dict | None = None, allow_missing: bool = False,
            progress: bool = True) -> Report:
    """Converts `ckpt_dir` into `out_dir` (see the module docstring); resumes an interrupted run.

    `configs` maps a component name ('t5', 'vae', 'wav2vec2', 'dit') to the model config its files are checked
    against (default: the real model sizes). Components absent from `ckpt_dir` are an error unless
    `allow_missing`.
    """
    from tqdm import tqdm

    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    plan = plan_conversion(ckpt_dir, Path(lora) if lora is not None else None)
    if out_dir.resolve() == plan.base.resolve() or out_dir.resolve() == ckpt_dir.resolve():
        raise ConversionError(f"{out_dir}: the output folder must differ from the checkpoint folder")
    if plan.missing and not allow_missing:
        raise ConversionError(f"{plan.base}: lacks {', '.join(plan.missing)} (see architecture.md 7.1 for the "
                              f"layout; pass allow_missing to convert the rest)")
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.rglob(f"*{PARTIAL_SUFFIX}"):  # left behind by a killed run
        stale.unlink()
    manifest = Manifest(out_dir)
    manifest.data["source"] = {"ckpt_dir": str(ckpt_dir.resolve()), "base": str(plan.base.resolve()),
                               "lora": str(Path(lora).resolve()) if lora is not None else None}
    manifest.data["complete"] = False
    manifest.save()
    report = Report(out_dir, missing=list(plan.missing))
    todo = [u for u in plan.units if not manifest.is_done(u, out_dir)]
    report.skipped = [u.out for u in plan.units if u not in todo]
    total = sum(u.source.stat().st_size for u in todo)
    configs = dict(configs or {})

    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="converting",
              disable=not progress) as bar:
        for unit in todo:
            bar.set_postfix_str(unit.out, refresh=False)
            target = out_dir / unit.out
            entry = {"component": unit.component, "action": unit.action, **_source_stat(unit.source)}
            if unit.action == "copy":
                size, digest = _atomic_output(target, _copy(unit.source), progress=bar.update)
                if unit.is_tensors:
                    entry["tensors"] = len(open_checkpoint(target).keys())  # also validates the header
            else:
                counted = {"n": 0, "bytes": 0}

                def tensor_done(nbytes):
                    counted["bytes"] += nbytes
                    bar.update(nbytes)

                def write(out, unit=unit):
                    counted["n"] = convert_pth_to_safetensors(unit.source, out, tensor_done)

                size, digest = _atomic_output(target, write)
                # The bar counts source bytes; the pickle and zip overhead is not part of any tensor.
                bar.update(max(0, unit.source.stat().st_size - counted["bytes"]))
                entry["tensors"] = counted["n"]
            entry.update(bytes=size, sha256=digest, finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
            manifest.files[unit.out] = entry
            manifest.save()
            report.written.append(unit.out)

    names = list(dict.fromkeys(u.component for u in plan.units))
    for name in names:
        files = plan.component_files(name)
        result = verify_component(name, out_dir, files, configs.get(name))
        result["files"] = files
        manifest.data["components"][name] = result
        report.components[name] = result
    manifest.data["missing"] = list(plan.missing)
    # Files of an earlier run with other options (e.g. a LoRA) stay recorded while they exist; deleted ones go.
    for gone in [k for k in manifest.files if not (out_dir / k).is_file()]:
        del manifest.files[gone]
    manifest.data["complete"] = not plan.missing
    manifest.save()
    return report
