"""The SVI training loop: epochs, checkpoints, resume.

Kept apart from the model: ``Trainer`` takes any ``VAE`` and ``Dataset`` and
writes its run folder through ``pyrovae.run``. What a step does is a step
strategy (``PlainStep``, ``AggressiveStep``, ``DataParallelStep`` under torchrun);
what happens after an epoch's steps beyond the checkpoint is a list of callbacks
(``TestELBO``, ``ValidationELBO``, ``CollapseDiagnostics``, ``TestIWAE``,
``TensorBoard``, or the user's own), so that a new per-epoch extra is added without
touching ``fit``. The learning-rate schedule is the optimizer's (``pyrovae.svi``),
stepped once per epoch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
from pathlib import Path

import pyro
import torch
from pyro import poutine
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from pyrovae import distributed, run
from pyrovae.collapse import collapse_diagnostics
from pyrovae.data import OFFICIAL_VALIDATION, Dataset, is_image_shape
from pyrovae.errors import NonFiniteLossError, PyrovaeError
from pyrovae.families.kl import describe_kl_methods, kl_methods
from pyrovae.objectives import make_elbo, why_not_compiled
from pyrovae.run import METRICS_FILE, TENSORBOARD_DIR, TrainConfig, resolve_device  # noqa: F401
from pyrovae.svi import FusedOptim, FusedSVI, make_lr_schedule, param_names
from pyrovae.vae import VAE, load_run

log = logging.getLogger("pyrovae")

DIAGNOSTIC_KEYS = ("active_units", "kl_per_dim", "mutual_information", "mutual_information_se",
                   "mutual_information_datapoints", "posterior_mean_method")

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
# A changed learning-rate schedule applies as if the run had had it from the start.
RESUMABLE = ("epochs", "lr", "batch_size", "beta", "kl_anneal", "kl_anneal_start",
             "free_bits", "device", "jit", "data_dir", "stream", "num_workers", "tensorboard",
             "lr_schedule", "lr_step", "lr_gamma", "lr_min", "iwae_every", "iwae_samples",
             "time_budget", "diagnostics_every")

# The periodic test IWAE bound (--iwae-every) evaluates at most this many (importance
# sample, image) pairs at once: K = 50 takes 163 test images per pass.
IWAE_ELEMENTS_PER_PASS = 8192


# ---------------------------------------------------------------- per-epoch callbacks


class Callback:
    """A per-epoch extra: ``on_epoch_end`` runs after the epoch's steps and adds its
    results to the epoch's ``metrics``. It may draw from the global RNG; the
    checkpoint saves the RNG state after it, so a resumed run replays it."""

    def on_epoch_end(self, trainer: "Trainer", metrics: dict) -> None:
        raise NotImplementedError


class TestELBO(Callback):
    """The true ELBO (beta = 1, no free bits), KL and reconstruction term on the test
    set, with Pyro's own estimator; the IWAE bound too for ``--elbo iwae``.
    ``ValidationELBO`` is the same on the validation set."""

    __test__ = False  # not a pytest test class
    split = "test"
    keys = {"elbo": "test_elbo", "kl": "kl", "recon": "recon", "iwae": "test_iwae"}

    def __init__(self, config: TrainConfig):
        self.batch_size = config.batch_size
        self.elbo = make_elbo("meanfield" if config.elbo == "meanfield" else "trace",
                              config.num_particles)
        self.iwae = make_elbo("iwae", config.num_particles) if config.elbo == "iwae" else None

    @torch.no_grad()
    def on_epoch_end(self, trainer, metrics):
        vae = trainer.vae
        vae.eval()
        count, total_loss, total_iwae = 0, 0.0, 0.0
        for x in trainer.data.test_batches(self.batch_size, self.split):
            count += len(x)
            total_loss += float(self.elbo.differentiable_loss(vae.model, vae.guide, x))
            if self.iwae is not None:
                total_iwae -= float(self.iwae.differentiable_loss(vae.model, vae.guide, x))
        result = per_datapoint(self.elbo, total_loss, count)
        metrics.update({self.keys[key]: result[key] for key in ("elbo", "kl", "recon")})
        if self.iwae is not None:
            metrics[self.keys["iwae"]] = total_iwae / count


class ValidationELBO(TestELBO):
    """``TestELBO`` on the validation set (``val_elbo``, ``val_kl``, ``val_recon``), and
    the best epoch so far by the validation ELBO: its weights are written to the run
    folder's best.pt (``run.BEST_CHECKPOINT_FILE``) when it changes, and its number is
    ``best_epoch`` in every epoch's metrics."""

    split = "valid"
    keys = {"elbo": "val_elbo", "kl": "val_kl", "recon": "val_recon", "iwae": "val_iwae"}

    def on_epoch_end(self, trainer, metrics):
        super().on_epoch_end(trainer, metrics)
        val_elbo, best = metrics["val_elbo"], trainer.best
        if best is None or val_elbo > best["val_elbo"]:
            trainer.best = best = {"epoch": metrics["epoch"], "val_elbo": val_elbo}
            if trainer.out is not None:
                run.write_checkpoint(trainer.out, {"model": trainer.vae.state_dict(), **best},
                                     which="best")
        metrics["best_epoch"] = best["epoch"]


class TestIWAE(Callback):
    """The IWAE bound on log p(x) with ``config.iwae_samples`` importance samples on the
    test set, every ``config.iwae_every`` epochs and in the last: ``test_iwae_bound``
    (nats per datapoint), ``iwae_samples`` and ``train_seconds``, the training time so
    far, for a figure of test NLL against training time.

    It is the objectives' IWAE bound (``make_elbo("iwae", K)``), as ``TestELBO``
    computes it, not ``pyrovae.evaluation``'s estimator, which comes after training in
    the package's order. It draws from an RNG stream of its own (seeded with the seed
    and the epoch), so that asking for it leaves the training itself as it was.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, config: TrainConfig):
        self.every, self.samples = config.iwae_every, config.iwae_samples
        self.iwae = make_elbo("iwae", self.samples)
        self.batch_size = max(1, IWAE_ELEMENTS_PER_PASS // self.samples)

    @torch.no_grad()
    def on_epoch_end(self, trainer, metrics):
        epoch = metrics["epoch"]
        if not trainer.is_due(epoch, self.every):
            return
        vae = trainer.vae
        vae.eval()
        devices = [trainer.device] if trainer.device.type == "cuda" else []
        total = 0.0
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(trainer.config.seed + epoch)
            for x in trainer.data.test_batches(self.batch_size):
                total -= float(self.iwae.differentiable_loss(vae.model, vae.guide, x))
        self.iwae.take_terms()  # the recorded terms are not wanted here
        metrics.update(test_iwae_bound=total / len(trainer.data.test),
                       iwae_samples=self.samples, train_seconds=trainer.train_seconds)


class CollapseDiagnostics(Callback):
    """Active units, KL per dimension and I(x; z) on the test set (``pyrovae.collapse``),
    every ``config.diagnostics_every`` epochs and in the last, from their own RNG stream,
    so that they are the same wherever a run resumed and however often they ran."""

    def __init__(self, config: TrainConfig):
        self.every = config.diagnostics_every

    def on_epoch_end(self, trainer, metrics):
        if not trainer.is_due(metrics["epoch"], self.every):
            return
        diagnostics = collapse_diagnostics(trainer.vae, trainer.data.test,
                                           seed=trainer.config.seed)
        metrics.update({key: diagnostics[key] for key in DIAGNOSTIC_KEYS})


class TensorBoard(Callback):
    """The epoch's metrics as TensorBoard scalars and, every ``image_every`` epochs (and
    in the first and last), grids of test reconstructions and prior samples, written
    into ``RUN/tensorboard`` by ``torch.utils.tensorboard.SummaryWriter``. It comes
    after the callbacks whose metrics it writes. A resumed run drops what an
    interrupted one wrote after its checkpoint (``purge_step``), so no epoch shows twice.
    """

    # metrics key -> TensorBoard tag; grouped by what they measure
    SCALARS = {"train_elbo": "elbo/train", "test_elbo": "elbo/test", "test_iwae": "iwae/test",
               "val_elbo": "elbo/valid", "test_iwae_bound": "iwae/test_bound",
               "objective": "objective/train", "train_kl": "kl/train", "kl": "kl/test",
               "train_recon": "recon/train", "recon": "recon/test",
               "active_units": "collapse/active_units",
               "mutual_information": "collapse/mutual_information"}
    GRID_IMAGES = 32  # test images reconstructed, and prior samples, per grid

    def __init__(self, image_every: int = 5):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise PyrovaeError(
                "--tensorboard needs the tensorboard package, which is not installed: pip "
                "install 'pyrovae[tensorboard]' (or pip install tensorboard).") from None
        self.writer_class = SummaryWriter
        self.image_every = image_every
        self.writer = None

    def on_epoch_end(self, trainer, metrics):
        epoch = metrics["epoch"]
        if self.writer is None:
            if trainer.out is None:
                raise PyrovaeError("TensorBoard writes into the run folder: give the Trainer "
                                   "out=RUN.")
            self.writer = self.writer_class(str(Path(trainer.out) / TENSORBOARD_DIR),
                                            purge_step=epoch)
        for key, tag in self.SCALARS.items():
            if isinstance(metrics.get(key), (int, float)):
                self.writer.add_scalar(tag, metrics[key], epoch)
        self.writer.add_scalar("train/lr", metrics.get("lr", trainer.optim.lr), epoch)
        self.writer.add_scalar("train/beta", trainer.config.beta_at(epoch), epoch)
        if epoch == 1 or epoch % self.image_every == 0 or epoch == trainer.config.epochs:
            self._images(trainer, epoch)
        self.writer.flush()

    def _images(self, trainer, epoch: int) -> None:
        vae = trainer.vae
        if not is_image_shape(vae.x_shape):
            return  # tabular data: no picture to draw
        from torchvision.utils import make_grid

        with vae.evaluating(seed=trainer.config.seed):  # its own draws, as the figures'
            x = trainer.data.test[: self.GRID_IMAGES].to(vae.device)
            recon, samples = vae.reconstruct(x), vae.sample(self.GRID_IMAGES)
        # originals and reconstructions side by side; a likelihood's mean may leave [0, 1]
        # (gaussian), which an image cannot show
        pairs = torch.stack([x, recon], dim=1).flatten(0, 1)
        for tag, images in (("images/reconstructions", pairs), ("images/samples", samples)):
            images = images.detach().float().clamp(0, 1).cpu()
            if images.dim() == 3:
                images = images.unsqueeze(1)
            self.writer.add_image(tag, make_grid(images, nrow=8, pad_value=1.0), epoch)


def default_callbacks(config: TrainConfig) -> list[Callback]:
    """TensorBoard comes last, after the callbacks whose metrics it writes."""
    return ([TestELBO(config)] + ([ValidationELBO(config)] if config.val_size else [])
            + [CollapseDiagnostics(config)] + ([TestIWAE(config)] if config.iwae_every else [])
            + ([TensorBoard()] if config.tensorboard else []))


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
        # replays it; random_batch also applies dynamic binarization
        trainer = self.trainer
        seed = int(torch.randint(2**62, (1,), generator=trainer.generator,
                                 device=trainer.device))
        generator = torch.Generator(device=trainer.device).manual_seed(seed)
        batch = trainer.data.random_batch(trainer.config.batch_size, generator)
        if trainer.data.streamed:  # read from disk just now: not yet checked
            trainer.vae.check_data(batch, "a random training batch")
        return batch

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


class _ShardLoss(nn.Module):
    """What DDP wraps: the VAE, whose parameters DDP keeps in step, and the objective's
    differentiable loss of this process's block of the batch (``forward``)."""

    def __init__(self, vae: VAE):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, objective) -> torch.Tensor:
        return objective.differentiable_loss(self.vae.model, self.vae.guide, x)


class DataParallelStep:
    """One SVI step of data-parallel training (torchrun): each process takes its block
    of the batch (``Dataset.train_batches(shard=...)``), and
    ``torch.nn.parallel.DistributedDataParallel`` averages the gradients.

    The design, and why. DDP must see the loss come out of the module it wraps and
    run the backward itself, so the wrapped module's ``forward`` returns the
    objective's ``differentiable_loss`` of the block, as Pyro's ``ELBOModule``
    (``Trace_ELBO()(model, guide)``) does. ``ELBOModule`` itself takes a model and a
    guide that are modules; the VAE's are methods of one module, so the VAE is what
    is wrapped here. Pyro's ``module_local_params`` setting is not needed: it
    concerns ``PyroModule`` parameters, while the VAE registers plain ``nn.Module``s
    with ``pyro.module``, whose entries in the global param store are the modules'
    own ``Parameter`` objects. The store, DDP and the optimizer thus share one set of
    tensors: DDP broadcasts rank 0's values into them and averages their gradients,
    ``FusedOptim`` steps them by their param-store names, and the checkpoint has
    the same format for one process and many (a run may resume with another number).

    Each process's loss is multiplied by the number of processes: DDP averages the
    gradients, so that their sum, the gradient of the whole batch's loss, is what the
    optimizer gets, as in one process, even where the last batch splits unevenly.
    The factor multiplies the loss (each datapoint's term of the objective), not the
    sites: a ``poutine.scale`` would land inside IWAE's log-mean-exp. A process whose
    block is empty (a last batch smaller than the number of processes) still joins
    the gradient average, with a zero-weighted loss of one test datapoint.

    The step is eager: the compiled step (``CompiledTerms``) runs its backward inside
    the call of its graph, before DDP could see the loss.
    """

    def __init__(self, trainer: "Trainer"):
        self.trainer = trainer
        self.world_size = distributed.world_size()
        # the zero-weighted steps and the probe below record their terms here, not in the
        # metrics
        self.spare = trainer.make_objective()
        module = _ShardLoss(trainer.vae)
        device = trainer.device
        self.module = DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=self._has_unused_parameters(module))
        self.params: list[torch.Tensor] | None = None  # found in the first step, as FusedSVI does
        self.traced: list[torch.Tensor] = []

    def _has_unused_parameters(self, module: _ShardLoss) -> bool:
        """Whether some parameter gets no gradient from the loss: then DDP must look for
        them in every step (it costs a walk of the graph), or it would wait for them."""
        probe = self.trainer.data.test[:1]
        params = [p for p in module.parameters() if p.requires_grad]
        devices = [probe.device] if probe.is_cuda else []
        with torch.random.fork_rng(devices=devices):
            loss = module(probe, self.spare)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        self.spare.take_terms()
        pyro.clear_param_store()  # registered again, by name, in the first step
        return any(g is None for g in grads)

    def __call__(self, x: torch.Tensor) -> float:
        objective, weight = self.trainer.elbo, float(self.world_size)
        if len(x) == 0:
            x, objective, weight = self.trainer.data.test[:1], self.spare, 0.0
        if self.params is None:  # with Pyro's validation, and finding the parameters
            with poutine.trace(param_only=True) as capture:
                loss = self.module(x, objective)
            params = {name: site["value"].unconstrained()
                      for name, site in capture.trace.nodes.items()}
            self.traced = self.params = list(params.values())
        else:
            with pyro.validation_enabled(False):
                loss = self.module(x, objective)
        (loss * weight).backward()
        self.trainer.optim(self.params)
        for p in self.traced:
            p.grad = None
        return float(loss.detach()) if weight else 0.0


# ---------------------------------------------------------------- the trainer


class _Interrupted(Exception):
    """Ctrl-C in an epoch's steps; ``together`` where every process stopped after the
    same step (``_StopRequests``), so that they can save it."""

    def __init__(self, step: int, together: bool = False):
        self.step, self.together = step, together


class _StopRequests:
    """Ctrl-C and SIGTERM during data-parallel training, held until every process
    knows of them.

    A KeyboardInterrupt raised in one process's step leaves the others waiting in the
    step's collectives, each stopped at another step, and none can save. While the
    epochs run, these signals only record a request here; it travels with the
    all-reduce that every step makes anyway (the batch's loss), so that all the
    processes stop after the same step and save it together. Process 0's extras,
    which may take minutes and which nobody waits on midway, are ``released``: there
    Ctrl-C acts at once, and the others learn of it at the epoch's end
    (``Trainer._stops_told``). torchrun passes the
    signal it gets (Ctrl-C, or SIGTERM at a scheduler's time limit) to every worker,
    and kills them 30 s later: a step and a checkpoint fit well within.

    Only signals that Python handles are held: Ctrl-C, and SIGTERM where ``pyrovae
    train`` turns it into Ctrl-C. A SIGTERM left to the system's default still ends
    the process at once. Repeats are ignored, as torchrun repeats the terminal's
    Ctrl-C; a process whose peers have gone stops at the process group's timeout.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal: int | None = None  # the first received, until the processes act on it
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def __enter__(self) -> "_StopRequests":
        if threading.current_thread() is threading.main_thread():  # signals go to main
            for signum in self.SIGNALS:
                handler = signal.getsignal(signum)
                if callable(handler):
                    self._previous[signum] = signal.signal(signum, self._record)
        return self

    def _record(self, signum, frame) -> None:
        if self.signal is None:
            self.signal = signum

    @contextlib.contextmanager
    def released(self):
        """Ctrl-C and SIGTERM act at once again, recorded first: for work that one
        process does alone (process 0's extras, an evaluation that may take minutes),
        which no other process waits on midway. A request held already acts on entry."""
        if not self._previous:  # not held
            yield
            return
        if self.requested:
            self._previous[self.signal](self.signal, None)

        def record_and_pass_on(signum, frame):
            self._record(signum, frame)
            self._previous[signum](signum, frame)

        for signum in self._previous:
            signal.signal(signum, record_and_pass_on)
        try:
            yield
        finally:
            for signum in self._previous:
                signal.signal(signum, self._record)

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


class _Diverged(Exception):
    def __init__(self, step: int, what: str):
        self.step, self.what = step, what


class Trainer:
    """Trains a VAE with ``pyro.infer.SVI`` and writes a run folder.

    The trainer owns Pyro's global param store while it runs: it clears it on
    start, because ``pyro.module`` would otherwise hand SVI stale parameters of
    an earlier model registered under the same names. ``callbacks`` default to
    the test ELBO and the collapse diagnostics (and TensorBoard with
    ``config.tensorboard``).

    Under torchrun (a ``torch.distributed`` process group of several processes,
    ``pyrovae.distributed``) it trains data-parallel: every process builds the same
    Trainer on the same folder; each takes its block of every batch, and only rank 0
    writes the run folder, logs and runs the callbacks.
    """

    def __init__(self, vae: VAE, data: Dataset, config: TrainConfig, out=None,
                 progress: bool = True, callbacks: list[Callback] | None = None,
                 overwrite: bool = False, _resuming: bool = False):
        config.validate()
        if hasattr(vae, "check_objective"):  # several stochastic layers refuse some objectives
            vae.check_objective(config.elbo, config.estimator)
        self.config = config
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self.device = distributed.local_device(resolve_device(config.device))
        if self.world_size > 1:
            self._check_data_parallel(config)
            distributed.quiet_other_ranks(log)
        if config.tensorboard and out is None:
            raise PyrovaeError("--tensorboard (TrainConfig(tensorboard=True)) writes into the "
                               "run folder: give the Trainer out=RUN.")
        data = self._with_validation(data, config)  # refused, if at all, before the folder
        if out is not None and not _resuming:
            # before any work: a folder that cannot be written, or one holding another
            # run's or the user's files, is refused now, not after an epoch
            with distributed.rank_zero_first():
                if self.rank == 0:
                    run.claim_folder(out, overwrite)
        self.vae = vae.to(self.device)
        self.data = data.to(self.device)
        if not _resuming and not getattr(vae.prior, "initialized", True):
            # a prior with parameters in data space (vamp's pseudo-inputs) starts from the
            # training data, unless the user initialized it already
            vae.prior.initialize(self.data.head() if self.data.streamed else self.data.train)
        self.out = Path(out) if out is not None else None
        self.progress = progress
        self.callbacks = default_callbacks(config) if callbacks is None else list(callbacks)
        self.elbo = self.make_objective()
        # torch's fused Adam: one kernel for all parameters, a third of the time of
        # the default one on CPU; the same update up to float rounding
        self.optim = FusedOptim(torch.optim.Adam, {"lr": config.lr, "fused": True},
                                schedule=make_lr_schedule(
                                    config.lr_schedule, config.epochs, step=config.lr_step,
                                    gamma=config.lr_gamma, lr_min=config.lr_min))
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.epoch = 0
        self.saved_epoch: int | None = None  # the epoch of the checkpoint on disk
        self.first_loss: float | None = None  # per datapoint, the scale of divergence
        self._stop_requests, self._stop_after_steps = _StopRequests(), False
        self.metrics: list[dict] = []
        # the best epoch by the validation ELBO, {"epoch", "val_elbo"} (ValidationELBO)
        self.best: dict | None = None
        # the wall time of the epochs' steps so far, without checkpoints and callbacks
        self.train_seconds = 0.0
        self.out_of_time = False  # --time-budget spent: the current epoch is the last
        # the epoch whose steps are saved and whose extras have not ended: its metrics so
        # far and the seconds it took; the checkpoint holds it, so that a process stopped
        # in the extras (a session's end) leaves them to the resumed run
        self._epoch_end: dict | None = None
        self.aggressive = AggressiveStep(self) if config.aggressive else None
        self._check_data()
        slow = self._slow_estimator()
        if slow:
            log.warning(slow)

    def make_objective(self):
        c = self.config
        return make_elbo(c.elbo, c.num_particles, estimator=c.estimator, beta=c.beta_at(1),
                         free_bits=c.free_bits, kl_weighted=c.kl_weighted,
                         jit=self._why_eager() is None)

    def _slow_estimator(self) -> str | None:
        """Why the steps will be slow where STL or DReG score z under a guide that inverts
        itself to do so (a flow): said when the trainer is built, not found out after an
        epoch."""
        guide = self.vae.guide_family
        passes = guide.scoring_passes
        if self.config.estimator == "reparam" or passes <= 1:
            return None
        return (f"--estimator {self.config.estimator} scores each z under a copy of the "
                f"{guide.name!r} guide with its parameters detached, which inverts the guide: "
                f"{passes} network passes per particle in every step, where scoring its own "
                f"draws takes one per flow step. Expect each step to be many times slower "
                f"than with --estimator reparam.")

    def _why_eager(self) -> str | None:
        c = self.config
        if not c.jit:
            return "jit is off"
        if self.world_size > 1:
            return ("data-parallel training: DDP must see the loss before its backward, which "
                    "the compiled step runs inside its graph")
        return why_not_compiled(c.elbo, c.estimator, c.kl_weighted)

    @staticmethod
    def _check_data_parallel(config: TrainConfig) -> None:
        """What data-parallel training cannot make the same objective as one process."""
        if config.aggressive:
            raise PyrovaeError(
                "--aggressive steps the guide and the model apart on batches of their own, "
                "which data-parallel training does not split among processes; train it in "
                "one process (python -m pyrovae train, without torchrun).")
        if config.free_bits > 0:
            raise PyrovaeError(
                "--free-bits clamps the KL averaged over the whole batch, and each process "
                "would clamp its own block's average, another objective; train with free "
                "bits in one process (without torchrun), or leave --free-bits out.")

    # ------------------------------------------------------------ set-up
    @staticmethod
    def _with_validation(data: Dataset, config: TrainConfig) -> Dataset:
        """The data with the validation set that ``config.val_size`` asks for: held out
        here from data passed in without one, so that a Python caller gets what the
        config (and with it config.json) says."""
        if data.valid is not None and not config.val_size:
            raise PyrovaeError(
                "the data hold a validation set, but TrainConfig.val_size is 0, so config.json "
                "would not rebuild it: set val_size to the count it was held out with (or "
                "'official'), or pass the data without it.")
        if config.val_size and data.valid is None:
            if config.val_size == OFFICIAL_VALIDATION:
                raise PyrovaeError(
                    f"val_size={OFFICIAL_VALIDATION!r} needs the data set's own validation "
                    f"split: load the data with load_dataset('binarized-mnist', ..., "
                    f"val_size={OFFICIAL_VALIDATION!r}).")
            if data.streamed:
                raise PyrovaeError("a validation set is held out of a training set in memory; "
                                   "load the data without streaming (stream=False).")
            return data.hold_out_validation(config.val_size, config.seed)
        return data

    def _check_data(self):
        if self.data.streamed:  # its training batches are checked as they are read
            self.vae.check_data(self.data.test, "test set")
            return
        if self.data.binarize == "dynamic":  # stored grey; bernoulli draws are binary
            sample = next(self.data.train_batches(self.config.batch_size, torch.Generator(
                device=self.device).manual_seed(0)))
            self.vae.check_data(sample, "training batch")
        else:
            self.vae.check_data(self.data.train, "training set")
        self.vae.check_data(self.data.test, "test set")
        if self.data.valid is not None:
            self.vae.check_data(self.data.valid, "validation set")

    def _save(self, interrupted_at_step: int | None = None):
        """The checkpoint, config and metrics; the RNG state saved is the current one."""
        if self.out is None:
            return
        # the metrics first: a process stopped between the two leaves a checkpoint whose
        # epoch's extras the resumed run runs again, never one whose metrics are lost
        if self.rank == 0:
            run.write_metrics(self.out, self.metrics)
        self._save_checkpoint(interrupted_at_step)

    def _process_rng(self) -> dict:
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def _save_checkpoint(self, interrupted_at_step: int | None = None):
        """Every process calls it: each one's Monte Carlo stream is saved (rank 0's, and
        under data-parallel training all of them), so that a resumed run replays them."""
        if self.out is None:
            return
        processes = distributed.all_gather(self._process_rng())
        if self.rank == 0:
            self._write_checkpoint(processes, interrupted_at_step)
        # no process goes on, to a resume that reads it say, before it is on disk
        distributed.barrier()

    def _write_checkpoint(self, processes: list[dict], interrupted_at_step: int | None):
        run.write_config(self.out, self.vae.config, self.config)
        rng = {**processes[0], "generator": self.generator.get_state()}
        if self.world_size > 1:
            rng["processes"] = processes
        aggressive = self.aggressive
        run.write_checkpoint(self.out, {
            "model": self.vae.state_dict(),
            "optimizer": self.optim.get_state(),
            "epoch": self.epoch,
            "interrupted_at_step": interrupted_at_step,
            "rng": rng,
            "aggressive": {"on": aggressive is not None,
                           "mutual_info": aggressive.mutual_info if aggressive else []},
            "train_seconds": self.train_seconds,
            "epoch_end": self._epoch_end,
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
        # the saved paths are absolute, and one size means a square image
        for key in ("dataset", "test_data"):
            if isinstance(changes.get(key), (str, os.PathLike)) and Path(changes[key]).exists():
                changes[key] = str(Path(changes[key]).expanduser().resolve())
        if isinstance(changes.get("image_size"), (list, tuple)) and len(changes["image_size"]) == 1:
            changes["image_size"] = list(changes["image_size"]) * 2
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
        vae, data, _ = load_run(folder, config.data_dir, config=config)
        trainer = cls(vae.train(), data, config, out=folder, progress=progress, _resuming=True)
        trainer.saved_epoch = checkpoint["epoch"]
        trainer.optim.set_state(checkpoint["optimizer"])
        trainer.epoch = checkpoint["epoch"]
        # the schedule's position: the epochs done (the optimizer replays them, svi.FusedOptim)
        trainer.optim.schedule_steps = checkpoint["epoch"]
        trainer.train_seconds = checkpoint.get("train_seconds", 0.0)
        if config.val_size and run.checkpoint_path(folder, "best").is_file():
            best = run.read_checkpoint(folder, which="best")
            trainer.best = {"epoch": best["epoch"], "val_elbo": best["val_elbo"]}
        if "aggressive" in checkpoint:
            saved = checkpoint["aggressive"]
            trainer.aggressive = AggressiveStep(trainer, saved["mutual_info"]) \
                if saved["on"] else None
        trainer._restore_rng(checkpoint["rng"])
        trainer._epoch_end = checkpoint.get("epoch_end")
        kept = trainer.epoch - (trainer._epoch_end is not None)  # fit() ends that one
        trainer.metrics = [m for m in run.read_metrics(folder) if m["epoch"] <= kept]
        return trainer

    def _restore_rng(self, saved: dict) -> None:
        """The data order's generator, the same on every process, and this process's own
        Monte Carlo stream: as saved where the run had as many processes, else (a run
        resumed on another number of processes) a new independent stream for each
        process but rank 0, which the log names."""
        self.generator.set_state(saved["generator"].cpu())
        processes = saved.get("processes", [saved])
        if len(processes) == self.world_size or self.rank == 0:
            mine = processes[self.rank]
        else:
            seed = distributed.stream_seed(self.config.seed + self.epoch, self.rank)
            mine = {"torch": torch.Generator().manual_seed(seed).get_state()}
        if len(processes) != self.world_size and self.world_size > 1 and self.rank == 0:
            log.info(f"the run was saved by {len(processes)} process(es) and resumes on "
                     f"{self.world_size}: processes 1 to {self.world_size - 1} draw new Monte "
                     f"Carlo streams (the data order and rank 0's stay as saved).")
        torch.set_rng_state(mine["torch"].cpu())
        if "cuda" in mine and self.device.type == "cuda":
            torch.cuda.set_rng_state(mine["cuda"].cpu(), self.device)
        elif self.device.type == "cuda" and len(processes) != self.world_size:
            torch.cuda.manual_seed(distributed.stream_seed(self.config.seed + self.epoch,
                                                           self.rank))

    # ------------------------------------------------------------ loop
    def fit(self) -> list[dict]:
        """Train to ``config.epochs``; return the metrics, one dict per epoch.

        Ctrl-C saves a checkpoint and returns; ``self.interrupted`` tells.
        """
        if self.epoch == 0:  # a resumed run restores the RNG from its checkpoint instead
            pyro.set_rng_seed(self.config.seed)
            if self.rank:  # each process its own Monte Carlo stream; the data order is shared
                torch.manual_seed(distributed.stream_seed(self.config.seed, self.rank))
        pyro.clear_param_store()
        self.interrupted = False
        self._stop_requests, self._stop_after_steps = _StopRequests(), False
        plain = PlainStep(self)
        probe = self.data.test[: min(len(self.data.test), 8)]
        log.info(describe_kl_methods(kl_methods(self.vae.model, self.vae.guide, probe),
                                     self.config.elbo))
        why_eager = self._why_eager()
        log.info("step: compiled by pyro.ops.jit, one graph per batch shape" if why_eager is None
                 else f"step: eager ({why_eager})")
        parallel = DataParallelStep(self) if self.world_size > 1 else None
        if parallel:
            log.info(f"data-parallel training on {self.world_size} processes "
                     f"({torch.distributed.get_backend()}): each takes its block of every batch "
                     f"of {self.config.batch_size}")
        # data-parallel: Ctrl-C and SIGTERM wait until the processes can stop together
        with self._stop_requests if parallel else contextlib.nullcontext():
            self._train_epochs(parallel, plain)
        return self.metrics

    def _train_epochs(self, parallel: DataParallelStep | None, plain: PlainStep) -> None:
        """The epochs left, each its steps and its extras; first the extras of an epoch
        whose process stopped in them."""
        if self._epoch_end is not None:  # resumed after its process stopped in the extras
            log.info(f"epoch {self.epoch}: its steps were saved, its extras had not ended; "
                     f"running them")
            self.out_of_time = self._out_of_time()
            saved = self._epoch_end
            if not self._end_epoch(dict(saved["metrics"]),
                                   time.perf_counter() - saved["seconds"]) or self.out_of_time:
                return
        if self._out_of_time():  # a resumed run whose budget was spent already
            log.info(f"no epoch to train: the time budget (--time-budget "
                     f"{self.config.time_budget:g}) was spent in {self.train_seconds:.0f} s of "
                     f"steps; resume with a larger --time-budget to go on.")
            return
        while self.epoch < self.config.epochs:
            epoch = self.epoch + 1
            started = time.perf_counter()
            beta = self.config.beta_at(epoch)
            if self.config.kl_weighted:  # then make_elbo gave KL-weighted objectives
                for objective in self.aggressive.objectives if self.aggressive else [self.elbo]:
                    objective.beta = beta
            metrics = self._epoch_steps(epoch, parallel or self.aggressive or plain, started)
            if metrics is None:  # interrupted in the steps, and saved where it could be
                return
            if self._stop_after_steps:  # every process was told together, after the steps
                self._stopped_after_steps(metrics)
                return
            if not self._end_epoch(metrics, started):
                return
            if self.out_of_time:
                log.info(f"time budget reached: {self.train_seconds:.0f} s of training steps "
                         f"(--time-budget {self.config.time_budget:g}); the run ends after "
                         f"epoch {epoch} of {self.config.epochs}.")
                return

    def _epoch_steps(self, epoch: int, step, started: float) -> dict | None:
        """The steps of epoch ``epoch`` and their checkpoint; their metrics, or None where
        Ctrl-C interrupted them (the run is then saved where it can be)."""
        steps_started = time.perf_counter()
        try:
            train = self._train_epoch(step, epoch)
        except _Interrupted as interrupt:
            self._interrupted(epoch, interrupt.step, interrupt.together)
            return None
        except _Diverged as diverged:
            raise NonFiniteLossError(
                f"{diverged.what} in epoch {epoch} at step {diverged.step}. "
                f"{self._kept_checkpoint()} Try a smaller "
                f"--lr, check the data for extreme values, or a likelihood with a variance "
                f"floor (gaussian keeps sigma above min_scale).") from None
        self.train_seconds += time.perf_counter() - steps_started
        self.out_of_time = self._out_of_time()
        self.epoch = epoch
        metrics = {"epoch": epoch, "train_elbo": train["elbo"], "train_kl": train["kl"],
                   "train_recon": train["recon"], "objective": train["objective"],
                   "lr": self.optim.lr}  # the epoch's: the schedule steps next
        self.optim.step_schedule()
        if self.config.kl_weighted:
            metrics["beta"] = self.config.beta_at(epoch)
        # the epoch's steps are saved before any extra runs: an extra that fails or
        # is interrupted cannot lose them
        self._epoch_end = {"metrics": dict(metrics),
                           "seconds": time.perf_counter() - started}
        self._save_checkpoint()
        return metrics

    def _end_epoch(self, metrics: dict, started: float) -> bool:
        """The extras of the epoch whose steps are saved, then its metrics and checkpoint;
        False where Ctrl-C interrupted the extras (the resumed run runs them again), or
        the data-parallel processes stop together after them."""
        epoch = metrics["epoch"]
        extras = self.callbacks if self.rank == 0 else []
        try:  # the others hold a request while they wait, and stop after the extras
            with self._stop_requests.released() if extras else contextlib.nullcontext():
                for callback in extras:
                    self._run_callback(callback, metrics)
            in_the_extras = False
        except KeyboardInterrupt:
            in_the_extras = True
        in_the_extras, after_them = self._stops_told(in_the_extras)
        if in_the_extras:
            self._stopped_after_steps(metrics)
            return False
        if self.aggressive:
            metrics["aggressive"] = True
            if "mutual_information" in metrics and \
                    not self.aggressive.keeps_on(epoch, metrics["mutual_information"]):
                self.aggressive = None
        metrics["seconds"] = time.perf_counter() - started
        self.metrics.append(metrics)
        self._epoch_end = None
        self._save()
        log.info(f"epoch {epoch}/{self.config.epochs}  train ELBO {metrics['train_elbo']:.3f}"
                 + _extras(metrics) + "  (nats per datapoint)")
        if after_them:
            self.interrupted = True
            log.info(f"interrupted after epoch {epoch}; checkpoint saved"
                     + (f" in {self.out}" if self.out else "") + ".")
            return False
        return True

    def _stops_told(self, in_the_extras: bool) -> tuple[bool, bool]:
        """Whether a process was stopped in the extras of an epoch, and whether one was
        asked to stop since the epoch's steps: under data-parallel training every
        process is told, and stops with it. The others wait here while process 0 runs
        the extras, which Ctrl-C interrupts at once (``_StopRequests.released``)."""
        if self.world_size == 1:
            return in_the_extras, False
        told = distributed.all_reduce_sum(
            [float(in_the_extras), float(self._stop_requests.requested)], self.device)
        return told[0] > 0, told[1] > 0

    def is_due(self, epoch: int, every: int) -> bool:
        """Whether a periodic extra runs after ``epoch``: every ``every`` epochs, and in
        the run's last, whether ``--epochs`` or ``--time-budget`` ends it."""
        return epoch % every == 0 or epoch == self.config.epochs or self.out_of_time

    def _out_of_time(self) -> bool:
        """Whether the steps' time has reached the budget: the same answer on every
        process of a data-parallel run (whose clocks differ), or they would wait for each
        other at the next step."""
        if self.config.time_budget is None:
            return False
        spent = self.train_seconds >= self.config.time_budget
        if self.world_size > 1:
            spent = distributed.all_reduce_sum([float(spent)], self.device)[0] > 0
        return spent

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

    def _stopped_after_steps(self, metrics: dict) -> None:
        """Interrupted once the steps of epoch ``metrics["epoch"]`` were saved."""
        self.metrics.append(metrics)  # what the epoch has so far, for the caller
        if self.out is not None and self.rank == 0:
            run.write_metrics(self.out, self.metrics)
        self.interrupted = True
        log.info(f"interrupted after the steps of epoch {metrics['epoch']}; its checkpoint is "
                 f"saved" + (f" in {self.out}" if self.out else "") + ", and a resumed "
                 f"run begins with the epoch's extras.")

    @property
    def stop_signal(self) -> int | None:
        """The signal that stopped data-parallel training together (``_StopRequests``)."""
        return self._stop_requests.signal

    def _interrupted(self, epoch: int, step: int, together: bool = False) -> None:
        self.interrupted = True
        if self.world_size > 1 and not together:
            # the processes stop at different steps, and saving would wait for all of them
            log.warning(f"interrupted in epoch {epoch}; the checkpoint of epoch {self.epoch} "
                        f"is kept" + (f" in {self.out}" if self.out else "") + ".")
            return
        self._save(interrupted_at_step=step)
        log.info(f"interrupted in epoch {epoch} at step {step}; checkpoint saved"
                 + (f" in {self.out}" if self.out else "") + ".")

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
        shard = (self.rank, self.world_size) if self.world_size > 1 else None
        batches = self.data.train_batches(self.config.batch_size, self.generator, shard=shard)
        num_batches = self.data.num_batches(self.config.batch_size)
        bar = tqdm(batches, total=num_batches, desc=f"epoch {epoch}", leave=False,
                   disable=not self.progress or self.rank != 0)
        index = 0
        stop = self._stop_requests  # held by fit under data-parallel training
        try:
            for index, x in enumerate(bar, start=1):
                if self.data.streamed and len(x):  # read from disk just now: not yet checked
                    self.vae.check_data(x, f"training batch {index} of epoch {epoch}")
                loss, n = step(x), x.shape[0]
                if shard:  # the whole batch's, the same on every process
                    loss, n, stops = distributed.all_reduce_sum(
                        [loss, n, stop.requested], self.device)
                self._check_loss(loss, n, index)
                total_loss += loss
                n_seen += n
                if shard and stops:
                    raise _Interrupted(index, together=True)
        except KeyboardInterrupt:
            raise _Interrupted(index) from None
        terms = self.elbo.take_terms()
        if shard:  # a request after the last step's all-reduce is seen here
            recon, elbo, stops = distributed.all_reduce_sum(
                [terms["recon"], terms["elbo"], stop.requested], self.device)
            terms = {"recon": recon, "elbo": elbo}
            self._stop_after_steps = stops > 0
        return per_datapoint(self.elbo, total_loss, n_seen, terms)


def per_datapoint(objective, total_loss: float, n: int, terms: dict | None = None) -> dict:
    """The objective's recorded terms (which it then forgets) and loss, in nats per
    datapoint; or ``terms`` where they were taken already."""
    terms = objective.take_terms() if terms is None else terms
    recon, elbo = float(terms["recon"]) / n, float(terms["elbo"]) / n
    return {"elbo": elbo, "recon": recon, "kl": recon - elbo, "objective": -total_loss / n}


def _extras(metrics: dict) -> str:
    """The log line's optional part; the objective only where it is not the ELBO."""
    shown = {"test_elbo": "test ELBO", "kl": "KL", "recon": "recon", "val_elbo": "val ELBO"}
    if "test_iwae" in metrics or "beta" in metrics:
        shown["objective"] = "objective"
    labels = {**shown, "test_iwae": "test IWAE", "test_iwae_bound": "test IWAE bound",
              "beta": "beta", "active_units": "active units",
              "mutual_information": "MI"}
    line = "".join(f"  {label} {metrics[key]:.3f}" if isinstance(metrics[key], float) else
                   f"  {label} {metrics[key]}" for key, label in labels.items() if key in metrics)
    if "mutual_information_datapoints" in metrics:
        # the estimate cannot pass log N: near it, it says only that the posteriors of
        # the N datapoints hardly overlap (docs/diagnostics.md)
        line += f" (at most log {metrics['mutual_information_datapoints']} = " \
                f"{math.log(metrics['mutual_information_datapoints']):.3f})"
    return line
