"""The cost curve of every command as a collection grows: 100,000 to 1,000,000 items on this machine.

    python scripts/scale.py --source ../shared/datasets/mnist.npz --sizes 100000 300000 1000000 \\
        --embedder pixels --workdir /tmp/lk-scale --json docs/scale.json

For each size N: an ``.npz`` in Keras's MNIST layout of N distinct digits (MNIST's 70,000, then
copies made distinct by a seeded shift of up to 2 pixels, a rotation of up to 12 degrees and noise;
labels kept; the last tenth held out), ingested by ``lookalike ingest mnist --embedder E`` (``pixels``
by default: the model kept out of the way). Then, each command as a user runs it, in its own process
(wall time and peak RSS from ``wait4``): ``ingest`` (and its stages), the store's disk use, opening
it, single queries (p50 and p99 of 200: unfiltered, a label filter, and a metadata filter at 1%
selectivity: ``index < N/100`` on the training items), ``evaluate``, ``audit``, ``check``,
``export`` and ``import`` (the ``parquet`` extra), ``map`` (PCA and t-SNE) and ``clusters`` on their
default samples. Queries (k=10, with the hits' metadata, as a search shows them) are timed as one command
asks them (nothing in memory but a narrow filter's items, kept after its first query, which is timed
apart) and warm, as the service and the app ask them (the mirror plans filtered queries). For the label partitions' decision the same
digits are also ingested without them (``flat``), and a label filter timed there, cold and warm. It
prints each figure's exponent fitted over the sizes (time ~ N^b) and writes JSON after every step:
a run stopped (``--minutes``, Ctrl-C, a kill) is resumed by running it again.
Each command has ``--timeout`` seconds; one that runs past it is recorded as such, not waited for.

Then the service (``lookalike serve --preload``: its start-up, then ``scripts/loadtest.py`` at 16 clients
for 30 s, image uploads and stored ids, half label-filtered, with its RSS) and the app
(``scripts/app_pages.py``: the first render of each page in headless chromium, the ``app`` extra and
Debian's chromium). The peers (scikit-learn, faiss, hnswlib) are ``scripts/peers.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

LOOKALIKE = [str(Path(sys.executable).with_name("lookalike"))]  # the command users run, from this environment
QUERIES = 200
HERE = Path(__file__).resolve().parent

QUERY_CHILD = """
import json, sys, time
import numpy as np
from lookalike.core.gallery import Gallery
db, n, n_queries = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
t = time.perf_counter()
g = Gallery.open(db=db)
count = g.count()
opened = time.perf_counter() - t
rng = np.random.default_rng(0)
n_test = n // 10
ids = [f"mnist:test:{i}" for i in sorted(rng.choice(n_test, n_queries, replace=False))]
_, vecs, metas = g.get(ids, vectors=True)
out = {"open_s": opened, "count": count}
one_pct = {"$and": [{"split": "train"}, {"index": {"$lt": (n - n_test) // 100}}]}
filters = {"none": {}, "label": {"labels": [3]}, "meta_1pct": {"where": one_pct}}
flat = sys.argv[4] == "flat"  # a collection without label partitions: its label filter goes through the planner
if flat:
    filters = {"none": {}, "label": {"where": {"label": 3}}, "meta_1pct": {"where": one_pct}}


def timed(prefix):
    for name, kw in filters.items():
        lat = []
        for v in vecs:
            t = time.perf_counter()
            g.neighbours(v[None], 10, **kw)  # (with the hits' metadata, as a search shows them)
            lat.append((time.perf_counter() - t) * 1000)
        out[f"{prefix}_{name}_p50_ms"] = float(np.percentile(lat, 50))
        out[f"{prefix}_{name}_p99_ms"] = float(np.percentile(lat, 99))
    if not flat:  # the label partitions' decision on the same vectors: the same label filter with the
        g._col.partitioned = False  # partitions ignored, so the planner answers it (probe, then Chroma's where)
        try:
            lat = []
            for v in vecs:
                t = time.perf_counter()
                g.neighbours(v[None], 10, labels=[3])
                lat.append((time.perf_counter() - t) * 1000)
        finally:
            g._col.partitioned = True
        out[f"{prefix}_label_planner_p50_ms"] = float(np.percentile(lat, 50))
        out[f"{prefix}_label_planner_p99_ms"] = float(np.percentile(lat, 99))


if "meta_1pct" in filters:  # a new process's first query with a narrow filter (the others below reuse its items)
    g.neighbours(vecs[-1:], 10)  # (after one unfiltered query: the index's load from disk is not the filter's)
    t = time.perf_counter()
    g.neighbours(vecs[:1], 10, **filters["meta_1pct"])
    out["query_meta_1pct_first_ms"] = (time.perf_counter() - t) * 1000
timed("query")  # as one command asks: nothing kept in memory
t = time.perf_counter()
g.keep_warm(load=True)  # as the service and the app ask: the mirror plans filtered queries
out["warm_s"] = time.perf_counter() - t
timed("warm")
g.close()
print(json.dumps(out))
"""


FLAT_INGEST = """
import json, sys
from lookalike.core.ingest import ingest
r = ingest("mnist", source=sys.argv[1], embedder=sys.argv[2], db=sys.argv[3], label_partitions=False)  # --no-label-partitions
print(json.dumps(r.to_dict()))
"""


SERVICE_CHILD = """
import json, os, socket, subprocess, sys, time, urllib.request
lookalike, db, src, loadtest = sys.argv[1:5]
with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
url = f"http://127.0.0.1:{port}"
t = time.perf_counter()
log = open(db.rstrip("/") + "-serve.log", "w+")  # (a pipe left unread would stop a chatty server)
server = subprocess.Popen([lookalike, "serve", "--db", db, "--port", str(port), "--preload"], stdout=log, stderr=log)
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
while True:
    try:
        with opener.open(url + "/health", timeout=5):
            break
    except OSError:
        if server.poll() is not None:
            log.seek(0)
            sys.exit("the service did not start: " + log.read()[-300:])
        time.sleep(0.5)
up = time.perf_counter() - t
try:
    argv = [sys.executable, loadtest, "--url", url, "--clients", "16", "--seconds", "30", "--requests", "1000000"]
    argv += ["--source", src, "--server-pid", str(server.pid), "--warmup-seconds", "5", "--json"]
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
finally:
    server.terminate()
    server.wait(timeout=60)
report = json.loads(done.stdout)
out = {"up_s": up, "rss_end_mb": report["server_rss_mb"]["end"]}
for kind in ("all", "image", "id"):
    out.update({f"{kind}_{k}": v for k, v in report[kind].items() if k in ("per_s", "p50_ms", "p99_ms", "errors")})
print(json.dumps(out))
"""


def make_source(mnist: Path, n: int, out: Path, seed: int = 0) -> Path:
    """``n`` distinct digits in Keras's layout (see the module's text), written once."""
    if out.is_file():
        return out
    from PIL import Image

    z = np.load(mnist)
    x = np.concatenate([z["x_train"], z["x_test"]])
    y = np.concatenate([z["y_train"], z["y_test"]])
    reps = math.ceil(n / len(x))
    xs, ys = [x[:n]], [y[:n]]
    rng = np.random.default_rng(seed)
    made = len(x)
    for _ in range(1, reps):
        take = min(len(x), n - made)
        if take <= 0:
            break
        base = x[:take]
        shifts = rng.integers(-2, 3, (take, 2))
        angles = rng.uniform(-12, 12, take)
        noise = rng.normal(0, 8, (take, 28, 28))
        out_x = np.empty_like(base)
        for i in range(take):
            img = np.roll(base[i], tuple(shifts[i]), axis=(0, 1))
            img = np.asarray(Image.fromarray(img).rotate(float(angles[i]), resample=Image.BILINEAR))
            out_x[i] = np.clip(img + noise[i], 0, 255).astype(np.uint8)
        xs.append(out_x)
        ys.append(y[:take])
        made += take
    x_all, y_all = np.concatenate(xs)[:n], np.concatenate(ys)[:n]
    n_test = n // 10
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_suffix(".part.npz")
    np.savez(part, x_train=x_all[: n - n_test], y_train=y_all[: n - n_test], x_test=x_all[n - n_test :], y_test=y_all[n - n_test :])
    os.replace(part, out)
    return out


def run(argv: list[str], timeout: float) -> dict[str, Any]:
    """Run ``argv``: wall seconds, peak RSS (MB, from ``wait4``), exit code, its JSON output (or last line)."""
    import tempfile

    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, text=True, start_new_session=True)
        status = usage = None
        while status is None:
            pid, st, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                status, usage = st, ru
            elif time.perf_counter() - started > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                os.wait4(proc.pid, 0)
                proc.returncode = -9
                return {"seconds": time.perf_counter() - started, "timeout": timeout}
            else:
                time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        text, errors = out.read(), err.read()
    result: dict[str, Any] = {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024, "rc": proc.returncode}
    if proc.returncode != 0:
        result["error"] = (errors.strip().splitlines() or [""])[-1][:300]
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    if lines:
        try:
            result["json"] = json.loads(text[text.index("{") :] if text.lstrip().startswith("{") else lines[-1])
        except ValueError:
            result["last"] = lines[-1][:300]
    return result


def du_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def measure(n: int, args: argparse.Namespace, done: dict[str, Any], save: Any) -> None:
    work = Path(args.workdir)
    src = make_source(Path(args.source), n, work / f"digits-{n}.npz")
    db = work / f"db-{n}"
    col = ["--db", str(db), "--collection", "mnist"]
    flat = work / f"db-{n}-flat"
    steps: list[tuple[str, list[str]]] = [
        ("ingest", [*LOOKALIKE, "ingest", "mnist", "--source", str(src), "--embedder", args.embedder, "--db", str(db), "--json"]),
        ("queries", [sys.executable, "-c", QUERY_CHILD, str(db), str(n), str(QUERIES), "main"]),
        ("ingest_flat", [sys.executable, "-c", FLAT_INGEST, str(src), args.embedder, str(flat)]),
        ("queries_flat", [sys.executable, "-c", QUERY_CHILD, str(flat), str(n), str(QUERIES), "flat"]),
        ("evaluate", [*LOOKALIKE, "evaluate", *col, "--json"]),
        ("audit", [*LOOKALIKE, "audit", *col, "--json"]),
        ("check", [*LOOKALIKE, "check", *col, "--json"]),
        ("map_pca", [*LOOKALIKE, "map", *col, "--method", "pca", "--out", str(work / f"map-pca-{n}.png")]),
        ("map_tsne", [*LOOKALIKE, "map", *col, "--method", "tsne", "--out", str(work / f"map-tsne-{n}.png")]),
        ("clusters", [*LOOKALIKE, "clusters", *col, "--json"]),
        ("export", [*LOOKALIKE, "export", "mnist", "--db", str(db), "--out", str(work / f"export-{n}.parquet")]),
        ("import", [*LOOKALIKE, "import", str(work / f"export-{n}.parquet"), "--db", str(work / f"db-import-{n}"), "--collection", "copy"]),
        ("service", [sys.executable, "-c", SERVICE_CHILD, LOOKALIKE[0], str(db), str(src), str(HERE / "loadtest.py")]),
        ("app", [sys.executable, str(HERE / "app_pages.py"), *col, "--source", str(src), "--out", str(work / f"app-{n}"), "--json"]),
    ]
    for step, path in (("ingest", db), ("ingest_flat", flat)):
        if step not in done and path.exists():
            shutil.rmtree(path)  # a stopped ingest is measured again from the start
    for name, argv in steps:
        if name in done or name in args.skip:
            continue
        if time.monotonic() > args.deadline:
            print(f"  {n:>9,} {name}: out of time (--minutes); run again to go on", flush=True)
            raise SystemExit(0)
        if name == "import":
            shutil.rmtree(work / f"db-import-{n}", ignore_errors=True)
        got = run(argv, args.timeout)
        if name in ("ingest", "ingest_flat"):
            got["disk_mb"] = du_mb(db if name == "ingest" else flat)
        if name == "import":
            shutil.rmtree(work / f"db-import-{n}", ignore_errors=True)
            (work / f"export-{n}.parquet").unlink(missing_ok=True)
        done[name] = _trim(name, got)
        save()
        shown = (
            "timed out"
            if "timeout" in got
            else f"{got['seconds']:.1f} s, {got.get('peak_rss_mb', 0):.0f} MB"
            + (f" (exit {got['rc']}: {got.get('error', '')})" if got.get("rc") else "")
        )
        print(f"  {n:>9,} {name:<9} {shown}", flush=True)


def _trim(name: str, got: dict[str, Any]) -> dict[str, Any]:
    """Keep the figures of a command's JSON that the table uses (not its whole report)."""
    j = got.pop("json", None) or {}
    keep = {
        "ingest": (
            "images_per_s",
            "embed_images_per_s",
            "write_seconds",
            "decode_seconds",
            "embed_seconds",
            "seconds",
            "partitions_filled",
        ),
        "ingest_flat": ("images_per_s", "write_seconds", "seconds"),
        "queries": tuple(j),
        "queries_flat": tuple(j),
        "service": tuple(j),
        "app": tuple(k for k in j if k.endswith("_s") or k == "upload_answered_s"),
        "evaluate": ("accuracy", "exact_accuracy", "recall_at_1", "n_queries", "exact_queries", "queries_per_s", "seconds", "timings"),
        "audit": ("n_items", "neighbours_by", "store_recall_at_k", "store_sample", "seconds", "timings"),
        "check": ("ok", "seconds"),
        "clusters": ("n_items", "silhouette_sample", "seconds"),
    }.get(name, ())
    got.update({f"{name}_{k}" if not name.startswith(("queries", "service", "app")) else k: j[k] for k in keep if k in j})
    return got


FIGURES = {  # table rows: (step, key)
    "ingest s": ("ingest", "seconds"),
    "ingest vectors/s": ("ingest", "ingest_images_per_s"),
    "ingest peak MB": ("ingest", "peak_rss_mb"),
    "disk MB": ("ingest", "disk_mb"),
    "open s": ("queries", "open_s"),
    "query p50 ms": ("queries", "query_none_p50_ms"),
    "query p99 ms": ("queries", "query_none_p99_ms"),
    "label p50 ms": ("queries", "query_label_p50_ms"),
    "label p99 ms": ("queries", "query_label_p99_ms"),
    "1% filter p50 ms": ("queries", "query_meta_1pct_p50_ms"),
    "1% filter p99 ms": ("queries", "query_meta_1pct_p99_ms"),
    "1% filter first ms": ("queries", "query_meta_1pct_first_ms"),
    "warm-up s": ("queries", "warm_s"),
    "warm query p50 ms": ("queries", "warm_none_p50_ms"),
    "warm query p99 ms": ("queries", "warm_none_p99_ms"),
    "warm label p50 ms": ("queries", "warm_label_p50_ms"),
    "warm label p99 ms": ("queries", "warm_label_p99_ms"),
    "warm 1% p50 ms": ("queries", "warm_meta_1pct_p50_ms"),
    "warm 1% p99 ms": ("queries", "warm_meta_1pct_p99_ms"),
    "flat ingest vec/s": ("ingest_flat", "ingest_flat_images_per_s"),
    "label, partitions ignored, p50 ms": ("queries", "query_label_planner_p50_ms"),
    "label, partitions ignored, p99 ms": ("queries", "query_label_planner_p99_ms"),
    "warm label, partitions ignored, p50": ("queries", "warm_label_planner_p50_ms"),
    "warm label, partitions ignored, p99": ("queries", "warm_label_planner_p99_ms"),
    "flat label p50 ms": ("queries_flat", "query_label_p50_ms"),
    "flat label p99 ms": ("queries_flat", "query_label_p99_ms"),
    "flat warm label p50": ("queries_flat", "warm_label_p50_ms"),
    "flat warm label p99": ("queries_flat", "warm_label_p99_ms"),
    "evaluate s": ("evaluate", "seconds"),
    "evaluate peak MB": ("evaluate", "peak_rss_mb"),
    "audit s": ("audit", "seconds"),
    "audit peak MB": ("audit", "peak_rss_mb"),
    "check s": ("check", "seconds"),
    "map pca s": ("map_pca", "seconds"),
    "map tsne s": ("map_tsne", "seconds"),
    "clusters s": ("clusters", "seconds"),
    "export s": ("export", "seconds"),
    "import s": ("import", "seconds"),
    "import peak MB": ("import", "peak_rss_mb"),
    "service up s": ("service", "up_s"),
    "service 16 clients /s": ("service", "all_per_s"),
    "service p50 ms": ("service", "all_p50_ms"),
    "service p99 ms": ("service", "all_p99_ms"),
    "service id p50 ms": ("service", "id_p50_ms"),
    "service RSS MB": ("service", "rss_end_mb"),
    "app up s": ("app", "app_up_s"),
    "app map first s": ("app", "map_first_computation_s"),
    "app search s": ("app", "first_render_search_s"),
    "app map s": ("app", "first_render_map_s"),
    "app evaluation s": ("app", "first_render_evaluation_s"),
    "app clusters s": ("app", "first_render_clusters_s"),
    "app audit s": ("app", "first_render_audit_s"),
}


def exponent(sizes: list[int], values: list[float]) -> float | None:
    """b of value ~ a * size^b, least squares over log-log (None with fewer than two positive points)."""
    pts = [(math.log(s), math.log(v)) for s, v in zip(sizes, values) if v and v > 0]
    if len(pts) < 2:
        return None
    xs, ys = zip(*pts)
    return float(np.polyfit(xs, ys, 1)[0])


def table(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    sizes = sorted(int(n) for n in results)
    rows = []
    for title, (step, key) in FIGURES.items():
        values = [results[str(n)].get(step, {}).get(key) for n in sizes]
        timed_out = [bool(results[str(n)].get(step, {}).get("timeout")) for n in sizes]
        rows.append({"figure": title, "values": values, "timed_out": timed_out, "exponent": exponent(sizes, values)})
    return rows


def markdown(rows: list[dict[str, Any]], results: dict[str, Any]) -> str:
    """The table as Markdown: a figure a row, a size a column, then the exponent."""
    sizes = sorted(int(n) for n in results)
    lines = ["| figure | " + " | ".join(f"{n:,}" for n in sizes) + " | exponent |", "| --- |" + " ---: |" * (len(sizes) + 1)]
    for row in rows:
        if all(v is None for v in row["values"]):
            continue
        cells = [
            "timed out" if t else "-" if v is None else f"{v:,.1f}" if abs(v) >= 10 else f"{v:.2f}"
            for v, t in zip(row["values"], row["timed_out"])
        ]
        b = row["exponent"]
        lines.append(f"| {row['figure']} | " + " | ".join(cells) + f" | {'-' if b is None else f'{b:.2f}'} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", required=True, help="MNIST in Keras's .npz layout")
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    ap.add_argument("--embedder", default="pixels", help="pixels keeps the model out of the way; vgg16 is the default embedder")
    ap.add_argument("--workdir", default="/tmp/lk-scale")
    ap.add_argument("--json", default="docs/scale.json")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds each command may run")
    ap.add_argument("--minutes", type=float, default=600, help="stop (resumably) after this long")
    ap.add_argument("--skip", nargs="*", default=[], help="steps not to run (e.g. map_tsne)")
    ap.add_argument("--fresh", action="store_true", help="forget earlier results in --json")
    ap.add_argument("--markdown", action="store_true", help="print the table of --json as Markdown (for the docs), run nothing")
    args = ap.parse_args()
    if args.markdown:
        saved = json.loads(Path(args.json).read_text())
        print(markdown(table(saved["results"]), saved["results"]))
        return 0
    args.deadline = time.monotonic() + args.minutes * 60
    path = Path(args.json)
    state = json.loads(path.read_text()) if path.is_file() and not args.fresh else {}
    if state.get("embedder", args.embedder) != args.embedder:
        raise SystemExit(f"{path} holds results for --embedder {state['embedder']}: pass --fresh or another --json")
    results: dict[str, dict[str, Any]] = state.get("results", {})

    def save() -> None:
        state.update(
            embedder=args.embedder,
            machine={"python": platform.python_version(), "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
            results=results,
            table=table(results),
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_suffix(".part")
        part.write_text(json.dumps(state, indent=1) + "\n")
        os.replace(part, path)

    for n in sorted(args.sizes):
        print(f"{n:,} items ({args.embedder})", flush=True)
        measure(n, args, results.setdefault(str(n), {}), save)
    save()
    sizes = sorted(int(n) for n in results)
    print(f"\n{'figure':<18}" + "".join(f"{n:>12,}" for n in sizes) + "   exponent")
    for row in state["table"]:
        cells = "".join(f"{'timeout' if t else ('-' if v is None else f'{v:,.1f}'):>12}" for v, t in zip(row["values"], row["timed_out"]))
        b = row["exponent"]
        print(f"{row['figure']:<18}{cells}   {'-' if b is None else f'{b:.2f}'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
