"""`samesheep causal` through the real CLI on a tiny run of two tiny models: its files, the
skip of unchanged work, and one-line errors where its inputs are missing."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import assert_one_line_error, cli, copy_run, flat, sets, write_corpus

from samesheep.causal.check import ACTIVATION_ONLY, AGREES, TOO_FEW
from samesheep.causal.sampling import floor_latents, sample_pairs, strata, stratified


@pytest.fixture(scope="module")
def run(tiny_models, tmp_path_factory, env):
    corpus = write_corpus(tmp_path_factory.mktemp("causal_corpus") / "docs.jsonl", n=60)
    run_dir = tmp_path_factory.mktemp("causal_run")
    extra = {
        "models": json.dumps([str(tiny_models["llama"]), str(tiny_models["gpt2"])]),
        "compare.min_fires": "5",
        "compare.groups": "5",
        "compare.floor": "false",
        "compare.geometry_pairings": "10",
        "features.embed": "false",
        "representations.enabled": "false",
        "causal.pairs": "12",
        "causal.max_docs": "4",
        "causal.min_units": "3",
    }
    args = sets(run_dir, tiny_models["llama"], corpus, **extra)
    res = cli("run", *args, env=env)
    assert res.returncode == 0, res.stderr
    causal = cli("causal", *args, env=env)
    return causal, run_dir, args


def test_causal_writes_pairs_profiles_and_summary(run):
    res, run_dir, _ = run
    assert res.returncode == 0, res.stderr
    [out] = list((run_dir / "causal").iterdir())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairs"] == 12
    for kind in ("agreement", "floor", "ceiling"):
        assert summary["distributions"][kind]["n"] > 0, summary["distributions"]
        assert -1 <= summary["distributions"][kind]["median"] <= 1
        lo, hi = summary["distributions"][kind]["interval"]
        assert lo <= summary["distributions"][kind]["median"] <= hi
    assert "Causal agreement of 12 mutual pairs" in flat(res.stderr)
    pairs = pq.read_table(out / "pairs.parquet").to_pandas()
    assert set(pairs.label) <= {AGREES, ACTIVATION_ONLY, TOO_FEW}
    # Spearman beside Pearson, read where Pearson is; the paired difference from the floor
    assert (pairs.agreement.isna() == pairs.agreement_spearman.isna()).all()
    diff = (pairs.agreement - pairs.floor_agreement).dropna()
    assert abs(summary["above_floor"]["median"] - diff.median()) < 1e-12
    assert (pairs.floor_latent != pairs.latent_b).all()
    assert (pairs.ceiling_latent >= 0).all()
    assert sorted(summary["labels"]) == sorted(set(pairs.label))
    # agrees exactly where the agreement passes the floor's 95th percentile
    floor = pairs.floor_agreement.dropna().to_numpy()
    threshold = np.quantile(floor, 0.95)
    assert summary["threshold"] == pytest.approx(threshold)
    judged = pairs.agreement.notna()
    assert ((pairs.agreement[judged] > threshold) == (pairs.label[judged] == AGREES)).all()
    profiles = pq.read_table(out / "profiles.parquet").to_pandas()
    assert len(profiles) == pairs.units.sum() > 0
    assert ((profiles.act_a > 0) | (profiles.act_b > 0)).all()  # where either fires
    assert (profiles.start < profiles.end).all() and (profiles.end < profiles.next_end).all()


def test_rerun_skips_unchanged_work(run, env):
    _, _, args = run
    res = cli("causal", *args, env=env)
    assert res.returncode == 0, res.stderr
    assert "unchanged, skipped" in res.stderr


def test_causal_without_a_comparison_is_one_line(run, env, tmp_path):
    _, run_dir, args = run
    copy, copy_args = copy_run(run_dir, args, tmp_path / "copy")
    shutil.rmtree(copy / "compare")
    res = cli("causal", *copy_args, env=env)
    assert_one_line_error(res)
    assert "samesheep compare" in res.stderr


def test_causal_on_an_empty_run_is_one_line(tiny_models, tmp_path, env):
    corpus = write_corpus(tmp_path / "docs.jsonl", n=5)
    res = cli("causal", *sets(tmp_path / "nothing", tiny_models["llama"], corpus), env=env)
    assert_one_line_error(res)


def test_strata_split_by_rank_into_equal_bins():
    fires = np.array([5, 5, 5, 5, 1, 2, 3, 100, 7, 8])
    s = strata(fires, 5)
    assert np.bincount(s).tolist() == [2, 2, 2, 2, 2]
    assert s[np.argmax(fires)] == 4 and s[np.argmin(fires)] == 0


def test_stratified_takes_as_evenly_as_the_groups_allow():
    rng = np.random.default_rng(0)
    groups = np.array([0] * 50 + [1] * 2 + [2] * 50)
    take = stratified(groups, 12, rng)
    assert len(take) == 12 and len(set(take)) == 12
    assert np.bincount(groups[take]).tolist() == [5, 2, 5]


def test_floor_latents_share_the_partners_frequency_bin():
    rng = np.random.default_rng(0)
    fires = np.arange(1000) * 3
    fires[7] = 0  # dead: never drawn
    latent_b = np.array([10, 500, 999])
    floor = floor_latents(latent_b, fires, rng)
    assert (floor != latent_b).all() and 7 not in floor
    assert (np.abs(fires[floor] - fires[latent_b]) <= 3 * 20).all()


def test_sample_pairs_keeps_mutual_pairs_only(run):
    _, run_dir, _ = run
    [folder] = list((run_dir / "compare").iterdir())
    pairs = pq.read_table(folder / "pairs.parquet")
    partners = pq.read_table(folder / "partners.parquet")
    s = sample_pairs(pairs, partners, 1000, np.random.default_rng(0))
    table = pairs.to_pandas()
    mutual = table[table.mutual]
    assert len(s) == len(mutual)
    assert set(zip(s.latent_a, s.latent_b, strict=True)) == set(
        zip(mutual.latent_a, mutual.latent_b, strict=True)
    )
