"""Features: for every latent of an SAE, what it fires on, in text a researcher can read.

One streaming pass encodes every kept token of the store (train and held-out) and keeps only
running statistics: firing counts, mass and maximum, the exact top exemplars (at most a few
per document), per-latent token, bigram, topic and document counts. The codes it writes
(sae/codes.py) are then read twice more, cheaply: once for the activation histograms, the
exemplars across the activation range (reservoirs, now that each latent's maximum is known)
and the random non-firing windows; once to cut every exemplar's window out of its document
with each token's activation. Memory is flat in the number of tokens.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import save_file

from ..core.cache import load_done, mark_done, unmark
from ..core.config import FeaturesConfig
from ..core.constants import SUMMARY
from ..core.errors import SamesheepError
from ..core.files import atomic_path, read_json
from ..core.progress import step
from ..data.corpus import CorpusReader, Document
from ..data.store import SPLITS, Store, TokenFilter
from ..sae.codes import CodedShard, Encoding, read_codes, stream_codes
from ..sae.model import Sae
from .embedding import DocumentStates, mean_pairwise_cosine
from .exemplar_windows import (
    KINDS,
    ExemplarRefs,
    cut_windows,
    exemplar_table,
    window_bounds,
    window_rows,
)
from .labels import MIN_TOPIC_LIFT, format_label, lift, term_text, top_terms
from .logit_lens import excluded_token_ids, logit_lens
from .selection import PairCounter, TopList

RANDOM_POOL = 1024
"""Random windows drawn once; each latent's non-firing negatives are picked among them."""
DENSE_FRACTION = 0.1
"""A latent active on more than this fraction of the training tokens counts as dense."""
DOC_KEEP = 64
"""Documents per latent whose mass is kept exactly (for its top titles)."""


# ---------------------------------------------------------------- the corpus side


@dataclass
class CorpusInfo:
    """Per document of each split: its title, its topic (an index into `topics`, -1 for none)."""

    titles: dict[str, list[str]]
    ids: dict[str, list[str]]
    topic_of: dict[str, np.ndarray]
    topics: list[str]
    reader: CorpusReader
    _cache: OrderedDict = field(default_factory=OrderedDict)

    @classmethod
    def load(cls, reader: CorpusReader) -> CorpusInfo:
        titles: dict[str, list[str]] = {}
        ids: dict[str, list[str]] = {}
        raw: dict[str, list[str]] = {}
        for split in SPLITS:
            docs = list(reader.documents(split))
            titles[split] = [d.title or d.id for d in docs]
            ids[split] = [d.id for d in docs]
            raw[split] = [str(d.meta.get("topic") or "") for d in docs]
        topics = sorted({t for ts in raw.values() for t in ts if t})
        index = {t: i for i, t in enumerate(topics)}
        topic_of = {
            s: np.array([index.get(t, -1) for t in ts], dtype=np.int64) for s, ts in raw.items()
        }
        return cls(titles, ids, topic_of, topics, reader)

    def check(self, store: Store) -> None:
        """Fail before any work where the store's documents are not the corpus's (the corpus
        was rebuilt or edited since extraction)."""
        for entry in store.manifest["shards"]:
            t = store.read_tokens(entry["name"]).select(["doc_index", "doc_id"])
            index = t.column("doc_index").to_numpy()
            first = np.flatnonzero(np.diff(index, prepend=-1))
            ids = self.ids[entry["split"]]
            for i, doc_id in zip(
                index[first].tolist(), t.column("doc_id").take(first).to_pylist(), strict=True
            ):
                if i >= len(ids) or ids[i] != doc_id:
                    found = repr(ids[i]) if i < len(ids) else "missing"
                    raise SamesheepError(
                        f"the corpus changed since extraction: document {i} of the "
                        f"{entry['split']} split is {found}, the store has {doc_id!r}; run "
                        "`samesheep extract` again"
                    )

    def document(self, split: str, index: int, doc_id: str) -> Document:
        """The document, checked against the id the store recorded for it."""
        key = (split, index)
        if key not in self._cache:
            doc = self.reader.document(split, index)
            if doc.id != doc_id:
                raise SamesheepError(
                    f"document {index} of the {split} split is {doc.id!r}, but the store was "
                    f"extracted from {doc_id!r}: the corpus changed; run `samesheep extract` again"
                )
            self._cache[key] = doc
            if len(self._cache) > 4096:
                self._cache.popitem(last=False)
        return self._cache[key]


# ---------------------------------------------------------------- per-shard columns


@dataclass
class Rows:
    """Numpy columns of a shard's kept token rows, and of its entries (active latents)."""

    split: int  # index into SPLITS
    doc_index: np.ndarray
    doc_key: np.ndarray  # doc_index * 2 + split: unique across splits
    token_id: np.ndarray
    bigram: np.ndarray  # previous token * vocab + token, -1 where there is no previous token
    topic: np.ndarray  # -1 where the document has none
    gid: np.ndarray  # global kept-row id (across the whole store, in order)
    entry_row: np.ndarray  # [nnz] row of each entry
    latent: np.ndarray  # [nnz]
    value: np.ndarray  # [nnz] float32


def previous_tokens(tokens: pa.Table) -> np.ndarray:
    """[rows] the id of each row's previous token in its window (-1 for none or special)."""
    ids = tokens.column("token_id").to_numpy().astype(np.int64)
    pos = tokens.column("position").to_numpy()
    special = tokens.column("special").to_numpy(zero_copy_only=False)
    prev = np.full(len(ids), -1, dtype=np.int64)
    if len(ids) > 1:
        ok = (pos[1:] == pos[:-1] + 1) & ~special[:-1]
        prev[1:] = np.where(ok, ids[:-1], -1)
    return prev


def shard_rows(
    shard: CodedShard, full: pa.Table, keep: np.ndarray, gid0: int, vocab: int, info: CorpusInfo
) -> Rows:
    split = SPLITS.index(shard.split)
    t = shard.tokens
    doc_index = t.column("doc_index").to_numpy().astype(np.int64)
    token_id = t.column("token_id").to_numpy().astype(np.int64)
    prev = previous_tokens(full)[keep]
    codes = shard.codes
    counts = codes.offsets.diff().numpy()
    return Rows(
        split=split,
        doc_index=doc_index,
        doc_key=doc_index * 2 + split,
        token_id=token_id,
        bigram=np.where(prev >= 0, prev * vocab + token_id, -1),
        topic=info.topic_of[shard.split][doc_index] if len(doc_index) else doc_index,
        gid=gid0 + np.arange(len(doc_index), dtype=np.int64),
        entry_row=np.repeat(np.arange(len(doc_index)), counts),
        latent=codes.latents.numpy().astype(np.int64),
        value=codes.values.numpy().astype(np.float32),
    )


# ---------------------------------------------------------------- pass 1: statistics


class Statistics:
    """Running per-latent statistics of pass 1, and the corpus background they compare to."""

    def __init__(self, d_sae: int, vocab: int, n_topics: int, cfg: FeaturesConfig):
        self.d_sae, self.vocab, self.n_topics = d_sae, vocab, n_topics
        self.fires = np.zeros((2, d_sae), dtype=np.int64)  # per split
        self.kept = np.zeros(2, dtype=np.int64)  # kept tokens per split
        self.mass = np.zeros(d_sae)
        self.max = np.zeros(d_sae, dtype=np.float32)
        self.topic_mass = np.zeros((d_sae, max(n_topics, 1)))
        self.tokens = PairCounter(vocab)  # (latent, token): firings and mass
        self.bigrams = PairCounter(vocab * vocab)  # (latent, bigram): firings
        self.docs = PairCounter(1 << 40)  # (latent, doc_key): mass, exact for top titles
        self.n_docs = np.zeros(d_sae, dtype=np.int64)
        # per latent, the last document (doc_key) it fired in, in store order: documents are
        # contiguous in the store, so a (latent, document) pair is new exactly where the
        # document differs from it (however many shards the document spans)
        self._last_doc = np.full(d_sae, -1, dtype=np.int64)
        self._last_key = -1  # the last document of the store read so far
        self.corpus_tokens = np.zeros(vocab, dtype=np.int64)
        self.corpus_bigrams = PairCounter(1 << 62, cap=1 << 62)
        self.corpus_topics = np.zeros(max(n_topics, 1), dtype=np.int64)
        self.top = TopList(cfg.top_exemplars, cfg.per_document)

    def add(self, r: Rows) -> None:
        lat, val = r.latent, r.value
        m = self.d_sae
        self.kept[r.split] += len(r.token_id)
        self.fires[r.split] += np.bincount(lat, minlength=m)
        self.mass += np.bincount(lat, weights=val, minlength=m)
        np.maximum.at(self.max, lat, val)
        topic = r.topic[r.entry_row]
        has = topic >= 0
        self.topic_mass += np.bincount(
            lat[has] * self.topic_mass.shape[1] + topic[has],
            weights=val[has],
            minlength=self.topic_mass.size,
        ).reshape(self.topic_mass.shape)
        self.tokens.add(lat * self.vocab + r.token_id[r.entry_row], val)
        bigram = r.bigram[r.entry_row]
        self.bigrams.add(lat[bigram >= 0] * self.vocab**2 + bigram[bigram >= 0])
        self._add_docs(r)
        self.corpus_tokens += np.bincount(r.token_id, minlength=self.vocab)
        self.corpus_bigrams.add(r.bigram[r.bigram >= 0])
        self.corpus_topics += np.bincount(r.topic[r.topic >= 0], minlength=self.corpus_topics.size)
        thr = self.top.threshold(m)
        cand = val > thr[lat]
        rows = r.entry_row[cand]
        self.top.add(
            group=lat[cand],
            score=val[cand].astype(np.float64),
            sub=r.doc_key[rows],
            gid=r.gid[rows],
        )

    def _add_docs(self, r: Rows) -> None:
        """Per (latent, document) mass, and per latent the number of distinct documents it
        fires in. Documents are contiguous in the store, so a latent's firings in one document
        are a run in store order: a document counts once in n_docs, where it differs from
        the last document the latent fired in (which may be several shards back: a long
        document spans shards, and a latent may fire in its first and third but not its
        second). Every document but the last one read is final, so the pairs are pruned to
        the DOC_KEEP heaviest per latent exactly."""
        doc = r.doc_key[r.entry_row]
        pair = r.latent * (1 << 40) + doc
        self.docs.add(pair, r.value)
        lat_u, first = np.unique(pair, return_index=True)
        lat_u >>= 40
        doc_u = doc[first]
        self.n_docs += np.bincount(lat_u[doc_u != self._last_doc[lat_u]], minlength=self.d_sae)
        if len(r.latent):  # each latent's last entry in store order
            back, at = np.unique(r.latent[::-1], return_index=True)
            self._last_doc[back] = doc[len(doc) - 1 - at]
        if len(r.doc_key):
            self._last_key = int(r.doc_key[-1])
        last = self._last_key
        self.docs.prune(DOC_KEEP, protect=(self.docs.keys & ((1 << 40) - 1)) == last)


# ---------------------------------------------------------------- pass 2: ranges and samples


class Samples:
    """Pass 2: activation histograms, exemplars across each latent's range (a uniform
    sample per bin: the rows with the smallest random keys), random non-firing windows."""

    def __init__(self, stats: Statistics, cfg: FeaturesConfig, pool: np.ndarray, edges: np.ndarray):
        self.cfg, self.max = cfg, stats.max
        self.edges = edges
        self.hist = np.zeros((stats.d_sae, len(edges) - 1), dtype=np.int64)
        self.quantile = TopList(cfg.per_bin)
        self.pool = pool  # [P] sorted gids of the random windows' centres
        self.pool_fired = np.zeros((len(pool), stats.d_sae), dtype=bool)
        self.rng = np.random.default_rng([cfg.seed, 1])

    def add(self, r: Rows, shard: CodedShard) -> None:
        lat, val = r.latent, r.value
        n_bins = self.hist.shape[1]
        b = np.clip(np.searchsorted(self.edges, val, side="right") - 1, 0, n_bins - 1)
        self.hist += np.bincount(lat * n_bins + b, minlength=self.hist.size).reshape(
            self.hist.shape
        )
        bins = self.cfg.quantile_bins
        qbin = (bins * val / np.maximum(self.max[lat], 1e-30)).astype(np.int64)
        key = self.rng.random(len(val))
        self.quantile.add(
            group=lat * bins + np.minimum(qbin, bins - 1),
            score=-key,
            gid=r.gid[r.entry_row],
            value=val.astype(np.float64),
        )
        self._pool_fired(r, shard)

    def _pool_fired(self, r: Rows, shard: CodedShard) -> None:
        """Mark the latents that fire anywhere in each random window centred in this shard
        (the same rows cut_windows will show)."""
        if not len(r.gid):
            return
        lo = np.searchsorted(self.pool, r.gid[0])
        hi = np.searchsorted(self.pool, r.gid[-1], side="right")
        if lo == hi:
            return
        full_of_kept = np.flatnonzero(shard.keep)
        first, last = window_bounds(shard.all_tokens)
        offsets = shard.codes.offsets.numpy()
        centre = full_of_kept[self.pool[lo:hi] - r.gid[0]]
        a, b = window_rows(centre, first, last, self.cfg.window_tokens)
        k0 = np.searchsorted(full_of_kept, a)  # the kept rows inside each window
        k1 = np.searchsorted(full_of_kept, b, side="right")
        for p, e0, e1 in zip(range(lo, hi), offsets[k0], offsets[k1], strict=True):
            self.pool_fired[p, r.latent[e0:e1]] = True


def histogram_edges(stats: Statistics, n_bins: int) -> np.ndarray:
    """Log-spaced edges from a millionth of the largest activation to the largest."""
    top = float(stats.max.max()) if stats.max.size else 0.0
    if top <= 0:
        top = 1.0
    return np.geomspace(top * 1e-6, top * (1 + 1e-6), n_bins + 1)


# ---------------------------------------------------------------- pass 3: exemplar windows


def exemplar_refs(stats: Statistics, samples: Samples, cfg: FeaturesConfig) -> ExemplarRefs:
    top, q = stats.top.cols, samples.quantile.cols
    parts = []
    if top:
        group = top["group"]
        rank = np.arange(len(group)) - np.searchsorted(group, group)
        parts.append((group, 0, rank, np.full(len(group), -1), top["gid"], top["score"]))
    if q:
        latent, qbin = q["group"] // cfg.quantile_bins, q["group"] % cfg.quantile_bins
        rank = np.arange(len(latent)) - np.searchsorted(q["group"], q["group"])
        parts.append((latent, 1, rank, qbin, q["gid"], q["value"]))
    if len(samples.pool) and cfg.random_exemplars:
        rng = np.random.default_rng([cfg.seed, 2])
        score = rng.random(samples.pool_fired.shape)
        score[samples.pool_fired] = np.inf
        n = min(cfg.random_exemplars, len(samples.pool))
        pick = np.argsort(score, axis=0, kind="stable")[:n]  # [n, d_sae]
        ok = np.take_along_axis(score, pick, axis=0) < np.inf
        rank, latent = np.nonzero(ok)
        gid = samples.pool[pick[rank, latent]]
        parts.append((latent, 2, rank, np.full(len(latent), -1), gid, np.zeros(len(latent))))
    cols = [np.concatenate([np.broadcast_to(p[i], len(p[0])) for p in parts]) for i in range(6)]
    return ExemplarRefs(
        *(
            c.astype(t)
            for c, t in zip(
                cols, (np.int64, np.int8, np.int32, np.int32, np.int64, np.float32), strict=True
            )
        )
    )


# ---------------------------------------------------------------- the driver


@dataclass
class FeatureSource:
    """One SAE to describe: where it reads, what it is, the model's tokenizer."""

    model: str  # the model source string
    layer: int
    sae_name: str  # the SAE's folder name beside acts/ ("sae")
    sae: Sae
    store: Store
    token_filter: TokenFilter
    tokenizer: Any
    lens_model: Any = None
    """The causal LM whose unembedding the logit lens reads; None leaves the lens out."""


@dataclass(frozen=True)
class CodesPlace:
    """Where an SAE's codes of its store are kept, and the key they are valid under."""

    folder: Path
    key: str


def stream_pass(src: FeatureSource, info: CorpusInfo, shards, vocab: int, visit) -> int:
    """Feed every shard's Rows to visit(rows, shard); return the number of kept rows."""
    gid0 = 0
    for shard in shards:
        r = shard_rows(shard, shard.all_tokens, shard.keep, gid0, vocab, info)
        if len(r.token_id) and int(r.token_id.max()) >= vocab:
            raise SamesheepError(
                f"{src.store.folder}/{shard.name} holds token ids past the tokenizer's "
                f"{vocab:,}: the store was extracted with another model"
            )
        visit(r, shard)
        gid0 += len(r.token_id)
    return gid0


def vocab_size(tokenizer: Any) -> int:
    return max(len(tokenizer), int(getattr(tokenizer, "vocab_size", 0) or 0))


class Decoder:
    """Token strings, decoded once per id (or id pair)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.cache: dict[tuple[int, ...], str] = {}

    def __call__(self, *ids: int) -> str:
        if ids not in self.cache:
            self.cache[ids] = self.tokenizer.decode(list(ids))
        return self.cache[ids]


def latent_terms(
    j: int, stats: Statistics, decode: Decoder, offsets: tuple[np.ndarray, np.ndarray]
) -> list[tuple[str, float]]:
    """The latent's most distinctive tokens and bigrams (where it fires against the corpus),
    as (text, z), a bigram replacing the tokens it contains."""
    v = stats.vocab
    fired = float(stats.fires[:, j].sum())
    total = float(stats.kept.sum())
    tok_off, big_off = offsets
    a, b = tok_off[j], tok_off[j + 1]
    ids = stats.tokens.keys[a:b] - j * v
    uni = top_terms(ids, stats.tokens.counts[a:b], stats.corpus_tokens[ids], fired, total)
    a, b = big_off[j], big_off[j + 1]
    bkeys = stats.bigrams.keys[a:b] - j * v * v
    cb = stats.corpus_bigrams
    pos = np.minimum(np.searchsorted(cb.keys, bkeys), max(len(cb.keys) - 1, 0))
    corpus = np.where(cb.keys[pos] == bkeys, cb.counts[pos], 0) if len(cb.keys) else bkeys * 0
    bi = top_terms(bkeys, stats.bigrams.counts[a:b], corpus, fired, total)
    terms = [(z, (k,)) for k, z in uni] + [(z, (k // v, k % v)) for k, z in bi]
    terms.sort(key=lambda t: -t[0])
    chosen: list[tuple[float, tuple[int, ...]]] = []
    for z, ids_ in terms:
        if any(set(ids_) <= set(c) or set(c) <= set(ids_) for _, c in chosen):
            continue  # a token already shown inside a bigram, or the reverse
        if "\ufffd" in decode(*ids_):
            continue  # a byte piece of a character: no readable text on its own
        chosen.append((z, ids_))
    return [(term_text(decode(*ids_)), z) for z, ids_ in chosen[:5]]


@dataclass(frozen=True)
class LatentViews:
    """What the optional views found per latent: the logit lens's promoted and suppressed
    tokens ({name: [d_sae, k] tensor}, ids -1 for dead latents; None without the lens) and
    the coherence of its exemplars' embeddings (nan without the embedding view)."""

    lens: dict[str, torch.Tensor] | None
    coherence: np.ndarray


GATHERED_COLUMNS = (
    "top_tokens",
    "top_token_ids",
    "top_token_shares",
    "token_concentration",
    "doc_concentration",
    "topic",
    "topic_share",
    "topic_lift",
    "top_titles",
    "top_title_shares",
    "label",
    "label_terms",
    "label_z",
)
"""The feature table's columns gathered latent by latent."""


def feature_table(
    src: FeatureSource,
    stats: Statistics,
    samples: Samples,
    info: CorpusInfo,
    n_top: int,
    views: LatentViews,
) -> pa.Table:
    """One row per latent: frequencies, activation statistics, top tokens, logit lens, topic,
    titles, statistical label, coherence, token and document concentration."""
    m, v = stats.d_sae, stats.vocab
    decode = Decoder(src.tokenizer)
    fires = stats.fires.sum(0)
    kept = np.maximum(stats.kept, 1)
    mass = stats.mass
    tok_off = stats.tokens.by_group(m)
    big_off = stats.bigrams.by_group(m)
    doc_off = stats.docs.by_group(m)
    corpus_topic_share = stats.corpus_topics / max(stats.corpus_topics.sum(), 1)
    cols: dict[str, list] = {k: [] for k in GATHERED_COLUMNS}
    for j in range(m):
        total = mass[j] if mass[j] > 0 else math.nan
        a, b = tok_off[j], tok_off[j + 1]
        order = np.argsort(-stats.tokens.weights[a:b], kind="stable")[:n_top]
        ids = stats.tokens.keys[a:b][order] - j * v
        shares = stats.tokens.weights[a:b][order] / total
        cols["top_tokens"].append([decode(int(t)) for t in ids])
        cols["top_token_ids"].append(ids.astype(np.int32))
        cols["top_token_shares"].append(shares.astype(np.float32))
        cols["token_concentration"].append(float(shares[0]) if len(shares) else math.nan)
        a, b = doc_off[j], doc_off[j + 1]
        order = np.argsort(-stats.docs.weights[a:b], kind="stable")[:n_top]
        doc_keys = stats.docs.keys[a:b][order] - j * (1 << 40)
        titles = [info.titles[SPLITS[k % 2]][k // 2] for k in doc_keys.tolist()]
        doc_shares = stats.docs.weights[a:b][order] / total
        cols["top_titles"].append(titles)
        cols["top_title_shares"].append(doc_shares.astype(np.float32))
        cols["doc_concentration"].append(float(doc_shares[0]) if len(doc_shares) else math.nan)
        topic, share, topic_lift = "", math.nan, math.nan
        if info.topics and mass[j] > 0:
            t = int(np.argmax(stats.topic_mass[j]))
            share = float(stats.topic_mass[j, t] / mass[j])
            topic, topic_lift = info.topics[t], lift(share, float(corpus_topic_share[t]))
        cols["topic"].append(topic)
        cols["topic_share"].append(share)
        cols["topic_lift"].append(topic_lift)
        terms = latent_terms(j, stats, decode, (tok_off, big_off)) if fires[j] else []
        label_topic = topic if topic and topic_lift >= MIN_TOPIC_LIFT else None
        label = format_label([t for t, _ in terms[:2]], label_topic, titles[:3]) if fires[j] else ""
        cols["label"].append(label)
        cols["label_terms"].append([t for t, _ in terms])
        cols["label_z"].append(np.array([z for _, z in terms], dtype=np.float32))
    freq = stats.fires / kept[:, None]
    table = {
        "model": [src.model] * m,
        "layer": np.full(m, src.layer, dtype=np.int32),
        "sae": [src.sae_name] * m,
        "latent": np.arange(m, dtype=np.int32),
        "fires_train": stats.fires[0],
        "fires_heldout": stats.fires[1],
        "freq_train": freq[0],
        "freq_heldout": freq[1],
        "mean_act": np.where(fires > 0, mass / np.maximum(fires, 1), 0.0).astype(np.float32),
        "max_act": stats.max,
        "hist": list(samples.hist),
        "dead": fires == 0,
        "dense": freq[0] > DENSE_FRACTION,
        "n_docs": stats.n_docs,
        **{k: cols[k] for k in ("top_tokens", "top_token_ids", "top_token_shares")},
        "token_concentration": np.array(cols["token_concentration"], dtype=np.float32),
        "doc_concentration": np.array(cols["doc_concentration"], dtype=np.float32),
        "topic": cols["topic"],
        "topic_share": np.array(cols["topic_share"], dtype=np.float32),
        "topic_lift": np.array(cols["topic_lift"], dtype=np.float32),
        "top_titles": cols["top_titles"],
        "top_title_shares": cols["top_title_shares"],
        "label": cols["label"],
        "label_terms": cols["label_terms"],
        "label_z": cols["label_z"],
        "coherence": views.coherence.astype(np.float32),
    }
    lens = views.lens
    if lens is not None:  # dead latents get empty lists
        for name in ("promoted", "suppressed"):
            ids = lens[f"{name}_ids"].numpy()
            logits = lens[f"{name}_logits"].numpy().astype(np.float32)
            strings = {int(t): decode(int(t)) for t in np.unique(ids) if t >= 0}
            table[f"{name}_tokens"] = [[strings[int(t)] for t in row if t >= 0] for row in ids]
            table[f"{name}_token_ids"] = [row[row >= 0].astype(np.int32) for row in ids]
            table[f"{name}_logits"] = [lg[row >= 0] for row, lg in zip(ids, logits, strict=True)]
    return pa.table(table)


def compute_features(
    src: FeatureSource,
    info: CorpusInfo,
    cfg: FeaturesConfig,
    codes: CodesPlace,
    encoding: Encoding,
    doc_states: Any | None = None,
) -> tuple[pa.Table, pa.Table, torch.Tensor | None, dict[str, Any]]:
    """(feature table, exemplar table, centroids [d_sae, dim] or None, summary) of one SAE.
    `src.lens_model` (the causal LM, for the logit lens) and `doc_states` (the corpus
    embedded by TextEmbedder.embed_documents, train documents then held-out ones) are
    optional: without them those columns are left out (or nan)."""
    timings: dict[str, float] = {}
    label = f"{src.model} layer {src.layer} features"
    encoding = dataclasses.replace(encoding, batch_tokens=cfg.batch_tokens, label=label)
    codes_dir = codes.folder
    lens_model = src.lens_model
    clock = time.perf_counter()
    info.check(src.store)
    vocab = vocab_size(src.tokenizer)
    m = src.sae.cfg.d_sae
    stats = Statistics(m, vocab, len(info.topics), cfg)
    shards = stream_codes(src.sae, src.store, src.token_filter, codes_dir, codes.key, encoding)
    n_kept = stream_pass(src, info, shards, vocab, lambda r, _: stats.add(r))
    if n_kept == 0:
        raise SamesheepError(f"{src.store.folder} holds no tokens the SAE stages use")
    timings["stream"] = time.perf_counter() - clock

    with step(f"{label}: histograms and sampled exemplars", timings, "sample"):
        rng = np.random.default_rng([cfg.seed, 0])
        pool = np.sort(rng.choice(n_kept, size=min(RANDOM_POOL, n_kept), replace=False))
        samples = Samples(stats, cfg, pool, histogram_edges(stats, cfg.histogram_bins))
        coded = read_codes(codes_dir, src.store, src.token_filter)
        stream_pass(src, info, coded, vocab, samples.add)
        refs = exemplar_refs(stats, samples, cfg)

    with step(f"{label}: exemplar windows", timings, "windows"):
        parts: list[dict[str, Any]] = []
        picked: list[np.ndarray] = []
        gid0 = 0
        for shard in read_codes(codes_dir, src.store, src.token_filter):
            n = shard.tokens.num_rows
            sel = np.flatnonzero((refs.gid >= gid0) & (refs.gid < gid0 + n))
            if len(sel):
                parts.append(cut_windows(refs, sel, shard, gid0, info, cfg.window_tokens))
                picked.append(sel)
            gid0 += n
        refs = refs.take(np.concatenate(picked) if picked else np.zeros(0, dtype=np.int64))
        order = np.lexsort((refs.rank, refs.bin, refs.kind, refs.latent))
        exemplars = exemplar_table(src, refs, parts, order)

    coherence = np.full(m, np.nan)
    centroids = None
    if doc_states is not None:
        with step(f"{label}: embedding view", timings, "embed"):
            centroids, coherence = embed_exemplars(
                exemplars, info, doc_states, m, cfg.top_exemplars
            )
    lens = None
    if lens_model is not None:
        with step(f"{label}: logit lens", timings, "logit_lens"):
            live = torch.from_numpy(stats.fires.sum(0) > 0)  # dead latents have nothing to show
            directions = src.sae.W_dec.detach().float().cpu()[live]
            vocab_rows = lens_model.get_output_embeddings().weight.shape[0]
            exclude = excluded_token_ids(src.tokenizer, vocab_rows)
            part = logit_lens(
                lens_model, directions.to(encoding.device), exclude, cfg.top_tokens, encoding.dtype
            )
            lens = {}
            for name, t in zip(part._fields, part, strict=True):
                fill = -1 if "ids" in name else math.nan
                full = torch.full((m, t.shape[1]), fill, dtype=t.dtype)
                full[live] = t.cpu()
                lens[name] = full

    with step(f"{label}: feature table", timings, "table"):
        views = LatentViews(lens, coherence)
        table = feature_table(src, stats, samples, info, cfg.top_tokens, views)
    summary = {
        "latents": m,
        "dead": int(table.column("dead").to_numpy().sum()),
        "dense": int(table.column("dense").to_numpy().sum()),
        "tokens": {s: int(stats.kept[i]) for i, s in enumerate(SPLITS)},
        "exemplars": {k: int((refs.kind == i).sum()) for i, k in enumerate(KINDS)},
        "histogram_edges": samples.edges.tolist(),
        "token_counts_pruned": bool(stats.tokens.pruned or stats.bigrams.pruned),
        "topics": info.topics,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }
    return table, exemplars, centroids, summary


def embed_exemplars(
    exemplars: pa.Table, info: CorpusInfo, doc_states: Any, d_sae: int, n_top: int
) -> tuple[torch.Tensor, np.ndarray]:
    """(centroids [d_sae, dim], coherence [d_sae]): the normalised mean embedding of each
    latent's top exemplar windows, and their mean pairwise cosine minus that of the random
    windows (0: no more alike than random text). `doc_states` holds every corpus document's
    wordpiece states (train documents first, then held-out ones).

    A window's embedding is the mean of the states of the wordpieces its character span
    overlaps, taken from one contextual pass over the whole document (in pieces of 254
    wordpieces), not from embedding the window's text on its own: the rest of the document
    leaks into every window through attention. Two windows of one text in different
    documents therefore differ somewhat, and windows of one document are more alike than
    their text alone would make them (the random windows of the baseline share this)."""
    kind = exemplars.column("kind").to_numpy(zero_copy_only=False)
    rank = exemplars.column("rank").to_numpy()
    sub = exemplars.filter(pa.array(((kind == "top") & (rank < n_top)) | (kind == "random")))
    first_heldout = len(info.titles["train"])
    split = sub.column("split").to_numpy(zero_copy_only=False)
    text = sub.column("doc_index").to_numpy() + np.where(split == "heldout", first_heldout, 0)
    spans = np.stack(
        [text, sub.column("char_start").to_numpy(), sub.column("char_end").to_numpy()], axis=1
    )
    random = sub.column("kind").to_numpy(zero_copy_only=False) == "random"
    latent = sub.column("latent").to_numpy()
    # random windows repeat across latents: each distinct window is embedded and counted once
    rand_spans = np.unique(spans[random], axis=0)
    top = np.flatnonzero(~random)
    emb = doc_states.pool_spans(np.concatenate([spans[top], rand_spans]))
    baseline = mean_pairwise_cosine(emb[len(top) :]) if len(rand_spans) > 1 else 0.0
    emb = emb[: len(top)]
    return latent_centroids(emb, latent[top], d_sae, baseline)


def latent_centroids(
    emb: torch.Tensor, owner: np.ndarray, d_sae: int, baseline: float
) -> tuple[torch.Tensor, np.ndarray]:
    """(centroids [d_sae, dim], coherence [d_sae]) of unit rows emb [n, dim] owned by latents
    `owner` [n], all latents at once. A centroid is the latent's normalised sum (a zero row,
    a span with no wordpiece, adds nothing, and a mean's scale does not survive normalising;
    zero for a latent with no row). Coherence is the mean pairwise cosine of its n non-zero
    rows, (|sum|^2 - n) / (n (n - 1)) as mean_pairwise_cosine computes it, minus `baseline`
    (nan where n < 2)."""
    rows = emb.double()
    idx = torch.from_numpy(np.asarray(owner, dtype=np.int64))
    sums = torch.zeros(d_sae, emb.shape[1], dtype=torch.float64).index_add_(0, idx, rows)
    nonzero = (rows.norm(dim=1) > 0).double()
    n = torch.zeros(d_sae, dtype=torch.float64).index_add_(0, idx, nonzero)
    centroids = torch.nn.functional.normalize(sums, dim=1).float()
    mean_cos = ((sums * sums).sum(1) - n) / (n * (n - 1)).clamp(min=1)
    return centroids, np.where(n.numpy() >= 2, mean_cos.numpy() - baseline, np.nan)


def corpus_states(corpus_dir: Any, corpus_hash: str, make_embedder: Any) -> Any:
    """Every corpus document (train, then held-out) embedded once per run and kept beside
    the corpus (corpus/embeddings.safetensors), so every SAE's exemplars pool from it."""
    corpus_dir = Path(corpus_dir)
    path, meta_path = corpus_dir / "embeddings.safetensors", corpus_dir / "embeddings.json"
    embedder = None
    if read_json(meta_path, corrupt_is_missing=True) and path.is_file():
        embedder = make_embedder()
        if load_done(meta_path, [corpus_hash, embedder.name, str(embedder.dtype)]):
            try:
                return DocumentStates.load(path)
            except Exception:  # an unreadable cache is rebuilt
                pass
    embedder = embedder or make_embedder()
    reader = CorpusReader(corpus_dir)
    texts = reader.texts()
    states = embedder.embed_documents(texts, label=f"embed {len(texts):,} documents")
    unmark(meta_path)
    states.save(path)
    mark_done(meta_path, {"key": [corpus_hash, embedder.name, str(embedder.dtype)]}, [path])
    return states


def write_features(
    out: Any,
    table: pa.Table,
    exemplars: pa.Table,
    centroids: torch.Tensor | None,
    summary: dict[str, Any],
) -> None:
    """The features folder: each file written whole or not at all, summary.json last (the
    done marker, with every file's digest)."""
    out = Path(out)
    edges = json.dumps(summary["histogram_edges"])
    table = table.replace_schema_metadata({"samesheep.histogram_edges": edges})
    for name, t in (("feature_table.parquet", table), ("exemplars.parquet", exemplars)):
        with atomic_path(out / name) as tmp:
            pq.write_table(t, tmp, compression="zstd")
    if centroids is not None:
        with atomic_path(out / "centroids.safetensors") as tmp:
            save_file({"centroids": centroids.float().contiguous()}, str(tmp))
    else:
        (out / "centroids.safetensors").unlink(missing_ok=True)
    written = [out / "feature_table.parquet", out / "exemplars.parquet"]
    written += [out / "centroids.safetensors"] if centroids is not None else []
    mark_done(out / SUMMARY, summary, written)
