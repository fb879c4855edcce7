"""Explore a collection's embedding space: 2-D maps (t-SNE, UMAP, PCA) and k-means clusters.

Vectors and labels are read back from the store, never recomputed. Results are dataclasses with
plain arrays; the pictures are drawn by :mod:`lookalike.analysis.plots`.
"""

from __future__ import annotations

import csv
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lookalike.core.gallery import Gallery
from lookalike.data.datasets import SPLITS, stratified_pick
from lookalike.errors import InputError, LookalikeError, StoreError
from lookalike.util import cache_dir as lookalike_cache_dir
from lookalike.util import label_name

log = logging.getLogger(__name__)

METHODS = ("tsne", "umap", "pca")
PCA_DIMS = 50  # t-SNE and UMAP run on the first 50 principal components
SILHOUETTE_SAMPLE = 5000  # silhouette is O(n^2): computed on at most this many items
SAMPLE = 20_000  # map and clusters use a seeded, stratified sample of this many items unless told otherwise (0: all)


@dataclass
class Points:
    """Items read back from a collection: ids, labels ``(n,)``, vectors ``(n, dim)`` and metadata."""

    collection: str
    ids: list[str]
    labels: np.ndarray
    vectors: np.ndarray
    metadatas: list[dict[str, Any]]
    label_names: list[str]
    total: int = 0  # the items the sample was drawn from (== len(ids) when all were read)

    @property
    def sampled(self) -> bool:
        return self.total > len(self.ids)


@dataclass
class MapResult:
    """A 2-D map: ``coords`` ``(n, 2)`` for each item of ``points``."""

    points: Points
    method: str
    seed: int
    coords: np.ndarray
    seconds: float


@dataclass
class ClusterReport:
    """k-means against the labels. ``mapping[c]`` is the label matched to cluster ``c`` (Hungarian)."""

    collection: str
    k: int
    on: str
    n_items: int
    silhouette: float
    silhouette_sample: int
    adjusted_rand: float | None  # None (and no mapping) for an unlabelled collection
    normalized_mutual_info: float | None
    cluster_accuracy: float | None
    mapping: dict[int, int]
    seconds: float
    clusters: np.ndarray = field(repr=False)
    points: Points = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        keys = (
            "collection",
            "k",
            "on",
            "n_items",
            "silhouette",
            "silhouette_sample",
            "adjusted_rand",
            "normalized_mutual_info",
            "cluster_accuracy",
            "seconds",
        )
        out = {key: getattr(self, key) for key in keys}
        out["mapping"] = {str(c): int(lab) for c, lab in self.mapping.items()}
        out["n_disagreeing"] = len(self.disagreeing())
        out["n_total"] = self.points.total or self.n_items  # the items a (default) sample was drawn from
        return out

    def disagreeing(self) -> np.ndarray:
        """Indices of items whose cluster's matched label differs from their own label."""
        if not self.mapping:
            return np.array([], dtype=int)
        matched = np.array([self.mapping.get(int(c), -1) for c in self.clusters])
        return np.flatnonzero(matched != self.points.labels)


def read_points(gallery: Gallery, *, sample: int | None = None, split: str | None = None, seed: int = 0) -> Points:
    """Vectors and labels of a collection (``split`` only): a seeded stratified ``sample`` of them (default
    :data:`SAMPLE`, so a map of a million items costs what one of 20,000 does), or all with ``sample=0``."""
    if split is not None and split not in SPLITS:
        raise InputError(f"--split {split!r} is not one of {', '.join(SPLITS)}")
    if sample is not None and sample < 3 and sample != 0:
        raise InputError(f"--sample must be at least 3 (or 0: every item), got {sample}")
    sample = SAMPLE if sample is None else sample or None
    # ids and labels first (listed, no metadata read: a million items' metadata is a gigabyte), then the sample's
    # vectors and metadata
    listed = gallery.listed_labels()
    ids = gallery.ids(split)
    if len(ids) < 3:
        raise InputError(f"collection {gallery.name!r} has {len(ids)} items{' in split ' + split if split else ''}: need at least 3")
    labels = gallery.labels_of(ids, listed)
    order = np.argsort(ids, kind="stable")  # Chroma's page order is not guaranteed: sort for reproducibility
    if sample is not None and sample < len(ids):
        order = order[stratified_pick(labels[order], sample, seed)]
    chosen = [ids[i] for i in order]
    vectors, chosen_metas = _read_in_order(gallery, chosen)
    return Points(gallery.name, chosen, labels[order], vectors, chosen_metas, gallery.label_names, len(ids))


def _read_in_order(gallery: Gallery, ids: list[str]) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """The vectors ``(len(ids), dim)`` and metadatas of ``ids``, in that order; StoreError when some are gone."""
    got_ids, got_vectors, got_metas = gallery.get(ids, vectors=True)
    row = {id_: j for j, id_ in enumerate(got_ids)}
    if len(row) != len(ids) or got_vectors is None:
        raise StoreError(f"collection {gallery.name!r} lost items while they were read: run `lookalike check --collection {gallery.name}`")
    order = [row[i] for i in ids]
    return got_vectors[order], [got_metas[j] for j in order]


def project(vectors: np.ndarray, method: str = "tsne", seed: int = 0) -> np.ndarray:
    """2-D coordinates ``(n, 2)`` of ``vectors`` ``(n, dim)``; PCA to 50 dimensions first for t-SNE/UMAP."""
    if method not in METHODS:
        raise InputError(f"--method {method!r} is not one of {', '.join(METHODS)}")
    from sklearn.decomposition import PCA

    x = np.asarray(vectors, dtype=np.float32)
    if method == "pca":
        return PCA(n_components=2, random_state=seed).fit_transform(x)
    if x.shape[1] > PCA_DIMS and len(x) > PCA_DIMS:
        x = PCA(n_components=PCA_DIMS, random_state=seed).fit_transform(x)
    if method == "umap":
        try:
            import umap
        except ImportError:
            raise LookalikeError("UMAP is an optional extra: pip install 'lookalike[umap]' (or use --method tsne)") from None
        reducer = umap.UMAP(n_components=2, random_state=seed, n_neighbors=min(15, len(x) - 1))
        with warnings.catch_warnings():  # a seed makes UMAP single-threaded, and it says so
            warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)
            return np.asarray(reducer.fit_transform(x))
    from sklearn.manifold import TSNE

    perplexity = min(30.0, (len(x) - 1) / 3.0)
    return TSNE(n_components=2, init="pca", random_state=seed, perplexity=perplexity, n_jobs=os.cpu_count()).fit_transform(x)


def embedding_map(
    gallery: Gallery, *, method: str = "tsne", sample: int | None = None, split: str | None = None, seed: int = 0
) -> MapResult:
    """A seeded 2-D map of a collection (or a stratified sample of it)."""
    if method not in METHODS:
        raise InputError(f"--method {method!r} is not one of {', '.join(METHODS)}")
    points = read_points(gallery, sample=sample, split=split, seed=seed)
    started = time.perf_counter()
    coords = project(points.vectors, method, seed)
    return MapResult(points, method, seed, coords, time.perf_counter() - started)


def map_cache_dir() -> Path:
    """Where computed maps are kept: ``$LOOKALIKE_CACHE/maps``, else ``$XDG_CACHE_HOME/lookalike/maps`` (``~/.cache``)."""
    return lookalike_cache_dir("maps")


def cached_map(
    gallery: Gallery,
    *,
    method: str = "tsne",
    sample: int | None = None,
    split: str | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[MapResult, bool]:
    """:func:`embedding_map`, computed once per (store, collection and its size, method, sample, split, seed) and then
    read back from ``cache_dir`` (default :func:`map_cache_dir`). Returns (the map, whether it came from the cache).

    A collection that grew or changed its record gets a new map; a cache that cannot be written only costs the
    next computation.
    """
    import hashlib
    import json

    if method not in METHODS:
        raise InputError(f"--method {method!r} is not one of {', '.join(METHODS)}")
    sample = SAMPLE if sample is None else sample  # (so a default map and one of every item are cached apart)
    ident = json.dumps([gallery.db, gallery.name, gallery.count(), gallery.record.to_json(), method, sample, split, seed])
    path = Path(cache_dir or map_cache_dir()) / f"{gallery.name}-{method}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as f:
                ids, coords, seconds = [str(i) for i in f["ids"]], f["coords"], float(f["seconds"])
                total = int(f["total"]) if "total" in f.files else len(ids)
            vectors, metas = _read_in_order(gallery, ids)  # (items gone since: StoreError, and the map is made again)
            labels = np.array([int(m["label"]) for m in metas])
            points = Points(gallery.name, ids, labels, vectors, metas, gallery.label_names, total)
            return MapResult(points, method, seed, coords, seconds), True
        except Exception as exc:  # a damaged or foreign cache file (zip, npy or key errors), or lost items: compute the map again
            log.warning("ignoring the cached map %s (%s)", path, exc)
    result = embedding_map(gallery, method=method, sample=sample, split=split, seed=seed)
    try:
        import tempfile

        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp.npz")  # each writer its own file
        with os.fdopen(fd, "wb") as f:
            np.savez(f, ids=np.array(result.points.ids), coords=result.coords, seconds=result.seconds, total=result.points.total)
        os.replace(tmp, path)  # whole or not at all
    except OSError as exc:
        log.warning("cannot keep the map in %s (%s): it will be computed again next time", path.parent, exc)
    return result, False


def save_map_picture(result: MapResult, out: str | os.PathLike[str]) -> Path:
    """Write the map as a PNG scatter coloured by label, titled with collection, method and point count."""
    from lookalike.analysis.plots import map_figure, save_figure

    method = {"tsne": "t-SNE", "umap": "UMAP", "pca": "PCA"}[result.method]
    title = f"{result.points.collection}: {method} of {len(result.points.ids)} points (seed {result.seed})"
    return save_figure(map_figure(result.coords, result.points.labels, result.points.label_names, title), out)


def save_coords(result: MapResult, path: str | os.PathLike[str]) -> Path:
    """Write ``id,label,label_name,split,x,y`` rows to a CSV file."""
    out = Path(path).expanduser()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "label", "label_name", "split", "x", "y"])
            names = result.points.label_names
            for i, (id_, lab, meta) in enumerate(zip(result.points.ids, result.points.labels, result.points.metadatas)):
                w.writerow(
                    [
                        id_,
                        int(lab),
                        label_name(names, int(lab)),
                        meta.get("split", ""),
                        f"{result.coords[i, 0]:.6g}",
                        f"{result.coords[i, 1]:.6g}",
                    ]
                )
    except OSError as exc:
        raise InputError(f"cannot write {out} ({exc.strerror or exc}): choose a writable path") from None
    return out


def cluster_scores(
    features: np.ndarray, labels: np.ndarray, clusters: np.ndarray, seed: int = 0
) -> tuple[float, int, float, float, float, dict[int, int]]:
    """(silhouette, its sample size, ARI, NMI, cluster accuracy, cluster->label mapping) of a clustering."""
    from scipy.optimize import linear_sum_assignment
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score

    n_clusters = len(np.unique(clusters))
    sample = min(len(features), SILHOUETTE_SAMPLE)
    sil = (
        float(silhouette_score(features, clusters, sample_size=sample, random_state=seed))
        if 1 < n_clusters < len(features)
        else float("nan")
    )
    cl_values, cl_idx = np.unique(clusters, return_inverse=True)
    lab_values, lab_idx = np.unique(labels, return_inverse=True)
    table = np.zeros((len(cl_values), len(lab_values)), dtype=int)
    np.add.at(table, (cl_idx, lab_idx), 1)
    rows, cols = linear_sum_assignment(-table)
    mapping = {int(cl_values[r]): int(lab_values[c]) for r, c in zip(rows, cols)}
    accuracy = float(table[rows, cols].sum() / len(labels))
    return (
        sil,
        sample,
        float(adjusted_rand_score(labels, clusters)),
        float(normalized_mutual_info_score(labels, clusters)),
        accuracy,
        mapping,
    )


def cluster(
    gallery: Gallery,
    *,
    k: int = 10,
    on: str = "embedding",
    method: str = "tsne",
    sample: int | None = None,
    split: str | None = None,
    seed: int = 0,
) -> ClusterReport:
    """k-means with ``k`` clusters on the vectors (``on="embedding"``) or on a 2-D map (``on="map"``)."""
    if k < 2:
        raise InputError(f"--k must be at least 2, got {k}")
    if on not in ("embedding", "map"):
        raise InputError(f"--on {on!r} is not one of embedding, map")
    points = read_points(gallery, sample=sample, split=split, seed=seed)
    if k > len(points.ids):
        raise InputError(f"--k {k} is more than the {len(points.ids)} items")
    from sklearn.cluster import KMeans

    started = time.perf_counter()
    features = project(points.vectors, method, seed) if on == "map" else points.vectors
    clusters = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(features)
    sil, n_sil, ari, nmi, acc, mapping = cluster_scores(features, points.labels, clusters, seed)
    if not gallery.record.labelled:  # nothing to compare the clusters with: only their own shape (silhouette)
        ari = nmi = acc = None
        mapping = {}
    return ClusterReport(
        points.collection, k, on, len(points.ids), sil, n_sil, ari, nmi, acc, mapping, time.perf_counter() - started, clusters, points
    )


def save_disagreement_picture(gallery: Gallery, report: ClusterReport, out: str | os.PathLike[str], limit: int = 48) -> Path:
    """A gallery of items whose cluster's matched label differs from their label ("label -> cluster's label")."""
    from lookalike.analysis.plots import gallery_figure, save_figure

    pts = report.points
    idx = report.disagreeing()
    shown = idx[:limit]
    images = gallery.images([pts.metadatas[i] for i in shown]) if len(shown) else []
    name = gallery.label_name
    titles = [f"{name(int(pts.labels[i]))} -> {name(report.mapping.get(int(report.clusters[i]), -1))}" for i in shown]
    title = f"{len(shown)} of {len(idx)} items whose cluster disagrees with their label (label -> cluster's label)"
    return save_figure(gallery_figure(images, titles, title), out)
