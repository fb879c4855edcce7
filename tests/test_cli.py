"""The CLI end to end: every command, a real VGG16 through a real Chroma store, and every bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from lookalike.core.gallery import Gallery
from lookalike.core.store import Store
from lookalike.frontends.cli import app

from .conftest import offline_env, one_line_error, run_cli


def ingest_pixels(runner: CliRunner, npz: Path, db: str, *extra: str) -> None:
    r = runner.invoke(app, ["ingest", "mnist", "--source", str(npz), "--embedder", "pixels", "--db", db, *extra])
    assert r.exit_code == 0, r.output


def test_help_does_not_import_tensorflow() -> None:
    code = (
        "import sys; from typer.testing import CliRunner; from lookalike.frontends.cli import app; "
        "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules; print(r.output)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for command in ("ingest", "search", "evaluate", "collections", "drop", "quickstart"):
        assert command in out.stdout


def test_vgg16_end_to_end_through_the_cli(runner: CliRunner, tiny_npz: Path, db: str, tmp_path: Path) -> None:
    r = runner.invoke(
        app,
        [
            "ingest",
            "mnist",
            "--source",
            str(tiny_npz),
            "--limit",
            "120",
            "--test-size",
            "30",
            "--weights",
            "random",
            "--db",
            db,
            "--batch-size",
            "50",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "added   train 90, test 30" in r.stdout and "vgg16 random(seed=0) block4_pool/max/l2 32px 512d" in r.stdout
    rerun = runner.invoke(
        app, ["ingest", "mnist", "--source", str(tiny_npz), "--limit", "120", "--test-size", "30", "--weights", "random", "--db", db]
    )
    assert "added   train 0, test 0 (already stored: 120)" in rerun.stdout
    ev = runner.invoke(app, ["evaluate", "--db", db, "--json"])
    assert ev.exit_code == 0, ev.output
    report = json.loads(ev.stdout)
    assert (report["n_queries"], report["n_indexed"], report["k"]) == (30, 90, 1)
    assert report["recall_at_1"] >= 0.999 and report["accuracy"] == report["exact_accuracy"]
    from sklearn.neighbors import KNeighborsClassifier

    with Gallery.open(db=db) as g:  # the same accuracy from the stored vectors, computed by sklearn
        _, train_v, train_m = g.scan("train")
        _, test_v, test_m = g.scan("test")
    knn = KNeighborsClassifier(n_neighbors=1, algorithm="brute").fit(train_v, [m["label"] for m in train_m])
    assert report["accuracy"] == pytest.approx(float((knn.predict(test_v) == [m["label"] for m in test_m]).mean()))
    with np.load(tiny_npz) as f:
        Image.fromarray(f["x_train"][60]).save(tmp_path / "q.png")
    s = runner.invoke(
        app, ["search", "--image", str(tmp_path / "q.png"), "--k", "3", "--db", db, "--json", "--save", str(tmp_path / "s.png")]
    )
    assert s.exit_code == 0, s.output
    hits = json.loads(s.stdout)
    assert hits[0]["id"] == "mnist:train:60" and hits[0]["distance"] < 1e-3  # same vector as at ingest time
    assert {"id", "label", "split", "distance"} <= set(hits[0])
    assert (tmp_path / "s.png").stat().st_size > 1000
    # a new process reuses the store and finds the same answer
    again = run_cli("search", "--id", "mnist:train:60", "--k", "3", "--label", str(hits[1]["label"]), "--db", db, "--json")
    assert again.returncode == 0, again.stderr
    other = json.loads(again.stdout)
    assert all(h["id"] != "mnist:train:60" and h["label"] == hits[1]["label"] for h in other)


def test_search_table_evaluate_table_collections_drop(runner: CliRunner, tiny_npz: Path, db: str) -> None:
    ingest_pixels(runner, tiny_npz, db)
    s = runner.invoke(app, ["search", "--id", "mnist:test:0", "--label", "3", "--label", "4", "--db", db])
    assert s.exit_code == 0 and "rank" in s.stdout
    rows = [ln.split() for ln in s.stdout.splitlines()[1:]]
    assert len(rows) == 5 and all(row[2] in {"3", "4"} and row[1] != "mnist:test:0" for row in rows)
    e = runner.invoke(app, ["evaluate", "--db", db, "--k", "3"])
    assert e.exit_code == 0 and "3-NN accuracy    1.0000" in e.stdout and "confusion" in e.stdout
    c = runner.invoke(app, ["collections", "--db", db, "--json"])
    assert json.loads(c.stdout)[0]["count"] == 250 and json.loads(c.stdout)[0]["dataset"] == "mnist"
    assert "pixels" in runner.invoke(app, ["collections", "--db", db]).stdout
    assert runner.invoke(app, ["drop", "mnist", "--db", db]).exit_code == 0
    assert "no collections" in runner.invoke(app, ["collections", "--db", db]).stdout


def test_evaluate_keeps_its_report_with_the_collection_unless_told_not_to(runner: CliRunner, tiny_npz: Path, db: str) -> None:
    ingest_pixels(runner, tiny_npz, db)
    assert runner.invoke(app, ["evaluate", "--db", db, "--no-save"]).exit_code == 0
    with Gallery.open(db=db) as g:
        assert g.evaluation() is None
    e = runner.invoke(app, ["evaluate", "--db", db, "--k", "3", "--json"])
    assert e.exit_code == 0
    with Gallery.open(db=db) as g:
        saved = g.evaluation()
        assert saved is not None and g.count() == 250
    printed = json.loads(e.stdout)
    assert saved["k"] == 3 and saved["accuracy"] == printed["accuracy"] and saved["confusion"] == printed["confusion"]
    assert saved["n_mistakes"] == len(printed["mistakes"]) and saved["saved_at"].endswith("+00:00")


def test_several_collections_need_a_name(runner: CliRunner, tiny_npz: Path, db: str) -> None:
    ingest_pixels(runner, tiny_npz, db)
    ingest_pixels(runner, tiny_npz, db, "--collection", "second", "--normalize", "l2")
    r = runner.invoke(app, ["evaluate", "--db", db])
    assert r.exit_code != 0 and "mnist, second" in one_line_error(r)
    assert runner.invoke(app, ["evaluate", "--db", db, "--collection", "second"]).exit_code == 0


BAD_INPUTS = [
    (["ingest", "cifar"], "unknown dataset"),
    (["ingest", "mnist", "--source", "/nonexistent.npz"], "--source"),
    (["ingest", "folder", "{empty}"], "no images found"),
    (["ingest", "mnist", "--source", "{npz}", "--embedder", "vgg16", "--weights", "/nonexistent.h5"], "--weights random"),
    (["ingest", "mnist", "--source", "{npz}", "--weights", "random"], "pixels embedder takes no --weights"),
    (["ingest", "mnist", "--source", "{npz}", "--embedder", "vgg16", "--input-size", "16"], "at least 32"),
    (["ingest", "mnist", "--source", "{npz}", "--embedder", "resnet50"], "another --collection"),
    (["ingest", "mnist", "--source", "{npz}", "--fit", "stretch"], "--fit"),
    (["ingest", "mnist", "--source", "{npz}", "--embedder", "pixels", "--input-size", "20"], "another --collection"),
    (["ingest", "mnist", "--source", "{npz}", "--embedder", "pixels", "--db", "{file}/db"], "writable"),
    (["search", "--id", "mnist:test:999"], "no item"),
    (["search", "--image", "{missing}"], "not found"),
    (["search", "--image", "{corrupt}"], "cannot read"),
    (["search", "--id", "mnist:test:0", "--k", "0"], "--k"),
    (["search", "--id", "mnist:test:0", "--label", "42"], "not in collection 'mnist'"),
    (["search", "--image", "{bomb}"], "too large (12000x12000"),
    (["search", "--image", "{small}", "--max-pixels", "10"], "--max-pixels"),
    (["search", "--image", "{small}", "--max-pixels", "0"], "must be positive"),
    (["search", "--id", "mnist:test:0", "--db", "http://127.0.0.1:1"], "cannot reach a Chroma server"),
    (["check", "--collection", "nope"], "no collection 'nope'"),
    (["search", "--id", "mnist:test:0", "--collection", "nope"], "no collection 'nope'"),
    (["search", "--id", "mnist:test:0", "--save", "{file}/x.png"], "cannot write"),
    (["evaluate", "--collection", "nope"], "no collection 'nope'"),
    (["evaluate", "--k", "0"], "--k"),
    (["drop", "nope"], "no collection 'nope'"),
    (["collections", "--db", "{missing}"], "no store"),
]


@pytest.fixture(scope="module")
def pixels_store(tmp_path_factory: pytest.TempPathFactory, tiny_npz: Path) -> Path:
    """A store holding the tiny digits embedded by pixels, made once and copied by each test that needs it."""
    db = tmp_path_factory.mktemp("pixels") / "db"
    ingest_pixels(CliRunner(), tiny_npz, str(db))
    return db


@pytest.mark.parametrize(("args", "message"), BAD_INPUTS, ids=[" ".join(a[:2]) + ":" + m for a, m in BAD_INPUTS])
def test_bad_input_is_one_line_and_leaves_the_store_unchanged(
    runner: CliRunner, tiny_npz: Path, pixels_store: Path, db: str, tmp_path: Path, args: list[str], message: str
) -> None:
    shutil.copytree(pixels_store, db)
    (tmp_path / "empty" / "label").mkdir(parents=True)
    (tmp_path / "file").write_text("x")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n garbage")
    Image.new("1", (12_000, 12_000)).save(tmp_path / "bomb.png")
    Image.new("L", (8, 8)).save(tmp_path / "small.png")
    subs = {
        "{npz}": str(tiny_npz),
        "{empty}": str(tmp_path / "empty"),
        "{file}": str(tmp_path / "file"),
        "{missing}": str(tmp_path / "missing.png"),
        "{corrupt}": str(tmp_path / "corrupt.png"),
        "{bomb}": str(tmp_path / "bomb.png"),
        "{small}": str(tmp_path / "small.png"),
    }
    argv = []
    for a in args:
        for key, value in subs.items():
            a = a.replace(key, value)
        argv.append(a)
    if "--db" not in argv:
        argv += ["--db", db]

    def counts() -> dict[str, int]:
        with Store(db) as store:
            return {n: store.open(n).count() for n in store.names()}

    before = counts()
    r = runner.invoke(app, argv)
    assert r.exit_code != 0
    assert message in one_line_error(r)
    assert counts() == before == {"mnist": 250}
    with Gallery.open("mnist", db) as g:
        assert g.record.embedder.model == "pixels"


@pytest.mark.slow
def test_offline_mnist_download_names_the_fixes(tmp_path: Path) -> None:
    r = run_cli("ingest", "mnist", "--db", str(tmp_path / "db"), env=offline_env(tmp_path))
    assert r.returncode != 0
    line = one_line_error(r)
    assert "--source" in line and "mnist-sample" in line and "LOOKALIKE_MNIST" in line
    assert not (tmp_path / "db").exists()
    weights = run_cli("ingest", "mnist-sample", "--limit", "50", "--db", str(tmp_path / "db"), env=offline_env(tmp_path))
    assert weights.returncode != 0
    line = one_line_error(weights)
    assert "ImageNet" in line and "--weights random" in line and "--weights FILE" in line
    assert not (tmp_path / "db").exists()  # nothing created


@pytest.mark.slow
def test_killed_ingest_resumes_in_a_new_process(tmp_path: Path) -> None:
    db = str(tmp_path / "db")
    args = ("ingest", "mnist-sample", "--limit", "600", "--test-size", "100", "--weights", "random", "--batch-size", "25", "--db", db)
    proc = subprocess.Popen(
        [sys.executable, "-c", "from lookalike.frontends.cli import main; main()", "--verbose", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "LOOKALIKE_WRITE_BATCH": "25"},  # (each batch written as soon as it is embedded)
    )
    assert proc.stderr is not None
    for line in proc.stderr:  # wait for the first written batch, then kill -9 mid-ingest
        if "stored 25" in line:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    second = run_cli(*args)
    assert second.returncode == 0, second.stderr
    already = int(second.stdout.split("already stored: ")[1].split(")")[0])
    assert 25 <= already < 600  # resumed: what was written survives, the rest is embedded now
    assert "stored  train 500, test 100" in second.stdout
    with Gallery.open(db=db) as g:
        ids, _, _ = g.scan(vectors=False)
    assert len(ids) == len(set(ids)) == 600
    third = run_cli(*args)
    assert "added   train 0, test 0 (already stored: 600)" in third.stdout


def test_explore_commands(runner: CliRunner, tiny_npz: Path, db: str, tmp_path: Path) -> None:
    ingest_pixels(runner, tiny_npz, db)
    m = runner.invoke(
        app,
        ["map", "--db", db, "--method", "tsne", "--sample", "100", "--out", str(tmp_path / "m.png"), "--coords", str(tmp_path / "m.csv")],
    )
    assert m.exit_code == 0, m.output
    assert "100 points" in m.stdout and (tmp_path / "m.png").is_file()
    assert len((tmp_path / "m.csv").read_text().splitlines()) == 101
    c = runner.invoke(app, ["clusters", "--db", db, "--json", "--out", str(tmp_path / "c.png")])
    assert c.exit_code == 0, c.output
    report = json.loads(c.stdout)
    assert report["cluster_accuracy"] == 1.0 and report["adjusted_rand"] == pytest.approx(1.0)
    assert {"silhouette", "normalized_mutual_info", "n_disagreeing"} <= set(report)
    e = runner.invoke(app, ["evaluate", "--db", db, "--plot", str(tmp_path / "cm.png"), "--errors", str(tmp_path / "e.png")])
    assert e.exit_code == 0, e.output
    assert (tmp_path / "cm.png").is_file() and (tmp_path / "e.png").is_file()
    cmp = runner.invoke(
        app,
        [
            "compare",
            "mnist",
            "--source",
            str(tiny_npz),
            "--limit",
            "60",
            "--test-size",
            "20",
            "--embedder",
            "pixels",
            "--embedder",
            "pixels:size=14",
            "--db",
            db,
            "--out",
            str(tmp_path / "b.png"),
        ],
    )
    assert cmp.exit_code == 0, cmp.output
    assert "pixels 14px/none 196d" in cmp.stdout and "1-NN" in cmp.stdout and (tmp_path / "b.png").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["map", "--out", "x.png", "--method", "mds"], "--method"),
        (["map", "--out", "x.txt", "--method", "pca"], ".png"),
        (["map", "--out", "x.png", "--sample", "1"], "--sample"),
        (["clusters", "--k", "1"], "--k"),
        (["clusters", "--collection", "nope"], "no collection 'nope'"),
        (["compare", "mnist", "--embedder", "vgg16:depth=3"], "--embedder"),
        (["evaluate", "--plot", "x.svg"], ".png"),
    ],
)
def test_explore_bad_input(runner: CliRunner, tiny_npz: Path, db: str, tmp_path: Path, args: list[str], message: str) -> None:
    ingest_pixels(runner, tiny_npz, db)
    argv = [str(tmp_path / a) if a.startswith("x.") else a for a in args] + ["--db", db]
    r = runner.invoke(app, argv)
    assert r.exit_code != 0 and message in one_line_error(r)
    assert Store(db).names() == ["mnist"] and Store(db).open("mnist").count() == 250


@pytest.mark.slow
def test_every_command_opens_the_store_once(runner: CliRunner, tiny_npz: Path, db: str, tmp_path: Path, monkeypatch) -> None:
    opened: list[str] = []
    real_init = Store.__init__

    def counting(self: Store, *args: object, **kwargs: object) -> None:
        real_init(self, *args, **kwargs)  # a store that does not exist yet is not opened: count what opens
        opened.append(self.db)

    monkeypatch.setattr(Store, "__init__", counting)
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "q.png")
    png = str(tmp_path / "out.png")
    commands = [
        ["ingest", "mnist", "--source", str(tiny_npz), "--embedder", "pixels"],
        ["search", "--id", "mnist:test:0", "--save", png],
        ["search", "--image", str(tmp_path / "q.png"), "--save", png],
        ["evaluate", "--plot", png, "--errors", png],
        ["map", "--method", "pca", "--out", png],
        ["clusters", "--out", png],
        ["check"],
        ["collections"],
        ["compare", "mnist", "--source", str(tiny_npz), "--limit", "60", "--test-size", "20", "--embedder", "pixels"],
        ["quickstart", "--offline", "--limit", "60", "--test-size", "20", "--out", png],
        ["drop", "mnist"],
    ]
    for args in commands:
        opened.clear()
        r = runner.invoke(app, [*args, "--db", db])
        assert r.exit_code == 0, (args, r.output)
        assert opened == [db], (args, opened)


def test_json_output_has_no_nan() -> None:
    from lookalike.frontends.cli import _dumps

    assert json.loads(_dumps({"silhouette": float("nan"), "rate": float("inf"), "rows": [1.5, float("-inf")]})) == {
        "silhouette": None,
        "rate": None,
        "rows": [1.5, None],
    }


def test_a_folder_of_photos_through_the_cli(runner: CliRunner, tmp_path: Path, db: str) -> None:
    rng = np.random.default_rng(2)
    root = tmp_path / "photos"
    for label, base in (("day", 190), ("night", 50)):
        (root / label).mkdir(parents=True)
        for i in range(4):
            img = np.clip(rng.normal(base, 30, (1200, 1600, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / label / f"{i}.jpg", quality=85)
    (root / "day" / "away.png").symlink_to(tmp_path / "photos" / ".." / "elsewhere.png")
    Image.new("RGB", (40, 40)).save(tmp_path / "elsewhere.png")
    # (VGG16 at 32 px keeps this test quick; tests/test_backbones.py ingests photos at the default 224 px)
    argv = ["ingest", "folder", str(root), "--embedder", "vgg16", "--input-size", "32", "--weights", "random", "--test-size", "0.25"]
    r = runner.invoke(app, [*argv, "--db", db])
    assert r.exit_code == 0, r.output
    assert "stages  decode" in r.stdout and "embed" in r.stdout
    assert "skipped 1 symbolic links out of the folder (--follow-links): day/away.png" in r.stdout
    j = runner.invoke(app, ["ingest", "folder", str(root), "--db", db, "--json"])  # the recorded embedder and split: nothing to repeat
    assert json.loads(j.stdout)["already_stored"] == 8
    s = runner.invoke(app, ["search", "--image", str(root / "night" / "3.jpg"), "--k", "1", "--db", db, "--json"])
    assert s.exit_code == 0, s.output
    (hit,) = json.loads(s.stdout)
    assert hit["id"].endswith("night/3.jpg") and hit["distance"] < 1e-3
