"""One process at a time on a local store: real processes, real Chroma, real locks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lookalike.core.gallery import Gallery
from lookalike.core.lock import LOCK_FILE, StoreLock, holder, is_locked_here
from lookalike.core.store import Store
from lookalike.errors import LockedError

from .conftest import one_line_error, run_cli

# A real ingest (the library's, as the CLI calls it) that says when it has written its first batch,
# then writes the rest slowly, so that other processes meet it mid-way.
SLOW_INGEST = """
import sys, time
from pathlib import Path
from lookalike.core.ingest import ingest
flag, source, db = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
def progress(done, total):
    flag.write_text(str(done))
    time.sleep(0.4)
ingest("mnist", source=source, embedder="pixels", batch_size=25, collection="same", db=db, progress=progress)
print("done")
"""


@pytest.fixture
def slow_ingest(tmp_path: Path, tiny_npz: Path, db: str) -> Iterator[subprocess.Popen[str]]:
    flag = tmp_path / "started"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_INGEST, str(flag), str(tiny_npz), db], stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not flag.exists():
        assert proc.poll() is None and time.time() < deadline, "the slow ingest did not start"
        time.sleep(0.05)
    yield proc
    proc.kill()
    proc.wait()


@pytest.mark.slow
def test_two_ingests_one_is_refused_then_one_waits(slow_ingest: subprocess.Popen[str], tiny_npz: Path, db: str) -> None:
    ingest_args = ("ingest", "mnist", "--source", str(tiny_npz), "--embedder", "pixels", "--collection", "same", "--db", db)
    refused = run_cli(*ingest_args)
    assert refused.returncode == 1
    line = one_line_error(refused)
    assert f"in use by process {slow_ingest.pid}" in line and "SLOW_INGEST" not in line
    assert "--wait SECONDS" in line and "chroma run" in line and "--db http://HOST:PORT" in line
    waited = run_cli(*ingest_args, "--wait", "120")
    assert waited.returncode == 0, waited.stderr
    assert slow_ingest.wait(timeout=60) == 0 and "done" in slow_ingest.stdout.read()
    assert "added   train 0, test 0 (already stored: 250)" in waited.stdout  # it ran after the first: nothing twice
    check = run_cli("check", "--db", db, "--json")
    assert check.returncode == 0, check.stdout
    assert json.loads(check.stdout)["counts"] == {"train": 200, "test": 50}
    ev = run_cli("evaluate", "--db", db, "--json")
    assert ev.returncode == 0 and (json.loads(ev.stdout)["n_queries"], json.loads(ev.stdout)["n_indexed"]) == (50, 200)


@pytest.mark.slow
def test_search_and_drop_meet_a_running_ingest(slow_ingest: subprocess.Popen[str], db: str) -> None:
    for args in (("search", "--id", "mnist:test:0", "--db", db), ("drop", "same", "--db", db), ("collections", "--db", db)):
        r = run_cli(*args)
        assert r.returncode == 1 and "in use by process" in one_line_error(r), args
    assert slow_ingest.wait(timeout=120) == 0
    assert run_cli("search", "--id", "mnist:test:0", "--db", db).returncode == 0
    dropped = run_cli("drop", "same", "--db", db)
    assert dropped.returncode == 0 and "dropped 'same'" in dropped.stdout


@pytest.mark.slow
def test_a_killed_holder_leaves_no_stale_lock(slow_ingest: subprocess.Popen[str], tiny_npz: Path, db: str) -> None:
    slow_ingest.kill()  # kill -9 in the middle of writing
    slow_ingest.wait()
    resumed = run_cli("ingest", "mnist", "--source", str(tiny_npz), "--embedder", "pixels", "--collection", "same", "--db", db)
    assert resumed.returncode == 0, resumed.stderr
    assert "stored  train 200, test 50" in resumed.stdout
    assert run_cli("check", "--db", db).returncode == 0


def test_lock_is_shared_within_a_process_and_released_by_the_last(tmp_path: Path) -> None:
    first = StoreLock(tmp_path)
    second = StoreLock(tmp_path)  # the same process: no conflict
    assert holder(tmp_path)["pid"] == os.getpid()  # type: ignore[index]
    first.close()
    assert is_locked_here(tmp_path)
    probe = "from pathlib import Path; from lookalike.core.lock import StoreLock; import sys; StoreLock(Path(sys.argv[1]))"
    other = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True)
    assert other.returncode != 0 and "LockedError" in other.stderr
    second.close()
    assert not is_locked_here(tmp_path) and (tmp_path / LOCK_FILE).read_text() == ""
    assert subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True).returncode == 0


def test_waiting_gives_up_with_the_holder_named(tmp_path: Path) -> None:
    hold = (
        "import sys, time; from pathlib import Path; from lookalike.core.lock import StoreLock; "
        "StoreLock(Path(sys.argv[1])); print('held', flush=True); time.sleep(30)"
    )
    proc = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        started = time.monotonic()
        with pytest.raises(LockedError, match=rf"process {proc.pid} .* after waiting 0.6 s"):
            StoreLock(tmp_path, wait=0.6)
        assert 0.5 < time.monotonic() - started < 5
    finally:
        proc.kill()
        proc.wait()
    StoreLock(tmp_path, wait=5).close()  # the kernel released the dead holder's lock


def test_closing_a_gallery_releases_the_store_for_others(tiny_npz: Path, db: str, fake_embedder) -> None:
    from lookalike.core.ingest import ingest

    ingest("mnist", source=str(tiny_npz), embedder=fake_embedder, db=db)
    with Gallery.open(db=db) as g:
        assert g.count() == 250
        assert run_cli("collections", "--db", db).returncode == 1  # held by this process
    r = run_cli("collections", "--db", db)
    assert r.returncode == 0 and "mnist" in r.stdout
    with Store(db):
        pass
    assert not is_locked_here(Path(db))


def test_a_negative_wait_is_a_bad_option(tmp_path: Path) -> None:
    from lookalike.errors import InputError

    with pytest.raises(InputError, match="--wait must be 0 or more"):
        StoreLock(tmp_path, wait=-1)
