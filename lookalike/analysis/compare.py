"""Compare embedders on one dataset and protocol: each into its own collection, evaluated the same way.

An embedder SPEC is ``name[:key=value,...]`` with a backbone's name (``lookalike models``) or
``pixels``: ``vgg16``, ``resnet50:size=224,fit=crop``, ``vgg16:layer=block3_pool,pooling=flatten``,
``vgg16:input_size=48``, ``dinov2_small:weights=random,seed=1``, ``vgg16:precision=float32``, and
``model:FILE.keras`` (a model written by ``lookalike train``). A SPEC without a size gets the one the
data calls for, as ``ingest`` gives it (224 px and ``fit=crop`` for photos, 32 px for digits).
Collections already there are reused (ingest only adds what is missing).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lookalike.analysis.evaluate import evaluate
from lookalike.analysis.explore import read_points
from lookalike.core.gallery import Gallery
from lookalike.core.ingest import Progress, ingest
from lookalike.core.store import Store
from lookalike.data.datasets import load_dataset
from lookalike.errors import InputError, MismatchError, StoreError
from lookalike.models.backbones import BACKBONES
from lookalike.models.embedder import EmbedderSpec, build_embedder, defaults_by_data, make_spec

LEGACY = {"fit": "squash", "decode": 2}  # spec fields added later, at the values earlier releases always used
SPEC_KEYS = {
    "weights": str,
    "layer": str,
    "pooling": str,
    "normalize": str,
    "input_size": int,
    "size": int,
    "seed": int,
    "precision": str,
    "fit": str,
}
THROUGHPUT_SAMPLE = 256  # images embedded (after a warm-up) to measure each embedder's speed
SILHOUETTE_SAMPLE = 2000


@dataclass
class CompareRow:
    """One embedder's results."""

    spec: str
    embedder: str
    collection: str
    dim: int
    accuracy_1nn: float
    accuracy_knn: float
    recall_at_1: float
    silhouette: float
    images_per_s: float


@dataclass
class CompareReport:
    """The comparison table: one row per embedder, k-NN with ``k``."""

    dataset: str
    protocol: str
    k: int
    rows: list[CompareRow] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "protocol": self.protocol, "k": self.k, "rows": [asdict(r) for r in self.rows]}


def parse_spec(text: str, default_weights: str = "imagenet", seed: int = 0) -> dict[str, Any]:
    """Keyword arguments for :func:`~lookalike.models.embedder.make_spec` from ``name[:key=value,...]``."""
    name, _, rest = text.partition(":")
    if name.strip() == "model":
        if not rest.strip():
            raise InputError(f"bad --embedder {text!r}: use model:FILE.keras (a file written by `lookalike train`)")
        return {"model": "keras", "weights": rest.strip()}
    options: dict[str, Any] = {"model": name.strip()}
    if options["model"] in BACKBONES:
        options.update(weights=default_weights, seed=seed)
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = part.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in SPEC_KEYS:
            raise InputError(f"bad --embedder {text!r}: use name[:key=value,...] with keys {', '.join(SPEC_KEYS)}")
        try:
            options["input_size" if key == "size" else key] = SPEC_KEYS[key](value.strip())
        except ValueError:
            raise InputError(f"bad --embedder {text!r}: {key} must be a {SPEC_KEYS[key].__name__}") from None
    return options


def _count(value: float | None) -> str:
    """``1000.0`` -> ``"1000"``; fractions stay as they are."""
    return str(int(value)) if value is not None and float(value).is_integer() else str(value)


def collection_name(dataset: str, spec_text: str, spec: EmbedderSpec, protocol: dict[str, Any]) -> str:
    """A valid collection name for one embedder on one protocol: readable, and unique to everything that makes them differ.

    The readable part names the dataset and the SPEC; a hash of the full embedder spec and dataset
    protocol (weights, seed, precision, source file, folder root, limit, hold-out...) follows, so a
    later comparison with other weights or another source never meets a collection of the same name.
    """
    described = {k: v for k, v in spec.to_dict().items() if LEGACY.get(k, object()) != v}  # (names of earlier releases kept)
    digest = hashlib.sha256(json.dumps([described, protocol], sort_keys=True, default=str).encode()).hexdigest()[:10]
    readable = re.sub(r"[^a-zA-Z0-9._-]+", "-", f"cmp-{dataset}-{spec_text}").strip("-._")[:80]
    return f"{readable}-{digest}"


def compare(
    dataset: str,
    path: str | None = None,
    *,
    embedders: list[str],
    source: str | None = None,
    limit: int | None = None,
    test_size: float | None = None,
    seed: int = 0,
    weights: str = "imagenet",
    k: int = 5,
    batch_size: int = 256,
    db: str | None = None,
    store: Store | None = None,
    wait: float | None = None,
    progress: Progress | None = None,
) -> CompareReport:
    """Ingest ``dataset`` with every embedder SPEC (reusing collections), evaluate each, return the table."""
    if not embedders:
        raise InputError("give at least one --embedder SPEC (e.g. --embedder pixels --embedder vgg16)")
    if k < 1:
        raise InputError(f"--k must be at least 1, got {k}")
    parsed = [(text, parse_spec(text, weights, seed)) for text in embedders]
    for _, options in parsed:
        make_spec(**options)  # every SPEC checked before anything is read
    ds = load_dataset(dataset, path, source=source, limit=limit, test_size=test_size, seed=seed)
    photos = ds.photos()
    specs = [(text, make_spec(**defaults_by_data(options, photos))) for text, options in parsed]
    ds.decode_size = min(s.decode_side for _, s in specs)
    sample_images = [im for im in ds.load(ds.items[: THROUGHPUT_SAMPLE + 8]) if isinstance(im, np.ndarray)]
    proto = "official split" if ds.protocol.get("mode") == "official" else f"limit={limit}, test_size={_count(test_size)}, seed={seed}"
    report = CompareReport(ds.name, proto, k)
    own = store is None
    st = store if store is not None else Store(db, create=True, wait=wait)
    try:
        for text, spec in specs:
            model = build_embedder(spec)
            name = collection_name(ds.name, text, spec, ds.protocol)
            if st.exists(name):
                try:
                    Gallery(st, name)
                except StoreError as exc:  # not a lookalike collection, or its record is damaged
                    fix = f"drop it with `lookalike drop {name}` and compare again"
                    raise StoreError(f"collection {name!r}, compare's name for --embedder {text}, cannot be used ({exc}): {fix}") from None
            try:
                ingest(
                    dataset,
                    path,
                    source=source,
                    limit=limit,
                    test_size=test_size,
                    seed=seed,
                    embedder=model,
                    batch_size=batch_size,
                    collection=name,
                    store=st,
                    progress=progress,
                )
            except MismatchError:
                raise StoreError(
                    f"collection {name!r}, compare's name for --embedder {text}, holds something else: "
                    f"drop it with `lookalike drop {name}` and compare again"
                ) from None
            gallery = Gallery(st, name)
            result = evaluate(gallery, k=k)  # its store answers give both the 1-NN and k-NN columns
            points = read_points(gallery, sample=SILHOUETTE_SAMPLE, seed=seed)
            report.rows.append(
                CompareRow(
                    text,
                    spec.describe(),
                    name,
                    spec.dim,
                    result.accuracy_1nn,
                    result.accuracy,
                    result.recall_at_1,
                    _silhouette(points.vectors, points.labels, seed),
                    _throughput(model, sample_images),
                )
            )
    finally:
        if own:
            st.close()
    return report


def _silhouette(vectors: np.ndarray, labels: np.ndarray, seed: int) -> float:
    from sklearn.metrics import silhouette_score

    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(silhouette_score(vectors, labels, sample_size=min(len(labels), SILHOUETTE_SAMPLE), random_state=seed))


def _throughput(model: Any, images: list[np.ndarray]) -> float:
    """Images/s of ``model.embed`` on ``images`` after a warm-up batch."""
    model.embed(images[:8])
    batch = images[8:] or images
    started = time.perf_counter()
    model.embed(batch)
    return len(batch) / max(time.perf_counter() - started, 1e-9)


def save_compare_picture(report: CompareReport, out: str | os.PathLike[str]) -> Path:
    """Bar chart of 1-NN and k-NN accuracy per embedder."""
    from lookalike.analysis.plots import bars_figure, save_figure

    names = [f"{r.embedder}" for r in report.rows]
    series = {"1-NN accuracy": [r.accuracy_1nn for r in report.rows]}
    if report.k > 1:
        series[f"{report.k}-NN accuracy"] = [r.accuracy_knn for r in report.rows]
    title = f"Embedders on {report.dataset} ({report.protocol})"
    return save_figure(bars_figure(names, series, title, "held-out accuracy (through the store)"), out)
