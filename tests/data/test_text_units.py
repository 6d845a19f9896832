"""Per-text units: one vector per document derived from the per-token store (its last real
token, or the mean of its real tokens), and a whole per-text run through the CLI."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch
from helpers import assert_one_line_error, cli, flat, sets, write_corpus, write_store

from samesheep.data.text_units import text_store


@pytest.fixture()
def token_store(tmp_path):
    # 10-token windows, position 0 special; documents of 10 tokens, shards of 25 tokens, so
    # documents 2 and 7 spread over two shards
    acts = torch.randn(100, 6, generator=torch.Generator().manual_seed(0))
    store = write_store(tmp_path / "acts", {"train": acts, "heldout": acts[:30]}, 25, 10)
    return store, acts


def test_text_last_is_each_documents_last_real_token(token_store):
    folder, acts = token_store
    from samesheep.data.store import open_store

    store = text_store(open_store(folder), "text-last", {"train": [50] * 10, "heldout": [50] * 3})
    assert store.folder.name == "acts-text-last" and store.complete
    assert store.num_tokens("train") == 10 and store.num_tokens("heldout") == 3
    shard = store.read("train-00000")
    torch.testing.assert_close(shard.acts, acts[9::10])  # the last of each 10
    t = shard.tokens.to_pydict()
    assert t["doc_index"] == list(range(10)) and t["char_start"] == [0] * 10
    assert t["char_end"] == [50] * 10  # the unit is the whole document
    assert not any(t["special"]) and min(t["position"]) > 0  # no filter drops it


def test_text_mean_is_the_mean_over_real_tokens(token_store):
    folder, acts = token_store
    from samesheep.data.store import open_store

    store = text_store(open_store(folder), "text-mean", {"train": [50] * 10, "heldout": [50] * 3})
    want = torch.stack([acts[10 * d + 1 : 10 * d + 10].mean(0) for d in range(10)])
    torch.testing.assert_close(store.read("train-00000").acts, want, rtol=1e-5, atol=1e-6)
    again = text_store(open_store(folder), "text-mean", {"train": [50] * 10, "heldout": [50] * 3})
    assert again.manifest["key"] == store.manifest["key"]  # built once


def test_a_per_text_run_compares_documents(tiny_models, tmp_path, env):
    corpus = write_corpus(tmp_path / "docs.jsonl", n=220, titles=True)
    lines = corpus.read_text().splitlines()  # every text unique, as real documents are
    corpus.write_text(
        "".join(
            json.dumps({**json.loads(line), "text": f"Document {i}. " + json.loads(line)["text"]})
            + "\n"
            for i, line in enumerate(lines)
        )
    )
    models = json.dumps([str(tiny_models["llama"]), str(tiny_models["gpt2"])])
    extra = {
        "models": models,
        "corpus.max_tokens": "0",
        "corpus.heldout_tokens": "1500",
        "compare.min_fires": "5",
        "compare.groups": "5",
        "compare.geometry_pairings": "10",
        "representations.enabled": "false",
        "report.pair_min_r": "0.0",
        "train.batch_tokens": "64",
    }
    args = sets(tmp_path / "run", tiny_models["llama"], corpus, **extra)
    res = cli("run", "--preset", "original-study", *args, env=env)  # per-text, from the preset
    assert res.returncode == 0, res.stderr
    run = tmp_path / "run"
    assert 'unit = "text-last"' in (run / "config.toml").read_text()
    docs = sum(
        len((run / "corpus" / f).read_text().splitlines()) for f in ("train.jsonl", "heldout.jsonl")
    )
    summary = json.loads((run / "compare" / "llama0__gpt20" / "summary.json").read_text())
    assert summary["units"] == docs == summary["documents"]  # one unit per document
    raw = summary["headline"]["raw"]["a_to_b"]
    assert "null" not in raw and "across" in raw  # no within-document null to compute
    assert "residual" not in summary["headline"]  # each unit's text is unique
    metrics = json.loads((run / "llama0" / "layer_1" / "sae" / "metrics.json").read_text())
    assert "fvu" in metrics and "ce_loss_score" not in metrics  # never spliced in per token
    ex = pq.read_table(run / "llama0" / "layer_1" / "features" / "exemplars.parquet")
    assert ex.num_rows > 0
    assert (run / "report" / "index.html").is_file()
    assert "judged latents have a" in flat(res.stderr)


def test_too_few_documents_for_the_width_is_a_one_line_error(tiny_models, tmp_path, env):
    corpus = write_corpus(tmp_path / "docs.jsonl", n=60)
    args = sets(tmp_path / "run", tiny_models["llama"], corpus, unit='"text-mean"')
    assert cli("extract", *args, env=env).returncode == 0
    res = cli("train", *args, env=env)
    assert_one_line_error(res)
    assert "needs at least 128 training documents" in res.stderr


def test_an_unknown_unit_is_a_one_line_error(tiny_models, tmp_path, env):
    corpus = write_corpus(tmp_path / "docs.jsonl", n=10)
    args = sets(tmp_path / "run", tiny_models["llama"], corpus, unit='"doc"')
    res = cli("extract", *args, env=env)
    assert_one_line_error(res)
    assert "unit must be one of" in res.stderr


def test_init_writes_the_original_study_preset(tmp_path):
    from samesheep.core import config as config_mod

    res = cli("init", str(tmp_path / "o.toml"), "--preset", "original-study", "--set", "train.k=32")
    assert res.returncode == 0, res.stderr
    cfg = config_mod.load(tmp_path / "o.toml")
    assert cfg.unit == "text-last" and cfg.layers == [-1] and cfg.corpus.max_tokens == 0
    assert cfg.train.expansion_factor == 4 and cfg.train.k == 32  # --set applies on top
    assert cfg.run_dir == "runs/original-study" and cfg.compare.floor and cfg.compare.ceiling
    res = cli("init", str(tmp_path / "x.toml"), "--preset", "nope")
    assert res.returncode == 2
