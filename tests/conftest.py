"""Fixtures: tiny random models of each architecture, saved as local folders, and a small
text corpus. Nothing here touches a network or the shipped real models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import write_corpus
from tiny_gguf import write_tiny_llama_gguf
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    OPTConfig,
    Qwen2Config,
)

TINY = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64)


def tiny_configs(vocab: int, eos: int) -> dict:
    """One small config per architecture the tool must support."""
    common = dict(vocab_size=vocab, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    return {
        "llama": LlamaConfig(**TINY, num_key_value_heads=2, **common),
        "qwen2": Qwen2Config(**TINY, num_key_value_heads=2, **common),
        "gemma3_text": Gemma3TextConfig(
            **TINY, num_key_value_heads=2, head_dim=8, sliding_window=16, **common
        ),
        "gpt2": GPT2Config(n_embd=32, n_layer=4, n_head=4, n_positions=512, **common),
        "opt": OPTConfig(
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            ffn_dim=64,
            word_embed_proj_dim=32,
            max_position_embeddings=512,
            **common,
        ),
        "gpt_neox": GPTNeoXConfig(**TINY, max_position_embeddings=512, **common),
    }


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A tiny Llama written as GGUF, and the float32 model it encodes."""
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf"))


@pytest.fixture(scope="session")
def tokenizer_dir(tiny_gguf, tmp_path_factory) -> Path:
    """The tiny byte-level BPE tokenizer, saved as a Hugging Face folder."""
    path, _ = tiny_gguf
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    out = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_models(tokenizer_dir, tmp_path_factory) -> dict[str, Path]:
    """{architecture: folder} of tiny random models sharing the tiny tokenizer."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    out = {}
    for arch, config in tiny_configs(len(tok), tok.eos_token_id).items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        folder = tmp_path_factory.mktemp(arch)
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        out[arch] = folder
    return out


@pytest.fixture()
def corpus_file(tmp_path) -> Path:
    """A JSONL corpus of 40 short documents, some long enough to need several windows."""
    return write_corpus(tmp_path / "docs.jsonl", titles=True)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Converted GGUF models go to a per-session temporary cache, never the user's."""
    monkeypatch.setenv("SAMESHEEP_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def env(tmp_path_factory) -> dict[str, str]:
    """The environment of CLI runs: the session's private model cache."""
    return {"SAMESHEEP_CACHE": str(tmp_path_factory.getbasetemp() / "cache")}


CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (Debian's package, which `make test` installs) through Playwright."""
    import shutil

    from playwright.sync_api import sync_playwright

    exe = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(exe).is_file():
        pytest.fail("Chromium is not installed: `make test` installs it (apt-get install chromium)")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        yield b
        b.close()
