import json
import math

import numpy as np
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyrovae.collapse import posterior_mean_variance
from pyrovae.errors import PyrovaeError
from pyrovae.evaluation.diagnostics import (
    active_units,
    collapse_diagnostics,
    import_arviz,
    kl_per_dim,
    mutual_information,
    posterior_draws,
)
from pyrovae.vae import VAE

Z_DIM = 3


def inverse_softplus(y: float) -> float:
    return math.log(math.expm1(y))


class ConstantEncoder(nn.Module):
    """Ignores x: q(z|x) = N(loc, scale) for every x."""

    def __init__(self, loc=0.0, scale=1.0, z_dim=Z_DIM, min_scale=1e-4):
        super().__init__()
        self.raw = nn.Parameter(torch.tensor([[loc] * z_dim,
                                              [inverse_softplus(scale - min_scale)] * z_dim]))

    def forward(self, x):
        return self.raw.expand(x.shape[0], *self.raw.shape)


class IdentityEncoder(nn.Module):
    """q(z|x) = N(x, scale^2): the mean is the (1-D) datapoint itself."""

    def __init__(self, scale=1.0, min_scale=1e-4):
        super().__init__()
        self.register_buffer("raw_scale", torch.tensor(inverse_softplus(scale - min_scale)))

    def forward(self, x):
        return torch.stack([x, self.raw_scale.expand_as(x)], dim=-2)


def vector_vae(encoder, z_dim=Z_DIM, **kwargs):
    return VAE((z_dim,), z_dim=z_dim, likelihood="gaussian-fixed", encoder=encoder, **kwargs)


def full_rank_data(n=500, z_dim=Z_DIM):
    mixing = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.3, 0.0], [0.2, -0.4, 0.2]])[:z_dim, :z_dim]
    return torch.randn(n, z_dim) @ mixing.T


def test_active_units_zero_when_the_encoder_ignores_its_input():
    x = full_rank_data()
    result = collapse_diagnostics(vector_vae(ConstantEncoder(loc=0.3, scale=0.5)), x)
    assert result["active_units"] == 0
    # 0 up to float32 rounding of the mean of N equal values (0 for Welford's update, which
    # torch uses; within N eps32 of 0.3 for a plain sum): variance at most that squared
    bound = (len(x) * torch.finfo(torch.float32).eps * 0.3) ** 2
    assert all(0 <= v <= bound for v in result["posterior_mean_variance"])


def test_active_units_all_for_an_identity_encoder_on_full_rank_data():
    x = full_rank_data()
    assert torch.linalg.matrix_rank(torch.cov(x.T)) == Z_DIM
    result = collapse_diagnostics(vector_vae(IdentityEncoder(scale=0.5)), x)
    assert result["active_units"] == Z_DIM
    # the statistic is the sample variance of the encoder means, here the data's: the same
    # float32 values, perhaps reduced in another order (~ a few eps32 relative, 1e-5 covers it)
    np.testing.assert_allclose(result["posterior_mean_variance"], x.var(0).tolist(), rtol=1e-5)


def test_active_units_threshold_counts_dimensions_strictly_above_it():
    q = dist.Normal(torch.randn(1000, 1) * torch.tensor([0.0, 0.05, 1.0]), 1.0).to_event(1)
    assert active_units(q) == 1  # variances 0, about 0.05^2 = 0.0025 and 1
    assert active_units(q, threshold=0.001) == 2


def test_a_variance_exactly_at_the_threshold_is_not_active():
    # two datapoints with means +-a: the mean is 0 and the variance 2 a^2 / (2 - 1), every
    # step exact in float32 for a = 1/16 (any summation order), so it equals 1/128 exactly
    a = 1 / 16
    threshold = 2 * a**2
    loc = torch.tensor([[a, 2 * a, 0.3], [-a, -2 * a, 0.3]])
    q = dist.Normal(loc, 1.0).to_event(1)
    assert posterior_mean_variance(q).tolist() == [threshold, 4 * threshold, 0.0]
    assert active_units(q, threshold=threshold) == 1  # strictly above: not the first


def test_without_a_closed_form_mean_the_draws_noise_is_taken_off():
    # q(z|x) = N(loc_x, 1) written as a transformed distribution, which has no mean in torch;
    # the first dimension's means are all 0 (collapsed), the second's spread with sd 0.5
    torch.manual_seed(0)
    n = 2000
    loc = torch.stack([torch.zeros(n), 0.5 * torch.randn(n)], dim=-1)
    q = dist.TransformedDistribution(dist.Normal(torch.zeros(n, 2), 1.0).to_event(1),
                                     [dist.transforms.AffineTransform(loc, 1.0, event_dim=1)])
    with pytest.raises(NotImplementedError):
        q.mean
    variance = posterior_mean_variance(q)
    # the plain variance of means of 32 draws would add 1/32 = 0.031 to both. What is left
    # is noise: sd sqrt(2 / n) / 32 = 0.001 in the first dimension, and in the second the
    # cross term of the means and the draws, sd 2 * 0.5 * sqrt(1 / (32 n)) = 0.004
    assert abs(float(variance[0])) < 5 * 0.001
    assert abs(float(variance[1]) - float(loc[:, 1].var())) < 5 * 0.004
    assert active_units(q) == 1


def test_mutual_information_is_zero_when_q_is_the_prior():
    vae = vector_vae(ConstantEncoder(loc=0.0, scale=1.0))
    result = collapse_diagnostics(vae, full_rank_data(), mi_points=None)
    assert abs(result["mutual_information"]) < 1e-5
    assert max(abs(k) for k in result["kl_per_dim"]) < 1e-6


def test_mutual_information_matches_the_gaussian_channel():
    # x ~ N(0, 1) per dimension and q(z|x) = N(x, s^2): q(z) = N(0, 1 + s^2) and
    # I(x; z) = z_dim / 2 * log(1 + 1/s^2). The mixture of N = 2000 components is
    # an unbiased kernel density estimate of q(z); its log costs O(1/N) of bias,
    # covered by the 0.02 next to four standard errors.
    scale, n = 1.0, 2000
    q = dist.Normal(torch.randn(n, 2), scale).to_event(1)
    estimate, se = mutual_information(q, num_points=None)
    exact = 2 / 2 * math.log(1 + 1 / scale**2)
    assert abs(estimate - exact) < 4 * se + 0.02, (estimate, se, exact)


def test_mutual_information_reaches_log_n_for_separated_posteriors():
    n = 100
    q = dist.Normal(torch.arange(n, dtype=torch.float32).unsqueeze(-1), 1e-3).to_event(1)
    estimate, _ = mutual_information(q, num_points=None)
    assert estimate == pytest.approx(math.log(n), abs=1e-4)


def test_mutual_information_chunking_and_subsampling_agree_with_one_pass():
    q = dist.Normal(torch.randn(300, 4), torch.rand(300, 4) + 0.2).to_event(1)
    torch.manual_seed(1)
    whole = mutual_information(q, num_points=None)
    torch.manual_seed(1)
    chunked = mutual_information(q, num_points=None, max_chunk_elements=1)
    assert whole[0] == pytest.approx(chunked[0], abs=1e-5)
    torch.manual_seed(2)
    sub, sub_se = mutual_information(q, num_points=100)
    assert abs(sub - whole[0]) < 4 * (sub_se + whole[1])


def test_kl_per_dim_analytic_is_the_normal_closed_form_averaged_over_data():
    loc, scale = torch.randn(50, Z_DIM), torch.rand(50, Z_DIM) + 0.5
    q = dist.Normal(loc, scale).to_event(1)
    prior = dist.Normal(torch.zeros(Z_DIM), torch.ones(Z_DIM)).to_event(1)
    kl, method = kl_per_dim(q, prior)
    closed_form = 0.5 * (scale**2 + loc**2 - 1 - 2 * scale.log())
    assert method == "analytic"
    # two float32 formulas of one closed form: a few roundings of terms of size at most
    # `size`, then a mean over 50 datapoints (and a sum over Z_DIM), each within n eps32
    size = float((scale**2 + loc**2 + 1 + 2 * scale.log().abs()).max())
    tol = (8 + 50) * torch.finfo(torch.float32).eps * size
    torch.testing.assert_close(kl, closed_form.mean(0), rtol=0, atol=tol)
    torch.testing.assert_close(kl.sum(), torch.distributions.kl_divergence(q, prior).mean(),
                               rtol=0, atol=Z_DIM * tol)


def test_kl_per_dim_monte_carlo_agrees_with_analytic_within_standard_error():
    loc, scale = torch.randn(200, Z_DIM), torch.rand(200, Z_DIM) + 0.5
    q = dist.Normal(loc, scale).to_event(1)
    prior = dist.Normal(torch.zeros(Z_DIM), torch.ones(Z_DIM)).to_event(1)
    exact, _ = kl_per_dim(q, prior, "analytic")
    samples = 200
    estimate, method = kl_per_dim(q, prior, "monte-carlo", num_samples=samples)
    z = q.base_dist.sample((samples,))
    se = (q.base_dist.log_prob(z) - prior.base_dist.log_prob(z)).flatten(0, 1).std(0) / math.sqrt(
        samples * 200)
    assert method == "monte-carlo"
    assert bool(((estimate - exact).abs() < 4 * se).all()), (estimate, exact, se)


def test_kl_per_dim_falls_back_to_monte_carlo_between_student_ts(digits):
    # torch (and pyrovae.families.kl) have no closed form for Student-t || Student-t
    vae = VAE(digits.x_shape, z_dim=Z_DIM, prior="student-t", guide="student-t",
              likelihood="gaussian")
    result = collapse_diagnostics(vae, digits.test)
    assert result["kl_per_dim_method"] == "monte-carlo"
    assert all(k > 0 for k in result["kl_per_dim"])
    with pytest.raises(PyrovaeError, match="monte-carlo"):
        kl_per_dim(vae.encode(digits.test[:5]), vae.prior(digits.test), "analytic")


def test_collapse_diagnostics_is_json_able_seeded_and_leaves_the_global_rng_alone(digits):
    vae = VAE(digits.x_shape, z_dim=4, likelihood="gaussian")
    state = torch.get_rng_state()
    first = collapse_diagnostics(vae, digits.test, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert collapse_diagnostics(vae, digits.test, seed=3) == first
    assert json.loads(json.dumps(first)) == first
    assert len(first["kl_per_dim"]) == 4 and isinstance(first["active_units"], int)
    assert first["mutual_information"] <= math.log(len(digits.test))
    assert vae.training  # the mode it had before


def test_posterior_draws_work_with_arviz_summary_and_match_q():
    az = import_arviz()
    x = full_rank_data(n=4)
    vae = vector_vae(IdentityEncoder(scale=0.5))
    data = posterior_draws(vae, x, num_draws=500, num_chains=4, datapoints=[10, 11, 12, 13])
    z = data.posterior["z"]
    assert z.dims == ("chain", "draw", "datapoint", "latent")
    assert z.shape == (4, 500, 4, Z_DIM)
    assert list(data.posterior["datapoint"].values) == [10, 11, 12, 13]
    summary = az.summary(data)
    assert len(summary) == 4 * Z_DIM
    # q's mean is x; the draws are independent, so their mean's SE is 0.5 / sqrt(2000)
    draws_mean = z.mean(("chain", "draw")).values
    assert np.abs(draws_mean - x.numpy()).max() < 4 * 0.5 / math.sqrt(2000)
    np.testing.assert_allclose(summary["mean"].values, draws_mean.ravel(), atol=1e-3)


def test_posterior_draws_work_with_arviz_plot_posterior():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    az = import_arviz()
    data = posterior_draws(vector_vae(IdentityEncoder()), full_rank_data(n=2), num_draws=100)
    axes = az.plot_posterior(data, var_names=["z"], coords={"datapoint": [1]})
    assert np.asarray(axes).size == Z_DIM
    plt.close("all")


def test_posterior_draws_rejects_mismatched_names():
    with pytest.raises(PyrovaeError, match="one name per row"):
        posterior_draws(vector_vae(IdentityEncoder()), full_rank_data(n=3), datapoints=[1, 2])


def test_mutual_information_counts_overflowed_pairs_as_density_zero():
    """A flow guide's inversion can score a far-away pair NaN: such pairs drop out of
    q(z), with a warning, and the estimate stays finite and equal to the one
    without them."""
    from pyrovae.collapse import mutual_information

    class FarTailIsNaN(torch.distributions.Independent):
        def log_prob(self, value):
            log_p = super().log_prob(value)
            return torch.where(log_p < -50, torch.nan, log_p)

    loc = torch.tensor([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0]])
    q = torch.distributions.Independent(torch.distributions.Normal(loc, 1.0), 1)
    nan_q = FarTailIsNaN(torch.distributions.Normal(loc, 1.0), 1)
    torch.manual_seed(0)
    expected, _ = mutual_information(q, None)
    torch.manual_seed(0)
    with pytest.warns(RuntimeWarning, match="6 of 9 .* pairs scored NaN"):
        got, se = mutual_information(nan_q, None)
    # the far pairs' densities are below e^-50 of the near ones': the same estimate,
    # close to log 3 for three separate posteriors
    assert got == pytest.approx(expected, abs=1e-6) and math.isfinite(se)
    assert got == pytest.approx(math.log(3), abs=1e-6)
