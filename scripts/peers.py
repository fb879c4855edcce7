"""lookalike's query path beside the indexes users pick instead, on the same vectors.

    python scripts/peers.py --db /tmp/lk-scale/db-100000 --collection mnist --json docs/peers-100000.json

The indexed (``train``) vectors of a lookalike collection are read back once; ``--queries`` held-out
vectors (seeded) are the queries. Ground truth: exact k=10 neighbours by brute force. For each index:
build time, the RAM it added (resident set, MB), query p50 and p99 at k=10 (one query a call, as a
search service asks), and recall@10 against the exact answers. The indexes:

* lookalike: ``Gallery.neighbours`` on the stored collection (Chroma's HNSW, M=32, ef_construction
  200, ef_search 64; no build here: the ingest built it);
* scikit-learn ``NearestNeighbors`` (brute force, the seed notebooks' way);
* faiss ``IndexFlatL2`` (exact) and ``IndexHNSWFlat`` (M=32, efConstruction 200, efSearch 64: the
  same parameters as lookalike's), what clip-retrieval serves from (``pip install faiss-cpu``);
* hnswlib (the same parameters; ``pip install hnswlib``).

An index whose package is missing is listed as such. Each figure names what it is; the ratio of
lookalike's p50 to each peer's is printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

K = 10


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def recall(found: list[list[int]], truth: np.ndarray) -> float:
    return float(np.mean([len(set(f[:K]) & set(t.tolist())) / K for f, t in zip(found, truth)]))


def timed_queries(ask: Any, queries: np.ndarray) -> tuple[list[list[int]], dict[str, float]]:
    ask(queries[:1])
    found, lat = [], []
    for q in queries:
        t = time.perf_counter()
        found.append(list(ask(q[None])))
        lat.append((time.perf_counter() - t) * 1000)
    return found, {"p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", required=True)
    ap.add_argument("--collection", default=None)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args()

    from lookalike.analysis.metrics import exact_neighbours
    from lookalike.core.gallery import Gallery

    rows: list[dict[str, Any]] = []
    with Gallery.open(args.collection, args.db) as g:
        ids, x, _ = g.scan("train", metadata=False)  # (no metadata: a million dicts are a gigabyte)
        test_ids, test_x, _ = g.scan("test", vectors=True)
        pick = np.sort(np.random.default_rng(args.seed).choice(len(test_ids), min(args.queries, len(test_ids)), replace=False))
        q = np.ascontiguousarray(test_x[pick], dtype=np.float32)
        x = np.ascontiguousarray(x, dtype=np.float32)
        del test_x
        n, d = x.shape
        print(f"{n:,} indexed vectors of {d} dimensions, {len(q)} queries, k={K}", flush=True)
        truth, _ = exact_neighbours(q, x, K)
        row_of = {id_: i for i, id_ in enumerate(ids)}
        test_set = set(test_ids)

        def ask_lookalike(v: np.ndarray) -> list[int]:
            return [row_of[a.id] for a in g.neighbours(v, K, split="train", metadata=False)[0] if a.id not in test_set]

        found, lat = timed_queries(ask_lookalike, q)
        rows.append(
            {"index": "lookalike (Chroma HNSW, split filter)", "build_s": None, "ram_mb": None, **lat, "recall_at_10": recall(found, truth)}
        )
        print(rows[-1], flush=True)

    def measure(name: str, build: Any, ask: Any) -> None:
        before = rss_mb()
        t = time.perf_counter()
        try:
            index = build()
        except ImportError as exc:
            rows.append({"index": name, "missing": str(exc)})
            print(f"{name}: not installed ({exc})", flush=True)
            return
        built = time.perf_counter() - t
        added = rss_mb() - before
        found, lat = timed_queries(lambda v: ask(index, v), q)
        rows.append({"index": name, "build_s": built, "ram_mb": added, **lat, "recall_at_10": recall(found, truth)})
        print(rows[-1], flush=True)

    def sk_build() -> Any:
        from sklearn.neighbors import NearestNeighbors

        return NearestNeighbors(n_neighbors=K, algorithm="brute").fit(x)

    measure("scikit-learn NearestNeighbors (brute)", sk_build, lambda m, v: m.kneighbors(v, K, return_distance=False)[0])

    def flat_build() -> Any:
        import faiss

        faiss.omp_set_num_threads(2)
        index = faiss.IndexFlatL2(d)
        index.add(x)
        return index

    measure("faiss IndexFlatL2", flat_build, lambda m, v: m.search(v, K)[1][0])

    def hnsw_build() -> Any:
        import faiss

        index = faiss.IndexHNSWFlat(d, 32)
        index.hnsw.efConstruction = 200
        index.add(x)
        index.hnsw.efSearch = 64
        return index

    measure("faiss IndexHNSWFlat (M 32, efC 200, efS 64)", hnsw_build, lambda m, v: m.search(v, K)[1][0])

    def hnswlib_build() -> Any:
        import hnswlib

        index = hnswlib.Index(space="l2", dim=d)
        index.init_index(max_elements=n, ef_construction=200, M=32, random_seed=args.seed)
        index.add_items(x, np.arange(n), num_threads=2)
        index.set_ef(64)
        return index

    measure("hnswlib (M 32, efC 200, ef 64)", hnswlib_build, lambda m, v: m.knn_query(v, K)[0][0])

    ours = rows[0]["p50_ms"]
    print(f"\n{'index':<46} {'build s':>8} {'RAM MB':>8} {'p50 ms':>8} {'p99 ms':>8} {'recall@10':>10} {'ours / it':>10}")
    for r in rows:
        if "missing" in r:
            print(f"{r['index']:<46} not installed")
            continue
        b = "-" if r["build_s"] is None else f"{r['build_s']:.1f}"
        ram = "-" if r["ram_mb"] is None else f"{r['ram_mb']:.0f}"
        cells = f"{b:>8} {ram:>8} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['recall_at_10']:>10.4f}"
        print(f"{r['index']:<46} {cells} {ours / r['p50_ms']:>9.1f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"n": n, "dim": d, "queries": len(q), "k": K, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
