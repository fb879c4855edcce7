"""The Streamlit app, page by page, with Streamlit's AppTest: widgets there, no exception, the library's numbers."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import streamlit as st
from PIL import Image
from streamlit.testing.v1 import AppTest

import lookalike.frontends.app as app_module
from lookalike.analysis.evaluate import evaluate
from lookalike.analysis.explore import cluster
from lookalike.core.gallery import Gallery
from lookalike.core.ingest import ingest
from lookalike.core.search import search
from lookalike.models.embedder import PixelEmbedder

APP = str(Path(app_module.__file__))


@pytest.fixture
def app_db(tiny_npz: Path, tmp_path: Path, fake_embedder: PixelEmbedder, monkeypatch: pytest.MonkeyPatch) -> str:
    db = str(tmp_path / "db")
    ingest("mnist", source=str(tiny_npz), embedder=fake_embedder, db=db, collection="digits")
    monkeypatch.setenv("LOOKALIKE_DB", db)
    monkeypatch.setenv("LOOKALIKE_CACHE", str(tmp_path / "cache"))
    return db


def start(**query: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    for key, value in query.items():
        at.query_params[key] = value
    at.run()
    assert not at.exception, at.exception
    return at


def shown_ids(at: AppTest) -> list[str]:
    """The ids under the neighbour thumbnails, in order."""
    return [c.value for c in at.caption if c.value.startswith("mnist:")]


def test_search_by_id_shows_the_librarys_neighbours_and_filters_change_them(app_db: str) -> None:
    at = start(page="Search", id="mnist:test:0", k="6")
    assert any("backbone **pixels**" in c.value for c in at.sidebar.caption)  # which network made the vectors
    with Gallery.open("digits", app_db) as g:
        assert shown_ids(at) == [h.id for h in search(g, id="mnist:test:0", k=6)]
        assert [w.label for w in at.multiselect] == ["labels", "filter on"] and at.slider[0].value == 6
        at.multiselect(key="search-labels").set_value(["3", "5"]).run()
        filtered = [h.id for h in search(g, id="mnist:test:0", k=6, labels=["3", "5"])]
        assert shown_ids(at) == filtered and filtered != [h.id for h in search(g, id="mnist:test:0", k=6)]
        at.selectbox(key="search-split").set_value("test").run()
        assert shown_ids(at) == [h.id for h in search(g, id="mnist:test:0", k=6, labels=["3", "5"], split="test")]
        assert not at.exception


def test_filter_widgets_are_built_from_the_fields_and_give_the_librarys_answer(app_db: str) -> None:
    import time

    at = start(page="Search", id="mnist:test:0", k="5")
    deadline = time.time() + 60
    while "index" not in at.multiselect(key="search-fields").options and time.time() < deadline:
        time.sleep(0.2)  # the fields' mirror is read in the background
        at.run()
    assert "index" in at.multiselect(key="search-fields").options and "label" not in at.multiselect(key="search-fields").options
    at.multiselect(key="search-fields").set_value(["index", "source"]).run()
    at.slider(key="search-f-index").set_value((10, 40)).run()
    at.multiselect(key="search-f-source").set_value(["x_train"]).run()
    where = {"$and": [{"index": {"$gte": 10}}, {"index": {"$lte": 40}}, {"source": {"$in": ["x_train"]}}]}
    with Gallery.open("digits", app_db) as g:
        want = [h.id for h in search(g, id="mnist:test:0", k=5, where=where)]
        assert shown_ids(at) == want and all(10 <= int(i.rsplit(":", 1)[1]) <= 40 for i in want)
        at.text_input(key="search-where").set_value("label = 4; index < 30").run()
        also = {"$and": [*where["$and"], {"label": {"$eq": 4}}, {"index": {"$lt": 30}}]}
        assert shown_ids(at) == [h.id for h in search(g, id="mnist:test:0", k=5, where=also)]
        at.text_input(key="search-where").set_value("label ~ 4").run()
        assert not at.exception and any("unknown operator" in e.value for e in at.error)


def test_clicking_a_neighbour_makes_it_the_query(app_db: str) -> None:
    at = start(page="Search", id="mnist:test:1", k="4")
    first = shown_ids(at)[0]
    at.button(key=f"hit-{first}").click().run()
    assert not at.exception and at.text_input(key="query_id").value == first
    with Gallery.open("digits", app_db) as g:
        assert shown_ids(at) == [h.id for h in search(g, id=first, k=4)]


def test_an_uploaded_image_finds_itself_first(app_db: str, tiny_npz: Path) -> None:
    image = np.load(tiny_npz)["x_test"][7]
    big = Image.fromarray(image).resize((280, 280)).convert("RGB")  # any size or mode
    buf = io.BytesIO()
    big.save(buf, format="JPEG", quality=95)
    at = start(page="Search", k="5")
    assert "Upload an image" in at.info[0].value
    at.file_uploader[0].upload("digit.jpg", buf.getvalue(), "image/jpeg").run()
    assert not at.exception
    with Gallery.open("digits", app_db) as g:
        want = [h.id for h in search(g, image=g.read_query_image(buf.getvalue()), k=5)]
    assert shown_ids(at) == want and want[0] == "mnist:test:7"
    at.file_uploader[0].upload("notes.png", b"not an image", "image/png").run()
    assert not at.exception and "cannot read the upload notes.png" in at.error[0].value


def test_a_bad_id_is_one_message_not_a_traceback(app_db: str) -> None:
    at = start(page="Search", id="nope")
    assert not at.exception and "no item 'nope'" in at.error[0].value


@pytest.mark.slow
def test_the_map_is_computed_once_then_read_back(app_db: str, tmp_path: Path) -> None:
    at = start(page="Map")
    assert at.sidebar.selectbox[0].label == "collection" and at.get("plotly_chart")
    assert any("computed in" in c.value and "250 of 250 items" in c.value for c in at.caption)
    st.cache_resource.clear()  # as in a new app process: the map comes from the cache on disk
    again = start(page="Map")
    assert any("read back from the cache" in c.value for c in again.caption)
    assert list((tmp_path / "cache" / "maps").glob("digits-tsne-*.npz"))
    again.selectbox(key="map-method").set_value("pca").run()
    assert not again.exception and any("computed in" in c.value for c in again.caption)


def test_evaluation_offers_to_run_then_shows_the_librarys_numbers(app_db: str) -> None:
    at = start(page="Evaluation")
    assert "No evaluation is saved" in at.info[0].value
    at.button[0].click().run()
    assert not at.exception
    with Gallery.open("digits", app_db) as g:
        report = evaluate(g)
    values = {m.label: m.value for m in at.metric}
    assert values["1-NN accuracy"] == f"{report.accuracy:.4f}" and values["exact accuracy"] == f"{report.exact_accuracy:.4f}"
    assert values["recall@1"] == f"{report.recall_at_1:.4f}" and values["held-out queries"] == f"{report.n_queries:,}"
    assert at.get("plotly_chart")
    table = next(m.value for m in at.markdown if m.value.startswith("| label | accuracy |"))
    for label, acc in report.per_class.items():
        assert f"| {label} | {acc:.4f} |" in table


def test_evaluation_cell_shows_its_mistakes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cluttered_npz: Path) -> None:
    db = str(tmp_path / "db")
    from lookalike.analysis.evaluate import save_report
    from lookalike.models.embedder import PixelEmbedder, make_spec

    ingest("mnist", source=str(cluttered_npz), embedder=PixelEmbedder(make_spec("pixels", input_size=8)), db=db, collection="clutter")
    with Gallery.open("clutter", db) as g:
        report = evaluate(g)
        save_report(g, report)
    assert report.mistakes
    monkeypatch.setenv("LOOKALIKE_DB", db)
    at = start(page="Evaluation")
    matrix = np.array(report.confusion)
    count, t, p = max((matrix[a, b], a, b) for a in range(len(matrix)) for b in range(len(matrix)) if a != b)
    assert (at.selectbox(key="cell-true").value, at.selectbox(key="cell-pred").value) == (t, p)
    assert any(f"{count} held-out items of label {t} predicted {p}" in c.value for c in at.caption)
    cell = [m["id"] for m in report.mistakes if (m["true"], m["predicted"]) == (t, p)]
    captions = [str(c) for im in at.get("image") for c in im.captions]
    assert set(cell[:24]) <= set(captions), captions
    other = next((a, b) for a in range(len(matrix)) for b in range(len(matrix)) if a != b and matrix[a, b] and (a, b) != (t, p))
    at.selectbox(key="cell-true").set_value(other[0])
    at.selectbox(key="cell-pred").set_value(other[1]).run()
    assert any(f"{matrix[other]} held-out items of label {other[0]}" in c.value for c in at.caption)


def test_clusters_equal_the_librarys(app_db: str) -> None:
    at = start(page="Clusters")
    assert "Compute clusters" in at.info[0].value
    at.number_input(key="cl-k").set_value(5)
    at.button[0].click().run()  # the form's submit button
    assert not at.exception
    with Gallery.open("digits", app_db) as g:
        report = cluster(g, k=5, sample=250)
    values = {m.label: m.value for m in at.metric}
    assert values["cluster accuracy"] == f"{report.cluster_accuracy:.4f}" and values["ARI"] == f"{report.adjusted_rand:.4f}"
    assert values["NMI"] == f"{report.normalized_mutual_info:.4f}"
    assert any("items whose cluster disagrees" in h.value for h in at.subheader)


def test_an_empty_store_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lookalike.core.store import Store

    Store(str(tmp_path / "empty"), create=True).close()
    monkeypatch.setenv("LOOKALIKE_DB", str(tmp_path / "empty"))
    at = start()
    assert "no collections yet" in at.warning[0].value


def test_app_command_errors_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util
    import socket

    from typer.testing import CliRunner

    from lookalike.frontends.cli import app as cli

    from .conftest import one_line_error, run_cli

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        got = run_cli("app", "--db", str(tmp_path / "db"), "--port", str(s.getsockname()[1]))
    assert got.returncode == 2 and "is in use: choose another with --port" in one_line_error(got)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "streamlit" else real(name, *a))
    r = CliRunner().invoke(cli, ["app", "--db", str(tmp_path / "db")])
    assert r.exit_code == 2 and "pip install 'lookalike[app]'" in one_line_error(r)


def test_bad_query_parameters_fall_back_to_defaults(app_db: str) -> None:
    at = start(page="Search", id="mnist:test:0", k="abc", split="foo", labels="nope,3")
    assert not at.exception and at.slider[0].value == 8 and at.selectbox(key="search-split").value == "any"
    assert at.multiselect[0].value == ["3"]
    assert start(page="Nowhere").sidebar.radio[0].value == "Search"


def test_warming_builds_the_embedder_then_freezes_the_heap(app_db: str) -> None:
    """After the warm-up, what is alive is exempt from Streamlit's per-re-run full collections."""
    import gc

    with Gallery.open("digits", app_db) as g:
        gc.unfreeze()
        try:
            app_module.warm(g)
            assert g._embedder is not None and gc.get_freeze_count() > 0
        finally:
            gc.unfreeze()


def test_audit_page_runs_shows_the_librarys_findings_and_any_item_becomes_a_query(
    planted: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from lookalike.analysis.audit import audit

    monkeypatch.setenv("LOOKALIKE_DB", planted)
    monkeypatch.setenv("LOOKALIKE_CACHE", str(tmp_path / "cache"))
    at = start(page="Audit")
    assert "No audit is saved" in at.info[0].value
    at.number_input(key="audit-k").set_value(5).run()
    at.button[0].click().run()
    assert not at.exception
    with Gallery.open("planted", planted) as g:
        r = audit(g, k=5, top=100)
    values = {m.label: m.value for m in at.metric}
    assert values["disputed labels"] == f"{r.n_disputed:,}" and values["duplicate groups"] == f"{len(r.groups):,}"
    assert values["leaked held-out items"] == "1" and values["without leaks"] == f"{r.leak_free_accuracy:.4f}"
    assert any(f"{r.suspects[0].label} → {r.suspects[0].suggested_label}" in m.value for m in at.markdown)
    assert any("leak across splits" in m.value for m in at.markdown)
    at.button(key="audit-s-mnist:train:7").click().run()  # the flipped item becomes the query
    assert not at.exception and at.session_state["page"] == "Search" and at.text_input(key="query_id").value == "mnist:train:7"
    with Gallery.open("planted", planted) as g:
        assert shown_ids(at) == [h.id for h in search(g, id="mnist:train:7", k=8)]
