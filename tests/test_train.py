from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from lookalike.core.gallery import Gallery
from lookalike.errors import EmbedderError, InputError
from lookalike.models.embedder import KerasModelEmbedder, make_spec, read_model_description
from lookalike.models.train import _shifted, train
from lookalike.util import file_sha256

from .conftest import make_cluttered, one_line_error, run_cli

TINY = {"weights": "random", "layer": "block2_pool", "dim": 16, "batch_size": 32, "learning_rate": 1e-3, "validation": 0.1}


def one_nn_accuracy(train_vecs: np.ndarray, y_train: np.ndarray, test_vecs: np.ndarray, y_test: np.ndarray) -> float:
    d2 = ((test_vecs[:, None, :] - train_vecs[None]) ** 2).sum(-1)
    return float((y_train[d2.argmin(1)] == y_test).mean())


@pytest.fixture(scope="module")
def trained(cluttered_npz: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("model") / "clutter.keras"
    report = train("mnist", source=str(cluttered_npz), out=out, epochs=4, seed=3, **TINY)
    return out, report


def test_training_improves_1nn_accuracy_over_the_untrained_network(trained: tuple[Path, object]) -> None:
    import keras

    from lookalike.data.images import resize
    from lookalike.models.backend import vgg16_preprocess
    from lookalike.models.train import _build

    out, report = trained
    x_train, y_train = make_cluttered(320, seed=11)
    x_test, y_test = make_cluttered(80, seed=12)
    emb = KerasModelEmbedder(make_spec("keras", weights=str(out)))
    after = one_nn_accuracy(emb.embed(list(x_train)), y_train, emb.embed(list(x_test)), y_test)
    keras.utils.set_random_seed(3)  # the same starting point as the training run
    untrained, _ = _build(make_spec("vgg16", weights="random", layer="block2_pool", seed=3), 16, 4, "cosine")
    before_vecs = [untrained.predict(vgg16_preprocess(np.stack([resize(im, 32, "RGB") for im in x])), verbose=0) for x in (x_train, x_test)]
    before = one_nn_accuracy(before_vecs[0], y_train, before_vecs[1], y_test)
    assert after >= before + 0.15, (before, after)
    assert report.n_train + report.n_validation == 320  # the 80 held-out images are never used
    assert report.epochs_run == len(report.history) >= 1 and "val_loss" in report.history[0]


@pytest.mark.slow
def test_saved_model_describes_itself_and_gives_the_same_vectors_in_a_new_process(trained: tuple[Path, object], tmp_path: Path) -> None:
    out, _ = trained
    desc = read_model_description(out)
    assert desc["weights"] == "random(seed=3)" and desc["layer"] == "block2_pool" and desc["dim"] == 16
    assert desc["dataset"]["dataset"] == "mnist" and desc["n_train"] == 288 and desc["seed"] == 3
    x_test, _ = make_cluttered(80, seed=12)
    here = KerasModelEmbedder(make_spec("keras", weights=str(out))).embed(list(x_test[:10]))
    assert here.shape == (10, 16) and np.allclose(np.linalg.norm(here, axis=1), 1.0, atol=1e-5)
    np.save(tmp_path / "x.npy", x_test[:10])
    script = tmp_path / "embed.py"
    script.write_text(
        "import sys, numpy as np\n"
        "from lookalike.models.embedder import KerasModelEmbedder, make_spec\n"
        "x = np.load(sys.argv[1])\n"
        f"np.save(sys.argv[2], KerasModelEmbedder(make_spec('keras', weights={str(out)!r})).embed(list(x)))\n"
    )
    import subprocess
    import sys

    subprocess.run([sys.executable, str(script), str(tmp_path / "x.npy"), str(tmp_path / "v.npy")], check=True)
    assert np.abs(np.load(tmp_path / "v.npy") - here).max() < 1e-5


@pytest.mark.slow
def test_training_is_deterministic_given_the_seed(cluttered_npz: Path, trained: tuple[Path, object], tmp_path: Path) -> None:
    out, report = trained
    again = run_cli(
        "train",
        "mnist",
        "--source",
        str(cluttered_npz),
        "--out",
        str(tmp_path / "again.keras"),
        "--epochs",
        "4",
        "--seed",
        "3",
        "--weights",
        "random",
        "--layer",
        "block2_pool",
        "--dim",
        "16",
        "--batch-size",
        "32",
        "--learning-rate",
        "0.001",
    )
    assert again.returncode == 0, again.stderr
    assert "epoch 1/4" in again.stderr and "best" in again.stdout
    x_test, _ = make_cluttered(80, seed=12)
    a = KerasModelEmbedder(make_spec("keras", weights=str(out))).embed(list(x_test))
    b = KerasModelEmbedder(make_spec("keras", weights=str(tmp_path / "again.keras"))).embed(list(x_test))
    assert np.abs(a - b).max() < 1e-4  # documented tolerance: float rounding of threaded CPU kernels
    again_losses = [h["loss"] for h in read_model_description(tmp_path / "again.keras")["history"]]
    assert again_losses == pytest.approx([h["loss"] for h in report.history], rel=1e-3)


def test_ingest_with_the_model_records_it_and_searches_with_it(
    cluttered_npz: Path, trained: tuple[Path, object], db: str, tmp_path: Path
) -> None:
    from PIL import Image

    from lookalike.analysis.evaluate import evaluate
    from lookalike.core.ingest import ingest
    from lookalike.core.search import search

    out, _ = trained
    report = ingest("mnist", source=str(cluttered_npz), model=str(out), db=db, collection="clutter-trained")
    assert report.stored == {"train": 320, "test": 80} and report.embedder.startswith("trained model:clutter.keras")
    with Gallery.open("clutter-trained", db) as g:
        rec = g.record.embedder
        assert rec.model == "keras" and rec.weights == str(out.resolve()) and rec.weights_sha256 == file_sha256(out)
        assert rec.dim == 16
        x_test, _y_test = make_cluttered(80, seed=12)
        Image.fromarray(x_test[5]).save(tmp_path / "q.png")
        hits = search(g, image=tmp_path / "q.png", k=3)
        assert hits[0].id == "mnist:test:5" and hits[0].distance < 1e-3
        assert evaluate(g).recall_at_1 == 1.0


@pytest.mark.slow
def test_missing_changed_or_foreign_model_files_fail_cleanly(cluttered_npz: Path, trained: tuple[Path, object], tmp_path: Path) -> None:
    out, _ = trained
    db = str(tmp_path / "db")
    missing = run_cli("ingest", "mnist", "--source", str(cluttered_npz), "--model", str(tmp_path / "nope.keras"), "--db", db)
    assert missing.returncode == 1 and "lookalike train" in one_line_error(missing)
    assert not Path(db).exists()  # nothing written
    foreign = tmp_path / "foreign.keras"
    foreign.write_text("not a zip")
    bad = run_cli("ingest", "mnist", "--source", str(cluttered_npz), "--model", str(foreign), "--db", db)
    assert bad.returncode == 1 and "not a model written by `lookalike train`" in one_line_error(bad)

    copy = tmp_path / "copy.keras"
    copy.write_bytes(out.read_bytes())
    ok = run_cli("ingest", "mnist", "--source", str(cluttered_npz), "--limit", "40", "--test-size", "8", "--model", str(copy), "--db", db)
    assert ok.returncode == 0, ok.stderr
    from PIL import Image

    Image.fromarray(make_cluttered(1, seed=5)[0][0]).save(tmp_path / "q.png")
    with zipfile.ZipFile(copy, "a") as z:  # the file changes after the collection was built
        z.writestr("extra.txt", "x")
    changed = run_cli("search", "--image", str(tmp_path / "q.png"), "--db", db)
    assert changed.returncode == 1 and "changed since the collection was built" in one_line_error(changed)
    copy.unlink()
    gone = run_cli("search", "--image", str(tmp_path / "q.png"), "--db", db)
    assert gone.returncode == 1 and "is missing" in one_line_error(gone)
    by_id = run_cli("search", "--id", "mnist:test:0", "--db", db)  # by id needs no model
    assert by_id.returncode == 0, by_id.stderr
    with pytest.raises(EmbedderError, match="not a model"):
        zipped = tmp_path / "plain.keras"
        with zipfile.ZipFile(zipped, "w") as z:
            z.writestr("config.json", json.dumps({}))
        make_spec("keras", weights=str(zipped))


def test_bad_training_options_fail_before_any_work(cluttered_npz: Path, trained: tuple[Path, object], tmp_path: Path) -> None:
    out, _ = trained
    for kwargs, match in [
        ({"out": tmp_path / "m.h5"}, "must end in .keras"),
        ({"out": out}, "exists: pass --overwrite"),
        ({"out": tmp_path / "no" / "m.keras"}, "does not exist"),
        ({"out": tmp_path / "m.keras", "loss": "x"}, "--loss"),
        ({"out": tmp_path / "m.keras", "validation": 0.7}, "--validation"),
        ({"out": tmp_path / "m.keras", "layer": "block9"}, "unknown VGG16 layer"),
    ]:
        with pytest.raises(InputError, match=match):
            train("mnist", source=str(cluttered_npz), **{**{"weights": "random"}, **kwargs})
    res = run_cli("train", "mnist", "--source", str(cluttered_npz), "--out", str(out), "--weights", "random")
    assert res.returncode == 2 and "--overwrite" in one_line_error(res)
    assert not (tmp_path / "m.keras").exists()


def test_shift_augmentation_moves_pixels_and_keeps_them() -> None:
    x = np.zeros((50, 8, 8, 3), np.uint8)
    x[:, 3:5, 3:5] = 200
    moved = _shifted(x, np.random.default_rng(0), 2)
    assert (moved.reshape(50, -1).sum(1) == x.reshape(50, -1).sum(1)).all()  # a 2-px shift never pushes the square out
    assert (moved != x).any(axis=(1, 2, 3)).sum() > 30  # most images moved
    assert _shifted(x, np.random.default_rng(0), 0) is x
