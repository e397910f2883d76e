"""Trace_ELBO and TraceMeanField_ELBO estimate the same ELBO, for every guide/prior pair."""

import pytest
import torch

from pyrovae import VAE, make_elbo
from pyrovae.families import compatible_pairs

PAIRS = [(g, p) for g, priors in compatible_pairs().items() for p in priors]


def elbo_draws(elbo, vae, x, repeats):
    with torch.no_grad():
        return torch.tensor([-elbo.loss(vae.model, vae.guide, x) for _ in range(repeats)])


@pytest.mark.slow
@pytest.mark.parametrize("guide,prior", PAIRS)
def test_trace_and_meanfield_agree_in_expectation(guide, prior, binary_digits):
    torch.manual_seed(0)
    vae = VAE((8, 8), z_dim=3, prior=prior, guide=guide, hidden=(32,),
              prior_kwargs={"components": 5} if prior in ("mog", "vamp") else None)
    x = binary_digits.train[:4]
    # each draw averages 50 vectorized particles; 100 draws give the standard error
    trace = elbo_draws(make_elbo("trace", 50), vae, x, 100)
    meanfield = elbo_draws(make_elbo("meanfield", 50), vae, x, 100)
    se = (trace.var() / len(trace) + meanfield.var() / len(meanfield)).sqrt()
    assert abs(trace.mean() - meanfield.mean()) < 4 * se, (trace.mean(), meanfield.mean(), se)
