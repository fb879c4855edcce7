"""The catalogue: a living source's items (identity, split, fingerprint, label), planned against what is stored.

A folder's files come and go. Its catalogue is the list of items the folder holds now (from
:func:`lookalike.data.datasets.load_dataset`: an id that is the file's path below the root, the label of
its first folder, size and modification time) and the same fields of the items a collection holds
(read back from the vector index's metadata, without vectors). :func:`plan` compares the two, like
llm's ``embed_multi`` compares content hashes, and says what an ingest must do:

- **add** a file the collection lacks, with a split given once and stored (:func:`assign_splits`);
- **update** a file whose content changed (re-embed it, replace it in the index; its split stays);
- **refresh** a file touched but not changed (same SHA-256, other size/time: metadata only);
- leave the **unchanged** ones alone (same size and modification time: the fast check, no read);
- report the ones **gone** from the folder (removed with ``--prune``).

The split rule. Each label's held-out items are kept at the asked fraction *as the folder grows*,
and no stored item ever changes split: the new items of a label fill its quota,
``round(fraction x (kept + new)) - kept held out``, clamped to ``[0, new]``, taking the new items in
the order of a seeded keyed hash of their ids (:func:`lookalike.util.split_key`). The split is then
stored with the item. A plain keyed-hash rule (held out iff the key is below the fraction) would
need no storage but drifts like a coin: for a label of 100 items its held-out share has a standard
deviation of 4 points; the quota rule keeps every label within one item of the fraction whenever
something is added, and a sync killed halfway and run again gives each item the split the
uninterrupted sync would have (the held-out ones are the lowest keys either way).

Nothing here talks to the store: :mod:`lookalike.core.ingest` reads the stored side and applies the plan.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from lookalike.data.datasets import Dataset, Item
from lookalike.data.images import image_fields
from lookalike.util import UNLABELLED, file_sha256, split_key

log = logging.getLogger(__name__)

FINGERPRINT_KEYS = ("size", "mtime_ns", "sha256")
HASH_WORKERS = 4  # threads hashing files (hashlib releases the GIL)


@dataclass
class Plan:
    """What a sync of a living source must do to mirror it (see the module's text)."""

    add: list[Item] = field(default_factory=list)  # split and sha256 given
    update: list[Item] = field(default_factory=list)  # content changed: re-embed, replace (split kept)
    refresh: list[Item] = field(default_factory=list)  # same content, another size/time: new metadata only
    unchanged: int = 0
    gone: list[str] = field(default_factory=list)  # stored ids whose file is no longer in the source
    unreadable: list[str] = field(default_factory=list)  # files that could not be hashed (gone while listed, no permission)
    extra: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)  # a sidecar's fields by id (see lookalike.data.sidecar)
    stored: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)  # the stored side it was made from

    @property
    def embed(self) -> list[Item]:
        """The items to embed: updated ones first (they replace stored vectors), then new ones."""
        return self.update + self.add


def merge_labels(recorded: Sequence[str], ds: Dataset) -> tuple[Dataset, list[str]]:
    """``ds`` numbered by the collection's ``recorded`` label names, new names appended (sorted): append-only.

    An item's label number never changes once stored: a new label folder that sorts before the
    others gets the next free number, not the others' numbers. Returns (the renumbered dataset, the
    new names).
    """
    if list(recorded) == list(ds.label_names) or not ds.label_names:
        return ds, []
    names = list(recorded)
    new = sorted(n for n in ds.label_names if n not in names)
    names += new
    number = {old: names.index(n) for old, n in enumerate(ds.label_names)}
    items = [it if it.label == UNLABELLED else replace(it, label=number[it.label]) for it in ds.items]
    return replace(ds, label_names=names, items=items), new


def plan(ds: Dataset, stored: dict[str, dict[str, Any]], *, fraction: float, seed: int, workers: int = HASH_WORKERS) -> Plan:
    """Compare the source's items ``ds.items`` (labels numbered as stored: :func:`merge_labels`) with ``stored``
    (id -> metadata of what the collection holds) and plan the sync; new items get their split here."""
    root = ds.protocol["root"]
    out = Plan(stored=stored)
    new: list[Item] = []
    to_hash: list[Item] = []
    kept: list[tuple[int, str]] = []  # (label, split) of stored items still in the source
    for it in ds.items:
        meta = stored.get(it.id)
        if meta is None:
            new.append(it)
            to_hash.append(it)
            continue
        kept.append((it.label, str(meta.get("split", ""))))
        same = meta.get("size") == it.size and meta.get("mtime_ns") == it.mtime_ns and meta.get("sha256")
        if same and "format" in meta:
            out.unchanged += 1
        else:
            to_hash.append(it)  # (an item stored before files' own fields were kept gets them once: a refresh)
    hashes, fields = _hash_files(root, to_hash, workers, gps=bool(ds.protocol.get("gps")))
    for it in to_hash:
        digest = hashes.get(it.id)
        if digest is None:
            out.unreadable.append(it.locator)
            continue
        meta = stored.get(it.id)
        if meta is None:
            continue  # new: split given below
        done = replace(it, split=str(meta.get("split", "")), sha256=digest, fields=fields[it.id])
        if meta.get("sha256") in (digest, None, ""):  # the same content (or a migrated item that had none): metadata only
            out.refresh.append(done)
        else:
            out.update.append(done)
    readable_new = [replace(it, sha256=hashes[it.id], fields=fields[it.id]) for it in new if it.id in hashes]
    out.add = assign_splits(readable_new, kept, fraction=fraction, seed=seed)
    present = {it.id for it in ds.items}
    out.gone = sorted(i for i in stored if i not in present)
    return out


def assign_splits(new: Sequence[Item], kept: Iterable[tuple[int, str]], *, fraction: float, seed: int) -> list[Item]:
    """``new`` items with a split each: per label, the new items fill the held-out quota
    ``round(fraction x (kept + new)) - kept held out`` (clamped to ``[0, new]``), lowest keyed hash first.

    ``kept``: (label, split) of the label's items already stored (and still in the source); they never move.
    """
    kept_total: dict[int, int] = {}
    kept_test: dict[int, int] = {}
    for label, split in kept:
        kept_total[label] = kept_total.get(label, 0) + 1
        kept_test[label] = kept_test.get(label, 0) + (split == "test")
    by_label: dict[int, list[Item]] = {}
    for it in new:
        by_label.setdefault(it.label, []).append(it)
    split_of: dict[str, str] = {}
    for label, items in by_label.items():
        total = kept_total.get(label, 0) + len(items)
        target = math.floor(fraction * total + 0.5)
        need = min(max(target - kept_test.get(label, 0), 0), len(items))
        order = sorted(items, key=lambda it: split_key(seed, it.id))
        for rank, it in enumerate(order):
            split_of[it.id] = "test" if rank < need else "train"
    return [replace(it, split=split_of[it.id]) for it in new]


def balance(items: Iterable[tuple[int, str]]) -> dict[int, tuple[int, int]]:
    """label -> (held-out items, items) of (label, split) pairs."""
    out: dict[int, tuple[int, int]] = {}
    for label, split in items:
        test, total = out.get(label, (0, 0))
        out[label] = (test + (split == "test"), total + 1)
    return out


def fingerprint_missing(meta: dict[str, Any]) -> bool:
    """Whether a stored folder item lacks its fingerprint (size, modification time, SHA-256)."""
    return any(meta.get(k) in (None, "") for k in FINGERPRINT_KEYS)


def _hash_files(
    root: str, items: Sequence[Item], workers: int, gps: bool = False
) -> tuple[dict[str, str], dict[str, tuple[tuple[str, Any], ...]]]:
    """(id -> SHA-256 of each item's file, absent when it cannot be read; id -> the file's own fields)."""
    if not items:
        return {}, {}

    def one(it: Item) -> tuple[str, str | None, tuple[tuple[str, Any], ...]]:
        path = f"{root}/{it.locator}"
        try:
            digest = file_sha256(path)
        except OSError as exc:
            log.warning("cannot read %s: %s", it.locator, exc.strerror or exc)
            return it.id, None, ()
        return it.id, digest, tuple(sorted(image_fields(path, gps).items()))

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(items)))) as pool:
        got = list(pool.map(one, items))
    return {i: d for i, d, _ in got if d is not None}, {i: f for i, d, f in got if d is not None}
