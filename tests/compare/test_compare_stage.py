"""The compare stage through the real CLI on two tiny models: every pair compared with its
floor (random-weights copies), nulls and seed ceilings; the files; one-line errors."""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest
from helpers import assert_one_line_error, cli, flat, sets, write_corpus

from samesheep.report import overview
from samesheep.report.site import percent


@pytest.fixture(scope="module")
def run(tiny_models, tmp_path_factory, env):
    corpus = write_corpus(tmp_path_factory.mktemp("ccorpus") / "docs.jsonl", n=60, titles=True)
    run_dir = tmp_path_factory.mktemp("compare_run")
    models = json.dumps([str(tiny_models["llama"]), str(tiny_models["gpt2"])])
    extra = {
        "models": models,
        "compare.min_fires": "5",
        "compare.groups": "5",
        "compare.geometry_pairings": "10",
    }
    args = sets(run_dir, tiny_models["llama"], corpus, **extra)
    res = cli("run", *args, env=env)
    return res, run_dir, args, tiny_models


def test_run_compares_with_floor_null_and_ceiling(run):
    res, run_dir, _, tiny_models = run
    assert res.returncode == 0, res.stderr
    # the floor's random copies and the ceiling's second seed were made
    assert (run_dir / "random-llama0" / "layer_1" / "sae" / "cfg.json").is_file()
    assert (run_dir / "llama0" / "layer_1" / "sae-seed1" / "cfg.json").is_file()
    assert not (run_dir / "random-llama0" / "layer_1" / "features").exists()
    out = run_dir / "compare" / "llama0__gpt20"
    summary = json.loads((out / "summary.json").read_text())
    raw = summary["headline"]["raw"]["a_to_b"]
    for role in ("raw", "floor", "null", "across", "ceiling", "untrained_pair"):
        assert 0 <= raw[role]["share_r0.5"] <= 1, role
    assert "share_r0.5" in raw["normalised"]
    lo, hi = raw["intervals"]["share_r0.5"]["raw"]
    assert lo <= raw["raw"]["share_r0.5"] <= hi
    # fixed source: number, floor and ceiling count the same latents of A
    ans = raw["answer"]
    assert ans["raw"]["judged"] == ans["floor"]["judged"] == ans["ceiling"]["judged"]
    assert ans["mode"] in ("crossfit", "in_sample") and "normalised" in ans
    assert set(raw["crossfit"]) >= {"raw", "floor", "ceiling", "normalised", "intervals"}
    split = raw["split"]
    assert (
        split["surface"]["raw"]["judged"] + split["rest"]["raw"]["judged"] == ans["raw"]["judged"]
    )
    assert len(raw["normalised_curve"]) == 21
    assert summary["headline"]["residual"]["b_to_a"]["raw"]["judged"] > 0
    # the same tokenizer on both sides: the units are the tokens (a few are left out: after
    # window breaks, and where a random copy's norm limit drops a token)
    cov = summary["coverage"]
    assert summary["units"] > 100 and cov["one_to_one_share_a"] > 0.95
    assert cov["tokens_per_unit_a"] < 1.05 and cov["tokens_per_unit_b"] < 1.05
    partners = pq.read_table(out / "partners.parquet").to_pandas()
    assert set(partners.side) == {"a", "b"} and "partner_by_meaning" in partners
    assert len(partners) == 128 * 2
    for col in (
        "surface_r",
        "surface_partner",
        "surface_model",
        "floor_r",
        "ceiling_r",
        "crossfit_r",
    ):
        assert col in partners, col
    models = {"random:" + str(tiny_models[k]) for k in ("llama", "gpt2")}
    assert set(partners.surface_model) <= models  # the untrained copy that holds the partner
    # the surface score is the best r against either untrained SAE: at least the floor's
    assert (partners.surface_r >= partners.floor_r - 1e-12).all()
    pairs = pq.read_table(out / "pairs.parquet").to_pandas()
    assert pairs.latent_a.is_unique and pairs.latent_b.is_unique
    assert (pairs.beyond_surface == ((pairs.surface_r_a < 0.5) & (pairs.surface_r_b < 0.5))).all()
    pq.read_table(out / "families.parquet")
    assert "judged latents have a" in flat(res.stderr)
    assert "Normalised agreement at r >= 0.5" in flat(res.stderr)


def test_every_judged_latent_is_shared_spread_or_absent(run):
    """The probes ran on the stage's units: per direction the three shares sum to one over
    the probed latents, with intervals around them; the partner table labels the same
    latents, and its R^2 columns obey their definitions."""
    res, run_dir, _, _ = run
    summary = json.loads((run_dir / "compare" / "llama0__gpt20" / "summary.json").read_text())
    presence = summary["presence"]
    partners = pq.read_table(run_dir / "compare" / "llama0__gpt20" / "partners.parquet")
    partners = partners.to_pandas()
    for direction, side in (("a_to_b", "a"), ("b_to_a", "b")):
        e = presence[direction]
        assert 0 < e["probed"] <= e["judged"]
        assert abs(sum(e["shares"].values()) - 1) < 1e-9
        for k, (lo, hi) in e["intervals"].items():
            assert lo - 1e-9 <= e["shares"][k] <= hi + 1e-9, k
        mine = partners[partners.side == side]
        probed = mine[mine.presence != ""]
        assert len(probed) == e["probed"]
        assert probed.presence.value_counts().to_dict() == {
            k: v for k, v in e["counts"].items() if v
        }
        # shared means a partner at the headline r (cross-fitted or in-sample, as shown)
        best = probed.crossfit_r if presence["mode"] == "crossfit" else probed.r
        assert ((probed.presence == "shared") == (best >= 0.5)).all()
        cond = probed.probe_r2_both - probed.probe_r2_floor
        assert (abs(cond - probed.probe_conditional_r2) < 1e-9).all()
        spread = probed[probed.presence == "spread"]
        assert (spread.probe_conditional_r2 >= 0.05).all()
        assert (mine[mine.presence == ""].probe_r2.isna()).all()
    assert "present but spread out" in flat(res.stderr)


def test_rerun_skips_and_prints_the_answer(run, env):
    _, run_dir, args, _ = run
    summary = run_dir / "compare" / "llama0__gpt20" / "summary.json"
    before = summary.stat().st_mtime_ns
    res = cli("compare", *args, env=env)
    assert res.returncode == 0, res.stderr
    assert "unchanged, skipped" in flat(res.stderr) and "judged latents" in flat(res.stderr)
    assert summary.stat().st_mtime_ns == before


def test_a_pair_naming_another_model_is_a_one_line_error(run, env):
    _, _, args, _ = run
    res = cli("compare", *args, "--set", 'compare.pairs=["nope:other"]', env=env)
    assert_one_line_error(res)
    assert "compare pair" in res.stderr


def test_compare_before_train_names_the_stage(tiny_models, tmp_path, env):
    corpus = write_corpus(tmp_path / "docs.jsonl", n=30)
    models = json.dumps([str(tiny_models["llama"]), str(tiny_models["gpt2"])])
    args = sets(tmp_path / "r", tiny_models["llama"], corpus, models=models)
    assert cli("extract", *args, env=env).returncode == 0
    res = cli("compare", *args, env=env)
    assert_one_line_error(res)
    assert "samesheep train" in res.stderr


def test_later_stages_leave_out_tokens_by_their_norm(run, env, tmp_path):
    """The compare stage uses the token rule of training, the norm limit included: with a
    tight limit its units hold exactly the tokens the rule keeps, fewer than by default."""
    from helpers import copy_run

    from samesheep.core.config import TrainConfig
    from samesheep.data.store import open_store
    from samesheep.sae.training import filter_counts, token_filter

    _, run_dir, args, _ = run
    copy, cargs = copy_run(run_dir, args, tmp_path / "copy")
    res = cli("compare", *cargs, "--set", "train.max_norm_ratio=1.05", env=env)
    assert res.returncode == 0, res.stderr
    cov = json.loads((copy / "compare" / "llama0__gpt20" / "summary.json").read_text())["coverage"]
    store = open_store(copy / "llama0" / "layer_1" / "acts")

    def kept(ratio: float) -> int:
        tokens = token_filter(store, TrainConfig(max_norm_ratio=ratio))
        return sum(filter_counts(store, tokens, split)[0] for split in ("train", "heldout"))

    assert cov["kept_tokens_a"] == kept(1.05) < kept(3.0)
    default = json.loads((run_dir / "compare" / "llama0__gpt20" / "summary.json").read_text())
    assert default["coverage"]["kept_tokens_a"] == kept(3.0)


def test_stores_from_another_corpus_are_a_one_line_error(run, env, tmp_path):
    from helpers import copy_run

    _, run_dir, args, _ = run
    copy, cargs = copy_run(run_dir, args, tmp_path / "copy")
    summary = copy / "compare" / "llama0__gpt20" / "summary.json"
    summary.unlink()
    manifest = copy / "corpus" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["hash"] = "0" * 16  # as if the corpus had been sampled again since extraction
    manifest.write_text(json.dumps(data))
    res = cli("compare", *cargs, env=env)
    assert_one_line_error(res)
    assert "another corpus" in res.stderr and "samesheep extract" in res.stderr
    assert not summary.exists()


def test_compare_without_features_names_the_stage(run, env, tmp_path):
    from helpers import copy_run

    _, run_dir, args, _ = run
    copy, cargs = copy_run(run_dir, args, tmp_path / "copy")
    (copy / "compare" / "llama0__gpt20" / "summary.json").unlink()
    (copy / "gpt20" / "layer_1" / "features" / "summary.json").unlink()
    res = cli("compare", *cargs, env=env)
    assert_one_line_error(res)
    assert "samesheep features" in res.stderr
    assert not (copy / "compare" / "llama0__gpt20" / "summary.json").exists()


def test_the_python_api_returns_the_comparison(run, tmp_path):
    import samesheep

    _, run_dir, _, _ = run
    cfg = samesheep.load_config(run_dir / "config.toml")
    out = samesheep.compare_models(cfg)
    [(key, comparison)] = out.items()
    assert key[:2] == (cfg.models[0], cfg.models[1])
    assert comparison.summary["units"] > 100
    assert comparison.partners.num_rows == 2 * 128
    assert comparison.pairs.num_rows == comparison.summary["matched_pairs"]["pairs"]
    assert "members" in comparison.families.column_names


@pytest.mark.parametrize("arch", ["jumprelu", "relu"])
def test_every_architecture_gets_its_floor_and_seed_ceiling(run, env, tmp_path, arch):
    """With another architecture, every SAE of the run (the models', the random copies' and
    the second seeds') is trained with it, and the comparison's floor and ceiling come from
    those: the seed ceiling is that architecture's."""
    from helpers import copy_run

    _, run_dir, args, _ = run
    copy, cargs = copy_run(run_dir, args, tmp_path / "copy")
    res = cli("run", *cargs, "--set", f'train.architecture="{arch}"', env=env)
    assert res.returncode == 0, res.stderr
    for sae in ("llama0/layer_1/sae", "llama0/layer_1/sae-seed1", "random-gpt20/layer_1/sae"):
        saved = json.loads((copy / sae / "cfg.json").read_text())
        assert saved["samesheep"]["architecture"] == arch, sae
    summary = json.loads((copy / "compare" / "llama0__gpt20" / "summary.json").read_text())
    raw = summary["headline"]["raw"]["a_to_b"]
    for role in ("raw", "floor", "ceiling"):
        assert 0 <= raw[role]["share_r0.5"] <= 1, role
    assert raw["ceiling"]["judged"] > 0


def test_the_ceiling_can_use_another_architecture(run, env, tmp_path):
    """compare.ceiling_architecture trains the second-seed SAEs with another architecture,
    kept in their own folders beside the main ones; the summary and the report say which."""
    from helpers import copy_run

    _, run_dir, args, _ = run
    copy, cargs = copy_run(run_dir, args, tmp_path / "copy")
    res = cli("run", *cargs, "--set", 'compare.ceiling_architecture="relu"', env=env)
    assert res.returncode == 0, res.stderr

    def arch(sae: str) -> str:
        return json.loads((copy / sae / "cfg.json").read_text())["samesheep"]["architecture"]

    assert arch("llama0/layer_1/sae") == "topk"
    assert arch("llama0/layer_1/sae-seed1") == "topk"  # the default ceiling's SAE, kept
    assert arch("llama0/layer_1/sae-seed1-relu") == "relu"
    assert arch("gpt20/layer_1/sae-seed1-relu") == "relu"
    summary = json.loads((copy / "compare" / "llama0__gpt20" / "summary.json").read_text())
    assert (summary["architecture"], summary["ceiling_architecture"]) == ("topk", "relu")
    raw = summary["headline"]["raw"]["a_to_b"]
    assert raw["ceiling"]["judged"] > 0 and 0 <= raw["ceiling"]["share_r0.5"] <= 1
    first = json.loads((run_dir / "compare" / "llama0__gpt20" / "summary.json").read_text())
    assert first["ceiling_architecture"] == "topk"
    page = (copy / "report" / "index.html").read_text()
    assert "a second relu SAE on" in page


def test_an_unknown_ceiling_architecture_is_one_line(run, env):
    args = run[2]
    res = cli("extract", *args, "--set", 'compare.ceiling_architecture="gated"', env=env)
    assert_one_line_error(res)
    assert "compare.ceiling_architecture" in res.stderr


@pytest.mark.parametrize(
    ("setting", "name"),
    [("compare.probe_min_r2=1.5", "probe_min_r2"), ("compare.probe_folds=1", "probe_folds")],
)
def test_a_bad_probe_setting_is_one_line(run, env, setting, name):
    res = cli("compare", *run[2], "--set", setting, env=env)
    assert_one_line_error(res)
    assert name in res.stderr


def test_without_probes_the_comparison_has_no_labels(run, env, tmp_path):
    """compare.probes = false: no presence in the summary or the partner table (and the
    rest of the comparison unchanged)."""
    _, run_dir, args, _ = run
    res = cli("compare", *args, "--set", "compare.probes=false", env=env)
    assert res.returncode == 0, res.stderr
    out = run_dir / "compare" / "llama0__gpt20"
    summary = json.loads((out / "summary.json").read_text())
    assert "presence" not in summary
    assert "presence" not in pq.read_table(out / "partners.parquet").column_names
    res = cli("compare", *args, env=env)  # back as the module's other tests expect it
    assert res.returncode == 0, res.stderr


def test_dictionaries_go_through_the_comparison_and_skip_when_unchanged(run, env):
    _, run_dir, args, _ = run
    fast = ("--set", "dictionaries.ica_iter=50", "--set", "dictionaries.nmf_passes=5")
    res = cli("dictionaries", *args, *fast, env=env)
    assert res.returncode == 0, res.stderr
    out = run_dir / "compare" / "llama0__gpt20" / "dictionaries.json"
    record = json.loads(out.read_text())
    assert set(record["methods"]) == {"pca", "ica", "nmf"}
    for method, entry in record["methods"].items():
        assert set(entry["width"].values()) == {32}, method  # the tiny models' hidden width
        for direction in ("a_to_b", "b_to_a"):
            ans = entry["answer"][direction]
            # fixed source: number, floor and ceiling judge the same latents
            assert ans["raw"]["judged"] == ans["floor"]["judged"] == ans["ceiling"]["judged"]
            assert ans["raw"]["judged"] > 0, method
            assert 0 <= ans["raw"]["share_r0.5"] <= 1 and "share_r0.5" in ans["normalised"]
    assert record["sae"]["a_to_b"]["raw"]["judged"] > 0
    text = flat(res.stderr)
    assert "Dictionaries of" in text and "ICA" in text and "normalised" in text
    before = out.stat().st_mtime_ns
    res = cli("dictionaries", *args, *fast, env=env)
    assert res.returncode == 0, res.stderr
    assert "unchanged, skipped" in flat(res.stderr) and out.stat().st_mtime_ns == before
    # the report shows them beside the SAE pair, and rebuilds when they change
    res = cli("report", *args, env=env)
    assert res.returncode == 0, res.stderr
    index = (run_dir / "report" / "index.html").read_text()
    assert "Dictionaries that are not SAEs" in index
    table = index[index.index('class="numbers dictionaries"') :].split("</table>")[0]
    assert table.count("<tr>") == 1 + 4 * 2  # header; SAE, PCA, ICA, NMF in both directions
    assert ">ICA<" in table and ">SAE<" in table
    # made beside another comparison (its SAE row would be stale): the report leaves it out
    record = json.loads(out.read_text())
    out.write_text(json.dumps({**record, "compare_key": "an older comparison"}))
    res = cli("report", *args, env=env)
    assert res.returncode == 0, res.stderr
    assert "Dictionaries that are not SAEs" not in (run_dir / "report" / "index.html").read_text()
    out.write_text(json.dumps(record))


def test_an_unknown_dictionary_is_one_line(run, env):
    res = cli("dictionaries", *run[2], "--set", 'dictionaries.methods="pca,svd"', env=env)
    assert_one_line_error(res)
    assert "dictionaries.methods" in res.stderr


def test_crosscoder_of_the_pair_with_its_floor_ceiling_and_tie_back(run, env):
    _, run_dir, args, _ = run
    fast = ("--set", "crosscode.train_units=20000")
    res = cli("crosscode", *args, *fast, env=env)
    assert res.returncode == 0, res.stderr
    out = run_dir / "compare" / "llama0__gpt20"
    record = json.loads((out / "crosscoder.json").read_text())
    assert [m.rsplit("/", 1)[-1] for m in record["models"]] == ["llama0", "gpt20"]
    assert set(record["roles"]) == {"main", "floor", "ceiling"}
    assert record["training_units"] + record["heldout_units"] == record["units"]
    for role, entry in record["roles"].items():
        assert entry["live"] > 0, role
        assert abs(sum(entry["shares"].values()) - 1) < 1e-9
        assert all(0 <= f < 2 for f in entry["fvu"]), role
        assert (out / "crosscoder" / role / "crosscoder.safetensors").is_file()
    # the floor's second model is the untrained copy; the ceiling's a rotation of the first
    assert f"random:{record['models'][1]} only" in record["roles"]["floor"]["shares"]
    assert set(record["own_sae_fvu"]) == set(record["models"])
    assert set(record["ce_loss_recovered"]) == set(record["models"])
    for ce in record["ce_loss_recovered"].values():
        assert ce["scored_tokens"] > 0 and ce["ce_zero"] != ce["ce_clean"]
        assert math.isfinite(ce["crosscoder"]) and math.isfinite(ce["own_sae"])
    s = record["shared"]
    for name in ("raw", "floor", "ceiling"):
        lo, hi = s[name]["interval"]
        assert lo <= s[name]["share"] <= hi
    table = record["tie_back"]["table"]
    for name, row in table.items():
        assert (
            row["sae_partners_agree"] + row["another_partner"] + row["no_partner"]
            == (row["latents"])
        ), name
    text = flat(res.stderr)
    assert "Crosscoder of" in text and "normalised" in text and "with its own SAE" in text
    before = (out / "crosscoder.json").stat().st_mtime_ns
    res = cli("crosscode", *args, *fast, env=env)
    assert res.returncode == 0, res.stderr
    assert "unchanged, skipped" in flat(res.stderr)
    assert (out / "crosscoder.json").stat().st_mtime_ns == before
    # the report's rows read each class by name
    view = overview.crosscoder_view(record, "A", "B")
    first, second = record["models"]
    for row, role in zip(view["rows"], ("main", "floor", "ceiling"), strict=True):
        shares = record["roles"][role]["shares"]
        assert row["a_only"] == percent(shares[f"{first} only"])
        assert row["shared"] == percent(shares["shared"])
    assert view["rows"][0]["b_only"] == percent(record["roles"]["main"]["shares"][f"{second} only"])
    # the report shows it beside the comparison its tie back read, and not beside another
    res = cli("report", *args, env=env)
    assert res.returncode == 0, res.stderr
    index = (run_dir / "report" / "index.html").read_text()
    assert "the crosscoder</h3>" in index
    table = index[index.index('class="numbers crosscoder"') :].split("</table>")[0]
    assert table.count("<tr>") == 1 + 3  # header; trained pair, floor, ceiling
    assert "untrained copy" in table and "rotation" in table
    assert 'class="numbers crosscoder-tie"' in index
    record = json.loads((out / "crosscoder.json").read_text())
    (out / "crosscoder.json").write_text(json.dumps({**record, "compare_key": "older"}))
    res = cli("report", *args, env=env)
    assert res.returncode == 0, res.stderr
    assert "the crosscoder</h3>" not in (run_dir / "report" / "index.html").read_text()
    (out / "crosscoder.json").write_text(json.dumps(record))


def test_bad_crosscode_settings_are_one_line(run, env):
    res = cli("crosscode", *run[2], "--set", "crosscode.dedicated=0.7", env=env)
    assert_one_line_error(res)
    assert "crosscode.dedicated" in res.stderr
