"""The SVI training loop: epochs, checkpoints, resume.

Kept apart from the model: ``Trainer`` takes any ``VAE`` and ``Dataset`` and
writes its run folder through ``pyrovae.run``. What a step does is a step
strategy (``PlainStep``, ``AggressiveStep``); what happens after an epoch's
steps beyond the checkpoint is a list of callbacks (``TestELBO``,
``CollapseDiagnostics``, or the user's own), so that a new per-epoch extra is
added without touching ``fit``.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import pyro
import torch
from tqdm.auto import tqdm

from pyrovae import run
from pyrovae.collapse import collapse_diagnostics
from pyrovae.data import Dataset
from pyrovae.errors import NonFiniteLossError, PyrovaeError
from pyrovae.families.kl import describe_kl_methods, kl_methods
from pyrovae.objectives import make_elbo, why_not_compiled
from pyrovae.run import METRICS_FILE, TrainConfig, resolve_device  # noqa: F401
from pyrovae.svi import FusedOptim, FusedSVI, param_names
from pyrovae.vae import VAE, load_run

log = logging.getLogger("pyrovae")

DIAGNOSTIC_KEYS = ("active_units", "kl_per_dim", "mutual_information", "mutual_information_se",
                   "posterior_mean_method")

# Aggressive inference-network training (He et al. 2019): at most this many guide
# steps before each model step, stopping early when the guide loss summed over a
# window of this many steps stops decreasing.
AGGRESSIVE_MAX_STEPS = 50
AGGRESSIVE_WINDOW = 10

# A loss per datapoint this many times the first step's (or DIVERGENCE_FLOOR nats,
# whichever is larger) has diverged: no VAE in training moves its loss by four
# orders of magnitude, while --lr 1e6 takes it to 1e32 without a NaN.
DIVERGENCE_FACTOR = 1e4
DIVERGENCE_FLOOR = 10.0

# Training settings that a resumed run may change; the others define the model,
# its data or its randomness, and a change would make another run.
RESUMABLE = ("epochs", "lr", "batch_size", "beta", "kl_anneal", "kl_anneal_start",
             "free_bits", "device", "jit", "data_dir")


# ---------------------------------------------------------------- per-epoch callbacks


class Callback:
    """A per-epoch extra: ``on_epoch_end`` runs after the epoch's steps and adds its
    results to the epoch's ``metrics``. It may draw from the global RNG; the
    checkpoint saves the RNG state after it, so a resumed run replays it."""

    def on_epoch_end(self, trainer: "Trainer", metrics: dict) -> None:
        raise NotImplementedError


class TestELBO(Callback):
    """The true ELBO (beta = 1, no free bits), KL and reconstruction term on the test
    set, with Pyro's own estimator; the IWAE bound too for ``--elbo iwae``."""

    __test__ = False  # not a pytest test class

    def __init__(self, config: TrainConfig):
        self.batch_size = config.batch_size
        self.elbo = make_elbo("meanfield" if config.elbo == "meanfield" else "trace",
                              config.num_particles)
        self.iwae = make_elbo("iwae", config.num_particles) if config.elbo == "iwae" else None

    @torch.no_grad()
    def on_epoch_end(self, trainer, metrics):
        vae, test = trainer.vae, trainer.data.test
        vae.eval()
        total_loss, total_iwae = 0.0, 0.0
        for x in trainer.data.test_batches(self.batch_size):
            total_loss += float(self.elbo.differentiable_loss(vae.model, vae.guide, x))
            if self.iwae is not None:
                total_iwae -= float(self.iwae.differentiable_loss(vae.model, vae.guide, x))
        result = per_datapoint(self.elbo, total_loss, len(test))
        metrics.update(test_elbo=result["elbo"], kl=result["kl"], recon=result["recon"])
        if self.iwae is not None:
            metrics["test_iwae"] = total_iwae / len(test)


class CollapseDiagnostics(Callback):
    """Active units, KL per dimension and I(x; z) on the test set (``pyrovae.collapse``),
    from their own RNG stream, so that they are the same wherever a run resumed."""

    def on_epoch_end(self, trainer, metrics):
        diagnostics = collapse_diagnostics(trainer.vae, trainer.data.test,
                                           seed=trainer.config.seed)
        metrics.update({key: diagnostics[key] for key in DIAGNOSTIC_KEYS})


def default_callbacks(config: TrainConfig) -> list[Callback]:
    return [TestELBO(config), CollapseDiagnostics()]


# ---------------------------------------------------------------- step strategies


class PlainStep:
    """One SVI step on each batch."""

    def __init__(self, trainer: "Trainer"):
        vae = trainer.vae
        self.svi = FusedSVI(vae.model, vae.guide, trainer.optim, trainer.elbo)

    def __call__(self, x: torch.Tensor) -> float:
        return self.svi.step(x)


class AggressiveStep:
    """Aggressive inference-network training (He et al. 2019): before each model
    step, guide-only steps on x and then on fresh random batches, until the guide
    loss summed over a window stops decreasing. It ends once I(x; z) under q makes
    no new high for ``config.aggressive_patience`` epochs."""

    def __init__(self, trainer: "Trainer", mutual_info: list[float] | None = None):
        self.trainer = trainer
        vae, optim = trainer.vae, trainer.optim
        guide_params = param_names(vae.guide, trainer.data.test[:1])
        # a second objective for the guide-only steps, so that they stay out of the metrics
        self.guide_elbo = trainer.make_objective()
        self.guide_svi = FusedSVI(vae.model, vae.guide, optim, self.guide_elbo,
                                  params=lambda name: name in guide_params)
        self.model_svi = FusedSVI(vae.model, vae.guide, optim, trainer.elbo,
                                  params=lambda name: name not in guide_params)
        self.mutual_info = list(mutual_info or [])  # per aggressive epoch

    @property
    def objectives(self):
        return (self.trainer.elbo, self.guide_elbo)

    def __call__(self, x: torch.Tensor) -> float:
        previous, window = math.inf, 0.0
        batch = x
        for step in range(1, AGGRESSIVE_MAX_STEPS + 1):
            window += self.guide_svi.step(batch)
            if step % AGGRESSIVE_WINDOW == 0:
                if window >= previous:
                    break
                previous, window = window, 0.0
            batch = self._random_batch()
        return self.model_svi.step(x)

    def _random_batch(self) -> torch.Tensor:
        # a fresh shuffle per batch, drawn from the trainer's generator, so that resuming
        # replays it; train_batches also applies dynamic binarization
        trainer = self.trainer
        seed = int(torch.randint(2**62, (1,), generator=trainer.generator,
                                 device=trainer.device))
        generator = torch.Generator(device=trainer.device).manual_seed(seed)
        return next(trainer.data.train_batches(trainer.config.batch_size, generator))

    def keeps_on(self, epoch: int, mutual_information: float) -> bool:
        """He et al. 2019: leave aggressive mode once I(x;z) under q stops climbing. The
        estimate is noisy, so it must make no new high for ``patience`` epochs."""
        self.mutual_info.append(mutual_information)
        patience = self.trainer.config.aggressive_patience
        if len(self.mutual_info) > patience and \
                max(self.mutual_info[-patience:]) <= max(self.mutual_info[:-patience]):
            log.info(f"aggressive inference training off at epoch {epoch}: mutual information "
                     f"plateaued at {max(self.mutual_info):.3f} nats (no new high in "
                     f"{patience} epochs).")
            return False
        return True


# ---------------------------------------------------------------- the trainer


class _Interrupted(Exception):
    def __init__(self, step: int):
        self.step = step


class _Diverged(Exception):
    def __init__(self, step: int, what: str):
        self.step, self.what = step, what


class Trainer:
    """Trains a VAE with ``pyro.infer.SVI`` and writes a run folder.

    The trainer owns Pyro's global param store while it runs: it clears it on
    start, because ``pyro.module`` would otherwise hand SVI stale parameters of
    an earlier model registered under the same names. ``callbacks`` default to
    the test ELBO and the collapse diagnostics.
    """

    def __init__(self, vae: VAE, data: Dataset, config: TrainConfig, out=None,
                 progress: bool = True, callbacks: list[Callback] | None = None,
                 overwrite: bool = False, _resuming: bool = False):
        config.validate()
        self.config = config
        self.device = resolve_device(config.device)
        if out is not None and not _resuming:
            # before any work: a folder that cannot be written, or one holding another
            # run's or the user's files, is refused now, not after an epoch
            run.claim_folder(out, overwrite)
        self.vae = vae.to(self.device)
        self.data = data.to(self.device)
        self.out = Path(out) if out is not None else None
        self.progress = progress
        self.callbacks = default_callbacks(config) if callbacks is None else list(callbacks)
        self.elbo = self.make_objective()
        # torch's fused Adam: one kernel for all parameters, a third of the time of
        # the default one on CPU; the same update up to float rounding
        self.optim = FusedOptim(torch.optim.Adam, {"lr": config.lr, "fused": True})
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.epoch = 0
        self.saved_epoch: int | None = None  # the epoch of the checkpoint on disk
        self.first_loss: float | None = None  # per datapoint, the scale of divergence
        self.metrics: list[dict] = []
        self.aggressive = AggressiveStep(self) if config.aggressive else None
        self._check_data()

    def make_objective(self):
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
        """The checkpoint, config and metrics; the RNG state saved is the current one."""
        if self.out is None:
            return
        self._save_checkpoint(interrupted_at_step)
        run.write_metrics(self.out, self.metrics)

    def _save_checkpoint(self, interrupted_at_step: int | None = None):
        if self.out is None:
            return
        run.write_config(self.out, self.vae.config, self.config)
        rng = {"torch": torch.get_rng_state(), "generator": self.generator.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        aggressive = self.aggressive
        run.write_checkpoint(self.out, {
            "model": self.vae.state_dict(),
            "optimizer": self.optim.get_state(),
            "epoch": self.epoch,
            "interrupted_at_step": interrupted_at_step,
            "rng": rng,
            "aggressive": {"on": aggressive is not None,
                           "mutual_info": aggressive.mutual_info if aggressive else []},
        })
        self.saved_epoch = self.epoch

    @classmethod
    def resume(cls, folder, epochs: int | None = None, progress: bool = True,
               device: str | None = None, jit: bool | None = None, **changes) -> "Trainer":
        """Rebuild a run from its folder and continue to ``epochs`` in total.

        ``changes`` sets other training settings anew (``lr``, ``batch_size``,
        ``beta``, ...: ``RESUMABLE``); each change is logged. A setting that
        defines the model, its data or its randomness cannot change: that is a
        new run, and asking for it is an error.
        """
        config = run.read_train_config(folder)
        changes.update({key: value for key, value in
                        (("epochs", epochs), ("device", device), ("jit", jit)) if value is not None})
        fixed = sorted(key for key, value in changes.items()
                       if key not in RESUMABLE and getattr(config, key, object()) != value)
        if fixed:
            raise PyrovaeError(
                f"{', '.join('--' + key.replace('_', '-') for key in fixed)} cannot change when "
                f"a run resumes: they define its model, data or randomness. Start a new run "
                f"with another --out instead (or drop the flags to resume as saved).")
        before = {key: getattr(config, key) for key in changes}
        for key, value in changes.items():
            setattr(config, key, value)
        config.validate()  # before the data load, as for a new run
        checkpoint = run.read_checkpoint(folder, map_location=resolve_device(config.device))
        for key, value in changes.items():
            if before[key] != value:
                log.info(f"{key} {before[key]} → {value} from epoch {checkpoint['epoch'] + 1}")
        vae, data, _ = load_run(folder, config.data_dir)
        trainer = cls(vae.train(), data, config, out=folder, progress=progress, _resuming=True)
        trainer.saved_epoch = checkpoint["epoch"]
        trainer.optim.set_state(checkpoint["optimizer"])
        trainer.epoch = checkpoint["epoch"]
        if "aggressive" in checkpoint:
            saved = checkpoint["aggressive"]
            trainer.aggressive = AggressiveStep(trainer, saved["mutual_info"]) \
                if saved["on"] else None
        torch.set_rng_state(checkpoint["rng"]["torch"].cpu())
        trainer.generator.set_state(checkpoint["rng"]["generator"].cpu())
        if "cuda" in checkpoint["rng"] and trainer.device.type == "cuda":
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"].cpu(), trainer.device)
        trainer.metrics = [m for m in run.read_metrics(folder) if m["epoch"] <= trainer.epoch]
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
        plain = PlainStep(self)
        probe = self.data.test[: min(len(self.data.test), 8)]
        log.info(describe_kl_methods(kl_methods(self.vae.model, self.vae.guide, probe),
                                     self.config.elbo))
        why_eager = self._why_eager()
        log.info("step: compiled by pyro.ops.jit, one graph per batch shape" if why_eager is None
                 else f"step: eager ({why_eager})")
        while self.epoch < self.config.epochs:
            epoch = self.epoch + 1
            started = time.perf_counter()
            beta = self.config.beta_at(epoch)
            if self.config.kl_weighted:  # then make_elbo gave KL-weighted objectives
                for objective in self.aggressive.objectives if self.aggressive else [self.elbo]:
                    objective.beta = beta
            aggressive = self.aggressive
            try:
                train = self._train_epoch(aggressive or plain, epoch)
            except _Interrupted as interrupt:
                return self._interrupted(epoch, interrupt.step)
            except _Diverged as diverged:
                raise NonFiniteLossError(
                    f"{diverged.what} in epoch {epoch} at step {diverged.step}. "
                    f"{self._kept_checkpoint()} Try a smaller "
                    f"--lr, check the data for extreme values, or a likelihood with a variance "
                    f"floor (gaussian keeps sigma above min_scale).") from None
            self.epoch = epoch
            metrics = {"epoch": epoch, "train_elbo": train["elbo"], "train_kl": train["kl"],
                       "train_recon": train["recon"], "objective": train["objective"]}
            if self.config.kl_weighted:
                metrics["beta"] = beta
            # the epoch's steps are saved before any extra runs: an extra that fails or
            # is interrupted cannot lose them
            self._save_checkpoint()
            try:
                for callback in self.callbacks:
                    self._run_callback(callback, metrics)
            except KeyboardInterrupt:
                self.metrics.append(metrics)
                if self.out is not None:
                    run.write_metrics(self.out, self.metrics)
                self.interrupted = True
                log.info(f"interrupted after the steps of epoch {epoch}; its checkpoint is "
                         f"saved" + (f" in {self.out}" if self.out else "") + ".")
                return self.metrics
            if aggressive:
                metrics["aggressive"] = True
                if "mutual_information" in metrics and \
                        not aggressive.keeps_on(epoch, metrics["mutual_information"]):
                    self.aggressive = None
            metrics["seconds"] = time.perf_counter() - started
            self.metrics.append(metrics)
            self._save()
            log.info(f"epoch {epoch}/{self.config.epochs}  train ELBO {train['elbo']:.3f}"
                     + _extras(metrics) + "  (nats per datapoint)")
        return self.metrics

    def _run_callback(self, callback: Callback, metrics: dict) -> None:
        """A failing extra is logged with its reason and named in the metrics; the run
        goes on, as the epoch it reports on is saved already."""
        try:
            callback.on_epoch_end(self, metrics)
        except Exception as error:  # noqa: BLE001  (an extra must not end the run)
            name = type(callback).__name__
            log.warning(f"{name} failed after epoch {metrics['epoch']} and is skipped for it: "
                        f"{type(error).__name__}: {error}")
            metrics.setdefault("failed_extras", {})[name] = f"{type(error).__name__}: {error}"

    def _interrupted(self, epoch: int, step: int) -> list[dict]:
        self._save(interrupted_at_step=step)
        self.interrupted = True
        log.info(f"interrupted in epoch {epoch} at step {step}; checkpoint saved"
                 + (f" in {self.out}" if self.out else "") + ".")
        return self.metrics

    def _kept_checkpoint(self) -> str:
        if self.out is None:
            return "No checkpoint is written for a run without a folder."
        if self.saved_epoch is None:
            return f"No checkpoint was written in {self.out}: the run had no good epoch yet."
        return f"The last good checkpoint (epoch {self.saved_epoch}) is kept in {self.out}."

    def _check_loss(self, loss: float, n: int, index: int) -> None:
        if not math.isfinite(loss):
            raise _Diverged(index, f"the loss became {loss}")
        per_datapoint = loss / n
        if self.first_loss is None:
            self.first_loss = per_datapoint
        limit = DIVERGENCE_FACTOR * max(abs(self.first_loss), DIVERGENCE_FLOOR)
        if abs(per_datapoint) > limit:
            raise _Diverged(index, f"the loss diverged to {per_datapoint:.4g} nats per datapoint, "
                                   f"more than {DIVERGENCE_FACTOR:.0e} times its first "
                                   f"{self.first_loss:.4g}")

    def _train_epoch(self, step, epoch: int) -> dict:
        self.vae.train()
        self.elbo.take_terms()  # drops what an interrupted epoch recorded
        total_loss, n_seen = 0.0, 0
        batches = self.data.train_batches(self.config.batch_size, self.generator)
        num_batches = self.data.num_batches(self.config.batch_size)
        bar = tqdm(batches, total=num_batches, desc=f"epoch {epoch}", leave=False,
                   disable=not self.progress)
        index = 0
        try:
            for index, x in enumerate(bar, start=1):
                loss = step(x)
                self._check_loss(loss, x.shape[0], index)
                total_loss += loss
                n_seen += x.shape[0]
        except KeyboardInterrupt:
            raise _Interrupted(index) from None
        return per_datapoint(self.elbo, total_loss, n_seen)


def per_datapoint(objective, total_loss: float, n: int) -> dict:
    """The objective's recorded terms (which it then forgets) and loss, in nats per
    datapoint."""
    terms = objective.take_terms()
    recon, elbo = float(terms["recon"]) / n, float(terms["elbo"]) / n
    return {"elbo": elbo, "recon": recon, "kl": recon - elbo, "objective": -total_loss / n}


def _extras(metrics: dict) -> str:
    """The log line's optional part; the objective only where it is not the ELBO."""
    shown = {"test_elbo": "test ELBO", "kl": "KL", "recon": "recon"}
    if "test_iwae" in metrics or "beta" in metrics:
        shown["objective"] = "objective"
    labels = {**shown, "test_iwae": "test IWAE", "beta": "beta", "active_units": "active units",
              "mutual_information": "MI"}
    return "".join(f"  {label} {metrics[key]:.3f}" if isinstance(metrics[key], float) else
                   f"  {label} {metrics[key]}" for key, label in labels.items() if key in metrics)
