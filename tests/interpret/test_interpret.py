"""Explanations and their scores: the HTTP backend against a real local server that speaks
the OpenAI chat-completions protocol (429, 5xx, a malformed reply, a timeout, a refusal, an
unreachable endpoint), the cache, the local backend on a tiny random model, the scorers on
planted data where the right label must beat another latent's, and the stage on a tiny run."""

from __future__ import annotations

import json
import math
import socket
import time

import numpy as np
import pytest
from fake_llm import FakeLLM, rule_answer
from helpers import window

from samesheep.core.errors import SamesheepError
from samesheep.interpret.backends import Calls, LocalChat, OpenAIChat, Request, parse_judgement
from samesheep.interpret.prompts import clean_explanation, explain_messages
from samesheep.interpret.scoring import ScoreSet, balanced_accuracy, detection, fuzzing

KEY = "sk-test-0123456789-secret"


def backend(url: str, timeout: float = 5.0, retries: int = 3) -> OpenAIChat:
    return OpenAIChat(url, "fake-model", "SAMESHEEP_TEST_KEY", timeout, retries)


ASK = [
    {"role": "system", "content": "You check whether"},
    {"role": "user", "content": "Description: the word river\nExcerpt: a river runs"},
]


def test_an_answer_after_a_429_a_500_and_a_timeout(monkeypatch):
    monkeypatch.setenv("SAMESHEEP_TEST_KEY", KEY)
    with FakeLLM() as server:
        server.script = ["429", "500", "slow"]
        start = time.perf_counter()
        assert backend(server.url, timeout=0.5).chat(ASK, 5) == "Yes."
        assert len(server.requests) == 4  # three failures, then the answer
        assert time.perf_counter() - start < 10
        last = server.requests[-1]
        assert last["temperature"] == 0 and last["model"] == "fake-model"
        assert set(server.auth) == {f"Bearer {KEY}"}  # the key is sent, as a bearer token


def test_a_malformed_reply_is_tried_again_then_named():
    with FakeLLM() as server:
        server.script = ["malformed"]
        assert backend(server.url).judge(ASK) is True  # the second try answered
        server.script = ["malformed"] * 5
        with pytest.raises(SamesheepError, match="malformed reply"):
            backend(server.url, retries=2).chat(ASK, 5)
        assert len(server.requests) == 2 + 3


def test_too_many_timeouts_and_refusals_are_one_clear_error(monkeypatch):
    monkeypatch.setenv("SAMESHEEP_TEST_KEY", KEY)
    with FakeLLM() as server:
        server.script = ["slow", "slow"]
        with pytest.raises(SamesheepError, match=r"no answer within 0\.3 s"):
            backend(server.url, timeout=0.3, retries=1).chat(ASK, 5)
        server.script = ["401-echo"]  # a server that echoes the key back
        with pytest.raises(SamesheepError, match="HTTP 401") as e:
            backend(server.url).chat(ASK, 5)
        assert KEY not in str(e.value) and "***" in str(e.value)
        server.script = ["400"]
        with pytest.raises(SamesheepError, match="refused the request: HTTP 400"):
            backend(server.url).chat(ASK, 5)


def test_an_unreachable_endpoint_is_one_clear_error():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.perf_counter()
    with pytest.raises(SamesheepError, match="cannot reach"):
        backend(f"http://127.0.0.1:{port}/v1").chat(ASK, 5)
    assert time.perf_counter() - start < 5  # not retried for minutes


def test_judgements_read_from_free_text():
    assert parse_judgement("Yes.") and parse_judgement("1") and parse_judgement("yes and no")
    assert not parse_judgement("No, it does not.") and not parse_judgement("")
    assert not parse_judgement("The answer is no") and not parse_judgement("maybe")
    assert not parse_judgement("Eyes closed")  # a word, not a letter run


def test_calls_are_cached_on_disk_and_survive_an_interrupted_write(tmp_path):
    with FakeLLM() as server:
        cache = tmp_path / "cache.jsonl"
        requests = [Request.of(ASK), Request.of(ASK, 5), Request.of(ASK)]  # one repeated
        calls = Calls(backend(server.url), cache, concurrency=2)
        assert calls.ask(requests) == [True, "Yes.", True]
        assert len(server.requests) == 2  # the repeat asked once
        again = Calls(backend(server.url), cache)
        assert again.ask(requests) == [True, "Yes.", True] and len(server.requests) == 2
        with open(cache, "a") as f:  # a line cut short by a killed run
            f.write('{"key": "abc", "ans')
        assert Calls(backend(server.url), cache).ask(requests[:1]) == [True]
        # another model's answers are not this one's
        other = OpenAIChat(server.url, "other-model", "SAMESHEEP_TEST_KEY", 5.0, 1)
        Calls(other, cache).ask(requests[:1])
        assert len(server.requests) == 3


def test_calls_run_several_at_once():
    with FakeLLM(delay=0.3) as server:
        requests = [
            Request.of([*ASK[:1], {"role": "user", "content": ASK[1]["content"] + str(i)}])
            for i in range(8)
        ]
        start = time.perf_counter()
        Calls(backend(server.url), server_cache(), concurrency=4).ask(requests)
        assert time.perf_counter() - start < 8 * 0.3 * 0.6


def server_cache():
    import tempfile
    from pathlib import Path

    return Path(tempfile.mkdtemp()) / "c.jsonl"


def test_the_local_backend_on_a_tiny_random_model(tiny_models):
    chat = LocalChat(str(tiny_models["llama"]))
    reply = chat.chat(explain_messages([window("a river runs", [1], [2.0])]), 6)
    assert isinstance(reply, str) and reply == chat.chat(
        explain_messages([window("a river runs", [1], [2.0])]), 6
    )  # greedy: the same answer again
    said = chat.judge(ASK)
    assert said in (True, False) and chat.judge(ASK) == said
    assert "local|" in chat.name and str(tiny_models["llama"]) in chat.name


# ------------------------------------------------------------------ prompts and scores


def test_the_explainer_sees_the_firing_tokens_marked_with_their_strength():
    e = window("the long river bends near the river mouth", [2, 6], [4.0, 2.0])
    user = explain_messages([e])[1]["content"]
    assert "<<river>> (10)" in user and "<<river>> (5)" in user and "<<the>>" not in user
    assert rule_answer(explain_messages([e])) == "the word river"
    assert clean_explanation('  "The feature responds to: rivers and streams"\nmore') == (
        "rivers and streams"
    )
    assert clean_explanation("\n\n- Place names.") == "Place names."


def test_balanced_accuracy_on_known_answers():
    assert balanced_accuracy([1, 1, 0, 0], [1, 1, 0, 0]) == 1.0
    assert balanced_accuracy([1, 1, 0, 0], [1, 1, 1, 1]) == 0.5  # always yes: chance
    assert balanced_accuracy([1, 0, 0, 0], [1, 1, 0, 0]) == pytest.approx((1 + 2 / 3) / 2)
    assert math.isnan(balanced_accuracy([1, 1], [1, 0]))


class RuleJudge:
    """The fake server's rule, without the server."""

    name, parallel = "rule", False

    def judge(self, messages):
        return parse_judgement(rule_answer(messages))


def score(label: str, s: ScoreSet) -> tuple[float, float]:
    judge = RuleJudge()
    d = detection(label, s)
    f = fuzzing(label, s, np.random.default_rng(0))
    ask = lambda q: [judge.judge(r.as_messages()) for r in q.requests]  # noqa: E731
    return d.score(ask(d)), f.score(ask(f))


def test_the_right_label_beats_another_latents_on_planted_windows():
    active = [
        window(f"the {w} river flows past {w} hills", [2], [3.0])
        for w in ("old", "wide", "cold", "deep")
    ]
    inactive = [window(f"a castle stands on the {w} hill", [], []) for w in ("old", "red")]
    s = ScoreSet(active, inactive)
    right, other = score("the word river", s), score("the word castle", s)
    assert right == (1.0, 1.0)
    assert other[0] <= 0.5 and other[1] == 0.5  # no better than chance
    d = detection("the word river", s)
    assert sum(d.truth) == 4 and len(d.truth) == 6
    f = fuzzing("the word river", s, np.random.default_rng(0))
    assert len(f.requests) == 8 and f.truth == [True, False] * 4
    marked = [r.messages[1][1] for r in f.requests]
    assert "<<river>>" in marked[0] and "<<river>>" not in marked[1]


# ------------------------------------------------------------------ the stage on a tiny run

HOSTILE = '<img src=x onerror="window.__pwned=9"> '


@pytest.fixture(scope="module")
def tiny_run(tiny_models, tmp_path_factory, env):
    """Two tiny models compared (no floors or ceilings, for speed), before interpret."""
    from helpers import cli, sets, write_corpus

    corpus = write_corpus(tmp_path_factory.mktemp("icorpus") / "docs.jsonl", n=60, titles=True)
    run_dir = tmp_path_factory.mktemp("interpret_run")
    models = json.dumps([str(tiny_models["llama"]), str(tiny_models["gpt2"])])
    args = sets(
        run_dir,
        tiny_models["llama"],
        corpus,
        models=models,
        **{
            "corpus.max_tokens": "0",
            "corpus.heldout_tokens": "2000",
            "compare.floor": "false",
            "compare.ceiling": "false",
            "compare.min_fires": "5",
            "compare.groups": "5",
            "compare.geometry_pairings": "10",
            "representations.enabled": "false",
        },
    )
    res = cli("run", *args, env=env)
    assert res.returncode == 0, res.stderr
    assert "interpret: off" in res.stderr
    return run_dir, args


def best_pair(run_dir) -> tuple[int, int]:
    """The comparison's best matched pair (the report's pair page of rank 0)."""
    import pyarrow.parquet as pq

    folder = next(p for p in (run_dir / "compare").iterdir() if p.is_dir())
    pairs = pq.read_table(folder / "pairs.parquet").to_pandas()
    best = pairs.sort_values("r", ascending=False, kind="stable").iloc[0]
    return int(best.latent_a), int(best.latent_b)


def test_the_stage_explains_scores_resumes_and_keeps_the_key_secret(tiny_run, env, browser):
    from helpers import assert_one_line_error, cli, flat
    from test_report import Page

    run_dir, args = tiny_run
    la, lb = best_pair(run_dir)
    first_model = json.loads(
        (run_dir / "config.toml").read_text().split("models = ")[1].splitlines()[0]
    )[0]
    mine = run_dir.parent / "my_labels.jsonl"
    mine.write_text(json.dumps({"model": first_model, "latent": la, "label": "the word the"}))
    with FakeLLM(prefix=HOSTILE) as server:
        settings = [
            "--set",
            'interpret.explainer="openai:fake-model"',
            "--set",
            f'interpret.base_url="{server.url}"',
            "--set",
            'interpret.api_key_env="SAMESHEEP_TEST_KEY"',
            "--set",
            f"interpret.latents=[{la}, {lb}]",
            "--set",
            f'interpret.user_labels="{mine}"',
            "--set",
            "interpret.score_examples=3",
        ]
        key_env = {**env, "SAMESHEEP_TEST_KEY": KEY}
        res = cli("interpret", *args, *settings, env=key_env)
        assert res.returncode == 0, res.stderr
        asked = len(server.requests)
        assert asked > 0 and set(server.auth) == {f"Bearer {KEY}"}
        assert "mean detection/fuzzing" in flat(res.stderr)
        import pyarrow.parquet as pq

        tables = sorted(run_dir.glob("*/layer_*/features/explanations.parquet"))
        assert len(tables) == 2
        yours = pq.read_table(tables[1]).to_pandas()  # llama0 sorts after gpt20
        yours = yours[yours.source == "user"]
        assert list(yours.latent) == [la] and list(yours.label) == ["the word the"]
        for path in tables:
            t = pq.read_table(path).to_pandas()
            assert {"llm", "statistical", "random"} <= set(t.source)
            own = t[t.partner_r.isna()]
            assert set(own.latent) == {la, lb} and (own.scored_latent == own.latent).all()
            assert own[own.source == "llm"].label.str.startswith(HOSTILE + "the word").all()
            partner = t[t.partner_r.notna()]
            assert len(partner) > 0 and (partner.scored_model != path.parts[-4]).all()
            scores = t[["detection", "fuzzing"]].to_numpy().ravel()
            scores = scores[~np.isnan(scores)]
            assert len(scores) > 0 and ((scores >= 0) & (scores <= 1)).all()
        # unchanged: skipped, nothing asked; interrupted (its marker gone): all from the cache
        res = cli("interpret", *args, *settings, env=key_env)
        assert res.returncode == 0 and "interpret: unchanged, skipped" in flat(res.stderr)
        (tables[0].parent / "explanations.json").unlink()
        res = cli("interpret", *args, *settings, env=key_env)
        assert res.returncode == 0, res.stderr
        assert len(server.requests) == asked and "0 calls sent" in flat(res.stderr)
        # the report shows the explanations, as text
        res = cli("report", *args, *settings, env=key_env)
        assert res.returncode == 0, res.stderr
        data = "".join(p.read_text() for p in (run_dir / "report" / "data").rglob("*.js"))
        assert "the word" in data and "\\u003cimg" in data and "<img" not in data
        tab = Page(browser, run_dir / "report")
        page = tab.open(f"feature.html?sae=llama0.L1&latent={la}")
        page.wait_for_selector(".explanations table")
        shown = page.inner_text(".explanations")
        assert "language model" in shown and "another latent" in shown and "<img" in shown
        assert "the word" in page.inner_text(".label.explanation")
        tab.check_clean()
        page = tab.open("pair.html?cmp=llama0__gpt20&rank=0")
        page.wait_for_selector("td.explanation")
        cells = page.locator("td.explanation")
        assert all("the word" in cells.nth(i).inner_text() for i in range(2))
        tab.check_clean()
        # the key is nowhere: files, config, logs
        for path in run_dir.rglob("*"):
            if path.is_file():
                assert KEY.encode() not in path.read_bytes(), path
        assert KEY not in res.stdout + res.stderr
    # a broken labels file, a latent the SAE does not have: one line, exit 2, before any call
    mine.write_text('{"model": "nobody", "latent": 1, "label": "x"}\n')
    res = cli("interpret", *args, *settings, env=key_env)
    assert_one_line_error(res)
    assert "nobody" in res.stderr
    mine.write_text("not json\n")
    res = cli("interpret", *args, *settings, env=key_env)
    assert_one_line_error(res)
    assert "line 1" in res.stderr
    mine.unlink()
    res = cli("interpret", *args, *settings, env=key_env)
    assert_one_line_error(res)
    assert "No such file" in res.stderr
    mine.write_text(json.dumps({"model": first_model, "latent": la, "label": "the word the"}))
    res = cli("interpret", *args, *settings, "--set", "interpret.latents=[99999]", env=key_env)
    assert_one_line_error(res)
    assert "99999" in res.stderr
    # the endpoint gone: one line, exit 2
    res = cli("interpret", *args, *settings, "--set", "interpret.seed=1", env=key_env)
    assert_one_line_error(res)
    assert "cannot reach" in res.stderr and KEY not in res.stderr


def test_a_whole_document_window_is_cut_around_its_peak():
    words = [f"w{i}" for i in range(400)]
    e = window(" ".join(words), [300], [5.0])
    short = e.clipped(200)
    assert len(short.text) <= 200 and "<<w300>>" in short.marked(short.firing())
    for lo, hi in zip(short.starts, short.ends, strict=True):
        assert short.text[lo:hi].startswith("w")  # every kept span still points at its token
    assert window("a b c", [1], [1.0]).clipped(200).text == "a b c"


def test_without_usable_explanations_the_baseline_is_another_latents_statistical_label():
    """An explainer that says nothing usable (a 135M model answering with the prompt's
    lead-in) still leaves every latent a baseline: another latent's statistical label."""
    from types import SimpleNamespace

    from samesheep.core.config import InterpretConfig
    from samesheep.interpret.stage import Gathered, _label_jobs

    k = ("m", 3)
    info = SimpleNamespace(labels={0: "rivers", 1: "numbers", 2: "names", 3: ""})
    examples = {k: {i: SimpleNamespace(scoring=f"windows {i}") for i in range(4)}}
    chosen = np.array([0, 1, 2, 3])

    def baselines(explained: dict[int, str]) -> list:
        gathered = Gathered({k: explained}, {}, examples, {}, {})
        jobs = _label_jobs(k, info, chosen, InterpretConfig(), gathered)
        return [j for j in jobs if j.source == "random"]

    empty = baselines({i: "" for i in range(4)})
    assert sorted(j.latent for j in empty) == [0, 1, 2, 3]
    for j in empty:
        assert j.from_latent != j.latent and j.label == info.labels[j.from_latent]
        assert j.windows == f"windows {j.latent}"  # scored on the latent's own windows
    # with explanations, the baseline is another latent's explanation, as before
    said = {0: "water", 1: "digits", 2: "people", 3: ""}
    for j in baselines(said):
        assert j.from_latent != j.latent and j.label == said[j.from_latent]
