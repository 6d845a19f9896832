"""The report stage on a run of two tiny models over a hostile corpus (markup, script links,
bidirectional overrides, a 100,000-character word): the files, escaping, reruns, and the
site in a real browser (headless Chromium driven by Playwright) from file://."""

from __future__ import annotations

import itertools
import json
import re
import struct
import zlib
from pathlib import Path

import pytest
from helpers import SENTENCES, flat, sets
from test_cli import assert_one_line_error, cli

HOSTILE = [
    "<script>window.__pwned = 1</script> The cat sat on the mat.",
    'Paris is big. <img src=x onerror="window.__pwned = 2"> The sea is never full.',
    'Click [here](javascript:window.__pwned=3) or <a href="javascript:window.__pwned=4">me</a>.',
    "Rivers run \u202edlrow olleh\u202c to the sea \u2066isolated\u2069 and back.",
    "A" + "b" * 99_998 + "Z is a very long word.",
    "</script><script>window.__pwned = 5</script> & &amp; \"quotes\" 'single' \u2028 line.",
]
TOPICS = ["Geography", "People", "Science"]


def hostile_corpus(path: Path, n: int = 60) -> Path:
    """Ordinary documents with topics, and the hostile ones (hostile titles too)."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            text = " ".join(SENTENCES[(i + j) % len(SENTENCES)] for j in range(1 + i % 7))
            title = f"Doc {i}" if i % 5 else f"<b onmouseover=window.__pwned=6>Doc {i}</b>"
            f.write(json.dumps({"id": f"doc{i}", "title": title, "text": text,
                                "topic": TOPICS[i % 3]}) + "\n")  # fmt: skip
        for i, text in enumerate(HOSTILE):
            title = "<script>window.__pwned=7</script>" if i % 2 else "T" * 100_000
            f.write(json.dumps({"id": f"hostile{i}", "title": title, "text": text,
                                "topic": TOPICS[i % 3]}) + "\n")  # fmt: skip
    return path


@pytest.fixture(scope="module")
def run(tiny_models, tmp_path_factory, env):
    corpus = hostile_corpus(tmp_path_factory.mktemp("rcorpus") / "docs.jsonl")
    run_dir = tmp_path_factory.mktemp("report_run")
    models = json.dumps([str(tiny_models["llama"]), str(tiny_models["gpt2"])])
    extra = {"models": models, "corpus.max_tokens": "0", "corpus.heldout_tokens": "2000",
             "compare.min_fires": "5", "compare.groups": "5",
             "compare.geometry_pairings": "10", "report.pair_min_r": "0.0"}  # fmt: skip
    args = sets(run_dir, tiny_models["llama"], corpus, **extra)
    res = cli("run", *args, env=env)
    return res, run_dir, args


def test_run_writes_the_site(run):
    res, run_dir, _ = run
    assert res.returncode == 0, res.stderr
    root = run_dir / "report"
    for page in ("index.html", "feature.html", "pair.html", "latents.html", "layers.html"):
        assert (root / page).is_file(), page
    assert (root / "assets" / "report.js").is_file()
    assert "report:" in flat(res.stdout) and "index.html" in res.stdout
    # without a terminal every long step says when it starts and when it finishes
    said = flat(res.stderr)
    for step in ("held-out reconstruction", "spliced CE and KL", "features: logit lens",
                 "features: exemplar windows", "the random-weights floor",
                 "the within-document null", "feature pages"):  # fmt: skip
        assert f"{step}: started" in said and f"{step}: finished in" in said, step
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["bytes"]["features"] > 0 and manifest["bytes"]["pairs"] > 0


def site_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_every_piece_of_corpus_text_is_escaped(run):
    _, run_dir, _ = run
    root = run_dir / "report"
    for path in site_files(root):
        text = path.read_text(encoding="utf-8")
        for raw in ("<script>window", "<img src=x", 'onerror="window', "<b onmouseover",
                    'href="javascript:', "</script><script>"):  # fmt: skip
            assert raw not in text, (path, raw)
        if path.suffix == ".js" and path.parent.name != "assets":
            assert text.startswith("samesheep.receive(") and text.rstrip().endswith(");")
            assert "\u2028" not in text and "\u2029" not in text
    # the hostile text is in the data, as escaped text
    blob = "".join(p.read_text(encoding="utf-8") for p in (root / "data").rglob("*.js"))
    assert "\\u003cscript\\u003ewindow.__pwned" in blob


def test_data_is_split_per_block_and_no_file_holds_every_exemplar(run):
    _, run_dir, _ = run
    root = run_dir / "report"
    blocks = sorted((root / "data" / "f" / "llama0.L1").glob("*.js"))
    assert len(blocks) == 128 // 32  # 128 latents in blocks of 32
    sizes = [p.stat().st_size for p in blocks]
    assert max(sizes) < 0.5 * sum(sizes)
    # a 100,000-character title or word is cut, never copied whole into a page's data
    assert max(p.stat().st_size for p in site_files(root)) < 100_000 * 3


def test_rerun_skips_and_a_failure_keeps_the_old_site(run, env, tmp_path):
    _, run_dir, args = run
    index = run_dir / "report" / "index.html"
    before = index.stat().st_mtime_ns
    res = cli("report", *args, env=env)
    assert res.returncode == 0, res.stderr
    assert "report unchanged, skipped" in flat(res.stderr)
    assert index.stat().st_mtime_ns == before
    # a damaged features table: one line, exit 2, and the old site stays whole
    from helpers import copy_run

    copy, cargs = copy_run(run_dir, args, tmp_path / "copy")
    (copy / "llama0" / "layer_1" / "features" / "exemplars.parquet").write_bytes(b"not parquet")
    (copy / "report" / "manifest.json").unlink()  # so the report is built again
    old = (copy / "report" / "index.html").read_bytes()
    res = cli("report", *cargs, env=env)
    assert_one_line_error(res)
    assert "exemplars.parquet" in res.stderr and "samesheep features" in res.stderr
    assert (copy / "report" / "index.html").read_bytes() == old
    assert not list(copy.glob(".report.*"))


def test_another_run_is_shown_beside_this_one(run, env, tmp_path):
    """report.beside: another run's answer for the same pair, with the setting it rests on
    (a per-text run here, made by editing a copy's numbers), in the overview's table and
    sentences; a run directory that has not run yet is named in a note, not an error; every
    text from the other run is escaped."""
    from helpers import copy_run

    _, run_dir, args = run
    copy, cargs = copy_run(run_dir, args, tmp_path / "copy")
    other = tmp_path / "other<b>"
    pair = next(p for p in (run_dir / "compare").iterdir() if p.is_dir())
    (other / "compare" / pair.name).mkdir(parents=True)
    summary = json.loads((pair / "summary.json").read_text())
    summary["headline"]["raw"]["a_to_b"]["raw"]["share_r0.5"] = 0.8761
    summary["units"] = 4321
    (other / "compare" / pair.name / "summary.json").write_text(json.dumps(summary))
    toml = (run_dir / "config.toml").read_text().replace('unit = "token"', 'unit = "text-last"')
    (other / "config.toml").write_text(toml)
    beside = json.dumps([str(other), str(tmp_path / "not-yet")])
    res = cli("report", *cargs, "--set", f"report.beside={beside}", env=env)
    assert res.returncode == 0, res.stderr
    assert "not-yet" in flat(res.stderr)  # said, and run on
    page = (copy / "report" / "index.html").read_text()
    assert "Beside other runs" in page
    assert "87.6%" in page and "4,321" in page
    assert "one vector per text (its last real token)" in page and "every token" in page
    assert "other&lt;b&gt;" in page and "other<b>" not in page
    assert "not-yet" in page and "samesheep run" in page
    # without report.beside the section is gone (and the site is rebuilt)
    res = cli("report", *cargs, env=env)
    assert res.returncode == 0, res.stderr
    assert "Beside other runs" not in (copy / "report" / "index.html").read_text()


def test_report_before_features_names_the_stage(tiny_models, tmp_path, env):
    corpus = hostile_corpus(tmp_path / "docs.jsonl", n=20)
    args = sets(tmp_path / "r", tiny_models["llama"], corpus)
    assert cli("extract", *args, env=env).returncode == 0
    res = cli("report", *args, env=env)
    assert_one_line_error(res)
    assert "samesheep features" in res.stderr


# ---------------------------------------------------------------- in a real browser


class Page:
    """A browser tab that records console errors and uncaught exceptions."""

    def __init__(self, browser, root: Path):
        self.root = root
        self.page = browser.new_page(viewport={"width": 1200, "height": 900})
        self.errors: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", self._request)

    def _request(self, request) -> None:
        if not request.url.startswith("file://"):
            self.errors.append(f"request off the disk: {request.url}")

    def open(self, name: str):
        self.page.goto(f"file://{self.root}/{name}")
        self.page.wait_for_load_state("load")
        return self.page

    def check_clean(self) -> None:
        """Nothing injected ran, nothing outside the site's own scripts exists."""
        p = self.page
        assert p.evaluate("typeof window.__pwned") == "undefined"
        srcs = p.evaluate("[...document.scripts].map(s => s.getAttribute('src'))")
        assert srcs.count(None) == 1  # the one start call of the page
        assert all(s is None or s.startswith(("assets/", "data/")) for s in srcs), srcs
        assert p.evaluate("document.querySelectorAll('img, iframe, object, embed').length") == 0
        assert (
            p.evaluate("""[...document.querySelectorAll('*')].filter(e =>
            [...e.attributes].some(a => a.name.startsWith('on'))).length""")
            == 0
        )
        assert p.evaluate("document.querySelectorAll('a[href^=\"javascript\"]').length") == 0
        assert not self.errors, self.errors


def hostile_latent(run_dir: Path) -> int:
    """A latent of the first model whose shown top exemplars include hostile markup."""
    import pyarrow.parquet as pq

    ex = pq.read_table(run_dir / "llama0" / "layer_1" / "features" / "exemplars.parquet",
                       columns=["latent", "kind", "rank", "text"]).to_pylist()  # fmt: skip
    for row in ex:
        if (
            row["kind"] == "top"
            and row["rank"] < 10
            and re.search(r"<(script|img|a )", row["text"])
        ):
            return row["latent"]
    pytest.fail("no shown exemplar holds the hostile markup")


def not_blank(png: bytes) -> bool:
    """Whether a PNG screenshot shows more than one flat colour (decoded with zlib alone)."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    while pos < len(png):
        n, kind = struct.unpack(">I4s", png[pos : pos + 8])
        if kind == b"IDAT":
            idat += png[pos + 8 : pos + 8 + n]
        pos += 12 + n
    return len(set(zlib.decompress(idat))) > 16


def test_the_site_in_a_browser(run, browser):
    _, run_dir, _ = run
    tab = Page(browser, run_dir / "report")
    p = tab.open("index.html")
    assert "learn the same features" in p.inner_text("h1")
    assert p.locator("svg.plot").count() >= 4
    assert p.locator("svg.plot title").count() > 10  # hover values
    p.wait_for_function("document.querySelector('.map canvas') !== null")
    assert not_blank(p.screenshot(full_page=True))
    tab.check_clean()

    # the layers page: a heatmap per metric (and its fixed-source floor), every cell with
    # its values; the headline shown, the other metrics behind a selector
    p = tab.open("layers.html")
    assert "Which layers correspond" in p.inner_text("h1")
    assert p.locator("svg.plot").count() >= 2 * 12
    tips = p.locator("svg.plot rect title")
    assert tips.count() >= 16 * 12 and "null" in tips.first.text_content()
    assert p.locator("details.metric").count() == 11
    assert not p.locator("details.metric svg").first.is_visible()
    p.locator("details.metric summary").first.click()
    assert p.locator("details.metric svg").first.is_visible()
    assert not_blank(p.screenshot(full_page=True))
    tab.check_clean()

    # the latent table: search for a label, then open a latent from it
    p = tab.open("latents.html?cmp=llama0__gpt20")
    p.wait_for_selector("table.latents tbody tr")
    label = p.locator("table.latents tbody td.label").first.inner_text()
    needle = label.split("|")[0].strip().strip('"')[:3] or label[:3]
    p.fill("input.search", needle)
    rows = p.locator("table.latents tbody tr")
    assert rows.count() > 0
    assert all(needle.lower() in rows.nth(i).inner_text().lower() for i in range(rows.count()))
    p.fill("input.search", "no label holds this")
    assert p.locator("table.latents tbody tr").count() == 0
    tab.check_clean()

    # a feature page whose exemplars hold the hostile markup, shown as text
    latent = hostile_latent(run_dir)
    p = tab.open(f"feature.html?sae=llama0.L1&latent={latent}")
    p.wait_for_selector(".window .tok.on")
    on = p.locator(".window .tok.on").first
    assert float(on.get_attribute("title")) > 0  # hover shows the value
    assert float(on.get_attribute("data-value")) > 0
    assert "<" in p.inner_text("ol.exemplars")  # the markup, as characters
    assert p.locator(".partners a").count() > 0
    tab.check_clean()
    # bidirectional overrides are shown as marks, never applied
    assert p.evaluate("samesheep.visible('a\\u202eb')") == "a\u27e6U+202E\u27e7b"

    # a pair page: both models' activations on the same characters
    p = tab.open("pair.html?cmp=llama0__gpt20&rank=0")
    p.wait_for_selector("ol.exemplars.pair li")
    first = p.locator("ol.exemplars.pair li").first
    rows = first.locator(".row")
    assert rows.count() == 2
    texts = [rows.nth(i).locator(".window").inner_text() for i in range(2)]
    assert texts[0] == texts[1]  # the same characters in both rows
    assert p.locator("ol.exemplars.pair .tok.on").count() > 0
    assert not_blank(p.screenshot(full_page=True))
    tab.check_clean()

    # a latent that does not exist: a message on the page, not an uncaught error
    p = tab.open("feature.html?sae=llama0.L1&latent=99999")
    p.wait_for_selector(".error")
    tab.check_clean()


def test_windows_cut_at_once_equal_one_by_one(run):
    """The vectorized cut of every exemplar window equals cutting each alone with
    `segments` (overlapping byte pieces, left-out tokens and gaps included)."""
    import pyarrow.parquet as pq

    from samesheep.report.data import cut_windows, segments

    _, run_dir, _ = run
    ex = pq.read_table(run_dir / "llama0" / "layer_1" / "features" / "exemplars.parquet")
    context, n_train = 5, 1000
    windows = cut_windows(ex, context, n_train)
    assert len(windows) == ex.num_rows
    overlapping = 0
    for row, w in zip(ex.to_pylist(), windows, strict=True):
        st, en, acts, c = row["token_starts"], row["token_ends"], row["activations"], row["center"]
        lo, hi = max(0, c - context), min(len(st), c + context + 1)
        s0, e0 = min(st[lo:hi]), max(en[lo:hi])
        assert w.text == row["text"][s0:e0]
        assert w.start == row["char_start"] + s0 and w.end == w.start + len(w.text)
        assert w.center == (st[c] - s0, en[c] - s0)
        spans = [
            (s - s0, e - s0, a) for s, e, a in zip(st[lo:hi], en[lo:hi], acts[lo:hi], strict=False)
        ]
        overlapping += any(b[0] < a[1] for a, b in itertools.pairwise(spans))
        assert w.seg == segments(spans, len(w.text)), row
        heldout = row["split"] == "heldout"
        assert w.doc == row["doc_index"] + (n_train if heldout else 0)
    assert overlapping > 0  # the hostile corpus's byte pieces are among them
