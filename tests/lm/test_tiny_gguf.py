"""The tiny GGUF fixture loads back through transformers as the model and tokenizer it encodes."""

from pathlib import Path

import pytest
import torch
from tiny_gguf import write_tiny_llama_gguf
from transformers import AutoModelForCausalLM, AutoTokenizer

TEXT = "The cat and the dog went to the park in the morning, singing loudly."


@pytest.mark.parametrize("tied", [False, True])
def test_logits_match(tmp_path: Path, tied: bool) -> None:
    path, model = write_tiny_llama_gguf(tmp_path, seed=1, tied=tied)
    loaded = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32
    ).eval()
    assert loaded.config.tie_word_embeddings is tied
    ids = torch.randint(
        0, model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        expected, got = model(ids).logits, loaded(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_seed_changes_weights(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _, a = write_tiny_llama_gguf(tmp_path / "a", seed=0)
    _, b = write_tiny_llama_gguf(tmp_path / "b", seed=1)
    assert not torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)


def test_tokenizer_offsets_and_round_trip(tmp_path: Path) -> None:
    path, model = write_tiny_llama_gguf(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert tok.is_fast
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == model.config.eos_token_id
    enc = tok(TEXT, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    assert len(ids) < len(TEXT)  # the merges apply
    assert "Ġthe" in tok.convert_ids_to_tokens(ids)
    assert all(0 <= i < model.config.vocab_size for i in ids)
    for token_id, (start, end) in zip(ids, offsets, strict=True):
        assert tok.decode([token_id]) == TEXT[start:end]
    assert "".join(TEXT[s:e] for s, e in offsets) == TEXT
    assert tok.decode(ids) == TEXT
    eos = tok(TEXT + "<|endoftext|>")["input_ids"]
    assert eos[-1] == model.config.eos_token_id
