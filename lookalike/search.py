"""Search: nearest stored items to an image file or to a stored id, filtered by label and split.

A search by id reads the stored vector back (no TensorFlow); a search by image rebuilds the
collection's recorded embedder. The query item itself is never returned.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lookalike.datasets import SPLITS, load_images_by_metadata, read_image_file
from lookalike.embedder import build_embedder
from lookalike.errors import InputError, NotFoundError
from lookalike.store import Store, VectorCollection

log = logging.getLogger(__name__)


@dataclass
class Hit:
    """One neighbour: ``distance`` is Euclidean in embedding space (smaller is closer)."""

    rank: int
    id: str
    label: int
    label_name: str
    split: str
    distance: float
    metadata: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "id": self.id, "label": self.label, "label_name": self.label_name,
                "split": self.split, "distance": self.distance, "metadata": self.metadata}  # fmt: skip


def search(
    *,
    image: str | os.PathLike[str] | np.ndarray | None = None,
    id: str | None = None,
    k: int = 5,
    labels: Sequence[int | str] | None = None,
    split: str | None = None,
    collection: str | None = None,
    db: str | None = None,
) -> list[Hit]:
    """The ``k`` nearest items to ``image`` (a file path or a uint8 array) or to stored ``id``.

    ``labels`` keeps only those labels (ints, or label names); ``split`` only ``"train"`` or
    ``"test"`` items. Nearest first.
    """
    if (image is None) == (id is None):
        raise InputError("give exactly one query: --image FILE or --id ID")
    if k < 1:
        raise InputError(f"--k must be at least 1, got {k}")
    col = Store(db).open(collection)
    where = build_where(col.record, labels, split)
    if id is not None:
        vector = query_vector_by_id(col, id)
        extra = 1  # the query itself may come back: drop it
    else:
        pixels = read_image_file(image) if not isinstance(image, np.ndarray) else image
        vector = build_embedder(col.record["embedder"]).embed([pixels])
        extra = 0
    (neighbours,) = col.query(vector, k + extra, where)
    neighbours = [n for n in neighbours if n.id != id][:k]
    names = col.record.get("label_names", [])
    return [
        Hit(rank, n.id, int(n.metadata["label"]), str(n.metadata.get("label_name", names[int(n.metadata["label"])])),
            str(n.metadata["split"]), n.distance, n.metadata)  # fmt: skip
        for rank, n in enumerate(neighbours, start=1)
    ]


def query_vector_by_id(col: VectorCollection, item_id: str) -> np.ndarray:
    """The stored vector ``(1, dim)`` of ``item_id``."""
    ids, vectors, _ = col.get([item_id], vectors=True)
    if not ids:
        raise NotFoundError(f"no item {item_id!r} in collection {col.name!r}: ids look like '{_example_id(col)}'")
    assert vectors is not None
    return vectors[:1]


def _example_id(col: VectorCollection) -> str:
    return col.first_id() or "dataset:split:index"


def build_where(record: dict[str, Any], labels: Sequence[int | str] | None, split: str | None) -> dict[str, Any] | None:
    """A Chroma ``where`` filter for labels and split; unknown labels or splits raise InputError."""
    clauses: list[dict[str, Any]] = []
    if labels:
        ids = resolve_labels(record.get("label_names", []), labels)
        clauses.append({"label": ids[0]} if len(ids) == 1 else {"label": {"$in": ids}})
    if split is not None:
        if split not in SPLITS:
            raise InputError(f"--split {split!r} is not one of {', '.join(SPLITS)}")
        clauses.append({"split": split})
    if not clauses:
        return None
    return clauses[0] if len(clauses) == 1 else {"$and": clauses}


def resolve_labels(names: Sequence[str], labels: Sequence[int | str]) -> list[int]:
    """Label ints from ints or names (``3``, ``"3"``, ``"Sneaker"``); unknown ones raise InputError."""
    out: list[int] = []
    for lab in labels:
        text = str(lab).strip()
        if text in names:
            out.append(list(names).index(text))
        elif text.lstrip("-").isdigit() and 0 <= int(text) < len(names):
            out.append(int(text))
        else:
            shown = ", ".join(f"{i}={n}" if n != str(i) else n for i, n in enumerate(names))
            raise InputError(f"label {text!r} is not in this collection: choose from {shown}")
    return sorted(set(out))


def save_picture(
    hits: Sequence[Hit],
    out: str | os.PathLike[str],
    *,
    image: str | os.PathLike[str] | np.ndarray | None = None,
    id: str | None = None,
    collection: str | None = None,
    db: str | None = None,
) -> Path:
    """Write a PNG of the query beside its neighbours, each titled with its label and distance."""
    from lookalike.plots import neighbours_figure, save_figure

    col = Store(db).open(collection)
    protocol = col.record["protocol"]
    metas = [h.metadata for h in hits]
    if id is not None:
        ids, _, qmeta = col.get([id])
        if not ids:
            raise NotFoundError(f"no item {id!r} in collection {col.name!r}")
        query_img = load_images_by_metadata(protocol, qmeta)[0]
        query_title = f"query {qmeta[0]['label_name']}"
    else:
        query_img = read_image_file(image) if not isinstance(image, np.ndarray) else image
        query_title = "query"
    images = load_images_by_metadata(protocol, metas)
    titles = [f"{h.label_name}  d={h.distance:.3f}" for h in hits]
    fig = neighbours_figure(query_img, query_title, images, titles)
    return save_figure(fig, out)
