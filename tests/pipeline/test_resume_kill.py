"""`samesheep run` killed (SIGKILL, whole process group) inside each stage, then run again:
the resumed run ends with exactly the files an uninterrupted run writes, the work finished
before the kill is skipped (said so, and its files untouched), and no temporary file is
left behind. Then finished work damaged on disk: the next run redoes it, or refuses in one
line naming the file.

Everything goes through the CLI (`python -m samesheep run`) and the files on disk, and
outputs are compared with scripts/same_outputs.py, so the test holds whatever module
layout the package has. Set RESUME_KILL_SEEDS (e.g. 1,2,3) to draw other kill moments."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import flat, load_same_outputs, sets, write_corpus

STAGES = ("extract", "train", "features", "compare", "layers", "report")
ORDER = ("extract", "train", "features", "compare", "layers", "interpret", "report")
"""The stages as `run` records them in timings.json (interpret is off here)."""
FAST = {
    "compare.min_fires": "5",
    "compare.groups": "5",
    "compare.geometry_pairings": "10",
    "representations.permutations": "4",
    "representations.subsets": "20",
    # a checkpoint after every step: a kill inside training resumes part-way, not from zero
    "train.checkpoint_seconds": "0",
}
RESUMED_KEYS = frozenset({"resumed"})
"""JSON keys that may differ in a resumed run: the training summary records that it
resumed from a checkpoint (a record of the run's history, not of its output)."""
RUN_TIMEOUT_S = 300
SEEDS = [int(x) for x in os.environ.get("RESUME_KILL_SEEDS", "0").split(",")]
"""Seeds of the kill moments (RESUME_KILL_SEEDS=1,2,3 draws others, each a test case)."""


same_outputs = load_same_outputs()


# ---------------------------------------------------------------- running the CLI


def command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "samesheep", "run", *args]


def cli_env(env: dict[str, str]) -> dict[str, str]:
    full = {**os.environ, "HF_HUB_OFFLINE": "1", **env}
    assert full.get("SAMESHEEP_CACHE"), "tests must never write to the user's cache"
    return full


def run_to_end(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        command(args), capture_output=True, text=True, env=cli_env(env), timeout=RUN_TIMEOUT_S
    )


class Watched:
    """`samesheep run` in its own process group (the layers stage's second process with
    it), its stderr lines collected with the time each arrived."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.lines: list[tuple[float, str]] = []
        self.changed = threading.Condition()
        self.start = time.monotonic()
        self.proc = subprocess.Popen(
            command(args),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(env),
            start_new_session=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            with self.changed:
                self.lines.append((time.monotonic() - self.start, line.rstrip("\n")))
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def wait_for(self, pattern: re.Pattern, timeout: float = RUN_TIMEOUT_S) -> float | None:
        """Time of the first line matching pattern (None if the process ended without one)."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                hit = next((t for t, line in self.lines if pattern.search(line)), None)
                if hit is not None:
                    return hit
                if not self.reader.is_alive():
                    return None
                assert time.monotonic() < deadline, "no such line in time:\n" + self.text()
                self.changed.wait(0.5)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):  # where it had already ended
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.finish()

    def finish(self) -> int:
        code = self.proc.wait(timeout=RUN_TIMEOUT_S)
        self.reader.join(timeout=30)
        return code

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


# ---------------------------------------------------------------- what a run is made of


BEGINS = {
    # the first line each stage prints (the layers stage starts, in a second process,
    # together with the features stage)
    "extract": re.compile(r": layer sample of \d+ layers"),
    "train": re.compile(r" layer \d+: started$"),
    "features": re.compile(r"^embed \d+ documents: started$| layer \d+ features: started$"),
    "compare": re.compile(r" layer \d+ codes( \(.+\))?: started$|^compare .*: started$"),
    "layers": re.compile(r"^embed \d+ documents: started$| layer \d+ features: started$"),
    "report": re.compile(r"^report: .*: started$"),
}
ENDS = {
    # where each stage's work is over (the next stage's first line, or its last line)
    "extract": BEGINS["train"],
    "train": BEGINS["features"],
    "features": BEGINS["compare"],
    "compare": re.compile(r"^layers .*: unchanged, skipped$|^interpret: "),
    "layers": re.compile(r"^layers .+ / .+: \d+ of \d+ layer pairs"),
    "report": re.compile(r"^stage times: "),
}


@dataclass
class Piece:
    """One unit of work that marks itself done on disk: once done, a rerun must say it
    skips it (`says`, each line present), print none of its work lines (`redo`), and leave
    its files (`owns`) as they were."""

    name: str
    stage: str
    done: Callable[[Path], bool]
    owns: Callable[[str], bool]
    says: list[str] = field(default_factory=list)
    redo: list[re.Pattern] = field(default_factory=list)


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def pieces_of(models: list[str], layer: int = 1) -> list[Piece]:
    """Every piece of work of a `run` of these models (with their untrained copies as the
    floor and a second seed as the ceiling: the defaults) at one layer."""
    folder = {m: Path(m).name for m in models}
    randoms = [f"random:{m}" for m in models]
    folder.update({f"random:{m}": f"random-{Path(m).name}" for m in models})
    a, b = models
    pair = f"compare/{folder[a]}__{folder[b]}/"
    L = f"layer_{layer}"
    out = [
        Piece(
            "corpus",
            "extract",
            lambda run: (run / "corpus" / "manifest.json").is_file(),
            lambda rel: rel.startswith("corpus/") and not rel.startswith("corpus/embeddings"),
        )
    ]

    def extracted(f: str) -> Callable[[Path], bool]:
        return lambda run: bool((_json(run / f / "extract.json") or {}).get("complete"))

    for s in [*models, *randoms]:
        f = folder[s]
        out.append(
            Piece(
                f"extract {f}",
                "extract",
                extracted(f),
                lambda rel, f=f: (
                    rel == f"{f}/extract.json"
                    or rel.startswith((f"{f}/layer_sample/", f"{f}/{L}/acts/"))
                ),
                says=[f"{s}: layer sample unchanged, skipped", f"{s}: layers [{layer}] unchanged"],
                redo=[re.compile(rf"^{re.escape(s)} (train|heldout): started")],
            )
        )
    for s, sae in [*((m, "sae") for m in [*models, *randoms]), *((m, "sae-seed1") for m in models)]:
        f = folder[s]
        work = "train" if sae == "sae" else f"train-{sae}"
        label = f"{s} layer {layer}" + ("" if sae == "sae" else f" ({sae})")

        def trained(run: Path, f=f, sae=sae, work=work) -> bool:
            state = _json(run / f / L / work / "state.json") or {}
            return bool(state.get("complete")) and (run / f / L / sae / "metrics.json").is_file()

        out.append(
            Piece(
                f"train {f} {sae}",
                "train",
                trained,
                lambda rel, f=f, sae=sae, work=work: rel.startswith(
                    (f"{f}/{L}/{sae}/", f"{f}/{L}/{work}/")
                ),
                redo=[
                    re.compile(rf"^{re.escape(label)}: (started|trained|held-out reconstruction)")
                ],
            )
        )
    out.append(
        Piece(
            "embeddings",
            "features",
            lambda run: (run / "corpus" / "embeddings.json").is_file(),
            lambda rel: rel.startswith("corpus/embeddings"),
            redo=[re.compile(r"^embed \d+ documents: started")],
        )
    )
    for s in models:
        f = folder[s]
        out.append(
            Piece(
                f"features {f}",
                "features",
                lambda run, f=f: (run / f / L / "features" / "summary.json").is_file(),
                lambda rel, f=f: rel.startswith((f"{f}/{L}/features/", f"{f}/{L}/codes/sae/")),
                says=[f"{s} layer {layer}: features unchanged, skipped"],
                redo=[re.compile(rf"^{re.escape(s)} layer {layer} features: started")],
            )
        )
    out.append(
        Piece(
            "compare",
            "compare",
            lambda run: (run / pair / "summary.json").is_file(),
            lambda rel: (
                (rel.startswith(pair) and not rel.startswith(pair + "layers."))
                or rel.startswith(tuple(f"{folder[r]}/{L}/codes/" for r in randoms))
                or rel.startswith(tuple(f"{folder[m]}/{L}/codes/sae-seed1/" for m in models))
            ),
            says=[f"compare {a} / {b}: unchanged, skipped"],
            redo=[re.compile(r"^compare .*: started$")],
        )
    )
    out.append(
        Piece(
            "layers",
            "layers",
            lambda run: (run / pair / "layers.json").is_file(),
            lambda rel: rel.startswith(pair + "layers."),
            says=[f"layers {a} / {b}: unchanged, skipped"],
            redo=[re.compile(r"^layers .+ / .+: \d+ of \d+ layer pairs")],
        )
    )
    out.append(
        Piece(
            "report",
            "report",
            lambda run: (run / "report" / "manifest.json").is_file(),
            lambda rel: rel.startswith("report/"),
            says=["report unchanged, skipped"],
            redo=[re.compile(r"^report: .*: started$")],
        )
    )
    return out


def files_of(run: Path) -> dict[str, int]:
    """{relative path: mtime_ns} of every file in a run folder, report included."""
    return {
        p.relative_to(run).as_posix(): p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()
    }


def leftovers(run: Path) -> list[str]:
    """Temporary files or folders (ours are ".name.pid.tmp", safetensors' ".tmpXXXX", the
    layers stage's ".layers.XXXX.toml", the report's ".report.pid.tmp") still in a run."""
    return sorted(
        p.relative_to(run).as_posix()
        for p in run.rglob("*")
        if p.name.startswith(".") or p.name.endswith(".tmp")
    )


def compare_runs(got: Path, want: Path) -> list[str]:
    """What differs between a run and the reference: every output (same_outputs.py, the
    "resumed" record aside), and the report's pages (its index names the stage times, and
    its manifest the pages' sizes, so these two compare by the key only)."""
    lines, counts = same_outputs.differences(got, want, same_outputs.Rules(ignore=RESUMED_KEYS))
    assert counts["safetensors"] > 50 and counts["parquet"] > 20, counts
    report_lines, _ = same_outputs.differences(got / "report", want / "report")
    lines += [
        f"report/{line}"
        for line in report_lines
        if not line.startswith(("index.html:", "manifest.json:"))
    ]
    key_got = (_json(got / "report" / "manifest.json") or {}).get("key")
    key_want = (_json(want / "report" / "manifest.json") or {}).get("key")
    if key_got != key_want:
        lines.append(f"report/manifest.json: key {key_got} != {key_want}")
    return lines


# ---------------------------------------------------------------- the reference run


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory, env) -> dict:
    """Two tiny random models of different architectures (Llama, GPT-2, sharing the tiny
    tokenizer, as tests/test_compare_stage.py runs them), one corpus (the store's key hashes
    its path: every run must read this very file), and the uninterrupted reference run, with
    the time each stage began and ended in it."""
    work = tmp_path_factory.mktemp("resume_kill")
    corpus = write_corpus(work / "docs.jsonl", n=60, titles=True)
    models = [str(tiny_models["llama"]), str(tiny_models["gpt2"])]

    def args(run_dir: Path) -> list[str]:
        return sets(run_dir, models[0], corpus, models=json.dumps(models), **FAST)

    ref = work / "reference"
    watched = Watched(args(ref), env)
    code = watched.finish()
    assert code == 0, watched.text()
    times = {}
    for stage in STAGES:
        begin = next(t for t, line in watched.lines if BEGINS[stage].search(line))
        end = next(t for t, line in watched.lines if t >= begin and ENDS[stage].search(line))
        times[stage] = (begin, end)
    print(f"reference run: {watched.lines[-1][0]:.1f} s; stages (begin, end) {times}")
    assert leftovers(ref) == []
    return {
        "args": args,
        "models": models,
        "env": env,
        "reference": ref,
        "times": times,
        "log": watched.text(),
        "pieces": pieces_of(models),
        "work": work,
    }


# ---------------------------------------------------------------- SIGKILL and resume


@pytest.mark.parametrize(
    ("stage", "seed"),
    [(stage, seed) for seed in SEEDS for stage in STAGES],
    ids=[stage if seed == 0 else f"{stage}-seed{seed}" for seed in SEEDS for stage in STAGES],
)
def test_killed_in_a_stage_resumes_to_the_uninterrupted_outputs(setup, stage, seed, tmp_path):
    run_dir = tmp_path / "run"
    args = setup["args"](run_dir)
    begin, end = setup["times"][stage]
    rng = random.Random(f"{stage}:{seed}")
    delay = rng.uniform(0.0, end - begin)  # on a slower or busier machine, maybe after it

    killed = Watched(args, setup["env"])
    began = killed.wait_for(BEGINS[stage])
    if began is not None:
        time.sleep(max(0.0, began + delay - (time.monotonic() - killed.start)))
    killed.kill()
    at = time.monotonic() - killed.start
    timings = _json(run_dir / "timings.json") or {}
    stages_done = sorted(timings.get("seconds", {}), key=ORDER.index)
    done = [p for p in setup["pieces"] if p.done(run_dir)]
    before = files_of(run_dir)
    left = leftovers(run_dir)
    story = (
        f"killed in {stage} (seed {seed}): began at {began} s, killed at {at:.2f} s "
        f"(delay {delay:.3f} s; exit {killed.proc.returncode}); stages done: {stages_done}; "
        f"pieces done: {[p.name for p in done]}; temporaries at the kill: {left}"
    )
    print(story)
    assert began is not None, f"{stage} never began:\n{killed.text()}"

    res = run_to_end(args, setup["env"])
    log = res.stderr.splitlines()
    resumed = sorted(
        p.parent.relative_to(run_dir).as_posix()
        for p in run_dir.glob("*/layer_*/train*/state.json")
        if (_json(p) or {}).get("summary", {}).get("resumed")
    )
    print(f"  resumed run: exit {res.returncode}; training resumed from a checkpoint: {resumed}")
    context = (
        f"{story}\n--- killed run's log:\n{killed.text()}\n--- resumed run's log:\n{res.stderr}"
    )
    assert res.returncode == 0, context
    assert "Traceback" not in res.stderr, context

    differ = compare_runs(run_dir, setup["reference"])
    problems = [f"differs from the uninterrupted run: {d}" for d in differ]
    problems += [f"temporary left behind: {f}" for f in leftovers(run_dir)]
    after = files_of(run_dir)
    for stage_done in stages_done:  # a stage recorded as finished has all its pieces done
        problems += [
            f"{p.name}: not done, yet its stage {stage_done} was recorded as finished"
            for p in setup["pieces"]
            if p.stage == stage_done and p not in done
        ]
    for p in done:
        problems += [
            f"{p.name}: finished before the kill, but not said skipped ({s!r})"
            for s in p.says
            if not any(s in flat(line) for line in log)
        ]
        problems += [
            f"{p.name}: finished before the kill, but redone: {line!r}"
            for line in log
            for pat in p.redo
            if pat.search(line)
        ]
        mine_before = {f: t for f, t in before.items() if p.owns(f)}
        mine_after = {f: t for f, t in after.items() if p.owns(f)}
        touched = sorted(
            f for f in mine_before.keys() & mine_after.keys() if mine_before[f] != mine_after[f]
        )
        added = sorted(mine_after.keys() - mine_before.keys())
        removed = sorted(mine_before.keys() - mine_after.keys())
        problems += [f"{p.name}: finished before the kill, but rewritten: {f}" for f in touched]
        problems += [f"{p.name}: finished before the kill, but new file: {f}" for f in added]
        problems += [f"{p.name}: finished before the kill, but removed: {f}" for f in removed]
    assert not problems, "\n".join(problems) + "\n" + context


# ---------------------------------------------------------------- damaged finished work


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    for i in range(mid - 8, mid + 8):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    # case: (the damaged file, given the two models' folders; what is done to it)
    "acts_shard_truncated": (lambda a, b: f"{a}/layer_1/acts/train-00001.safetensors", _truncate),
    "features_parquet_flipped": (
        lambda a, b: f"{b}/layer_1/features/feature_table.parquet",
        _flip_middle,
    ),
    "compare_summary_truncated": (lambda a, b: f"compare/{a}__{b}/summary.json", _truncate),
}


@pytest.mark.parametrize(
    "case",
    ["acts_shard_truncated", "features_parquet_flipped", "compare_summary_truncated"],
)
def test_damaged_finished_work_is_redone_or_named(setup, case, tmp_path):
    """Damage one finished file of a complete run; the next `run` either redoes that piece
    alone and ends with the uninterrupted run's outputs, or stops with exit code 2 and a
    one-line error naming the file."""
    a, b = (Path(m).name for m in setup["models"])
    where, damage = DAMAGE[case]
    rel = where(a, b)
    run_dir = tmp_path / "run"
    shutil.copytree(setup["reference"], run_dir)
    damage(run_dir / rel)
    before = files_of(run_dir)
    piece = next(p for p in setup["pieces"] if p.owns(rel))

    res = run_to_end(setup["args"](run_dir), setup["env"])
    context = f"damaged {rel}; exit {res.returncode}; log:\n{res.stderr}"
    print(f"{case}: exit {res.returncode}; last line: {res.stderr.splitlines()[-1:]}")
    assert "Traceback" not in res.stderr, context
    if res.returncode == 2:
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("samesheep: error: ")]
        assert errors == lines[-1:], context
        assert rel in errors[0], context  # the file's path in the run folder
        return
    assert res.returncode == 0, context
    differ = compare_runs(run_dir, setup["reference"])
    problems = [f"differs from the uninterrupted run: {d}" for d in differ]
    after = files_of(run_dir)
    problems += [
        f"rewritten outside the damaged piece ({piece.name}): {f}"
        for f, t in before.items()
        if f in after and after[f] != t and not piece.owns(f) and "/" in f
    ]
    problems += [f"temporary left behind: {f}" for f in leftovers(run_dir)]
    assert not problems, "\n".join(problems) + "\n" + context
