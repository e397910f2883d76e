"""A full-covariance guide holds the exact posterior of a PPCA model whose decoder
columns are not orthogonal; no diagonal guide does."""

import dataclasses

import pyro.distributions as dist
import torch
from torch import nn

from pyrovae import VAE
from pyrovae.evaluation import log_likelihood

from test_marginal import (  # the linear-Gaussian model of the IS tests
    SIGMA,
    X_DIM,
    Z_DIM,
    LinearDecoder,
    exactly_orthogonal_columns,
)

NUM_SAMPLES = 1000


@dataclasses.dataclass
class Posterior:
    """The exact posterior N(gain (x - bias), covariance) of PPCA, in float64."""

    gain: torch.Tensor
    covariance: torch.Tensor

    @classmethod
    def of(cls, weight, sigma):
        weight = weight.double()
        precision = torch.eye(weight.shape[1], dtype=torch.float64) + weight.T @ weight / sigma**2
        covariance = torch.linalg.inv(precision)
        return cls(covariance @ weight.T / sigma**2, covariance)


def inverse_softplus(y):
    return y + torch.log(-torch.expm1(-y))


class FullPosteriorEncoder(nn.Module):
    """The exact posterior in the full-normal guide's layout: loc, softplus^-1 of the
    Cholesky factor's diagonal, its strict lower triangle row by row (min_scale=0)."""

    def __init__(self, posterior, bias):
        super().__init__()
        scale_tril = torch.linalg.cholesky(posterior.covariance)
        rows, cols = torch.tril_indices(Z_DIM, Z_DIM, offset=-1)
        self.register_buffer("gain", posterior.gain.float())
        self.register_buffer("bias", bias)
        self.register_buffer("shape", torch.cat([inverse_softplus(scale_tril.diagonal()),
                                                 scale_tril[rows, cols]]).float())

    def forward(self, x):
        loc = (x - self.bias) @ self.gain.T
        return torch.cat([loc, self.shape.expand(*loc.shape[:-1], -1)], dim=-1)


class MeanFieldEncoder(nn.Module):
    """The best diagonal Gaussian in KL(q || posterior): the posterior mean, and
    variances 1 / diag(precision), below the posterior's marginal variances."""

    def __init__(self, posterior, bias):
        super().__init__()
        scale = torch.linalg.inv(posterior.covariance).diagonal().rsqrt()
        self.register_buffer("gain", posterior.gain.float())
        self.register_buffer("bias", bias)
        self.register_buffer("raw_scale", inverse_softplus(scale).float())

    def forward(self, x):
        loc = (x - self.bias) @ self.gain.T
        return torch.stack([loc, self.raw_scale.expand_as(loc)], dim=-2)


def correlated_ppca():
    """PPCA whose second decoder column is 0.8 times the first plus 0.6 times an orthogonal
    one: the posterior correlation of z is about -0.77, beyond the 1/2 where a diagonal
    Gaussian proposal's importance weights have infinite variance."""
    generator = torch.Generator().manual_seed(1)
    first, second = exactly_orthogonal_columns(generator).unbind(-1)
    weight = 2.0 * torch.stack([first, 0.8 * first + 0.6 * second], dim=-1)
    bias = torch.randn(X_DIM, generator=generator)
    marginal = dist.MultivariateNormal(bias, weight @ weight.T + SIGMA**2 * torch.eye(X_DIM))
    x = marginal.sample((50,))
    return weight, bias, x, marginal.log_prob(x).double()


def ppca_vae(guide, encoder, weight, bias):
    return VAE((X_DIM,), z_dim=Z_DIM, guide=guide, likelihood="gaussian-fixed",
               likelihood_kwargs={"scale": SIGMA}, guide_kwargs={"min_scale": 0.0},
               decoder=LinearDecoder(weight, bias), encoder=encoder)


def test_the_posterior_is_strongly_correlated():
    weight, _, _, _ = correlated_ppca()
    covariance = Posterior.of(weight, SIGMA).covariance
    correlation = covariance[0, 1] / covariance.diagonal().prod().sqrt()
    assert correlation < -0.7


def test_full_normal_guide_is_exact_and_a_diagonal_one_is_not():
    weight, bias, x, exact = correlated_ppca()
    posterior = Posterior.of(weight, SIGMA)
    full = log_likelihood(ppca_vae("full-normal", FullPosteriorEncoder(posterior, bias),
                                   weight, bias), x, NUM_SAMPLES)
    diagonal = log_likelihood(ppca_vae("normal", MeanFieldEncoder(posterior, bias),
                                       weight, bias), x, NUM_SAMPLES)
    # the exact posterior as proposal: every weight is p(x), up to float32 rounding of the
    # log weights (a few eps32 times terms of order 10, far below 1e-4)
    assert (full.ess / NUM_SAMPLES >= 0.95).all()
    torch.testing.assert_close(full.log_px, exact, atol=1e-4, rtol=0)
    # the diagonal guide's weights have infinite variance: their ESS stays far below K, and
    # k-hat flags the heavy tail for most datapoints
    assert (diagonal.ess / NUM_SAMPLES < 0.8).all()
    assert float((diagonal.khat > 0.5).double().mean()) > 0.5
