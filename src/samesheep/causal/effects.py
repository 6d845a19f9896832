"""Spliced forward passes and per-unit effects.

An intervention is one latent of one SAE at the compared layer: where the latent fires (at
the positions the token rule keeps), its decoder contribution a_i(x) W_dec[i] is multiplied
by `scale` and added to the residual stream (scale -1 removes it, ablation; the SAE's error
term stays, so a latent that fires nowhere leaves the model as it is). The layer's clean
output is the one the store holds (extraction computed it); every intervention replays it
(blocks 0..layer return it, changed) so only the later blocks run, one batch row per
intervention firing in the window, and the LM head runs only at the positions whose
targets are scored. The clean run takes the same replayed path, so the two differ only by
the intervention.

The effect of an intervention on aligned unit u is the change (intervened minus clean) in
the log-probability of the next unit's text, summed over the model's tokens inside unit
u + 1: the same characters in both models, so effects compare across tokenizers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from ..core.errors import SamesheepError
from ..data.alignment import TokenRows, Units
from ..data.store import SPLITS, Store, TokenFilter
from ..lm.models import LoadedModel, decoder_blocks
from ..sae.evaluation import HEAD_ONLY_TYPES, head_logits, keep_output, replay, with_hidden
from ..sae.model import Sae

HEAD_POSITIONS = 256
"""Scored positions whose logits are computed at once (a 262k vocabulary: 256 MiB)."""
HEAD_BATCH = 2048
"""Scored positions gathered over windows before the LM head runs on them: with a few
positions per window the head would read its whole weight (671 MB for a 262k vocabulary)
for each window."""


@dataclass
class HeldoutTokens:
    """One store's held-out tokens, row for row as stored: their ids, windows and the
    positions the SAE may be spliced in at."""

    rows: TokenRows
    ids: np.ndarray  # [rows] token ids
    window: np.ndarray  # [rows] number of the row's window (0..windows-1)
    bounds: np.ndarray  # [windows + 1] first row of each window, then the end
    keep: np.ndarray  # [rows] bool: the token rule keeps it (the SAE is spliced in there)

    @classmethod
    def of(cls, store: Store, token_filter: TokenFilter) -> HeldoutTokens:
        tables = [store.read_tokens(n) for n in store.shard_names(SPLITS[1])]
        return cls.of_tables(tables, token_filter)

    @classmethod
    def of_tables(cls, tables: list[pa.Table], token_filter: TokenFilter) -> HeldoutTokens:
        keeps = [np.asarray(token_filter.keep(t), dtype=bool) for t in tables]
        rows = TokenRows.of_tables([(t, k, 0) for t, k in zip(tables, keeps, strict=True)])
        ids = np.concatenate([t.column("token_id").to_numpy() for t in tables]).astype(np.int64)
        new = np.ones(len(ids), dtype=bool)
        new[1:] = (rows.doc[1:] != rows.doc[:-1]) | (rows.window[1:] != rows.window[:-1])
        window = np.cumsum(new) - 1
        bounds = np.append(np.flatnonzero(new), len(ids))
        return cls(rows, ids, window, bounds, np.concatenate(keeps) if keeps else new[:0])

    @property
    def windows(self) -> int:
        return len(self.bounds) - 1


@dataclass
class NextUnits:
    """Which units have a next unit to score, and the model's tokens that spell it."""

    valid: np.ndarray  # [units] bool: unit u + 1 follows u directly, in one window per model
    targets: list[np.ndarray]  # per model: [targets] store rows of the scored tokens
    target_unit: list[np.ndarray]  # per model: [targets] the unit u whose effect they add to


def next_units(units: Units, tokens: tuple[HeldoutTokens, HeldoutTokens]) -> NextUnits:
    """Unit u is scored where unit u + 1 starts where u ends (same document, nothing left
    out between them) and, in each model, the tokens of u + 1 lie in one window after its
    first position (so each is predicted from the same window's text)."""
    n = len(units)
    valid = np.zeros(n, dtype=bool)
    if n > 1:
        valid[:-1] = (units.doc[1:] == units.doc[:-1]) & (units.start[1:] == units.end[:-1])
    spans = []
    for name, t in zip(("a", "b"), tokens, strict=True):
        first = getattr(units, f"first_{name}")
        last = getattr(units, f"row_{name}")
        ok = np.zeros(n, dtype=bool)
        nxt_first, nxt_last = first[1:], last[1:]
        ok[:-1] = (t.window[nxt_first] == t.window[nxt_last]) & (
            nxt_first > t.bounds[t.window[nxt_first]]
        )
        valid &= ok
        spans.append((first, last))
    targets, target_unit = [], []
    for first, last in spans:
        u = np.flatnonzero(valid)
        counts = last[u + 1] - first[u + 1] + 1
        rows = (
            np.concatenate([np.arange(f, f + c) for f, c in zip(first[u + 1], counts, strict=True)])
            if len(u)
            else np.zeros(0, dtype=np.int64)
        )
        targets.append(rows.astype(np.int64))
        target_unit.append(np.repeat(u, counts).astype(np.int64))
    return NextUnits(valid, targets, target_unit)


@dataclass(frozen=True)
class Intervention:
    """One latent of one of the model's SAEs (by its folder name)."""

    sae: str
    latent: int


@dataclass
class ModelRun:
    """One model's side of the causal check: the model, its SAEs at the compared layer, its
    held-out tokens, and how its forward passes are batched."""

    lm: LoadedModel
    layer: int
    saes: dict[str, Sae]
    tokens: HeldoutTokens
    batch_tokens: int = 2048
    scale: float = -1.0
    """The multiple of the latent's contribution added where it fires (-1: ablation)."""
    states: list[Tensor] = field(default_factory=list)
    """The layer's clean output of each window [positions, d] (stored_states fills it)."""
    template: Any = None
    """One output of block `layer` as the block returns it (its structure, for replay)."""

    @property
    def device(self) -> torch.device:
        return next(self.lm.model.parameters()).device


@torch.inference_mode()
def stored_states(run: ModelRun, acts: Tensor, pad: int) -> None:
    """Fill run.states with every held-out window's clean output of block `layer` from
    `acts` [held-out rows, d], as the store holds them (the extraction's forward pass, in
    the store's dtype: no pass is run again), and run.template with one output of the block
    (a one-token forward pass)."""
    t, device = run.tokens, run.device
    if acts.shape[0] != len(t.ids):
        raise SamesheepError("the held-out activations and tokens disagree (a damaged store?)")
    dtype = next(run.lm.model.parameters()).dtype
    sizes = np.diff(t.bounds).tolist()
    run.states = [s.to(device, dtype) for s in acts.split(sizes)]
    outputs: list[Any] = []
    handle = keep_output(decoder_blocks(run.lm.model)[run.layer], outputs)
    try:
        run.lm.model.base_model(input_ids=torch.tensor([[pad]], device=device), use_cache=False)
    finally:
        handle.remove()
    run.template = outputs[0]


@torch.inference_mode()
def latent_acts(run: ModelRun, wanted: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{SAE: [held-out rows, len(latents)] float32}: each wanted latent's activation on
    every held-out row the token rule keeps (0 elsewhere), from run.states."""
    t = run.tokens
    kept = np.flatnonzero(t.keep)
    h = torch.cat(run.states)[torch.from_numpy(kept)]
    out = {}
    for name, latents in wanted.items():
        sae = run.saes[name]
        column = torch.full((sae.cfg.d_sae,), -1, dtype=torch.long)
        column[torch.from_numpy(latents)] = torch.arange(len(latents))
        acts = torch.zeros((len(t.ids), len(latents)), dtype=torch.float32)
        codes = sae.encode_sparse(h.to(sae.W_dec.device, torch.float32))
        col = column[codes.latents.cpu()]
        on = (col >= 0) & (codes.values.cpu() > 0)
        rows = torch.from_numpy(kept)[codes.rows().cpu()[on]]
        acts[rows, col[on]] = codes.values.cpu()[on].float()
        out[name] = acts.numpy()
    return out


@dataclass
class Job:
    """One intervention's work in one window: the scored target rows (store rows)."""

    what: Intervention
    acts: np.ndarray  # [window positions] its activation (0 where it does not fire)
    targets: np.ndarray  # store rows of the window whose log-probabilities are scored


def scored_finals(
    run: ModelRun, ids: Tensor, hidden_rows: Tensor, score: Tensor
) -> tuple[Tensor, Tensor, bool]:
    """(values [scored positions, ...], next tokens [scored positions], whether the values
    still need the LM head) of one batch of rows, with the layer's output replaced by
    hidden_rows [rows, positions, d] (blocks 0..layer replay it). The values are the final
    hidden states where the model type allows the head at chosen positions
    (HEAD_ONLY_TYPES), else the scored positions' log-probabilities of their next token.
    ids [rows, positions + 1]: the input, then one more token, the last position's target."""
    model = run.lm.model
    blocks = list(decoder_blocks(model)[: run.layer + 1])
    out = with_hidden(run.template, hidden_rows)
    targets = ids[:, 1:][score]
    ids = ids[:, :-1]
    with replay(blocks, [out] * len(blocks)):
        if model.config.model_type in HEAD_ONLY_TYPES:
            final = model.base_model(input_ids=ids, use_cache=False).last_hidden_state[score]
            return final, targets, True
        logits = model(input_ids=ids, use_cache=False).logits[score]
    return next_token_logprobs(logits, targets, lambda x: x), targets, False


def next_token_logprobs(
    finals: Tensor, targets: Tensor, head: Callable[[Tensor], Tensor]
) -> Tensor:
    """[positions] log-probability of each target token from its position's logits,
    head(finals), HEAD_POSITIONS at a time, in float32."""
    parts = []
    for lo in range(0, finals.shape[0], HEAD_POSITIONS):
        logits = head(finals[lo : lo + HEAD_POSITIONS]).float()
        t = targets[lo : lo + HEAD_POSITIONS, None]
        parts.append(logits.gather(1, t)[:, 0] - logits.logsumexp(-1))
    return torch.cat(parts) if parts else torch.zeros(0, device=finals.device)


def changed_targets(job: Job, lo: int) -> np.ndarray:
    """[targets] bool: the job's targets (store rows; the window starts at row lo) that its
    intervention can change: those predicted at or after the first position where the
    latent fires (causal attention: nothing before it changes, so the rest read 0)."""
    on = np.flatnonzero(job.acts > 0)
    if not len(on):
        return np.zeros(len(job.targets), dtype=bool)
    return job.targets - lo - 1 >= on[0]


@dataclass
class WindowPass:
    """One window's forward passes up to the LM head: the clean row's and each job's scored
    positions (values as scored_finals gives them), clean first, then the jobs in `order`."""

    jobs: list[Job]
    changed: list[np.ndarray]  # per job: the targets it can change (changed_targets)
    every: np.ndarray  # the clean row's targets: every changed target of the window
    order: list[int]  # the jobs run, in the order of their rows
    values: list[Tensor] = field(default_factory=list)  # per batch of rows
    targets: list[Tensor] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)  # scored positions per row
    needs_head: bool = True

    @property
    def positions(self) -> int:
        return sum(self.sizes)


@torch.inference_mode()
def window_pass(run: ModelRun, w: int, jobs: list[Job]) -> WindowPass:
    """The forward passes of one window's jobs and its clean row, up to the LM head. Targets
    predicted before the first position where the latent fires are not run (they read 0).
    Rows run in batches of similar length, each cut after the last position a row of the
    batch scores (later positions change nothing before them)."""
    t, device = run.tokens, run.device
    lo = int(t.bounds[w])
    changed = [changed_targets(j, lo) for j in jobs]
    live = [k for k in range(len(jobs)) if changed[k].any()]
    if not live:
        return WindowPass(jobs, changed, np.zeros(0, dtype=np.int64), [])
    every = np.unique(np.concatenate([jobs[k].targets[changed[k]] for k in live]))
    order = sorted(live, key=lambda k: -int(jobs[k].targets[changed[k]].max()))
    out = WindowPass(jobs, changed, every, order)
    h_all = run.states[w]
    ids_all = torch.from_numpy(t.ids[lo : int(t.bounds[w + 1])]).to(device)
    rows = [(every, None)] + [(jobs[k].targets[changed[k]], jobs[k]) for k in order]
    c = 0
    while c < len(rows):
        end = int(rows[c][0].max()) - lo  # rows are sorted by their last target
        chunk = rows[c : c + max(1, run.batch_tokens // max(end, 1))]
        c += len(chunk)
        h = h_all[:end].to(device)
        score = torch.zeros((len(chunk), end), dtype=torch.bool, device=device)
        hidden = h.expand(len(chunk), -1, -1).clone()
        for r, (targets, job) in enumerate(chunk):
            score[r, torch.from_numpy(targets - lo - 1).to(device)] = True
            if job is not None:
                a = torch.from_numpy(job.acts[:end]).to(device, torch.float32)
                sae = run.saes[job.what.sae]
                direction = sae.W_dec[job.what.latent].float() / sae.cfg.input_scale
                hidden[r] += (run.scale * a[:, None] * direction[None, :]).to(h.dtype)
        ids_rows = ids_all[: end + 1].expand(len(chunk), -1)  # inputs, then the last target
        values, targets, out.needs_head = scored_finals(run, ids_rows, hidden, score)
        out.values.append(values)
        out.targets.append(targets)
        out.sizes += score.sum(1).tolist()
    return out


@torch.inference_mode()
def pass_effects(run: ModelRun, passes: list[WindowPass]) -> list[list[np.ndarray]]:
    """Per pass, per job, the change in log-probability of each of its target rows
    (intervened minus clean), in the order of job.targets. The LM head runs once over the
    scored positions of every pass (its weight is read once, not once per window)."""
    values = [v for p in passes for v in p.values]
    if values:
        targets = torch.cat([t for p in passes for t in p.targets])
        if passes[0].needs_head:
            head: Callable[[Tensor], Tensor] = lambda x: head_logits(run.lm.model, x)  # noqa: E731
            lp = next_token_logprobs(torch.cat(values), targets, head)
        else:
            lp = torch.cat(values)
        per_row = lp.float().cpu().split([n for p in passes for n in p.sizes])
    else:
        per_row = ()
    out = []
    it = iter(per_row)
    for p in passes:
        effects = [np.zeros(len(j.targets)) for j in p.jobs]
        if p.order:
            clean = dict(zip(p.every.tolist(), next(it).tolist(), strict=True))
            for k in p.order:
                job_lp = next(it)
                targets = p.jobs[k].targets[p.changed[k]]
                base = np.array([clean[r] for r in targets.tolist()], dtype=np.float64)
                effects[k][p.changed[k]] = job_lp.double().numpy() - base
        out.append(effects)
    return out


def window_effects(run: ModelRun, w: int, jobs: list[Job]) -> list[np.ndarray]:
    """Per job, the change in log-probability of each of its target rows (intervened minus
    clean), in the order of job.targets; the clean run goes through the same replayed path,
    so an intervention that changes nothing reads 0."""
    return pass_effects(run, [window_pass(run, w, jobs)])[0]
