"""Time `lookalike app`'s pages in a real headless browser and save a screenshot of each.

    python scripts/app_pages.py --db /tmp/lk70k/db --collection mnist --out docs --source ../shared/datasets/mnist.npz

Starts `lookalike app` on a free loopback port over the store, then, in Debian's chromium driven by
Playwright: the first render of each page (Search, Map, Evaluation, Clusters, Audit: evaluate and
audit the collection first) in a new tab, the map's first computation apart from its later
renders, an uploaded digit answered (from the upload to the k neighbour images on screen), and
each page chosen in the sidebar of one tab. Prints a table (--json for JSON) and writes
app-search.png, app-map.png, app-map-lasso.png, app-evaluation.png, app-clusters.png and
app-audit.png to --out.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

READY = {
    "Search": "text=Upload an image",
    "Map": ".js-plotly-plot .nsewdrag",
    "Evaluation": "text=recall@1",
    "Clusters": "text=Compute clusters",
    "Audit": "text=disputed labels",
}
IMAGES = "[data-testid=stImage] img"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", required=True)
    ap.add_argument("--collection", required=True)
    ap.add_argument("--source", default="../shared/datasets/mnist.npz", help="npz whose first held-out digit is uploaded")
    ap.add_argument("--out", default="/tmp/lookalike-app-pages")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("error: no chromium: apt-get install chromium", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with np.load(args.source) as d:
        digit = d["x_test"][0]
    buf = io.BytesIO()
    Image.fromarray(digit).save(buf, format="PNG")
    port = free_port()
    cmd = [sys.executable, "-c", "from lookalike.frontends.cli import main; main()", "app", "--db", args.db, "--port", str(port)]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    while True:
        try:
            with opener.open(url + "/_stcore/health", timeout=2):
                break
        except OSError:
            if proc.poll() is not None or time.perf_counter() - started > 120:
                print("error: the app did not start", file=sys.stderr)
                return 1
            time.sleep(0.2)
    report: dict[str, object] = {"app_up_s": round(time.perf_counter() - started, 2), "collection": args.collection}
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])

            def first_render(name: str, query: str = "") -> tuple[float, object]:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                t0 = time.perf_counter()
                page.goto(f"{url}/?collection={args.collection}&page={name}{query}")
                page.wait_for_selector(READY[name], timeout=300_000)
                return time.perf_counter() - t0, page

            # the map's first computation (kept for later), then a first render that reads it back
            report["map_first_computation_s"], page = first_render("Map")
            page.close()
            for name in ("Search", "Map", "Evaluation", "Clusters", "Audit"):
                seconds, page = first_render(name, "&k=8" if name == "Search" else "")
                report[f"first_render_{name.lower()}_s"] = round(seconds, 2)
                page.wait_for_timeout(1500)
                if name == "Search":
                    answers = []
                    for attempt in range(int(os.environ.get("UPLOADS", "3"))):
                        t0 = time.perf_counter()
                        page.set_input_files(
                            "input[type=file]", files=[{"name": f"digit{attempt}.png", "mimeType": "image/png", "buffer": buf.getvalue()}]
                        )
                        page.wait_for_function(
                            f"document.body.innerText.includes('query: uploaded digit{attempt}.png') "
                            f"&& document.querySelectorAll('{IMAGES}').length >= 9",
                            polling="raf",
                            timeout=120_000,
                        )
                        answers.append(round(time.perf_counter() - t0, 3))
                    report["upload_answered_s"] = answers
                    page.wait_for_timeout(1000)
                if name == "Clusters":
                    page.get_by_role("button", name="Compute clusters").click()
                    t0 = time.perf_counter()
                    page.get_by_text("cluster accuracy").wait_for(timeout=300_000)
                    report["clusters_2000_s"] = round(time.perf_counter() - t0, 2)
                    page.wait_for_timeout(1500)
                page.screenshot(path=str(out / f"app-{name.lower()}.png"), full_page=name != "Map")
                if name == "Map":
                    page.locator(".modebar-btn[data-title='Lasso Select']").click()
                    box = page.locator(".js-plotly-plot .nsewdrag").bounding_box()
                    assert box is not None
                    path = [(0.08, 0.05), (0.3, 0.05), (0.3, 0.45), (0.08, 0.45), (0.08, 0.06)]
                    page.mouse.move(box["x"] + box["width"] * path[0][0], box["y"] + box["height"] * path[0][1])
                    page.mouse.down()
                    for fx, fy in path[1:]:
                        page.mouse.move(box["x"] + box["width"] * fx, box["y"] + box["height"] * fy, steps=10)
                    page.mouse.up()
                    page.get_by_text("selected items").wait_for(timeout=60_000)
                    page.wait_for_timeout(2000)
                    page.screenshot(path=str(out / "app-map-lasso.png"), full_page=True)
                page.close()
            # a user's own tab: the app opened once, then each page chosen in the sidebar (the browser's cache now warm)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{url}/?collection={args.collection}&page=Clusters")
            page.wait_for_selector(READY["Clusters"], timeout=300_000)
            for name in ("Search", "Map", "Evaluation", "Clusters", "Audit"):
                page.wait_for_timeout(1000)
                t0 = time.perf_counter()
                page.get_by_test_id("stSidebar").get_by_text(name, exact=True).click()
                page.wait_for_selector(READY[name], timeout=300_000)
                report[f"switch_to_{name.lower()}_s"] = round(time.perf_counter() - t0, 2)
            page.close()
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            print(f"{key:<28} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
