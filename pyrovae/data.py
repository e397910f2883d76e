"""Image data sets by name, held as whole tensors.

Every data set is loaded once into float32 tensors of shape ``(N, H, W)`` with
values in ``[0, 1]`` and is then sliced into batches on whatever device it
lives on, so training never goes through a per-item ``DataLoader``.

Files are looked up in ``data_dir`` (default: ``$PYROVAE_DATA_DIR``), which is
only ever read. Anything derived from it (extracted MNIST files, parsed
binarized-MNIST arrays) goes into ``cache_dir`` (default:
``$PYROVAE_CACHE_DIR``, else ``~/.cache/pyrovae``). See ``docs/datasets.md``.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pyrovae.atomic import atomic_write
from pyrovae.errors import DataError

DATA_DIR_ENV = "PYROVAE_DATA_DIR"
CACHE_DIR_ENV = "PYROVAE_CACHE_DIR"
BINARIZE_MODES = ("none", "dynamic", "static", "threshold")
THRESHOLD = 0.5  # binarize="threshold": a pixel is 1 where its grey value is above this

DIGITS_NUM_TEST = 297
FREY_NUM_TEST = 265

BINARIZED_MNIST_URL = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"
FREY_URL = "https://cs.nyu.edu/~roweis/data/frey_rawface.mat"
_DATA_DIR_HINT = f"pass --data-dir (data_dir=...) or set the environment variable {DATA_DIR_ENV}"


@dataclass
class Dataset:
    """A data set held as whole tensors.

    ``train`` and ``test`` are float32 tensors of shape ``(N, H, W)``. With
    ``binarize == "dynamic"`` the training images keep their grey values and
    every batch from :meth:`train_batches` is a fresh Bernoulli sample of them,
    while ``test`` was binarized once at load time so that test scores stay
    comparable from one epoch to the next.
    """

    name: str
    train: torch.Tensor
    test: torch.Tensor
    train_labels: torch.Tensor | None
    test_labels: torch.Tensor | None
    binarize: str

    def __post_init__(self) -> None:
        if self.binarize not in BINARIZE_MODES:
            raise DataError(
                f"unknown binarize mode {self.binarize!r}: choose one of {', '.join(BINARIZE_MODES)}")
        if self.binarize == "dynamic":
            _check_grey(self.train, f"{self.name} training set")

    @property
    def x_shape(self) -> tuple[int, ...]:
        return tuple(self.train.shape[1:])

    def to(self, device: torch.device | str) -> Dataset:
        def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device)

        return dataclasses.replace(
            self,
            train=move(self.train),
            test=move(self.test),
            train_labels=move(self.train_labels),
            test_labels=move(self.test_labels),
        )

    def num_batches(self, batch_size: int, split: str = "train") -> int:
        """Number of batches per pass over ``split`` ("train" or "test"), last partial one included."""
        _check_batch_size(batch_size)
        if split not in ("train", "test"):
            raise DataError(f"unknown split {split!r}: use 'train' or 'test'")
        return math.ceil(len(getattr(self, split)) / batch_size)

    def train_batches(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        shuffle: bool = True,
    ) -> Iterator[torch.Tensor]:
        """One epoch of training batches; the last, partial batch is kept.

        ``generator`` drives both the shuffling and, for dynamic binarization,
        the Bernoulli sampling; for the latter it must live on the data's
        device (``torch.Generator(device=dataset.train.device)``).
        """
        _check_batch_size(batch_size)
        num_train = len(self.train)
        if shuffle:
            permutation_device = generator.device if generator is not None else self.train.device
            order = torch.randperm(num_train, generator=generator, device=permutation_device)
            order = order.to(self.train.device)
        if self.binarize == "dynamic" and generator is not None and generator.device != self.train.device:
            raise DataError(
                f"dynamic binarization samples on the data's device ({self.train.device}) but the "
                f"generator is on {generator.device}: create it with "
                f"torch.Generator(device={str(self.train.device)!r})"
            )
        for start in range(0, num_train, batch_size):
            if shuffle:
                batch = self.train[order[start : start + batch_size]]
            else:
                batch = self.train[start : start + batch_size]
            if self.binarize == "dynamic":
                batch = torch.bernoulli(batch, generator=generator)
            yield batch

    def test_batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """The test set in order, in batches; the last, partial batch is kept."""
        _check_batch_size(batch_size)
        for start in range(0, len(self.test), batch_size):
            yield self.test[start : start + batch_size]


def _check_grey(images, what: str) -> None:
    """Dynamic binarization draws each pixel with ``torch.bernoulli(x)``, which needs
    finite floating-point grey values in [0, 1]: checked when the Dataset is built, so
    that a bad value is named there and not by torch in the middle of an epoch."""
    if not isinstance(images, torch.Tensor) or not torch.is_floating_point(images):
        kind = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
        raise DataError(
            f"{what} is {kind}; dynamic binarization needs a floating-point tensor of grey "
            f"values in [0, 1] (convert it with torch.as_tensor(x, dtype=torch.float32)).")
    if images.numel() == 0:
        return
    # one pass for good data (a NaN makes both NaN, which fails the test); the counts
    # for the message only when it fails
    low, high = torch.aminmax(images)
    if bool((low >= 0) & (high <= 1)):
        return
    bad = ~torch.isfinite(images)
    if bool(bad.any()):
        raise DataError(
            f"{what} holds {int(bad.sum())} NaN or infinite values; dynamic binarization "
            f"draws each pixel with torch.bernoulli(x), which needs grey values in [0, 1]. "
            f"Remove or impute them, or use binarize='none' (--binarize none).")
    outside = (images < 0) | (images > 1)
    if bool(outside.any()):
        raise DataError(
            f"{what} holds {int(outside.sum())} values outside [0, 1] (from "
            f"{float(images.min()):g} to {float(images.max()):g}); dynamic binarization draws "
            f"each pixel with torch.bernoulli(x), which needs grey values in [0, 1]. Rescale "
            f"the data to [0, 1] (divide 8-bit images by 255), or use binarize='none' "
            f"(--binarize none).")


def _check_writable(folder: Path, cache_dir: Path, what: str) -> None:
    """Refuse, before any work, a cache folder that cannot be created or written."""
    problem = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        problem = f"{type(error).__name__}: {error.strerror or error}"
    if problem is None and not os.access(folder, os.W_OK | os.X_OK):
        problem = "no write permission"
    if problem is not None:
        raise DataError(
            f"the cache folder {cache_dir} cannot be written ({problem}), and {what} must be "
            f"written into {folder}. Set the environment variable {CACHE_DIR_ENV} to a "
            f"writable folder (or pass cache_dir=...); the data folder itself is only read.")


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")


@dataclass
class _Splits:
    """What a loader returns: grey values in [0, 1], before any binarization."""

    train: torch.Tensor
    test: torch.Tensor
    train_labels: torch.Tensor | None = None
    test_labels: torch.Tensor | None = None


def _load_digits(data_dir: Path | None, cache_dir: Path) -> _Splits:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32) / 16.0
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    num_train = len(images) - DIGITS_NUM_TEST
    return _Splits(images[:num_train], images[num_train:], labels[:num_train], labels[num_train:])


def _torchvision_mnist_loader(dataset_class_name: str) -> Callable[[Path | None, Path], _Splits]:
    def load(data_dir: Path | None, cache_dir: Path) -> _Splits:
        import torchvision

        dataset_class = getattr(torchvision.datasets, dataset_class_name)
        root, download = _torchvision_root(dataset_class, data_dir, cache_dir)
        try:
            train = dataset_class(root=root, train=True, download=download)
            test = dataset_class(root=root, train=False, download=download)
        except RuntimeError as error:
            expected = Path(data_dir or root) / dataset_class_name / "raw"
            raise DataError(
                f"could not load {dataset_class_name} through torchvision ({error}). Put the four "
                f"*-idx?-ubyte.gz files in {expected} and {_DATA_DIR_HINT}"
            ) from error
        return _Splits(
            train.data.float() / 255.0,
            test.data.float() / 255.0,
            train.targets.long(),
            test.targets.long(),
        )

    return load


def _torchvision_root(dataset_class: type, data_dir: Path | None, cache_dir: Path) -> tuple[Path, bool]:
    """Pick the root torchvision reads from, never writing into ``data_dir``.

    torchvision only reads the extracted idx files and extracts the ``.gz``
    files next to themselves, so a read-only folder holding only the ``.gz``
    files is staged into the cache and extracted there (MD5-checked, offline).
    """
    folder_name = dataset_class.__name__
    archive_names = [filename for filename, _md5 in dataset_class.resources]
    extracted_names = [name.removesuffix(".gz") for name in archive_names]
    cache_raw_dir = cache_dir / folder_name / "raw"
    cached = all((cache_raw_dir / name).is_file() for name in extracted_names)
    if data_dir is None:
        if not cached:
            _check_writable(cache_raw_dir, cache_dir, f"{folder_name}, downloaded and extracted,")
        return cache_dir, True

    raw_dir = data_dir / folder_name / "raw"
    if all((raw_dir / name).is_file() for name in extracted_names):
        return data_dir, False

    missing = [raw_dir / name for name in archive_names if not (raw_dir / name).is_file()]
    if missing:
        raise DataError(
            f"{folder_name} files not found: {', '.join(map(str, missing))}. Put the torchvision "
            f"files in {raw_dir} and {_DATA_DIR_HINT}"
        )
    if not cached:
        _check_writable(cache_raw_dir, cache_dir,
                        f"the {folder_name} .gz files, copied and extracted,")
        for name in archive_names:
            shutil.copyfile(raw_dir / name, cache_raw_dir / name)
    return cache_dir, True


def _load_binarized_mnist(data_dir: Path | None, cache_dir: Path, include_valid: bool = False) -> _Splits:
    train = _binarized_mnist_split("train", data_dir, cache_dir)
    if include_valid:
        train = torch.cat([train, _binarized_mnist_split("valid", data_dir, cache_dir)])
    return _Splits(train, _binarized_mnist_split("test", data_dir, cache_dir))


def _binarized_mnist_split(split: str, data_dir: Path | None, cache_dir: Path) -> torch.Tensor:
    cached = cache_dir / "BinarizedMNIST" / f"binarized_mnist_{split}.packed.npy"
    if cached.is_file():
        bits = np.unpackbits(np.load(cached), axis=1)[:, :784]
        return torch.from_numpy(bits).float().reshape(-1, 28, 28)

    source = _find_binarized_mnist_file(split, data_dir)
    _check_writable(cached.parent, cache_dir, f"the parsed binarized-mnist {split} split")
    opener = gzip.open if source.suffix == ".gz" else open
    with opener(source, "rb") as stream:
        pixels = _parse_amat_bits(stream.read(), source)
    packed = np.packbits(pixels, axis=1)
    atomic_write(cached, lambda f: np.save(f, packed))
    return torch.from_numpy(pixels).float().reshape(-1, 28, 28)


def _find_binarized_mnist_file(split: str, data_dir: Path | None) -> Path:
    file_name = f"binarized_mnist_{split}.amat"
    if data_dir is None:
        raise DataError(
            f"binarized-mnist needs its files on disk: {_DATA_DIR_HINT}, pointing to the folder that "
            f"holds BinarizedMNIST/{file_name}.gz (download {file_name} from {BINARIZED_MNIST_URL})"
        )
    folder = data_dir / "BinarizedMNIST"
    for candidate in (folder / f"{file_name}.gz", folder / file_name):
        if candidate.is_file():
            return candidate
    raise DataError(
        f"binarized-mnist file not found: {folder / file_name}.gz (or the uncompressed {file_name}). "
        f"Download it from {BINARIZED_MNIST_URL} into {folder}, or {_DATA_DIR_HINT}"
    )


def _parse_amat_bits(text: bytes, source: Path) -> np.ndarray:
    """Parse whitespace-separated 0/1 values, 784 a line, far faster than ``np.loadtxt``."""
    character_kind = _AMAT_CHARACTER_KIND[np.frombuffer(text, dtype=np.uint8)]
    digits = character_kind[character_kind <= 1]
    num_lines = text.rstrip().count(b"\n") + 1
    if np.any(character_kind == _AMAT_INVALID) or digits.size != num_lines * 784:
        raise DataError(f"{source} is not a binarized-MNIST .amat file (784 values of 0 or 1 per line)")
    return digits.reshape(num_lines, 784)


_AMAT_WHITESPACE, _AMAT_INVALID = 2, 3
_AMAT_CHARACTER_KIND = np.full(256, _AMAT_INVALID, dtype=np.uint8)
_AMAT_CHARACTER_KIND[[ord("0"), ord("1")]] = [0, 1]
_AMAT_CHARACTER_KIND[list(b" \t\r\n")] = _AMAT_WHITESPACE


def _load_frey(data_dir: Path | None, cache_dir: Path) -> _Splits:
    from scipy.io import loadmat

    if data_dir is None:
        raise DataError(
            f"frey needs its file on disk: {_DATA_DIR_HINT}, pointing to the folder that holds "
            f"FreyFace/frey_rawface.mat (download it from {FREY_URL})"
        )
    path = data_dir / "FreyFace" / "frey_rawface.mat"
    if not path.is_file():
        raise DataError(f"frey file not found: {path}. Download it from {FREY_URL}, or {_DATA_DIR_HINT}")
    faces = torch.from_numpy(loadmat(path)["ff"].T.reshape(-1, 28, 20)).float() / 255.0
    # The faces are consecutive video frames: a random split would put near-copies of
    # test faces into the training set, so the test set is the last frames instead.
    num_train = len(faces) - FREY_NUM_TEST
    return _Splits(faces[:num_train], faces[num_train:])


DATASETS: dict[str, Callable[..., _Splits]] = {
    "digits": _load_digits,
    "mnist": _torchvision_mnist_loader("MNIST"),
    "fashion-mnist": _torchvision_mnist_loader("FashionMNIST"),
    "binarized-mnist": _load_binarized_mnist,
    "frey": _load_frey,
}
DATASET_NAMES = tuple(DATASETS)
STATICALLY_BINARIZED = ("binarized-mnist",)


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "pyrovae")


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    binarize: str = "none",
    seed: int = 0,
    device: torch.device | str = "cpu",
    cache_dir: str | os.PathLike | None = None,
    include_valid: bool = False,
) -> Dataset:
    """Load a data set by name (see ``DATASET_NAMES``) as whole tensors on ``device``.

    ``binarize`` is "none" (grey values), "static" (train and test are each
    sampled once with ``torch.bernoulli`` from a generator seeded with
    ``seed``), "dynamic" (train is resampled every batch; test is sampled
    once with ``seed``) or "threshold" (deterministic: 1 where the grey value
    is above ``THRESHOLD``, else 0; ``seed`` plays no part). binarized-mnist is
    already binarized, so it is always "static" and rejects "dynamic". ``include_valid`` adds binarized-mnist's
    10,000 validation images to its training set.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}: choose one of {', '.join(DATASET_NAMES)}")
    if binarize not in BINARIZE_MODES:
        raise DataError(f"unknown binarize mode {binarize!r}: choose one of {', '.join(BINARIZE_MODES)}")
    if name in STATICALLY_BINARIZED and binarize == "dynamic":
        raise DataError(
            f"{name} is a fixed binarization of MNIST and has no grey values to resample, so "
            f"binarize='dynamic' is impossible: use binarize='none' or 'static' with it, or use "
            f"dataset 'mnist' with binarize='dynamic'"
        )
    if include_valid and name != "binarized-mnist":
        raise DataError(f"include_valid applies only to binarized-mnist, which has a validation split, not {name!r}")

    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV) or None
    data_dir = None if data_dir is None else Path(data_dir).expanduser()
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()

    loader_options = {"include_valid": True} if include_valid else {}
    splits = DATASETS[name](data_dir, cache_dir, **loader_options)

    train, test = splits.train, splits.test
    if name in STATICALLY_BINARIZED:
        binarize = "static"
    elif binarize == "static":
        generator = torch.Generator().manual_seed(seed)
        train = torch.bernoulli(train, generator=generator)
        test = torch.bernoulli(test, generator=generator)
    elif binarize == "dynamic":
        test = torch.bernoulli(test, generator=torch.Generator().manual_seed(seed))
    elif binarize == "threshold":
        train, test = (train > THRESHOLD).float(), (test > THRESHOLD).float()

    return Dataset(
        name=name,
        train=train,
        test=test,
        train_labels=splits.train_labels,
        test_labels=splits.test_labels,
        binarize=binarize,
    ).to(device)
