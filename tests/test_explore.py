from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lookalike.analysis.explore import cluster, cluster_scores, embedding_map, project, read_points, save_coords, save_disagreement_picture
from lookalike.core.gallery import Gallery
from lookalike.errors import InputError, LookalikeError


def blobs(n_per: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.array([[0, 0], [50, 0], [0, 50]], dtype=float)
    labels = np.repeat(np.arange(3), n_per)
    return centres[labels] + rng.normal(0, 1, (len(labels), 2)), labels


def test_perfect_clusters_score_one_whatever_their_numbering() -> None:
    x, labels = blobs()
    clusters = (labels + 1) % 3  # right grouping, other ids
    sil, n, ari, nmi, acc, mapping = cluster_scores(x, labels, clusters)
    assert acc == 1.0 and ari == pytest.approx(1.0) and nmi == pytest.approx(1.0)
    assert sil > 0.9 and n == 60
    assert mapping == {1: 0, 2: 1, 0: 2}


def test_cluster_accuracy_matches_by_hungarian_method() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    clusters = np.array([5, 5, 7, 7, 7, 7, 9, 9])
    _, _, ari, _, acc, mapping = cluster_scores(np.arange(16.0).reshape(8, 2), labels, clusters)
    assert acc == pytest.approx(7 / 8) and mapping == {5: 0, 7: 1, 9: 2}
    from sklearn.metrics import adjusted_rand_score

    assert ari == pytest.approx(adjusted_rand_score(labels, clusters)) and ari != pytest.approx(1.0)


@pytest.mark.slow  # ~13 s: t-SNE and UMAP
def test_projection_methods_and_seed() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((60, 64), dtype=np.float32)
    assert project(x, "pca").shape == (60, 2)
    a, b = project(x, "tsne", seed=3), project(x, "tsne", seed=3)
    assert a.shape == (60, 2) and np.allclose(a, b)  # same seed, same map
    with pytest.raises(InputError, match="--method"):
        project(x, "mds")


def test_umap_without_the_extra_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "umap", None)  # import umap -> ImportError
    with pytest.raises(LookalikeError, match=r"pip install 'lookalike\[umap\]'"):
        project(np.random.default_rng(0).random((30, 8)), "umap")


def test_map_reads_the_store_and_writes_coordinates(gallery: Gallery, tmp_path: Path) -> None:
    r = embedding_map(gallery, method="pca")
    assert r.coords.shape == (250, 2) and len(r.points.ids) == 250
    s = embedding_map(gallery, method="tsne", sample=60, split="train", seed=1)
    assert len(s.points.ids) == 60 and set(np.bincount(s.points.labels)) == {6}
    assert all(m["split"] == "train" for m in s.points.metadatas)
    again = embedding_map(gallery, method="tsne", sample=60, split="train", seed=1)
    assert again.points.ids == s.points.ids and np.allclose(again.coords, s.coords)
    path = save_coords(s, tmp_path / "c.csv")
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 60 and rows[0]["id"] == s.points.ids[0] and float(rows[0]["x"]) == pytest.approx(s.coords[0, 0], rel=1e-4)
    with pytest.raises(InputError, match="--split"):
        embedding_map(gallery, split="val")


def test_map_and_clusters_sample_by_default_and_say_so(gallery: Gallery, monkeypatch: pytest.MonkeyPatch) -> None:
    """A large collection is mapped and clustered on a seeded sample of explore.SAMPLE items (0: all), and says so."""
    import importlib

    monkeypatch.setattr(importlib.import_module("lookalike.analysis.explore"), "SAMPLE", 100)
    r = embedding_map(gallery, method="pca")
    assert len(r.points.ids) == 100 and r.points.total == 250 and r.points.sampled
    assert len(embedding_map(gallery, method="pca", sample=0).points.ids) == 250
    c = cluster(gallery, k=10)
    assert c.n_items == 100 and c.points.sampled
    with pytest.raises(InputError, match="at least 3"):
        read_points(gallery, sample=2)


def test_clusters_on_separable_digits(gallery: Gallery, tmp_path: Path) -> None:
    r = cluster(gallery, k=10)
    assert r.n_items == 250 and r.cluster_accuracy == 1.0 and r.adjusted_rand == pytest.approx(1.0)
    assert len(r.disagreeing()) == 0 and r.to_dict()["n_disagreeing"] == 0
    on_map = cluster(gallery, k=10, on="map", method="pca")
    from scipy.optimize import linear_sum_assignment
    from sklearn.cluster import KMeans

    coords = project(r.points.vectors, "pca", 0)  # the same map, clustered and matched by hand
    found = KMeans(n_clusters=10, n_init=10, random_state=0).fit_predict(coords)
    table = np.zeros((10, 10), int)
    np.add.at(table, (found, r.points.labels), 1)
    rows, cols = linear_sum_assignment(-table)
    assert on_map.on == "map" and on_map.cluster_accuracy == pytest.approx(table[rows, cols].sum() / 250)
    few = cluster(gallery, k=3)  # 10 classes in 3 clusters: many disagree
    assert len(few.disagreeing()) >= 250 - 3 * 25 - 10
    out = save_disagreement_picture(gallery, few, tmp_path / "g.png")
    with Image.open(out) as im:
        assert im.format == "PNG"
    with pytest.raises(InputError, match="--k"):
        cluster(gallery, k=1)
    with pytest.raises(InputError, match="--on"):
        cluster(gallery, on="pixels")
