"""The causal check on tiny models built here: per-unit effects against a brute-force
forward pass, and planted latents that write into the same (or different) next-token heads."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from scipy.stats import rankdata

from samesheep.causal import check as check_module
from samesheep.causal.check import (
    ACTIVATION_ONLY,
    AGREES,
    CausalCheck,
    CheckSettings,
    Comparison,
    median_interval,
    pairs_table,
    pearson,
    run_check,
    threshold_of,
)
from samesheep.causal.effects import (
    HeldoutTokens,
    Intervention,
    Job,
    ModelRun,
    next_units,
    stored_states,
    window_effects,
)
from samesheep.causal.sampling import Sample
from samesheep.data.alignment import align
from samesheep.data.corpus import Document
from samesheep.data.store import TokenFilter
from samesheep.lm.extraction import pad_id, token_table, windows_of
from samesheep.lm.models import capture, decoder_blocks, hidden_state, load_model
from samesheep.sae.model import Sae, SaeConfig

TEXTS = [
    "The cat sat on the mat and the dog sat on the log, and then the cat ran to the sea.",
    "Paris is the capital of France; the Seine runs through the city to the sea.",
    "A sparse autoencoder learns the directions of the residual stream, one latent each.",
    "Rivers run to the sea, and the sea is never full; the rivers come back again.",
]
CONTEXT = 24  # short windows: documents span several, so window breaks are exercised


def side(folder, layer: int):
    """A model's side: the model, its held-out tokens (every text, in windows) and the clean
    states of block `layer` as a store would hold them."""
    lm = load_model(str(folder))
    docs = [(i, Document(f"d{i}", t)) for i, t in enumerate(TEXTS)]
    windows = windows_of(docs, lm.tokenizer, [lm.tokenizer.eos_token_id], CONTEXT)
    table = token_table(windows, np.ones(sum(len(w.ids) for w in windows), dtype=np.float32))
    tokens = HeldoutTokens.of_tables([table], TokenFilter())
    states = []
    for w in windows:
        ids = torch.from_numpy(w.ids)[None]
        states.append(capture(lm.model, [layer], ids)[layer][0])
    return lm, tokens, torch.cat(states)


def planted_sae(d: int, directions: list[torch.Tensor]) -> Sae:
    """A ReLU SAE whose latents fire with activation 1 at every token (encoder 0, bias 1)
    and write the given directions."""
    sae = Sae(SaeConfig(d_in=d, d_sae=len(directions), architecture="relu"))
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_enc.fill_(1.0)
        sae.b_dec.zero_()
        sae.W_dec.copy_(torch.stack(directions))
    return sae


def model_run(folder, layer: int, directions: list[torch.Tensor], scale: float = -1.0):
    lm, tokens, acts = side(folder, layer)
    run = ModelRun(lm, layer, {"sae": planted_sae(lm.d_model, directions)}, tokens, 256, scale)
    stored_states(run, acts, pad_id(lm.tokenizer))
    return run


def hooked_pass(run: ModelRun, ids: torch.Tensor, change) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities [positions, vocab] of a whole forward pass of ids [1, positions],
    clean and with change(block `layer`'s output [positions, d]) added to that output."""
    block = decoder_blocks(run.lm.model)[run.layer]

    def hook(_m, _i, output):
        h = hidden_state(output).clone()
        h[0] += change(h[0]).to(h.dtype)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    with torch.inference_mode():
        clean = run.lm.model(input_ids=ids).logits[0].log_softmax(-1)
        handle = block.register_forward_hook(hook)
        try:
            spliced = run.lm.model(input_ids=ids).logits[0].log_softmax(-1)
        finally:
            handle.remove()
    return clean, spliced


def brute_force(run: ModelRun, latent: int) -> dict[int, float]:
    """{store row of a target: change of its log-probability}, from whole forward passes of
    each window with the latent's contribution removed by a hook on block `layer`."""
    t, sae = run.tokens, run.saes["sae"]
    out = {}
    for w in range(t.windows):
        lo, hi = int(t.bounds[w]), int(t.bounds[w + 1])
        ids = torch.from_numpy(t.ids[lo:hi])[None]
        keep = torch.from_numpy(t.keep[lo:hi])

        def change(h, keep=keep):
            a = sae.encode(h.float())[:, latent] * keep
            return run.scale * a[:, None] * sae.W_dec[latent] / sae.cfg.input_scale

        clean, spliced = hooked_pass(run, ids, change)
        for p in range(hi - lo - 1):
            target = int(ids[0, p + 1])
            out[lo + p + 1] = float(spliced[p, target] - clean[p, target])
    return out


@pytest.fixture(scope="module")
def runs(tiny_models):
    torch.manual_seed(0)
    a = tiny_models["llama"]
    b = tiny_models["qwen2"]
    d = 32
    dirs = [torch.randn(d) * 3 for _ in range(3)]
    return model_run(a, 1, dirs), model_run(b, 1, dirs)


def test_effect_per_unit_is_the_next_units_log_probability_change(runs):
    run_a, run_b = runs
    lengths = np.array([len(t) for t in TEXTS])
    units = align(run_a.tokens.rows, run_b.tokens.rows, lengths)
    nxt = next_units(units, (run_a.tokens, run_b.tokens))
    assert nxt.valid.sum() > 20
    s = CheckSettings(max_docs=0, min_units=3)
    check = CausalCheck((run_a, run_b), units, nxt, s)
    what = (0, Intervention("sae", 1))
    other = (1, Intervention("sae", 1))
    check.read_acts([what, other])
    comp = Comparison(0, "agreement", what, other)
    check.choose_units([comp])
    assert np.array_equal(comp.units, np.flatnonzero(nxt.valid))  # fires everywhere
    check.run_effects([comp])
    truth = brute_force(run_a, 1)
    want = np.zeros(len(units))
    for row, u in zip(nxt.targets[0].tolist(), nxt.target_unit[0].tolist(), strict=True):
        want[u] += truth[row]
    got = check.effects[what]
    assert np.abs(want[comp.units]).max() > 1e-2  # the latent does change the text's odds
    np.testing.assert_allclose(got[comp.units], want[comp.units], atol=2e-4, rtol=1e-3)
    # a unit's effect sums the log-probability changes of every token of the next unit
    u = np.flatnonzero(nxt.valid)
    span = units.row_a[u + 1] - units.first_a[u + 1] + 1
    assert span.max() >= 1 and len(nxt.targets[0]) == span.sum()


def test_the_head_gives_the_same_effects_whatever_it_batches(runs, monkeypatch):
    run_a, run_b = runs
    lengths = np.array([len(t) for t in TEXTS])
    units = align(run_a.tokens.rows, run_b.tokens.rows, lengths)
    nxt = next_units(units, (run_a.tokens, run_b.tokens))
    what, other = (0, Intervention("sae", 0)), (1, Intervention("sae", 2))
    got = []
    for batch in (10**9, 1):  # every window at once; the head after each window
        monkeypatch.setattr(check_module, "HEAD_BATCH", batch)
        check = CausalCheck((run_a, run_b), units, nxt, CheckSettings(max_docs=0, min_units=3))
        check.read_acts([what, other])
        comp = Comparison(0, "agreement", what, other)
        check.choose_units([comp])
        check.run_effects([comp])
        got.append((check.effects[what].copy(), check.effects[other].copy()))
    assert np.abs(got[0][0]).max() > 1e-3
    for x, y in zip(got[0], got[1], strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5)


def test_targets_before_the_first_firing_read_zero_and_the_rest_match_a_whole_pass(runs):
    run = runs[0]
    t, sae = run.tokens, run.saes["sae"]
    w = int(np.argmax(np.diff(t.bounds)))
    lo, hi = int(t.bounds[w]), int(t.bounds[w + 1])
    first = (hi - lo) // 2
    acts = np.zeros(hi - lo, dtype=np.float32)
    acts[first:] = np.linspace(0.5, 2.0, hi - lo - first)
    targets = np.arange(lo + 1, hi)
    got = window_effects(run, w, [Job(Intervention("sae", 1), acts, targets)])[0]
    ids = torch.from_numpy(t.ids[lo:hi])[None]
    change = run.scale * torch.from_numpy(acts)[:, None] * sae.W_dec[1] / sae.cfg.input_scale
    clean, spliced = hooked_pass(run, ids, lambda _h: change)
    pos = targets - lo - 1
    want = (spliced[pos, ids[0, pos + 1]] - clean[pos, ids[0, pos + 1]]).double().numpy()
    before = pos < first
    assert before.any() and (~before).any()
    assert np.all(got[before] == 0.0)  # not run: causal attention leaves them as they are
    assert np.abs(want[before]).max() < 1e-5  # and a whole pass agrees
    assert np.abs(want[~before]).max() > 1e-2
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-3)


def head_direction(run: ModelRun, token: int, size: float) -> torch.Tensor:
    """A residual direction (of norm `size`) that the LM head reads as `token`."""
    row = run.lm.model.get_output_embeddings().weight[token].detach().float()
    return row / row.norm() * size


def frequent_next_tokens(run: ModelRun, n: int) -> list[int]:
    """The n most frequent tokens of the text (scored targets), most frequent first."""
    ids, counts = np.unique(run.tokens.ids[run.tokens.keep], return_counts=True)
    return ids[np.argsort(-counts)][:n].tolist()


def test_latents_writing_the_same_head_agree_and_different_heads_do_not(tiny_models):
    """Pair 0: A's latent 0 and B's latent 0 both write the direction of the same next
    token's head: they agree in effect. Pair 1: both fire as often (everywhere), but A's
    writes one token's head and B's another's: in activation only. Floors: B's latents 2
    and 3, random directions."""
    torch.manual_seed(1)
    lm_a = tiny_models["llama"]
    lm_b = tiny_models["qwen2"]
    probe = model_run(lm_a, 3, [torch.zeros(32)])
    t1, t2, t3 = frequent_next_tokens(probe, 3)
    size = float(torch.cat(probe.states).float().norm(dim=-1).median())
    run_a = model_run(lm_a, 3, [torch.zeros(32)] * 2)
    run_b = model_run(lm_b, 3, [torch.zeros(32)] * 4)
    with torch.no_grad():
        run_a.saes["sae"].W_dec.copy_(
            torch.stack([head_direction(run_a, t1, 2 * size), head_direction(run_a, t2, 2 * size)])
        )
        run_b.saes["sae"].W_dec.copy_(
            torch.stack(
                [
                    head_direction(run_b, t1, 2 * size),
                    head_direction(run_b, t3, 2 * size),
                    torch.randn(32) * size,
                    torch.randn(32) * size,
                ]
            )
        )
    lengths = np.array([len(t) for t in TEXTS])
    units = align(run_a.tokens.rows, run_b.tokens.rows, lengths)
    nxt = next_units(units, (run_a.tokens, run_b.tokens))
    sample = Sample(
        latent_a=np.array([0, 1]),
        latent_b=np.array([0, 1]),
        r=np.array([0.9, 0.9]),
        fires_a=np.array([100, 100]),
        fires_b=np.array([100, 100]),
        stratum=np.array([0, 1]),
        floor_b=np.array([2, 3]),
        ceiling_a=np.array([-1, -1]),
    )
    check = CausalCheck((run_a, run_b), units, nxt, CheckSettings(max_docs=0, min_units=3))
    comps, agreement = run_check(check, sample)
    kinds = np.array([c.kind for c in comps])
    threshold = threshold_of(agreement[kinds == "floor"], 0.95)
    ranks = np.array([check.rank_agreement(c) for c in comps])
    table = pairs_table(sample, comps, (agreement, ranks), threshold)
    agree = table.column("agreement").to_numpy()
    # Spearman beside Pearson: in ranks too the shared head agrees, different heads do not
    rho = table.column("agreement_spearman").to_numpy()
    assert rho[0] > 0.2 and rho[0] > rho[1] + 0.2, rho
    assert agree[0] > 0.5, agree
    assert agree[1] < threshold < agree[0], (agree, threshold)
    assert table.column("label").to_pylist() == [AGREES, ACTIVATION_ONLY]
    assert isinstance(table, pa.Table) and table.num_rows == 2


def test_steering_moves_the_effect_the_other_way(tiny_models):
    """Steering (adding the latent's contribution again) raises the head's token where
    ablation lowers it."""
    torch.manual_seed(2)
    folder = tiny_models["llama"]
    probe = model_run(folder, 3, [torch.zeros(32)])
    (t1,) = frequent_next_tokens(probe, 1)
    size = float(torch.cat(probe.states).float().norm(dim=-1).median())
    signs = []
    for scale in (-1.0, 1.0):
        run = model_run(folder, 3, [head_direction(probe, t1, size)], scale)
        lengths = np.array([len(t) for t in TEXTS])
        units = align(run.tokens.rows, run.tokens.rows, lengths)
        nxt = next_units(units, (run.tokens, run.tokens))
        check = CausalCheck((run, run), units, nxt, CheckSettings(max_docs=0, min_units=3))
        side = (0, Intervention("sae", 0))
        check.read_acts([side])
        comp = Comparison(0, "agreement", side, side)
        check.choose_units([comp])
        check.run_effects([comp])
        # the units whose next unit is the head's token
        u = comp.units
        is_t1 = np.array([run.tokens.ids[units.row_a[k + 1]] == t1 for k in u.tolist()], dtype=bool)
        assert is_t1.any()
        signs.append(np.sign(check.effects[side][u][is_t1].mean()))
    assert signs == [-1.0, 1.0]


def test_the_median_interval_covers_the_median_at_its_width():
    """The bootstrap interval of the median against its known answer: for n normal draws
    its width is about 2 x 1.96 x sqrt(pi / 2) / sqrt(n); a constant has none wider than 0;
    fewer than two values have none."""
    v = np.random.default_rng(0).normal(size=400)
    lo, hi = median_interval(v, seed=1)
    assert lo < 0 < hi
    assert abs((hi - lo) - 2 * 1.96 * np.sqrt(np.pi / 2) / 20) < 0.06
    assert median_interval(np.full(10, 0.3), 0) == [0.3, 0.3]
    assert all(np.isnan(median_interval(np.array([0.1, np.nan]), 0)))


def test_one_huge_unit_carries_pearson_but_not_spearman():
    x = np.array([0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 10.0])
    y = np.array([1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 10.0])
    assert pearson(x, y) > 0.8
    assert pearson(rankdata(x), rankdata(y)) < 0.2
