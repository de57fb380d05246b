"""Both report.html files in a real browser: headless Chromium from the system package
manager (Debian: `apt-get install chromium`), driven by Playwright's Python package (never
`playwright install`: no browser download). Skipped, with the reason, when either is absent.

Checked as a reader would meet the page: it loads from file:// with no console error and no
failed request, every <img> decoded (naturalWidth > 0), and the key numbers are in the DOM.
Set LEUKRAY_SCREENSHOTS=DIR to keep full-page screenshots (docs/report-*.png come from here).
"""

import os
import re
import shutil
from pathlib import Path

import pytest

from leukray.report import write_report
from leukray.scorereport import write_scores_report
from test_html_report import make_scores
from test_report import make_run

CHROMIUM = os.environ.get("LEUKRAY_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the Python package only)")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on PATH: apt-get install -y chromium")


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


def open_page(browser, path: Path, shot: str):
    """The page at file://path, with every console error, page error and failed request."""
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    problems = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url[:80]}"))
    page.goto(path.resolve().as_uri(), wait_until="load")
    if os.environ.get("LEUKRAY_SCREENSHOTS"):
        page.screenshot(path=str(Path(os.environ["LEUKRAY_SCREENSHOTS"]) / shot), full_page=True)
    return page, problems


def decoded_images(page) -> list[tuple[int, str]]:
    return page.evaluate("Array.from(document.images).map(i => [i.complete ? i.naturalWidth : 0, i.alt])")


def test_run_report_in_chromium(browser, tmp_path):
    run, metrics = make_run(tmp_path)
    md = write_report(run)
    page, problems = open_page(browser, md.with_name("report.html"), "report-run.png")
    assert problems == []
    images = decoded_images(page)
    assert len(images) == 5 and all(w > 0 for w, _ in images), images
    text = page.inner_text("body")
    assert f"Test accuracy: {metrics['accuracy']:.4f}" in text
    assert f"macro-F1 {metrics['macro_f1']:.4f}" in text
    assert re.search(r"all\s+6\s+6\s+6\s+6\s+24", text)  # the split table's totals row
    page.close()


def test_scores_report_in_chromium(browser, tmp_path):
    scores, top_file, _ = make_scores(tmp_path)
    page, problems = open_page(browser, write_scores_report(scores), "report-scores.png")
    assert problems == []
    images = decoded_images(page)
    assert len(images) > 24 and all(w > 0 for w, _ in images), images  # histogram + thumbnails + Grad-CAM
    totals = page.eval_on_selector_all(".card", "cs => cs.map(c => c.innerText.replace(/\\s+/g, ' '))")
    assert totals == ["29 images", "27 scored", "2 errors"]
    first = page.inner_text(".tile")  # the first tile: the most suspicious image, its path below the data folder
    assert top_file.endswith("/Pro/WBC-Pro-006.jpg") and "0.990 Pro\nPro/WBC-Pro-006.jpg" in first
    assert "corrupt or truncated" in page.inner_text("body")
    page.close()
