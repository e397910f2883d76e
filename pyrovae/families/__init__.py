"""Distribution families for priors, guides and likelihoods, looked up by name.

Each family is defined once, in ``latent.py`` or ``likelihoods.py`` (a prior
and a guide of the same distribution are made from one description of it),
``flows.py`` (the ``iaf`` guide) or ``mixtures.py`` (the ``mog`` and ``vamp``
priors); the closed-form KLs that torch lacks live in ``kl.py`` and are
registered on import.
"""

from __future__ import annotations

import inspect

from torch.distributions import constraints

from pyrovae.errors import SupportMismatchError, UnknownNameError
from pyrovae.families import kl  # noqa: F401  (registers the closed-form KLs with torch)
from pyrovae.families.base import Family, Registry, same_support
from pyrovae.families.flows import IAFDistribution, IAFGuide
from pyrovae.families.latent import (
    GUIDES,
    PRIORS,
    FixedOrLearnable,
    FullNormalGuide,
    Guide,
    Prior,
    register_guide,
    register_prior,
)
from pyrovae.families.likelihoods import LIKELIHOODS, Likelihood, register_likelihood
from pyrovae.families.mixtures import LatentMixture, MixtureOfGaussiansPrior, VampPrior


def _build(registry: Registry, base: type, spec, *args, **kwargs):
    if isinstance(spec, Family):
        return spec
    if isinstance(spec, str):
        cls = registry.lookup(spec)
        accepted = inspect.signature(cls).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
            unknown = sorted(set(kwargs) - set(accepted))
            if unknown:
                raise UnknownNameError(
                    f"{registry.kind} {spec!r} takes no parameter {unknown}; it takes "
                    f"{[p for p in accepted if p not in ('z_dim', 'x_shape')]}.")
        return cls(*args, **kwargs)
    raise TypeError(
        f"a {registry.kind} is a registered name ({sorted(registry)}) or a "
        f"{base.__name__} instance, not {type(spec).__name__}."
    )


def make_prior(spec, z_dim: int, **kwargs) -> Prior:
    return _build(PRIORS, Prior, spec, z_dim, **kwargs)


def make_guide(spec, z_dim: int, **kwargs) -> Guide:
    return _build(GUIDES, Guide, spec, z_dim, **kwargs)


def make_likelihood(spec, x_shape, **kwargs) -> Likelihood:
    return _build(LIKELIHOODS, Likelihood, spec, tuple(x_shape), **kwargs)


def compatible_pairs() -> dict[str, list[str]]:
    """For each registered guide, the registered priors with the same support."""
    return {
        g: [p for p, prior in PRIORS.items() if same_support(guide.support, prior.support)]
        for g, guide in GUIDES.items()
    }


def check_supports(guide: Family, prior: Family) -> None:
    """Refuse a guide whose support differs from the prior's: the KL would be infinite
    (guide mass where the prior has none) or samples would be invalid for the prior."""
    if same_support(guide.support, prior.support):
        return
    pairs = "; ".join(f"guide {g!r} with prior {ps}" for g, ps in compatible_pairs().items())
    raise SupportMismatchError(
        f"guide {guide.name or type(guide).__name__!r} has support {support_name(guide.support)}, "
        f"but prior {prior.name or type(prior).__name__!r} has support "
        f"{support_name(prior.support)}: they must match. Combinations that work: {pairs}."
    )


def support_name(constraint) -> str:
    """'real' and 'positive' rather than torch's Real() and GreaterThan(lower_bound=0.0)."""
    for name, known in (("real", constraints.real), ("positive", constraints.positive)):
        if same_support(constraint, known):
            return name
    return str(constraint)


__all__ = [
    "Family", "FixedOrLearnable", "Registry", "Prior", "Guide", "Likelihood",
    "PRIORS", "GUIDES", "LIKELIHOODS", "register_prior", "register_guide",
    "register_likelihood", "make_prior", "make_guide", "make_likelihood",
    "check_supports", "compatible_pairs", "FullNormalGuide", "IAFGuide", "IAFDistribution",
    "LatentMixture", "MixtureOfGaussiansPrior", "VampPrior",
]
