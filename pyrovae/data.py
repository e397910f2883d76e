"""Data sets: the built-in ones by name, and the user's own (image folders, arrays, CSV).

Every built-in data set is loaded once into float32 tensors of shape ``(N, H, W)``
with values in ``[0, 1]`` and is then sliced into batches on whatever device it
lives on, so training never goes through a per-item ``DataLoader``. The user's
own data (``load_dataset(PATH)``, ``Dataset.from_tensors``) take the same path
while they fit: above ``STREAM_THRESHOLD_BYTES`` (or with ``stream=True``) an
image folder or a ``.npy`` file is streamed instead, a ``torch.utils.data.DataLoader``
reading each batch from the files (``StreamedDataset``). Both paths give the
same batches in the same order for the same generator.

Files are looked up in ``data_dir`` (default: ``$PYROVAE_DATA_DIR``), which is
only ever read. Anything derived from it (extracted MNIST files, parsed
binarized-MNIST arrays) goes into ``cache_dir`` (default:
``$PYROVAE_CACHE_DIR``, else ``~/.cache/pyrovae``). See ``docs/datasets.md``.
"""

from __future__ import annotations

import dataclasses
import difflib
import gzip
import logging
import math
import numbers
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from pyrovae.atomic import atomic_write
from pyrovae.errors import DataError

log = logging.getLogger("pyrovae")

DATA_DIR_ENV = "PYROVAE_DATA_DIR"
CACHE_DIR_ENV = "PYROVAE_CACHE_DIR"
BINARIZE_MODES = ("none", "dynamic", "static", "threshold")
THRESHOLD = 0.5  # binarize="threshold": a pixel is 1 where its grey value is above this

DEFAULT_TEST_SIZE = 0.1  # the share of one's own data held out as the test set, without --test
# above this size as float32 (train and test together), an image folder or a .npy file is
# streamed from disk batch by batch unless stream=False: the whole-tensor path copies
# the data into memory (and onto the GPU), which is what makes small data sets fast
STREAM_THRESHOLD_BYTES = 2 * 1024**3
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
ARRAY_SUFFIXES = (".npy", ".npz", ".pt")
OWN_DATA_SUFFIXES = ARRAY_SUFFIXES + (".csv",)
# PIL image modes without colour: their pixels are read as one grey channel
_GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
# the rows of streamed training data that a prior initialized from data (vamp) sees
INITIALIZATION_ROWS = 10_000
# the data set of a run on data passed in Python (Dataset.from_tensors): TrainConfig's
# dataset names it, and nothing on disk can be reloaded for it
FROM_TENSORS = "tensors"

DIGITS_NUM_TEST = 297
FREY_NUM_TEST = 265
# --val-size official (val_size="official"): binarized-mnist's own 10,000 validation images
OFFICIAL_VALIDATION = "official"

BINARIZED_MNIST_URL = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"
FREY_URL = "https://cs.nyu.edu/~roweis/data/frey_rawface.mat"
_DATA_DIR_HINT = f"pass --data-dir (data_dir=...) or set the environment variable {DATA_DIR_ENV}"


@dataclass
class Dataset:
    """A data set held as whole tensors.

    ``train`` and ``test`` are float tensors of shape ``(N,) + x_shape``: ``(N, H, W)``
    for grey images, ``(N, 3, H, W)`` for colour ones, ``(N, D)`` for tabular data.
    With ``binarize == "dynamic"`` the training images keep their grey values and
    every batch from :meth:`train_batches` is a fresh Bernoulli sample of them,
    while ``test`` was binarized once at load time so that test scores stay
    comparable from one epoch to the next.

    Build one from your own tensors with :meth:`from_tensors`, or from files with
    ``load_dataset(PATH)``; :meth:`hold_out_validation` moves training datapoints into a
    validation set ``valid``.
    """

    name: str
    train: torch.Tensor
    test: torch.Tensor
    train_labels: torch.Tensor | None
    test_labels: torch.Tensor | None
    binarize: str
    # a validation set (``hold_out_validation``, ``load_dataset(val_size=...)``): never in
    # ``train``; binarized once at load time, as ``test`` is
    valid: torch.Tensor | None = None
    valid_labels: torch.Tensor | None = None

    streamed: ClassVar[bool] = False  # StreamedDataset reads its training set batch by batch

    def __post_init__(self) -> None:
        if self.binarize not in BINARIZE_MODES:
            raise DataError(
                f"unknown binarize mode {self.binarize!r}: choose one of {', '.join(BINARIZE_MODES)}")
        if self.binarize == "dynamic":
            _check_grey(self.train, f"{self.name} training set")

    @classmethod
    def from_tensors(cls, train, test=None, *, test_size: float | int = DEFAULT_TEST_SIZE,
                     seed: int = 0, binarize: str = "none", name: str = "tensors",
                     train_labels=None, test_labels=None) -> Dataset:
        """Your own data as a ``Dataset``: ``train`` (and ``test``) are tensors or numpy
        arrays of shape ``(N,) + x_shape``, e.g. ``(N, H, W)``, ``(N, 3, H, W)`` or ``(N, D)``.

        Without ``test``, a test set of ``test_size`` datapoints (a fraction in (0, 1)
        or a count) is drawn from ``train`` by a permutation seeded with ``seed``.
        Integer or boolean values become float32 as they are (not rescaled); floating
        ones keep their dtype. ``binarize`` is applied as by ``load_dataset``.
        """
        train = _as_data(train, f"{name} training data")
        train_labels = _as_labels(train_labels, len(train), "train_labels")
        if test is None:
            if test_labels is not None:
                raise DataError("test_labels were given without test data: pass test=... with "
                                "them, or leave both out to split the training data.")
            train_rows, test_rows = split_indices(len(train), test_size, seed)
            test = train[test_rows]
            train = train[train_rows]
            if train_labels is not None:
                train_labels, test_labels = train_labels[train_rows], train_labels[test_rows]
        else:
            test = _as_data(test, f"{name} test data")
            _check_same_shape(train, test, "the training data", "the test data")
            test_labels = _as_labels(test_labels, len(test), "test_labels")
        train, test = _binarized(train, test, binarize, seed)
        return cls(name=name, train=train, test=test, train_labels=train_labels,
                   test_labels=test_labels, binarize=binarize)

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
            valid=move(self.valid),
            valid_labels=move(self.valid_labels),
        )

    def hold_out_validation(self, size: int, seed: int = 0) -> Dataset:
        """This data set with ``size`` of its training datapoints moved into a validation
        set ``valid``: the rows of a permutation seeded with ``seed`` (``split_indices``),
        so that the same seed holds out the same rows. The validation set never appears
        in ``train``; with dynamic binarization it is binarized once with ``seed``, as the
        test set is, so that its ELBO is comparable from one epoch to the next."""
        if self.valid is not None:
            raise DataError(f"{self.name} holds a validation set already; hold one out of "
                            f"the data set as loaded, without val_size.")
        if size == OFFICIAL_VALIDATION:
            raise DataError(f"{OFFICIAL_VALIDATION!r} is a data set's own validation split, "
                            f"which load_dataset(..., val_size={OFFICIAL_VALIDATION!r}) "
                            f"loads; hold_out_validation takes a count.")
        size = check_val_size(size, self.name, train_size=len(self.train))
        if size == 0:
            raise DataError("hold_out_validation needs a count of at least 1.")
        train_rows, valid_rows = split_indices(len(self.train), size, seed)
        valid = self.train[valid_rows]
        if self.binarize == "dynamic":
            _, valid = _binarized(valid[:0], valid, self.binarize, seed)
        labels = self.train_labels
        return dataclasses.replace(
            self, train=self.train[train_rows], valid=valid,
            train_labels=None if labels is None else labels[train_rows],
            valid_labels=None if labels is None else labels[valid_rows])

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
        shard: tuple[int, int] | None = None,
    ) -> Iterator[torch.Tensor]:
        """One epoch of training batches; the last, partial batch is kept.

        ``generator`` drives both the shuffling and, for dynamic binarization,
        the Bernoulli sampling; for the latter it must live on the data's
        device (``torch.Generator(device=dataset.train.device)``).

        ``shard=(rank, world_size)`` yields this process's block of rows of each
        batch instead (data-parallel training: ``pyrovae.distributed``); the blocks
        of all ranks make up the batch, and every rank draws the same random
        numbers from ``generator``, so its state stays the same on all of them.
        """
        order = self._epoch_order(batch_size, generator, shuffle)
        for start, size, low, high in _batch_rows(len(self.train), batch_size, shard):
            rows = slice(start + low, start + high)
            batch = self.train[order[rows]] if shuffle else self.train[rows]
            yield self._binarized_batch(batch, generator, size, low)

    def random_batch(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """The first batch of a fresh epoch: ``next(train_batches(batch_size, generator))``."""
        return next(self.train_batches(batch_size, generator))

    def test_batches(self, batch_size: int, split: str = "test") -> Iterator[torch.Tensor]:
        """The test set (or, with ``split="valid"``, the validation set) in order, in
        batches; the last, partial batch is kept."""
        _check_batch_size(batch_size)
        if split not in ("test", "valid"):
            raise DataError(f"unknown held-out split {split!r}: use 'test' or 'valid'")
        held_out = getattr(self, split)
        if held_out is None:
            raise DataError(f"{self.name} has no validation set: load it with "
                            f"load_dataset(..., val_size=N) or hold_out_validation(N).")
        for start in range(0, len(held_out), batch_size):
            yield held_out[start : start + batch_size]

    def _epoch_order(self, batch_size, generator, shuffle) -> torch.Tensor | None:
        _check_batch_size(batch_size)
        if self.binarize == "dynamic" and generator is not None and \
                indexed_device(generator.device) != indexed_device(self._batch_device):
            raise DataError(
                f"dynamic binarization samples on the data's device ({self._batch_device}) but "
                f"the generator is on {generator.device}: create it with "
                f"torch.Generator(device={str(self._batch_device)!r})"
            )
        if not shuffle:
            return None
        permutation_device = generator.device if generator is not None else self._batch_device
        order = torch.randperm(len(self.train), generator=generator, device=permutation_device)
        return order.to(self._batch_device)

    @property
    def _batch_device(self) -> torch.device:
        return self.train.device

    def _binarized_batch(self, batch, generator, size: int, offset: int) -> torch.Tensor:
        if self.binarize != "dynamic":
            return batch
        # uniforms for the whole batch of ``size`` rows, of which this block uses its own:
        # every data-parallel rank draws the same numbers and stays in step, and one
        # process gets the draws that the ranks together get
        uniform = torch.rand((size,) + tuple(batch.shape[1:]), generator=generator,
                             device=batch.device, dtype=batch.dtype)
        return (uniform[offset : offset + len(batch)] < batch).to(batch.dtype)


def is_image_shape(x_shape: tuple[int, ...]) -> bool:
    """Whether datapoints of this shape are pictures: (H, W), or (C, H, W) with one or
    three channels; tabular rows (D,) and other shapes are not."""
    return len(x_shape) == 2 or (len(x_shape) == 3 and x_shape[0] in (1, 3))


def _batch_rows(num: int, batch_size: int, shard: tuple[int, int] | None
                ) -> Iterator[tuple[int, int, int, int]]:
    """For each batch of an epoch over ``num`` rows: where it starts in the epoch's
    order, its size, and the rows [low, high) of it that this process takes: all of
    them without ``shard``; with ``shard=(rank, world_size)``, a contiguous block,
    empty where the batch has fewer rows than there are ranks."""
    rank, world_size = shard or (0, 1)
    if not (isinstance(rank, int) and isinstance(world_size, int) and 0 <= rank < world_size):
        raise DataError(f"shard must be (rank, world_size) with 0 <= rank < world_size, "
                        f"got {shard!r}")
    for start in range(0, num, batch_size):
        size = min(batch_size, num - start)
        yield start, size, rank * size // world_size, (rank + 1) * size // world_size


def _check_grey(images, what: str) -> None:
    """Binarization draws each pixel as 1 with probability x (``torch.bernoulli(x)`` for
    the static kind, ``torch.rand(...) < x`` for each dynamic batch), which needs
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


def indexed_device(device: torch.device) -> torch.device:
    """``cuda`` as ``cuda:<current device>``, the name its tensors report, so that devices
    compare equal (a generator made on ``cuda`` reports plain ``cuda``)."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


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
    valid: torch.Tensor | None = None  # a data set's own validation split


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


def _load_binarized_mnist(data_dir: Path | None, cache_dir: Path, include_valid: bool = False,
                          valid: bool = False) -> _Splits:
    """``include_valid`` adds the validation images to the training set; ``valid`` keeps
    them apart, as the validation set."""
    train = _binarized_mnist_split("train", data_dir, cache_dir)
    held_out = _binarized_mnist_split("valid", data_dir, cache_dir) \
        if include_valid or valid else None
    if include_valid:
        train, held_out = torch.cat([train, held_out]), None
    return _Splits(train, _binarized_mnist_split("test", data_dir, cache_dir), valid=held_out)


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
# the training images of each built-in data set, so that a --val-size that leaves none is
# refused before the data are loaded
TRAIN_SIZES = {"digits": 1797 - DIGITS_NUM_TEST, "mnist": 60_000, "fashion-mnist": 60_000,
               "binarized-mnist": 50_000, "frey": 1965 - FREY_NUM_TEST}
# the data sets that come with a validation split of their own (--val-size official)
OFFICIAL_VALIDATION_SETS = ("binarized-mnist",)


def check_val_size(val_size, dataset, stream: bool | None = None,
                   train_size: int | None = None) -> int | str:
    """``val_size`` checked: a count of training images to hold out (0: none), below the
    training set's size where it is known (``train_size``, or a built-in data set's),
    or "official" for a data set with a validation split of its own. The messages name
    the ``pyrovae train`` flag with the keyword beside it."""
    flag = "--val-size (val_size=)"
    if val_size == OFFICIAL_VALIDATION:
        if dataset not in OFFICIAL_VALIDATION_SETS:
            raise DataError(
                f"{flag} {OFFICIAL_VALIDATION} takes a data set's own validation split, which "
                f"only {', '.join(OFFICIAL_VALIDATION_SETS)} has, not {dataset}: give a count "
                f"of training images to hold out instead, e.g. --val-size 1000.")
        return val_size
    whole = isinstance(val_size, numbers.Integral) and not isinstance(val_size, bool)
    if not whole or val_size < 0:
        raise DataError(
            f"{flag} must be a non-negative integer, the count of training images held out "
            f"for validation (0: none), or {OFFICIAL_VALIDATION!r} for binarized-mnist's own "
            f"validation split; got {val_size!r}.")
    size = TRAIN_SIZES.get(dataset) if train_size is None else train_size
    if val_size and size is not None and val_size >= size:
        raise DataError(f"{flag} {val_size} would leave no training images: {dataset} has "
                        f"{size}. Hold out fewer, e.g. --val-size {max(1, size // 10)}.")
    if val_size and stream:
        raise DataError(f"{flag} holds training images out in memory, which a streamed "
                        f"training set (--stream) does not hold: add --no-stream, or leave "
                        f"{flag} out.")
    return int(val_size)


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
    *,
    test: str | os.PathLike | None = None,
    test_size: float | int | None = None,
    image_size=None,
    csv_columns=None,
    stream: bool | None = None,
    num_workers: int | None = None,
    val_size: int | str = 0,
) -> Dataset:
    """Load a data set by name (see ``DATASET_NAMES``), or your own data from a path,
    on ``device``.

    ``binarize`` is "none" (grey values), "static" (train and test are each
    sampled once with ``torch.bernoulli`` from a generator seeded with
    ``seed``), "dynamic" (train is resampled every batch; test is sampled
    once with ``seed``) or "threshold" (deterministic: 1 where the grey value
    is above ``THRESHOLD``, else 0; ``seed`` plays no part). binarized-mnist is
    already binarized, so it is always "static" and rejects "dynamic". ``include_valid`` adds binarized-mnist's
    10,000 validation images to its training set.

    ``name`` may instead be the path of your own data: a folder of PNG or JPEG
    images, or a ``.npy``, ``.npz``, ``.pt`` or ``.csv`` file (docs/datasets.md). Its
    test set is ``test`` (a path of the same kind), or else ``test_size`` datapoints
    of it (a fraction in (0, 1) or a count; default ``DEFAULT_TEST_SIZE``) drawn with
    ``seed``. ``image_size`` ((H, W), or one size for square images) resizes every
    image; ``csv_columns`` picks a CSV's columns by name (or 0-based number).
    ``stream`` reads the training set batch by batch (``StreamedDataset``, with
    ``num_workers`` loader processes) instead of holding it in memory; the default,
    None, streams an image folder or ``.npy`` file above ``STREAM_THRESHOLD_BYTES``.

    ``val_size`` holds that many training datapoints out as the validation set
    ``valid`` (``Dataset.hold_out_validation``, seeded with ``seed``); "official" takes
    binarized-mnist's own 10,000 validation images as ``valid`` instead (then none of
    them is in ``train``).
    """
    own = check_own_data_options(name, test=test, test_size=test_size, image_size=image_size,
                                 csv_columns=csv_columns, stream=stream, binarize=binarize,
                                 num_workers=num_workers)
    if binarize not in BINARIZE_MODES:
        raise DataError(f"unknown binarize mode {binarize!r}: choose one of {', '.join(BINARIZE_MODES)}")
    if include_valid and name != "binarized-mnist":
        raise DataError(f"include_valid applies only to binarized-mnist, which has a validation split, not {name!r}")
    if name != FROM_TENSORS:
        val_size = check_val_size(val_size, name, stream)
    if include_valid and val_size:
        raise DataError("include_valid trains on binarized-mnist's validation images, and "
                        "val_size holds a validation set out: give one of them, not both.")
    if name == FROM_TENSORS:
        raise DataError(
            f"dataset {FROM_TENSORS!r} names data passed in Python (Dataset.from_tensors), "
            f"which cannot be reloaded from disk: evaluate such a run in Python, "
            f"pyrovae.pipelines.evaluate_test_set(folder, vae, data), or save the data with "
            f"numpy.save and train on the file's path.")
    if name not in DATASETS:
        return load_own_data(check_dataset(name), binarize=binarize, seed=seed,
                             device=device, val_size=val_size, **own)
    if name in STATICALLY_BINARIZED and binarize == "dynamic":
        raise DataError(
            f"{name} is a fixed binarization of MNIST and has no grey values to resample, so "
            f"binarize='dynamic' is impossible: use binarize='none' or 'static' with it, or use "
            f"dataset 'mnist' with binarize='dynamic'"
        )

    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV) or None
    data_dir = None if data_dir is None else Path(data_dir).expanduser()
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()

    loader_options = {"include_valid": True} if include_valid else {}
    if val_size == OFFICIAL_VALIDATION:
        loader_options = {"valid": True}
    splits = DATASETS[name](data_dir, cache_dir, **loader_options)

    if name in STATICALLY_BINARIZED:
        binarize = "static"
        train, test = splits.train, splits.test
    else:
        train, test = _binarized(splits.train, splits.test, binarize, seed)
    data = Dataset(
        name=name,
        train=train,
        test=test,
        train_labels=splits.train_labels,
        test_labels=splits.test_labels,
        binarize=binarize,
        valid=splits.valid,  # a validation split of the data set's own: already binary
    )
    if val_size and val_size != OFFICIAL_VALIDATION:
        data = data.hold_out_validation(val_size, seed)
    return data.to(device)


def _binarized(train: torch.Tensor, test: torch.Tensor, binarize: str, seed: int):
    """The splits as ``binarize`` leaves them at load time (dynamic binarization of the
    training set happens batch by batch, in ``Dataset.train_batches``)."""
    if binarize not in BINARIZE_MODES:
        raise DataError(f"unknown binarize mode {binarize!r}: choose one of {', '.join(BINARIZE_MODES)}")
    if binarize in ("static", "dynamic"):
        for split, what in ((test, "test"), (train, "training")):
            if binarize == "static" or split is test:
                _check_grey(split, f"the {what} data, binarized with torch.bernoulli (binarize="
                                   f"{binarize!r}),")
    if binarize == "static":
        generator = torch.Generator(device=train.device).manual_seed(seed)
        return torch.bernoulli(train, generator=generator), torch.bernoulli(test, generator=generator)
    if binarize == "dynamic":
        generator = torch.Generator(device=test.device).manual_seed(seed)
        return train, torch.bernoulli(test, generator=generator)
    if binarize == "threshold":
        return _threshold(train), _threshold(test)
    return train, test


def _threshold(x: torch.Tensor) -> torch.Tensor:
    return (x > THRESHOLD).to(x.dtype)


# ---------------------------------------------------------------- the user's own data

_OWN_DATA_HINT = ("pyrovae reads your own data from a folder of PNG or JPEG images or a .npy, "
                  ".npz, .pt or .csv file (docs/datasets.md)")


def check_dataset(name) -> str:
    """A built-in data set's name as given, or an existing path made absolute; anything
    else is refused with the names, and the closest one for a typo."""
    if not isinstance(name, (str, os.PathLike)) or not str(name):
        raise DataError(f"dataset must be a data set name ({', '.join(DATASET_NAMES)}) or the "
                        f"path of your own data, got {name!r}.")
    name = os.fspath(name)
    if name in DATASETS or name == FROM_TENSORS:
        return name
    path = Path(name).expanduser()
    if path.exists():
        return str(path.resolve())
    if os.sep in name or path.suffix.lower() in OWN_DATA_SUFFIXES:
        raise DataError(f"no file or folder {name}: --dataset (dataset=) takes a data set name "
                        f"({', '.join(DATASET_NAMES)}) or the path of your own data; check the "
                        f"path.")
    close = difflib.get_close_matches(name, DATASET_NAMES, n=1)
    raise DataError(
        f"unknown dataset {name!r}: it is neither a data set name nor an existing file or "
        f"folder. Choose one of {', '.join(DATASET_NAMES)}"
        + (f" (did you mean {close[0]!r}?)" if close else "")
        + ", or give the path of your own data (docs/datasets.md).")


def check_own_data_options(dataset, *, test=None, test_size=None, image_size=None,
                           csv_columns=None, stream=None, binarize=None,
                           num_workers=None) -> dict:
    """Refuse, before any file is read, options that cannot apply to ``dataset``; return
    them checked (``image_size`` as [H, W], paths made absolute). The messages name the
    ``pyrovae train`` flags with the keyword arguments beside them."""
    given = {flag: value for flag, value in (
        ("--test (test=)", test), ("--test-size (test_size=)", test_size),
        ("--image-size (image_size=)", image_size), ("--csv-columns (csv_columns=)", csv_columns),
        ("--stream (stream=True)", stream or None),
        ("--num-workers (num_workers=)", num_workers)) if value is not None}
    if num_workers is not None and (isinstance(num_workers, bool)
                                    or not isinstance(num_workers, numbers.Integral)
                                    or num_workers < 0):
        raise DataError(f"--num-workers (num_workers=) must be a non-negative integer, got "
                        f"{num_workers!r}.")
    if isinstance(dataset, str) and (dataset in DATASETS or dataset == FROM_TENSORS):
        if given:
            raise DataError(
                f"{', '.join(given)} apply to your own data (a path given as --dataset), not "
                f"to the built-in {dataset}, which comes with its own test split and is held "
                f"in memory; leave them out.")
        return {}
    path = Path(check_dataset(dataset))
    if test is not None and test_size is not None:
        raise DataError("give the test set either as a file (--test, test=) or as a share of "
                        "the data (--test-size, test_size=), not both.")
    if test_size is not None:
        whole = isinstance(test_size, numbers.Integral) and not isinstance(test_size, bool)
        fraction = (isinstance(test_size, numbers.Real) and not whole
                    and not isinstance(test_size, bool) and 0 < test_size < 1)
        if not (whole and test_size >= 1) and not fraction:
            raise DataError(f"--test-size (test_size=) must be a fraction between 0 and 1 "
                            f"(0.1: a tenth of the data) or a count of at least 1 (500), got "
                            f"{test_size!r}.")
    if test is not None:
        test_path = Path(os.fspath(test)).expanduser()
        if not test_path.exists():
            raise DataError(f"no file or folder {test} for the test set (--test, test=); check "
                            f"the path.")
        test = str(test_path.resolve())
    if image_size is not None:
        sizes = [image_size] if isinstance(image_size, numbers.Integral) else image_size
        if isinstance(sizes, (str, bytes)) or not hasattr(sizes, "__len__") \
                or len(sizes) not in (1, 2) or not all(
                    isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 1
                    for n in sizes):
            raise DataError(f"--image-size (image_size=) takes one size for square images or "
                            f"two, height and width, each a positive integer; got "
                            f"{image_size!r}.")
        if not path.is_dir():
            raise DataError(f"--image-size (image_size=) resizes the images of a folder; "
                            f"{path} is a file. Leave it out, or resize the array yourself.")
        image_size = [int(sizes[0]), int(sizes[-1])]
    if csv_columns is not None:
        if path.suffix.lower() != ".csv":
            raise DataError(f"--csv-columns (csv_columns=) picks the columns of a .csv file; "
                            f"{path} is not one. Leave it out.")
        if isinstance(csv_columns, (str, bytes)) or not hasattr(csv_columns, "__len__") \
                or not csv_columns:
            raise DataError(f"--csv-columns (csv_columns=) takes a list of column names (or "
                            f"0-based numbers), got {csv_columns!r}.")
        csv_columns = [str(column) for column in csv_columns]
    if stream:
        if not (path.is_dir() or path.suffix.lower() == ".npy"):
            raise DataError(
                f"--stream (stream=True) reads a folder of images or a .npy file batch by batch; "
                f"{path.name} is loaded whole. Save the array with numpy.save as a .npy file to "
                f"stream it, or leave --stream out.")
        if binarize == "static":
            raise DataError(
                "--binarize static samples the whole training set once at load time, which a "
                "streamed training set never holds: use --binarize dynamic (resampled every "
                "batch) or threshold, or --no-stream (stream=False).")
    return {"test": test, "test_size": test_size, "image_size": image_size,
            "csv_columns": csv_columns, "stream": stream, "num_workers": num_workers}


def split_indices(count: int, test_size: float | int, seed: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of the training and of the test set, each in their original order: the
    test set is ``test_size`` rows (a fraction or a count) of a permutation seeded with
    ``seed``, so that the same seed gives the same split."""
    if isinstance(test_size, numbers.Integral) and not isinstance(test_size, bool):
        num_test = int(test_size)
    elif isinstance(test_size, numbers.Real) and not isinstance(test_size, bool) \
            and 0 < test_size < 1:
        num_test = max(1, round(test_size * count))
    else:
        raise DataError(f"test_size must be a fraction between 0 and 1 or a count of at least "
                        f"1, got {test_size!r}.")
    if not 1 <= num_test < count:
        raise DataError(
            f"a test set of {num_test} of the {count} datapoints leaves "
            f"{'no test set' if num_test < 1 else 'no training data'}: choose a smaller "
            f"--test-size (test_size=), or give the test set as a file with --test (test=).")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return order[num_test:].sort().values, order[:num_test].sort().values


def load_own_data(path, test=None, test_size=None, image_size=None, csv_columns=None,
                  binarize: str = "none", seed: int = 0, stream: bool | None = None,
                  num_workers: int | None = None, device: torch.device | str = "cpu",
                  val_size: int = 0) -> Dataset:
    """``load_dataset`` for the path of your own data (its arguments are documented there)."""
    options = check_own_data_options(path, test=test, test_size=test_size,
                                     image_size=image_size, csv_columns=csv_columns,
                                     stream=stream, binarize=binarize, num_workers=num_workers)
    path = Path(check_dataset(path))
    source = _open_source(path, options["image_size"], options["csv_columns"])
    if options["test"] is not None:
        test_source = _open_source(Path(options["test"]), options["image_size"],
                                   options["csv_columns"])
        if test_source.x_shape != source.x_shape:
            raise DataError(
                f"the test data {test_source.path} have shape {test_source.x_shape} per "
                f"datapoint, the training data {path} {source.x_shape}; give them the same "
                f"shape" + (" (--image-size resizes images)." if path.is_dir() else "."))
        train_rows, test_rows = torch.arange(source.count), torch.arange(test_source.count)
    else:
        test_source = source
        train_rows, test_rows = split_indices(
            source.count, DEFAULT_TEST_SIZE if test_size is None else options["test_size"], seed)
    if stream is None:
        stream = source.streamable and source.nbytes() > STREAM_THRESHOLD_BYTES
        if stream and (binarize == "static" or val_size):
            why = ("static binarization draws the whole training set at once"
                   if binarize == "static" else "a validation set is held out of it")
            log.info(f"{path.name} is above the streaming threshold, but {why}: it is held "
                     f"in memory")
            stream = False
    name = path.name
    val_size = check_val_size(val_size, name, stream, train_size=len(train_rows))
    test_x, test_labels = test_source.load(test_rows), test_source.labels_of(test_rows)
    if not stream:
        train, test_x = _binarized(source.load(train_rows), test_x, binarize, seed)
        data = Dataset(name=name, train=train, test=test_x,
                       train_labels=source.labels_of(train_rows), test_labels=test_labels,
                       binarize=binarize)
        return (data.hold_out_validation(val_size, seed) if val_size else data).to(device)
    _, test_x = _binarized(test_x[:0], test_x, binarize, seed)
    return StreamedDataset(
        name=name, train=source.items(train_rows, threshold=binarize == "threshold"),
        test=test_x, train_labels=source.labels_of(train_rows), test_labels=test_labels,
        binarize=binarize, num_workers=default_num_workers() if num_workers is None
        else num_workers).to(device)


def default_num_workers() -> int:
    """Loader processes for a streamed data set: the cores but one for the training
    process, at most 4 (a batch of small images decodes faster than a step takes)."""
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def _as_data(x, what: str) -> torch.Tensor:
    """A tensor of shape (N,) + x_shape with N >= 1: integers and booleans become float32,
    floating dtypes stay as they are."""
    if isinstance(x, np.ndarray) and not (np.issubdtype(x.dtype, np.number)
                                          or x.dtype == np.bool_):
        raise DataError(f"{what} has dtype {x.dtype}; pass numbers (an array of floats or "
                        f"integers).")
    try:
        x = torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as error:
        raise DataError(f"{what} cannot be made a tensor ({error}); pass a torch tensor or a "
                        f"numpy array of numbers.") from None
    if x.is_complex():
        raise DataError(f"{what} is complex ({x.dtype}); pass real numbers.")
    if x.dim() < 2:
        raise DataError(f"{what} has shape {tuple(x.shape)}; it needs shape (N, ...) with one "
                        f"datapoint per row, e.g. (N, D) for tabular data or (N, H, W) for "
                        f"images (reshape a single column with x.reshape(-1, 1)).")
    if len(x) == 0 or x.numel() == 0:
        raise DataError(f"{what} holds no datapoints (shape {tuple(x.shape)}).")
    if not torch.is_floating_point(x):
        x = x.to(torch.float32)
    elif x.dtype not in (torch.float32, torch.float64):
        x = x.to(torch.float32)
    return x


def _as_labels(labels, count: int, what: str) -> torch.Tensor | None:
    if labels is None:
        return None
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or len(labels) != count:
        raise DataError(f"{what} has shape {tuple(labels.shape)}; it needs one label per "
                        f"datapoint, shape ({count},).")
    return labels


def _check_same_shape(a: torch.Tensor, b: torch.Tensor, what_a: str, what_b: str) -> None:
    if a.shape[1:] != b.shape[1:]:
        raise DataError(f"{what_b} have shape {tuple(b.shape[1:])} per datapoint, {what_a} "
                        f"{tuple(a.shape[1:])}; give them the same shape.")


class _Source:
    """The user's data on disk: how many datapoints, their shape and labels, and rows of
    them as one float32 tensor (``load``) or, for a streamable source, as a
    ``torch.utils.data.Dataset`` that reads them on demand (``items``)."""

    streamable = False

    def __init__(self, path: Path):
        self.path = path
        self.labels: torch.Tensor | None = None
        self.count = 0
        self.x_shape: tuple[int, ...] = ()

    def nbytes(self) -> int:
        return self.count * math.prod(self.x_shape) * 4

    def load(self, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def labels_of(self, rows: torch.Tensor) -> torch.Tensor | None:
        return None if self.labels is None else self.labels[rows]

    def items(self, rows: torch.Tensor, threshold: bool) -> "_Items":
        raise NotImplementedError


class _TensorFile(_Source):
    """A .npz, .pt or .csv file, read whole."""

    def __init__(self, path: Path, values: torch.Tensor):
        super().__init__(path)
        self.values = _as_data(values, str(path))
        self.count, self.x_shape = len(self.values), tuple(self.values.shape[1:])

    def load(self, rows):
        return self.values[rows].to(torch.float32)


class _NpyFile(_Source):
    """A .npy file, opened with ``np.load(mmap_mode="r")``: only the rows asked for are read."""

    streamable = True

    def __init__(self, path: Path):
        super().__init__(path)
        array = _read_file(path, lambda: np.load(path, mmap_mode="r"))
        _check_array(array, path)
        self.count, self.x_shape = len(array), tuple(array.shape[1:])

    def load(self, rows):
        return _NpyItems(self.path, rows, self.x_shape, threshold=False).read(rows)

    def items(self, rows, threshold):
        return _NpyItems(self.path, rows, self.x_shape, threshold)


class _ImageFolder(_Source):
    """A folder of PNG or JPEG images, in subfolders too; subfolders directly under it
    are classes, as in torchvision's ``ImageFolder``, and give the labels.

    The headers are read first (PIL reads no pixels for them), so that an unreadable
    file and images of different sizes are named before any work; the pixels are
    decoded one image at a time, on demand (``_read_image``).
    """

    streamable = True

    def __init__(self, path: Path, image_size: list[int] | None):
        from PIL import Image, UnidentifiedImageError

        super().__init__(path)
        every = [p for p in path.rglob("*") if p.is_file()]
        files = sorted(p for p in every if p.suffix.lower() in IMAGE_SUFFIXES)
        ignored = len(every) - len(files)
        if not files:
            raise DataError(
                f"{path} holds no PNG or JPEG images (*.png, *.jpg, *.jpeg, looked for in its "
                f"subfolders too" + (f"; it holds {ignored} other files" if ignored else "")
                + "). Put the images there, or give a .npy, .npz, .pt or .csv file instead.")
        if ignored:
            log.info(f"{path}: {len(files)} images; {ignored} other files are not PNG or JPEG "
                     f"and are left out")
        sizes, colour = {}, False
        for file in files:
            try:
                with Image.open(file) as image:
                    sizes.setdefault((image.height, image.width), file)
                    colour = colour or image.mode not in _GREY_MODES
            except (OSError, UnidentifiedImageError) as error:
                raise DataError(f"{file} cannot be read as an image ({error}); remove or replace "
                                f"it.") from None
        if image_size is None and len(sizes) > 1:
            (size_a, file_a), (size_b, file_b) = list(sizes.items())[:2]
            raise DataError(
                f"the images in {path} differ in size: {file_a} is {size_a[0]}x{size_a[1]} and "
                f"{file_b} is {size_b[0]}x{size_b[1]} (height x width; {len(sizes)} sizes in "
                f"all). Pass --image-size H W (image_size=(H, W)) to resize them all.")
        size = tuple(image_size) if image_size is not None else next(iter(sizes))
        self.files = [str(file) for file in files]
        self.grey, self.size = not colour, size
        self.count = len(files)
        self.x_shape = size if self.grey else (3, *size)
        parts = [file.relative_to(path).parts for file in files]
        if all(len(p) > 1 for p in parts):
            classes = sorted({p[0] for p in parts})
            self.classes = classes
            self.labels = torch.tensor([classes.index(p[0]) for p in parts])

    def load(self, rows):
        return self.items(rows, threshold=False).read(rows)

    def items(self, rows, threshold):
        return _ImageItems(self.files, rows, self.x_shape, threshold, self.grey, self.size)


def _read_csv(path: Path, columns: list[str] | None) -> torch.Tensor:
    """A CSV file of numbers, through pandas: a header line is optional (a first line
    that is all numbers is data); every value must be a finite number."""
    import pandas as pd

    def read(**kwargs):
        try:
            return pd.read_csv(path, **kwargs)
        except pd.errors.EmptyDataError:
            raise DataError(f"{path} is empty; it needs rows of numbers, one datapoint per "
                            f"line.") from None
        except (pd.errors.ParserError, UnicodeDecodeError) as error:
            raise DataError(f"{path} cannot be read as CSV ({str(error).strip()}); save it as "
                            f"comma-separated numbers, one datapoint per line.") from None

    first = _read_file(path, lambda: read(header=None, nrows=1))
    headerless = bool(pd.to_numeric(first.iloc[0], errors="coerce").notna().all())
    frame = read(header=None) if headerless else read()
    first_line = 1 if headerless else 2  # the file's line of the frame's first row
    if columns is not None:
        names = [str(c) for c in frame.columns]
        chosen = []
        for column in columns:
            if column in names:
                chosen.append(frame.columns[names.index(column)])
            elif column.isdigit() and int(column) < len(names):
                chosen.append(frame.columns[int(column)])
            else:
                raise DataError(f"{path} has no column {column!r}; its columns are "
                                f"{', '.join(names)} (--csv-columns takes their names or "
                                f"0-based numbers).")
        frame = frame[chosen]
    if frame.empty:
        raise DataError(f"{path} has a header line but no rows of data; it needs rows of "
                        f"numbers, one datapoint per line.")
    text = [c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])
            or pd.api.types.is_bool_dtype(frame[c])]
    if text:
        column = text[0]
        not_numbers = pd.to_numeric(frame[column], errors="coerce").isna().to_numpy()
        row = int(not_numbers.nonzero()[0][0]) if not_numbers.any() else 0
        raise DataError(
            f"{path}: column{'s' if len(text) > 1 else ''} "
            f"{', '.join(repr(str(c)) for c in text)} "
            f"{'are' if len(text) > 1 else 'is'} not numeric (e.g. {frame[column].iloc[row]!r} "
            f"in line {row + first_line}, column {str(column)!r}). Pick the numeric columns "
            f"with --csv-columns NAME ... (csv_columns=[...]), or encode the others as numbers.")
    values = frame.to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        row, col = (int(i[0]) for i in bad.nonzero())
        raise DataError(
            f"{path} holds {int(bad.sum())} missing, NaN or infinite values (the first in line "
            f"{row + first_line}, column {str(frame.columns[col])!r}); remove or impute them "
            f"before training.")
    return torch.from_numpy(values.astype(np.float32))


def _read_file(path: Path, read):
    """``read()``, with an unreadable file named."""
    try:
        return read()
    except OSError as error:
        raise DataError(f"{path} cannot be read ({error.strerror or error}); check the path "
                        f"and its permissions.") from None
    except (ValueError, RuntimeError, EOFError) as error:
        raise DataError(f"{path} cannot be read as {path.suffix} data ({error}); write it again "
                        f"(numpy.save, numpy.savez or torch.save of one array).") from None


def _check_array(array, path: Path) -> None:
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_) \
            or np.issubdtype(array.dtype, np.complexfloating):
        raise DataError(f"{path} holds an array of dtype {array.dtype}; it needs real numbers "
                        f"(floats, integers or booleans).")
    if array.ndim < 2 or array.shape[0] == 0 or array.size == 0:
        raise DataError(f"{path} holds an array of shape {array.shape}; it needs shape (N, ...) "
                        f"with N >= 1 datapoints, e.g. (N, D) or (N, H, W).")


def _open_source(path: Path, image_size, csv_columns) -> _Source:
    if path.is_dir():
        return _ImageFolder(path, image_size)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return _NpyFile(path)
    if suffix == ".npz":
        def read_npz():
            with np.load(path) as archive:
                if len(archive.files) != 1:
                    raise DataError(
                        f"{path} holds {len(archive.files)} arrays ({', '.join(archive.files)}); "
                        f"pyrovae reads one array per file: save the training data and the test "
                        f"data in files of their own and pass the test file with --test (test=).")
                return archive[archive.files[0]]
        return _TensorFile(path, _read_file(path, read_npz))
    if suffix == ".pt":
        value = _read_file(path, lambda: torch.load(path, map_location="cpu", weights_only=True))
        if not isinstance(value, torch.Tensor):
            raise DataError(f"{path} holds a {type(value).__name__}, not a tensor; save one "
                            f"tensor per file (torch.save(x, path)) and pass the test data with "
                            f"--test (test=).")
        return _TensorFile(path, value)
    if suffix == ".csv":
        return _TensorFile(path, _read_csv(path, csv_columns))
    raise DataError(f"{path}: {_OWN_DATA_HINT}; convert it to one of these.")


class _Items(torch.utils.data.Dataset):
    """Rows of the user's data, read on demand: what the streaming ``DataLoader`` loads,
    in its worker processes. ``__getitems__`` reads a whole batch at once."""

    def __init__(self, rows: torch.Tensor, x_shape: tuple[int, ...], threshold: bool):
        self.rows = rows.numpy().astype(np.int64)
        self.x_shape = tuple(x_shape)
        self.threshold = threshold

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, positions) -> torch.Tensor:
        x = self.read(self.rows[np.asarray(positions, dtype=np.int64)])
        return _threshold(x) if self.threshold else x

    def __getitem__(self, position: int) -> torch.Tensor:
        return self.__getitems__([position])[0]

    def read(self, rows) -> torch.Tensor:
        raise NotImplementedError


class _NpyItems(_Items):
    def __init__(self, path: Path, rows, x_shape, threshold):
        super().__init__(rows, x_shape, threshold)
        self.path = str(path)
        self._array = None  # memory-mapped anew in each process that reads it

    def __getstate__(self):
        return {**self.__dict__, "_array": None}

    def read(self, rows) -> torch.Tensor:
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        rows = np.asarray(rows, dtype=np.int64)
        return torch.from_numpy(np.array(self._array[rows], dtype=np.float32)).reshape(
            (len(rows),) + self.x_shape)


class _ImageItems(_Items):
    def __init__(self, files: list[str], rows, x_shape, threshold, grey: bool,
                 size: tuple[int, int]):
        super().__init__(rows, x_shape, threshold)
        self.files, self.grey, self.size = files, grey, tuple(size)

    def read(self, rows) -> torch.Tensor:
        images = [_read_image(self.files[int(i)], self.grey, self.size) for i in rows]
        return torch.stack(images) if images else torch.empty((0,) + self.x_shape)


def _read_image(path: str, grey: bool, size: tuple[int, int]) -> torch.Tensor:
    """One image as float32 values in [0, 1] (8-bit values divided by 255, 16-bit grey ones
    by 65535), of shape (H, W) if grey, else (3, H, W); alpha is dropped, and the image
    is resized (antialiased, by torchvision) where its size is not ``size``.

    Decoded by PIL, as torchvision's ``ImageFolder`` does by default (torchvision's own
    ``decode_image`` is deprecated since torchvision 0.29)."""
    from PIL import Image
    from torchvision.transforms.v2.functional import resize

    try:
        with Image.open(path) as image:
            if image.mode in ("I", "F") or image.mode.startswith("I;16"):  # 16-bit grey
                x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 65535)[None]
                x = x if grey else x.expand(3, -1, -1)
            else:
                pixels = np.asarray(image.convert("L" if grey else "RGB"))
                x = torch.from_numpy(pixels.copy()).to(torch.float32) / 255
                x = x[None] if grey else x.permute(2, 0, 1)
    except OSError as error:
        raise DataError(f"{path} cannot be decoded as an image ({error}); remove or replace "
                        f"it.") from None
    if tuple(x.shape[-2:]) != tuple(size):
        x = resize(x, list(size), antialias=True)
    return x[0] if grey else x.contiguous()


def _stack_batch(batch) -> torch.Tensor:
    """The streaming loader's collate function: ``_Items.__getitems__`` returns the batch
    whole already."""
    return batch if isinstance(batch, torch.Tensor) else torch.stack(batch)


@dataclass
class StreamedDataset(Dataset):
    """A ``Dataset`` whose training set stays on disk: ``train`` is a
    ``torch.utils.data.Dataset`` of its rows, and each epoch's batches are read by a
    ``torch.utils.data.DataLoader`` with ``num_workers`` processes (into pinned memory
    when the batches go to a GPU). The test set is held in memory.

    The epoch's order, the blocks of data-parallel ranks and the dynamic binarization
    come from the same generator calls as in ``Dataset``, so both give the same batches.
    """

    num_workers: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    streamed: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.binarize not in BINARIZE_MODES:
            raise DataError(
                f"unknown binarize mode {self.binarize!r}: choose one of {', '.join(BINARIZE_MODES)}")
        if self.binarize == "static":
            raise DataError("a streamed training set cannot be binarized once at load time "
                            "(binarize='static'): use 'dynamic' or 'threshold'.")
        # the grey values of dynamic binarization are checked batch by batch as they arrive

    @property
    def x_shape(self) -> tuple[int, ...]:
        return self.train.x_shape

    @property
    def _batch_device(self) -> torch.device:
        return self.device

    def to(self, device: torch.device | str) -> StreamedDataset:
        def move(tensor):
            return None if tensor is None else tensor.to(device)

        return dataclasses.replace(self, test=move(self.test), train_labels=move(self.train_labels),
                                   test_labels=move(self.test_labels), device=torch.device(device))

    def train_batches(self, batch_size, generator=None, shuffle=True, shard=None):
        order = self._epoch_order(batch_size, generator, shuffle)
        order = torch.arange(len(self.train)) if order is None else order.cpu()
        blocks = list(_batch_rows(len(self.train), batch_size, shard))
        positions = [order[start + low : start + high].tolist()
                     for start, _, low, high in blocks]
        # the loader draws a seed for its workers when it starts: from a generator of its
        # own, not from the global one, whose Monte Carlo stream must stay the tensor path's
        # (the workers draw nothing)
        loader = torch.utils.data.DataLoader(
            self.train, batch_sampler=positions, num_workers=self.num_workers,
            collate_fn=_stack_batch, pin_memory=self.device.type == "cuda",
            generator=torch.Generator())
        for (_, size, low, _), grey in zip(blocks, loader):
            batch = grey.to(self.device, non_blocking=True)
            if self.binarize == "dynamic":
                _check_grey(batch, f"a training batch of {self.name}")
            yield self._binarized_batch(batch, generator, size, low)

    def random_batch(self, batch_size, generator):
        # read in this process: a DataLoader's workers for one batch cost more than it
        order = self._epoch_order(batch_size, generator, True).cpu()
        size = min(batch_size, len(self.train))
        batch = self.train.__getitems__(order[:size].tolist()).to(self.device)
        if self.binarize == "dynamic":
            _check_grey(batch, f"a training batch of {self.name}")
        return self._binarized_batch(batch, generator, size, 0)

    def head(self, n: int = INITIALIZATION_ROWS) -> torch.Tensor:
        """The first ``n`` training datapoints (in file order), read into memory."""
        return self.train.__getitems__(list(range(min(n, len(self.train)))))
