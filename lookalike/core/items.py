"""Single images in and out of a collection: :func:`add_images` and :func:`remove_items` (the CLI's ``add`` and
``remove``, the service's ``POST``/``DELETE`` of items), like fiftyone-brain's ``add_to_index`` /
``remove_from_index``.

An added image is kept: its bytes are written once to a content-addressed folder (beside a local store,
``DB/lookalike-files/COLLECTION``, or a directory the caller names, recorded with the collection), so
its thumbnail and a later re-embedding work whatever happens to the original. Its id comes from its
content (``added:`` and the first 16 hex digits of its SHA-256): adding the same image again changes
nothing. Its metadata: label (a labelled collection needs one; a new label name is appended to the
collection's), ``split`` ``train`` (it is searched), ``file`` (below the kept folder), ``filename``,
``size``, ``sha256``, ``added`` (seconds since 1970, UTC), the file's own fields (width, height, format,
EXIF; see :func:`lookalike.data.images.image_fields`) and the caller's fields (checked as a sidecar's are).

Order, for a process killed at any point: files first (an orphan file is harmless), then the record
(a new label), then the vectors (label partitions first, as every write). A removal deletes partitions
first, then the index, then kept files: run again, it completes (a kept file whose item was already
gone stays, an orphan: harmless). A collection imported from an export borrows the exporter's kept
folder: it reads from it but never deletes there.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from lookalike.core.gallery import Gallery
from lookalike.core.store import is_server
from lookalike.data.datasets import ADDED_PREFIX as PREFIX
from lookalike.data.filters import combine, parse_where
from lookalike.data.images import image_fields
from lookalike.data.sidecar import check_metadata, parse_fields
from lookalike.errors import InputError
from lookalike.util import UNLABELLED

FILES_DIR = "lookalike-files"


@dataclass
class AddReport:
    """What :func:`add_images` did: the id of each image given (in order), which were new and which already stored."""

    collection: str
    ids: list[str]
    added: list[str] = field(default_factory=list)
    already_stored: list[str] = field(default_factory=list)
    new_labels: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RemoveReport:
    """What :func:`remove_items` did: ids removed, ids asked for that were not stored, and removed items whose file
    is still in the collection's folder (its next sync adds them again)."""

    collection: str
    removed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    still_in_folder: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ItemsPage:
    """One page of :func:`list_items`: the items (id, label, split, metadata) in write order, and the cursor of the next
    page (None after the last)."""

    collection: str
    items: list[dict[str, Any]]
    next_cursor: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


MAX_LIST = 1000  # items a page of list_items may hold


def list_items(
    gallery: Gallery,
    *,
    labels: Sequence[int | str] | None = None,
    split: str | None = None,
    where: dict[str, Any] | Sequence[str] | None = None,
    cursor: str | None = None,
    limit: int = 100,
) -> ItemsPage:
    """The stored items matching the filters, ``limit`` at a time, in the order they were first written (a replaced
    item keeps its place), like immich's or FiftyOne's paged listings. ``cursor``: the ``next_cursor`` of the page
    before (None: from the start). On a local store the cursor is a place in lookalike's id index
    (:mod:`lookalike.core.idindex`), not an offset: a page costs about the same wherever it starts, and items added or
    removed meanwhile shift nothing (new ones come at the end). A filtered page looks at a bounded number of items, so
    a rare filter's page may hold fewer than ``limit`` and still give a cursor: the listing ends when ``next_cursor``
    is None. On a ``chroma run`` server the cursor is an offset in Chroma's order."""
    if not 1 <= limit <= MAX_LIST:
        raise InputError(f"--limit must be 1 to {MAX_LIST:,}, got {limit}")
    filt = parse_where(where) if where is not None and not isinstance(where, dict) else where
    gallery.check_where(filt)
    ids, metas, nxt = gallery.page(combine(gallery.where(labels, split), filt), cursor or None, limit)
    items = []
    for i, m in zip(ids, metas):
        label = m.get("label", UNLABELLED)
        label = label if isinstance(label, int) and not isinstance(label, bool) else UNLABELLED
        items.append({"id": i, "label": label, "label_name": gallery.label_name(label), "split": str(m.get("split", "")), "metadata": m})
    return ItemsPage(gallery.name, items, nxt)


def files_dir(gallery: Gallery, files: str | os.PathLike[str] | None = None) -> Path:
    """Where ``gallery`` keeps added images: the recorded folder, else ``FILES/NAME`` (a directory the caller names,
    one subfolder per collection), else ``DB/lookalike-files/NAME`` beside a local store (a server's collection
    needs ``files`` the first time). A ``files`` other than the recorded one is refused: the kept images are there."""
    recorded = gallery.record.protocol.get("files")
    asked = (Path(files).expanduser() / gallery.name).resolve() if files is not None else None
    if recorded:
        if asked is not None and asked != Path(recorded):
            raise InputError(
                f"collection {gallery.name!r} keeps its added images in {recorded}: leave out --files (or move them and import again)"
            )
        return Path(recorded)
    if asked is not None:
        return asked
    if is_server(gallery.db):
        raise InputError(f"collection {gallery.name!r} lives on a server: name a directory to keep added images in with --files DIR")
    return (Path(gallery.db).expanduser() / FILES_DIR / gallery.name).resolve()


def add_images(
    gallery: Gallery,
    images: Sequence[str | os.PathLike[str] | tuple[str, bytes]],
    *,
    label: str | None = None,
    metadata: dict[str, Any] | Sequence[str] | None = None,
    files: str | os.PathLike[str] | None = None,
) -> AddReport:
    """Embed and add images (file paths, or ``(filename, bytes)`` pairs) to ``gallery``; see the module's text.

    ``label``: a label name (a new one is appended); required when the collection is labelled, refused when not.
    ``metadata``: fields for every image (a dict, or ``key=value`` texts typed as a CSV sidecar's cells).
    Every image is read and checked before anything is written; InputError naming the fix otherwise.
    """
    if not images:
        raise InputError("give at least one image file to add")
    fields = parse_fields(metadata) if isinstance(metadata, (list, tuple)) else metadata
    check_metadata(fields if fields is not None else {}, "--meta")
    fields = {k: v for k, v in (fields or {}).items() if v is not None and v != "" and v != []}  # no value: no field
    rec = gallery.record
    new_labels: list[str] = []
    if not rec.labelled:
        if label is not None:
            raise InputError(f"collection {gallery.name!r} is unlabelled: leave out --label")
        number = UNLABELLED
    else:
        if label is None or not str(label).strip():
            shown = ", ".join(rec.label_names[:20])
            raise InputError(f"collection {gallery.name!r} is labelled: pass --label NAME (one of {shown}, or a new name)")
        label = str(label).strip()
        if label not in rec.label_names:
            new_labels = [label]
        number = (rec.label_names + new_labels).index(label)
    blobs: list[tuple[str, bytes]] = []
    for img in images:
        if isinstance(img, tuple):
            blobs.append((img[0], img[1]))
            continue
        p = Path(img).expanduser()
        try:
            blobs.append((p.name, p.read_bytes()))
        except OSError as exc:
            raise InputError(f"cannot read {img} ({exc.strerror or exc}): give an image file") from None
    pixels, digests = [], []
    for name, data in blobs:  # every image decodes before anything is written
        pixels.append(gallery.read_query_image(data, name=name))
        digests.append(hashlib.sha256(data).hexdigest())
    ids = [PREFIX + d[:16] for d in digests]
    stored = gallery.existing_ids(list(dict.fromkeys(ids)))
    todo = [j for j, i in enumerate(ids) if i not in stored and i not in ids[:j]]
    report = AddReport(gallery.name, ids, [ids[j] for j in todo], sorted(stored), new_labels)
    if not todo:
        return report
    folder = files_dir(gallery, files)
    metas = []
    now = int(time.time())
    for j in todo:
        name, data = blobs[j]
        rel = _keep(folder, digests[j], Path(name).suffix.lower(), data)
        meta: dict[str, Any] = {**image_fields(folder / rel), **fields}
        meta.update(
            label=number,
            label_name=label if number != UNLABELLED else "unlabelled",
            split="train",
            dataset=rec.dataset,
            file=rel,
            filename=name,
            size=len(data),
            sha256=digests[j],
            added=now,
        )
        metas.append(meta)
    protocol = rec.protocol if rec.protocol.get("files") == str(folder) else {**rec.protocol, "files": str(folder)}
    if new_labels or protocol is not rec.protocol:
        gallery.set_record(replace(rec, protocol=protocol, label_names=rec.label_names + new_labels))
    vectors = gallery.embed([pixels[j] for j in todo])
    gallery.add([ids[j] for j in todo], vectors, metas)
    return report


def _keep(folder: Path, digest: str, suffix: str, data: bytes) -> str:
    """Write ``data`` once under ``folder`` by its digest (atomically); returns its path below ``folder``."""
    suffix = suffix if suffix and len(suffix) <= 6 and suffix[1:].isalnum() else ".img"
    rel = f"{digest[:2]}/{digest}{suffix}"
    path = folder / rel
    if path.is_file() and path.stat().st_size == len(data):
        return rel
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".part-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        raise InputError(f"cannot keep the image in {folder} ({exc.strerror or exc}): pass --files DIR, a writable directory") from None
    return rel


def remove_items(gallery: Gallery, ids: Sequence[str] = (), *, where: dict[str, Any] | Sequence[str] | None = None) -> RemoveReport:
    """Remove items by id and/or every item matching ``where`` (Chroma's dict form, or ``--where`` texts) from the
    index and its label partitions; the kept files of added images go too. Ids not stored are reported, not an error."""
    if isinstance(where, (list, tuple)):
        where = parse_where(list(where))
    if not ids and not where:
        raise InputError("name the items to remove: give ids, or --where FILTER")
    gallery.check_where(where)
    report = RemoveReport(gallery.name)
    asked = list(dict.fromkeys(ids))
    got_ids, _, metas = gallery.get(asked)
    found = dict(zip(got_ids, metas))
    report.missing = [i for i in asked if i not in found]
    if where:
        for page_ids, _, page_metas in gallery.collection().pages(where, vectors=False):
            found.update(zip(page_ids, page_metas))
    if not found:
        return report
    gallery.remove(list(found))
    report.removed = sorted(found)
    folder = gallery.record.protocol.get("files") if not gallery.record.protocol.get("files_borrowed") else None
    root = gallery.record.protocol.get("root") if gallery.record.living else None
    for item_id, meta in found.items():
        if folder and item_id.startswith(PREFIX) and meta.get("file"):
            (Path(folder) / str(meta["file"])).unlink(missing_ok=True)
        elif root and meta.get("path") and (Path(root) / str(meta["path"])).exists():
            report.still_in_folder.append(item_id)
    return report
