"""Logit lens of decoder directions on tiny random models of every supported architecture,
checked against the models' own forward passes."""

from __future__ import annotations

import pytest
import torch
from tokenizers import AddedToken
from transformers import AutoModelForCausalLM, OPTConfig

from samesheep.core.errors import SamesheepError
from samesheep.features.logit_lens import (
    LensBlocks,
    excluded_token_ids,
    lens_directions,
    logit_lens,
    output_head,
    token_strings,
)
from samesheep.lm.models import decoder_blocks, hidden_state, load_model

ARCHS = ["llama", "qwen2", "gemma3_text", "gpt2", "opt", "gpt_neox"]
LAYER_NORM = {"gpt2", "opt", "gpt_neox"}


def model_logits(model: torch.nn.Module, residual: torch.Tensor) -> torch.Tensor:
    """[m, vocab]: the model's own logits where its last block outputs residual [m, d]."""

    def replace(_module, _inputs, output):
        h = residual[:, None, :].to(hidden_state(output).dtype)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handle = decoder_blocks(model)[-1].register_forward_hook(replace)
    try:
        with torch.no_grad():
            ids = torch.zeros(residual.shape[0], 1, dtype=torch.int64)
            return model(input_ids=ids, use_cache=False).logits[:, 0].float()
    finally:
        handle.remove()


def dense_lens(model: torch.nn.Module, directions: torch.Tensor) -> torch.Tensor:
    """[m, vocab] reference logits: head(norm(dirs)) - head(norm(0)), by the model itself."""
    zero = model_logits(model, torch.zeros(1, directions.shape[1]))
    return model_logits(model, directions) - zero


def randomise_final_norm(model: torch.nn.Module, seed: int = 0) -> None:
    """Give the final norm non-trivial weights and biases, so the lens must apply them."""
    norm, _ = output_head(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in norm.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1 if p.ndim == 1 else 0))


def opt_post_ln() -> torch.nn.Module:
    """An OPT with no final norm (norm after each block) that projects the residual from 32
    down to 16 dimensions before its head, like facebook/opt-350m."""
    config = OPTConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=64,
        word_embed_proj_dim=16,
        do_layer_norm_before=False,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_lens_equals_the_models_own_logits(tiny_models, arch):
    model = load_model(str(tiny_models[arch])).model
    randomise_final_norm(model)
    dirs = torch.randn(6, 32, generator=torch.Generator().manual_seed(1))
    _, w_u = output_head(model)
    torch.testing.assert_close(w_u, model.get_output_embeddings().weight, rtol=0, atol=0)
    got = lens_directions(model, dirs) @ w_u.T
    torch.testing.assert_close(got, dense_lens(model, dirs), rtol=1e-4, atol=1e-4)


def test_opt_without_final_norm_applies_project_out():
    model = opt_post_ln()
    chain, w_u = output_head(model)
    assert list(chain) == [model.model.decoder.project_out]  # no norm, only the projection
    assert w_u.shape == (100, 16)
    dirs = torch.randn(5, 32, generator=torch.Generator().manual_seed(2))
    lensed = lens_directions(model, dirs)
    assert lensed.shape == (5, 16)
    torch.testing.assert_close(lensed @ w_u.T, dense_lens(model, dirs), rtol=1e-4, atol=1e-4)
    res = logit_lens(model, dirs, k=3, blocks=LensBlocks(vocab=7))
    assert res.promoted_ids.shape == (5, 3)


def test_opt_without_final_norm_or_projection_is_the_identity():
    model = opt_post_ln()
    model.model.decoder.project_out = None
    model.lm_head = torch.nn.Linear(32, 100, bias=False)  # a head of the full width
    assert output_head(model)[0] is None
    dirs = torch.randn(3, 32)
    torch.testing.assert_close(lens_directions(model, dirs), dirs, rtol=0, atol=0)


def test_final_norm_found_by_search_or_error(tiny_models):
    model = load_model(str(tiny_models["llama"])).model
    norm = model.model.norm
    del model.model.norm
    model.model.last_norm = norm  # an unknown name: found as the norm-like module after blocks
    assert output_head(model)[0] is norm
    del model.model.last_norm
    # No final norm anywhere: an error rather than silently ranking unnormalised directions.
    with pytest.raises(SamesheepError, match="cannot find the final norm"):
        output_head(model)
    with pytest.raises(SamesheepError, match="final norm"):
        logit_lens(model, torch.randn(2, 32))


@pytest.mark.parametrize("arch", ARCHS)
def test_own_unembedding_row_ranks_first(tiny_models, arch):
    lm = load_model(str(tiny_models[arch]))
    _, w_u = output_head(lm.model)
    exclude = excluded_token_ids(lm.tokenizer, w_u.shape[0])
    # The final norms are identities at init (weights 1, biases 0), so the lens of a row is
    # the row itself, centred for LayerNorm. By Cauchy-Schwarz the allowed token with the
    # longest (centred) row then scores highest against its own row.
    rows = w_u - w_u.mean(1, keepdim=True) if arch in LAYER_NORM else w_u
    t = int(rows.norm(dim=1).masked_fill(exclude, -1).argmax())
    dirs = torch.stack([w_u[t], -w_u[t]])
    res = logit_lens(lm.model, dirs, exclude, k=3, blocks=LensBlocks(latents=1, vocab=50))
    assert res.promoted_ids[0, 0] == t and res.suppressed_ids[1, 0] == t
    assert res.promoted_logits[0, 0] > res.promoted_logits[0, 1]
    assert res.suppressed_logits[1, 0] < res.suppressed_logits[1, 1] < 0
    # Negating a direction swaps the two ends.
    torch.testing.assert_close(res.promoted_ids[0], res.suppressed_ids[1], rtol=0, atol=0)
    torch.testing.assert_close(res.promoted_logits[0], -res.suppressed_logits[1])


@pytest.mark.parametrize("arch", ARCHS)
def test_blocked_equals_dense_reference(tiny_models, arch):
    model = load_model(str(tiny_models[arch])).model
    randomise_final_norm(model, seed=3)
    vocab = output_head(model)[1].shape[0]
    g = torch.Generator().manual_seed(4)
    dirs = torch.randn(13, 32, generator=g)
    exclude = torch.rand(vocab, generator=g) < 0.2
    dense = dense_lens(model, dirs)
    top = dense.masked_fill(exclude, -torch.inf).topk(5, dim=1)
    bottom = dense.masked_fill(exclude, torch.inf).topk(5, dim=1, largest=False)
    block_vocab = next(b for b in (7, 11, 13) if vocab % b)  # a ragged last block
    for blocks in [LensBlocks(4, block_vocab), LensBlocks()]:  # small, and one block
        res = logit_lens(model, dirs, exclude, k=5, blocks=blocks)
        assert res.promoted_ids.dtype == torch.int64 and res.promoted_logits.dtype == torch.float32
        torch.testing.assert_close(res.promoted_ids, top.indices, rtol=0, atol=0)
        torch.testing.assert_close(res.suppressed_ids, bottom.indices, rtol=0, atol=0)
        torch.testing.assert_close(res.promoted_logits, top.values, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(res.suppressed_logits, bottom.values, rtol=1e-4, atol=1e-4)
    # bfloat16 products: ids may swap among near ties, the k best values stay close.
    half = logit_lens(model, dirs, exclude, k=5, dtype=torch.bfloat16, blocks=LensBlocks(4))
    torch.testing.assert_close(half.promoted_logits, top.values, rtol=0.02, atol=0.05)
    torch.testing.assert_close(half.suppressed_logits, bottom.values, rtol=0.02, atol=0.05)
    assert not exclude[half.promoted_ids].any() and not exclude[half.suppressed_ids].any()


def test_excluded_ids_never_appear(tiny_models):
    lm = load_model(str(tiny_models["llama"]))
    tok, model = lm.tokenizer, lm.model
    ordinary = len(tok) - 2
    tok.add_tokens(["<unused5>", "[unused7]", "plain"])  # placeholders, and a real token
    tok.add_tokens([AddedToken("<|mark|>", special=True)])  # special, yet no named role
    planted = tok.convert_tokens_to_ids(["<unused5>", "[unused7]", "<|mark|>"])
    plain = tok.convert_tokens_to_ids("plain")
    model.resize_token_embeddings(len(tok) + 5, mean_resizing=False)  # padded head rows
    _, w_u = output_head(model)
    vocab = w_u.shape[0]
    exclude = excluded_token_ids(tok, vocab)
    assert exclude.shape == (vocab,) and exclude.dtype == torch.bool
    bad = [tok.eos_token_id, *planted, *range(len(tok), vocab)]
    assert exclude[bad].all()
    assert not exclude[[0, ordinary, plain]].any()
    # Make the excluded rows the loudest of the head: they would top both ends.
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        w_u[bad] = torch.randn(len(bad), w_u.shape[1], generator=g) * 10
    dirs = torch.randn(20, 32, generator=g)
    loud = logit_lens(model, dirs, k=5, blocks=LensBlocks(8, 64))
    assert torch.isin(loud.promoted_ids, torch.tensor(bad)).any()
    res = logit_lens(model, dirs, exclude, k=5, blocks=LensBlocks(8, 64))
    for ids in (res.promoted_ids, res.suppressed_ids):
        assert not exclude[ids].any()
        assert not torch.isin(ids, torch.tensor(bad)).any()


def test_layer_norm_bias_adds_nothing(tiny_models):
    for arch in sorted(LAYER_NORM):
        model = load_model(str(tiny_models[arch])).model
        randomise_final_norm(model)
        norm, _ = output_head(model)
        assert norm.bias.abs().sum() > 0
        zero = lens_directions(model, torch.zeros(2, 32))
        torch.testing.assert_close(zero, torch.zeros(2, 32), rtol=0, atol=0)
        dirs = torch.randn(4, 32)
        with torch.no_grad():
            torch.testing.assert_close(lens_directions(model, dirs), norm(dirs) - norm.bias)
        res = logit_lens(model, torch.zeros(1, 32), k=3)
        assert (res.promoted_logits == 0).all() and (res.suppressed_logits == 0).all()


def test_scale_changes_no_ranking(tiny_models):
    model = load_model(str(tiny_models["gemma3_text"])).model
    randomise_final_norm(model)
    dirs = torch.randn(4, 32, generator=torch.Generator().manual_seed(6))
    res = logit_lens(model, dirs, k=4)
    scaled = logit_lens(model, dirs * torch.tensor([[0.1], [3.0], [50.0], [1.0]]), k=4)
    torch.testing.assert_close(res.promoted_ids, scaled.promoted_ids, rtol=0, atol=0)
    torch.testing.assert_close(res.suppressed_ids, scaled.suppressed_ids, rtol=0, atol=0)


def test_bad_arguments(tiny_models):
    model = load_model(str(tiny_models["qwen2"])).model
    vocab = output_head(model)[1].shape[0]
    dirs = torch.randn(3, 32)
    with pytest.raises(SamesheepError, match="hidden size"):
        logit_lens(model, torch.randn(3, 16))
    with pytest.raises(SamesheepError, match="exclude"):
        logit_lens(model, dirs, torch.zeros(vocab - 1, dtype=torch.bool))
    with pytest.raises(SamesheepError, match="k="):
        logit_lens(model, dirs, torch.arange(vocab) > 2, k=4)
    empty = logit_lens(model, torch.zeros(0, 32), k=2)
    assert empty.promoted_ids.shape == (0, 2) and empty.suppressed_logits.shape == (0, 2)


def test_token_strings(tiny_models):
    tok = load_model(str(tiny_models["gpt2"])).tokenizer
    ids = torch.tensor([[0, 5, tok.eos_token_id], [270, 3, len(tok) + 4]])
    got = token_strings(tok, ids)
    assert got[0] == [tok.decode([0]), tok.decode([5]), tok.eos_token]
    assert got[1][:2] == [tok.decode([270]), tok.decode([3])] and got[1][2] == ""
    assert token_strings(tok, [5, 6]) == [tok.decode([5]), tok.decode([6])]
    assert token_strings(tok, torch.tensor(7)) == [tok.decode([7])]
    assert token_strings(tok, torch.zeros(0, 3, dtype=torch.int64)) == []


def test_grouped_block_ends_equal_a_plain_top_k():
    """Both ends found in one grouped pass hold the same values as torch's top-k, ties
    included (bfloat16 logits tie often), and a block too small to group."""
    from samesheep.features.logit_lens import _block_ends

    g = torch.Generator().manual_seed(0)
    for cols in (64 * 8 * 10, 300):
        x = torch.randn(50, cols, generator=g)
        x[:, 100:164] = x[:, 0:1]  # a whole group of ties, with one elsewhere
        for ends, largest in zip(_block_ends(x, 10), (True, False), strict=True):
            vals, ids = ends
            want = x.topk(10, dim=1, largest=largest).values
            assert torch.equal(vals.sort(1).values, want.sort(1).values)
            assert torch.equal(x.gather(1, ids), vals)
            assert (ids.sort(1).values.diff(dim=1) > 0).all()  # no column twice


def test_vocab_blocks_cover_the_allowed_ids_once():
    from samesheep.features.logit_lens import vocab_blocks

    exclude = torch.zeros(1000, dtype=torch.bool)
    exclude[[0, 1, 2, 500, 998, 999]] = True
    exclude[300:340] = True
    blocks = vocab_blocks(exclude, 128)
    ids = torch.cat([torch.arange(a, b) if i is None else i for a, b, i in blocks])
    assert torch.equal(ids, (~exclude).nonzero().squeeze(1))
    assert [len(range(a, b)) if i is None else len(i) for a, b, i in blocks][:-1] == [128] * 7
    assert blocks[0] == (3, 131, None)  # consecutive ids: a slice of the head, no copy
    assert any(i is not None for _, _, i in blocks)
    assert vocab_blocks(torch.ones(5, dtype=torch.bool), 2) == []
