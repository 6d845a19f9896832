"""The train stage through the real CLI on a tiny model: files SAELens and samesheep both
load, metrics.json, reruns that do nothing, repairs, and one-line errors on bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import sae_lens  # in the test extra: these checks fail, never skip, where it is missing
import torch
from helpers import assert_one_line_error, cli, copy_run, flat, sets, write_corpus
from safetensors.torch import load_file, save_file

from samesheep.core.config import TrainConfig
from samesheep.data.store import open_store
from samesheep.sae.saelens import load_sae

METRICS = [
    "fvu",
    "explained_variance",
    "mse",
    "l0",
    "dead_latents",
    "dead_fraction",
    "dense_latents",
    "dense_fraction",
    "cosine",
    "shrinkage",
    "ce_clean",
    "ce_spliced",
    "ce_zero",
    "ce_loss_score",
    "kl_spliced",
    "kl_zero",
    "kl_div_score",
    "median_relative_error",
    "outlier_tokens",
    "median_norm",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("train_corpus") / "docs.jsonl", n=60)


@pytest.fixture(scope="module")
def run(tiny_models, corpus, tmp_path_factory, env):
    """`samesheep run` on the tiny llama: (result, run_dir, layer_dir, args)."""
    run_dir = tmp_path_factory.mktemp("train_run")
    args = sets(run_dir, tiny_models["llama"], corpus)
    res = cli("run", *args, env=env)
    return res, run_dir, run_dir / tiny_models["llama"].name / "layer_1", args


def test_run_trains_saves_and_evaluates(run):
    res, _, layer_dir, _ = run
    assert res.returncode == 0, res.stderr
    metrics = json.loads((layer_dir / "sae" / "metrics.json").read_text())
    for key in METRICS:
        assert isinstance(metrics[key], float | int), key
    assert 0 <= metrics["fvu"] < 1 and 7 < metrics["l0"] <= 8
    assert metrics["explained_variance"] == pytest.approx(1 - metrics["fvu"])
    assert metrics["training"]["steps"] == 20
    assert metrics["scored_tokens"] > 0 and metrics["tokens"] > 0
    out = flat(res.stderr)
    assert "layer 1: FVU" in out and "CE loss recovered" in out
    cfg = json.loads((layer_dir / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 8 and cfg["d_in"] == 32
    # Firing frequencies beside the SAE, as SAELens keeps them: log10(frequency + 1e-10).
    sparsity = load_file(layer_dir / "sae" / "sparsity.safetensors")["sparsity"]
    assert sparsity.shape == (128,) and (sparsity <= 0).all()
    assert int((sparsity < -9.9).sum()) == metrics["dead_latents"]
    frequency = (10 ** sparsity.double() - 1e-10).clamp_min(0)
    assert float(frequency.sum()) == pytest.approx(metrics["l0"], rel=1e-4)
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"


def heldout_rows(store) -> torch.Tensor:
    """The held-out rows the train stage evaluates on (its default token filter)."""
    tokens = store.token_filter(max_norm_ratio=TrainConfig().max_norm_ratio)
    return torch.cat([s.acts[s.mask(tokens)] for s in store.shards("heldout")]).float()


def numpy_topk(folder: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(reconstruction, active mask) of a SAELens-layout TopK SAE, computed from its files
    with numpy alone: a reference that shares no code with samesheep."""
    cfg = json.loads((folder / "cfg.json").read_text())
    w = {k: v.double().numpy() for k, v in load_file(folder / "sae_weights.safetensors").items()}
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    kth = np.sort(pre, axis=1)[:, -cfg["k"]][:, None]
    acts = np.where(pre >= kth, np.maximum(pre, 0), 0.0)
    return acts @ w["W_dec"] + w["b_dec"], acts > 0


def test_saved_sae_reconstructs_like_saelens_and_metrics_match(run):
    _, _, layer_dir, _ = run
    ours = load_sae(layer_dir / "sae", d_in=32)
    theirs = sae_lens.SAE.load_from_disk(str(layer_dir / "sae"))
    store = open_store(layer_dir / "acts")
    x = heldout_rows(store)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x), rtol=1e-4, atol=1e-4)
    # The metrics against a reference computed another way (numpy, from the files alone).
    xs = x.double().numpy()
    x_hat, active = numpy_topk(layer_dir / "sae", xs)
    fvu = ((x_hat - xs) ** 2).sum() / ((xs - xs.mean(0)) ** 2).sum()
    rel = np.linalg.norm(x_hat - xs, axis=1) / np.linalg.norm(xs, axis=1)
    metrics = json.loads((layer_dir / "sae" / "metrics.json").read_text())
    assert metrics["tokens"] == xs.shape[0]
    assert metrics["fvu"] == pytest.approx(fvu, rel=1e-4)
    assert metrics["median_relative_error"] == pytest.approx(np.median(rel), rel=1e-4)
    assert metrics["l0"] == pytest.approx(active.sum(1).mean(), rel=1e-6)
    assert metrics["dead_latents"] == int((~active.any(0)).sum())


def test_rerun_does_nothing_and_repairs_a_damaged_sae(run, env):
    _, _, layer_dir, args = run
    files = [layer_dir / "sae" / n for n in ("cfg.json", "sae_weights.safetensors")]
    files.append(layer_dir / "sae" / "metrics.json")
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}
    res = cli("train", *args, env=env)
    assert res.returncode == 0, res.stderr
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files} == before
    # The key holds the dtype "auto" resolves to, so naming that dtype changes nothing (the
    # advice given where a checkpoint of another dtype starts over really continues it).
    resolved = json.loads(before[files[2]][1])["training"]["dtype"]  # what the CLI resolved
    res = cli("train", *args, "--set", f'train.dtype="{resolved}"', env=env)
    assert res.returncode == 0, res.stderr
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files} == before
    # A damaged weights file is rebuilt from the final checkpoint, identical.
    weights = layer_dir / "sae" / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    res = cli("train", *args, env=env)
    assert res.returncode == 0, res.stderr
    assert weights.read_bytes() == before[weights][1]


def test_changed_settings_retrain(run, env):
    _, _, layer_dir, args = run
    res = cli("train", *args, "--set", "train.k=4", env=env)
    assert res.returncode == 0, res.stderr
    assert json.loads((layer_dir / "sae" / "cfg.json").read_text())["k"] == 4
    assert json.loads((layer_dir / "sae" / "metrics.json").read_text())["l0"] <= 4


def test_train_before_extract_names_the_stage(tiny_models, corpus, tmp_path, env):
    res = cli("train", *sets(tmp_path / "r", tiny_models["llama"], corpus), env=env)
    assert_one_line_error(res)
    assert "samesheep extract" in res.stderr


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("train.k=1000", "k = 1000 must lie between 1 and the width 128"),
        ('train.architecture="gated"', "unknown SAE architecture 'gated'"),
        ('train.dtype="float16"', "train.dtype"),
    ],
)
def test_bad_settings(run, env, override, says):
    _, _, layer_dir, args = run
    res = cli("train", *args, "--set", override, env=env)
    assert_one_line_error(res)
    assert says in res.stderr
    # the SAE trained before is still marked done: a bad setting loses no work
    state = json.loads((layer_dir / "train" / "state.json").read_text())
    assert state["complete"] and state["digests"]


def test_nan_in_the_store_names_the_shard(run, env, tmp_path):
    _, run_dir, layer_dir, args = run
    copy, args = copy_run(run_dir, args, tmp_path / "run")
    shard = copy / layer_dir.parent.name / "layer_1" / "acts" / "train-00003.safetensors"
    acts = load_file(shard)["acts"]
    acts[5, 2] = float("nan")
    save_file({"acts": acts}, shard)
    res = cli("train", *args, "--set", "train.k=5", env=env)
    assert_one_line_error(res)
    assert "train-00003" in res.stderr and "NaN" in res.stderr


def test_corrupt_checkpoint_is_a_one_line_error(run, env, tmp_path):
    _, run_dir, layer_dir, args = run
    copy, args = copy_run(run_dir, args, tmp_path / "run")
    train = copy / layer_dir.parent.name / "layer_1" / "train"
    (train / "checkpoint.safetensors").write_bytes(os.urandom(300))
    os.remove(train / "state.json")
    res = cli("train", *args, env=env)
    assert_one_line_error(res)
    assert "checkpoint.safetensors" in res.stderr


def test_a_pretrained_saelens_sae_replaces_training(run, env, tmp_path):
    _, _, layer_dir, args = run
    folder = tmp_path / "pretrained" / layer_dir.parent.name / "layer_1"
    theirs = sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(d_in=32, d_sae=48))
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.2)
        theirs.threshold.uniform_(0.0, 0.1)
    theirs.save_model(str(folder))
    template = str(tmp_path / "pretrained" / "{model}" / "layer_{layer}")
    res = cli("train", *args, "--set", f"train.pretrained={json.dumps(template)}", env=env)
    assert res.returncode == 0, res.stderr
    assert "using the pretrained jumprelu SAE" in flat(res.stderr)
    cfg = json.loads((layer_dir / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["d_sae"] == 48
    metrics = json.loads((layer_dir / "sae" / "metrics.json").read_text())
    assert metrics["training"] == {"pretrained": str(folder)} and "ce_loss_score" in metrics
    store = open_store(layer_dir / "acts")
    x = heldout_rows(store)
    with torch.no_grad():
        fvu = float((theirs(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert metrics["fvu"] == pytest.approx(fvu, rel=1e-4)
    # One for another width is refused, in one line naming both widths.
    wide = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=64, d_sae=48))
    wide.save_model(str(tmp_path / "wide"))
    res = cli(
        "train", *args, "--set", f"train.pretrained={json.dumps(str(tmp_path / 'wide'))}", env=env
    )
    assert_one_line_error(res)
    assert "d_in=64" in res.stderr and "32" in res.stderr


def test_no_heldout_tokens_is_an_error_before_training(tiny_models, corpus, tmp_path, env):
    args = sets(tmp_path / "r", tiny_models["llama"], corpus, **{"corpus.heldout_tokens": "0"})
    res = cli("extract", *args, env=env)
    assert res.returncode == 0, res.stderr
    res = cli("train", *args, env=env)
    assert_one_line_error(res)
    assert "held-out" in res.stderr and "corpus.heldout_tokens" in res.stderr
    layer_dir = tmp_path / "r" / tiny_models["llama"].name / "layer_1"
    assert not (layer_dir / "sae").exists() and not (layer_dir / "train").exists()


def test_pretrained_metrics_follow_the_store(run, env, tmp_path):
    """A pretrained SAE's metrics are keyed on the store and the evaluation settings as a
    trained SAE's are: after re-extraction with another corpus seed they are computed again."""
    _, run_dir, layer_dir, args = run
    copy, args = copy_run(run_dir, args, tmp_path / "run")
    layer = copy / layer_dir.parent.name / "layer_1"
    theirs = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=32, d_sae=40))
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.2)
    theirs.save_model(str(tmp_path / "pre"))
    pre = ["--set", f"train.pretrained={json.dumps(str(tmp_path / 'pre'))}"]
    assert cli("train", *args, *pre, env=env).returncode == 0
    first = json.loads((layer / "sae" / "metrics.json").read_text())
    res = cli("run", *args, *pre, "--set", "corpus.seed=7", env=env)
    assert res.returncode == 0, res.stderr
    second = json.loads((layer / "sae" / "metrics.json").read_text())
    assert second["key"] != first["key"] and second["fvu"] != first["fvu"]
    x = heldout_rows(open_store(layer / "acts"))
    with torch.no_grad():
        fvu = float((theirs(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert second["fvu"] == pytest.approx(fvu, rel=1e-4)
    # Another token rule is another evaluation too.
    tokens_rule = ["--set", "train.skip_first=false", "--set", "train.skip_special=false"]
    res = cli("train", *args, *pre, "--set", "corpus.seed=7", *tokens_rule, env=env)
    assert res.returncode == 0, res.stderr
    third = json.loads((layer / "sae" / "metrics.json").read_text())
    assert third["tokens"] > second["tokens"]


def test_outliers_by_norm_are_left_out_and_counted(run, env, tmp_path):
    """With a norm limit that catches real tokens, training and evaluation leave them out and
    say how many; metrics.json records the limit and the median norm it came from."""
    _, run_dir, layer_dir, args = run
    copy, args = copy_run(run_dir, args, tmp_path / "run")
    layer = copy / layer_dir.parent.name / "layer_1"
    store = open_store(layer / "acts")
    ratio = 1.05  # tight enough to catch some ordinary tokens of the tiny model
    tokens = store.token_filter(max_norm_ratio=ratio)
    want = sum(
        int(tokens.outliers(s.tokens)[s.mask().numpy()].sum()) for s in store.shards("heldout")
    )
    assert want > 0
    res = cli("train", *args, "--set", f"train.max_norm_ratio={ratio}", env=env)
    assert res.returncode == 0, res.stderr
    metrics = json.loads((layer / "sae" / "metrics.json").read_text())
    assert metrics["outlier_tokens"] == want
    assert metrics["max_norm"] == pytest.approx(ratio * store.median_norm(), rel=1e-6)
    assert metrics["training"]["outlier_tokens"] > 0
    assert f"{want:,} left out for their norm" in flat(res.stderr)
