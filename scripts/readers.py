"""Do read-only Chroma clients write to a local store? The measurement behind lookalike's lock.

Builds a store with ``lookalike ingest`` (raw pixels, fast), then opens it with plain
``chromadb.PersistentClient`` clients that only read (count, get, label-filtered and unfiltered
queries), bypassing lookalike's lock, and reports which files of the store changed: the HNSW index
files of each collection and the SQLite file (with the tables whose rows changed). Then it runs
``--readers`` such processes at once, ``--rounds`` times, and reports errors and whether the index
files still agree with a fresh read.

    python scripts/readers.py --source ../shared/datasets/mnist.npz --limit 8000
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

READ = """
import sys, numpy as np, chromadb
from chromadb.config import Settings
c = chromadb.PersistentClient(path=sys.argv[1], settings=Settings(anonymized_telemetry=False))
label = int(sys.argv[2])
main = c.get_collection("mnist", embedding_function=None)
vec = np.asarray(main.get(limit=1, include=["embeddings"])["embeddings"], np.float32)
main.query(query_embeddings=vec, n_results=5)
part = c.get_collection(f"mnist.p{label}", embedding_function=None)
part.query(query_embeddings=vec, n_results=5)
print(main.count(), part.count())
"""


def snapshot(db: Path) -> dict[str, str]:
    return {str(p.relative_to(db)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(db.rglob("*")) if p.is_file()}


def tables(db: Path) -> dict[str, list[tuple]]:
    con = sqlite3.connect(f"file:{db / 'chroma.sqlite3'}?mode=ro", uri=True)
    names = [r[0] for r in con.execute("select name from sqlite_master where type='table'")]
    out = {}
    for name in names:
        try:
            out[name] = con.execute(f"select * from '{name}'").fetchall()  # table names come from SQLite itself
        except sqlite3.Error:
            continue
    con.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", required=True, help="MNIST .npz in Keras's layout")
    ap.add_argument("--limit", type=int, default=8000)
    ap.add_argument("--readers", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lookalike-readers-"))
    db = root / "db"
    try:
        cli = [sys.executable, "-c", "from lookalike.frontends.cli import main; main()"]
        ingest = [*cli, "ingest", "mnist", "--source", args.source, "--limit", str(args.limit), "--test-size", "1000"]
        subprocess.run([*ingest, "--embedder", "pixels", "--db", str(db)], check=True, capture_output=True)
        before, rows_before = snapshot(db), tables(db)
        one = subprocess.run([sys.executable, "-c", READ, str(db), "3"], capture_output=True, text=True)
        after, rows_after = snapshot(db), tables(db)
        changed = [name for name in after if before.get(name) != after[name] and not name.endswith("lookalike.lock")]
        print(f"one read-only client (exit {one.returncode}) changed {len(changed)} files: {', '.join(changed) or 'none'}")
        print("  SQLite tables whose rows changed:", ", ".join(t for t in rows_after if rows_after[t] != rows_before.get(t)) or "none")
        errors = 0
        for r in range(args.rounds):
            pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
            procs = [subprocess.Popen([sys.executable, "-c", READ, str(db), str(i % 10)], **pipes) for i in range(args.readers)]
            outs = [p.communicate() for p in procs]
            bad = [err.strip().splitlines()[-1] for p, (_, err) in zip(procs, outs) if p.returncode != 0]
            errors += len(bad)
            print(f"round {r + 1}: {args.readers} concurrent readers, {len(bad)} failed" + (f" ({bad[0]})" if bad else ""))
        check = subprocess.run([*cli, "check", "--db", str(db)], capture_output=True, text=True)
        print(f"lookalike check afterwards: exit {check.returncode}; {check.stdout.strip().splitlines()[-1]}")
        print(f"reader failures in all: {errors}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
