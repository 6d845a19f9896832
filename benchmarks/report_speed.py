"""The report of the default run: build time, site size, and how fast each page opens.

Builds the site of a finished run (`make demo` first) into a temporary folder, prints the
build time, the number of files, the total size and the largest file, then opens pages in
headless Chromium from file:// and prints the time from navigation until each page shows
its content: the overview (with its map drawn), feature pages, pair pages and the latent
table. The target: any page opens in under a second from disk.

Usage: python benchmarks/report_speed.py [--run runs/default]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/default")
    args = ap.parse_args()
    import torch

    from samesheep import load_config
    from samesheep.core.device import machine_lines, set_threads
    from samesheep.report.build import report_stage
    from samesheep.report.site import site_size

    lines, _ = machine_lines(torch.device("cpu"), set_threads(0))
    print("\n".join(lines))
    run = Path(args.run)
    cfg = load_config(run / "config.toml")
    work = Path(tempfile.mkdtemp(prefix="samesheep-report-"))
    try:
        # a copy of the run's report-free files is not needed: build into the run, then move
        # the old report aside and back, so the run's own site is left as it was
        old = run / "report"
        kept = work / "kept"
        if old.exists():
            shutil.move(str(old), kept)
        start = time.perf_counter()
        report_stage(cfg)
        build = time.perf_counter() - start
        site = work / "site"
        shutil.move(str(old), site)
        if kept.exists():
            shutil.move(str(kept), old)
        files, total, largest = site_size(site)
        print(
            f"build: {build:.1f} s; {files:,} files, {total / 1e6:,.1f} MB, largest file "
            f"{largest / 1e6:.2f} MB"
        )
        pages(site)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def pages(site: Path) -> None:
    import json
    import re

    from playwright.sync_api import sync_playwright

    index = (site / "index.html").read_text(encoding="utf-8")
    config = json.loads(
        re.search(
            r"samesheep\.start\(\"index\.html\", (.*)\);</script>", index.replace("\\u003c", "<")
        ).group(1)
    )
    saes = list(config["saes"])
    comparisons = list(config["comparisons"])
    exe = shutil.which("chromium") or "/usr/bin/chromium"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        checks = [("overview", "index.html", ".map canvas, section.run")]
        for sae in saes:
            for latent in (0, 1234, 5678, 9000):
                checks.append(
                    (
                        f"feature {sae} #{latent}",
                        f"feature.html?sae={sae}&latent={latent}",
                        "#feature h1",
                    )
                )
        for cmp in comparisons:
            for rank in (0, 100, 1000):
                checks.append(
                    (
                        f"pair {cmp} #{rank}",
                        f"pair.html?cmp={cmp}&rank={rank}",
                        "#pair h1, #pair .error",
                    )
                )
            checks.append((f"latents {cmp}", f"latents.html?cmp={cmp}", "table.latents tbody tr"))
        times = []
        for name, url, selector in checks:
            page.goto("about:blank")
            start = time.perf_counter()
            page.goto(f"file://{site}/{url}")
            page.wait_for_selector(selector)
            if url == "index.html":
                page.wait_for_load_state("load")
            seconds = time.perf_counter() - start
            times.append(seconds)
            print(f"  {name:44} {1000 * seconds:7.0f} ms")
        browser.close()
    print(
        f"pages: median {1000 * statistics.median(times):.0f} ms, slowest "
        f"{1000 * max(times):.0f} ms (target: every page under 1,000 ms)"
    )


if __name__ == "__main__":
    main()
