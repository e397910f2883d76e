"""Families for the latent code z: priors p(z) and guides q(z|x).

A prior owns its parameters (fixed buffers or learnable). A guide turns the
encoder's raw output, shaped ``batch + (num_params, z_dim)``, into constrained
parameters. Both return distributions with event dim 1.
"""

from __future__ import annotations

from typing import ClassVar

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import constraints

from pyrovae.errors import PyrovaeError
from pyrovae.families.base import Family, FixedOrLearnable, Registry

PRIORS = Registry("prior")
GUIDES = Registry("guide")
register_prior = PRIORS.register
register_guide = GUIDES.register


# ---------------------------------------------------------------- priors


class Prior(FixedOrLearnable):
    """p(z): ``prior(like)`` builds the distribution on ``like``'s device and dtype."""

    def forward(self, like: torch.Tensor) -> dist.Distribution:
        return self.make_dist(*self.param_values(like)).to_event(1)


@register_prior
class NormalPrior(Prior):
    name = "normal"
    param_constraints = {"loc": constraints.real, "scale": constraints.positive}
    defaults = {"loc": 0.0, "scale": 1.0}

    def make_dist(self, loc, scale):
        return dist.Normal(loc, scale, validate_args=False)


@register_prior
class LaplacePrior(Prior):
    name = "laplace"
    param_constraints = {"loc": constraints.real, "scale": constraints.positive}
    defaults = {"loc": 0.0, "scale": 1.0}

    def make_dist(self, loc, scale):
        return dist.Laplace(loc, scale, validate_args=False)


@register_prior
class StudentTPrior(Prior):
    name = "student-t"
    param_constraints = {
        "df": constraints.positive,
        "loc": constraints.real,
        "scale": constraints.positive,
    }
    defaults = {"df": 3.0, "loc": 0.0, "scale": 1.0}

    def make_dist(self, df, loc, scale):
        return dist.StudentT(df, loc, scale, validate_args=False)


@register_prior
class LogNormalPrior(Prior):
    name = "lognormal"
    support = constraints.positive
    param_constraints = {"loc": constraints.real, "scale": constraints.positive}
    defaults = {"loc": 0.0, "scale": 1.0}

    def make_dist(self, loc, scale):
        return dist.LogNormal(loc, scale, validate_args=False)


@register_prior
class GammaPrior(Prior):
    name = "gamma"
    support = constraints.positive
    param_constraints = {"concentration": constraints.positive, "rate": constraints.positive}
    defaults = {"concentration": 1.0, "rate": 1.0}

    def make_dist(self, concentration, rate):
        return dist.Gamma(concentration, rate, validate_args=False)


@register_prior
class ExponentialPrior(Prior):
    name = "exponential"
    support = constraints.positive
    param_constraints = {"rate": constraints.positive}
    defaults = {"rate": 1.0}

    def make_dist(self, rate):
        return dist.Exponential(rate, validate_args=False)


# ---------------------------------------------------------------- guides


def positive(raw: torch.Tensor, floor: float) -> torch.Tensor:
    # softplus rather than exp: an encoder output of 50 must not overflow to inf
    return F.softplus(raw) + floor


class Guide(Family):
    """q(z|x) family: ``num_params`` raw encoder outputs per latent dimension."""

    num_params: ClassVar[int] = 2

    def __init__(self, z_dim: int, min_scale: float = 1e-4):
        super().__init__()
        self.z_dim = z_dim
        self.min_scale = min_scale
        self._settings = {"min_scale": min_scale}

    def constrain(self, raw: torch.Tensor) -> tuple[torch.Tensor, ...]:
        loc, raw_scale = raw.unbind(-2)
        return loc, positive(raw_scale, self.min_scale)

    def forward(self, raw: torch.Tensor) -> dist.Distribution:
        return self.make_dist(*self.constrain(raw)).to_event(1)


@register_guide
class NormalGuide(Guide):
    name = "normal"

    def make_dist(self, loc, scale):
        return dist.Normal(loc, scale, validate_args=False)


@register_guide
class LaplaceGuide(Guide):
    name = "laplace"

    def make_dist(self, loc, scale):
        return dist.Laplace(loc, scale, validate_args=False)


@register_guide
class LogNormalGuide(Guide):
    """Positive latents: loc and scale are those of log z."""

    name = "lognormal"
    support = constraints.positive

    def make_dist(self, loc, scale):
        return dist.LogNormal(loc, scale, validate_args=False)


@register_guide
class StudentTGuide(Guide):
    """Student-t with degrees of freedom per latent dimension, learned or fixed.

    df is kept above ``min_df`` (default 2.1) because the variance, and with it
    the Student-t/Normal KL, is infinite for df <= 2.
    """

    name = "student-t"

    def __init__(self, z_dim: int, df: float = 5.0, learn_df: bool = True,
                 min_df: float = 2.1, min_scale: float = 1e-4):
        super().__init__(z_dim, min_scale)
        if not df > min_df:
            raise PyrovaeError(f"student-t guide df={df} must exceed min_df={min_df}; raise df.")
        self.min_df = min_df
        self._settings.update(df=df, learn_df=learn_df, min_df=min_df)
        excess = torch.full((z_dim,), float(df - min_df))
        if learn_df:
            # inverse softplus, so that min_df + softplus(raw) starts at df
            self.df_unconstrained = nn.Parameter(excess + torch.log(-torch.expm1(-excess)))
        else:
            self.register_buffer("df_fixed", excess + min_df)

    @property
    def df(self) -> torch.Tensor:
        if hasattr(self, "df_fixed"):
            return self.df_fixed
        return positive(self.df_unconstrained, self.min_df)

    def constrain(self, raw):
        loc, scale = super().constrain(raw)
        return self.df, loc, scale

    def make_dist(self, df, loc, scale):
        return dist.StudentT(df, loc, scale, validate_args=False)
