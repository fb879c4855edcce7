"""Export and import, measured: seconds, file size, and the Python heap's peak (tracemalloc: numpy's and pyarrow's
buffers included, Chroma's own Rust memory not) for collections of several sizes, to show that memory does not grow
with the collection (both stream a page at a time).

    python scripts/transfer.py --source ../shared/datasets/mnist.npz --db /tmp/lk-transfer --sizes 7000 35000 70000
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from lookalike.core.gallery import Gallery
from lookalike.core.ingest import ingest
from lookalike.core.transfer import export_collection, import_collection


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", required=True)
    ap.add_argument("--db", required=True, help="store directory (collections are made once and reused)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[7000, 70000])
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    rows = []
    for n in args.sizes:
        name = f"t{n}"
        # the official split's first n training images (all 70,000: the whole dataset)
        kw = {"limit": n} if n < 70000 else {}
        ingest("mnist", source=args.source, embedder="pixels", db=args.db, collection=name, **kw)
        out = Path(tempfile.mkdtemp()) / f"{name}.parquet"
        target = tempfile.mkdtemp()
        try:
            with Gallery.open(name, args.db) as g:
                count = g.count()
                tracemalloc.start()
                t = time.perf_counter()
                export_collection(g, out)
                export_s = time.perf_counter() - t
                export_peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
            tracemalloc.start()
            t = time.perf_counter()
            import_collection(out, db=target)
            import_s = time.perf_counter() - t
            import_peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            row = {
                "items": count,
                "file_mb": out.stat().st_size / 2**20,
                "export_s": export_s,
                "export_heap_peak_mb": export_peak / 2**20,
                "import_s": import_s,
                "import_heap_peak_mb": import_peak / 2**20,
            }
        finally:
            shutil.rmtree(out.parent, ignore_errors=True)
            shutil.rmtree(target, ignore_errors=True)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"embedder": "pixels", "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
