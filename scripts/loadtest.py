"""Load test of a running `lookalike serve`: throughput and latency of image and id searches.

    lookalike serve --db ./lookalike-db &
    python scripts/loadtest.py --url http://127.0.0.1:8000 --clients 16 --seconds 20 --source mnist.npz

N client threads, each on its own keep-alive connection, send searches back to back until M requests
(--requests) or S seconds (--seconds), whichever comes first. The mix (--kind): uploads of PNG digits
(from the held-out images of --source, an .npz in Keras's layout) and queries by stored id (ids the
service itself returned), half of each with a one-label filter. Prints throughput, p50/p95/p99
latency and the error count per kind; --json for a machine-readable report. With --server-pid the
service's resident memory (RSS) is read at the start and at the end (a soak: --seconds 300).

Loopback only: the script refuses any other host (it is a load generator, not a tool to aim elsewhere).
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import random
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from lookalike.frontends.client import multipart_body
from lookalike.util import is_loopback


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def png_bytes(images: np.ndarray) -> list[bytes]:
    from PIL import Image

    out = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


class Conn:
    """One keep-alive connection (reopened after an error)."""

    def __init__(self, host: str, port: int, key: str | None) -> None:
        self.host, self.port = host, port
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: bytes | None = None, ctype: str | None = None) -> tuple[int, bytes]:
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        headers = dict(self.headers)
        if ctype:
            headers["Content-Type"] = ctype
        try:
            self.conn.request(method, path, body=body, headers=headers)
            resp = self.conn.getresponse()
            return resp.status, resp.read()
        except (OSError, http.client.HTTPException):
            self.conn.close()
            self.conn = None
            raise


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summary(lat: list[float], errors: int, seconds: float) -> dict[str, float | int | None]:
    ms = [x * 1000 for x in lat]
    return {
        "requests": len(lat) + errors,
        "ok": len(lat),
        "errors": errors,
        "per_s": round(len(lat) / seconds, 1) if seconds > 0 else None,
        "p50_ms": percentile(ms, 50),
        "p95_ms": percentile(ms, 95),
        "p99_ms": percentile(ms, 99),
        "mean_ms": float(np.mean(ms)) if ms else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True, help="http://127.0.0.1:PORT of `lookalike serve` (loopback only)")
    ap.add_argument("--collection", help="collection to query [default: the service's only one]")
    ap.add_argument("--clients", type=int, default=1)
    ap.add_argument("--requests", type=int, default=1000, help="stop after this many requests in all")
    ap.add_argument("--seconds", type=float, default=30.0, help="stop after this long")
    ap.add_argument("--kind", choices=["mixed", "image", "id"], default="mixed")
    ap.add_argument("--filtered", type=float, default=0.5, help="fraction of queries with a one-label filter")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--source", default=os.environ.get("LOOKALIKE_MNIST", "../shared/datasets/mnist.npz"), help="npz of query digits")
    ap.add_argument("--api-key-file")
    ap.add_argument("--server-pid", type=int, help="read the service's RSS at the start and the end")
    ap.add_argument("--warmup-seconds", type=float, default=0.0, help="run the same load this long before measuring")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    u = urlparse(args.url)
    host = u.hostname or ""
    loopback = is_loopback(host)
    if u.scheme != "http" or not loopback:
        print(f"error: --url must be http:// on loopback (127.0.0.1, ::1, localhost), got {args.url}", file=sys.stderr)
        return 2
    if args.clients < 1 or args.requests < 1 or args.seconds <= 0:
        print("error: --clients, --requests and --seconds must be positive", file=sys.stderr)
        return 2
    port = u.port or 80
    key = Path(args.api_key_file).read_text().split()[0] if args.api_key_file else os.environ.get("LOOKALIKE_API_KEY")
    setup = Conn(host, port, key)
    status, body = setup.request("GET", "/collections")
    if status != 200:
        print(f"error: GET /collections answered {status}: {body[:200]!r}", file=sys.stderr)
        return 1
    cols = json.loads(body)
    name = args.collection or (cols[0]["name"] if len(cols) == 1 else None)
    if name is None:
        print(f"error: pass --collection, one of {', '.join(c['name'] for c in cols)}", file=sys.stderr)
        return 2
    labels = next(c["label_names"] for c in cols if c["name"] == name) or ["0"]
    path = f"/collections/{name}/search"

    rng = random.Random(args.seed)
    with np.load(args.source) as d:
        test = d["x_test"]
    picks = np.random.default_rng(args.seed).choice(len(test), size=min(500, len(test)), replace=False)
    pngs = png_bytes(test[picks])
    # the id pool: ids the service itself answered (first query of each kind also warms the embedder)
    ids: list[str] = []
    for png in pngs[:20]:
        b, ct = multipart_body([("k", "20")], "image", "q.png", png)
        status, body = setup.request("POST", path, b, ct)
        if status != 200:
            print(f"error: an image search answered {status}: {body[:200]!r}", file=sys.stderr)
            return 1
        ids += [h["id"] for h in json.loads(body)["hits"]]

    def make_request(i: int) -> tuple[str, bytes, str]:
        kind = args.kind if args.kind != "mixed" else ("image" if i % 2 == 0 else "id")
        label = rng.choice(labels) if rng.random() < args.filtered else None
        if kind == "image":
            fields = [("k", str(args.k))] + ([("labels", label)] if label is not None else [])
            b, ct = multipart_body(fields, "image", "q.png", pngs[i % len(pngs)])
            return kind, b, ct
        payload: dict[str, object] = {"id": ids[i % len(ids)], "k": args.k}
        if label is not None:
            payload["labels"] = [label]
        return kind, json.dumps(payload).encode(), "application/json"

    prepared = [make_request(i) for i in range(min(args.requests, 4096))]
    lock = threading.Lock()
    lat: dict[str, list[float]] = {"image": [], "id": []}
    errs: dict[str, int] = {"image": 0, "id": 0}
    error_samples: list[str] = []

    def run(seconds: float, requests: int, record: bool) -> float:
        counter = iter(range(requests))
        deadline = time.perf_counter() + seconds

        def client() -> None:
            conn = Conn(host, port, key)
            while time.perf_counter() < deadline:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                kind, b, ct = prepared[i % len(prepared)]
                t0 = time.perf_counter()
                try:
                    status, body = conn.request("POST", path, b, ct)
                    ok = status == 200
                except Exception as exc:
                    ok, body = False, repr(exc).encode()
                dt = time.perf_counter() - t0
                if not record:
                    continue
                with lock:
                    if ok:
                        lat[kind].append(dt)
                    else:
                        errs[kind] += 1
                        if len(error_samples) < 5:
                            error_samples.append(body[:200].decode(errors="replace"))

        started = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - started

    if args.warmup_seconds > 0:
        run(args.warmup_seconds, 10**9, record=False)
    rss_start = rss_mb(args.server_pid)
    timeline: list[tuple[float, float | None]] = []
    stop_sampling = threading.Event()

    def sample() -> None:  # the service's RSS every 15 s while the load runs
        t0 = time.perf_counter()
        while not stop_sampling.wait(15):
            timeline.append((round(time.perf_counter() - t0), rss_mb(args.server_pid)))

    if args.server_pid is not None:
        threading.Thread(target=sample, daemon=True).start()
    seconds = run(args.seconds, args.requests, record=True)
    stop_sampling.set()
    rss_end = rss_mb(args.server_pid)
    stats_status, stats_body = Conn(host, port, key).request("GET", "/stats")
    report = {
        "url": args.url,
        "collection": name,
        "clients": args.clients,
        "kind": args.kind,
        "filtered": args.filtered,
        "k": args.k,
        "seconds": round(seconds, 2),
        "all": summary(lat["image"] + lat["id"], errs["image"] + errs["id"], seconds),
        "image": summary(lat["image"], errs["image"], seconds),
        "id": summary(lat["id"], errs["id"], seconds),
        "warmup_seconds": args.warmup_seconds,
        "server_rss_mb": {"start": rss_start, "end": rss_end, "every_15_s": timeline},
        "batching": json.loads(stats_body) if stats_status == 200 else None,
        "error_samples": error_samples,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{name} at {args.url}: {args.clients} clients, {seconds:.1f} s, kind {args.kind}, {args.filtered:.0%} label-filtered")
        print(f"  {'kind':<6} {'ok':>7} {'errors':>6} {'per s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}")
        for kind in ("all", "image", "id"):
            s = report[kind]
            if s["requests"]:
                cells = [f"{s[c]:8.1f}" if s[c] is not None else f"{'-':>8}" for c in ("per_s", "p50_ms", "p95_ms", "p99_ms")]
                print(f"  {kind:<6} {s['ok']:>7} {s['errors']:>6} " + " ".join(cells))
        if rss_start is not None:
            print(f"  server RSS: {rss_start:.0f} MB at the start, {rss_end:.0f} MB at the end")
        if report["batching"]:
            for col, b in report["batching"]["collections"].items():
                print(
                    f"  batching of {col}: {b['items']} images in {b['batches']} batches (mean {b['mean_batch']}, largest {b['largest']})"
                )
        for e in error_samples:
            print(f"  error: {e}")
    return 0 if not (errs["image"] or errs["id"]) else 1


if __name__ == "__main__":
    sys.exit(main())
