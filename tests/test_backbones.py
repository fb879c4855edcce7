"""The backbone registry: each backbone's spec, preprocessing, determinism, input size by data, reuse of the record."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lookalike.core.gallery import Gallery
from lookalike.core.ingest import ingest, resolve_spec, sync
from lookalike.core.search import search
from lookalike.core.store import Store
from lookalike.errors import EmbedderError, InputError, MismatchError
from lookalike.frontends.cli import app
from lookalike.models import onnxrt
from lookalike.models.backbones import BACKBONES, PHOTO_DEFAULT, get_backbone, require_hub
from lookalike.models.embedder import EmbedderSpec, build_embedder, default_input_size, make_spec

from .conftest import make_digits, one_line_error


def photo(seed: int = 0, size: tuple[int, int] = (90, 60)) -> np.ndarray:
    """A fixed non-square colour picture (smooth, like a photo)."""
    rng = np.random.default_rng(seed)
    low = (rng.random((6, 9, 3)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(low).resize(size, Image.BICUBIC))


def test_every_backbone_has_a_spec_without_tensorflow() -> None:
    assert set(BACKBONES) == {"vgg16", "resnet50", "efficientnetv2b0", "convnext_tiny", "mobilenetv3large", "dinov2_small", "smallcnn"}
    for name, b in BACKBONES.items():
        spec = make_spec(name, weights="random")
        assert spec.dim == (512 if name == "vgg16" else b.dim) and spec.pooling == b.pooling and spec.input_size == b.small_size
        native = 28 if name == "smallcnn" else 224  # (lookalike's own small CNN is made for digits)
        assert spec.preprocessing == b.preprocessing and b.native_size == native and default_input_size(name, photos=True) == native
        assert EmbedderSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
        assert spec.describe().startswith(f"{name} random(seed=0)") and spec.backbone == name
    assert make_spec("dinov2_small", weights="imagenet").describe().startswith("dinov2_small preset")
    described = make_spec("resnet50", weights="random", input_size=224, fit="crop").describe()
    assert described == "resnet50 random(seed=0) avg/l2 224px crop 2048d"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model": "resnet18"}, "unknown embedder 'resnet18': choose one of vgg16, resnet50"),
        ({"model": "dinov2_small", "input_size": 40}, "multiple of 14, got 40 (e.g. 42)"),
        ({"model": "resnet50", "input_size": 16}, "at least 32"),
        ({"model": "resnet50", "layer": "conv5_block3_out"}, "a layer is chosen for vgg16 only"),
        ({"model": "resnet50", "pooling": "flatten"}, "--pooling 'flatten'"),
        ({"model": "dinov2_small", "pooling": "max"}, "cls, avg"),
        ({"model": "vgg16", "fit": "stretch"}, "--fit 'stretch'"),
        ({"model": "pixels", "weights": "random"}, "pixels embedder takes no --weights"),
    ],
)
def test_bad_backbone_options_are_one_line(kwargs: dict, message: str) -> None:
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make_spec(**{"weights": "random", **kwargs})
    with pytest.raises(InputError, match="choose one of"):
        get_backbone("nope")


@pytest.mark.parametrize("name", list(BACKBONES))
def test_preprocessing_is_the_one_keras_uses(name: str) -> None:
    """Each backbone's preprocessing equals its ``keras.applications`` module's ``preprocess_input`` on a fixed image
    (DINOv2: ImageNet mean and std, keras's "torch" mode); the models that normalise inside take 0-255 as it is."""
    from keras.applications import convnext, efficientnet_v2, imagenet_utils, mobilenet_v3, resnet50, vgg16

    modules = {"vgg16": vgg16, "resnet50": resnet50, "efficientnet_v2": efficientnet_v2, "convnext": convnext, "mobilenet_v3": mobilenet_v3}
    b = BACKBONES[name]
    x = np.stack([photo(1, (8, 8)), photo(2, (8, 8))]).astype(np.float32)
    if b.keras_module is None:  # lookalike's own (smallcnn): 0-255 in, divided by 255 in its first layer
        assert np.array_equal(b.preprocess(x), x)
        assert type(b.build(28, False).layers[1]).__name__ == "Rescaling"
        return
    if b.keras_module == "imagenet_utils:torch":
        want = imagenet_utils.preprocess_input(x.copy(), mode="torch")
    else:
        want = modules[b.keras_module].preprocess_input(x.copy())
    got = b.preprocess(x)
    assert got.dtype == np.float32 and np.allclose(got, want, atol=1e-5)
    if name in ("efficientnetv2b0", "convnext_tiny", "mobilenetv3large"):
        assert np.array_equal(got, x)  # normalised inside the model: not twice


@pytest.fixture(scope="module")
def built() -> dict[str, object]:
    return {name: build_embedder(make_spec(name, weights="random", seed=0, precision="float32")) for name in BACKBONES}


PICTURES = [photo(3), photo(4, (40, 70))]


FAST = ("mobilenetv3large", "efficientnetv2b0")  # the fast suite builds these two (the photo default among them)


@pytest.mark.parametrize("names", [pytest.param(FAST, id="fast"), pytest.param(tuple(BACKBONES), id="all", marks=pytest.mark.slow)])
def test_each_backbone_embeds_unit_vectors_and_normalises_inside(names: tuple[str, ...]) -> None:
    """Every backbone gives finite unit vectors of its length that tell pictures apart, the same for a picture alone or in
    a batch; the models that take 0-255 rescale it in their first layers."""
    for name in names:
        emb = build_embedder(make_spec(name, weights="random", seed=0, precision="float32"))
        v = emb.embed(PICTURES)
        assert v.shape == (2, emb.spec.dim) and np.isfinite(v).all() and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
        assert np.abs(v[0] - v[1]).max() > 1e-3, name  # not a constant function
        assert np.abs(emb.embed(PICTURES[1:])[0] - v[1]).max() < 1e-5, name
        if name in ("efficientnetv2b0", "convnext_tiny", "mobilenetv3large"):
            first = [type(layer).__name__ for layer in emb._model.layers[:4]]
            assert "Rescaling" in first or "Normalization" in first, first


@pytest.mark.slow  # ~45 s: six models built again in a child; the fast suite checks VGG16's so (tests/test_embedder.py)
def test_each_backbone_gives_the_same_vector_in_a_new_process(built: dict, tmp_path: Path) -> None:
    """Random weights come from the seed alone: the same picture gives the same vector in a new process, for each backbone."""
    np.savez(tmp_path / "x.npz", a=PICTURES[0], b=PICTURES[1])
    code = (
        "import json, sys, numpy as np; from lookalike.models.embedder import build_embedder, make_spec\n"
        "z = np.load(sys.argv[1]); x = [z['a'], z['b']]\n"
        "out = {n: build_embedder(make_spec(n, weights='random', seed=0, precision='float32')).embed(x).tolist() for n in sys.argv[2:]}\n"
        "print(json.dumps(out))"
    )
    there = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.npz"), *built], capture_output=True, text=True, timeout=600)
    assert there.returncode == 0, there.stderr[-2000:]
    vectors = json.loads(there.stdout.strip().splitlines()[-1])
    for name, emb in built.items():
        assert np.abs(np.asarray(vectors[name]) - emb.embed(PICTURES)).max() < 1e-5, name


def test_missing_keras_hub_is_one_line(monkeypatch: pytest.MonkeyPatch, runner, tiny_npz: Path, db: str) -> None:
    monkeypatch.setitem(sys.modules, "keras_hub", None)  # import keras_hub now raises ImportError
    with pytest.raises(EmbedderError, match=r"pip install 'lookalike\[hub\]'"):
        require_hub("dinov2_small")
    argv = ["ingest", "mnist", "--source", str(tiny_npz), "--embedder", "dinov2_small", "--weights", "random", "--db", db]
    r = runner.invoke(app, argv)
    assert r.exit_code != 0 and "pip install 'lookalike[hub]'" in one_line_error(r)
    assert not Path(db).exists() or not Store(db).names()  # nothing written


def test_models_lists_every_backbone(runner) -> None:
    r = runner.invoke(app, ["models", "--json"])
    assert r.exit_code == 0, r.output
    rows = {row["name"]: row for row in json.loads(r.output)}
    assert set(rows) == {*BACKBONES, "pixels"}
    for name, b in BACKBONES.items():
        assert rows[name]["input"] == b.native_size and rows[name]["dim"] == b.dim and rows[name]["gflops"] == b.gflops
    assert rows[PHOTO_DEFAULT]["default_for"] == "photos" and rows["vgg16"]["default_for"] == "digits"
    assert rows["dinov2_small"]["extra"] == "lookalike[hub]"
    table = runner.invoke(app, ["models"]).output
    assert all(name in table for name in BACKBONES)
    assert f"runtime: ONNX Runtime for {PHOTO_DEFAULT} in float32" in table if onnxrt.installed() else "lookalike[onnx]" in table


def write_photos(root: Path, n: int, size: tuple[int, int] = (300, 200)) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = root / f"p{i}.jpg"
        Image.fromarray(photo(10 + i, size)).save(p, quality=92)
        paths.append(p)
    return paths


@pytest.mark.slow  # ~15 s: 224 px photos through a CNN
def test_a_photo_folder_gets_224_crop_and_reuses_its_embedder(tmp_path: Path, db: str) -> None:
    """Photos: the photo default at 224 px, centre crop, recorded; a stored photo is found by its own file at ~0; a
    re-ingest and a sync need no option; a differing option is refused in one line, nothing changed."""
    paths = write_photos(tmp_path / "photos", 4)
    r = ingest("folder", str(tmp_path / "photos"), weights="random", db=db)
    assert sum(r.added.values()) == 4
    assert r.runtime == ("onnx" if onnxrt.installed() else "tensorflow")  # the photo default runs on ONNX Runtime when it can
    with Store(db) as store:
        spec = Gallery(store, "folder").record.embedder
        assert (spec.model, spec.input_size, spec.fit, spec.weights) == (PHOTO_DEFAULT, 224, "crop", "random")
        hits = search(Gallery(store, "folder"), image=paths[2], k=2)
        assert hits[0].id == "folder:p2.jpg" and hits[0].distance < 1e-6
    write_photos(tmp_path / "photos", 5)  # one more photo
    again = ingest("folder", str(tmp_path / "photos"), db=db)  # nothing repeated
    assert sum(again.added.values()) == 1 and again.embedder == spec.describe()
    assert sum(sync("folder", db).added.values()) == 0
    dim = BACKBONES[PHOTO_DEFAULT].dim
    with pytest.raises(MismatchError, match=rf"224px crop {dim}d\], not \[.*224px pad {dim}d\]"):
        ingest("folder", str(tmp_path / "photos"), fit="pad", db=db)
    with Store(db) as store:
        assert store.open("folder").count() == 5


def test_digit_sized_images_keep_32_px(tmp_path: Path, db: str) -> None:
    root = tmp_path / "digits"
    for i, img in enumerate(make_digits(6, seed=0)[0]):
        (root / str(i % 2)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / str(i % 2) / f"{i}.png")
    ingest("folder", str(root), weights="random", db=db)
    with Store(db) as store:
        spec = Gallery(store, "folder").record.embedder
    assert (spec.model, spec.input_size, spec.fit) == ("vgg16", 32, "squash")


def test_a_collection_of_an_earlier_release_reopens_and_syncs(tmp_path: Path, db: str) -> None:
    """A 32-px collection whose record has no ``fit`` (written before this release) reads as ``squash``, and a sync
    with a new photo embeds it the same way: found by its own file at distance ~0."""
    root = tmp_path / "old"
    paths = write_photos(root, 2, (120, 80))
    ingest("folder", str(root), embedder="vgg16", weights="random", input_size=32, fit="squash", db=db)
    with Store(db) as store:
        col = store.open("folder")
        record = json.loads(col.raw_record or "{}")
        del record["embedder"]["fit"]  # as an earlier release wrote it
        col.set_record(json.dumps(record))
    paths += write_photos(root, 3, (120, 80))[2:]
    r = sync("folder", db)
    assert sum(r.added.values()) == 1
    with Store(db) as store:
        g = Gallery(store, "folder")
        assert g.record.embedder.fit == "squash" and g.record.embedder.input_size == 32
        hits = search(g, image=paths[2], k=1)
        assert hits[0].id == "folder:p2.jpg" and hits[0].distance < 1e-6


def test_resolve_spec_reuses_the_record_and_refuses_what_differs() -> None:
    """Without the data (no record needed it): options equal to the record, or a seed that draws nothing, give the
    record itself; a trained model takes no backbone option; a differing option gives another spec (refused later)."""
    pixels = make_spec("pixels", seed=0)
    assert resolve_spec(None, None, {"seed": 1}, pixels, None) is pixels  # a split seed makes no other pixel embedder
    vgg = make_spec("vgg16", weights="imagenet")
    assert resolve_spec(None, None, {"seed": 3, "weights": "imagenet", "input_size": 32}, vgg, None) is vgg
    assert resolve_spec(None, None, {"pooling": "avg"}, vgg, None).pooling == "avg"
    rand = make_spec("vgg16", weights="random", seed=0)
    assert resolve_spec(None, None, {"seed": 1}, rand, None).seed == 1  # random weights: another embedder
    old = EmbedderSpec.from_dict({k: v for k, v in make_spec("vgg16", weights="random", input_size=224).to_dict().items() if k != "decode"})
    assert resolve_spec(None, None, {"normalize": "none"}, old, None).decode == 2  # an earlier release's rule is kept
    trained = EmbedderSpec("keras", "/models/digits.keras", "vgg16 block4_pool + dense", "none", "l2", 32, 0, "ab", 128)
    assert resolve_spec(None, None, {"seed": 5}, trained, None) == trained
    assert resolve_spec(None, None, {"fit": "crop"}, trained, None).fit == "crop"
    with pytest.raises(InputError, match="takes no --input-size"):
        resolve_spec(None, None, {"input_size": 64}, trained, None)
    with pytest.raises(InputError, match="takes no --pooling, --embedder"):
        resolve_spec("resnet50", "/models/digits.keras", {"pooling": "avg"}, None, None)
