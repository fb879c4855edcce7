"""Churn: does a living collection stay whole and findable through many syncs that change, delete and add files?

Chroma 1.5.9 only marks deleted HNSW nodes, and its issue #7758 reports live records that ``query()``
no longer reaches after many deletes and upserts. This script measures it on lookalike's own sync:
a folder of ``--files`` digit PNGs (MNIST, ``--source``), then ``--rounds`` rounds that each change
``--change`` of the files (new content), delete as many and add as many new ones, a
``lookalike sync --prune`` after each. After every round, every live item's stored vector is asked
for its nearest neighbour through the store (the full ``lookalike check``): it must be the item
itself (or an exact copy at distance 0); when one is not, ``lookalike check --repair`` rebuilds the
index from the stored vectors and the full check runs again. It also checks that no surviving item changed split and
reports each label's held-out share.

    python scripts/churn.py --source ../shared/datasets/mnist.npz --files 5000 --rounds 20 --json docs/churn.json
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
from PIL import Image

from lookalike.analysis.check import check, repair
from lookalike.core.gallery import Gallery
from lookalike.core.ingest import ingest, sync
from lookalike.core.store import Store
from lookalike.models.embedder import make_spec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", required=True, help="MNIST .npz in Keras's layout")
    ap.add_argument("--files", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--change", type=float, default=0.10, help="share of the files changed, and deleted, and added, each round")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", help="work folder [default: a temporary one, removed]")
    ap.add_argument("--json", help="write the measurements here")
    args = ap.parse_args(argv)
    with np.load(args.source) as f:
        pool_x, pool_y = f["x_train"], f["y_train"]
    rng = np.random.default_rng(args.seed)
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="lookalike-churn-"))
    root, db = work / "folder", str(work / "db")
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(db, ignore_errors=True)
    next_digit = 0
    next_name = 0

    def write(path: Path, label: int | None = None) -> None:
        nonlocal next_digit
        while label is not None and int(pool_y[next_digit % len(pool_y)]) != label:
            next_digit += 1
        i = next_digit % len(pool_y)
        next_digit += 1
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pool_x[i]).save(path)

    def new_file() -> Path:
        nonlocal next_name
        label = int(pool_y[next_digit % len(pool_y)])
        path = root / str(label) / f"{next_name:06d}.png"
        next_name += 1
        write(path, label)
        return path

    live = [new_file() for _ in range(args.files)]
    spec = make_spec("pixels", normalize="l2")
    t = time.perf_counter()
    first = ingest("folder", str(root), embedder="pixels", normalize="l2", db=db, collection="churn")
    rows: list[dict[str, Any]] = []
    took = time.perf_counter() - t
    with Store(db) as store:
        fresh = check(store, "churn", full=True)  # the fresh index: the baseline
    print(
        f"round 0: {sum(first.added.values())} items in {took:.1f} s ({spec.describe()}); "
        f"{'whole' if fresh.ok else 'DAMAGED: ' + '; '.join(fresh.problems)}",
        file=sys.stderr,
    )
    splits0 = _splits(db)
    moved_total = 0
    for rnd in range(1, args.rounds + 1):
        n = round(args.change * len(live))
        picks = rng.permutation(len(live))
        changed = [live[i] for i in picks[:n]]
        deleted = [live[i] for i in picks[n : 2 * n]]
        for p in changed:
            write(p, int(p.parent.name))  # another digit of the same label: new content, same file
        for p in deleted:
            p.unlink()
        gone = set(deleted)
        live = [p for p in live if p not in gone] + [new_file() for _ in range(n)]
        t = time.perf_counter()
        rep = sync("churn", db, prune=True)
        sync_s = time.perf_counter() - t
        t = time.perf_counter()
        with Store(db) as store:
            report = check(store, "churn", full=True)
        check_s = time.perf_counter() - t
        repair_s, after = 0.0, None
        if not report.ok:  # what `lookalike check --repair` does, then the full check again
            t = time.perf_counter()
            with Store(db) as store:
                after = repair(store, "churn")
            repair_s = time.perf_counter() - t
        splits = _splits(db)
        moved = sum(1 for i, s in splits.items() if i in splits0 and splits0[i] != s)
        moved_total += moved
        splits0 = splits
        shares = _shares(db)
        row = {
            "round": rnd,
            "added": sum(rep.added.values()),
            "updated": rep.updated,
            "removed": len(rep.removed),
            "unchanged": rep.unchanged,
            "count": report.count,
            "files": len(live),
            "ok": report.ok,
            "problems": report.problems,
            "repaired_ok": None if after is None else after.ok,
            "repair_s": round(repair_s, 2),
            "moved_split": moved,
            "held_out_share_min": min(shares.values()),
            "held_out_share_max": max(shares.values()),
            "sync_s": round(sync_s, 2),
            "check_s": round(check_s, 2),
        }
        rows.append(row)
        print(
            f"round {rnd}: +{row['added']} ~{row['updated']} -{row['removed']} -> {row['count']} items for {row['files']} files; "
            f"{'whole' if report.ok else 'DAMAGED: ' + '; '.join(report.problems)}"
            f"{'' if after is None else f' -> repaired in {repair_s:.1f} s: ' + ('whole' if after.ok else 'STILL DAMAGED')}; "
            f"split moves {moved}; held-out share "
            f"{row['held_out_share_min']:.3f}-{row['held_out_share_max']:.3f}; sync {sync_s:.1f} s, full check {check_s:.1f} s",
            file=sys.stderr,
        )
    out = {
        "files": args.files,
        "rounds": args.rounds,
        "change": args.change,
        "embedder": spec.describe(),
        "fresh_index_whole": fresh.ok,
        "all_whole": all(r["ok"] for r in rows),
        "damaged_rounds": sum(1 for r in rows if not r["ok"]),
        "all_whole_after_repair": all(r["ok"] or r["repaired_ok"] for r in rows),
        "split_moves": moved_total,
        "rows": rows,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    if not args.dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if out["all_whole_after_repair"] and moved_total == 0 else 1


def _splits(db: str) -> dict[str, str]:
    with Gallery.open("churn", db) as g:
        return {i: str(m.get("split")) for i, m in g.catalogue().items()}


def _shares(db: str) -> dict[int, float]:
    with Gallery.open("churn", db) as g:
        per: dict[int, list[int]] = {}
        for m in g.catalogue().values():
            per.setdefault(int(m["label"]), []).append(m["split"] == "test")
    return {k: float(np.mean(v)) for k, v in per.items()}


if __name__ == "__main__":
    sys.exit(main())
