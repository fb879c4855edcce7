"""`lookalike serve`: a real uvicorn server on loopback over a real Chroma store (random-weight VGG16, small data).

Expected answers are computed with the library before the server starts (it then holds the store's
lock); every endpoint, the key, each limit and bad request, 16 concurrent clients, and
`search --server` are checked against them.
"""

from __future__ import annotations

import http.client
import io
import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from lookalike.analysis.audit import audit, save_audit
from lookalike.analysis.evaluate import evaluate, save_report
from lookalike.core.gallery import Gallery
from lookalike.core.ingest import ingest
from lookalike.core.search import search
from lookalike.errors import InputError
from lookalike.frontends.server import check_exposure, read_api_key, require_extra, status_of
from lookalike.util import is_loopback

from .conftest import ServiceProcess, chroma_run, multipart, one_line_error, run_cli

KEY = "k3y-for-the-tests-0123456789abcdef"
DEAD_PROXY = {"HTTP_PROXY": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9", "NO_PROXY": "", "no_proxy": ""}


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class Served:
    server: ServiceProcess
    db: str
    root: Path
    x_test: np.ndarray
    queries: list[Path]
    by_image: dict[int, list[dict[str, Any]]]
    by_image_filtered: dict[int, list[dict[str, Any]]]
    by_id: dict[str, list[dict[str, Any]]]
    evaluation: dict[str, Any]
    audit: dict[str, Any]
    local_json: str
    local_text: str

    def call(self, method: str, path: str, body: bytes | None = None, ctype: str | None = None, key: str | None = KEY, **kw: Any):
        return self.server.call(method, path, body, ctype, key, **kw)

    def search(self, body: bytes, ctype: str, collection: str = "digits") -> tuple[int, dict[str, Any]]:
        status, _, data = self.call("POST", f"/collections/{collection}/search", body, ctype)
        return status, json.loads(data)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_npz: Path, fake_embedder) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("served")
    db = str(root / "db")
    ingest("mnist", source=str(tiny_npz), weights="random", input_size=32, collection="digits", db=db)
    ingest("mnist", source=str(tiny_npz), embedder=fake_embedder, collection="pixels", db=db)
    x_test = np.load(tiny_npz)["x_test"]
    queries = []
    for i in range(4):
        queries.append(root / f"q{i}.png")
        queries[-1].write_bytes(png(x_test[i]))
    with Gallery.open("digits", db) as g:
        by_image = {i: [h.to_dict() for h in search(g, image=queries[i], k=5)] for i in range(4)}
        by_image_filtered = {i: [h.to_dict() for h in search(g, image=queries[i], k=3, labels=["2", 7], split="train")] for i in range(4)}
        by_id = {f"mnist:test:{i}": [h.to_dict() for h in search(g, id=f"mnist:test:{i}", k=4)] for i in range(4)}
        saved = save_report(g, evaluate(g))
        saved_audit = save_audit(g, audit(g, k=5, top=5))
    local = run_cli("search", "--image", str(queries[0]), "--db", db, "--collection", "digits", "--json")
    local_text = run_cli("search", "--id", "mnist:test:1", "--k", "3", "--label", "1", "--db", db, "--collection", "digits")
    assert local.returncode == 0 and local_text.returncode == 0, local.stderr + local_text.stderr
    (root / "key").write_text(KEY + "\n")
    (root / "key").chmod(0o600)
    server = ServiceProcess("--db", db, "--api-key-file", str(root / "key"), "--max-upload-mb", "1")
    try:
        yield Served(
            server, db, root, x_test, queries, by_image, by_image_filtered, by_id, saved, saved_audit, local.stdout, local_text.stdout
        )
    finally:
        server.stop()


def test_health_is_open_and_everything_else_needs_the_key(served: Served) -> None:
    status, _, body = served.call("GET", "/health", key=None)
    assert status == 200 and json.loads(body)["status"] == "ok"
    body_json = json.dumps({"id": "mnist:test:0"}).encode()
    guarded = [
        ("GET", "/collections", None, None),
        ("GET", "/stats", None, None),
        ("POST", "/collections/digits/search", body_json, "application/json"),
        ("GET", "/collections/digits/items/mnist:test:0", None, None),
        ("GET", "/collections/digits/items/mnist:test:0/image", None, None),
        ("GET", "/collections/digits/evaluation", None, None),
        ("GET", "/collections/nope/evaluation", None, None),  # an unknown name says nothing either
        ("GET", "/collections/digits/audit", None, None),
    ]
    for method, path, body, ctype in guarded:
        for key in (None, "wrong-key-wrong-key-wrong", KEY + "x", KEY[:-1]):
            status, headers, data = served.call(method, path, body, ctype, key=key)
            assert status == 401, (method, path, key, data)
            assert json.loads(data) == {"error": "unauthorized", "status": 401}
            assert headers.get("www-authenticate") == "Bearer"
        status, _, _ = served.call(method, path, body, ctype, key=None, headers={"Authorization": f"Basic {KEY}"})
        assert status == 401
        status, _, _ = served.call(method, path, body, ctype)
        assert status in (200, 404) and (status == 200) == ("nope" not in path)
    assert served.call("GET", "/docs", key=None)[0] == 401  # with a key, not even the API's description is open
    assert served.call("GET", "/openapi.json")[0] == 404
    big, ctype = multipart([], b"\0" * (3 * 1024 * 1024))  # no key: refused before the body's size is even looked at
    assert served.call("POST", "/collections/digits/search", big, ctype, key=None)[0] == 401


def test_collections_list_both(served: Served) -> None:
    status, _, data = served.call("GET", "/collections")
    cols = {c["name"]: c for c in json.loads(data)}
    assert status == 200 and set(cols) == {"digits", "pixels"}
    assert cols["digits"]["count"] == 250 and cols["digits"]["dataset"] == "mnist"
    assert cols["digits"]["embedder"].startswith("vgg16 random(seed=0) block4_pool") and cols["pixels"]["embedder"].startswith("pixels 8px")
    assert (cols["digits"]["backbone"], cols["digits"]["input_size"], cols["pixels"]["backbone"]) == ("vgg16", 32, "pixels")
    assert cols["digits"]["label_names"] == [str(i) for i in range(10)]
    assert served.db not in data.decode()


def test_search_hits_are_the_librarys(served: Served) -> None:
    for i in range(4):
        status, got = served.search(*multipart([("k", "5")], png(served.x_test[i])))
        assert status == 200 and got["hits"] == served.by_image[i] and got["query"]["kind"] == "image"
        fields = [("k", "3"), ("labels", "2"), ("labels", "7"), ("split", "train")]
        status, got = served.search(*multipart(fields, png(served.x_test[i])))
        assert status == 200 and got["hits"] == served.by_image_filtered[i] and got["labels"] == [2, 7]
    for item_id, want in served.by_id.items():
        status, got = served.search(json.dumps({"id": item_id, "k": 4}).encode(), "application/json")
        assert status == 200 and got["hits"] == want
    assert served.by_image[0][0]["id"] == "mnist:test:0" and served.by_image[0][0]["distance"] == pytest.approx(0, abs=1e-5)


def test_search_by_vector(served: Served) -> None:
    status, by_id = served.search(json.dumps({"id": "mnist:test:2", "k": 3}).encode(), "application/json", "pixels")
    assert status == 200
    vec = np.asarray(
        Image.open(io.BytesIO(served.call("GET", "/collections/pixels/items/mnist:test:2/image")[2])).resize((8, 8), Image.BILINEAR),
        np.float32,
    )
    vec = (vec.ravel() / 255.0) / np.linalg.norm(vec.ravel() / 255.0)
    status, by_vec = served.search(json.dumps({"vector": vec.tolist(), "k": 4}).encode(), "application/json", "pixels")
    assert status == 200 and by_vec["hits"][0]["id"] == "mnist:test:2"
    assert [h["id"] for h in by_vec["hits"][1:]] == [h["id"] for h in by_id["hits"]]


def test_items_and_their_images(served: Served) -> None:
    status, _, data = served.call("GET", "/collections/digits/items/mnist:test:3")
    item = json.loads(data)
    assert status == 200 and item["id"] == "mnist:test:3" and item["split"] == "test" and item["metadata"]["index"] == 3
    status, headers, data = served.call("GET", "/collections/digits/items/mnist:test:3/image")
    assert status == 200 and headers["content-type"] == "image/png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), served.x_test[3])
    for path in (
        "/collections/digits/items/nope",
        "/collections/digits/items/..%2F..%2Fetc%2Fpasswd/image",
        "/collections/digits/items/x/../../../etc",
    ):
        status, _, data = served.call("GET", path)
        assert status == 404, path
        assert "root:" not in data.decode()


def test_items_listed_a_page_at_a_time_by_cursor(served: Served) -> None:
    listed, cursor, pages = [], None, 0
    while True:
        status, _, data = served.call("GET", "/collections/pixels/items?limit=60" + (f"&cursor={cursor}" if cursor else ""))
        page = json.loads(data)
        assert status == 200 and page["collection"] == "pixels" and len(page["items"]) <= 60, page
        listed += page["items"]
        pages, cursor = pages + 1, page["next_cursor"]
        if cursor is None:
            break
    ids = [it["id"] for it in listed]
    assert pages == 5 and len(ids) == 250 == len(set(ids))
    assert set(ids) == {f"mnist:train:{i}" for i in range(200)} | {f"mnist:test:{i}" for i in range(50)}
    status, _, data = served.call("GET", "/collections/pixels/items?label=2&split=test&where=index%20%3E%3D%2010&limit=1000")
    got = json.loads(data)["items"]
    assert (
        status == 200
        and got
        and got == [it for it in listed if it["label"] == 2 and it["split"] == "test" and it["metadata"]["index"] >= 10]
    )
    remote = run_cli("items", "--server", served.server.url, "-c", "pixels", "--limit", "7", "--json", env={"LOOKALIKE_API_KEY": KEY})
    assert remote.returncode == 0, remote.stderr
    first = json.loads(remote.stdout)
    assert [it["id"] for it in first["items"]] == ids[:7] and first["next_cursor"]
    text = run_cli("items", "--server", served.server.url, "-c", "pixels", "--limit", "3", "--cursor", first["next_cursor"],
                   env={"LOOKALIKE_API_KEY": KEY})  # fmt: skip
    assert text.returncode == 0 and [line.split()[0] for line in text.stdout.splitlines()[:3]] == ids[7:10]
    assert "next page: --cursor " in text.stdout
    for query, message in (
        ("cursor=nonsense", "start again without a cursor"),
        ("limit=0", "--limit must be 1 to 1,000"),
        ("limit=many", "limit"),
        ("split=val", "is not one of train, test"),
        ("where=width%20%3E%3D", "where"),
    ):
        status, _, data = served.call("GET", f"/collections/pixels/items?{query}")
        answer = json.loads(data)
        assert status == 422 and message in answer["error"] and "\n" not in answer["error"], (query, answer)


def test_evaluation_saved_with_the_collection(served: Served) -> None:
    status, _, data = served.call("GET", "/collections/digits/evaluation")
    assert status == 200 and json.loads(data) == served.evaluation
    status, _, data = served.call("GET", "/collections/pixels/evaluation")
    assert status == 404 and "lookalike evaluate --collection pixels" in json.loads(data)["error"]


def test_audit_saved_with_the_collection(served: Served) -> None:
    status, _, data = served.call("GET", "/collections/digits/audit")
    got = json.loads(data)
    assert status == 200 and got == served.audit and len(got["suspects"]) == 5 and "saved_at" in got
    assert {"id", "split", "label", "suggested_label", "score", "neighbours"} <= set(got["suspects"][0])
    status, _, data = served.call("GET", "/collections/pixels/audit")
    assert status == 404 and "lookalike audit --collection pixels" in json.loads(data)["error"]


@pytest.mark.parametrize(
    ("name", "status", "message"),
    [
        ("k zero", 422, "k must be between 1 and 1000, got 0"),
        ("k too big", 422, "k must be between 1 and 1000, got 1001"),
        ("k not a number", 422, "whole number"),
        ("unknown collection", 404, "no collection 'nope'"),
        ("unknown id", 404, "no item 'mnist:test:999'"),
        ("unknown label", 422, "choose from 0, 1, 2"),
        ("bad split", 422, "is not one of train, test"),
        ("not an image", 422, "cannot read the upload q.png as an image"),
        ("bomb", 413, "too large"),
        ("over the upload limit", 413, "over the limit of 1,048,576 bytes"),
        ("not json", 422, "the body is not JSON"),
        ("unknown field", 422, "unknown field 'lables'"),
        ("no query", 422, 'give "id"'),
        ("no image field", 422, "file field named 'image'"),
        ("wrong content type", 415, "multipart/form-data"),
        ("vector of the wrong size", 422, "list of 512 numbers"),
        ("unknown endpoint", 404, "no endpoint"),
        ("wrong method", 405, "is not allowed"),
    ],
)
def test_bad_requests_get_one_clean_json_error(served: Served, tmp_path: Path, name: str, status: int, message: str) -> None:
    search = "/collections/digits/search"
    q = png(served.x_test[0])
    js = "application/json"
    if name == "bomb":
        Image.new("1", (12_000, 12_000)).save(tmp_path / "bomb.png")  # 144 Mpx in a small file
        bomb = (tmp_path / "bomb.png").read_bytes()
    requests = {
        "k zero": ("POST", search, *multipart([("k", "0")], q)),
        "k too big": ("POST", search, json.dumps({"id": "mnist:test:0", "k": 1001}).encode(), js),
        "k not a number": ("POST", search, *multipart([("k", "five")], q)),
        "unknown collection": ("POST", "/collections/nope/search", json.dumps({"id": "mnist:test:0"}).encode(), js),
        "unknown id": ("POST", search, json.dumps({"id": "mnist:test:999"}).encode(), js),
        "unknown label": ("POST", search, *multipart([("labels", "cat")], q)),
        "bad split": ("POST", search, json.dumps({"id": "mnist:test:0", "split": "val"}).encode(), js),
        "not an image": ("POST", search, *multipart([], b"GIF89a but not really")),
        "bomb": ("POST", search, *multipart([], bomb if name == "bomb" else b"")),
        "over the upload limit": ("POST", search, *multipart([], b"\0" * (1024 * 1024 + 10))),
        "not json": ("POST", search, b"{id: 1", js),
        "unknown field": ("POST", search, json.dumps({"id": "mnist:test:0", "lables": [1]}).encode(), js),
        "no query": ("POST", search, json.dumps({"k": 3}).encode(), js),
        "no image field": ("POST", search, *multipart([("k", "3")])),
        "wrong content type": ("POST", search, b"id=1", "application/x-www-form-urlencoded"),
        "vector of the wrong size": ("POST", search, json.dumps({"vector": [0.5, 0.5]}).encode(), js),
        "unknown endpoint": ("GET", "/collections/digits/nothing", None, None),
        "wrong method": ("DELETE", "/collections", None, None),
    }
    method, path, body, ctype = requests[name]
    got_status, _headers, data = served.call(method, path, body, ctype)
    answer = json.loads(data)
    assert got_status == status, answer
    assert answer["status"] == status and message in answer["error"], answer
    assert "\n" not in answer["error"] and "Traceback" not in data.decode() and served.db not in data.decode()
    assert str(served.root) not in data.decode()


def test_a_chunked_upload_over_the_limit_is_cut_off(served: Served) -> None:
    body, ctype = multipart([], b"\0" * (3 * 1024 * 1024))
    conn = http.client.HTTPConnection("127.0.0.1", served.server.port, timeout=60)
    try:
        chunks = (body[i : i + 65536] for i in range(0, len(body), 65536))
        conn.request(
            "POST",
            "/collections/digits/search",
            body=chunks,
            headers={"Content-Type": ctype, "Authorization": f"Bearer {KEY}"},
            encode_chunked=True,
        )
        resp = conn.getresponse()
        assert resp.status == 413 and "over the limit" in json.loads(resp.read())["error"]
    except (BrokenPipeError, ConnectionResetError):  # the server may close before reading it all: also a refusal
        pass
    finally:
        conn.close()
    assert served.call("GET", "/health", key=None)[0] == 200


def test_sixteen_concurrent_clients_get_the_sequential_answers(served: Served) -> None:
    jobs = []
    for _r in range(4):
        for i in range(4):
            jobs.append(("image", i, multipart([("k", "5")], png(served.x_test[i]))))
        for item_id in served.by_id:
            jobs.append(("id", item_id, (json.dumps({"id": item_id, "k": 4}).encode(), "application/json")))
    results: dict[int, tuple[int, dict[str, Any]]] = {}
    start = threading.Barrier(16)

    def client(c: int) -> None:
        start.wait()
        for j in range(c, len(jobs), 16):
            results[j] = served.search(*jobs[j][2])

    threads = [threading.Thread(target=client, args=(c,)) for c in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for j, (kind, key, _) in enumerate(jobs):
        status, got = results[j]
        assert status == 200
        want = served.by_image[key] if kind == "image" else served.by_id[key]
        # the same hits; a distance may differ in the last float bits when Chroma answers a batch (2.5e-07 seen for 0.0)
        assert [{**h, "distance": None} for h in got["hits"]] == [{**h, "distance": None} for h in want]
        assert [h["distance"] for h in got["hits"]] == pytest.approx([h["distance"] for h in want], abs=1e-5)
    stats = json.loads(served.call("GET", "/stats")[2])["collections"]["digits"]
    assert stats["items"] >= 16 and stats["largest"] >= 1


def test_search_server_matches_local_search(served: Served) -> None:
    key_file = str(served.root / "key")
    remote = run_cli(
        "search",
        "--image",
        str(served.queries[0]),
        "--server",
        served.server.url,
        "--api-key-file",
        key_file,
        "--collection",
        "digits",
        "--json",
    )
    assert remote.returncode == 0, remote.stderr
    assert json.loads(remote.stdout) == json.loads(served.local_json)
    text = run_cli(
        "search",
        "--id",
        "mnist:test:1",
        "--k",
        "3",
        "--label",
        "1",
        "--server",
        served.server.url,
        "--collection",
        "digits",
        env={"LOOKALIKE_API_KEY": KEY, **DEAD_PROXY},  # a proxy in the environment is not used for a service on loopback
    )
    assert text.returncode == 0 and text.stdout == served.local_text
    saved = served.root / "remote.png"
    pic = run_cli(
        "search",
        "--id",
        "mnist:test:1",
        "--server",
        served.server.url,
        "-c",
        "digits",
        "--save",
        str(saved),
        env={"LOOKALIKE_API_KEY": KEY},
    )
    assert pic.returncode == 0 and Image.open(saved).size[0] > 100


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ([], {}, "wants its API key: pass --api-key-file"),
        ([], {"LOOKALIKE_API_KEY": "wrong-key-wrong-key-wrong"}, "wants its API key"),
        (["--collection", "nope"], {"LOOKALIKE_API_KEY": KEY}, "no collection 'nope'"),
        (["--k", "0", "-c", "digits"], {"LOOKALIKE_API_KEY": KEY}, "k must be between 1 and 1000"),
        ([], {"LOOKALIKE_API_KEY": KEY}, "several collections, pass --collection: digits, pixels"),
    ],
)
def test_search_server_errors_are_one_line(served: Served, args: list[str], env: dict[str, str], message: str) -> None:
    clean = {"LOOKALIKE_API_KEY": ""} | env
    got = run_cli("search", "--id", "mnist:test:0", "--server", served.server.url, *args, env=clean)
    assert got.returncode != 0 and message in one_line_error(got)


def test_the_service_holds_the_store_lock(served: Served, tiny_npz: Path) -> None:
    got = run_cli("ingest", "mnist", "--source", str(tiny_npz), "--embedder", "pixels", "--db", served.db, "--collection", "more")
    line = one_line_error(got)
    assert got.returncode == 1 and "in use by process" in line and "chroma run" in line


# -- starting the service ------------------------------------------------------------------------------


def test_exposing_the_store_needs_a_key_or_insecure(tmp_path: Path) -> None:
    got = run_cli("serve", "--host", "0.0.0.0", "--db", str(tmp_path / "db"))
    assert got.returncode == 2 and "--api-key-file FILE" in one_line_error(got) and "--insecure" in one_line_error(got)
    (tmp_path / "short").write_text("abc\n")
    got = run_cli("serve", "--api-key-file", str(tmp_path / "short"), "--db", str(tmp_path / "db"))
    assert got.returncode == 2 and "at least 16 characters" in one_line_error(got) and "secrets.token_urlsafe" in one_line_error(got)
    got = run_cli("serve", "--api-key-file", str(tmp_path / "missing"), "--db", str(tmp_path / "db"))
    assert got.returncode == 2 and "cannot read --api-key-file" in one_line_error(got)


@pytest.mark.slow
def test_a_port_in_use_is_one_line(tmp_path: Path, tiny_npz: Path, fake_embedder) -> None:
    db = str(tmp_path / "db")
    ingest("mnist", source=str(tiny_npz), embedder=fake_embedder, db=db)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        got = run_cli("serve", "--db", db, "--port", str(s.getsockname()[1]))
    assert got.returncode == 2 and "is in use: choose another with --port" in one_line_error(got)


def test_exposure_and_key_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "192.168.1.5", "::", "example.com"))
    check_exposure("127.0.0.1", None, False)
    check_exposure("0.0.0.0", KEY, False)
    check_exposure("0.0.0.0", None, True)
    with pytest.raises(InputError, match="--insecure"):
        check_exposure("0.0.0.0", None, False)
    monkeypatch.delenv("LOOKALIKE_API_KEY", raising=False)
    assert read_api_key(None) is None
    monkeypatch.setenv("LOOKALIKE_API_KEY", f"  {KEY}\n")
    assert read_api_key(None) == KEY
    (tmp_path / "k").write_text(f"{KEY}-file\nsecond line ignored\n")
    assert read_api_key(tmp_path / "k") == f"{KEY}-file"  # the file wins over the environment
    (tmp_path / "spaced").write_text("a key with spaces in it, long enough")
    with pytest.raises(InputError, match="without spaces"):
        read_api_key(tmp_path / "spaced")


def test_without_the_extra_one_line_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn now fails
    with pytest.raises(InputError, match=r"pip install 'lookalike\[serve\]'"):
        require_extra()


def test_status_codes_of_library_errors() -> None:
    from lookalike.errors import DamagedError, EmbedderError, LockedError, NotFoundError, StoreError, TooLargeError

    codes = [status_of(e("x")) for e in (InputError, TooLargeError, NotFoundError, StoreError, LockedError, EmbedderError, DamagedError)]
    assert codes == [422, 413, 404, 503, 503, 503, 500]


@pytest.mark.slow
def test_a_service_over_a_chroma_server_runs_beside_the_cli_and_says_503_when_the_store_goes(tmp_path: Path, tiny_npz: Path) -> None:
    with chroma_run(tmp_path / "chroma") as (chroma, url):
        got = run_cli("ingest", "mnist", "--source", str(tiny_npz), "--embedder", "pixels", "--db", url, "--collection", "shared")
        assert got.returncode == 0, got.stderr
        server = ServiceProcess("--db", url)
        try:
            status, _, data = server.call(
                "POST", "/collections/shared/search", *multipart([("k", "3")], png(np.load(tiny_npz)["x_test"][5]))
            )
            assert status == 200 and json.loads(data)["hits"][0]["id"] == "mnist:test:5"
            listed, cursor = [], ""  # a server's collection pages by offset (other processes write to it)
            while cursor is not None:
                code, _, body = server.call("GET", f"/collections/shared/items?limit=100&cursor={cursor}")
                assert code == 200, body
                page = json.loads(body)
                listed += [it["id"] for it in page["items"]]
                cursor = page["next_cursor"]
            assert len(listed) == 250 == len(set(listed))
            beside = run_cli("search", "--id", "mnist:test:5", "--k", "2", "--db", url, "--json")  # no lock on a server
            assert beside.returncode == 0, beside.stderr
            assert [h["id"] for h in json.loads(beside.stdout)] == [h["id"] for h in json.loads(data)["hits"][1:]]
            chroma.terminate()
            chroma.wait(timeout=30)
            for path in ("/health", "/collections"):
                status, _, data = server.call("GET", path)
                assert status == 503 and "unavailable" in json.loads(data)["error"], data
            status, _, data = server.call(
                "POST", "/collections/shared/search", json.dumps({"id": "mnist:test:5"}).encode(), "application/json"
            )
            assert status == 503 and url not in data.decode()
        finally:
            server.stop()


@pytest.mark.slow
def test_sigterm_stops_the_service_cleanly_and_frees_the_store(tmp_path: Path, tiny_npz: Path, fake_embedder) -> None:
    import signal

    from lookalike.core.store import Store

    db = str(tmp_path / "db")
    ingest("mnist", source=str(tiny_npz), embedder=fake_embedder, db=db)
    server = ServiceProcess("--db", db)
    assert server.call("GET", "/health")[0] == 200
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=30) == 0
    time.sleep(0.2)  # (the stderr reader thread catches up)
    assert any(line.strip() == "stopped" for line in server.lines), server.lines
    Store(db).close()  # the lock is free


def test_bad_serve_options_are_one_line(tmp_path: Path) -> None:
    for args, message in (
        (["--batch-window-ms", "inf"], "--batch-window-ms must be between 0 and 1000"),
        (["--max-batch", "0"], "--max-batch must be at least 1"),
        (["--max-upload-mb", "inf"], "--max-upload-mb must be between"),
    ):
        got = run_cli("serve", "--db", str(tmp_path / "db"), *args)
        assert got.returncode == 2 and message in one_line_error(got), got.stderr


def test_the_client_does_not_carry_the_key_through_a_redirect() -> None:
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from lookalike.errors import LookalikeError
    from lookalike.frontends.client import Client

    seen: list[tuple[str, str | None]] = []

    class Redirecting(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append((self.path, self.headers.get("Authorization")))
            self.send_response(307)
            self.send_header("Location", "/elsewhere")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    srv = HTTPServer(("127.0.0.1", 0), Redirecting)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        with pytest.raises(LookalikeError, match="307"):
            Client(f"http://127.0.0.1:{srv.server_port}", api_key=KEY).collections()
    finally:
        srv.shutdown()
    assert seen == [("/collections", f"Bearer {KEY}")]


def test_a_where_filter_over_http_in_json_and_in_a_form(served: Served) -> None:
    as_dict = {"$and": [{"index": {"$lt": 30}}, {"source": "x_train"}]}
    status, want = served.search(json.dumps({"id": "mnist:test:2", "k": 4, "where": as_dict}).encode(), "application/json", "pixels")
    assert status == 200 and len(want["hits"]) == 4
    assert all(h["metadata"]["index"] < 30 and h["metadata"]["source"] == "x_train" for h in want["hits"])
    body = json.dumps({"id": "mnist:test:2", "k": 4, "where": ["index < 30", "source = x_train"]}).encode()
    status, got = served.search(body, "application/json", collection="pixels")
    assert status == 200 and got["hits"] == want["hits"]
    form, ctype = multipart([("k", "4"), ("where", "index < 30"), ("where", "source = x_train")], png(served.x_test[2]))
    status, got = served.search(form, ctype, collection="pixels")
    assert status == 200 and len(got["hits"]) == 4
    assert all(h["metadata"]["index"] < 30 and h["metadata"]["source"] == "x_train" for h in got["hits"])
    status, err = served.search(json.dumps({"id": "mnist:test:2", "where": ["nope ~ 1"]}).encode(), "application/json", "pixels")
    assert status == 422 and "unknown operator" in err["error"]
    nothing = json.dumps({"id": "mnist:test:2", "where": {"index": {"$gt": 10**9}}}).encode()
    status, got = served.search(nothing, "application/json", "pixels")
    assert status == 200 and got["hits"] == []  # a filter that matches nothing: no hits, no error


WRITE_KEY = "wr1te-key-for-the-tests-0123456789"


def _upload(images: list[tuple[str, bytes]], fields: list[tuple[str, str]] = ()) -> tuple[bytes, str]:
    b = "testboundary9c1e"
    parts = [f'--{b}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields]
    for name, data in images:
        head = f'--{b}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\nContent-Type: image/png\r\n\r\n'
        parts.append(head.encode() + data + b"\r\n")
    parts.append(f"--{b}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={b}"


def test_items_added_and_removed_over_http_with_scoped_keys_and_limits(tmp_path: Path, tiny_npz: Path, fake_embedder) -> None:
    """POST and DELETE of items: the write key only (the read key: 403; writes off without a write key: 403), the
    limits (count, metadata size and fields), the upload kept and served as a thumbnail, a filter that sees it at once."""
    from .conftest import make_digits

    db = str(tmp_path / "db")
    ingest("mnist", source=str(tiny_npz), embedder=fake_embedder, collection="pixels", db=db)
    (tmp_path / "key").write_text(KEY)
    (tmp_path / "wkey").write_text(WRITE_KEY)
    x, _ = make_digits(20, seed=31)
    one = png(x[0])
    body, ctype = _upload([("mine.png", one)], [("label", "4"), ("metadata", json.dumps({"album": "Trip", "名前": "猫"}))])
    off = ServiceProcess("--db", db, "--api-key-file", str(tmp_path / "key"))
    try:  # no write key configured: the write routes are off
        status, _, data = off.call("POST", "/collections/pixels/items", body, ctype, key=KEY)
        assert status == 403 and "--write-key-file" in json.loads(data)["error"]
        assert off.call("DELETE", "/collections/pixels/items/mnist:train:0", key=KEY)[0] == 403
    finally:
        off.stop()
    files = tmp_path / "kept"
    keys = ["--api-key-file", str(tmp_path / "key"), "--write-key-file", str(tmp_path / "wkey")]
    server = ServiceProcess("--db", db, *keys, "--files", str(files))
    try:
        status, _, data = server.call("POST", "/collections/pixels/items", body, ctype, key=KEY)
        assert status == 403 and "may only read" in json.loads(data)["error"]  # the read key cannot write
        assert server.call("POST", "/collections/pixels/items", body, ctype, key=None)[0] == 401
        warm = json.dumps({"id": "mnist:test:0", "k": 3, "where": ["album = Trip"]}).encode()
        status, _, data = server.call("POST", "/collections/pixels/search", warm, "application/json", key=KEY)
        assert status == 422  # no item has the field yet
        status, _, data = server.call("POST", "/collections/pixels/items", body, ctype, key=WRITE_KEY)
        added = json.loads(data)
        assert status == 201 and added["id"].startswith("added:") and added["added"] == [added["id"]], added
        status, _, data = server.call("POST", "/collections/pixels/items", body, ctype, key=WRITE_KEY)
        assert status == 200 and json.loads(data)["already_stored"] == [added["id"]]  # the same image again: stored once
        status, _, data = server.call("POST", "/collections/pixels/search", warm, "application/json", key=KEY)  # the write key reads too
        assert status == 200 and [h["id"] for h in json.loads(data)["hits"]] == [added["id"]]
        status, _, data = server.call("GET", f"/collections/pixels/items/{added['id']}", key=KEY)
        assert status == 200 and json.loads(data)["metadata"]["名前"] == "猫" and json.loads(data)["label"] == 4
        status, _, data = server.call("GET", f"/collections/pixels/items/{added['id']}/image", key=KEY)
        assert status == 200 and data[:4] == b"\x89PNG"
        kept = list(files.rglob("*.png"))
        assert len(kept) == 1 and kept[0].read_bytes() == one
        limits = [
            (_upload([(f"{i}.png", png(x[i])) for i in range(17)], [("label", "1")]), 413, "at most 16 images"),
            (_upload([("a.png", one)], [("label", "1"), ("metadata", json.dumps({"f": "x" * 20000}))]), 413, "over 16,384 bytes"),
            (_upload([("a.png", one)], [("label", "1"), ("metadata", json.dumps({f"f{i}": i for i in range(65)}))]), 413, "65 fields"),
            (_upload([("a.png", one)], [("label", "1"), ("metadata", "[1]")]), 422, "JSON object"),
            (_upload([("a.png", one)], [("label", "1"), ("metadata", json.dumps({"width": 3}))]), 422, "lookalike fills itself"),
            (_upload([("a.png", b"nope")], [("label", "1")]), 422, "a.png"),
            (_upload([("a.png", one)], []), 422, "--label"),
            (_upload([], [("label", "1")]), 422, "file field named 'image'"),
        ]
        for (b, c), want, needle in limits:
            status, _, data = server.call("POST", "/collections/pixels/items", b, c, key=WRITE_KEY)
            assert status == want and needle in json.loads(data)["error"], (needle, status, data)
        n = json.loads(server.call("GET", "/collections", key=KEY)[2])[0]["count"]
        assert n == 251  # nothing of the refused uploads was written
        assert server.call("DELETE", f"/collections/pixels/items/{added['id']}", key=KEY)[0] == 403
        status, _, data = server.call("DELETE", f"/collections/pixels/items/{added['id']}", key=WRITE_KEY)
        assert status == 200 and json.loads(data)["removed"] == added["id"] and not kept[0].exists()
        assert server.call("DELETE", f"/collections/pixels/items/{added['id']}", key=WRITE_KEY)[0] == 404
        assert server.call("DELETE", "/collections/pixels/items/mnist:train:5", key=WRITE_KEY)[0] == 200
        status, _, data = server.call("GET", "/collections/pixels/items/mnist:train:5", key=KEY)
        assert status == 404
    finally:
        server.stop()
