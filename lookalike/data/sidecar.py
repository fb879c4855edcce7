"""Sidecar metadata: a CSV or JSON Lines file of fields for a folder's images, keyed by relative path (or id).

    path,album,rating,favourite,tags
    cats/001.jpg,Holidays 2024,4,true,"[""beach"", ""sun""]"
    {"path": "cats/002.jpg", "album": "Home", "rating": 3.5, "tags": ["garden"]}

The key column is ``path`` (the file's path below the folder) or ``id`` (``folder:cats/001.jpg``).
Every other column becomes a metadata field, typed: JSON Lines values as they are; CSV cells read
as ``true``/``false`` (bool), an integer, a number, a JSON list (``["a", "b"]``: tags, filtered
with ``has``), else text. An empty cell (or null) means no value. A column holds one type (ints and
floats are both numbers). Refused, in one line naming the row and the fix, before anything is
written: a row naming no image of the folder, a key given twice, a column of two types, a field
name Chroma cannot store or that lookalike fills itself (``width``, ``label``...), a nested value,
a list of mixed types, a number that is not finite.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lookalike.errors import InputError

# fields lookalike fills itself (an item's own metadata, see datasets.Item.metadata and images.image_fields)
OWN_FIELDS = frozenset(
    {"label", "label_name", "split", "dataset", "path", "size", "mtime_ns", "sha256", "source", "index", "added", "file", "filename"}
    | {"width", "height", "format", "taken", "taken_at", "camera_make", "camera_model", "orientation", "latitude", "longitude"}
)
KEYS = ("path", "id")
_INT = re.compile(r"^[-+]?(0|[1-9]\d*)$")  # (a leading zero, as in 007 or a postcode: text)
_LEADING_ZERO = re.compile(r"^[-+]?0\d")
MAX_INT = 2**63  # Chroma stores ints in 64 bits
_FLOAT = re.compile(r"^[-+]?(\d+\.\d*|\.\d+|\d+)([eE][-+]?\d+)?$")


@dataclass
class Sidecar:
    """The rows of a sidecar file: key (relative path or id) -> fields, and the columns it has."""

    path: str
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    columns: list[str] = field(default_factory=list)
    lines: dict[str, int] = field(default_factory=dict)  # key -> its line in the file (for messages)

    def item_id(self, key: str, known: set[str], prefix: str = "folder:") -> str:
        """The id a row's key names (itself when it is a known id, else the path after ``prefix``)."""
        return key if key in known else prefix + key.removeprefix("./")

    def for_items(self, ids: Iterable[str], prefix: str = "folder:", gone: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
        """id -> fields for each of ``ids`` a row names (by id, or by the path after ``prefix``); rows naming a ``gone``
        item (stored once, its file deleted since) are skipped; InputError for a row naming none of them."""
        known, left = set(ids), set(gone)
        out: dict[str, dict[str, Any]] = {}
        for key, fields in self.rows.items():
            item_id = key if key in left else self.item_id(key, known, prefix)
            if item_id in left:
                continue
            if item_id in out:
                raise InputError(f"{self.path} line {self.lines[key]}: {key!r} names an image named before: keep one row per image")
            if item_id not in known:
                raise InputError(
                    f"{self.path} line {self.lines[key]}: {key!r} names no image of the folder (give its path below the folder, "
                    "e.g. 'cats/001.jpg', or its id): fix or remove the row"
                )
            out[item_id] = fields
        return out


def read_sidecar(path: str | Path) -> Sidecar:
    """Read and check a ``.csv`` or ``.jsonl`` sidecar (see the module's text); InputError naming the row and the fix."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"--metadata {path}: no such file: pass a CSV or JSON Lines file of fields keyed by path")
    out = Sidecar(str(p))
    kinds: dict[str, tuple[str, int]] = {}  # column -> (its type, the line that set it)
    suffix = p.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".ndjson"):
        raise InputError(f"--metadata {path}: use a .csv or .jsonl file")
    try:
        rows = list(_csv_rows(p) if suffix == ".csv" else _jsonl_rows(p))
    except UnicodeDecodeError:
        raise InputError(f"--metadata {path} is not UTF-8 text: save it as UTF-8") from None
    except OSError as exc:
        raise InputError(f"--metadata {path} cannot be read ({exc.strerror or exc})") from None
    for line, raw in rows:
        key_name = next((k for k in KEYS if k in raw), None)
        if key_name is None:
            raise InputError(f"{p} line {line}: no 'path' (or 'id') column: name each row's image in one")
        key = raw[key_name]
        if not isinstance(key, str) or not key.strip():
            raise InputError(f"{p} line {line}: the {key_name} is empty: name the row's image")
        if key in out.rows:
            raise InputError(f"{p} line {line}: {key!r} is given twice (also line {out.lines[key]}): keep one row per image")
        fields: dict[str, Any] = {}
        for name, value in raw.items():
            if name in KEYS:
                continue
            _check_name(f"{p} line {line}", name)
            if value is None or value == "" or value == []:
                continue
            kind = _kind(f"{p} line {line}", name, value)
            first = kinds.setdefault(name, (kind, line))
            if first[0] != kind:
                raise InputError(
                    f"{p} line {line}: column {name!r} holds {kind} {value!r} where line {first[1]} holds {first[0]}: "
                    "make the column one type"
                )
            fields[name] = value
        out.rows[key] = fields
        out.lines[key] = line
    out.columns = sorted(kinds)
    return out


def parse_fields(texts: Iterable[str]) -> dict[str, Any]:
    """Fields from ``key=value`` texts (``--meta``), each value typed as a CSV cell is; InputError naming the fix."""
    out: dict[str, Any] = {}
    for text in texts:
        key, eq, value = str(text).partition("=")
        if not eq or not key.strip():
            raise InputError(f"--meta {text!r}: write KEY=VALUE, e.g. --meta album=Holidays --meta rating=4")
        out[key.strip()] = _cell(value)
    return out


def check_metadata(fields: Any, where: str) -> None:
    """InputError unless ``fields`` is a dict of fields one item may carry (names and values as a sidecar's)."""
    if not isinstance(fields, dict):
        raise InputError(f'{where}: metadata is an object of fields, e.g. {{"album": "Holidays", "rating": 4}}')
    for name, value in fields.items():
        if not isinstance(name, str):
            raise InputError(f"{where}: field names are text")
        _check_name(where, name)
        if value is not None and value != "":
            _kind(where, name, value)


def _csv_rows(p: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with p.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        for header in reader.fieldnames or []:
            if header is None or not header.strip():
                raise InputError(f"{p} line 1: a column has no name: name every column")
        if len(set(reader.fieldnames or [])) != len(reader.fieldnames or []):
            raise InputError(f"{p} line 1: a column name is given twice: name each column once")
        for raw in reader:
            if None in raw:
                raise InputError(f"{p} line {reader.line_num}: more cells than columns: quote cells holding commas")
            yield reader.line_num, {k: _cell(v) if k not in KEYS else v for k, v in raw.items()}


def _cell(text: str | None) -> Any:
    text = (text or "").strip()
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if _LEADING_ZERO.match(text):
        return text
    if _INT.match(text):
        return int(text)
    if _FLOAT.match(text):
        return float(text)
    if text.startswith("["):
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


def _jsonl_rows(p: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with p.open(encoding="utf-8-sig") as f:
        for n, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except ValueError as exc:
                raise InputError(f"{p} line {n} is not JSON ({exc.msg}): write one JSON object per line") from None
            if not isinstance(row, dict):
                raise InputError(f'{p} line {n} is not a JSON object: write one object per line, e.g. {{"path": "a.jpg"}}')
            yield n, row


def _check_name(at: str, name: str) -> None:
    if not name or name.startswith(("$", "#", "chroma:")) or name != name.strip():
        raise InputError(f"{at}: field name {name!r} cannot be stored: use letters, digits, '_' (not starting with $ or #)")
    if name in OWN_FIELDS:
        raise InputError(f"{at}: field {name!r} is one lookalike fills itself: rename the column")


def _kind(at: str, name: str, value: Any) -> str:
    """The type of a value Chroma can store (bool, number, text, list of one of them); InputError otherwise."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise InputError(f"{at}: {name!r} is {value!r}: give a finite number or leave the cell empty")
        if isinstance(value, int) and not -MAX_INT <= value < MAX_INT:
            raise InputError(f"{at}: {name!r} is {value}, beyond 64-bit integers: store it as text (quote it in JSON Lines)")
        return "number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        for v in value:
            if isinstance(v, (list, dict)):
                raise InputError(f"{at}: {name!r} is a list of nested values: give text, numbers or true/false in it")
            _kind(at, name, v)
        kinds = {type(v).__name__ for v in value}  # Chroma: one Python type per list (not even ints with floats)
        if len(kinds) != 1:
            raise InputError(f"{at}: {name!r} is a list of mixed types ({', '.join(sorted(kinds))}): give one type (e.g. tags as text)")
        return f"list of {kinds.pop()}"
    raise InputError(f"{at}: {name!r} is {type(value).__name__} {json.dumps(value)[:40]}: give text, a number, true/false or a list")
