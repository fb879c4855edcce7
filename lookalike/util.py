"""Small helpers shared by several modules: file hashing, pinned files, label names, short messages."""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lookalike.errors import EmbedderError


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (pins a source, weights or model file in a collection's record)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_pinned_file(path: Path, sha256: str | None, what: str, fix: str) -> None:
    """EmbedderError unless ``path`` exists with content ``sha256`` (when given); ``fix`` ends the missing-file message."""
    if not path.is_file():
        raise EmbedderError(f"{what} {path} is missing: restore it, or {fix}")
    if sha256 and file_sha256(path) != sha256:
        raise EmbedderError(f"{what} {path} changed since the collection was built: restore it or re-ingest into a new collection")


def cache_dir(kind: str) -> Path:
    """Where lookalike keeps what it can recompute (maps, converted models): ``$LOOKALIKE_CACHE/KIND``, else
    ``$XDG_CACHE_HOME/lookalike/KIND`` (``~/.cache``)."""
    root = os.environ.get("LOOKALIKE_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "lookalike")
    return Path(root).expanduser() / kind


UNLABELLED = -1  # the label number of an item in a collection without labels
UNLABELLED_NAME = "unlabelled"


def trim_memory() -> bool:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``); False where there is no glibc.

    Reading a large collection leaves the heap with freed but unreturned pages (about 100 MB after reading
    70,000 items' metadata): without this, a long-lived process keeps them as resident memory beside the
    indexes it loads next. Called after the big reads and after the store lets go of its indexes."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        _LIBC = False
        for name in ("libc.so.6", None):  # (glibc's name first: find_library may start ldconfig or a compiler)
            try:
                libc = ctypes.CDLL(name or ctypes.util.find_library("c") or "libc.so.6")
                libc.malloc_trim.argtypes = [ctypes.c_size_t]
            except (OSError, AttributeError, TypeError):
                continue
            _LIBC = libc
            break
    return bool(_LIBC) and bool(_LIBC.malloc_trim(0))


_LIBC: Any = None


def label_name(names: Sequence[str], label: int) -> str:
    """The name of integer ``label`` (its number as text when unnamed; "unlabelled" for :data:`UNLABELLED`)."""
    if label == UNLABELLED:
        return UNLABELLED_NAME
    return str(names[label]) if 0 <= label < len(names) else str(label)


def split_key(seed: int, item_id: str) -> int:
    """A seeded, uniform 64-bit key of an id (SHA-256 of both): orders items for the hold-out and for samples.

    The same id and seed give the same key in any process and whatever else the source holds.
    """
    return int.from_bytes(hashlib.sha256(f"{seed}\0{item_id}".encode()).digest()[:8], "big")


def first_line(exc: BaseException, width: int = 120) -> str:
    """``TypeName: first line of the message``, cut to ``width`` characters (for one-line errors)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:width] if text else type(exc).__name__


def json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities (an undefined silhouette, an instant query) turned into None, for strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(x) for k, x in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(x) for x in value]
    return value


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class RedirectedFds:
    """File descriptors (default 1 and 2) sent to /dev/null, or with ``to_stderr`` to where fd 2 goes,
    between :meth:`enter` and :meth:`exit` (each idempotent). For native code and other processes'
    output that Python's ``sys.stdout``/``sys.stderr`` objects cannot catch. A descriptor that does
    not exist (an embedded interpreter) is left alone.
    """

    def __init__(self, fds: tuple[int, ...] = (1, 2), to_stderr: bool = False) -> None:
        self._fds = fds
        self._to_stderr = to_stderr
        self._saved: list[tuple[int, int]] = []

    def _flush(self) -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError, AttributeError):
                stream.flush()

    def enter(self) -> None:
        if self._saved:
            return
        self._flush()
        try:
            target = os.dup(2) if self._to_stderr else os.open(os.devnull, os.O_WRONLY)
        except OSError:
            return
        try:
            for fd in self._fds:
                try:
                    self._saved.append((fd, os.dup(fd)))
                    os.dup2(target, fd)
                except OSError:
                    pass
        finally:
            os.close(target)

    def exit(self) -> None:
        saved, self._saved = self._saved, []
        self._flush()
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)
