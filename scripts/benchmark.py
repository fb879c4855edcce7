"""Benchmark lookalike end to end on MNIST, each figure beside a baseline measured in the same run.

    python scripts/benchmark.py --source ../shared/datasets/mnist.npz [--limit N] [--json FILE]

Without ``--limit``: the 70,000 digits, official split (60,000 indexed, 10,000 held out). With it: the
first N training digits, N/7 of them held out (quick runs). Seeded random VGG16 weights throughout.
Rows: embedding throughput (ours vs the notebook's one ``model.predict`` over an array), Chroma
writes (ours vs a plain ``collection.add`` loop), the ``lookalike ingest`` wall time and peak RSS
(and its growth from a 10,000-digit run), evaluation through the store vs sklearn
``NearestNeighbors`` and exact NumPy search, and label-filtered / by-id search latency.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ["LOOKALIKE_RUNTIME"] = "tensorflow"  # the notebook's baseline below calls the Keras model itself
EMBED_SAMPLE = 5000  # images for the embedding-throughput rows
FILTERED_QUERIES = 200
BY_ID_QUERIES = 50


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import chromadb
    import keras
    import sklearn
    import tensorflow as tf

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "chromadb": chromadb.__version__,
        "scikit-learn": sklearn.__version__,
        "platform": platform.platform(),
    }


def peak_gflops(n: int = 4096, repeats: int = 5) -> dict[str, float]:
    """Best float32 GFLOP/s of an n x n matrix product: NumPy's BLAS and TensorFlow's (oneDNN), all cores."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    a, b = rng.random((n, n), dtype=np.float32), rng.random((n, n), dtype=np.float32)
    ta, tb = tf.constant(a), tf.constant(b)
    out = {}
    for name, fn in (("numpy", lambda: a @ b), ("tensorflow", lambda: tf.linalg.matmul(ta, tb).numpy())):
        fn()
        out[name] = 2 * n**3 / min(_timed(fn) for _ in range(repeats)) / 1e9
    out["peak"] = max(out.values())
    return out


def _timed(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def model_macs(spec: Any) -> float:
    """Multiply-adds per image of the VGG16 convolutions up to ``spec.layer``."""
    from lookalike.models.embedder import VGG16_LAYERS

    macs, side, c_in = 0.0, spec.input_size, 3
    for name, (c_out, _pools) in VGG16_LAYERS.items():
        if "conv" in name:
            macs += side * side * c_in * c_out * 9
            c_in = c_out
        else:
            side //= 2
        if name == spec.layer:
            break
    return macs


def embedding_rows(images: list[np.ndarray], peak: float) -> dict[str, Any]:
    """Our embed path (default precision, batches of 256) vs the notebook's single float32 ``model.predict``."""
    from keras.applications.vgg16 import preprocess_input

    from lookalike.data.images import resize
    from lookalike.models.embedder import VGG16Embedder, make_spec

    spec = make_spec("vgg16", weights="random")  # bfloat16 where the CPU has it natively
    ours = VGG16Embedder(spec)
    ours.embed(images[:16])
    t = time.perf_counter()
    v_ours = np.concatenate([ours.embed(images[i : i + 256]) for i in range(0, len(images), 256)])
    ours_s = time.perf_counter() - t

    model = VGG16Embedder(make_spec("vgg16", weights="random", precision="float32"))._model  # same weights, float32
    t = time.perf_counter()
    x = preprocess_input(np.stack([resize(im, spec.input_size, "RGB") for im in images]))
    feats = model.predict(x, verbose=0)  # the notebook: one predict over the whole array, default batch
    pooled = feats.max(axis=(1, 2))
    v_nb = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
    nb_s = time.perf_counter() - t
    flops = 2 * model_macs(spec)
    return {
        "images": len(images),
        "precision": spec.precision,
        "ours_images_per_s": len(images) / ours_s,
        "notebook_images_per_s": len(images) / nb_s,
        "ratio": nb_s / ours_s,
        "max_abs_vector_difference": float(np.abs(v_ours - v_nb).max()),
        "min_cosine_to_notebook": float((v_ours * v_nb).sum(1).min()),
        "gflop_per_image": flops / 1e9,
        "ours_fraction_of_float32_peak": len(images) / ours_s * flops / (peak * 1e9),
    }


def run_ingest(source: str, db: Path, limit: int | None) -> dict[str, Any]:
    """``lookalike ingest mnist`` in a child process: wall time and the child's peak RSS."""
    args = [
        sys.executable,
        "-c",
        "from lookalike.frontends.cli import main; main()",
        "ingest",
        "mnist",
        "--source",
        source,
        "--weights",
        "random",
        "--db",
        str(db),
    ]
    if limit is not None:
        args += ["--limit", str(limit), "--test-size", str(max(1, limit // 7))]
    t = time.perf_counter()
    out = subprocess.run(args, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t
    if out.returncode != 0:
        raise SystemExit(f"ingest failed: {out.stderr.strip().splitlines()[-1:]}")
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest child so far
    n = limit or 70000
    return {"items": n, "seconds": wall, "images_per_s": n / wall, "peak_rss_mb_so_far": peak_kb / 1024}


def write_rows(ids: list[str], vectors: np.ndarray, metas: list[dict[str, Any]], root: Path) -> dict[str, Any]:
    """Writing the vectors: our ``VectorCollection.add`` (main collection + label partitions, so every
    vector is written twice) vs a plain ``collection.add`` loop of 256 into one collection."""
    from lookalike.core.gallery import Gallery
    from lookalike.core.record import Record
    from lookalike.core.store import Store
    from lookalike.models.embedder import EmbedderSpec

    with Store(str(root / "writes"), create=True) as store:
        names = sorted({str(m["label_name"]) for m in metas}, key=lambda n: int(n) if n.isdigit() else n)
        record = Record(EmbedderSpec(dim=vectors.shape[1]), {"dataset": "mnist"}, names)
        col = Gallery.create(store, "ours", record)  # with label partitions, as ingest
        ours = _timed(lambda: col.add(ids, vectors, metas))
        plain = store._client.create_collection("plain", embedding_function=None, metadata={"hnsw:space": "l2"})

        def loop() -> None:
            for i in range(0, len(ids), 256):
                plain.add(ids=ids[i : i + 256], embeddings=vectors[i : i + 256], metadatas=metas[i : i + 256])

        base = _timed(loop)

    return {"vectors": len(ids), "ours_vectors_per_s": len(ids) / ours, "plain_loop_vectors_per_s": len(ids) / base, "ratio": base / ours}


def evaluation_rows(db: Path) -> dict[str, Any]:
    """10,000 held-out queries through the store vs sklearn NearestNeighbors and exact NumPy search."""
    from sklearn.neighbors import NearestNeighbors

    from lookalike.analysis.evaluate import evaluate
    from lookalike.analysis.metrics import exact_neighbours
    from lookalike.core.gallery import Gallery

    with Gallery.open(db=str(db)) as gallery:
        report = evaluate(gallery)
        _, test, tmeta = gallery.scan("test")
        _, train, rmeta = gallery.scan("train")
    y_test = np.array([m["label"] for m in tmeta])
    y_train = np.array([m["label"] for m in rmeta])
    t = time.perf_counter()
    nn = NearestNeighbors(n_neighbors=1, metric="euclidean").fit(train)
    _, idx = nn.kneighbors(test)
    sk_s = time.perf_counter() - t
    t = time.perf_counter()
    ex_idx, _ = exact_neighbours(test, train, 1)
    ex_s = time.perf_counter() - t
    return {
        "queries": report.n_queries,
        "indexed": report.n_indexed,
        "store_queries_per_s": report.queries_per_s,
        "store_query_seconds": report.query_seconds,
        "evaluate_seconds": report.seconds,
        "recall_at_1": report.recall_at_1,
        "store_accuracy": report.accuracy,
        "sklearn_queries_per_s": len(test) / sk_s,
        "sklearn_accuracy": float((y_train[idx[:, 0]] == y_test).mean()),
        "numpy_exact_queries_per_s": len(test) / ex_s,
        "numpy_exact_accuracy": float((y_train[ex_idx[:, 0]] == y_test).mean()),
    }


def search_rows(db: Path) -> dict[str, Any]:
    """Single label-filtered queries (a random label, ~10% of the items; through the label partitions)
    and ``search(id=...)``: latency, and the filtered answers' recall@5 against exact filtered search."""
    from lookalike.core.gallery import Gallery
    from lookalike.core.search import search

    col = Gallery.open(db=str(db))
    ids, vecs, metas = col.scan()
    labels = np.array([m["label"] for m in metas])
    test = np.flatnonzero(np.array([m["split"] == "test" for m in metas]))
    rng = np.random.default_rng(0)
    picks = rng.choice(test, min(FILTERED_QUERIES, len(test)), replace=False)
    row = {id_: i for i, id_ in enumerate(ids)}
    lat, found = [], 0
    for i in picks:
        label = int(rng.integers(0, 10))
        t = time.perf_counter()
        (got,) = col.neighbours(vecs[i : i + 1], 5, labels=[int(label)])
        lat.append(time.perf_counter() - t)
        d2 = ((vecs - vecs[i]) ** 2).sum(1)
        d2[labels != label] = np.inf
        found += len(set(np.argsort(d2)[:5].tolist()) & {row[n.id] for n in got})
    by_id = [_timed(lambda i=i: search(col, id=ids[i], k=5)) for i in picks[:BY_ID_QUERIES]]
    col.close()
    ms = np.array(lat) * 1000
    return {
        "filtered_queries": len(lat),
        "filtered_p50_ms": float(np.percentile(ms, 50)),
        "filtered_p95_ms": float(np.percentile(ms, 95)),
        "filtered_recall_at_5": found / (5 * len(lat)),
        "by_id_p50_ms": float(np.percentile(np.array(by_id) * 1000, 50)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", required=True, help="MNIST .npz in Keras's layout")
    ap.add_argument("--limit", type=int, default=None, help="Use the first N training digits (N/7 held out)")
    ap.add_argument("--json", default=None, help="Write every figure and the machine to this file")
    ap.add_argument("--workdir", default=None, help="Where the benchmark stores go [default: a temp dir, removed]")
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    started = time.perf_counter()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="lookalike-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        results = _run(args, root)
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    results["total_seconds"] = time.perf_counter() - started
    _print(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def _run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from lookalike.core.gallery import Gallery
    from lookalike.data.datasets import load_dataset

    results: dict[str, Any] = {"machine": machine(), "limit": args.limit}
    peaks = peak_gflops()
    results["peak_float32_gflops"] = peaks
    peak = peaks["peak"]
    ds = load_dataset("mnist", source=args.source)
    sample = [im for im in ds.load(ds.items[:EMBED_SAMPLE]) if isinstance(im, np.ndarray)]
    results["embedding"] = embedding_rows(sample, peak)
    small = min(10000, args.limit or 10000)
    results["ingest_small"] = run_ingest(args.source, root / "db-small", small)
    results["ingest"] = run_ingest(args.source, root / "db", args.limit)
    with Gallery.open(db=str(root / "db")) as gallery:
        ids, vecs, metas = gallery.scan()
    results["writes"] = write_rows(ids, vecs, metas, root)
    results["evaluation"] = evaluation_rows(root / "db")
    results["search"] = search_rows(root / "db")
    return results


def _print(r: dict[str, Any]) -> None:
    m, e, w, ev, s = r["machine"], r["embedding"], r["writes"], r["evaluation"], r["search"]
    print(
        f"machine: {m['cpu']}, {m['cores']} cores; TF {m['tensorflow']}, chromadb {m['chromadb']}; "
        f"peak float32 {r['peak_float32_gflops']['peak']:.0f} GFLOP/s "
        f"(numpy {r['peak_float32_gflops']['numpy']:.0f}, tensorflow {r['peak_float32_gflops']['tensorflow']:.0f})"
    )
    rows = [
        ("embedding (images/s)", e["ours_images_per_s"], "notebook predict", e["notebook_images_per_s"], e["ratio"]),
        ("chroma writes (vectors/s)", w["ours_vectors_per_s"], "add loop of 256", w["plain_loop_vectors_per_s"], w["ratio"]),
        (
            "evaluation (queries/s)",
            ev["store_queries_per_s"],
            "sklearn NearestNeighbors",
            ev["sklearn_queries_per_s"],
            ev["store_queries_per_s"] / ev["sklearn_queries_per_s"],
        ),
        (
            "",
            ev["store_queries_per_s"],
            "exact numpy",
            ev["numpy_exact_queries_per_s"],
            ev["store_queries_per_s"] / ev["numpy_exact_queries_per_s"],
        ),
    ]
    print(f"{'measure':<28}{'ours':>12}  {'baseline':<26}{'theirs':>12}{'ratio':>8}")
    for name, ours, base, theirs, ratio in rows:
        print(f"{name:<28}{ours:>12.0f}  {base:<26}{theirs:>12.0f}{ratio:>8.2f}")
    print(
        f"embedding ({e['precision']}): {e['gflop_per_image']:.3f} GFLOP/image, {100 * e['ours_fraction_of_float32_peak']:.1f}% of the "
        f"float32 peak; max |ours - notebook| = {e['max_abs_vector_difference']:.2e}, min cosine {e['min_cosine_to_notebook']:.6f}"
    )
    i, i0 = r["ingest"], r["ingest_small"]
    print(
        f"lookalike ingest: {i['items']} digits in {i['seconds']:.1f} s ({i['images_per_s']:.0f}/s), peak RSS "
        f"{i['peak_rss_mb_so_far']:.0f} MB; {i0['items']} digits: {i0['seconds']:.1f} s, {i0['peak_rss_mb_so_far']:.0f} MB"
    )
    print(
        f"evaluation: {ev['queries']} queries vs {ev['indexed']}: store {ev['store_query_seconds']:.1f} s "
        f"(evaluate {ev['evaluate_seconds']:.1f} s in all), recall@1 {ev['recall_at_1']:.4f}; 1-NN accuracy store "
        f"{ev['store_accuracy']:.4f}, sklearn {ev['sklearn_accuracy']:.4f}, numpy {ev['numpy_exact_accuracy']:.4f}"
    )
    print(
        f"search: label-filtered single query p50 {s['filtered_p50_ms']:.1f} ms, p95 {s['filtered_p95_ms']:.1f} ms, "
        f"recall@5 {s['filtered_recall_at_5']:.3f}; "
        f"search by id p50 {s['by_id_p50_ms']:.1f} ms"
    )
    print(f"total {r['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
