"""The `samesheep` command, run as a real subprocess on tiny models: init/run/info, --help,
one-line errors on bad input, hub ids served from an offline cache, and random: weights."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from helpers import (
    assert_nothing_half_written,
    assert_one_line_error,
    cli,
    cli_parallel,
    flat,
    sets,
    write_corpus,
)
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


# ---------------------------------------------------------------- helpers


def acts_dir(run_dir: Path, model_folder: str, layer: int = 1) -> Path:
    return run_dir / model_folder / f"layer_{layer}" / "acts"


def shard_files(store: Path) -> list[str]:
    return sorted(p.name for p in store.iterdir() if p.name != "manifest.json")


def manifest(store: Path) -> dict:
    return json.loads((store / "manifest.json").read_text())


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory) -> dict[str, str]:
    """The conftest's private cache, for module-scoped fixtures (set up before its monkeypatch)."""
    return {"SAMESHEEP_CACHE": str(tmp_path_factory.getbasetemp() / "cache")}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def corpus(work) -> Path:
    return write_corpus(work / "docs.jsonl")


@pytest.fixture(scope="module")
def trained(tiny_models, work) -> Path:
    """The tiny llama with other weights. The tiny_models folders hold exactly what
    manual_seed(0) + from_config gives, which is also what random: builds (seed 0), so a
    random: run of them would reproduce their activations; these weights stand in for a
    trained model instead."""
    src = tiny_models["llama"]
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src))
    out = work / "trained"
    model.save_pretrained(out)
    for p in src.iterdir():
        if p.name.startswith("tokenizer"):
            shutil.copy(p, out / p.name)
    return out


@pytest.fixture(scope="module")
def hub_cache(trained, work) -> Path:
    """An offline Hugging Face hub cache holding the trained folder as testorg/tiny."""
    cache = work / "hub"
    repo = cache / "models--testorg--tiny"
    snapshot = repo / "snapshots" / HUB_COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HUB_COMMIT)
    for p in trained.iterdir():
        shutil.copy(p, snapshot / p.name)
    return cache


@pytest.fixture(scope="module")
def variants(trained, hub_cache, corpus, work, cache_env) -> dict:
    """The same extraction from the local folder, from the hub id, and from random: weights."""
    hub_env = {**cache_env, "HF_HUB_CACHE": str(hub_cache)}
    runs = {
        "local": (trained, trained.name, cache_env),
        "hub": ("testorg/tiny", "testorg--tiny", hub_env),
        "random": (f"random:{trained}", f"random-{trained.name}", cache_env),
    }
    jobs = {
        name: (["extract", *sets(work / f"run-{name}", model, corpus)], env)
        for name, (model, _, env) in runs.items()
    }
    results = cli_parallel(jobs)
    return {
        name: (results[name], acts_dir(work / f"run-{name}", folder))
        for name, (_, folder, _) in runs.items()
    }


# ---------------------------------------------------------------- init, run, help, info


def test_init_writes_a_config_that_run_accepts(tmp_path, tiny_models, corpus_file):
    cfg = tmp_path / "my.toml"
    res = cli("init", str(cfg))
    assert res.returncode == 0, res.stderr
    assert str(cfg) in res.stdout
    text = cfg.read_text()
    assert "[corpus]" in text and "[extract]" in text and "context_length = 256" in text
    # Edit the written file, so a run that ignored --config would show.
    cfg.write_text(text.replace("context_length = 256", "context_length = 24"))
    run_dir = tmp_path / "run"
    model = tiny_models["gpt2"]
    res = cli("run", "--config", str(cfg), *sets(run_dir, model, corpus_file))
    assert res.returncode == 0, res.stderr
    store = acts_dir(run_dir, model.name)
    m = manifest(store)
    assert m["complete"] and m["context_length"] == 24
    positions = [
        p
        for s in m["shards"]
        for p in pq.read_table(store / f"{s['name']}.tokens.parquet").column("position").to_pylist()
    ]
    assert max(positions) == 23  # long documents fill whole windows of 24, and no more
    # The run records its resolved config; running from that record finds nothing to do.
    recorded = run_dir / "config.toml"
    assert "context_length = 24" in recorded.read_text()
    assert json.dumps(str(model)) in recorded.read_text()
    again = cli("run", "--config", str(recorded))
    assert again.returncode == 0, again.stderr
    assert "unchanged, skipped" in flat(again.stderr)
    # init also starts from a config and applies --set, as every command does.
    derived = tmp_path / "derived.toml"
    res = cli("init", str(derived), "--config", str(cfg), "--set", "train.k=7")
    assert res.returncode == 0, res.stderr
    text = derived.read_text()
    assert "context_length = 24" in text and "\nk = 7\n" in text


def test_progress_without_a_terminal_prints_a_line_per_step(tmp_path, tiny_models, corpus_file):
    """With stderr sent to a file or a pipe (a log, CI, nohup), every long step still says
    that it started and that it finished, at what rate."""
    res = cli("extract", *sets(tmp_path / "run", tiny_models["llama"], corpus_file))
    assert res.returncode == 0, res.stderr
    lines = res.stderr.splitlines()
    for split in ("train", "heldout"):
        assert any(f" {split}: started" in line for line in lines), res.stderr
        done = [line for line in lines if f" {split}: finished" in line]
        assert len(done) == 1 and "tok/s" in done[0], res.stderr
    assert "\x1b[" not in res.stderr and "━" not in res.stderr  # no live bars in a log


@pytest.fixture(scope="module")
def helps(cache_env) -> dict[str, subprocess.CompletedProcess]:
    commands = ["", "init", "run", "corpus", "extract", "info"]
    return cli_parallel({c: ([c, "--help"] if c else ["--help"], cache_env) for c in commands})


@pytest.mark.parametrize(
    ("command", "must_mention"),
    [
        ("", ["init", "run", "corpus", "extract", "info", "--debug"]),
        ("init", ["--force", "path", "--config", "--set"]),
        ("run", ["--config", "--set", "--debug"]),
        ("corpus", ["--config", "--set"]),
        ("extract", ["--config", "--set"]),
        ("info", ["store"]),
    ],
)
def test_help(helps, command, must_mention):
    res = helps[command]
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"usage: samesheep {command}".rstrip() + " "), res.stdout
    for word in must_mention:
        assert word in res.stdout, (word, res.stdout)
    assert res.stderr == ""


def test_info_prints_token_counts(variants):
    res, store = variants["local"]
    assert res.returncode == 0, res.stderr
    m = manifest(store)
    train = [s for s in m["shards"] if s["split"] == "train"]
    heldout = [s for s in m["shards"] if s["split"] == "heldout"]
    assert len(train) >= 2 and heldout
    info = cli("info", str(store))
    assert info.returncode == 0, info.stderr
    n_train = sum(s["tokens"] for s in train)
    n_heldout = sum(s["tokens"] for s in heldout)
    assert n_train == m["tokens"]["train"] and n_heldout == m["tokens"]["heldout"]
    assert f"train: {n_train:,} tokens in {len(train)} shards" in info.stdout
    assert f"heldout: {n_heldout:,} tokens in {len(heldout)} shards" in info.stdout
    assert "layer 1 of 4" in info.stdout and "d_model 32" in info.stdout
    assert info.stdout.rstrip().endswith("complete")
    assert "incomplete" not in info.stdout


# ---------------------------------------------------------------- bad input


def _error_jobs(tmp: Path, tiny_models, tiny_gguf, corpus: Path, hub_cache: Path, env: dict):
    """{case: (args, env, run_dir or None)} for every bad input."""
    llama = tiny_models["llama"]
    gguf_path, _ = tiny_gguf
    data = gguf_path.read_bytes()
    (tmp / "half.gguf").write_bytes(data[: len(data) // 2])
    (tmp / "x.gguf").write_bytes(random.Random(0).randbytes(4096))
    (tmp / "blank.txt").write_text("\n\n   \n\t\n\n", encoding="utf-8")
    (tmp / "latin1.txt").write_bytes("Caf\u00e9 au lait.\n\nNa\u00efve.\n".encode("latin-1"))
    (tmp / "afile").write_text("a regular file\n")
    (tmp / "bad.toml").write_text('this is [not toml = "\n')
    (tmp / "binary.toml").write_bytes(bytes(range(128, 256)))
    (tmp / "unknown.toml").write_text("[extract]\nshard_tokens = 500\nnope = 3\n")
    (tmp / "exists.toml").write_text("# mine\n")
    (tmp / "empty").mkdir()
    (tmp / "corrupt").mkdir()
    (tmp / "corrupt" / "manifest.json").write_text('{"model": "x", "shards": [')
    hub_env = {**env, "HF_HUB_CACHE": str(hub_cache)}

    def extract(name: str, model=llama, **extra: str) -> tuple:
        run = tmp / name
        return (["extract", *sets(run, model, corpus, **extra)], env, run)

    def corpus_cmd(name: str, source: Path) -> tuple:
        run = tmp / name
        src = json.dumps(str(source))
        return (["corpus", *sets(run, llama, corpus, **{"corpus.source": src})], env, run)

    def run_cmd(name: str, *args: str) -> tuple:
        run = tmp / name
        return (["run", *args, *sets(run, llama, corpus)], env, run)

    return {
        "unknown_preset": extract("unknown_preset", "no-such-model"),
        "missing_model_path": extract("missing_model_path", tmp / "no-model-here"),
        "truncated_gguf": extract("truncated_gguf", tmp / "half.gguf"),
        "random_bytes_gguf": extract("random_bytes_gguf", tmp / "x.gguf"),
        "layer_out_of_range": extract("layer_out_of_range", layers="[99]"),
        "hub_id_not_cached": (
            ["extract", *sets(tmp / "hub_absent", "testorg/absent", corpus)],
            hub_env,
            tmp / "hub_absent",
        ),
        "empty_corpus": corpus_cmd("empty_corpus", tmp / "blank.txt"),
        "non_utf8_corpus": corpus_cmd("non_utf8_corpus", tmp / "latin1.txt"),
        "missing_corpus": corpus_cmd("missing_corpus", tmp / "no-such-corpus.jsonl"),
        "unwritable_run_dir": (
            ["extract", *sets(tmp / "afile" / "run", llama, corpus)],
            env,
            tmp / "afile" / "run",
        ),
        "unknown_key_set": run_cmd("unknown_key_set", "--set", "extract.shard_token=5"),
        "unknown_key_file": run_cmd("unknown_key_file", "--config", str(tmp / "unknown.toml")),
        "non_toml_config": run_cmd("non_toml_config", "--config", str(tmp / "bad.toml")),
        "binary_config": run_cmd("binary_config", "--config", str(tmp / "binary.toml")),
        "missing_config": run_cmd("missing_config", "--config", str(tmp / "nowhere.toml")),
        "init_over_existing": (["init", str(tmp / "exists.toml")], env, None),
        "info_empty_folder": (["info", str(tmp / "empty")], env, None),
        "info_on_a_file": (["info", str(tmp / "afile")], env, None),
        "info_corrupt_manifest": (["info", str(tmp / "corrupt")], env, None),
        "debug_after_command": (
            ["extract", "--debug", *sets(tmp / "debug1", "no-such-model", corpus)],
            env,
            tmp / "debug1",
        ),
        "debug_before_command": (
            ["--debug", "extract", *sets(tmp / "debug2", "no-such-model", corpus)],
            env,
            tmp / "debug2",
        ),
    }


@pytest.fixture(scope="module")
def error_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("errors")


@pytest.fixture(scope="module")
def errors(error_tmp, tiny_models, tiny_gguf, corpus, hub_cache, cache_env) -> dict:
    """Every bad-input command, run at once; {case: (result, run_dir)}."""
    jobs = _error_jobs(error_tmp, tiny_models, tiny_gguf, corpus, hub_cache, cache_env)
    results = cli_parallel({name: (args, env) for name, (args, env, _) in jobs.items()})
    return {name: (results[name], jobs[name][2]) for name in jobs}


@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("unknown_preset", "no-such-model"),
        ("missing_model_path", "no-model-here"),
        ("truncated_gguf", "half.gguf"),
        ("random_bytes_gguf", "x.gguf"),
        ("layer_out_of_range", "99"),
        ("hub_id_not_cached", "testorg/absent"),
        ("empty_corpus", "blank.txt"),
        ("non_utf8_corpus", "UTF-8"),
        ("missing_corpus", "no-such-corpus.jsonl"),
        ("unwritable_run_dir", "afile"),
        ("unknown_key_set", "shard_token"),
        ("unknown_key_file", "nope"),
        ("non_toml_config", "bad.toml"),
        ("binary_config", "binary.toml"),
        ("missing_config", "nowhere.toml"),
        ("init_over_existing", "--force"),
        ("info_empty_folder", "empty"),
        ("info_on_a_file", "afile"),
        ("info_corrupt_manifest", "corrupt"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(errors, cache_env, case, says):
    res, run_dir = errors[case]
    assert_one_line_error(res)
    assert says in res.stderr, res.stderr
    if run_dir is not None:
        assert_nothing_half_written(run_dir)
    assert_nothing_half_written(Path(cache_env["SAMESHEEP_CACHE"]), cache=True)


def test_bad_input_leaves_inputs_alone(errors, error_tmp):
    assert errors["init_over_existing"][0].returncode == 2
    assert (error_tmp / "exists.toml").read_text() == "# mine\n", "init overwrote without --force"
    assert errors["unwritable_run_dir"][0].returncode == 2
    assert (error_tmp / "afile").read_text() == "a regular file\n"


@pytest.mark.parametrize(
    "case",
    [
        "debug_after_command",
        "debug_before_command",
    ],
)
def test_debug_shows_the_traceback(errors, case):
    res, run_dir = errors[case]
    assert res.returncode != 0
    assert "Traceback (most recent call last)" in res.stderr, res.stderr
    assert "SamesheepError: unknown model preset 'no-such-model'" in res.stderr
    assert_nothing_half_written(run_dir)


# ---------------------------------------------------------------- hub ids and random weights


def test_hub_id_from_offline_cache_equals_local_folder(variants):
    (local, local_store), (hub, hub_store) = variants["local"], variants["hub"]
    assert local.returncode == 0, local.stderr
    assert hub.returncode == 0, hub.stderr
    assert hub_store.parent.parent.name == "testorg--tiny"
    m_local, m_hub = manifest(local_store), manifest(hub_store)
    assert m_hub["complete"] and m_hub["model"] == "testorg/tiny"
    assert shard_files(hub_store) == shard_files(local_store)
    # (the corpus hash names the tokenizer that counted its tokens: the hub id or the folder)
    own = ("key", "model", "corpus")
    same = {k: v for k, v in m_hub.items() if k not in own}
    assert same == {k: v for k, v in m_local.items() if k not in own}
    for s in m_local["shards"]:
        a = load_file(local_store / f"{s['name']}.safetensors")["acts"]
        b = load_file(hub_store / f"{s['name']}.safetensors")["acts"]
        assert torch.equal(a, b), s["name"]
        ta = pq.read_table(local_store / f"{s['name']}.tokens.parquet")
        assert ta.equals(pq.read_table(hub_store / f"{s['name']}.tokens.parquet"))


def test_random_weights_change_activations_not_tokens(variants):
    (local, local_store), (rnd, rnd_store) = variants["local"], variants["random"]
    assert local.returncode == 0, local.stderr
    assert rnd.returncode == 0, rnd.stderr
    m_rnd = manifest(rnd_store)
    assert m_rnd["complete"] and m_rnd["model"].startswith("random:")
    assert shard_files(rnd_store) == shard_files(local_store)
    for s in manifest(local_store)["shards"]:
        a = load_file(local_store / f"{s['name']}.safetensors")["acts"].float()
        b = load_file(rnd_store / f"{s['name']}.safetensors")["acts"].float()
        assert a.shape == b.shape and torch.isfinite(b).all()
        # Different weights: not a copy, not a rescaling, clearly apart on most values.
        assert (a - b).abs().mean() > 0.1 * a.abs().mean(), s["name"]
        # The same tokens; only the activations' norms differ.
        ta = pq.read_table(local_store / f"{s['name']}.tokens.parquet")
        tb = pq.read_table(rnd_store / f"{s['name']}.tokens.parquet")
        assert ta.drop_columns("norm").equals(tb.drop_columns("norm"))
        assert not ta.column("norm").equals(tb.column("norm"))
