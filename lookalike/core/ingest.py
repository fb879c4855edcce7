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
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from lookalike.core.gallery import PARTITIONS_LATER, Gallery
from lookalike.core.record import SCHEMA, Record
from lookalike.core.store import Store, check_name, default_db
from lookalike.data.catalogue import FINGERPRINT_KEYS, Plan, merge_labels
from lookalike.data.catalogue import plan as plan_sync
from lookalike.data.datasets import FOLDER_PREFIX, SPLITS, Dataset, load_dataset
from lookalike.data.filters import _same
from lookalike.data.images import Unreadable, check_max_pixels
from lookalike.data.reader import read_batches
from lookalike.data.sidecar import OWN_FIELDS, read_sidecar
from lookalike.errors import InputError, MismatchError, NotFoundError, StoreError
from lookalike.models.backbones import BACKBONES
from lookalike.models.embedder import Embedder, EmbedderSpec, build_embedder, check_options, default_embedder, defaults_by_data, make_spec
from lookalike.util import file_sha256

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (images done, images to do)
UPGRADE_BATCH = 1000  # items per write when upgrading a collection of an earlier release
# embedded items are written to the store this many at a time, or after WRITE_SECONDS, whichever comes first: each
# Chroma write call costs ~40 ms besides its items (10,000 784-d vectors: 436/s in calls of 25, 1,041/s in calls of
# 256, 1,329/s in calls of 5,000), and a batch spread over ten label partitions makes ten calls of a tenth each
WRITE_BATCH = int(os.environ.get("LOOKALIKE_WRITE_BATCH", "5000"))
WRITE_SECONDS = 10.0


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
    write_seconds: float = 0.0  # the label partitions' fill after a large write included
    # label partition entries written after the index (a write of ``PARTITIONS_LATER`` items or more, or finishing one
    # that was interrupted); 0 when they were written with each batch
    partitions_filled: int = 0
    ray_workers: int = 0  # Ray actors that embedded (0: this process did); ``seconds`` then includes Ray's start-up
    # a folder is mirrored (see lookalike.data.catalogue): files changed (re-embedded, replaced), unchanged (touched ones
    # included: their metadata refreshed), gone from the folder (``removed`` with prune, else only listed in ``gone``)
    updated: int = 0
    unchanged: int = 0
    metadata_updated: int = 0  # stored items whose sidecar fields changed (nothing embedded)
    removed: list[str] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)
    new_labels: list[str] = field(default_factory=list)
    upgraded: int = 0  # items of a collection written before living folders, given ids without the split
    relocated_from: str | None = None
    outside_labels: list[str] = field(default_factory=list)  # images at the root of a labelled folder (not stored)
    runtime: str = ""  # what ran the model here: "tensorflow" or "onnx" (lookalike.models.onnxrt); "" when nothing embedded here

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
        n = sum(self.added.values()) + self.updated
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
    seed: int | None = None,
    embedder: str | Embedder | None = None,
    weights: str | None = None,
    layer: str | None = None,
    pooling: str | None = None,
    normalize: str | None = None,
    input_size: int | None = None,
    precision: str | None = None,
    fit: str | None = None,
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
    labels: bool | None = None,
    prune: bool = False,
    relocate: bool = False,
    gps: bool = False,
    metadata: str | None = None,
    label_partitions: bool | None = None,
) -> IngestReport:
    """Embed ``dataset`` into ``collection`` (default: the dataset's name) of the store at ``db`` (or ``store``).

    ``embedder`` is a backbone's name (:mod:`lookalike.models.backbones`), ``"pixels"`` or any
    :class:`~lookalike.models.embedder.Embedder` object (its ``spec`` is recorded); ``model`` is a file written by
    ``lookalike train`` (it replaces ``embedder`` and the backbone options; the collection records its path
    and SHA-256). An existing collection's recorded embedder is used for every option not given (nothing
    to repeat; a given option that differs is refused). A new collection's defaults follow the data
    (:func:`resolve_spec`): digit-sized images get VGG16 at 32 px, photos the photo default at its native
    224 px with ``fit="crop"``. ``seed``: random weights and sampling (default 0, or the collection's). Folder images
    over ``max_pixels`` (default: Pillow's limit) are skipped and counted; files are decoded on
    ``decode_workers`` threads (default: the cores, at most 4) ahead of the embedder, straight to
    about its input size; links out of a folder are followed only with ``follow_links``. ``wait``: seconds to wait
    for another process's lock on a local store. ``progress(done, total)`` is called after each
    embedded batch; items are written ``WRITE_BATCH`` (5,000) at a time or every ``WRITE_SECONDS`` (10 s), and
    ``$LOOKALIKE_WRITE_BATCH`` sets the first.

    A folder is mirrored (:mod:`lookalike.data.catalogue`): new files are added with a split given once,
    changed files re-embedded and replaced, touched ones get new metadata, files gone are reported
    (and removed with ``prune``). ``labels``: False for an unlabelled folder (default: unlabelled when
    images lie at its root; an existing collection keeps what it recorded). ``relocate``: the
    collection's folder moved to ``path`` (the same relative paths): nothing is embedded again.
    ``metadata``: a sidecar file of fields keyed by relative path (:mod:`lookalike.data.sidecar`), checked
    whole before anything is written and recorded for later syncs (default: the one recorded); it owns
    the folder items' fields beyond lookalike's own, so an edited sidecar updates them (nothing embedded).
    A folder collection written before living folders is upgraded in place first.

    ``label_partitions`` (a new collection only; refused when it differs from an existing one's): False makes it
    without label partitions, which writes it 1.6-1.7x faster but answers label filters the way other filters are
    answered (see :meth:`lookalike.core.store.VectorCollection.query`); default: partitions when it has 1-100 labels.

    ``ray`` (or a ``ray_address``: ``auto``, ``ray://HOST:PORT``) embeds on a Ray Data actor pool
    of ``workers`` actors (``cpus_per_worker``, ``gpus_per_worker`` each; default as many as the
    cluster's CPUs allow), each reading its items from the recorded source; this process still
    plans and writes (see :mod:`lookalike.core.scaleout`). The collection is the same as without Ray.
    """
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    check_max_pixels(max_pixels)
    if decode_workers is not None and decode_workers < 1:
        raise InputError(f"--decode-workers must be at least 1, got {decode_workers}")
    if dataset != "folder" and (labels is not None or prune or relocate or gps or metadata):
        raise InputError("--no-labels, --prune, --relocate, --gps and --metadata are for folders")
    ray_options = None
    if ray or ray_address is not None:
        from lookalike.core.scaleout import RayOptions, require_ray

        ray_options = RayOptions(ray_address, workers, cpus_per_worker, gpus_per_worker)
        ray_options.check()
        require_ray()  # without the extra: one line, before anything is read
    options = {
        "weights": weights,
        "layer": layer,
        "pooling": pooling,
        "normalize": normalize,
        "input_size": input_size,
        "seed": seed,
        "precision": precision,
        "fit": fit,
    }
    model_obj: Embedder | None = None if embedder is None or isinstance(embedder, str) else embedder  # (built when needed)
    check_options(embedder if isinstance(embedder, str) else None, fit, precision)  # before the dataset is read
    name = collection or dataset
    check_name(name)
    own = store is None
    if store is None:
        try:
            store = Store(db, wait=wait)
        except NotFoundError:
            store = None  # no store yet: it is created only once there is something to write
    try:
        gallery = Gallery(store, name) if store is not None and store.exists(name) else None
        if gallery is not None and label_partitions is not None and label_partitions != gallery.record.label_partitions:
            have = "has" if gallery.record.label_partitions else "has no"
            raise InputError(
                f"collection {name!r} {have} label partitions: --label-partitions/--no-label-partitions is for a new collection"
                " (choose another --collection)"
            )
        if seed is None:
            seed = int(gallery.record.protocol.get("seed") or 0) if gallery is not None else 0
        if gallery is not None and dataset == "folder" and gallery.record.dataset == "folder":
            recorded = gallery.record.protocol  # what the collection recorded holds unless asked otherwise
            labels = labels if labels is not None else recorded.get("labels", True) is not False
            size = recorded.get("test_size")
            if test_size is None and isinstance(size, float) and 0 < size < 1:
                test_size = size  # (a count, in a collection of an earlier release, becomes the default fraction)
        ds = load_dataset(
            dataset,
            path,
            source=source,
            limit=limit,
            test_size=test_size,
            seed=seed,
            max_pixels=max_pixels,
            follow_links=follow_links,
            labels=labels,
            gps=gps,
        )
        if model_obj is not None:
            spec = model_obj.spec
        else:
            spec = resolve_spec(embedder, model, options, gallery.record.embedder if gallery is not None else None, ds)
        ds.decode_size = spec.decode_side
        if spec.model in BACKBONES:
            BACKBONES[spec.model].check_installed()  # before a store is made or Ray workers fail one by one
        record = Record(spec, ds.protocol, ds.label_names)
        report = IngestReport(name, "", ds.name, spec.describe(), dict.fromkeys(SPLITS, 0), 0, outside_labels=list(ds.outside_labels))
        if ds.living:
            recorded_sidecar = gallery.record.protocol.get("metadata") if gallery is not None else None
            sidecar = _read_sidecar(metadata or recorded_sidecar, ds, metadata is not None, gallery)
            gallery, ds, record, sync = _prepare_sync(gallery, ds, record, name, relocate, prune, report, sidecar)
            todo, replace_ids, stored = sync.embed, {it.id for it in sync.update}, sync.stored
            unhashed = sync.unreadable
        else:
            gallery, todo, stored = _plan(ds, record, name, store, report)
            replace_ids, unhashed = set(), []
        # files that could not even be read to hash them are skipped as unreadable files are
        skipped: list[tuple[str, Unreadable]] = [(loc, Unreadable(loc, "unreadable", "cannot be read")) for loc in unhashed]
        stages = dict.fromkeys(("decode", "embed", "write"), 0.0)
        started = time.perf_counter()
        writes = _Writes(ds, report, replace_ids, stages, sync.extra if ds.living else {}, stored)
        writes.partitions_later = len(todo) - len(replace_ids) >= PARTITIONS_LATER
        if todo and ray_options is not None:
            if store is None:
                store = Store(db, create=True, wait=wait)
                gallery, todo, stored = _replan(store, name, gallery, todo, stored, ds, record, report)
            started = time.perf_counter()
            report.ray_workers = _stream_ray(
                ds,
                todo,
                spec,
                record,
                name,
                store,
                gallery,
                ray_options,
                batch_size,
                max_pixels,
                skipped,
                writes,
                progress,
                partitions=label_partitions is not False,
            )
        elif todo:
            if model_obj is None:
                model_obj = build_embedder(spec)  # may fail (weights, model file): nothing written yet
            report.runtime = getattr(model_obj, "runtime", "")
            if store is None:
                store = Store(db, create=True, wait=wait)
                gallery, todo, stored = _replan(store, name, gallery, todo, stored, ds, record, report)  # made meanwhile?
            if gallery is None:
                gallery = Gallery.create(store, name, record, partitions=label_partitions is not False)
            started = time.perf_counter()  # the model's and the store's start-up are not ingest time
            _stream(ds, todo, model_obj, gallery, batch_size, decode_workers, skipped, writes, progress)
        if gallery is None and store is not None and store.exists(name):
            gallery = Gallery(store, name)  # (made by the Ray path)
        if gallery is not None and gallery.partitions_behind:  # this ingest's large write, or one interrupted before
            t = time.perf_counter()
            report.partitions_filled = gallery.fill_partitions(release=own)
            stages["write"] += time.perf_counter() - t
        report.seconds = time.perf_counter() - started
        report.db = store.db if store is not None else str(db or default_db())
    finally:
        if own and store is not None:
            store.close()
    removed = set(report.removed)
    kept = [m.get("split") for i, m in stored.items() if i not in removed]
    report.stored = {s: report.added[s] + kept.count(s) for s in SPLITS}
    report.skipped = [loc for loc, u in skipped if u.reason != "too-large"]
    report.too_large = [loc for loc, u in skipped if u.reason == "too-large"]
    report.skipped_links = list(ds.skipped_links)
    report.decode_seconds, report.embed_seconds, report.write_seconds = stages["decode"], stages["embed"], stages["write"]
    return report


def resolve_spec(
    embedder: str | None, model: str | None, options: dict[str, Any], recorded: EmbedderSpec | None, ds: Dataset
) -> EmbedderSpec:
    """The embedder an ingest uses. ``options`` (weights, layer, pooling, normalize, input_size, seed, precision,
    fit; None: not given) override the ``recorded`` spec of an existing collection, which otherwise holds whole
    (a differing result is refused by the record's check). A new collection's defaults follow ``ds``: photos
    (:meth:`~lookalike.data.datasets.Dataset.photos`) get :data:`~lookalike.models.backbones.PHOTO_DEFAULT` at its native
    size, cropped to their centre square; digit-sized images VGG16 at 32 px, squashed as always. Weights
    default to ``imagenet``."""
    given = {k: v for k, v in options.items() if v is not None}
    trained = model is not None or (recorded is not None and recorded.model == "keras" and embedder in (None, "keras"))
    if trained:  # a model file is its own embedder: only how images are made square may be chosen
        extra = sorted(set(given) - {"fit", "seed"}) + (["embedder"] if model is not None and embedder else [])
        if extra:
            raise InputError(f"a model written by `lookalike train` takes no {', '.join('--' + k.replace('_', '-') for k in extra)}")
        if model is not None:
            return make_spec("keras", weights=model, fit=given.get("fit"))
        assert recorded is not None
        return replace(recorded, fit=given.get("fit", recorded.fit))  # (the file is checked when it is loaded)
    if recorded is not None and embedder in (None, recorded.model):
        given = {k: v for k, v in given.items() if v != getattr(recorded, k)}  # (what the record says: nothing to check)
        if recorded.weights != "random" and given.get("weights", recorded.weights) != "random":
            given.pop("seed", None)  # the seed draws random weights (and the split): without them it makes no other embedder
        if not given:
            return recorded
        keep = ("normalize", "input_size", "seed", "fit")
        if recorded.model != "pixels":
            keep += ("weights", "layer", "pooling", "precision")
        base = {k: getattr(recorded, k) for k in keep}
        if "input_size" not in given:
            base["decode"] = recorded.decode  # (a collection of an earlier release decodes as it always did)
        return make_spec(recorded.model, **{**base, **given})
    photos = ds.photos()
    return make_spec(**defaults_by_data({"model": embedder or default_embedder(photos), "weights": "imagenet", **given}, photos))


def _replan(
    store: Store,
    name: str,
    gallery: Gallery | None,
    todo: list,
    stored: dict[str, dict[str, Any]],
    ds: Dataset,
    record: Record,
    report: IngestReport,
) -> tuple[Gallery | None, list, dict[str, dict[str, Any]]]:
    """After creating the store: plan again if another process made the collection meanwhile (a resume)."""
    if gallery is not None or not store.exists(name):
        return gallery, todo, stored
    if ds.living:
        raise StoreError(f"collection {name!r} was just created by another process: run the command again to sync it")
    return _plan(ds, record, name, store, report)


def _read_sidecar(path: str | None, ds: Dataset, given: bool, gallery: Gallery | None) -> tuple[str, dict[str, dict[str, Any]]] | None:
    """(the sidecar's path, id -> its fields) for the folder's items, checked whole; None without one. Rows naming
    a file the collection holds but the folder no longer has are skipped (deleting a photo does not break syncs)."""
    if not path:
        return None
    if not given and not Path(path).is_file():
        raise InputError(f"the metadata file {path} this collection recorded is gone: pass --metadata FILE (its new place)")
    sidecar = read_sidecar(path)
    known = {it.id for it in ds.items}
    unknown = [i for i in (sidecar.item_id(k, known) for k in sidecar.rows) if i not in known]
    gone = gallery.existing_ids(unknown) if gallery is not None and unknown else set()
    return str(Path(sidecar.path).resolve()), sidecar.for_items(known, gone=gone)


def _own_fields(meta: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """An item's stored metadata as a sidecar wants it: its own fields, the sidecar's, and None (Chroma: remove the key)
    for every other field it has now (the sidecar owns the fields that are not lookalike's own)."""
    return {**{k: None for k in meta if k not in OWN_FIELDS and k not in extra}, **extra}


def _prepare_sync(
    gallery: Gallery | None,
    ds: Dataset,
    record: Record,
    name: str,
    relocate: bool,
    prune: bool,
    report: IngestReport,
    sidecar: tuple[str, dict[str, dict[str, Any]]] | None = None,
) -> tuple[Gallery | None, Dataset, Record, Plan]:
    """Plan a folder's sync against its collection and do what needs no embedder, in an order a kill cannot
    spoil: upgrade a collection of an earlier release, point it at a moved folder, append new labels to the
    record, remove the files gone (``prune``), refresh touched files' metadata and the sidecar's fields.
    Returns the plan (``extra``: the sidecar's fields of the items to embed)."""
    fraction, seed = float(ds.protocol["test_size"]), int(ds.protocol["seed"])
    extra = sidecar[1] if sidecar else {}
    if sidecar:
        ds.protocol["metadata"] = sidecar[0]  # recorded for `lookalike sync` (not compared)
    if gallery is None:
        sync = plan_sync(ds, {}, fraction=fraction, seed=seed)
        sync.extra = extra
        record = replace(record, protocol=ds.protocol)
        return None, ds, replace(record, label_names=ds.label_names), sync
    have = gallery.record
    if have.embedder != record.embedder or have.dataset != "folder":
        have.check_compatible(record, name)  # the embedder's (or the dataset's) one-line refusal
    old_root, new_root = str(have.protocol.get("root")), str(ds.protocol["root"])
    if old_root != new_root:
        if not relocate:
            raise MismatchError(
                f"collection {name!r} mirrors the folder {old_root}, not {new_root}: if the folder moved there, pass --relocate "
                "(nothing is embedded again); else use another --collection NAME"
            )
        _check_relocation(gallery, new_root)
        report.relocated_from = old_root
    if have.legacy_folder:
        # refused before anything is rewritten: what the earlier release recorded must still hold
        legacy = {"limit": have.protocol.get("limit"), "seed": have.protocol.get("seed"), "labels": True}
        asked = {k: ds.protocol.get(k) for k in legacy}
        if asked != legacy:
            shown = ", ".join(f"{k}={legacy[k]!r} not {asked[k]!r}" for k in legacy if legacy[k] != asked[k])
            raise MismatchError(f"collection {name!r} holds another dataset protocol ({shown}): use another --collection NAME")
        report.upgraded = upgrade_legacy_folder(gallery, new_root, fraction)
    ds, new_labels = merge_labels(gallery.record.label_names, ds)
    report.new_labels = new_labels
    want = replace(record, label_names=ds.label_names, label_partitions=gallery.record.label_partitions)
    protocol = {**gallery.record.protocol, "root": new_root}
    for key in ("follow_links", "gps", "metadata"):  # as this ingest listed and read the folder: what `sync` repeats
        protocol.pop(key, None)
        if ds.protocol.get(key):
            protocol[key] = ds.protocol[key]
    now = replace(gallery.record, protocol=protocol)
    now.check_compatible(want, name)
    if now.protocol != gallery.record.protocol or new_labels:
        gallery.set_record(replace(now, label_names=ds.label_names))  # before any item uses a new label number
    stored = {i: m for i, m in gallery.catalogue().items() if i.startswith(FOLDER_PREFIX)}  # (not images added one by one)
    sync = plan_sync(ds, stored, fraction=fraction, seed=seed)
    sync.extra = extra
    report.unchanged = sync.unchanged + len(sync.refresh)
    report.already_stored = report.unchanged
    if prune and sync.gone:
        gallery.remove(sync.gone)
        report.removed = list(sync.gone)
    else:
        report.gone = list(sync.gone)
    updates = {it.id: _replacing(it.metadata(ds.name, ds.label_names), stored[it.id]) for it in sync.refresh}
    if sidecar:
        embedded = {it.id for it in sync.embed}
        gone = set(sync.gone)
        for item_id, meta in stored.items():
            if item_id in embedded or item_id in gone:  # (a file gone keeps its fields while it is kept)
                continue
            want = _own_fields(meta, extra.get(item_id, {}))
            if item_id in updates or any(not _same(meta.get(k), v) for k, v in want.items()):
                updates[item_id] = {**updates.get(item_id, {}), **want}
        report.metadata_updated = len(updates) - len(sync.refresh)
    if updates:
        gallery.update_metadatas(list(updates), list(updates.values()))
    log.info(
        "%s: %d new, %d changed, %d touched, %d unchanged, %d gone",
        name,
        len(sync.add),
        len(sync.update),
        len(sync.refresh),
        sync.unchanged,
        len(sync.gone),
    )
    return gallery, ds, gallery.record, sync


def _check_relocation(gallery: Gallery, new_root: str) -> None:
    """Refuse to point a collection at a folder that holds none of its files (a wrong path would prune them all)."""
    stored = gallery.catalogue()
    paths = [m.get("path") for m in stored.values() if m.get("path")]
    if paths and not any(Path(new_root, p).is_file() for p in paths[:1000]):
        raise InputError(f"none of the collection's files is under {new_root}: is it the moved folder? (nothing was changed)")


def upgrade_legacy_folder(gallery: Gallery, root: str, fraction: float) -> int:
    """Give the items of a folder collection written before living folders (ids ``folder:SPLIT:PATH``) their
    lasting ids (``folder:PATH``), fingerprints and labels numbered by name, keeping each vector and split: no
    re-embedding. A file stored under both splits keeps its training copy. Kill-safe: new ids are written
    before the old are removed, and the record says "living" only at the end. Returns the items upgraded."""
    rec = gallery.record
    ids, vecs, metas = gallery.collection().scan(vectors=True, dim=rec.embedder.dim)
    names = list(rec.label_names)
    chosen: dict[str, int] = {}
    legacy: list[str] = []
    for i, id_ in enumerate(ids):
        kind, _, rest = id_.partition(":")
        split, _, rel = rest.partition(":")
        if kind != "folder" or split not in SPLITS or not rel:
            continue
        legacy.append(id_)
        prev = chosen.get(rel)
        if prev is None or (metas[prev].get("split") != "train" and metas[i].get("split") == "train"):
            chosen[rel] = i
    for rel in sorted(chosen):
        top = rel.split("/", 1)[0]
        if top not in names:
            names.append(top)
    if names != rec.label_names:
        gallery.set_record(replace(rec, label_names=names))
    done = gallery.existing_ids([f"folder:{rel}" for rel in chosen])
    todo = [(rel, i) for rel, i in sorted(chosen.items()) if f"folder:{rel}" not in done]
    for start in range(0, len(todo), UPGRADE_BATCH):
        batch = todo[start : start + UPGRADE_BATCH]
        new_metas = []
        for rel, i in batch:
            meta = {k: v for k, v in metas[i].items() if k not in FINGERPRINT_KEYS}
            top = rel.split("/", 1)[0]
            meta.update(label=names.index(top), label_name=top, path=rel, dataset="folder")
            try:
                st = os.stat(Path(root, rel))
                meta.update(size=st.st_size, mtime_ns=st.st_mtime_ns, sha256=file_sha256(Path(root, rel)))
            except OSError:
                pass  # gone: kept without a fingerprint, reported gone by the sync
            new_metas.append(meta)
        gallery.add([f"folder:{rel}" for rel, _ in batch], vecs[[i for _, i in batch]], new_metas)
    gallery.remove(legacy)
    protocol = dict(rec.protocol)
    protocol.update(mode="living", test_size=fraction, root=root, labels=True)
    gallery.set_record(replace(rec, protocol=protocol, label_names=names, schema=SCHEMA))
    log.info("upgraded %d items of %r to lasting ids (%d duplicate copies merged)", len(chosen), gallery.name, len(legacy) - len(chosen))
    return len(chosen)


def _plan(
    ds: Dataset, record: Record, name: str, store: Store | None, report: IngestReport
) -> tuple[Gallery | None, list, dict[str, dict[str, Any]]]:
    """A source with fixed items (the array datasets): (the collection if it exists, the items to embed, the
    stored ones' splits); refuses an incompatible collection."""
    gallery = Gallery(store, name) if store is not None and store.exists(name) else None
    have: set[str] = set()
    if gallery is not None:
        gallery.record.check_compatible(record, name)
        have = gallery.existing_ids([it.id for it in ds.items])
    todo = [it for it in ds.items if it.id not in have]
    log.info("%s: %d items, %d already stored, %d to embed", name, len(ds.items), len(have), len(todo))
    report.already_stored = len(have)
    return gallery, todo, {it.id: {"split": it.split} for it in ds.items if it.id in have}


def _replacing(meta: dict[str, Any], old: dict[str, Any]) -> dict[str, Any]:
    """``meta`` as a write that replaces ``old`` (Chroma merges metadata: the keys ``meta`` lacks are set to None,
    which removes them)."""
    return {**{k: None for k in old if k not in meta}, **meta}


class _Writes:
    """Writes embedded items to the collection (new ones added, changed ones replaced), counting and timing them;
    ``extra``: fields of a sidecar by id; ``stored``: the replaced items' metadata now. Items are kept until
    ``WRITE_BATCH`` are waiting or the first waited ``WRITE_SECONDS`` (then written in one go), and at the end
    (:meth:`flush`). A process killed meanwhile loses only what was not written: a resumed ingest embeds it again."""

    def __init__(
        self,
        ds: Dataset,
        report: IngestReport,
        replace_ids: set[str],
        stages: dict[str, float],
        extra: dict[str, dict[str, Any]] | None = None,
        stored: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.ds, self.report, self.replace_ids, self.stages = ds, report, replace_ids, stages
        self.extra, self.stored = extra or {}, stored or {}
        self._gallery: Gallery | None = None
        self._items: list = []
        self._vectors: list[np.ndarray] = []
        self._since = 0.0
        self.written = 0
        self.partitions_later = False  # new items go to the index alone, the label partitions filled at the end

    def __call__(self, gallery: Gallery, items: list, vectors: np.ndarray) -> None:
        if not self._items:
            self._since = time.perf_counter()
        self._gallery = gallery
        self._items += items
        self._vectors.append(vectors)
        if len(self._items) >= WRITE_BATCH or time.perf_counter() - self._since >= WRITE_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Write the items waiting."""
        if not self._items:
            return
        assert self._gallery is not None
        gallery, items, vectors = self._gallery, self._items, np.concatenate(self._vectors)
        self._items, self._vectors = [], []
        t = time.perf_counter()
        metas = [{**it.metadata(self.ds.name, self.ds.label_names), **self.extra.get(it.id, {})} for it in items]
        metas = [_replacing(m, self.stored.get(it.id, {})) if it.id in self.replace_ids else m for it, m in zip(items, metas)]
        new = [j for j, it in enumerate(items) if it.id not in self.replace_ids]
        changed = [j for j, it in enumerate(items) if it.id in self.replace_ids]
        if changed:
            gallery.replace([items[j].id for j in changed], vectors[changed], [metas[j] for j in changed])
            self.report.updated += len(changed)
        if new:
            gallery.add([items[j].id for j in new], vectors[new], [metas[j] for j in new], partitions_later=self.partitions_later)
            for j in new:
                self.report.added[items[j].split] += 1
        self.stages["write"] += time.perf_counter() - t
        self.written += len(items)
        log.info("stored %d", self.written)


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
    skipped: list[tuple[str, Unreadable]],
    write: _Writes,
    progress: Progress | None,
    *,
    partitions: bool = True,
) -> int:
    """Embed ``todo`` on Ray (workers read and embed), write here as batches come back (the collection made at the
    first); returns the number of Ray workers."""
    from lookalike.core.scaleout import embed_on_ray

    if not todo:  # another process stored them all meanwhile
        if gallery is None:
            Gallery.create(store, name, record, partitions=partitions)
        return 0
    by_id = {it.id: it for it in todo}
    rows = [(it.id, it.metadata(ds.name, ds.label_names)) for it in todo]
    done = workers = 0
    source_errors: list[str] = []
    stages = write.stages
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
                    gallery = Gallery.create(store, name, record, partitions=partitions)
                write(gallery, [by_id[got.ids[j]] for j in ok], got.vectors[ok])
            done += len(got.ids)
            log.info("embedded %d/%d", done, len(todo))
            if progress is not None:
                progress(done, len(todo))
        write.flush()
    if gallery is None:
        Gallery.create(store, name, record, partitions=partitions)  # as a plain ingest does, even when nothing could be read
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
    skipped: list[tuple[str, Unreadable]],
    write: _Writes,
    progress: Progress | None,
) -> None:
    """Decode (ahead, on threads), embed and write ``todo`` batch by batch (``write`` groups them for the store);
    ``write.stages`` sums each stage's wall time."""
    done = 0
    stages = write.stages
    for batch in read_batches(ds, todo, batch_size, workers):
        stages["decode"] += batch.decode_seconds
        ok = [(it, im) for it, im in zip(batch.items, batch.images) if not isinstance(im, Unreadable)]
        skipped += [(it.locator, im) for it, im in zip(batch.items, batch.images) if isinstance(im, Unreadable)]
        if ok:
            t = time.perf_counter()
            vectors = np.asarray(model.embed([im for _, im in ok]), np.float32)
            stages["embed"] += time.perf_counter() - t
            write(gallery, [it for it, _ in ok], vectors)
        done += len(batch.items)
        log.info("embedded %d/%d", done, len(todo))
        if progress is not None:
            progress(done, len(todo))
    write.flush()
    if skipped:
        log.warning("skipped %d images (unreadable or over the pixel limit)", len(skipped))


def sync(
    collection: str | None = None,
    db: str | None = None,
    *,
    store: Store | None = None,
    wait: float | None = None,
    prune: bool = False,
    relocate: str | None = None,
    batch_size: int = 256,
    max_pixels: int | None = None,
    decode_workers: int | None = None,
    progress: Progress | None = None,
) -> IngestReport:
    """Mirror folder collection ``collection`` (``None``: the store's only one) again, with the embedder, folder
    and options it recorded: nothing to repeat. ``relocate``: the folder's new place. See :func:`ingest`."""
    own = store is None
    st = store if store is not None else Store(db, wait=wait)
    try:
        name = st.pick(collection)
        rec = Gallery(st, name).record
        if rec.dataset != "folder":
            raise InputError(
                f"collection {name!r} holds {rec.dataset}, not a folder: `lookalike sync` mirrors folders; use `lookalike ingest`"
            )
        p = rec.protocol
        return ingest(
            "folder",
            relocate or str(p["root"]),
            limit=p.get("limit"),
            batch_size=batch_size,
            max_pixels=max_pixels,
            follow_links=bool(p.get("follow_links")),
            gps=bool(p.get("gps")),
            decode_workers=decode_workers,
            collection=name,
            store=st,
            progress=progress,
            prune=prune,
            relocate=relocate is not None,
        )
    finally:
        if own:
            st.close()
