"""lookalike.models.selfsup: SimCLR on a collection's own images, no label read (tiny data, a few steps)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from lookalike.core.gallery import Gallery
from lookalike.core.ingest import ingest
from lookalike.errors import InputError
from lookalike.models.embedder import build_embedder, make_spec, read_model_description
from lookalike.models.selfsup import _lr, augment_batch, checkpoint_dir, train_self_supervised

from .conftest import make_digits, one_line_error, run_cli, write_npz

TINY = {"epochs": 2, "batch_size": 16, "seed": 5}  # 96 indexed images: 6 steps an epoch


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_npz(tmp_path_factory.mktemp("ssl") / "digits.npz", make_digits(96, seed=11), make_digits(20, seed=12))


@pytest.fixture(scope="module")
def trained(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("model") / "ssl.keras"
    return out, train_self_supervised("mnist", source=str(digits), out=out, **TINY)


def weights_of(path: Path) -> list[np.ndarray]:
    from lookalike.models.backend import load_keras_model

    return [np.asarray(w) for w in load_keras_model(path).get_weights()]


def killed_after_the_first_epoch(digits: Path, out: Path) -> None:
    """A TINY run stopped (KeyboardInterrupt) once its first epoch's checkpoint is on disk."""

    def kill(epoch: int, planned: int, logs: dict) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_self_supervised("mnist", source=str(digits), out=out, on_epoch=kill, **TINY)


def test_permuted_labels_give_the_same_weights(digits: Path, trained: tuple[Path, object], tmp_path: Path) -> None:
    """No label is read: the same images with their labels permuted (and some replaced) train to identical weights."""
    z = np.load(digits)
    y = np.random.default_rng(0).permutation(z["y_train"])
    y[:10] = 9
    other = write_npz(tmp_path / "permuted.npz", (z["x_train"], y), (z["x_test"], z["y_test"]))
    out = tmp_path / "permuted.keras"
    r = train_self_supervised("mnist", source=str(other), out=out, **TINY)
    first, report = trained
    assert not np.array_equal(y, z["y_train"])
    assert [h["loss"] for h in r.history] == [h["loss"] for h in report.history]
    for a, b in zip(weights_of(first), weights_of(out), strict=True):
        assert np.array_equal(a, b)


def test_the_saved_model_is_an_embedder_that_says_how_it_was_made(trained: tuple[Path, object], digits: Path, db: str) -> None:
    out, _ = trained
    desc = read_model_description(out)
    assert desc["labels_used"] is False and desc["method"] == "simclr" and desc["base"] == "smallcnn"
    assert desc["n_images"] == 96 and desc["epochs_run"] == 2 and desc["train_seconds"] > 0
    assert desc["dataset"]["dataset"] == "mnist" and desc["augment"] == "digits"
    assert len(desc["history"]) == 2 and all(np.isfinite(h["loss"]) for h in desc["history"])
    spec = make_spec("keras", weights=str(out))
    assert spec.dim == 256 and "self-supervised" in spec.describe()
    emb = build_embedder(spec)
    x = np.load(digits)["x_test"][:4]
    v = emb.embed(list(x))
    assert v.shape == (4, 256) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    # ingest --model FILE: the collection's record names the model, and a search answers with it
    r = ingest("mnist", source=str(digits), model=str(out), db=db)
    assert sum(r.added.values()) == 116
    with Gallery.open(db=db) as g:
        assert g.record.embedder.model == "keras" and "self-supervised" in g.record.embedder.describe()
        hits = g.neighbours(g.embed(list(x[:1])), 3)[0]
        assert len(hits) == 3 and hits[0].distance >= 0


def test_training_moves_the_weights_and_lowers_the_loss(trained: tuple[Path, object]) -> None:
    from lookalike.models.backend import make_backbone

    out, report = trained
    assert report.steps == 12 and report.epochs_run == 2 and report.resumed_after == 0
    assert report.history[1]["loss"] < report.history[0]["loss"]
    start = make_backbone(make_spec("smallcnn", weights="random", seed=5, input_size=28, precision="float32")).get_weights()
    after = weights_of(out)
    assert any(a.shape == b.shape and not np.allclose(a, b) for a, b in zip(start, after))


def test_a_killed_run_resumes_from_its_checkpoint_to_the_same_weights(digits: Path, trained: tuple[Path, object], tmp_path: Path) -> None:
    out = tmp_path / "resumed.keras"
    killed_after_the_first_epoch(digits, out)
    ckpt = checkpoint_dir(out)
    assert not out.exists() and json.loads((ckpt / "state.json").read_text())["epoch"] == 1
    r = train_self_supervised("mnist", source=str(digits), out=out, **TINY)
    assert r.resumed_after == 1 and r.epochs_run == 2 and not ckpt.exists()
    first, report = trained
    assert [h["loss"] for h in r.history] == [h["loss"] for h in report.history]
    for a, b in zip(weights_of(first), weights_of(out), strict=True):
        assert np.array_equal(a, b)


@pytest.mark.slow  # ~10 s: two short trainings
def test_a_checkpoint_of_other_settings_is_refused_until_fresh(digits: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.keras"
    killed_after_the_first_epoch(digits, out)
    with pytest.raises(InputError, match=r"other settings \(temperature\).*--fresh"):
        train_self_supervised("mnist", source=str(digits), out=out, temperature=0.5, **TINY)
    r = train_self_supervised("mnist", source=str(digits), out=out, temperature=0.5, fresh=True, **{**TINY, "epochs": 1})
    assert r.resumed_after == 0 and out.exists()


@pytest.mark.slow  # ~8 s: an ingest and a training
def test_learning_from_a_stored_collection_reads_its_indexed_images(digits: Path, db: str, fake_embedder, tmp_path: Path) -> None:
    ingest("mnist", source=str(digits), embedder=fake_embedder, db=db)
    r = train_self_supervised(collection="mnist", db=db, out=tmp_path / "c.keras", **{**TINY, "epochs": 1})
    assert r.n_images == 96 and r.description["dataset"]["collection"] == "mnist"


def test_augmentations_are_seeded_and_keep_the_picture() -> None:
    x, _ = make_digits(8, seed=3)
    x = x[..., None]
    a = augment_batch(x, np.random.default_rng(1), "digits")
    b = augment_batch(x, np.random.default_rng(1), "digits")
    c = augment_batch(x, np.random.default_rng(2), "digits")
    assert a.shape == (8, 28, 28, 3) and a.dtype == np.float32 and a.min() >= 0 and a.max() <= 255
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.array_equal(a[..., 0], a[..., 2])  # grey stays grey
    grid = np.indices((28, 28)).reshape(2, -1)
    for view, image in zip(a[..., 0], x[..., 0].astype(np.float32)):  # moved a little, never lost or cut away
        assert 0.4 < view.sum() / image.sum() < 2.0
        centre = lambda im: grid @ im.ravel() / im.sum()  # noqa: E731
        assert 0 < np.abs(centre(view) - centre(image)).max() < 6
    photo = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3)).astype(np.uint8)
    p = augment_batch(photo, np.random.default_rng(1), "photos")
    assert p.shape == (4, 32, 32, 3) and not np.array_equal(p, photo.astype(np.float32))


def test_learning_rate_warms_up_then_falls_to_zero() -> None:
    lrs = [_lr(s, 10, 5, 1e-3) for s in range(50)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:])) and lrs[-1] == pytest.approx(0, abs=1e-5)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--self-supervised", "--loss", "softmax"], "--loss is for training on labels"),
        (["--minutes", "5"], "--minutes needs --self-supervised"),
        (["--self-supervised", "--augment", "cats"], "--augment 'cats' is not one of digits, photos"),
        (["--self-supervised", "--backbone", "dinov2_small"], "convolutional backbone"),
        (["--self-supervised", "--backbone", "nope"], "--backbone 'nope': self-supervised training takes a convolutional"),
        (["--self-supervised", "--backbone", "pixels"], "choose one of vgg16, resnet50"),
        (["--self-supervised", "--db", "somewhere"], "--db names the store of --collection"),
        (["--self-supervised", "--seed", "-1"], "--seed must be 0 or more"),
        (["--self-supervised", "--input-size", "16"], "--input-size for smallcnn must be at least 24"),
        (["--self-supervised", "--weights", "imagenet"], "smallcnn has no published weights"),
        (["--self-supervised", "--epochs", "0"], "--epochs must be at least 1"),
        (["--self-supervised", "--collection", "x"], "not both"),
    ],
)
def test_bad_options_are_one_line(argv: list[str], message: str, digits: Path, tmp_path: Path, runner) -> None:
    from lookalike.frontends.cli import app

    r = runner.invoke(app, ["train", "mnist", "--source", str(digits), "--out", str(tmp_path / "m.keras"), *argv])
    assert r.exit_code != 0 and message in one_line_error(r)
    assert not (tmp_path / "m.keras").exists()


def test_cli_trains_prints_and_resumes_nothing_twice(digits: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli.keras"
    argv = ["train", "mnist", "--source", str(digits), "--self-supervised", "--out", str(out), "--epochs", "1", "--batch-size", "32"]
    done = run_cli(*argv)
    assert done.returncode == 0, done.stderr
    assert "no labels read" in done.stdout and "96 indexed images" in done.stdout and out.exists()
    assert not checkpoint_dir(out).exists()  # removed once the model is written
    again = run_cli(*argv)
    assert again.returncode != 0 and "exists: pass --overwrite" in again.stderr and "Traceback" not in again.stderr


@pytest.mark.slow  # ~40 s: three processes start TensorFlow
def test_a_process_killed_mid_training_resumes_to_the_weights_of_an_unbroken_run(digits: Path, tmp_path: Path) -> None:
    """SIGKILL during the second epoch (a checkpoint of the first on disk, maybe mid-write of nothing else): the same
    command then finishes, and its model equals one trained without a break."""
    import os
    import signal
    import subprocess
    import sys
    import time

    argv = ["train", "mnist", "--source", str(digits), "--self-supervised", "--epochs", "8", "--batch-size", "16", "--seed", "5"]
    whole = run_cli(*argv, "--out", str(tmp_path / "whole.keras"))
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "killed.keras"
    code = "from lookalike.frontends.cli import main; main()"
    child = subprocess.Popen([sys.executable, "-c", code, *argv, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = checkpoint_dir(out) / "state.json"
    deadline = time.monotonic() + 240
    while not (state.is_file() and json.loads(state.read_text())["epoch"] >= 1) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert not out.exists() and state.is_file()
    again = run_cli(*argv, "--out", str(out))
    assert again.returncode == 0, again.stderr
    assert "resumed after epoch" in again.stdout
    for a, b in zip(weights_of(tmp_path / "whole.keras"), weights_of(out), strict=True):
        assert np.array_equal(a, b)


@pytest.mark.slow  # ~6 s: a training
def test_without_a_budget_it_runs_the_epochs_of_about_default_steps(digits: Path, tmp_path: Path, monkeypatch) -> None:
    import lookalike.models.selfsup as selfsup

    monkeypatch.setattr(selfsup, "DEFAULT_STEPS", 10)  # 96 images in batches of 16: 6 steps an epoch -> 2 epochs
    r = train_self_supervised("mnist", source=str(digits), out=tmp_path / "d.keras", batch_size=16, seed=5)
    assert r.epochs_run == r.epochs_planned == 2 and r.steps == 12 and r.description["budget"] == {"epochs": 2, "minutes": None}


@pytest.mark.slow  # ~6 s: two trainings
def test_a_minutes_budget_fixes_its_epochs_after_the_first_and_a_resumed_run_keeps_them(digits: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.keras"
    seen: list[int] = []

    def kill_after_saving(epoch: int, planned: int, logs: dict) -> None:
        seen.append(planned)
        raise KeyboardInterrupt  # (the checkpoint of this epoch is on disk)

    budget = {"minutes": 1e-4, "batch_size": 16, "seed": 5}  # 6 ms: one epoch fits, and the time is up after it
    with pytest.raises(KeyboardInterrupt):
        train_self_supervised("mnist", source=str(digits), out=out, on_epoch=kill_after_saving, **budget)
    state = json.loads((checkpoint_dir(out) / "state.json").read_text())
    assert seen == [1] and state["planned"] == 1 and state["epoch"] == 1
    r = train_self_supervised("mnist", source=str(digits), out=out, **budget)
    assert r.resumed_after == 1 and r.epochs_run == 1 and r.description["budget"] == {"epochs": None, "minutes": 1e-4}


def test_a_folder_is_learnt_from_once_ingested(digits_folder: Path, tmp_path: Path, runner) -> None:
    from lookalike.frontends.cli import app

    r = runner.invoke(app, ["train", "folder", str(digits_folder), "--self-supervised", "--out", str(tmp_path / "f.keras")])
    assert r.exit_code != 0 and "lookalike train --self-supervised --collection NAME" in one_line_error(r)


@pytest.mark.slow  # ~6 s: a training
def test_a_damaged_checkpoint_is_one_line_naming_fresh(digits: Path, tmp_path: Path) -> None:
    out = tmp_path / "d.keras"
    killed_after_the_first_epoch(digits, out)
    state = json.loads((checkpoint_dir(out) / "state.json").read_text())
    (checkpoint_dir(out) / state["weights"]).write_bytes(b"not a weights file")
    with pytest.raises(InputError, match=r"cannot be used .*pass --fresh"):
        train_self_supervised("mnist", source=str(digits), out=out, **TINY)
    (checkpoint_dir(out) / "state.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="cannot be read: pass --fresh"):
        train_self_supervised("mnist", source=str(digits), out=out, **TINY)
