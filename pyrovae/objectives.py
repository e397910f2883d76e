"""Training objectives: Pyro ELBOs, looked up by name, that also record their terms.

Pyro's ELBOs return only the total. The subclasses here also keep, without a
host sync, the reconstruction term E_q[log p(x|z)] and the true ELBO (KL weight
1) of each step, so that the trainer reports them next to the objective it
optimizes at no extra cost.

Objectives (``make_elbo``): ``trace`` and ``meanfield`` (Pyro's ELBOs), ``iwae``
(Pyro's ``RenyiELBO`` with alpha = 0, Burda et al. 2016). Gradient estimators:
``reparam`` (Pyro's), ``stl`` (sticking the landing, Roeder et al. 2017) and
``dreg`` (doubly reparameterized, Tucker et al. 2019). The KL weight beta and
free bits (Kingma et al. 2016) turn an ELBO into ``KLWeightedELBO``.
"""

from __future__ import annotations

import math
import os
import warnings
from functools import partial
from typing import NamedTuple

import pyro.ops.jit
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer import RenyiELBO, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.util import get_dependent_plate_dims, torch_item, torch_sum
from pyro.poutine.util import site_is_subsample
from torch.distributions import kl_divergence
from torch.distributions.utils import lazy_property

from pyrovae.errors import PyrovaeError, UnknownNameError


class Terms:
    """Mixin for a Pyro ELBO: ``recon_total`` and ``elbo_total`` accumulate (as
    tensors, so that no step waits on the device) E_q[log p(x|z)] and the true
    ELBO, summed over datapoints and averaged over particles; the trainer reads
    them once per epoch and calls ``reset_terms``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reset_terms()

    def reset_terms(self):
        self.recon_total = 0.0
        self.elbo_total = 0.0


class RecordsTerms(Terms):
    """Records the terms of Pyro's ``Trace_ELBO`` and ``TraceMeanField_ELBO``."""

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        loss, surrogate_loss = super()._differentiable_loss_particle(model_trace, guide_trace)
        self.recon_total = self.recon_total + _observed_log_prob(model_trace) / self.num_particles
        self.elbo_total = self.elbo_total - loss / self.num_particles
        return loss, surrogate_loss


class RecordingTrace_ELBO(RecordsTerms, Trace_ELBO):
    """``Trace_ELBO``: every term, the KL included, is a Monte Carlo estimate."""


class RecordingTraceMeanField_ELBO(RecordsTerms, TraceMeanField_ELBO):
    """``TraceMeanField_ELBO``: analytic KL where torch has a formula, Monte Carlo otherwise."""


# ---------------------------------------------------------------- compiled steps


class CompiledTerms(Terms):
    """Mixin for ``Trace_ELBO`` and ``TraceMeanField_ELBO``: ``loss_and_grads`` runs a
    TorchScript graph of the step that ``pyro.ops.jit.trace`` records once per
    input shape, as Pyro's ``JitTrace_ELBO`` does, so that later steps skip
    Pyro's tracing of the model and guide in Python (benchmarks/train_speed.py
    measures what that saves).

    Pyro's JIT ELBOs return the loss alone and key their graph on the number of
    arguments, so a smaller last batch would replay a graph recorded for another
    batch size. Here the graph also returns the terms the trainer records, and
    there is one graph per shape, dtype and device of the inputs. The graph is
    recorded under a forked RNG, so that the steps draw the random numbers the
    eager steps draw; the loss is that of the eager objective up to float
    rounding (tests/test_objectives.py).

    The model and guide must have static structure: no Python branch on a
    tensor's value, which the recorded graph would keep as it went the first time.
    Code outside torch, Pyro and pyrovae that turns a tensor into a Python value
    while a graph is recorded gets a warning naming its file and line.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._graphs = {}

    def loss_and_grads(self, model, guide, *args, **kwargs):
        graph = self._graph(model, guide, args, kwargs)
        # unoptimized, the graph's backward is torch's eager kernels; TorchScript's own
        # derivatives (softplus through exp and where) were no faster (docs/benchmarks.md)
        with torch.jit.optimized_execution(False):
            loss, surrogate_loss, recon = graph(*args, **kwargs)
        surrogate_loss.backward()
        self.recon_total = self.recon_total + recon
        self.elbo_total = self.elbo_total - loss
        return torch_item(loss)

    def _graph(self, model, guide, args, kwargs):
        key = (model, guide) + tuple(
            (a.shape, a.dtype, a.device) if torch.is_tensor(a) else a for a in args)
        graph = self._graphs.get(key)
        # the graph reads its parameters from the param store by name: after the store
        # was cleared it is recorded again, which registers them again
        if graph is None or not all(name in pyro.get_param_store()
                                    for name in graph._param_names):
            graph = pyro.ops.jit.trace(partial(self._step_terms, model, guide))
            devices = [a.device for a in args if torch.is_tensor(a) and a.is_cuda]
            with torch.random.fork_rng(devices=devices), \
                    warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                graph(*args, **kwargs)
            _report_recording_warnings(caught)
            self._graphs[key] = graph
        return graph

    def _step_terms(self, model, guide, *args, **kwargs):
        loss, surrogate_loss, recon = 0.0, 0.0, 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            loss_particle, surrogate_particle = self._differentiable_loss_particle(
                model_trace, guide_trace)
            loss = loss + loss_particle / self.num_particles
            surrogate_loss = surrogate_loss + surrogate_particle / self.num_particles
            recon = recon + _observed_log_prob(model_trace) / self.num_particles
        return loss, surrogate_loss, recon


class CompiledTrace_ELBO(CompiledTerms, Trace_ELBO):
    """``Trace_ELBO`` (recording its terms) with the step compiled."""

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        # Trace_ELBO reads the loss off with .item(), which the graph would keep as a
        # constant; TraceMeanField_ELBO returns it as a tensor while a graph is recorded
        _, surrogate_loss = super()._differentiable_loss_particle(model_trace, guide_trace)
        elbo = _log_prob_sum(model_trace) - _log_prob_sum(guide_trace)
        return -elbo.detach(), surrogate_loss


class CompiledTraceMeanField_ELBO(CompiledTerms, TraceMeanField_ELBO):
    """``TraceMeanField_ELBO`` (recording its terms) with the step compiled."""


# code whose conversions of traced tensors to Python values pyrovae has checked: they
# read shapes, constant within a graph as it is keyed on the shape, or (Trace_ELBO's
# .item()) the loss value, which CompiledTrace_ELBO replaces by a tensor
_CHECKED_CODE = tuple(os.path.dirname(path) + os.sep
                      for path in (torch.__file__, pyro.__file__, __file__))


def _report_recording_warnings(caught) -> None:
    """While a graph is recorded, a tensor turned into a Python value becomes a
    constant of the graph. Code outside torch, Pyro and pyrovae (a custom family
    or network) may do it with values, which would be wrong in every later step,
    so it is named. Other warnings pass on."""
    named = set()
    for w in caught:
        if issubclass(w.category, torch.jit.TracerWarning):
            if not w.filename.startswith(_CHECKED_CODE) and (w.filename, w.lineno) not in named:
                named.add((w.filename, w.lineno))
                warnings.warn(
                    f"while the compiled step was recorded, {w.filename}:{w.lineno} turned a "
                    f"tensor into a Python value ({str(w.message).split('.')[0]}). The graph "
                    f"keeps the value it had then: if it depends on the data or the "
                    f"parameters, the compiled step is wrong. Train with --no-jit "
                    f"(TrainConfig(jit=False), make_elbo(..., jit=False)) if it does.",
                    UserWarning)
        elif not (issubclass(w.category, FutureWarning) and "torch.jit.trace" in str(w.message)):
            # torch marks torch.jit.trace deprecated, but it is what pyro.ops.jit records
            # with; tests/test_objectives.py checks the graphs it records
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _log_prob_sum(trace) -> torch.Tensor:
    return sum(site["log_prob_sum"] for site in trace.nodes.values() if site["type"] == "sample")


# ---------------------------------------------------------------- sticking the landing


class StickingTheLanding:
    """Mixin for a Pyro ELBO: the sticking-the-landing gradient (Roeder et al. 2017).

    The guide's log q(z|x) is re-scored with a copy of each latent site's
    distribution whose parameters are detached from the graph, while z itself
    stays reparameterized. The loss value is unchanged; the gradient loses the
    score term E_q[grad_phi log q] (zero in expectation, not per sample), so it
    is zero when q is the exact posterior. Pyro has no such estimator (pyro
    issue #2854). For the ELBO it is unbiased; for IWAE with K > 1 particles it
    is biased (Tucker et al. 2019, section 4), which ``DReG_IWAE_ELBO`` fixes.
    """

    def _get_trace(self, model, guide, args, kwargs):
        model_trace, guide_trace = super()._get_trace(model, guide, args, kwargs)
        for name, site in guide_trace.nodes.items():
            if site["type"] != "sample" or site["is_observed"]:
                continue
            if not site["fn"].has_rsample:
                raise PyrovaeError(
                    f"--estimator {self.estimator} needs a reparameterized guide, but site "
                    f"{name!r} ({type(site['fn']).__name__}) has no rsample; use --estimator "
                    f"reparam.")
            site["fn"] = detach_parameters(site["fn"])
            for key in ("score_parts", "log_prob", "log_prob_sum", "unscaled_log_prob"):
                site.pop(key, None)
        guide_trace.compute_score_parts()  # re-scores only the sites popped above
        return model_trace, guide_trace


def detach_parameters(fn):
    """A copy of distribution ``fn`` whose parameters are cut from the autograd graph.

    Rebuilt from ``arg_constraints``, so that it works for any guide family; a
    lazily computed alternative parameterization (probs for logits) is skipped.
    """
    if isinstance(fn, torch.distributions.Independent):
        return type(fn)(detach_parameters(fn.base_dist), fn.reinterpreted_batch_ndims,
                        validate_args=False)
    params = {}
    for key in fn.arg_constraints:
        if isinstance(getattr(type(fn), key, None), lazy_property) and key not in vars(fn):
            continue
        params[key] = getattr(fn, key).detach()
    return type(fn)(**params, validate_args=False)


class STL_Trace_ELBO(StickingTheLanding, RecordingTrace_ELBO):
    """The ELBO with the sticking-the-landing gradient."""

    estimator = "stl"


# ---------------------------------------------------------------- IWAE


class IWAE_ELBO(Terms, RenyiELBO):
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

    estimator = "reparam"

    def __init__(self, num_particles: int = 2, max_plate_nesting: int = 1,
                 vectorize_particles: bool = True):
        super().__init__(alpha=0, num_particles=num_particles,
                         max_plate_nesting=max_plate_nesting,
                         vectorize_particles=vectorize_particles)

    def _get_traces(self, model, guide, args, kwargs):
        # every path, Pyro's loss and loss_and_grads included, traces through here
        for model_trace, guide_trace in super()._get_traces(model, guide, args, kwargs):
            log_w = _log_weight(model_trace, guide_trace).detach()
            self.elbo_total += log_w.sum() / self.num_particles
            self.recon_total += _observed_log_prob(model_trace) / self.num_particles
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
        log_w, _ = self._log_weights(model, guide, args, kwargs)
        return -_iwae_bound(log_w)


class STL_IWAE_ELBO(StickingTheLanding, IWAE_ELBO):
    """IWAE with the sticking-the-landing gradient: lower variance, biased for K > 1."""

    estimator = "stl"


class DReG_IWAE_ELBO(StickingTheLanding, IWAE_ELBO):
    """IWAE with doubly reparameterized gradients (Tucker et al. 2019); Pyro issue #2598.

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

    estimator = "dreg"

    def differentiable_loss(self, model, guide, *args, **kwargs):
        log_w, guide_traces = self._log_weights(model, guide, args, kwargs)
        weights = torch.softmax(log_w.detach(), dim=0)
        per_trace = [weights] if self._vectorized else list(weights)
        for guide_trace, w in zip(guide_traces, per_trace):
            for site in guide_trace.nodes.values():
                if site["type"] == "sample" and not site["is_observed"] \
                        and site["value"].requires_grad:
                    event = (1,) * site["fn"].event_dim
                    site["value"].register_hook(partial(torch.mul, w.reshape(w.shape + event)))
        return -_iwae_bound(log_w)

    def loss_and_grads(self, model, guide, *args, **kwargs):
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
        for site in trace.nodes.values():
            if site["type"] == "sample":
                log_w = log_w + sign * torch_sum(site["log_prob"], sum_dims)
    return log_w


def _observed_log_prob(model_trace) -> torch.Tensor:
    return sum(site["log_prob_sum"].detach() for site in model_trace.nodes.values()
               if site["type"] == "sample" and site["is_observed"])


# ---------------------------------------------------------------- KL weight, free bits


class KLWeightedELBO(Terms, Trace_ELBO):
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

    estimator = "reparam"

    def __init__(self, beta: float = 1.0, free_bits: float = 0.0, analytic_kl: bool = False,
                 **kwargs):
        super().__init__(**kwargs)
        self.beta = beta
        self.free_bits = free_bits
        self.analytic_kl = analytic_kl

    @torch.no_grad()
    def loss(self, model, guide, *args, **kwargs):
        # Trace_ELBO.loss would return the true ELBO, not this objective
        return torch_item(self.differentiable_loss(model, guide, *args, **kwargs))

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        recon = sum(site["log_prob_sum"] for site in model_trace.nodes.values()
                    if site["type"] == "sample" and site["is_observed"])
        kl, penalty = 0.0, 0.0
        for name, model_site in model_trace.nodes.items():
            if model_site["type"] != "sample" or model_site["is_observed"]:
                continue
            guide_site = guide_trace.nodes[name]
            kl_dims = scale_and_mask(self._kl_per_dim(name, guide_site, model_site),
                                     guide_site["scale"])
            kl = kl + kl_dims.sum()
            penalty = penalty + (self._free_bits(kl_dims) if self.free_bits > 0 else kl_dims.sum())
        objective = recon - self.beta * penalty
        self.recon_total = self.recon_total + recon.detach() / self.num_particles
        self.elbo_total = self.elbo_total + (recon - kl).detach() / self.num_particles
        return -torch_item(objective), -objective

    def _kl_per_dim(self, name, guide_site, model_site) -> torch.Tensor:
        """KL per datapoint (and particle) and latent dimension: shape batch + (dims,)."""
        q, p = guide_site["fn"], model_site["fn"]
        if not q.has_rsample:
            raise PyrovaeError(
                f"the KL-weighted objective needs a reparameterized guide, but site {name!r} "
                f"({type(q).__name__}) has no rsample.")
        if guide_site["mask"] is not None:
            raise PyrovaeError(f"the KL-weighted objective does not support the mask on "
                               f"site {name!r}; remove it or use beta = 1 without free bits.")
        q_base, p_base = _factors(q), _factors(p)
        if q_base is None or p_base is None:  # no per-dimension factors: one group per site
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


class STL_KLWeightedELBO(StickingTheLanding, KLWeightedELBO):
    """The KL-weighted ELBO with the sticking-the-landing gradient (Monte Carlo KL)."""

    estimator = "stl"


# ---------------------------------------------------------------- look-up


OBJECTIVES = {
    "trace": RecordingTrace_ELBO,
    "meanfield": RecordingTraceMeanField_ELBO,
    "iwae": IWAE_ELBO,
}

ESTIMATORS = ("reparam", "stl", "dreg")


COMPILED = {
    "trace": CompiledTrace_ELBO,
    "meanfield": CompiledTraceMeanField_ELBO,
}


def why_not_compiled(name: str, estimator: str = "reparam",
                     kl_weighted: bool = False) -> str | None:
    """None where ``make_elbo(..., jit=True)`` can compile the step, else the reason."""
    if name not in COMPILED:
        return f"only the trace and meanfield objectives are compiled, not {name!r}"
    if estimator != "reparam":
        return f"only the reparam estimator is compiled, not {estimator!r}"
    if kl_weighted:
        return "a KL weight or free bits are not compiled, as the trainer changes the weight"
    return None


def make_elbo(name: str, num_particles: int = 1, vectorize_particles: bool = True,
              estimator: str = "reparam", beta: float = 1.0, free_bits: float = 0.0,
              kl_weighted: bool = False, jit: bool = False):
    """The objective ``name`` with gradient ``estimator``.

    ``beta != 1``, ``free_bits > 0`` or ``kl_weighted`` (for a beta the trainer
    anneals) give a ``KLWeightedELBO``; these apply to the ELBOs, not to IWAE.
    ``jit`` compiles the step (``CompiledTerms``): trace and meanfield, reparam, beta 1.
    """
    if name not in OBJECTIVES:
        raise UnknownNameError(
            f"unknown objective {name!r}; choose one of {sorted(OBJECTIVES)}.")
    if estimator not in ESTIMATORS:
        raise UnknownNameError(
            f"unknown gradient estimator {estimator!r}; choose one of {list(ESTIMATORS)}.")
    if num_particles < 1:
        raise PyrovaeError(f"num_particles={num_particles} must be at least 1.")
    if beta < 0 or free_bits < 0:
        raise PyrovaeError(f"beta={beta} and free_bits={free_bits} must be >= 0.")
    if estimator == "dreg" and name != "iwae":
        raise PyrovaeError(
            f"--estimator dreg is for --elbo iwae; for the {name!r} ELBO use --estimator stl, "
            f"which DReG reduces to with one particle.")
    if estimator == "stl" and name == "meanfield":
        raise PyrovaeError(
            "--estimator stl changes the Monte Carlo log q(z|x) term, which --elbo meanfield "
            "replaces by an analytic KL where it can; use --elbo trace --estimator stl.")
    weighted = kl_weighted or beta != 1 or free_bits > 0
    if name == "iwae" and weighted:
        raise PyrovaeError(
            "--beta, --kl-anneal and --free-bits weight the KL of an ELBO; the IWAE bound has "
            "no separate KL term. Use --elbo trace or meanfield with them.")
    reason = why_not_compiled(name, estimator, weighted) if jit else None
    if reason:
        raise PyrovaeError(f"cannot compile the step: {reason}; leave jit off for this objective.")
    common = dict(num_particles=num_particles, max_plate_nesting=1,
                  vectorize_particles=vectorize_particles)
    if weighted:
        cls = STL_KLWeightedELBO if estimator == "stl" else KLWeightedELBO
        return cls(beta=beta, free_bits=free_bits, analytic_kl=name == "meanfield", **common)
    if name == "iwae":
        cls = {"reparam": IWAE_ELBO, "stl": STL_IWAE_ELBO, "dreg": DReG_IWAE_ELBO}[estimator]
        return cls(**common)
    if estimator == "stl":
        return STL_Trace_ELBO(**common)
    if jit:
        return COMPILED[name](**common)
    return OBJECTIVES[name](**common)


# ---------------------------------------------------------------- diagnostics


class KLSite(NamedTuple):
    site: str
    guide: str      # class name of the guide's base distribution
    prior: str
    analytic: bool  # torch has a closed form, so TraceMeanField_ELBO uses it


def kl_methods(model, guide, *args) -> list[KLSite]:
    """For each latent site, whether ``TraceMeanField_ELBO`` gets an analytic KL.

    This asks ``kl_divergence`` the same question ``TraceMeanField_ELBO`` asks,
    on one trace of the model and guide. The global RNG is left untouched so
    that a resumed run samples as a straight one does.
    """
    devices = [a.device for a in args if torch.is_tensor(a) and a.is_cuda]
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        guide_trace = poutine.trace(guide).get_trace(*args)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args)
    sites = []
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
            continue
        q = guide_trace.nodes[name]["fn"]
        try:
            kl_divergence(q, site["fn"])
            analytic = True
        except NotImplementedError:
            analytic = False
        sites.append(KLSite(name, _base_name(q), _base_name(site["fn"]), analytic))
    return sites


def describe_kl_methods(sites: list[KLSite], objective: str) -> str:
    """One line for the log: which latent sites get an analytic KL, which Monte Carlo."""
    if objective != "meanfield":
        names = ", ".join(repr(s.site) for s in sites)
        return f"KL: the {objective!r} objective estimates the KL of {names} by Monte Carlo."
    parts = [
        f"{s.site!r} ({s.guide} || {s.prior}) analytic" if s.analytic else
        f"{s.site!r} ({s.guide} || {s.prior}) Monte Carlo, as torch has no closed form"
        for s in sites
    ]
    return "KL: " + "; ".join(parts) + "."


def _base_name(fn) -> str:
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return type(fn).__name__


def kl_table() -> str:
    """A markdown table: for each compatible (guide, prior) pair of the registered
    families, whether ``TraceMeanField_ELBO`` gets an analytic KL, and whose formula."""
    from pyrovae.families import GUIDES, PRIORS, compatible_pairs
    from pyrovae.families.kl import REGISTERED

    rows = ["| guide | prior | KL in `meanfield` |", "|---|---|---|"]
    for guide_name, prior_names in compatible_pairs().items():
        guide = GUIDES[guide_name](1)
        q = guide(torch.zeros(guide.num_params, 1)).base_dist
        for prior_name in prior_names:
            p = PRIORS[prior_name](1)(torch.zeros(1)).base_dist
            try:
                kl_divergence(q, p)
            except NotImplementedError:
                method = "Monte Carlo (no closed form registered)"
            else:
                ours = any(isinstance(q, a) and isinstance(p, b) for a, b in REGISTERED)
                method = "analytic (pyrovae.families.kl)" if ours else "analytic (torch)"
            rows.append(f"| {guide_name} | {prior_name} | {method} |")
    return "\n".join(rows)
