"""Families for the observation x: likelihoods p(x|z).

The decoder's raw output is shaped ``batch + (num_params,) + x_shape``. A
likelihood constrains it, builds the distribution with the whole image as its
event, and checks data against its support before training starts (the check
runs once at the edge, not in every SVI step).
"""

from __future__ import annotations

from typing import ClassVar

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import constraints

from pyrovae.errors import DataError, PyrovaeError
from pyrovae.families.base import (
    Family,
    Registry,
    check_number,
    check_positive_int,
    positive,
    positive_inverse,
)

LIKELIHOODS = Registry("likelihood")
register_likelihood = LIKELIHOODS.register


class Likelihood(Family):
    """p(x|z): ``num_params`` decoder outputs per pixel."""

    num_params: ClassVar[int] = 1

    def __init__(self, x_shape: tuple[int, ...]):
        super().__init__()
        self.x_shape = tuple(check_positive_int(n, f"each size of x_shape {tuple(x_shape)}")
                             for n in x_shape)

    def constrain(self, raw: torch.Tensor) -> tuple[torch.Tensor, ...]:
        dim = -len(self.x_shape) - 1
        if raw.shape[dim] == 1:
            # squeeze's backward is a view; unbind's stacks a copy of the image-sized
            # gradient, which cost 4 % of a batch-1024 step
            return (raw.squeeze(dim),)
        return tuple(raw.unbind(dim))

    def forward(self, raw: torch.Tensor) -> dist.Distribution:
        return self.make_dist(*self.constrain(raw)).to_event(len(self.x_shape))

    def mean(self, raw: torch.Tensor) -> torch.Tensor:
        """The mean image of p(x|z), for reconstructions and samples."""
        return self(raw).mean

    def check_support(self, x: torch.Tensor) -> None:
        """Raise DataError if x holds values this likelihood gives no mass."""


class LogitsLikelihood(Likelihood):
    """The decoder outputs logits, which the distribution takes by keyword (its first
    argument is probs)."""

    def make_dist(self, logits):
        return self.distribution(logits=logits, validate_args=False)


def _in_unit_interval(x: torch.Tensor) -> bool:
    """All of x in [0, 1], in one vectorized pass (a NaN makes the min and max NaN)."""
    low, high = torch.aminmax(x)
    return bool((low >= 0) & (high <= 1))


def _bad_count(mask: torch.Tensor) -> str:
    return f"{int(mask.sum())} of {mask.numel()} values"


class BernoulliImage(dist.Independent):
    """Independent Bernoulli pixels whose log_prob negates the binary cross-entropy
    after summing it over the image rather than before.

    The value is the same bit for bit (negation is exact, and the sum runs in
    the same order), but one image-sized tensor fewer is made forward and
    backward, which was 4 % of an SVI step at batch 1024 on CPU.
    """

    def log_prob(self, value):
        logits, value = torch.broadcast_tensors(self.base_dist.logits, value)
        cross_entropy = F.binary_cross_entropy_with_logits(logits, value, reduction="none")
        n = self.reinterpreted_batch_ndims
        return -cross_entropy.reshape(cross_entropy.shape[:cross_entropy.dim() - n] + (-1,)).sum(-1)


@register_likelihood
class BernoulliLikelihood(LogitsLikelihood):
    """Binary pixels; the decoder outputs logits.

    ``forward`` wraps the pixels in a ``BernoulliImage``: the same log-likelihood
    as ``Independent(Bernoulli)``, with one image-sized tensor fewer per step.
    """

    name = "bernoulli"
    support = constraints.boolean
    distribution = dist.Bernoulli

    def forward(self, raw):
        return BernoulliImage(self.make_dist(*self.constrain(raw)), len(self.x_shape),
                              validate_args=False)

    def mean(self, raw):
        return torch.sigmoid(raw.squeeze(-len(self.x_shape) - 1))

    def check_support(self, x):
        # fast path, two vectorized reductions: all of x in [0, 1], where x - x^2 >= 0 is 0
        # only at 0 and 1, so that its sum is 0 only for binary data (a NaN fails both
        # tests); the elementwise count (ten times slower on CPU) only for the message
        if x.numel() == 0 or (_in_unit_interval(x)
                              and bool(torch.addcmul(x, x, x, value=-1).sum() == 0)):
            return
        bad = (x != 0) & (x != 1)
        if bool(bad.any()):
            raise DataError(
                f"the bernoulli likelihood needs binary data, but {_bad_count(bad)} are grey "
                f"(not 0 or 1). Binarize them (--binarize dynamic or static), or use "
                f"--likelihood continuous-bernoulli for grey values in [0, 1]."
            )


@register_likelihood
class ContinuousBernoulliLikelihood(LogitsLikelihood):
    """Grey values in [0, 1] (Loaiza-Ganem & Cunningham 2019); the decoder outputs logits."""

    name = "continuous-bernoulli"
    support = constraints.unit_interval
    distribution = dist.ContinuousBernoulli

    def check_support(self, x):
        if x.numel() == 0 or _in_unit_interval(x):
            return
        bad = (x < 0) | (x > 1)
        if bool(bad.any()):
            raise DataError(
                f"the continuous-bernoulli likelihood needs values in [0, 1], but "
                f"{_bad_count(bad)} lie outside. Rescale the data to [0, 1], or use "
                f"--likelihood gaussian for unbounded values."
            )


@register_likelihood
class GaussianFixedLikelihood(Likelihood):
    """Gaussian with a fixed sigma: the identity-covariance decoder when scale=1."""

    name = "gaussian-fixed"
    support = constraints.real
    distribution = dist.Normal

    def __init__(self, x_shape, scale: float = 1.0):
        super().__init__(x_shape)
        check_number(scale, "gaussian-fixed scale (--likelihood-param scale=...)", above=0)
        self._settings = {"scale": scale}
        self.register_buffer("scale", torch.tensor(float(scale)))

    def make_dist(self, loc):
        return super().make_dist(loc, self.scale.to(loc))

    def mean(self, raw):
        return raw.squeeze(-len(self.x_shape) - 1)


@register_likelihood
class GaussianLikelihood(Likelihood):
    """Gaussian with a learned sigma, kept above ``min_scale``.

    A free sigma makes the objective unbounded: on a pixel the decoder fits
    exactly, sigma -> 0 sends log p(x|z) to +inf. The floor bounds each pixel's
    log density by -log(min_scale * sqrt(2 pi)).

    ``sigma="per-pixel"``: one learned sigma per pixel, shared by all data.
    ``sigma="per-datapoint"``: the decoder outputs a sigma for every pixel of
    every datapoint (heteroscedastic, as in Kingma & Welling's Frey Face model).
    """

    name = "gaussian"
    support = constraints.real
    distribution = dist.Normal

    def __init__(self, x_shape, sigma: str = "per-pixel", min_scale: float = 1e-2,
                 init_scale: float = 1.0):
        super().__init__(x_shape)
        if not isinstance(sigma, str) or sigma not in ("per-pixel", "per-datapoint"):
            raise PyrovaeError(f"gaussian sigma={sigma!r}: use 'per-pixel' or 'per-datapoint'.")
        # the floor bounds the objective; at 0 a pixel fit exactly sends it to +inf
        check_number(min_scale, "gaussian min_scale (--likelihood-param min_scale=...), the "
                     "floor under sigma that keeps log p(x|z) bounded,", above=0)
        check_number(init_scale, "gaussian init_scale (--likelihood-param init_scale=...)")
        if not init_scale > min_scale:
            raise PyrovaeError(f"gaussian init_scale={init_scale} must exceed min_scale={min_scale}.")
        self.sigma = sigma
        self.min_scale = min_scale
        self._settings = {"sigma": sigma, "min_scale": min_scale, "init_scale": init_scale}
        if sigma == "per-pixel":
            self.scale_unconstrained = nn.Parameter(
                positive_inverse(init_scale, min_scale, self.x_shape))

    @property
    def num_params(self) -> int:
        return 2 if self.sigma == "per-datapoint" else 1

    def constrain(self, raw):
        if self.sigma == "per-datapoint":
            loc, raw_scale = super().constrain(raw)
            return loc, positive(raw_scale, self.min_scale)
        (loc,) = super().constrain(raw)
        return loc, positive(self.scale_unconstrained, self.min_scale)

    def mean(self, raw):
        return self.constrain(raw)[0]
