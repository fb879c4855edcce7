"""Scale-out embedding on Ray Data: the only module that imports ray.

``ingest(..., ray=ADDRESS)`` plans as usual (the ids the store already holds are skipped), then
hands the rest to :func:`embed_on_ray`: a Ray Dataset of the items' metadata (small rows: id and
where its pixels are), ``map_batches`` over a pool of actors, each of which builds the
collection's recorded embedder once (TensorFlow's threads limited to its CPUs) and reads its
items' pixels itself from the source the record names (the .npz or the folder, by path: on a
multi-machine cluster that path must exist on every node). The vectors come back to the driver,
which writes them through the Gallery batch by batch, as a plain ingest does: one writer (a local
store's lock stays with the driver), ids stable, so a run killed at any moment and started again
(with or without Ray) stores each item once.

Needs the ``ray`` extra: ``pip install 'lookalike[ray]'``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lookalike.errors import EmbedderError, InputError, LookalikeError
from lookalike.util import RedirectedFds, first_line

log = logging.getLogger(__name__)

EXTRA = "--ray needs the ray extra: pip install 'lookalike[ray]'"
MAX_BLOCKS = 20_000  # input blocks (one per batch) at most: past it a block holds several batches


@dataclass
class RayOptions:
    """Where and how wide: ``address`` None starts a local cluster sized to this machine; ``auto`` or ``ray://HOST:PORT`` joins one."""

    address: str | None = None
    workers: int | None = None  # actors (default: the cluster's CPUs / cpus_per_worker)
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0

    def check(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise InputError(f"--workers must be at least 1, got {self.workers}")
        if not (self.cpus_per_worker > 0 and np.isfinite(self.cpus_per_worker)):
            raise InputError(f"--cpus-per-worker must be above 0, got {self.cpus_per_worker}")
        if not (self.gpus_per_worker >= 0 and np.isfinite(self.gpus_per_worker)):
            raise InputError(f"--gpus-per-worker must be 0 or more, got {self.gpus_per_worker}")


def require_ray() -> Any:
    """The ray module, or InputError naming the extra to install."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise InputError(EXTRA) from None
    return ray


def connect(options: RayOptions) -> tuple[Any, bool]:
    """(ray, whether this call started it): reuse a running ``ray.init``, else start or join a cluster."""
    ray = require_ray()
    if ray.is_initialized():
        if options.address is not None:
            log.warning("Ray is already running in this process: --ray-address %s is not used", options.address)
        return ray, False
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
    if options.address is None:  # a new local cluster (not $RAY_ADDRESS's), sized to this machine
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no token written under the home directory
        kwargs["address"] = "local"
        kwargs["num_cpus"] = os.cpu_count() or 1
    else:
        kwargs["address"] = options.address
    try:
        quiet = RedirectedFds()  # Ray's start-up notes
        quiet.enter()
        try:
            ray.init(**kwargs)
        finally:
            quiet.exit()
    except Exception as exc:  # ConnectionError, RuntimeError, ValueError: all one line
        where = options.address or "a local cluster"
        raise InputError(f"cannot start or join Ray ({where}): {first_line(exc)}; check the address (auto or ray://HOST:PORT)") from None
    return ray, True


class _EmbedBatches:
    """A Ray actor: the recorded embedder built once, then batches of items read and embedded."""

    def __init__(self, spec: dict[str, Any], protocol: dict[str, Any], max_pixels: int | None, threads: int, gpus: float = 0.0) -> None:
        threads = max(1, int(threads))
        for var in ("TF_NUM_INTRAOP_THREADS", "OMP_NUM_THREADS"):
            os.environ[var] = str(threads)  # read when TensorFlow starts in this worker
        os.environ["TF_NUM_INTEROP_THREADS"] = "1"
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        if gpus <= 0:
            os.environ["CUDA_VISIBLE_DEVICES"] = ""  # a CPU worker: its TensorFlow must not take a GPU
        from lookalike.models.embedder import EmbedderSpec, build_embedder

        self.spec = EmbedderSpec.from_dict(spec)
        self.protocol = protocol
        self.max_pixels = max_pixels
        self.source_error = _check_source(protocol)  # the same file the driver read, on this node
        self.model = build_embedder(self.spec)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from lookalike.data.datasets import stored_pixels
        from lookalike.data.images import Unreadable

        ids = list(batch["id"])
        metas = [json.loads(m) for m in batch["meta"]]
        dim = self.spec.dim
        vectors = np.zeros((len(ids), dim), np.float32)
        errors = [""] * len(ids)
        t0 = time.perf_counter()
        try:
            if self.source_error:
                raise InputError(self.source_error)
            images = stored_pixels(self.protocol, metas, self.max_pixels, decode_size=self.spec.decode_side)
        except LookalikeError as exc:  # the source is not there (on this node): every item of the batch
            return {
                "id": np.array(ids),
                "vector": vectors,
                "error": np.array([f"source: {exc}"] * len(ids)),
                "seconds": _times(0, 0, len(ids)),
            }
        t1 = time.perf_counter()
        ok = [i for i, im in enumerate(images) if not isinstance(im, Unreadable)]
        for i, im in enumerate(images):
            if isinstance(im, Unreadable):
                errors[i] = f"{im.reason}: {im.message()}"
        if ok:
            vectors[ok] = np.asarray(self.model.embed([images[i] for i in ok]), np.float32)
        t2 = time.perf_counter()
        return {"id": np.array(ids), "vector": vectors, "error": np.array(errors), "seconds": _times(t1 - t0, t2 - t1, len(ids))}


def _check_source(protocol: dict[str, Any]) -> str:
    """'' when the recorded source file (if any) is here with the recorded SHA-256, else why not (one line)."""
    path, want = protocol.get("source_file"), protocol.get("source_sha256")
    if not path or not want:
        return ""
    from lookalike.util import file_sha256

    try:
        got = file_sha256(path)
    except OSError as exc:
        return f"{path} cannot be read on this node ({exc.strerror or exc}): every node needs the source at that path"
    if got != want:
        return f"{path} on this node is not the file the driver read (SHA-256 differs): give every node the same source"
    return ""


def _times(decode: float, embed: float, n: int = 1) -> np.ndarray:
    """Per-row (decode, embed) seconds of a batch: its totals on the first row, zeros after (they sum back)."""
    out = np.zeros((max(n, 1), 2))
    out[0] = (decode, embed)
    return out


@dataclass
class Embedded:
    """One batch back from the workers: ids, vectors, and per id an error ('' when embedded)."""

    ids: list[str]
    vectors: np.ndarray
    errors: list[str]
    decode_seconds: float
    embed_seconds: float
    workers: int = 0  # the actor pool's size


def embed_on_ray(
    spec: dict[str, Any],
    protocol: dict[str, Any],
    rows: Sequence[tuple[str, dict[str, Any]]],
    *,
    options: RayOptions,
    batch_size: int,
    max_pixels: int | None = None,
) -> Iterator[Embedded]:
    """Embed ``rows`` (id, metadata) on a Ray actor pool; yields batches as they finish (any order).

    Errors in a worker become one-line :class:`~lookalike.errors.LookalikeError` s; an unreadable
    item or a source missing on a node comes back as that item's error (counted, not raised).
    """
    options.check()
    ray, started = connect(options)
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.CRITICAL)  # Ray Data's notes and its logged worker errors: we report them
    quiet = RedirectedFds()  # silent while Ray starts the actors (its core's notes), and after a failure until it is shut down
    to_stderr = RedirectedFds((1,), to_stderr=True)  # Ray prints worker deaths on stdout: keep stdout for our --json
    to_stderr.enter()
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the front-end draws the one progress bar
        ctx.print_on_execution_start = False
        ctx.enable_rich_progress_bars = False
        resources = ray.cluster_resources()
        cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
        workers = options.workers or max(1, int(cpus // options.cpus_per_worker))
        need_cpus, need_gpus = workers * options.cpus_per_worker, workers * options.gpus_per_worker
        if need_cpus > cpus or need_gpus > gpus:  # Ray would wait for them for ever
            raise InputError(
                f"{workers} Ray workers x {options.cpus_per_worker:g} CPUs, {options.gpus_per_worker:g} GPUs need {need_cpus:g} CPUs "
                f"and {need_gpus:g} GPUs; the cluster has {cpus:g} and {gpus:g}: lower --workers, --cpus-per-worker or --gpus-per-worker"
            )
        threads = max(1, int(options.cpus_per_worker))
        log.info("Ray: %d workers x %g CPUs (%g GPUs), cluster %g CPUs", workers, options.cpus_per_worker, options.gpus_per_worker, cpus)
        blocks = max(1, min(-(-len(rows) // batch_size), MAX_BLOCKS))  # a block a batch: written (and lost to a kill) batch by batch
        items = ray.data.from_items([{"id": i, "meta": json.dumps(m)} for i, m in rows], override_num_blocks=blocks)
        out = items.map_batches(
            _EmbedBatches,
            fn_constructor_kwargs={
                "spec": spec,
                "protocol": protocol,
                "max_pixels": max_pixels,
                "threads": threads,
                "gpus": options.gpus_per_worker,
            },
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=options.cpus_per_worker,
            num_gpus=options.gpus_per_worker,
        )
        try:
            for batch in _until_first(quiet, out.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1)):
                seconds = batch["seconds"].sum(axis=0)
                yield Embedded(
                    [str(i) for i in batch["id"]],
                    np.asarray(batch["vector"], np.float32),
                    [str(e) for e in batch["error"]],
                    float(seconds[0]),
                    float(seconds[1]),
                    workers,
                )
        except LookalikeError:
            raise
        except Exception as exc:  # a worker failed: Ray wraps it; say the cause in one line
            quiet.enter()
            raise EmbedderError(f"a Ray worker failed: {_cause(exc)}") from None
    finally:
        try:
            if started:
                ray.shutdown()
        finally:
            quiet.exit()
            to_stderr.exit()


def _until_first(quiet: RedirectedFds, batches: Iterator[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
    """``batches``, with ``quiet`` entered until the first arrives (left entered if that raises)."""
    it = iter(batches)
    quiet.enter()
    first = next(it, None)
    quiet.exit()
    if first is None:
        return
    yield first
    yield from it


_ERROR_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception)): (.+)$")


def _cause(exc: BaseException) -> str:
    """The worker's own error in one line, dug out of Ray's wrapping (its text carries the worker's traceback)."""
    chain, seen = [], exc
    for _ in range(10):  # Ray Data's exception -> ActorDiedError / RayTaskError -> the worker's own
        chain.append(seen)
        inner = getattr(seen, "cause", None) or seen.__cause__ or seen.__context__
        if not isinstance(inner, BaseException) or inner in chain:
            break
        seen = inner
    found = []
    for e in chain:
        for line in str(e).splitlines():
            m = _ERROR_LINE.match(line.strip())
            if m and not m.group(1).startswith("ray."):
                found.append((m.group(1), m.group(2)))
    ours = [msg for name, msg in found if name.startswith("lookalike.")]
    if ours:
        return ours[-1][:240]  # already one line naming the fix
    if found:
        name, msg = found[-1]
        return f"{name.rsplit('.', 1)[-1]}: {msg}"[:240]
    return first_line(seen)
