"""The run folder: its file names, its two configs, and every read and write of its files.

A run folder holds ``config.json`` (``{"model": ModelConfig, "training":
TrainConfig}``), ``checkpoint.pt`` (the model's ``state_dict`` under
``"model"``, and for a training run the optimizer, epoch and RNG states),
``metrics.json`` (one entry per epoch), with ``--tensorboard`` the folder
``tensorboard/`` of event files, and, once evaluated, ``evaluation.json``.
This module is the only one that names or opens these files; writes are
atomic, so a crash mid-write leaves the previous file whole.
The figures are the plotting module's (``pyrovae.plots``).

It sits at the bottom of the package: it knows the file formats, not the
VAE or the data (``pyrovae.vae.load_run`` puts them together).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import numbers
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pyrovae.atomic import atomic_torch_save, atomic_write_json
from pyrovae.data import (
    DATASET_NAMES,
    DEFAULT_TEST_SIZE,
    FROM_TENSORS,
    STATICALLY_BINARIZED,
    check_dataset,
    check_own_data_options,
    check_val_size,
    indexed_device,
)
from pyrovae.errors import PyrovaeError

CONFIG_FILE = "config.json"
CHECKPOINT_FILE = "checkpoint.pt"
BEST_CHECKPOINT_FILE = "best.pt"  # with a validation set: the best validation ELBO's weights
CHECKPOINTS = {"last": CHECKPOINT_FILE, "best": BEST_CHECKPOINT_FILE}  # by ``which=``
METRICS_FILE = "metrics.json"
EVALUATION_FILE = "evaluation.json"
AIS_FILE = "evaluation_ais.json"
BDMC_FILE = "bdmc.json"
TENSORBOARD_DIR = "tensorboard"  # --tensorboard: the event files of torch's SummaryWriter


@dataclass
class ModelConfig:
    """How to rebuild a VAE: its shapes, families (registered name plus settings, or
    ``{"name": ..., "custom": True}``) and networks. The defaults are the package's
    (the CLI reads them from here)."""

    x_shape: tuple = ()
    z_dim: int | tuple = 20  # a list of sizes for several stochastic layers, data upward
    prior: dict = field(default_factory=lambda: {"name": "normal"})
    guide: dict = field(default_factory=lambda: {"name": "normal"})
    likelihood: dict = field(default_factory=lambda: {"name": "bernoulli"})
    hidden: tuple = (400,)  # several stochastic layers: one list per layer's block
    activation: str = "softplus"
    encoder: str = "mlp"
    decoder: str = "mlp"
    network: str = "mlp"  # the encoder's and decoder's kind: "mlp" or "conv"
    channels: tuple | None = None  # the conv network's channel widths, as resolved
    # several stochastic layers: the families of p(z_l | z_l+1) and q(z_l+1 | z_l)
    layer_prior: dict | None = None
    layer_guide: dict | None = None
    arch: str | None = None  # the named architecture the sizes started from

    def to_dict(self) -> dict:
        config = dataclasses.asdict(self)
        config["x_shape"] = list(self.x_shape)
        config["hidden"] = [list(n) if isinstance(n, (list, tuple)) else n for n in self.hidden]
        for key in ("z_dim", "channels"):
            if isinstance(getattr(self, key), (list, tuple)):
                config[key] = list(getattr(self, key))
        return config

    @classmethod
    def from_dict(cls, config: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise PyrovaeError(f"the model config has unknown keys {unknown}; it was not written "
                               f"by this version of pyrovae.")
        values = dict(config)
        for key in ("x_shape", "hidden", "z_dim", "channels"):
            if isinstance(values.get(key), list):
                values[key] = tuple(tuple(n) if isinstance(n, list) else n for n in values[key])
        return cls(**values)


DIGITS_BATCH_SIZE = 32

LR_SCHEDULES = ("constant", "burda", "step", "cosine")
# Burda, Grosse & Salakhutdinov (2016): the learning rate lr * 10**(-i/7) for 3**i epochs,
# i = 0 ... 7, which is 3280 epochs in all
BURDA_STAGES = 8
BURDA_EPOCHS = sum(3**i for i in range(BURDA_STAGES))
DEFAULT_LR_GAMMA = 0.1
DEFAULT_IWAE_SAMPLES = 50


@dataclass
class TrainConfig:
    """How a VAE is trained; saved as the ``"training"`` part of config.json."""

    dataset: str = "digits"
    data_dir: str | None = None
    binarize: str | None = None  # None: "dynamic" for a bernoulli likelihood, else "none"
    elbo: str = "trace"
    num_particles: int = 1
    epochs: int = 100
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    device: str = "auto"
    estimator: str = "reparam"
    beta: float = 1.0
    kl_anneal: int = 0            # epochs over which the KL weight rises to beta; 0: none
    kl_anneal_start: float = 0.0
    free_bits: float = 0.0        # nats per latent dimension
    aggressive: bool = False
    aggressive_patience: int = 5  # epochs without a new highest mutual information
    jit: bool = True              # compile the step where the objective allows it
    # your own data (docs/datasets.md), where ``dataset`` is its absolute path
    test_data: str | None = None  # --test: the test set's file or folder
    test_size: float | int | None = None  # --test-size: a fraction or a count (seeded split)
    image_size: list | None = None  # --image-size, as [height, width]
    csv_columns: list | None = None  # --csv-columns: names or 0-based numbers
    stream: bool | None = None    # --stream/--no-stream; None: by size (STREAM_THRESHOLD_BYTES)
    num_workers: int | None = None  # --num-workers of the streaming loader; None: the default
    tensorboard: bool = False     # --tensorboard: metrics and image grids in RUN/tensorboard
    # --val-size: training images held out as a validation set (seeded), or "official"
    # (binarized-mnist's own 10,000 validation images); 0: none. With one, the trainer
    # reports the validation ELBO per epoch and keeps the best epoch's weights in best.pt
    val_size: int | str = 0
    lr_schedule: str = "constant"  # --lr-schedule: LR_SCHEDULES, applied per epoch
    lr_step: int | None = None    # --lr-step: the step schedule's epochs between decays
    lr_gamma: float = DEFAULT_LR_GAMMA  # --lr-gamma: the step schedule's factor per decay
    lr_min: float = 0.0           # --lr-min: where the cosine schedule ends
    iwae_every: int = 0           # --iwae-every: the test IWAE bound every this many epochs
    iwae_samples: int = DEFAULT_IWAE_SAMPLES  # --iwae-samples: its importance samples K
    # --diagnostics-every: the collapse diagnostics every this many epochs and in the last;
    # on MNIST's test set they take 0.6 s on 2 CPU cores, a quarter of a Burda epoch's steps
    # (benchmarks/epoch_extras.py)
    diagnostics_every: int = 1
    # --time-budget: stop after the epoch in which the training steps' time (train_seconds,
    # carried across --resume) reaches this many seconds; None: train every epoch
    time_budget: float | None = None

    @property
    def kl_weighted(self) -> bool:
        return self.beta != 1 or self.kl_anneal > 0 or self.free_bits > 0

    def beta_at(self, epoch: int) -> float:
        """The KL weight in ``epoch`` (from 1): linear from kl_anneal_start in epoch 1
        to beta in epoch kl_anneal + 1, then constant."""
        if self.kl_anneal <= 0:
            return self.beta
        progress = min(1.0, (epoch - 1) / self.kl_anneal)
        return self.kl_anneal_start + (self.beta - self.kl_anneal_start) * progress

    def validate(self) -> "TrainConfig":
        """Refuse a setting out of its range, before any data is loaded or step taken.

        The one place where the training values are checked (the CLI calls it
        before loading the data, the Trainer when it is built); the messages use
        the flags of ``pyrovae train``. Returns the config, checked.
        """
        for flag, key in (("--epochs", "epochs"), ("--batch-size", "batch_size"),
                          ("--num-particles", "num_particles"),
                          ("--aggressive-patience", "aggressive_patience")):
            _check_int(flag, getattr(self, key), minimum=1)
        _check_int("--kl-anneal", self.kl_anneal, minimum=0)
        _check_int("--seed", self.seed, minimum=0, maximum=2**32 - 1)  # numpy's seed range
        _check_real("--lr", self.lr, positive=True)
        for flag, key in (("--beta", "beta"), ("--kl-anneal-start", "kl_anneal_start"),
                          ("--free-bits", "free_bits")):
            _check_real(flag, getattr(self, key), positive=False)
        if self.binarize == "dynamic" and self.dataset in STATICALLY_BINARIZED:
            raise PyrovaeError(
                f"--binarize dynamic cannot apply to {self.dataset}: it is a fixed binarization "
                f"of MNIST, with no grey values to resample. Leave --binarize out (or use "
                f"--binarize static) with it, or use --dataset mnist --binarize dynamic.")
        # a typo of a data set's name, or a path that does not exist, is named here
        self.dataset = check_dataset(self.dataset)
        own = check_own_data_options(
            self.dataset, test=self.test_data, test_size=self.test_size,
            image_size=self.image_size, csv_columns=self.csv_columns, stream=self.stream,
            binarize=self.binarize, num_workers=self.num_workers)
        if own:
            self.test_data, self.image_size = own["test"], own["image_size"]
            self.csv_columns = own["csv_columns"]
            if self.test_data is None and self.test_size is None:
                self.test_size = DEFAULT_TEST_SIZE  # saved, so that the split stays the run's
        self.val_size = check_val_size(self.val_size, self.dataset)
        self._check_lr_schedule()
        _check_int("--iwae-every", self.iwae_every, minimum=0)
        _check_int("--iwae-samples", self.iwae_samples, minimum=1)
        _check_int("--diagnostics-every", self.diagnostics_every, minimum=1)
        if self.aggressive and self.diagnostics_every != 1:
            raise PyrovaeError(
                f"--aggressive decides after every epoch from I(x; z), which --diagnostics-every "
                f"{self.diagnostics_every} computes only every {self.diagnostics_every} epochs. "
                f"Leave --diagnostics-every out with --aggressive.")
        if self.time_budget is not None:
            _check_real("--time-budget", self.time_budget, positive=True)
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise PyrovaeError(
                "--tensorboard needs the tensorboard package, which is not installed: "
                "pip install 'pyrovae[tensorboard]' (or pip install tensorboard), or leave "
                "--tensorboard out.")
        return self

    def _check_lr_schedule(self) -> None:
        """The schedule's name, its own settings in range, and no setting of another
        schedule (which would be silently ignored)."""
        if self.lr_schedule not in LR_SCHEDULES:
            raise PyrovaeError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got "
                               f"{self.lr_schedule!r}.")
        schedule = self.lr_schedule
        for flag, given, owner in (("--lr-step", self.lr_step is not None, "step"),
                                   ("--lr-gamma", self.lr_gamma != DEFAULT_LR_GAMMA, "step"),
                                   ("--lr-min", self.lr_min != 0, "cosine")):
            if given and schedule != owner:
                raise PyrovaeError(f"{flag} sets the {owner} schedule, but --lr-schedule is "
                                   f"{schedule}: add --lr-schedule {owner}, or leave {flag} out.")
        if schedule == "step":
            if self.lr_step is None:
                raise PyrovaeError("--lr-schedule step needs --lr-step N: the epochs between "
                                   "two decays of the learning rate by --lr-gamma.")
            _check_int("--lr-step", self.lr_step, minimum=1)
            _check_real("--lr-gamma", self.lr_gamma, positive=True)
            if self.lr_gamma > 1:
                raise PyrovaeError(f"--lr-gamma must be at most 1 (a decay; 0.1 divides the "
                                   f"learning rate by 10), got {self.lr_gamma!r}.")
        if schedule == "cosine":
            _check_real("--lr-min", self.lr_min, positive=False)
            if self.lr_min >= self.lr:
                raise PyrovaeError(f"--lr-min ({self.lr_min!r}) must be below --lr "
                                   f"({self.lr!r}): the cosine schedule decays from --lr to "
                                   f"--lr-min.")
        if schedule == "burda" and self.epochs > BURDA_EPOCHS:
            raise PyrovaeError(
                f"--lr-schedule burda ends after {BURDA_EPOCHS} epochs (3**i epochs at "
                f"lr * 10**(-i/7), i = 0 ... 7), got --epochs {self.epochs}: give at most "
                f"{BURDA_EPOCHS}, or leave --epochs out for the whole schedule.")

    def data_options(self) -> dict:
        """The ``load_dataset`` keywords of this run's own data, and of its validation
        split (``val_size``) where it has one; none for a built-in set without one."""
        held_out = {"val_size": self.val_size} if self.val_size else {}
        if self.dataset in DATASET_NAMES or self.dataset == FROM_TENSORS:
            return held_out
        return {"test": self.test_data, "test_size": self.test_size,
                "image_size": self.image_size, "csv_columns": self.csv_columns,
                "stream": self.stream, "num_workers": self.num_workers, **held_out}

    def resolved_binarize(self, likelihood: str) -> str:
        """``binarize`` as given, else the default: for a data set that is already
        binary (binarized-mnist), "static", the binarization it has; for the 8x8
        digits with a bernoulli likelihood, "threshold", as Bernoulli samples of
        so few pixels are noise (docs/getting-started.md); else "dynamic" for a
        bernoulli likelihood and "none" for the others."""
        if self.binarize is not None:
            return self.binarize
        if self.dataset in STATICALLY_BINARIZED:
            return "static"
        if self.dataset == "digits" and likelihood == "bernoulli":
            return "threshold"
        return "dynamic" if likelihood == "bernoulli" else "none"

    @staticmethod
    def default_batch_size(dataset: str) -> int:
        """128, or 32 for the 1,500 digits, which would get only 12 steps an epoch."""
        return DIGITS_BATCH_SIZE if dataset == "digits" else TrainConfig.batch_size


def _check_int(flag: str, value, minimum: int, maximum: int | None = None) -> None:
    """An integer (not a bool, not a float such as 2.5) in [minimum, maximum]."""
    whole = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not whole or value < minimum or (maximum is not None and value > maximum):
        what = {0: "a non-negative integer", 1: "a positive integer"}.get(
            minimum, f"an integer of at least {minimum}")
        if maximum is not None:
            what += " below 2**32" if maximum == 2**32 - 1 else f" up to {maximum}"
        raise PyrovaeError(f"{flag} must be {what}, got {value!r}.")


def _check_real(flag: str, value, positive: bool) -> None:
    """A finite number (not a bool, not a string), above 0 or at least 0."""
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not real or not math.isfinite(value) or value < 0 or (positive and value == 0):
        what = "a positive finite number" if positive else "a finite number of at least 0"
        raise PyrovaeError(f"{flag} must be {what}, got {value!r}.")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PyrovaeError("--device cuda was asked for, but torch sees no CUDA device; "
                           "use --device cpu (or auto).")
    if name != "cpu" and not name.startswith("cuda"):
        raise PyrovaeError(f"unknown device {name!r}; use cpu, cuda or auto.")
    return indexed_device(torch.device(name))


# ---------------------------------------------------------------- reading and writing


def read_json(path: Path):
    """A JSON file of a run folder; a damaged one is named, with what to do."""
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PyrovaeError(
            f"{path} is not valid JSON ({error}): the file is damaged or was edited by hand. "
            f"Restore it from a copy, or train the run again into a new --out.") from None


def read_config(folder) -> dict:
    """config.json of a run folder or of a saved VAE: ``{"model": ..., ["training": ...]}``."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise PyrovaeError(f"{folder} holds no {CONFIG_FILE}: pass the folder of a run written "
                           f"by pyrovae train (or by VAE.save).")
    return read_json(path)


def read_train_config(folder) -> TrainConfig:
    config = read_config(folder)
    path = Path(folder) / CONFIG_FILE
    if not isinstance(config, dict) or not isinstance(config.get("training"), dict):
        raise PyrovaeError(f"{path} has no \"training\" section: it holds a VAE saved with "
                           f"VAE.save, not a training run; load it with VAE.load.")
    try:
        return TrainConfig(**config["training"])
    except TypeError as error:
        raise PyrovaeError(f"{path}: its \"training\" section does not fit this version of "
                           f"pyrovae ({error}); train the run again into a new --out.") from None


def write_config(folder, model: dict, training: TrainConfig | None = None) -> None:
    """config.json: the model config, and the training config of a training run (a
    VAE saved into a run folder keeps the run's training config)."""
    path = Path(folder) / CONFIG_FILE
    config = read_json(path) if training is None and path.is_file() else {}
    config["model"] = model
    if training is not None:
        config["training"] = dataclasses.asdict(training)
    atomic_write_json(path, config)


def read_checkpoint(folder, map_location="cpu", which: str = "last") -> dict:
    """checkpoint.pt (``which="last"``), or best.pt (``which="best"``: the weights of the
    epoch with the best validation ELBO); a missing, truncated or foreign file is
    named, with what to do.

    Only tensors and plain containers are read (``weights_only=True``): a
    checkpoint is data, and loading it must never run code.
    """
    path = checkpoint_path(folder, which)
    if not path.is_file() and which == "best":
        raise PyrovaeError(
            f"{folder} holds no {BEST_CHECKPOINT_FILE}: only a run trained with a validation "
            f"set (pyrovae train --val-size N) keeps the best epoch's weights. Use the last "
            f"checkpoint (--checkpoint last), or train with --val-size.")
    if not path.is_file():
        raise PyrovaeError(f"{folder} holds no {CHECKPOINT_FILE}: pass the folder of a run "
                           f"written by pyrovae train (or by VAE.save).")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001  (torch raises many kinds for a bad file)
        raise PyrovaeError(
            # torch's own text is left out: for a damaged file it suggests loading with
            # weights_only=False, which would run whatever code the file holds
            f"{path} cannot be read as a pyrovae checkpoint ({type(error).__name__}): it is "
            f"truncated or damaged. Restore it from a copy, or train the run again into a new "
            f"--out."
        ) from None
    if not isinstance(state, dict) or "model" not in state:
        raise PyrovaeError(f"{path} is not a pyrovae checkpoint (it has no \"model\" entry); "
                           f"pass the folder of a run written by pyrovae train.")
    return state


def write_checkpoint(folder, state: dict, which: str = "last") -> None:
    """checkpoint.pt: ``state["model"]`` is the VAE's state_dict; a training run adds
    ``optimizer``, ``epoch``, ``interrupted_at_step``, ``rng`` and ``aggressive``.
    best.pt (``which="best"``): ``model``, ``epoch`` and ``val_elbo``."""
    atomic_torch_save(state, checkpoint_path(folder, which))


def checkpoint_path(folder, which: str = "last") -> Path:
    if which not in CHECKPOINTS:
        raise PyrovaeError(f"unknown checkpoint {which!r}: use 'last' (checkpoint.pt, the end "
                           f"of training) or 'best' (best.pt, the best validation ELBO).")
    return Path(folder) / CHECKPOINTS[which]


def read_metrics(folder) -> list[dict]:
    path = Path(folder) / METRICS_FILE
    return read_json(path) if path.is_file() else []


def write_metrics(folder, metrics: list[dict]) -> None:
    atomic_write_json(Path(folder) / METRICS_FILE, metrics)


def write_evaluation(folder, summary: dict, name: str = EVALUATION_FILE) -> None:
    """evaluation.json (or ``AIS_FILE``, ``BDMC_FILE``); strict JSON has no NaN or
    infinity, so they are written as null, in the per-datapoint lists too."""
    if name not in (EVALUATION_FILE, AIS_FILE, BDMC_FILE):
        raise ValueError(f"{name} is not an evaluation file of the run folder")

    def strict(value):
        if isinstance(value, list):
            return [strict(item) for item in value]
        return None if isinstance(value, float) and not math.isfinite(value) else value

    atomic_write_json(Path(folder) / name, {key: strict(value) for key, value in summary.items()})


def holds_run(folder) -> bool:
    return (Path(folder) / CHECKPOINT_FILE).exists()


def check_writable(folder, create: bool = False) -> None:
    """Refuse, before any work, a folder that is a file or cannot be written.

    Tried by writing a file, not by ``os.access``, which says yes to root on a
    read-only file system.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise PyrovaeError(f"{folder} is a file, not a folder; choose another --out.")
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".pyrovae-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise PyrovaeError(
            f"cannot write into {folder} ({error.strerror or error}); choose a folder you can "
            f"write with --out, or make this one writable.") from None


def claim_folder(folder, overwrite: bool = False) -> None:
    """Make ``folder`` the home of a new run: created if missing, refused if it holds
    anything, so that no file of the user's or of an earlier run is replaced or left
    beside the new one. ``overwrite`` clears an earlier pyrovae run first; a folder
    with other files is never cleared."""
    folder = Path(folder)
    if folder.is_dir() and any(folder.iterdir()):
        if not overwrite:
            what = ("a run" if holds_run(folder) or (folder / CONFIG_FILE).is_file()
                    else "files")
            raise PyrovaeError(
                f"{folder} already holds {what}; nothing was overwritten. Pass --resume to "
                f"continue a run, --overwrite to replace an earlier run, or choose another "
                f"--out.")
        if not is_run_folder(folder):
            raise PyrovaeError(
                f"{folder} holds files that pyrovae did not write, so --overwrite leaves it "
                f"alone; choose another --out.")
        shutil.rmtree(folder)
    check_writable(folder, create=True)


def is_run_folder(folder) -> bool:
    """Whether every file in ``folder`` is one a pyrovae run writes."""
    from_figures = {".png"}
    own = {CONFIG_FILE, CHECKPOINT_FILE, BEST_CHECKPOINT_FILE, METRICS_FILE, EVALUATION_FILE,
           AIS_FILE, BDMC_FILE}
    for path in Path(folder).iterdir():
        if path.is_dir() and path.name == TENSORBOARD_DIR:
            continue
        if path.is_dir() or (path.name not in own and path.suffix not in from_figures):
            return False
    try:
        return "training" in read_config(folder)
    except PyrovaeError:
        return False
