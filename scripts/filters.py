"""Filtered search at four selectivities: latency (p50, p99) and exactness against brute force, per plan.

Builds (or reuses) a collection of the 70,000 MNIST digits (official split; ``--embedder pixels`` by
default to keep the model out of the way) and asks, for each selectivity (50%, 10%, 1%, 0.1% of
the items, a filter on the stored ``index`` and ``source`` fields), ``--queries`` searches by a
held-out item's id with k=10, through :func:`lookalike.core.search.search` (the library's planner). Each
answer is compared with brute force over the matching items. It also times Chroma's ``where``
alone on the same filter (the baseline) and says which plan each selectivity took.

    python scripts/filters.py --source ../shared/datasets/mnist.npz --db /tmp/lk-filters --json docs/filters.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from lookalike.core.gallery import Gallery
from lookalike.core.ingest import ingest
from lookalike.core.search import search
from lookalike.data.filters import matches

SHARES = (0.5, 0.1, 0.01, 0.001)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", required=True)
    ap.add_argument("--db", required=True, help="store directory (the collection is made once and reused)")
    ap.add_argument("--embedder", default="pixels")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--json")
    ap.add_argument("--mode", choices=["warm", "cold", "both"], default="both", help="warm: the service; cold: a command")
    args = ap.parse_args(argv)
    t = time.perf_counter()
    rep = ingest("mnist", source=args.source, embedder=args.embedder, weights="random", db=args.db, collection="filters")
    print(f"collection: {sum(rep.stored.values())} items ({time.perf_counter() - t:.0f} s)", file=sys.stderr)
    modes = ["warm", "cold"] if args.mode == "both" else [args.mode]
    out: dict[str, Any] = {"embedder": args.embedder, "k": args.k, "queries": args.queries}
    for mode in modes:
        out[mode] = _measure(args, mode)
        out["items"] = out[mode]["items"]
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


def _measure(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    with Gallery.open("filters", args.db) as g:
        load_s = None
        if mode == "warm":
            t = time.perf_counter()
            g.keep_warm(load=True)  # what the service does at start
            load_s = time.perf_counter() - t
            print(f"warm: mirror loaded in {load_s:.1f} s", file=sys.stderr)
        ids, vecs, metas = g.collection().scan(vectors=True, dim=g.record.embedder.dim)
        n = len(ids)
        id_arr = np.array(ids)
        queries = [f"mnist:test:{i}" for i in range(0, 10_000, 10_000 // args.queries)][: args.queries]
        col = g.collection()
        for share in SHARES:
            n_match = round(share * n)
            where = {"$and": [{"source": "x_train"}, {"index": {"$lt": n_match}}]}
            rows_match = np.array([i for i, m in enumerate(metas) if matches(m, where)])
            times, exact = [], 0
            plans: dict[str, int] = {}
            for q in queries:
                qv = g.vector(q)
                before = dict(col.plan_counts)
                t0 = time.perf_counter()
                hits = search(g, id=q, k=args.k, where=where)
                times.append(time.perf_counter() - t0)
                plan = next((p for p, c in col.plan_counts.items() if c > before[p]), "partition")
                plans[plan] = plans.get(plan, 0) + 1
                d = np.sqrt(((vecs[rows_match] - qv) ** 2).sum(1))
                want = id_arr[rows_match[np.lexsort((id_arr[rows_match], d))[: args.k]]].tolist()
                exact += [h.id for h in hits] == want
            base = []
            for q in queries[:50]:
                qv = g.vector(q)
                t0 = time.perf_counter()
                col._c.query(query_embeddings=qv, n_results=args.k, where=where, include=["metadatas", "distances"])
                base.append(time.perf_counter() - t0)
            row = {
                "share": share,
                "matching": len(rows_match),
                "p50_ms": float(np.percentile(times, 50) * 1e3),
                "p99_ms": float(np.percentile(times, 99) * 1e3),
                "exact": exact / len(queries),
                "plans": plans,
                "chroma_where_p50_ms": float(np.percentile(base, 50) * 1e3),
            }
            rows.append(row)
            print(
                f"{mode}  {share:>6.1%}  {row['matching']:>6} items  p50 {row['p50_ms']:6.1f} ms  p99 {row['p99_ms']:6.1f} ms  "
                f"exact {row['exact']:.3f}  plans {plans}  (Chroma's where alone: p50 {row['chroma_where_p50_ms']:.1f} ms)",
                file=sys.stderr,
            )
    return {"items": n, "mirror_load_s": load_s, "rows": rows}


if __name__ == "__main__":
    sys.exit(main())
