"""ONNX Runtime: the choice, the converted model's agreement with TensorFlow, the cache, refusals, no TensorFlow later."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from lookalike.errors import EmbedderError, InputError
from lookalike.frontends.cli import app
from lookalike.models import onnxrt
from lookalike.models.embedder import BackboneEmbedder, make_spec

from .conftest import one_line_error
from .test_backbones import PICTURES

# MobileNetV3-Large at 32 px: the photo default's graph, converted in seconds
SPEC = make_spec("mobilenetv3large", weights="random", seed=0, input_size=32, precision="float32")


@pytest.mark.parametrize(
    ("env", "size", "precision", "extra", "wanted", "model"),
    [
        (None, 224, "float32", True, True, "mobilenetv3large"),  # auto: photo sizes in float32 with the extra
        (None, 224, "float32", False, False, "mobilenetv3large"),  # auto without the extra: TensorFlow, no complaint
        (None, 32, "float32", True, False, "mobilenetv3large"),  # auto at digit sizes: TensorFlow
        (None, 224, "bfloat16", True, False, "mobilenetv3large"),
        ("auto", 224, "float32", True, False, "efficientnetv2b0"),  # not measured faster on ONNX Runtime here
        ("tensorflow", 224, "float32", True, False, "mobilenetv3large"),
        ("ONNX", 32, "float32", True, True, "mobilenetv3large"),  # asked for: any size
    ],
)
def test_the_runtime_choice(monkeypatch: pytest.MonkeyPatch, env, size, precision, extra, wanted, model) -> None:
    if env:
        monkeypatch.setenv(onnxrt.RUNTIME_ENV, env)
    else:
        monkeypatch.delenv(onnxrt.RUNTIME_ENV, raising=False)
    monkeypatch.setattr(onnxrt, "installed", lambda: extra)
    spec = make_spec(model, weights="random", input_size=size, precision=precision)
    assert onnxrt.wanted(spec) is wanted


def test_what_cannot_be_had_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv(onnxrt.RUNTIME_ENV, "fast")
    with pytest.raises(InputError, match=r"LOOKALIKE_RUNTIME='fast' is not a runtime: use one of auto, tensorflow, onnx"):
        onnxrt.wanted(SPEC)
    monkeypatch.setenv(onnxrt.RUNTIME_ENV, "onnx")  # a bfloat16 collection stays searchable: TensorFlow, said in one line
    assert not onnxrt.wanted(make_spec("mobilenetv3large", weights="random", input_size=224, precision="bfloat16"))
    assert "ONNX Runtime runs float32 only" in capsys.readouterr().err
    monkeypatch.setattr(onnxrt, "installed", lambda: False)
    with pytest.raises(EmbedderError, match=r"pip install 'lookalike\[onnx\]'"):
        onnxrt.wanted(SPEC)


def test_the_cache_key_follows_what_the_model_depends_on() -> None:
    key = onnxrt.cache_key(SPEC)
    assert key == onnxrt.cache_key(make_spec("mobilenetv3large", weights="random", seed=0, input_size=32, precision="float32"))
    assert key == onnxrt.cache_key(make_spec("mobilenetv3large", weights="random", seed=0, input_size=32, precision="float32", fit="crop"))
    for other in ({"seed": 1}, {"input_size": 64}, {"pooling": "max", "model": "efficientnetv2b0"}):
        args = {"model": "mobilenetv3large", "weights": "random", "seed": 0, "input_size": 32, "precision": "float32", **other}
        assert onnxrt.cache_key(make_spec(args.pop("model"), **args)) != key, other


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """SPEC converted once in a cache of this module, with TensorFlow's vectors and Keras model beside it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOOKALIKE_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.setenv(onnxrt.RUNTIME_ENV, "tensorflow")
        tf_emb = BackboneEmbedder(SPEC)
        mp.setenv(onnxrt.RUNTIME_ENV, "onnx")
        emb = BackboneEmbedder(SPEC)
        yield {"tf": tf_emb, "onnx": emb, "file": onnxrt.cache_paths(SPEC)[0]}


@pytest.mark.slow  # ~20 s with its fixture: a Keras model converted to ONNX
def test_converted_once_then_loaded_without_tensorflow(converted: dict, tmp_path: Path) -> None:
    """The converted model gives TensorFlow's vectors (within 1e-5 here; 1e-3 is the bar), is cached with its check,
    and a new process embeds from the cache with no TensorFlow imported, to the same vectors."""
    emb = converted["onnx"]
    assert emb.runtime == "onnx" and converted["tf"].runtime == "tensorflow"
    v = emb.embed(PICTURES)
    assert np.abs(v - converted["tf"].embed(PICTURES)).max() < 1e-5 and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    model_file = converted["file"]
    note = json.loads(model_file.with_suffix(".json").read_text())
    assert model_file.is_file() and note["max_difference"] < onnxrt.AGREE and not note.get("refused")
    assert [p.name for p in model_file.parent.iterdir() if p.name.endswith(".part")] == []  # no temporary file left

    np.savez(tmp_path / "x.npz", a=PICTURES[0], b=PICTURES[1])
    code = (
        "import json, sys, numpy as np; from lookalike.models.embedder import build_embedder, EmbedderSpec\n"
        "z = np.load(sys.argv[1]); e = build_embedder(EmbedderSpec.from_dict(json.loads(sys.argv[2])))\n"
        "v = e.embed([z['a'], z['b']]); print(json.dumps([e.runtime, 'tensorflow' in sys.modules, v.tolist()]))"
    )
    env = {**os.environ, "LOOKALIKE_CACHE": str(model_file.parent.parent), onnxrt.RUNTIME_ENV: "onnx"}
    argv = [sys.executable, "-c", code, str(tmp_path / "x.npz"), json.dumps(SPEC.to_dict())]
    there = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert there.returncode == 0, there.stderr[-2000:]
    runtime, imported_tf, vectors = json.loads(there.stdout.strip().splitlines()[-1])
    assert runtime == "onnx" and not imported_tf
    assert np.abs(np.asarray(vectors) - v).max() < 1e-6


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LOOKALIKE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(onnxrt.RUNTIME_ENV, "onnx")
    return tmp_path / "cache" / "onnx"


def copy_of(converted: dict):
    """A stand-in for tf2onnx that writes the converted file of the module's fixture (the check still runs for real)."""
    return lambda model, size, out: shutil.copyfile(converted["file"], out)


@pytest.mark.slow  # the converted fixture (~18 s)
def test_a_damaged_cache_file_is_converted_again(converted: dict, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onnxrt, "_tf2onnx", copy_of(converted))
    model_file, _ = onnxrt.cache_paths(SPEC)
    model_file.parent.mkdir(parents=True)
    model_file.write_bytes(b"damaged")
    keras_model = converted["tf"]._model
    model = onnxrt.load(SPEC, lambda: keras_model, converted["tf"].backbone.preprocess, converted["tf"]._finish)
    assert isinstance(model, onnxrt.OnnxModel) and model_file.read_bytes() == converted["file"].read_bytes()


@pytest.mark.slow  # the converted fixture (~18 s)
def test_a_conversion_that_disagrees_or_fails_is_refused_and_remembered(converted: dict, cache: Path, monkeypatch, capsys) -> None:
    tf_emb = converted["tf"]
    monkeypatch.setattr(onnxrt, "_tf2onnx", copy_of(converted))
    monkeypatch.setattr(onnxrt, "AGREE", -1.0)  # no difference is small enough
    assert onnxrt.load(SPEC, lambda: tf_emb._model, tf_emb.backbone.preprocess, tf_emb._finish) is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ONNX Runtime not used" in err[0] and "differ from TensorFlow's" in err[0] and "using TensorFlow" in err[0]
    model_file, note = onnxrt.cache_paths(SPEC)
    assert not model_file.exists() and json.loads(note.read_text())["refused"]
    emb = BackboneEmbedder(SPEC)  # remembered: no conversion tried, TensorFlow embeds
    assert emb.runtime == "tensorflow" and np.abs(emb.embed(PICTURES) - tf_emb.embed(PICTURES)).max() < 1e-6
    assert capsys.readouterr().err == ""

    note.write_text(note.read_text().replace('"onnxruntime": "', '"onnxruntime": "0.'))  # made by another version
    assert not onnxrt._refused(note)  # tried again after an upgrade

    note.unlink()
    monkeypatch.setattr(onnxrt, "_tf2onnx", lambda *a: (_ for _ in ()).throw(ValueError("unsupported op")))
    assert onnxrt.load(SPEC, lambda: tf_emb._model, tf_emb.backbone.preprocess, tf_emb._finish) is None
    assert "conversion failed (ValueError: unsupported op)" in capsys.readouterr().err
    assert [p.name for p in cache.iterdir()] == [note.name]  # the note alone: no model, no temporary file


@pytest.mark.slow  # the converted fixture (~18 s)
def test_an_unwritable_cache_falls_back_to_tensorflow(converted: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    monkeypatch.setenv("LOOKALIKE_CACHE", str(blocked))  # $LOOKALIKE_CACHE/onnx cannot be made
    tf_emb = converted["tf"]
    assert onnxrt.load(SPEC, lambda: tf_emb._model, tf_emb.backbone.preprocess, tf_emb._finish) is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not writable" in err[0]


def test_a_bad_runtime_on_the_command_line_is_one_line(monkeypatch: pytest.MonkeyPatch, runner, tiny_npz: Path, db: str) -> None:
    monkeypatch.setenv(onnxrt.RUNTIME_ENV, "gpu")
    r = runner.invoke(app, ["ingest", "mnist", "--source", str(tiny_npz), "--weights", "random", "--db", db])
    assert r.exit_code != 0 and "is not a runtime: use one of auto, tensorflow, onnx" in one_line_error(r)
