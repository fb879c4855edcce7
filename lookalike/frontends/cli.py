"""The ``lookalike`` command line: each command parses options, calls one library function, prints.

Library errors (:class:`~lookalike.errors.LookalikeError`) become one line on stderr and a non-zero
exit code; no traceback reaches the user.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any, Optional

import click
import typer

from lookalike.errors import LookalikeError
from lookalike.util import first_line, json_safe

if TYPE_CHECKING:
    from lookalike.core.gallery import Gallery

app = typer.Typer(
    name="lookalike",
    help="Image similarity search: embed images with VGG16 into a persistent Chroma store, search it, evaluate it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DbOpt = Annotated[
    Optional[str],
    typer.Option("--db", help="Store directory or http://HOST:PORT of `chroma run` [default: $LOOKALIKE_DB or ./lookalike-db]"),
]
CollectionOpt = Annotated[Optional[str], typer.Option("--collection", "-c", help="Collection name (optional when the store has one)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table")]
SampleOpt = Annotated[Optional[int], typer.Option(help="Use a seeded, stratified sample of N items [default: 20,000; 0: every item]")]
DatasetArg = Annotated[str, typer.Argument(help="mnist, fashion-mnist, mnist-sample (offline) or folder")]
PathArg = Annotated[Optional[str], typer.Argument(help="For 'folder': a directory with one subfolder per label")]
SourceOpt = Annotated[Optional[str], typer.Option(help="A local .npz in Keras's layout [default: $LOOKALIKE_MNIST, else download]")]
SplitOpt = Annotated[Optional[str], typer.Option(help="Only train (indexed) or test (held-out) items")]
WaitOpt = Annotated[
    Optional[float], typer.Option("--wait", help="Seconds to wait while another process uses a local store [default: fail at once]")
]
EmbedderOpt = Annotated[
    Optional[str],
    typer.Option(
        help="vgg16, resnet50, efficientnetv2b0, convnext_tiny, mobilenetv3large, dinov2_small or pixels (`lookalike models`) "
        "[default: vgg16 for digit-sized images, mobilenetv3large for photos; an existing collection: its own]"
    ),
]
MaxPixelsOpt = Annotated[
    Optional[int], typer.Option("--max-pixels", help="Refuse images of more pixels than this [default: Pillow's 89,478,485]")
]


def _open(collection: str | None, db: str | None, wait: float | None, max_pixels: int | None = None) -> Gallery:
    """The command's one Gallery (a local store's lock is held until it is closed)."""
    from lookalike.core.gallery import Gallery

    return Gallery.open(collection, db, wait=wait, max_pixels=max_pixels)


def _dumps(obj: Any) -> str:
    """JSON for ``--json``: NaN and infinities (an undefined silhouette, an instant query) become null."""
    return json.dumps(json_safe(obj), indent=2, allow_nan=False)


def _fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


INTERRUPTED = {
    "ingest": "interrupted: what was written is kept; run the same command again to resume",
    "sync": "interrupted: what was written is kept; run the same command again to resume",
    "compare": "interrupted: what was written is kept; run the same command again to resume",
    "quickstart": "interrupted: run `lookalike quickstart` again to resume",
}


def command(name: str | None = None) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register a command whose every error ends as one line on stderr and an exit code, never a traceback.

    Library errors carry their own message and code; Ctrl-C exits 130; anything unexpected is one
    line too (``--verbose`` logs where it came from).
    """

    def register(fn: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> None:
            try:
                fn(*args, **kwargs)
            except LookalikeError as exc:
                raise _fail(str(exc), exc.exit_code) from None
            except KeyboardInterrupt:
                raise _fail(INTERRUPTED.get(fn.__name__, "interrupted"), 130) from None
            except (typer.Exit, typer.Abort, click.exceptions.Exit, click.exceptions.Abort, click.exceptions.ClickException):
                raise
            except BrokenPipeError:  # `lookalike ... | head`: the reader left; say nothing more
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                raise typer.Exit(0) from None
            except Exception as exc:  # a bug or an error from a library we did not foresee: still one line
                logging.getLogger("lookalike").info("unexpected error in %s", fn.__name__, exc_info=True)
                raise _fail(f"unexpected {first_line(exc)}; rerun with --verbose for details, and please report it", 1) from None

        return app.command(name)(run)

    return register


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details")] = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s: %(message)s")


@contextmanager
def _progress_bar(label: str, unit: str = "img/s") -> Iterator[Callable[..., None]]:
    """A rich progress bar (rate and ETA) on stderr, fed by ``progress(done, total)`` calls (``note=``: a figure shown
    after it, such as the loss)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = Console(stderr=True)
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:>7} " + unit),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[note]}"),
        console=console,
        transient=False,
        disable=not console.is_terminal,
    )
    task = None
    started = time.perf_counter()

    def update(done: int, total: int, note: str = "") -> None:
        nonlocal task
        if task is None:
            task = bar.add_task(label, total=total, rate="-", note=note)
        rate = done / max(time.perf_counter() - started, 1e-9)
        bar.update(task, completed=done, total=total, rate=f"{rate:.0f}" if rate >= 10 else f"{rate:.2f}", note=note)

    with bar:
        yield update


@command()
def ingest(
    dataset: DatasetArg,
    path: PathArg = None,
    source: SourceOpt = None,
    limit: Annotated[Optional[int], typer.Option(help="Use only N items (mnist: the first N training images)")] = None,
    test_size: Annotated[Optional[float], typer.Option(help="Hold out N items (or a fraction below 1) for evaluation")] = None,
    seed: Annotated[
        Optional[int], typer.Option(help="Seed for random weights and stratified sampling [default: 0, or the collection's]")
    ] = None,
    embedder: EmbedderOpt = None,
    weights: Annotated[
        Optional[str],
        typer.Option(help="imagenet (published weights, downloaded once; dinov2_small: its preset), random (seeded) or a weights FILE"),
    ] = None,
    layer: Annotated[Optional[str], typer.Option(help="VGG16 layer to read features from [default: block4_pool]")] = None,
    pooling: Annotated[
        Optional[str], typer.Option(help="max, avg, flatten (VGG16) or cls (dinov2_small) [default: the backbone's, `lookalike models`]")
    ] = None,
    normalize: Annotated[Optional[str], typer.Option(help="l2 or none [default: l2; pixels: none]")] = None,
    input_size: Annotated[
        Optional[int],
        typer.Option(help="Side in pixels images are resized to [default: by data: 224 for photos, 32 for digit-sized images; pixels: 28]"),
    ] = None,
    fit: Annotated[
        Optional[str],
        typer.Option(help="How a non-square image becomes square: squash, crop (its centre), pad [default: crop for photos, else squash]"),
    ] = None,
    precision: Annotated[
        Optional[str], typer.Option(help="Compute: float32 or bfloat16 [default: bfloat16 where the CPU has it natively]")
    ] = None,
    model: Annotated[
        Optional[str],
        typer.Option(help="Embed with a MODEL.keras written by `lookalike train` (replaces --embedder and the backbone options)"),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per embed-and-write batch")] = 256,
    max_pixels: MaxPixelsOpt = None,
    follow_links: Annotated[bool, typer.Option("--follow-links", help="Follow symbolic links that lead out of a folder")] = False,
    decode_workers: Annotated[Optional[int], typer.Option(help="Threads decoding image files [default: the cores, at most 4]")] = None,
    collection: CollectionOpt = None,
    db: DbOpt = None,
    wait: WaitOpt = None,
    use_ray: Annotated[
        bool,
        typer.Option("--ray", help="Embed on Ray Data workers (a local Ray cluster unless --ray-address); pip install 'lookalike[ray]'"),
    ] = False,
    ray_address: Annotated[Optional[str], typer.Option(help="Join this Ray cluster: auto or ray://HOST:PORT (implies --ray)")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Ray actors embedding [default: the cluster's CPUs / --cpus-per-worker]")] = None,
    cpus_per_worker: Annotated[float, typer.Option(help="CPUs per Ray actor (its TensorFlow threads)")] = 1.0,
    gpus_per_worker: Annotated[float, typer.Option(help="GPUs per Ray actor")] = 0.0,
    no_labels: Annotated[
        bool, typer.Option("--no-labels", help="Folder: no labels, every image below it an item [default: when images lie at its root]")
    ] = False,
    prune: Annotated[bool, typer.Option("--prune", help="Folder: remove the items whose files are gone from it")] = False,
    relocate: Annotated[
        bool, typer.Option("--relocate", help="Folder: the collection's folder moved to PATH (same relative paths); nothing re-embedded")
    ] = False,
    gps: Annotated[bool, typer.Option("--gps", help="Folder: also store each photo's GPS position (personal data)")] = False,
    metadata: Annotated[
        Optional[str],
        typer.Option("--metadata", help="Folder: a CSV or JSON Lines FILE of fields keyed by path (recorded; edit it and sync again)"),
    ] = None,
    label_partitions: Annotated[
        Optional[bool],
        typer.Option(
            "--label-partitions/--no-label-partitions",
            help="A new collection: keep each label's vectors in an index of its own too (label filters in ms; writes ~1.7x slower)"
            " [default: with 1-100 labels]",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Embed a dataset into a collection; resumable. A folder is mirrored: new files added, changed ones replaced,
    files gone reported (removed with --prune); a rerun over an unchanged folder embeds nothing."""
    from lookalike.core.ingest import ingest as run_ingest

    with _progress_bar(f"embedding {dataset}") as progress:
        report = run_ingest(
            dataset,
            path,
            source=source,
            limit=limit,
            test_size=test_size,
            seed=seed,
            embedder=embedder,
            weights=weights,
            layer=layer,
            pooling=pooling,
            normalize=normalize,
            input_size=input_size,
            precision=precision,
            fit=fit,
            model=model,
            batch_size=batch_size,
            max_pixels=max_pixels,
            follow_links=follow_links,
            decode_workers=decode_workers,
            collection=collection,
            db=db,
            wait=wait,
            progress=progress,
            ray=use_ray,
            ray_address=ray_address,
            workers=workers,
            cpus_per_worker=cpus_per_worker,
            gpus_per_worker=gpus_per_worker,
            labels=False if no_labels else None,
            prune=prune,
            relocate=relocate,
            gps=gps,
            metadata=metadata,
            label_partitions=label_partitions,
        )
    _print_ingest(report, as_json)


def _on(runtime: str) -> str:
    return {"onnx": ", ONNX Runtime", "tensorflow": ", TensorFlow"}.get(runtime, "")


def _print_ingest(report: Any, as_json: bool) -> None:
    if as_json:
        typer.echo(_dumps(report.to_dict()))
        return
    added = ", ".join(f"{k} {v}" for k, v in report.added.items())
    stored = ", ".join(f"{k} {v}" for k, v in report.stored.items())
    typer.echo(f"collection {report.collection!r} in {report.db}: {report.dataset} with {report.embedder}")
    if report.upgraded:
        typer.echo(f"  upgraded {report.upgraded} items of an earlier release to lasting ids (no re-embedding)")
    if report.relocated_from:
        typer.echo(f"  moved   from {report.relocated_from} (nothing re-embedded)")
    if report.dataset == "folder":
        typer.echo(
            f"  added   {added}; updated {report.updated}; unchanged {report.unchanged}; removed {len(report.removed)}; "
            f"skipped {len(report.skipped) + len(report.too_large)}"
        )
        if report.gone:
            shown = ", ".join(report.gone[:5]) + (" ..." if len(report.gone) > 5 else "")
            typer.echo(f"  gone    {len(report.gone)} files no longer in the folder, still stored (--prune removes them): {shown}")
        if report.new_labels:
            typer.echo(f"  labels  new: {', '.join(report.new_labels)}")
        if report.metadata_updated:
            typer.echo(f"  fields  updated from the metadata file on {report.metadata_updated} items (nothing re-embedded)")
        if report.updated or report.removed:
            typer.echo(
                f"  note    Chroma's index can lose items after replacements and removals: `lookalike check --full --collection "
                f"{report.collection}` finds them, --repair rebuilds the index (docs/living-collections.md)"
            )
    else:
        typer.echo(f"  added   {added} (already stored: {report.already_stored})")
    typer.echo(f"  stored  {stored}")
    if report.partitions_filled:
        typer.echo(f"  labels  {report.partitions_filled} label partition entries written after the index, one label at a time")
    when = f"on {report.ray_workers} Ray workers, their start-up included" if report.ray_workers else "start-up excluded"
    if sum(report.added.values()) or report.updated:
        typer.echo(f"  time    {report.seconds:.1f} s, {report.images_per_s:.0f} images/s ({when})")
    else:
        typer.echo("  time    nothing to embed")
    if sum(report.added.values()) and report.ray_workers:
        typer.echo(
            f"  stages  read {report.decode_seconds:.1f} s and embed {report.embed_seconds:.1f} s summed over the workers "
            f"({report.embed_images_per_s:.0f} images/s per worker embedding); write {report.write_seconds:.1f} s here"
        )
    elif sum(report.added.values()):
        typer.echo(
            f"  stages  decode {report.decode_images_per_s:.0f} images/s ({report.decode_seconds:.1f} s, ahead on threads), "
            f"embed {report.embed_images_per_s:.0f} images/s ({report.embed_seconds:.1f} s{_on(report.runtime)}), "
            f"write {report.write_seconds:.1f} s"
        )
    skips = (
        ("unreadable files", report.skipped),
        ("images over the pixel limit (--max-pixels)", report.too_large),
        ("symbolic links out of the folder (--follow-links)", report.skipped_links),
        ("images outside a label folder (the collection is labelled)", report.outside_labels),
    )
    for what, files in skips:
        if files:
            shown = ", ".join(files[:5]) + (" ..." if len(files) > 5 else "")
            typer.echo(f"  skipped {len(files)} {what}: {shown}")


@command()
def sync(
    collection: CollectionOpt = None,
    db: DbOpt = None,
    wait: WaitOpt = None,
    prune: Annotated[bool, typer.Option("--prune", help="Remove the items whose files are gone from the folder")] = False,
    relocate: Annotated[
        Optional[str], typer.Option("--relocate", help="The folder moved to this PATH (the same relative paths); nothing re-embedded")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per embed-and-write batch")] = 256,
    max_pixels: MaxPixelsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Mirror a folder collection's folder again, with the options it was made with (none to repeat)."""
    from lookalike.core.ingest import sync as run_sync

    with _progress_bar("syncing") as progress:
        report = run_sync(
            collection, db, wait=wait, prune=prune, relocate=relocate, batch_size=batch_size, max_pixels=max_pixels, progress=progress
        )
    _print_ingest(report, as_json)


@command()
def search(
    image: Annotated[Optional[str], typer.Option(help="Query by an image file (any size or mode)")] = None,
    id: Annotated[Optional[str], typer.Option("--id", help="Query by a stored item's id (it is never returned)")] = None,
    k: Annotated[int, typer.Option("--k", "-k", help="Number of neighbours")] = 5,
    label: Annotated[Optional[list[str]], typer.Option("--label", help="Keep only this label (repeatable; int or name)")] = None,
    split: Annotated[Optional[str], typer.Option(help="Keep only train (indexed) or test (held-out) items")] = None,
    where: Annotated[
        Optional[list[str]],
        typer.Option(
            "--where",
            help="Keep only items whose metadata match: 'width >= 1000', 'camera = \"Pixel 7\"', 'split in [train]' (repeatable: AND)",
        ),
    ] = None,
    collection: CollectionOpt = None,
    db: DbOpt = None,
    wait: WaitOpt = None,
    max_pixels: MaxPixelsOpt = None,
    as_json: JsonOpt = False,
    save: Annotated[Optional[str], typer.Option(help="Write a PNG of the query beside its neighbours")] = None,
    server: Annotated[
        Optional[str], typer.Option("--server", help="Ask a running `lookalike serve` at http://HOST:PORT (no TensorFlow here)")
    ] = None,
    api_key_file: Annotated[
        Optional[str], typer.Option("--api-key-file", help="The service's API key, for --server [default: $LOOKALIKE_API_KEY]")
    ] = None,
) -> None:
    """Find the nearest stored items to an image file or a stored id."""
    from lookalike.errors import InputError

    if (image is None) == (id is None):
        raise InputError("give exactly one query: --image FILE or --id ID")
    if server is not None:
        if db is not None or wait is not None or max_pixels is not None:
            raise InputError("--db, --wait and --max-pixels belong to the service: leave them out with --server")
        from lookalike.frontends.client import Client
        from lookalike.frontends.client import save_picture as save_remote
        from lookalike.frontends.server import read_api_key

        client = Client(server, api_key=read_api_key(api_key_file))
        name = client.pick(collection)
        hits = client.search(name, image=image, id=id, k=k, labels=label, split=split, where=where)
        if save:
            path = save_remote(client, name, hits, save, image=image, id=id)
    else:
        if api_key_file is not None:
            raise InputError("--api-key-file goes with --server URL")
        from lookalike.core.search import save_picture
        from lookalike.core.search import search as run_search
        from lookalike.data.filters import parse_where

        filt = parse_where(where)  # a bad expression fails before the store is opened
        with _open(collection, db, wait, max_pixels) as gallery:
            hits = run_search(gallery, image=image, id=id, k=k, labels=label, split=split, where=filt)
            if save:
                path = save_picture(gallery, hits, save, image=image, id=id)
    if as_json:
        typer.echo(_dumps([h.to_dict() for h in hits]))
    else:
        typer.echo(f"{'rank':>4}  {'id':<28} {'label':<12} {'distance':>9}")
        for h in hits:
            typer.echo(f"{h.rank:>4}  {h.id:<28} {h.label_name:<12} {h.distance:>9.4f}")
        if not hits:
            typer.echo("no items match the filters")
    if save:
        typer.echo(f"saved {path}", err=as_json)


@command()
def evaluate(
    k: Annotated[int, typer.Option("--k", "-k", help="Neighbours in the majority vote (1-NN by default)")] = 1,
    collection: CollectionOpt = None,
    db: DbOpt = None,
    wait: WaitOpt = None,
    as_json: JsonOpt = False,
    plot: Annotated[Optional[str], typer.Option(help="Write the confusion matrix as a PNG")] = None,
    errors: Annotated[
        Optional[str], typer.Option(help="Write a PNG gallery of misclassified held-out items beside their nearest neighbour")
    ] = None,
    keep: Annotated[
        bool, typer.Option("--save/--no-save", help="Keep the report with the collection (the service's /evaluation answers it)")
    ] = True,
    r_sample: Annotated[
        int,
        typer.Option(
            "--r-sample",
            help="Held-out queries of the store's R-precision and MAP@R when ranking all is too long (fewer past 2.5 million ranked items)",
        ),
    ] = 300,
    seed: Annotated[int, typer.Option(help="Seed of that sample")] = 0,
) -> None:
    """Held-out k-NN accuracy and retrieval metrics (P@k, R-precision, MAP@R) through the store, with an exact-search audit."""
    from lookalike.analysis.evaluate import evaluate as run_evaluate
    from lookalike.analysis.evaluate import save_confusion_picture, save_errors_picture, save_report

    with _open(collection, db, wait) as gallery:
        r = run_evaluate(gallery, k=k, r_sample=r_sample, seed=seed)
        if keep:
            save_report(gallery, r)
        saved = []
        if plot:
            saved.append(save_confusion_picture(r, plot))
        if errors:
            saved.append(save_errors_picture(gallery, r, errors))
    for path in saved:
        typer.echo(f"saved {path}", err=as_json)
    if as_json:
        typer.echo(_dumps(r.to_dict()))
        return
    typer.echo(f"collection {r.collection!r}: {r.embedder}")
    if r.retrieval.get("unlabelled"):
        typer.echo(f"  {'accuracy':<16} unlabelled: no labels to measure it by ({r.queries_asked()}, {r.n_indexed} indexed)")
        typer.echo(f"  {'recall@1':<16} {r.recall_at_1:.4f}  (store answer = exact nearest neighbour)")
        typer.echo(
            f"  {'recall@' + str(r.retrieval['recall_k']):<16} {r.retrieval['store_recall_at_k']:.4f}  "
            "(share of the exact nearest the store returns)"
        )
        typer.echo(f"  {'speed':<16} {r.queries_per_s:.0f} queries/s ({r.query_seconds:.2f} s of queries, {r.seconds:.2f} s in all)")
        return
    rows = [
        (f"{r.k}-NN accuracy", f"{r.accuracy:.4f}  ({r.queries_asked()}, {r.n_indexed} indexed)"),
        ("exact accuracy", f"{r.exact_accuracy:.4f}  (brute force over the stored vectors{_exact_sample(r)})"),
        ("recall@1", f"{r.recall_at_1:.4f}  (store answer = exact nearest neighbour)"),
        ("speed", f"{r.queries_per_s:.0f} queries/s ({r.query_seconds:.2f} s of queries, {r.seconds:.2f} s in all)"),
        ("per class", "  ".join(f"{n}: {a:.3f}" for n, a in r.per_class.items())),
    ]
    for title, value in rows:
        typer.echo(f"  {title:<16} {value}")
    width = max(5, max(len(n) for n in r.label_names) if r.label_names else 5)
    names = r.label_names or [str(i) for i in range(len(r.confusion))]
    _echo_retrieval(r.retrieval, width)
    typer.echo("  confusion (rows: true, columns: predicted)")
    typer.echo("  " + " " * width + "".join(f"{n[:6]:>7}" for n in names))
    for n, row in zip(names, r.confusion):
        typer.echo(f"  {n:>{width}}" + "".join(f"{v:>7}" for v in row))


RETRIEVAL_COLUMNS = (
    ("P@1", "precision_at_1"),
    ("P@5", "precision_at_5"),
    ("P@10", "precision_at_10"),
    ("R-prec", "r_precision"),
    ("MAP@R", "map_at_r"),
)


def _echo_retrieval(ret: dict, width: int) -> None:
    """evaluate's retrieval metrics: store and exact, overall then per class."""
    if not ret:
        return

    def cells(metrics: dict) -> str:
        return "".join(f"{_fmt(metrics.get(key)):>8}" for _, key in RETRIEVAL_COLUMNS)

    n_all = ret.get("queries", ret["r_queries_exact"])  # (reports saved by earlier releases lack "queries")
    sampled = ret["r_queries_store"] < n_all
    exact_on = ret.get("precision_queries_exact", n_all)
    typer.echo(f"  retrieval (Musgrave et al. 2020; R = indexed items of the query's label, up to {ret['r_max']:,})")
    typer.echo("  " + " " * max(width, 6) + "".join(f"{title:>8}" for title, _ in RETRIEVAL_COLUMNS))
    for name in ("store", "exact"):
        note = ""
        if name == "store" and sampled:
            note = f"  (R metrics over {ret['r_queries_store']:,} sampled queries, seed {ret['seed']})"
        elif name == "exact":
            same = ret.get("exact_same_queries")
            if exact_on < n_all:
                note = f"  (exact search on {exact_on:,} sampled queries, R metrics on {ret['r_queries_exact']:,})"
            if same:
                note += f"  (on the store's queries: {_fmt(same.get('r_precision'))} {_fmt(same.get('map_at_r'))})"
        typer.echo(f"  {name:>{max(width, 6)}}{cells(ret[name])}{note}")
    typer.echo("  per class: store" + (" (its R metrics over the sample)" if sampled else "") + " | exact R-prec MAP@R")
    for label, metrics in ret["store"]["per_class"].items():
        exact = ret["exact"]["per_class"].get(label, {})
        typer.echo(f"  {label:>{max(width, 6)}}{cells(metrics)}  | {_fmt(exact.get('r_precision')):>7} {_fmt(exact.get('map_at_r')):>7}")


def _exact_sample(r: Any) -> str:
    """How many queries exact search answered, when not all (past evaluate.EXACT_PAIRS)."""
    if not r.exact_queries or r.exact_queries >= r.n_queries:
        return ""
    return f", on {r.exact_queries:,} sampled queries: the store's accuracy on them {r.accuracy_same_queries:.4f}"


def _fmt(value: object) -> str:
    return "n/a" if not isinstance(value, float) or value != value else f"{value:.4f}"


@command()
def serve(
    db: DbOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on (any but loopback needs an API key or --insecure)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free one)")] = 8000,
    api_key_file: Annotated[
        Optional[str], typer.Option("--api-key-file", help="File holding the API key clients must send [default: $LOOKALIKE_API_KEY]")
    ] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Serve a non-loopback --host without any key (anyone may query)")] = False,
    write_key_file: Annotated[
        Optional[str],
        typer.Option("--write-key-file", help="File holding the key that may add and remove items (else no writes) [$LOOKALIKE_WRITE_KEY]"),
    ] = None,
    files: Annotated[
        Optional[str], typer.Option("--files", help="Keep images added over HTTP in this directory [default: beside a local store]")
    ] = None,
    wait: WaitOpt = None,
    max_pixels: MaxPixelsOpt = None,
    max_upload_mb: Annotated[float, typer.Option(help="Largest request body, in MB (larger: 413)")] = 10.0,
    batch_window_ms: Annotated[
        Optional[float],
        typer.Option(help="How long a batch of image queries waits for more after its first, in ms [default: 0, take those waiting]"),
    ] = None,
    max_batch: Annotated[
        Optional[int], typer.Option(help="Most image queries embedded as one batch (1: no batching) [default: 32]")
    ] = None,
    preload: Annotated[
        bool, typer.Option("--preload", help="Build every collection's embedder and read its filter mirror before serving")
    ] = False,
    access_log: Annotated[bool, typer.Option("--access-log", help="Log every request")] = False,
) -> None:
    """Serve the store's collections over HTTP (JSON; docs at /docs) with warm embedders: pip install 'lookalike[serve]'."""
    from lookalike.errors import InputError
    from lookalike.frontends.server import WRITE_KEY_ENV, bind, check_exposure, read_api_key, require_extra
    from lookalike.frontends.server import serve as run_server
    from lookalike.frontends.service import DEFAULT_MAX_BATCH, DEFAULT_WINDOW, Service

    require_extra()
    key = read_api_key(api_key_file)
    write_key = read_api_key(write_key_file, "--write-key-file", WRITE_KEY_ENV)
    if write_key is not None and write_key == key:
        raise InputError("the write key is the API (read) key: give the write key its own file")
    check_exposure(host, key, insecure)
    if not 0.001 <= max_upload_mb <= 1024:  # (also refuses NaN and infinity)
        raise InputError(f"--max-upload-mb must be between 0.001 and 1024, got {max_upload_mb}")
    window = DEFAULT_WINDOW if batch_window_ms is None else batch_window_ms / 1000
    batch = DEFAULT_MAX_BATCH if max_batch is None else max_batch
    with Service(db, wait=wait, max_pixels=max_pixels, window=window, max_batch=batch, files=files) as service:
        sock = bind(host, port)
        names = service.warm(mirrors=True) if preload else service.store.names()
        shown = f"[{host}]" if ":" in host else host
        url = f"http://{shown}:{sock.getsockname()[1]}"
        typer.echo(
            f"serving {len(names)} collection(s) of {service.store.db} at {url} (docs: {url}/docs); "
            f"API key {'required' if key else 'not required'}; writes {'with the write key' if write_key else 'off'}; Ctrl-C stops",
            err=True,
        )
        run_server(service, sock, api_key=key, write_key=write_key, max_upload=int(max_upload_mb * 1024 * 1024), access_log=access_log)
    typer.echo("stopped", err=True)


@command("app")
def app_(
    db: DbOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on (Streamlit has no login: keep it on loopback)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on")] = 8501,
) -> None:
    """Explore the store's collections in the browser (Streamlit): pip install 'lookalike[app]'."""
    import importlib.util
    from pathlib import Path

    from lookalike.core.store import Store, default_db
    from lookalike.errors import InputError
    from lookalike.frontends.server import bind
    from lookalike.util import is_loopback

    if importlib.util.find_spec("streamlit") is None or importlib.util.find_spec("plotly") is None:
        raise InputError("the app needs its extra: pip install 'lookalike[app]'")
    bind(host, port).close()  # a port in use or a bad host: one line now, not Streamlit's own
    location = db or default_db()
    if not location.startswith(("http://", "https://")):
        location = str(Path(location).expanduser().resolve())
    Store(location).close()  # a missing, unreachable or locked store: one line now, not a page that says it
    script = Path(__file__).with_name("app.py")
    cmd = [sys.executable, "-m", "streamlit", "run", str(script)]
    cmd += ["--server.address", host, "--server.port", str(port), "--server.headless", "true"]
    cmd += ["--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none", "--global.developmentMode", "false"]
    cmd += ["--server.maxUploadSize", "10", "--client.toolbarMode", "viewer", "--", "--db", location]
    shown = f"[{host}]" if ":" in host else host
    typer.echo(f"lookalike app: http://{shown}:{port} (store {location}); Ctrl-C stops", err=True)
    if not is_loopback(host):
        typer.echo("warning: Streamlit has no login: anyone who reaches this address can browse the store", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, cmd)  # Streamlit takes this process's place: a signal to it stops the app, nothing is left behind


@command("map")
def map_(
    out: Annotated[str, typer.Option(help="PNG file for the map")],
    method: Annotated[str, typer.Option(help="tsne, umap (pip install 'lookalike[umap]') or pca")] = "tsne",
    sample: SampleOpt = None,
    split: SplitOpt = None,
    seed: Annotated[int, typer.Option(help="Seed: same seed, same picture")] = 0,
    coords: Annotated[Optional[str], typer.Option(help="Also write id,label,label_name,split,x,y to this CSV")] = None,
    collection: CollectionOpt = None,
    db: DbOpt = None,
    wait: WaitOpt = None,
) -> None:
    """Draw the embedding space in 2-D, coloured by label."""
    from lookalike.analysis.explore import METHODS, embedding_map, save_coords, save_map_picture

    if method not in METHODS:
        raise _fail(f"--method {method!r} is not one of {', '.join(METHODS)}", 2)
    with _open(collection, db, wait) as gallery:
        r = embedding_map(gallery, method=method, sample=sample, split=split, seed=seed)
    path = save_map_picture(r, out)
    typer.echo(f"saved {path} ({len(r.points.ids)} points{_sample_note(r.points)}, {r.method}, {r.seconds:.1f} s)")
    if coords:
        typer.echo(f"saved {save_coords(r, coords)}")


def _sample_note(points: Any) -> str:
    """Says a map's or clustering's items are a sample, and how to have them all."""
    return f": a seeded sample of the {points.total:,} items (--sample 0 for all)" if points.sampled else ""


@command()
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
    wait: WaitOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """k-means clusters against the labels: silhouette, ARI, NMI and Hungarian-matched cluster accuracy."""
    from lookalike.analysis.explore import cluster, save_disagreement_picture

    with _open(collection, db, wait) as gallery:
        r = cluster(gallery, k=k, on=on, method=method, sample=sample, split=split, seed=seed)
        if out:
            typer.echo(f"saved {save_disagreement_picture(gallery, r, out)}", err=as_json)
    if as_json:
        typer.echo(_dumps(r.to_dict()))
        return
    of = f"{r.n_items} items{_sample_note(r.points)}"
    typer.echo(f"collection {r.collection!r}: k-means, k={r.k}, on the {r.on} of {of} ({r.seconds:.1f} s)")
    if r.cluster_accuracy is None:
        typer.echo(f"  silhouette        {r.silhouette:.4f}  (on {r.silhouette_sample} items)")
        typer.echo("  against labels    unlabelled: no labels to compare the clusters with")
        return
    typer.echo(f"  cluster accuracy  {r.cluster_accuracy:.4f}  (clusters matched to labels, Hungarian)")
    typer.echo(f"  silhouette        {r.silhouette:.4f}  (on {r.silhouette_sample} items)")
    typer.echo(f"  adjusted Rand     {r.adjusted_rand:.4f}")
    typer.echo(f"  normalised MI     {r.normalized_mutual_info:.4f}")
    typer.echo(f"  disagreeing       {len(r.disagreeing())} items")


@command()
def audit(
    k: Annotated[int, typer.Option("--k", "-k", help="Neighbours each item is compared with")] = 10,
    top: Annotated[int, typer.Option(help="Label-issue candidates (and duplicate groups) listed")] = 20,
    threshold: Annotated[
        Optional[float], typer.Option(help="Near-duplicate distance [default: 0.25 x the median nearest-neighbour distance]")
    ] = None,
    method: Annotated[str, typer.Option(help="Label-issue score: vote (distance-weighted k-NN) or margin")] = "vote",
    outliers: Annotated[int, typer.Option(help="Outliers listed (lowest local density)")] = 10,
    seed: Annotated[int, typer.Option(help="Seed of the sample whose store answers are checked")] = 0,
    neighbours: Annotated[
        str,
        typer.Option(
            help="How each item's neighbours are found: exact, faiss (an HNSW graph built for the audit), store (one query "
            "an item), or auto: exact up to 100,000 items, then faiss when installed, else the store"
        ),
    ] = "auto",
    csv_out: Annotated[Optional[str], typer.Option("--csv", help="Write every item's scores, most suspicious first, as CSV")] = None,
    out: Annotated[Optional[str], typer.Option(help="PNG: suspicious items beside their neighbours, then the duplicate groups")] = None,
    collection: CollectionOpt = None,
    db: DbOpt = None,
    wait: WaitOpt = None,
    keep: Annotated[
        bool, typer.Option("--save/--no-save", help="Keep the report with the collection (the app and service show it)")
    ] = True,
    as_json: JsonOpt = False,
) -> None:
    """Label errors, near-duplicates, train/test leaks and outliers, from the stored vectors (audited against exact search)."""
    from lookalike.analysis import ann
    from lookalike.analysis.audit import EXACT_MAX, checked_answers, save_audit, save_audit_picture, write_csv
    from lookalike.analysis.audit import audit as run_audit

    with _open(collection, db, wait) as gallery:
        with _progress_bar("neighbours", unit="items/s") as progress:
            r = run_audit(
                gallery,
                k=k,
                top=top,
                threshold=threshold,
                method=method,
                n_outliers=outliers,
                seed=seed,
                progress=progress,
                neighbours=neighbours,
                release_store_memory=True,
            )
        if keep:
            save_audit(gallery, r)
        saved = []
        if csv_out:
            saved.append(write_csv(r, csv_out))
        if out:
            saved.append(save_audit_picture(gallery, r, out))
    for path in saved:
        typer.echo(f"saved {path}", err=as_json)
    if as_json:
        typer.echo(_dumps(r.to_dict()))
        return
    typer.echo(
        f"collection {r.collection!r}: {r.n_items:,} items, {r.k} neighbours each ({r.seconds:.1f} s; "
        f"{checked_answers(r.neighbours_by).removeprefix('the ')} hold {r.store_recall_at_k:.4f} of the exact {r.k} "
        f"on {r.store_sample:,} items)"
    )
    if r.neighbours_by != "exact":
        why = f"over {EXACT_MAX:,} items exact search would grow as their square" if r.n_items > EXACT_MAX else f"--neighbours {neighbours}"
        typer.echo(f"neighbours: {checked_answers(r.neighbours_by)} ({why}); leaks: the store's nearest indexed item, exact on a sample")
    if r.neighbours_by == "store" and r.n_items > EXACT_MAX and not ann.available():
        typer.echo(f"note: {ann.INSTALL} answers this audit's neighbours ~5x faster (an in-memory graph built for it)")
    if not r.labelled:
        typer.echo("label issues: none looked for (the collection is unlabelled, or has one label)")
    else:
        typer.echo(
            f"label issues ({r.method}): {r.n_disputed:,} items whose neighbours mostly carry another label; the top {len(r.suspects)}:"
        )
    width = max([len(s.id) for s in r.suspects] + [2])
    for s in r.suspects:
        neighbours = " ".join(s.neighbour_labels)
        typer.echo(f"  {s.id:<{width}}  {s.split:<5}  {s.label} -> {s.suggested_label}  score {s.score:.3f}  neighbours {neighbours}")
    cross = [g for g in r.groups if g.cross_split]
    typer.echo(
        f"near-duplicates (distance < {r.threshold:.4g}: {r.threshold_rule}): {r.n_duplicate_pairs:,} pairs in {len(r.groups):,} groups, "
        f"{len(cross):,} across splits"
    )
    for g in r.groups[:top]:
        tag = "LEAK" if g.cross_split else "    "
        typer.echo(f"  {tag} {len(g.ids)} items  " + "  ".join(f"{i} ({sp}, {lab})" for i, sp, lab in zip(g.ids, g.splits, g.labels)))
    if len(r.groups) > top:
        typer.echo(f"  ... {len(r.groups) - top:,} more (--json or --csv for all)")
    if r.accuracy is not None:
        free = "n/a" if r.leak_free_accuracy is None else f"{r.leak_free_accuracy:.4f}"
        typer.echo(
            f"accuracy (evaluate, 1-NN): {r.accuracy:.4f} on {r.n_queries:,} held-out items; "
            f"without the {len(r.leaked_ids):,} leaked: {free}"
        )
    typer.echo(f"outliers (mean distance to {r.k} neighbours):")
    for o in r.outliers:
        typer.echo(f"  {o.id:<{width}}  {o.split:<5}  {o.label}  {o.score:.4g}")


@command()
def compare(
    dataset: DatasetArg,
    path: PathArg = None,
    embedder: Annotated[
        Optional[list[str]],
        typer.Option(
            "--embedder",
            help="SPEC name[:key=value,...], repeatable: pixels, vgg16, resnet50:size=224,fit=crop, "
            "vgg16:layer=block3_pool,pooling=flatten, model:FILE.keras (backbones: `lookalike models`)",
        ),
    ] = None,
    source: SourceOpt = None,
    limit: Annotated[Optional[int], typer.Option(help="Use only N items")] = None,
    test_size: Annotated[Optional[float], typer.Option(help="Hold out N items (or a fraction below 1)")] = None,
    seed: Annotated[int, typer.Option(help="Seed for random weights and sampling")] = 0,
    weights: Annotated[str, typer.Option(help="Default backbone weights for SPECs that do not name them")] = "imagenet",
    k: Annotated[int, typer.Option("--k", "-k", help="k of the k-NN column")] = 5,
    batch_size: Annotated[int, typer.Option(help="Images per embed-and-write batch")] = 256,
    out: Annotated[Optional[str], typer.Option(help="PNG bar chart of the accuracies")] = None,
    db: DbOpt = None,
    wait: WaitOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Ingest one dataset with several embedders (reusing collections), evaluate each, print one table."""
    from lookalike.analysis.compare import compare as run_compare
    from lookalike.analysis.compare import save_compare_picture

    with _progress_bar("embedding") as progress:
        r = run_compare(
            dataset,
            path,
            embedders=list(embedder or []),
            source=source,
            limit=limit,
            test_size=test_size,
            seed=seed,
            weights=weights,
            k=k,
            batch_size=batch_size,
            db=db,
            wait=wait,
            progress=progress,
        )
    if out:
        typer.echo(f"saved {save_compare_picture(r, out)}", err=as_json)
    if as_json:
        typer.echo(_dumps(r.to_dict()))
        return
    typer.echo(f"{r.dataset} ({r.protocol}), accuracy of held-out items through the store")
    typer.echo(f"{'embedder':<52} {'dim':>6} {'1-NN':>7} {f'{r.k}-NN':>7} {'silh.':>7} {'img/s':>8}")
    for row in r.rows:
        typer.echo(
            f"{row.embedder:<52} {row.dim:>6} {row.accuracy_1nn:>7.4f} {row.accuracy_knn:>7.4f} "
            f"{row.silhouette:>7.3f} {row.images_per_s:>8.0f}"
        )


@command()
def models(as_json: JsonOpt = False) -> None:
    """List the embedders: each backbone's input size, vector length, size, speed and published quality."""
    from lookalike.models.backbones import BACKBONES, DIGIT_DEFAULT, PHOTO_DEFAULT

    rows = []
    for b in BACKBONES.values():
        default = "photos" if b.name == PHOTO_DEFAULT else "digits" if b.name == DIGIT_DEFAULT else ""
        quality = f"top-1 {b.top1:.1%}" if b.top1 else f"k-NN {b.knn:.1%}" if b.knn else ""
        rows.append(
            {
                "name": b.name,
                "model": b.title,
                "input": b.native_size,
                "dim": b.dim,
                "pooling": b.pooling,
                "params_m": round(b.params / 1e6, 1),
                "gflops": b.gflops,
                "imagenet": quality,
                "extra": f"lookalike[{b.extra}]" if b.extra else "",
                "default_for": default,
            }
        )
    rows.append({"name": "pixels", "model": "raw pixels (baseline)", "input": 28, "dim": 784, "pooling": "", "params_m": 0})
    if as_json:
        typer.echo(_dumps(rows))
        return
    typer.echo(f"{'name':<18} {'input':>5} {'dim':>5} {'params':>7} {'GFLOPs':>7}  {'ImageNet':<13} {'default':<7} model")
    for r in rows:
        extra = f" (needs {r['extra']})" if r.get("extra") else ""
        typer.echo(
            f"{r['name']:<18} {r['input']:>5} {r['dim']:>5} {r['params_m']:>6}M {r.get('gflops', 0):>7}  "
            f"{r.get('imagenet', ''):<13} {r.get('default_for', ''):<7} {r['model']}{extra}"
        )
    typer.echo("ImageNet: published top-1 (supervised) or k-NN (dinov2_small); GFLOPs per image at 224 px; docs/backbones.md")
    typer.echo(runtime_line())


def runtime_line() -> str:
    """Which runtime embeds photos here: ``$LOOKALIKE_RUNTIME`` and whether the onnx extra is installed."""
    from lookalike.models import onnxrt
    from lookalike.models.backbones import BACKBONES
    from lookalike.models.embedder import DIGIT_INPUT

    choice = onnxrt.runtime_choice()
    if choice == "tensorflow":
        return f"runtime: TensorFlow (${onnxrt.RUNTIME_ENV}=tensorflow)"
    fast = ", ".join(b.name for b in BACKBONES.values() if b.onnx)
    if onnxrt.installed():
        where = "every backbone that converts" if choice == "onnx" else f"{fast} in float32 above {DIGIT_INPUT} px"
        return f"runtime: ONNX Runtime for {where}, TensorFlow else (${onnxrt.RUNTIME_ENV}={choice})"
    return f"runtime: TensorFlow; ONNX Runtime embeds {fast} about 2x faster: {onnxrt.ONNX_EXTRA}"


@command()
def collections(db: DbOpt = None, wait: WaitOpt = None, as_json: JsonOpt = False) -> None:
    """List the collections: name, count, dataset, embedder."""
    from lookalike.core.gallery import list_collections
    from lookalike.core.store import Store

    with Store(db, wait=wait) as store:
        infos = list_collections(store)
    if as_json:
        typer.echo(_dumps([i.to_dict() for i in infos]))
        return
    if not infos:
        typer.echo("no collections")
    for i in infos:
        labels = f"{len(i.label_names)} labels" if i.labelled else "unlabelled"
        typer.echo(f"{i.name:<30} {i.count:>8}  {i.dataset:<14} {labels:<12} {i.embedder}")


@command()
def drop(name: Annotated[str, typer.Argument(help="Collection to delete")], db: DbOpt = None, wait: WaitOpt = None) -> None:
    """Delete a collection."""
    from lookalike.core.store import Store

    with Store(db, wait=wait) as store:
        store.drop(name)
    typer.echo(f"dropped {name!r}")


@command()
def add(
    files: Annotated[list[str], typer.Argument(help="Image files to add")],
    label: Annotated[Optional[str], typer.Option("--label", help="Their label (labelled collections; a new name is added)")] = None,
    meta: Annotated[
        Optional[list[str]], typer.Option("--meta", help='A field for each image: KEY=VALUE, typed (4, 2.5, true, text, ["a","b"])')
    ] = None,
    files_dir: Annotated[
        Optional[str], typer.Option("--files", help="Keep the added images in this directory [default: beside a local store]")
    ] = None,
    collection: CollectionOpt = None,
    db: DbOpt = None,
    wait: WaitOpt = None,
    max_pixels: MaxPixelsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Embed single images into a collection (kept in a content-addressed folder; the same image twice is stored once)."""
    from lookalike.core.items import add_images

    with _open(collection, db, wait, max_pixels) as g:
        r = add_images(g, files, label=label, metadata=list(meta or []), files=files_dir)
    if as_json:
        typer.echo(_dumps(r.to_dict()))
        return
    for f, i in zip(files, r.ids):
        typer.echo(f"{i}  {f}" + ("  (already stored)" if i in r.already_stored else ""))
    extra = f"; new label {', '.join(r.new_labels)}" if r.new_labels else ""
    typer.echo(f"added {len(r.added)} to {r.collection!r}{extra}")


@command()
def remove(
    ids: Annotated[Optional[list[str]], typer.Argument(help="Ids of the items to remove")] = None,
    where: Annotated[
        Optional[list[str]], typer.Option("--where", help="Remove every item whose metadata match (repeatable: AND), e.g. 'album = old'")
    ] = None,
    collection: CollectionOpt = None,
    db: DbOpt = None,
    wait: WaitOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Remove items (by id or --where) from a collection and its label partitions; run again after an interruption."""
    from lookalike.core.items import remove_items

    with _open(collection, db, wait) as g:
        r = remove_items(g, list(ids or []), where=list(where or []) or None)
    if as_json:
        typer.echo(_dumps(r.to_dict()))
        return
    typer.echo(f"removed {len(r.removed)} from {r.collection!r}")
    if r.missing:
        typer.echo(f"  not stored: {', '.join(r.missing[:10])}" + (" ..." if len(r.missing) > 10 else ""))
    if r.still_in_folder:
        typer.echo(f"  {len(r.still_in_folder)} still in the folder: the next sync adds them again unless their files are deleted")


@command()
def items(
    label: Annotated[Optional[list[str]], typer.Option("--label", help="Keep only this label (repeatable; int or name)")] = None,
    split: Annotated[Optional[str], typer.Option(help="Keep only train (indexed) or test (held-out) items")] = None,
    where: Annotated[
        Optional[list[str]], typer.Option("--where", help="Keep only items whose metadata match, e.g. 'width >= 1000' (repeatable: AND)")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", help="Items on this page (1-1,000)")] = 20,
    cursor: Annotated[Optional[str], typer.Option("--cursor", help="Go on where a page ended: the cursor it printed")] = None,
    collection: CollectionOpt = None,
    db: DbOpt = None,
    wait: WaitOpt = None,
    as_json: JsonOpt = False,
    server: Annotated[Optional[str], typer.Option("--server", help="Ask a running `lookalike serve` at http://HOST:PORT")] = None,
    api_key_file: Annotated[
        Optional[str], typer.Option("--api-key-file", help="The service's API key, for --server [default: $LOOKALIKE_API_KEY]")
    ] = None,
) -> None:
    """List stored items a page at a time, in the order they were written; --cursor goes on from the last page."""
    from lookalike.errors import InputError

    if server is not None:
        if db is not None or wait is not None:
            raise InputError("--db and --wait belong to the service: leave them out with --server")
        from lookalike.frontends.client import Client
        from lookalike.frontends.server import read_api_key

        client = Client(server, api_key=read_api_key(api_key_file))
        answer = client.items(client.pick(collection), labels=label, split=split, where=where, cursor=cursor, limit=limit)
    else:
        if api_key_file is not None:
            raise InputError("--api-key-file goes with --server URL")
        from lookalike.core.items import list_items
        from lookalike.data.filters import parse_where

        filt = parse_where(where) if where else None  # a bad expression fails before the store is opened
        with _open(collection, db, wait) as g:
            answer = list_items(g, labels=label, split=split, where=filt, cursor=cursor, limit=limit).to_dict()
    if as_json:
        typer.echo(_dumps(answer))
        return
    for it in answer["items"]:
        typer.echo(f"{it['id']:<40} {it['label_name']:<12} {it['split']}")
    if not answer["items"]:
        typer.echo(
            "no items on this page" if answer["next_cursor"] else "no items match the filters" if cursor is None else "no more items"
        )
    if answer["next_cursor"] is not None:
        typer.echo(f"next page: --cursor {answer['next_cursor']}")


@command()
def export(
    name: Annotated[str, typer.Argument(help="Collection to export")],
    out: Annotated[str, typer.Option("--out", help="The Parquet file to write (ids, vectors, metadata, the record)")],
    db: DbOpt = None,
    wait: WaitOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write a collection to one Parquet file (streamed; vectors bit for bit): a backup, or a move to another store."""
    from lookalike.core.transfer import export_collection

    with _open(name, db, wait) as g:
        r = export_collection(g, out)
    if as_json:
        typer.echo(_dumps(r.to_dict()))
        return
    typer.echo(f"exported {r.items} items of {r.collection!r} to {r.path} in {r.seconds:.1f} s")


@command("import")
def import_(
    file: Annotated[str, typer.Argument(help="A Parquet file written by `lookalike export`")],
    collection: Annotated[
        Optional[str], typer.Option("--collection", "-c", help="The new collection's name [default: the exported one]")
    ] = None,
    db: DbOpt = None,
    wait: WaitOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a collection from an exported file, nothing embedded; run it again to finish an interrupted import."""
    from lookalike.core.transfer import import_collection

    r = import_collection(file, collection=collection, db=db, wait=wait)
    if as_json:
        typer.echo(_dumps(r.to_dict()))
        return
    how = " (resumed)" if r.resumed else ""
    typer.echo(f"imported {r.items} items into {r.collection!r} of {r.db} in {r.seconds:.1f} s{how}")


@command()
def check(
    collection: CollectionOpt = None,
    db: DbOpt = None,
    wait: WaitOpt = None,
    repair: Annotated[
        bool,
        typer.Option("--repair", help="Rebuild the index and the label partitions from the stored vectors when only they are wrong"),
    ] = False,
    full: Annotated[bool, typer.Option("--full", help="Every stored vector must find itself through the index (else a sample)")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Verify a collection: record, every vector, the index, the label partitions, the catalogue, counts per split;
    exit 1 when damaged."""
    from lookalike.analysis.check import check as run_check
    from lookalike.analysis.check import repair as run_repair
    from lookalike.core.store import Store

    with Store(db, wait=wait) as store:
        r = (  # (this process's own store: it may drop the indexes it loaded as it goes)
            run_repair(store, collection, release_store_memory=True)
            if repair
            else run_check(store, collection, full=full, release_store_memory=True)
        )
    if as_json:
        typer.echo(_dumps(r.to_dict()))
    else:
        counts = ", ".join(f"{k} {v}" for k, v in r.counts.items())
        typer.echo(f"collection {r.collection!r} in {r.db}: {r.count} items ({counts})")
        if r.partitions:
            typer.echo(f"  label partitions: {len(r.partitions)}, holding {sum(r.partitions.values())} items")
        for problem in r.problems:
            typer.echo(f"  problem: {problem}")
        for note in r.notes:
            typer.echo(f"  note: {note}")
        typer.echo(f"  {'ok' if r.ok else 'DAMAGED'}" + (f": {r.fix}" if r.fix else ""))
    if not r.ok:
        raise typer.Exit(1)


@command()
def quickstart(
    db: DbOpt = None,
    out: Annotated[str, typer.Option(help="Where to save the search picture")] = "lookalike-quickstart.png",
    offline: Annotated[bool, typer.Option(help="Do not try to download MNIST or ImageNet weights")] = False,
    limit: Annotated[int, typer.Option(help="Digits to use (the seed notebook's 5,000)")] = 5000,
    test_size: Annotated[int, typer.Option(help="Digits held out for evaluation (the seed notebook's 1,000)")] = 1000,
    wait: WaitOpt = None,
) -> None:
    """Ingest, evaluate and search end to end on the best data and weights this machine has."""
    from lookalike.frontends.quickstart import quickstart as run_quickstart

    with _progress_bar("embedding") as progress:
        r = run_quickstart(db=db, out=out, offline=offline, limit=limit, test_size=test_size, wait=wait, progress=progress)
    typer.echo(f"data:     {r.dataset} ({r.ingest.stored.get('train', 0)} indexed, {r.ingest.stored.get('test', 0)} held out)")
    typer.echo(f"weights:  {r.weights}  [{r.ingest.embedder}]")
    for note in r.notes:
        typer.echo(f"note:     {note}")
    typer.echo(
        f"ingest:   {sum(r.ingest.added.values())} embedded in {r.ingest.seconds:.1f} s into {r.ingest.collection!r} at {r.ingest.db}"
    )
    e = r.evaluation
    typer.echo(
        f"evaluate: 1-NN accuracy {e.accuracy:.4f} (exact {e.exact_accuracy:.4f}, recall@1 {e.recall_at_1:.4f}, "
        f"{e.queries_per_s:.0f} queries/s)"
    )
    typer.echo(f"search:   neighbours of {r.query_id}: " + ", ".join(f"{h.id} ({h.label_name})" for h in r.hits))
    typer.echo(f"picture:  {r.picture}")
    typer.echo(f"next:     lookalike search --id {r.query_id} --collection {r.ingest.collection} --db {r.ingest.db}")


@command()
def train(
    dataset: Annotated[Optional[str], typer.Argument(help="mnist, fashion-mnist, mnist-sample (offline) or folder")] = None,
    path: PathArg = None,
    out: Annotated[str, typer.Option(help="Where to save the model (.keras)")] = "lookalike-model.keras",
    source: SourceOpt = None,
    limit: Annotated[Optional[int], typer.Option(help="Use only N items, as in ingest (held-out items are never trained on)")] = None,
    test_size: Annotated[Optional[float], typer.Option(help="Hold out N items (or a fraction below 1), as in ingest")] = None,
    seed: Annotated[int, typer.Option(help="Seed for weights, sampling, shuffling and augmentation")] = 0,
    self_supervised: Annotated[
        bool, typer.Option("--self-supervised", help="Learn from the images alone (SimCLR), reading no label")
    ] = False,
    collection: Annotated[
        Optional[str], typer.Option("--collection", "-c", help="--self-supervised: learn from this stored collection's indexed items")
    ] = None,
    db: DbOpt = None,
    backbone: Annotated[
        Optional[str], typer.Option(help="--self-supervised: the registered backbone to train (see `lookalike models`) [default: smallcnn]")
    ] = None,
    weights: Annotated[
        Optional[str],
        typer.Option(
            help="Start from imagenet (downloads once), random (seeded) or a weights FILE "
            "[default: imagenet; random with --self-supervised]"
        ),
    ] = None,
    layer: Annotated[
        Optional[str], typer.Option(help="VGG16 layer the embedding sits on [default: block3_pool; the backbone's with --self-supervised]")
    ] = None,
    input_size: Annotated[
        Optional[int], typer.Option(help="Image side in pixels [default: 32; the backbone's small size with --self-supervised]")
    ] = None,
    precision: Annotated[
        Optional[str], typer.Option(help="VGG16 compute: float32 or bfloat16 [default: bfloat16 where the CPU has it natively]")
    ] = None,
    dim: Annotated[
        Optional[int], typer.Option(help="Embedding dimension (--self-supervised: the projection head's) [default: 128]")
    ] = None,
    epochs: Annotated[
        Optional[int],
        typer.Option(help="Most epochs (early stopping may end sooner) [default: 12; with --self-supervised, those of ~1,000 steps]"),
    ] = None,
    minutes: Annotated[Optional[float], typer.Option(help="--self-supervised: as many epochs as fit in this many minutes")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per training step [default: 64; 256 with --self-supervised]")] = None,
    learning_rate: Annotated[Optional[float], typer.Option(help="Adam learning rate [default: 3e-4; 2e-3 with --self-supervised]")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="--self-supervised: NT-Xent temperature [default: 0.2]")] = None,
    augment: Annotated[
        Optional[str],
        typer.Option(help="--self-supervised: digits (affine, elastic) or photos (crops, flips, colour) [default: by the images]"),
    ] = None,
    fresh: Annotated[bool, typer.Option(help="--self-supervised: discard the checkpoint of an earlier run and start again")] = False,
    loss: Annotated[
        Optional[str], typer.Option(help="cosine (normalised-softmax classifier) or softmax (plain classifier) [default: cosine]")
    ] = None,
    validation: Annotated[
        Optional[float], typer.Option(help="Fraction of the indexed items kept aside for early stopping [default: 0.1]")
    ] = None,
    patience: Annotated[Optional[int], typer.Option(help="Epochs without a better validation loss before stopping [default: 3]")] = None,
    shift: Annotated[Optional[int], typer.Option(help="Augmentation: random shifts of up to N pixels [default: 2]")] = None,
    dropout: Annotated[Optional[float], typer.Option(help="Dropout on the features before the embedding layer [default: 0.3]")] = None,
    margin: Annotated[Optional[float], typer.Option(help="CosFace margin of the cosine loss [default: 0.2]")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Train an embedder on the indexed items: fine-tune VGG16 on their labels, or (--self-supervised) learn from the
    images alone; then `lookalike ingest ... --model OUT`."""
    supervised_only = {
        "--loss": loss,
        "--validation": validation,
        "--patience": patience,
        "--shift": shift,
        "--dropout": dropout,
        "--margin": margin,
    }
    ssl_only = {
        "--collection": collection,
        "--db": db,
        "--backbone": backbone,
        "--minutes": minutes,
        "--temperature": temperature,
        "--augment": augment,
    }
    if self_supervised:
        given = [k for k, v in supervised_only.items() if v is not None] + (["--precision"] if precision is not None else [])
        if given:
            raise _fail(
                f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for training on labels: leave out with --self-supervised", 2
            )
        if collection is not None and any(v is not None for v in (dataset, path, source, limit, test_size)):
            raise _fail("give a DATASET (with PATH, --source, --limit, --test-size) or --collection NAME, not both", 2)
        if db is not None and collection is None:
            raise _fail("--db names the store of --collection: give --collection NAME too, or leave --db out", 2)
        options = {
            "dataset": dataset,
            "path": path,
            "out": out,
            "source": source,
            "limit": limit,
            "test_size": test_size,
            "collection": collection,
            "db": db,
            "seed": seed,
            "backbone": backbone,
            "weights": weights or "random",
            "layer": layer,
            "input_size": input_size,
            "augment": augment,
            "epochs": epochs,
            "minutes": minutes,
            "batch_size": 256 if batch_size is None else batch_size,
            "learning_rate": 2e-3 if learning_rate is None else learning_rate,
            "temperature": 0.2 if temperature is None else temperature,
            "projection_dim": 128 if dim is None else dim,
            "overwrite": overwrite,
            "fresh": fresh,
        }
        _train_self_supervised(options, as_json)
        return
    given = [k for k, v in ssl_only.items() if v is not None] + (["--fresh"] if fresh else [])
    if given:
        raise _fail(
            f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} --self-supervised (training on labels reads a DATASET)", 2
        )
    if dataset is None:
        raise _fail("give a DATASET to train on (mnist, fashion-mnist, mnist-sample, folder PATH)", 2)
    from lookalike.models.train import COSINE_MARGIN
    from lookalike.models.train import train as run_train

    n_epochs = 12 if epochs is None else epochs

    def on_epoch(epoch: int, logs: dict[str, float]) -> None:
        shown = "  ".join(f"{k} {v:.4f}" for k, v in logs.items())
        typer.echo(f"epoch {epoch}/{n_epochs}  {shown}", err=True)

    try:
        with _progress_bar("training (batches)", unit="batch/s") as progress:
            r = run_train(
                dataset,
                path,
                out=out,
                source=source,
                limit=limit,
                test_size=test_size,
                seed=seed,
                weights=weights or "imagenet",
                layer=layer or "block3_pool",
                input_size=32 if input_size is None else input_size,
                precision=precision,
                dim=128 if dim is None else dim,
                epochs=n_epochs,
                batch_size=64 if batch_size is None else batch_size,
                learning_rate=3e-4 if learning_rate is None else learning_rate,
                loss=loss or "cosine",
                validation=0.1 if validation is None else validation,
                patience=3 if patience is None else patience,
                shift=2 if shift is None else shift,
                dropout=0.3 if dropout is None else dropout,
                margin=COSINE_MARGIN if margin is None else margin,
                overwrite=overwrite,
                on_batch=progress,
                on_epoch=on_epoch,
            )
    except KeyboardInterrupt:
        raise _fail(f"interrupted: no model was written to {out}", 130) from None
    if as_json:
        typer.echo(_dumps(r.to_dict()))
        return
    typer.echo(
        f"model:    {r.out} ({r.dim}-d, {r.description['weights']} VGG16 {r.description['layer']} + {r.description['head']}, "
        f"{r.description['loss']} loss)"
    )
    typer.echo(f"data:     {r.dataset}: trained on {r.n_train}, validated on {r.n_validation} (held-out items not used)")
    typer.echo(
        f"epochs:   {r.epochs_run} run, best {r.best_epoch} (val loss {r.best_val_loss:.4f}, val accuracy {r.best_val_accuracy:.4f})"
    )
    typer.echo(f"time:     {r.seconds:.1f} s")
    typer.echo(f"next:     lookalike ingest {r.dataset} --model {r.out} --collection {r.dataset}-trained ...")


def _train_self_supervised(options: dict[str, Any], as_json: bool) -> None:
    from pathlib import Path

    from lookalike.models import selfsup

    before: list[int] = []  # steps a resumed run had done before this process: the bar counts this process's

    def on_step(done: int, total: int, loss: float) -> None:
        if not before:
            before.append(done - 1)
        progress(done - before[0], total - before[0], note=f"loss {loss:.3f}")

    def on_epoch(epoch: int, planned: int, logs: dict[str, float]) -> None:
        typer.echo(f"epoch {epoch}/{planned}  loss {logs['loss']:.4f}  lr {logs['lr']:.2e}  {logs['seconds']:.0f} s", err=True)

    try:
        with _progress_bar("self-supervised (steps)", unit="step/s") as progress:
            r = selfsup.train_self_supervised(
                **{**options, "backbone": options["backbone"] or selfsup.DEFAULT_BACKBONE},
                on_step=on_step,
                on_epoch=on_epoch,
            )
    except KeyboardInterrupt:
        ckpt = selfsup.checkpoint_dir(Path(options["out"]).expanduser())
        kept = f"; run the same command to resume from {ckpt}" if ckpt.is_dir() else ""
        raise _fail(f"interrupted: no model was written to {options['out']}{kept}", 130) from None
    if as_json:
        typer.echo(_dumps(r.to_dict()))
        return
    d = r.description
    typer.echo(f"model:    {r.out} ({r.dim}-d, {d['base']} {d['weights']} + {d['head']}; {d['method']}, {d['loss']}, no labels read)")
    typer.echo(f"data:     {r.dataset}: {r.n_images} indexed images, augmented as {d['augment']} (held-out items not used)")
    resumed = f", resumed after epoch {r.resumed_after}" if r.resumed_after else ""
    steps = f"{r.steps} steps of {d['batch_size']}{resumed}"
    typer.echo(f"epochs:   {r.epochs_run} of {r.epochs_planned} ({steps}), final loss {r.history[-1]['loss']:.4f}")
    typer.echo(f"time:     {r.seconds:.1f} s")
    data = d["dataset"].get("dataset", r.dataset)  # (from a collection: the dataset it was ingested from)
    typer.echo(f"next:     lookalike ingest {data} ... --model {r.out} --collection {r.dataset}-selfsup")


_RAY_ADDRESS = re.compile(r"^(auto|local|ray://\S+|[\w.-]+:\d+)$")


def ray_argv(argv: list[str]) -> list[str]:
    """``--ray ADDRESS`` (auto, ray://HOST:PORT, HOST:PORT, local) as ``--ray --ray-address ADDRESS``: a flag cannot take a value."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        out.append(argv[i])
        if argv[i] == "--ray" and i + 1 < len(argv) and _RAY_ADDRESS.match(argv[i + 1]):
            if argv[i + 1] != "local":
                out += ["--ray-address", argv[i + 1]]
            i += 1
        i += 1
    return out


def main() -> None:
    """Console-script entry point."""
    sys.argv[1:] = ray_argv(sys.argv[1:])
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
