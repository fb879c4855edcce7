"""Collections: the record, the store (the only chromadb import) with its lock and mirror, :class:`Gallery`, and the
stages that fill and ask them: ingest (and ``sync``, Ray scale-out), search, single items in and out, export and import.
Built on :mod:`lookalike.data` and :mod:`lookalike.models` (one lazy exception: ``search --out`` draws its picture with
:mod:`lookalike.analysis.plots`)."""
