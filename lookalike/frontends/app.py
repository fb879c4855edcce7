"""``lookalike app``: the interactive explorer (Streamlit + Plotly), run by ``streamlit run``.

A thin front-end: every number comes from the library (``search``, ``cached_map``, ``cluster``,
``evaluate`` and its saved report) over one :class:`~lookalike.core.gallery.Gallery` per collection,
opened once for the app's life (a local store's lock is held meanwhile). Nothing stored is ever
re-embedded: thumbnails are read from the items' recorded sources, at most a page of them at once.

Pages: Search (upload an image or name an id; labels, split, k; click a neighbour to search from
it), Map (t-SNE/UMAP/PCA of a seeded sample; click a point for its neighbours, lasso or box a
region for its items), Evaluation (the saved report; a confusion cell's mistakes), Clusters
(k-means against the labels), Audit (the saved audit: label-issue candidates with their
neighbours, duplicate groups and leaks, outliers; any of them one click from a search). The
URL's query parameters (``?page=Search&collection=mnist&id=...&labels=3&k=8``) open a page in
a given state.

Needs the ``app`` extra: ``pip install 'lookalike[app]'``.
"""

from __future__ import annotations

import gc
import sys
import threading
from collections import Counter
from typing import Any

import numpy as np
import streamlit as st

from lookalike.analysis.audit import audit, checked_answers, save_audit, saved_audit
from lookalike.analysis.evaluate import evaluate, save_report
from lookalike.analysis.explore import METHODS, cached_map, cluster
from lookalike.core.gallery import Gallery
from lookalike.core.search import Hit, search
from lookalike.core.store import Store, default_db
from lookalike.data.filters import combine, parse_where
from lookalike.errors import LookalikeError

PAGES = ("Search", "Map", "Evaluation", "Clusters", "Audit")
AUDIT_ROWS = 8  # suspects (or groups) a page of the Audit tabs shows, each with up to 5 more images
THUMB = 112  # pixels of a thumbnail's side
SMALL = 80  # pixels of a small thumbnail's side (selections, mistakes, clusters)
PAGE_OF_THUMBS = 48  # the most images a page draws at once
UPLOAD_TYPES = ["png", "jpg", "jpeg", "bmp", "gif", "tif", "tiff", "webp", "mpo"]


# -- resources kept for the app's life -----------------------------------------------------------------


def db_location() -> str:
    """``--db`` after ``--`` on the ``streamlit run`` line, else ``$LOOKALIKE_DB`` or ``./lookalike-db``."""
    args = sys.argv[1:]
    if "--db" in args and args.index("--db") + 1 < len(args):
        return args[args.index("--db") + 1]
    return default_db()


@st.cache_resource(show_spinner=False)
def open_store(db: str) -> Store:
    return Store(db)


@st.cache_resource(show_spinner=False)
def open_gallery(db: str, name: str) -> Gallery:
    g = Gallery(open_store(db), name)
    g.keep_warm()  # the fields' mirror, read in the background: exact filters in milliseconds, and the filter widgets
    # build the embedder now, in the background: an upload is then answered in milliseconds, not after TensorFlow's start
    threading.Thread(target=warm, args=(g,), name=f"warm-{name}", daemon=True).start()
    return g


def warm(gallery: Gallery) -> None:
    """Build ``gallery``'s embedder, then exempt everything alive (TensorFlow, the model) from garbage collection.

    Streamlit runs a full collection after every re-run (``gc.collect(2)``, and again in
    ``keras.backend.clear_session()``, which it calls whenever Keras is loaded): over TensorFlow's
    heap that cost ~0.5-1 s of CPU per click. Frozen objects are skipped by the collector, so a
    re-run's collections only walk what the re-run made.
    """
    try:
        gallery.embedder  # noqa: B018 (a lazy property: this builds it)
    except LookalikeError:
        return  # shown to the user by the search that needs it
    gc.collect()
    gc.freeze()


@st.cache_data(ttl=30, show_spinner=False)
def summary(db: str, name: str) -> dict[str, Any]:
    """A collection's count, dataset, embedder and an example id (read at most every 30 s: every click redraws the page)."""
    g = open_gallery(db, name)
    info = g.info()
    shown = {"count": info.count, "dataset": info.dataset, "embedder": info.embedder, "backbone": info.backbone}
    return {**shown, "example_id": g.example_id()}


def thumb(image: np.ndarray | None, side: int = THUMB) -> np.ndarray:
    """``image`` scaled to ``side`` pixels on its longer side (nearest neighbour: digits stay crisp); grey if missing."""
    from PIL import Image

    if image is None:
        return np.full((side, side), 200, np.uint8)
    pil = Image.fromarray(image)
    scale = side / max(pil.size)
    if scale > 1:
        pil = pil.resize((max(1, round(pil.width * scale)), max(1, round(pil.height * scale))), Image.NEAREST)
    else:
        pil.thumbnail((side, side))
    return np.asarray(pil)


def images_of(gallery: Gallery, metadatas: list[dict[str, Any]]) -> list[np.ndarray]:
    return [thumb(im) for im in gallery.images(metadatas)]


def param(name: str, default: str | None = None) -> str | None:
    value = st.query_params.get(name)
    return value if value not in (None, "") else default


def int_param(name: str, default: int, low: int, high: int) -> int:
    """A whole-number query parameter, clamped to [low, high] (``default`` when absent or not a number)."""
    try:
        value = int(param(name, str(default)) or default)
    except ValueError:
        value = default
    return min(max(value, low), high)


# -- pages ---------------------------------------------------------------------------------------------


def hit_grid(gallery: Gallery, hits: list[Hit], *, key: str, columns: int = 8) -> None:
    """Thumbnails of ``hits`` with label and distance; the button under each makes it the query."""
    if not hits:
        st.info("No stored item matches these filters.")
        return
    images = images_of(gallery, [h.metadata for h in hits])
    for start in range(0, len(hits), columns):
        cols = st.columns(columns)
        for col, h, im in zip(cols, hits[start : start + columns], images[start : start + columns]):
            with col:
                st.image(im, caption=f"#{h.rank} {h.label_name} · d={h.distance:.3f}", width=THUMB)
                st.caption(h.id)
                st.button("search from it", key=f"{key}-{h.id}", help=f"make {h.id} the query", on_click=use_as_query, args=(h.id,))


def use_as_query(item_id: str) -> None:
    """(A button's callback, run before the page is drawn again.) Search from ``item_id``."""
    st.session_state["query_id"] = item_id
    st.session_state["query_source"] = "id"
    st.session_state["page"] = "Search"


def filters(gallery: Gallery, key: str) -> tuple[list[str], str | None, int]:
    """The label multiselect (names), the split and k."""
    names = gallery.label_names or []
    preset = [x for x in (param("labels", "") or "").split(",") if x in names]
    c1, c2, c3 = st.columns([3, 1, 2])
    if gallery.record.labelled:
        labels = c1.multiselect("labels", names, default=preset, key=f"{key}-labels", help="keep only items of these labels")
    else:
        labels = []
        c1.caption("unlabelled collection: no label filter")
    splits = ["any", "train", "test"]
    wanted = param("split", "any")
    split = c2.selectbox("split", splits, index=splits.index(wanted) if wanted in splits else 0, key=f"{key}-split")
    k = c3.slider("k (neighbours)", 1, 50, int_param("k", 8, 1, 50), key=f"{key}-k")
    return labels, (None if split == "any" else split), k


# fields that other widgets cover, or that nobody filters on
UNFILTERED = {"label", "label_name", "split", "dataset", "sha256", "mtime_ns", "file", "path", "filename"}


def field_filters(gallery: Gallery, key: str) -> dict[str, Any] | None:
    """Widgets built from the collection's fields (a range for numbers, a choice for text and bools, "has any of"
    for tags) and a box of ``--where`` expressions; their AND in Chroma's dict form, or None."""
    clauses: list[dict[str, Any] | None] = []
    with st.expander("more filters: the collection's fields"):
        fields = gallery.describe_fields()
        if fields is None:
            st.caption("reading the collection's fields… (the expressions below work already)")
            fields = {}
        usable = {n: f for n, f in fields.items() if n not in UNFILTERED and (f["kind"] == "number" or f.get("values"))}
        chosen = st.multiselect("filter on", sorted(usable), key=f"{key}-fields", help="fields every or some items have")
        for name in chosen:
            f = usable[name]
            if f["kind"] == "number":
                lo, hi = f["min"], f["max"]
                if lo == hi:
                    st.caption(f"{name}: {lo:g} for every item that has it")
                    clauses.append({name: lo})
                    continue
                if float(lo).is_integer() and float(hi).is_integer():
                    lo, hi = int(lo), int(hi)
                a, b = st.slider(name, lo, hi, (lo, hi), key=f"{key}-f-{name}")
                clauses += [{name: {"$gte": a}}, {name: {"$lte": b}}]
            elif f["kind"] == "tags":
                picked = st.multiselect(f"{name} has any of", f["values"], key=f"{key}-f-{name}")
                ors = [{name: {"$contains": v}} for v in picked]
                clauses.append(ors[0] if len(ors) == 1 else {"$or": ors} if ors else None)
            else:
                picked = st.multiselect(name, f["values"], key=f"{key}-f-{name}")
                clauses.append({name: {"$in": picked}} if picked else None)
        text = st.text_input(
            "where", key=f"{key}-where", placeholder="width >= 1000; camera_model = Pixel 7; taken between 2024-01-01 and 2024-06-30"
        )
        if text.strip():
            clauses.append(parse_where([t for t in text.split(";") if t.strip()]))
    return combine(*clauses)


def on_upload() -> None:
    st.session_state["query_source"] = "image"


def on_id() -> None:
    st.session_state["query_source"] = "id"


def search_page(gallery: Gallery, db: str) -> None:
    st.header("Search")
    example = summary(db, gallery.name)["example_id"]
    left, right = st.columns([2, 3])
    upload = left.file_uploader("Query image (any size or mode)", type=UPLOAD_TYPES, key="upload", on_change=on_upload)
    if "query_id" not in st.session_state:
        st.session_state["query_id"] = param("id", "") or ""
    right.text_input("…or a stored id", key="query_id", on_change=on_id, placeholder=example)
    labels, split, k = filters(gallery, "search")
    where = field_filters(gallery, "search")
    source = st.session_state.get("query_source") or ("image" if upload is not None else "id")
    query_id = st.session_state.get("query_id", "").strip()
    if source == "image" and upload is not None:
        data = upload.getvalue()
        pixels = gallery.read_query_image(data, name=f"the upload {upload.name}")
        hits = search(gallery, image=pixels, k=k, labels=labels, split=split, where=where)
        query_img, caption = thumb(pixels, 2 * THUMB), f"uploaded {upload.name}"
    elif query_id:
        hits = search(gallery, id=query_id, k=k, labels=labels, split=split, where=where)
        meta, _ = gallery.item(query_id)
        query_img, caption = images_of(gallery, [meta])[0], f"{query_id} ({gallery.label_name(int(meta['label']))})"
    else:
        st.info(f"Upload an image, or type a stored id such as `{example}`, to see its nearest stored items.")
        return
    q, grid = st.columns([1, 5])
    q.image(query_img, caption=f"query: {caption}", width="stretch")
    with grid:
        shown = f" with labels {', '.join(labels)}" if labels else ""
        shown += " matching the filters" if where else ""
        st.subheader(f"{len(hits)} nearest{shown}{' in ' + split if split else ''}")
        hit_grid(gallery, hits, key="hit", columns=6)


@st.cache_resource(show_spinner=False, max_entries=16)
def map_for(db: str, name: str, method: str, sample: int, split: str | None, seed: int, count: int) -> tuple[Any, bool]:
    return cached_map(open_gallery(db, name), method=method, sample=sample, split=split, seed=seed)


def map_page(gallery: Gallery, db: str) -> None:
    import plotly.express as px

    st.header("Map")
    n = summary(db, gallery.name)["count"]
    c1, c2, c3, c4 = st.columns(4)
    methods = [m for m in METHODS if m != "umap" or _has_umap()]
    method = c1.selectbox("method", methods, key="map-method", format_func=lambda m: {"tsne": "t-SNE", "umap": "UMAP", "pca": "PCA"}[m])
    if n > 3:
        sample = c2.slider("sample size", 3, min(n, 20000), min(n, 2000), step=1, key="map-sample")
    else:
        sample = n
        c2.caption(f"all {n} items")
    split_choice = c3.selectbox("split", ["any", "train", "test"], key="map-split")
    seed = int(c4.number_input("seed", 0, 10**6, 0, key="map-seed"))
    split = None if split_choice == "any" else split_choice
    with st.spinner(f"computing the {method} map of {sample:,} items (once: it is kept for next time)…"):
        result, cached = map_for(db, gallery.name, method, sample, split, seed, n)
    pts = result.points
    names = [gallery.label_name(int(lab)) for lab in pts.labels]
    fig = px.scatter(
        x=result.coords[:, 0],
        y=result.coords[:, 1],
        color=names,
        category_orders={"color": sorted(set(names), key=lambda x: (len(x), x))},
        custom_data=[np.arange(len(pts.ids)), pts.ids],
        labels={"color": "label", "x": "", "y": ""},
        height=620,
    )
    fig.update_traces(marker={"size": 5, "opacity": 0.8}, hovertemplate="%{customdata[1]}<extra>%{fullData.name}</extra>")
    fig.update_layout(dragmode="pan", legend={"itemsizing": "constant"}, margin={"l": 10, "r": 10, "t": 30, "b": 10})
    st.caption(
        f"{len(pts.ids):,} of {n:,} items, {'read back from the cache' if cached else f'computed in {result.seconds:.1f} s'}. "
        "Click a point for its neighbours; pick the lasso or box from the plot's toolbar to select a region."
    )
    event = st.plotly_chart(fig, on_select="rerun", selection_mode=("points", "box", "lasso"), key="map-plot")
    rows = sorted({int(p["customdata"][0]) for p in (event.selection.points if event else [])})
    if len(rows) == 1:
        i = rows[0]
        st.subheader(f"{pts.ids[i]} ({names[i]}) and its nearest stored items")
        a, b = st.columns([1, 5])
        a.image(images_of(gallery, [pts.metadatas[i]])[0], caption=pts.ids[i], width="stretch")
        with b:
            hit_grid(gallery, search(gallery, id=pts.ids[i], k=6), key="maphit", columns=6)
    elif rows:
        counts = Counter(names[i] for i in rows)
        st.subheader(f"{len(rows):,} selected items")
        st.dataframe(
            {"label": list(counts), "items": list(counts.values())}, hide_index=True, width=300, height=min(38 + 35 * len(counts), 400)
        )
        shown = rows[:PAGE_OF_THUMBS]
        images = images_of(gallery, [pts.metadatas[i] for i in shown])
        for start in range(0, len(shown), 12):
            cols = st.columns(12)
            for col, i, im in zip(cols, shown[start : start + 12], images[start : start + 12]):
                col.image(im, caption=names[i], width=SMALL)
        if len(rows) > len(shown):
            st.caption(f"the first {len(shown)} of {len(rows):,} shown")


def _has_umap() -> bool:
    import importlib.util

    return importlib.util.find_spec("umap") is not None


def evaluation_page(gallery: Gallery) -> None:
    import plotly.graph_objects as go

    st.header("Evaluation")
    report = gallery.evaluation()
    if report is None:
        st.info(f"No evaluation is saved with {gallery.name!r}. Run one now (it is saved for next time), or `lookalike evaluate`.")
        k = st.number_input("k (neighbours in the vote)", 1, 50, 1, key="eval-k")
        if st.button("Run evaluate", type="primary"):
            with st.spinner("querying the store with every held-out item…"):
                save_report(gallery, evaluate(gallery, k=int(k)))
            st.rerun()
        return
    if report.get("retrieval", {}).get("unlabelled"):
        cols = st.columns(4)
        ret = report["retrieval"]
        cols[0].metric("recall@1", f"{report['recall_at_1']:.4f}", help="how often the store's first answer is an exact nearest neighbour")
        cols[1].metric(f"recall@{ret['recall_k']}", f"{ret['store_recall_at_k']:.4f}", help="share of the exact nearest the store returns")
        cols[2].metric("held-out queries", f"{report['n_queries']:,}")
        cols[3].metric("indexed items", f"{report['n_indexed']:,}")
        st.caption(f"{report['embedder']} · saved {report.get('saved_at', '')} · unlabelled: no accuracy to measure")
        return
    cols = st.columns(6)
    cols[0].metric(f"{report['k']}-NN accuracy", f"{report['accuracy']:.4f}")
    cols[1].metric("exact accuracy", f"{report['exact_accuracy']:.4f}", help="the same vote over exact (brute-force) neighbours")
    cols[2].metric("recall@1", f"{report['recall_at_1']:.4f}", help="how often the store's first answer is an exact nearest neighbour")
    cols[3].metric("held-out queries", f"{report['n_queries']:,}")
    cols[4].metric("indexed items", f"{report['n_indexed']:,}")
    cols[5].metric("mistakes", f"{report.get('n_mistakes', len(report['mistakes'])):,}")
    st.caption(f"{report['embedder']} · saved {report.get('saved_at', '')}")
    names = report["label_names"] or [str(i) for i in range(len(report["confusion"]))]
    matrix = np.array(report["confusion"])
    left, right = st.columns([3, 2])
    with left:
        fig = go.Figure(
            go.Heatmap(
                z=matrix,
                x=names,
                y=names,
                colorscale="Blues",
                text=matrix,
                texttemplate="%{text}",
                hovertemplate="true %{y}, predicted %{x}: %{z}<extra></extra>",
            )
        )
        fig.update_layout(
            xaxis_title="predicted", yaxis_title="true", yaxis_autorange="reversed", height=520, margin={"l": 10, "r": 10, "t": 10, "b": 10}
        )
        fig.update_xaxes(type="category")  # every label named, even "0".."9"
        fig.update_yaxes(type="category")
        st.plotly_chart(fig, key="confusion")
    with right:
        # a static table: the interactive grid's scripts (~1.2 MB) would double this page's first render
        rows = "".join(f"| {str(label).replace('|', chr(92) + '|')} | {acc:.4f} |\n" for label, acc in report["per_class"].items())
        st.markdown("| label | accuracy |\n| --- | ---: |\n" + rows)
    off = [(matrix[t, p], t, p) for t in range(len(matrix)) for p in range(len(matrix)) if t != p and matrix[t, p]]
    if not off:
        st.success("No held-out item is misclassified.")
        return
    _, t0, p0 = max(off)
    st.subheader("Mistakes of one cell")
    c1, c2 = st.columns(2)
    true = c1.selectbox("true label", range(len(names)), index=t0, format_func=lambda i: names[i], key="cell-true")
    pred = c2.selectbox("predicted as", range(len(names)), index=p0, format_func=lambda i: names[i], key="cell-pred")
    cell = [m for m in report["mistakes"] if m["true"] == true and m["predicted"] == pred]
    st.caption(
        f"{int(matrix[true, pred])} held-out items of label {names[true]} predicted {names[pred]}"
        + (f"; {len(cell)} of them kept with the report" if len(cell) < matrix[true, pred] else "")
        + ". Each: the held-out item, then its nearest indexed item."
    )
    shown = cell[: PAGE_OF_THUMBS // 2]
    if not shown:
        return
    images = _images_by_id(gallery, [m["id"] for m in shown] + [m["nearest_id"] for m in shown], THUMB)
    for start in range(0, len(shown), 6):
        cols = st.columns(12)
        for j, m in enumerate(shown[start : start + 6]):
            cols[2 * j].image(images.get(m["id"], thumb(None)), caption=m["id"], width=SMALL)
            cols[2 * j + 1].image(images.get(m["nearest_id"], thumb(None)), caption=f"→ {m['nearest_id']}", width=SMALL)


def clusters_page(gallery: Gallery, db: str) -> None:
    st.header("Clusters")
    n = summary(db, gallery.name)["count"]
    with st.form("clusters"):
        c1, c2, c3, c4 = st.columns(4)
        k = c1.number_input("k (clusters)", 2, 100, min(100, max(2, len(gallery.label_names) or 10)), key="cl-k")
        on = c2.selectbox("on", ["embedding", "map"], key="cl-on", help="k-means on the vectors, or on a 2-D t-SNE map of them")
        sample = c3.number_input("sample size", min(3, n), max(3, n), min(n, 2000), key="cl-sample")
        seed = c4.number_input("seed", 0, 10**6, 0, key="cl-seed")
        submitted = st.form_submit_button("Compute clusters", type="primary")
    params = (gallery.name, int(k), on, int(sample), int(seed), n)
    if submitted:
        with st.spinner("k-means…"):
            st.session_state["cluster-result"] = (params, cluster(gallery, k=int(k), on=on, sample=int(sample), seed=int(seed)))
    saved = st.session_state.get("cluster-result")
    if not saved or saved[0] != params:
        st.info("Choose the clustering and press **Compute clusters**.")
        return
    report = saved[1]
    cols = st.columns(4)

    def shown(value: float | None) -> str:
        return "unlabelled" if value is None else f"{value:.4f}"

    cols[0].metric("cluster accuracy", shown(report.cluster_accuracy), help="clusters matched to labels one to one (Hungarian)")
    cols[1].metric("ARI", shown(report.adjusted_rand), help="adjusted Rand index")
    cols[2].metric("NMI", shown(report.normalized_mutual_info), help="normalised mutual information")
    sil = "n/a" if report.silhouette != report.silhouette else f"{report.silhouette:.4f}"
    cols[3].metric("silhouette", sil, help=f"on {report.silhouette_sample:,} items")
    pts = report.points
    sizes = Counter(int(c) for c in report.clusters)
    st.dataframe(
        {
            "cluster": sorted(sizes),
            "items": [sizes[c] for c in sorted(sizes)],
            "matched label": [gallery.label_name(report.mapping.get(c, -1)) for c in sorted(sizes)],
        },
        hide_index=True,
        height=min(38 + 35 * len(sizes), 400),
    )
    idx = report.disagreeing()
    st.subheader(f"{len(idx):,} items whose cluster disagrees with their label (label → cluster's label)")
    shown = list(idx[:PAGE_OF_THUMBS])
    images = images_of(gallery, [pts.metadatas[i] for i in shown])
    for start in range(0, len(shown), 12):
        cols = st.columns(12)
        for col, i, im in zip(cols, shown[start : start + 12], images[start : start + 12]):
            cluster_label = gallery.label_name(report.mapping.get(int(report.clusters[i]), -1))
            col.image(im, caption=f"{gallery.label_name(int(pts.labels[i]))} → {cluster_label}", width=SMALL)


def audit_page(gallery: Gallery) -> None:
    st.header("Audit")
    report = saved_audit(gallery)
    if report is None:
        st.info(f"No audit is saved with {gallery.name!r}. Run one now (it is saved for next time), or `lookalike audit`.")
        k = st.number_input("k (neighbours each item is compared with)", 1, 50, 10, key="audit-k")
        if st.button("Run audit", type="primary"):
            with st.spinner("finding every item's nearest neighbours…"):
                save_audit(gallery, audit(gallery, k=int(k), top=100))
            st.rerun()
        return
    cols = st.columns(6)
    cols[0].metric("items", f"{report['n_items']:,}")
    cols[1].metric("disputed labels", f"{report['n_disputed']:,}", help="items whose neighbours give most of their weight to another label")
    cols[2].metric("duplicate groups", f"{report['n_groups']:,}", help=f"{report['n_duplicate_pairs']:,} pairs closer than the threshold")
    cols[3].metric("leaked held-out items", f"{report['n_leaked']:,}", help="held-out items with a copy among the indexed ones")
    if report["accuracy"] is not None:
        cols[4].metric("1-NN accuracy", f"{report['accuracy']:.4f}")
        free = report["leak_free_accuracy"]
        cols[5].metric(
            "without leaks",
            "n/a" if free is None else f"{free:.4f}",
            delta=None if free in (None, report["accuracy"]) else f"{free - report['accuracy']:+.4f}",
        )
    st.caption(
        f"{report['embedder']} · k={report['k']} · {report['method']} score · duplicates: distance < {report['threshold']:.4g} "
        f"({report['threshold_rule']}) · {checked_answers(report.get('neighbours_by', 'exact'))} hold "
        f"{report['store_recall_at_k']:.4f} of the exact neighbours · "
        f"saved {report.get('saved_at', '')}"
    )
    tabs = st.tabs(["Label issues", "Duplicates and leaks", "Outliers"])
    with tabs[0]:
        suspects = [s for s in report["suspects"] if s["score"] > 0]
        if not suspects:
            st.success("No item's neighbours carry another label.")
        start = _page_start(len(suspects), "audit-suspects")
        shown = suspects[start : start + AUDIT_ROWS]
        images = _images_by_id(gallery, [s["id"] for s in shown] + [n for s in shown for n in s["neighbours"][:5]])
        for s in shown:
            cols = st.columns(7)
            with cols[0]:
                st.image(images.get(s["id"], thumb(None, SMALL)), width=SMALL)
                st.button(
                    "search from it", key=f"audit-s-{s['id']}", help=f"make {s['id']} the query", on_click=use_as_query, args=(s["id"],)
                )
            cols[1].markdown(f"**{s['label']} → {s['suggested_label']}**  \nscore {s['score']:.3f}  \n`{s['id']}`")
            for col, n, lab, d in zip(cols[2:], s["neighbours"], s["neighbour_labels"], s["neighbour_distances"]):
                col.image(images.get(n, thumb(None, SMALL)), caption=f"{lab} · d={d:.3g}", width=SMALL)
    with tabs[1]:
        groups = report["groups"]
        if not groups:
            st.success("No two items are closer than the threshold.")
        else:
            if report["n_groups"] > len(groups):
                st.caption(
                    f"the first {len(groups):,} of {report['n_groups']:,} groups were kept with the report "
                    "(`lookalike audit --csv` lists all)"
                )
            start = _page_start(len(groups), "audit-groups")
            shown = groups[start : start + AUDIT_ROWS]
            images = _images_by_id(gallery, [i for g in shown for i in g["ids"][:6]])
            for g in shown:
                st.markdown(f"{'**leak across splits**' if g['cross_split'] else 'duplicates'} · {g.get('size', len(g['ids']))} items")
                cols = st.columns(6)
                for col, i, sp, lab in zip(cols, g["ids"], g["splits"], g["labels"]):
                    col.image(images.get(i, thumb(None, SMALL)), caption=f"{lab} · {sp} · {i}", width=SMALL)
                    col.button("search from it", key=f"audit-g-{i}", help=f"make {i} the query", on_click=use_as_query, args=(i,))
    with tabs[2]:
        outliers = report["outliers"]
        images = _images_by_id(gallery, [o["id"] for o in outliers[:12]])
        cols = st.columns(6)
        for n, o in enumerate(outliers[:12]):
            with cols[n % 6]:
                st.image(images.get(o["id"], thumb(None, SMALL)), caption=f"{o['label']} · {o['id']} · {o['score']:.3g}", width=SMALL)
                st.button(
                    "search from it", key=f"audit-o-{o['id']}", help=f"make {o['id']} the query", on_click=use_as_query, args=(o["id"],)
                )


def _page_start(total: int, key: str) -> int:
    """The first row of the page chosen in a small pager (rows of ``AUDIT_ROWS``)."""
    pages = max(1, -(-total // AUDIT_ROWS))
    if pages == 1:
        return 0
    page = st.number_input(f"page (of {pages}, {AUDIT_ROWS} a page)", 1, pages, 1, key=key)
    return (int(page) - 1) * AUDIT_ROWS


def _images_by_id(gallery: Gallery, ids: list[str], side: int = SMALL) -> dict[str, np.ndarray]:
    """Thumbnails of stored items, by id (an id no longer stored is left out)."""
    got_ids, _, metas = gallery.get(ids)
    return {i: thumb(im, side) for i, im in zip(got_ids, gallery.images(metas))}


# -- the app -------------------------------------------------------------------------------------------


def main() -> None:
    st.set_page_config(page_title="lookalike", layout="wide")
    db = db_location()
    try:
        store = open_store(db)
        names = store.names()
    except LookalikeError as exc:
        st.error(str(exc))
        return
    if not names:
        st.warning(f"The store at {db} has no collections yet: run `lookalike ingest` (or `lookalike quickstart`) first.")
        return
    with st.sidebar:
        st.title("lookalike")
        wanted = param("collection")
        name = st.selectbox("collection", names, index=names.index(wanted) if wanted in names else 0, key="collection")
        if "page" not in st.session_state:
            st.session_state["page"] = param("page", "Search") if param("page") in PAGES else "Search"
        page = st.radio("page", PAGES, key="page")
    try:
        gallery = open_gallery(db, name)
        with st.sidebar:
            info = summary(db, name)
            st.caption(f"{info['count']:,} items · {info['dataset']} · backbone **{info['backbone']}** · {info['embedder']}")
        if page == "Search":
            search_page(gallery, db)
        elif page == "Map":
            map_page(gallery, db)
        elif page == "Evaluation":
            evaluation_page(gallery)
        elif page == "Clusters":
            clusters_page(gallery, db)
        else:
            audit_page(gallery)
    except LookalikeError as exc:
        st.error(str(exc))


if __name__ == "__main__":
    main()
