"""Extraction into the store: values, windows, offsets, batching, dtypes."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

import samesheep
from samesheep.core.errors import SamesheepError
from samesheep.data.corpus import read_documents
from samesheep.data.store import to_store_dtype
from samesheep.lm.extraction import Window, bos_prefix, length_batches, windows_of
from samesheep.lm.models import capture, load_model


def run_extract(tmp_path, model, corpus_file, **over):
    settings = dict(
        run_dir=str(tmp_path / "run"),
        models=[str(model)],
        layers=[1, -1],
        corpus__source=str(corpus_file),
        corpus__max_tokens=2000,
        corpus__heldout_tokens=300,
        extract__shard_tokens=400,
        extract__context_length=48,
        extract__batch_tokens=256,
        extract__dtype="float32",
        extract__store_dtype="float32",
    )
    settings.update(over)
    return samesheep.extract(None, **settings)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_store_holds_the_model_activations(tmp_path, tiny_models, corpus_file, arch):
    result = run_extract(tmp_path, tiny_models[arch], corpus_file)
    (info,) = result.values()
    assert info["layers"] == [1, 3] and not info["skipped"]
    lm = load_model(str(tiny_models[arch]))
    run = tmp_path / "run"
    docs = {"train": list(read_documents(run / "corpus" / "train.jsonl"))}
    store = samesheep.open_store(run / tiny_models[arch].name / "layer_3" / "acts")
    assert store.complete and store.d_model == 32 and store.layer == 3
    assert store.num_tokens("train") == info["tokens"]["train"] >= 2000
    assert len(store.shard_names("train")) >= 4  # shard_tokens 400 of >= 2000 tokens
    checked = 0
    for shard in store.shards("train"):
        t = shard.tokens.to_pydict()
        starts = [i for i, p in enumerate(t["position"]) if p == 0] + [len(t["position"])]
        for a, b in itertools.pairwise(starts):
            assert b - a <= 48
            ids = torch.tensor(t["token_id"][a:b])[None]
            want = capture(lm.model, [3], ids)[3][0]
            torch.testing.assert_close(shard.acts[a:b], want, rtol=0, atol=1e-5)
            doc = docs["train"][t["doc_index"][a]]
            assert doc.id == t["doc_id"][a]
            assert t["special"][a] and t["char_start"][a] == t["char_end"][a]  # BOS, no text
            norms = torch.tensor(t["norm"][a:b])
            torch.testing.assert_close(norms, want.norm(dim=-1), rtol=1e-5, atol=1e-5)
            for tid, s, e in zip(
                t["token_id"][a + 1 : b],
                t["char_start"][a + 1 : b],
                t["char_end"][a + 1 : b],
                strict=True,
            ):
                assert lm.tokenizer.decode([tid]) == doc.text[s:e]
            checked += 1
    assert checked >= 10


def test_long_documents_are_windowed(tiny_models):
    lm = load_model(str(tiny_models["llama"]))
    text = "The cat sat on the mat. " * 30
    (doc,) = [d for d in [samesheep.data.corpus.Document("d", text)]]
    wins = windows_of([(0, doc)], lm.tokenizer, [295], context_length=16)
    total = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert all(len(w.ids) <= 16 and w.ids[0] == 295 and w.special[0] for w in wins)
    assert [w.window for w in wins] == list(range(len(wins)))
    assert np.concatenate([w.ids[1:] for w in wins]).tolist() == total
    # every token's span, window after window, rebuilds the text
    assert (
        "".join(text[s:e] for w in wins for s, e in zip(w.starts[1:], w.ends[1:], strict=True))
        == text
    )


def test_padding_and_batching_do_not_change_values(tmp_path, tiny_models, corpus_file):
    a = tmp_path / "a"
    b = tmp_path / "b"
    run_extract(a, tiny_models["qwen2"], corpus_file, extract__batch_tokens=48)  # one window
    run_extract(b, tiny_models["qwen2"], corpus_file, extract__batch_tokens=4096)  # padded
    name = tiny_models["qwen2"].name
    sa = samesheep.open_store(a / "run" / name / "layer_1" / "acts")
    sb = samesheep.open_store(b / "run" / name / "layer_1" / "acts")
    for x, y in zip(sa.shards(None), sb.shards(None), strict=True):
        assert x.tokens.drop_columns("norm").equals(y.tokens.drop_columns("norm"))
        torch.testing.assert_close(x.acts, y.acts, rtol=0, atol=1e-5)
        nx, ny = (torch.tensor(t.tokens.column("norm").to_numpy()) for t in (x, y))
        torch.testing.assert_close(nx, ny, rtol=1e-5, atol=1e-5)


def test_length_batches_respect_budget():
    wins = [Window(0, "d", 0, np.zeros(n, int), None, None, None) for n in [5, 9, 3, 9, 7, 1]]
    batches = length_batches(wins, batch_tokens=18)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for b in batches:
        lens = [len(wins[i].ids) for i in b]
        assert lens == sorted(lens, reverse=True)
        assert len(b) == 1 or max(lens) * len(b) <= 18


def test_bos_prefix(tiny_models, tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert bos_prefix(tok, "tokenizer") == []  # this tokenizer adds nothing
    assert bos_prefix(tok, "auto") == [tok.bos_token_id]  # so auto puts BOS there
    assert bos_prefix(tok, "no") == []
    with pytest.raises(SamesheepError):
        bos_prefix(tok, "maybe")


def test_bos_marks_position_zero_special(tmp_path, tiny_models, corpus_file):
    run_extract(tmp_path, tiny_models["gpt2"], corpus_file, extract__add_bos="auto")
    store = samesheep.open_store(tmp_path / "run" / tiny_models["gpt2"].name / "layer_1" / "acts")
    shard = next(store.shards())
    t = shard.tokens.to_pydict()
    first = [i for i, p in enumerate(t["position"]) if p == 0]
    assert all(t["special"][i] and t["char_start"][i] == t["char_end"][i] for i in first)
    assert sum(t["special"]) == len(first)
    kept = shard.mask()
    assert int(kept.sum()) == len(t["position"]) - len(first)


def test_store_dtypes_and_manifest(tmp_path, tiny_models, corpus_file):
    run_extract(tmp_path, tiny_models["llama"], corpus_file, extract__store_dtype="bfloat16")
    folder = tmp_path / "run" / tiny_models["llama"].name / "layer_1" / "acts"
    shard = next(samesheep.open_store(folder).shards())
    assert shard.acts.dtype == torch.bfloat16
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["dtype"] == "bfloat16" and manifest["compute_dtype"] == "float32"
    assert manifest["complete"] and manifest["tokens"]["heldout"] >= 300


def test_never_writes_non_finite_or_overflowing_values():
    x = torch.tensor([[1.0, 88_000.0]])
    assert torch.equal(to_store_dtype(x, "float32", "s"), x)
    assert to_store_dtype(x, "bfloat16", "s").dtype == torch.bfloat16
    with pytest.raises(SamesheepError, match="float16"):
        to_store_dtype(x, "float16", "gemma/layer_12/acts/train-00003")
    with pytest.raises(SamesheepError, match="train-00007"):
        to_store_dtype(torch.tensor([[1.0, float("nan")]]), "float32", "m/layer_1/acts/train-00007")
    with pytest.raises(SamesheepError, match="non-finite"):
        to_store_dtype(torch.tensor([[float("inf")]]), "bfloat16", "x")


def test_auto_dtype_follows_hardware(monkeypatch):
    from samesheep.core import device

    cpu = torch.device("cpu")
    monkeypatch.setattr(device, "cpu_bf16_measured", lambda: True)
    monkeypatch.setattr(device, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    assert device.choose_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(device, "cpu_flags", lambda: frozenset({"avx2", "amx_bf16"}))
    assert device.choose_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(device, "cpu_flags", lambda: frozenset({"avx2"}))
    assert device.choose_dtype("auto", cpu) == torch.float32
    # the instructions exist, but bfloat16 measured no faster (an Intel Xeon with avx512_bf16)
    monkeypatch.setattr(device, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    monkeypatch.setattr(device, "cpu_bf16_measured", lambda: False)
    assert device.choose_dtype("auto", cpu) == torch.float32
    assert device.choose_dtype("bfloat16", cpu) == torch.bfloat16  # named: never second-guessed
    assert device.choose_dtype("float16", cpu) == torch.float16
    with pytest.raises(SamesheepError):
        device.choose_dtype("int8", cpu)


def test_bf16_speed_is_measured_once_and_remembered(monkeypatch, tmp_path):
    from samesheep.core import device

    monkeypatch.setenv("SAMESHEEP_CACHE", str(tmp_path))
    rates = {torch.float32: 259.0, torch.bfloat16: 144.0}
    calls = []

    def fake_rate(dtype, device_=None, n=2048, budget_s=2.0):
        calls.append(dtype)
        return device.MatmulRate(dtype, rates[dtype], n, False)

    monkeypatch.setattr(device, "matmul_rate", fake_rate)

    def measured() -> bool:
        device.cpu_bf16_measured.cache_clear()
        return device.cpu_bf16_measured()

    rounds = [torch.float32, torch.bfloat16] * device.RATE_ROUNDS  # in turn, not one then other
    assert measured() is False and calls == rounds  # slower in bfloat16: float32
    rates[torch.bfloat16] = 2400.0
    assert measured() is False and len(calls) == len(rounds)  # remembered: no new measurement
    threads = torch.get_num_threads()
    try:  # one machine, one answer: a CLI run and a library caller use other thread counts
        torch.set_num_threads(1 if threads > 1 else 2)
        assert measured() is False and len(calls) == len(rounds)
    finally:
        torch.set_num_threads(threads)
    saved = json.loads((tmp_path / "machine.json").read_text())
    assert [e["bf16_fast"] for e in saved.values()] == [False]
    (tmp_path / "machine.json").write_text("{not json")  # damaged: measured again
    assert measured() is True and len(calls) == 2 * len(rounds)
    (tmp_path / "machine.json").unlink()
    rates[torch.bfloat16] = 1.2 * 259.0  # under the margin
    assert measured() is False
    rates[torch.bfloat16] = 1.3 * 259.0
    (tmp_path / "machine.json").unlink()
    assert measured() is True
    device.cpu_bf16_measured.cache_clear()


def test_a_slow_spell_of_the_machine_does_not_decide_the_dtype(monkeypatch, tmp_path):
    """The failure seen in CI: float32 measured during a slow spell (86 GFLOP/s against its
    usual 259) made bfloat16 (144) look 1.7x faster. Measured in turn, each dtype's best
    round counts, and one slow round changes nothing."""
    from samesheep.core import device

    monkeypatch.setenv("SAMESHEEP_CACHE", str(tmp_path))
    f32 = iter([86.0] + [259.0] * (device.RATE_ROUNDS - 1))

    def fake_rate(dtype, device_=None, n=2048, budget_s=2.0):
        gflops = next(f32) if dtype == torch.float32 else 144.0
        return device.MatmulRate(dtype, gflops, n, False)

    monkeypatch.setattr(device, "matmul_rate", fake_rate)
    device.cpu_bf16_measured.cache_clear()
    try:
        assert device.cpu_bf16_measured() is False
    finally:
        device.cpu_bf16_measured.cache_clear()


def test_matmul_rate_lowers_the_size_of_a_slow_dtype(monkeypatch):
    """Where a dtype runs slowly (bfloat16 without hardware support: minutes for 2048^2), the
    measurement lowers the product's size to stay within its time budget, and says so."""
    from samesheep.core import device

    clock = {"t": 0.0}

    def slow_mm(a, b):  # a simulated second per 256^3 multiply-adds
        clock["t"] += (a.shape[0] / 256) ** 3
        return a

    monkeypatch.setattr(device.torch, "mm", slow_mm)
    monkeypatch.setattr(device.time, "perf_counter", lambda: clock["t"])
    rate = device.matmul_rate(torch.float32, n=2048, budget_s=2.0)
    assert rate.capped and rate.n == 256 and "lowered" in rate.describe()
    assert rate.gflops == pytest.approx(2 * 256**3 / 1e9)
    assert clock["t"] <= 2.0 + 1.0  # the budget, give or take the last product

    def fast_mm(a, b):
        clock["t"] += 1e-6 * (a.shape[0] / 256) ** 3
        return a

    monkeypatch.setattr(device.torch, "mm", fast_mm)
    rate = device.matmul_rate(torch.float32, n=2048, budget_s=2.0)
    assert not rate.capped and rate.n == 2048


def test_writer_clears_what_a_killed_writer_left(tmp_path):
    from samesheep.data.store import StoreWriter

    folder = tmp_path / "acts"
    folder.mkdir()
    left = [folder / ".tmpX1b2C3", folder / ".train-00003.safetensors.4242.tmp"]
    for p in left:
        p.write_bytes(b"partial")
    keep = folder / "notes.txt"
    keep.write_text("mine")
    StoreWriter(folder, {"key": "k", "layer": 1})
    assert not any(p.exists() for p in left)
    assert keep.exists()


def test_deleted_shard_is_written_again_in_its_place(tmp_path, tiny_models, corpus_file):
    """Rewritten byte for byte, and listed where it was: the order of the shards decides the
    batch order and the input scale of training, under an unchanged store key."""
    run_extract(tmp_path, tiny_models["llama"], corpus_file)
    store = tmp_path / "run" / tiny_models["llama"].name / "layer_1" / "acts"
    before = samesheep.open_store(store)
    order = before.shard_names(None)
    data = (store / "train-00001.safetensors").read_bytes()
    (store / "train-00001.safetensors").unlink()
    (info,) = run_extract(tmp_path, tiny_models["llama"], corpus_file).values()
    assert not info["skipped"]
    again = samesheep.open_store(store)
    assert again.complete and again.shard_names(None) == order
    assert again.manifest == before.manifest
    assert (store / "train-00001.safetensors").read_bytes() == data


def test_adding_a_layer_keeps_the_stores_already_made(tmp_path, tiny_models, corpus_file):
    model = tiny_models["gpt2"]
    run_extract(tmp_path, model, corpus_file, layers=[1])
    store1 = tmp_path / "run" / model.name / "layer_1" / "acts"
    stamps = {p.name: p.stat().st_mtime_ns for p in store1.glob("*-*.safetensors")}
    (info,) = run_extract(tmp_path, model, corpus_file, layers=["1", 2]).values()
    assert info["layers"] == [1, 2] and not info["skipped"]
    assert {p.name: p.stat().st_mtime_ns for p in store1.glob("*-*.safetensors")} == stamps
    assert samesheep.open_store(tmp_path / "run" / model.name / "layer_2" / "acts").complete


def test_a_long_document_spreads_over_shards(tiny_models):
    from samesheep.data.corpus import Document
    from samesheep.lm.extraction import shard_groups

    lm = load_model(str(tiny_models["llama"]))
    docs = [Document("short", "A cat."), Document("long", "The sea is never full. " * 200)]
    groups = list(shard_groups(docs, lm.tokenizer, [295], context_length=32, shard_tokens=100))
    assert len(groups) > 5
    assert all(sum(len(w.ids) for w in g) < 100 + 32 for _, _, g in groups)
    assert [w.window for _, _, g in groups for w in g if w.doc_id == "long"] == list(
        range(sum(1 for _, _, g in groups for w in g if w.doc_id == "long"))
    )
    assert groups[-1][:2] == (1, 2)


def test_non_ascii_offsets(tiny_models):
    """Byte-level pieces of one character share its span; every window's tokens decode to
    exactly the text its spans cover."""
    from samesheep.data.corpus import Document

    lm = load_model(str(tiny_models["llama"]))
    text = "Zürich und 北京 sind Städte; \U0001d518 ist ein Zeichen. " * 3
    wins = windows_of([(0, Document("d", text))], lm.tokenizer, [295], context_length=24)
    assert len(wins) > 2
    covered = ""
    for w in wins:
        ids, starts, ends = w.ids[1:], w.starts[1:], w.ends[1:]
        assert (np.diff(starts) >= 0).all() and (ends > starts).all()
        assert lm.tokenizer.decode(ids.tolist()) == text[starts[0] : ends[-1]]
        covered += text[starts[0] : ends[-1]]
    assert covered == text


def test_bad_input_leaves_the_recorded_config_alone(tmp_path, tiny_models, corpus_file):
    run_extract(tmp_path, tiny_models["llama"], corpus_file)
    recorded = tmp_path / "run" / "config.toml"
    before = recorded.read_text()
    assert str(tiny_models["llama"]) in before
    with pytest.raises(SamesheepError, match="unknown model preset"):
        run_extract(tmp_path, "no-such-model", corpus_file)
    with pytest.raises(SamesheepError, match="out of range"):
        run_extract(tmp_path, tiny_models["llama"], corpus_file, layers=[40])
    assert recorded.read_text() == before


def test_config_overrides_and_errors(tmp_path):
    from samesheep.core import config

    path = tmp_path / "c.toml"
    path.write_text(config.to_toml(config.Config()))
    assert config.load(path) == config.Config()  # init's file reads back as the defaults
    cfg = config.load(path, ["corpus.max_tokens=0", 'layers=[6, "2/3"]', "extract.dtype=float32"])
    assert cfg.corpus.max_tokens == 0 and cfg.layers == [6, "2/3"]
    assert cfg.extract.dtype == "float32"
    for bad in ["corpus=3", "models.x=1", "corpus.nope=1", "extract.batch_tokens=big", "nokey"]:
        with pytest.raises(SamesheepError):
            config.load(path, [bad])
