"""Closed-form KL divergences that torch.distributions lacks, registered on import.

``TraceMeanField_ELBO`` asks ``torch.distributions.kl_divergence`` for each
latent site and falls back to Monte Carlo when torch has no formula; once these
are registered it uses them. Each is KL(q||p) = -H(q) - E_q[log p], where torch
already knows the entropy H(q) and E_q[log p] needs only moments of q that have
closed forms. Pairs without a genuine closed form (Student-t || Student-t,
Normal || Student-t, ...) are left to Monte Carlo on purpose.
"""

from __future__ import annotations

import math

import torch
from torch.distributions import Exponential, Gamma, LogNormal, Normal, StudentT, register_kl

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
