"""The layer sample and the layers stage through the real CLI on two tiny models: every
layer pair with its null, threshold and floor; the sample agrees with the per-layer store;
reruns skip; bad input is one line."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import assert_one_line_error, cli, copy_run, flat, sets, write_corpus

from samesheep.data.store import open_store
from samesheep.lm.layer_sample import LayerSample

FAST = {
    "compare.min_fires": "5",
    "compare.groups": "5",
    "compare.geometry_pairings": "10",
    "representations.permutations": "4",
    "representations.subsets": "20",
}


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
    assert len(t) == 16 * t.metric.nunique() and t.metric.nunique() >= 12
    assert (t.null_sd[t.value.notna()] > 0).all()
    assert (t.above_null == (t.value > t.threshold)).all()
    # the tiny models are random initialisations with seed 0, exactly what their untrained
    # copies are: each fixed-source floor and the copies' own pair are the very same
    # computation as the value, so nothing survives them ...
    plain = t[~t.metric.str.endswith("_input_debiased")]
    assert plain.value.notna().all()
    for column in ("floor_a_to_b", "floor_b_to_a"):
        assert np.allclose(plain[column], plain.value, atol=1e-6), column
    cka = plain[plain.metric.str.startswith("cka")]  # the untrained pair: CKA metrics only
    assert np.allclose(cka.random_pair, cka.value, atol=1e-6)
    np.testing.assert_allclose(plain.corrected, 0.0, atol=1e-6)
    # ... and with each side's copy regressed out nothing is left at all
    debiased = t[t.metric.str.endswith("_input_debiased")]
    assert set(debiased.metric) == {
        "cka_input_debiased",
        "cka_standardized_input_debiased",
        "cka_trimmed_input_debiased",
    }
    assert debiased.value.isna().all() and debiased.floor_a_to_b.isna().all()
    assert not t.survives.any()
    head = summary["headline"]
    assert head["metric"] == "cka_trimmed_input_debiased" and head["floor_metric"] == "cka_trimmed"
    assert head["survive"] == 0 and head["pairs"] == 16
    assert head["cells"]["plain_floor_a_to_b"] == head["cells"]["plain_value"]
    assert all(r["best"] is None for b in summary["best"].values() for r in b["a_to_b"])
    # the held-out set is smaller than the sample asked for: said, and all of it used
    assert "fewer than representations.units" in flat(res.stderr)
    assert "0 of 16 layer pairs have input-debiased trimmed CKA" in flat(
        res.stderr
    ) and "last layer 3: no layer of gpt20 survives" in flat(res.stderr)


def test_the_report_shows_the_heatmaps(run):
    _, run_dir, _ = run
    root = run_dir / "report"
    index = (root / "index.html").read_text()
    assert "Layer by layer" in index and 'href="layers.html#layers-llama0__gpt20"' in index
    page = (root / "layers.html").read_text()
    t = pq.read_table(run_dir / "compare" / "llama0__gpt20" / "layers.parquet")
    metrics = set(t.column("metric").to_pylist())
    # one heatmap of 16 cells per metric with a tip on every cell, the headline first and
    # the others behind a selector, and the fixed-source floor beside each
    assert len(re.findall(r"<title>llama0 layer \d+, gpt20 layer \d+: ", page)) == 16 * len(metrics)
    assert page.index("input-debiased</h3>") < page.index("<details")
    assert page.count("<details") == len(metrics) - 1
    assert page.count('(the fixed-source floor)">') == len(metrics)  # the panel's label
    # nothing survives anywhere (the models are their untrained copies): every cell says so,
    # none is coloured, no layer has a best match
    assert page.count('class="none"') == 16 * len(metrics)
    assert page.count("; nothing survives</title>") == 16 * len(metrics)
    assert page.count('class="best"') == 0 and " best matches gpt20 layer " not in page


def test_without_the_floor_every_layer_has_its_best_match(run, env, tmp_path):
    """With the untrained copies left out (compare.floor false) the stage reads plain trimmed
    CKA against its null: each of A's layers has a best match with its range."""
    _, run_dir, args = run
    copy, cargs = copy_run(run_dir, args, tmp_path / "copy")
    res = cli("layers", *cargs, "--set", "compare.floor=false", env=env)
    assert res.returncode == 0, res.stderr
    summary = json.loads((copy / "compare" / "llama0__gpt20" / "layers.json").read_text())
    assert summary["floor"] is False and summary["headline"]["metric"] == "cka_trimmed"
    t = pq.read_table(copy / "compare" / "llama0__gpt20" / "layers.parquet").to_pandas()
    assert not t.metric.str.endswith("_input_debiased").any() and t.floor_a_to_b.isna().all()
    assert (t.survives == t.above_null).all()
    best = summary["best"]["cka_trimmed"]["a_to_b"]
    assert len(best) == 4
    for r, cells in zip(best, np.array(summary["headline"]["cells"]["survives"]), strict=True):
        if cells.any():
            assert r["interval"][0] <= r["best"] <= r["interval"][1] and cells[r["best"]]
        else:
            assert r["best"] is None
    assert "layer pairs have trimmed CKA above the corrected null threshold" in flat(res.stderr)


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
    assert not list(run_dir.glob(".layers*"))
    _, _, args = run
    copy, cargs = copy_run(run_dir, args, tmp_path / "copy")
    # more neighbours than the sample has units: the layers stage alone fails
    for beside in ("true", "false"):  # beside, or in order in this process: the same error
        setting = f"representations.beside={beside}"
        res = cli("run", *cargs, "--set", "representations.k=100000", "--set", setting, env=env)
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert [line for line in lines if line.startswith("samesheep: error:")] == lines[-1:]
        assert "layer samples" in lines[-1] and "100002" in lines[-1], lines[-1]
        assert not list(copy.glob(".layers*"))


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
