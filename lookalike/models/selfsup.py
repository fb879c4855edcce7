"""Self-supervised training: learn an embedder from a collection's own images, reading no label.

SimCLR (Chen et al. 2020, arXiv:2002.05709): each image of a batch is augmented twice; both views go
through the backbone, its pooling and a projection head (``Dense - BatchNorm - ReLU - Dense``); the
NT-Xent loss makes each view pick its twin out of the batch's ``2B - 1`` other views by cosine
similarity over a temperature. The projection head is for training only: the saved embedder is the
backbone, its pooling and L2 normalisation, a plain ``.keras`` model like ``lookalike train``'s (input
RGB 0-255 through the backbone's own preprocessing), so ``ingest --model FILE``, ``compare``, the
service and the app take it as they take any trained model. Its description says ``labels_used:
false``, the method, the data and the time.

Augmentations are chosen by the data (``augment``): for digits and scans (``digits``) a random affine
map (rotation, scale, shear, shift), a smooth elastic distortion and a brightness change, never a flip;
for photos (``photos``) a random resized crop, a horizontal flip, colour jitter and, sometimes, grey.
They run in NumPy/SciPy, seeded by (seed, epoch, batch), like the order of each epoch: a run is
deterministic given its seed on the CPU, and a resumed run continues exactly where it stopped.

No label is read: images come from :meth:`lookalike.data.datasets.Dataset.batches` (or a collection's stored
items), and nothing here touches an item's label (tested: permuted labels give the same weights).

Budget: ``epochs``, or ``minutes`` (the number of epochs that fit is fixed after the first one, and the
run also stops when the time is up); neither: the epochs that make about ``DEFAULT_STEPS`` steps. A
checkpoint (the training model, the optimizer, the epoch) is written after every epoch into
``OUT.checkpoint/``, each file atomically; running the same command again resumes from it, and the
finished model is written (atomically) to ``OUT`` before the checkpoint is removed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from lookalike.data.datasets import DIGIT_SIDE
from lookalike.errors import InputError, LookalikeError
from lookalike.util import first_line

log = logging.getLogger(__name__)

METHOD = "simclr"
AUGMENTATIONS = ("digits", "photos")
DEFAULT_BACKBONE = "smallcnn"  # fastest to train on this 2-core CPU, and the best on digits (docs/self-supervised.md)
DEFAULT_STEPS = 1000  # without --epochs or --minutes: the epochs that make about this many steps (MNIST: 5 of 60,000)
HIDDEN = 512  # the projection head's hidden width
WARMUP_EPOCHS = 1  # the learning rate rises linearly over the first epoch, then follows a cosine to 0
CHECKPOINT_FORMAT = 2  # (2: smallcnn's 3x3 head; a format-1 checkpoint is refused, naming --fresh)
StepProgress = Callable[[int, int, float], None]  # (steps done, steps planned, the last step's loss)
EpochProgress = Callable[[int, int, dict[str, float]], None]  # (epoch, epochs planned, {loss, lr, seconds})


@dataclass
class SelfSupervisedReport:
    """What a self-supervised run did; ``history`` holds each epoch's mean loss, learning rate and seconds."""

    out: str
    dataset: str
    n_images: int
    epochs_run: int
    epochs_planned: int
    steps: int
    seconds: float
    dim: int
    resumed_after: int  # the epoch a checkpoint had reached (0: a fresh run)
    history: list[dict[str, float]] = field(default_factory=list)
    description: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Settings:
    """Everything that decides the weights: a checkpoint is resumed only under the same settings."""

    data: str  # a digest of the images (their bytes, in order)
    n_images: int
    backbone: str
    weights: str
    weights_sha256: str | None
    layer: str
    pooling: str
    input_size: int
    seed: int
    augment: str
    batch_size: int
    learning_rate: float
    temperature: float
    projection_dim: int
    epochs: int | None
    minutes: float | None


def train_self_supervised(
    dataset: str | None = None,
    path: str | None = None,
    *,
    out: str | os.PathLike[str],
    source: str | None = None,
    limit: int | None = None,
    test_size: float | None = None,
    collection: str | None = None,
    db: str | None = None,
    seed: int = 0,
    backbone: str = DEFAULT_BACKBONE,
    weights: str = "random",
    layer: str | None = None,
    input_size: int | None = None,
    augment: str | None = None,
    epochs: int | None = None,
    minutes: float | None = None,
    batch_size: int = 256,
    learning_rate: float = 2e-3,
    temperature: float = 0.2,
    projection_dim: int = 128,
    overwrite: bool = False,
    fresh: bool = False,
    on_step: StepProgress | None = None,
    on_epoch: EpochProgress | None = None,
) -> SelfSupervisedReport:
    """Learn an embedder from the indexed (``train``) images of ``dataset`` (same options as ingest) or of the stored
    collection ``collection`` in ``db``, reading no label, and save it to ``out`` (.keras)."""
    from lookalike.models.embedder import make_spec

    out_path = Path(out).expanduser()
    ckpt = checkpoint_dir(out_path)
    _check_options(out_path, overwrite, epochs, minutes, batch_size, learning_rate, temperature, projection_dim, augment, seed)
    _check_backbone(backbone)
    spec = make_spec(backbone, weights=weights, layer=layer, input_size=input_size, seed=seed, precision="float32")
    if spec.pooling not in ("avg", "max"):
        raise InputError(f"--backbone {backbone}: pooling {spec.pooling!r} cannot be trained here: avg or max")
    images, name, protocol, photos = _read_images(dataset, path, source, limit, test_size, seed, collection, db, spec)
    if len(images) < 2:
        raise InputError(f"{name} has {len(images)} indexed image: self-supervised training needs at least 2")
    batch = min(batch_size, len(images))
    if epochs is None and minutes is None:
        epochs = max(1, math.ceil(DEFAULT_STEPS / (len(images) // batch)))
    aug = augment or ("photos" if photos else "digits")
    settings = _Settings(
        _digest(images), len(images), spec.model, spec.weights_label(), spec.weights_sha256, spec.layer, spec.pooling,
        spec.input_size, seed, aug,
        batch, learning_rate, temperature, projection_dim, epochs, minutes,
    )  # fmt: skip
    if fresh:
        shutil.rmtree(ckpt, ignore_errors=True)
    state = _read_checkpoint(ckpt, settings)

    from lookalike.models.backend import quiet_native_stderr

    with quiet_native_stderr():  # TensorFlow's import prints CPU-feature notes on fd 2
        import keras
        import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    with quiet_native_stderr():
        embedder, trainer = _build(spec, projection_dim)
    optimizer = keras.optimizers.Adam(learning_rate)
    step_fn = _train_step(trainer, optimizer, batch, temperature)
    steps_per_epoch = len(images) // batch
    planned = epochs if minutes is None else state.get("planned", epochs or 10**6)
    history: list[dict[str, float]] = list(state.get("history", []))
    start_epoch = int(state.get("epoch", 0))
    spent = float(state.get("seconds", 0.0))
    if start_epoch:
        try:
            _restore(ckpt, state, trainer, optimizer)
        except Exception as exc:  # h5py, numpy and Keras raise many kinds on a damaged or foreign file
            raise InputError(f"checkpoint {ckpt} cannot be used ({first_line(exc, 100)}): pass --fresh to start again") from None
        log.info("resumed from %s after epoch %d", ckpt, start_epoch)
    preprocess = _preprocess(spec)
    started = time.perf_counter()
    epoch = start_epoch
    while epoch < planned:
        if minutes is not None and spent + time.perf_counter() - started >= minutes * 60:
            break  # (a resumed run whose minutes were up already: nothing more, as the unbroken run did)
        t0 = time.perf_counter()
        losses = []
        for i, (v1, v2) in enumerate(_epoch_views(images, epoch, seed, batch, aug, spec.input_size)):
            step = epoch * steps_per_epoch + i
            optimizer.learning_rate.assign(_lr(step, steps_per_epoch, planned, learning_rate))
            loss = float(step_fn(preprocess(v1), preprocess(v2)))
            if not math.isfinite(loss):
                raise LookalikeError(f"the loss became {loss} at step {step + 1}: try a lower --learning-rate, with --fresh")
            losses.append(loss)
            if on_step is not None:  # (with --minutes, the first epoch's total is that epoch: the rest is not planned yet)
                on_step(step + 1, (planned if "planned" in state or minutes is None else epoch + 1) * steps_per_epoch, loss)
        epoch += 1
        seconds = time.perf_counter() - t0
        history.append(
            {
                "epoch": epoch,
                "loss": float(np.mean(losses)),
                "lr": _lr(epoch * steps_per_epoch - 1, steps_per_epoch, planned, learning_rate),
                "seconds": seconds,
            }
        )
        if minutes is not None and epoch == start_epoch + 1 and "planned" not in state:
            planned = max(1, min(epochs or 10**6, int(minutes * 60 // seconds)))  # what fits, fixed now (checkpointed)
            state["planned"] = planned
            log.info("%.0f s an epoch: %d epochs fit in %g minutes", seconds, planned, minutes)
        elapsed = spent + time.perf_counter() - started
        _write_checkpoint(ckpt, settings, trainer, optimizer, {"epoch": epoch, "planned": planned, "history": history, "seconds": elapsed})
        if on_epoch is not None:
            on_epoch(epoch, planned, history[-1])
        if minutes is not None and elapsed > minutes * 60 and epoch < planned:
            log.info("the %g minutes are up after epoch %d of %d", minutes, epoch, planned)
            break
    seconds = spent + time.perf_counter() - started
    description = {
        "format": "lookalike-trained-embedder",
        "version": 2,
        "labels_used": False,
        "method": METHOD,
        "base": spec.model,
        "weights": spec.weights_label(),
        "layer": spec.layer,
        "head": f"{spec.pooling}->l2 (self-supervised)",
        "pooling": spec.pooling,
        "projection": f"dense{HIDDEN}->bn->relu->dense{projection_dim} (training only)",
        "loss": f"nt-xent (temperature {temperature})",
        "augment": aug,
        "dim": spec.dim,
        "input_size": spec.input_size,
        "precision": "float32",
        "preprocessing": spec.preprocessing,
        "seed": seed,
        "dataset": protocol,
        "n_images": len(images),
        "images_sha256": settings.data,
        "epochs": planned,
        "epochs_run": epoch,
        "budget": {"epochs": epochs, "minutes": minutes},
        "batch_size": batch,
        "learning_rate": learning_rate,
        "temperature": temperature,
        "history": history,
        "train_seconds": seconds,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": {"keras": keras.__version__, "tensorflow": tf.__version__},
    }
    from lookalike.models.train import save_model

    save_model(embedder, description, out_path)
    shutil.rmtree(ckpt, ignore_errors=True)
    log.info("saved %s (%d images, %d epochs)", out_path, len(images), epoch)
    return SelfSupervisedReport(
        str(out_path), name, len(images), epoch, planned, epoch * steps_per_epoch, seconds, spec.dim, start_epoch, history, description
    )


def checkpoint_dir(out: Path) -> Path:
    """Where a run writing ``out`` keeps its checkpoint."""
    return out.with_name(out.name + ".checkpoint")


def _check_options(
    out: Path,
    overwrite: bool,
    epochs: int | None,
    minutes: float | None,
    batch_size: int,
    learning_rate: float,
    temperature: float,
    projection_dim: int,
    augment: str | None,
    seed: int,
) -> None:
    from lookalike.models.train import check_out

    check_out(out, overwrite)
    checks = [
        (epochs is None or epochs >= 1, f"--epochs must be at least 1, got {epochs}"),
        (minutes is None or minutes > 0, f"--minutes must be positive, got {minutes}"),
        (batch_size >= 2, f"--batch-size must be at least 2 (each image's twin is picked out of the batch), got {batch_size}"),
        (learning_rate > 0, f"--learning-rate must be positive, got {learning_rate}"),
        (temperature > 0, f"--temperature must be positive, got {temperature}"),
        (projection_dim >= 2, f"--dim must be at least 2, got {projection_dim}"),
        (seed >= 0, f"--seed must be 0 or more, got {seed}"),
        (augment is None or augment in AUGMENTATIONS, f"--augment {augment!r} is not one of {', '.join(AUGMENTATIONS)}"),
    ]
    for ok, message in checks:
        if not ok:
            raise InputError(message)


def _check_backbone(name: str) -> None:
    from lookalike.models.backbones import BACKBONES

    cnns = [n for n, b in BACKBONES.items() if not b.tokens]
    if name not in cnns:
        raise InputError(f"--backbone {name!r}: self-supervised training takes a convolutional backbone: choose one of {', '.join(cnns)}")


def _read_images(
    dataset: str | None,
    path: str | None,
    source: str | None,
    limit: int | None,
    test_size: float | None,
    seed: int,
    collection: str | None,
    db: str | None,
    spec: Any,
) -> tuple[np.ndarray, str, dict[str, Any], bool]:
    """The indexed (``train``) images, uint8 ``(N, S, S, C)`` (C = 1 when every image is grey), the data's name and
    protocol, and whether they are photos. Unreadable files are skipped; each page is made ``S`` square as it is read
    (a page of photos at a time in memory, not all of them). Labels are not read."""
    from lookalike.data.datasets import load_dataset, stored_pixels
    from lookalike.data.images import resize

    pages: list[np.ndarray] = []

    def keep(pictures: list[Any]) -> None:
        got = [resize(p, spec.input_size, "RGB", spec.fit) for p in pictures if isinstance(p, np.ndarray)]
        if got:
            pages.append(np.stack(got).astype(np.uint8))

    if collection is not None:
        from lookalike.core.gallery import Gallery

        with Gallery.open(collection, db=db) as g:
            ids, _, metas = g.scan("train", vectors=False)
            if not ids:
                raise InputError(f"collection {collection!r} has no indexed (train) items to learn from")
            order = sorted(range(len(ids)), key=ids.__getitem__)  # (the store's order is its own: by id, always the same)
            for i in range(0, len(order), 1024):
                keep(stored_pixels(g.record.protocol, [metas[j] for j in order[i : i + 1024]], g.max_pixels, spec.decode_side))
            name, protocol = collection, {"collection": collection, **g.record.protocol}
            photos = g.record.embedder.input_size > DIGIT_SIDE  # (a collection of photos was embedded at photo size)
    else:
        if dataset is None:
            raise InputError("give a DATASET (mnist, fashion-mnist, mnist-sample) or --collection NAME to learn from")
        if dataset == "folder":
            raise InputError(
                "a folder's items get their split when ingested: lookalike ingest folder PATH --collection NAME, "
                "then lookalike train --self-supervised --collection NAME (its held-out items are never trained on)"
            )
        ds = load_dataset(dataset, path, source=source, limit=limit, test_size=test_size, seed=seed, decode_size=spec.decode_side)
        items = [it for it in ds.items if it.split == "train"]
        if not items:
            raise InputError(f"{ds.name} has no indexed (train) items to learn from")
        for _, got in ds.batches(items, 1024):
            keep(got)
        name, protocol, photos = ds.name, ds.protocol, ds.photos()
    if not pages:
        raise InputError(f"none of {name}'s indexed images could be read")
    x = np.concatenate(pages)
    if np.array_equal(x[..., 0], x[..., 1]) and np.array_equal(x[..., 0], x[..., 2]):
        x = np.ascontiguousarray(x[..., :1])  # grey: augmented once, not three times
    return x, name, protocol, photos


def _digest(images: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(str(images.shape).encode())
    h.update(np.ascontiguousarray(images).data)
    return h.hexdigest()


def _lr(step: int, steps_per_epoch: int, epochs: int, peak: float) -> float:
    """Linear warm-up over the first epoch, then a cosine to 0 at the last planned step."""
    warm = WARMUP_EPOCHS * steps_per_epoch
    if step < warm:
        return peak * (step + 1) / warm
    total = max(epochs * steps_per_epoch - warm, 1)
    return 0.5 * peak * (1 + math.cos(math.pi * min(step - warm, total) / total))


def _epoch_views(images: np.ndarray, epoch: int, seed: int, batch: int, aug: str, size: int) -> Any:
    """The epoch's batches (a seeded order; the last, short one dropped) as two augmented views, float32 RGB 0-255."""
    order = np.random.default_rng([seed, epoch]).permutation(len(images))
    for i in range(len(images) // batch):
        rows = np.sort(order[i * batch : (i + 1) * batch])
        rng = np.random.default_rng([seed, epoch, i])
        x = images[rows]
        yield augment_batch(x, rng, aug), augment_batch(x, rng, aug)


def augment_batch(x: np.ndarray, rng: np.random.Generator, how: str) -> np.ndarray:
    """One random view of each image of ``x`` (uint8 ``(B, S, S, C)``): float32 RGB 0-255 ``(B, S, S, 3)``."""
    from scipy import ndimage

    b, side = len(x), x.shape[1]
    grid = np.arange(side, dtype=np.float32)
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    centre = (side - 1) / 2
    unit = side / 28  # digit-sized distortions scale with the side
    if how == "digits":
        angle = np.deg2rad(rng.uniform(-15, 15, b))
        scale = 1 + rng.uniform(-0.15, 0.15, (b, 2))
        shear = rng.uniform(-0.15, 0.15, b)
        shift = rng.uniform(-3, 3, (b, 2)) * unit
        cos, sin = np.cos(angle), np.sin(angle)
        m = np.stack([np.stack([cos / scale[:, 0], -sin / scale[:, 0] + shear], 1), np.stack([sin / scale[:, 1], cos / scale[:, 1]], 1)], 1)
        oy, ox = yy[None] - centre - shift[:, 0, None, None], xx[None] - centre - shift[:, 1, None, None]
        sy = m[:, 0, 0, None, None] * oy + m[:, 0, 1, None, None] * ox + centre
        sx = m[:, 1, 0, None, None] * oy + m[:, 1, 1, None, None] * ox + centre
        warp = ndimage.zoom(rng.normal(0, 1.5 * unit, (b, 2, 4, 4)).astype(np.float32), (1, 1, side / 4, side / 4), order=1)
        sy, sx = sy + warp[:, 0], sx + warp[:, 1]
        flip = np.zeros(b, bool)
    else:  # a random resized crop (scale 0.2-1 of the area, aspect 3/4-4/3), flipped half the time
        area = rng.uniform(0.2, 1.0, b)
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3), b))
        h = np.clip(np.sqrt(area / aspect), 0, 1) * side
        w = np.clip(np.sqrt(area * aspect), 0, 1) * side
        top, left = rng.uniform(0, 1, b) * (side - h), rng.uniform(0, 1, b) * (side - w)
        flip = rng.random(b) < 0.5
        sy = top[:, None, None] + yy[None] * (h / side)[:, None, None]
        sx = left[:, None, None] + xx[None] * (w / side)[:, None, None]
        sx = np.where(flip[:, None, None], left[:, None, None] + w[:, None, None] - (sx - left[:, None, None]), sx)
    batch_index = np.broadcast_to(np.arange(b, dtype=np.float32)[:, None, None], (b, side, side))
    channels = [
        ndimage.map_coordinates(x[..., c].astype(np.float32), [batch_index, sy, sx], order=1, mode="constant", cval=0.0)
        for c in range(x.shape[-1])
    ]
    v = np.stack(channels, -1)
    if how == "digits":
        v *= rng.uniform(0.7, 1.3, (b, 1, 1, 1)).astype(np.float32)
    else:
        v = _colour_jitter(v, rng)
    v = np.clip(v, 0, 255)
    return np.repeat(v, 3, axis=-1) if v.shape[-1] == 1 else v


def _colour_jitter(v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """SimCLR's colour distortion at strength 0.5 (brightness, contrast, saturation 0.4; 80% of images), then grey
    for 20%."""
    b = len(v)
    on = (rng.random(b) < 0.8)[:, None, None, None]
    bright = rng.uniform(0.6, 1.4, (b, 1, 1, 1))
    contrast = rng.uniform(0.6, 1.4, (b, 1, 1, 1))
    saturation = rng.uniform(0.6, 1.4, (b, 1, 1, 1))
    j = v * bright
    j = (j - j.mean(axis=(1, 2, 3), keepdims=True)) * contrast + j.mean(axis=(1, 2, 3), keepdims=True)
    jg = (j @ np.array([0.299, 0.587, 0.114], np.float32))[..., None] if v.shape[-1] == 3 else j
    j = jg + (j - jg) * saturation
    v = np.where(on, j, v).astype(np.float32)
    to_grey = (rng.random(b) < 0.2)[:, None, None, None]
    grey = (v @ np.array([0.299, 0.587, 0.114], np.float32))[..., None] if v.shape[-1] == 3 else v
    return np.where(to_grey, grey, v).astype(np.float32)


def _preprocess(spec: Any) -> Callable[[np.ndarray], np.ndarray]:
    from lookalike.models.backbones import BACKBONES

    return BACKBONES[spec.model].preprocess


def _build(spec: Any, projection_dim: int) -> tuple[Any, Any]:
    """(embedder: input -> pooled, L2-normalised features; trainer: input -> pooled features -> projection head)."""
    import keras

    from lookalike.models.backbones import seeded_weights
    from lookalike.models.backend import make_backbone

    trunk = make_backbone(spec)  # the registry's backbone: seeded random, published or file weights
    pool = keras.layers.GlobalAveragePooling2D if spec.pooling == "avg" else keras.layers.GlobalMaxPooling2D
    feats = pool(name="pool", dtype="float32")(trunk.output)
    emb = keras.layers.UnitNormalization(name="l2", dtype="float32")(feats)
    embedder = keras.Model(trunk.input, emb, name="lookalike_embedder")
    projector = keras.Sequential(
        [
            keras.Input((int(feats.shape[-1]),)),
            keras.layers.Dense(HIDDEN, use_bias=False),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.Dense(projection_dim),
        ],
        name="projector",
    )
    projector.set_weights(seeded_weights(projector, spec.seed + 1))
    trainer = keras.Model(trunk.input, projector(feats), name="lookalike_simclr")
    return embedder, trainer


def _train_step(trainer: Any, optimizer: Any, batch: int, temperature: float) -> Any:
    """A compiled SimCLR step on two views ``(B, S, S, 3)``: NT-Xent over the ``2B`` projections; returns the loss."""
    import tensorflow as tf

    twins = tf.concat([tf.range(batch, 2 * batch), tf.range(0, batch)], 0)  # view i's positive is view i +- B
    self_mask = tf.eye(2 * batch) * 1e9  # a view is not its own candidate

    @tf.function(reduce_retracing=True)
    def step(v1: Any, v2: Any) -> Any:
        with tf.GradientTape() as tape:
            z = tf.math.l2_normalize(tf.cast(trainer(tf.concat([v1, v2], 0), training=True), tf.float32), axis=1)
            logits = tf.matmul(z, z, transpose_b=True) / temperature - self_mask
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(twins, logits))
        grads = tape.gradient(loss, trainer.trainable_variables)
        optimizer.apply_gradients(zip(grads, trainer.trainable_variables))
        return loss

    return step


def _read_checkpoint(ckpt: Path, settings: _Settings) -> dict[str, Any]:
    """The state of the checkpoint at ``ckpt`` (empty when there is none); InputError when it is another run's."""
    state_file = ckpt / "state.json"
    if not state_file.is_file():
        return {}
    try:
        state = json.loads(state_file.read_text())
        theirs = dict(state["settings"])
        epoch = int(state["epoch"])
        files = [str(state["weights"]), str(state["optimizer"])]
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(f"checkpoint {ckpt} cannot be read: pass --fresh to start again") from None
    differ = [k for k, v in asdict(settings).items() if theirs.get(k) != v]
    if state.get("format") != CHECKPOINT_FORMAT or differ:
        raise InputError(
            f"checkpoint {ckpt} is of a run with other settings ({', '.join(differ) or 'format'}): "
            "give the same options to resume it, or pass --fresh to start again"
        )
    for name in files:
        if not (ckpt / name).is_file():
            raise InputError(f"checkpoint {ckpt} lacks {name}: pass --fresh to start again")
    if epoch < 1:
        raise InputError(f"checkpoint {ckpt} holds no finished epoch: pass --fresh to start again")
    return state


def _write_checkpoint(ckpt: Path, settings: _Settings, trainer: Any, optimizer: Any, state: dict[str, Any]) -> None:
    """The training model's weights and the optimizer's state for this epoch, then ``state.json`` naming them (replaced
    atomically: a kill at any point leaves the previous checkpoint or this one), then the previous epoch's files go."""
    ckpt.mkdir(exist_ok=True)
    epoch = state["epoch"]
    weights, opt = f"weights-{epoch}.weights.h5", f"optimizer-{epoch}.npz"
    trainer.save_weights(str(ckpt / f".{weights}"))
    os.replace(ckpt / f".{weights}", ckpt / weights)
    with open(ckpt / f".{opt}", "wb") as f:
        np.savez(f, *[np.asarray(v) for v in optimizer.variables])
    os.replace(ckpt / f".{opt}", ckpt / opt)
    body = {"format": CHECKPOINT_FORMAT, "settings": asdict(settings), "weights": weights, "optimizer": opt, **state}
    (ckpt / ".state.json").write_text(json.dumps(body, indent=1))
    os.replace(ckpt / ".state.json", ckpt / "state.json")
    for old in ckpt.iterdir():
        if old.name not in ("state.json", weights, opt):
            old.unlink(missing_ok=True)


def _restore(ckpt: Path, state: dict[str, Any], trainer: Any, optimizer: Any) -> None:
    """Load the checkpoint's weights and the optimizer's state (its variables made first, by ``build``)."""
    trainer.load_weights(str(ckpt / state["weights"]))
    optimizer.build(trainer.trainable_variables)
    with np.load(ckpt / state["optimizer"]) as z:
        saved = [z[f"arr_{i}"] for i in range(len(z.files))]
    if len(saved) != len(optimizer.variables) or any(tuple(v.shape) != x.shape for v, x in zip(optimizer.variables, saved)):
        raise InputError(f"checkpoint {ckpt} does not fit this model: pass --fresh to start again")
    for var, value in zip(optimizer.variables, saved):
        var.assign(value)
