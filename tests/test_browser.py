"""`lookalike app` end to end in a real headless browser: Debian's chromium driven by Playwright.

A real `lookalike app` (Streamlit) on loopback over a small real collection; each page is opened,
a digit uploaded, the label filter chosen with the mouse and keyboard, a map point clicked and a
region lassoed. A screenshot of each page is saved (``$LOOKALIKE_SCREENSHOTS``, else the test's
temporary directory). Skipped where no chromium is installed, unless ``LOOKALIKE_REQUIRE_BROWSER=1``
(CI sets it: there it must run).
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image

from lookalike.analysis.audit import audit, save_audit
from lookalike.analysis.evaluate import evaluate, save_report
from lookalike.core.gallery import Gallery
from lookalike.core.ingest import ingest
from lookalike.core.search import Hit, search
from lookalike.models.embedder import PixelEmbedder

from .conftest import free_port

REQUIRED = os.environ.get("LOOKALIKE_REQUIRE_BROWSER") == "1"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None and not REQUIRED:
    pytest.skip("no chromium here: apt-get install chromium (CI installs it)", allow_module_level=True)
try:
    from playwright.sync_api import Page, sync_playwright
except ImportError:
    if REQUIRED:
        raise
    pytest.skip("no playwright here: pip install -e '.[test]'", allow_module_level=True)

POINT_JS = """(i) => { const gd = document.querySelector('.js-plotly-plot'); const fl = gd._fullLayout;
  const r = gd.querySelector('.nsewdrag').getBoundingClientRect(); const tr = gd._fullData[0];
  return [r.left + fl.xaxis.l2p(tr.x[i]), r.top + fl.yaxis.l2p(tr.y[i])]; }"""
IMAGES = "[data-testid=stImage] img"


@dataclass
class Running:
    url: str
    upload: bytes  # a PNG of a held-out digit 3
    query: str  # its id
    hits: list[Hit]  # the library's answer to it, k=8, label 3
    accuracy: float  # the saved evaluation's
    first_suspect: str  # the saved audit's most suspicious item


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory, tiny_npz: Path, fake_embedder: PixelEmbedder) -> Iterator[Running]:
    root = tmp_path_factory.mktemp("browser")
    db = str(root / "db")
    arrays = dict(np.load(tiny_npz))
    arrays["y_train"][7] = (int(arrays["y_train"][7]) + 3) % 10  # one wrong label for the Audit page to find
    np.savez(root / "digits.npz", **arrays)
    ingest("mnist", source=str(root / "digits.npz"), embedder=fake_embedder, db=db, collection="digits")
    x, y = arrays["x_test"], arrays["y_test"]
    i = int(np.flatnonzero(y == 3)[0])
    buf = io.BytesIO()
    Image.fromarray(x[i]).save(buf, format="PNG")
    with Gallery.open("digits", db) as g:  # (before the app takes the store's lock)
        report = evaluate(g)
        save_report(g, report)
        kept = save_audit(g, audit(g, k=5, top=20))
        hits = search(g, image=g.read_query_image(buf.getvalue()), k=8, labels=["3"])
    port = free_port()
    env = {**os.environ, "LOOKALIKE_CACHE": str(root / "cache")}
    cmd = [sys.executable, "-c", "from lookalike.frontends.cli import main; main()", "app", "--db", db, "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url + "/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("lookalike app did not start: " + (proc.stderr.read() if proc.stderr else ""))
            time.sleep(0.5)
        assert kept["suspects"][0]["id"] == "mnist:train:7"
        yield Running(url, buf.getvalue(), f"mnist:test:{i}", hits, report.accuracy, kept["suspects"][0]["id"])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM or "/usr/bin/chromium", args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser: object, tmp_path: Path) -> Iterator[Page]:
    pg = browser.new_page(viewport={"width": 1400, "height": 1000})  # type: ignore[attr-defined]
    outside: list[str] = []
    pg.on("request", lambda r: outside.append(r.url) if urlparse(r.url).hostname not in (None, "127.0.0.1", "localhost") else None)
    yield pg
    pg.close()
    assert not outside, f"the page called out of this machine: {outside[:3]}"


def shots() -> Path:
    out = Path(os.environ.get("LOOKALIKE_SCREENSHOTS") or Path(os.environ.get("TMPDIR", "/tmp")) / "lookalike-screenshots")
    out.mkdir(parents=True, exist_ok=True)
    return out


def images(page: Page) -> int:
    return int(page.evaluate(f"document.querySelectorAll('{IMAGES}').length"))


def open_page(page: Page, url: str, name: str) -> None:
    page.goto(url)
    page.get_by_test_id("stSidebar").get_by_text(name, exact=True).click()
    page.get_by_role("heading", name=name).wait_for(timeout=60_000)


def test_search_upload_with_a_label_filter_then_click_a_neighbour(app: Running, page: Page) -> None:
    open_page(page, app.url, "Search")
    page.get_by_text("Upload an image").wait_for()
    page.get_by_test_id("stMultiSelect").first.click()  # choose label 3 with the mouse and the keyboard
    page.keyboard.type("3")
    page.keyboard.press("Enter")
    page.keyboard.press("Escape")
    page.set_input_files("input[type=file]", files=[{"name": "three.png", "mimeType": "image/png", "buffer": app.upload}])
    page.get_by_text("8 nearest with labels 3").wait_for(timeout=60_000)
    page.wait_for_function(f"document.querySelectorAll('{IMAGES}').length >= 9", timeout=60_000)
    captions = page.locator("[data-testid=stImageCaption]").all_inner_texts()
    hits = [c for c in captions if c.startswith("#")]
    assert len(hits) == 8 and all(" 3 · d=" in c for c in hits), captions
    assert [f"#{h.rank} {h.label_name} · d={h.distance:.3f}" for h in app.hits] == hits
    assert app.hits[0].id == app.query
    page.screenshot(path=str(shots() / "search.png"), full_page=True)
    page.get_by_role("button", name="search from it").nth(1).click()  # the second neighbour becomes the query
    page.get_by_text(f"query: {app.hits[1].id}").wait_for(timeout=60_000)


@pytest.mark.slow
def test_search_with_a_where_filter_typed_in_the_field_filters(app: Running, page: Page) -> None:
    page.goto(f"{app.url}/?page=Search&id=mnist:test:3&k=5")
    page.get_by_text("more filters: the collection's fields").click()
    box = page.get_by_label("where")
    box.fill("index < 20; source = x_train")
    box.press("Enter")
    page.get_by_text("5 nearest matching the filters").wait_for(timeout=60_000)
    page.wait_for_timeout(500)
    ids = [c.strip() for c in page.locator("[data-testid=stCaptionContainer]").all_inner_texts() if c.strip().startswith("mnist:")]
    assert len(ids) == 5 and all(i.startswith("mnist:train:") and int(i.rsplit(":", 1)[1]) < 20 for i in ids), ids


@pytest.mark.slow
def test_map_click_and_lasso(app: Running, page: Page) -> None:
    open_page(page, app.url, "Map")
    page.locator(".js-plotly-plot .nsewdrag").wait_for(timeout=120_000)
    page.wait_for_timeout(1000)
    page.screenshot(path=str(shots() / "map.png"), full_page=True)
    x, y = page.evaluate(POINT_JS, 3)
    page.mouse.move(x - 4, y)
    page.mouse.move(x, y)
    page.wait_for_timeout(300)
    page.mouse.click(x, y)
    page.get_by_text("and its nearest stored items").wait_for(timeout=60_000)
    page.wait_for_function(f"document.querySelectorAll('{IMAGES}').length >= 7", timeout=60_000)
    page.screenshot(path=str(shots() / "map-click.png"), full_page=True)
    page.locator(".modebar-btn[data-title='Lasso Select']").click()
    box = page.locator(".js-plotly-plot .nsewdrag").bounding_box()
    assert box is not None
    left, top, w, h = box["x"], box["y"], box["width"], box["height"]
    corners = [(0.02, 0.02), (0.6, 0.02), (0.6, 0.98), (0.02, 0.98), (0.02, 0.03)]
    page.mouse.move(left + w * corners[0][0], top + h * corners[0][1])
    page.mouse.down()
    for cx, cy in corners[1:]:
        page.mouse.move(left + w * cx, top + h * cy, steps=10)
    page.mouse.up()
    page.get_by_text("selected items").wait_for(timeout=60_000)
    page.wait_for_timeout(1000)
    assert images(page) >= 10
    page.screenshot(path=str(shots() / "map-lasso.png"), full_page=True)


@pytest.mark.slow
def test_evaluation_and_clusters_pages(app: Running, page: Page) -> None:
    open_page(page, app.url, "Evaluation")
    page.get_by_text("recall@1").wait_for(timeout=60_000)
    assert page.get_by_test_id("stMetricValue").first.inner_text() == f"{app.accuracy:.4f}"
    page.screenshot(path=str(shots() / "evaluation.png"), full_page=True)
    open_page(page, app.url, "Clusters")
    page.get_by_role("button", name="Compute clusters").click()
    page.get_by_text("cluster accuracy").wait_for(timeout=60_000)
    page.wait_for_timeout(1000)
    page.screenshot(path=str(shots() / "clusters.png"), full_page=True)


@pytest.mark.slow
def test_audit_page_candidate_becomes_the_query(app: Running, page: Page) -> None:
    open_page(page, app.url, "Audit")
    page.get_by_text("disputed labels").wait_for(timeout=60_000)
    page.wait_for_timeout(1000)
    assert images(page) >= 6  # a candidate and its neighbours
    page.screenshot(path=str(shots() / "audit.png"), full_page=True)
    page.get_by_text(app.first_suspect, exact=True).wait_for()
    page.get_by_role("button", name="search from it").first.click()  # one click: the first candidate is the query
    page.get_by_text(f"query: {app.first_suspect}").wait_for(timeout=60_000)
