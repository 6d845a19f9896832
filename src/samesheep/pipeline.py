"""The stages in order, and `run`: each stage reads the files the stages before it wrote in
the run directory (see core/rundir.py) and writes its own."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from .causal.stage import causal_stage
from .compare.crosscode import crosscode_stage
from .compare.stage import compare_stage, dictionaries_stage
from .core.config import Config, to_toml
from .core.errors import SamesheepError
from .core.files import pid_temporary, write_json
from .core.plan import sampling_layers
from .core.progress import say
from .core.rundir import run_path, timings_file
from .features.stage import features_stage
from .interpret.stage import interpret_stage
from .layers.stage import layers_stage
from .lm.stage import corpus_stage, extract_stage
from .report.build import report_stage
from .sae.stage import train_stage

__all__ = [
    "STAGES",
    "causal_stage",
    "compare_stage",
    "corpus_stage",
    "crosscode_stage",
    "dictionaries_stage",
    "extract_stage",
    "features_stage",
    "interpret_if_enabled",
    "interpret_stage",
    "layers_stage",
    "report_stage",
    "run",
    "train_stage",
]


def interpret_if_enabled(cfg: Config) -> dict[Any, dict[str, Any]]:
    """The interpret stage where interpret.enabled is set (off by default: it loads or
    calls a language model)."""
    if not cfg.interpret.enabled:
        say("interpret: off (set interpret.enabled = true, or run `samesheep interpret`)")
        return {}
    return interpret_stage(cfg)


STAGES: dict[str, Callable[[Config], Any]] = {
    "extract": extract_stage,
    "train": train_stage,
    "features": features_stage,
    "compare": compare_stage,
    "layers": layers_stage,
    "interpret": interpret_if_enabled,
    "report": report_stage,
}
"""What `samesheep run` runs, in this order."""


def run(cfg: Config) -> dict[str, Any]:
    """Run every stage in order; print (and keep in timings.json, written after each stage,
    so the report shows the stages before it) each stage's time."""
    results, seconds = {}, {}
    timings = timings_file(run_path(cfg))
    beside: BesideProcess | None = None
    try:
        for name, stage in STAGES.items():
            start = time.perf_counter()
            if name == "features" and sampling_layers(cfg) and cfg.representations.beside:
                # The layers stage needs only the layer samples, and features and compare
                # leave a core mostly idle: it runs in a second process beside them.
                beside = BesideProcess("layers", cfg)
            if name == "layers" and beside is not None:
                beside.wait()  # then the stage below finds its work done, and reads it
            results[name] = stage(cfg)
            seconds[name] = round(time.perf_counter() - start, 1)
            write_json(timings, {"seconds": seconds, "total": round(sum(seconds.values()), 1)})
    finally:
        if beside is not None:
            beside.stop()
    total = sum(seconds.values())
    say(
        "stage times: "
        + ", ".join(f"{k} {_minutes(v)}" for k, v in seconds.items())
        + f"; total {_minutes(total)}"
    )
    return results


class BesideProcess:
    """A stage run by `samesheep <stage>` in a second process (its numpy on one thread)
    while this one goes on: its lines are relayed to stderr as they come, and its one-line
    error, if it fails, is raised here by wait()."""

    def __init__(self, stage: str, cfg: Config) -> None:
        self.stage = stage
        self.error = ""
        run = run_path(cfg)
        run.mkdir(parents=True, exist_ok=True)
        # named with this process's id: a later run removes it if this one is killed
        self.config = pid_temporary(run, f"{stage}.toml")
        self.config.write_text(to_toml(cfg, comments=False), encoding="utf-8")
        one = {k: "1" for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "samesheep", stage, "--config", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **one},
        )
        self.relay = threading.Thread(target=self._relay, daemon=True)
        self.relay.start()

    def _relay(self) -> None:
        for line in self.process.stderr:
            line = line.rstrip("\n")
            if line.startswith("samesheep: error: "):
                self.error = line.removeprefix("samesheep: error: ")
            elif line.strip():
                say(line)

    def wait(self) -> None:
        """Wait for it to finish (raising its error where it failed)."""
        code = self.process.wait()
        self.relay.join()
        self.config.unlink(missing_ok=True)
        if code != 0:
            raise SamesheepError(self.error or f"the {self.stage} stage stopped (exit code {code})")

    def stop(self) -> None:
        """End it (where this process stops first) and remove its config file."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.config.unlink(missing_ok=True)


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"
