"""The ``lookalike`` command line: each command parses options, calls one library function, prints.

Library errors (:class:`~lookalike.errors.LookalikeError`) become one line on stderr and a non-zero
exit code; no traceback reaches the user.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, Optional, TypeVar

import typer

from lookalike.errors import LookalikeError

app = typer.Typer(
    name="lookalike",
    help="Image similarity search: embed images with VGG16 into a persistent Chroma store, search it, evaluate it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
T = TypeVar("T")

DbOpt = Annotated[Optional[str], typer.Option("--db", help="Store directory or http://HOST:PORT of `chroma run` [default: $LOOKALIKE_DB or ./lookalike-db]")]
CollectionOpt = Annotated[Optional[str], typer.Option("--collection", "-c", help="Collection name (optional when the store has one)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table")]
SampleOpt = Annotated[Optional[int], typer.Option(help="Use a seeded, stratified sample of N items")]
DatasetArg = Annotated[str, typer.Argument(help="mnist, fashion-mnist, mnist-sample (offline) or folder")]
PathArg = Annotated[Optional[str], typer.Argument(help="For 'folder': a directory with one subfolder per label")]
SourceOpt = Annotated[Optional[str], typer.Option(help="A local .npz in Keras's layout [default: $LOOKALIKE_MNIST, else download]")]
SplitOpt = Annotated[Optional[str], typer.Option(help="Only train (indexed) or test (held-out) items")]


def _fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a library call, turning library errors into a one-line message and exit code."""
    try:
        return fn(*args, **kwargs)
    except LookalikeError as exc:
        raise _fail(str(exc), exc.exit_code) from None


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details")] = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s: %(message)s")


@contextmanager
def _progress_bar(label: str, unit: str = "img/s") -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar (rate and ETA) on stderr, fed by ``progress(done, total)`` calls."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = Console(stderr=True)
    bar = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:>7} " + unit), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=console, transient=False, disable=not console.is_terminal,
    )  # fmt: skip
    task = None
    started = time.perf_counter()

    def update(done: int, total: int) -> None:
        nonlocal task
        if task is None:
            task = bar.add_task(label, total=total, rate="-")
        rate = done / max(time.perf_counter() - started, 1e-9)
        bar.update(task, completed=done, rate=f"{rate:.0f}")

    with bar:
        yield update


@app.command()
def ingest(
    dataset: DatasetArg,
    path: PathArg = None,
    source: SourceOpt = None,
    limit: Annotated[Optional[int], typer.Option(help="Use only N items (mnist: the first N training images)")] = None,
    test_size: Annotated[Optional[float], typer.Option(help="Hold out N items (or a fraction below 1) for evaluation")] = None,
    seed: Annotated[int, typer.Option(help="Seed for random weights and stratified sampling")] = 0,
    embedder: Annotated[str, typer.Option(help="vgg16 or pixels (raw-pixel baseline)")] = "vgg16",
    weights: Annotated[str, typer.Option(help="imagenet (downloads once), random (seeded) or a weights FILE")] = "imagenet",
    layer: Annotated[str, typer.Option(help="VGG16 layer to read features from")] = "block4_pool",
    pooling: Annotated[str, typer.Option(help="max, avg (global pooling) or flatten")] = "max",
    normalize: Annotated[Optional[str], typer.Option(help="l2 or none [default: l2 for vgg16, none for pixels]")] = None,
    input_size: Annotated[Optional[int], typer.Option(help="Side in pixels images are resized to (VGG16: >= 32) [default: 32; pixels: 28]")] = None,
    precision: Annotated[Optional[str], typer.Option(help="VGG16 compute: float32 or bfloat16 [default: bfloat16 where the CPU has it natively]")] = None,
    model: Annotated[Optional[str], typer.Option(help="Embed with a MODEL.keras written by `lookalike train` (replaces --embedder and the VGG16 options)")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per embed-and-write batch")] = 256,
    collection: CollectionOpt = None,
    db: DbOpt = None,
) -> None:
    """Embed a dataset into a collection; resumable, and a rerun adds nothing."""
    from lookalike.ingest import ingest as run_ingest

    try:
        with _progress_bar(f"embedding {dataset}") as progress:
            report = _call(
                run_ingest, dataset, path, source=source, limit=limit, test_size=test_size, seed=seed,
                embedder=embedder, weights=weights, layer=layer, pooling=pooling, normalize=normalize,
                input_size=input_size, precision=precision, model=model, batch_size=batch_size, collection=collection, db=db, progress=progress,
            )  # fmt: skip
    except KeyboardInterrupt:
        raise _fail("interrupted: what was written is kept; run the same command again to resume", 130) from None
    added = ", ".join(f"{k} {v}" for k, v in report.added.items())
    stored = ", ".join(f"{k} {v}" for k, v in report.stored.items())
    typer.echo(f"collection {report.collection!r} in {report.db}: {report.dataset} with {report.embedder}")
    typer.echo(f"  added   {added} (already stored: {report.already_stored})")
    typer.echo(f"  stored  {stored}")
    typer.echo(f"  time    {report.seconds:.1f} s, {report.images_per_s:.0f} images/s")
    if report.skipped:
        shown = ", ".join(report.skipped[:5]) + (" ..." if len(report.skipped) > 5 else "")
        typer.echo(f"  skipped {len(report.skipped)} unreadable files: {shown}")


@app.command()
def search(
    image: Annotated[Optional[str], typer.Option(help="Query by an image file (any size or mode)")] = None,
    id: Annotated[Optional[str], typer.Option("--id", help="Query by a stored item's id (it is never returned)")] = None,
    k: Annotated[int, typer.Option("--k", "-k", help="Number of neighbours")] = 5,
    label: Annotated[Optional[list[str]], typer.Option("--label", help="Keep only this label (repeatable; int or name)")] = None,
    split: Annotated[Optional[str], typer.Option(help="Keep only train (indexed) or test (held-out) items")] = None,
    collection: CollectionOpt = None,
    db: DbOpt = None,
    as_json: JsonOpt = False,
    save: Annotated[Optional[str], typer.Option(help="Write a PNG of the query beside its neighbours")] = None,
) -> None:
    """Find the nearest stored items to an image file or a stored id."""
    from lookalike.search import save_picture
    from lookalike.search import search as run_search

    hits = _call(run_search, image=image, id=id, k=k, labels=label, split=split, collection=collection, db=db)
    if save:
        path = _call(save_picture, hits, save, image=image, id=id, collection=collection, db=db)
    if as_json:
        typer.echo(json.dumps([h.to_dict() for h in hits], indent=2))
    else:
        typer.echo(f"{'rank':>4}  {'id':<28} {'label':<12} {'distance':>9}")
        for h in hits:
            typer.echo(f"{h.rank:>4}  {h.id:<28} {h.label_name:<12} {h.distance:>9.4f}")
        if not hits:
            typer.echo("no items match the filters")
    if save:
        typer.echo(f"saved {path}", err=as_json)


@app.command()
def evaluate(
    k: Annotated[int, typer.Option("--k", "-k", help="Neighbours in the majority vote (1-NN by default)")] = 1,
    collection: CollectionOpt = None,
    db: DbOpt = None,
    as_json: JsonOpt = False,
    plot: Annotated[Optional[str], typer.Option(help="Write the confusion matrix as a PNG")] = None,
    errors: Annotated[Optional[str], typer.Option(help="Write a PNG gallery of misclassified held-out items beside their nearest neighbour")] = None,
) -> None:
    """Held-out k-NN accuracy through the store, with an exact-search audit."""
    from lookalike.evaluate import evaluate as run_evaluate
    from lookalike.evaluate import save_confusion_picture, save_errors_picture

    r = _call(run_evaluate, k=k, collection=collection, db=db)
    saved = []
    if plot:
        saved.append(_call(save_confusion_picture, r, plot))
    if errors:
        saved.append(_call(save_errors_picture, r, errors, db=db))
    for path in saved:
        typer.echo(f"saved {path}", err=as_json)
    if as_json:
        typer.echo(json.dumps(r.to_dict(), indent=2))
        return
    typer.echo(f"collection {r.collection!r}: {r.embedder}")
    rows = [
        (f"{r.k}-NN accuracy", f"{r.accuracy:.4f}  ({r.n_queries} held-out queries, {r.n_indexed} indexed)"),
        ("exact accuracy", f"{r.exact_accuracy:.4f}  (brute force over the stored vectors)"),
        ("recall@1", f"{r.recall_at_1:.4f}  (store answer = exact nearest neighbour)"),
        ("speed", f"{r.queries_per_s:.0f} queries/s ({r.query_seconds:.2f} s of queries, {r.seconds:.2f} s in all)"),
        ("per class", "  ".join(f"{n}: {a:.3f}" for n, a in r.per_class.items())),
    ]
    for title, value in rows:
        typer.echo(f"  {title:<16} {value}")
    width = max(5, max(len(n) for n in r.label_names) if r.label_names else 5)
    names = r.label_names or [str(i) for i in range(len(r.confusion))]
    typer.echo("  confusion (rows: true, columns: predicted)")
    typer.echo("  " + " " * width + "".join(f"{n[:6]:>7}" for n in names))
    for n, row in zip(names, r.confusion):
        typer.echo(f"  {n:>{width}}" + "".join(f"{v:>7}" for v in row))


@app.command("map")
def map_(
    out: Annotated[str, typer.Option(help="PNG file for the map")],
    method: Annotated[str, typer.Option(help="tsne, umap (pip install 'lookalike[umap]') or pca")] = "tsne",
    sample: SampleOpt = None,
    split: SplitOpt = None,
    seed: Annotated[int, typer.Option(help="Seed: same seed, same picture")] = 0,
    coords: Annotated[Optional[str], typer.Option(help="Also write id,label,label_name,split,x,y to this CSV")] = None,
    collection: CollectionOpt = None,
    db: DbOpt = None,
) -> None:
    """Draw the embedding space in 2-D, coloured by label."""
    from lookalike.explore import embedding_map, save_coords, save_map_picture

    r = _call(embedding_map, method=method, sample=sample, split=split, seed=seed, collection=collection, db=db)
    path = _call(save_map_picture, r, out)
    typer.echo(f"saved {path} ({len(r.points.ids)} points, {r.method}, {r.seconds:.1f} s)")
    if coords:
        typer.echo(f"saved {_call(save_coords, r, coords)}")


@app.command()
def clusters(
    k: Annotated[int, typer.Option("--k", "-k", help="Number of k-means clusters")] = 10,
    on: Annotated[str, typer.Option(help="Cluster the embedding vectors or the 2-D map")] = "embedding",
    method: Annotated[str, typer.Option(help="Map method when --on map: tsne, umap or pca")] = "tsne",
    sample: SampleOpt = None,
    split: SplitOpt = None,
    seed: Annotated[int, typer.Option(help="Seed for sampling, the map and k-means")] = 0,
    out: Annotated[Optional[str], typer.Option(help="PNG gallery of items whose cluster disagrees with their label")] = None,
    collection: CollectionOpt = None,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """k-means clusters against the labels: silhouette, ARI, NMI and Hungarian-matched cluster accuracy."""
    from lookalike.explore import cluster, save_disagreement_picture

    r = _call(cluster, k=k, on=on, method=method, sample=sample, split=split, seed=seed, collection=collection, db=db)
    if out:
        typer.echo(f"saved {_call(save_disagreement_picture, r, out)}", err=as_json)
    if as_json:
        typer.echo(json.dumps(r.to_dict(), indent=2))
        return
    typer.echo(f"collection {r.collection!r}: k-means, k={r.k}, on the {r.on} of {r.n_items} items ({r.seconds:.1f} s)")
    typer.echo(f"  cluster accuracy  {r.cluster_accuracy:.4f}  (clusters matched to labels, Hungarian)")
    typer.echo(f"  silhouette        {r.silhouette:.4f}  (on {r.silhouette_sample} items)")
    typer.echo(f"  adjusted Rand     {r.adjusted_rand:.4f}")
    typer.echo(f"  normalised MI     {r.normalized_mutual_info:.4f}")
    typer.echo(f"  disagreeing       {len(r.disagreeing())} items")


@app.command()
def compare(
    dataset: DatasetArg,
    path: PathArg = None,
    embedder: Annotated[Optional[list[str]], typer.Option("--embedder", help="SPEC name[:key=value,...], repeatable: pixels, vgg16, vgg16:layer=block3_pool,pooling=flatten, model:FILE.keras")] = None,
    source: SourceOpt = None,
    limit: Annotated[Optional[int], typer.Option(help="Use only N items")] = None,
    test_size: Annotated[Optional[float], typer.Option(help="Hold out N items (or a fraction below 1)")] = None,
    seed: Annotated[int, typer.Option(help="Seed for random weights and sampling")] = 0,
    weights: Annotated[str, typer.Option(help="Default VGG16 weights for SPECs that do not name them")] = "imagenet",
    k: Annotated[int, typer.Option("--k", "-k", help="k of the k-NN column")] = 5,
    batch_size: Annotated[int, typer.Option(help="Images per embed-and-write batch")] = 256,
    out: Annotated[Optional[str], typer.Option(help="PNG bar chart of the accuracies")] = None,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Ingest one dataset with several embedders (reusing collections), evaluate each, print one table."""
    from lookalike.compare import compare as run_compare
    from lookalike.compare import save_compare_picture

    with _progress_bar("embedding") as progress:
        r = _call(run_compare, dataset, path, embedders=list(embedder or []), source=source, limit=limit,
                  test_size=test_size, seed=seed, weights=weights, k=k, batch_size=batch_size, db=db, progress=progress)  # fmt: skip
    if out:
        typer.echo(f"saved {_call(save_compare_picture, r, out)}", err=as_json)
    if as_json:
        typer.echo(json.dumps(r.to_dict(), indent=2))
        return
    typer.echo(f"{r.dataset} ({r.protocol}), accuracy of held-out items through the store")
    typer.echo(f"{'embedder':<52} {'dim':>6} {'1-NN':>7} {f'{r.k}-NN':>7} {'silh.':>7} {'img/s':>8}")
    for row in r.rows:
        typer.echo(f"{row.embedder:<52} {row.dim:>6} {row.accuracy_1nn:>7.4f} {row.accuracy_knn:>7.4f} "
                   f"{row.silhouette:>7.3f} {row.images_per_s:>8.0f}")  # fmt: skip


@app.command()
def collections(db: DbOpt = None, as_json: JsonOpt = False) -> None:
    """List the collections: name, count, dataset, embedder."""
    from lookalike.store import list_collections

    infos = _call(list_collections, db)
    if as_json:
        typer.echo(json.dumps([{"name": i.name, "count": i.count, "dataset": i.dataset, "embedder": i.embedder,
                                "record": i.record} for i in infos], indent=2))  # fmt: skip
        return
    if not infos:
        typer.echo("no collections")
    for i in infos:
        typer.echo(f"{i.name:<30} {i.count:>8}  {i.dataset:<14} {i.embedder}")


@app.command()
def drop(name: Annotated[str, typer.Argument(help="Collection to delete")], db: DbOpt = None) -> None:
    """Delete a collection."""
    from lookalike.store import drop_collection

    _call(drop_collection, name, db)
    typer.echo(f"dropped {name!r}")


@app.command()
def quickstart(
    db: DbOpt = None,
    out: Annotated[str, typer.Option(help="Where to save the search picture")] = "lookalike-quickstart.png",
    offline: Annotated[bool, typer.Option(help="Do not try to download MNIST or ImageNet weights")] = False,
    limit: Annotated[int, typer.Option(help="Digits to use (the seed notebook's 5,000)")] = 5000,
    test_size: Annotated[int, typer.Option(help="Digits held out for evaluation (the seed notebook's 1,000)")] = 1000,
) -> None:
    """Ingest, evaluate and search end to end on the best data and weights this machine has."""
    from lookalike.quickstart import quickstart as run_quickstart

    try:
        with _progress_bar("embedding") as progress:
            r = _call(run_quickstart, db=db, out=out, offline=offline, limit=limit, test_size=test_size, progress=progress)
    except KeyboardInterrupt:
        raise _fail("interrupted: run `lookalike quickstart` again to resume", 130) from None
    typer.echo(f"data:     {r.dataset} ({r.ingest.stored.get('train', 0)} indexed, {r.ingest.stored.get('test', 0)} held out)")
    typer.echo(f"weights:  {r.weights}  [{r.ingest.embedder}]")
    for note in r.notes:
        typer.echo(f"note:     {note}")
    typer.echo(f"ingest:   {sum(r.ingest.added.values())} embedded in {r.ingest.seconds:.1f} s into {r.ingest.collection!r} at {r.ingest.db}")
    e = r.evaluation
    typer.echo(f"evaluate: 1-NN accuracy {e.accuracy:.4f} (exact {e.exact_accuracy:.4f}, recall@1 {e.recall_at_1:.4f}, {e.queries_per_s:.0f} queries/s)")
    typer.echo(f"search:   neighbours of {r.query_id}: " + ", ".join(f"{h.id} ({h.label_name})" for h in r.hits))
    typer.echo(f"picture:  {r.picture}")
    typer.echo(f"next:     lookalike search --id {r.query_id} --collection {r.ingest.collection} --db {r.ingest.db}")


@app.command()
def train(
    dataset: DatasetArg,
    path: PathArg = None,
    out: Annotated[str, typer.Option(help="Where to save the model (.keras)")] = "lookalike-model.keras",
    source: SourceOpt = None,
    limit: Annotated[Optional[int], typer.Option(help="Use only N items, as in ingest (held-out items are never trained on)")] = None,
    test_size: Annotated[Optional[float], typer.Option(help="Hold out N items (or a fraction below 1), as in ingest")] = None,
    seed: Annotated[int, typer.Option(help="Seed for weights, sampling, shuffling and augmentation")] = 0,
    weights: Annotated[str, typer.Option(help="Start from imagenet (downloads once), random (seeded) or a VGG16 weights FILE")] = "imagenet",
    layer: Annotated[str, typer.Option(help="VGG16 layer the embedding head sits on")] = "block3_pool",
    precision: Annotated[Optional[str], typer.Option(help="VGG16 compute: float32 or bfloat16 [default: bfloat16 where the CPU has it natively]")] = None,
    dim: Annotated[int, typer.Option(help="Embedding dimension")] = 128,
    epochs: Annotated[int, typer.Option(help="Most epochs (early stopping may end sooner)")] = 12,
    batch_size: Annotated[int, typer.Option(help="Images per training step")] = 64,
    learning_rate: Annotated[float, typer.Option(help="Adam learning rate")] = 3e-4,
    loss: Annotated[str, typer.Option(help="cosine (normalised-softmax classifier) or softmax (plain classifier)")] = "cosine",
    validation: Annotated[float, typer.Option(help="Fraction of the indexed items kept aside for early stopping")] = 0.1,
    patience: Annotated[int, typer.Option(help="Epochs without a better validation loss before stopping")] = 3,
    shift: Annotated[int, typer.Option(help="Augmentation: random shifts of up to N pixels")] = 2,
    dropout: Annotated[float, typer.Option(help="Dropout on the features before the embedding layer")] = 0.3,
    margin: Annotated[float, typer.Option(help="CosFace margin of the cosine loss")] = 0.2,
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Fine-tune VGG16 + an embedding head on the indexed items; then `lookalike ingest ... --model OUT`."""
    from lookalike.train import train as run_train

    def on_epoch(epoch: int, logs: dict[str, float]) -> None:
        shown = "  ".join(f"{k} {v:.4f}" for k, v in logs.items())
        typer.echo(f"epoch {epoch}/{epochs}  {shown}", err=True)

    try:
        with _progress_bar("training (batches)", unit="batch/s") as progress:
            r = _call(
                run_train, dataset, path, out=out, source=source, limit=limit, test_size=test_size, seed=seed,
                weights=weights, layer=layer, precision=precision, dim=dim, epochs=epochs, batch_size=batch_size,
                learning_rate=learning_rate, loss=loss, validation=validation, patience=patience, shift=shift,
                dropout=dropout, margin=margin,
                overwrite=overwrite, on_batch=progress, on_epoch=on_epoch,
            )  # fmt: skip
    except KeyboardInterrupt:
        raise _fail(f"interrupted: no model was written to {out}", 130) from None
    if as_json:
        typer.echo(json.dumps(r.to_dict(), indent=2))
        return
    typer.echo(f"model:    {r.out} ({r.dim}-d, {r.description['weights']} VGG16 {r.description['layer']} + {r.description['head']}, {r.description['loss']} loss)")
    typer.echo(f"data:     {r.dataset}: trained on {r.n_train}, validated on {r.n_validation} (held-out items not used)")
    typer.echo(f"epochs:   {r.epochs_run} run, best {r.best_epoch} (val loss {r.best_val_loss:.4f}, val accuracy {r.best_val_accuracy:.4f})")
    typer.echo(f"time:     {r.seconds:.1f} s")
    typer.echo(f"next:     lookalike ingest {r.dataset} --model {r.out} --collection {r.dataset}-trained ...")


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
