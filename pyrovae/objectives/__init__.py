"""Training objectives, looked up by name: ``make_elbo`` and the names the CLI offers.

Objectives: ``trace`` and ``meanfield`` (Pyro's ELBOs), ``iwae`` (Pyro's
``RenyiELBO`` with alpha = 0, Burda et al. 2016). Gradient estimators, an
argument of each objective: ``reparam`` (Pyro's), ``stl`` (sticking the
landing, Roeder et al. 2017) and ``dreg`` (doubly reparameterized, Tucker et
al. 2019). The KL weight beta and free bits (Kingma et al. 2016) turn an ELBO
into ``KLWeightedELBO``.

The objectives live in ``elbos``, the compiled step in ``compiled``, and the
reporting of analytic or Monte Carlo KLs next to the KLs, in
``pyrovae.families.kl``; their names are re-exported here.
"""

from __future__ import annotations

from pyrovae.errors import PyrovaeError, UnknownNameError
from pyrovae.families.kl import KLSite, describe_kl_methods, kl_methods, kl_table
from pyrovae.objectives.compiled import (
    CompiledTerms,
    CompiledTrace_ELBO,
    CompiledTraceMeanField_ELBO,
)
from pyrovae.objectives.elbos import (
    ESTIMATORS,
    LEGACY_CLASSES,
    DReG_IWAE_ELBO,
    IWAE_ELBO,
    KLWeightedELBO,
    Objective,
    RecordingTrace_ELBO,
    RecordingTraceMeanField_ELBO,
    STL_IWAE_ELBO,
    STL_KLWeightedELBO,
    STL_Trace_ELBO,
    Terms,
    TraceELBO,
    TraceMeanFieldELBO,
    check_estimator,
    detach_parameters,
)

__all__ = [
    "COMPILED", "ESTIMATORS", "OBJECTIVES", "CompiledTerms", "CompiledTrace_ELBO",
    "CompiledTraceMeanField_ELBO", "DReG_IWAE_ELBO", "IWAE_ELBO", "KLSite", "KLWeightedELBO",
    "Objective", "RecordingTraceMeanField_ELBO", "RecordingTrace_ELBO", "STL_IWAE_ELBO",
    "STL_KLWeightedELBO", "STL_Trace_ELBO", "Terms", "TraceELBO", "TraceMeanFieldELBO",
    "check_estimator", "describe_kl_methods", "detach_parameters", "kl_methods", "kl_table",
    "make_elbo", "why_not_compiled",
]

OBJECTIVES = {
    "trace": TraceELBO,
    "meanfield": TraceMeanFieldELBO,
    "iwae": IWAE_ELBO,
}

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
    check_estimator(name, estimator)
    if num_particles < 1:
        raise PyrovaeError(f"num_particles={num_particles} must be at least 1.")
    if beta < 0 or free_bits < 0:
        raise PyrovaeError(f"beta={beta} and free_bits={free_bits} must be >= 0.")
    weighted = kl_weighted or beta != 1 or free_bits > 0
    if name == "iwae" and weighted:
        raise PyrovaeError(
            "--beta, --kl-anneal and --free-bits weight the KL of an ELBO; the IWAE bound has "
            "no separate KL term. Use --elbo trace or meanfield with them.")
    reason = why_not_compiled(name, estimator, weighted) if jit else None
    if reason:
        raise PyrovaeError(f"cannot compile the step: {reason}; leave jit off for this objective.")
    kwargs = dict(num_particles=num_particles, max_plate_nesting=1,
                  vectorize_particles=vectorize_particles)
    if jit:
        return COMPILED[name](**kwargs)
    cls = OBJECTIVES[name]
    if weighted:
        cls = KLWeightedELBO
        kwargs.update(beta=beta, free_bits=free_bits, analytic_kl=name == "meanfield")
    # the former class of this estimator, for one release (elbos.py, "former names")
    cls = LEGACY_CLASSES.get((cls, estimator), cls)
    return cls(estimator=estimator, **kwargs)
