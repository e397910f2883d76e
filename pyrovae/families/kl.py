"""Closed-form KL divergences that torch.distributions lacks, registered on import.

``TraceMeanField_ELBO`` asks ``torch.distributions.kl_divergence`` for each
latent site and falls back to Monte Carlo when torch has no formula; once these
are registered it uses them. Each is KL(q||p) = -H(q) - E_q[log p], where torch
already knows the entropy H(q) and E_q[log p] needs only moments of q that have
closed forms. Pairs without a genuine closed form (Student-t || Student-t,
Normal || Student-t, ...) are left to Monte Carlo on purpose.

The reporting of which KL a run gets lives here too: ``kl_methods`` (per latent
site of a model, for the run log) and ``kl_table`` (per pair of registered
families, for docs/objectives.md).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from pyro import poutine
from pyro.distributions import ExpandedDistribution
from torch.distributions import (
    Exponential,
    Gamma,
    Independent,
    LogNormal,
    MultivariateNormal,
    Normal,
    StudentT,
    kl_divergence,
    register_kl,
)

from pyrovae.sites import latent_sites

REGISTERED: list[tuple[type, type]] = []  # the (q, p) pairs below, for the docs' KL table


def _register(q_type: type, p_type: type):
    def decorate(fn):
        REGISTERED.append((q_type, p_type))
        return register_kl(q_type, p_type)(fn)
    return decorate


@_register(StudentT, Normal)
def _kl_studentt_normal(q: StudentT, p: Normal) -> torch.Tensor:
    """E_q[log p] needs q's mean and variance, scale^2 df / (df - 2): finite only for
    df > 2. For df <= 2 the variance, and so the KL, is infinite."""
    finite = q.df > 2
    # keep the unused branch finite so that its gradient is 0, not 0 * inf = nan
    safe_df = torch.where(finite, q.df, torch.full_like(q.df, 3.0))
    variance = q.scale.pow(2) * safe_df / (safe_df - 2)
    expected_log_p = (-p.scale.log() - 0.5 * math.log(2 * math.pi)
                      - (variance + (q.loc - p.loc).pow(2)) / (2 * p.scale.pow(2)))
    kl = -StudentT(safe_df, q.loc, q.scale, validate_args=False).entropy() - expected_log_p
    return torch.where(finite, kl, torch.full_like(kl, math.inf))


def _lognormal_moments(q: LogNormal) -> tuple[torch.Tensor, torch.Tensor]:
    """E_q[log z] and E_q[z] for z ~ LogNormal(mu, sigma): mu and exp(mu + sigma^2 / 2)."""
    return q.loc, (q.loc + q.scale.pow(2) / 2).exp()


@_register(LogNormal, Gamma)
def _kl_lognormal_gamma(q: LogNormal, p: Gamma) -> torch.Tensor:
    """log p(z) = a log b - lgamma(a) + (a - 1) log z - b z is linear in log z and z."""
    mean_log_z, mean_z = _lognormal_moments(q)
    a, b = p.concentration, p.rate
    expected_log_p = a * b.log() - torch.lgamma(a) + (a - 1) * mean_log_z - b * mean_z
    return -q.entropy() - expected_log_p


@_register(LogNormal, Exponential)
def _kl_lognormal_exponential(q: LogNormal, p: Exponential) -> torch.Tensor:
    """log p(z) = log rate - rate z is linear in z."""
    _, mean_z = _lognormal_moments(q)
    return -q.entropy() - (p.rate.log() - p.rate * mean_z)


@_register(MultivariateNormal, Independent)
def _kl_multivariatenormal_diagonal(q: MultivariateNormal, p: Independent) -> torch.Tensor:
    """q = N(m, L L^T) against a diagonal Gaussian p = N(mu, diag s^2) over the same
    vector (a full-normal guide against a normal prior); torch has the full-covariance
    pair only. KL = 1/2 [sum_i (Sigma_ii + (m_i - mu_i)^2) / s_i^2 - k + sum_i log s_i^2
    - log det Sigma], with Sigma_ii the squared row norms of L and log det Sigma
    = 2 sum_i log L_ii. Any other Independent p has no closed form here."""
    if not (isinstance(p.base_dist, Normal) and p.reinterpreted_batch_ndims == 1):
        raise NotImplementedError
    scale_tril = q.scale_tril
    variance = p.base_dist.scale.pow(2)
    diagonal = scale_tril.diagonal(dim1=-2, dim2=-1)
    return 0.5 * ((scale_tril.pow(2).sum(-1) + (q.loc - p.base_dist.loc).pow(2)) / variance
                  - 1 + variance.log()).sum(-1) - diagonal.log().sum(-1)


# ---------------------------------------------------------------- which KL a run gets


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
    for site in latent_sites(model_trace):
        q = guide_trace.nodes[site["name"]]["fn"]
        try:
            kl_divergence(q, site["fn"])
            analytic = True
        except NotImplementedError:
            analytic = False
        sites.append(KLSite(site["name"], _base_name(q), _base_name(site["fn"]), analytic))
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
    """The distribution's class, under its Independent and Pyro's ExpandedDistribution
    wrappers (a flow's transformed distribution keeps its own name: its base alone is
    not q)."""
    while isinstance(fn, (Independent, ExpandedDistribution)):
        fn = fn.base_dist
    return type(fn).__name__


def kl_table() -> str:
    """A markdown table: for each compatible (guide, prior) pair of the registered
    families, whether ``TraceMeanField_ELBO`` gets an analytic KL, and whose formula."""
    # pyrovae.families imports this module, so its registries are read at call time
    from pyrovae.families import GUIDES, PRIORS, compatible_pairs

    rows = ["| guide | prior | KL in `meanfield` |", "|---|---|---|"]
    z_dim = 2  # a flow needs two dimensions to be autoregressive
    for guide_name, prior_names in compatible_pairs().items():
        guide = GUIDES[guide_name](z_dim)
        q = guide(torch.zeros(guide.raw_shape))
        for prior_name in prior_names:
            prior = PRIORS[prior_name](z_dim).eval()  # no training step: nothing to warn of
            # a prior built from the encoder (vamp) encodes its pseudo-inputs with this guide
            prior.attach(lambda u: guide(torch.zeros(u.shape[:1] + guide.raw_shape)),
                         x_shape=(1,), data_support=prior.support)
            p = prior(torch.zeros(1))
            try:
                kl_divergence(q, p)
            except NotImplementedError:
                method = "Monte Carlo (no closed form registered)"
            else:
                # registered on the distributions (full-normal) or on their bases
                bases = [d.base_dist if isinstance(d, Independent) else d for d in (q, p)]
                ours = any(isinstance(qq, a) and isinstance(pp, b) for a, b in REGISTERED
                           for qq, pp in ((q, p), bases))
                method = "analytic (pyrovae.families.kl)" if ours else "analytic (torch)"
            rows.append(f"| {guide_name} | {prior_name} | {method} |")
    return "\n".join(rows)
