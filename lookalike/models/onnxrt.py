"""ONNX Runtime: a registered backbone's inference on the CPU without TensorFlow (the ``onnx`` extra).

The first time a backbone is needed in a spec (model, weights, layer, seed, input size), tf2onnx converts the Keras
model into the cache (``$LOOKALIKE_CACHE/onnx``) and the two runtimes are checked against each other on seeded images:
the conversion is kept only when the finished vectors agree within :data:`AGREE`. Later processes load the converted
file with no TensorFlow at all. A conversion that fails or disagrees is remembered, and TensorFlow is used for that spec.

``$LOOKALIKE_RUNTIME`` chooses: ``auto`` (default: ONNX Runtime when the extra is installed, in float32 at photo sizes,
for the backbones where it was measured at least 1.5x faster than TensorFlow here: ``Backbone.onnx``,
docs/backbones.md), ``onnx`` (every backbone that converts; refused in one line without the extra or for bfloat16) or
``tensorflow``. The choice is not part of a collection's embedder: both
runtimes give the same vectors within :data:`AGREE`, so a collection built with one is searched with the other.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lookalike.errors import EmbedderError, InputError
from lookalike.models.backbones import BACKBONES
from lookalike.models.embedder import DIGIT_INPUT
from lookalike.util import cache_dir, first_line

if TYPE_CHECKING:
    from lookalike.models.embedder import EmbedderSpec

log = logging.getLogger(__name__)

RUNTIME_ENV = "LOOKALIKE_RUNTIME"
RUNTIMES = ("auto", "tensorflow", "onnx")
ONNX_EXTRA = "pip install 'lookalike[onnx]'"
MODULES = ("tf2onnx", "onnx", "onnxruntime")
AGREE = 1e-3  # largest difference allowed between the two runtimes' L2-normalised vectors
FORMAT = 1  # bump when the conversion changes, so cached files are made again
OPSET = 17
CHECK_IMAGES = 4


def runtime_choice() -> str:
    """``$LOOKALIKE_RUNTIME`` (``auto`` when unset); InputError naming the choices otherwise."""
    choice = (os.environ.get(RUNTIME_ENV) or "auto").strip().lower()
    if choice not in RUNTIMES:
        raise InputError(f"${RUNTIME_ENV}={choice!r} is not a runtime: use one of {', '.join(RUNTIMES)}")
    return choice


def installed() -> bool:
    """Whether the ``onnx`` extra (tf2onnx, onnx, onnxruntime) is importable (checked without importing it)."""
    return all(importlib.util.find_spec(m) is not None for m in MODULES)


def wanted(spec: EmbedderSpec) -> bool:
    """Whether the backbone of ``spec`` runs on ONNX Runtime (see the module's text); EmbedderError when ``onnx`` is
    asked for and cannot be had."""
    choice = runtime_choice()
    if choice == "tensorflow":
        return False
    if choice == "onnx":
        if not installed():
            raise EmbedderError(f"${RUNTIME_ENV}=onnx needs tf2onnx and onnxruntime: {ONNX_EXTRA}")
        if spec.precision != "float32":  # (a bfloat16 collection stays searchable: TensorFlow embeds it, as it was made)
            print(f"lookalike: ONNX Runtime runs float32 only; TensorFlow embeds this {spec.precision} collection", file=sys.stderr)
            return False
        return True
    fast = spec.model in BACKBONES and BACKBONES[spec.model].onnx
    # (photo sizes only: digit sizes keep TensorFlow's bfloat16)
    return fast and spec.precision == "float32" and spec.input_size > DIGIT_INPUT and installed()


def cache_key(spec: EmbedderSpec) -> str:
    """What the converted model depends on: the backbone, its weights, cut, seed, side and precision."""
    ident = {k: getattr(spec, k) for k in ("model", "weights", "weights_sha256", "layer", "seed", "input_size", "precision")}
    ident["format"] = FORMAT
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


def cache_paths(spec: EmbedderSpec) -> tuple[Path, Path]:
    """The converted model file and its note (how it was checked, or why it was refused)."""
    base = cache_dir("onnx") / f"{spec.model}-{spec.input_size}-{cache_key(spec)}"
    return base.with_suffix(".onnx"), base.with_suffix(".json")


class OnnxModel:
    """A converted backbone on ONNX Runtime's CPU provider, with Keras's ``predict_on_batch`` call."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only
        # threads sleep between calls instead of spinning: an ingest decodes on the same cores meanwhile
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._input = self.session.get_inputs()[0].name

    def predict_on_batch(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self._input: np.ascontiguousarray(x, dtype=np.float32)})[0]


def load(
    spec: EmbedderSpec,
    build: Callable[[], Any],
    preprocess: Callable[[np.ndarray], np.ndarray],
    finish: Callable[[np.ndarray], np.ndarray],
) -> OnnxModel | None:
    """The backbone of ``spec`` on ONNX Runtime: from the cache, else converted from ``build()`` (the Keras model) and
    checked; ``None`` when this spec's conversion failed or disagreed (now or before: TensorFlow is to be used).

    ``preprocess`` makes the model's input from RGB 0-255; ``finish`` turns its output into the stored vectors.
    """
    path, note = cache_paths(spec)
    try:
        if path.is_file():
            try:
                return OnnxModel(path)
            except Exception as exc:  # onnxruntime cannot read it (damaged, or written by another version): convert again
                log.warning("lookalike: cached ONNX model %s unreadable (%s); converting again", path, first_line(exc, 80))
                path.unlink(missing_ok=True)
        elif note.is_file() and _refused(note):
            return None
        return _convert(spec, build(), preprocess, finish, path, note)
    except OSError as exc:  # the cache cannot be written (read-only home, full disk): TensorFlow, this time
        print(f"lookalike: ONNX Runtime not used: the cache {path.parent} is not writable ({first_line(exc, 80)})", file=sys.stderr)
        return None


def versions() -> dict[str, str]:
    """The converter's and runtime's versions (a refusal is tried again when they change)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for m in MODULES:
        try:
            out[m] = version(m)
        except PackageNotFoundError:
            out[m] = ""
    return out


def _refused(note: Path) -> bool:
    """Whether ``note`` records a refusal made with the versions installed now."""
    try:
        data = json.loads(note.read_text())
    except (OSError, ValueError):
        return False
    return bool(data.get("refused")) and data.get("versions") == versions()


def check_images(size: int, n: int = CHECK_IMAGES) -> np.ndarray:
    """Seeded RGB test images (smooth gradients plus noise, 0-255) the runtimes are compared on."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    base = (ramp[None, :, None] + ramp[:, None, None]) / 2
    return np.clip(base[None] * rng.uniform(0.3, 1.0, (n, 1, 1, 3)) + rng.normal(0, 40, (n, size, size, 3)), 0, 255).astype(np.float32)


def _convert(
    spec: EmbedderSpec,
    model: Any,
    preprocess: Callable[[np.ndarray], np.ndarray],
    finish: Callable[[np.ndarray], np.ndarray],
    path: Path,
    note: Path,
) -> OnnxModel | None:
    started = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".onnx.part")
    os.close(fd)
    info: dict[str, Any] = {"spec": spec.to_dict(), "versions": versions()}
    try:
        x = preprocess(check_images(spec.input_size))
        try:
            _tf2onnx(model, spec.input_size, tmp)
            ours = _unit(finish(OnnxModel(tmp).predict_on_batch(x)))
        except OSError:  # the cache (a full disk): not the model's fault, so nothing is noted (load says it)
            raise
        except Exception as exc:  # tf2onnx and onnxruntime raise many kinds on an operator they cannot take
            return _refuse(note, info, f"conversion failed ({first_line(exc, 100)})", spec)
        diff = float(np.abs(ours - _unit(finish(np.asarray(model.predict_on_batch(x), np.float32)))).max())
        info.update(max_difference=diff, agree=AGREE, seconds=round(time.perf_counter() - started, 1))
        if not diff <= AGREE:
            return _refuse(note, info, f"its vectors differ from TensorFlow's by {diff:.1e} (> {AGREE:g})", spec)
        _write_json(note, info)
        os.replace(tmp, path)  # whole or not at all; a concurrent process converting the same spec writes the same file
        return OnnxModel(path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _unit(v: np.ndarray) -> np.ndarray:
    v = v.reshape(len(v), -1)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def _refuse(note: Path, info: dict[str, Any], why: str, spec: EmbedderSpec) -> None:
    info.update(refused=True, why=why)
    _write_json(note, info)
    print(f"lookalike: ONNX Runtime not used for {spec.describe()}: {why}; using TensorFlow (noted in {note})", file=sys.stderr)
    return None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".json.part")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def _tf2onnx(model: Any, size: int, out: str) -> None:
    """Convert a Keras model ``(N, size, size, 3) -> features`` to an ONNX file (tf2onnx, from a traced tf.function)."""
    import tensorflow as tf

    from lookalike.models.backend import quiet_native_stderr

    with quiet_native_stderr():  # (the imports only: fd 2 is the whole process's)
        import tf2onnx
        from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    for name in ("tf2onnx", "tensorflow"):  # tf2onnx logs every optimiser it skips, with its traceback
        logging.getLogger(name).setLevel(logging.ERROR)
    signature = tf.TensorSpec((None, size, size, 3), tf.float32, name="images")
    forward = tf.function(lambda images: model(images, training=False)).get_concrete_function(signature)
    # every captured tensor a constant (a Normalization layer's mean and variance too, else they become inputs)
    frozen = convert_variables_to_constants_v2(forward)
    graph = frozen.graph.as_graph_def()
    inputs = [t.name for t in frozen.inputs]
    outputs = [t.name for t in frozen.outputs]
    tf2onnx.convert.from_graph_def(graph, input_names=inputs, output_names=outputs, opset=OPSET, output_path=out)
