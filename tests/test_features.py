"""The features stage on planted data: a store whose activations are built so that one latent
fires on exactly one token and another only on one topic's documents, an SAE written by
hand, and the exact answers every table must give."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer

from samesheep.config import FeaturesConfig
from samesheep.corpus import CorpusReader, Document, write_documents
from samesheep.extraction import token_table, windows_of
from samesheep.features import CorpusInfo, FeatureSource, compute_features
from samesheep.sae import Sae, SaeConfig
from samesheep.selection import PairCounter, TopList, best_per_group, best_per_group_capped
from samesheep.store import SPLITS, StoreWriter, TokenFilter, open_store

D = 32
TOPIC_STRENGTH = 10.0
WORDS = [
    "the", "cat", "sat", "on", "a", "mat", "while", "rivers", "run", "to", "the", "sea", "and",
    "Paris", "is", "a", "city", "in", "France",
]  # fmt: skip
TOPICS = ["Geography", "Biology", "People"]


def _documents(n: int, seed: int) -> list[Document]:
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        length = int(rng.integers(5, 60))
        text = " ".join(rng.choice(WORDS, size=length))
        if i % 7 == 0:
            text += " Zürich \u2013 café"  # non-ASCII pieces
        topic = TOPICS[i % 3]
        docs.append(Document(f"{seed}-{i}", text, f"Title {seed}-{i}", {"topic": topic}))
    return docs


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tokenizer_dir):
    """(run folder, store, SAE, tokenizer, planted token id, per-token truth)."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    run = tmp_path_factory.mktemp("features_run")
    corpus = run / "corpus"
    docs = {"train": _documents(90, 0), "heldout": _documents(20, 1)}
    for split, ds in docs.items():
        write_documents(corpus / f"{split}.jsonl", ds)
    g = torch.Generator().manual_seed(0)
    embed = torch.randn(len(tok), D, generator=g)  # one random direction per token id
    topic_dir = torch.zeros(D)
    topic_dir[0] = 1.0
    embed[:, 0] = 0.0  # token directions leave the topic axis free
    prefix = [tok.eos_token_id]
    header = {
        "key": "planted", "layer": 1, "d_model": D, "model": "planted", "n_layers": 2,
        "dtype": "float32", "compute_dtype": "float32", "device": "cpu", "context_length": 24,
        "prefix_ids": prefix,
    }  # fmt: skip
    writer = StoreWriter(run / "m" / "layer_1" / "acts", header)
    for split, ds in docs.items():
        windows = windows_of(list(enumerate(ds)), tok, prefix, 24)
        for i in range(0, len(windows), 15):  # shards of 15 windows: documents cross shards
            group = windows[i : i + 15]
            ids = torch.from_numpy(np.concatenate([w.ids for w in group]))
            acts = embed[ids].clone()
            geo = np.concatenate(
                [np.full(len(w.ids), ds[w.doc_index].meta["topic"] == "Geography") for w in group]
            )
            acts += TOPIC_STRENGTH * torch.from_numpy(geo)[:, None].float() * topic_dir
            table = token_table(group, acts.norm(dim=1).numpy())
            writer.write(f"{split}-{i // 15:05d}", split, acts, table)
    writer.finish()
    store = open_store(run / "m" / "layer_1" / "acts")
    # the planted token: the most frequent real token
    counts = np.bincount(
        np.concatenate(
            [s.tokens.column("token_id").to_numpy()[s.mask().numpy()] for s in store.shards(None)]
        )
    )
    planted_id = int(np.argmax(counts))
    sae = Sae(SaeConfig("relu", D, 16))
    with torch.no_grad():
        sae.W_enc.normal_(0, 0.3, generator=g)
        sae.b_enc.fill_(-100.0)  # latents 2.. never fire unless set below
        e = embed[planted_id]
        sae.W_enc[0] = e / e.norm()
        sae.b_enc[0] = -0.5 * float(e.norm())  # only the planted token passes
        sae.W_enc[1] = topic_dir
        sae.b_enc[1] = -0.5 * TOPIC_STRENGTH  # only Geography documents pass
        sae.W_enc[2] = torch.randn(D, generator=g) / D**0.5  # fires on about half the tokens
        sae.b_enc[2] = 0.0
        sae.W_dec.copy_(sae.W_enc)
        sae.b_dec.zero_()
    return run, store, sae, tok, planted_id


@pytest.fixture(scope="module")
def result(planted):
    run, store, sae, tok, _ = planted
    src = FeatureSource("planted", 1, "sae", sae, store, TokenFilter(), tok)
    cfg = FeaturesConfig(
        top_exemplars=6,
        per_document=2,
        quantile_bins=4,
        per_bin=3,
        random_exemplars=4,
        window_tokens=8,
        top_tokens=5,
    )
    info = CorpusInfo.load(CorpusReader(run / "corpus"))
    out = compute_features(src, info, run / "codes", cfg, "key", torch.device("cpu"), torch.float32)
    return (*out, cfg)


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def dense_truth(store, sae):
    """Every kept row's activations, token table and doc key, computed densely."""
    rows, acts = [], []
    for shard in store.shards(None):
        x, t = shard.select(TokenFilter())
        acts.append(sae.encode(x).detach())
        d = t.to_pydict()
        d["split"] = [shard.split] * t.num_rows
        rows.append(d)
    merged = {k: [v for r in rows for v in r[k]] for k in rows[0]}
    return torch.cat(acts), merged


def test_planted_token_and_topic_latents(planted, result):
    _, store, sae, tok, planted_id = planted
    table, _, _, summary, _ = result
    f = table.to_pandas().set_index("latent")
    assert f.loc[0, "top_token_ids"][0] == planted_id
    assert f.loc[0, "token_concentration"] == pytest.approx(1.0)
    assert f.loc[0, "top_tokens"][0] == tok.decode([planted_id])
    assert tok.decode([planted_id]).strip() in f.loc[0, "label"]
    assert f.loc[1, "topic"] == "Geography" and f.loc[1, "topic_share"] == pytest.approx(1.0)
    assert f.loc[1, "topic_lift"] == pytest.approx(3.0, rel=0.15)  # a third of the tokens
    assert "Geography" in f.loc[1, "label"]
    assert bool(f.loc[5, "dead"]) and f.loc[5, "label"] == ""
    assert bool(f.loc[2, "dense"]) and not bool(f.loc[0, "dead"])
    acts, rows = dense_truth(store, sae)
    train = np.array(rows["split"]) == "train"
    fires = (acts > 0).numpy()
    np.testing.assert_array_equal(f["fires_train"].to_numpy(), fires[train].sum(0))
    np.testing.assert_array_equal(f["fires_heldout"].to_numpy(), fires[~train].sum(0))
    np.testing.assert_allclose(f["max_act"].to_numpy(), acts.max(0).values.numpy(), rtol=1e-6)
    doc_key = [f"{s}/{d}" for s, d in zip(rows["split"], rows["doc_index"], strict=True)]
    for j in (0, 1, 2):
        assert f.loc[j, "n_docs"] == len(
            {k for k, on in zip(doc_key, fires[:, j], strict=True) if on}
        )
        assert int(np.sum(f.loc[j, "hist"])) == fires[:, j].sum()
    assert summary["tokens"] == {"train": int(train.sum()), "heldout": int((~train).sum())}


def test_top_exemplars_equal_a_full_sort_with_the_document_cap(planted, result):
    _, store, sae, _, _ = planted
    _, exemplars, _, _, cfg = result
    acts, rows = dense_truth(store, sae)
    ex = exemplars.to_pandas()
    for j in (0, 1, 2):
        col = acts[:, j].numpy()
        order = np.argsort(-col, kind="stable")
        want, per_doc = [], {}
        for i in order:
            if col[i] <= 0 or len(want) == cfg.top_exemplars:
                break
            key = (rows["split"][i], rows["doc_index"][i])
            if per_doc.get(key, 0) < cfg.per_document:
                per_doc[key] = per_doc.get(key, 0) + 1
                want.append(col[i])
        got = ex[(ex.latent == j) & (ex.kind == "top")].sort_values("rank")
        np.testing.assert_allclose(got["value"].to_numpy(), want, rtol=1e-6)
        assert got.groupby(["split", "doc_index"]).size().max() <= cfg.per_document


def test_windows_reproduce_the_text_and_never_cross_documents(planted, result):
    run = planted[0]
    _, exemplars, _, _, cfg = result
    docs = {s: read_lines(run / "corpus" / f"{s}.jsonl") for s in SPLITS}
    ex = exemplars.to_pandas()
    assert set(ex.kind) == {"top", "quantile", "random"}
    for row in ex.itertuples():
        doc = docs[row.split][row.doc_index]
        assert doc["id"] == row.doc_id and row.title == doc["title"]
        assert row.text == doc["text"][row.char_start : row.char_end]
        assert len(row.token_starts) <= cfg.window_tokens
        # token spans are relative to the window: row.text[s:e] is the token's text
        assert min(row.token_starts) == 0 and max(row.token_ends) == len(row.text)
        assert all(
            0 <= s < e <= len(row.text)
            for s, e in zip(row.token_starts, row.token_ends, strict=True)
        )
        if row.kind != "random":
            assert row.activations[row.center] == pytest.approx(row.value, rel=1e-6)
        else:
            assert np.nansum(row.activations) == 0
    has_accent = ex[ex.text.str.contains("ü")]
    assert len(has_accent)  # non-ASCII windows are there and reproduce (checked above)
    # the planted latent's exemplar tokens are the planted token, character for character
    tok, planted_id = planted[3], planted[4]
    for row in ex[(ex.latent == 0) & (ex.kind != "random")].itertuples():
        c = row.center
        assert row.text[row.token_starts[c] : row.token_ends[c]] == tok.decode([planted_id])


def test_quantile_bins_hold_their_range(result):
    table, exemplars, _, _, cfg = result
    ex = exemplars.to_pandas()
    top = table.to_pandas().set_index("latent")["max_act"]
    q = ex[ex.kind == "quantile"]
    assert len(q)
    lo = q.bin / cfg.quantile_bins * top[q.latent].to_numpy()
    hi = (q.bin + 1) / cfg.quantile_bins * top[q.latent].to_numpy()
    assert ((q.value >= lo * (1 - 1e-6)) & (q.value <= hi * (1 + 1e-6))).all()
    assert q.groupby(["latent", "bin"]).size().max() <= cfg.per_bin
    # latent 2 fires on half the tokens with values spread over its range: every bin filled
    assert sorted(q[q.latent == 2].bin.unique()) == list(range(cfg.quantile_bins))


# ---- the selection machinery against brute force ----


def test_toplist_equals_a_full_sort_over_batches():
    rng = np.random.default_rng(0)
    group = rng.integers(0, 7, 3000)
    score = rng.normal(size=3000)
    sub = rng.integers(0, 40, 3000)
    capped = TopList(5, per_sub=1)
    plain = TopList(5)
    for lo in range(0, 3000, 250):
        s = slice(lo, lo + 250)
        capped.add(group=group[s], score=score[s], sub=sub[s], row=np.arange(3000)[s])
        plain.add(group=group[s], score=score[s], row=np.arange(3000)[s])
    for g in range(7):
        mine = np.flatnonzero(group == g)
        want = mine[np.argsort(-score[mine])][:5]
        np.testing.assert_array_equal(plain.cols["row"][plain.cols["group"] == g], want)
        seen, want = set(), []
        for i in mine[np.argsort(-score[mine])]:
            if sub[i] not in seen and len(want) < 5:
                seen.add(sub[i])
                want.append(i)
        np.testing.assert_array_equal(capped.cols["row"][capped.cols["group"] == g], want)
    assert best_per_group(np.array([1, 1, 0]), np.array([1.0, 2.0, 3.0]), 1).tolist() == [2, 1]
    idx = best_per_group_capped(
        np.zeros(4, int), np.array([0, 0, 1, 1]), np.array([4.0, 3, 2, 1]), 3, 1
    )
    assert idx.tolist() == [0, 2]


def test_pair_counter_counts_and_prunes():
    rng = np.random.default_rng(1)
    keys = rng.integers(0, 50, 5000)
    weights = rng.random(5000)
    c = PairCounter(group_size=10)
    for lo in range(0, 5000, 700):
        c.add(keys[lo : lo + 700], weights[lo : lo + 700])
    np.testing.assert_array_equal(c.keys, np.unique(keys))
    np.testing.assert_array_equal(c.counts, np.bincount(keys)[np.unique(keys)])
    np.testing.assert_allclose(c.weights, np.bincount(keys, weights)[np.unique(keys)])
    c.prune(2)
    assert len(c.keys) == 10 and c.pruned
    for g in range(5):
        mine = np.bincount(keys, weights)[g * 10 : g * 10 + 10]
        assert set(c.keys[c.keys // 10 == g]) == set(g * 10 + np.argsort(-mine)[:2])
    assert np.array_equal(c.by_group(5), np.arange(0, 11, 2))


def test_codes_are_written_once_and_reused(planted, result, tmp_path):
    run, _, _, _, _ = planted
    files = sorted((run / "codes").glob("*.safetensors"))
    assert files and json.loads((run / "codes" / "manifest.json").read_text())["key"] == "key"


def test_written_tables_open_with_pyarrow(tmp_path, result):
    from samesheep.features import write_features

    table, exemplars, centroids, summary, _ = result
    write_features(tmp_path, table, exemplars, centroids, {**summary, "key": "k"})
    back = pq.read_table(tmp_path / "feature_table.parquet")
    assert back.num_rows == 16 and b"samesheep.histogram_edges" in back.schema.metadata
    assert pq.read_table(tmp_path / "exemplars.parquet").num_rows == exemplars.num_rows
    assert json.loads((tmp_path / "summary.json").read_text())["latents"] == 16
    assert not Path(tmp_path / "centroids.safetensors").exists()  # no embedder given
