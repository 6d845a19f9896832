"""What the dictionaries that are not SAEs cost on the default run (run `make demo` first),
and what they find: PCA, FastICA and NMF of both models, of their untrained copies (the
floors) and again with another seed or half of the documents (the ceilings), each run
through the comparison the SAEs go through, timed as `samesheep dictionaries` runs them.

Printed: the CPU and its matmul rates; per method the seconds of the six fits (with the
encoding of every unit) and of the comparison; the fits' total against the issue's target
(<= 2 minutes for both models of the default run); then the table the issue asks for: per
dictionary and direction the share of latents with a partner at r >= 0.5, against its
floor and ceiling, and the normalised score with its interval.

The stage writes into the run (compare/<A>__<B>/dictionaries.json), as `samesheep
dictionaries` does; its done marker is removed first so that it runs whatever was there.

Usage: python benchmarks/dictionary_speed.py [--run runs/default] [--set dictionaries.x=y ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from samesheep.compare.stage import dictionaries_stage, dictionary_lines
from samesheep.core import config as config_mod
from samesheep.core.constants import DICTIONARIES
from samesheep.core.device import machine_lines, set_threads
from samesheep.core.plan import compare_pairs
from samesheep.core.rundir import compare_folder
from samesheep.lm.models import model_depth, resolve_layer

TARGET_S = 120.0
"""The issue's target: the non-SAE dictionaries of both models of the default run in at
most 2 minutes."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/default")
    parser.add_argument("--set", action="append", default=[], help="dictionaries.KEY=VALUE")
    args = parser.parse_args()
    threads = set_threads(0)
    lines, _ = machine_lines(torch.device("cpu"), threads)
    print("\n".join(lines))
    cfg = config_mod.load(Path(args.run) / "config.toml")
    # the stage's defaults and the --set given here, whatever the run's recorded config holds
    cfg = dataclasses.replace(cfg, dictionaries=config_mod.load(None, args.set).dictionaries)
    for a, b in compare_pairs(cfg):
        spec = cfg.layers[0]
        la = resolve_layer(spec, model_depth(a, cfg.trust_remote_code))
        lb = resolve_layer(spec, model_depth(b, cfg.trust_remote_code))
        (compare_folder(cfg, a, b, la, lb) / DICTIONARIES).unlink(missing_ok=True)
    print(f"settings: {cfg.dictionaries}")
    start = time.perf_counter()
    results = dictionaries_stage(cfg)
    seconds = time.perf_counter() - start
    for record in results.values():
        fits = 0.0
        for method, entry in record["methods"].items():
            fit, total = entry["seconds"]["fit"], entry["seconds"]["total"]
            fits += fit
            print(
                f"{method.upper()}: widths {entry['width']}, fitted on {entry['fit_units']:,} "
                f"units; six fits and encodings {fit:.1f} s, comparison {total - fit:.1f} s; "
                f"converged {entry['converged']}"
            )
        print(
            f"fits: {fits:.1f} s for both models, their untrained copies and ceilings "
            f"(target {TARGET_S:.0f} s): {fits / TARGET_S:.2f}x the target; the whole stage "
            f"{seconds:.1f} s over {record['units']:,} units"
        )
        print("\n".join(dictionary_lines(record)))


if __name__ == "__main__":
    main()
