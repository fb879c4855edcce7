"""What a collection says about itself: metrics as pure functions over arrays, evaluate (held-out accuracy through the
store, audited against exact search), audit (label issues, duplicates, leaks, outliers; its faiss graph), check and
repair, embedder comparison, maps and clusters, and the matplotlib figures. Built on :mod:`lookalike.core`."""
