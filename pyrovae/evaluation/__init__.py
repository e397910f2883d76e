"""Evaluation of trained VAEs: importance-sampled log p(x) per datapoint, with ESS,
Monte Carlo standard errors and PSIS k-hat (``docs/marginal_likelihood.md``), and
posterior-collapse diagnostics (``docs/diagnostics.md``); annealed importance
sampling and BDMC (``ais.py``)."""

from pyrovae.evaluation.ais import (
    AISEstimate,
    ais_log_likelihood,
    annealing_schedule,
    bdmc,
    hmc_transition,
)
from pyrovae.evaluation.diagnostics import collapse_diagnostics, posterior_draws
from pyrovae.evaluation.marginal import (
    LogLikelihoodEstimate,
    iwae_bounds,
    log_likelihood,
    log_weights,
    pareto_khat,
)

__all__ = ["LogLikelihoodEstimate", "log_likelihood", "log_weights", "pareto_khat",
           "iwae_bounds", "collapse_diagnostics", "posterior_draws",
           "AISEstimate", "ais_log_likelihood", "annealing_schedule", "bdmc", "hmc_transition"]
