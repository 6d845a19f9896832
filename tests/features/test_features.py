"""The features stage on planted data: a store whose activations are built so that one latent
fires on exactly one token and another only on one topic's documents, an SAE written by
hand, and the exact answers every table must give."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from samesheep.core.config import FeaturesConfig
from samesheep.data.corpus import CorpusReader, Document, write_documents
from samesheep.data.store import SPLITS, StoreWriter, TokenFilter, open_store
from samesheep.features.compute import (
    DOC_KEEP,
    CodesPlace,
    CorpusInfo,
    FeatureSource,
    Rows,
    Statistics,
    compute_features,
)
from samesheep.features.embedding import TextEmbedder
from samesheep.features.labels import MIN_Z, log_odds_z, term_text
from samesheep.features.logit_lens import excluded_token_ids
from samesheep.features.selection import PairCounter, TopList, best_per_group, best_per_group_capped
from samesheep.lm.extraction import token_table, windows_of
from samesheep.sae.codes import Encoding
from samesheep.sae.model import Sae, SaeConfig

D = 32
WINDOW = 8
TOPIC_STRENGTH = 10.0
WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "while",
    "rivers",
    "run",
    "to",
    "the",
    "sea",
    "and",
    "Paris",
    "is",
    "a",
    "city",
    "in",
    "France",
]
TOPICS = ["Geography", "Biology", "People"]
CLONE_TEXT = "Moon"
"""The whole text of every tenth document: latent 3 fires on these documents only, so all
its exemplars are this text."""
CLONE_LATENT = 3


def _documents(n: int, seed: int) -> list[Document]:
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        length = int(rng.integers(5, 60))
        text = " ".join(rng.choice(WORDS, size=length))
        if i % 7 == 0:
            text += " Zürich \u2013 café"  # non-ASCII pieces
        if i % 10 == 3:
            text = CLONE_TEXT  # short enough that every window of it is the whole text
        topic = TOPICS[i % 3]
        docs.append(Document(f"{seed}-{i}", text, f"Title {seed}-{i}", {"topic": topic}))
    return docs


@pytest.fixture(scope="module")
def lens(tiny_models, tokenizer_dir):
    """(the tiny llama as the logit lens' model, excluded ids, two tokens each of whose
    unembedding rows has its own token as best match among the allowed ones)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    w_u = model.get_output_embeddings().weight.detach().double()
    exclude = excluded_token_ids(AutoTokenizer.from_pretrained(tokenizer_dir), w_u.shape[0])
    gram = (w_u @ w_u.T).masked_fill(exclude, -torch.inf)
    best = gram.argmax(1)
    own = [t for t in range(len(best)) if not exclude[t] and best[t] == t]
    return model, exclude, own[len(own) // 3], own[2 * len(own) // 3]


def lens_row(model, token: int) -> torch.Tensor:
    """A residual direction the final norm maps onto the token's unembedding row."""
    w_u = model.get_output_embeddings().weight.detach()
    return w_u[token] / model.model.norm.weight.detach()


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tokenizer_dir, lens):
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
    clone_dir = torch.zeros(D)
    clone_dir[1] = 1.0
    embed[:, 1] = 0.0  # ... and the axis of the clone documents
    assert len(tok(CLONE_TEXT, add_special_tokens=False).input_ids) <= WINDOW - 1
    prefix = [tok.eos_token_id]
    header = {
        "key": "planted",
        "layer": 1,
        "d_model": D,
        "model": "planted",
        "n_layers": 2,
        "dtype": "float32",
        "compute_dtype": "float32",
        "device": "cpu",
        "context_length": 24,
        "prefix_ids": prefix,
    }
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
            clone = np.concatenate(
                [np.full(len(w.ids), ds[w.doc_index].text == CLONE_TEXT) for w in group]
            )
            acts += TOPIC_STRENGTH * torch.from_numpy(clone)[:, None].float() * clone_dir
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
        sae.W_enc[2, 1] = 0.0
        sae.b_enc[2] = 0.0
        sae.W_enc[CLONE_LATENT] = clone_dir
        sae.b_enc[CLONE_LATENT] = -0.5 * TOPIC_STRENGTH  # only the clone documents pass
        sae.W_dec.copy_(sae.W_enc)
        sae.b_dec.zero_()
        # the logit lens: latent 0 writes one token's unembedding direction (through the
        # final norm), latent 1 the opposite of another's
        model, _, promoted, suppressed = lens
        sae.W_dec[0] = 3.0 * lens_row(model, promoted)
        sae.W_dec[1] = -0.5 * lens_row(model, suppressed)
    return run, store, sae, tok, planted_id


@pytest.fixture(scope="module")
def embedder():
    return TextEmbedder()


def corpus_texts(run: Path) -> list[str]:
    """Every corpus text, train documents then held-out ones (as doc_states holds them)."""
    reader = CorpusReader(run / "corpus")
    return [d.text for split in SPLITS for d in reader.documents(split)]


@pytest.fixture(scope="module")
def result(planted, lens, embedder):
    run, store, sae, tok, _ = planted
    src = FeatureSource("planted", 1, "sae", sae, store, TokenFilter(), tok)
    cfg = FeaturesConfig(
        top_exemplars=6,
        per_document=2,
        quantile_bins=4,
        per_bin=3,
        random_exemplars=4,
        window_tokens=WINDOW,
        top_tokens=5,
    )
    info = CorpusInfo.load(CorpusReader(run / "corpus"))
    states = embedder.embed_documents(corpus_texts(run))
    src.lens_model = lens[0]
    codes = CodesPlace(run / "codes", "key")
    out = compute_features(
        src, info, cfg, codes, Encoding(torch.device("cpu"), torch.float32), doc_states=states
    )
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


def test_every_window_token_holds_the_latents_dense_activation(planted, result):
    """Not only the centre: each token of each window carries the latent's activation on
    that token's row (the encoder applied densely), 0 where it does not fire."""
    _, store, sae, _, _ = planted
    _, exemplars, _, _, _ = result
    acts, rows = dense_truth(store, sae)
    at: dict[tuple, list[int]] = {}
    for i, key in enumerate(
        zip(rows["split"], rows["doc_index"], rows["char_start"], rows["char_end"], strict=True)
    ):
        at.setdefault(key, []).append(i)
    checked = 0
    for row in exemplars.to_pandas().itertuples():
        for s, e, a in zip(row.token_starts, row.token_ends, row.activations, strict=True):
            key = (row.split, row.doc_index, row.char_start + s, row.char_start + e)
            want = [float(acts[i, row.latent]) for i in at[key]]
            assert any(a == pytest.approx(w, rel=1e-5, abs=1e-6) for w in want), (key, a, want)
            checked += a > 0
    assert checked > len(exemplars)  # firing tokens besides the centres were compared


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
    from samesheep.features.compute import write_features

    table, exemplars, centroids, summary, _ = result
    write_features(tmp_path, table, exemplars, centroids, {**summary, "key": "k"})
    back = pq.read_table(tmp_path / "feature_table.parquet")
    assert back.num_rows == 16 and b"samesheep.histogram_edges" in back.schema.metadata
    assert pq.read_table(tmp_path / "exemplars.parquet").num_rows == exemplars.num_rows
    assert json.loads((tmp_path / "summary.json").read_text())["latents"] == 16
    assert load_file(tmp_path / "centroids.safetensors")["centroids"].shape == (16, 384)
    written = json.loads((tmp_path / "summary.json").read_text())["histogram_edges"]
    assert written == summary["histogram_edges"]
    assert json.loads(back.schema.metadata[b"samesheep.histogram_edges"]) == written


# ---- document counts across shards ----


def shard(doc_index, fires, gid0: int = 0, split: int = 0) -> Rows:
    """Hand-made Rows of one shard: tokens of the documents `doc_index` (token id 1 each),
    entries `fires` as (row, latent, value) in row order."""
    doc_index = np.asarray(doc_index, dtype=np.int64)
    n = len(doc_index)
    row, latent, value = (np.array(c) for c in zip(*fires, strict=True)) if fires else ([],) * 3
    return Rows(
        split=split,
        doc_index=doc_index,
        doc_key=doc_index * 2 + split,
        token_id=np.ones(n, dtype=np.int64),
        bigram=np.full(n, -1, dtype=np.int64),
        topic=np.full(n, -1, dtype=np.int64),
        gid=gid0 + np.arange(n, dtype=np.int64),
        entry_row=np.asarray(row, dtype=np.int64),
        latent=np.asarray(latent, dtype=np.int64),
        value=np.asarray(value, dtype=np.float32),
    )


def test_n_docs_counts_a_document_spanning_three_shards_once():
    stats = Statistics(3, 4, 0, FeaturesConfig())
    # document 0 fills shard 0, all of shard 1 and the start of shard 2; latent 0 fires on it
    # in shards 0 and 2 but not in shard 1, latent 1 only in shard 1
    stats.add(shard([0, 0, 0], [(0, 0, 1.0), (2, 0, 0.5)]))
    stats.add(shard([0, 0, 0], [(1, 1, 2.0)], gid0=3))
    stats.add(shard([0, 1, 1], [(0, 0, 1.5), (0, 1, 1.0), (1, 1, 1.0), (2, 2, 1.0)], gid0=6))
    stats.add(shard([], [], gid0=9))  # a shard whose tokens were all filtered out
    stats.add(shard([1, 2], [(0, 0, 1.0), (1, 0, 1.0)], gid0=9))
    assert stats.n_docs.tolist() == [3, 2, 1]  # latent 0: documents 0, 1, 2 once each
    pairs = dict(zip(stats.docs.keys.tolist(), stats.docs.weights.tolist(), strict=True))
    assert pairs[0 * (1 << 40) + 0] == pytest.approx(3.0)  # document 0's whole mass
    assert pairs[1 * (1 << 40) + 2] == pytest.approx(1.0)  # document 1 (key 2)


def test_n_docs_and_document_mass_equal_brute_force():
    """Random contiguous documents (some spanning many shards), random shard cuts, random
    firings: n_docs and the heaviest documents per latent equal a count over everything."""
    rng = np.random.default_rng(3)
    d_sae, n_docs = 4, 300  # more documents than DOC_KEEP: pruning happens
    for split in (0, 1):
        lengths = rng.integers(1, 40, n_docs)
        doc = np.repeat(np.arange(n_docs), lengths)
        n = len(doc)
        on = rng.random((n, d_sae)) < np.array([0.02, 0.2, 0.6, 0.0])
        value = rng.random((n, d_sae)).astype(np.float32) + 0.1
        stats = Statistics(d_sae, 4, 0, FeaturesConfig())
        cuts = np.unique(np.concatenate([[0, n], rng.integers(0, n, 60)]))
        for a, b in itertools.pairwise(cuts):
            r, lat = np.nonzero(on[a:b])
            fires = list(zip(r.tolist(), lat.tolist(), value[a:b][r, lat].tolist(), strict=True))
            stats.add(shard(doc[a:b], fires, gid0=a, split=split))
        for j in range(d_sae):
            assert stats.n_docs[j] == len(np.unique(doc[on[:, j]])), j
            mass = np.bincount(doc[on[:, j]], weights=value[on[:, j], j], minlength=n_docs)
            mine = (stats.docs.keys >> 40) == j
            keys = (stats.docs.keys[mine] & ((1 << 40) - 1)) - split
            got = dict(zip((keys // 2).tolist(), stats.docs.weights[mine].tolist(), strict=True))
            want = np.argsort(-mass, kind="stable")[: min(DOC_KEEP, int((mass > 0).sum()))]
            assert set(want.tolist()) <= set(got)
            np.testing.assert_allclose([got[d] for d in want], mass[want], rtol=1e-5)


# ---- the columns nobody else checks, against dense references ----


def test_logit_lens_columns_equal_a_dense_reference(planted, lens, result):
    """promoted/suppressed tokens of every live latent equal W_dec row -> final RMSNorm ->
    unembedding, computed densely here; the planted rows rank their token first."""
    _, _, sae, tok, _ = planted
    model, exclude, promoted, suppressed = lens
    f = result[0].to_pandas().set_index("latent")
    assert f.loc[0, "promoted_token_ids"][0] == promoted
    assert f.loc[0, "promoted_tokens"][0] == tok.decode([promoted])
    assert f.loc[1, "suppressed_token_ids"][0] == suppressed
    assert f.loc[1, "suppressed_tokens"][0] == tok.decode([suppressed])
    norm = model.model.norm
    w_u = model.get_output_embeddings().weight.detach().double()
    x = sae.W_dec.detach().double()
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    logits = (y * norm.weight.detach().double()) @ w_u.T  # [d_sae, vocab]
    k = 5
    for j in range(sae.cfg.d_sae):
        if f.loc[j, "dead"]:
            assert len(f.loc[j, "promoted_tokens"]) == 0
            continue
        top = logits[j].masked_fill(exclude, -torch.inf).topk(k)
        bottom = logits[j].masked_fill(exclude, torch.inf).topk(k, largest=False)
        assert list(f.loc[j, "promoted_token_ids"]) == top.indices.tolist(), j
        assert list(f.loc[j, "suppressed_token_ids"]) == bottom.indices.tolist(), j
        np.testing.assert_allclose(f.loc[j, "promoted_logits"], top.values, rtol=1e-4)
        np.testing.assert_allclose(f.loc[j, "suppressed_logits"], bottom.values, rtol=1e-4)
        assert list(f.loc[j, "promoted_tokens"]) == [tok.decode([t]) for t in top.indices.tolist()]


def test_centroids_and_coherence_equal_an_independent_embedding(planted, result, embedder):
    """Centroids and coherence recomputed from scratch with embed_spans (its own MiniLM pass
    over the documents); the latent whose exemplars are all one text is clearly coherent."""
    run = planted[0]
    table, exemplars, centroids, _, cfg = result
    f = table.to_pandas().set_index("latent")
    ex = exemplars.to_pandas()
    n_train = sum(1 for _ in CorpusReader(run / "corpus").documents("train"))
    ex["text_index"] = ex.doc_index + np.where(ex.split == "heldout", n_train, 0)
    ex["span"] = list(zip(ex.text_index, ex.char_start, ex.char_end, strict=True))
    top = ex[(ex.kind == "top") & (ex["rank"] < cfg.top_exemplars)]
    random = sorted(set(ex[ex.kind == "random"].span))
    texts = corpus_texts(run)
    emb = embedder.embed_spans(texts, list(top.span) + random)
    top_emb, rand_emb = emb[: len(top)], emb[len(top) :]

    def mean_cosine(e):
        c = e @ e.T
        return float((c.sum() - c.diagonal().sum()) / (len(e) * (len(e) - 1)))

    baseline = mean_cosine(rand_emb)
    assert len(random) > 1
    for j in range(16):
        rows = np.flatnonzero(top.latent.to_numpy() == j)
        if f.loc[j, "dead"]:
            assert not len(rows) and np.isnan(f.loc[j, "coherence"])
            assert centroids[j].abs().sum() == 0
            continue
        e = top_emb[rows]
        want = torch.nn.functional.normalize(e.mean(0), dim=0)
        assert float(want @ centroids[j]) > 0.999, j
        assert len(rows) > 1 and np.isfinite(f.loc[j, "coherence"])
        assert f.loc[j, "coherence"] == pytest.approx(mean_cosine(e) - baseline, abs=5e-3), j
    clone = top[top.latent == CLONE_LATENT]
    assert len(clone) > 1 and (clone.text == CLONE_TEXT).all()
    assert f.loc[CLONE_LATENT, "coherence"] > 0.2
    assert f.loc[CLONE_LATENT, "coherence"] > f.loc[2, "coherence"] + 0.1


def test_columns_equal_a_dense_reference(planted, result):
    """mean_act, top titles and their shares, doc_concentration, the histogram and its edges,
    and the statistical label's first term, from every token's dense activations."""
    run, store, sae, tok, planted_id = planted
    table, _, _, summary, cfg = result
    f = table.to_pandas().set_index("latent")
    acts, rows = dense_truth(store, sae)
    acts = acts.numpy().astype(np.float64)
    fires = acts > 0
    n_fires = fires.sum(0)
    want_mean = np.where(n_fires > 0, acts.sum(0) / np.maximum(n_fires, 1), 0.0)
    np.testing.assert_allclose(f["mean_act"].to_numpy(), want_mean, rtol=1e-5)

    reader = CorpusReader(run / "corpus")
    title = {s: [d.title for d in reader.documents(s)] for s in SPLITS}
    titles = np.array([title[s][d] for s, d in zip(rows["split"], rows["doc_index"], strict=True)])
    for j in np.flatnonzero(n_fires):
        share = {}
        for t, a in zip(titles[fires[:, j]], acts[fires[:, j], j], strict=True):
            share[t] = share.get(t, 0.0) + a / acts[:, j].sum()
        got_titles, got_shares = list(f.loc[j, "top_titles"]), f.loc[j, "top_title_shares"]
        best = sorted(share.values(), reverse=True)[: cfg.top_tokens]
        np.testing.assert_allclose(got_shares, best, rtol=1e-5)  # the heaviest, in order
        np.testing.assert_allclose([share[t] for t in got_titles], got_shares, rtol=1e-5)
        assert f.loc[j, "doc_concentration"] == pytest.approx(best[0], rel=1e-5)

    edges = np.array(summary["histogram_edges"])
    assert len(edges) == cfg.histogram_bins + 1 and (np.diff(edges) > 0).all()
    np.testing.assert_allclose(np.diff(np.log(edges)), np.log(edges[1] / edges[0]), rtol=1e-9)
    assert edges[0] == pytest.approx(acts.max() * 1e-6) and edges[-1] >= acts.max()
    for j in np.flatnonzero(n_fires):
        v = np.clip(acts[fires[:, j], j].astype(np.float32), edges[0], edges[-1])
        np.testing.assert_array_equal(f.loc[j, "hist"], np.histogram(v, edges)[0])

    # the planted latent's first label term is its token, with the z of the dense counts
    token_ids = np.array(rows["token_id"])
    total, fired = len(token_ids), int(n_fires[0])
    count = int((token_ids == planted_id).sum())
    z = log_odds_z(np.array([count]), np.array([0.0]), fired, total - fired)[0]
    assert f.loc[0, "label_terms"][0] == term_text(tok.decode([planted_id]))
    assert f.loc[0, "label_z"][0] == pytest.approx(z, rel=1e-5)
    for j in np.flatnonzero(n_fires):
        zs, terms = f.loc[j, "label_z"], list(f.loc[j, "label_terms"])
        assert len(zs) == len(terms) <= 5 and (np.diff(zs) <= 0).all() and (zs >= MIN_Z).all()
        assert all(f'"{t}"' in f.loc[j, "label"] for t in terms[:2])
    # latent 3 fires on the clone documents alone: every distinctive term is in their text
    clone_terms = list(f.loc[CLONE_LATENT, "label_terms"])
    assert clone_terms and all(t in CLONE_TEXT for t in clone_terms), clone_terms


def test_topic_and_clone_latents_point_at_their_documents(planted, result):
    """The topic latent's top titles and exemplars are Geography documents; the clone
    latent's are clone documents."""
    run = planted[0]
    table, exemplars, _, _, _ = result
    f = table.to_pandas().set_index("latent")
    reader = CorpusReader(run / "corpus")
    docs = {s: list(reader.documents(s)) for s in SPLITS}
    geo = {d.title for ds in docs.values() for d in ds if d.meta["topic"] == "Geography"}
    clones = {d.title for ds in docs.values() for d in ds if d.text == CLONE_TEXT}
    assert len(f.loc[1, "top_titles"]) == 5 and set(f.loc[1, "top_titles"]) <= geo
    assert len(f.loc[CLONE_LATENT, "top_titles"]) == 5
    assert set(f.loc[CLONE_LATENT, "top_titles"]) <= clones
    ex = exemplars.to_pandas()
    for j, allowed in ((1, "Geography"), (CLONE_LATENT, None)):
        mine = ex[(ex.latent == j) & (ex.kind != "random")]
        assert len(mine)
        for row in mine.itertuples():
            doc = docs[row.split][row.doc_index]
            assert doc.meta["topic"] == allowed if allowed else doc.text == CLONE_TEXT


def test_latent_centroids_equal_one_latent_at_a_time():
    """All latents at once equal the per-latent definitions: normalised mean, and
    mean_pairwise_cosine minus the baseline, with zero rows (spans without a wordpiece) left
    out, nan below two rows, and zero centroids for latents with none."""
    from samesheep.features.compute import latent_centroids
    from samesheep.features.embedding import mean_pairwise_cosine

    gen = torch.Generator().manual_seed(3)
    emb = torch.nn.functional.normalize(torch.randn(60, 16, generator=gen), dim=1)
    emb[[4, 17, 18]] = 0.0
    owner = np.sort(np.random.default_rng(3).integers(0, 12, 60))
    owner[owner == 5] = 6  # latent 5 owns nothing
    owner[17:19] = owner[16]  # a latent with two zero rows among its rows
    centroids, coherence = latent_centroids(emb, owner, 12, baseline=0.1)
    for j in range(12):
        e = emb[owner == j]
        if not len(e):
            assert torch.equal(centroids[j], torch.zeros(16)) and np.isnan(coherence[j])
            continue
        want = torch.nn.functional.normalize(e.mean(0), dim=0)
        assert torch.allclose(centroids[j], want, atol=1e-6), j
        ref = mean_pairwise_cosine(e) - 0.1
        assert (np.isnan(ref) and np.isnan(coherence[j])) or coherence[j] == pytest.approx(
            ref, abs=1e-9
        ), j
