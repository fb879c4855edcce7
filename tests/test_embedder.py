from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lookalike.errors import EmbedderError, InputError
from lookalike.models.embedder import Embedder, EmbedderSpec, PixelEmbedder, build_embedder, make_spec

from .conftest import make_digits, offline_env


def test_spec_dimension_without_tensorflow() -> None:
    assert make_spec("vgg16", weights="random").dim == 512
    assert make_spec("vgg16", weights="random", pooling="flatten").dim == 2 * 2 * 512
    assert make_spec("vgg16", weights="random", layer="block3_pool", pooling="flatten", input_size=64).dim == 8 * 8 * 256
    assert make_spec("pixels").dim == 28 * 28
    spec = make_spec("vgg16", weights="random", seed=3)
    assert EmbedderSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert "random(seed=3)" in spec.describe() and "512d" in spec.describe()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model": "resnet"}, "unknown embedder"),
        ({"input_size": 16}, "at least 32"),
        ({"layer": "block9_pool"}, "unknown vgg16 layer"),
        ({"pooling": "median"}, "--pooling"),
        ({"normalize": "l1"}, "--normalize"),
        ({"precision": "float16"}, "--precision"),
    ],
)
def test_bad_options(kwargs: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        make_spec(**{"weights": "random", **kwargs})


def test_missing_weights_file_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(EmbedderError, match="--weights random"):
        make_spec("vgg16", weights=str(tmp_path / "none.h5"))


def test_default_precision_follows_the_cpu_flags(tmp_path: Path) -> None:
    from lookalike.models.embedder import default_precision

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    assert default_precision(info) == "bfloat16"
    info.write_text("flags\t\t: fpu sse2 avx2 amx_bf16 amx_tile\n")
    assert default_precision(info) == "bfloat16"
    info.write_text("flags\t\t: fpu sse2 avx2 avx512f\n")
    assert default_precision(info) == "float32"
    assert default_precision(tmp_path / "missing") == "float32"
    info.write_text("flags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    assert default_precision(info, size=32) == "bfloat16" and default_precision(info, size=224) == "float32"  # photos: float32


def test_pixel_embedder_is_deterministic_and_protocol_conformant() -> None:
    x, _ = make_digits(5, seed=0)
    emb = PixelEmbedder()
    assert isinstance(emb, Embedder)
    v = emb.embed(list(x))
    assert v.shape == (5, 784) and v.dtype == np.float32
    assert np.allclose(v, x.reshape(5, -1) / 255.0)
    assert np.array_equal(emb.embed(list(x[:2])), v[:2])


@pytest.fixture(scope="module")
def vgg_random() -> Embedder:
    return build_embedder(make_spec("vgg16", weights="random", seed=0, precision="float32"))


def test_bfloat16_vectors_agree_with_float32_ones(vgg_random: Embedder) -> None:
    spec = make_spec("vgg16", weights="random", seed=0, precision="bfloat16")
    assert spec.precision == "bfloat16" and spec.describe().endswith("bf16")
    assert EmbedderSpec.from_dict({k: v for k, v in spec.to_dict().items() if k != "precision"}).precision == "float32"  # old records
    x, _ = make_digits(8, seed=5)
    fast, exact = build_embedder(spec).embed(list(x)), vgg_random.embed(list(x))
    assert fast.dtype == np.float32 and np.allclose(np.linalg.norm(fast, axis=1), 1.0, atol=1e-5)
    assert (fast * exact).sum(1).min() > 0.9999  # documented tolerance (docs/performance.md)
    assert np.abs(fast - exact).max() > 0  # it really computed in bfloat16


def test_vgg16_random_vectors(vgg_random: Embedder) -> None:
    x, _ = make_digits(6, seed=0)
    v = vgg_random.embed(list(x))
    assert v.shape == (6, 512) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    single = vgg_random.embed([x[3]])
    assert np.abs(single[0] - v[3]).max() < 1e-5  # batch composition does not change a vector
    other_seed = build_embedder(make_spec("vgg16", weights="random", seed=1)).embed([x[3]])
    assert np.abs(other_seed[0] - v[3]).max() > 1e-3


def test_vgg16_vector_is_the_same_in_a_new_process(vgg_random: Embedder, tmp_path: Path) -> None:
    x, _ = make_digits(3, seed=4)
    np.save(tmp_path / "x.npy", x)
    code = (
        "import numpy as np, sys; from lookalike.models.embedder import build_embedder, make_spec;"
        "x = np.load(sys.argv[1]); e = build_embedder(make_spec('vgg16', weights='random', seed=0, precision='float32'));"
        "np.save(sys.argv[2], e.embed(list(x)))"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.npy"), str(tmp_path / "v.npy")], check=True, timeout=300)
    there = np.load(tmp_path / "v.npy")
    here = vgg_random.embed(list(x))
    assert np.abs(there - here).max() < 1e-5


def test_weights_file_round_trip_and_corrupt_file(vgg_random: Embedder, tmp_path: Path) -> None:
    import keras

    base = keras.applications.VGG16(weights=None, include_top=False, input_shape=(32, 32, 3))
    from lookalike.models.backbones import seeded_weights

    base.set_weights(seeded_weights(base, 0))
    path = tmp_path / "vgg16_notop.weights.h5"
    base.save_weights(path)
    from_file = build_embedder(make_spec("vgg16", weights=str(path), precision="float32"))
    x, _ = make_digits(2, seed=0)
    assert np.abs(from_file.embed(list(x)) - vgg_random.embed(list(x))).max() < 1e-5
    assert from_file.spec.weights_sha256 and from_file.spec.weights == str(path.resolve())
    bad = tmp_path / "bad.weights.h5"
    bad.write_bytes(b"nope")
    with pytest.raises(EmbedderError, match="cannot load VGG16 weights"):
        build_embedder(make_spec("vgg16", weights=str(bad)))
    spec = from_file.spec
    path.write_bytes(b"changed")
    with pytest.raises(EmbedderError, match="changed"):
        build_embedder(spec)


@pytest.mark.slow
def test_imagenet_download_offline_is_a_clear_error(tmp_path: Path) -> None:
    code = (
        "from lookalike.models.embedder import build_embedder, make_spec; from lookalike.errors import EmbedderError\n"
        "try:\n build_embedder(make_spec('vgg16', weights='imagenet'))\n"
        "except EmbedderError as e:\n print('ERR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=offline_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert "ERR cannot download the ImageNet VGG16 weights" in out.stdout, out.stderr
    assert "--weights random" in out.stdout and "--weights FILE" in out.stdout
