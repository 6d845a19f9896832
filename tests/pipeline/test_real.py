"""The shipped real models, loaded for real from their PyPI packages (marked `real`).

They use the user cache for the converted models (the first load converts, about a minute
for Gemma), so CI pays the conversion once per machine."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_token_spans

from samesheep.lm.extraction import bos_prefix
from samesheep.lm.models import capture, load_model, load_tokenizer

pytestmark = pytest.mark.real

PROMPT = "France is a country in Western Europe. The capital of France is"


@pytest.fixture(autouse=True)
def _user_cache(monkeypatch):
    monkeypatch.delenv("SAMESHEEP_CACHE", raising=False)


@pytest.fixture(scope="module", params=["gemma-3-270m", "smollm2-135m-instruct"])
def real(request):
    return load_model(request.param, torch.bfloat16)


def test_ranks_paris_among_top_next_tokens(real):
    ids = real.tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode():
        logits = real.model(input_ids=ids).logits[0, -1]
    top = [real.tokenizer.decode([t]).strip() for t in logits.topk(10).indices.tolist()]
    assert "Paris" in top, top


def test_layer_two_thirds_deep_and_attention_sink(real):
    layer = {18: 12, 30: 20}[real.n_layers]
    own = bos_prefix(real.tokenizer, "tokenizer")
    assert own == ([2] if real.n_layers == 18 else [])  # Gemma adds <bos>; SmolLM2 nothing
    assert bos_prefix(real.tokenizer, "auto") == [2 if real.n_layers == 18 else 1]
    text = "The Moon is Earth's only natural satellite, orbiting at about 384,400 km."
    words = real.tokenizer(text, add_special_tokens=False).input_ids
    for prefix in (own, bos_prefix(real.tokenizer, "auto")):
        ids = torch.tensor([prefix + words])
        h = capture(real.model, [layer], ids)[layer][0].float()  # [seq, d]
        norms = h.norm(dim=-1)
        assert torch.isfinite(h).all()
        # Position 0 is an attention sink, whatever sits there: its norm dwarfs the median.
        assert norms[0] > 5 * norms[1:].median(), norms
    # With "auto", the sink is the special token, and the first word is an ordinary token.
    assert norms[1] < 2 * norms[2:].median(), norms


def test_offsets_cover_the_text(real):
    text = "Marie Curie (1867\u20131934) won Nobel Prizes in physics and chemistry."
    enc = real.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = enc["offset_mapping"]
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(a <= b for a, b in spans)
    assert all(spans[i][1] <= spans[i + 1][1] for i in range(len(spans) - 1))


def test_windows_keep_characters_whole(real):
    """Byte-fallback and byte-level pieces of one character stay in one window, so each
    window's tokens decode to exactly the text their spans cover."""
    from samesheep.data.corpus import Document
    from samesheep.lm.extraction import windows_of

    text = "Z\u00fcrich, \u5317\u4eac and \U0001d518: " * 4
    wins = windows_of([(0, Document("d", text))], real.tokenizer, [], context_length=5)
    assert len(wins) > 4
    for w in wins:
        got = real.tokenizer.decode(w.ids.tolist())
        assert got == text[w.starts[0] : w.ends[-1]], (got, w.starts, w.ends)


def test_default_run_end_to_end(tmp_path):
    """The default config (the `make demo` path) on a small budget: both presets, the layer
    two thirds deep, stores whose sinks are marked and outsized, an SAE per model evaluated
    with the model spliced, and its features: exemplar windows whose character spans tile the
    document text exactly (non-ASCII included) and a logit lens through the real head."""
    import json

    import pyarrow.parquet as pq

    import samesheep

    samesheep.run(
        None,
        run_dir=str(tmp_path / "run"),
        corpus__max_tokens=4000,
        corpus__heldout_tokens=1000,
        train__batch_tokens=256,
        train__train_tokens=40_960,
        train__splice_tokens=200,
        train__expansion_factor=2,  # the features stage's logit lens costs width x vocabulary
    )
    corpus = {
        s: [json.loads(x) for x in (tmp_path / "run" / "corpus" / f"{s}.jsonl").open()]
        for s in ("train", "heldout")
    }
    for folder, layer, d in [("gemma-3-270m", 12, 640), ("smollm2-135m-instruct", 20, 576)]:
        store = samesheep.open_store(tmp_path / "run" / folder / f"layer_{layer}" / "acts")
        assert store.complete and store.d_model == d and store.layer == layer
        assert store.num_tokens("train") >= 4000 and store.num_tokens("heldout") >= 1000
        shard = next(store.shards("train"))
        first = shard.tokens.column("position").to_numpy() == 0
        assert shard.tokens.column("special").to_numpy()[first].all()
        norms = shard.acts.float().norm(dim=-1)
        assert norms[torch.from_numpy(first)].min() > 5 * norms[shard.mask()].median()
        sae_dir = tmp_path / "run" / folder / f"layer_{layer}" / "sae"
        metrics = json.loads((sae_dir / "metrics.json").read_text())
        # 160 steps on 4,000 tokens: a small SAE, yet it must explain most of the variance
        assert 0 < metrics["fvu"] < 0.6 and metrics["l0"] <= 32
        assert 0 < metrics["median_relative_error"] < 1
        assert metrics["ce_zero"] > metrics["ce_clean"] > 0  # zeroing the layer hurts
        assert json.loads((sae_dir / "cfg.json").read_text())["d_sae"] == 2 * d
        features = sae_dir.parent / "features"
        table = pq.read_table(features / "feature_table.parquet").to_pandas()
        assert len(table) == 2 * d and (~table.dead).sum() > d // 4
        live = table[~table.dead]
        assert all(len(p) == 10 for p in live.promoted_tokens)
        ex = pq.read_table(features / "exemplars.parquet").to_pandas()
        non_ascii = 0
        for row in ex.itertuples():
            text = corpus[row.split][row.doc_index]["text"]
            assert row.text == text[row.char_start : row.char_end]
            # the tokens cover the window's text without a gap (byte pieces of one character
            # share or overlap its span)
            spans = sorted(zip(row.token_starts, row.token_ends, strict=True))
            assert spans[0][0] == 0, (row.text, spans)  # spans are relative to the window
            reach = 0
            for s, e in spans:
                assert s <= reach, (row.text, spans)
                reach = max(reach, e)
            assert reach == len(row.text)
            non_ascii += not row.text.isascii()
        assert non_ascii > 0
        # each token's span holds its own decoded text (byte pieces of a character: the run
        # of pieces decodes to it), on every non-ASCII exemplar and the first 2,000
        sample = ex[(ex.index < 2000) | ~ex.text.map(str.isascii)]
        texts = {s: [d["text"] for d in docs] for s, docs in corpus.items()}
        assert assert_token_spans(sample, texts, store, load_tokenizer(folder)) > 0
    # the comparison, with its floor (random-weights copies) and ceiling (second seeds)
    summary = json.loads(
        (
            tmp_path / "run" / "compare" / "gemma-3-270m__smollm2-135m-instruct" / "summary.json"
        ).read_text()
    )
    for direction in ("a_to_b", "b_to_a"):
        e = summary["headline"]["raw"][direction]
        assert {"raw", "floor", "null", "ceiling", "normalised", "intervals"} <= e.keys()
        assert {"answer", "crossfit", "split", "untrained_pair"} <= e.keys()
        assert e["answer"]["mode"] == "crossfit"  # the real run has the documents for it
        assert 0 <= e["null"]["share_r0.5"] <= e["ceiling"]["share_r0.5"] <= 1
    assert len(summary["verdict"]) == 2 and summary["units"] > 3000


def test_the_shipped_smollm2_explains_and_judges():
    """The default explainer and scorer (interpret.explainer = local:smollm2-135m-instruct):
    its chat template applies, an explanation is a short phrase of text, and as a judge it
    tells an excerpt its description names from one it does not more often than not."""
    from helpers import window

    from samesheep.interpret.backends import LocalChat
    from samesheep.interpret.prompts import clean_explanation, detection_messages, explain_messages

    chat = LocalChat("smollm2-135m-instruct")
    examples = [window(f"the {w} river flows to the sea", [2], [3.0]) for w in ("old", "long")]
    reply = clean_explanation(chat.chat(explain_messages(examples), 24))
    assert reply and len(reply) < 200
    label = "rivers and streams"
    yes = [
        window(t, [], [])
        for t in ("The river Thames flows through London.", "A small stream ran past the mill.")
    ]
    no = [
        window(t, [], [])
        for t in ("The recipe needs two eggs and flour.", "He scored a goal in the final minute.")
    ]
    said = [chat.judge(detection_messages(label, e)) for e in yes + no]
    assert all(isinstance(s, bool) for s in said)
    assert sum(said[:2]) >= sum(said[2:])  # a weak model, but not a backwards one
