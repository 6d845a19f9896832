"""Evaluation: reconstruction metrics against hand-computed values, spliced LM metrics on
tiny models."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch
from helpers import write_corpus

from samesheep.core.errors import SamesheepError
from samesheep.data.corpus import Document, read_documents
from samesheep.data.store import TOKEN_SCHEMA, Store, StoreWriter, TokenFilter
from samesheep.lm.extraction import Window, bos_prefix, length_batches, windows_of
from samesheep.lm.models import capture, decoder_blocks, load_model
from samesheep.sae.evaluation import (
    ReconstructionStats,
    SpliceAt,
    SpliceSettings,
    batch_tensors,
    reconstruction_metrics,
    scored_positions,
    spliced_metrics,
    with_hidden,
)
from samesheep.sae.model import Sae, SaeConfig


def stats_of(x, x_hat, acts=None, batches=(None,)) -> dict:
    acts = acts if acts is not None else torch.ones(x.shape[0], 3)
    stats = ReconstructionStats(x.shape[1], acts.shape[1])
    lo = 0
    for size in batches:
        hi = x.shape[0] if size is None else lo + size
        stats.update(x[lo:hi], x_hat[lo:hi], acts[lo:hi])
        lo = hi
    assert lo == x.shape[0]
    return stats.result()


# ---- reconstruction metrics ----


def test_hand_computed_example():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    x_hat = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    r = stats_of(x, x_hat)
    # errors (0, 1) and (0, -1); deviations from the mean (0.5, 1): (+-0.5, -+1)
    assert r["tokens"] == 2
    assert r["mse"] == pytest.approx(2 / 4)
    assert r["fvu"] == pytest.approx(2 / 2.5)
    assert r["explained_variance"] == pytest.approx(0.2)
    assert r["cosine"] == pytest.approx((1 / math.sqrt(2) + 1) / 2)
    assert r["shrinkage"] == pytest.approx((math.sqrt(2) + 0.5) / 2)
    # E||x_hat||^2 / E<x_hat, x> = (2 + 1) / (1 + 2); not E<x_hat, x> / E||x||^2 = 3 / 5
    assert r["relative_reconstruction_bias"] == pytest.approx(1.0)
    # per-token relative errors ||(0, 1)|| / 1 = 1 and ||(0, -1)|| / 2 = 0.5
    assert r["median_relative_error"] == pytest.approx(0.75)


def test_median_relative_error_ignores_a_few_huge_tokens():
    """FVU is one ratio over all tokens: one token with a huge norm and a bad reconstruction
    decides it. The median per-token relative error stays with the typical token."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(99, 8, generator=g)
    x_hat = x + 0.1 * torch.randn(99, 8, generator=g)
    huge = torch.full((1, 8), 300.0)
    r_typical = stats_of(x, x_hat)
    r_with = stats_of(torch.cat([x, huge]), torch.cat([x_hat, torch.zeros(1, 8)]))
    assert r_with["fvu"] > 0.9 > 10 * r_typical["fvu"]
    rel = ((x_hat - x).norm(dim=1) / x.norm(dim=1)).numpy()
    assert r_typical["median_relative_error"] == pytest.approx(float(np.median(rel)), rel=1e-6)
    assert r_with["median_relative_error"] == pytest.approx(
        float(np.median(np.append(rel, 1.0))), rel=1e-6
    )


def test_perfect_half_and_mean_reconstructions():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=g) * 3 + 1
    r = stats_of(x, x.clone())
    assert r["fvu"] == 0 and r["mse"] == 0 and r["explained_variance"] == 1
    assert r["cosine"] == pytest.approx(1) and r["shrinkage"] == pytest.approx(1)
    assert r["relative_reconstruction_bias"] == pytest.approx(1)

    r = stats_of(x, 0.5 * x)
    x64 = x.double()
    assert r["shrinkage"] == pytest.approx(0.5) and r["cosine"] == pytest.approx(1)
    assert r["relative_reconstruction_bias"] == pytest.approx(0.5)
    assert r["mse"] == pytest.approx(float(0.25 * x64.square().mean()))
    want = 0.25 * x64.square().sum() / (x64 - x64.mean(0)).square().sum()
    assert r["fvu"] == pytest.approx(float(want))

    r = stats_of(x, x.mean(0).expand_as(x))
    assert r["fvu"] == pytest.approx(1) and r["explained_variance"] == pytest.approx(0, abs=1e-6)


def test_zero_reconstruction_has_cosine_zero():
    x = torch.tensor([[3.0, 4.0], [1.0, 1.0]])
    r = stats_of(x, torch.zeros_like(x))
    assert r["cosine"] == 0 and r["shrinkage"] == 0
    assert r["mse"] == pytest.approx((25 + 2) / 4)


def test_dead_dense_and_l0():
    acts = torch.zeros(20, 5)
    acts[:1, 1] = 0.3  # 5% of tokens
    acts[:2, 2] = 1.0  # exactly 10%: not dense (more than 10% is)
    acts[5:8, 3] = 2.0  # 15%: dense
    acts[:, 4] = 0.1  # every token: dense
    acts[10, 0] = -1.0  # negative is not active: latent 0 is dead
    x = torch.randn(20, 4)
    r = stats_of(x, x, acts)
    assert r["dead_latents"] == 1 and r["dead_fraction"] == pytest.approx(0.2)
    assert r["dense_latents"] == 2 and r["dense_fraction"] == pytest.approx(0.4)
    assert r["l0"] == pytest.approx((1 + 2 + 3 + 20) / 20)


def test_streaming_equals_one_batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 8, generator=g) * 5 + 2
    x_hat = x + torch.randn(50, 8, generator=g)
    acts = torch.randn(50, 16, generator=g).relu()
    whole = stats_of(x, x_hat, acts)
    parts = stats_of(x, x_hat, acts, batches=(7, 1, 12, 0, 30))
    assert whole.keys() == parts.keys()
    for key, value in whole.items():
        assert parts[key] == pytest.approx(value, rel=1e-12), key


def test_float64_accumulation_on_large_norms():
    """Norms ~1e4, dominated by a per-dimension mean: float32 sums lose the variance."""
    g = torch.Generator().manual_seed(2)
    n, d = 20_000, 64
    offset = torch.linspace(-2500, 2500, d)  # ||x|| ~ 1e4
    x = offset + torch.randn(n, d, generator=g)
    x_hat = x + 0.3 * torch.randn(n, d, generator=g)
    acts = (torch.randn(n, 8, generator=g) > 1).float()
    r = stats_of(x, x_hat, acts, batches=[4096] * 4 + [n - 4 * 4096])

    xs, hs = x.double().numpy(), x_hat.double().numpy()
    sse = ((hs - xs) ** 2).sum()
    fvu = sse / ((xs - xs.mean(0)) ** 2).sum()
    nx, nh = np.linalg.norm(xs, axis=1), np.linalg.norm(hs, axis=1)
    dots = (xs * hs).sum(1)
    assert np.linalg.norm(xs, axis=1).mean() > 5e3
    assert r["fvu"] == pytest.approx(fvu, rel=1e-9)
    assert r["fvu"] == pytest.approx(0.09, rel=0.05)
    assert r["mse"] == pytest.approx(sse / (n * d), rel=1e-9)
    assert r["cosine"] == pytest.approx((dots / (nx * nh)).mean(), rel=1e-12)
    assert r["shrinkage"] == pytest.approx((nh / nx).mean(), rel=1e-12)
    assert r["relative_reconstruction_bias"] == pytest.approx((nh**2).sum() / dots.sum(), 1e-12)


def test_no_tokens_is_an_error():
    with pytest.raises(SamesheepError):
        ReconstructionStats(4, 8).result()


def _table(positions, special, norms=None) -> pa.Table:
    n = len(positions)
    return pa.table(
        {
            "doc_index": [0] * n,
            "doc_id": ["d"] * n,
            "window": [0] * n,
            "position": positions,
            "token_id": [1] * n,
            "char_start": [0] * n,
            "char_end": [0] * n,
            "special": special,
            "norm": norms if norms is not None else [1.0] * n,
        }
    ).cast(TOKEN_SCHEMA)


def test_reconstruction_metrics_reads_masked_heldout_rows(tmp_path):
    g = torch.Generator().manual_seed(3)
    d = 8
    writer = StoreWriter(tmp_path, {"key": "k", "layer": 1, "d_model": d})
    kept = []
    for index in range(2):
        acts = torch.randn(10, d, generator=g)
        positions = [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]
        special = [True, False, False, True, False, False, False, False, False, False]
        acts[0] = acts[3] = acts[5] = 1e3  # rows the mask drops: they would dominate
        table = _table(positions, special, acts.norm(dim=1).tolist())
        writer.write(f"heldout-{index:05d}", "heldout", acts, table)
        keep = [i for i in range(10) if positions[i] != 0 and not special[i]]
        kept.append(acts[keep])
    writer.write("train-00000", "train", torch.full((4, d), 1e3), _table([0, 1, 2, 3], [False] * 4))
    writer.finish()

    sae = Sae(SaeConfig("relu", d, 16))
    sae.initialize(torch.Generator().manual_seed(0))
    r = reconstruction_metrics(sae, Store(tmp_path), batch_tokens=3)
    x = torch.cat(kept)
    with torch.no_grad():
        want = stats_of(x, sae(x), sae.encode(x))
    assert r["tokens"] == 14 == want["tokens"]
    for key, value in want.items():
        assert r[key] == pytest.approx(value, rel=1e-5, abs=1e-9), key

    with pytest.raises(SamesheepError, match="dims"):
        reconstruction_metrics(Sae(SaeConfig("relu", d + 1, 16)), Store(tmp_path))

    # A norm limit leaves rows of norm 1e3 * sqrt(8) out too, and counts them.
    outlier_rows = [torch.randn(10, d, generator=g) for _ in range(2)]
    writer = StoreWriter(tmp_path / "with_outliers", {"key": "k2", "layer": 1, "d_model": d})
    kept = []
    for index, acts in enumerate(outlier_rows):
        acts[1] = acts[7] = 1e3 if index == 0 else acts[1]
        positions = [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]
        table = _table(positions, [False] * 10, acts.norm(dim=1).tolist())
        writer.write(f"heldout-{index:05d}", "heldout", acts, table)
        kept.append(acts[[i for i in range(10) if positions[i] != 0 and acts[i].norm() < 100]])
    writer.finish()
    r = reconstruction_metrics(
        sae, Store(tmp_path / "with_outliers"), token_filter=TokenFilter(max_norm=100.0)
    )
    x = torch.cat(kept)
    with torch.no_grad():
        want = stats_of(x, sae(x), sae.encode(x))
    assert r["tokens"] == 14 and r["outlier_tokens"] == 2
    assert r["fvu"] == pytest.approx(want["fvu"], rel=1e-5)


# ---- spliced metrics ----


class Identity(torch.nn.Module):
    def forward(self, h):
        return h


class Shift(torch.nn.Module):
    def forward(self, h):
        return h + 1


class Zeros(torch.nn.Module):
    def forward(self, h):
        return torch.zeros_like(h)


@pytest.fixture(scope="module")
def llama(tiny_models):
    return load_model(str(tiny_models["llama"]))


@pytest.fixture(scope="module")
def documents(tmp_path_factory):
    path = write_corpus(tmp_path_factory.mktemp("docs") / "docs.jsonl", n=8)
    return list(read_documents(path))


def random_sae(d: int = 32, seed: int = 0) -> Sae:
    sae = Sae(SaeConfig("topk", d, 64, k=4))
    sae.initialize(torch.Generator().manual_seed(seed))
    return sae


def run(lm, sae, docs, layer=1, context_length=24, batch_tokens=96, prefix=None, tokens=None):
    prefix = bos_prefix(lm.tokenizer, "auto") if prefix is None else prefix
    settings = SpliceSettings(prefix, context_length, batch_tokens, token_filter=tokens)
    return spliced_metrics(lm, layer, sae, docs, settings, "cpu")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_perfect_and_zero_reconstructions(tiny_models, documents, arch):
    lm = load_model(str(tiny_models[arch]))
    same = run(lm, Identity(), documents)
    assert same["ce_spliced"] == pytest.approx(same["ce_clean"], rel=1e-12)
    assert same["kl_spliced"] == pytest.approx(0, abs=1e-9)
    # a random model: ablation changes its predictions, though not necessarily for the worse
    assert abs(same["ce_zero"] - same["ce_clean"]) > 1e-3 and same["kl_zero"] > 1e-4
    assert same["ce_loss_score"] == pytest.approx(1) and same["kl_div_score"] == pytest.approx(1)

    zero = run(lm, Zeros(), documents)
    assert zero["ce_spliced"] == pytest.approx(zero["ce_zero"], rel=1e-12)
    assert zero["kl_spliced"] == pytest.approx(zero["kl_zero"], rel=1e-12)
    assert zero["ce_loss_score"] == pytest.approx(0, abs=1e-9)
    assert zero["kl_div_score"] == pytest.approx(0, abs=1e-9)
    for key in ("ce_clean", "ce_zero", "kl_zero", "tokens"):
        assert zero[key] == pytest.approx(same[key]), key

    real = run(lm, random_sae(), documents)
    assert real["ce_clean"] == pytest.approx(same["ce_clean"])
    assert real["kl_spliced"] > 0 and real["ce_spliced"] != pytest.approx(real["ce_clean"])


def test_scored_positions(llama, documents):
    prefix = bos_prefix(llama.tokenizer, "auto")
    assert len(prefix) == 1
    windows = windows_of(list(enumerate(documents)), llama.tokenizer, prefix, 24)
    # Position 0 (BOS) is never spliced, so its prediction of token 1 is the same in every
    # run and not scored; the last token of a window predicts nothing.
    want = sum(max(0, len(w.ids) - 2) for w in windows)
    assert run(llama, Identity(), documents)["tokens"] == want


def test_batch_tensors_masks():
    def window(ids, special):
        n = len(ids)
        z = np.zeros(n, dtype=np.int64)
        return Window(0, "d", 0, np.asarray(ids), z, z, np.asarray(special, dtype=bool))

    windows = [
        window([9, 5, 6, 9, 7, 8], [True, False, False, True, False, False]),
        window([5, 6, 7], [False, False, False]),  # no BOS: position 0 is the sink anyway
        window([9, 9, 5], [True, True, False]),
    ]
    ids, real, splice = batch_tensors(windows, [0, 1, 2], pad=0)
    score = scored_positions(real, splice)
    assert ids.tolist() == [[9, 5, 6, 9, 7, 8], [5, 6, 7, 0, 0, 0], [9, 9, 5, 0, 0, 0]]
    assert real.int().tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0]]
    assert splice.int().tolist() == [
        [0, 1, 1, 0, 1, 1],  # the special token in the middle stays clean
        [0, 1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
    ]
    assert score.int().tolist() == [
        [0, 1, 1, 1, 1, 0],  # from the clean special at 3: its context was spliced
        [0, 1, 0, 0, 0, 0],  # never predicting padding
        [0, 0, 0, 0, 0, 0],  # only the last token is spliced, and it predicts nothing
    ]
    # With skip_special and skip_first off, every real position is spliced.
    _, _, every = batch_tensors(windows, [0, 1, 2], 0, TokenFilter(False, False))
    assert torch.equal(every, real)
    _, _, no_sink = batch_tensors(windows, [0, 1, 2], 0, TokenFilter(False, True))
    assert no_sink.int().tolist()[0] == [0, 1, 1, 1, 1, 1]


@pytest.mark.parametrize("bos", [True, False])
def test_sink_special_and_padding_stay_clean(llama, documents, bos):
    """What the hooked block hands on (the next block's input): h + 1 for the spliced run and
    zeros for the ablated one exactly at the spliced positions; elsewhere (the sink, padding)
    the clean values. (In the tiny models the BOS embedding is zero, so the shift, not the
    ablation, is what shows a sink left alone.)"""
    seen = []
    record = recorder(seen)
    docs = [documents[0], documents[7]]  # one window each, of different lengths
    prefix = bos_prefix(llama.tokenizer, "auto") if bos else []  # no BOS: a word at 0
    windows = windows_of(list(enumerate(docs)), llama.tokenizer, prefix, 64)
    assert len(windows) == 2 and len(windows[0].ids) < len(windows[1].ids)
    handle = decoder_blocks(llama.model)[2].register_forward_pre_hook(record, with_kwargs=True)
    try:
        run(llama, Shift(), docs, layer=1, context_length=64, batch_tokens=256, prefix=prefix)
    finally:
        handle.remove()
    clean, spliced, zero = seen  # one batch holding both windows
    _, real, splice = batch_tensors(windows, [1, 0], pad=0)
    assert not real.all() and splice.sum() > 10 and not splice[:, 0].any()
    torch.testing.assert_close(spliced[splice], clean[splice] + 1, rtol=0, atol=0)
    assert (zero[splice] == 0).all() and (clean[splice] != 0).any()
    for out in (spliced, zero):
        torch.testing.assert_close(out[~splice], clean[~splice], rtol=0, atol=0)
        assert torch.equal(out[:, 0], clean[:, 0]) and torch.equal(out[~real], clean[~real])
    # every real position but the sink (no other special tokens here)
    assert int(splice.sum()) == sum(len(w.ids) - 1 for w in windows)


def recorder(seen: list) -> Any:
    """A forward pre-hook (with kwargs) that appends the block's input hidden states."""

    def record(_module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).clone())

    return record


def test_splice_follows_the_token_filter(llama, documents):
    """One rule for FVU and the spliced metrics: with skip_special and skip_first off the
    sink is spliced too, and a norm limit leaves exactly the positions above it clean."""
    seen = []
    record = recorder(seen)
    docs = [documents[0], documents[7]]
    prefix = bos_prefix(llama.tokenizer, "auto")
    windows = windows_of(list(enumerate(docs)), llama.tokenizer, prefix, 64)
    ids, real, _ = batch_tensors(windows, [1, 0], pad=0)
    norms = capture(llama.model, [1], ids, real.long())[1].float().norm(dim=-1)
    limit = float(norms[real].median())
    handle = decoder_blocks(llama.model)[2].register_forward_pre_hook(record, with_kwargs=True)
    try:
        for tokens in (TokenFilter(False, False), TokenFilter(False, False, limit)):
            run(llama, Shift(), docs, context_length=64, batch_tokens=256, tokens=tokens)
    finally:
        handle.remove()
    clean, spliced, _, _, limited, _ = seen
    changed = (spliced != clean).any(-1)
    assert torch.equal(changed, real)  # the sink at position 0 too
    changed = (limited != clean).any(-1)
    want = real & (norms <= limit)
    assert torch.equal(changed, want) and 0 < int(want.sum()) < int(real.sum())


def test_clean_ce_matches_an_independent_computation(llama, documents):
    doc = documents[7]
    prefix = bos_prefix(llama.tokenizer, "auto")
    (w,) = windows_of([(0, doc)], llama.tokenizer, prefix, 64)
    ids = torch.from_numpy(w.ids)[None]
    with torch.no_grad():
        logp = llama.model(ids).logits[0].log_softmax(-1)
    # predictions from positions 1 .. n-2 of tokens 2 .. n-1
    ce = -logp[1:-1].gather(1, ids[0, 2:, None]).mean()
    r = run(llama, random_sae(), [doc], context_length=64)
    assert r["tokens"] == len(w.ids) - 2
    assert r["ce_clean"] == pytest.approx(float(ce), rel=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "qwen2", "gemma3_text", "gpt_neox"])
def test_spliced_metrics_equal_an_independent_computation(tiny_models, documents, arch):
    """CE and KL of the spliced and zero-ablated runs against a plain computation: each
    window alone, the whole model run three times with the layer's output replaced at the
    kept positions (no replay of the clean layers, no shared log-sum-exp), every
    architecture the tool supports."""
    import torch.nn.functional as F

    from samesheep.lm.models import decoder_blocks

    lm = load_model(str(tiny_models[arch]))
    sae = random_sae(seed=2)
    docs = documents[:4]
    prefix = bos_prefix(lm.tokenizer, "auto")
    layer = 1
    block = decoder_blocks(lm.model)[layer]
    sums = dict.fromkeys(("ce_clean", "ce_spliced", "ce_zero", "kl_spliced", "kl_zero"), 0.0)
    n = 0
    for w in windows_of(list(enumerate(docs)), lm.tokenizer, prefix, 24):
        ids = torch.from_numpy(w.ids)[None]
        splice = torch.ones(len(w.ids), dtype=torch.bool)
        splice[0] = False  # the sink
        splice &= ~torch.from_numpy(w.special)

        def replaced(fn, ids=ids, splice=splice):
            def hook(_m, _i, out):
                h = out[0] if isinstance(out, tuple) else out
                h = h.clone()
                h[0, splice] = fn(h[0, splice].float()).to(h.dtype)
                return (h, *out[1:]) if isinstance(out, tuple) else h

            handle = block.register_forward_hook(hook)
            try:
                with torch.no_grad():
                    return lm.model(ids).logits[0].double().log_softmax(-1)
            finally:
                handle.remove()

        with torch.no_grad():
            clean = lm.model(ids).logits[0].double().log_softmax(-1)
        spliced, zero = replaced(sae), replaced(torch.zeros_like)
        first = int(torch.nonzero(splice)[0]) if splice.any() else len(w.ids)
        rows = torch.arange(first, len(w.ids) - 1)  # predictions a splice can reach
        target = ids[0, rows + 1]
        for name, logp in (("clean", clean), ("spliced", spliced), ("zero", zero)):
            sums[f"ce_{name}"] += float(F.nll_loss(logp[rows], target, reduction="sum"))
        for name, logp in (("spliced", spliced), ("zero", zero)):
            kl = F.kl_div(logp[rows], clean[rows], log_target=True, reduction="sum")
            sums[f"kl_{name}"] += float(kl)
        n += len(rows)
    got = run(lm, sae, docs, layer=layer, context_length=24, batch_tokens=96)
    assert got["tokens"] == n
    for key, total in sums.items():
        assert got[key] == pytest.approx(total / n, rel=2e-4, abs=1e-6), key
    assert got["kl_spliced"] > 0


def test_padding_does_not_change_results(llama, documents):
    docs = [documents[0], documents[7], documents[1]]  # 1, 1 and 2 windows
    prefix = bos_prefix(llama.tokenizer, "auto")
    windows = windows_of(list(enumerate(docs)), llama.tokenizer, prefix, 64)
    lengths = sorted(len(w.ids) for w in windows)
    assert len(lengths) == 4 and len(set(lengths)) == 4 and lengths[-1] * 4 <= 256  # one batch
    sae = random_sae(seed=1)
    alone = [run(llama, sae, [d], context_length=64, batch_tokens=256) for d in docs]
    together = run(llama, sae, docs, context_length=64, batch_tokens=256)
    assert together["tokens"] == sum(r["tokens"] for r in alone)
    for key in ("ce_clean", "ce_spliced", "ce_zero", "kl_spliced", "kl_zero"):
        summed = sum(r[key] * r["tokens"] for r in alone)
        assert together[key] * together["tokens"] == pytest.approx(summed, rel=1e-5), key
    assert together["kl_spliced"] > 0


def test_with_hidden_keeps_structure():
    h = torch.ones(1)
    assert with_hidden(torch.zeros(1), h) is h
    out = with_hidden((torch.zeros(1), "cache"), h)
    assert isinstance(out, tuple) and out[0] is h and out[1] == "cache"
    out = with_hidden([torch.zeros(1), None], h)
    assert isinstance(out, list) and out[0] is h


def test_too_short_documents_are_an_error(llama):
    with pytest.raises(SamesheepError, match="no positions"):
        run(llama, Identity(), [Document("d", "a")])


def test_splicing_given_vectors_at_chosen_positions(llama, documents):
    """SpliceAt puts the given vectors exactly at the chosen (document, window, position)s,
    nowhere else; given the clean states there, nothing changes."""
    seen = []
    record = recorder(seen)
    docs = [documents[0], documents[7]]
    prefix = bos_prefix(llama.tokenizer, "auto")
    windows = windows_of(list(enumerate(docs)), llama.tokenizer, prefix, 64)
    chosen = [(w.doc_index, w.window, p) for w in windows for p in range(1, len(w.ids), 3)]
    rows = {key: j for j, key in enumerate(chosen)}
    given = torch.randn(len(chosen), 32, generator=torch.Generator().manual_seed(0))
    settings = SpliceSettings(prefix, 64, 256, at=SpliceAt(rows, given))
    handle = decoder_blocks(llama.model)[2].register_forward_pre_hook(record, with_kwargs=True)
    try:
        got = spliced_metrics(llama, 1, Identity(), docs, settings, "cpu")
    finally:
        handle.remove()
    clean, spliced = seen[0], seen[1]
    (batch,) = length_batches(windows, 256)  # one batch: the rows of the states seen
    ids, _, _ = batch_tensors(windows, batch, pad=0)
    mask, values = SpliceAt(rows, given).batch(windows, batch, ids.shape[1])
    assert int(mask.sum()) == len(chosen)
    changed = (spliced != clean).any(-1)
    assert changed.shape == mask.shape  # one batch, the windows in the same order
    assert torch.equal(changed, mask)
    assert torch.allclose(spliced[mask], values[mask])
    assert got["kl_spliced"] > 0
    # the clean states themselves at the chosen positions: the spliced run is the clean run
    states = torch.zeros_like(given)
    for i, w in enumerate(batch):
        for p in range(1, len(windows[w].ids), 3):
            states[rows[(windows[w].doc_index, windows[w].window, p)]] = clean[i, p]
    same = dataclasses.replace(settings, at=SpliceAt(rows, states))
    again = spliced_metrics(llama, 1, Identity(), docs, same, "cpu")
    assert again["ce_spliced"] == pytest.approx(again["ce_clean"], rel=1e-6)
    assert again["kl_spliced"] == pytest.approx(0, abs=1e-6)
