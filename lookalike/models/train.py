"""Train: fine-tune VGG16 plus a small embedding head on a dataset's indexed items.

The network is VGG16 (ImageNet, seeded random or a weights file) cut at ``layer``, flattened,
dropout, ``Dense(dim)`` and L2 normalisation: the embedding. It is trained as a *cosine classifier*
with a CosFace margin: logits are ``scale * (cos(embedding, class weight) - margin [true class])``,
so each class is pulled together on the unit sphere where Chroma's distances are measured
(``loss="softmax"``: a plain classifier on the same head). Only the dataset's ``train`` items are
used (the held-out items are never seen); a stratified ``validation`` slice of them drives early
stopping, and the weights of the best validation epoch are kept. Batches are shifted by up to
``shift`` pixels (seeded augmentation). Defaults were chosen by measurement (docs/fine-tuning.md).

The saved file is a plain Keras ``.keras`` model (input ``(N, S, S, 3)`` VGG16-preprocessed, output
``(N, dim)`` unit vectors) with a ``lookalike.json`` entry describing how it was made; it is written
to a temporary file and renamed, so an interrupted run never leaves a half-written model.
Deterministic given ``seed`` on the CPU: TensorFlow op determinism is switched on (for the rest of
the process).
"""

from __future__ import annotations

import json
import logging
import os
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from lookalike.data.datasets import Dataset, load_dataset, stratified_pick
from lookalike.data.images import resize
from lookalike.errors import EmbedderError, InputError
from lookalike.models.backend import make_vgg16, quiet_native_stderr, vgg16_preprocess
from lookalike.models.embedder import DESCRIPTION_ENTRY, MIN_INPUT_SIZE, VGG16_LAYERS, make_spec

log = logging.getLogger(__name__)

LOSSES = ("cosine", "softmax")
COSINE_SCALE = 16.0  # logit scale of the cosine classifier (cos in [-1, 1] is too flat for softmax)
COSINE_MARGIN = 0.2  # CosFace margin: the true class must win by this much cosine
BatchProgress = Callable[[int, int], None]  # (batches done, batches in all epochs)
EpochProgress = Callable[[int, dict[str, float]], None]  # (epoch, its logs: loss, val_loss, val_accuracy)


@dataclass
class TrainReport:
    """What a training run did; ``history`` holds each epoch's losses and validation accuracy."""

    out: str
    dataset: str
    n_train: int
    n_validation: int
    epochs_run: int
    best_epoch: int
    best_val_loss: float
    best_val_accuracy: float
    seconds: float
    dim: int
    history: list[dict[str, float]] = field(default_factory=list)
    description: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def train(
    dataset: str,
    path: str | None = None,
    *,
    out: str | os.PathLike[str],
    source: str | None = None,
    limit: int | None = None,
    test_size: float | None = None,
    seed: int = 0,
    weights: str = "imagenet",
    layer: str = "block3_pool",
    input_size: int = 32,
    precision: str | None = None,
    dim: int = 128,
    epochs: int = 12,
    batch_size: int = 64,
    learning_rate: float = 3e-4,
    loss: str = "cosine",
    validation: float = 0.1,
    patience: int = 3,
    shift: int = 2,
    margin: float = COSINE_MARGIN,
    dropout: float = 0.3,
    overwrite: bool = False,
    on_batch: BatchProgress | None = None,
    on_epoch: EpochProgress | None = None,
) -> TrainReport:
    """Fine-tune on the ``train`` items of ``dataset`` (same options as ingest) and save the model to ``out``."""
    out_path = Path(out).expanduser()
    _check_options(out_path, overwrite, dim, epochs, batch_size, learning_rate, loss, validation, patience, shift, input_size, layer)
    if not (0 <= margin < 1 and 0 <= dropout < 1):
        raise InputError(f"margin ({margin}) and dropout ({dropout}) must be in [0, 1)")
    spec = make_spec("vgg16", weights=weights, layer=layer, input_size=input_size, seed=seed, precision=precision)  # validates weights
    ds = load_dataset(dataset, path, source=source, limit=limit, test_size=test_size, seed=seed, decode_size=spec.decode_side)
    started = time.perf_counter()
    x, y, n_read = _read_train_items(ds, input_size)
    if len(np.unique(y)) < 2:
        raise InputError(f"{ds.name} has {len(np.unique(y))} label among its indexed items: training needs at least 2")
    n_val = max(round(validation * len(y)), len(np.unique(y))) if validation > 0 else 0
    val_rows = stratified_pick(y, n_val, seed) if n_val else np.zeros(0, int)
    train_rows = np.setdiff1d(np.arange(len(y)), val_rows)
    log.info("training on %d items, validating on %d", len(train_rows), len(val_rows))

    with quiet_native_stderr():  # TensorFlow's import prints CPU-feature notes on fd 2
        import keras
        import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    n_classes = int(y.max()) + 1
    with quiet_native_stderr():
        embedder, classifier = _build(spec, dim, n_classes, loss, dropout)
    classifier.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=_loss_fn(loss, n_classes, margin),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    train_batches = _batches(x[train_rows], y[train_rows], batch_size, seed, shift)
    val_data = (vgg16_preprocess(x[val_rows]), y[val_rows]) if len(val_rows) else None
    callbacks: list[Any] = [_report(len(train_batches) * epochs, on_batch, on_epoch)]
    monitor = "val_loss" if val_data is not None else "loss"
    stopper = keras.callbacks.EarlyStopping(monitor=monitor, patience=patience, restore_best_weights=True)
    callbacks.append(stopper)
    history = classifier.fit(train_batches, validation_data=val_data, epochs=epochs, verbose=0, callbacks=callbacks, shuffle=False)
    hist = [{k: float(v[i]) for k, v in history.history.items()} for i in range(len(history.history["loss"]))]
    best = int(np.argmin([h[monitor] for h in hist]))
    seconds = time.perf_counter() - started
    description = {
        "format": "lookalike-trained-embedder",
        "version": 1,
        "base": "vgg16",
        "weights": spec.weights_label() + (f" sha256:{spec.weights_sha256}" if spec.weights_sha256 else ""),
        "layer": layer,
        "head": f"flatten->dense{dim}->l2",
        "loss": loss,
        "dim": dim,
        "input_size": input_size,
        "precision": spec.precision,
        "preprocessing": spec.preprocessing,
        "seed": seed,
        "dataset": ds.protocol,
        "label_names": ds.label_names,
        "n_train": len(train_rows),
        "n_validation": len(val_rows),
        "epochs": epochs,
        "epochs_run": len(hist),
        "best_epoch": best + 1,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "shift": shift,
        "margin": margin if loss == "cosine" else None,
        "dropout": dropout,
        "scale": COSINE_SCALE if loss == "cosine" else None,
        "patience": patience,
        "history": hist,
        "train_seconds": seconds,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": {"keras": keras.__version__, "tensorflow": tf.__version__},
    }
    save_model(embedder, description, out_path)
    log.info("saved %s (%d items read, best epoch %d)", out_path, n_read, best + 1)
    return TrainReport(
        str(out_path),
        ds.name,
        len(train_rows),
        len(val_rows),
        len(hist),
        best + 1,
        hist[best][monitor],
        hist[best].get("val_accuracy", hist[best].get("accuracy", 0.0)),
        seconds,
        dim,
        hist,
        description,
    )


def _check_options(
    out: Path,
    overwrite: bool,
    dim: int,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    loss: str,
    validation: float,
    patience: int,
    shift: int,
    input_size: int,
    layer: str,
) -> None:
    check_out(out, overwrite)
    checks = [
        (dim >= 2, f"--dim must be at least 2, got {dim}"),
        (epochs >= 1, f"--epochs must be at least 1, got {epochs}"),
        (batch_size >= 2, f"--batch-size must be at least 2, got {batch_size}"),
        (learning_rate > 0, f"--learning-rate must be positive, got {learning_rate}"),
        (loss in LOSSES, f"--loss {loss!r} is not one of {', '.join(LOSSES)}"),
        (0 <= validation < 0.5, f"--validation must be a fraction in [0, 0.5), got {validation}"),
        (patience >= 1, f"--patience must be at least 1, got {patience}"),
        (0 <= shift <= 8, f"--shift must be 0-8 pixels, got {shift}"),
        (input_size >= MIN_INPUT_SIZE, f"--input-size must be at least {MIN_INPUT_SIZE}, got {input_size}"),
        (layer in VGG16_LAYERS and layer != "block1_conv1", f"unknown VGG16 layer {layer!r}: choose one of {', '.join(VGG16_LAYERS)}"),
    ]
    for ok, message in checks:
        if not ok:
            raise InputError(message)


def check_out(out: Path, overwrite: bool) -> None:
    """InputError unless ``out`` is a new (or, with ``overwrite``, any) ``.keras`` path in an existing folder."""
    if out.suffix != ".keras":
        raise InputError(f"--out {out} must end in .keras")
    if out.exists() and not overwrite:
        raise InputError(f"--out {out} exists: pass --overwrite, or another --out")
    if not out.parent.is_dir():
        raise InputError(f"--out {out}: folder {out.parent} does not exist")


def _read_train_items(ds: Dataset, size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The ``train`` items as uint8 ``(N, size, size, 3)`` RGB and their labels ``(N,)`` (unreadable files skipped)."""
    items = [it for it in ds.items if it.split == "train"]
    if not items:
        raise InputError(f"{ds.name} has no indexed (train) items to learn from")
    xs, ys = [], []
    for batch, images in ds.batches(items, 1024):
        for it, im in zip(batch, images):
            if isinstance(im, np.ndarray):
                xs.append(resize(im, size, "RGB").astype(np.uint8))
                ys.append(it.label)
    return np.stack(xs), np.asarray(ys, dtype=np.int64), len(items)


def _shifted(x: np.ndarray, rng: np.random.Generator, shift: int) -> np.ndarray:
    """Each image moved by a random whole-pixel offset in [-shift, shift]^2, zero (black) filled."""
    if shift == 0:
        return x
    out = np.zeros_like(x)
    side = x.shape[1]
    for i, (dy, dx) in enumerate(rng.integers(-shift, shift + 1, size=(len(x), 2))):
        ys, yd = (slice(0, side - dy), slice(dy, side)) if dy >= 0 else (slice(-dy, side), slice(0, side + dy))
        xs, xd = (slice(0, side - dx), slice(dx, side)) if dx >= 0 else (slice(-dx, side), slice(0, side + dx))
        out[i, yd, xd] = x[i, ys, xs]
    return out


def _loss_fn(loss: str, n_classes: int, margin: float) -> Any:
    """Cross-entropy on ``scale * (cos - margin * one_hot)`` (CosFace) for ``cosine``, on logits for ``softmax``."""
    import keras
    from keras import ops

    def cosface(y_true: Any, cos: Any) -> Any:
        onehot = ops.one_hot(ops.cast(ops.reshape(y_true, (-1,)), "int32"), n_classes)
        logits = COSINE_SCALE * (cos - margin * onehot)
        return keras.losses.categorical_crossentropy(onehot, logits, from_logits=True)

    if loss == "cosine":
        return cosface
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _build(spec: Any, dim: int, n_classes: int, loss: str, dropout: float = 0.0) -> tuple[Any, Any]:
    """(embedding model: VGG16 input -> (N, dim) unit vectors, classifier model used for training)."""
    import keras

    trunk = make_vgg16(spec)  # VGG16 cut at spec.layer, weights as the spec says (seeded when random), bf16 if asked
    # the head computes in float32 whatever the trunk's precision: the vectors stored are float32 unit vectors
    feats = keras.layers.Flatten(name="flatten", dtype="float32")(trunk.output)
    if dropout > 0:
        feats = keras.layers.Dropout(dropout, name="dropout", dtype="float32")(feats)
    emb = keras.layers.Dense(dim, name="embedding", dtype="float32")(feats)
    emb = keras.layers.UnitNormalization(name="l2", dtype="float32")(emb)
    embedder = keras.Model(trunk.input, emb, name="lookalike_embedder")
    if loss == "cosine":  # outputs cos(embedding, class weight): the loss scales it and applies the margin
        out = _CosineClassifier(n_classes, name="cosine_classifier")(emb)
    else:
        out = keras.layers.Dense(n_classes, name="classifier", dtype="float32")(emb)
    return embedder, keras.Model(trunk.input, out, name="lookalike_trainer")


def _CosineClassifier(n_classes: int, name: str) -> Any:  # noqa: N802 - a layer factory
    """A layer: ``x @ normalize(W)`` for unit vectors ``x`` ``(N, dim)`` -> cosines ``(N, n_classes)``."""
    import keras
    from keras import ops

    class CosineClassifier(keras.layers.Layer):
        def build(self, input_shape: Any) -> None:
            self.w = self.add_weight(shape=(int(input_shape[-1]), n_classes), initializer="glorot_uniform", name="w")

        def call(self, x: Any) -> Any:
            w = self.w / ops.sqrt(ops.sum(self.w * self.w, axis=0, keepdims=True) + 1e-12)
            return ops.matmul(x, w)

    return CosineClassifier(name=name, dtype="float32")


def _batches(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int, shift: int) -> Any:
    """A ``keras.utils.PyDataset`` of seeded, shuffled, shifted, preprocessed batches (Keras imported lazily).

    Each epoch has a new order (one generator seeded once) and new shifts (seeded by epoch and batch).
    """
    import keras

    class Batches(keras.utils.PyDataset):
        def __init__(self) -> None:
            super().__init__(workers=1, use_multiprocessing=False)
            self.rng = np.random.default_rng(seed)
            self.order = self.rng.permutation(len(x))
            self.epoch = 0

        def __len__(self) -> int:
            return int(np.ceil(len(x) / batch_size))

        def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
            rows = np.sort(self.order[i * batch_size : (i + 1) * batch_size])
            shift_rng = np.random.default_rng([seed, self.epoch, i])
            return vgg16_preprocess(_shifted(x[rows], shift_rng, shift)), y[rows]

        def on_epoch_end(self) -> None:
            self.epoch += 1
            self.order = self.rng.permutation(len(x))

    return Batches()


def _report(total: int, on_batch: BatchProgress | None, on_epoch: EpochProgress | None) -> Any:
    """A Keras callback feeding ``on_batch(done, total)`` and ``on_epoch(epoch, logs)`` (Keras imported lazily)."""
    import keras

    class Report(keras.callbacks.Callback):
        done = 0

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            self.done += 1
            if on_batch is not None:
                on_batch(self.done, total)

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            logs = {k: float(v) for k, v in (logs or {}).items()}
            log.info("epoch %d: %s", epoch + 1, ", ".join(f"{k} {v:.4f}" for k, v in logs.items()))
            if on_epoch is not None:
                on_epoch(epoch + 1, logs)

    return Report()


def save_model(embedder: Any, description: dict[str, Any], out: Path) -> Path:
    """Save ``embedder`` as ``out`` (.keras) with ``description`` inside, atomically (temp file, then rename)."""
    tmp = out.with_name(f".{out.stem}.partial.keras")
    try:
        embedder.save(str(tmp))
        with zipfile.ZipFile(tmp, "a") as z:
            z.writestr(DESCRIPTION_ENTRY, json.dumps(description, indent=2, sort_keys=True))
        os.replace(tmp, out)
    except OSError as exc:
        raise EmbedderError(f"cannot write the model to {out} ({exc.strerror or exc}): pass --out a writable path") from None
    finally:
        tmp.unlink(missing_ok=True)
    return out
