"""lookalike: image similarity search on a persistent Chroma store.

Library entry points (each returns a dataclass or a list of them)::

    from lookalike import ingest, search, evaluate
    report = ingest("mnist", source="mnist.npz", limit=5000, test_size=1000, weights="random")
    hits = search(id="mnist:test:0", k=5, labels=[3])
    result = evaluate(k=1)

Importing the package is cheap: TensorFlow and chromadb load only when first needed.
"""

from __future__ import annotations

from lookalike.errors import LookalikeError
from lookalike.evaluate import EvalReport, evaluate
from lookalike.ingest import IngestReport, ingest
from lookalike.quickstart import QuickstartReport, quickstart
from lookalike.search import Hit, search
from lookalike.store import CollectionInfo, drop_collection, list_collections

__version__ = "0.1.0"

__all__ = [
    "CollectionInfo",
    "EvalReport",
    "Hit",
    "IngestReport",
    "LookalikeError",
    "QuickstartReport",
    "drop_collection",
    "evaluate",
    "ingest",
    "list_collections",
    "quickstart",
    "search",
    "__version__",
]
