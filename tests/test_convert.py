"""The conversion command on a tiny official-layout folder built from the golden fixtures."""

import dataclasses
import hashlib
import json
import os
import pickle
import shutil
import zipfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from conftest import golden_dir
from liveavatar_jax.convert import main as convert_main
from liveavatar_jax.golden import rel_l2
from liveavatar_jax.models.umt5 import UMT5Config
from liveavatar_jax.text import PromptEncoder
from liveavatar_jax.weights import convert_lib
from liveavatar_jax.weights.checkpoint import CheckpointError
from liveavatar_jax.weights.convert_lib import ConversionError, convert, plan_conversion
from liveavatar_jax.weights.pth import save_pth
from liveavatar_jax.weights.umt5_keys import load_umt5
from test_umt5 import GOLDEN_PROMPT, make_tokenizer

BASE = "Wan2.2-S2V-14B"
T5_OUT = "models_t5_umt5-xxl-enc-bf16.safetensors"
VAE_OUT = "Wan2.1_VAE.safetensors"
W2V = "wav2vec2-large-xlsr-53-english"
SHARDS = ["diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors"]
LORA_TARGETS = {"blocks.0.self_attn.q": (64, 64), "blocks.1.ffn.0": (128, 64)}  # (out, in) in the tiny DiT


def _manifest(kind):
    return json.loads((golden_dir(kind) / "manifest.json").read_text())


@pytest.fixture(scope="module")
def t5_config():
    return dataclasses.replace(UMT5Config.from_kwargs(_manifest("t5")["constructor_kwargs"]), text_len=16)


@pytest.fixture(scope="module")
def configs(t5_config):
    """The tiny fixture sizes the converted files are checked against (the DiT's come from its config.json)."""
    from liveavatar_jax.models.vae import VAEConfig

    return {"t5": t5_config, "vae": VAEConfig.from_kwargs(_manifest("vae")["constructor_kwargs"])}


def build_official(root, *, evil_vae=False):
    """ckpt/Wan2.2-S2V-14B in the official layout (architecture.md 7.1), tiny, plus a LoRA beside it."""
    base = root / BASE
    base.mkdir(parents=True)
    dit_kwargs = _manifest("dit_s2v_causal")["constructor_kwargs"]
    (base / "config.json").write_text(json.dumps({"_class_name": "WanModel_S2V", **dit_kwargs}))
    (base / "configuration.json").write_text(json.dumps({"framework": "Pytorch", "task": "s2v"}))
    dit = load_file(str(golden_dir("dit_s2v_causal") / "weights.safetensors"))
    keys = sorted(dit)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    weight_map = {}
    for shard, names in zip(SHARDS, halves):
        save_file({k: dit[k] for k in names}, str(base / shard))
        weight_map.update({k: shard for k in names})
    (base / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(v.nbytes for v in dit.values())}, "weight_map": weight_map}))
    pth = golden_dir("pth")
    shutil.copy(pth / "models_t5_umt5-xxl-enc-bf16.pth", base)
    if evil_vae:
        write_evil_pth(base / "Wan2.1_VAE.pth", root / "executed")
    else:
        shutil.copy(pth / "Wan2.1_VAE.pth", base)
    make_tokenizer(base / "google" / "umt5-xxl")
    w2v = base / W2V
    w2v.mkdir()
    (w2v / "config.json").write_text(json.dumps(_manifest("audio")["wav2vec2"]["config"]))
    (w2v / "vocab.json").write_text(json.dumps({"<pad>": 0, "<s>": 1, "</s>": 2}))
    save_pth(load_file(str(golden_dir("audio") / "weights.safetensors")), w2v / "pytorch_model.bin")
    (w2v / "flax_model.msgpack").write_bytes(b"\x00" * 64)  # not needed at run time, not copied
    rng = np.random.default_rng(0)
    lora = {}
    for module, (n_out, n_in) in LORA_TARGETS.items():
        lora[f"base_model.model.{module}.lora_A.default.weight"] = rng.standard_normal((4, n_in)).astype(np.float32)
        lora[f"base_model.model.{module}.lora_B.default.weight"] = rng.standard_normal((n_out, 4)).astype(np.float32)
    (root / "LiveAvatar").mkdir()
    save_file(lora, str(root / "LiveAvatar" / "liveavatar.safetensors"))
    return root, root / "LiveAvatar" / "liveavatar.safetensors"


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_evil_pth(path, marker):
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("Wan2.1_VAE/data.pkl", pickle.dumps({"conv1.weight": _Evil(marker)}, protocol=2))
        z.writestr("Wan2.1_VAE/version", "3\n")


@pytest.fixture(scope="module")
def converted(tmp_path_factory, configs):
    root, lora = build_official(tmp_path_factory.mktemp("official"))
    out = tmp_path_factory.mktemp("converted") / "out"
    report = convert(root, out, lora, configs=configs, progress=False)
    return root, out, report


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_outputs_and_manifest(converted):
    root, out, report = converted
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["missing"] == []
    expected = {*SHARDS, "diffusion_pytorch_model.safetensors.index.json", "config.json", "configuration.json",
                VAE_OUT, T5_OUT, "google/umt5-xxl/tokenizer.json", "google/umt5-xxl/special_tokens_map.json",
                f"{W2V}/config.json", f"{W2V}/vocab.json", f"{W2V}/model.safetensors", "liveavatar.safetensors"}
    assert set(manifest["files"]) == expected == set(report.written)
    for rel, entry in manifest["files"].items():
        assert entry["sha256"] == _sha256(out / rel) and entry["bytes"] == (out / rel).stat().st_size, rel
    assert manifest["files"][T5_OUT]["tensors"] == 22 and manifest["files"][VAE_OUT]["tensors"] == 194
    assert manifest["files"][T5_OUT]["source"].endswith("models_t5_umt5-xxl-enc-bf16.pth")
    assert not list(out.rglob("*.pth")) and not list(out.rglob("*.bin")) and not list(out.rglob("*.msgpack"))
    for name in ("t5", "dit", "wav2vec2", "vae", "tokenizer", "lora"):
        assert manifest["components"][name]["verified"], (name, manifest["components"][name])
    for shard in SHARDS:  # copied byte for byte
        assert _sha256(out / shard) == _sha256(root / BASE / shard)


def test_pth_outputs_keep_names_and_dtypes(converted):
    _, out, _ = converted
    vae = load_file(str(out / VAE_OUT))
    reference = load_file(str(golden_dir("vae") / "weights.safetensors"))
    assert vae.keys() == reference.keys()
    for k, v in reference.items():
        np.testing.assert_array_equal(vae[k], v)
    with safe_open(str(out / T5_OUT), framework="numpy") as f:
        t5 = {k: f.get_tensor(k) for k in f.keys()}
    reference = load_file(str(golden_dir("t5") / "weights.safetensors"))
    assert t5.keys() == reference.keys()
    for k, v in reference.items():
        assert t5[k].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(t5[k].view(np.uint16), v.astype(ml_dtypes.bfloat16).view(np.uint16))
    w2v = load_file(str(out / W2V / "model.safetensors"))
    reference = load_file(str(golden_dir("audio") / "weights.safetensors"))
    assert w2v.keys() == reference.keys()
    for k, v in reference.items():
        np.testing.assert_array_equal(w2v[k], v)


def test_converted_t5_reproduces_golden(converted, t5_config):
    _, out, _ = converted
    t5 = golden_dir("t5")
    inputs, outputs = load_file(str(t5 / "inputs.safetensors")), load_file(str(t5 / "outputs.safetensors"))
    model = load_umt5(out / T5_OUT, t5_config, dtype=jnp.float32)
    got = np.asarray(model(inputs["ids"].astype(np.int32), inputs["mask"].astype(np.int32)))
    # The official file holds bf16-rounded weights: compare with the fixture weights rounded the same way ...
    rounded = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32)
               for k, v in load_file(str(t5 / "weights.safetensors")).items()}
    path = out.parent / "rounded.safetensors"
    save_file(rounded, str(path))
    expected = np.asarray(load_umt5(path, t5_config)(inputs["ids"].astype(np.int32),
                                                     inputs["mask"].astype(np.int32)))
    np.testing.assert_array_equal(got, expected)
    # ... and, through the converted tokenizer, the prompt path lands on the golden context.
    context = PromptEncoder.from_ckpt_dir(out, t5_config, dtype=jnp.float32).encode(GOLDEN_PROMPT)
    assert rel_l2(context, outputs["context_trimmed"]) < 1e-2


def test_converted_dit_vae_wav2vec2_load_like_the_fixtures(converted, configs):
    from flax import nnx

    from liveavatar_jax.models.dit import DiTConfig
    from liveavatar_jax.models.wav2vec2 import Wav2Vec2Config
    from liveavatar_jax.weights.dit_keys import load_dit
    from liveavatar_jax.weights.wav2vec2_keys import load_wav2vec2

    _, out, _ = converted
    cfg = DiTConfig.from_official(json.loads((out / "config.json").read_text()), dtype="float32")
    ours = nnx.state(load_dit(out / "diffusion_pytorch_model.safetensors.index.json", cfg), nnx.Param)
    ref = nnx.state(load_dit(golden_dir("dit_s2v_causal") / "weights.safetensors", cfg), nnx.Param)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), ours, ref))
    merged = nnx.state(load_dit(out, cfg, lora=out / "liveavatar.safetensors"), nnx.Param)
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: not bool(jnp.array_equal(a, b)), merged, ref))
    assert 0 < sum(changed) <= 2 * len(LORA_TARGETS)

    w2v_ours = nnx.state(load_wav2vec2(out / W2V), nnx.Param)
    w2v_config = Wav2Vec2Config.from_json(out / W2V)
    w2v_ref = nnx.state(load_wav2vec2(golden_dir("audio") / "weights.safetensors", w2v_config), nnx.Param)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), w2v_ours, w2v_ref))

    from liveavatar_jax.weights.vae_keys import load_vae
    vae_ours = nnx.state(load_vae(out / VAE_OUT, configs["vae"]), nnx.Param)
    vae_ref = nnx.state(load_vae(golden_dir("vae") / "weights.safetensors", configs["vae"]), nnx.Param)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), vae_ours, vae_ref))


def test_interrupted_conversion_resumes(tmp_path, configs, monkeypatch):
    root, lora = build_official(tmp_path / "official")
    out = tmp_path / "out"
    real = convert_lib.convert_pth_to_safetensors
    calls = []

    def killed_on_second(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if the process were killed while writing the T5 file
        return real(*args, **kwargs)

    monkeypatch.setattr(convert_lib, "convert_pth_to_safetensors", killed_on_second)
    with pytest.raises(KeyboardInterrupt):
        convert(root, out, lora, configs=configs, progress=False)
    monkeypatch.setattr(convert_lib, "convert_pth_to_safetensors", real)
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"]
    assert VAE_OUT in manifest["files"] and T5_OUT not in manifest["files"] and not (out / T5_OUT).exists()
    vae_mtime = (out / VAE_OUT).stat().st_mtime_ns
    (out / (T5_OUT + ".partial")).write_bytes(b"half a file")  # what a hard kill leaves behind

    report = convert(root, out, lora, configs=configs, progress=False)
    assert VAE_OUT in report.skipped and set(SHARDS) <= set(report.skipped)
    assert T5_OUT in report.written and VAE_OUT not in report.written
    assert (out / VAE_OUT).stat().st_mtime_ns == vae_mtime
    assert not list(out.rglob("*.partial"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["files"][T5_OUT]["sha256"] == _sha256(out / T5_OUT)

    # Nothing left to do; a changed source is redone, alone.
    assert convert(root, out, lora, configs=configs, progress=False).written == []
    config = root / BASE / W2V / "vocab.json"
    config.write_text(json.dumps({"<pad>": 0, "<s>": 1, "</s>": 2, "a": 3}))
    assert convert(root, out, lora, configs=configs, progress=False).written == [f"{W2V}/vocab.json"]


def test_forbidden_callable_stops_the_conversion(tmp_path, configs, capsys):
    root, lora = build_official(tmp_path / "official", evil_vae=True)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=r"Wan2\.1_VAE\.pth: refused to load.*system"):
        convert(root, out, lora, configs=configs, progress=False)
    assert not (root / "executed").exists()
    assert not (out / VAE_OUT).exists() and not list(out.rglob("*.partial"))
    assert VAE_OUT not in json.loads((out / "manifest.json").read_text())["files"]
    assert convert_main(["--ckpt_dir", str(root), "--out", str(out), "--no_progress"]) == 1
    err = capsys.readouterr().err
    assert "Wan2.1_VAE.pth: refused to load" in err and "system" in err
    assert not (root / "executed").exists()


def test_real_model_sizes_are_checked(converted, configs, tmp_path, capsys):
    """Without config overrides the tiny files are checked against the real models and fail, naming file and model
    (the VAE is checked first)."""
    root, _, _ = converted
    out = tmp_path / "out"
    assert convert_main(["--ckpt_dir", str(root / BASE), "--out", str(out), "--no_progress"]) == 1
    err = capsys.readouterr().err
    assert VAE_OUT in err and "does not match WanVAE" in err and "wrong shape" in err
    with pytest.raises(CheckpointError, match=r"(?s)models_t5_umt5-xxl-enc-bf16\.safetensors: does not match "
                                              r"UMT5Encoder.*wrong shape"):
        convert(root, out, configs={"vae": configs["vae"]}, progress=False)


def test_layout_and_missing_parts(tmp_path, configs):
    root, _ = build_official(tmp_path / "official")
    assert plan_conversion(root).base == plan_conversion(root / BASE).base == root / BASE
    (root / BASE / "Wan2.1_VAE.pth").unlink()
    with pytest.raises(ConversionError, match="lacks vae"):
        convert(root, tmp_path / "out", progress=False)
    report = convert(root, tmp_path / "out", configs=configs, allow_missing=True, progress=False)
    assert report.missing == ["vae"]
    assert not json.loads((tmp_path / "out" / "manifest.json").read_text())["complete"]
    with pytest.raises(ConversionError, match="must differ"):
        convert(root, root / BASE, progress=False)
    with pytest.raises(ConversionError, match="no such folder"):
        convert(tmp_path / "nowhere", tmp_path / "out2", progress=False)
    # An unsharded DiT is one file without an index.
    base = root / BASE
    merged = {}
    for shard in SHARDS:
        merged.update(load_file(str(base / shard)))
        (base / shard).unlink()
    (base / "diffusion_pytorch_model.safetensors.index.json").unlink()
    save_file(merged, str(base / "diffusion_pytorch_model.safetensors"))
    dit_units = [u.out for u in plan_conversion(root).units if u.component == "dit"]
    assert dit_units == ["diffusion_pytorch_model.safetensors", "config.json", "configuration.json"]
    (base / "config.json").unlink()
    with pytest.raises(ConversionError, match="has DiT weights but no config.json"):
        plan_conversion(root)
