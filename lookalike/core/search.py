"""Search: nearest stored items to an image or to a stored id, filtered by label and split.

A search by id reads the stored vector back (no TensorFlow); a search by image uses the Gallery's
embedder (built from the collection's record). The query item itself is never returned.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lookalike.errors import InputError

if TYPE_CHECKING:
    from lookalike.core.gallery import Gallery

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
        return {
            "rank": self.rank,
            "id": self.id,
            "label": self.label,
            "label_name": self.label_name,
            "split": self.split,
            "distance": self.distance,
            "metadata": self.metadata,
        }


def search(
    gallery: Gallery,
    *,
    image: str | os.PathLike[str] | np.ndarray | None = None,
    id: str | None = None,
    vector: np.ndarray | None = None,
    k: int = 5,
    labels: Sequence[int | str] | None = None,
    split: str | None = None,
    where: dict[str, Any] | None = None,
) -> list[Hit]:
    """The ``k`` nearest items to ``image`` (a file path or a uint8 array), to stored ``id``, or to ``vector``.

    ``labels`` keeps only those labels (ints, or label names); ``split`` only ``"train"`` or
    ``"test"`` items; ``where`` only items whose metadata match it (Chroma's dict form, or
    :func:`lookalike.data.filters.parse_where` of ``--where`` expressions): exact at any selectivity.
    Nearest first; a filter that matches nothing gives no hits.
    """
    if sum(q is not None for q in (image, id, vector)) != 1:
        raise InputError("give exactly one query: --image FILE or --id ID")
    if k < 1:
        raise InputError(f"--k must be at least 1, got {k}")
    gallery.where(labels, split)  # bad labels, split or filter fail before any work (TensorFlow's start included)
    gallery.check_where(where)
    if id is not None:
        query = gallery.vector(id)
    elif vector is not None:
        query = np.asarray(vector, np.float32).reshape(1, -1)
        if not np.isfinite(query).all():
            raise InputError("a query vector must hold finite numbers (no NaN or infinity)")
    else:
        query = gallery.embed([gallery.read_query_image(image)])
    (neighbours,) = gallery.neighbours(query, k, labels=labels, split=split, exclude={id} if id is not None else (), where=where)
    return [
        Hit(
            rank,
            n.id,
            int(n.metadata["label"]),
            gallery.label_name(int(n.metadata["label"])),
            str(n.metadata["split"]),
            n.distance,
            n.metadata,
        )
        for rank, n in enumerate(neighbours, start=1)
    ]


def save_picture(
    gallery: Gallery,
    hits: Sequence[Hit],
    out: str | os.PathLike[str],
    *,
    image: str | os.PathLike[str] | np.ndarray | None = None,
    id: str | None = None,
) -> Path:
    """Write a PNG of the query beside its neighbours, each titled with its label and distance."""
    if id is not None:
        meta, _ = gallery.item(id)
        query_img = gallery.images([meta])[0]
        query_title = f"query {gallery.label_name(int(meta['label']))}"
    else:
        query_img = gallery.read_query_image(image)
        query_title = "query"
    return picture(query_img, query_title, gallery.images([h.metadata for h in hits]), hits, out)


def picture(
    query_img: np.ndarray | None, query_title: str, images: Sequence[np.ndarray | None], hits: Sequence[Hit], out: str | os.PathLike[str]
) -> Path:
    """Write a PNG of ``query_img`` beside the ``images`` of its ``hits``, each titled with its label and distance."""
    from lookalike.analysis.plots import neighbours_figure, save_figure

    titles = [f"{h.label_name}  d={h.distance:.3f}" for h in hits]
    return save_figure(neighbours_figure(query_img, query_title, images, titles), out)
