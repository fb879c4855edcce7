"""The 1% metadata filter of ``scripts/scale.py``, timed alone on a stored collection: cold (a new process: one
unfiltered query, then the filter's first query, then 60 more) and warm (after ``keep_warm(load=True)``, as the
service and the app ask). Prints JSON.

    python scripts/filter_timing.py --db /tmp/lk-scale2/db-1000000 --n 1000000
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from lookalike.core.gallery import Gallery


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", required=True)
    ap.add_argument("--n", type=int, required=True, help="the collection's size, as scale.py made it (a tenth held out)")
    ap.add_argument("--queries", type=int, default=60)
    args = ap.parse_args()
    g = Gallery.open(db=args.db)
    n_test = args.n // 10
    rng = np.random.default_rng(0)
    ids = [f"mnist:test:{i}" for i in sorted(rng.choice(n_test, args.queries, replace=False))]
    _, vecs, _ = g.get(ids, vectors=True)
    one_pct = {"$and": [{"split": "train"}, {"index": {"$lt": (args.n - n_test) // 100}}]}
    out: dict[str, float] = {}
    g.neighbours(vecs[-1:], 10)  # (the index's load from disk is not the filter's)

    def timed(prefix: str) -> None:
        t = time.perf_counter()
        g.neighbours(vecs[:1], 10, where=one_pct)
        out[f"{prefix}_first_ms"] = (time.perf_counter() - t) * 1000
        lat = []
        for v in vecs:
            t = time.perf_counter()
            g.neighbours(v[None], 10, where=one_pct)
            lat.append((time.perf_counter() - t) * 1000)
        out[f"{prefix}_p50_ms"] = float(np.percentile(lat, 50))
        out[f"{prefix}_p99_ms"] = float(np.percentile(lat, 99))

    timed("cold")
    t = time.perf_counter()
    g.keep_warm(load=True)
    out["warm_up_s"] = time.perf_counter() - t
    timed("warm")
    out["plans"] = dict(g.collection().plan_counts)  # type: ignore[assignment]
    g.close()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
