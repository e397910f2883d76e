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
import warnings

import pyro
import torch
from pyro import poutine
from torch.distributions import Distribution, kl_divergence

from pyrovae.errors import PyrovaeError
from pyrovae.vae import LAYER_SAMPLES

ACTIVITY_THRESHOLD = 0.01  # Burda et al. (2016), section 5.2
# the most datapoints whose aggregate posterior the mutual information takes for a guide
# that scores another datapoint's z slowly (a flow: Guide.scoring_passes > 1)
SLOW_MI_POINTS = 100
MEAN_VARIANCE_DRAWS = 32  # per datapoint, for a q with no mean in closed form
KL_METHODS = ("auto", "analytic", "monte-carlo")


# ---------------------------------------------------------------- the three diagnostics


def posterior_mean_variance(q: Distribution) -> torch.Tensor:
    """Cov_x(E_q[z_u]) for each latent dimension u: the variance over the data of q's mean
    (where q has none in closed form, from ``MEAN_VARIANCE_DRAWS`` draws per datapoint, less
    the variance their own noise adds)."""
    return _mean_variance(q)[0]


def _mean_variance(q: Distribution) -> tuple[torch.Tensor, str]:
    if q.batch_shape[0] < 2:
        raise PyrovaeError("active units need the encoder's means of at least 2 datapoints.")
    try:
        return q.mean.var(dim=0), "closed form"
    except NotImplementedError:
        pass
    # no mean in closed form (a flow): the mean of M draws per datapoint varies over the
    # data by Cov_x(E_q[z]) plus E_x[Var_q(z)] / M; the second part, estimated from the same
    # draws, is taken off. Unbiased with few draws, where a plain average would need
    # hundreds to keep its noise below the activity threshold (ten times the draws'
    # cost for a flow on MNIST's test set)
    draws = q.sample((MEAN_VARIANCE_DRAWS,))
    noise = draws.var(dim=0).mean(dim=0) / MEAN_VARIANCE_DRAWS
    return draws.mean(dim=0).var(dim=0) - noise, \
        f"monte carlo ({MEAN_VARIANCE_DRAWS} draws per datapoint, less their noise)"


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
                       max_chunk_elements: int = 2 ** 22,
                       aggregate: Distribution | None = None) -> tuple[float, float]:
    """I(x; z) under q, in nats, and its Monte Carlo standard error.

    I = E_x E_q(z|x)[log q(z|x) - log q(z)], with q(z) = (1/N) sum_n q(z|x_n)
    over all N datapoints of ``q``. One z is drawn from q(z|x_m) for each of
    ``num_points`` datapoints m (all of them when None or >= N); the N x M
    matrix log q(z_m|x_n) is built in chunks of at most ``max_chunk_elements``
    numbers per latent dimension, so memory stays bounded for any N.

    The mixture includes q(z_m|x_m), so the estimate never exceeds log N; it is
    exactly 0 when every q(z|x_n) is the same distribution.

    ``aggregate`` (batch (N,), the same datapoints) replaces q in the mixture q(z):
    a cheaper stand-in where q(z|x) is itself a mixture (an upper stochastic
    layer), whose N components then make q(z) as well as its N x S would.

    A flow guide scores another datapoint's z by inverting its steps, which
    overflows for a z far in the tail of q(z|x_n) (a gate near 0 divides): such a
    pair's log density comes out NaN where it is, in exact arithmetic, a density
    too small to count. It counts as 0 in the mixture (its own q(z_m|x_m), a
    draw of its own, is always finite), and a warning gives their number.
    """
    aggregate = q if aggregate is None else aggregate
    n = aggregate.batch_shape[0]
    z = q.sample()
    log_q_own = q.log_prob(z)
    if num_points is not None and num_points < n:
        points = torch.randperm(n, device=z.device)[:num_points]
        z, log_q_own = z[points], log_q_own[points]
    z_dim = z.shape[-1]
    chunk = max(1, max_chunk_elements // (n * z_dim))
    # log_prob of z shaped (chunk, 1, z_dim) broadcasts against q's batch (N,):
    # no need to slice the distribution, whatever its family.
    pairs = [aggregate.log_prob(z_chunk.unsqueeze(-2)) for z_chunk in z.split(chunk)]
    overflowed = sum(int(torch.isnan(p).sum()) for p in pairs)
    if overflowed:
        warnings.warn(f"mutual information: {overflowed} of {len(z) * n} (z, x) pairs scored "
                      f"NaN (the guide's inversion overflowed far in its tail) and count as "
                      f"density 0 in the aggregate posterior.", RuntimeWarning, stacklevel=2)
    log_q_aggregate = torch.cat([
        torch.logsumexp(p.nan_to_num(nan=-math.inf), dim=-1) for p in pairs]) - math.log(n)
    terms = log_q_own - log_q_aggregate
    se = float(terms.std() / math.sqrt(len(terms))) if len(terms) > 1 else float("nan")
    return float(terms.mean()), se


def collapse_diagnostics(vae, x: torch.Tensor, threshold: float = ACTIVITY_THRESHOLD,
                         mi_points: int | None = 500, kl_method: str = "auto",
                         kl_samples: int = 16, batch_size: int = 1000, seed: int = 0) -> dict:
    """Active units, KL per dimension and I(x; z) of ``vae`` on ``x``, as a JSON-able dict.

    Keys: ``active_units`` (int), ``posterior_mean_variance`` (Cov_x(E_q[z_u])
    per dimension), ``kl_per_dim`` (nats per dimension, averaged over x),
    ``kl_per_dim_method`` ("analytic" or "monte-carlo"; None and the reason where
    the prior or guide does not factorize), ``mutual_information`` and
    ``mutual_information_se`` (nats), and ``mutual_information_datapoints``, the
    datapoints of its aggregate posterior (all of ``x``, or ``SLOW_MI_POINTS`` of
    them for a flow guide). Uses its own RNG stream (``seed``), leaving the global
    one untouched. A VAE with several stochastic layers gets them per layer
    (``layer_diagnostics``).
    """
    if len(getattr(vae, "sites", ())) > 1:
        return layer_diagnostics(vae, x, threshold, mi_points, kl_samples, batch_size, seed)
    with vae.evaluating(seed):
        q = vae.encode(x, batch_size)
        variance, mean_method = _mean_variance(q)
        prior = vae.prior_distribution()
        if factorizes(q) and factorizes(prior):
            kl, method = kl_per_dim(q, prior, kl_method, kl_samples)
            kl = kl.tolist()
        else:  # a mixture prior, a full covariance, a flow: no KL of one dimension alone
            which = " and ".join(f"the {part} ({type(d).__name__})" for part, d in
                                 (("guide", q), ("prior", prior)) if not factorizes(d))
            kl, method = None, f"none: {which} does not factorize over dimensions"
        q_mi = q
        if vae.guide_family.scoring_passes > 1 and len(x) > SLOW_MI_POINTS:
            # scoring z under another datapoint's q inverts a flow, many network passes:
            # the aggregate posterior is that of a random subset (which caps the estimate
            # at log SLOW_MI_POINTS)
            chosen = torch.randperm(len(x), device=x.device)[:SLOW_MI_POINTS]
            q_mi = vae.encode(x[chosen], batch_size)
        mi, mi_se = mutual_information(q_mi, mi_points)
    return {
        "active_units": int((variance > threshold).sum()),
        "posterior_mean_variance": variance.tolist(),
        "posterior_mean_method": mean_method,
        "kl_per_dim": kl,
        "kl_per_dim_method": method,
        "mutual_information": mi,
        "mutual_information_se": mi_se,
        "mutual_information_datapoints": int(q_mi.batch_shape[0]),
    }


def layer_diagnostics(vae, x: torch.Tensor, threshold: float = ACTIVITY_THRESHOLD,
                      mi_points: int | None = 500, kl_samples: int = 16,
                      batch_size: int = 1000, seed: int = 0) -> dict:
    """The diagnostics of ``collapse_diagnostics`` for each stochastic layer of a VAE with
    several (``vae.sites``, bottom first), on q(z_l|x) from ``vae.encode_layers``: exact
    for z1, a mixture over draws of the layers below for the others.

    Keys: ``layers`` (the site names); ``active_units``, ``posterior_mean_variance``,
    ``kl_per_dim`` and ``mutual_information_per_layer`` (with ``_se``), one entry per
    layer; ``mutual_information`` (with ``_se``), I(x; z1), which is also I(x; z) of
    all the layers together, as under q the upper layers depend on x through z1 alone.
    The KL per dimension is a Monte Carlo average (``layer_kl_per_dim``).
    """
    with vae.evaluating(seed):
        layers = vae.encode_layers(x, batch_size, LAYER_SAMPLES)
        variances = [_mean_variance(q)[0] for q in layers]
        # q(z_l) over N datapoints: one draw of the layers below each is enough there (N
        # components), where q(z_l|x) itself needs its LAYER_SAMPLES
        single = vae.encode_layers(x, batch_size, 1)
        information = [mutual_information(q, mi_points, aggregate=one)
                       for q, one in zip(layers, single)]
        kl = layer_kl_per_dim(vae, x, kl_samples, batch_size)
    return {
        "layers": list(vae.sites),
        "active_units": [int((variance > threshold).sum()) for variance in variances],
        "posterior_mean_variance": [variance.tolist() for variance in variances],
        "posterior_mean_method": f"{vae.sites[0]}: closed form; above it: the mixture over "
                                 f"{LAYER_SAMPLES} draws of the layers below",
        "kl_per_dim": kl,
        "kl_per_dim_method": "monte-carlo",
        "mutual_information": information[0][0],
        "mutual_information_se": information[0][1],
        "mutual_information_per_layer": [mi for mi, _ in information],
        "mutual_information_per_layer_se": [se for _, se in information],
        "mutual_information_datapoints": int(layers[0].batch_shape[0]),
    }


def layer_kl_per_dim(vae, x: torch.Tensor, num_samples: int = 16, batch_size: int = 1000
                     ) -> list[list[float] | None]:
    """E_x E_q[log q(z_l|parent) - log p(z_l|parent)] per dimension of each stochastic
    layer, bottom first: the ELBO's KL split over the layers' dimensions (it sums to
    the whole KL). A Monte Carlo average over ``num_samples`` draws of every layer
    from the guide per datapoint, as p(z_l|z_l+1) depends on a draw and has no KL in
    closed form. None for a layer whose guide or prior does not factorize."""
    totals = [0.0] * len(vae.sites)
    for chunk in x.split(batch_size):
        # the guide's draws, and the model's conditionals at them: the decoder is not needed
        guide_trace = poutine.trace(_in_particles(vae.guide, num_samples)).get_trace(
            chunk.to(vae.device))
        latents = {site: guide_trace.nodes[site]["value"] for site in vae.sites}
        priors = vae.conditional_priors(latents)
        for index, site in enumerate(vae.sites):
            q, p = guide_trace.nodes[site]["fn"], priors[site]
            if totals[index] is None or not (factorizes(q) and factorizes(p)):
                totals[index] = None
                continue
            terms = q.base_dist.log_prob(latents[site]) - p.base_dist.log_prob(latents[site])
            totals[index] = totals[index] + terms.sum((0, 1))  # (samples, B, dims)
    return [None if total is None else (total / (num_samples * len(x))).tolist()
            for total in totals]


def _in_particles(fn, num_samples: int):
    def vectorized(*args):
        with pyro.plate("particles", num_samples, dim=-2):
            return fn(*args)
    return vectorized


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
