"""``lookalike serve``: the HTTP front-end of :class:`~lookalike.frontends.service.Service` (FastAPI under uvicorn).

Each endpoint parses its request, calls the service, and presents the answer as JSON; every error is
one JSON object ``{"error": "...", "status": N}``, never a traceback or a server path (details are
logged here). Needs the ``serve`` extra: ``pip install 'lookalike[serve]'``.

Security: the service binds 127.0.0.1 unless told otherwise, and any other address needs an API key
(``--api-key-file`` or ``$LOOKALIKE_API_KEY``) or an explicit ``--insecure``. With a key every endpoint
but ``/health`` (the API's description, ``/docs`` and ``/openapi.json``, is then not served at all)
needs ``Authorization: Bearer KEY``, compared in constant time (before any of the body is read); a
missing or wrong key gets 401 and nothing else.

Writes (``POST /collections/{name}/items``, ``DELETE /collections/{name}/items/{id}``) have their own
key (``--write-key-file``): it may also read; the read key on a write route gets 403, and with no
write key configured the write routes answer 403 naming the option. Limits of an upload: the body's
size (413), ``MAX_ADD_FILES`` images, metadata of ``MAX_METADATA_BYTES`` and ``MAX_METADATA_FIELDS``.
"""

import hmac
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from lookalike import __version__
from lookalike.errors import (
    DamagedError,
    DatasetError,
    EmbedderError,
    InputError,
    LockedError,
    LookalikeError,
    NotFoundError,
    StoreError,
    TooLargeError,
)
from lookalike.frontends.service import MAX_K, Service
from lookalike.util import is_loopback

log = logging.getLogger(__name__)

EXTRA = "the service needs its extra: pip install 'lookalike[serve]'"
KEY_ENV = "LOOKALIKE_API_KEY"
WRITE_KEY_ENV = "LOOKALIKE_WRITE_KEY"
MIN_KEY_LENGTH = 16
MAX_UPLOAD = 10 * 1024 * 1024  # bytes of one request body
DRAIN_CAP = 64 * 1024 * 1024  # bytes of a refused body read (and dropped) before the answer, so that the client hears it
SEARCH_FIELDS = ("id", "vector", "k", "labels", "label", "split", "where")
ADD_FIELDS = ("image", "label", "metadata")
MAX_ADD_FILES = 16  # images in one POST of items
MAX_METADATA_BYTES = 16 * 1024  # of an upload's metadata JSON
MAX_METADATA_FIELDS = 64
KEY_HINT = "make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))' > lookalike.key"


def require_extra() -> None:
    """InputError naming the extra to install when FastAPI, uvicorn or python-multipart is missing."""
    import importlib.util

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise InputError(EXTRA) from None
    if importlib.util.find_spec("python_multipart") is None and importlib.util.find_spec("multipart") is None:  # forms need it
        raise InputError(EXTRA)


def status_of(exc: LookalikeError) -> int:
    """The HTTP status of a library error."""
    if isinstance(exc, TooLargeError):
        return 413
    if isinstance(exc, InputError):
        return 422
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, (LockedError, StoreError, EmbedderError, DatasetError)) and not isinstance(exc, DamagedError):
        return 503
    return 500


# -- exposure and keys ---------------------------------------------------------------------------------


def read_api_key(path: str | os.PathLike[str] | None, option: str = "--api-key-file", env: str = KEY_ENV) -> str | None:
    """The key from ``path`` (its first line), else ``$env``, else None; InputError on a bad key."""
    if path is not None:
        p = Path(path).expanduser()
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read {option} {p} ({type(exc).__name__}): {KEY_HINT}") from None
        key, source = (text.splitlines() or [""])[0].strip(), f"{option} {p}"
        try:
            if p.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                log.warning("%s is readable by other users: chmod 600 %s", p, p)
        except OSError:
            pass
    elif os.environ.get(env):  # set and not empty
        key, source = os.environ[env].strip(), f"${env}"
    else:
        return None
    if len(key) < MIN_KEY_LENGTH or any(c.isspace() for c in key):
        raise InputError(f"the API key in {source} must be at least {MIN_KEY_LENGTH} characters without spaces: {KEY_HINT}")
    return key


def check_exposure(host: str, api_key: str | None, insecure: bool) -> None:
    """InputError when binding ``host`` would expose the store to the network without a key (and no ``--insecure``)."""
    if is_loopback(host) or api_key is not None or insecure:
        return
    raise InputError(
        f"--host {host} lets other machines reach the store: give --api-key-file FILE (or ${KEY_ENV}), or --insecure to serve without a key"
    )


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host``:``port`` (port 0: any free one); InputError naming the fix when it cannot bind."""
    if not 0 <= port <= 65535:
        raise InputError(f"--port must be between 0 and 65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise InputError(f"--host {host!r} is not an address of this machine: use 127.0.0.1, 0.0.0.0 or an interface's address") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == 98:  # EADDRINUSE
            raise InputError(f"port {port} on {host} is in use: choose another with --port") from None
        raise InputError(f"cannot listen on {host}:{port} ({exc.strerror}): choose another --host or --port") from None
    sock.set_inheritable(True)
    return sock


# -- the app -------------------------------------------------------------------------------------------


def _search_docs() -> dict[str, Any]:
    """The request bodies of the search endpoint, for /docs (the endpoint reads the body itself)."""
    fields = {
        "k": {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": 5},
        "labels": {"type": "array", "items": {"type": "string"}, "description": "keep only these labels (ints or names)"},
        "split": {"type": "string", "enum": ["train", "test"]},
        "where": {
            "description": 'a metadata filter: ["width >= 1000", "camera = \\"Pixel 7\\""] (the CLI\'s --where, ANDed) or Chroma\'s '
            'where object {"width": {"$gte": 1000}}; in a form, repeat the field with one expression each',
        },
    }
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["image"],
                        "properties": {"image": {"type": "string", "format": "binary"}, **fields},
                    },
                    "encoding": {"labels": {"style": "form", "explode": True}},
                },
                "application/json": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "id": {"type": "string", "description": "a stored item's id (never returned itself)"},
                            "vector": {"type": "array", "items": {"type": "number"}},
                            **fields,
                        },
                    },
                    "example": {"id": "mnist:test:0", "k": 5},
                },
            },
        }
    }


def create_app(service: Service, *, api_key: str | None = None, write_key: str | None = None, max_upload: int = MAX_UPLOAD) -> Any:
    """The FastAPI app serving ``service`` (``api_key``: required on every endpoint but /health; ``write_key``: the one
    key of the write routes, off without it)."""
    try:
        from fastapi import APIRouter, FastAPI, Query, Request
        from fastapi.concurrency import run_in_threadpool
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import JSONResponse, Response
        from starlette.exceptions import HTTPException
    except ImportError:
        raise InputError(EXTRA) from None

    hidden = {"docs_url": None, "redoc_url": None, "openapi_url": None} if api_key else {}  # with a key: nothing open but /health
    app = FastAPI(
        **hidden,
        title="lookalike",
        version=__version__,
        description="Image similarity search over lookalike collections: upload an image or name a stored id, "
        "filter by label and split, get the nearest stored items.",
    )
    app.state.service = service

    def error(status: int, message: str) -> Any:
        return JSONResponse({"error": message, "status": status}, status_code=status)

    @app.exception_handler(LookalikeError)
    async def library_error(request: Request, exc: LookalikeError) -> Any:
        status = status_of(exc)
        (log.error if status >= 500 else log.info)("%s %s -> %d: %s", request.method, request.url.path, status, exc)
        if status < 500:  # the request's own fault: the message names the fix (and not where the store is)
            return error(status, str(exc).replace(f"the store at {service.store.db}", "the store").replace(service.store.db, "the store"))
        if isinstance(exc, DamagedError):
            return error(500, "the store answered with an internal error (run `lookalike check` on it): the server's log says more")
        if isinstance(exc, StoreError):
            return error(503, "the store is unavailable: the server's log says more")
        return error(503, "the collection's embedder or dataset is unavailable: the server's log says more")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Any:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path"))
        return error(422, f"{where or 'request'}: {first.get('msg', 'invalid')}")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Any:
        if exc.status_code == 404:
            return error(404, f"no endpoint {request.method} {request.url.path}: see /docs")
        if exc.status_code == 405:
            return error(405, f"{request.method} is not allowed on {request.url.path}: see /docs")
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Any:
        log.exception("%s %s failed", request.method, request.url.path)
        return error(500, "internal error: the server's log says more")

    @app.get("/health", tags=["service"])
    def health() -> Any:
        """Whether the service and its store answer (no key needed)."""
        try:
            return service.health()
        except StoreError as exc:
            log.error("health: %s", exc)
            return error(503, "the store is unavailable")

    api = APIRouter()  # (the key is checked by _Gate, before any route or body)

    @api.get("/collections", tags=["collections"])
    def collections() -> Any:
        """Every collection: name, count, dataset, embedder, label names."""
        return service.collections()

    @api.get("/stats", tags=["service"])
    def stats() -> Any:
        """How image queries have been batched so far."""
        return service.stats()

    @api.post("/collections/{name}/search", tags=["search"], openapi_extra=_search_docs())
    async def search(name: str, request: Request) -> Any:
        """The nearest stored items to an uploaded image (multipart, field `image`), a stored `id` or a `vector` (JSON),
        optionally only of some `labels` and of one `split`."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            kwargs = await _form_query(request)
        elif ctype == "application/json" or ctype.endswith("+json"):
            kwargs = await _json_query(request)
        else:
            return error(415, 'send multipart/form-data with an "image" file field, or application/json with "id" or "vector"')
        answer = await run_in_threadpool(lambda: service.search(name, **kwargs))
        return answer.to_dict()

    @api.get("/collections/{name}/items", tags=["items"])
    def list_items(
        name: str,
        label: list[str] | None = Query(None, description="keep only this label (repeatable; number or name)"),
        split: str | None = Query(None, description="train (indexed) or test (held out)"),
        where: list[str] | None = Query(None, description="a metadata filter expression, e.g. `width >= 1000` (repeatable: AND)"),
        cursor: str | None = Query(None, description="the `next_cursor` of the page before"),
        limit: int = Query(100, description="items on this page, 1 to 1,000"),
    ) -> Any:
        """A page of stored items (id, label, split, metadata) in the order they were written, and the `next_cursor` of the
        next page (null after the last). A filtered page looks at a bounded number of items: it may hold fewer than
        `limit` and still give a cursor."""
        return service.items(name, labels=label, split=split, where=where, cursor=cursor, limit=limit).to_dict()

    @api.get("/collections/{name}/items/{item_id:path}/image", tags=["items"], response_class=Response)
    def item_image(name: str, item_id: str) -> Any:
        """A PNG of a stored item, read from the source its collection records."""
        return Response(service.item_png(name, item_id), media_type="image/png")

    @api.get("/collections/{name}/items/{item_id:path}", tags=["items"])
    def item(name: str, item_id: str) -> Any:
        """A stored item's label, split and metadata."""
        return service.item(name, item_id).to_dict()

    @api.post("/collections/{name}/items", tags=["items"], status_code=201)
    async def add_items(name: str, request: Request) -> Any:
        """Add images (multipart: `image` file fields, optional `label`, optional `metadata` JSON object); answers
        `{"id": ...}` (the first image's; `ids` for each), 201 when something was added, 200 when all were stored already.
        The write key is needed."""
        images, label, metadata = await _add_form(request)
        report = await run_in_threadpool(lambda: service.add(name, images, label=label, metadata=metadata))
        body = {"id": report.ids[0], **report.to_dict()}
        return JSONResponse(body, status_code=201 if report.added else 200)

    @api.delete("/collections/{name}/items/{item_id:path}", tags=["items"])
    def remove_item(name: str, item_id: str) -> Any:
        """Remove a stored item (and its kept image); 404 when it is not stored. The write key is needed."""
        report = service.remove(name, [item_id])
        return {"removed": report.removed[0], "still_in_folder": bool(report.still_in_folder)}

    @api.get("/collections/{name}/evaluation", tags=["collections"])
    def evaluation(name: str) -> Any:
        """The last `lookalike evaluate` report saved with the collection (404 when none was)."""
        return service.evaluation(name)

    @api.get("/collections/{name}/audit", tags=["collections"])
    def audit(name: str) -> Any:
        """The last `lookalike audit` report saved with the collection: label-issue candidates, duplicate groups, leaks, outliers."""
        return service.audit(name)

    app.include_router(api)
    app.add_middleware(_Gate, max_bytes=max_upload, api_key=api_key, write_key=write_key)
    return app


async def _add_form(request: Any) -> tuple[list[tuple[str, bytes]], str | None, dict[str, Any] | None]:
    """(images, label, metadata) of a POST of items, within the limits; InputError/TooLargeError naming the fix."""
    import json

    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "multipart/form-data":
        raise InputError('send multipart/form-data: "image" file fields, optional "label" and "metadata" (a JSON object)')
    try:
        form = await request.form(max_files=MAX_ADD_FILES + 1, max_fields=16)
    except TooLargeError:
        raise
    except Exception as exc:
        text = str(exc)
        if "Too many files" in text:
            raise TooLargeError(f"at most {MAX_ADD_FILES} images in one request: send the rest in another") from None
        raise InputError(f"the form could not be read ({text}): send multipart/form-data with 'image' file fields") from None
    unknown = sorted(set(form.keys()) - set(ADD_FIELDS))
    if unknown:
        raise InputError(f"unknown form field {unknown[0]!r}: the fields are image (repeatable), label, metadata")
    uploads = form.getlist("image")
    if not uploads or any(isinstance(u, str) for u in uploads):
        raise InputError("send each image as a file field named 'image'")
    if len(uploads) > MAX_ADD_FILES:
        raise TooLargeError(f"at most {MAX_ADD_FILES} images in one request: send the rest in another")
    images = []
    for u in uploads:
        images.append((getattr(u, "filename", None) or "upload", await u.read()))
        await u.close()
    label = form.get("label")
    if label is not None and not isinstance(label, str):
        raise InputError("send the label as a text field, not a file")
    raw = form.get("metadata")
    metadata = None
    if raw not in (None, ""):
        text = raw if isinstance(raw, str) else (await raw.read()).decode("utf-8", "replace")
        if len(text.encode()) > MAX_METADATA_BYTES:
            raise TooLargeError(f"the metadata is over {MAX_METADATA_BYTES:,} bytes: send fewer or shorter fields")
        try:
            metadata = json.loads(text)
        except ValueError:
            raise InputError('metadata must be a JSON object such as {"album": "Trip", "rating": 4}') from None
        if not isinstance(metadata, dict):
            raise InputError('metadata must be a JSON object such as {"album": "Trip", "rating": 4}')
        if len(metadata) > MAX_METADATA_FIELDS:
            raise TooLargeError(f"the metadata has {len(metadata)} fields, over the limit of {MAX_METADATA_FIELDS}: send fewer")
    return images, (str(label) if label not in (None, "") else None), metadata


async def _form_query(request: Any) -> dict[str, Any]:
    """Search arguments from a multipart form: the ``image`` file, ``k``, ``labels`` (or ``label``, repeatable), ``split``."""
    try:
        form = await request.form(max_files=1, max_fields=len(SEARCH_FIELDS) + 64)
    except TooLargeError:
        raise
    except Exception as exc:  # starlette's MultiPartException and friends: a malformed body
        raise InputError(f"the form could not be read ({exc}): send multipart/form-data with an 'image' file field") from None
    upload = form.get("image")
    if upload is None or isinstance(upload, str):
        raise InputError("send the image as a file field named 'image'")
    data = await upload.read()
    await upload.close()
    unknown = sorted(set(form.keys()) - {"image", *SEARCH_FIELDS} - {"id", "vector"})
    if unknown:
        raise InputError(f"unknown form field {unknown[0]!r}: the fields are image, k, labels, split, where")
    labels = [str(v) for v in [*form.getlist("labels"), *form.getlist("label")]]
    split = form.get("split")
    where = [str(v) for v in form.getlist("where")]
    return {
        "image": data,
        "image_name": f"the upload {getattr(upload, 'filename', None) or ''}".strip(),
        "k": form.get("k", 5),
        "labels": labels or None,
        "split": str(split) if split not in (None, "") else None,
        "where": where or None,
    }


async def _json_query(request: Any) -> dict[str, Any]:
    """Search arguments from a JSON object: ``id`` or ``vector``, ``k``, ``labels``, ``split``."""
    try:
        body = await request.json()
    except TooLargeError:
        raise
    except Exception:
        raise InputError('the body is not JSON: send {"id": "...", "k": 5} or {"vector": [...]}') from None
    if not isinstance(body, dict):
        raise InputError('the body must be a JSON object such as {"id": "...", "k": 5}')
    unknown = sorted(set(body) - set(SEARCH_FIELDS))
    if unknown:
        raise InputError(f"unknown field {unknown[0]!r}: the fields are {', '.join(f for f in SEARCH_FIELDS if f != 'label')}")
    labels = body.get("labels", body.get("label"))
    if labels is not None and not isinstance(labels, list):
        labels = [labels]
    if labels is not None and not all(isinstance(x, (int, str)) and not isinstance(x, bool) for x in labels):
        raise InputError("labels must be a list of label ints or names")
    split = body.get("split")
    if split is not None and not isinstance(split, str):
        raise InputError("split must be 'train' or 'test'")
    if body.get("id") is None and body.get("vector") is None:
        raise InputError('give "id" (a stored item) or "vector" in the JSON body, or upload an image as multipart/form-data')
    return {
        "id": body.get("id"),
        "vector": body.get("vector"),
        "k": body.get("k", 5),
        "labels": labels or None,
        "split": split,
        "where": body.get("where"),
    }


class _Gate:
    """ASGI middleware, the service's one door: with ``api_key``, any path but /health without ``Authorization: Bearer KEY``
    gets 401 (compared in constant time, before the body is read); a body over ``max_bytes`` gets 413 (from
    Content-Length before reading, or while it is read)."""

    def __init__(self, app: Any, max_bytes: int, api_key: str | None = None, write_key: str | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.writer = f"Bearer {write_key}".encode() if write_key else None

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]], send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        message = f"the request body is over the limit of {limit:,} bytes: send a smaller image"
        given = next((v for k, v in scope.get("headers", ()) if k == b"authorization"), b"")
        writer = self.writer is not None and hmac.compare_digest(given, self.writer)
        reader = writer or (self.expected is not None and hmac.compare_digest(given, self.expected))
        refusal: tuple[int, str] | None = None  # no key, no reading of the body (nor its size)
        if is_write(scope.get("method", ""), scope.get("path", "")):
            if self.writer is None:
                refusal = (403, "writes are off: start the service with --write-key-file FILE to allow them")
            elif not writer:
                refusal = (403, "this key may only read: send the write key") if reader else (401, "unauthorized")
        elif self.expected is not None and scope.get("path") != "/health" and not reader:
            refusal = (401, "unauthorized")
        if refusal is not None:
            await _drain(receive, cap=1024 * 1024)
            extra = {b"www-authenticate": b"Bearer"} if refusal[0] == 401 else {}
            await _send_json(send, refusal[0], {"error": refusal[1], "status": refusal[0]}, extra)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await _drain(receive)  # (read, not kept: a client still sending would otherwise see a broken pipe)
                await _send_json(send, 413, {"error": message, "status": 413})
                return
        seen = 0

        async def limited() -> dict[str, Any]:
            nonlocal seen
            msg = await receive()
            if msg.get("type") == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    if msg.get("more_body"):
                        await _drain(receive)
                    raise TooLargeError(message)
            return msg

        started = False

        async def watched(msg: dict[str, Any]) -> None:
            nonlocal started
            started = started or msg.get("type") == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, limited, watched)
        except TooLargeError:  # raised while the body was read outside an endpoint
            if not started:
                await _send_json(send, 413, {"error": message, "status": 413})


def is_write(method: str, path: str) -> bool:
    """Whether a request may write: anything but a read (GET, HEAD) on a collection's items."""
    parts = path.strip("/").split("/")
    return len(parts) >= 3 and parts[0] == "collections" and parts[2] == "items" and method not in ("GET", "HEAD")


async def _drain(receive: Callable[[], Awaitable[dict[str, Any]]], cap: int = DRAIN_CAP) -> None:
    """Read and drop the rest of a refused request's body (at most ``cap`` bytes; past that the connection just closes)."""
    dropped = 0
    while dropped <= cap:
        msg = await receive()
        if msg.get("type") != "http.request":
            return
        dropped += len(msg.get("body", b""))
        if not msg.get("more_body"):
            return


async def _send_json(send: Any, status: int, body: dict[str, Any], extra: dict[bytes, bytes] | None = None) -> None:
    import json

    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), (b"connection", b"close")]
    headers += list((extra or {}).items())
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


# -- running it ----------------------------------------------------------------------------------------


def serve(
    service: Service,
    sock: socket.socket,
    *,
    api_key: str | None = None,
    write_key: str | None = None,
    max_upload: int = MAX_UPLOAD,
    access_log: bool = False,
) -> None:
    """Serve ``service`` on the bound ``sock`` until interrupted (Ctrl-C or SIGTERM end it cleanly)."""
    try:
        import uvicorn
    except ImportError:
        raise InputError(EXTRA) from None
    import signal

    def stop(signum: int, frame: Any) -> None:  # uvicorn re-raises SIGTERM once it has shut down: end like Ctrl-C
        raise KeyboardInterrupt

    app = create_app(service, api_key=api_key, write_key=write_key, max_upload=max_upload)
    config = uvicorn.Config(app, log_level="warning", access_log=access_log, server_header=False, timeout_graceful_shutdown=5)
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
