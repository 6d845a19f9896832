"""Killed, repeated and changed runs of `samesheep extract`, as real subprocesses on a tiny
model: a SIGKILLed run resumes to exactly what an uninterrupted run writes, an unchanged
rerun touches nothing, and changed settings rebuild the store without stale shards."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from helpers import flat, sets, write_corpus
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

KILL_TIMEOUT_S = 60


# ---------------------------------------------------------------- helpers


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "samesheep", *args]


def cli_env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    assert env.get("SAMESHEEP_CACHE"), "tests must never write to the user's cache"
    return env


def cli(*args: str) -> subprocess.CompletedProcess:
    """Run `python -m samesheep ARGS` offline, with the test's private cache."""
    return subprocess.run(
        command(*args), capture_output=True, text=True, env=cli_env(), timeout=300
    )


def store_of(run_dir: Path, model: Path, layer: int = 1) -> Path:
    return run_dir / model.name / f"layer_{layer}" / "acts"


def read_manifest(store: Path) -> dict | None:
    try:
        return json.loads((store / "manifest.json").read_text())
    except FileNotFoundError:
        return None


def listed(store: Path) -> list[str]:
    """Names of the shards the store's manifest lists as complete (none without a manifest)."""
    m = read_manifest(store)
    return [s["name"] for s in m["shards"]] if m else []


def files_of(run_dir: Path) -> dict[str, os.stat_result]:
    return {str(p.relative_to(run_dir)): p.stat() for p in run_dir.rglob("*") if p.is_file()}


def assert_same_runs(got: Path, want: Path) -> None:
    """Two run folders hold the same files, byte for byte (config.toml, which names its own
    run folder, aside): a user's checksums of two equal stores agree."""
    got_files = set(files_of(got)) - {"config.toml"}
    want_files = set(files_of(want)) - {"config.toml"}
    assert not [f for f in got_files if f.endswith(".tmp")]
    assert sorted(got_files) == sorted(want_files)
    assert any(f.endswith(".safetensors") for f in want_files)
    for rel in sorted(want_files):
        assert (got / rel).read_bytes() == (want / rel).read_bytes(), rel


# ---------------------------------------------------------------- SIGKILL and resume


@pytest.fixture(scope="module")
def resume_setup(tmp_path_factory, tiny_models) -> dict:
    """One corpus, model and settings for every kill case (the store's key hashes the corpus
    path, so all runs must read the very same file), and the uninterrupted reference run."""
    work = tmp_path_factory.mktemp("resume")
    corpus = write_corpus(work / "docs.jsonl")
    model = tiny_models["llama"]
    # About 30 small shards: room to kill the run part-way.
    extra = {
        "corpus.max_tokens": "0",
        "corpus.heldout_tokens": "300",
        "extract.shard_tokens": "100",
        "extract.context_length": "48",
    }
    ref = work / "reference"
    with pytest.MonkeyPatch.context() as mp:  # module fixtures set up before conftest's
        mp.setenv("SAMESHEEP_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        res = cli("extract", *sets(ref, model, corpus, **extra))
    assert res.returncode == 0, res.stderr
    assert len(listed(store_of(ref, model))) >= 20
    return {"corpus": corpus, "model": model, "extra": extra, "reference": ref, "work": work}


KillPoint = tuple[Callable[[], bool], int]
"""When to kill, and how many shards must be complete by then."""


def _after_start(run_dir: Path, store: Path) -> KillPoint:
    return (lambda: (run_dir / "corpus" / "manifest.json").exists()), 0


def _after_two_shards(run_dir: Path, store: Path) -> KillPoint:
    return (lambda: len(listed(store)) >= 2), 2


def _at_random_shard(run_dir: Path, store: Path) -> KillPoint:
    seed = time.time_ns()
    rng = random.Random(seed)
    k, delay = rng.randint(3, 15), rng.uniform(0.0, 0.02)
    print(f"random kill point: seed {seed}, after {k} shards + {delay * 1000:.1f} ms")

    def ready() -> bool:
        if len(listed(store)) < k:
            return False
        time.sleep(delay)  # land anywhere inside the next shard's forward pass or writes
        return True

    return ready, k


@pytest.mark.parametrize(
    "kill_point",
    [_after_start, _after_two_shards, _at_random_shard],
    ids=["right_after_start", "after_two_shards", "random_shard_and_delay"],
)
def test_sigkill_then_rerun_equals_uninterrupted_run(resume_setup, kill_point, tmp_path):
    model, corpus, extra = resume_setup["model"], resume_setup["corpus"], resume_setup["extra"]
    run_dir = tmp_path / "run"
    store = store_of(run_dir, model)
    args = ["extract", *sets(run_dir, model, corpus, **extra)]
    ready, min_done = kill_point(run_dir, store)
    with open(tmp_path / "killed.stderr", "w") as err:
        proc = subprocess.Popen(
            command(*args), stdout=subprocess.DEVNULL, stderr=err, env=cli_env()
        )
        try:
            deadline = time.monotonic() + KILL_TIMEOUT_S
            while not ready():
                assert proc.poll() is None, "the run ended before its kill point"
                assert time.monotonic() < deadline, "kill point not reached in time"
                time.sleep(0.005)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    m = read_manifest(store)
    assert m is None or not m["complete"]
    done = listed(store)
    assert len(done) >= min_done
    kept = {
        f: (store / f).stat().st_mtime_ns
        for name in done
        for f in (f"{name}.safetensors", f"{name}.tokens.parquet")
    }

    res = cli(*args)
    assert res.returncode == 0, res.stderr
    assert "extracted" in flat(res.stderr)
    assert_same_runs(run_dir, resume_setup["reference"])
    # Resumed, not redone: shards complete before the kill were not written again.
    assert {f: (store / f).stat().st_mtime_ns for f in kept} == kept


# ---------------------------------------------------------------- reruns


def test_unchanged_rerun_does_no_work(tmp_path, tiny_models, corpus_file):
    model = tiny_models["qwen2"]
    args = ["extract", *sets(tmp_path / "run", model, corpus_file)]
    first = cli(*args)
    assert first.returncode == 0, first.stderr
    assert "unchanged, skipped" not in flat(first.stderr)
    run_dir = tmp_path / "run"
    config_text = (run_dir / "config.toml").read_text()
    before = files_of(run_dir)
    assert any(f.endswith(".safetensors") for f in before)
    time.sleep(0.05)  # so that a rewrite would show in mtime_ns on any filesystem clock

    second = cli(*args)
    assert second.returncode == 0, second.stderr
    assert f"{model}: layers [1] unchanged, skipped" in flat(second.stderr)
    after = files_of(run_dir)
    assert sorted(after) == sorted(before)
    # config.toml is rewritten on every run (same text); nothing else may be touched.
    touched = sorted(f for f in before if after[f].st_mtime_ns != before[f].st_mtime_ns)
    assert set(touched) <= {"config.toml"}, touched
    assert (run_dir / "config.toml").read_text() == config_text


def _positions(store: Path, name: str) -> list[int]:
    return pq.read_table(store / f"{name}.tokens.parquet").column("position").to_pylist()


def test_changed_settings_rebuild_the_store(tmp_path, tiny_models, corpus_file):
    model = tiny_models["llama"]
    run_dir = tmp_path / "run"
    store = store_of(run_dir, model)

    def extract(**extra: str) -> dict:
        res = cli("extract", *sets(run_dir, model, corpus_file, **extra))
        assert res.returncode == 0, res.stderr
        assert "extracted" in flat(res.stderr) and "skipped" not in flat(res.stderr)
        m = read_manifest(store)
        assert m["complete"]
        on_disk = sorted(p.name for p in store.iterdir() if p.name != "manifest.json")
        expected = sorted(
            f
            for s in m["shards"]
            for f in (f"{s['name']}.safetensors", f"{s['name']}.tokens.parquet")
        )
        assert on_disk == expected, "files on disk that the manifest does not list"
        return m

    old = extract()
    assert max(p for s in old["shards"] for p in _positions(store, s["name"])) > 16
    old_times = {p.name: p.stat().st_mtime_ns for p in store.iterdir()}

    # Shorter windows: same shard names, but every shard must be new.
    new = extract(**{"extract.context_length": "16"})
    assert new["key"] != old["key"] and new["context_length"] == 16
    assert all(max(_positions(store, s["name"])) == 15 for s in new["shards"] if s["tokens"] > 16)
    assert all(p < 16 for s in new["shards"] for p in _positions(store, s["name"]))
    stale = [n for n, t in old_times.items() if (store / n).stat().st_mtime_ns == t]
    assert stale == []

    # Bigger shards: fewer of them, and the old ones past the new count are gone.
    names_before = {s["name"] for s in new["shards"]}
    bigger = extract(**{"extract.context_length": "16", "extract.shard_tokens": "1500"})
    names_after = {s["name"] for s in bigger["shards"]}
    assert len(names_after) < len(names_before)
    for gone in names_before - names_after:
        assert not (store / f"{gone}.safetensors").exists()
        assert not (store / f"{gone}.tokens.parquet").exists()
    assert bigger["tokens"] == new["tokens"]  # the same corpus, cut differently


def test_new_weights_in_the_same_folder_rebuild_the_store(tmp_path, tiny_models, corpus_file):
    model = tmp_path / "model"
    shutil.copytree(tiny_models["llama"], model)
    args = ["extract", *sets(tmp_path / "run", model, corpus_file)]
    assert cli(*args).returncode == 0
    store = store_of(tmp_path / "run", model)
    before = load_file(store / "train-00000.safetensors")["acts"]

    lm = AutoModelForCausalLM.from_pretrained(model)
    with torch.no_grad():
        for p in lm.parameters():
            p.mul_(1.5)
    lm.save_pretrained(model)  # same tensors, same shapes, same file sizes; other values

    res = cli(*args)
    assert res.returncode == 0, res.stderr
    assert "unchanged, skipped" not in flat(res.stderr)
    assert not torch.equal(load_file(store / "train-00000.safetensors")["acts"], before)
