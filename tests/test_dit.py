"""The causal S2V DiT: golden parity, the 14B structure, RoPE positions, ring-cache writes, weight loading."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import golden_dir
from liveavatar_jax.golden import run_fixture
from liveavatar_jax.models import rope
from liveavatar_jax.models.dit import DiTConfig, abstract_model, count_params
from liveavatar_jax.streaming.caches import RingCache
from liveavatar_jax.weights import keymap
from liveavatar_jax.weights.checkpoint import CheckpointError
from liveavatar_jax.weights.dit_keys import RULES, load_dit


@pytest.fixture(scope="module")
def fixture_dir():
    return golden_dir("dit_s2v_causal")


@pytest.fixture(scope="module")
def fixture_cfg(fixture_dir):
    manifest = json.loads((fixture_dir / "manifest.json").read_text())
    return DiTConfig.from_official(manifest["constructor_kwargs"], dtype="float32")


def test_golden_dit_s2v_causal(fixture_dir):
    _, rows = run_fixture(fixture_dir)
    failed = [r.line() for r in rows if not r.ok]
    assert len(rows) == 24 and not failed, "\n".join(failed)


def test_14b_structure_counts_official_parameters():
    model = abstract_model(DiTConfig(dtype="bfloat16"))
    assert count_params(model) == 16_295_755_609
    from flax import nnx
    _, params, _ = nnx.split(model, nnx.Param, ...)
    expected = keymap.expected_source_keys(keymap.flat_paths(params), RULES)
    assert len(expected) == 1260
    assert "casual_audio_encoder.encoder.conv1_local.conv.weight" in expected
    assert expected["audio_injector.injector.11.q.weight"] == ("audio_injectors.attn.q.kernel", 11)


def test_rope_tables_are_exact_at_any_position():
    pairs = 22
    pos = np.array([0, 1, 29, 30, 255, 256, 44_999, 45_000, 1_000_003, 123_456_789, -1, -19], np.int64)
    cos, sin = rope.axis_cos_sin(jnp.asarray(pos, jnp.int32), pairs)
    w = rope.rope_freqs(pairs)
    ang = pos[:, None].astype(np.float64) * w[None]
    np.testing.assert_allclose(np.asarray(cos), np.cos(ang), atol=3e-7)
    np.testing.assert_allclose(np.asarray(sin), np.sin(ang), atol=3e-7)
    # the official float16 rounding of the float64 table is reproduced, up to rare double roundings (one ulp)
    small = np.arange(0, 256)
    c16, s16 = rope.token_table(jnp.asarray(small), jnp.zeros(256, jnp.int32), jnp.zeros(256, jnp.int32), 128)
    ang = small[:, None] * w[None]
    for ours, ref in ((c16, np.cos(ang)), (s16, np.sin(ang))):
        ours = np.asarray(ours)[:, :pairs]
        ref16 = ref.astype(np.float16).astype(np.float32)
        assert np.mean(ours != ref16) < 1e-3
        np.testing.assert_allclose(ours, ref16, atol=2 ** -11 * np.abs(ref16).max())


def test_motion_positions_follow_the_official_grids():
    cfg = DiTConfig(dim=64, ffn_dim=64, num_heads=2, num_layers=1, text_dim=8, text_len=4, audio_dim=8,
                    audio_inject_layers=(0,), dtype="float32")
    model = abstract_model(cfg)
    t, h, w = model.frame_packer.positions(90, 50)       # 720x400 latent grid
    assert len(t) == 1125 + 264 + 264
    assert set(t[:1125]) == {-1} and set(t[1125:1389]) == {-3}
    assert sorted(set(t[1389:])) == [-19, -14, -9, -4]
    assert sorted(set(h[1389:]))[:4] == [0, 4, 8, 13]     # linspace(0, 44, 11).astype(int)


@pytest.fixture(scope="module")
def tiny_model(fixture_dir, fixture_cfg):
    return load_dit(fixture_dir / "weights.safetensors", fixture_cfg)


def test_ring_writes_only_the_block_slot_and_wraps(tiny_model, fixture_cfg, fixture_dir):
    cfg, model = fixture_cfg, tiny_model
    inp = load_file(str(fixture_dir / "inputs.safetensors"))
    text = model.embed_text(jnp.asarray(inp["context"])[None])
    sink = jax.jit(model.sink_prefill)(jnp.asarray(inp["ref_latents"]), jnp.asarray(inp["motion_latents"]), text)
    n_frame, capacity = 32, 9 * 32                          # a ring of 3 blocks
    rng = np.random.default_rng(0)
    ring = RingCache(k=jnp.asarray(rng.normal(size=(2, 1, capacity, 2, 32)), jnp.float32),
                     v=jnp.asarray(rng.normal(size=(2, 1, capacity, 2, 32)), jnp.float32))
    fwd = jax.jit(model.block_forward)
    for g, slot in [(3, 1), (12, 1), (15, 2), (18, 0)]:    # global first frame -> slot (g * 32 mod 288) / 96
        _, new = fwd(jnp.asarray(inp["block0.x"])[None], jnp.asarray([1000.0]), text,
                     jnp.asarray(inp["block0.audio_input"]), ring, sink, g, 10)
        changed = np.any(np.asarray(new.k != ring.k), axis=(0, 1, 3, 4))
        expected = np.zeros(capacity, bool)
        expected[slot * 96:(slot + 1) * 96] = True
        np.testing.assert_array_equal(changed, expected)


def test_text_padding_folds_into_one_key(fixture_cfg):
    """text_kv(text, n) keeps the real tokens and a bucket of padding rows, the last carrying log(#dropped + 1):
    the block output must equal the one computed over every padding row."""
    import dataclasses

    from flax import nnx

    from liveavatar_jax.models.dit import TEXT_KEY_BUCKET, CausalS2VDiT
    from liveavatar_jax.weights.random_init import randomize

    cfg = dataclasses.replace(fixture_cfg, text_len=4 * TEXT_KEY_BUCKET)
    model = randomize(nnx.eval_shape(lambda: CausalS2VDiT(cfg, rngs=nnx.Rngs(0))), 3)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(1, 16, 3, 8, 16)), jnp.float32)
    audio = jnp.asarray(rng.normal(size=(1, cfg.audio_layers, cfg.audio_dim, 12)), jnp.float32)
    ref = jnp.asarray(rng.normal(size=(1, 16, 1, 8, 16)), jnp.float32)
    motion = jnp.asarray(rng.normal(size=(1, 16, 19, 8, 16)), jnp.float32)
    ring = RingCache.zeros(cfg.num_layers, 1, 12 * 32, cfg.num_heads, cfg.head_dim)
    fwd = jax.jit(lambda text, kv, sink: model.block_forward(x, jnp.asarray([800.0]), text, audio, ring, sink, 3, 10,
                                                               text_kv=kv)[0])
    for n, kept in [(5, TEXT_KEY_BUCKET), (TEXT_KEY_BUCKET + 7, 2 * TEXT_KEY_BUCKET), (cfg.text_len, cfg.text_len)]:
        text = model.embed_text(jnp.asarray(rng.normal(size=(1, n, cfg.text_dim)), jnp.float32))
        sink = model.sink_prefill(ref, motion, text)
        k, v, bias = model.text_kv(text, n)
        assert k.shape[2] == kept and (bias is None) == (kept == cfg.text_len)
        full, folded = fwd(text, None, sink), fwd(None, (k, v, bias), sink)
        rel = float(jnp.linalg.norm(folded - full) / jnp.linalg.norm(full))
        assert rel < 1e-5, (n, rel)


@pytest.mark.parametrize("first_frame, unread", [(3, slice(6 * 32, None)), (12, slice(3 * 32, 6 * 32))],
                         ids=["filling", "full"])
def test_ring_reads_only_earlier_blocks(tiny_model, fixture_dir, first_frame, unread):
    """A filling ring's slots past its filled prefix, and a full ring's slot the block is about to overwrite, are
    never read: NaNs there leave the output finite and unchanged."""
    model = tiny_model
    inp = load_file(str(fixture_dir / "inputs.safetensors"))
    text = model.embed_text(jnp.asarray(inp["context"])[None])
    sink = jax.jit(model.sink_prefill)(jnp.asarray(inp["ref_latents"]), jnp.asarray(inp["motion_latents"]), text)
    capacity = 9 * 32
    rng = np.random.default_rng(0)
    k = rng.normal(size=(2, 1, capacity, 2, 32)).astype(np.float32)
    v = rng.normal(size=(2, 1, capacity, 2, 32)).astype(np.float32)
    k_nan, v_nan = k.copy(), v.copy()
    # frame 3: block 1 writes frames 3-5, 6-8 are unfilled; frame 12: block 4 overwrites slot 1 (frames 3-5)
    k_nan[:, :, unread], v_nan[:, :, unread] = np.nan, np.nan
    fwd = jax.jit(lambda ring: model.block_forward(jnp.asarray(inp["block0.x"])[None], jnp.asarray([1000.0]), text,
                                                   jnp.asarray(inp["block0.audio_input"]), ring, sink, first_frame,
                                                   10)[0])
    clean = fwd(RingCache(k=jnp.asarray(k), v=jnp.asarray(v)))
    dirty = fwd(RingCache(k=jnp.asarray(k_nan), v=jnp.asarray(v_nan)))
    np.testing.assert_array_equal(np.asarray(dirty), np.asarray(clean))


def test_lora_merges_into_targets(tmp_path, fixture_dir, fixture_cfg):
    base = load_file(str(fixture_dir / "weights.safetensors"))
    rng = np.random.default_rng(1)
    a = rng.normal(size=(4, 64)).astype(np.float32)
    b = rng.normal(size=(64, 4)).astype(np.float32)
    save_file({"base_model.model.blocks.1.self_attn.q.lora_A.default.weight": a,
               "base_model.model.blocks.1.self_attn.q.lora_B.default.weight": b}, str(tmp_path / "lora.safetensors"))
    model = load_dit(fixture_dir / "weights.safetensors", fixture_cfg, lora=tmp_path / "lora.safetensors")
    merged = np.asarray(model.blocks.self_attn.q.kernel[...][1])
    want = (base["blocks.1.self_attn.q.weight"] + (64 / 4) * b @ a).T
    np.testing.assert_allclose(merged, want, rtol=1e-5, atol=1e-5)
    untouched = np.asarray(model.blocks.self_attn.q.kernel[...][0])
    np.testing.assert_array_equal(untouched, base["blocks.0.self_attn.q.weight"].T)

    save_file({"blocks.1.self_attn.nope.lora_A.weight": a, "blocks.1.self_attn.nope.lora_B.weight": b},
              str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match="no base weight.*blocks.1.self_attn.nope.weight"):
        load_dit(fixture_dir / "weights.safetensors", fixture_cfg, lora=tmp_path / "bad.safetensors")


def _write(tmp_path, tensors, name="model.safetensors"):
    path = tmp_path / name
    save_file(tensors, str(path))
    return path


def test_loader_reports_missing_extra_and_misshaped(tmp_path, fixture_dir, fixture_cfg):
    base = load_file(str(fixture_dir / "weights.safetensors"))
    missing = dict(base)
    del missing["blocks.0.ffn.2.bias"]
    with pytest.raises(CheckpointError) as e:
        load_dit(_write(tmp_path, missing, "missing.safetensors"), fixture_cfg)
    assert "missing.safetensors" in str(e.value) and "missing 1 key(s): blocks.0.ffn.2.bias" in str(e.value)

    extra = dict(base, **{"blocks.0.surprise": np.zeros(3, np.float32)})
    with pytest.raises(CheckpointError, match=r"unexpected 1 key\(s\): blocks.0.surprise"):
        load_dit(_write(tmp_path, extra, "extra.safetensors"), fixture_cfg)

    wrong = dict(base, **{"head.head.weight": np.zeros((64, 63), np.float32)})
    with pytest.raises(CheckpointError, match=r"wrong shape 1 key\(s\): head.head.weight: \[64, 63\] \(expected \[64, 64\]\)"):
        load_dit(_write(tmp_path, wrong, "wrong.safetensors"), fixture_cfg)


def test_loader_rejects_truncated_and_foreign_files(tmp_path, fixture_dir, fixture_cfg):
    src = fixture_dir / "weights.safetensors"
    data = src.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut.safetensors: truncated"):
        load_dit(tmp_path / "cut.safetensors", fixture_cfg)
    (tmp_path / "junk.safetensors").write_bytes(b"PK\x03\x04 this is a zip, not safetensors" * 10)
    with pytest.raises(CheckpointError, match=r"junk.safetensors: not a safetensors file"):
        load_dit(tmp_path / "junk.safetensors", fixture_cfg)


def test_loader_reads_sharded_folder_with_index(tmp_path, fixture_dir, fixture_cfg, tiny_model):
    base = load_file(str(fixture_dir / "weights.safetensors"))
    keys = sorted(base)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for name, ks in shards.items():
        save_file({k: base[k] for k in ks}, str(tmp_path / name))
        weight_map.update({k: name for k in ks})
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model = load_dit(tmp_path, fixture_cfg)
    np.testing.assert_array_equal(np.asarray(model.head.kernel[...]), np.asarray(tiny_model.head.kernel[...]))
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="names shard files that do not exist"):
        load_dit(tmp_path, fixture_cfg)
