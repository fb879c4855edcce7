"""One exception family for the library; the CLI turns each into one line on stderr and an exit code."""

from __future__ import annotations


class LookalikeError(Exception):
    """Base of every error the library raises on bad input or an unusable environment.

    The message is one line that names the fix; ``exit_code`` is what the CLI exits with.
    """

    exit_code = 1


class InputError(LookalikeError):
    """An option or argument has a bad value (``--k 0``, unknown label, bad split, unreadable image...)."""

    exit_code = 2


class TooLargeError(InputError):
    """An image (or an upload) over the size limit."""


class DatasetError(LookalikeError):
    """A dataset cannot be read: unknown name, missing or corrupt source, empty folder."""


class EmbedderError(LookalikeError):
    """The embedder cannot be built: weights missing, offline download, bad layer."""


class StoreError(LookalikeError):
    """The vector store cannot be opened, failed, or does not hold what was asked for."""


class NotFoundError(StoreError):
    """An unknown collection or id."""


class MismatchError(StoreError):
    """A collection was built with another embedder or dataset protocol."""


class LockedError(StoreError):
    """Another process holds the local store's lock."""


class DamagedError(StoreError):
    """The store answered with an internal error: the collection may be damaged (``lookalike check``)."""
