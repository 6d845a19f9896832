"""scripts/same_outputs.py, the check that two runs wrote the same outputs: on two tiny fake
run folders, loaded from the script's file (it imports nothing from samesheep)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import load_same_outputs
from safetensors.numpy import save_file

same_outputs = load_same_outputs()


def fake_run(run: Path) -> Path:
    """A run folder with one file of every kind, its paths naming the folder itself."""
    layer = run / "m" / "layer_1"
    (layer / "acts").mkdir(parents=True)
    (layer / "sae").mkdir()
    (run / "report").mkdir()
    rng = np.random.default_rng(0)
    acts = rng.standard_normal((16, 8)).astype(np.float32)
    save_file({"acts": acts}, str(layer / "acts" / "train-00000.safetensors"))
    tokens = pa.table({"token_id": np.arange(16), "norm": rng.random(16)})
    pq.write_table(tokens, layer / "acts" / "train-00000.tokens.parquet")
    manifest = {"complete": True, "shards": [{"name": "train-00000", "tokens": 16}]}
    (layer / "acts" / "manifest.json").write_text(json.dumps(manifest))
    metrics = {
        "fvu": 0.1234567890123,
        "l0": 8.0,
        "training": {"tokens_per_second": 1234.5, "steps": 10, "seconds": 3.2},
        "timings_s": {"read": 0.5, "prepare": 1.0},
        "dataset_path": str(run / "m" / "layer_1" / "acts"),
    }
    (layer / "sae" / "metrics.json").write_text(json.dumps(metrics))
    (run / "corpus").mkdir()
    (run / "corpus" / "train.jsonl").write_text('{"id": "d0", "text": "a b c"}\n')
    (run / "report" / "index.html").write_text(f"<p>{run}</p>")  # left out
    (run / "timings.json").write_text(json.dumps({"seconds": {"extract": 1.0}}))  # left out
    (run / "config.toml").write_text(f'run_dir = "{run}"\n')  # left out
    (layer / "acts" / ".train-00001.safetensors.123.tmp").write_bytes(b"half")  # left out
    return run


@pytest.fixture()
def runs(tmp_path) -> tuple[Path, Path]:
    a = fake_run(tmp_path / "a")
    b = fake_run(tmp_path / "b")
    # what only timings and the run's own path change must not count
    (b / "timings.json").write_text(json.dumps({"seconds": {"extract": 9.0}}))
    (b / "report" / "index.html").write_text("other")
    return a, b


def metrics(run: Path) -> Path:
    return run / "m" / "layer_1" / "sae" / "metrics.json"


def edit_metrics(run: Path, edit) -> None:
    data = json.loads(metrics(run).read_text())
    edit(data)
    metrics(run).write_text(json.dumps(data))


def test_identical_runs_have_no_differences(runs):
    lines, counts = same_outputs.differences(*runs)
    assert lines == []
    assert counts["different"] == 0
    assert (counts["safetensors"], counts["parquet"], counts["json"], counts["other"]) == (
        1,
        1,
        2,
        1,
    )
    assert counts["files"] == 5


def test_a_flipped_byte_in_safetensors_is_a_difference(runs):
    a, b = runs
    shard = b / "m" / "layer_1" / "acts" / "train-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01
    shard.write_bytes(bytes(data))
    lines, counts = same_outputs.differences(a, b)
    assert counts["different"] == 1
    assert len(lines) == 1 and lines[0].startswith("m/layer_1/acts/train-00000.safetensors:")


def _rewrite_header(path: Path, edit) -> None:
    """Rewrite a safetensors file's header (JSON after an 8-byte length) as edit returns it,
    padded to the same length, the tensor data untouched."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = edit(json.loads(data[8 : 8 + n]))
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n
    path.write_bytes(data[:8] + text.ljust(n) + data[8 + n :])


def test_safetensors_metadata_in_another_order_is_the_same(tmp_path):
    """safetensors writes its metadata from a hash map: two runs of the same code may order
    it differently (seen on training checkpoints), which is no difference in the output."""
    a, b, c = (tmp_path / f"{x}.safetensors" for x in "abc")
    tensors = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(3)}
    meta = {"key": "843753c43f5b0e65", "step": "20", "dtype": "bfloat16", "device": "cpu"}
    for path in (a, b, c):
        save_file(tensors, str(path), metadata=meta)
    _rewrite_header(
        b,
        lambda h: {
            k: (dict(reversed(v.items())) if k == "__metadata__" else v)
            for k, v in reversed(h.items())
        },
    )
    assert a.read_bytes() != b.read_bytes()
    assert same_outputs._safetensors_differ(a, b) is None
    _rewrite_header(c, lambda h: {**h, "__metadata__": {**h["__metadata__"], "step": "19"}})
    assert "header differs at __metadata__" in same_outputs._safetensors_differ(a, c)


def test_a_changed_json_float_names_its_key(runs):
    a, b = runs
    edit_metrics(b, lambda d: d.update(fvu=np.nextafter(d["fvu"], 1.0)))  # one ulp
    lines, counts = same_outputs.differences(a, b)
    assert counts["different"] == 1
    assert len(lines) == 1 and lines[0].startswith("m/layer_1/sae/metrics.json: fvu:"), lines


def test_a_nested_key_and_a_type_change_are_named(runs):
    a, b = runs
    edit_metrics(b, lambda d: (d["training"].update(steps=11), d.update(l0=8)))
    lines, _ = same_outputs.differences(a, b)
    assert sorted(line.split(": ")[1] for line in lines) == ["l0", "training.steps"]


def test_changed_timings_are_no_difference(runs):
    a, b = runs

    def slower(d: dict) -> None:
        d["training"]["tokens_per_second"] = 99.0
        d["training"]["seconds"] = 100.0
        d["timings_s"] = {"read": 7.0}

    edit_metrics(b, slower)
    assert same_outputs.differences(a, b)[0] == []


def test_a_missing_file_is_a_difference(runs):
    a, b = runs
    (b / "m" / "layer_1" / "acts" / "train-00000.tokens.parquet").unlink()
    (a / "corpus" / "extra.txt").write_text("x")
    lines, counts = same_outputs.differences(a, b)
    assert counts["different"] == 2
    assert any(
        line.startswith("m/layer_1/acts/train-00000.tokens.parquet: only in A") for line in lines
    )
    assert any(line.startswith("corpus/extra.txt: only in A") for line in lines)


def test_a_changed_jsonl_is_a_difference(runs):
    a, b = runs
    (b / "corpus" / "train.jsonl").write_text('{"id": "d0", "text": "a b d"}\n')
    lines, _ = same_outputs.differences(a, b)
    assert len(lines) == 1 and lines[0].startswith("corpus/train.jsonl: bytes differ")


def test_the_command_line(runs, tmp_path):
    a, b = runs

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, same_outputs.__file__, *map(str, args)],
            capture_output=True,
            text=True,
            timeout=60,
        )

    same = run(a, b)
    assert same.returncode == 0, same.stderr
    assert same.stdout.splitlines() == ["same: 5 files (1 safetensors, 1 parquet, 2 json, 1 other)"]
    c = tmp_path / "c"
    shutil.copytree(b, c)
    edit_metrics(c, lambda d: d.update(fvu=0.5))
    different = run(a, c)
    assert different.returncode == 1
    assert different.stdout.splitlines()[-1] == "DIFFERENT: 1 of 5 files"
    bad = run(a, tmp_path / "missing")
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1
    assert "missing" in bad.stderr
    assert run(a).returncode == 2


def test_keys_allowed_as_added_may_appear_in_b_only(runs):
    """A change that adds a field on purpose (the done markers' digests) passes with
    --allow-added naming it, and fails without; a field gone from B always fails."""
    a, b = runs
    edit_metrics(b, lambda m: m.update(digests={"x.parquet": {"bytes": 1, "sha256": "0"}}))
    assert same_outputs.differences(a, b)[0]
    rules = same_outputs.Rules(added=frozenset({"digests"}))
    assert same_outputs.differences(a, b, rules)[0] == []
    assert same_outputs.differences(b, a, rules)[0]  # present in A only: a difference
    assert same_outputs.main(["--allow-added", "digests", str(a), str(b)]) == 0
