"""Export a collection to one Parquet file and import it again, here or into another store: nothing is embedded.

    lookalike export mnist --out mnist.parquet
    lookalike import mnist.parquet --collection mnist-copy --db http://server:8000

The file has one row per item: ``id`` (text), ``vector`` (a fixed-size list of float32: the stored vector
bit for bit) and ``metadata`` (its JSON text: every type kept, ints apart from floats, lists as lists).
The file's own metadata holds the collection's name, its record (the embedder, the dataset protocol,
the labels) and its notes (the last evaluation and audit). Both ways stream ``PAGE`` items at a time
(one Parquet row group each): memory does not grow with the collection.

Safety: an export is written to a temporary file beside the target and renamed when complete. An import
creates the collection marked as importing (a note naming the file); a killed import is resumed by the
same command (items already stored are skipped), and the mark goes once every row is in. An existing
collection without that mark is never touched. Images added one by one (:mod:`lookalike.core.items`) keep
their metadata, but their kept files stay where they are: copy that folder yourself.
Needs pyarrow (``pip install 'lookalike[parquet]'``).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from lookalike.core.gallery import PARTITIONS_LATER, Gallery
from lookalike.core.record import Record
from lookalike.core.store import PAGE, Store, check_name
from lookalike.errors import InputError, StoreError

FORMAT = "lookalike-collection/1"
IMPORT_NOTE = "lookalike_import"  # on a collection being imported: the file it comes from
EXTRA = "export and import need pyarrow: pip install 'lookalike[parquet]'"


def _pyarrow() -> Any:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(EXTRA) from None
    return pa, pq


@dataclass
class TransferReport:
    """What an export or import did: the collection, the file, the items, the seconds."""

    collection: str
    path: str
    items: int
    seconds: float
    db: str = ""
    resumed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def export_collection(gallery: Gallery, out: str | os.PathLike[str]) -> TransferReport:
    """Write every item of ``gallery`` (id, vector, metadata), its record and notes to the Parquet file ``out``."""
    pa, pq = _pyarrow()
    started = time.perf_counter()
    path = Path(out).expanduser()
    if path.is_dir():
        raise InputError(f"--out {out} is a directory: give a file name such as {gallery.name}.parquet")
    dim = gallery.record.embedder.dim
    col = gallery.collection()
    schema = pa.schema(
        [("id", pa.string()), ("vector", pa.list_(pa.float32(), dim)), ("metadata", pa.string())],
        metadata={
            "lookalike.format": FORMAT,
            "lookalike.collection": gallery.name,
            "lookalike.record": gallery.record.to_json(),
            "lookalike.notes": json.dumps(col.notes()),
        },
    )
    tmp = path.with_name(f".{path.name}.part-{os.getpid()}")
    n = 0
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for ids, vecs, metas in col.pages(vectors=True):
                assert vecs is not None
                if vecs.shape[1] != dim:
                    raise StoreError(f"{gallery.name!r} holds vectors of {vecs.shape[1]} numbers, not {dim}: run `lookalike check`")
                flat = pa.array(np.ascontiguousarray(vecs, np.float32).ravel(), pa.float32())
                table = pa.table(
                    {
                        "id": pa.array(ids, pa.string()),
                        "vector": pa.FixedSizeListArray.from_arrays(flat, dim),
                        "metadata": pa.array([json.dumps(m, ensure_ascii=False, sort_keys=True) for m in metas], pa.string()),
                    },
                    schema=schema,
                )
                writer.write_table(table)
                n += len(ids)
        os.replace(tmp, path)
    except OSError as exc:
        raise InputError(f"cannot write {path} ({exc.strerror or exc}): give --out a writable place") from None
    finally:
        tmp.unlink(missing_ok=True)
    return TransferReport(gallery.name, str(path), n, time.perf_counter() - started, gallery.db)


def import_collection(
    path: str | os.PathLike[str],
    *,
    collection: str | None = None,
    db: str | None = None,
    store: Store | None = None,
    wait: float | None = None,
) -> TransferReport:
    """Create collection ``collection`` (default: the exported one's name) in the store at ``db`` (or ``store``) from
    an exported file, without embedding; a killed import is resumed by calling it again."""
    _, pq = _pyarrow()
    started = time.perf_counter()
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"{path}: no such file: give a file written by `lookalike export`")
    try:
        pf = pq.ParquetFile(p)
    except Exception as exc:
        raise InputError(f"{path} is not a Parquet file ({str(exc)[:80]}): give a file written by `lookalike export`") from None
    meta = {k.decode(): v.decode() for k, v in (pf.schema_arrow.metadata or {}).items()}
    if meta.get("lookalike.format") != FORMAT or not {"id", "vector", "metadata"} <= set(pf.schema_arrow.names):
        raise InputError(f"{path} was not written by `lookalike export` (no {FORMAT} in it): export the collection again")
    record = Record.parse(meta["lookalike.record"], meta.get("lookalike.collection", "?"))
    vector_type = pf.schema_arrow.field("vector").type
    if getattr(vector_type, "list_size", None) != record.embedder.dim:
        raise InputError(f"{path}: its vectors are not of {record.embedder.dim} numbers as its record says: export the collection again")
    if record.protocol.get("files"):  # added images stay in the exporter's folder: read there, never deleted from here
        record = replace(record, protocol={**record.protocol, "files_borrowed": True})
    name = collection or meta["lookalike.collection"]
    check_name(name)
    marker = str(p.resolve())
    own = store is None
    st = store if store is not None else Store(db, create=True, wait=wait)
    try:
        resumed = False
        if st.exists(name):
            g = Gallery(st, name)
            if g.collection().note(IMPORT_NOTE) != marker:
                raise InputError(f"collection {name!r} already exists in {st.db}: import under another --collection NAME, or drop it first")
            resumed = True
        else:
            g = Gallery.create(st, name, record, notes={IMPORT_NOTE: marker})  # made and marked in one step
        dim = record.embedder.dim
        later = pf.metadata.num_rows >= PARTITIONS_LATER  # the label partitions filled after the index (see Gallery.add)
        n = 0
        for batch in pf.iter_batches(batch_size=PAGE, columns=["id", "vector", "metadata"]):
            ids = batch.column("id").to_pylist()
            vectors = batch.column("vector").flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)
            metas = [json.loads(t) for t in batch.column("metadata").to_pylist()]
            have = g.existing_ids(ids) if resumed else set()
            todo = [i for i, x in enumerate(ids) if x not in have]
            if todo:
                g.add([ids[i] for i in todo], vectors[todo], [metas[i] for i in todo], partitions_later=later)
            n += len(ids)
        if g.partitions_behind:  # (also what a killed import left)
            g.fill_partitions(release=own)
        col = g.collection()
        for key, text in json.loads(meta.get("lookalike.notes") or "{}").items():
            if key != IMPORT_NOTE:
                col.set_note(key, text)
        col.set_note(IMPORT_NOTE, "")  # complete
        return TransferReport(name, str(p), n, time.perf_counter() - started, st.db, resumed)
    finally:
        if own:
            st.close()
