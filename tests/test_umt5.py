"""The umT5 encoder (golden parity, buckets, masking, strict loading) and prompt encoding (tokenizer, cache)."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from conftest import golden_dir
from liveavatar_jax.golden import rel_l2, run_fixture
from liveavatar_jax.models.umt5 import UMT5_XXL, UMT5Config, relative_position_buckets
from liveavatar_jax.text import PromptEncoder, UMT5Tokenizer, basic_fix_text, clean_prompt, find_t5_files
from liveavatar_jax.weights.checkpoint import CheckpointError
from liveavatar_jax.weights.keymap import flat_paths
from liveavatar_jax.weights.umt5_keys import abstract_umt5, load_umt5

# The golden ids are [118, 20, 99, 39, 36, 100, 40, 32] + EOS; the test vocabulary spells id i as "w{i}".
GOLDEN_PROMPT = "w118 w20 w99 w39 w36 w100 w40 w32"


@pytest.fixture(scope="module")
def fixture_dir():
    return golden_dir("t5")


@pytest.fixture(scope="module")
def tiny_config(fixture_dir):
    manifest = json.loads((fixture_dir / "manifest.json").read_text())
    ids = load_file(str(fixture_dir / "inputs.safetensors"))["ids"]
    return dataclasses.replace(UMT5Config.from_kwargs(manifest["constructor_kwargs"]), text_len=ids.shape[1])


@pytest.fixture(scope="module")
def golden(fixture_dir):
    return load_file(str(fixture_dir / "inputs.safetensors")), load_file(str(fixture_dir / "outputs.safetensors"))


@pytest.fixture(scope="module")
def encode_fn(fixture_dir, tiny_config):
    model = load_umt5(fixture_dir / "weights.safetensors", tiny_config)
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda ids, mask: nnx.merge(graphdef, state)(ids, mask))
    return fn


def test_golden_t5(fixture_dir):
    _, rows = run_fixture(fixture_dir)
    assert rows and all(r.ok for r in rows), "\n".join(r.line() for r in rows)


@pytest.mark.parametrize("rel,bucket", [(0, 0), (1, 17), (-1, 1), (-7, 7), (-8, 8), (-15, 9), (-16, 10),
                                        (16, 26), (-31, 11), (-32, 12), (-63, 13), (-64, 14), (-127, 15),
                                        (-128, 15), (-500, 15), (500, 31)])
def test_relative_position_buckets(rel, bucket):
    """Bidirectional, 32 buckets, max distance 128; the log boundaries at 16/32/64 must not fall a bucket short."""
    query = max(0, -rel)
    buckets = relative_position_buckets(query + 1, query + rel + 1 if rel >= 0 else query + 1, 32, 128)
    assert buckets[query, query + rel] == bucket


def test_padding_is_masked_as_keys(encode_fn, golden):
    inputs, _ = golden
    ids, mask = inputs["ids"].astype(np.int32), inputs["mask"].astype(np.int32)
    n = int(mask.sum())
    base = np.asarray(encode_fn(ids, mask))
    other = ids.copy()
    other[0, n:] = np.arange(n, ids.shape[1]) + 5  # different tokens in the padding
    changed = np.asarray(encode_fn(other, mask))
    np.testing.assert_allclose(changed[0, :n], base[0, :n], rtol=1e-6, atol=1e-6)
    unmasked = np.asarray(encode_fn(other, np.ones_like(mask)))
    assert rel_l2(unmasked[0, :n], base[0, :n]) > 1e-3


def test_bfloat16_run_is_close(fixture_dir, tiny_config, golden):
    inputs, outputs = golden
    model = load_umt5(fixture_dir / "weights.safetensors", tiny_config, dtype=jnp.bfloat16)
    assert model.blocks.attn.q.kernel[...].dtype == jnp.bfloat16
    out = model(inputs["ids"].astype(np.int32), inputs["mask"].astype(np.int32))
    assert out.dtype == jnp.bfloat16
    assert rel_l2(np.asarray(out, np.float32), outputs["encoder_out"]) < 3e-2


def test_config_from_official_kwargs():
    official = dict(vocab_size=256384, dim=4096, dim_attn=4096, dim_ffn=10240, num_heads=64, encoder_layers=24,
                    decoder_layers=24, num_buckets=32, shared_pos=False, dropout=0.1)
    assert UMT5Config.from_kwargs(official) == UMT5_XXL
    from ml_collections import ConfigDict
    tiny = UMT5Config.from_config(ConfigDict({"vocab": 128, "dim": 32, "dim_attn": 32, "dim_ffn": 64,
                                              "num_heads": 4, "num_layers": 2, "text_len": 16}))
    assert (tiny.head_dim, tiny.num_buckets, tiny.text_len) == (8, 32, 16)
    with pytest.raises(ValueError, match="shared_pos"):
        UMT5Config.from_kwargs({**official, "shared_pos": True})
    with pytest.raises(ValueError, match="unknown UMT5Config field"):
        UMT5Config.from_config({"dim": 8, "heads": 2})


def test_xxl_parameter_count():
    """architecture.md 7.1: 242 tensors, 5,680,910,336 parameters (shapes only, nothing allocated)."""
    flat = flat_paths(nnx.split(abstract_umt5(UMT5_XXL, jnp.bfloat16))[1])
    n_params = sum(int(np.prod(v.shape)) for v in flat.values())
    n_tensors = sum(24 if path.startswith("blocks.") else 1 for path in flat)
    assert (n_tensors, n_params) == (242, 5_680_910_336)


def test_strict_loading_names_the_file(fixture_dir, tiny_config, tmp_path):
    weights = load_file(str(fixture_dir / "weights.safetensors"))
    missing = dict(weights)
    del missing["blocks.1.ffn.fc1.weight"]
    path = tmp_path / "missing.safetensors"
    save_file(missing, str(path))
    with pytest.raises(CheckpointError, match=r"missing\.safetensors.*\n.*missing 1 key\(s\): blocks\.1\.ffn\.fc1"):
        load_umt5(path, tiny_config)
    wrong = dict(weights)
    wrong["norm.weight"] = np.ones(7, np.float32)
    wrong["extra.weight"] = np.ones(3, np.float32)
    path = tmp_path / "wrong.safetensors"
    save_file(wrong, str(path))
    with pytest.raises(CheckpointError, match=r"(?s)wrong\.safetensors.*unexpected 1 key\(s\): extra\.weight"
                                              r".*wrong shape 1 key\(s\): norm\.weight"):
        load_umt5(path, tiny_config)


# --------------------------------------------------------------------------------------------------------------
# Prompt encoding
def make_tokenizer(folder, vocab_size=128):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # Like the real umt5 tokenizer.json, it appends EOS itself; the encoder must not add a second one.
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": {"content": "</s>"}, "pad_token": "<pad>", "unk_token": "<unk>"}))
    return folder


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory, fixture_dir):
    root = tmp_path_factory.mktemp("ckpt")
    make_tokenizer(root / "google" / "umt5-xxl")
    shutil.copy(fixture_dir / "weights.safetensors", root / "models_t5_umt5-xxl-enc-bf16.safetensors")
    return root


def test_cleaning():
    assert clean_prompt("  A &amp;amp; B\n\t\u201cquoted\u201d  \u2018x\u2019 ") == "A & B \"quoted\" 'x'"
    assert basic_fix_text("\ufb01ne \uff21\uff22 \x1b[31mred\x1b[0m\x00") == "fine AB red"
    assert clean_prompt("caf\u0065\u0301\r\nbar") == "caf\u00e9 bar"


def test_tokenizer_eos_padding_truncation(ckpt_dir):
    tok = UMT5Tokenizer(ckpt_dir / "google" / "umt5-xxl", text_len=8)
    ids, mask = tok(["w5  w6", "w7 " * 20])
    assert ids.dtype == np.int32 and ids.shape == (2, 8)
    np.testing.assert_array_equal(ids[0], [5, 6, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(mask[0], [1, 1, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(ids[1], [7] * 7 + [1])  # truncation keeps the EOS
    assert mask[1].all()


def test_tokenizer_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        UMT5Tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer\.json: not a tokenizers"):
        UMT5Tokenizer(tmp_path)


def test_encode_prompt_matches_golden_and_caches(ckpt_dir, tiny_config, golden, tmp_path):
    _, outputs = golden
    weights, tokenizer = find_t5_files(ckpt_dir)
    cache = tmp_path / "cache"
    enc = PromptEncoder(weights, tokenizer, tiny_config, dtype=jnp.float32, cache_dir=cache)
    context = enc.encode("  " + GOLDEN_PROMPT.replace(" ", "\n ") + " ")
    assert context.shape == outputs["context_trimmed"].shape
    assert rel_l2(context, outputs["context_trimmed"]) < 1e-5
    assert enc.encoder_calls == 1 and len(list(cache.glob("*.safetensors"))) == 1

    # Same prompt again, from a fresh encoder: served from disk without loading the weights.
    again = PromptEncoder.from_ckpt_dir(ckpt_dir, tiny_config, dtype=jnp.float32, cache_dir=cache)
    np.testing.assert_array_equal(again.encode("  " + GOLDEN_PROMPT.replace(" ", "\n ") + " "), context)
    assert again.encoder_calls == 0 and again._model_state is None

    # Another prompt, another entry; a damaged entry is recomputed.
    other = enc.encode("w5 w6")
    assert other.shape == (3, tiny_config.dim) and enc.encoder_calls == 2
    assert len(list(cache.glob("*.safetensors"))) == 2
    (cache / f"{enc.cache_key('w5 w6')}.safetensors").write_bytes(b"garbage")
    np.testing.assert_array_equal(enc.encode("w5 w6"), other)
    assert enc.encoder_calls == 3

    # Different weight files (identity changes) must not hit the old entries.
    moved = tmp_path / "moved.safetensors"
    shutil.copy(weights, moved)
    assert PromptEncoder(moved, tokenizer, tiny_config, dtype=jnp.float32).cache_key("w5 w6") != \
        enc.cache_key("w5 w6")
    assert PromptEncoder(weights, tokenizer, tiny_config, dtype=jnp.bfloat16).cache_key("w5 w6") != \
        enc.cache_key("w5 w6")


def test_bf16_prompt_encoding(ckpt_dir, tiny_config, golden):
    _, outputs = golden
    context = PromptEncoder.from_ckpt_dir(ckpt_dir, tiny_config).encode(GOLDEN_PROMPT)
    assert context.dtype == ml_dtypes.bfloat16
    assert rel_l2(context.astype(np.float32), outputs["context_trimmed"]) < 3e-2


def test_find_t5_files_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="models_t5_umt5-xxl-enc-bf16"):
        find_t5_files(tmp_path)
