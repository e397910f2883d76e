"""The objectives that run eagerly: Pyro's ELBOs and IWAE bound, with the gradient
estimator as an argument and their terms recorded.

Pyro's ELBOs return only the total. The subclasses here also keep, without a
host sync, the reconstruction term E_q[log p(x|z)] and the true ELBO (KL weight
1) of each step, so that the trainer reports them next to the objective it
optimizes at no extra cost.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer import RenyiELBO, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.util import get_dependent_plate_dims, torch_item, torch_sum
from torch.distributions import kl_divergence
from torch.distributions.utils import lazy_property

from pyrovae.errors import PyrovaeError, UnknownNameError
from pyrovae.sites import latent_sites, observed_sites, sample_sites

ESTIMATORS = ("reparam", "stl", "dreg")


def check_estimator(objective: str, estimator: str) -> None:
    """Refuses a gradient estimator that the objective named ``objective`` cannot use."""
    if estimator not in ESTIMATORS:
        raise UnknownNameError(
            f"unknown gradient estimator {estimator!r}; choose one of {list(ESTIMATORS)}.")
    if estimator == "dreg" and objective != "iwae":
        raise PyrovaeError(
            f"--estimator dreg is for --elbo iwae; for the {objective!r} ELBO use --estimator "
            f"stl, which DReG reduces to with one particle.")
    if estimator == "stl" and objective == "meanfield":
        raise PyrovaeError(
            "--estimator stl changes the Monte Carlo log q(z|x) term, which --elbo meanfield "
            "replaces by an analytic KL where it can; use --elbo trace --estimator stl.")


class Terms:
    """Mixin for a Pyro ELBO: ``recon_total`` and ``elbo_total`` accumulate (as
    tensors, so that no step waits on the device) E_q[log p(x|z)] and the true
    ELBO, summed over datapoints and averaged over particles; the trainer reads
    and resets them once per epoch with ``take_terms``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reset_terms()

    def reset_terms(self):
        self.recon_total = 0.0
        self.elbo_total = 0.0

    def take_terms(self) -> dict:
        """The terms accumulated since the last reset, as they are, and a reset."""
        terms = {"recon": self.recon_total, "elbo": self.elbo_total}
        self.reset_terms()
        return terms


class Objective(Terms):
    """Mixin for a Pyro ELBO: the recorded terms and the gradient ``estimator``,
    ``reparam`` (Pyro's), ``stl`` or ``dreg`` (``IWAE_ELBO`` alone), checked on
    construction. ``objective`` is the name the checks give in their messages."""

    objective = "trace"
    estimator = "reparam"  # what estimator=None gives; the compatibility subclasses fix another

    def __init__(self, *args, estimator: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if estimator is not None:
            self.estimator = estimator
        check_estimator(self.objective, self.estimator)

    def _get_trace(self, model, guide, args, kwargs):
        """With ``stl`` or ``dreg``, the sticking-the-landing gradient (Roeder et al. 2017).

        The guide's log q(z|x) is re-scored with a copy of each latent site's
        distribution whose parameters are detached from the graph, while z itself
        stays reparameterized. The loss value is unchanged; the gradient loses the
        score term E_q[grad_phi log q] (zero in expectation, not per sample), so it
        is zero when q is the exact posterior. Pyro has no such estimator (pyro
        issue #2854). For the ELBO it is unbiased; for IWAE with K > 1 particles it
        is biased (Tucker et al. 2019, section 4), which ``dreg`` fixes.
        """
        model_trace, guide_trace = super()._get_trace(model, guide, args, kwargs)
        if self.estimator == "reparam":
            return model_trace, guide_trace
        for site in latent_sites(guide_trace):
            if not site["fn"].has_rsample:
                raise PyrovaeError(
                    f"--estimator {self.estimator} needs a reparameterized guide, but site "
                    f"{site['name']!r} ({type(site['fn']).__name__}) has no rsample; use "
                    f"--estimator reparam.")
            site["fn"] = detach_parameters(site["fn"])
            for key in ("score_parts", "log_prob", "log_prob_sum", "unscaled_log_prob"):
                site.pop(key, None)
        guide_trace.compute_score_parts()  # re-scores only the sites popped above
        return model_trace, guide_trace


def detach_parameters(fn):
    """A copy of distribution ``fn`` whose parameters are cut from the autograd graph.

    Rebuilt from ``arg_constraints``, so that it works for any guide family; a
    lazily computed alternative parameterization (probs for logits) is skipped.
    A distribution that cannot be rebuilt so (a flow, whose transforms hold
    networks: ``pyrovae.families.IAFDistribution``) gives its own copy through a
    ``detach_parameters`` method.
    """
    if hasattr(fn, "detach_parameters"):
        return fn.detach_parameters()
    if isinstance(fn, torch.distributions.Independent):
        return type(fn)(detach_parameters(fn.base_dist), fn.reinterpreted_batch_ndims,
                        validate_args=False)
    if isinstance(fn, torch.distributions.MultivariateNormal):
        # its arg_constraints are three alternative matrices, of which it takes one
        return type(fn)(fn.loc.detach(), scale_tril=fn.scale_tril.detach(), validate_args=False)
    params = {}
    for key in fn.arg_constraints:
        if isinstance(getattr(type(fn), key, None), lazy_property) and key not in vars(fn):
            continue
        params[key] = getattr(fn, key).detach()
    return type(fn)(**params, validate_args=False)


# ---------------------------------------------------------------- Pyro's ELBOs


class RecordsTerms(Objective):
    """Records the terms of Pyro's ``Trace_ELBO`` and ``TraceMeanField_ELBO``."""

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        loss, surrogate_loss = super()._differentiable_loss_particle(model_trace, guide_trace)
        self.recon_total = self.recon_total + observed_log_prob(model_trace) / self.num_particles
        self.elbo_total = self.elbo_total - loss / self.num_particles
        return loss, surrogate_loss


class TraceELBO(RecordsTerms, Trace_ELBO):
    """``Trace_ELBO``: every term, the KL included, is a Monte Carlo estimate."""


class TraceMeanFieldELBO(RecordsTerms, TraceMeanField_ELBO):
    """``TraceMeanField_ELBO``: analytic KL where torch has a formula, Monte Carlo otherwise."""

    objective = "meanfield"


# ---------------------------------------------------------------- IWAE


class IWAE_ELBO(Objective, RenyiELBO):
    """The IWAE bound (Burda et al. 2016): Pyro's ``RenyiELBO`` with alpha = 0.

    Pyro's maintainers doubt ``RenyiELBO`` for models with local latents,
    because it sums log weights over every plate that is not shared by all
    sample sites before the logsumexp over particles. In ``pyrovae.VAE`` every
    site, z and x, sits in the "data" plate, so that plate is kept: the log
    weights have shape (particles, batch) and the logsumexp runs over the
    particles of each datapoint, which is the per-datapoint IWAE bound
    (tests/test_objectives.py checks it against an independent computation).
    A model with a latent outside the data plate would get one weight per
    particle for the whole batch, which is not the IWAE bound; ``_log_weights``
    refuses such models.

    This subclass adds what ``RenyiELBO`` lacks: ``differentiable_loss`` (for
    evaluation and for the STL and DReG estimators) and the recorded terms.
    """

    objective = "iwae"

    def __init__(self, num_particles: int = 2, max_plate_nesting: int = 1,
                 vectorize_particles: bool = True, estimator: str | None = None):
        super().__init__(alpha=0, num_particles=num_particles,
                         max_plate_nesting=max_plate_nesting,
                         vectorize_particles=vectorize_particles, estimator=estimator)

    def _get_traces(self, model, guide, args, kwargs):
        # every path, Pyro's loss and loss_and_grads included, traces through here
        for model_trace, guide_trace in super()._get_traces(model, guide, args, kwargs):
            log_w = _log_weight(model_trace, guide_trace).detach()
            self.elbo_total += log_w.sum() / self.num_particles
            self.recon_total += observed_log_prob(model_trace) / self.num_particles
            yield model_trace, guide_trace

    @property
    def _vectorized(self) -> bool:
        return self.vectorize_particles and self.num_particles > 1

    def _log_weights(self, model, guide, args, kwargs):
        """Log weights of shape (num_particles, batch), and the guide traces they came from."""
        traces = list(self._get_traces(model, guide, args, kwargs))
        log_ws = [_log_weight(model_trace, guide_trace) for model_trace, guide_trace in traces]
        log_w = log_ws[0] if self._vectorized else torch.stack(log_ws)
        if log_w.dim() != 2:
            raise PyrovaeError(
                f"IWAE needs one log weight per particle and datapoint, but got shape "
                f"{tuple(log_w.shape)}: every sample site must sit in one data plate at dim -1, "
                f"as in pyrovae.VAE.")
        return log_w, [guide_trace for _, guide_trace in traces]

    def differentiable_loss(self, model, guide, *args, **kwargs):
        """Minus the IWAE bound, summed over datapoints; its gradient is sum_k w~_k grad log w_k."""
        log_w, guide_traces = self._log_weights(model, guide, args, kwargs)
        if self.estimator == "dreg":
            self._reweight_guide_gradients(log_w, guide_traces)
        return -_iwae_bound(log_w)

    def _reweight_guide_gradients(self, log_w, guide_traces) -> None:
        """Doubly reparameterized gradients (Tucker et al. 2019); Pyro issue #2598.

        With log w_k = log p(x, z_k) - log q(z_k|x) and w~_k the normalized weights,

            grad_theta = sum_k w~_k grad_theta log w_k                      (as IWAE)
            grad_phi   = sum_k w~_k^2 (d log w_k / d z_k) (d z_k / d phi)   (q's parameters
                                                                            stopped in log q)

        which is unbiased for the IWAE gradient. The surrogate is minus the IWAE bound
        of the STL log weights (so d/d log w_k = w~_k, and log q has no direct phi
        path); a hook on each reparameterized z_k multiplies the gradient flowing
        back into the guide by one more w~_k. The model's parameters see no z path,
        so they keep the IWAE gradient.
        """
        weights = torch.softmax(log_w.detach(), dim=0)
        per_trace = [weights] if self._vectorized else list(weights)
        for guide_trace, w in zip(guide_traces, per_trace):
            for site in latent_sites(guide_trace):
                if site["value"].requires_grad:
                    event = (1,) * site["fn"].event_dim
                    site["value"].register_hook(partial(torch.mul, w.reshape(w.shape + event)))

    def loss_and_grads(self, model, guide, *args, **kwargs):
        if self.estimator != "dreg":
            return super().loss_and_grads(model, guide, *args, **kwargs)
        # RenyiELBO's own surrogate has no place for DReG's hooks
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return loss.item()


def _iwae_bound(log_w: torch.Tensor) -> torch.Tensor:
    """sum_b [logsumexp_k log w_kb - log K]: the per-datapoint IWAE bound, summed."""
    return (torch.logsumexp(log_w, dim=0) - math.log(log_w.shape[0])).sum()


def _log_weight(model_trace, guide_trace) -> torch.Tensor:
    """log p(x, z) - log q(z|x) per particle and datapoint, summed over other plates as
    ``RenyiELBO`` does."""
    sum_dims = get_dependent_plate_dims(model_trace.nodes.values())
    log_w = 0.0
    for trace, sign in ((model_trace, 1), (guide_trace, -1)):
        for site in sample_sites(trace):
            log_w = log_w + sign * torch_sum(site["log_prob"], sum_dims)
    return log_w


def log_prob_sum(sites) -> torch.Tensor:
    """The summed log densities of ``sites``, scaled and masked as Pyro scores them."""
    return sum(site["log_prob_sum"] for site in sites)


def observed_log_prob(model_trace) -> torch.Tensor:
    """E_q[log p(x|z)] of one particle, cut from the graph: the recorded reconstruction term."""
    return sum(site["log_prob_sum"].detach() for site in observed_sites(model_trace))


# ---------------------------------------------------------------- KL weight, free bits


class KLWeightedELBO(Objective, Trace_ELBO):
    """-(E_q[log p(x|z)] - beta * KL), with optional free bits (Kingma et al. 2016).

    ``beta`` is an attribute so that the trainer can anneal it. With free bits
    lambda > 0, the KL of each latent dimension, averaged over the batch (and
    particles), counts as max(lambda, KL_j): the guide is not pushed towards the
    prior in dimensions that carry fewer than lambda nats.

    The KL of each latent site is computed per dimension from the base
    distributions of the traced guide and prior (their ``Independent``
    wrappers removed): analytically where torch has a formula and
    ``analytic_kl`` is set (the ``meanfield`` objective), otherwise by Monte
    Carlo, log q(z_j) - log p(z_j) at the sampled z. The recorded ELBO is
    the true one: beta = 1, no free bits.
    """

    def __init__(self, beta: float = 1.0, free_bits: float = 0.0, analytic_kl: bool = False,
                 **kwargs):
        self.beta = beta
        self.free_bits = free_bits
        self.analytic_kl = analytic_kl  # before the estimator is checked against it
        super().__init__(**kwargs)

    @property
    def objective(self) -> str:
        return "meanfield" if self.analytic_kl else "trace"

    @torch.no_grad()
    def loss(self, model, guide, *args, **kwargs):
        # Trace_ELBO.loss would return the true ELBO, not this objective
        return torch_item(self.differentiable_loss(model, guide, *args, **kwargs))

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        recon = log_prob_sum(observed_sites(model_trace))
        kl, penalty = 0.0, 0.0
        for model_site in latent_sites(model_trace):
            guide_site = guide_trace.nodes[model_site["name"]]
            kl_dims = scale_and_mask(self._kl_per_dim(guide_site, model_site),
                                     guide_site["scale"])
            kl = kl + kl_dims.sum()
            penalty = penalty + (self._free_bits(kl_dims) if self.free_bits > 0 else kl_dims.sum())
        objective = recon - self.beta * penalty
        self.recon_total = self.recon_total + recon.detach() / self.num_particles
        self.elbo_total = self.elbo_total + (recon - kl).detach() / self.num_particles
        return -torch_item(objective), -objective

    def _kl_per_dim(self, guide_site, model_site) -> torch.Tensor:
        """KL per datapoint (and particle) and latent dimension: shape batch + (dims,)."""
        name, q, p = guide_site["name"], guide_site["fn"], model_site["fn"]
        if not q.has_rsample:
            raise PyrovaeError(
                f"the KL-weighted objective needs a reparameterized guide, but site {name!r} "
                f"({type(q).__name__}) has no rsample.")
        if guide_site["mask"] is not None:
            raise PyrovaeError(f"the KL-weighted objective does not support the mask on "
                               f"site {name!r}; remove it or use beta = 1 without free bits.")
        q_base, p_base = _factors(q), _factors(p)
        if q_base is None or p_base is None:  # no per-dimension factors: one group per site
            if self.analytic_kl:  # a full covariance against a diagonal prior has one
                try:
                    return kl_divergence(q, p)[..., None]
                except NotImplementedError:
                    pass
            return (q.log_prob(guide_site["value"]) - p.log_prob(guide_site["value"]))[..., None]
        kl = None
        if self.analytic_kl:
            try:
                kl = kl_divergence(q_base, p_base)
            except NotImplementedError:
                pass
        if kl is None:
            z = guide_site["value"]
            kl = q_base.log_prob(z) - p_base.log_prob(z)
        return kl.reshape(q.batch_shape + (-1,))

    def _free_bits(self, kl_dims: torch.Tensor) -> torch.Tensor:
        """sum_j max(lambda, mean over the batch of KL_j), times the batch size."""
        per_dim = kl_dims.reshape(-1, kl_dims.shape[-1])
        return per_dim.mean(0).clamp(min=self.free_bits).sum() * per_dim.shape[0]


def _factors(fn):
    """The per-dimension distribution under an ``Independent``, else None."""
    if isinstance(fn, torch.distributions.Independent):
        return fn.base_dist
    return None


# ---------------------------------------------------------------- former names

# Kept for compatibility, for one release: the estimator was a class of its own.
# make_elbo still returns these where they apply (``LEGACY_CLASSES``), as callers
# check the class; both go together.


class RecordingTrace_ELBO(TraceELBO):
    """Kept for compatibility: ``TraceELBO()``."""


class RecordingTraceMeanField_ELBO(TraceMeanFieldELBO):
    """Kept for compatibility: ``TraceMeanFieldELBO()``."""


class STL_Trace_ELBO(TraceELBO):
    """Kept for compatibility: ``TraceELBO(estimator="stl")``."""

    estimator = "stl"


class STL_IWAE_ELBO(IWAE_ELBO):
    """Kept for compatibility: ``IWAE_ELBO(estimator="stl")``."""

    estimator = "stl"


class DReG_IWAE_ELBO(IWAE_ELBO):
    """Kept for compatibility: ``IWAE_ELBO(estimator="dreg")``."""

    estimator = "dreg"


class STL_KLWeightedELBO(KLWeightedELBO):
    """Kept for compatibility: ``KLWeightedELBO(estimator="stl")``."""

    estimator = "stl"


LEGACY_CLASSES = {(cls.__base__, cls.estimator): cls
                  for cls in (STL_Trace_ELBO, STL_IWAE_ELBO, DReG_IWAE_ELBO, STL_KLWeightedELBO)}
