"""TensorFlow / Keras helpers: VGG16 and model files for the embedders and training (imported lazily, on first use).

``quiet_native_stderr`` silences TensorFlow's C++ start-up chatter, ``dtype_policy`` switches Keras to
``mixed_bfloat16``, ``make_vgg16`` builds VGG16 cut at a layer with ImageNet, seeded random or file
weights, ``load_keras_model`` loads a ``lookalike train`` model, and ``predict_batches`` runs a model
over VGG16-preprocessed images in fixed batches. Nothing here imports TensorFlow at module import.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lookalike.errors import EmbedderError
from lookalike.util import RedirectedFds, check_pinned_file, first_line

if TYPE_CHECKING:
    from lookalike.embedder import EmbedderSpec

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


def make_vgg16(spec: EmbedderSpec) -> Any:
    """Keras VGG16 (no top) cut at ``spec.layer``: ``(N, S, S, 3)`` -> feature maps, in ``spec.precision``.

    Weights: ImageNet (Keras downloads them once), seeded random (:func:`seeded_weights`) or a file
    pinned by its SHA-256.
    """
    with quiet_native_stderr(), dtype_policy(spec.precision):
        return _make_vgg16(spec)


def _make_vgg16(spec: EmbedderSpec) -> Any:
    import keras

    shape = (spec.input_size, spec.input_size, 3)
    if spec.weights == "imagenet":
        try:
            base = keras.applications.VGG16(weights="imagenet", include_top=False, input_shape=shape)
        except Exception as exc:  # Keras raises a bare Exception when the download fails
            raise EmbedderError(
                f"cannot download the ImageNet VGG16 weights ({first_line(exc, 100)}); offline? "
                "pass --weights FILE (a VGG16 no-top weights file) or --weights random"
            ) from None
    else:
        base = keras.applications.VGG16(weights=None, include_top=False, input_shape=shape)
        if spec.weights == "random":
            base.set_weights(seeded_weights(base, spec.seed))
        else:
            path = Path(spec.weights)
            check_pinned_file(path, spec.weights_sha256, "weights file", "re-ingest into a new collection")
            try:
                base.load_weights(str(path))
            except Exception as exc:  # h5py and Keras raise many kinds on a foreign file
                raise EmbedderError(
                    f"cannot load VGG16 weights from {path} ({first_line(exc, 100)}): give a VGG16 no-top weights file (.h5 / .weights.h5)"
                ) from None
    return keras.Model(base.input, base.get_layer(spec.layer).output, name=f"vgg16_{spec.layer}")


def seeded_weights(model: Any, seed: int) -> list[np.ndarray]:
    """Glorot-uniform kernels and zero biases for ``model``'s weights, from ``np.random.default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    out = []
    for w in model.weights:
        shape = tuple(w.shape)
        if len(shape) == 4:
            fan_in = shape[0] * shape[1] * shape[2]
            fan_out = shape[0] * shape[1] * shape[3]
            limit = np.sqrt(6.0 / (fan_in + fan_out))
            out.append(rng.uniform(-limit, limit, shape).astype(np.float32))
        else:
            out.append(np.zeros(shape, np.float32))
    return out


def load_keras_model(path: str | os.PathLike[str]) -> Any:
    """Load a Keras model file (no compile); EmbedderError when Keras cannot read it."""
    with quiet_native_stderr():
        import keras

        try:
            return keras.saving.load_model(str(path), compile=False)
        except Exception as exc:  # Keras raises many kinds on a damaged file
            raise EmbedderError(f"cannot load model file {path} ({first_line(exc, 100)}): train it again") from None


def warm_up(model: Any, size: int) -> Any:
    """Run ``model`` once on a blank ``size`` x ``size`` image (builds its graph; TensorFlow logs quieted)."""
    with quiet_native_stderr():
        model.predict_on_batch(np.zeros((1, size, size, 3), np.float32))
    return model


def vgg16_preprocess(rgb: np.ndarray) -> np.ndarray:
    """``(N, S, S, 3)`` RGB 0-255 -> VGG16 input (BGR, ImageNet mean subtracted), float32."""
    from keras.applications.vgg16 import preprocess_input

    return preprocess_input(np.asarray(rgb, dtype=np.float32))


def predict_batches(model: Any, rgb: Sequence[np.ndarray] | np.ndarray, batch_size: int) -> np.ndarray:
    """``model`` over RGB images ``(N, S, S, 3)`` (0-255), ``batch_size`` a call: float32 outputs, concatenated."""
    outs = [
        np.asarray(model.predict_on_batch(vgg16_preprocess(np.stack(rgb[i : i + batch_size]))), dtype=np.float32)
        for i in range(0, len(rgb), batch_size)
    ]
    return np.concatenate(outs)
