"""The torch-free .pth reader: golden files, both torch formats, strided views, and refusal of pickled code."""

import json
import os
import pickle
import zipfile

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import golden_dir
from liveavatar_jax.golden import rel_l2
from liveavatar_jax.models.umt5 import UMT5Config
from liveavatar_jax.weights.checkpoint import CheckpointError
from liveavatar_jax.weights.pth import PthCheckpoint, PthTensor, _Storage, load_pth, open_weights, save_pth
from liveavatar_jax.weights.umt5_keys import load_umt5


@pytest.fixture(scope="module")
def pth_dir():
    return golden_dir("pth")


def _same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8))


def test_golden_t5_pth_is_the_bf16_rounded_fixture(pth_dir):
    manifest = json.loads((pth_dir / "manifest.json").read_text())["files"]["models_t5_umt5-xxl-enc-bf16.pth"]
    reference = load_file(str(pth_dir / manifest["same_tensors_as"]))
    with PthCheckpoint(pth_dir / "models_t5_umt5-xxl-enc-bf16.pth") as ckpt:
        assert len(ckpt) == manifest["tensors"] == len(reference)
        for key, value in reference.items():
            assert ckpt.dtype(key) == ml_dtypes.bfloat16
            assert _same_bits(ckpt.get(key), value.astype(ml_dtypes.bfloat16)), key


def test_golden_vae_pth_equals_the_fixture(pth_dir):
    manifest = json.loads((pth_dir / "manifest.json").read_text())["files"]["Wan2.1_VAE.pth"]
    reference = load_file(str(pth_dir / manifest["same_tensors_as"]))
    loaded = load_pth(pth_dir / "Wan2.1_VAE.pth")
    assert len(loaded) == manifest["tensors"] == len(reference)
    for key, value in reference.items():
        assert _same_bits(loaded[key], value), key


def test_umt5_loads_straight_from_the_pth(pth_dir):
    t5 = golden_dir("t5")
    config = UMT5Config.from_kwargs(json.loads((t5 / "manifest.json").read_text())["constructor_kwargs"])
    inputs, outputs = load_file(str(t5 / "inputs.safetensors")), load_file(str(t5 / "outputs.safetensors"))
    model = load_umt5(pth_dir / "models_t5_umt5-xxl-enc-bf16.pth", config, dtype=jnp.float32)
    out = np.asarray(model(inputs["ids"].astype(np.int32), inputs["mask"].astype(np.int32)))
    # bf16-rounded weights: close to the fp32 reference, not equal.
    assert rel_l2(out, outputs["encoder_out"]) < 1e-2


STATE = {
    "w": np.arange(12, dtype=np.float32).reshape(3, 4),
    "b": (np.arange(5, dtype=np.float32) / 3).astype(ml_dtypes.bfloat16),
    "h": np.linspace(-1, 1, 6).astype(np.float16).reshape(2, 3),
    "i": np.array([1, -2, 3], np.int64),
    "scalar": np.array(7, np.int32),
    "empty": np.zeros((0, 4), np.float32),
    "mask": np.array([True, False]),
}


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_round_trip(tmp_path, legacy):
    path = tmp_path / "state.pth"
    save_pth(STATE, path, legacy=legacy)
    assert zipfile.is_zipfile(path) != legacy
    loaded = load_pth(path)
    assert list(loaded) == list(STATE)
    for key, value in STATE.items():
        assert _same_bits(loaded[key], value), key
    assert isinstance(open_weights(path), PthCheckpoint)


def test_strided_and_offset_views():
    """Non-contiguous tensors (e.g. a saved transpose) and views into a shared storage."""
    data = np.arange(20, dtype=np.float32)
    storage = _Storage("0", np.float32, 20, lambda s: data)
    transposed = PthTensor(storage, 2, (4, 3), (1, 4))
    np.testing.assert_array_equal(transposed.numpy(), data[2:14].reshape(3, 4).T)
    window = PthTensor(storage, 5, (2, 2), (2, 1))
    np.testing.assert_array_equal(window.numpy(), [[5, 6], [7, 8]])
    with pytest.raises(ValueError, match="exceeds its storage"):
        PthTensor(storage, 15, (2, 4), (4, 1)).numpy()


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _torch_like_zip(path, payload: bytes):
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr(f"{path.stem}/data.pkl", payload)
        z.writestr(f"{path.stem}/byteorder", "little")
        z.writestr(f"{path.stem}/version", "3\n")


def test_refuses_code_in_a_zip_checkpoint(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pth"
    _torch_like_zip(path, pickle.dumps({"weight": _Evil(marker)}, protocol=2))
    with pytest.raises(CheckpointError, match=r"evil\.pth: refused to load.*(posix|os|nt)\.system"):
        PthCheckpoint(path)
    assert not marker.exists()


def test_refuses_code_in_a_legacy_file(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "evil_legacy.pth"
    path.write_bytes(pickle.dumps(_Evil(marker), protocol=2))
    with pytest.raises(CheckpointError, match=r"evil_legacy\.pth: refused to load.*system"):
        load_pth(path)
    assert not marker.exists()


@pytest.mark.parametrize("module,name", [("builtins", "eval"), ("numpy.core.multiarray", "_reconstruct"),
                                         ("torch", "load"), ("torch._utils", "_rebuild_device_tensor_from_numpy")])
def test_only_the_allow_list_resolves(tmp_path, module, name):
    path = tmp_path / "other.pth"
    _torch_like_zip(path, b"\x80\x02c" + f"{module}\n{name}\n".encode() + b")R.")
    with pytest.raises(CheckpointError, match=f"refused to load.*{module}.{name}"):
        PthCheckpoint(path)


def test_damaged_files_name_the_file(tmp_path):
    good = tmp_path / "good.pth"
    save_pth({"w": np.ones((4, 4), np.float32)}, good)
    # A storage the pickle refers to is missing from the archive.
    broken = tmp_path / "broken.pth"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(broken, "w") as dst:
        for info in src.infolist():
            if "/data/" not in info.filename:
                dst.writestr(info, src.read(info))
    with pytest.raises(CheckpointError, match=r"broken\.pth: the pickle refers to storage '0'"):
        PthCheckpoint(broken)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"junk\.pth"):
        PthCheckpoint(junk)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"truncated\.pth"):
        PthCheckpoint(truncated).get("w")
    with pytest.raises(CheckpointError, match=r"missing\.pth: file not found"):
        PthCheckpoint(tmp_path / "missing.pth")


def test_plain_data_pickle_is_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    _torch_like_zip(path, pickle.dumps([1, 2, 3], protocol=2))
    with pytest.raises(CheckpointError, match=r"list\.pth: holds a list, not a state dict"):
        PthCheckpoint(path)
