"""The backbone registry: every image model lookalike can embed with, by name, in one place.

An entry says how to build the model (ImageNet/preset, seeded random or file weights), how its
input is preprocessed (exactly as its paper and ``keras.applications`` do), its native input size,
its pooled output dimension, and published figures to choose by. Adding a backbone is adding one
:class:`Backbone` to :data:`BACKBONES`; the embedder, the CLI (``--embedder NAME``, ``lookalike
models``), ``compare``, the service and the app read it from here. Nothing here imports TensorFlow
at module import: builders import Keras (or ``keras_hub``) when called.

Names are Keras's own in lower case. ``pixels`` (raw pixels) and ``keras`` (a model file written by
``lookalike train``) are embedders too, but not backbones (see :mod:`lookalike.models.embedder`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lookalike.errors import EmbedderError, InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # RGB, as torchvision and keras.applications' "torch" mode use
IMAGENET_STD = (0.229, 0.224, 0.225)
HUB_EXTRA = "pip install 'lookalike[hub]'"
EXTRA_MODULES = {"hub": "keras_hub"}  # a backbone's pip extra -> the module it installs


def _caffe(rgb: np.ndarray) -> np.ndarray:
    """RGB 0-255 -> BGR minus the ImageNet mean (``keras.applications.vgg16/resnet50.preprocess_input``)."""
    x = np.asarray(rgb, dtype=np.float32)[..., ::-1]
    return x - np.array([103.939, 116.779, 123.68], np.float32)


def _torch(rgb: np.ndarray) -> np.ndarray:
    """RGB 0-255 -> 0-1, minus the ImageNet mean, over its std (``imagenet_utils.preprocess_input(mode="torch")``)."""
    x = np.asarray(rgb, dtype=np.float32) / 255.0
    return (x - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)


def _raw(rgb: np.ndarray) -> np.ndarray:
    """RGB 0-255 as float32: the model rescales and normalises inside (``include_preprocessing=True``)."""
    return np.asarray(rgb, dtype=np.float32)


@dataclass(frozen=True)
class Backbone:
    """One registered image model.

    ``build(size, pretrained)`` returns a Keras model from ``(N, size, size, 3)`` preprocessed input to
    feature maps ``(N, h, w, C)`` (``tokens=False``) or tokens ``(N, T, C)`` (``tokens=True``, the
    class token first). ``preprocess`` maps RGB 0-255 to that input. ``keras_module`` names the
    ``keras.applications`` module whose ``preprocess_input`` ``preprocess`` must equal (tested).
    Published figures (``top1``, ``knn``, ``keras_cpu_ms``) carry their ``sources``.
    """

    name: str
    title: str
    build: Callable[[int, bool], Any] = field(repr=False)
    preprocess: Callable[[np.ndarray], np.ndarray] = field(repr=False)
    preprocessing: str
    native_size: int
    dim: int  # pooled output length (``flatten`` aside)
    pooling: str  # the default
    poolings: tuple[str, ...]
    params: int  # as built (at 224 px)
    gflops: float  # per image at the native size (multiply and add counted apart): TensorFlow's profiler, scripts/backbones.py
    top1: float | None = None  # published ImageNet top-1 of the supervised model (its own linear classifier)
    knn: float | None = None  # published ImageNet k-NN accuracy on its frozen features
    keras_cpu_ms: float | None = None  # Keras's published CPU time per inference step (batch 32)
    sources: tuple[str, ...] = ()
    keras_module: str | None = None  # keras.applications.<module>.preprocess_input is this preprocessing
    size_multiple: int = 1  # the input side must be a multiple of this (a ViT's patch)
    min_size: int = 32
    small_size: int = 32  # the side for digit-sized data (28 px digits)
    tokens: bool = False
    extra: str | None = None  # the pip extra that installs what it needs, when not in lookalike's own dependencies
    layers: tuple[str, ...] = ()  # a VGG16 cut may be chosen; others give their last features
    default_layer: str = "features"
    published: bool = True  # published (ImageNet or preset) weights exist: ``--weights imagenet``
    onnx: bool = False  # ONNX Runtime measured at least 1.5x TensorFlow's speed here at 224 px (lookalike.models.onnxrt's auto)

    def check_installed(self) -> None:
        """EmbedderError naming the pip extra when what this backbone needs is not installed (found without importing
        it: a sync with nothing to embed loads no TensorFlow)."""
        import importlib.util

        if self.extra and importlib.util.find_spec(EXTRA_MODULES[self.extra]) is None:
            needs = EXTRA_MODULES[self.extra].replace("_", "-")
            raise EmbedderError(f"the {self.name} backbone needs {needs}: pip install 'lookalike[{self.extra}]'")

    def check_size(self, size: int) -> None:
        """InputError naming a valid side when ``size`` is not one."""
        if size < self.min_size or size % self.size_multiple:
            multiple = f" and a multiple of {self.size_multiple}" if self.size_multiple > 1 else ""
            nearest = max(self.min_size, round(size / self.size_multiple) * self.size_multiple)
            hint = f" (e.g. {nearest})" if multiple else ""
            raise InputError(f"--input-size for {self.name} must be at least {self.min_size}{multiple}, got {size}{hint}")


def _keras_app(constructor: str, **options: Any) -> Callable[[int, bool], Any]:
    def build(size: int, pretrained: bool) -> Any:
        import keras

        make = getattr(keras.applications, constructor)
        return make(weights="imagenet" if pretrained else None, include_top=False, input_shape=(size, size, 3), **options)

    return build


def _vgg16(size: int, pretrained: bool) -> Any:
    import keras

    return keras.applications.VGG16(weights="imagenet" if pretrained else None, include_top=False, input_shape=(size, size, 3))


DINOV2_SMALL = {  # the dinov2_small preset's architecture (keras_hub's DINOV2Backbone arguments)
    "patch_size": 14,
    "num_layers": 12,
    "hidden_dim": 384,
    "num_heads": 6,
    "intermediate_dim": 1536,
    "layer_scale_init_value": 1.0,
}


def _dinov2_small(size: int, pretrained: bool) -> Any:
    keras_hub = require_hub("dinov2_small")
    import keras

    if pretrained:  # the preset (Kaggle); random weights need no download at all
        backbone = keras_hub.models.DINOV2Backbone.from_preset("dinov2_small", image_shape=(size, size, 3))
    else:
        backbone = keras_hub.models.DINOV2Backbone(**DINOV2_SMALL, image_shape=(size, size, 3))
    images = keras.Input((size, size, 3), name="images")
    return keras.Model(images, backbone({"images": images}), name="dinov2_small")


SMALLCNN_WIDTHS = (32, 64, 128, 256)  # stem (5x5, stride 2), two 3x3 stages with 2x2 max pooling, a 3x3 "valid" head


def _smallcnn(size: int, pretrained: bool) -> Any:
    """lookalike's own small CNN for digits and scans: no published weights (seeded random, a file, or trained by
    ``lookalike train --self-supervised``). 0-255 RGB in, rescaled inside.

    At 28 px: a 5x5 stride-2 convolution (14x14x32), a 3x3 one (64), 2x2 max pooling, a 3x3 one (128), 2x2 max
    pooling (3x3x128), then a 3x3 convolution without padding (256): a dense layer over the whole 3x3 map, so the
    features keep where strokes are (measured: average pooling of the 7x7 map instead lost 10 points of 1-NN after
    self-supervised training). Each convolution has batch normalisation and ReLU.
    """
    if pretrained:
        raise EmbedderError(
            "smallcnn has no published weights: pass --weights random, or train it: lookalike train DATASET --self-supervised"
        )
    import keras

    images = keras.Input((size, size, 3), name="images")
    h = keras.layers.Rescaling(1 / 255.0, name="rescale")(images)
    layers = [(5, 2, "same"), (3, 1, "same"), (3, 1, "same"), (3, 1, "valid")]
    for i, (width, (kernel, stride, padding)) in enumerate(zip(SMALLCNN_WIDTHS, layers)):
        if i >= 2:
            h = keras.layers.MaxPooling2D(name=f"pool{i}")(h)
        h = keras.layers.Conv2D(width, kernel, strides=stride, padding=padding, use_bias=False, name=f"conv{i + 1}")(h)
        h = keras.layers.BatchNormalization(name=f"bn{i + 1}")(h)
        h = keras.layers.ReLU(name=f"relu{i + 1}")(h)
    return keras.Model(images, h, name="smallcnn")


def require_hub(name: str) -> Any:
    """``keras_hub``, or EmbedderError naming the extra to install."""
    try:
        import keras_hub
    except ImportError:
        raise EmbedderError(f"the {name} backbone needs keras-hub: {HUB_EXTRA}") from None
    return keras_hub


VGG16_LAYERS: dict[str, tuple[int, int]] = {}  # name -> (channels, 2x2 poolings before its output)
for _block, (_convs, _ch) in enumerate([(2, 64), (2, 128), (3, 256), (3, 512), (3, 512)], start=1):
    for _i in range(1, _convs + 1):
        VGG16_LAYERS[f"block{_block}_conv{_i}"] = (_ch, _block - 1)
    VGG16_LAYERS[f"block{_block}_pool"] = (_ch, _block)

KERAS_TABLE = "https://keras.io/api/applications/ (ImageNet top-1; CPU ms per inference step, batch 32)"
CAFFE = "keras.applications.{}.preprocess_input (caffe: BGR, ImageNet mean subtracted)"
INSIDE = "0-255 into the model, which rescales and normalises itself (include_preprocessing=True)"

BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in [
        Backbone(
            "vgg16",
            "VGG16 (Simonyan & Zisserman 2014)",
            _vgg16,
            _caffe,
            "grey->RGB, bilinear resize to SxS (Pillow), keras.applications.vgg16.preprocess_input (caffe: BGR, ImageNet mean)",
            224,
            512,
            "max",
            ("max", "avg", "flatten"),
            7_635_264,  # (cut at block4_pool, the default layer)
            27.9,
            top1=0.713,
            keras_cpu_ms=69.5,
            sources=(KERAS_TABLE,),
            keras_module="vgg16",
            layers=tuple(VGG16_LAYERS),
            default_layer="block4_pool",
        ),
        Backbone(
            "resnet50",
            "ResNet50 (He et al. 2016)",
            _keras_app("ResNet50"),
            _caffe,
            "RGB, resized to SxS (Pillow, bilinear), " + CAFFE.format("resnet50"),
            224,
            2048,
            "avg",
            ("avg", "max"),
            23_587_712,
            7.75,
            top1=0.749,
            keras_cpu_ms=58.2,
            sources=(KERAS_TABLE,),
            keras_module="resnet50",
        ),
        Backbone(
            "efficientnetv2b0",
            "EfficientNetV2-B0 (Tan & Le 2021)",
            _keras_app("EfficientNetV2B0", include_preprocessing=True),
            _raw,
            "RGB, resized to SxS (Pillow, bilinear), " + INSIDE + ": /255, ImageNet mean and std",
            224,
            1280,
            "avg",
            ("avg", "max"),
            5_919_312,
            1.46,
            top1=0.787,
            sources=(KERAS_TABLE,),
            keras_module="efficientnet_v2",
        ),
        Backbone(
            "convnext_tiny",
            "ConvNeXt-Tiny (Liu et al. 2022)",
            _keras_app("ConvNeXtTiny", include_preprocessing=True),
            _raw,
            "RGB, resized to SxS (Pillow, bilinear), " + INSIDE + ": /255, ImageNet mean and std",
            224,
            768,
            "avg",
            ("avg", "max"),
            27_820_128,
            8.76,
            top1=0.813,
            sources=(KERAS_TABLE,),
            keras_module="convnext",
        ),
        Backbone(
            "mobilenetv3large",
            "MobileNetV3-Large (Howard et al. 2019)",
            _keras_app("MobileNetV3Large", include_preprocessing=True),
            _raw,
            "RGB, resized to SxS (Pillow, bilinear), " + INSIDE + ": to [-1, 1]",
            224,
            960,
            "avg",
            ("avg", "max"),
            2_996_352,
            0.44,
            top1=0.756,
            sources=("https://www.tensorflow.org/api_docs/python/tf/keras/applications/MobileNetV3Large (75.6% top-1, 217 M MACs)",),
            keras_module="mobilenet_v3",
            onnx=True,  # 140.2 against 59.8 images/s at 224 px (docs/backbones.md)
        ),
        Backbone(
            "dinov2_small",
            "DINOv2 ViT-S/14 (Oquab et al. 2023), self-supervised",
            _dinov2_small,
            _torch,
            "RGB, resized to SxS (Pillow, bilinear), /255, ImageNet mean and std (torch mode), as DINOv2 and keras_hub use",
            224,
            384,
            "cls",
            ("cls", "avg"),
            22_155_264,
            11.12,
            knn=0.790,
            sources=("DINOv2 paper, arXiv:2304.07193, Table 4: ViT-S/14 distilled, ImageNet-1k k-NN 79.0%, linear 81.1%",),
            keras_module="imagenet_utils:torch",
            size_multiple=14,
            min_size=14,
            small_size=42,
            tokens=True,
            extra="hub",
        ),
        Backbone(
            "smallcnn",
            "lookalike's small CNN (digits, scans), no published weights: train it with lookalike train --self-supervised",
            _smallcnn,
            _raw,
            "grey->RGB, resized to SxS (Pillow, bilinear), 0-255 into the model, which divides by 255 inside",
            28,
            SMALLCNN_WIDTHS[-1],
            "avg",
            ("avg", "max"),
            391_392,
            0.0159,  # 7.97 M multiply-adds at 28 px
            sources=("scripts/selfsup.py, docs/self-supervised.md",),
            min_size=24,
            small_size=28,
            published=False,
        ),
    ]
}
PHOTO_DEFAULT = "mobilenetv3large"  # the fastest end to end at 224 px on this project's 2-core CPU, by far (docs/backbones.md)
DIGIT_DEFAULT = "vgg16"  # the card's model, measured on digits since the first release


def get_backbone(name: str) -> Backbone:
    """The registered backbone ``name``; InputError listing every name when there is none."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise InputError(f"unknown embedder {name!r}: choose one of {', '.join(embedder_names())} (see `lookalike models`)") from None


def embedder_names() -> list[str]:
    """Every ``--embedder`` name: the backbones, then ``pixels``."""
    return [*BACKBONES, "pixels"]


def seeded_weights(model: Any, seed: int) -> list[np.ndarray]:
    """Random weights for ``model`` drawn from ``np.random.default_rng(seed)``: the same in every process.

    Every variable Keras initialises to a constant keeps it (biases and betas 0, BatchNorm and
    LayerNorm scales 1, moving statistics, ConvNeXt's layer scale); every other one gets Glorot-uniform
    values by Keras's own fan rule, in the model's variable order. (For VGG16 this is exactly the
    rule of earlier releases, so their random-weight collections get the same vectors.)
    """
    rng = np.random.default_rng(seed)
    out = []
    for w in model.weights:
        value = np.asarray(w)
        if value.size == 0 or np.all(value == value.flat[0]):
            out.append(value)
            continue
        shape = value.shape
        receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
        fan_in = shape[-2] * receptive if len(shape) >= 2 else shape[0]
        fan_out = shape[-1] * receptive
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        out.append(rng.uniform(-limit, limit, shape).astype(value.dtype))
    return out
