"""Write throughput of one `chroma run` server from N concurrent writer processes.

    python scripts/chroma_writers.py --writers 1 2 4 --vectors 20000 --json docs/chroma-writers.json

Starts `chroma run` on a free loopback port over a fresh directory (or uses --url), then, for each
N, creates a collection (l2, lookalike's HNSW settings) and has N processes add seeded random
512-d float32 vectors (distinct ids, batches of --batch-size, label metadata like an ingest's)
at the same time; reports vectors/s over the wall time of all of them, and the count read back.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def writer(url: str, name: str, start: int, n: int, batch: int, dim: int, go: mp.Event, out: mp.Queue) -> None:
    import chromadb
    from chromadb.config import Settings

    host, port = url.removeprefix("http://").split(":")
    client = chromadb.HttpClient(host=host, port=int(port), settings=Settings(anonymized_telemetry=False))
    col = client.get_collection(name)
    rng = np.random.default_rng(start)
    vecs = rng.random((n, dim), dtype=np.float32)
    go.wait()
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        ids = [f"w:{start + j}" for j in range(i, min(i + batch, n))]
        metas = [{"label": (start + j) % 10, "split": "train"} for j in range(i, min(i + batch, n))]
        col.add(ids=ids, embeddings=vecs[i : i + batch], metadatas=metas)
    out.put(time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--writers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--vectors", type=int, default=20000, help="vectors per run, split between the writers")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--url")
    ap.add_argument("--json")
    args = ap.parse_args()
    import chromadb
    from chromadb.config import Settings

    from lookalike.core.store import HNSW

    proc = None
    url = args.url
    if url is None:
        chroma = shutil.which("chroma") or str(Path(sys.executable).with_name("chroma"))
        port = free_port()
        path = tempfile.mkdtemp(prefix="lookalike-chroma-")
        proc = subprocess.Popen(
            [chroma, "run", "--path", path, "--host", "127.0.0.1", "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        for _ in range(300):
            try:
                opener.open(url + "/api/v2/heartbeat", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
    results: dict = {"url_local": args.url is None, "dim": args.dim, "batch_size": args.batch_size, "runs": []}
    try:
        host, port = url.removeprefix("http://").split(":")
        client = chromadb.HttpClient(host=host, port=int(port), settings=Settings(anonymized_telemetry=False))
        ctx = mp.get_context("spawn")
        for n in args.writers:
            name = f"writers-{n}"
            client.create_collection(name, configuration={"hnsw": dict(HNSW)})
            go, out = ctx.Event(), ctx.Queue()
            per = args.vectors // n
            procs = [ctx.Process(target=writer, args=(url, name, w * per, per, args.batch_size, args.dim, go, out)) for w in range(n)]
            for p in procs:
                p.start()
            time.sleep(3.0)  # let every writer import chromadb and connect
            t0 = time.perf_counter()
            go.set()
            for p in procs:
                p.join()
            wall = time.perf_counter() - t0
            each = [out.get() for _ in procs]
            count = client.get_collection(name).count()
            run = {
                "writers": n,
                "vectors": per * n,
                "count": count,
                "wall_s": round(wall, 2),
                "vectors_per_s": round(per * n / wall),
                "slowest_writer_s": round(max(each), 2),
            }
            results["runs"].append(run)
            print(json.dumps(run), flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
