"""The run folder: its file names, its two configs, and every read and write of its files.

A run folder holds ``config.json`` (``{"model": ModelConfig, "training":
TrainConfig}``), ``checkpoint.pt`` (the model's ``state_dict`` under
``"model"``, and for a training run the optimizer, epoch and RNG states),
``metrics.json`` (one entry per epoch) and, once evaluated,
``evaluation.json``. This module is the only one that names or opens these
files; writes are atomic, so a crash mid-write leaves the previous file whole.
The figures are the plotting module's (``pyrovae.plots``).

It sits at the bottom of the package: it knows the file formats, not the
VAE or the data (``pyrovae.vae.load_run`` puts them together).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pyrovae.atomic import atomic_torch_save, atomic_write_json
from pyrovae.errors import PyrovaeError

CONFIG_FILE = "config.json"
CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.json"
EVALUATION_FILE = "evaluation.json"


@dataclass
class ModelConfig:
    """How to rebuild a VAE: its shapes, families (registered name plus settings, or
    ``{"name": ..., "custom": True}``) and networks. The defaults are the package's
    (the CLI reads them from here)."""

    x_shape: tuple = ()
    z_dim: int = 20
    prior: dict = field(default_factory=lambda: {"name": "normal"})
    guide: dict = field(default_factory=lambda: {"name": "normal"})
    likelihood: dict = field(default_factory=lambda: {"name": "bernoulli"})
    hidden: tuple = (400,)
    activation: str = "softplus"
    encoder: str = "mlp"
    decoder: str = "mlp"

    def to_dict(self) -> dict:
        config = dataclasses.asdict(self)
        config["x_shape"], config["hidden"] = list(self.x_shape), list(self.hidden)
        return config

    @classmethod
    def from_dict(cls, config: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise PyrovaeError(f"the model config has unknown keys {unknown}; it was not written "
                               f"by this version of pyrovae.")
        values = dict(config)
        for key in ("x_shape", "hidden"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


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

    def resolved_binarize(self, likelihood: str) -> str:
        if self.binarize is not None:
            return self.binarize
        return "dynamic" if likelihood == "bernoulli" else "none"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PyrovaeError("--device cuda was asked for, but torch sees no CUDA device; "
                           "use --device cpu (or auto).")
    if name != "cpu" and not name.startswith("cuda"):
        raise PyrovaeError(f"unknown device {name!r}; use cpu, cuda or auto.")
    return torch.device(name)


# ---------------------------------------------------------------- reading and writing


def read_json(path: Path):
    with open(path) as f:
        return json.load(f)


def read_config(folder) -> dict:
    """config.json of a run folder or of a saved VAE: ``{"model": ..., ["training": ...]}``."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise PyrovaeError(f"{folder} holds no {CONFIG_FILE}: pass the folder of a run written "
                           f"by pyrovae train (or by VAE.save).")
    return read_json(path)


def read_train_config(folder) -> TrainConfig:
    return TrainConfig(**read_config(folder)["training"])


def write_config(folder, model: dict, training: TrainConfig | None = None) -> None:
    """config.json: the model config, and the training config of a training run (a
    VAE saved into a run folder keeps the run's training config)."""
    path = Path(folder) / CONFIG_FILE
    config = read_json(path) if training is None and path.is_file() else {}
    config["model"] = model
    if training is not None:
        config["training"] = dataclasses.asdict(training)
    atomic_write_json(path, config)


def read_checkpoint(folder, map_location="cpu") -> dict:
    return torch.load(Path(folder) / CHECKPOINT_FILE, map_location=map_location,
                      weights_only=True)


def write_checkpoint(folder, state: dict) -> None:
    """checkpoint.pt: ``state["model"]`` is the VAE's state_dict; a training run adds
    ``optimizer``, ``epoch``, ``interrupted_at_step``, ``rng`` and ``aggressive``."""
    atomic_torch_save(state, Path(folder) / CHECKPOINT_FILE)


def read_metrics(folder) -> list[dict]:
    path = Path(folder) / METRICS_FILE
    return read_json(path) if path.is_file() else []


def write_metrics(folder, metrics: list[dict]) -> None:
    atomic_write_json(Path(folder) / METRICS_FILE, metrics)


def write_evaluation(folder, summary: dict) -> None:
    """evaluation.json; strict JSON has no NaN or infinity, so they are written as null."""
    atomic_write_json(Path(folder) / EVALUATION_FILE, {
        key: None if isinstance(value, float) and not math.isfinite(value) else value
        for key, value in summary.items()})


def holds_run(folder) -> bool:
    return (Path(folder) / CHECKPOINT_FILE).exists()
