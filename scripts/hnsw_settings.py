"""Chroma's HNSW build settings side by side: write rate against the quality of the answers.

    python scripts/hnsw_settings.py --source /tmp/lk-scale/digits-1000000.npz --n 100000 \
        --settings 32:200 32:100 24:100 32:64 --ef-search 64 128 --json /tmp/hnsw-100000.json

For each ``M:efConstruction`` a bare Chroma collection (``l2``; lookalike's own write path is not
involved) is filled with the first ``--n`` indexed digits of the source (``x_train`` of
``scripts/scale.py``'s file of distinct digits; ``--label``: one label's, as a label partition
holds, asked by that label's held-out digits or, ``--any-queries``, by every label's), embedded by
lookalike's ``pixels`` embedder (784-d), in calls of 5,000 as lookalike writes.
Measured: vectors written a second, disk, then ``--queries`` held-out digits (``x_test``, seeded)
asked one a call at k=10 at each ``--ef-search``: p50, p99, and recall@1 and recall@10 against
exact search (``metrics.exact_neighbours``: brute force, re-ranked in float64), and the share of a seeded sample of
stored vectors that find themselves first (what ``lookalike check`` asks).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from peers import K, recall, timed_queries  # (scripts/peers.py, beside this one: the same recall and timing)

BATCH = 5000


def one(
    setting: str, ef_searches: list[int], vecs: np.ndarray, queries: np.ndarray, truth: np.ndarray, selfs: np.ndarray, workdir: Path
) -> dict[str, Any]:
    import chromadb
    from chromadb.api.client import SharedSystemClient

    m, efc = (int(x) for x in setting.split(":"))
    path = workdir / f"hnsw-{m}-{efc}"
    shutil.rmtree(path, ignore_errors=True)
    client = chromadb.PersistentClient(str(path))
    col = client.create_collection(
        "bench", configuration={"hnsw": {"space": "l2", "max_neighbors": m, "ef_construction": efc, "ef_search": 64}}
    )
    ids = [str(i) for i in range(len(vecs))]
    t = time.perf_counter()
    for s in range(0, len(vecs), BATCH):
        col.add(ids=ids[s : s + BATCH], embeddings=vecs[s : s + BATCH])
    write_s = time.perf_counter() - t
    asked = {}
    for ef in ef_searches:
        # (a loaded index keeps the ef_search it was opened with: the client is opened again to ask with another)
        col.modify(configuration={"hnsw": {"ef_search": ef}})
        del col, client
        SharedSystemClient.clear_system_cache()
        client = chromadb.PersistentClient(str(path))
        col = client.get_collection("bench")

        def ask(v: np.ndarray, c: Any = col) -> list[int]:
            return [int(x) for x in c.query(query_embeddings=v, n_results=K, include=[])["ids"][0]]

        found, lat = timed_queries(ask, queries)
        asked[ef] = {
            **{name: round(ms, 2) for name, ms in lat.items()},
            "recall_at_1": round(float(np.mean([bool(f) and f[0] == t[0] for f, t in zip(found, truth)])), 4),
            "recall_at_10": round(recall(found, truth), 4),
        }
    got = col.query(query_embeddings=vecs[selfs], n_results=1, include=[])
    self_found = float(np.mean([bool(g) and int(g[0]) == int(i) for g, i in zip(got["ids"], selfs)]))
    disk = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20
    del col, client
    SharedSystemClient.clear_system_cache()  # (else the index stays loaded while the next setting builds)
    shutil.rmtree(path, ignore_errors=True)
    row = {
        "setting": setting,
        "max_neighbors": m,
        "ef_construction": efc,
        "n": len(vecs),
        "write_s": round(write_s, 1),
        "vectors_per_s": round(len(vecs) / write_s, 1),
        "disk_mb": round(disk, 1),
        "by_ef_search": asked,
        "finds_itself": round(self_found, 4),
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", required=True, help="scripts/scale.py's npz of distinct digits (x_train, x_test)")
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--settings", nargs="+", default=["32:200", "32:100"], help="M:efConstruction pairs")
    ap.add_argument("--ef-search", type=int, nargs="+", default=[64], help="ef_search values asked (the last one finds itself)")
    ap.add_argument("--label", type=int, default=None, help="only this label's digits, as in a label partition")
    ap.add_argument(
        "--any-queries", action="store_true", help="with --label: held-out digits of every label ask (a label filter on any image)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from lookalike.analysis.metrics import exact_neighbours
    from lookalike.models.embedder import PixelEmbedder

    data = np.load(args.source)
    emb = PixelEmbedder()
    x_train, x_test = data["x_train"], data["x_test"]
    if args.label is not None:  # one label's digits: what a label partition holds (asked by that label's, or by any)
        x_train = x_train[data["y_train"] == args.label]
        x_test = x_test if args.any_queries else x_test[data["y_test"] == args.label]
    args.n = min(args.n, len(x_train))
    vecs = np.concatenate([emb.embed(list(x_train[s : s + 20_000])) for s in range(0, args.n, 20_000)])[: args.n]
    rng = np.random.default_rng(args.seed)
    queries = emb.embed(list(x_test[np.sort(rng.choice(len(x_test), args.queries, replace=False))]))
    selfs = np.sort(rng.choice(args.n, 200, replace=False))
    truth, _ = exact_neighbours(queries, vecs, K)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="lk-hnsw-"))
    rows = [one(s, args.ef_search, vecs, queries, truth, selfs, workdir) for s in args.settings]
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "source": args.source,
                    "label": args.label,
                    "any_queries": args.any_queries,
                    "n": args.n,
                    "queries": args.queries,
                    "rows": rows,
                },
                indent=1,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
