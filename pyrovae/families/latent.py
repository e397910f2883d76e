"""Families for the latent code z: priors p(z) and guides q(z|x).

A prior owns its parameters (fixed buffers or learnable). A guide turns the
encoder's raw output, shaped ``batch + guide.raw_shape`` (by default
``(num_params, z_dim)``: one number per parameter and latent dimension), into
a distribution. Both return distributions with event shape ``(z_dim,)``.

Each distribution is described once, as a ``LatentDistribution``; its prior and
guide classes (``NormalPrior``, ``NormalGuide``, ...) are made from that
description and registered under its name.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import biject_to, constraints
from torch.distributions.utils import vec_to_tril_matrix

from pyrovae.errors import PyrovaeError, UnknownNameError
from pyrovae.families.base import (
    Family,
    Registry,
    check_flag,
    check_number,
    check_positive_int,
    positive,
    positive_inverse,
)

PRIORS = Registry("prior")
GUIDES = Registry("guide")
register_prior = PRIORS.register
register_guide = GUIDES.register


# ---------------------------------------------------------------- the distributions


class LatentDistribution(NamedTuple):
    """What the prior and the guide of one distribution share."""

    name: str
    distribution: type
    support: constraints.Constraint
    param_constraints: dict[str, constraints.Constraint]  # in the distribution's argument order
    defaults: dict[str, float]  # the prior's parameters when the user sets none


LOC_SCALE = {"loc": constraints.real, "scale": constraints.positive}
STANDARD = {"loc": 0.0, "scale": 1.0}

NORMAL = LatentDistribution("normal", dist.Normal, constraints.real, LOC_SCALE, STANDARD)
LAPLACE = LatentDistribution("laplace", dist.Laplace, constraints.real, LOC_SCALE, STANDARD)
STUDENT_T = LatentDistribution("student-t", dist.StudentT, constraints.real,
                               {"df": constraints.positive, **LOC_SCALE}, {"df": 3.0, **STANDARD})
# positive latents: loc and scale are those of log z
LOGNORMAL = LatentDistribution("lognormal", dist.LogNormal, constraints.positive,
                               LOC_SCALE, STANDARD)
GAMMA = LatentDistribution("gamma", dist.Gamma, constraints.positive,
                           {"concentration": constraints.positive, "rate": constraints.positive},
                           {"concentration": 1.0, "rate": 1.0})
EXPONENTIAL = LatentDistribution("exponential", dist.Exponential, constraints.positive,
                                 {"rate": constraints.positive}, {"rate": 1.0})


def made_from(latent: LatentDistribution):
    """Class decorator: give a prior or guide class what ``latent`` knows.

    Only the attributes the class already declares are set: a guide takes the
    name, distribution and support, not the prior's parameters and defaults.
    """
    def decorate(cls):
        for field, value in latent._asdict().items():
            if hasattr(cls, field):
                setattr(cls, field, value)
        return cls
    return decorate


def _family(base: type, latent: LatentDistribution) -> type:
    """The subclass of ``base`` for ``latent``, named like NormalPrior (pickles find it by
    that name in this module)."""
    class_name = latent.distribution.__name__ + base.__name__
    doc = f"The {latent.name!r} {base.__name__.lower()}: {latent.distribution.__name__}."
    return made_from(latent)(type(class_name, (base,), {"__module__": __name__, "__doc__": doc}))


# ---------------------------------------------------------------- priors


class Prior(Family):
    """p(z), with parameters that are scalars or vectors set by the user, fixed or learned.

    ``prior()`` builds the distribution on the device and dtype of the prior's own
    parameters and buffers; ``prior(like)`` builds it on ``like``'s device and
    dtype, and uses nothing else of ``like``. A subclass that overrides
    ``forward`` should accept both: ``def forward(self, like=None)``.

    Subclasses list ``param_constraints`` (name -> constraint, in the order
    ``make_dist`` takes them) and ``defaults``. A learned parameter is stored
    unconstrained, through ``biject_to``, so that gradient steps can never leave
    its support.
    """

    param_constraints: ClassVar[dict[str, constraints.Constraint]] = {}
    defaults: ClassVar[dict[str, float]] = {}

    def __init__(self, size: int, learnable: bool | str | list[str] = False, **values):
        super().__init__()
        size = check_positive_int(size, "z_dim (--z-dim)")
        unknown = set(values) - set(self.param_constraints)
        if unknown:
            raise UnknownNameError(
                f"{self.name!r} has no parameter {sorted(unknown)}; "
                f"its parameters are {list(self.param_constraints)}."
            )
        learnable = self._learnable_names(learnable)
        self._settings = {**{k: _json_value(v) for k, v in values.items()}, "learnable": learnable}
        self._learned = []
        for pname, constraint in self.param_constraints.items():
            value = self._param_tensor(pname, values.get(pname, self.defaults[pname]), size)
            if not bool(constraint.check(value).all()):
                raise PyrovaeError(
                    f"{self.name!r} parameter {pname}={value.tolist()} is outside its "
                    f"support ({constraint}); pass a value inside it."
                )
            if pname in learnable:
                unconstrained = biject_to(constraint).inv(value)
                self.register_parameter(pname + "_unconstrained", nn.Parameter(unconstrained))
                self._learned.append(pname)
            else:
                self.register_buffer(pname, value)

    def _learnable_names(self, learnable) -> list[str]:
        """True (all parameters), False or None (none), one name, or a list of names."""
        known = list(self.param_constraints)
        if learnable is None or isinstance(learnable, bool):
            return known if learnable else []
        names = [learnable] if isinstance(learnable, str) else learnable
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise PyrovaeError(
                f"prior {self.name!r} learnable={learnable!r}: give True (all parameters, "
                f"--learn-prior), False, a parameter name or a list of them, from {known}.")
        unknown = [n for n in names if n not in known]
        if unknown:
            raise UnknownNameError(
                f"prior {self.name!r} cannot learn {unknown}: it has no such parameter; "
                f"its parameters are {known}.")
        return list(names)

    def _param_tensor(self, pname: str, value, size: int) -> torch.Tensor:
        """A parameter as a float32 vector of length ``size``: a finite number, broadcast,
        or one finite number per latent dimension."""
        how = (f"pass a number or a list of z_dim={size} numbers "
               f"(--prior-param {pname}=VALUE, prior_kwargs={{{pname!r}: ...}})")
        tensor = None
        if not isinstance(value, (str, bytes, bool)) and value is not None:
            try:
                tensor = torch.as_tensor(value, dtype=torch.float32)
            except (TypeError, ValueError, RuntimeError):
                tensor = None
        if tensor is None or tensor.dim() > 1:
            raise PyrovaeError(
                f"prior {self.name!r} parameter {pname}={value!r} is not a number or a "
                f"vector of numbers; {how}.")
        if tensor.dim() == 1 and len(tensor) != size:
            raise PyrovaeError(
                f"prior {self.name!r} parameter {pname} has {len(tensor)} values, but "
                f"z_dim is {size}; {how}.")
        if not bool(torch.isfinite(tensor).all()):
            raise PyrovaeError(
                f"prior {self.name!r} parameter {pname}={value!r} is not finite; {how}.")
        return tensor.expand(size).clone() if tensor.dim() == 0 else tensor.clone()

    def param_values(self, like: torch.Tensor | None = None) -> list[torch.Tensor]:
        values = []
        for pname, constraint in self.param_constraints.items():
            if pname in self._learned:
                value = biject_to(constraint)(getattr(self, pname + "_unconstrained"))
            else:
                value = getattr(self, pname)
            values.append(value if like is None else value.to(like))
        return values

    def forward(self, like: torch.Tensor | None = None) -> dist.Distribution:
        return self.make_dist(*self.param_values(like)).to_event(1)

    def attach(self, encode, x_shape: tuple[int, ...], data_support) -> None:
        """The VAE calls this once, when it is built, before it registers the prior's
        parameters. ``encode(x)`` returns q(z|x) for a batch of inputs of shape
        ``x_shape``, whose values lie in ``data_support`` (the likelihood's support).

        A prior made of the VAE's own encoder (``vamp``) keeps ``encode`` as a plain
        reference, not a submodule, so that the encoder's weights are saved once,
        and makes its data-space parameters here. The other priors ignore it.
        """

    def initialize(self, x: torch.Tensor) -> None:
        """Called once on a new run, before its first step, with training data (the
        CLI's ``pyrovae train`` does): a prior may set parameters from the data (the
        ``vamp`` prior's pseudo-inputs). The other priors ignore it."""


def _json_value(value):
    """A parameter as config.json saves it: Python numbers and lists as given, tensors
    and numpy values as plain floats or lists."""
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return list(value)
    tolist = getattr(value, "tolist", None)
    return tolist() if callable(tolist) else value


# The priors' base was FixedOrLearnable before it merged into Prior; the old name is
# kept for one release so that existing imports still work.
FixedOrLearnable = Prior

NormalPrior, LaplacePrior, StudentTPrior, LogNormalPrior, GammaPrior, ExponentialPrior = (
    register_prior(_family(Prior, latent))
    for latent in (NORMAL, LAPLACE, STUDENT_T, LOGNORMAL, GAMMA, EXPONENTIAL)
)


# ---------------------------------------------------------------- guides


class Guide(Family):
    """q(z|x) family: turns the encoder's raw output into q(z|x), with event shape (z_dim,).

    The encoder's output for one datapoint has the shape ``raw_shape``. The
    default, ``(num_params, z_dim)``, is one raw number per parameter and latent
    dimension: ``constrain`` maps them to the parameters, and ``make_dist``
    builds a distribution over each dimension, which ``forward`` makes one
    event of z_dim. A family whose q does not factorize over the dimensions (a
    full covariance, a flow) declares its own ``raw_shape`` and returns from
    ``make_dist`` a distribution whose event shape is ``(z_dim,)`` already.
    """

    num_params: ClassVar[int] = 2

    def __init__(self, z_dim: int, min_scale: float = 1e-4):
        super().__init__()
        self.z_dim = check_positive_int(z_dim, "z_dim (--z-dim)")
        # the floor keeps q's scale away from 0, where log q is infinite; below 0 the scale
        # itself could go negative. 0 means no floor (softplus alone, which underflows to 0
        # for raw outputs below about -100): for exact encoders, as in the PPCA test
        self.min_scale = check_number(
            min_scale, f"guide {self.name!r} min_scale (--guide-param min_scale=...), the floor "
            f"under q's scale (default 1e-4; 0 means no floor),", at_least=0)
        self._settings = {"min_scale": min_scale if type(min_scale) in (int, float)
                          else self.min_scale}

    # network passes to score a z that q did not draw itself (one for the closed-form
    # families; a flow inverts its steps one latent dimension at a time): the collapse
    # diagnostics score many such pairs, and take fewer datapoints where it is more
    scoring_passes: int = 1

    @property
    def raw_shape(self) -> tuple[int, ...]:
        """The shape of the encoder's output for one datapoint (the encoders' ``out_shape``)."""
        return (self.num_params, self.z_dim)

    def constrain(self, raw: torch.Tensor) -> tuple[torch.Tensor, ...]:
        loc, raw_scale = raw.unbind(-2)
        return loc, positive(raw_scale, self.min_scale)

    def forward(self, raw: torch.Tensor) -> dist.Distribution:
        self.check_raw(raw)
        q = self.make_dist(*self.constrain(raw))
        return q if q.event_shape else q.to_event(1)

    def check_raw(self, raw: torch.Tensor) -> None:
        """Refuse an encoder output whose trailing dimensions are not ``raw_shape``: a
        custom encoder built for another guide would otherwise fail deep inside torch,
        or worse, be split into the wrong parameters. Reads only the shape."""
        expected = tuple(self.raw_shape)
        got = tuple(raw.shape)
        if got[len(got) - len(expected):] != expected or len(got) < len(expected):
            raise PyrovaeError(
                f"the encoder's output has shape {got}, but guide {self.name!r} needs "
                f"batch + {expected} (its raw_shape) for z_dim={self.z_dim}; build the encoder "
                f"with out_shape=vae.guide_family.raw_shape, e.g. "
                f"MLPEncoder(x_shape, {expected}).")


NormalGuide, LaplaceGuide, LogNormalGuide = (
    register_guide(_family(Guide, latent)) for latent in (NORMAL, LAPLACE, LOGNORMAL)
)


@register_guide
@made_from(STUDENT_T)
class StudentTGuide(Guide):
    """Student-t with degrees of freedom per latent dimension, learned or fixed.

    df is kept above ``min_df`` (default 2.1) because the variance, and with it
    the Student-t/Normal KL, is infinite for df <= 2.
    """

    def __init__(self, z_dim: int, df: float = 5.0, learn_df: bool = True,
                 min_df: float = 2.1, min_scale: float = 1e-4):
        super().__init__(z_dim, min_scale)
        min_df = check_number(min_df, "student-t guide min_df (--guide-param min_df=...)", above=0)
        df = check_number(df, "student-t guide df (--guide-param df=...)")
        learn_df = check_flag(learn_df, "student-t guide learn_df (--guide-param learn_df=...)")
        if not df > min_df:
            raise PyrovaeError(f"student-t guide df={df} must exceed min_df={min_df}; raise df.")
        self.min_df = min_df
        self._settings.update(df=df, learn_df=learn_df, min_df=min_df)
        if learn_df:
            self.df_unconstrained = nn.Parameter(positive_inverse(df, min_df, (z_dim,)))
        else:
            self.register_buffer("df_fixed", torch.full((z_dim,), float(df - min_df)) + min_df)

    @property
    def df(self) -> torch.Tensor:
        if hasattr(self, "df_fixed"):
            return self.df_fixed
        return positive(self.df_unconstrained, self.min_df)

    def constrain(self, raw):
        loc, scale = super().constrain(raw)
        return self.df, loc, scale


@register_guide
class FullNormalGuide(Guide):
    """A Gaussian with a full covariance: ``MultivariateNormal(loc, scale_tril=L)``.

    The encoder gives loc (z_dim numbers), L's diagonal (z_dim numbers, through
    ``softplus + min_scale`` as every guide's scale) and its strictly lower
    triangle (z_dim (z_dim - 1) / 2 free numbers), in that order. It holds the
    exact posterior of a linear-Gaussian decoder, whose latent dimensions are
    correlated under the posterior unless the decoder's columns are orthogonal.
    """

    name = "full-normal"
    distribution = dist.MultivariateNormal

    @property
    def raw_shape(self) -> tuple[int, ...]:
        return (self.z_dim + self.z_dim * (self.z_dim + 1) // 2,)

    def constrain(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z_dim = self.z_dim
        loc, raw_diagonal, lower = raw.split([z_dim, z_dim, z_dim * (z_dim - 1) // 2], dim=-1)
        scale_tril = torch.diag_embed(positive(raw_diagonal, self.min_scale))
        if z_dim > 1:
            scale_tril = scale_tril + vec_to_tril_matrix(lower, diag=-1)
        return loc, scale_tril

    def make_dist(self, loc, scale_tril):
        return dist.MultivariateNormal(loc, scale_tril=scale_tril, validate_args=False)
