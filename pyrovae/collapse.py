"""Posterior-collapse diagnostics of q(z|x).

- active units (Burda et al. 2016): a latent dimension is active when the
  encoder's mean for it varies with x, ``Cov_x(E_q[z_u]) > 0.01``;
- KL(q(z_u|x) || p(z_u)) per latent dimension, averaged over the data;
- the mutual information I(x; z) under q (Hoffman & Johnson 2016; He et al.
  2019), with q(z) the aggregate posterior: the mixture of q(z|x_n) over the
  evaluation set.

All three come from one pass of the encoder over the data, so that
``collapse_diagnostics`` can run after every epoch: the trainer reports them
per epoch and aggressive training stops on the mutual information, so they sit
before training in the package's flow. See ``docs/diagnostics.md``.
"""

from __future__ import annotations

import math

import torch
from torch.distributions import Distribution, kl_divergence

from pyrovae.errors import PyrovaeError
from pyrovae.vae import posterior_mean

ACTIVITY_THRESHOLD = 0.01  # Burda et al. (2016), section 5.2
KL_METHODS = ("auto", "analytic", "monte-carlo")


# ---------------------------------------------------------------- the three diagnostics


def posterior_mean_variance(q: Distribution) -> torch.Tensor:
    """Cov_x(E_q[z_u]) for each latent dimension u: the variance over the data of q's mean
    (a Monte Carlo mean where q has none in closed form: ``pyrovae.vae.posterior_mean``)."""
    return _mean_variance(q)[0]


def _mean_variance(q: Distribution) -> tuple[torch.Tensor, str]:
    if q.batch_shape[0] < 2:
        raise PyrovaeError("active units need the encoder's means of at least 2 datapoints.")
    mean, method = posterior_mean(q)
    return mean.var(dim=0), method


def active_units(q: Distribution, threshold: float = ACTIVITY_THRESHOLD) -> int:
    """How many latent dimensions have Cov_x(E_q[z_u]) > threshold (Burda et al. 2016)."""
    return int((posterior_mean_variance(q) > threshold).sum())


def kl_per_dim(q: Distribution, prior: Distribution, method: str = "auto",
               num_samples: int = 16) -> tuple[torch.Tensor, str]:
    """E_x KL(q(z_u|x) || p(z_u)) for each latent dimension u, and the method used.

    ``"analytic"`` uses ``torch.distributions.kl_divergence`` of the base
    (per-dimension) distributions; ``"monte-carlo"`` averages
    log q(z_u|x) - log p(z_u) over ``num_samples`` draws of q per datapoint;
    ``"auto"`` takes the analytic one where torch registers it.
    """
    if method not in KL_METHODS:
        raise PyrovaeError(f"unknown KL method {method!r}; use one of {KL_METHODS}.")
    q_base, p_base = _base(q), _base(prior)
    if method != "monte-carlo":
        try:
            return kl_divergence(q_base, p_base).mean(0), "analytic"
        except NotImplementedError:
            if method == "analytic":
                raise PyrovaeError(
                    f"torch has no analytic KL from {type(q_base).__name__} to "
                    f"{type(p_base).__name__}; use method='monte-carlo' (or 'auto').") from None
    z = q_base.sample((num_samples,))
    return (q_base.log_prob(z) - p_base.log_prob(z)).mean((0, 1)), "monte-carlo"


def mutual_information(q: Distribution, num_points: int | None = 500,
                       max_chunk_elements: int = 2 ** 22) -> tuple[float, float]:
    """I(x; z) under q, in nats, and its Monte Carlo standard error.

    I = E_x E_q(z|x)[log q(z|x) - log q(z)], with q(z) = (1/N) sum_n q(z|x_n)
    over all N datapoints of ``q``. One z is drawn from q(z|x_m) for each of
    ``num_points`` datapoints m (all of them when None or >= N); the N x M
    matrix log q(z_m|x_n) is built in chunks of at most ``max_chunk_elements``
    numbers per latent dimension, so memory stays bounded for any N.

    The mixture includes q(z_m|x_m), so the estimate never exceeds log N; it is
    exactly 0 when every q(z|x_n) is the same distribution.
    """
    n = q.batch_shape[0]
    z = q.sample()
    log_q_own = q.log_prob(z)
    if num_points is not None and num_points < n:
        points = torch.randperm(n, device=z.device)[:num_points]
        z, log_q_own = z[points], log_q_own[points]
    z_dim = z.shape[-1]
    chunk = max(1, max_chunk_elements // (n * z_dim))
    # log_prob of z shaped (chunk, 1, z_dim) broadcasts against q's batch (N,):
    # no need to slice the distribution, whatever its family.
    log_q_aggregate = torch.cat([
        torch.logsumexp(q.log_prob(z_chunk.unsqueeze(-2)), dim=-1) - math.log(n)
        for z_chunk in z.split(chunk)])
    terms = log_q_own - log_q_aggregate
    se = float(terms.std() / math.sqrt(len(terms))) if len(terms) > 1 else float("nan")
    return float(terms.mean()), se


def collapse_diagnostics(vae, x: torch.Tensor, threshold: float = ACTIVITY_THRESHOLD,
                         mi_points: int | None = 500, kl_method: str = "auto",
                         kl_samples: int = 16, batch_size: int = 1000, seed: int = 0) -> dict:
    """Active units, KL per dimension and I(x; z) of ``vae`` on ``x``, as a JSON-able dict.

    Keys: ``active_units`` (int), ``posterior_mean_variance`` (Cov_x(E_q[z_u])
    per dimension), ``kl_per_dim`` (nats per dimension, averaged over x),
    ``kl_per_dim_method`` ("analytic" or "monte-carlo"), ``mutual_information``
    and ``mutual_information_se`` (nats). Uses its own RNG stream (``seed``),
    leaving the global one untouched.
    """
    with vae.evaluating(seed):
        q = vae.encode(x, batch_size)
        variance, mean_method = _mean_variance(q)
        prior = vae.prior_distribution()
        if factorizes(q) and factorizes(prior):
            kl, method = kl_per_dim(q, prior, kl_method, kl_samples)
            kl = kl.tolist()
        else:  # a mixture prior, say: there is no KL of one dimension alone
            kl, method = None, "none: the prior or guide does not factorize over dimensions"
        mi, mi_se = mutual_information(q, mi_points)
    return {
        "active_units": int((variance > threshold).sum()),
        "posterior_mean_variance": variance.tolist(),
        "posterior_mean_method": mean_method,
        "kl_per_dim": kl,
        "kl_per_dim_method": method,
        "mutual_information": mi,
        "mutual_information_se": mi_se,
    }


def factorizes(d: Distribution) -> bool:
    """Whether ``d`` is a product over z's dimensions, as pyrovae's families are."""
    return isinstance(d, torch.distributions.Independent)


def _base(d: Distribution) -> Distribution:
    """The per-dimension distribution under ``Independent(..., 1)``."""
    if not factorizes(d):
        raise PyrovaeError(
            f"expected q(z|x) and p(z) as Independent distributions over z's dimensions, got "
            f"{type(d).__name__}; build them with .to_event(1) as pyrovae's families do.")
    return d.base_dist
