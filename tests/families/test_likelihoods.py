"""The likelihoods' guarantees that no training run checks: the Gaussian's sigma floor."""

import math

import pytest
import torch

import pyrovae  # noqa: F401  (registers the families)
from pyrovae.families import make_likelihood

X_SHAPE = (8, 8)
PIXELS = math.prod(X_SHAPE)
MIN_SCALE = 0.05
EPS32 = torch.finfo(torch.float32).eps


def gaussian_at_the_floor(sigma, loc):
    """The Gaussian likelihood with its raw scale driven to -1e4, where softplus is 0."""
    likelihood = make_likelihood("gaussian", X_SHAPE, sigma=sigma, min_scale=MIN_SCALE)
    if sigma == "per-pixel":
        with torch.no_grad():
            likelihood.scale_unconstrained.fill_(-1e4)
        raw = loc.unsqueeze(-3)
    else:
        raw = torch.stack([loc, torch.full_like(loc, -1e4)], dim=-3)
    return likelihood(raw)


@pytest.mark.parametrize("sigma", ["per-pixel", "per-datapoint"])
def test_gaussian_sigma_never_goes_below_min_scale(sigma):
    generator = torch.Generator().manual_seed(0)
    loc = torch.randn(3, 5, *X_SHAPE, generator=generator)
    p = gaussian_at_the_floor(sigma, loc)
    # softplus(-1e4) underflows to exactly 0, so the scale is the float32 floor itself
    assert torch.equal(p.base_dist.scale.expand(loc.shape),
                       torch.full_like(loc, MIN_SCALE)), sigma
    # each pixel's log density is at most -log(min_scale sqrt(2 pi)), reached where x = loc
    bound = -PIXELS * math.log(MIN_SCALE * math.sqrt(2 * math.pi))
    # float32: a few roundings per pixel and a sum of PIXELS terms of one sign, each
    # at most (PIXELS + 4) eps32 of the total
    tol = (PIXELS + 4) * EPS32 * bound
    at_loc = p.log_prob(loc)
    assert at_loc.shape == (3, 5)
    assert (at_loc - bound).abs().max() <= tol, (at_loc, bound)
    x = loc + 0.1 * torch.randn(loc.shape, generator=generator)
    assert (p.log_prob(x) <= bound + tol).all()
