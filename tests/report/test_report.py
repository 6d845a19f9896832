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

import pyarrow.parquet as pq
import pytest
from helpers import SENTENCES, assert_one_line_error, cli, flat, sets

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
            f.write(
                json.dumps({"id": f"doc{i}", "title": title, "text": text, "topic": TOPICS[i % 3]})
                + "\n"
            )
        for i, text in enumerate(HOSTILE):
            title = "<script>window.__pwned=7</script>" if i % 2 else "T" * 100_000
            f.write(
                json.dumps(
                    {"id": f"hostile{i}", "title": title, "text": text, "topic": TOPICS[i % 3]}
                )
                + "\n"
            )
    return path


@pytest.fixture(scope="module")
def run(tiny_models, tmp_path_factory, env):
    corpus = hostile_corpus(tmp_path_factory.mktemp("rcorpus") / "docs.jsonl")
    run_dir = tmp_path_factory.mktemp("report_run")
    models = json.dumps([str(tiny_models["llama"]), str(tiny_models["gpt2"])])
    extra = {
        "models": models,
        "corpus.max_tokens": "0",
        "corpus.heldout_tokens": "2000",
        "compare.min_fires": "5",
        "compare.groups": "5",
        "compare.geometry_pairings": "10",
        "report.pair_min_r": "0.0",
    }
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
    for step in (
        "held-out reconstruction",
        "spliced CE and KL",
        "features: logit lens",
        "features: exemplar windows",
        "A's latents against B's untrained copy (floor)",
        "the within-document null",
        "feature pages",
    ):
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
        for raw in (
            "<script>window",
            "<img src=x",
            'onerror="window',
            "<b onmouseover",
            'href="javascript:',
            "</script><script>",
        ):
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
    summary["headline"]["raw"]["a_to_b"]["answer"]["raw"]["share_r0.5"] = 0.8761
    summary["units"] = 4321
    (other / "compare" / pair.name / "summary.json").write_text(json.dumps(summary))
    toml = (run_dir / "config.toml").read_text().replace('unit = "token"', 'unit = "text-last"')
    (other / "config.toml").write_text(toml)
    # a run compared before the fixed-source floor: no answer, and a floor that meant the
    # two untrained copies against each other (never shown as this page's floor)
    old = tmp_path / "old"
    (old / "compare" / pair.name).mkdir(parents=True)
    for d in ("a_to_b", "b_to_a"):
        entry = summary["headline"]["raw"][d]
        del entry["answer"]
        entry["raw"]["share_r0.5"], entry["floor"]["share_r0.5"] = 0.4321, 0.9137
    (old / "compare" / pair.name / "summary.json").write_text(json.dumps(summary))
    (old / "config.toml").write_text(toml)
    beside = json.dumps([str(other), str(old), str(tmp_path / "not-yet")])
    res = cli("report", *cargs, "--set", f"report.beside={beside}", env=env)
    assert res.returncode == 0, res.stderr
    assert "not-yet" in flat(res.stderr)  # said, and run on
    page = (copy / "report" / "index.html").read_text()
    assert "Beside other runs" in page
    assert "87.6%" in page and "4,321" in page
    assert "one vector per text (its last real token)" in page and "every token" in page
    assert "other&lt;b&gt;" in page and "other<b>" not in page
    assert "not-yet" in page and "samesheep run" in page
    assert "43.2%" in page and "91.4%" not in page
    assert "before the fixed-source floor" in page and "samesheep compare" in page
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

    def __init__(self, browser, root: Path, width: int = 1200, height: int = 900):
        self.root = root
        self.page = browser.new_page(viewport={"width": width, "height": height})
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

    ex = pq.read_table(
        run_dir / "llama0" / "layer_1" / "features" / "exemplars.parquet",
        columns=["latent", "kind", "rank", "text"],
    ).to_pylist()
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
    # the overview opens with the normalised score of each direction, from the answer
    summary = json.loads((run_dir / "compare" / "llama0__gpt20" / "summary.json").read_text())
    shown = p.locator(".lead .score .value").all_inner_texts()
    for d, value in zip(("a_to_b", "b_to_a"), shown, strict=True):
        norm = summary["headline"]["raw"][d]["answer"]["normalised"]["share_r0.5"]
        assert value == (f"{norm:.2f}" if norm == norm else "undefined")
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

    # each latent's label in the other model: the overview's three-way split, the latent
    # table's filter, and the probes on a latent's page
    p = tab.open("index.html")
    assert p.locator("p.presence").count() == 2
    assert "present but spread out" in p.inner_text("p.presence >> nth=0")
    partners = pq.read_table(run_dir / "compare" / "llama0__gpt20" / "partners.parquet")
    partners = partners.to_pandas()
    probed = partners[(partners.side == "a") & (partners.presence != "")]
    label = probed.presence.iloc[0]
    p = tab.open(f"latents.html?cmp=llama0__gpt20&presence={label}")
    p.wait_for_selector("table.latents tbody tr")
    cells = p.locator("table.latents tbody td.presence")
    short = {"shared": "shared", "spread": "spread out", "absent": "absent"}
    assert set(cells.all_inner_texts()) == {short[label]}
    names = {"shared": "shared as a latent", "spread": "present but spread out", "absent": "absent"}
    assert cells.first.get_attribute("title").startswith(names[label])
    latent = int(probed.latent.iloc[0])
    p = tab.open(f"feature.html?sae=llama0.L1&latent={latent}")
    p.wait_for_selector("table.probes")
    text = p.inner_text("table.probes")
    assert names[label] in text and "conditional R²" in text and "R² from both" in text
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

    # a pair page: both models' activations on the same characters (the first list with a
    # page: every latent of the tiny random models is on the surface)
    lists = site_data(run_dir / "report", "q/llama0__gpt20")["lists"]
    first = next(name for name, members in lists.items() if members)
    if not lists.get("beyond"):  # no pair beyond the surface: the surface pairs, said so
        p = tab.open("pair.html?cmp=llama0__gpt20")
        p.wait_for_selector("ol.exemplars.pair li")
        assert "surface pairs are shown" in p.inner_text(".none-beyond")
        assert p.inner_text("h1").startswith("Surface pair 1")
    p = tab.open(f"pair.html?cmp=llama0__gpt20&list={first}&rank=0")
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


def site_data(root: Path, key: str):
    """The value a data file of the site hands to the page."""
    text = (root / "data" / f"{key}.js").read_text(encoding="utf-8")
    head = f"samesheep.receive({json.dumps(key)},"
    assert text.startswith(head) and text.rstrip().endswith(");")
    return json.loads(text[len(head) : text.rstrip().rindex(")")])


OVERFLOW = """() => {
  const out = [];
  const doc = document.documentElement;
  if (doc.scrollWidth > doc.clientWidth) {
    out.push('the page: ' + doc.scrollWidth + ' > ' + doc.clientWidth);
  }
  const boxes = new Set();
  for (const el of document.querySelectorAll('table, figure, .scroll, .plots, .map')) {
    boxes.add(el);
    if (el.parentElement) boxes.add(el.parentElement);
  }
  for (const el of boxes) {
    if (el.scrollWidth > el.clientWidth) {
      out.push(el.tagName.toLowerCase() + (el.className ? '.' + el.className : '') + ': ' +
               el.scrollWidth + ' > ' + el.clientWidth);
    }
  }
  return out;
}"""
"""What runs past its box: the page sideways, or a table, figure or its container whose
content is wider than what it shows (cut, or scrolled inside it)."""


def overflowing(page) -> list[str]:
    return page.evaluate(OVERFLOW)


def every_page(root: Path) -> list[str]:
    """One address of every kind of page the site has (and each list and filter)."""
    cmp = "llama0__gpt20"
    pages = ["index.html", f"latents.html?cmp={cmp}"]
    pages += [f"latents.html?cmp={cmp}&list={k}" for k in ("shared", "only-a", "only-b")]
    pages += [f"latents.html?cmp={cmp}&surface={k}" for k in ("surface", "beyond")]
    pages += [f"latents.html?cmp={cmp}&presence={k}" for k in ("shared", "spread", "absent")]
    pages += [f"feature.html?sae={s}&latent=0" for s in ("llama0.L1", "gpt20.L1")]
    if (root / "layers.html").is_file():
        pages.append("layers.html")
    lists = site_data(root, f"q/{cmp}")["lists"]
    pages += [f"pair.html?cmp={cmp}&list={k}&rank=0" for k in lists]
    pages.append(f"pair.html?cmp={cmp}")
    return pages


def test_every_kind_of_page_fits_1280_pixels(run, browser):
    """At 1280 px no page scrolls sideways and no table, figure or box around them is cut
    or scrolled inside itself; the check itself catches a table cut inside its box."""
    _, run_dir, _ = run
    root = run_dir / "report"
    tab = Page(browser, root, width=1280, height=800)
    for name in every_page(root):
        p = tab.open(name)
        p.wait_for_function("!document.querySelector('.loading')")
        assert overflowing(p) == [], name
        tab.check_clean()
    p = tab.open("index.html")
    p.evaluate("""() => {
      const box = document.createElement('div');
      box.style.overflowX = 'hidden';
      const t = box.appendChild(document.createElement('table'));
      t.insertRow().insertCell().style.minWidth = '3000px';
      document.querySelector('main').appendChild(box);
    }""")
    assert any(x.startswith("div") for x in overflowing(p))


def mixed_surface(run_dir: Path, args: list[str], to: Path) -> tuple[Path, list[str]]:
    """A copy of the run in which every third latent of each model lies beyond the surface
    (the tiny random models equal their untrained copies, so every live latent is a surface
    latent): its partners and pairs rewritten as the compare stage writes them."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from helpers import copy_run

    copy, cargs = copy_run(run_dir, args, to)
    folder = copy / "compare" / "llama0__gpt20"
    t = pq.read_table(folder / "partners.parquet")
    sr = t["surface_r"].to_numpy().copy()
    low = t["latent"].to_numpy() % 3 == 0
    sr[low] = 0.1
    for name, values in (("surface_r", sr), ("surface", sr >= 0.5)):
        t = t.set_column(t.schema.get_field_index(name), name, pa.array(values))
    pq.write_table(t, folder / "partners.parquet")
    side = np.array(t["side"].to_pylist())
    pairs = pq.read_table(folder / "pairs.parquet")
    ra = sr[side == "a"][pairs["latent_a"].to_numpy()]
    rb = sr[side == "b"][pairs["latent_b"].to_numpy()]
    for name, values in (
        ("surface_r_a", ra),
        ("surface_r_b", rb),
        ("beyond_surface", (ra < 0.5) & (rb < 0.5)),
    ):
        pairs = pairs.set_column(pairs.schema.get_field_index(name), name, pa.array(values))
    pq.write_table(pairs, folder / "pairs.parquet")
    (copy / "report" / "manifest.json").unlink()
    return copy, cargs


def test_pairs_beyond_the_surface_come_first(run, env, tmp_path, browser):
    """Pair pages rank the pairs beyond the surface (both latents' surface r < 0.5) by
    default; the surface pairs are one click away and say what they are; the latent table
    filters by surface score; a feature page shows the surface score with its partner and
    untrained copy, and the floor, ceiling and cross-fitted partners."""
    import pyarrow.parquet as pq

    _, run_dir, args = run
    copy, cargs = mixed_surface(run_dir, args, tmp_path / "copy")
    res = cli("report", *cargs, env=env)
    assert res.returncode == 0, res.stderr
    root = copy / "report"
    q = site_data(root, "q/llama0__gpt20")
    beyond, surface = q["lists"]["beyond"], q["lists"]["surface"]
    assert beyond and surface and sorted(beyond + surface) == sorted(set(beyond + surface))
    assert all(q["pairs"][i][4] is True for i in beyond)
    assert all(q["pairs"][i][4] is False for i in surface)
    for members in (beyond, surface):
        rs = [q["pairs"][i][2] for i in members]
        assert rs == sorted(rs, reverse=True)
    # the surface pairs are not simply the worse ones: a surface pair outranks the first
    # pair beyond the surface by r, and still comes second
    first = q["pairs"][beyond[0]]
    assert any(q["pairs"][i][2] > first[2] for i in surface)

    tab = Page(browser, root, width=1280, height=800)
    p = tab.open("pair.html?cmp=llama0__gpt20")  # no list named: beyond the surface
    p.wait_for_selector("ol.exemplars.pair li")
    assert "beyond the surface" in p.inner_text("h1")
    links = p.locator("table.stats th a").all_inner_texts()
    assert links == [f"llama0 #{first[0]}", f"gpt20 #{first[1]}"]
    p.locator(".tabs a", has_text="surface pairs").click()
    p.wait_for_selector("ol.exemplars.pair li")
    assert p.inner_text("h1").startswith("Surface pair 1")
    assert "Surface pairs:" in p.inner_text(".list-note")
    top = q["pairs"][surface[0]]
    links = p.locator("table.stats th a").all_inner_texts()
    assert links == [f"llama0 #{top[0]}", f"gpt20 #{top[1]}"]
    assert overflowing(p) == []
    tab.check_clean()

    # the latent table: beyond the surface lists exactly the live latents with surface r < 0.5
    partners = pq.read_table(copy / "compare" / "llama0__gpt20" / "partners.parquet").to_pylist()
    live = {(r["side"], r["latent"]): r for r in partners if r["fires"] > 0}
    want = sum(1 for r in live.values() if r["surface_r"] < 0.5)
    p = tab.open("latents.html?cmp=llama0__gpt20&surface=beyond")
    p.wait_for_selector("table.latents tbody tr")
    assert p.inner_text(".count") == f"{want:,} latents"
    assert "beyond the surface" in p.inner_text("h1")
    p.locator(".surface-filter a", has_text="surface latents").click()
    p.wait_for_selector("table.latents tbody tr")
    assert p.inner_text(".count") == f"{len(live) - want:,} latents"
    tab.check_clean()

    # a feature page: its surface score, partner and copy; its floor, ceiling, cross-fit
    a = next(r for (side, _), r in live.items() if side == "a" and r["surface_r"] < 0.5)
    p = tab.open(f"feature.html?sae=llama0.L1&latent={a['latent']}")
    p.wait_for_selector("table.scale")
    scale = p.inner_text("table.scale")
    assert "beyond the surface" in scale and f"#{a['surface_partner']} of" in scale
    assert "untrained copy" in scale and "seed ceiling" in scale
    assert "cross-fitted" in p.inner_text(".partners")
    assert "beyond the surface" in p.inner_text(".surface-line")
    tab.check_clean()


def flat_page(path: Path) -> str:
    """A page's text without its markup, whitespace collapsed."""
    import html

    page = path.read_text(encoding="utf-8")
    page = re.sub(r"<(script|style|svg)\b.*?</\1>", " ", page, flags=re.S)
    return flat(html.unescape(re.sub(r"<[^>]+>", " ", page)))


def test_overview_leads_with_the_normalised_score(run, env, tmp_path):
    """The overview's answer opens with the normalised score of each direction, then the
    trained share between its floor and ceiling, the surface split, the untrained pair as a
    diagnostic; a floor at or above its ceiling is said plainly, once."""
    from helpers import copy_run

    _, run_dir, args = run
    text = flat_page(run_dir / "report" / "index.html")
    order = [
        "Normalised agreement at r ≥ 0.5",
        "its fixed-source floor",
        "surface latents (a",
        "Two untrained networks' dictionaries",
        "The numbers",
    ]
    at = [text.index(x) for x in order]
    assert at == sorted(at), at
    assert "surface text alone makes dictionaries this alike." in text
    assert "not below the seed ceiling" not in text  # none here: each floor < its ceiling

    copy, cargs = copy_run(run_dir, args, tmp_path / "copy")
    path = copy / "compare" / "llama0__gpt20" / "summary.json"
    summary = json.loads(path.read_text())
    for d in ("a_to_b", "b_to_a"):
        ans = summary["headline"]["raw"][d]["answer"]
        ans["floor"]["share_r0.5"], ans["ceiling"]["share_r0.5"] = 0.61, 0.3
        ans["normalised"]["share_r0.5"] = float("nan")
    path.write_text(json.dumps(summary))
    (copy / "report" / "manifest.json").unlink()
    res = cli("report", *cargs, env=env)
    assert res.returncode == 0, res.stderr
    text = flat_page(copy / "report" / "index.html")
    assert text.count("not below the seed ceiling") == 1
    assert "llama0 → gpt20: floor 61.0%, ceiling 30.0%; gpt20 → llama0: floor 61.0%" in text
    assert text.count("its floor (61.0%) is not below its ceiling (30.0%)") == 2  # each score


def test_a_comparison_from_before_the_fixed_floor_is_named(run, env, tmp_path):
    """A summary written before the fixed-source floor (no answer) is named in one line
    with the stage to rerun; the report does not show its old floor as the floor."""
    from helpers import copy_run

    _, run_dir, args = run
    copy, cargs = copy_run(run_dir, args, tmp_path / "copy")
    path = copy / "compare" / "llama0__gpt20" / "summary.json"
    summary = json.loads(path.read_text())
    for d in ("a_to_b", "b_to_a"):
        del summary["headline"]["raw"][d]["answer"]
    path.write_text(json.dumps(summary))
    (copy / "report" / "manifest.json").unlink()
    res = cli("report", *cargs, env=env)
    assert_one_line_error(res)
    assert "samesheep compare" in res.stderr and "llama0__gpt20" in res.stderr


def test_a_run_without_floor_or_ceiling_renders(run, env, tmp_path, browser):
    """compare.floor = false and compare.ceiling = false: the overview says why there is no
    normalised score, the pair pages are one list, the latent table has no surface filter,
    and every page still fits."""
    from helpers import copy_run

    _, run_dir, args = run
    copy, cargs = copy_run(run_dir, args, tmp_path / "copy")
    cargs += ["--set", "compare.floor=false", "--set", "compare.ceiling=false"]
    for stage in ("compare", "report"):
        res = cli(stage, *cargs, env=env)
        assert res.returncode == 0, res.stderr
    root = copy / "report"
    text = flat_page(root / "index.html")
    assert "the run has no floor" in text and "fixed-source floor (" not in text
    q = site_data(root, "q/llama0__gpt20")
    assert list(q["lists"]) == ["all"] and q["lists"]["all"]
    tab = Page(browser, root, width=1280, height=800)
    p = tab.open("pair.html?cmp=llama0__gpt20")
    p.wait_for_selector("ol.exemplars.pair li")
    assert p.inner_text("h1").startswith("Matched pair 1")
    p = tab.open("latents.html?cmp=llama0__gpt20&surface=beyond")
    p.wait_for_selector("table.latents tbody tr")
    assert p.locator(".surface-filter").count() == 0
    assert "surface r" not in p.inner_text("table.latents thead")
    p = tab.open("feature.html?sae=llama0.L1&latent=1")
    p.wait_for_selector(".partners table.stats")
    assert p.locator("table.scale").count() == 0
    for name in ("index.html", "latents.html?cmp=llama0__gpt20"):
        p = tab.open(name)
        p.wait_for_function("!document.querySelector('.loading')")
        assert overflowing(p) == [], name
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


def test_the_causal_check_shows_on_the_pair_pages(run, env, browser):
    """After `samesheep causal`, the report rebuilds: the overview gives its answer, the
    sampled pairs get a list of pair pages, and each shows both effect profiles over the
    held-out text that follows where they fire, shaded by the signed change (escaped as
    every other piece of corpus text). Runs last: it adds the causal check to the run."""
    _, run_dir, args = run
    settings = ("causal.pairs=6", "causal.max_docs=3", "causal.min_units=3")
    res = cli("causal", *args, *(x for s in settings for x in ("--set", s)), env=env)
    assert res.returncode == 0, res.stderr
    res = cli("report", *args, env=env)
    assert res.returncode == 0, res.stderr
    assert "unchanged" not in res.stderr  # the causal check's files are among its inputs
    root = run_dir / "report"
    lists = site_data(root, "q/llama0__gpt20")["lists"]
    pairs = pq.read_table(run_dir / "causal" / "llama0__gpt20" / "pairs.parquet").to_pandas()
    assert len(lists["causal"]) == len(pairs)
    block = site_data(root, "pp/llama0__gpt20/causal/0")
    first = block["0"]
    assert first["causal"]["label"] in set(pairs.label)
    if pairs.agreement.notna().any():  # highest causal agreement first
        assert abs(first["causal"]["agreement"] - pairs.agreement.max()) < 1e-2
    lines = (run_dir / "corpus" / "heldout.jsonl").read_text(encoding="utf-8").splitlines()
    heldout = [json.loads(line)["text"] for line in lines]
    for w in first["causal"]["windows"]:  # the windows are held-out text
        assert any(w["text"] in doc for doc in heldout)
    tab = Page(browser, root)
    p = tab.open("index.html")
    assert "Causal agreement of" in p.inner_text("p.causal")
    p = tab.open("pair.html?cmp=llama0__gpt20&list=causal&rank=0")
    p.wait_for_selector("ol.exemplars.pair li")
    if first["causal"]["windows"]:
        p.wait_for_selector("section.effects ol.effects li")
        assert first["causal"]["label"] in p.inner_text("section.effects")
        shaded = p.locator("section.effects .tok.on")
        if shaded.count():
            assert "change in log-probability" in shaded.first.get_attribute("title")
    assert overflowing(p) == []
    tab.check_clean()
