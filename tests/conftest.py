"""Shared fixtures: tiny constructed datasets (no downloads), stores in tmp dirs, a CLI runner."""

from __future__ import annotations

import atexit
import http.client
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from lookalike.core.gallery import Gallery
from lookalike.core.ingest import ingest
from lookalike.models.embedder import PixelEmbedder, make_spec

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# converted models and maps of this run in a fresh cache (subprocesses inherit it), never the user's
os.environ["LOOKALIKE_CACHE"] = tempfile.mkdtemp(prefix="lookalike-test-cache-")
atexit.register(shutil.rmtree, os.environ["LOOKALIKE_CACHE"], True)
os.environ.pop("LOOKALIKE_RUNTIME", None)  # the tests choose their runtime (lookalike.models.onnxrt)


def make_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` 28x28 uint8 images in 10 classes: a bright 8x4 bar at a class-specific place on faint noise.

    Classes are far apart in pixel space, so exact 1-NN on raw pixels is 100% accurate.
    """
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
    x = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
    for i, lab in enumerate(labels):
        r, c = divmod(int(lab), 5)
        x[i, 3 + r * 13 : 11 + r * 13, 1 + c * 5 : 5 + c * 5] = 255
    return x, labels


def write_npz(path: Path, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]) -> Path:
    """Save (images, labels) pairs as an .npz in Keras's MNIST layout; returns ``path``."""
    np.savez(path, x_train=train[0], y_train=train[1], x_test=test[0], y_test=test[1])
    return path


@pytest.fixture(scope="session")
def tiny_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An .npz in Keras's MNIST layout: 200 training and 50 test images."""
    return write_npz(tmp_path_factory.mktemp("data") / "tiny.npz", make_digits(200, seed=1), make_digits(50, seed=2))


@pytest.fixture
def digits_folder(tmp_path: Path) -> Path:
    """A folder dataset: 3 labels x 6 images, grey PNG and colour JPEG of different sizes, plus one corrupt file."""
    root = tmp_path / "images"
    x, y = make_digits(60, seed=3)
    counts = {0: 0, 1: 0, 2: 0}
    for img, lab in zip(x, y):
        lab = int(lab)
        if lab > 2 or counts[lab] >= 6:
            continue
        d = root / f"class_{lab}"
        d.mkdir(parents=True, exist_ok=True)
        if counts[lab] % 2:
            Image.fromarray(img).convert("RGB").resize((40, 36)).save(d / f"{counts[lab]}.jpg")
        else:
            Image.fromarray(img).save(d / f"{counts[lab]}.png")
        counts[lab] += 1
    (root / "class_1" / "broken.png").write_bytes(b"not an image at all")
    return root


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "db")


@pytest.fixture(scope="session")
def fake_embedder() -> PixelEmbedder:
    """The tests' one tiny deterministic embedder: grey pixels at 8x8, L2-normalised, 64-d.

    No TensorFlow, the same vector for the same image in any process, and rebuildable from the
    spec a collection records (a Gallery opened later embeds query images with it).
    """
    return PixelEmbedder(make_spec("pixels", input_size=8, normalize="l2"))


@pytest.fixture
def gallery(tiny_npz: Path, db: str, fake_embedder: PixelEmbedder) -> Iterator[Gallery]:
    """The tiny digits (200 indexed, 50 held out) embedded by ``fake_embedder``, opened."""
    ingest("mnist", source=str(tiny_npz), embedder=fake_embedder, db=db)
    with Gallery.open(db=db) as g:
        yield g


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``lookalike ARGS`` in a new process (the console script's module)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", "from lookalike.frontends.cli import main; main()", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )


def offline_env(tmp_path: Path) -> dict[str, str]:
    """Environment for a child process that cannot download anything and has no Keras cache."""
    dead = "http://127.0.0.1:9"
    env = {k: v for k, v in os.environ.items() if k not in ("LOOKALIKE_MNIST", "LOOKALIKE_FASHION_MNIST")}
    env.update(
        {
            "KERAS_HOME": str(tmp_path / "keras-home"),
            "HTTP_PROXY": dead,
            "HTTPS_PROXY": dead,
            "http_proxy": dead,
            "https_proxy": dead,
            "NO_PROXY": "",
            "no_proxy": "",
        }
    )
    return env


def one_line_error(result: object) -> str:
    """Assert a CLI failure printed exactly one 'error:' line and no traceback; return it."""
    out = getattr(result, "stderr", "") or ""
    combined = (getattr(result, "output", "") or "") + out
    assert "Traceback" not in combined, combined
    lines = [ln for ln in out.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1, out
    return errors[0]


def make_cluttered(n: int, seed: int, classes: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """``n`` 28x28 uint8 images in ``classes`` classes that an untrained network separates poorly.

    The class is a small 5x5 square in one of four places (jittered by a pixel); three larger random
    bright rectangles (clutter) dominate the pixels, so nearest neighbours of raw or randomly
    embedded images mostly follow the clutter, and a network has to learn to ignore it.
    """
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % classes).astype(np.uint8)
    x = rng.integers(0, 30, (n, 28, 28)).astype(np.uint8)
    corners = [(3, 3), (3, 20), (20, 3), (20, 20)]
    for i, lab in enumerate(labels):
        for _ in range(3):
            h, w = rng.integers(5, 12, 2)
            r, c = rng.integers(0, 28 - h), rng.integers(0, 28 - w)
            x[i, r : r + h, c : c + w] = rng.integers(120, 200)
        r, c = corners[int(lab)]
        r, c = r + int(rng.integers(-1, 2)), c + int(rng.integers(-1, 2))
        x[i, r : r + 5, c : c + 5] = 255
    return x, labels


@pytest.fixture(scope="session")
def cluttered_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An .npz in Keras's MNIST layout: 320 training and 80 test cluttered images (4 classes)."""
    return write_npz(tmp_path_factory.mktemp("cluttered") / "cluttered.npz", make_cluttered(320, seed=11), make_cluttered(80, seed=12))


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def chroma_run(path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A real `chroma run` server on loopback over ``path``: (its process, its URL), stopped at the end."""
    from lookalike.core.store import Store
    from lookalike.errors import StoreError

    exe = shutil.which("chroma") or str(Path(sys.executable).parent / "chroma")
    port = free_port()
    proc = subprocess.Popen(
        [exe, "run", "--path", str(path), "--host", "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                Store(url).close()
                break
            except StoreError:
                if time.time() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.5)
        yield proc, url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


class ServiceProcess:
    """A real `lookalike serve` process on loopback (``--port 0``: the port it prints), its stderr collected."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> None:
        cmd = [sys.executable, "-c", "from lookalike.frontends.cli import main; main()", "serve", "--port", "0", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        found: queue.Queue[str | None] = queue.Queue()

        def drain() -> None:  # read stderr to the end, so that the server never blocks on a full pipe
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.lines.append(line)
                m = re.search(r" at (http://\S+) ", line)
                if m:
                    found.put(m.group(1))
            found.put(None)

        threading.Thread(target=drain, daemon=True).start()
        try:
            url = found.get(timeout=timeout)
        except queue.Empty:
            url = None
        if url is None:
            self.stop()
            raise RuntimeError("lookalike serve did not start:\n" + "".join(self.lines))
        self.url: str = url
        self.port = int(url.rsplit(":", 1)[1])

    def call(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        ctype: str | None = None,
        key: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """One request: (status, headers, body)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        hdrs = dict(headers or {})
        if ctype:
            hdrs["Content-Type"] = ctype
        if key:
            hdrs["Authorization"] = f"Bearer {key}"
        try:
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def multipart(fields: list[tuple[str, str]], image: bytes | None = None, filename: str = "q.png") -> tuple[bytes, str]:
    """A multipart/form-data body of text ``fields`` and an ``image`` file field."""
    b = "testboundary7f3a"
    parts = [f'--{b}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields]
    if image is not None:
        head = f'--{b}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\nContent-Type: image/png\r\n\r\n'
        parts.append(head.encode() + image + b"\r\n")
    parts.append(f"--{b}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={b}"


@pytest.fixture
def planted(tmp_path: Path, db: str, fake_embedder: PixelEmbedder) -> str:
    """Digits (200 indexed, 50 held out) with: indexed item 7's label flipped; indexed item 3 copied as held-out item 50
    (a leak); indexed item 11 copied as indexed item 200 (a duplicate within a split); a blank white indexed item 201."""
    x_tr, y_tr = make_digits(200, seed=1)
    x_te, y_te = make_digits(50, seed=2)
    y_tr[7] = (int(y_tr[7]) + 3) % 10
    x_te = np.concatenate([x_te, x_tr[3:4]])
    y_te = np.concatenate([y_te, y_tr[3:4]])
    x_tr = np.concatenate([x_tr, x_tr[11:12], np.full((1, 28, 28), 255, np.uint8)])
    y_tr = np.concatenate([y_tr, y_tr[11:12], np.array([0], np.uint8)])
    path = write_npz(tmp_path / "planted.npz", (x_tr, y_tr), (x_te, y_te))
    ingest("mnist", source=str(path), embedder=fake_embedder, db=db, collection="planted")
    return db
