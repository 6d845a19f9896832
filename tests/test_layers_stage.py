"""The layer sample and the layers stage through the real CLI on two tiny models: every
layer pair with its null, threshold and floor; the sample agrees with the per-layer store;
reruns skip; bad input is one line."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import copy_run, flat, sets, write_corpus
from test_cli import assert_one_line_error, cli

from samesheep.layer_sample import LayerSample
from samesheep.store import open_store

FAST = {"compare.min_fires": "5", "compare.groups": "5", "compare.geometry_pairings": "10",
        "representations.permutations": "4", "representations.subsets": "20"}  # fmt: skip


@pytest.fixture(scope="module")
def run(tiny_models, tmp_path_factory, env):
    corpus = write_corpus(tmp_path_factory.mktemp("lcorpus") / "docs.jsonl", n=60, titles=True)
    run_dir = tmp_path_factory.mktemp("layers_run")
    models = json.dumps([str(tiny_models["llama"]), str(tiny_models["gpt2"])])
    args = sets(run_dir, tiny_models["llama"], corpus, models=models, **FAST)
    res = cli("run", *args, env=env)
    return res, run_dir, args


def test_every_layer_pair_with_null_threshold_and_floor(run):
    res, run_dir, _ = run
    assert res.returncode == 0, res.stderr
    out = run_dir / "compare" / "llama0__gpt20"
    summary = json.loads((out / "layers.json").read_text())
    assert summary["layers_a"] == 4 and summary["layers_b"] == 4
    assert summary["units"] > 100 and summary["documents"] >= 2
    t = pq.read_table(out / "layers.parquet").to_pandas()
    assert len(t) == 16 * t.metric.nunique() and t.metric.nunique() >= 9
    assert t.value.notna().all() and (t.null_sd > 0).all()
    assert (t.above_null == (t.value > t.threshold)).all()
    # the tiny models are random initialisations with seed 0, exactly what their random
    # copies are: the floor is the very same computation and must equal the value
    assert np.allclose(t.floor, t.value, atol=1e-6)
    best = summary["best"]["cka_trimmed"]["a_to_b"]
    assert len(best) == 4 and all(r["interval"][0] <= r["best"] <= r["interval"][1] for r in best)
    # the held-out set is smaller than the sample asked for: said, and all of it used
    assert "fewer than representations.units" in flat(res.stderr)
    assert "layer pairs have trimmed CKA above" in flat(res.stderr)


def test_the_report_shows_the_heatmaps(run):
    _, run_dir, _ = run
    root = run_dir / "report"
    index = (root / "index.html").read_text()
    assert "Layer by layer" in index and 'href="layers.html#layers-llama0__gpt20"' in index
    page = (root / "layers.html").read_text()
    t = pq.read_table(run_dir / "compare" / "llama0__gpt20" / "layers.parquet")
    metrics = set(t.column("metric").to_pylist())
    # one heatmap of 16 cells per metric with a tip on every cell, and its floor beside it
    assert len(re.findall(r"<title>llama0 layer \d+, gpt20 layer \d+: ", page)) == 16 * len(metrics)
    assert page.count(" best matches gpt20 layer ") == 4 * len(metrics)  # the best-match plot
    assert page.count("random-weights copies.</figcaption>") == len(metrics)
    assert page.count('class="best"') == 4 * len(metrics)  # each of A's layers: its best match


def test_the_sample_holds_what_the_per_layer_store_holds(run):
    _, run_dir, _ = run
    sample = LayerSample.open(run_dir / "llama0", "llama0")
    assert sample.n_layers == 4 and sample.norms.shape == (4, sample.tokens.num_rows)
    store = open_store(run_dir / "llama0" / "layer_1" / "acts")
    shard = store.read(store.shard_names("heldout")[0])
    # the first held-out document's tokens: the same windows, so the same states
    n = int((shard.tokens.column("doc_index").to_numpy() == 0).sum())
    mine = sample.tokens.column("doc_index").to_numpy() == 0
    assert mine.sum() == n
    np.testing.assert_array_equal(
        sample.tokens.column("token_id").to_numpy()[mine], shard.tokens.column("token_id")[:n]
    )
    got = sample.states(1, np.flatnonzero(mine))
    np.testing.assert_allclose(got, shard.acts[:n].float().numpy(), rtol=0.02, atol=0.02)


def test_rerun_skips(run, env):
    _, run_dir, args = run
    layers = run_dir / "compare" / "llama0__gpt20" / "layers.json"
    before = layers.stat().st_mtime_ns
    res = cli("layers", *args, env=env)
    assert res.returncode == 0, res.stderr
    assert "unchanged, skipped" in res.stderr and layers.stat().st_mtime_ns == before


def test_disabled_skips_and_changed_settings_recompute(run, env, tmp_path):
    _, run_dir, args = run
    res = cli("layers", *args, "--set", "representations.enabled=false", env=env)
    assert res.returncode == 0 and "skipped" in res.stderr
    copy, cargs = copy_run(run_dir, args, tmp_path / "copy")
    res = cli("layers", *cargs, "--set", "representations.permutations=2", env=env)
    assert res.returncode == 0, res.stderr
    summary = json.loads((copy / "compare" / "llama0__gpt20" / "layers.json").read_text())
    assert summary["settings"]["permutations"] == 2


def test_a_damaged_sample_is_a_one_line_error(run, env, tmp_path):
    _, run_dir, args = run
    copy, cargs = copy_run(run_dir, args, tmp_path / "copy")
    (copy / "llama0" / "layer_sample" / "states.safetensors").write_bytes(b"not a file")
    res = cli("layers", *cargs, "--set", "representations.k=5", env=env)
    assert_one_line_error(res)
    assert "layer sample" in res.stderr


def test_run_computes_the_layers_beside_and_relays_their_error(run, env, tmp_path):
    """In `samesheep run` the layers stage runs in a second process beside features and
    compare: its lines reach the run's stderr, its failure is the run's one-line error, and
    it leaves no temporary config behind."""
    res, run_dir, _ = run
    assert "layers llama0 / gpt20:" in flat(res.stderr)  # the child's answer, relayed
    assert not list(run_dir.glob(".layers.*.toml"))
    _, _, args = run
    copy, cargs = copy_run(run_dir, args, tmp_path / "copy")
    (copy / "llama0" / "layer_sample" / "states.safetensors").write_bytes(b"not a file")
    for beside in ("true", "false"):  # beside, or in order in this process: the same error
        res = cli("run", *cargs, "--set", "representations.k=5",
                  "--set", f"representations.beside={beside}", env=env)  # fmt: skip
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert [line for line in lines if line.startswith("samesheep: error:")] == lines[-1:]
        assert "layer sample" in lines[-1]
        assert not list(copy.glob(".layers.*.toml"))


def test_layers_before_extract_names_the_stage(tiny_models, tmp_path, env):
    corpus = write_corpus(tmp_path / "docs.jsonl", n=30)
    models = json.dumps([str(tiny_models["llama"]), str(tiny_models["gpt2"])])
    res = cli("layers", *sets(tmp_path / "r", tiny_models["llama"], corpus, models=models), env=env)
    assert_one_line_error(res)
    assert "samesheep extract" in res.stderr


def test_no_heldout_documents_is_a_one_line_error(tiny_models, tmp_path, env):
    corpus = write_corpus(tmp_path / "docs.jsonl", n=30)
    models = json.dumps([str(tiny_models["llama"]), str(tiny_models["gpt2"])])
    args = sets(tmp_path / "r", tiny_models["llama"], corpus, models=models)
    res = cli("extract", *args, "--set", "corpus.heldout_tokens=0", env=env)
    assert_one_line_error(res)
    assert "held-out" in res.stderr and "representations.enabled" in res.stderr
