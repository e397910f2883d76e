"""The SVI training pipeline: data on the device, epochs, metrics, checkpoints, resume.

Kept apart from the model: ``Trainer`` takes any ``VAE`` and ``Dataset``.
A run folder holds ``config.json``, ``checkpoint.pt`` and ``metrics.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import pyro
import torch
from pyro.infer import SVI
from tqdm.auto import tqdm

from pyrovae.atomic import atomic_torch_save, atomic_write_json
from pyrovae.data import Dataset, load_dataset
from pyrovae.errors import NonFiniteLossError
from pyrovae.objectives import describe_kl_methods, kl_methods, make_elbo
from pyrovae.vae import CHECKPOINT_FILE, CONFIG_FILE, VAE

log = logging.getLogger("pyrovae")

METRICS_FILE = "metrics.json"


@dataclass
class TrainConfig:
    dataset: str = "digits"
    data_dir: str | None = None
    binarize: str | None = None  # None: "dynamic" for a bernoulli likelihood, else "none"
    elbo: str = "trace"
    num_particles: int = 1
    epochs: int = 50
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    device: str = "auto"

    def resolved_binarize(self, likelihood: str) -> str:
        if self.binarize is not None:
            return self.binarize
        return "dynamic" if likelihood == "bernoulli" else "none"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device; "
                         "use --device cpu (or auto).")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"unknown device {name!r}; use cpu, cuda or auto.")
    return torch.device(name)


class Trainer:
    """Trains a VAE with ``pyro.infer.SVI`` and writes a run folder.

    The trainer owns Pyro's global param store while it runs: it clears it on
    start, because ``pyro.module`` would otherwise hand SVI stale parameters of
    an earlier model registered under the same names.
    """

    def __init__(self, vae: VAE, data: Dataset, config: TrainConfig, out=None,
                 progress: bool = True):
        self.config = config
        self.device = resolve_device(config.device)
        self.vae = vae.to(self.device)
        self.data = data.to(self.device)
        self.out = Path(out) if out is not None else None
        self.progress = progress
        self.elbo = make_elbo(config.elbo, config.num_particles)
        self.optim = pyro.optim.Adam({"lr": config.lr})
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.epoch = 0
        self.metrics: list[dict] = []
        self._check_data()

    # ------------------------------------------------------------ set-up
    def _check_data(self):
        if self.data.binarize == "dynamic":  # stored grey; bernoulli draws are binary
            sample = next(self.data.train_batches(self.config.batch_size, torch.Generator(
                device=self.device).manual_seed(0)))
            self.vae.check_data(sample, "training batch")
        else:
            self.vae.check_data(self.data.train, "training set")
        self.vae.check_data(self.data.test, "test set")

    def _save(self, interrupted_at_step: int | None = None):
        if self.out is None:
            return
        config = {"model": self.vae.config, "training": dataclasses.asdict(self.config)}
        atomic_write_json(self.out / CONFIG_FILE, config)
        rng = {"torch": torch.get_rng_state(), "generator": self.generator.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        atomic_torch_save({
            "model": self.vae.state_dict(),
            "optimizer": self.optim.get_state(),
            "epoch": self.epoch,
            "interrupted_at_step": interrupted_at_step,
            "rng": rng,
        }, self.out / CHECKPOINT_FILE)
        atomic_write_json(self.out / METRICS_FILE, self.metrics)

    @classmethod
    def resume(cls, folder, epochs: int | None = None, progress: bool = True,
               device: str | None = None) -> "Trainer":
        """Rebuild a run from its folder and continue to ``epochs`` in total."""
        folder = Path(folder)
        with open(folder / CONFIG_FILE) as f:
            saved = json.load(f)
        config = TrainConfig(**saved["training"])
        if epochs is not None:
            config.epochs = epochs
        if device is not None:
            config.device = device
        vae = VAE.from_config(saved["model"])
        data = load_dataset(config.dataset, config.data_dir,
                            binarize=config.resolved_binarize(saved["model"]["likelihood"]["name"]),
                            seed=config.seed)
        trainer = cls(vae, data, config, out=folder, progress=progress)
        checkpoint = torch.load(folder / CHECKPOINT_FILE, map_location=trainer.device,
                                weights_only=True)
        trainer.vae.load_state_dict(checkpoint["model"])
        trainer.optim.set_state(checkpoint["optimizer"])
        trainer.epoch = checkpoint["epoch"]
        torch.set_rng_state(checkpoint["rng"]["torch"].cpu())
        trainer.generator.set_state(checkpoint["rng"]["generator"].cpu())
        if "cuda" in checkpoint["rng"] and trainer.device.type == "cuda":
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"].cpu(), trainer.device)
        metrics_path = folder / METRICS_FILE
        if metrics_path.exists():
            with open(metrics_path) as f:
                trainer.metrics = [m for m in json.load(f) if m["epoch"] <= trainer.epoch]
        return trainer

    # ------------------------------------------------------------ loop
    def fit(self) -> list[dict]:
        """Train to ``config.epochs``; return the metrics, one dict per epoch.

        Ctrl-C saves a checkpoint and returns; ``self.interrupted`` tells.
        """
        if self.epoch == 0:  # a resumed run restores the RNG from its checkpoint instead
            pyro.set_rng_seed(self.config.seed)
        pyro.clear_param_store()
        self.interrupted = False
        svi = SVI(self.vae.model, self.vae.guide, self.optim, self.elbo)
        probe = self.data.test[: min(len(self.data.test), 8)]
        log.info(describe_kl_methods(kl_methods(self.vae.model, self.vae.guide, probe),
                                     self.config.elbo))
        while self.epoch < self.config.epochs:
            epoch = self.epoch + 1
            started = time.perf_counter()
            try:
                train = self._train_epoch(svi, epoch)
            except KeyboardInterrupt:
                self._save(interrupted_at_step=self._step)
                self.interrupted = True
                log.info(f"interrupted in epoch {epoch} at step {self._step}; checkpoint saved"
                         + (f" in {self.out}" if self.out else "") + ".")
                return self.metrics
            test = self.evaluate(self.data.test_batches(self.config.batch_size), len(self.data.test))
            self.epoch = epoch
            self.metrics.append({
                "epoch": epoch,
                "train_elbo": train["elbo"], "test_elbo": test["elbo"],
                "kl": test["kl"], "recon": test["recon"],
                "train_kl": train["kl"], "train_recon": train["recon"],
                "seconds": time.perf_counter() - started,
            })
            self._save()
            log.info(f"epoch {epoch}/{self.config.epochs}  train ELBO {train['elbo']:.3f}  "
                     f"test ELBO {test['elbo']:.3f}  KL {test['kl']:.3f}  "
                     f"recon {test['recon']:.3f}  (nats per datapoint)")
        return self.metrics

    def _train_epoch(self, svi: SVI, epoch: int) -> dict:
        self.vae.train()
        self.elbo.reset_terms()
        total_loss, n_seen = 0.0, 0
        batches = self.data.train_batches(self.config.batch_size, self.generator)
        num_batches = self.data.num_batches(self.config.batch_size)
        bar = tqdm(batches, total=num_batches, desc=f"epoch {epoch}", leave=False,
                   disable=not self.progress)
        for self._step, x in enumerate(bar, start=1):
            loss = svi.step(x)
            if not math.isfinite(loss):
                raise NonFiniteLossError(
                    f"the loss became {loss} in epoch {epoch} at step {self._step}. The last "
                    f"good checkpoint (epoch {self.epoch}) is kept. Try a smaller --lr, check the "
                    f"data for extreme values, or a likelihood with a variance floor "
                    f"(gaussian keeps sigma above min_scale).")
            total_loss += loss
            n_seen += x.shape[0]
        return self._per_datapoint(total_loss, n_seen)

    @torch.no_grad()
    def evaluate(self, batches, n: int) -> dict:
        """ELBO, KL and reconstruction term on ``batches``, in nats per datapoint."""
        self.vae.eval()
        self.elbo.reset_terms()
        total_loss = 0.0
        for x in batches:
            total_loss += float(self.elbo.differentiable_loss(self.vae.model, self.vae.guide, x))
        return self._per_datapoint(total_loss, n)

    def _per_datapoint(self, total_loss: float, n: int) -> dict:
        recon = float(self.elbo.recon_total) / n
        elbo = -total_loss / n
        return {"elbo": elbo, "recon": recon, "kl": recon - elbo}
