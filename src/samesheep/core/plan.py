"""What a run computes: its models and their untrained copies, the SAEs (main, floor,
ceiling), and the pairs of models it compares."""

from __future__ import annotations

from dataclasses import dataclass

from .config import Config
from .constants import ARCHITECTURES, RANDOM_PREFIX
from .errors import SamesheepError
from .rundir import MAIN_SAE


@dataclass(frozen=True)
class SaeRun:
    """One SAE the run trains: the model it reads, its folder name, its seed, whether its
    evaluation splices it into the model (the floors' and ceilings' SAEs are not)."""

    source: str
    sae_name: str
    seed: int
    spliced: bool
    architecture: str = ""
    """Its architecture where it is not train.architecture (a ceiling's, by setting)."""

    @property
    def main(self) -> bool:
        return is_main(self.source, self.sae_name)

    @property
    def label(self) -> str:
        """How log lines name it: the model, and the SAE's folder where it is not the main."""
        return self.source if self.sae_name == MAIN_SAE else f"{self.source} ({self.sae_name})"


def is_main(source: str, sae_name: str) -> bool:
    """Whether an SAE is a model's main one (not a floor's untrained copy, not a ceiling's
    second seed): the one the features stage describes and a comparison reads features of."""
    return sae_name == MAIN_SAE and not source.startswith(RANDOM_PREFIX)


def comparing(cfg: Config) -> bool:
    """Whether the run compares models (two or more, and SAEs trained here)."""
    return len(cfg.models) >= 2 and not cfg.train.pretrained


def sampling_layers(cfg: Config) -> bool:
    """Whether the run compares every layer pair on a held-out sample (two or more models)."""
    return cfg.representations.enabled and len(cfg.models) >= 2


def random_copy(source: str) -> str:
    """The source of a model's untrained copy."""
    return source if source.startswith(RANDOM_PREFIX) else RANDOM_PREFIX + source


def ceiling_architecture(cfg: Config) -> str:
    """The ceiling SAEs' architecture (compare.ceiling_architecture, or train's), checked."""
    arch = cfg.compare.ceiling_architecture or cfg.train.architecture
    if arch not in ARCHITECTURES:
        raise SamesheepError(
            f"unknown SAE architecture {arch!r} in compare.ceiling_architecture "
            f"(use {', '.join(ARCHITECTURES)})"
        )
    return arch


def ceiling_name(cfg: Config) -> str:
    """The ceiling SAEs' folder: sae-seed<N>, with the architecture where it is another."""
    arch = ceiling_architecture(cfg)
    name = f"{MAIN_SAE}-seed{cfg.train.seed + 1}"
    return name if arch == cfg.train.architecture else f"{name}-{arch}"


def sae_runs(cfg: Config) -> list[SaeRun]:
    """Every SAE of the run: one per model, and where models are compared, one per model's
    random-weights copy (the floor) and a second seed per model (the ceiling)."""
    seed = cfg.train.seed
    runs = [SaeRun(m, MAIN_SAE, seed, True) for m in cfg.models]
    if comparing(cfg) and cfg.compare.floor:
        runs += [
            SaeRun(random_copy(m), MAIN_SAE, seed, False)
            for m in cfg.models
            if random_copy(m) not in cfg.models
        ]
    if comparing(cfg) and cfg.compare.ceiling:
        arch = ceiling_architecture(cfg)
        runs += [SaeRun(m, ceiling_name(cfg), seed + 1, False, arch) for m in cfg.models]
    return runs


def run_sources(cfg: Config) -> list[str]:
    """Every model source the run extracts (the models, and their random copies)."""
    return list(dict.fromkeys(r.source for r in sae_runs(cfg)))


def compare_pairs(cfg: Config) -> list[tuple[str, str]]:
    """The pairs of models to compare: compare.pairs ("A:B"), else every pair of models."""
    if not cfg.compare.pairs:
        return [(a, b) for i, a in enumerate(cfg.models) for b in cfg.models[i + 1 :]]
    out = []
    for item in cfg.compare.pairs:
        a, sep, b = item.rpartition(":") if item.count(":") > 1 else item.partition(":")
        if not sep or a not in cfg.models or b not in cfg.models or a == b:
            raise SamesheepError(
                f"compare pair {item!r} must name two different models of the run as A:B "
                f"(models: {', '.join(cfg.models)})"
            )
        out.append((a, b))
    return out
