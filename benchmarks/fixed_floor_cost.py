"""What the fixed-source floors, surface scores and cross-fitting cost the compare stage, on
the default run's real codes (run `make demo` first), measured in one run.

before  the measurements the compare stage ran until issue 33: the trained pair and the two
        untrained copies' SAEs matched to each other (both with the view beyond the unit's
        text), each model against its second seed, the two nulls and the held-out check,
        then the headline table;
after   the compare stage's run_pair and headline_table as they are now: the same plus A's
        latents against B's untrained copy and B's against A's (the fixed-source floors),
        each SAE against its own untrained copy (the surface scores), the halves of the
        cross-fitting inside every scale measurement, their jackknife intervals and the
        surface/rest split.
Printed: the CPU and its matmul rates, both times, the difference (the issue's budget: at
most 60 s added to the default run) and the ratio.

Usage: python benchmarks/fixed_floor_cost.py [--run runs/default]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from samesheep.compare.measurement import (
    across_documents,
    document_groups,
    measure,
    shifted_within_documents,
)
from samesheep.compare.pair import (
    PairInputs,
    _side_matrix,
    common_units,
    headline_table,
    run_pair,
    settings_of,
)
from samesheep.compare.stage import SideReader, compare_corpus
from samesheep.core import config as config_mod
from samesheep.core.device import choose_device, choose_dtype, machine_lines, set_threads
from samesheep.core.plan import ceiling_name, compare_pairs, random_copy
from samesheep.data.alignment import unit_texts
from samesheep.lm.models import model_depth, resolve_layer


def load_inputs(run: Path) -> tuple[PairInputs, object]:
    """The default run's first pair, as the compare stage reads it."""
    cfg = config_mod.load(run / "config.toml")
    a, b = compare_pairs(cfg)[0]
    info, texts, n_train = compare_corpus(run)
    device = choose_device(cfg.features.device)
    reader = SideReader(cfg, device, choose_dtype(cfg.features.dtype, device), n_train, info)
    spec = cfg.layers[0]
    la = resolve_layer(spec, model_depth(a, cfg.trust_remote_code))
    lb = resolve_layer(spec, model_depth(b, cfg.trust_remote_code))

    def side(source: str, layer: int, name: str = "sae"):
        return reader.load(source, layer, name)[0]

    floor = (side(random_copy(a), la), side(random_copy(b), lb))
    ceiling = (side(a, la, ceiling_name(cfg)), side(b, lb, ceiling_name(cfg)))
    inp = PairInputs(side(a, la), side(b, lb), floor, ceiling, texts, n_train)
    return inp, cfg


def before(inp: PairInputs, cfg) -> float:
    """Seconds of the measurements the stage ran before issue 33, and their headline."""
    start = time.perf_counter()
    s = settings_of(cfg.compare)
    units = common_units(inp, cfg.compare)
    text, _ = unit_texts(units, inp.texts)
    groups = document_groups(units, cfg.compare.groups, cfg.compare.seed)
    how = cfg.compare.unit_value
    a, b = _side_matrix(inp.a, units, "a", how), _side_matrix(inp.b, units, "b", how)
    fa, fb = (_side_matrix(x, units, w, how) for x, w in zip(inp.floor, "ab", strict=True))
    ca, cb = (_side_matrix(x, units, w, how) for x, w in zip(inp.ceiling, "ab", strict=True))
    runs = {
        "raw": measure(a, b, text, groups, s),
        "untrained_pair": measure(fa, fb, text, groups, s),
        "ceiling_a": measure(a, ca, text, groups, s),
        "ceiling_b": measure(b, cb, text, groups, s),
    }
    perm = shifted_within_documents(units, cfg.compare.seed)
    runs["null"] = measure(a, b[perm], None, groups, s)
    ra, rb = across_documents(units, seed=cfg.compare.seed)
    runs["across"] = measure(a[ra], b[rb], None, groups[ra], s)
    heldout = np.flatnonzero(units.doc >= inp.n_train_docs)
    runs["heldout"] = measure(a[heldout], b[heldout], None, groups[heldout], s)
    headline_table(runs, s, len(np.unique(units.doc)))
    return time.perf_counter() - start


def after(inp: PairInputs, cfg) -> float:
    """Seconds of the compare stage's measurements and headline as they are now."""
    start = time.perf_counter()
    result = run_pair(inp, cfg.compare)
    headline_table(result["runs"], result["settings"], len(np.unique(result["units"].doc)))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/default")
    args = parser.parse_args()
    threads = set_threads(0)
    lines, _ = machine_lines(torch.device("cpu"), threads)
    print("\n".join(lines))
    inp, cfg = load_inputs(Path(args.run))
    t_before = before(inp, cfg)
    t_after = after(inp, cfg)
    print(f"compare {inp.a.model} / {inp.b.model}: {inp.a.d_sae:,} x {inp.b.d_sae:,} latents")
    print(f"before (trained, untrained pair, ceilings, nulls):  {t_before:6.1f} s")
    print(f"after  (+ fixed-source floors, surface, crossfit):  {t_after:6.1f} s")
    print(
        f"added {t_after - t_before:+.1f} s (budget: at most +60 s); "
        f"after / before = {t_after / t_before:.2f}x"
    )


if __name__ == "__main__":
    main()
