"""Mixture priors: p(z) as a mixture of components over the whole latent vector.

``mog`` is a learnable mixture of diagonal Gaussians. ``vamp`` is the VampPrior
(Tomczak & Welling 2018): the mixture of the VAE's own q(z|u_k) over K learned
pseudo-inputs u_k in data space, p(z) = (1/K) sum_k q(z|u_k). Both are Pyro's
``MixtureSameFamily`` over a ``Categorical`` (``LatentMixture``, which only
expands more cheaply); neither factorizes over the latent
dimensions, and neither has a closed-form KL to any guide, so ``meanfield``
falls back to a Monte Carlo KL and the collapse diagnostics report no KL per
dimension.
"""

from __future__ import annotations

import math
import warnings

import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import constraints

from pyrovae.errors import PyrovaeError, UnknownNameError
from pyrovae.families.base import (
    check_count,
    check_number,
    positive,
    positive_inverse,
    same_support,
)
from pyrovae.families.latent import Prior, register_prior


MIXTURE_CHUNK_ELEMENTS = 2**24  # 64 MB of float32 per intermediate of a mixture's log_prob
DIAGONAL_NORMALS = (torch.distributions.Normal, dist.Normal)


class LatentMixture(dist.MixtureSameFamily):
    """Pyro's ``MixtureSameFamily`` with a uniform or learned ``Categorical``, expanded
    as Pyro's ``ExpandedDistribution``.

    The data plate expands p(z) to one copy per datapoint. ``MixtureSameFamily``
    would expand its components too, so that each datapoint's log p(z) computes
    every component's parameters again (the scale's square and log of a
    batch x K x z_dim tensor, twice the work of the densities themselves: a vamp
    step on MNIST took twice as long). ``ExpandedDistribution`` scores z against
    the one set of components, broadcasting, and expands only the result.
    """

    def expand(self, batch_shape, _instance=None):
        return dist.ExpandedDistribution(self, batch_shape)

    def log_prob(self, value):
        """``MixtureSameFamily.log_prob`` over chunks of the values, so that its
        values x K x z_dim intermediates stay below ``MIXTURE_CHUNK_ELEMENTS``: the
        importance-sampling evaluator scores some 16 000 z at once, which against 500
        components of 50 dimensions would be 1.6 GB per intermediate. A training
        batch fits in one chunk. Diagonal Gaussian components (``mog``, and ``vamp``
        over the Gaussian guides) take ``_diagonal_normal_log_prob`` instead."""
        diagonal = self._diagonal_normal()
        per_value = self.mixture_distribution.logits.shape[-1] * (
            1 if diagonal else max(1, self.event_shape.numel()))
        values = value.shape[:value.dim() - len(self.event_shape)]
        chunk = max(1, MIXTURE_CHUNK_ELEMENTS // per_value)
        score = (lambda part: self._diagonal_normal_log_prob(part, *diagonal)) if diagonal \
            else super().log_prob
        if self.batch_shape or values.numel() <= chunk:
            return score(value)
        flat = value.reshape((-1,) + self.event_shape)
        return torch.cat([score(part) for part in flat.split(chunk)]).reshape(values)

    def _diagonal_normal(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The components' locs and scales (K x z_dim) where they are diagonal Gaussians
        over the whole event, and the mixture has no batch shape of its own."""
        components = self.component_distribution
        if self.batch_shape or not isinstance(components, torch.distributions.Independent) \
                or components.reinterpreted_batch_ndims != 1 \
                or type(components.base_dist) not in DIAGONAL_NORMALS:
            return None
        return components.base_dist.loc, components.base_dist.scale

    def _diagonal_normal_log_prob(self, value, loc, scale) -> torch.Tensor:
        """log sum_k w_k N(z; mu_k, diag sigma_k^2), with the quadratic form expanded,
        sum_d z_d^2 / sigma_kd^2 - 2 z_d mu_kd / sigma_kd^2 + mu_kd^2 / sigma_kd^2,
        into two matrix products over z_dim.

        torch scores each (z, component) pair elementwise: values x K x z_dim
        intermediates, memory-bound, which made importance sampling of MNIST's test set
        under a 500-component VampPrior take some 80 minutes against 4.5 under a normal
        prior (K = 1000, one thread). The products are BLAS calls, which made the vamp
        step 2.8 times a normal one instead of 9.5 (``benchmarks/train_speed.py
        --families``, docs/families.md). They run in float64:
        the expanded terms are of the size of z^2 / sigma^2, and their sum, of order
        z_dim where z is near a component, would lose float32's digits to cancellation
        where sigma is small."""
        z = value.double()
        precision = scale.double().pow(-2)
        weighted_loc = loc.double() * precision
        quadratic = (z * z) @ precision.T - 2 * z @ weighted_loc.T \
            + (loc.double() * weighted_loc).sum(-1)
        log_norm = scale.double().log().sum(-1) + 0.5 * loc.shape[-1] * math.log(2 * math.pi)
        log_weights = torch.log_softmax(self.mixture_distribution.logits.double(), -1)
        log_density = torch.logsumexp(log_weights - log_norm - 0.5 * quadratic, dim=-1)
        return log_density.to(value.dtype)


def _mixture(logits, components) -> LatentMixture:
    return LatentMixture(dist.Categorical(logits=logits, validate_args=False), components,
                         validate_args=False)


@register_prior
class MixtureOfGaussiansPrior(Prior):
    """A mixture of ``components`` diagonal Gaussians, all of it learned.

    The means start as standard normal draws (spread over the region a standard
    normal prior covers), the scales at 1 (through ``softplus + min_scale``, so that
    no component can shrink onto a point, where log p would have no bound), and
    the mixture weights equal (through a softmax of learned logits).
    """

    name = "mog"

    def __init__(self, z_dim: int, components: int = 10, min_scale: float = 1e-3):
        super().__init__(z_dim)
        self.components = check_count(
            components, "mog prior components (--prior-param components=K), the number of "
                        "Gaussians,")
        self.min_scale = check_number(
            min_scale, "mog prior min_scale (--prior-param min_scale=...), the floor under "
                       "each component's scale,", above=0)
        if self.min_scale >= 1:
            raise PyrovaeError(f"mog prior min_scale={min_scale} must be below 1, the scale "
                               f"the components start at.")
        self._settings = {"components": self.components, "min_scale": self.min_scale}
        size = (self.components, z_dim)
        self.locs = nn.Parameter(torch.randn(size))
        self.scale_unconstrained = nn.Parameter(positive_inverse(1.0, self.min_scale, size))
        self.logits = nn.Parameter(torch.zeros(self.components))

    def forward(self, like: torch.Tensor | None = None) -> dist.Distribution:
        locs, scale_unconstrained, logits = (
            t if like is None else t.to(like)
            for t in (self.locs, self.scale_unconstrained, self.logits))
        components = dist.Normal(locs, positive(scale_unconstrained, self.min_scale),
                                 validate_args=False).to_event(1)
        return _mixture(logits, components)


VAMP_INITS = ("data", "mean")
FLOW_COMPONENTS = ("base", "exact")
DATA_MARGIN = 0.01  # pseudo-inputs from binary images start this far inside (0, 1)


@register_prior
class VampPrior(Prior):
    """The VampPrior (Tomczak & Welling 2018): p(z) = (1/K) sum_k q(z|u_k).

    The K pseudo-inputs u_k have the data's shape and are learned; q is the
    VAE's own encoder and guide family, which the VAE hands over through
    ``attach``, so that the components are the guide's distribution, whatever it is
    (Normal, full-covariance, a flow). Gradients reach the encoder through the
    prior term too: Pyro's SVI steps every parameter of either trace, and the
    encoder is registered in the guide's.

    The pseudo-inputs stay in the data's range: for data in [0, 1] (the
    Bernoulli likelihoods) they are the sigmoid of unconstrained parameters.
    Tomczak & Welling's code clips with a hardtanh instead, whose gradient is
    exactly 0 outside [0, 1], so that a pixel pushed past the bound never comes
    back; the sigmoid's gradient is small near 0 and 1 but never 0, and Adam
    rescales small gradients. Real data (Gaussian likelihoods) leave them free.

    ``flow_components`` matters only for a flow guide (``iaf``), whose q(z|u_k)
    scores a z it did not draw by inverting each flow step, one network pass per
    latent dimension, for every pair of z and component: with 500 components and
    a batch of 100 that is 50,000 inversions of z_dim passes each, which ran out
    of memory on MNIST. "base" (the default) makes the components the flow's
    Gaussian base at the pseudo-inputs, N(z; mu(u_k), sigma(u_k)), before the
    flow: a proper mixture density, still tied to the encoder through the
    pseudo-inputs, but not the exact q(z|u_k) of Tomczak & Welling. "exact" keeps
    q(z|u_k) itself, for few components.

    ``init`` chooses how ``initialize(x)`` sets them from training data: "data",
    K random training images (with replacement where there are fewer than K;
    binary pixels moved ``DATA_MARGIN`` inside (0, 1), where the sigmoid is
    finite), or "mean", the data's mean image plus ``init_std`` Gaussian noise.
    The ``Trainer`` calls it for a new run; until it is called, the pseudo-inputs
    are ``init_std`` noise around the middle of the data's range, and the first
    training step warns.
    """

    name = "vamp"

    def __init__(self, z_dim: int, components: int = 500, init: str = "data",
                 init_std: float = 0.01, flow_components: str = "base"):
        super().__init__(z_dim)
        self.components = check_count(
            components, "vamp prior components (--prior-param components=K), the number of "
                        "pseudo-inputs,")
        if init not in VAMP_INITS:
            raise UnknownNameError(
                f"vamp prior init={init!r} is unknown; choose one of {list(VAMP_INITS)} "
                f"(--prior-param init=data).")
        if flow_components not in FLOW_COMPONENTS:
            raise UnknownNameError(
                f"vamp prior flow_components={flow_components!r} is unknown; choose one of "
                f"{list(FLOW_COMPONENTS)} (--prior-param flow_components=base).")
        self.init = init
        self.flow_components = flow_components
        self.init_std = check_number(init_std, "vamp prior init_std (--prior-param "
                                               "init_std=...)", at_least=0)
        self._settings = {"components": self.components, "init": init,
                          "init_std": self.init_std, "flow_components": flow_components}
        self._encode = None
        self.initialized = False  # by initialize(x) or by loading a state_dict
        self.register_load_state_dict_post_hook(_mark_initialized)

    def attach(self, encode, x_shape, data_support) -> None:
        # a plain attribute (a bound method of the VAE), not a submodule: the encoder's
        # weights stay the VAE's alone, and copy.deepcopy maps it to the copy's encoder
        self._encode = encode
        self.x_shape = tuple(x_shape)
        self.bounded = any(same_support(data_support, support)
                           for support in (constraints.unit_interval, constraints.boolean))
        # around 0: the middle of real data, and sigmoid(0) = 1/2 for data in [0, 1], where
        # sigmoid'(0) = 1/4 turns noise of 4 init_std into noise of init_std
        scale = 4 * self.init_std if self.bounded else self.init_std
        noise = torch.randn((self.components,) + self.x_shape)
        self.pseudo_inputs_unconstrained = nn.Parameter(scale * noise)

    @property
    def pseudo_inputs(self) -> torch.Tensor:
        """The K pseudo-inputs u_k, of the data's shape."""
        self._check_attached()
        raw = self.pseudo_inputs_unconstrained
        return torch.sigmoid(raw) if self.bounded else raw

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        self._check_attached()
        if tuple(x.shape[1:]) != self.x_shape or len(x) == 0:
            raise PyrovaeError(
                f"the vamp prior's pseudo-inputs have shape {self.x_shape}; initialize them "
                f"from a non-empty batch of shape (N, {', '.join(map(str, self.x_shape))}), "
                f"got {tuple(x.shape)}.")
        target = self.pseudo_inputs_unconstrained
        x = x.to(target)
        if self.init == "data":
            rows = (torch.randperm(len(x))[:self.components] if len(x) >= self.components
                    else torch.randint(len(x), (self.components,)))
            values = x[rows.to(x.device)]
        else:
            values = x.mean(0) + self.init_std * torch.randn_like(target)
        if self.bounded:
            values = torch.logit(values.clamp(DATA_MARGIN, 1 - DATA_MARGIN))
        target.copy_(values)
        self.initialized = True

    def forward(self, like: torch.Tensor | None = None) -> dist.Distribution:
        self._check_attached()
        if not self.initialized and self.training:
            self.initialized = True  # warn once
            warnings.warn(
                f"the vamp prior's pseudo-inputs were not initialized from the data "
                f"(init={self.init!r}); they start as noise around the middle of the data's "
                f"range. Call vae.prior.initialize(training_images) before training, as "
                f"the Trainer does.", UserWarning, stacklevel=4)  # where the VAE called it
        # on the device and dtype of the encoder and the pseudo-inputs, which are the VAE's
        components = self._encode(self.pseudo_inputs)
        if self.flow_components == "base" and isinstance(components, dist.TransformedDistribution):
            components = components.base_dist
        return _mixture(self.pseudo_inputs_unconstrained.new_zeros(self.components), components)

    def _check_attached(self) -> None:
        if self._encode is None:
            raise PyrovaeError(
                "the vamp prior is made of a VAE's encoder, and has none yet: build it inside "
                "a VAE (VAE(..., prior='vamp')), which attaches its encoder.")


def _mark_initialized(module, incompatible_keys) -> None:
    """Loaded weights are trained or initialized pseudo-inputs: no warning for them."""
    module.initialized = True
