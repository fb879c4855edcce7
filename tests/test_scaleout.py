"""Ingest on Ray Data (a real local Ray cluster, started once for the module): the same collection as a plain ingest."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from lookalike.analysis.evaluate import evaluate
from lookalike.core.gallery import Gallery
from lookalike.core.ingest import ingest
from lookalike.core.store import Store
from lookalike.errors import EmbedderError, InputError
from lookalike.models.embedder import PixelEmbedder

from .conftest import chroma_run, make_digits, one_line_error, run_cli, write_npz

ray = pytest.importorskip("ray", reason="pip install -e '.[test]' (the ray extra)")


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    """One local Ray cluster for these tests (a start costs seconds); ingest reuses a running one."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def same_collection(db: str, a: str, b: str) -> None:
    """The same ids, metadata and record; vectors within 1e-5; evaluate's figures equal."""
    s = Store(db)
    try:
        ga, gb = Gallery(s, a), Gallery(s, b)
        ia, va, ma = ga.scan()
        ib, vb, mb = gb.scan()
        assert sorted(ia) == sorted(ib) and len(ia) == len(set(ia))
        rows = {i: n for n, i in enumerate(ib)}
        order = [rows[i] for i in ia]
        assert [mb[j] for j in order] == ma
        assert np.abs(va - vb[order]).max() <= 1e-5
        assert ga.record == gb.record
        if any(m["split"] == "test" for m in ma):
            ea, eb = evaluate(ga), evaluate(gb)
            assert (ea.accuracy, ea.exact_accuracy, ea.confusion) == (eb.accuracy, eb.exact_accuracy, eb.confusion)
    finally:
        s.close()


def test_mnist_source_on_ray_equals_the_plain_ingest(cluster: None, tiny_npz: Path, db: str, fake_embedder: PixelEmbedder) -> None:
    ray_report = ingest(
        "mnist", source=str(tiny_npz), embedder=fake_embedder, db=db, collection="on-ray", ray=True, workers=2, batch_size=40
    )
    plain = ingest("mnist", source=str(tiny_npz), embedder=fake_embedder, db=db, collection="plain")
    assert ray_report.added == plain.added == {"train": 200, "test": 50} and ray_report.ray_workers == 2
    same_collection(db, "on-ray", "plain")
    again = ingest("mnist", source=str(tiny_npz), embedder=fake_embedder, db=db, collection="on-ray", ray=True)
    assert again.added == {"train": 0, "test": 0} and again.already_stored == 250  # nothing scheduled twice


@pytest.mark.slow
def test_folder_on_ray_equals_the_plain_ingest_and_counts_unreadable_files(
    cluster: None, digits_folder: Path, db: str, fake_embedder: PixelEmbedder
) -> None:
    on_ray = ingest("folder", str(digits_folder), embedder=fake_embedder, db=db, collection="f-ray", ray=True, workers=2, batch_size=4)
    plain = ingest("folder", str(digits_folder), embedder=fake_embedder, db=db, collection="f-plain")
    assert on_ray.added == plain.added and sum(on_ray.added.values()) == 18
    assert on_ray.skipped == plain.skipped == ["class_1/broken.png"]  # the worker read it, found it broken: counted
    same_collection(db, "f-ray", "f-plain")


@pytest.mark.slow  # ~10 s: TensorFlow in two workers; the pixel tests above cover the machinery in the fast suite
def test_vgg16_on_ray_gives_the_plain_vectors(cluster: None, tiny_npz: Path, db: str) -> None:
    """The real recorded embedder built in each worker (TensorFlow limited to the worker's CPU): the same vectors."""
    opts = {"source": str(tiny_npz), "limit": 40, "test_size": 10, "weights": "random", "input_size": 32, "db": db}
    ingest("mnist", collection="vgg-ray", ray=True, workers=2, batch_size=16, **opts)
    ingest("mnist", collection="vgg-plain", **opts)
    same_collection(db, "vgg-ray", "vgg-plain")


@pytest.mark.slow
def test_a_killed_ray_ingest_into_a_chroma_server_resumes_exactly(cluster: None, tmp_path: Path, fake_embedder: PixelEmbedder) -> None:
    """`lookalike ingest ... --ray --workers 2 --db http://...` killed mid-way, then resumed (on Ray here, as the CLI's
    own process-group kill leaves nothing behind): every item stored once, equal to a plain ingest."""
    x, y = make_digits(3000, seed=9)
    xt, yt = make_digits(500, seed=10)
    npz = write_npz(tmp_path / "many.npz", (x, y), (xt, yt))
    with chroma_run(tmp_path / "server") as (_, url):
        cmd = [sys.executable, "-c", "from lookalike.frontends.cli import main; main()", "ingest", "mnist", "--source", str(npz)]
        cmd += ["--embedder", "pixels", "--input-size", "8", "--normalize", "l2", "--batch-size", "50", "--ray", "--workers", "2"]
        cmd += ["--db", url, "--collection", "killed"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.time() + 120
            count = 0
            while time.time() < deadline and proc.poll() is None:
                s = Store(url)
                try:
                    count = s.open("killed").count() if s.exists("killed") else 0
                finally:
                    s.close()
                if count >= 200:
                    break
                time.sleep(0.2)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray cluster it started
            proc.wait(timeout=30)
        assert 0 < count < 3500, "the ingest must be killed part-way"
        resumed = ingest("mnist", source=str(npz), embedder=fake_embedder, db=url, collection="killed", ray=True, workers=2)
        assert resumed.already_stored >= count and resumed.already_stored + sum(resumed.added.values()) == 3500
        ingest("mnist", source=str(npz), embedder=fake_embedder, db=url, collection="plain")
        same_collection(url, "killed", "plain")


@pytest.mark.slow
def test_worker_errors_are_one_line(cluster: None, tiny_npz: Path) -> None:
    from lookalike.core.scaleout import RayOptions, embed_on_ray
    from lookalike.models.embedder import make_spec

    rows = [(f"mnist:train:{i}", {"source": "x_train", "index": i, "label": 0, "split": "train"}) for i in range(6)]
    spec = make_spec("pixels", input_size=8, normalize="l2").to_dict()
    missing = {"dataset": "mnist", "source_file": "/nowhere/mnist.npz"}  # a source a node cannot see: counted per item
    got = list(embed_on_ray(spec, missing, rows, options=RayOptions(workers=1), batch_size=3))
    assert sum(len(b.ids) for b in got) == 6 and all(e.startswith("source: /nowhere/mnist.npz") for b in got for e in b.errors)
    other = {"dataset": "mnist", "source_file": str(tiny_npz), "source_sha256": "0" * 64}  # another file at the driver's path
    got = list(embed_on_ray(spec, other, rows, options=RayOptions(workers=1), batch_size=3))
    assert all("is not the file the driver read" in e for b in got for e in b.errors)
    with pytest.raises(InputError, match="need 4 CPUs"):  # more than the cluster has: refused, not waited for
        list(embed_on_ray(spec, missing, rows, options=RayOptions(workers=4), batch_size=3))
    broken = {**spec, "model": "keras", "weights": "/nowhere/model.keras"}  # the worker cannot build the embedder
    with pytest.raises(EmbedderError) as info:
        list(embed_on_ray(broken, {"dataset": "mnist", "source_file": str(tiny_npz)}, rows, options=RayOptions(workers=1), batch_size=3))
    assert str(info.value).startswith("a Ray worker failed: model file /nowhere/model.keras is missing") and "\n" not in str(info.value)


def test_bad_ray_options_and_the_missing_extra(tiny_npz: Path, db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for kw in ({"workers": 0}, {"cpus_per_worker": 0.0}, {"gpus_per_worker": -1.0}):
        with pytest.raises(InputError):
            ingest("mnist", source=str(tiny_npz), embedder="pixels", db=db, ray=True, **kw)
    r = run_cli("ingest", "mnist", "--source", str(tiny_npz), "--embedder", "pixels", "--db", db, "--ray", "--workers", "0")
    assert r.returncode != 0 and "--workers must be at least 1" in one_line_error(r)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    with pytest.raises(InputError, match=r"pip install 'lookalike\[ray\]'"):
        ingest("mnist", source=str(tiny_npz), embedder="pixels", db=db, ray=True)
    assert not Path(db).exists()  # refused before anything was written


def test_ray_address_after_the_flag() -> None:
    """`--ray ADDRESS` reads as `--ray --ray-address ADDRESS`; `--ray` alone or before another option stays a flag."""
    from lookalike.frontends.cli import ray_argv

    assert ray_argv(["ingest", "mnist", "--ray", "auto"]) == ["ingest", "mnist", "--ray", "--ray-address", "auto"]
    assert ray_argv(["ingest", "mnist", "--ray", "ray://head:10001", "--workers", "2"])[3:5] == ["--ray-address", "ray://head:10001"]
    assert ray_argv(["ingest", "mnist", "--ray", "10.0.0.5:6379"])[-1] == "10.0.0.5:6379"
    assert ray_argv(["ingest", "mnist", "--ray", "local"]) == ["ingest", "mnist", "--ray"]
    assert ray_argv(["ingest", "mnist", "--ray", "--workers", "2"]) == ["ingest", "mnist", "--ray", "--workers", "2"]
    assert ray_argv(["ingest", "--ray", "mnist"]) == ["ingest", "--ray", "mnist"]  # a dataset name is not an address
