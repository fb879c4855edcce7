"""Paging by an id cursor against paging by offset, at a size: what lookalike's id index costs and buys.

    python scripts/cursor_paging.py --size 1000000 --db /tmp/lk-cursor --json docs/cursor-1000000.json

Builds (or reuses, with the same ``--db``) a local collection of ``--size`` items with small seeded random
vectors (``--dim``, 16 by default: the vectors do not matter to paging, and a small graph keeps the build short)
and metadata ``label`` (10 values), ``split`` (90% train), ``index`` and ``tag`` (1% of the items ``rare``),
written ``--batch`` at a time through lookalike's store (label partitions off). Then, each timed ``--reps``
times (median): a page of 100 and of 1,000 items by cursor at 0%, 50% and 99% of the collection; the same
pages by Chroma's offset; a filtered page (one label; the 1% tag) by cursor from the middle, and by Chroma's
``where`` with an offset; a whole listing by cursor, 1,000 a page, against one by offset (up to 300,000 items:
it is quadratic); a scan of every id through the index; the first page of a collection without an index (a
store of an earlier release: the index is built from Chroma's listing) and the index file's size.
``--compare-writes N``: also write N items into two new collections, batch by batch in turn, one with the id
index and one without, for the write overhead. Prints JSON (and writes it with ``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lookalike.core import idindex
from lookalike.core.record import Record
from lookalike.core.store import Store, VectorCollection
from lookalike.models.embedder import make_spec


def timed(fn: Any, reps: int) -> tuple[float, Any]:
    """Median seconds of ``reps`` calls, and the last result."""
    times, out = [], None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def items(lo: int, hi: int, dim: int) -> tuple[list[str], np.ndarray, list[dict[str, Any]]]:
    """Items ``lo`` to ``hi``: ids, seeded vectors, metadata."""
    vecs = np.random.default_rng(lo).random((hi - lo, dim), dtype=np.float32)
    ids = [f"item:{i}" for i in range(lo, hi)]
    metas = [
        {"label": i % 10, "split": "test" if i % 10 == 9 else "train", "index": i, "tag": "rare" if i % 100 == 7 else "common"}
        for i in range(lo, hi)
    ]
    return ids, vecs, metas


def timed_write(col: VectorCollection, lo: int, hi: int, dim: int) -> float:
    ids, vecs, metas = items(lo, hi, dim)
    t = time.perf_counter()
    col.add(ids, vecs, metas)
    return time.perf_counter() - t


def write(col: VectorCollection, start: int, size: int, dim: int, batch: int) -> float:
    """Write items ``start`` to ``size``; items a second."""
    spent = 0.0
    for lo in range(start, size, batch):
        hi = min(size, lo + batch)
        spent += timed_write(col, lo, hi, dim)
        if (hi // batch) % 20 == 0:
            print(f"  {hi:,} written ({(hi - start) / spent:,.0f}/s)", file=sys.stderr, flush=True)
    return (size - start) / max(spent, 1e-9)


def compare_writes(store: Store, rec: Record, n: int, dim: int, batch: int) -> dict[str, float]:
    """Items a second written with and without the id index, batch by batch in turn (the same load on each)."""
    names = {"indexed": f"paging-indexed-{n}", "plain": f"paging-plain-{n}"}
    for name in names.values():
        if store.exists(name):
            store.drop(name)
    cols = {key: store.create(name, rec.to_json(), False) for key, name in names.items()}
    cols["plain"]._ids = None  # (as before the id index)
    spent = dict.fromkeys(names, 0.0)
    for lo in range(0, n, batch):
        for key, col in cols.items():
            spent[key] += timed_write(col, lo, min(n, lo + batch), dim)
    for name in names.values():
        store.drop(name)
    return {f"{key}_items_per_s": round(n / spent[key], 1) for key in names}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--batch", type=int, default=5000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--db", default="/tmp/lk-cursor")
    ap.add_argument("--compare-writes", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    out: dict[str, Any] = {"size": args.size, "dim": args.dim, "batch": args.batch, "reps": args.reps, "machine": f"{os.cpu_count()} cores"}
    rec = Record(make_spec("pixels"), {"dataset": "synthetic"}, [str(i) for i in range(10)], label_partitions=False)
    name = f"paging-{args.size}"
    with Store(args.db, create=True) as store:
        col = store.open(name) if store.exists(name) else store.create(name, rec.to_json(), False)
        have = col.count()
        if have < args.size:
            out["write_items_per_s"] = round(write(col, have, args.size, args.dim, args.batch), 1)
        if args.compare_writes:
            out["compare_writes"] = compare_writes(store, rec, args.compare_writes, args.dim, args.batch)
        n = col.count()
        epoch = col._id_epoch()
        pages: dict[str, Any] = {}
        for limit in (100, 1000):
            for share in (0.0, 0.5, 0.99):
                at = min(int(n * share), n - limit)
                cursor = idindex.encode_cursor(epoch, at) if at else None
                s, got = timed(lambda c=cursor, lim=limit: col.page(None, c, lim), args.reps)
                assert len(got[0]) == limit
                s_off, got_off = timed(lambda a=at, lim=limit: col._c.get(limit=lim, offset=a, include=["metadatas"]), args.reps)
                assert len(got_off["ids"]) == limit
                pages[f"limit {limit} at {share:.0%}"] = {"cursor_ms": round(s * 1000, 1), "offset_ms": round(s_off * 1000, 1)}
        out["pages"] = pages
        filtered: dict[str, Any] = {}
        for label, where, skip in (("one label (10%)", {"label": 3}, n // 20), ("tag rare (1%)", {"tag": "rare"}, n // 200)):
            s, got = timed(lambda w=where: col.page(w, idindex.encode_cursor(epoch, n // 2), 100), args.reps)
            s_off, _ = timed(lambda w=where, o=skip: col._c.get(where=w, limit=100, offset=o, include=["metadatas"]), args.reps)
            filtered[label] = {"cursor_ms": round(s * 1000, 1), "items": len(got[0]), "where_offset_ms": round(s_off * 1000, 1)}
        out["filtered_pages_of_100_from_the_middle"] = filtered
        t = time.perf_counter()
        listed, cursor = 0, None
        while True:
            ids, _, cursor = col.page(None, cursor, 1000)
            listed += len(ids)
            if cursor is None:
                break
        out["listing_by_cursor_1000_a_page_s"] = round(time.perf_counter() - t, 1)
        assert listed == n, (listed, n)
        t = time.perf_counter()
        scanned = sum(len(ids) for ids, _, _ in col.pages(vectors=False, metadatas=False))
        out["scan_of_every_id_by_index_s"] = round(time.perf_counter() - t, 2)
        assert scanned == n
        if n <= 300_000:  # (quadratic: a million takes minutes)
            t = time.perf_counter()
            off = 0
            while True:
                got = col._c.get(limit=1000, offset=off, include=["metadatas"])
                off += len(got["ids"])
                if len(got["ids"]) < 1000:
                    break
            out["listing_by_offset_1000_a_page_s"] = round(time.perf_counter() - t, 1)
        assert store._ids is not None
        out["index_file_mb"] = round(sum(p.stat().st_size for p in Path(args.db).glob(idindex.FILE + "*")) / 2**20, 1)
        store._ids.forget(col._ids_key)  # as a collection of an earlier release
        s, _ = timed(lambda: store.open(name).page(None, None, 100), 1)
        out["first_page_building_the_index_s"] = round(s, 2)
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
