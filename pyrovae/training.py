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
from pyro import poutine
from pyro.infer import SVI
from pyro.infer.util import zero_grads
from tqdm.auto import tqdm

from pyrovae.atomic import atomic_torch_save, atomic_write_json
from pyrovae.data import Dataset, load_dataset
from pyrovae.errors import NonFiniteLossError, PyrovaeError
from pyrovae.evaluation.diagnostics import collapse_diagnostics
from pyrovae.objectives import describe_kl_methods, kl_methods, make_elbo, why_not_compiled
from pyrovae.svi import FusedOptim, FusedSVI
from pyrovae.vae import CHECKPOINT_FILE, CONFIG_FILE, VAE

log = logging.getLogger("pyrovae")

METRICS_FILE = "metrics.json"
DIAGNOSTIC_KEYS = ("active_units", "kl_per_dim", "mutual_information", "mutual_information_se")

# Aggressive inference-network training (He et al. 2019): at most this many guide
# steps before each model step, stopping early when the guide loss summed over a
# window of this many steps stops decreasing.
AGGRESSIVE_MAX_STEPS = 50
AGGRESSIVE_WINDOW = 10


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


def load_run(folder, data_dir: str | None = None, device="cpu") -> tuple[VAE, Dataset, TrainConfig]:
    """A run folder's trained VAE (in eval mode, on ``device``), its data set as
    training loaded it (same binarization and seed), and its TrainConfig."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise PyrovaeError(f"{folder} holds no {CONFIG_FILE}: pass the folder of a run written "
                           f"by pyrovae train.")
    with open(folder / CONFIG_FILE) as f:
        saved = json.load(f)
    config = TrainConfig(**saved["training"])
    if data_dir is not None:
        config.data_dir = data_dir
    vae = VAE.load(folder, map_location=device).to(device)
    data = load_dataset(config.dataset, config.data_dir, seed=config.seed,
                        binarize=config.resolved_binarize(saved["model"]["likelihood"]["name"]))
    return vae, data, config


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
        self.elbo = self._make_objective()
        # the true ELBO (beta = 1, no free bits) on the test set, with Pyro's own estimator
        self.eval_elbo = make_elbo("meanfield" if config.elbo == "meanfield" else "trace",
                                   config.num_particles)
        self.eval_iwae = make_elbo("iwae", config.num_particles) if config.elbo == "iwae" else None
        # torch's fused Adam: one kernel for all parameters, a third of the time of
        # the default one on CPU; the same update up to float rounding
        self.optim = FusedOptim(torch.optim.Adam, {"lr": config.lr, "fused": True})
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.epoch = 0
        self.metrics: list[dict] = []
        self.aggressive = config.aggressive
        self.mutual_info: list[float] = []  # per aggressive epoch, for the switch-off rule
        # a second objective for the guide-only steps, so that they stay out of the metrics
        self.guide_elbo = self._make_objective() if config.aggressive else None
        self._check_data()

    def _make_objective(self):
        c = self.config
        return make_elbo(c.elbo, c.num_particles, estimator=c.estimator, beta=c.beta_at(1),
                         free_bits=c.free_bits, kl_weighted=c.kl_weighted,
                         jit=self._why_eager() is None)

    def _why_eager(self) -> str | None:
        c = self.config
        if not c.jit:
            return "jit is off"
        return why_not_compiled(c.elbo, c.estimator, c.kl_weighted)

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
            "aggressive": {"on": self.aggressive, "mutual_info": self.mutual_info},
        }, self.out / CHECKPOINT_FILE)
        atomic_write_json(self.out / METRICS_FILE, self.metrics)

    @classmethod
    def resume(cls, folder, epochs: int | None = None, progress: bool = True,
               device: str | None = None, jit: bool | None = None) -> "Trainer":
        """Rebuild a run from its folder and continue to ``epochs`` in total."""
        folder = Path(folder)
        vae, data, config = load_run(folder)
        if epochs is not None:
            config.epochs = epochs
        if device is not None:
            config.device = device
        if jit is not None:
            config.jit = jit
        trainer = cls(vae.train(), data, config, out=folder, progress=progress)
        checkpoint = torch.load(folder / CHECKPOINT_FILE, map_location=trainer.device,
                                weights_only=True)
        trainer.optim.set_state(checkpoint["optimizer"])
        trainer.epoch = checkpoint["epoch"]
        if "aggressive" in checkpoint:
            trainer.aggressive = checkpoint["aggressive"]["on"]
            trainer.mutual_info = list(checkpoint["aggressive"]["mutual_info"])
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
        svi = FusedSVI(self.vae.model, self.vae.guide, self.optim, self.elbo)
        probe = self.data.test[: min(len(self.data.test), 8)]
        log.info(describe_kl_methods(kl_methods(self.vae.model, self.vae.guide, probe),
                                     self.config.elbo))
        why_eager = self._why_eager()
        log.info("step: compiled by pyro.ops.jit, one graph per batch shape" if why_eager is None
                 else f"step: eager ({why_eager})")
        self._guide_params = _param_names(self.vae.guide, probe)
        while self.epoch < self.config.epochs:
            epoch = self.epoch + 1
            started = time.perf_counter()
            beta = self.config.beta_at(epoch)
            for objective in (self.elbo, self.guide_elbo):
                if hasattr(objective, "beta"):
                    objective.beta = beta
            aggressive = self.aggressive
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
            metrics = {
                "epoch": epoch,
                "train_elbo": train["elbo"], "test_elbo": test["elbo"],
                "kl": test["kl"], "recon": test["recon"],
                "train_kl": train["kl"], "train_recon": train["recon"],
                "objective": train["objective"],
            }
            if self.eval_iwae is not None:
                metrics["test_iwae"] = test["iwae"]
            if self.config.kl_weighted:
                metrics["beta"] = beta
            # posterior-collapse diagnostics; they draw from their own RNG stream, so that
            # training samples the same with or without them
            diagnostics = collapse_diagnostics(self.vae, self.data.test, seed=self.config.seed)
            metrics.update({key: diagnostics[key] for key in DIAGNOSTIC_KEYS})
            if aggressive:
                metrics["aggressive"] = True
                self._update_aggressive(epoch, diagnostics["mutual_information"])
            metrics["seconds"] = time.perf_counter() - started
            self.metrics.append(metrics)
            self._save()
            log.info(f"epoch {epoch}/{self.config.epochs}  train ELBO {train['elbo']:.3f}  "
                     f"test ELBO {test['elbo']:.3f}  KL {test['kl']:.3f}  "
                     f"recon {test['recon']:.3f}" + _extras(metrics) + "  (nats per datapoint)")
        return self.metrics

    def _update_aggressive(self, epoch: int, mutual_information: float) -> None:
        """He et al. 2019: leave aggressive mode once I(x;z) under q stops climbing. The
        estimate is noisy, so it must make no new high for ``patience`` epochs."""
        self.mutual_info.append(mutual_information)
        patience = self.config.aggressive_patience
        if len(self.mutual_info) > patience and \
                max(self.mutual_info[-patience:]) <= max(self.mutual_info[:-patience]):
            self.aggressive = False
            log.info(f"aggressive inference training off at epoch {epoch}: mutual information "
                     f"plateaued at {max(self.mutual_info):.3f} nats (no new high in "
                     f"{patience} epochs).")

    def _train_epoch(self, svi: SVI, epoch: int) -> dict:
        self.vae.train()
        self.elbo.reset_terms()
        total_loss, n_seen = 0.0, 0
        batches = self.data.train_batches(self.config.batch_size, self.generator)
        num_batches = self.data.num_batches(self.config.batch_size)
        bar = tqdm(batches, total=num_batches, desc=f"epoch {epoch}", leave=False,
                   disable=not self.progress)
        for self._step, x in enumerate(bar, start=1):
            if self.aggressive:
                self._train_guide(x)
                loss = self._step_params(self.elbo, x, guide=False)
            else:
                loss = svi.step(x)
            if not math.isfinite(loss):
                raise NonFiniteLossError(
                    f"the loss became {loss} in epoch {epoch} at step {self._step}. The last "
                    f"good checkpoint (epoch {self.epoch}) is kept. Try a smaller --lr, check the "
                    f"data for extreme values, or a likelihood with a variance floor "
                    f"(gaussian keeps sigma above min_scale).")
            total_loss += loss
            n_seen += x.shape[0]
        return self._per_datapoint(self.elbo, total_loss, n_seen)

    def _train_guide(self, x: torch.Tensor) -> None:
        """He et al. 2019: guide-only steps, on x and then on fresh random batches, until
        the guide loss summed over a window stops decreasing."""
        previous, window = math.inf, 0.0
        for step in range(1, AGGRESSIVE_MAX_STEPS + 1):
            window += self._step_params(self.guide_elbo, x, guide=True)
            if step % AGGRESSIVE_WINDOW == 0:
                if window >= previous:
                    break
                previous, window = window, 0.0
            x = self._random_batch()

    def _step_params(self, objective, x: torch.Tensor, guide: bool) -> float:
        """One SVI step that updates only the guide's parameters, or only the model's."""
        with poutine.trace(param_only=True) as capture:
            loss = objective.loss_and_grads(self.vae.model, self.vae.guide, x)
        params = {name: site["value"].unconstrained()
                  for name, site in capture.trace.nodes.items()}
        self.optim([p for name, p in params.items() if (name in self._guide_params) == guide])
        zero_grads(set(params.values()))
        return loss

    def _random_batch(self) -> torch.Tensor:
        # a fresh shuffle per batch, drawn from the trainer's generator, so that resuming
        # replays it; train_batches also applies dynamic binarization
        seed = int(torch.randint(2**62, (1,), generator=self.generator, device=self.device))
        generator = torch.Generator(device=self.device).manual_seed(seed)
        return next(self.data.train_batches(self.config.batch_size, generator))

    @torch.no_grad()
    def evaluate(self, batches, n: int) -> dict:
        """The true ELBO, KL and reconstruction term on ``batches`` (and the IWAE bound for
        --elbo iwae), in nats per datapoint."""
        self.vae.eval()
        self.eval_elbo.reset_terms()
        total_loss, total_iwae = 0.0, 0.0
        model, guide = self.vae.model, self.vae.guide
        for x in batches:
            total_loss += float(self.eval_elbo.differentiable_loss(model, guide, x))
            if self.eval_iwae is not None:
                total_iwae -= float(self.eval_iwae.differentiable_loss(model, guide, x))
        result = self._per_datapoint(self.eval_elbo, total_loss, n)
        if self.eval_iwae is not None:
            result["iwae"] = total_iwae / n
        return result

    @staticmethod
    def _per_datapoint(objective, total_loss: float, n: int) -> dict:
        recon = float(objective.recon_total) / n
        elbo = float(objective.elbo_total) / n
        return {"elbo": elbo, "recon": recon, "kl": recon - elbo, "objective": -total_loss / n}


def _param_names(fn, *args) -> set[str]:
    """The names of the Pyro params ``fn`` registers, found without touching the global RNG."""
    with torch.random.fork_rng(devices=[a.device for a in args if a.is_cuda]), torch.no_grad():
        trace = poutine.trace(fn, param_only=True).get_trace(*args)
    return set(trace.nodes)


def _extras(metrics: dict) -> str:
    """The log line's optional part; the objective only where it is not the ELBO."""
    labels = {"test_iwae": "test IWAE", "beta": "beta", "active_units": "active units",
              "mutual_information": "MI"}
    if "test_iwae" in metrics or "beta" in metrics:
        labels = {"objective": "objective", **labels}
    return "".join(f"  {label} {metrics[key]:.3f}" if isinstance(metrics[key], float) else
                   f"  {label} {metrics[key]}" for key, label in labels.items() if key in metrics)
