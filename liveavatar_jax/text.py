"""Prompt -> umT5 context, as `T5EncoderModel` does it in the official pipeline (architecture.md section 2.6).

1. Cleaning (`HuggingfaceTokenizer(clean='whitespace')`): ftfy.fix_text, html-unescape twice, strip, collapse runs
   of whitespace into one space. When ftfy is not installed, `basic_fix_text` stands in for it: it performs the ftfy
   steps that touch ordinary prompts (terminal escapes and control characters removed, curly quotes straightened,
   latin ligatures and full-width/half-width forms unfolded, line breaks and surrogate pairs normalised, NFC) but not
   ftfy's mojibake repair, so a prompt with mis-decoded UTF-8 ("cafÃ©") is cleaned differently.
2. Tokenising with the checkpoint's `google/umt5-xxl/tokenizer.json` through the `tokenizers` library: the EOS token
   is appended, and the ids are truncated to `text_len` (keeping the EOS) and zero-padded to it, with a 0/1 mask.
3. The encoder runs on all `text_len` positions with the padding masked out as keys, and the output is cut to the
   prompt's length: a [L, dim] context (the DiT pads it back with zeros).

`PromptEncoder` keeps one compiled encoder for many prompts and can cache contexts on disk: one .safetensors file per
(prompt, model files) pair, named by a hash of the prompt text, the encoder configuration and dtype, and the identity
of the weight and tokenizer files (their sha256 from the conversion manifest when there is one, else path, size and
modification time).
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import json
import os
import re
import tempfile
import unicodedata
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from liveavatar_jax.models.umt5 import UMT5_XXL, UMT5Config
from liveavatar_jax.weights.umt5_keys import load_umt5

TOKENIZER_SUBDIR = Path("google") / "umt5-xxl"
T5_WEIGHT_NAMES = ("models_t5_umt5-xxl-enc-bf16.safetensors", "models_t5_umt5-xxl-enc-bf16.pth")
_CACHE_FORMAT = 1

try:  # the official cleaning; optional because it is not a dependency of this package
    import ftfy as _ftfy
except ImportError:  # pragma: no cover - depends on the environment
    _ftfy = None

# ---------------------------------------------------------------------------------------------------------------
# Cleaning
_TERMINAL_ESCAPE = re.compile(r"\x1b\[((?:\d|;)*)([a-zA-Z])")
_CONTROL_CHARS = re.compile(
    "[\x00-\x08\x0b\x0e-\x1f\x7f\u206a-\u206f\ufeff\ufff9-\ufffc\U0001d173-\U0001d17a\U000e0000-\U000e007f]")
_SINGLE_QUOTES = re.compile("[\u02bc\u2018-\u201b]")
_DOUBLE_QUOTES = re.compile("[\u201c-\u201f]")
_LINE_BREAKS = re.compile("\r\n|\r|\u2028|\u2029|\u0085")
_LIGATURES = "\u0132\u0133\u0149\u01c4\u01c5\u01c6\u01c7\u01c8\u01c9\u01ca\u01cb\u01cc\ufb00\ufb01\ufb02\ufb03\ufb04\ufb05\ufb06"
# Full-width ASCII and the ideographic space become ASCII; half-width katakana become full-width.
_WIDTH_CHARS = re.compile("[\u3000\uff01-\uff5e\uff65-\uff9f]")


def basic_fix_text(text: str) -> str:
    """The ftfy.fix_text steps that matter for prompts typed by people (see the module docstring)."""
    text = _TERMINAL_ESCAPE.sub("", text)
    text = "".join(unicodedata.normalize("NFKC", c) if c in _LIGATURES else c for c in text)
    text = _WIDTH_CHARS.sub(lambda m: unicodedata.normalize("NFKC", m.group()), text)
    text = _SINGLE_QUOTES.sub("'", text)
    text = _DOUBLE_QUOTES.sub('"', text)
    text = _LINE_BREAKS.sub("\n", text)
    text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")  # joins surrogate pairs
    text = _CONTROL_CHARS.sub("", text)
    return unicodedata.normalize("NFC", text)


def clean_prompt(text: str) -> str:
    """The official 'whitespace' cleaning: basic_clean (ftfy + double html unescape + strip), then whitespace."""
    text = _ftfy.fix_text(text) if _ftfy is not None else basic_fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer
def _special_token(folder: Path, name: str, default: str) -> str:
    for fname in ("special_tokens_map.json", "tokenizer_config.json"):
        f = folder / fname
        if f.is_file():
            try:
                value = json.loads(f.read_text()).get(name)
            except (OSError, json.JSONDecodeError):
                continue
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                return value
    return default


class UMT5Tokenizer:
    """google/umt5-xxl tokenisation with the official cleaning, EOS, truncation and zero padding to `text_len`."""

    def __init__(self, path: str | os.PathLike, text_len: int = 512):
        from tokenizers import Tokenizer  # imported here: only prompt encoding needs it

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(
                f"{file}: no tokenizer.json (the google/umt5-xxl folder of the checkpoint holds one; a folder with "
                f"only spiece.model would need sentencepiece, which this package does not use)")
        try:
            self._tokenizer = Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust side raises its own exception type
            raise ValueError(f"{file}: not a tokenizers tokenizer.json ({e})") from None
        # Truncation and padding are done below so that the EOS survives truncation, as in transformers.
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self.file = file
        self.text_len = int(text_len)
        folder = file.parent
        eos, pad = _special_token(folder, "eos_token", "</s>"), _special_token(folder, "pad_token", "<pad>")
        self.eos_id = self._tokenizer.token_to_id(eos)
        self.pad_id = self._tokenizer.token_to_id(pad)
        if self.eos_id is None or self.pad_id is None:
            raise ValueError(f"{file}: the vocabulary lacks the EOS token {eos!r} or the pad token {pad!r}")

    def token_ids(self, text: str) -> list[int]:
        """Cleaned, tokenised, truncated to text_len - 1 and terminated with EOS (no padding)."""
        ids = self._tokenizer.encode(clean_prompt(text), add_special_tokens=False).ids
        return ids[: self.text_len - 1] + [self.eos_id]

    def __call__(self, texts: str | list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, mask), both int32 [B, text_len]."""
        if isinstance(texts, str):
            texts = [texts]
        ids = np.full((len(texts), self.text_len), self.pad_id, np.int32)
        mask = np.zeros((len(texts), self.text_len), np.int32)
        for row, text in enumerate(texts):
            tokens = self.token_ids(text)
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
        return ids, mask


# ---------------------------------------------------------------------------------------------------------------
# Encoder + cache
def _recorded_sha256(path: Path) -> str | None:
    """The sha256 a conversion manifest.json (liveavatar_jax.convert) records for `path`, if one does."""
    for root in list(path.parents)[:3]:
        manifest = root / "manifest.json"
        if not manifest.is_file():
            continue
        try:
            files = json.loads(manifest.read_text()).get("files", {})
        except (OSError, json.JSONDecodeError, AttributeError):
            return None
        entry = files.get(path.relative_to(root).as_posix()) if isinstance(files, dict) else None
        if isinstance(entry, dict) and isinstance(entry.get("sha256"), str):
            return entry["sha256"]
    return None


def file_identity(path: str | os.PathLike) -> dict:
    path = Path(path).resolve()
    digest = _recorded_sha256(path)
    if digest is not None:
        return {"sha256": digest}
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def find_t5_files(ckpt_dir: str | os.PathLike) -> tuple[Path, Path]:
    """(weights, tokenizer folder) inside a converted or official checkpoint folder (or its Wan2.2-S2V-14B/)."""
    ckpt_dir = Path(ckpt_dir)
    for root in (ckpt_dir, ckpt_dir / "Wan2.2-S2V-14B"):
        for name in T5_WEIGHT_NAMES:
            if (root / name).is_file() and (root / TOKENIZER_SUBDIR).is_dir():
                return root / name, root / TOKENIZER_SUBDIR
    raise FileNotFoundError(f"{ckpt_dir}: holds no {' or '.join(T5_WEIGHT_NAMES)} next to {TOKENIZER_SUBDIR}/")


class PromptEncoder:
    """Tokenizer + umT5 encoder compiled once; `encode(prompt)` returns the trimmed [L, dim] context (numpy)."""

    def __init__(self, weights: str | os.PathLike, tokenizer: str | os.PathLike, config: UMT5Config = UMT5_XXL,
                 *, dtype=jnp.bfloat16, cache_dir: str | os.PathLike | None = None):
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.weights = Path(weights)
        self.tokenizer = UMT5Tokenizer(tokenizer, text_len=config.text_len)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._identity = None
        self._model_state = None
        self.encoder_calls = 0  # prompts actually run through the encoder (cache misses)

    @classmethod
    def from_ckpt_dir(cls, ckpt_dir, config: UMT5Config = UMT5_XXL, **kwargs) -> "PromptEncoder":
        weights, tokenizer = find_t5_files(ckpt_dir)
        return cls(weights, tokenizer, config, **kwargs)

    def _encoder(self):
        """Loads the weights on first use, so cached prompts never touch the 11 GB file."""
        if self._model_state is None:
            model = load_umt5(self.weights, self.config, dtype=self.dtype)
            graphdef, state = nnx.split(model)
            self._model_state = (jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state)(ids, mask)), state)
        return self._model_state

    def cache_key(self, prompt: str) -> str:
        if self._identity is None:
            self._identity = {"weights": file_identity(self.weights), "tokenizer": file_identity(self.tokenizer.file)}
        key = {"format": _CACHE_FORMAT, "prompt": prompt, "config": dataclasses.asdict(self.config),
               "dtype": self.dtype.name, "files": self._identity}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

    def encode(self, prompt: str) -> np.ndarray:
        path = None
        if self.cache_dir is not None:
            path = self.cache_dir / f"{self.cache_key(prompt)}.safetensors"
            cached = self._read_cache(path, prompt)
            if cached is not None:
                return cached
        ids, mask = self.tokenizer(prompt)
        fn, state = self._encoder()
        self.encoder_calls += 1
        out = fn(state, ids, mask)
        context = np.asarray(out[0, : int(mask[0].sum())])
        if path is not None:
            self._write_cache(path, prompt, context)
        return context

    def _read_cache(self, path: Path, prompt: str) -> np.ndarray | None:
        if not path.is_file():
            return None
        try:
            from safetensors import safe_open
            with safe_open(str(path), framework="numpy") as f:
                if (f.metadata() or {}).get("prompt") != prompt:
                    return None
            context = load_file(str(path))["context"]
        except Exception:  # an unreadable cache entry is recomputed, never fatal
            return None
        if context.ndim != 2 or context.shape[1] != self.config.dim:
            return None
        return context

    def _write_cache(self, path: Path, prompt: str, context: np.ndarray):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".partial")
        os.close(fd)
        try:
            save_file({"context": np.ascontiguousarray(context)}, tmp, metadata={"prompt": prompt})
            os.replace(tmp, path)  # readers never see a half-written entry
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def encode_prompt(prompt: str, ckpt_dir: str | os.PathLike, *, config: UMT5Config = UMT5_XXL, dtype=jnp.bfloat16,
                  cache_dir: str | os.PathLike | None = None) -> np.ndarray:
    """The trimmed [L, dim] umT5 context of one prompt (builds a `PromptEncoder`; keep one for many prompts)."""
    return PromptEncoder.from_ckpt_dir(ckpt_dir, config, dtype=dtype, cache_dir=cache_dir).encode(prompt)
