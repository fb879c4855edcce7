"""Disk and RAM a stored item costs, for each vector size: the figures behind docs/capacity.md.

    python scripts/capacity.py --items 20000 --dims 384 512 768 784 960 1280 2048 --json docs/capacity.json

For each vector size, a fresh store under --workdir gets --items seeded random unit vectors through
lookalike's own store (``Store.create`` and ``VectorCollection.add``: its HNSW settings, batches and
label partitions), each with the metadata an MNIST item carries (label, label_name, split, dataset,
source, index), once with label partitions (10 labels) and once without. Measured: the store's
size on disk (what the second half of the items added to it, per 1,000,000 items: the store's fixed
cost left out; --items a multiple of 10,000), the write rate, and the resident memory a new process adds
when it opens the collection and answers a query (beyond what opening a 100-item one adds) (Chroma loads the whole HNSW index then; the
metadata stays in SQLite, on disk), per 1,000,000 items. Random vectors are the hardest case for an
HNSW graph, so the write rate here is a floor; disk and RAM depend on the size only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

OPEN_CHILD = """
import json, sys
import numpy as np
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
from lookalike.core.store import Store
s = Store(sys.argv[1])
s.open("tiny").query(np.ones((1, int(sys.argv[2])), np.float32), 10, metadata=False)  # (Chroma's own start-up, apart)
before = rss()
col = s.open("items")
col.query(np.ones((1, int(sys.argv[2])), np.float32), 10, metadata=False)  # (loads the HNSW index)
print(json.dumps({"rss_mb": rss() - before}))
"""


def du_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def measure(dim: int, n: int, partitioned: bool, work: Path) -> dict[str, float]:
    from lookalike.core.record import Record
    from lookalike.core.store import Store
    from lookalike.models.embedder import make_spec

    db = work / f"db-{dim}-{'parts' if partitioned else 'flat'}"
    shutil.rmtree(db, ignore_errors=True)
    rng = np.random.default_rng(dim)
    vecs = rng.standard_normal((n, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    labels = rng.integers(0, 10, n)
    ids = [f"mnist:train:{i}" for i in range(n)]
    metas = [
        {"label": int(y), "label_name": str(y), "split": "train", "dataset": "mnist", "source": "x_train", "index": i}
        for i, y in enumerate(labels)
    ]
    rec = Record(make_spec("pixels"), {"dataset": "mnist"}, [str(i) for i in range(10)], label_partitions=partitioned)
    with Store(str(db), create=True) as store:
        col = store.create("items", rec.to_json(), partitioned)
        started = time.perf_counter()
        half = 0.0
        for start in range(0, n, 5000):
            if start == n // 2:
                half = du_mb(db)
            col.add(ids[start : start + 5000], vecs[start : start + 5000], metas[start : start + 5000])
        seconds = time.perf_counter() - started
        store.create("tiny", rec.to_json(), False).add(ids[:100], vecs[:100], metas[:100])
    got = subprocess.run([sys.executable, "-c", OPEN_CHILD, str(db), str(dim)], capture_output=True, text=True, check=True)
    ram = json.loads(got.stdout.strip().splitlines()[-1])["rss_mb"]
    disk = du_mb(db) - half  # the second half's: without the store's fixed cost
    shutil.rmtree(db, ignore_errors=True)
    per_million = 1_000_000 / n
    return {
        "dim": dim,
        "partitions": partitioned,
        "items": n,
        "vectors_per_s": n / seconds,
        "disk_gb_per_million": disk * 2 * per_million / 1024,
        "ram_gb_per_million": ram * per_million / 1024,
        "raw_vectors_gb_per_million": dim * 4 * 1_000_000 / 2**30,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--dims", type=int, nargs="+", default=[384, 512, 768, 784, 960, 1280, 2048])
    ap.add_argument("--workdir", default="/tmp/lk-capacity")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"{'dim':>5} {'partitions':>10} {'vectors/s':>9} {'disk GB/M':>9} {'RAM GB/M':>9} {'raw GB/M':>8}")
    for dim in args.dims:
        for partitioned in (False, True):
            row = measure(dim, args.items, partitioned, work)
            rows.append(row)
            print(
                f"{dim:>5} {'yes' if partitioned else 'no':>10} {row['vectors_per_s']:>9.0f} {row['disk_gb_per_million']:>9.2f}"
                f" {row['ram_gb_per_million']:>9.2f} {row['raw_vectors_gb_per_million']:>8.2f}",
                flush=True,
            )
    if args.json:
        machine = {"python": platform.python_version(), "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()}
        Path(args.json).write_text(json.dumps({"machine": machine, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
