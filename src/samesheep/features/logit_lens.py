"""Logit lens of SAE decoder directions: the output tokens each latent's direction raises and
lowers most, through the model's final norm and unembedding.

Computed in blocks of latents and of the vocabulary with a running top-k per latent, so no
[latents, vocabulary] matrix is ever held (Gemma-3: ~10k latents x 262,144 tokens would be
10 GiB of float32). Logits are those of the LM head itself: any soft-capping or positive
scaling a model applies after it (Gemma-2's tanh cap, Cohere's logit_scale) is left out, and
being monotone it changes no ranking.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..core.errors import SamesheepError
from ..lm.models import decoder_blocks

# Where architectures keep the norm applied after the last block, relative to base_model.
# An attribute that exists but is None (OPT with do_layer_norm_before=False) means "none".
_NORM_PATHS = (
    "norm",  # llama, qwen2, gemma3, mistral
    "ln_f",  # gpt2, bloom, falcon, gpt-j
    "final_layer_norm",  # gpt_neox
    "final_layernorm",  # phi
    "norm_f",  # mpt, mamba
    "decoder.final_layer_norm",  # opt
    "language_model.norm",  # gemma3 multimodal and other vision-language wrappers
)
_MISSING = object()
_UNUSED = re.compile(r"<unused[^>]*>|\[unused[^\]]*\]")  # Gemma's <unused12>, BERT's [unused3]


class LensResult(NamedTuple):
    """Top-k output tokens per direction, on the CPU: the most promoted (highest logit first)
    and the most suppressed (most negative logit first)."""

    promoted_ids: Tensor  # [m, k] int64
    promoted_logits: Tensor  # [m, k] float32
    suppressed_ids: Tensor  # [m, k] int64
    suppressed_logits: Tensor  # [m, k] float32


def _attribute_path(root: nn.Module, path: str) -> Any:
    """The module at a dotted attribute path, None where it is set to None, else _MISSING."""
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part, _MISSING)
        if obj is _MISSING or obj is None:
            return obj
    return obj if isinstance(obj, nn.Module) else _MISSING


def _search_norm(model: nn.Module) -> nn.Module | None:
    """The last norm-like module of base_model outside the decoder blocks and any vision
    tower: final norms are registered after the blocks, embedding norms (bloom) before."""
    inside = {id(m) for m in decoder_blocks(model).modules()}
    d = model.config.get_text_config().hidden_size
    found = [
        m
        for name, m in model.base_model.named_modules()
        if "Norm" in type(m).__name__
        and id(m) not in inside
        and "vision" not in name
        and (getattr(m, "weight", None) is None or m.weight.shape[-1] == d)
    ]
    return found[-1] if found else None


def _final_norm(model: nn.Module) -> nn.Module | None:
    base = model.base_model
    for path in _NORM_PATHS:
        found = _attribute_path(base, path)
        if found is not _MISSING:
            return found
    found = _search_norm(model)
    if found is None:
        # Guessing "no norm" would silently rank tokens by the wrong scores.
        raise SamesheepError(
            f"cannot find the final norm of {type(model).__name__} (looked for "
            f"base_model.{{{', '.join(_NORM_PATHS)}}} and any *Norm module after the blocks)"
        )
    return found


def output_head(model: nn.Module) -> tuple[nn.Module | None, Tensor]:
    """(what the residual stream passes through before the LM head, or None where nothing;
    the unembedding weight [vocab, d_head]).

    The first is the final norm; where OPT projects the residual down to its embedding width
    (project_out, word_embed_proj_dim != hidden_size) it is nn.Sequential(norm, project_out),
    so d_head is that width. Raises SamesheepError where neither a known final norm
    attribute nor a norm-like module after the decoder blocks exists."""
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if not isinstance(weight, Tensor) or weight.ndim != 2:
        raise SamesheepError(f"{type(model).__name__} has no unembedding matrix (not a causal LM?)")
    norm = _final_norm(model)
    project_out = getattr(getattr(model.base_model, "decoder", None), "project_out", None)
    if isinstance(project_out, nn.Module):
        norm = nn.Sequential(*[m for m in (norm, project_out) if m is not None])
    return norm, weight


def _float32_call(module: nn.Module, x: Tensor) -> Tensor:
    """module(x) with its floating parameters and buffers in float32, copying only those not
    float32 already (a bfloat16 model keeps its weights)."""
    tensors = dict(module.named_parameters()) | dict(module.named_buffers())
    as32 = {n: t.float() if t.is_floating_point() else t for n, t in tensors.items()}
    return functional_call(module, as32, (x,)).float()


def _check_directions(model: nn.Module, directions: Tensor) -> int:
    """The model's hidden size, which directions [m, d_model] must match."""
    d = model.config.get_text_config().hidden_size
    if directions.ndim != 2 or directions.shape[1] != d:
        raise SamesheepError(
            f"directions must be [m, {d}] (the model's hidden size), not {list(directions.shape)}"
        )
    return d


def lens_directions(model: nn.Module, directions: Tensor) -> Tensor:
    """[m, d_head] float32 on the head's device: what the LM head sees for each direction
    [m, d_model], final_norm(dirs) - final_norm(zeros).

    For RMSNorm variants (Gemma's (1 + weight) included) final_norm(0) = 0 and this is the
    per-dimension scale applied to the normalised direction; for LayerNorm it also removes
    the bias, which would otherwise add the same logit vector to every latent. Norms make the
    result independent of each row's scale (but for eps), and in any case a row's scale
    changes no ranking; only where the model has no final norm (OPT with
    do_layer_norm_before=False) do logits grow with it. Computed in float32 whatever the
    model's dtype."""
    chain, w_u = output_head(model)
    d = _check_directions(model, directions)
    if chain is None:
        return directions.to(w_u.device, torch.float32)
    where = next(iter(chain.parameters()), w_u).device
    x = directions.to(where, torch.float32)
    lensed = _float32_call(chain, x) - _float32_call(chain, x.new_zeros(1, d))
    return lensed.to(w_u.device)


def _decode_each(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each id decoded alone, special tokens shown, no clean-up of spaces; "" for ids the
    tokenizer does not know. One batched call into the Rust tokenizer where there is one
    (faster than batch_decode on Gemma's 262k ids)."""
    n = len(tokenizer)
    known = [i for i in ids if 0 <= i < n]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        decoded = backend.decode_batch([[i] for i in known], skip_special_tokens=False)
    else:
        decoded = tokenizer.batch_decode(
            [[i] for i in known], skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
    if len(known) == len(ids):
        return decoded
    by_id = dict(zip(known, decoded, strict=True))
    return [by_id.get(i, "") for i in ids]


def excluded_token_ids(tokenizer: Any, vocab_size: int) -> Tensor:
    """[vocab_size] bool: tokens never reported: special ids, added tokens marked special,
    "<unused12>"/"[unused3]" placeholders, tokens that decode to "", ids the tokenizer lacks
    and head rows padded past len(tokenizer)."""
    n = min(len(tokenizer), vocab_size)
    out = torch.zeros(vocab_size, dtype=torch.bool)
    out[n:] = True
    ids = set(tokenizer.all_special_ids)
    added = getattr(tokenizer, "added_tokens_decoder", {})
    ids.update(i for i, t in added.items() if getattr(t, "special", False))
    # One pass over all ids as token strings, then one decoding them.
    tokens = tokenizer.convert_ids_to_tokens(list(range(n)))
    ids.update(i for i, t in enumerate(tokens) if t is None or _UNUSED.fullmatch(t))
    ids.update(i for i, s in enumerate(_decode_each(tokenizer, list(range(n)))) if s == "")
    out[[i for i in ids if 0 <= i < vocab_size]] = True
    return out


TOP_GROUP = 64
"""Logits per group in a block's top-k: the k best lie in the k groups with the best maxima."""


def _top_in_groups(grouped: Tensor, best: Tensor, k: int, largest: bool) -> tuple[Tensor, Tensor]:
    """The k largest (smallest) of each row of grouped [b, groups, g], given each group's
    maximum (minimum) `best` [b, groups]: only the k best groups can hold them."""
    b, _, g = grouped.shape
    groups = best.topk(k, dim=1, largest=largest).indices  # [b, k]
    cand = grouped.gather(1, groups[:, :, None].expand(b, k, g)).reshape(b, k * g)
    vals, at = cand.topk(k, dim=1, largest=largest)
    return vals, groups.gather(1, at // g) * g + at % g


def _block_ends(logits: Tensor, k: int) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """((values, columns) of the k largest, (values, columns) of the k smallest) logits of
    each row of a block [b, v]. Each group of TOP_GROUP columns' maximum and minimum, then a
    search of the k best groups only, faster than two plain top-k's (measured: see
    benchmarks/RESULTS.md, 'Features stage'). Equal values may be picked in another order
    than by a plain top-k."""
    b, v = logits.shape
    g = TOP_GROUP
    if v % g or v < 8 * g * k:
        return logits.topk(k, dim=1), logits.topk(k, dim=1, largest=False)
    grouped = logits.view(b, v // g, g)
    # amax and amin: torch.aminmax is slower than the two here
    hi, lo = grouped.amax(-1), grouped.amin(-1)
    return _top_in_groups(grouped, hi, k, True), _top_in_groups(grouped, lo, k, False)


def _merge(
    vals: Tensor, ids: Tensor, blk_vals: Tensor, blk_ids: Tensor, k: int, largest: bool
) -> tuple[Tensor, Tensor]:
    """The running top-k (vals, ids) [b, k] merged with a block's own top-k."""
    all_vals = torch.cat([vals, blk_vals.float()], dim=1)  # exact: the block's own values
    all_ids = torch.cat([ids, blk_ids], dim=1)
    vals, pick = all_vals.topk(k, dim=1, largest=largest)
    return vals, all_ids.gather(1, pick)


def vocab_blocks(exclude: Tensor, block_vocab: int) -> list[tuple[int, int, Tensor | None]]:
    """The unembedding's rows not excluded, block_vocab at a time (so every block but the
    last keeps the grouped top-k's shape): (first id, end id, None) where the block's ids are
    consecutive, else (first, end, its ids), whose rows alone make the block's product, so
    excluded tokens never need masking."""
    allowed = (~exclude).nonzero().squeeze(1)
    out: list[tuple[int, int, Tensor | None]] = []
    for ids in allowed.split(block_vocab) if len(allowed) else ():
        first, end = int(ids[0]), int(ids[-1]) + 1
        out.append((first, end, None if end - first == len(ids) else ids))
    return out


@dataclass(frozen=True)
class LensBlocks:
    """How the logit lens tiles its [latents, vocabulary] logits: `latents` directions
    against `vocab` rows of the unembedding at a time."""

    latents: int = 1024
    vocab: int = 32768


def logit_lens(
    model: nn.Module,
    directions: Tensor,
    exclude: Tensor | None = None,
    k: int = 10,
    dtype: torch.dtype = torch.float32,
    blocks: LensBlocks = LensBlocks(),
) -> LensResult:
    """The k tokens whose logits each direction [m, d_model] raises and lowers most, through
    the final norm and unembedding (lens_directions @ W_U.T; the head's bias, if any, is left
    out: it is the same for every latent). Matrix products run in `dtype` on the head's device
    in blocks of blocks.latents x blocks.vocab logits; top-k values are kept in float32. Ids
    where `exclude` [vocab] is True never appear."""
    _, w_u = output_head(model)
    vocab, device = w_u.shape[0], w_u.device
    if exclude is None:
        exclude = torch.zeros(vocab, dtype=torch.bool)
    if exclude.shape != (vocab,) or exclude.dtype != torch.bool:
        raise SamesheepError(
            f"exclude must be a bool tensor of the head's {vocab} rows, not "
            f"{exclude.dtype} {list(exclude.shape)}"
        )
    allowed = vocab - int(exclude.sum())
    if not 1 <= k <= allowed:
        raise SamesheepError(f"k={k} must lie between 1 and the {allowed} tokens not excluded")
    block_latents, block_vocab = blocks.latents, blocks.vocab
    if block_latents < 1 or block_vocab < 1:
        raise SamesheepError("the logit lens's blocks must hold at least 1 latent and 1 token")
    _check_directions(model, directions)
    m = directions.shape[0]
    if m == 0:
        ids, logits = torch.zeros(0, k, dtype=torch.int64), torch.zeros(0, k)
        return LensResult(ids, logits, ids.clone(), logits.clone())
    with torch.inference_mode():
        # Asked once on the CPU, so that a GPU is not synchronised per block.
        vocab_parts = [
            (v, end, None if ids is None else ids.to(device))
            for v, end, ids in vocab_blocks(exclude.cpu(), block_vocab)
        ]
        x = lens_directions(model, directions).to(dtype)
        top = torch.full((m, k), -torch.inf, dtype=torch.float32, device=device)
        bottom = torch.full_like(top, torch.inf)
        top_ids = torch.full((m, k), -1, dtype=torch.int64, device=device)
        bottom_ids = top_ids.clone()
        # The vocabulary outside, so that each block of W_U is cast (or gathered) once, not
        # once per block of latents.
        for v, end, ids in vocab_parts:
            rows = (w_u[v:end] if ids is None else w_u[ids]).to(dtype)
            for a in range(0, m, block_latents):
                s = slice(a, a + block_latents)
                # in the product's dtype: top-k picks the same values as after a cast to
                # float32 (which would cost a pass over every logit), then casts only those
                logits = x[s] @ rows.T
                (hi, hi_at), (lo, lo_at) = _block_ends(logits, min(k, logits.shape[1]))
                hi_ids, lo_ids = (hi_at + v, lo_at + v) if ids is None else (ids[hi_at], ids[lo_at])
                top[s], top_ids[s] = _merge(top[s], top_ids[s], hi, hi_ids, k, largest=True)
                bottom[s], bottom_ids[s] = _merge(
                    bottom[s], bottom_ids[s], lo, lo_ids, k, largest=False
                )
        result = [t.cpu() for t in (top_ids, top, bottom_ids, bottom)]
    # Cloned outside inference mode: plain tensors, which callers may modify in place.
    return LensResult(*(t.clone() for t in result))


def token_strings(tokenizer: Any, ids: Tensor | Sequence[Any]) -> list[Any]:
    """The decoded string of each id, nested like `ids` (a [m, k] tensor gives m lists of k
    strings): tokenizer.decode([id]) with special tokens shown and spaces kept; "" for ids
    the tokenizer does not know."""
    t = torch.as_tensor(ids, dtype=torch.int64).cpu()
    shape = (1,) if t.ndim == 0 else tuple(t.shape)
    strings = _decode_each(tokenizer, t.reshape(-1).tolist())
    return np.array(strings, dtype=object).reshape(shape).tolist()
