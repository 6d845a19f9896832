"""GGUF conversion cache: the first load of each preset (assemble, dequantize, convert the
tokenizer, save) against a second load from the cache, in one run, in a fresh cache folder.

Usage: python benchmarks/load_cache.py [--models gemma-3-270m smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch


def child(source: str) -> None:
    from samesheep.lm.models import load_model

    t = time.perf_counter()
    load_model(source, torch.bfloat16)
    print(f"{time.perf_counter() - t:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["gemma-3-270m", "smollm2-135m-instruct"])
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child)
    from samesheep.core.device import cpu_model

    print(f"CPU: {cpu_model()}  torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "SAMESHEEP_CACHE": cache}
        for source in args.models:
            times = []
            for _ in range(2):  # a fresh process each time: nothing kept in memory
                out = subprocess.run(
                    [sys.executable, __file__, "--child", source],
                    capture_output=True,
                    text=True,
                    env=env,
                    check=True,
                )
                times.append(float(out.stdout.strip().splitlines()[-1]))
            first, second = times
            print(
                f"{source}: first load {first:6.1f} s (converts), second {second:5.1f} s"
                f" from the cache = {second / first:.1%} of the first"
            )


if __name__ == "__main__":
    main()
