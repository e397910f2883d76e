"""Training objectives: Pyro ELBOs, looked up by name, that also record their terms.

Pyro's ELBOs return only the total. The subclasses here also keep, without a
host sync, the reconstruction term E_q[log p(x|z)] of each step, so that the
trainer reports KL and reconstruction per epoch at no extra cost.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.poutine.util import site_is_subsample
from torch.distributions import kl_divergence

from pyrovae.errors import UnknownNameError


class RecordsTerms:
    """Mixin for a Pyro ELBO: sums the observed sites' log-likelihood of every particle.

    ``recon_total`` accumulates (as a tensor, so that no step waits on the
    device) the reconstruction term summed over datapoints and averaged over
    particles; the trainer reads it once per epoch.
    """

    def reset_terms(self):
        self.recon_total = 0.0

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        loss, surrogate_loss = super()._differentiable_loss_particle(model_trace, guide_trace)
        recon = sum(site["log_prob_sum"].detach() for site in model_trace.nodes.values()
                    if site["type"] == "sample" and site["is_observed"])
        self.recon_total = getattr(self, "recon_total", 0.0) + recon / self.num_particles
        return loss, surrogate_loss


class RecordingTrace_ELBO(RecordsTerms, Trace_ELBO):
    """``Trace_ELBO``: every term, the KL included, is a Monte Carlo estimate."""


class RecordingTraceMeanField_ELBO(RecordsTerms, TraceMeanField_ELBO):
    """``TraceMeanField_ELBO``: analytic KL where torch has a formula, Monte Carlo otherwise."""


OBJECTIVES = {
    "trace": RecordingTrace_ELBO,
    "meanfield": RecordingTraceMeanField_ELBO,
}


def make_elbo(name: str, num_particles: int = 1, vectorize_particles: bool = True):
    if name not in OBJECTIVES:
        raise UnknownNameError(
            f"unknown objective {name!r}; choose one of {sorted(OBJECTIVES)}.")
    if num_particles < 1:
        raise ValueError(f"num_particles={num_particles} must be at least 1.")
    return OBJECTIVES[name](num_particles=num_particles, max_plate_nesting=1,
                            vectorize_particles=vectorize_particles)


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
