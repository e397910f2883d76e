"""Several stochastic layers: a two-layer linear-Gaussian VAE against its closed-form
log p(x), the sites every objective and estimator sees, the per-layer diagnostics,
saving, and the objectives that are refused."""

import json
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from evaluation.test_marginal import exactly_orthogonal_columns  # the same exact columns
from pyrovae import VAE, Trainer, TrainConfig
from pyrovae.collapse import collapse_diagnostics
from pyrovae.errors import PyrovaeError, SupportMismatchError
from pyrovae.evaluation import ais_log_likelihood, bdmc, log_likelihood
from pyrovae.run import CONFIG_FILE
from pyrovae.sites import latent_sites

X_DIM, Z1, Z2 = 6, 2, 1
S1, S2 = 0.7, 0.5  # the scales of p(z1|z2) and p(x|z1)
ALPHA = 1.5  # z1 = (ALPHA z2, 0) + a + noise


def inverse_softplus(value: torch.Tensor) -> torch.Tensor:
    """The raw output that ``softplus`` (a guide with min_scale=0) maps to ``value``."""
    return value + torch.log(-torch.expm1(-value))


def set_linear(linear, weight, bias):
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)


def two_layer_linear_gaussian(widen=1.0, n=20):
    """z2 ~ N(0, 1), z1 | z2 ~ N(A z2 + a, S1^2 I), x | z1 ~ N(B z1 + b, S2^2 I), built
    from the VAE's own networks (no hidden layer: linear maps), data drawn from it and its
    exact log p(x), float64.

    B's columns are exactly orthogonal and A = (ALPHA, 0), so that p(z1|x) and p(z2|z1)
    are diagonal Gaussians, linear in x and z1: the VAE's bottom-up guide q(z1|x) q(z2|z1)
    is the exact posterior, its scales multiplied by ``widen``."""
    generator = torch.Generator().manual_seed(2)
    b_matrix = exactly_orthogonal_columns(generator) * torch.tensor([2.0, 1.0])
    b = torch.randn(X_DIM, generator=generator)
    a_matrix = torch.tensor([[ALPHA], [0.0]])
    a = torch.randn(Z1, generator=generator)
    vae = VAE((X_DIM,), z_dim=(Z1, Z2), hidden=((), ()), likelihood="gaussian-fixed",
              likelihood_kwargs={"scale": S2}, guide_kwargs={"min_scale": 0.0},
              layer_prior_kwargs={"min_scale": 0.0}, layer_guide_kwargs={"min_scale": 0.0})
    # p(z1|z2) and p(x|z1)
    set_linear(vae.down_nets[0].net[0], torch.cat([a_matrix, torch.zeros(Z1, Z2)]),
               torch.cat([a, inverse_softplus(torch.full((Z1,), S1))]))
    set_linear(vae.decoder.net[0], b_matrix, b)
    # p(z1|x): prior N(a, C1), C1 = S1^2 I + A A^T diagonal; precision C1^-1 + B^T B / S2^2
    prior_variance = S1**2 + (a_matrix @ a_matrix.T).diag()
    precision = 1 / prior_variance + (b_matrix.T @ b_matrix).diag() / S2**2
    gain = b_matrix.T / S2**2 / precision[:, None]
    offset = (a / prior_variance - b_matrix.T @ b / S2**2) / precision
    set_linear(vae.encoder.net[0], torch.cat([gain, torch.zeros(Z1, X_DIM)]),
               torch.cat([offset, inverse_softplus(widen * precision.rsqrt())]))
    # p(z2|z1) (= p(z2|z1, x)): precision 1 + A^T A / S1^2
    precision2 = 1 + (a_matrix.T @ a_matrix).diag() / S1**2
    gain2 = a_matrix.T / S1**2 / precision2[:, None]
    set_linear(vae.up_nets[0].net[0], torch.cat([gain2, torch.zeros(Z2, Z1)]),
               torch.cat([-gain2 @ a, inverse_softplus(widen * precision2.rsqrt())]))
    marginal = linear_marginal(vae)
    x = marginal.sample((n,))
    return vae, x, marginal.log_prob(x).double()


def linear_marginal(vae):
    """p(x) of the two-layer linear-Gaussian VAE, read off its networks: x is Gaussian with
    mean B a + b and covariance S2^2 I + B (S1^2 I + A A^T) B^T."""
    b_matrix, b = vae.decoder.net[0].weight.detach(), vae.decoder.net[0].bias.detach()
    down = vae.down_nets[0].net[0]
    a_matrix, a = down.weight.detach()[:Z1], down.bias.detach()[:Z1]
    return dist.MultivariateNormal(
        b_matrix @ a + b, S2**2 * torch.eye(X_DIM)
        + b_matrix @ (S1**2 * torch.eye(Z1) + a_matrix @ a_matrix.T) @ b_matrix.T)


# ---------------------------------------------------------------- exactness


def test_exact_posterior_guide_gives_the_closed_form_with_equal_weights():
    vae, x, exact = two_layer_linear_gaussian()
    estimate = log_likelihood(vae, x, 500)
    # log p(x, z) - log q(z|x) is log p(x) for every draw; float32 sums of terms of order
    # 10 (six pixels, three latents) round at about 1e-5
    torch.testing.assert_close(estimate.log_px, exact, atol=1e-4, rtol=0)
    torch.testing.assert_close(estimate.elbo, exact, atol=1e-4, rtol=0)
    assert (estimate.ess > 500 * (1 - 1e-6)).all()


def test_a_wider_guide_matches_the_closed_form_within_three_standard_errors():
    vae, x, exact = two_layer_linear_gaussian(widen=1.5, n=30)
    estimate = log_likelihood(vae, x, 2000)
    error, se = estimate.log_px - exact, estimate.mc_se
    assert (se > 1e-3).all()  # the weights are unequal: the test has teeth
    assert abs(float(error.mean())) < 3 * float(se.square().sum().sqrt()) / len(x)
    assert (error.abs() < 5 * se).all()
    assert (estimate.elbo < estimate.log_px).all()


def test_ais_moves_every_layer_and_is_exact_from_the_exact_posterior():
    vae, x, exact = two_layer_linear_gaussian(n=4)
    # started at the posterior, every AIS increment is (b_t - b_t-1) log p(x), whatever the
    # HMC moves: the sum is log p(x) to float32 rounding of terms of order 10
    estimate = ais_log_likelihood(vae, x, num_steps=5, num_samples=4, leapfrog_steps=2)
    torch.testing.assert_close(estimate.log_px, exact, atol=1e-3, rtol=0)
    assert estimate.acceptance_rate > 0


def test_bdmc_simulates_and_starts_from_every_layer():
    vae, _, _ = two_layer_linear_gaussian()
    result = bdmc(vae, num_simulated=3, num_steps=4, num_samples=2, is_samples=32,
                  leapfrog_steps=2)
    assert set(result["latents"]) == {"z1", "z2"} and result["latents"]["z2"].shape == (3, 1)
    assert torch.equal(result["z"], result["latents"]["z1"])
    # exact guide: both bounds and IS are log p(x), to float32 rounding
    torch.testing.assert_close(result["lower"], result["upper"], atol=1e-3, rtol=0)


# ---------------------------------------------------------------- the sites


def test_sites_sit_in_the_data_plate_with_the_model_top_down(binary_digits):
    vae = VAE(binary_digits.x_shape, z_dim=(5, 3), hidden=((16,), (8,)))
    x = binary_digits.train[:7]
    guide_trace = poutine.trace(vae.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(vae.model, guide_trace)).get_trace(x)
    assert [s["name"] for s in latent_sites(model_trace)] == ["z2", "z1"]  # p(z2) p(z1|z2)
    assert [s["name"] for s in latent_sites(guide_trace)] == ["z1", "z2"]  # q(z1|x) q(z2|z1)
    for name, size in (("z1", 5), ("z2", 3)):
        site = model_trace.nodes[name]
        assert site["fn"].batch_shape == (7,) and site["fn"].event_shape == (size,)
        assert [f.name for f in site["cond_indep_stack"]] == ["data"]
    assert vae.z_dim == (5, 3) and vae.sites == ("z1", "z2")
    assert VAE(binary_digits.x_shape, z_dim=4).sites == ("z",)  # one layer keeps "z"


@pytest.mark.parametrize("elbo,estimator,particles", [
    ("trace", "reparam", 1), ("iwae", "reparam", 4)])
def test_trains_on_digits(tmp_path, binary_digits, elbo, estimator, particles):
    config = TrainConfig(dataset="digits", binarize="static", elbo=elbo, estimator=estimator,
                         num_particles=particles, epochs=2, batch_size=256, lr=3e-3,
                         device="cpu", seed=1)
    pyro.set_rng_seed(1)
    vae = VAE(binary_digits.x_shape, z_dim=(6, 3), hidden=((32,), (16,)), activation="tanh")
    metrics = Trainer(vae, binary_digits, config, out=tmp_path, progress=False).fit()
    assert metrics[-1]["train_elbo"] > metrics[0]["train_elbo"]
    assert len(metrics[-1]["active_units"]) == 2 and len(metrics[-1]["kl_per_dim"][1]) == 3
    saved = json.loads((tmp_path / CONFIG_FILE).read_text())["model"]
    assert saved["z_dim"] == [6, 3] and saved["hidden"] == [[32], [16]]
    loaded = VAE.load(tmp_path)
    x = binary_digits.test[:16]
    # the same weights and seeds: the same float32 operations, bit for bit
    assert torch.equal(log_likelihood(loaded, x, 32).log_px,
                       log_likelihood(vae.cpu(), x, 32).log_px)


@pytest.mark.parametrize("elbo,estimator", [
    ("meanfield", "reparam"), ("trace", "stl"), ("iwae", "dreg")])
def test_biased_objectives_are_refused(tmp_path, binary_digits, elbo, estimator):
    vae = VAE(binary_digits.x_shape, z_dim=(4, 2), hidden=(16,))
    config = TrainConfig(dataset="digits", binarize="static", elbo=elbo, estimator=estimator,
                         num_particles=2 if elbo == "iwae" else 1, device="cpu")
    with pytest.raises(PyrovaeError, match="biased with several stochastic layers"):
        Trainer(vae, binary_digits, config, out=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_bad_layer_settings_are_refused():
    with pytest.raises(PyrovaeError, match="one list per stochastic layer"):
        VAE((8, 8), z_dim=(4, 2, 1), hidden=((16,), (8,)))
    with pytest.raises(SupportMismatchError):
        VAE((8, 8), z_dim=(4, 2), prior="gamma", layer_guide="normal")
    with pytest.raises(PyrovaeError, match="registered name"):
        VAE((8, 8), z_dim=(4, 2), layer_prior=VAE((8, 8)).guide_family)
    with pytest.raises(PyrovaeError, match="'vamp' prior is made of q"):
        VAE((8, 8), z_dim=(4, 2), prior="vamp")
    # a flat hidden list is every block's
    vae = VAE((8, 8), z_dim=(4, 2), hidden=(16, 8))
    assert [layer.out_features for layer in vae.up_nets[0].net if hasattr(layer, "weight")] \
        == [16, 8, 4]


# ---------------------------------------------------------------- diagnostics


def test_diagnostics_per_layer_on_the_linear_model():
    vae, _, _ = two_layer_linear_gaussian(n=1)
    pyro.set_rng_seed(0)
    with torch.no_grad():
        x = vae.decode(vae.sample_latents(400)["z1"]).sample()
    result = collapse_diagnostics(vae, x)
    assert result["layers"] == ["z1", "z2"]
    assert len(result["kl_per_dim"][0]) == Z1 and len(result["kl_per_dim"][1]) == Z2
    # z1 and z2 both carry information about x: every unit is active
    assert result["active_units"] == [Z1, Z2]
    # under q, z2 depends on x through z1 alone: I(x; z2) <= I(x; z1), up to noise
    (mi1, mi2), (se1, se2) = (result["mutual_information_per_layer"],
                              result["mutual_information_per_layer_se"])
    assert mi2 < mi1 + 3 * math.hypot(se1, se2)
    assert result["mutual_information"] == mi1
    # with the exact posterior, log q(z|x) - log p(z) = log p(x|z1) - log p(x): the ELBO's KL,
    # which the layers' KLs split, is E_q[log p(x|z1)] - log p(x) in closed form
    b_matrix, b = vae.decoder.net[0].weight.detach(), vae.decoder.net[0].bias.detach()
    with torch.no_grad():
        q = vae.encode(x)
    mean, variance = q.mean, q.variance
    gram = (b_matrix.T @ b_matrix).diag()  # diagonal: B's columns are orthogonal
    expected_recon = (-X_DIM / 2 * math.log(2 * math.pi * S2**2)
                      - ((x - mean @ b_matrix.T - b).square().sum(-1)
                         + (gram * variance).sum(-1)) / (2 * S2**2))
    exact = float((expected_recon - linear_marginal(vae).log_prob(x)).mean())
    total = sum(sum(layer) for layer in result["kl_per_dim"])
    # each draw's term is -||B e||^2 / (2 S2^2) plus constants, e ~ N(0, V): variance
    # sum_i lambda_i^2 / 2 with lambda_i = (B^T B)_ii V_i / S2^2, the same for every x
    per_draw = float(((gram * variance[0] / S2**2).square().sum() / 2).sqrt())
    se = per_draw / math.sqrt(len(x) * 16)  # 16 draws per datapoint (layer_kl_per_dim)
    assert total == pytest.approx(exact, abs=4 * se)


def test_the_arviz_export_holds_every_layer_drawn_from_the_guide():
    from pyrovae.evaluation import posterior_draws

    vae, x, _ = two_layer_linear_gaussian(n=3)
    chains, draws = 2, 2000
    data = posterior_draws(vae, x, num_draws=draws, num_chains=chains)
    assert set(data.posterior.data_vars) == {"z1", "z2"}
    assert data.posterior["z1"].dims == ("chain", "draw", "datapoint", "latent1")
    assert data.posterior["z2"].shape == (chains, draws, 3, Z2)
    # z2 is drawn from q(z2|z1) at each draw of z1: its mean over the draws is the mean of
    # q(z2|z1) at q(z1|x)'s mean (the guide is linear), within 4 standard errors of the
    # draws' mean
    with torch.no_grad():
        q1 = vae.encode(x)
        q2 = vae.layer_guides[0](vae.up_nets[0](q1.mean))
        q2_draws = vae.layer_guides[0](vae.up_nets[0](q1.sample((4000,))))
    z2 = torch.as_tensor(data.posterior["z2"].values).reshape(-1, 3, Z2)
    se = q2_draws.sample().std(0) / math.sqrt(chains * draws)
    assert ((z2.mean(0) - q2.mean).abs() < 4 * se).all()
    z1 = torch.as_tensor(data.posterior["z1"].values).reshape(-1, 3, Z1)
    assert ((z1.mean(0) - q1.mean).abs() < 4 * q1.stddev / math.sqrt(chains * draws)).all()
