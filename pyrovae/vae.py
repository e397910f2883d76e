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
    Prior,
    check_supports,
    make_guide,
    make_likelihood,
    make_prior,
)
from pyrovae.families.base import check_positive_int
from pyrovae.networks import (
    MLPEncoder,
    check_channels,
    check_layer_hidden,
    check_network,
    check_z_dims,
    lookup_architecture,
    make_decoder,
    make_encoder,
)
from pyrovae.run import CHECKPOINT_FILE, CONFIG_FILE, ModelConfig, TrainConfig  # noqa: F401

_DEFAULTS = ModelConfig()
# draws of the layers below that make q(z_l|x) of an upper layer a mixture (encode_layers)
LAYER_SAMPLES = 16


class VAE(nn.Module):
    """A variational autoencoder with swappable prior, guide, likelihood and networks.

    Families are given by registered name (with ``*_kwargs``) or as objects;
    ``network`` picks the encoder and decoder by name (``"mlp"`` or ``"conv"``,
    with ``channels``), and ``encoder`` and ``decoder`` replace them (see
    ``pyrovae.networks`` for the shapes they must map between).

    Several stochastic layers: ``z_dim=(100, 50)`` gives z1 of 100 next to the data
    and z2 of 50 above it, the model p(z2) p(z1|z2) p(x|z1) and the bottom-up
    guide q(z1|x) q(z2|z1) (Burda et al. 2016), each a sample site (``"z1"``,
    ``"z2"``) in the data plate. ``prior`` is p(z_L) at the top and ``guide`` is
    q(z1|x); the conditionals p(z_l|z_l+1) and q(z_l+1|z_l) are the guide
    families named by ``layer_prior`` and ``layer_guide``, on MLPs whose hidden
    sizes are the block of ``hidden`` between the two layers. One layer keeps
    the single site ``"z"``. See docs/networks.md.
    """

    def __init__(self, x_shape, z_dim: int | tuple = _DEFAULTS.z_dim, prior="normal",
                 guide="normal", likelihood="bernoulli", hidden=_DEFAULTS.hidden,
                 activation=_DEFAULTS.activation,
                 encoder: nn.Module | None = None, decoder: nn.Module | None = None,
                 prior_kwargs=None, guide_kwargs=None, likelihood_kwargs=None,
                 network: str = _DEFAULTS.network, channels=None,
                 layer_prior: str = "normal", layer_guide: str = "normal",
                 layer_prior_kwargs=None, layer_guide_kwargs=None):
        super().__init__()
        if isinstance(x_shape, (str, bytes)) or not hasattr(x_shape, "__iter__"):
            raise PyrovaeError(f"x_shape must be a tuple of image sizes such as (28, 28), "
                               f"got {x_shape!r}.")
        self.x_shape = tuple(check_positive_int(n, f"each size of x_shape {tuple(x_shape)}")
                             for n in x_shape)
        self.z_dims = check_z_dims(z_dim)
        # one stochastic layer keeps the int z_dim and the site "z" of every earlier run
        self.z_dim = self.z_dims[0] if len(self.z_dims) == 1 else self.z_dims
        self.sites = ("z",) if len(self.z_dims) == 1 else tuple(
            f"z{layer}" for layer in range(1, len(self.z_dims) + 1))
        blocks = check_layer_hidden(hidden, len(self.z_dims))
        check_network(network, channels)
        if network == "conv" and (encoder is None or decoder is None):
            channels = check_channels(channels, self.x_shape)
        self.prior = make_prior(prior, self.z_dims[-1], **(prior_kwargs or {}))
        self.guide_family = make_guide(guide, self.z_dims[0], **(guide_kwargs or {}))
        self.likelihood = make_likelihood(likelihood, self.x_shape, **(likelihood_kwargs or {}))
        self.encoder = encoder or make_encoder(
            network, self.x_shape, self.guide_family.raw_shape, blocks[0], activation, channels)
        self.decoder = decoder or make_decoder(
            network, self.x_shape, self.z_dims[0], self.likelihood.num_params, blocks[0],
            activation, channels)
        self._build_layers(blocks, activation, layer_prior, layer_guide,
                           layer_prior_kwargs or {}, layer_guide_kwargs or {})
        # a prior made of the encoder (vamp) takes it here, before its parameters count below
        self.prior.attach(self.encode, self.x_shape, self.likelihood.support)
        stacked = len(self.z_dims) > 1
        self.config = ModelConfig(
            x_shape=self.x_shape, z_dim=self.z_dim,
            prior=_family_config(self.prior), guide=_family_config(self.guide_family),
            likelihood=_family_config(self.likelihood),
            hidden=blocks if stacked else blocks[0],
            activation=activation, encoder=network if encoder is None else "custom",
            decoder=network if decoder is None else "custom", network=network,
            channels=channels if network == "conv" else None,
            layer_prior=_family_config(self.layer_priors[0]) if stacked else None,
            layer_guide=_family_config(self.layer_guides[0]) if stacked else None).to_dict()
        # pyro.module walks every parameter on each call: register only the
        # families that own parameters, decided once here.
        self._model_modules = [("decoder", self.decoder)] + [
            (n, m) for n, m in (("prior", self.prior), ("likelihood", self.likelihood))
            if m.has_parameters]
        self._guide_modules = [("encoder", self.encoder)] + (
            [("guide_family", self.guide_family)] if self.guide_family.has_parameters else [])
        if stacked:
            self._model_modules += [("down_nets", self.down_nets)] + (
                [("layer_priors", self.layer_priors)] if any(
                    family.has_parameters for family in self.layer_priors) else [])
            self._guide_modules += [("up_nets", self.up_nets)] + (
                [("layer_guides", self.layer_guides)] if any(
                    family.has_parameters for family in self.layer_guides) else [])

    def _build_layers(self, blocks, activation, layer_prior, layer_guide, layer_prior_kwargs,
                      layer_guide_kwargs) -> None:
        """The conditionals between the stochastic layers, and the support checks of
        every latent's guide against its prior. ``down_nets[l]`` maps z_l+2 to the raw
        output of p(z_l+1 | z_l+2) and ``up_nets[l]`` maps z_l+1 to that of
        q(z_l+2 | z_l+1) (0-based l): both through the hidden block between them."""
        sizes = self.z_dims
        self.layer_priors, self.layer_guides = nn.ModuleList(), nn.ModuleList()
        self.down_nets, self.up_nets = nn.ModuleList(), nn.ModuleList()
        self._conditional_priors, self._conditional_guides = [], []  # in sampling order
        if len(sizes) == 1:
            check_supports(self.guide_family, self.prior)
            return
        for kind, name in (("layer_prior", layer_prior), ("layer_guide", layer_guide)):
            if not isinstance(name, str):
                raise PyrovaeError(
                    f"{kind} must be the registered name of a guide family (one is built for "
                    f"each layer, of that layer's size), got {type(name).__name__}; register "
                    f"your family with register_guide and pass its name.")
        if type(self.prior).attach is not Prior.attach:
            raise PyrovaeError(
                f"the {self.prior.name!r} prior is made of q(z|x), but with several stochastic "
                f"layers the top layer's q(z_L|x) has no closed form; use a prior that does "
                f"not use the encoder (normal, laplace, mog, ...), or one stochastic layer.")
        for below, above, block in zip(sizes[:-1], sizes[1:], blocks[1:]):
            self.layer_priors.append(make_guide(layer_prior, below, **layer_prior_kwargs))
            self.layer_guides.append(make_guide(layer_guide, above, **layer_guide_kwargs))
            self.down_nets.append(MLPEncoder((above,), self.layer_priors[-1].raw_shape, block,
                                             activation))
            self.up_nets.append(MLPEncoder((below,), self.layer_guides[-1].raw_shape, block,
                                           activation))
        for q, p in zip([self.guide_family, *self.layer_guides], [*self.layer_priors, self.prior]):
            check_supports(q, p)
        self._conditional_guides = list(zip(self.sites[1:], self.layer_guides, self.up_nets))
        self._conditional_priors = list(zip(self.sites[:-1], self.layer_priors,
                                            self.down_nets))[::-1]

    # ------------------------------------------------------------ Pyro
    def model(self, x: torch.Tensor) -> None:
        self._check_step_data(x)
        for name, module in self._model_modules:
            pyro.module(name, module)
        with data_plate(x):
            z = pyro.sample(self.sites[-1], self.prior(x))
            for site, family, net in self._conditional_priors:  # top down to z1
                z = pyro.sample(site, family(net(z)))
            pyro.sample("x", self.likelihood(self.decoder(z)), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        self._check_step_data(x)
        for name, module in self._guide_modules:
            pyro.module(name, module)
        with data_plate(x):
            z = pyro.sample(self.sites[0], self.guide_family(self.encoder(x)))
            for site, family, net in self._conditional_guides:  # bottom up from z1
                z = pyro.sample(site, family(net(z)))

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
        """Mean images of p(x|z) for z drawn from the prior (with several stochastic
        layers: z_L from the top prior, then each z_l from p(z_l|z_l+1) down to z1)."""
        return self.decode_mean(self.sample_latents(n)[self.sites[0]])

    def sample_latents(self, n: int) -> dict[str, torch.Tensor]:
        """``n`` ancestral draws of every latent site from the model, by site name."""
        z = self.prior_distribution().sample((n,))
        latents = {self.sites[-1]: z}
        for site, family, net in self._conditional_priors:
            z = latents[site] = family(net(z)).sample()
        return latents

    def conditional_priors(self, latents: dict[str, torch.Tensor]
                           ) -> dict[str, torch.distributions.Distribution]:
        """The model's distribution of each latent site given the values of the layers
        above it in ``latents``: p(z_L) at the top, p(z_l | z_l+1) below, by site name."""
        top = self.sites[-1]
        priors = {top: self.prior(latents[top])}
        for above, (site, family, net) in zip(self.sites[::-1], self._conditional_priors):
            priors[site] = family(net(latents[above]))
        return priors

    def encode_layers(self, x: torch.Tensor, batch_size: int | None = None,
                      samples: int = LAYER_SAMPLES) -> list[torch.distributions.Distribution]:
        """q(z_l|x) of each stochastic layer, bottom first, each with batch shape (N,).

        q(z1|x) is the guide's own. Above it q(z_l|x), the average of
        q(z_l|z_l-1) over the layers below, has no closed form: it is the mixture
        of q(z_l|z_l-1) over ``samples`` ancestral draws of them for each
        datapoint (a ``MixtureSameFamily``, exact as ``samples`` grows).
        """
        bottom = self.encode(x, batch_size)
        if len(self.sites) == 1:
            return [bottom]
        raws = [[] for _ in self._conditional_guides]
        z = bottom.sample((samples,)).transpose(0, 1)  # (N, samples, z1)
        for raw, (_, family, net) in zip(raws, self._conditional_guides):
            raw.extend(net(chunk) for chunk in (z.split(batch_size) if batch_size else (z,)))
            z = family(torch.cat(raw)).sample()
        weights = torch.zeros(z.shape[:2], dtype=z.dtype, device=z.device)
        return [bottom] + [
            torch.distributions.MixtureSameFamily(
                torch.distributions.Categorical(logits=weights), family(torch.cat(raw)))
            for raw, (_, family, _) in zip(raws, self._conditional_guides)]

    def check_objective(self, elbo: str, estimator: str = "reparam") -> None:
        """Refuse an objective that would be biased on this VAE (``check_layered_objective``)."""
        check_layered_objective(len(self.sites), elbo, estimator)

    def prior_distribution(self) -> torch.distributions.Distribution:
        """p(z) on the VAE's device and dtype (with several stochastic layers, the top
        layer's p(z_L)). A prior may take a tensor for them
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
                      hidden=parsed.hidden, activation=parsed.activation,
                      network=parsed.network, channels=parsed.channels)
        for part in ("prior", "guide", "likelihood", "layer_prior", "layer_guide"):
            if getattr(parsed, part) is None:  # the layer families of one stochastic layer
                continue
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
        vae = cls(**kwargs)
        vae.config["arch"] = parsed.arch
        return vae

    @classmethod
    def from_arch(cls, name: str, x_shape, **overrides) -> "VAE":
        """The VAE of a published architecture (``pyrovae.networks.ARCHITECTURES``:
        kingma-welling, burda-1layer, burda-2layer, conv); ``overrides`` replace its
        sizes or add families (``z_dim=10``, ``likelihood="gaussian"``). config.json
        keeps the resolved sizes and the name."""
        vae = cls(x_shape, **{**lookup_architecture(name).settings(), **overrides})
        vae.config["arch"] = name
        return vae

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


def load_run(folder, data_dir: str | None = None, device="cpu", config: TrainConfig | None = None
             ) -> tuple[VAE, Dataset, TrainConfig]:
    """A run folder's trained VAE (in eval mode, on ``device``), its data set as
    training loaded it (same binarization and seed), and its TrainConfig; ``config``
    loads the data as another config says (a resumed run's, with --no-stream say)."""
    config = run.read_train_config(folder) if config is None else config
    if data_dir is not None:
        config.data_dir = data_dir
    vae = VAE.load(folder, map_location=device).to(device)
    # own data: the path, the test split and the preprocessing are the run's (config.json)
    data = load_dataset(config.dataset, config.data_dir, seed=config.seed,
                        binarize=config.resolved_binarize(vae.likelihood.name),
                        **config.data_options())
    return vae, data, config


def check_layered_objective(layers: int, elbo: str, estimator: str = "reparam") -> None:
    """Refuse an objective that is biased with several stochastic layers, where
    q(z2|z1) depends on z1: the meanfield objective's analytic KL of z1 integrates
    z1 out with z2 held at a draw made from it, and the stl and dreg estimators,
    which cut q's parameters from the graph, cut the path from z1 through them too."""
    if layers == 1:
        return
    if elbo == "meanfield":
        raise PyrovaeError(
            "--elbo meanfield is biased with several stochastic layers (the analytic KL of z1 "
            "integrates z1 out while z2 was drawn from it); use --elbo trace or iwae.")
    if estimator != "reparam":
        raise PyrovaeError(
            f"--estimator {estimator} is biased with several stochastic layers (it cuts the "
            f"parameters of q(z2|z1) from the graph, and with them the path through z1); use "
            f"--estimator reparam.")


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
