"""A collection's record: what built it, stored as JSON in the Chroma collection's metadata.

The record names the embedder (its full :class:`~lookalike.models.embedder.EmbedderSpec`), the dataset
protocol (which items, which split), the label names, whether label partitions are kept, and the
schema version of the record itself. A later command rebuilds the same embedder from it and refuses
to mix another one in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from lookalike.errors import MismatchError, StoreError
from lookalike.models.embedder import EmbedderSpec

SCHEMA = 3  # 1: records written before the version field existed (read the same way); 2: before living folders
PROTOCOL_KEYS = ("dataset", "mode", "limit", "test_size", "seed", "root", "source_sha256", "labels")


@dataclass(frozen=True)
class Record:
    """What a collection holds and how it was made."""

    embedder: EmbedderSpec
    protocol: dict[str, Any]
    label_names: list[str]
    label_partitions: bool = False
    schema: int = SCHEMA
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # fields of newer minor versions, kept as they are

    @property
    def dataset(self) -> str:
        return str(self.protocol.get("dataset", "?"))

    @property
    def labelled(self) -> bool:
        """Whether the collection's items have labels (a folder of images at its root has none)."""
        return bool(self.label_names) and self.protocol.get("labels", True) is not False

    @property
    def living(self) -> bool:
        """Whether the collection mirrors a folder whose files come and go (ids without a split, fingerprints)."""
        return self.protocol.get("mode") == "living"

    @property
    def legacy_folder(self) -> bool:
        """A folder collection written before living folders (ids with the split, no fingerprints): a sync upgrades it."""
        return self.dataset == "folder" and not self.living

    def to_json(self) -> str:
        data = {
            **self.extra,
            "schema": self.schema,
            "embedder": self.embedder.to_dict(),
            "protocol": self.protocol,
            "label_names": self.label_names,
            "label_partitions": self.label_partitions,
        }
        return json.dumps(data, sort_keys=True)

    @classmethod
    def parse(cls, raw: str | None, name: str) -> Record:
        """The record of collection ``name`` from its stored JSON; StoreError naming the fix when unusable."""
        if not raw:
            raise StoreError(f"collection {name!r} has no lookalike record (was it made by `lookalike ingest`?): use another --collection")
        try:
            data = json.loads(raw)
            schema = int(data.get("schema", 1))
            embedder = EmbedderSpec.from_dict(data["embedder"])
            protocol = dict(data["protocol"])
            protocol["dataset"]
            label_names = [str(n) for n in data.get("label_names", [])]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StoreError(f"collection {name!r} has a damaged record ({type(exc).__name__}: {exc}): drop it and ingest again") from None
        if schema > SCHEMA:
            raise StoreError(f"collection {name!r} was written by a newer lookalike (record schema {schema}): upgrade lookalike")
        known = {"schema", "embedder", "protocol", "label_names", "label_partitions"}
        extra = {k: v for k, v in data.items() if k not in known}
        return cls(embedder, protocol, label_names, bool(data.get("label_partitions", False)), schema, extra)

    def check_compatible(self, wanted: Record, name: str) -> None:
        """Refuse to add ``wanted``'s items to collection ``name`` when it was built another way."""
        have_spec, want_spec = self.embedder, wanted.embedder
        if have_spec != want_spec:  # compared as specs: records written before a field existed get its default
            hint = f"pass --precision {have_spec.precision}, or " if have_spec.precision != want_spec.precision else ""
            raise MismatchError(
                f"collection {name!r} was built with embedder [{have_spec.describe()}], not [{want_spec.describe()}]: "
                f"{hint}use another --collection NAME (or `lookalike drop` it first)"
            )
        have_p, want_p = self.protocol, wanted.protocol
        diff = [k for k in PROTOCOL_KEYS if have_p.get(k) != want_p.get(k)]
        if diff:
            shown = ", ".join(f"{k}={have_p.get(k)!r} not {want_p.get(k)!r}" for k in diff)
            raise MismatchError(f"collection {name!r} holds another dataset protocol ({shown}): use another --collection NAME")
