"""A client of ``lookalike serve``: what ``lookalike search --server URL`` uses instead of loading TensorFlow.

Standard library only (``urllib``): asking a running service costs a process no more than Python's
start. Errors the service answers (JSON ``{"error": ..., "status": N}``) come back as the library's
own exceptions, with the service's one-line message.
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.error import HTTPError, URLError
from urllib.parse import quote, urlencode, urlparse
from urllib.request import HTTPRedirectHandler, ProxyHandler, Request, build_opener

from lookalike.core.search import Hit
from lookalike.errors import InputError, LookalikeError, NotFoundError, StoreError, TooLargeError
from lookalike.util import is_loopback

DEFAULT_TIMEOUT = 60.0


class Client:
    """Requests to the service at ``url`` (``http://HOST:PORT``), with ``api_key`` as a bearer token when given."""

    def __init__(self, url: str, *, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise InputError(f"--server {url!r} is not a service URL: give http://HOST:PORT of `lookalike serve`")
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        # a service on this machine is asked directly, whatever proxy the environment names; redirects are not
        # followed (urllib would carry the key to wherever they point)
        proxies = ProxyHandler({}) if is_loopback(parsed.hostname or "") else ProxyHandler()
        self._open = build_opener(proxies, _NoRedirect()).open

    def _request(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None) -> tuple[bytes, str]:
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with self._open(req, timeout=self.timeout) as resp:
                return resp.read(), resp.headers.get("Content-Type", "")
        except HTTPError as exc:
            raise _service_error(exc, self.url) from None
        except (URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise StoreError(
                f"cannot reach the service at {self.url} ({reason}): start it with `lookalike serve`, or check --server"
            ) from None

    def _json(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None) -> Any:
        data, _ = self._request(method, path, body, content_type)
        try:
            return json.loads(data)
        except ValueError:
            raise StoreError(f"{self.url} did not answer JSON: is it a `lookalike serve` service?") from None

    def collections(self) -> list[dict[str, Any]]:
        return list(self._json("GET", "/collections"))

    def pick(self, collection: str | None) -> str:
        """``collection``, or the service's only collection; InputError listing them when there are several."""
        if collection is not None:
            return collection
        names = [c["name"] for c in self.collections()]
        if len(names) == 1:
            return str(names[0])
        if not names:
            raise NotFoundError(f"the service at {self.url} has no collections: run `lookalike ingest` into its store")
        raise InputError(f"the service at {self.url} has several collections, pass --collection: {', '.join(names)}")

    def search(
        self,
        collection: str,
        *,
        image: str | os.PathLike[str] | None = None,
        id: str | None = None,
        k: int = 5,
        labels: Sequence[int | str] | None = None,
        split: str | None = None,
        where: Sequence[str] | None = None,
    ) -> list[Hit]:
        """The service's hits for an image file (uploaded) or a stored id; ``where``: ``--where`` expressions."""
        path = f"/collections/{quote(collection, safe='')}/search"
        if (image is None) == (id is None):
            raise InputError("give exactly one query: --image FILE or --id ID")
        if image is not None:
            p = Path(image).expanduser()
            if not p.is_file():
                raise InputError(f"image file not found: {p} (check the path)")
            fields: list[tuple[str, str]] = [("k", str(k)), *(("labels", str(lab)) for lab in labels or ())]
            if split is not None:
                fields.append(("split", split))
            fields += [("where", w) for w in where or ()]
            body, ctype = multipart_body(fields, "image", p.name, p.read_bytes())
        else:
            payload: dict[str, Any] = {"id": id, "k": k}
            if labels:
                payload["labels"] = list(labels)
            if split is not None:
                payload["split"] = split
            if where:
                payload["where"] = list(where)
            body, ctype = json.dumps(payload).encode(), "application/json"
        answer = self._json("POST", path, body, ctype)
        names = [f.name for f in dataclasses.fields(Hit)]
        return [Hit(**{n: h[n] for n in names if n in h}) for h in answer["hits"]]

    def items(
        self,
        collection: str,
        *,
        labels: Sequence[int | str] | None = None,
        split: str | None = None,
        where: Sequence[str] | None = None,
        cursor: str | None = None,
        limit: int = 100,
    ) -> dict[str, Any]:
        """A page of stored items (``collection``, ``items``, ``next_cursor``), as :func:`lookalike.core.items.list_items`."""
        query: list[tuple[str, str]] = [("limit", str(limit)), *(("label", str(lab)) for lab in labels or ())]
        query += [("where", w) for w in where or ()]
        query += [(k, v) for k, v in (("split", split), ("cursor", cursor)) if v is not None]
        return dict(self._json("GET", f"/collections/{quote(collection, safe='')}/items?{urlencode(query)}"))

    def item(self, collection: str, item_id: str) -> dict[str, Any]:
        """A stored item's id, label, label name, split and metadata."""
        return dict(self._json("GET", f"/collections/{quote(collection, safe='')}/items/{quote(item_id, safe='')}"))

    def item_image(self, collection: str, item_id: str) -> bytes:
        """The PNG of a stored item."""
        data, _ = self._request("GET", f"/collections/{quote(collection, safe='')}/items/{quote(item_id, safe='')}/image")
        return data


def save_picture(
    client: Client,
    collection: str,
    hits: Sequence[Hit],
    out: str | os.PathLike[str],
    *,
    image: str | os.PathLike[str] | None = None,
    id: str | None = None,
) -> Path:
    """:func:`lookalike.core.search.save_picture` for a service's answer: the stored images come from the service."""
    from lookalike.core.search import picture
    from lookalike.data.images import open_image

    def stored(item_id: str) -> Any:
        try:
            return open_image(client.item_image(collection, item_id), name=f"the image of {item_id}")
        except NotFoundError:  # a source file gone since ingest: a blank tile, as the local picture draws it
            return None

    if id is not None:
        query_img, query_title = stored(id), f"query {client.item(collection, id)['label_name']}"
    else:
        assert image is not None
        query_img, query_title = open_image(image), "query"
    return picture(query_img, query_title, [stored(h.id) for h in hits], hits, out)


class _NoRedirect(HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # the 3xx then comes back as an HTTPError: one line, and the key stays here


def multipart_body(fields: Sequence[tuple[str, str]], file_field: str, filename: str, data: bytes) -> tuple[bytes, str]:
    """A multipart/form-data body of text ``fields`` and one file, and its Content-Type."""
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode() for name, value in fields]
    safe_name = filename.replace('"', "_").replace("\r", "_").replace("\n", "_")
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{file_field}"; filename="{safe_name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n".encode()
        + data
        + b"\r\n"
    )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def _service_error(exc: HTTPError, url: str) -> LookalikeError:
    """The library exception for an error the service answered."""
    try:
        message = str(json.loads(exc.read())["error"])
    except Exception:
        message = f"HTTP {exc.code} {exc.reason}"
    if exc.code == 401:
        return InputError(f"the service at {url} wants its API key: pass --api-key-file FILE (or set $LOOKALIKE_API_KEY)")
    if exc.code == 413:
        return TooLargeError(message)
    if exc.code == 404:
        return NotFoundError(message)
    if 400 <= exc.code < 500:
        return InputError(message)
    return StoreError(f"the service at {url} failed: {message}")
