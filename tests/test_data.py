import gzip
import os
import shutil
from pathlib import Path

import pytest
import torch

from pyrovae.data import (
    BINARIZE_MODES,
    DATA_DIR_ENV,
    DATASET_NAMES,
    DATASETS,
    DataError,
    Dataset,
    indexed_device,
    load_dataset,
)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Keep every test's derived files out of the shared data folder and the home directory."""
    cache_dir = tmp_path / "cache"
    monkeypatch.setenv("PYROVAE_CACHE_DIR", str(cache_dir))
    return cache_dir


@pytest.fixture
def shared_data_dir():
    data_dir = os.environ.get(DATA_DIR_ENV)
    if not data_dir or not Path(data_dir).is_dir():
        pytest.skip(f"set {DATA_DIR_ENV} to the folder of reference data sets to run this test")
    return Path(data_dir)


def listing(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def assert_binary(tensor: torch.Tensor) -> None:
    assert ((tensor == 0) | (tensor == 1)).all()


def unique_rows_dataset(num_train: int, binarize: str = "none") -> Dataset:
    """A data set whose i-th training image is filled with the value i, to track indices through batching."""
    train = torch.arange(num_train, dtype=torch.float32).reshape(-1, 1, 1).expand(-1, 2, 3).contiguous()
    test = torch.arange(7, dtype=torch.float32).reshape(-1, 1, 1).expand(-1, 2, 3).contiguous()
    return Dataset("unique", train, test, None, None, binarize)


def test_registry_lists_every_name():
    assert DATASET_NAMES == tuple(DATASETS)
    assert set(DATASET_NAMES) == {"digits", "mnist", "fashion-mnist", "binarized-mnist", "frey"}


def test_digits_splits_values_labels_and_determinism():
    digits = load_dataset("digits")
    assert digits.train.shape == (1500, 8, 8) and digits.test.shape == (297, 8, 8)
    assert digits.x_shape == (8, 8)
    assert digits.train.dtype == torch.float32
    assert digits.train.min() == 0 and digits.train.max() == 1
    assert digits.train_labels.dtype == torch.int64
    assert set(digits.train_labels.tolist()) == set(range(10)) == set(digits.test_labels.tolist())
    assert digits.binarize == "none"
    again = load_dataset("digits")
    assert torch.equal(digits.train, again.train) and torch.equal(digits.test_labels, again.test_labels)


def test_mnist_loads_from_read_only_folder_of_gz_files_without_writing_to_it(shared_data_dir, tmp_path):
    read_only_dir = tmp_path / "readonly"
    shutil.copytree(shared_data_dir / "MNIST", read_only_dir / "MNIST")
    for path in [read_only_dir, *read_only_dir.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    before = listing(read_only_dir)
    assert all(path.endswith(".gz") for path in before if path.startswith("MNIST/raw/"))

    mnist = load_dataset("mnist", data_dir=read_only_dir, cache_dir=tmp_path / "cache")

    assert listing(read_only_dir) == before
    assert mnist.train.shape == (60000, 28, 28) and mnist.test.shape == (10000, 28, 28)
    assert mnist.train.min() == 0 and mnist.train.max() == 1
    assert mnist.train_labels.bincount().tolist()[:2] == [5923, 6742]
    assert mnist.test_labels.shape == (10000,)


def test_fashion_mnist_from_shared_folder(shared_data_dir):
    before = listing(shared_data_dir)
    fashion = load_dataset("fashion-mnist")
    assert listing(shared_data_dir) == before
    assert fashion.train.shape == (60000, 28, 28) and fashion.test.shape == (10000, 28, 28)
    assert 0 <= fashion.train.min() and fashion.train.max() <= 1
    assert fashion.train_labels.bincount().tolist() == [6000] * 10
    assert fashion.test_labels.bincount().tolist() == [1000] * 10


def test_binarized_mnist_is_static_binary_and_cached(shared_data_dir, private_cache):
    binarized = load_dataset("binarized-mnist")
    assert binarized.train.shape == (50000, 28, 28) and binarized.test.shape == (10000, 28, 28)
    assert_binary(binarized.train)
    assert_binary(binarized.test)
    # Larochelle & Murray sampled the pixels from MNIST grey values, whose mean is 0.1307.
    assert binarized.train.mean().item() == pytest.approx(0.1306, abs=5e-4)
    assert binarized.train_labels is None and binarized.test_labels is None
    assert binarized.binarize == "static"
    assert list(private_cache.rglob("*.npy"))

    from_cache = load_dataset("binarized-mnist", binarize="static")
    assert torch.equal(from_cache.train, binarized.train) and torch.equal(from_cache.test, binarized.test)
    with_valid = load_dataset("binarized-mnist", include_valid=True)
    assert with_valid.train.shape == (60000, 28, 28)
    assert torch.equal(with_valid.train[:50000], binarized.train)


def test_frey_faces(shared_data_dir):
    frey = load_dataset("frey")
    assert len(frey.train) + len(frey.test) == 1965
    assert frey.x_shape == (28, 20) and frey.test.shape[1:] == (28, 20)
    assert 0 <= frey.train.min() and frey.train.max() <= 1
    assert frey.train_labels is None


def test_static_binarization_samples_once_per_seed():
    grey = load_dataset("digits")
    static = load_dataset("digits", binarize="static", seed=3)
    assert_binary(static.train)
    assert_binary(static.test)
    assert torch.equal(static.train, load_dataset("digits", binarize="static", seed=3).train)
    assert not torch.equal(static.train, load_dataset("digits", binarize="static", seed=4).train)
    # Sampling, not thresholding: mid-grey pixels come out as 1 about as often as their grey value says.
    mid_grey = (grey.train > 0.25) & (grey.train < 0.75)
    assert static.train[mid_grey].mean().item() == pytest.approx(grey.train[mid_grey].mean().item(), abs=0.02)


def test_dynamic_binarization_resamples_train_each_epoch_and_fixes_test():
    grey = load_dataset("digits")
    dynamic = load_dataset("digits", binarize="dynamic", seed=0)
    assert dynamic.binarize == "dynamic"
    assert torch.equal(dynamic.train, grey.train)
    assert_binary(dynamic.test)
    assert torch.equal(dynamic.test, load_dataset("digits", binarize="dynamic", seed=0).test)

    generator = torch.Generator().manual_seed(0)
    first_epoch = torch.cat(list(dynamic.train_batches(256, generator=generator, shuffle=False)))
    second_epoch = torch.cat(list(dynamic.train_batches(256, generator=generator, shuffle=False)))
    assert_binary(first_epoch)
    assert not torch.equal(first_epoch, second_epoch)
    assert first_epoch.mean().item() == pytest.approx(grey.train.mean().item(), abs=0.01)


def test_train_batches_cover_each_index_once_and_keep_the_last_partial_batch():
    dataset = unique_rows_dataset(10)
    batches = list(dataset.train_batches(3, generator=torch.Generator().manual_seed(0)))
    assert [len(batch) for batch in batches] == [3, 3, 3, 1]
    assert dataset.num_batches(3) == 4 and dataset.num_batches(3, split="test") == 3
    seen = torch.cat(batches)[:, 0, 0]
    assert sorted(seen.tolist()) == list(range(10))
    assert seen.tolist() != list(range(10))

    in_order = torch.cat(list(dataset.train_batches(3, shuffle=False)))[:, 0, 0]
    assert in_order.tolist() == list(range(10))
    test_order = torch.cat(list(dataset.test_batches(4)))[:, 0, 0]
    assert test_order.tolist() == list(range(7))


def test_shuffle_is_reproducible_with_a_seeded_generator():
    dataset = unique_rows_dataset(50)

    def epoch_order(seed):
        batches = dataset.train_batches(8, generator=torch.Generator().manual_seed(seed))
        return torch.cat(list(batches))[:, 0, 0].tolist()

    assert epoch_order(1) == epoch_order(1)
    assert epoch_order(1) != epoch_order(2)


def test_to_moves_every_tensor():
    digits = load_dataset("digits", device="meta")
    assert {digits.train.device.type, digits.test.device.type} == {"meta"}
    assert {digits.train_labels.device.type, digits.test_labels.device.type} == {"meta"}


def test_data_dir_defaults_to_the_environment_variable(shared_data_dir, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(shared_data_dir))
    assert len(load_dataset("frey").train) > 0


@pytest.mark.parametrize(
    "kwargs, message_parts",
    [
        ({"name": "cifar"}, ["'cifar'", *DATASET_NAMES]),
        ({"name": "digits", "binarize": "median"}, ["'median'", *BINARIZE_MODES]),
        ({"name": "binarized-mnist", "binarize": "dynamic"}, ["dynamic", "'none' or 'static'", "mnist"]),
        ({"name": "digits", "include_valid": True}, ["include_valid", "binarized-mnist"]),
    ],
)
def test_bad_arguments_name_the_fix(kwargs, message_parts):
    with pytest.raises(DataError) as error:
        load_dataset(**kwargs)
    for part in message_parts:
        assert part in str(error.value)


@pytest.mark.parametrize(
    "name, expected_path",
    [
        ("mnist", "MNIST/raw/train-images-idx3-ubyte.gz"),
        ("fashion-mnist", "FashionMNIST/raw/train-images-idx3-ubyte.gz"),
        ("binarized-mnist", "BinarizedMNIST/binarized_mnist_train.amat.gz"),
        ("frey", "FreyFace/frey_rawface.mat"),
    ],
)
def test_missing_files_name_the_expected_path_and_how_to_set_it(name, expected_path, tmp_path):
    with pytest.raises(DataError) as error:
        load_dataset(name, data_dir=tmp_path)
    message = str(error.value)
    assert str(tmp_path / expected_path) in message
    assert DATA_DIR_ENV in message and "--data-dir" in message
    assert listing(tmp_path) == []


@pytest.mark.parametrize("name, download_hint", [("binarized-mnist", "larocheh"), ("frey", "frey_rawface.mat")])
def test_files_that_cannot_be_downloaded_say_where_to_get_them(name, download_hint, monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    with pytest.raises(DataError) as error:
        load_dataset(name)
    assert download_hint in str(error.value) and DATA_DIR_ENV in str(error.value)


def test_malformed_amat_file_is_rejected(tmp_path):
    folder = tmp_path / "BinarizedMNIST"
    folder.mkdir()
    with gzip.open(folder / "binarized_mnist_train.amat.gz", "wt") as amat:
        amat.write("0 1 2\n")
    with pytest.raises(DataError, match="not a binarized-MNIST .amat file"):
        load_dataset("binarized-mnist", data_dir=tmp_path)


def test_bad_batch_size_is_rejected():
    with pytest.raises(DataError, match="positive integer"):
        next(unique_rows_dataset(4).train_batches(0))


def test_a_cuda_device_without_index_names_the_current_one(monkeypatch):
    # a generator made on "cuda" reports plain cuda, its tensors cuda:<index>: both must
    # compare equal in the dynamic-binarization check (no CUDA is needed to name devices)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert indexed_device(torch.device("cuda")) == torch.device("cuda", 1)
    assert indexed_device(torch.device("cuda", 0)) == torch.device("cuda", 0)
    assert indexed_device(torch.device("cpu")) == torch.device("cpu")
