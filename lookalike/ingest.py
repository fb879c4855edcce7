"""Ingest: stream a dataset through an embedder into a collection, resumably.

Work is done in batches (read pixels, embed, write), so memory does not grow with the dataset.
Ids are stable, so a rerun asks the store which ids it already holds and embeds only the rest: an
interrupted ingest resumes with no duplicate and no loss, and a second identical run adds nothing.
Everything that can fail on bad input (dataset, options, weights, an incompatible collection) is
checked before the first write.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from lookalike.datasets import SPLITS, Dataset, load_dataset
from lookalike.embedder import Embedder, build_embedder, make_spec
from lookalike.errors import InputError, NotFoundError
from lookalike.gallery import Gallery
from lookalike.images import Unreadable, check_max_pixels
from lookalike.reader import read_batches
from lookalike.record import Record
from lookalike.store import Store, check_name, default_db

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (images done, images to do)


@dataclass
class IngestReport:
    """What an ingest did. ``added``/``stored`` count items per split; ``skipped`` lists unreadable files
    and ``too_large`` the files over the pixel limit (neither is stored)."""

    collection: str
    db: str
    dataset: str
    embedder: str
    added: dict[str, int]
    already_stored: int
    skipped: list[str] = field(default_factory=list)
    stored: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0  # from the first batch to the last (the model's and the store's start-up excluded)
    too_large: list[str] = field(default_factory=list)
    skipped_links: list[str] = field(default_factory=list)
    decode_seconds: float = 0.0  # wall time of each stage, summed over batches; decoding overlaps the others
    embed_seconds: float = 0.0
    write_seconds: float = 0.0
    ray_workers: int = 0  # Ray actors that embedded (0: this process did); ``seconds`` then includes Ray's start-up

    @property
    def images_per_s(self) -> float:
        return self._rate(self.seconds)

    @property
    def decode_images_per_s(self) -> float:
        return self._rate(self.decode_seconds)

    @property
    def embed_images_per_s(self) -> float:
        return self._rate(self.embed_seconds)

    def _rate(self, seconds: float) -> float:
        n = sum(self.added.values())
        return n / seconds if seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        rates = {
            "images_per_s": self.images_per_s,
            "decode_images_per_s": self.decode_images_per_s,
            "embed_images_per_s": self.embed_images_per_s,
        }
        return {**asdict(self), **rates}


def ingest(
    dataset: str,
    path: str | None = None,
    *,
    source: str | None = None,
    limit: int | None = None,
    test_size: float | None = None,
    seed: int = 0,
    embedder: str | Embedder = "vgg16",
    weights: str = "imagenet",
    layer: str = "block4_pool",
    pooling: str = "max",
    normalize: str | None = None,
    input_size: int | None = None,
    precision: str | None = None,
    model: str | None = None,
    batch_size: int = 256,
    max_pixels: int | None = None,
    follow_links: bool = False,
    decode_workers: int | None = None,
    collection: str | None = None,
    db: str | None = None,
    store: Store | None = None,
    wait: float | None = None,
    progress: Progress | None = None,
    ray: bool = False,
    ray_address: str | None = None,
    workers: int | None = None,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
) -> IngestReport:
    """Embed ``dataset`` into ``collection`` (default: the dataset's name) of the store at ``db`` (or ``store``).

    ``embedder`` is ``"vgg16"``, ``"pixels"`` or any :class:`~lookalike.embedder.Embedder` object
    (its ``spec`` is recorded); ``model`` is a file written by ``lookalike train`` (it replaces
    ``embedder`` and the VGG16 options; the collection records its path and SHA-256). Folder images
    over ``max_pixels`` (default: Pillow's limit) are skipped and counted; files are decoded on
    ``decode_workers`` threads (default: the cores, at most 4) ahead of the embedder, straight to
    about its input size; links out of a folder are followed only with ``follow_links``. ``wait``: seconds to wait
    for another process's lock on a local store. ``progress(done, total)`` is called after each
    written batch.

    ``ray`` (or a ``ray_address``: ``auto``, ``ray://HOST:PORT``) embeds on a Ray Data actor pool
    of ``workers`` actors (``cpus_per_worker``, ``gpus_per_worker`` each; default as many as the
    cluster's CPUs allow), each reading its items from the recorded source; this process still
    plans and writes (see :mod:`lookalike.scaleout`). The collection is the same as without Ray.
    """
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    check_max_pixels(max_pixels)
    if decode_workers is not None and decode_workers < 1:
        raise InputError(f"--decode-workers must be at least 1, got {decode_workers}")
    ray_options = None
    if ray or ray_address is not None:
        from lookalike.scaleout import RayOptions, require_ray

        ray_options = RayOptions(ray_address, workers, cpus_per_worker, gpus_per_worker)
        ray_options.check()
        require_ray()  # without the extra: one line, before anything is read
    if model is not None:
        spec = make_spec("keras", weights=model)
        model_obj: Embedder | None = None
    elif isinstance(embedder, str):
        spec = make_spec(
            embedder,
            weights=weights,
            layer=layer,
            pooling=pooling,
            normalize=normalize,
            input_size=input_size,
            seed=seed,
            precision=precision,
        )
        model_obj = None
    else:
        spec, model_obj = embedder.spec, embedder
    ds = load_dataset(
        dataset,
        path,
        source=source,
        limit=limit,
        test_size=test_size,
        seed=seed,
        max_pixels=max_pixels,
        decode_size=spec.input_size,
        follow_links=follow_links,
    )
    name = collection or ds.name
    check_name(name)
    record = Record(spec, ds.protocol, ds.label_names)
    own = store is None
    if store is None:
        try:
            store = Store(db, wait=wait)
        except NotFoundError:
            store = None  # no store yet: it is created only once there is something to write
    try:
        gallery, have, todo = _plan(ds, record, name, store)
        added = dict.fromkeys(SPLITS, 0)
        skipped: list[tuple[str, Unreadable]] = []
        stages = dict.fromkeys(("decode", "embed", "write"), 0.0)
        ray_workers = 0
        started = time.perf_counter()
        if todo and ray_options is not None:
            if store is None:
                store = Store(db, create=True, wait=wait)
                gallery, have, todo = _plan(ds, record, name, store)
            started = time.perf_counter()
            ray_workers = _stream_ray(
                ds, todo, spec, record, name, store, gallery, ray_options, batch_size, max_pixels, added, skipped, stages, progress
            )
        elif todo:
            if model_obj is None:
                model_obj = build_embedder(spec)  # may fail (weights, model file): nothing written yet
            if store is None:
                store = Store(db, create=True, wait=wait)
                gallery, have, todo = _plan(ds, record, name, store)  # another process may have made it meanwhile
            if gallery is None:
                gallery = Gallery.create(store, name, record)
            started = time.perf_counter()  # the model's and the store's start-up are not ingest time
            _stream(ds, todo, model_obj, gallery, batch_size, decode_workers, added, skipped, stages, progress)
        seconds = time.perf_counter() - started
        where = store.db if store is not None else str(db or default_db())
    finally:
        if own and store is not None:
            store.close()
    stored = {s: added[s] + sum(1 for it in ds.items if it.split == s and it.id in have) for s in SPLITS}
    unreadable = [loc for loc, u in skipped if u.reason != "too-large"]
    too_large = [loc for loc, u in skipped if u.reason == "too-large"]
    return IngestReport(
        name,
        where,
        ds.name,
        spec.describe(),
        added,
        len(have),
        unreadable,
        stored,
        seconds,
        too_large,
        list(ds.skipped_links),
        stages["decode"],
        stages["embed"],
        stages["write"],
        ray_workers,
    )


def _plan(ds: Dataset, record: Record, name: str, store: Store | None) -> tuple[Gallery | None, set[str], list]:
    """(the collection if it exists, the ids it already holds, the items to embed); refuses an incompatible collection."""
    gallery = Gallery(store, name) if store is not None and store.exists(name) else None
    have: set[str] = set()
    if gallery is not None:
        gallery.record.check_compatible(record, name)
        have = gallery.existing_ids([it.id for it in ds.items])
    todo = [it for it in ds.items if it.id not in have]
    log.info("%s: %d items, %d already stored, %d to embed", name, len(ds.items), len(have), len(todo))
    return gallery, have, todo


def _stream_ray(
    ds: Dataset,
    todo: list,
    spec: Any,
    record: Record,
    name: str,
    store: Store,
    gallery: Gallery | None,
    options: Any,
    batch_size: int,
    max_pixels: int | None,
    added: dict[str, int],
    skipped: list[tuple[str, Unreadable]],
    stages: dict[str, float],
    progress: Progress | None,
) -> int:
    """Embed ``todo`` on Ray (workers read and embed), write here as batches come back (the collection made at the
    first); returns the number of Ray workers."""
    from lookalike.scaleout import embed_on_ray

    if not todo:  # another process stored them all meanwhile
        if gallery is None:
            Gallery.create(store, name, record)
        return 0
    by_id = {it.id: it for it in todo}
    rows = [(it.id, it.metadata(ds.name, ds.label_names)) for it in todo]
    done = workers = 0
    source_errors: list[str] = []
    if progress is not None:
        progress(0, len(todo))  # the bar is up while Ray starts
    batches = embed_on_ray(spec.to_dict(), ds.protocol, rows, options=options, batch_size=batch_size, max_pixels=max_pixels)
    with contextlib.closing(batches):  # an error here (a write, Ctrl-C) shuts Ray down now, not at garbage collection
        for got in batches:
            workers = got.workers
            stages["decode"] += got.decode_seconds
            stages["embed"] += got.embed_seconds
            ok = [j for j, err in enumerate(got.errors) if not err]
            for item_id, err in zip(got.ids, got.errors):
                if err:
                    reason, _, detail = err.partition(": ")
                    locator = by_id[item_id].locator
                    skipped.append((locator, Unreadable(locator, "too-large" if reason == "too-large" else "unreadable", detail)))
                    if reason == "source":
                        source_errors.append(detail)
            if ok:
                if gallery is None:
                    gallery = Gallery.create(store, name, record)
                _write(gallery, ds, [by_id[got.ids[j]] for j in ok], got.vectors[ok], added, stages)
            done += len(got.ids)
            log.info("stored %d/%d", done, len(todo))
            if progress is not None:
                progress(done, len(todo))
    if gallery is None:
        Gallery.create(store, name, record)  # as a plain ingest does, even when nothing could be read
    if source_errors:
        log.warning("%d items: a Ray worker could not read the source: %s", len(source_errors), source_errors[0])
    return workers


def _stream(
    ds: Dataset,
    todo: list,
    model: Embedder,
    gallery: Gallery,
    batch_size: int,
    workers: int | None,
    added: dict[str, int],
    skipped: list[tuple[str, Unreadable]],
    stages: dict[str, float],
    progress: Progress | None,
) -> None:
    """Decode (ahead, on threads), embed and write ``todo`` batch by batch; ``stages`` sums each stage's wall time."""
    done = 0
    for batch in read_batches(ds, todo, batch_size, workers):
        stages["decode"] += batch.decode_seconds
        ok = [(it, im) for it, im in zip(batch.items, batch.images) if not isinstance(im, Unreadable)]
        skipped += [(it.locator, im) for it, im in zip(batch.items, batch.images) if isinstance(im, Unreadable)]
        if ok:
            t = time.perf_counter()
            vectors = np.asarray(model.embed([im for _, im in ok]), np.float32)
            stages["embed"] += time.perf_counter() - t
            _write(gallery, ds, [it for it, _ in ok], vectors, added, stages)
        done += len(batch.items)
        log.info("stored %d/%d", done, len(todo))
        if progress is not None:
            progress(done, len(todo))
    if skipped:
        log.warning("skipped %d images (unreadable or over the pixel limit)", len(skipped))


def _write(gallery: Gallery, ds: Dataset, items: list, vectors: np.ndarray, added: dict[str, int], stages: dict[str, float]) -> None:
    """Store ``items`` with their ``vectors`` and metadata; count them per split, time the write."""
    t = time.perf_counter()
    gallery.add([it.id for it in items], vectors, [it.metadata(ds.name, ds.label_names) for it in items])
    stages["write"] += time.perf_counter() - t
    for it in items:
        added[it.split] += 1
