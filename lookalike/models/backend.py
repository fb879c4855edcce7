"""TensorFlow / Keras helpers: backbones and model files for the embedders and training (imported lazily, on first use).

``quiet_native_stderr`` silences TensorFlow's C++ start-up chatter, ``dtype_policy`` switches Keras to
``mixed_bfloat16``, ``make_backbone`` builds a registered backbone (VGG16 cut at a layer) with its
published, seeded random or file weights, ``load_keras_model`` loads a ``lookalike train`` model, and
``predict_batches`` runs a model over preprocessed images in fixed batches. Nothing here imports TensorFlow at module import.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lookalike.errors import EmbedderError
from lookalike.util import RedirectedFds, check_pinned_file, first_line

if TYPE_CHECKING:
    from lookalike.models.embedder import EmbedderSpec

log = logging.getLogger(__name__)
# Redirecting fd 2 and Keras's global dtype policy are process-wide: one thread at a time changes them
_global_state = threading.RLock()


@contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Silence TensorFlow's C++ start-up chatter (absl INFO lines ignore TF_CPP_MIN_LOG_LEVEL).

    Also quiets TensorFlow's Python "retracing" warnings (a last, smaller batch retraces: harmless).
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    with _global_state:
        quiet = RedirectedFds((2,))
        quiet.enter()
        try:
            yield
        finally:
            quiet.exit()


@contextmanager
def dtype_policy(precision: str) -> Iterator[None]:
    """Layers created inside use Keras's ``mixed_bfloat16`` policy when ``precision`` is bfloat16."""
    import keras

    if precision != "bfloat16":
        with _global_state:  # no other thread's bfloat16 policy while these layers are made
            yield
        return
    with _global_state:
        saved = keras.mixed_precision.global_policy()
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
        try:
            yield
        finally:
            keras.mixed_precision.set_global_policy(saved)


def make_backbone(spec: EmbedderSpec) -> Any:
    """The registered backbone ``spec.model`` without its classifier (VGG16: cut at ``spec.layer``), in
    ``spec.precision``: ``(N, S, S, 3)`` preprocessed input -> feature maps (or a ViT's tokens).

    Weights: the published ones (``imagenet``; Keras or keras_hub downloads them once), seeded random
    (:func:`lookalike.models.backbones.seeded_weights`) or a file pinned by its SHA-256.
    """
    with quiet_native_stderr(), dtype_policy(spec.precision):
        return _make_backbone(spec)


make_vgg16 = make_backbone  # (lookalike train cuts VGG16 at a layer through the same path)


def _make_backbone(spec: EmbedderSpec) -> Any:
    import keras

    from lookalike.models.backbones import get_backbone, seeded_weights

    b = get_backbone(spec.model)
    if spec.weights == "imagenet":
        try:
            base = b.build(spec.input_size, True)
        except EmbedderError:
            raise
        except Exception as exc:  # Keras raises a bare Exception when the download fails
            what = "ImageNet VGG16" if b.name == "vgg16" else f"published {b.name}"
            raise EmbedderError(
                f"cannot download the {what} weights ({first_line(exc, 100)}); offline? "
                f"pass --weights FILE (a {b.name} no-top weights file) or --weights random"
            ) from None
    else:
        base = b.build(spec.input_size, False)
        if spec.weights == "random":
            base.set_weights(seeded_weights(base, spec.seed))
        else:
            path = Path(spec.weights)
            check_pinned_file(path, spec.weights_sha256, "weights file", "re-ingest into a new collection")
            try:
                base.load_weights(str(path))
            except Exception as exc:  # h5py and Keras raise many kinds on a foreign file
                name = "VGG16" if b.name == "vgg16" else b.name
                raise EmbedderError(
                    f"cannot load {name} weights from {path} ({first_line(exc, 100)}): "
                    f"give a {b.name} no-top weights file (.h5 / .weights.h5)"
                ) from None
    if b.layers and spec.layer != base.layers[-1].name:
        return keras.Model(base.input, base.get_layer(spec.layer).output, name=f"{b.name}_{spec.layer}")
    return base


def load_keras_model(path: str | os.PathLike[str]) -> Any:
    """Load a Keras model file (no compile); EmbedderError when Keras cannot read it."""
    with quiet_native_stderr():
        import keras

        try:
            return keras.saving.load_model(str(path), compile=False)
        except Exception as exc:  # Keras raises many kinds on a damaged file
            raise EmbedderError(f"cannot load model file {path} ({first_line(exc, 100)}): train it again") from None


def warm_up(model: Any, size: int, batch: int = 1) -> Any:
    """Run ``model`` once on one blank ``size`` x ``size`` image (builds its graph; TensorFlow's logs quieted), then once
    on ``batch`` of them (an ingest's first batch then pays no tracing; outside the quiet, which holds a global lock)."""
    with quiet_native_stderr():
        model.predict_on_batch(np.zeros((1, size, size, 3), np.float32))
    if batch > 1:
        model.predict_on_batch(np.zeros((batch, size, size, 3), np.float32))
    return model


def vgg16_preprocess(rgb: np.ndarray) -> np.ndarray:
    """``(N, S, S, 3)`` RGB 0-255 -> VGG16 input (BGR, ImageNet mean subtracted), float32."""
    from lookalike.models.backbones import BACKBONES

    return BACKBONES["vgg16"].preprocess(rgb)


def predict_batches(
    model: Any, rgb: Sequence[np.ndarray] | np.ndarray, batch_size: int, preprocess: Callable[[np.ndarray], np.ndarray] | None = None
) -> np.ndarray:
    """``model`` over RGB images ``(N, S, S, 3)`` (0-255) through ``preprocess`` (default VGG16's), ``batch_size`` a call:
    float32 outputs, concatenated."""
    prep = preprocess or vgg16_preprocess
    outs = [np.asarray(model.predict_on_batch(prep(np.stack(rgb[i : i + batch_size]))), np.float32) for i in range(0, len(rgb), batch_size)]
    return np.concatenate(outs)
