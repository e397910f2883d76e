"""The VAE: a Pyro ``model`` p(z) p(x|z) and a Pyro ``guide`` q(z|x), and its helpers.

Saved as ``config.json`` (how to rebuild it) plus ``checkpoint.pt`` (its
``state_dict`` under the key ``"model"``) through ``pyrovae.run``, and loaded
in one call. ``load_run`` rebuilds a whole run: the VAE, its data and its
training config.
"""

from __future__ import annotations

import contextlib
import weakref
from pathlib import Path

import pyro
import torch
from pyro.infer.util import is_validation_enabled
from torch import nn

from pyrovae import run
from pyrovae.data import Dataset, load_dataset
from pyrovae.errors import DataError, PyrovaeError
from pyrovae.families import (
    GUIDES,
    LIKELIHOODS,
    PRIORS,
    check_supports,
    make_guide,
    make_likelihood,
    make_prior,
)
from pyrovae.families.base import check_positive_int
from pyrovae.networks import MLPDecoder, MLPEncoder, check_hidden
from pyrovae.run import CHECKPOINT_FILE, CONFIG_FILE, ModelConfig, TrainConfig  # noqa: F401

_DEFAULTS = ModelConfig()


class VAE(nn.Module):
    """A variational autoencoder with swappable prior, guide, likelihood and networks.

    Families are given by registered name (with ``*_kwargs``) or as objects;
    ``encoder`` and ``decoder`` replace the MLPs (see ``pyrovae.networks`` for
    the shapes they must map between).
    """

    def __init__(self, x_shape, z_dim: int = _DEFAULTS.z_dim, prior="normal", guide="normal",
                 likelihood="bernoulli", hidden=_DEFAULTS.hidden,
                 activation=_DEFAULTS.activation,
                 encoder: nn.Module | None = None, decoder: nn.Module | None = None,
                 prior_kwargs=None, guide_kwargs=None, likelihood_kwargs=None):
        super().__init__()
        if isinstance(x_shape, (str, bytes)) or not hasattr(x_shape, "__iter__"):
            raise PyrovaeError(f"x_shape must be a tuple of image sizes such as (28, 28), "
                               f"got {x_shape!r}.")
        self.x_shape = tuple(check_positive_int(n, f"each size of x_shape {tuple(x_shape)}")
                             for n in x_shape)
        self.z_dim = check_positive_int(z_dim, "--z-dim (z_dim)")
        hidden = check_hidden(hidden)
        self.prior = make_prior(prior, self.z_dim, **(prior_kwargs or {}))
        self.guide_family = make_guide(guide, self.z_dim, **(guide_kwargs or {}))
        self.likelihood = make_likelihood(likelihood, self.x_shape, **(likelihood_kwargs or {}))
        check_supports(self.guide_family, self.prior)
        self.encoder = encoder or MLPEncoder(
            self.x_shape, self.z_dim, self.guide_family.num_params, hidden, activation)
        self.decoder = decoder or MLPDecoder(
            self.x_shape, self.z_dim, self.likelihood.num_params, hidden, activation)
        self.config = ModelConfig(
            x_shape=self.x_shape, z_dim=self.z_dim,
            prior=_family_config(self.prior), guide=_family_config(self.guide_family),
            likelihood=_family_config(self.likelihood), hidden=tuple(hidden),
            activation=activation, encoder="mlp" if encoder is None else "custom",
            decoder="mlp" if decoder is None else "custom").to_dict()
        # pyro.module walks every parameter on each call: register only the
        # families that own parameters, decided once here.
        self._model_modules = [("decoder", self.decoder)] + [
            (n, m) for n, m in (("prior", self.prior), ("likelihood", self.likelihood))
            if m.has_parameters]
        self._guide_modules = [("encoder", self.encoder)] + (
            [("guide_family", self.guide_family)] if self.guide_family.has_parameters else [])

    # ------------------------------------------------------------ Pyro
    def model(self, x: torch.Tensor) -> None:
        self._check_step_data(x)
        for name, module in self._model_modules:
            pyro.module(name, module)
        with data_plate(x):
            z = pyro.sample("z", self.prior(x))
            pyro.sample("x", self.likelihood(self.decoder(z)), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        self._check_step_data(x)
        for name, module in self._guide_modules:
            pyro.module(name, module)
        with data_plate(x):
            pyro.sample("z", self.guide_family(self.encoder(x)))

    # ------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode(self, x: torch.Tensor, batch_size: int | None = None
               ) -> torch.distributions.Distribution:
        """q(z|x) as a distribution with batch shape (N,) and event shape (z_dim,).
        With ``batch_size``, ``x`` is moved to the VAE's device and encoded in
        batches of that size (for a whole data set)."""
        if batch_size is None:
            return self.guide_family(self.encoder(x))
        if len(x) == 0:
            raise PyrovaeError("no data to encode: pass at least one datapoint.")
        return self.guide_family(torch.cat([self.encoder(chunk.to(self.device))
                                            for chunk in x.split(batch_size)]))

    def decode(self, z: torch.Tensor) -> torch.distributions.Distribution:
        """p(x|z) with the whole image as its event."""
        return self.likelihood(self.decoder(z))

    def decode_mean(self, z: torch.Tensor) -> torch.Tensor:
        """The mean image of p(x|z), for reconstructions, samples and figures."""
        return self.likelihood.mean(self.decoder(z))

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of p(x|z) at z = the mean of q(z|x) (the median for heavy tails)."""
        self._check_batch(x)
        return self.decode_mean(posterior_centre(self.encode(x)))

    def sample(self, n: int) -> torch.Tensor:
        """Mean images of p(x|z) for z drawn from the prior."""
        return self.decode_mean(self.prior_distribution().sample((n,)))

    def prior_distribution(self) -> torch.distributions.Distribution:
        """p(z) on the VAE's device and dtype. A prior may take a tensor for them
        (``forward(self, like)``, as user priors written for pyrovae 0.1 do); which
        tensor does not matter."""
        return self.prior(next(self.parameters()))

    @contextlib.contextmanager
    def evaluating(self, seed: int | None = None):
        """No gradients, eval mode restored afterwards, and (with ``seed``) a private
        RNG stream, so that a diagnostic run between epochs neither changes the
        training trajectory nor depends on where training stopped."""
        was_training = self.training
        cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        rng = (torch.random.fork_rng(devices=cuda_devices) if seed is not None
               else contextlib.nullcontext())
        self.eval()
        try:
            with rng, torch.no_grad():
                if seed is not None:
                    torch.manual_seed(seed)
                yield
        finally:
            self.train(was_training)

    def check_data(self, x: torch.Tensor, what: str = "data") -> None:
        """Check type, shape, dtype, finiteness and support, before any SVI step.

        ``x`` may be on another device than the VAE (a data set that is moved batch
        by batch). ``model`` and ``guide`` run the same checks, and that the data
        are on the VAE's device: the cheap ones (type, shape, dtype, device, an
        empty batch) on every call, and the ones that read every
        value (finiteness, the likelihood's support) while Pyro's validation is
        enabled (the default; ``FusedSVI`` turns it off after a run's first step).
        """
        self._check_batch(x, what, same_device=False)
        self._check_values(x, what)

    def _check_step_data(self, x) -> None:
        """The check of ``model`` and ``guide``: the values only under Pyro's validation,
        and only once for a tensor the guide already checked and nobody changed since."""
        self._check_batch(x)
        if not is_validation_enabled():
            return
        checked = getattr(self, "_last_checked", None)
        if checked is not None and checked[0]() is x and checked[1] == x._version:
            return
        self._check_values(x, "data")
        self._last_checked = (weakref.ref(x), x._version)

    def _check_batch(self, x, what="data", same_device=True) -> None:
        """What costs no pass over the values: type, shape, emptiness, dtype, device."""
        if not isinstance(x, torch.Tensor):
            raise DataError(
                f"{what} is a {type(x).__module__}.{type(x).__name__}, not a torch.Tensor; "
                f"convert it with torch.as_tensor(x, dtype=torch.float32).")
        self._check_shape(x, what)
        if x.shape[0] == 0:
            raise DataError(
                f"{what} holds no datapoints (shape {tuple(x.shape)}); pass a batch with at "
                f"least one.")
        if not torch.is_floating_point(x):
            raise DataError(f"{what} has dtype {x.dtype}; convert it with .float().")
        param = next(self.parameters(), None)
        if param is not None and x.dtype != param.dtype:
            raise DataError(
                f"{what} has dtype {x.dtype}, but the VAE's parameters are {param.dtype}; "
                f"convert the data with x.to({param.dtype}) (or the VAE with "
                f"vae.to({x.dtype})).")
        if same_device and param is not None and x.device != param.device:
            raise DataError(
                f"{what} is on {x.device}, but the VAE is on {param.device}; move the data "
                f"with x.to(vae.device) (or the VAE with vae.to({str(x.device)!r})).")

    def _check_values(self, x, what="data") -> None:
        """What reads every value: finiteness and the likelihood's support."""
        # aminmax is one vectorized pass (a NaN or inf shows in the min or max); the
        # elementwise count, some thirty times slower on CPU, only for the message
        if bool(torch.isfinite(torch.stack(torch.aminmax(x))).all()):
            self.likelihood.check_support(x)
            return
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            raise DataError(
                f"{what} holds {int(bad.sum())} NaN or infinite values; remove or impute "
                f"them before training.")
        self.likelihood.check_support(x)

    def _check_shape(self, x, what="data"):
        if tuple(x.shape[1:]) != self.x_shape or x.dim() != len(self.x_shape) + 1:
            raise DataError(
                f"{what} has shape {tuple(x.shape)}, but this VAE takes a batch of shape "
                f"(N, {', '.join(map(str, self.x_shape))}). Reshape the data, or build the "
                f"VAE with x_shape={tuple(x.shape[1:])}.")

    # ------------------------------------------------------------ saving
    def save(self, folder, extra: dict | None = None) -> None:
        """Write config.json and checkpoint.pt (atomically) into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        run.write_config(folder, self.config)
        run.write_checkpoint(folder, {"model": self.state_dict(), **(extra or {})})

    @classmethod
    def from_config(cls, config: dict, **overrides) -> "VAE":
        parsed = ModelConfig.from_dict(config)
        kwargs = dict(x_shape=parsed.x_shape, z_dim=parsed.z_dim,
                      hidden=parsed.hidden, activation=parsed.activation)
        for part in ("prior", "guide", "likelihood"):
            spec = dict(getattr(parsed, part))
            kwargs[part] = spec.pop("name")
            kwargs[f"{part}_kwargs"] = spec
        for part in ("prior", "guide", "likelihood", "encoder", "decoder"):
            value = getattr(parsed, part)
            custom = value == "custom" or (isinstance(value, dict) and value.get("custom"))
            if custom and part not in overrides:
                raise PyrovaeError(
                    f"this VAE was saved with a custom {part}, which config.json cannot "
                    f"rebuild; pass it again: VAE.load(folder, {part}=...).")
            if part in overrides and f"{part}_kwargs" in kwargs:
                kwargs[f"{part}_kwargs"] = None
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def load(cls, folder, map_location="cpu", **overrides) -> "VAE":
        """Rebuild a saved or trained VAE for evaluation. Custom parts not found in
        the registries are passed again as keyword arguments (``encoder=...``)."""
        config = run.read_config(folder)
        if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
            raise PyrovaeError(f"{Path(folder) / run.CONFIG_FILE} has no \"model\" section; "
                               f"pass the folder of a run or of VAE.save.")
        vae = cls.from_config(config["model"], **overrides)
        state = run.read_checkpoint(folder, map_location)["model"]
        try:
            vae.load_state_dict(state)
        except RuntimeError as error:  # the weights do not fit the VAE that config.json builds
            detail = "; ".join(line.strip() for line in str(error).splitlines()[1:4])
            raise PyrovaeError(
                f"the weights in {Path(folder) / run.CHECKPOINT_FILE} do not fit the VAE that "
                f"{run.CONFIG_FILE} describes ({detail}). config.json was changed after "
                f"training, or belongs to another run: restore it, or train again.") from None
        return vae.eval()


def load_run(folder, data_dir: str | None = None, device="cpu") -> tuple[VAE, Dataset, TrainConfig]:
    """A run folder's trained VAE (in eval mode, on ``device``), its data set as
    training loaded it (same binarization and seed), and its TrainConfig."""
    config = run.read_train_config(folder)
    if data_dir is not None:
        config.data_dir = data_dir
    vae = VAE.load(folder, map_location=device).to(device)
    data = load_dataset(config.dataset, config.data_dir, seed=config.seed,
                        binarize=config.resolved_binarize(vae.likelihood.name))
    return vae, data, config


def data_plate(x: torch.Tensor) -> pyro.plate:
    """The plate over the datapoints of ``x``.

    Both sizes are given as Python ints: while a compiled step is recorded
    (``pyrovae.objectives.CompiledTerms``), a size read off a tensor is itself
    a traced tensor, and Pyro would then scale every site's log density by a
    tensor 1.0, some 17 operations a step. The compiled graphs are keyed on
    the batch shape, so a constant size is right for every step that runs one.
    """
    return pyro.plate("data", len(x), subsample_size=len(x), dim=-1)


def posterior_centre(q):
    """A point summary of q(z|x): its mean, or its median for a log-normal guide."""
    if isinstance(getattr(q, "base_dist", q), torch.distributions.LogNormal):
        return q.base_dist.loc.exp()  # the median: the mean exp(mu + s^2/2) is dominated by s
    return posterior_mean(q)[0]


MOMENT_SAMPLES = 256


def posterior_mean(q) -> tuple[torch.Tensor, str]:
    """q's mean, and how it was found: in closed form where the distribution has one,
    else (a transformed distribution, say, which any guide the docs allow may be)
    the average of ``MOMENT_SAMPLES`` draws."""
    try:
        return q.mean, "closed form"
    except NotImplementedError:
        return q.sample((MOMENT_SAMPLES,)).mean(0), f"monte carlo ({MOMENT_SAMPLES} draws)"


def _family_config(family) -> dict:
    """A registered family is saved by name; any other is marked custom, and
    ``VAE.load`` asks for it again."""
    for registry in (PRIORS, GUIDES, LIKELIHOODS):
        if registry.get(family.name) is type(family):
            return {"name": family.name, **family.settings}
    return {"name": family.name or type(family).__name__, "custom": True}
