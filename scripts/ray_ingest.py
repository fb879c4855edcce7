"""Measure `lookalike ingest --ray` against the plain ingest on this machine, and where the time goes.

    python scripts/ray_ingest.py --source ../shared/datasets/mnist.npz --limit 10000 --workers 1 2 --json docs/ray-ingest.json

For each run (plain, then Ray with each --workers), a fresh local store, the default embedder
(VGG16 block4_pool, seeded random weights): wall time of the ingest call, the time to its first
written batch (Ray: the cluster's start and each worker's TensorFlow import and model build),
images/s over the whole call and after the first batch, and the summed read/embed/write
seconds. Ray's own start (ray.init) is timed alone first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default="../shared/datasets/mnist.npz")
    ap.add_argument("--limit", type=int, default=10000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--json")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from lookalike.core.ingest import ingest

    t0 = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    init_s = time.perf_counter() - t0
    ray.shutdown()
    results: dict = {"ray_init_s": round(init_s, 2), "limit": args.limit, "cpus": os.cpu_count(), "runs": []}
    work = Path(tempfile.mkdtemp(prefix="lookalike-ray-"))
    for workers in [0, *args.workers]:
        marks: list[tuple[float, int]] = []
        started = time.perf_counter()
        report = ingest(
            "mnist",
            source=args.source,
            limit=args.limit,
            weights="random",
            db=str(work / f"db-{workers}"),
            collection="bench",
            batch_size=args.batch_size,
            ray=workers > 0,
            workers=workers or None,
            progress=lambda done, total, marks=marks: marks.append((time.perf_counter(), done)),
        )
        wall = time.perf_counter() - started
        n = sum(report.added.values())
        marks = [m for m in marks if m[1] > 0]  # progress(0, total) comes before any work
        first_t, first_n = marks[0]
        run = {
            "engine": f"ray x{workers}" if workers else "plain",
            "images": n,
            "wall_s": round(wall, 1),
            "images_per_s_whole_call": round(n / wall, 1),
            "first_batch_s": round(first_t - started, 1),
            "images_per_s_after_first_batch": round((n - first_n) / (marks[-1][0] - first_t), 1) if len(marks) > 1 else None,
            "read_s": round(report.decode_seconds, 1),
            "embed_s": round(report.embed_seconds, 1),
            "write_s": round(report.write_seconds, 1),
        }
        results["runs"].append(run)
        print(json.dumps(run), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
