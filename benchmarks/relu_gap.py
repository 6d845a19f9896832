"""Where ReLU + L1's reconstruction gap to TopK lies: in which latents fire, or in how much.

On Gemma-3-270m layer 12 and SmolLM2-135M-Instruct layer 20 of the default corpus (the
extraction made by benchmarks/architectures.py), a TopK and a ReLU + L1 SAE are trained at
the default settings (1M tokens, 16x, k = target L0 = 32; kept under
benchmarks/.cache/seed_ceiling, shared with benchmarks/seed_ceiling.py). On the held-out
tokens each is measured four ways:

- FVU: as trained (what the train stage reports);
- refit decoder: the decoder and b_dec refitted by least squares on the training tokens'
  codes (ridge 1e-2 of the mean diagonal), the encoder untouched, so the same latents fire
  with the same values: the best any decoder does with these codes;
- best values: each held-out token's active latents kept, their values fitted by least
  squares to that token (the decoder rows as they are). This uses the token itself, so it is
  no SAE; it measures how good the chosen supports are, apart from the values put on them.

If ReLU's best-values FVU matches TopK's while its FVU does not, its latents fire in the right
places and the gap lies in the values its encoder gives them (L1's shrinkage, and an
encoder fitted to few tokens), not in the dictionary.

With --store PATH (an activation store of one model with at least 1M training tokens, e.g.
the original-study preset's), the same TopK and ReLU pair is trained there too, where the
1M tokens are one pass rather than eight over the default corpus's 121k.

Usage: python benchmarks/relu_gap.py [--run benchmarks/.cache/architectures] [--store PATH]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from seed_ceiling import CACHE, trained

from samesheep.core.config import TrainConfig
from samesheep.core.device import machine_lines, set_threads
from samesheep.data.store import Store, open_store
from samesheep.sae.model import Sae, gather_decode
from samesheep.sae.training import shard_rows, token_filter

MODELS = {"gemma-3-270m": 12, "smollm2-135m-instruct": 20}
RIDGE = 1e-2
CHUNK = 512


def kept_rows(store: Store, cfg: TrainConfig, split: str) -> torch.Tensor:
    tokens = token_filter(store, cfg)
    return torch.cat([shard_rows(store, n, tokens).float() for n in store.shard_names(split)])


def total_variance(xs: torch.Tensor) -> float:
    return float((xs - xs.mean(0)).pow(2).sum())


@torch.inference_mode()
def fvu(sae: Sae, x: torch.Tensor) -> tuple[float, float]:
    """(held-out FVU, L0) of the SAE as it is."""
    xs = sae.scale(x)
    err = active = 0.0
    for c in xs.split(4096):
        f = sae.activate(sae.pre_acts(c))
        err += float((f @ sae.W_dec + sae.b_dec - c).pow(2).sum())
        active += float((f > 0).sum())
    return err / total_variance(xs), active / x.shape[0]


@torch.inference_mode()
def refit_decoder_fvu(sae: Sae, x_train: torch.Tensor, x: torch.Tensor) -> float:
    """Held-out FVU with the decoder and b_dec refitted by ridge least squares on the codes
    of the training tokens (the encoder, and its input, unchanged). The normal equations
    from the sparse codes (a dense product over all latents would cost 100x more)."""
    m = sae.cfg.d_sae
    xs_train = sae.scale(x_train)
    codes = sae.encode_sparse(x_train)
    f = sp.csr_matrix(
        (codes.values.double().numpy(), codes.latents.numpy(), codes.offsets.numpy()),
        shape=(codes.tokens, m),
    )
    f1 = sp.hstack([f, np.ones((codes.tokens, 1))]).tocsr()
    gram = torch.from_numpy((f1.T @ f1).toarray())
    cross = torch.from_numpy(np.asarray(f1.T @ xs_train.double().numpy()))
    gram += torch.eye(m + 1, dtype=torch.float64) * RIDGE * gram.diagonal().mean()
    dec = torch.linalg.solve(gram, cross).float()
    xs = sae.scale(x)
    err = 0.0
    for c in x.split(4096):
        h = sae.encode_sparse(c)
        recon = gather_decode(dec[:m], h.values, h.latents, h.offsets) + dec[m]
        err += float((recon - sae.scale(c)).pow(2).sum())
    return err / total_variance(xs)


@torch.inference_mode()
def best_values_fvu(sae: Sae, x: torch.Tensor) -> float:
    """Held-out FVU with each token's active latents given the least-squares values for that
    token (the same supports and decoder rows)."""
    xs = sae.scale(x)
    err = 0.0
    for c in xs.split(CHUNK):
        f = sae.activate(sae.pre_acts(c))
        n = max(1, int((f > 0).sum(1).max()))
        vals, idx = f.topk(n, dim=1)
        rows = sae.W_dec[idx] * (vals > 0).float()[..., None]  # [tokens, n, d], unused rows 0
        y = (c - sae.b_dec).double()
        rows = rows.double()
        gram = rows @ rows.transpose(1, 2) + 1e-6 * torch.eye(n, dtype=torch.float64)
        a = torch.cholesky_solve((rows @ y[..., None]), torch.linalg.cholesky(gram))
        err += float((y - (a * rows).sum(1)).pow(2).sum())
    return err / total_variance(xs)


def measure(name: str, store: Store, rows: list[list[str]]) -> None:
    x_train = x_held = None
    for arch in ("topk", "relu"):
        cfg = TrainConfig(architecture=arch)
        sae = trained(store, cfg, CACHE / name / f"{arch}-16x-seed0")
        if x_train is None:
            x_train = kept_rows(store, cfg, "train")
            x_held = kept_rows(store, cfg, "heldout")
        f, l0 = fvu(sae, x_held)
        refit = refit_decoder_fvu(sae, x_train, x_held)
        best = best_values_fvu(sae, x_held)
        rows.append([name, arch, f"{f:.4f}", f"{l0:.1f}", f"{refit:.4f}", f"{best:.4f}"])
        print("  ".join(rows[-1]), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="benchmarks/.cache/architectures")
    ap.add_argument("--store", default="", help="a store with >= 1M training tokens")
    args = ap.parse_args()
    threads = set_threads(0)
    lines, _ = machine_lines(torch.device("cpu"), threads)
    print("\n".join(lines))
    rows: list[list[str]] = []
    for model, layer in MODELS.items():
        measure(model, open_store(Path(args.run) / model / f"layer_{layer}" / "acts"), rows)
    if args.store:
        store = open_store(args.store)
        name = "one-pass-" + Path(args.store).parent.parent.name
        measure(name, store, rows)
    print()
    head = ["store", "arch", "FVU", "L0", "refit decoder", "best values"]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        cells = zip(r, widths, strict=True)
        print("  ".join(v.rjust(w) if i > 1 else v.ljust(w) for i, (v, w) in enumerate(cells)))
    print()
    for name in dict.fromkeys(r[0] for r in rows):
        by = {r[1]: r for r in rows if r[0] == name}
        if {"topk", "relu"} <= by.keys():
            t, r = by["topk"], by["relu"]
            print(
                f"{name}: ReLU's FVU is {float(r[2]) / float(t[2]) - 1:+.0%} against TopK's; "
                f"with a refitted decoder {float(r[4]) / float(t[4]) - 1:+.0%}; with the best "
                f"values on the same supports {float(r[5]) / float(t[5]) - 1:+.0%}"
            )


if __name__ == "__main__":
    main()
