from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lookalike.check import check, repair
from lookalike.ingest import ingest
from lookalike.store import Store

from .conftest import make_digits, one_line_error, run_cli, write_npz


@pytest.fixture
def stored(tiny_npz: Path, db: str, fake_embedder) -> str:
    ingest("mnist", source=str(tiny_npz), embedder=fake_embedder, db=db)
    return db


def test_a_whole_collection_checks_ok(stored: str) -> None:
    with Store(stored) as store:
        r = check(store)
    assert r.ok and r.problems == [] and r.fix == ""
    assert (r.count, r.counts) == (250, {"train": 200, "test": 50})
    assert len(r.partitions) == 10 and sum(r.partitions.values()) == 250


def test_a_partition_that_lost_items_is_found_and_rebuilt(stored: str) -> None:
    with Store(stored) as store:
        part = store._client.get_collection("mnist.p3", embedding_function=None)
        lost = part.get(limit=2, include=[])["ids"]
        part.delete(ids=lost)
        r = check(store)
        assert not r.ok and r.problems == [
            f"label partition '3' lacks 2 of the main collection's {r.partitions['3'] + 2} items of its label "
            "and has 0 entries without a main item"
        ]
        assert "--repair" in r.fix
        mended = repair(store)
        assert mended.ok and sum(mended.partitions.values()) == 250


def test_a_damaged_index_is_reported_with_the_fix(tmp_path: Path, db: str, fake_embedder) -> None:
    source = write_npz(tmp_path / "more.npz", make_digits(2500, seed=5), make_digits(100, seed=6))
    ingest("mnist", source=str(source), embedder=fake_embedder, db=db)  # enough for Chroma to persist its index files
    stored = db
    segments = [p for p in Path(stored).iterdir() if p.is_dir() and (p / "header.bin").exists()]
    assert segments  # one HNSW folder per collection: find the main one by size
    biggest = max(segments, key=lambda p: sum(f.stat().st_size for f in p.iterdir()))
    shutil.rmtree(biggest)  # the vectors of the main collection are gone from disk
    r = run_cli("check", "--db", stored, "--json")
    assert r.returncode == 1, (r.stdout, r.stderr)
    report = json.loads(r.stdout)
    assert not report["ok"] and any("no readable vector" in p or "cannot be read" in p for p in report["problems"])
    assert "lookalike drop mnist" in report["fix"] and "--repair" not in report["fix"]
    ev = run_cli("evaluate", "--db", stored)
    assert ev.returncode == 1 and "lookalike check --collection mnist" in one_line_error(ev)
    plain = run_cli("check", "--db", stored)
    assert plain.returncode == 1 and "DAMAGED" in plain.stdout and "Traceback" not in plain.stderr
