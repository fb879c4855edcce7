"""lookalike: image similarity search on a persistent Chroma store.

Library entry points (each returns a dataclass or a list of them)::

    from lookalike import Gallery, ingest, search, evaluate
    report = ingest("mnist", source="mnist.npz", limit=5000, test_size=1000, weights="random")
    with Gallery.open("mnist") as g:          # one opened collection (holds a local store's lock)
        hits = search(g, id="mnist:test:0", k=5, labels=[3])
        result = evaluate(g, k=1)

Importing the package is cheap: TensorFlow and chromadb load only when first needed.
"""

from __future__ import annotations

from lookalike.analysis.check import CheckReport, check, repair
from lookalike.analysis.evaluate import EvalReport, evaluate
from lookalike.core.gallery import CollectionInfo, Gallery, list_collections
from lookalike.core.ingest import IngestReport, ingest
from lookalike.core.search import Hit, search
from lookalike.core.store import Store
from lookalike.errors import LookalikeError
from lookalike.frontends.quickstart import QuickstartReport, quickstart

__version__ = "0.2.0"

__all__ = [
    "CheckReport",
    "CollectionInfo",
    "EvalReport",
    "Gallery",
    "Hit",
    "IngestReport",
    "LookalikeError",
    "QuickstartReport",
    "Store",
    "__version__",
    "check",
    "evaluate",
    "ingest",
    "list_collections",
    "quickstart",
    "repair",
    "search",
]
