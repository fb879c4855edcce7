"""Embedders turn images into vectors: the ``Embedder`` protocol, VGG16 and raw pixels.

An :class:`EmbedderSpec` is the full, JSON-able description of an embedder (model, weights, layer,
pooling, normalisation, input size, dimension, preprocessing). Collections record it, and
:func:`build_embedder` rebuilds the identical embedder from it, so a later search by image needs no
options repeated. TensorFlow is imported only when a VGG16 embedder is built.

Defaults were chosen by measurement (docs/embedder.md): on the seed protocol with
seeded random weights, ``block4_pool`` + global max pooling + L2 gives 512-d vectors with 1-NN 0.919,
against 0.911 for ``block5_pool`` and 0.935 for the 2048-d flattened ``block4_pool`` (which is 4x
slower to index and query in Chroma).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from lookalike.data.images import resize
from lookalike.errors import EmbedderError, InputError
from lookalike.models.backbones import BACKBONES, DIGIT_DEFAULT, PHOTO_DEFAULT, VGG16_LAYERS, Backbone, get_backbone
from lookalike.util import check_pinned_file, file_sha256

log = logging.getLogger(__name__)

MODELS = (*BACKBONES, "pixels", "keras")  # --embedder names; "keras": a model file written by `lookalike train`
DESCRIPTION_ENTRY = "lookalike.json"  # the description a trained .keras model file carries (see lookalike.models.train)
PRECISIONS = ("float32", "bfloat16")
NORMALIZATIONS = ("l2", "none")
FITS = ("squash", "crop", "pad")  # how a non-square image becomes square (lookalike.data.images.resize)
PHOTO_FIT = "crop"  # photos: the centre square, as every backbone here was trained and evaluated (docs/backbones.md)
PREPROCESSING = {
    "vgg16": BACKBONES["vgg16"].preprocessing,
    "pixels": "RGB->grey, bilinear resize to SxS (Pillow), scaled to [0, 1]",
}
MIN_INPUT_SIZE = 32


@dataclass(frozen=True)
class EmbedderSpec:
    """Everything that determines an embedding; stored with each collection.

    ``model`` is a registered backbone (:mod:`lookalike.models.backbones`), ``pixels`` or ``keras`` (a
    ``lookalike train`` file). ``weights`` is ``"imagenet"`` (the backbone's published weights: ImageNet,
    or DINOv2's preset), ``"random"`` (seeded with ``seed``) or an absolute file path (then
    ``weights_sha256`` pins its content). ``dim`` is the vector length. ``fit`` says how a non-square
    image becomes ``input_size`` square: ``squash`` (resized whole), ``crop`` (its centre square) or
    ``pad`` (letterboxed on the ImageNet mean colour).
    """

    model: str = "vgg16"
    weights: str = "imagenet"
    layer: str = "block4_pool"
    pooling: str = "max"
    normalize: str = "l2"
    input_size: int = 32
    seed: int = 0
    weights_sha256: str | None = None
    dim: int = 0
    preprocessing: str = ""
    precision: str = "float32"  # "bfloat16": Keras mixed_bfloat16 (float32 weights, bf16 compute)
    fit: str = "squash"  # (records of earlier releases have none: they squashed)
    decode: int = 2  # files are decoded to at least decode x input_size (records of earlier releases: 2, always)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EmbedderSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def decode_side(self) -> int:
        """The least side an image file is decoded to for this embedder (:func:`lookalike.data.images.read_image`'s ``size``)."""
        return self.input_size * self.decode

    @property
    def backbone(self) -> str:
        """The network's name: the backbone, ``pixels``, or the base of a trained model."""
        return self.layer.split()[0] if self.model == "keras" else self.model

    def describe(self) -> str:
        """A short human-readable form, e.g. ``vgg16 random(seed=0) block4_pool/max/l2 32px 512d``."""
        size = f"{self.input_size}px" + ("" if self.fit == "squash" else f" {self.fit}")
        if self.model == "pixels":
            return f"pixels {size}/{self.normalize} {self.dim}d"
        if self.model == "keras":
            return f"trained model:{Path(self.weights).name} ({self.layer}) {size} {self.dim}d{self._bf16()}"
        if self.model == "vgg16":
            return f"vgg16 {self.weights_label()} {self.layer}/{self.pooling}/{self.normalize} {size} {self.dim}d{self._bf16()}"
        return f"{self.model} {self.weights_label()} {self.pooling}/{self.normalize} {size} {self.dim}d{self._bf16()}"

    def weights_label(self) -> str:
        """``imagenet`` (``preset`` for a backbone published with other data), ``random(seed=N)`` or ``file:NAME``."""
        if self.weights == "random":
            return f"random(seed={self.seed})"
        if self.weights == "imagenet":
            return "preset" if self.model in BACKBONES and BACKBONES[self.model].tokens else "imagenet"
        return f"file:{Path(self.weights).name}"

    def _bf16(self) -> str:
        return " bf16" if self.precision == "bfloat16" else ""


DIGIT_INPUT = 64  # inputs up to this side are digit-sized: bfloat16 by default, 256 images a model call, warmed at 1


def default_precision(cpuinfo: str | os.PathLike[str] = "/proc/cpuinfo", size: int | None = None) -> str:
    """``bfloat16`` where the CPU computes it natively (AVX512-BF16 or AMX) and the input is digit-sized, else ``float32``.

    On this project's 2-core AMD EPYC (Zen 4) bfloat16 VGG16 embeds 1.9x faster at 32 px, and its vectors
    agree with float32 ones to cosine >= 0.99998 (max abs difference 0.0013 on unit vectors);
    docs/performance.md. At 224 px every backbone measured slower in bfloat16 than in float32 there
    (VGG16 4.6 against 5.1 images/s, EfficientNetV2-B0 30 against 42; docs/backbones.md), so inputs over
    :data:`DIGIT_INPUT` default to float32. Elsewhere bfloat16 is emulated and slower: float32.
    """
    if size is not None and size > DIGIT_INPUT:
        return "float32"
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return "bfloat16" if flags & {"avx512_bf16", "amx_bf16"} else "float32"
    except OSError:
        pass
    return "float32"


PHOTO_DECODE = 112  # from this input side up, files are decoded to the side itself, not twice it


def decode_factor(size: int) -> int:
    """How much larger than the input side a file is decoded: twice for digit-sized inputs (the bilinear resize then has
    pixels to average; what collections at 32 px were made with), the side itself from :data:`PHOTO_DECODE` up (a
    3000x2000 JPEG at 224 px decodes at 1/8 scale, 375x250: the reduced-scale DCT already averages each 8x8 block,
    and the 1/4 decode it spares costs twice the time). Recorded in the spec, so a collection keeps its rule."""
    return 1 if size >= PHOTO_DECODE else 2


def default_embedder(photos: bool) -> str:
    """The ``--embedder`` when none is given: VGG16 for digit-sized data (the card's), the measured photo default else."""
    return PHOTO_DEFAULT if photos else DIGIT_DEFAULT


def default_input_size(model: str, photos: bool) -> int | None:
    """The side a dataset is embedded at when ``--input-size`` is not given: the backbone's native size (224) for
    photos, its small size (32) for digit-sized images; ``None`` for ``pixels`` and trained models (their own)."""
    if model not in BACKBONES:
        return None
    b = BACKBONES[model]
    return b.native_size if photos else b.small_size


def defaults_by_data(options: dict[str, Any], photos: bool) -> dict[str, Any]:
    """``options`` (``model`` and the given make_spec keywords) with what the data calls for where not given: the
    backbone's native size for photos, its small size for digits, and ``fit=crop`` for photos (not for a trained
    model, which squashes as it was trained)."""
    out = dict(options)
    size = default_input_size(out["model"], photos)
    if size is not None and "input_size" not in out:
        out["input_size"] = size
    if photos and "fit" not in out and out["model"] != "keras":
        out["fit"] = PHOTO_FIT
    return out


def make_spec(
    model: str = "vgg16",
    *,
    weights: str = "imagenet",
    layer: str | None = None,
    pooling: str | None = None,
    normalize: str | None = None,
    input_size: int | None = None,
    seed: int = 0,
    precision: str | None = None,
    fit: str | None = None,
    decode: int | None = None,
) -> EmbedderSpec:
    """Validate options and compute the dimension, without importing TensorFlow.

    ``model``: a backbone name (``lookalike models``), ``pixels`` or ``keras`` (``weights`` is then the
    model file). ``layer``/``pooling``: the backbone's defaults unless given (a layer is chosen for VGG16
    only). ``input_size``: the backbone's small size (32) unless given; :func:`default_input_size` gives
    the size by data. ``fit``: ``squash`` unless given. ``decode``: files are decoded to at least ``decode`` x the
    input size (default: :func:`decode_factor`). ``precision`` (backbones and trained models) is
    ``float32`` or ``bfloat16``; ``None`` picks :func:`default_precision` (by the CPU and the input size).
    """
    fit = fit or "squash"
    check_options(model, fit)
    if model == "keras":
        return dataclasses.replace(model_spec(weights), fit=fit)
    if decode is not None and decode not in (1, 2):
        raise InputError(f"decode must be 1 or 2, got {decode}")
    if model == "pixels":
        options = (("weights", weights), ("layer", layer), ("pooling", pooling), ("precision", precision))
        unused = [f"--{k}" for k, v in options if v not in (None, "imagenet", "none")]
        if unused:
            raise InputError(f"the pixels embedder takes no {', '.join(unused)}: leave it out, or choose a backbone with --embedder")
        size = 28 if input_size is None else input_size
        if size < 1:
            raise InputError(f"--input-size must be positive, got {size}")
        norm = normalize or "none"
        _check_choice("--normalize", norm, NORMALIZATIONS)
        return EmbedderSpec(
            "pixels", "none", "pixels", "flatten", norm, size, seed, None, size * size, PREPROCESSING["pixels"], fit=fit, decode=decode or 2
        )
    b = get_backbone(model)
    if weights == "imagenet" and not b.published:
        raise InputError(
            f"{model} has no published weights: pass --weights random or a weights FILE, or train it: "
            "lookalike train DATASET --self-supervised"
        )
    size = b.small_size if input_size is None else input_size
    b.check_size(size)
    layer = layer or b.default_layer
    pooling = pooling or b.pooling
    if layer != b.default_layer and layer not in b.layers:
        choices = ", ".join(b.layers) if b.layers else f"{b.default_layer} (a layer is chosen for vgg16 only)"
        raise InputError(f"unknown {model} layer {layer!r}: choose one of {choices}")
    _check_choice("--pooling", pooling, b.poolings)
    norm = normalize or "l2"
    _check_choice("--normalize", norm, NORMALIZATIONS)
    prec = precision or default_precision(size=size)
    _check_choice("--precision", prec, PRECISIONS)
    dim = _dim(b, layer, pooling, size)
    sha = None
    if weights not in ("imagenet", "random"):
        p = Path(weights).expanduser()
        if not p.is_file():
            raise EmbedderError(
                f"weights file {p} not found: give a {model} no-top weights file (.h5 / .weights.h5), "
                "or --weights imagenet / --weights random"
            )
        weights, sha = str(p.resolve()), file_sha256(p)
    decode = decode or decode_factor(size)
    return EmbedderSpec(model, weights, layer, pooling, norm, size, seed, sha, dim, b.preprocessing, prec, fit, decode)


def _dim(b: Backbone, layer: str, pooling: str, size: int) -> int:
    if b.name != "vgg16":
        return b.dim  # (flatten is VGG16's only)
    channels, pools = VGG16_LAYERS[layer]
    side = size
    for _ in range(pools):
        side //= 2
    return channels * side * side if pooling == "flatten" else channels


def model_spec(path: str | os.PathLike[str]) -> EmbedderSpec:
    """The spec of a model file written by ``lookalike train`` (read from its description, no TensorFlow)."""
    p = Path(path).expanduser()
    desc = read_model_description(p)
    return EmbedderSpec(
        "keras",
        str(p.resolve()),
        f"{desc['base']} {desc['layer']} + {desc['head']}",
        "none",
        "l2",
        int(desc["input_size"]),
        int(desc["seed"]),
        file_sha256(p),
        int(desc["dim"]),
        BACKBONES[desc["base"]].preprocessing if desc["base"] in BACKBONES else PREPROCESSING["vgg16"],
        str(desc.get("precision", "float32")),
    )


def read_model_description(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The description ``lookalike train`` stored in a ``.keras`` file; EmbedderError when it is not one."""
    import zipfile

    p = Path(path).expanduser()
    if not p.is_file():
        raise EmbedderError(f"model file {p} not found: train one with `lookalike train DATASET --out {p.name}`")
    try:
        with zipfile.ZipFile(p) as z:
            desc = json.loads(z.read(DESCRIPTION_ENTRY))
        for key in ("base", "layer", "head", "input_size", "dim", "seed"):
            desc[key]
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as exc:
        raise EmbedderError(
            f"{p} is not a model written by `lookalike train` ({type(exc).__name__}): give the --out file of a training run"
        ) from None
    return dict(desc)


def check_options(model: str | None = None, fit: str | None = None, precision: str | None = None) -> None:
    """The embedder options that can be checked without data or a collection (given ones only): InputError naming the
    choices."""
    if model is not None and model not in MODELS:
        raise InputError(f"unknown embedder {model!r}: choose one of {', '.join(MODELS)} (see `lookalike models`)")
    if fit is not None:
        _check_choice("--fit", fit, FITS)
    if precision is not None:
        _check_choice("--precision", precision, PRECISIONS)


def _check_choice(option: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise InputError(f"{option} {value!r} is not one of {', '.join(choices)}")


@runtime_checkable
class Embedder(Protocol):
    """Turns images into vectors.

    ``embed`` takes ``uint8`` images, each ``(H, W)`` grey or ``(H, W, 3)`` RGB of any size, and
    returns a float32 array ``(len(images), spec.dim)``.
    """

    spec: EmbedderSpec

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray: ...


def _normalize(x: np.ndarray, how: str) -> np.ndarray:
    if how == "l2":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x.astype(np.float32)


class PixelEmbedder:
    """Raw pixels: grey, resized to ``input_size``, scaled to [0, 1] and flattened.

    The baseline every learned embedding must beat (1-NN 0.923 on the seed protocol), and the
    tiny deterministic embedder of the tests.
    """

    runtime = "numpy"

    def __init__(self, spec: EmbedderSpec | None = None) -> None:
        self.spec = spec or make_spec("pixels")

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        s = self.spec.input_size
        if len(images) == 0:
            return np.zeros((0, self.spec.dim), np.float32)
        x = np.stack([resize(im, s, "L", self.spec.fit) for im in images]).reshape(len(images), s * s) / 255.0
        return _normalize(x, self.spec.normalize)


def predict_batch_size(size: int) -> int:
    """Images per model call: 256 at digit sizes (28% faster than 128 here), 8 above 64 px (at 224 px every backbone
    embedded fastest at 8 of 8, 32 and 64 here, docs/backbones.md; the activations stay in the caches)."""
    return 256 if size <= DIGIT_INPUT else 8


class BackboneEmbedder:
    """A registered backbone (:mod:`lookalike.models.backbones`) without its classifier: its own preprocessing, then its
    features pooled (``spec.pooling``: global ``max``/``avg`` over a CNN's map, VGG16's ``flatten``, a ViT's
    ``cls`` token or ``avg`` of its patch tokens) and optionally L2-normalised.

    Deterministic: random weights come from a seeded NumPy generator (:func:`lookalike.models.backbones.seeded_weights`),
    so the same image gives the same vector in any process.
    """

    def __init__(self, spec: EmbedderSpec, batch_size: int | None = None) -> None:
        self.spec = spec
        self.backbone = get_backbone(spec.model)
        self.batch_size = batch_size or predict_batch_size(spec.input_size)
        from lookalike.models import onnxrt
        from lookalike.models.backend import make_backbone

        built: list[Any] = []  # the Keras model, when a conversion built it (kept for TensorFlow if refused)

        def build() -> Any:
            built.append(make_backbone(spec))
            return built[0]

        model = onnxrt.load(spec, build, self.backbone.preprocess, self._finish) if onnxrt.wanted(spec) else None
        self.runtime = "tensorflow" if model is None else "onnx"
        self._model = _warmed(model or (built[0] if built else make_backbone(spec)), spec, self.batch_size)

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        if len(images) == 0:
            return np.zeros((0, self.spec.dim), np.float32)
        return self._finish(_predict(self._model, images, self.spec, self.batch_size, self.backbone.preprocess))

    def _finish(self, feats: np.ndarray) -> np.ndarray:
        """The model's output -> the stored vectors: pooled (``spec.pooling``), flattened, normalised."""
        if self.backbone.tokens:
            feats = feats[:, 0] if self.spec.pooling == "cls" else feats[:, 1:].mean(axis=1)
        elif self.spec.pooling == "max":
            feats = feats.max(axis=(1, 2))
        elif self.spec.pooling == "avg":
            feats = feats.mean(axis=(1, 2))
        feats = feats.reshape(len(feats), -1)
        return _normalize(feats, self.spec.normalize)


VGG16Embedder = BackboneEmbedder  # the name of earlier releases


def _warmed(model: Any, spec: EmbedderSpec, batch_size: int) -> Any:
    """``model`` run once on a blank image, and at photo sizes once on a full batch too (an ingest's first batch then
    pays no tracing; at digit sizes a batch of 256 would cost more than the tracing it saves)."""
    from lookalike.models.backend import warm_up

    return warm_up(model, spec.input_size, batch_size if spec.input_size > DIGIT_INPUT else 1)


def _predict(model: Any, images: Sequence[np.ndarray], spec: EmbedderSpec, batch_size: int, preprocess: Any) -> np.ndarray:
    """``model`` over ``images`` made ``spec.input_size`` square RGB (``spec.fit``), ``batch_size`` a call: float32 outputs."""
    from lookalike.models.backend import predict_batches

    rgb = [resize(im, spec.input_size, "RGB", spec.fit) for im in images]
    return predict_batches(model, rgb, batch_size, preprocess)


class KerasModelEmbedder:
    """A model file written by ``lookalike train``: images preprocessed as its base backbone's (VGG16's for a fine-tuned
    model) in, L2-normalised vectors out.

    The file must be the one the spec names, unchanged (its SHA-256 is checked before loading).
    """

    runtime = "tensorflow"

    def __init__(self, spec: EmbedderSpec, batch_size: int | None = None) -> None:
        self.spec = spec
        self.batch_size = batch_size or predict_batch_size(spec.input_size)
        path = Path(spec.weights)
        check_pinned_file(path, spec.weights_sha256, "model file", "re-ingest with another --model")
        from lookalike.models.backend import load_keras_model

        base = read_model_description(path)["base"]  # (its input is the preprocessing of the backbone it was trained from)
        self._preprocess = BACKBONES[base].preprocess if base in BACKBONES else BACKBONES["vgg16"].preprocess
        self._model = _warmed(load_keras_model(path), spec, self.batch_size)

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        if len(images) == 0:
            return np.zeros((0, self.spec.dim), np.float32)
        feats = _predict(self._model, images, self.spec, self.batch_size, self._preprocess)
        return _normalize(feats.reshape(len(images), -1), "l2")


def build_embedder(spec: EmbedderSpec | dict[str, Any]) -> Embedder:
    """The embedder a spec describes (imports TensorFlow for a backbone or a trained model)."""
    if isinstance(spec, dict):
        spec = EmbedderSpec.from_dict(spec)
    if spec.model == "pixels":
        return PixelEmbedder(spec)
    if spec.model in BACKBONES:
        return BackboneEmbedder(spec)
    if spec.model == "keras":
        return KerasModelEmbedder(spec)
    raise EmbedderError(f"unknown embedder model {spec.model!r} in the collection record: upgrade lookalike")
