import json
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.importance import vectorized_importance_weights
from torch import nn

from pyrovae import VAE
from pyrovae.cli import main
from pyrovae.errors import PyrovaeError
from pyrovae.evaluation import iwae_bounds, log_likelihood, log_weights
from pyrovae.plots import IWAE_FIGURE, KHAT_FIGURE
from pyrovae.run import EVALUATION_FILE
from pyrovae.training import Trainer, TrainConfig

X_DIM, Z_DIM, SIGMA = 6, 2, 0.5


class LinearDecoder(nn.Module):
    """x = W z + b: batch + (z_dim,) -> batch + (1, x_dim), the decoder contract."""

    def __init__(self, weight, bias):
        super().__init__()
        self.linear = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            self.linear.bias.copy_(bias)

    def forward(self, z):
        return self.linear(z).unsqueeze(-2)


class PosteriorEncoder(nn.Module):
    """The exact PPCA posterior N(mu(x), diag s^2) for a W with orthogonal columns, its
    scale multiplied by ``widen`` and its mean moved by ``shift`` posterior sds; outputs
    (loc, softplus^-1(scale)) for min_scale=0."""

    def __init__(self, weight, bias, sigma, widen=1.0, shift=0.0):
        super().__init__()
        gram = weight.T @ weight
        # exact, not allclose: the columns are orthogonal in float32 by construction
        # (exactly_orthogonal_columns), whatever order the CPU's matmul sums in
        assert torch.equal(gram, torch.diag(gram.diag()))
        variance = 1.0 / (1.0 + gram.diag() / sigma**2)
        self.register_buffer("gain", variance[:, None] * weight.T / sigma**2)
        self.register_buffer("bias", bias)
        self.register_buffer("shift", shift * variance.sqrt())
        scale = widen * variance.sqrt()
        self.register_buffer("raw_scale", scale + torch.log(-torch.expm1(-scale)))

    def forward(self, x):
        loc = (x - self.bias) @ self.gain.T + self.shift
        return torch.stack([loc, self.raw_scale.expand_as(loc)], dim=-2)


def exactly_orthogonal_columns(generator):
    """An (X_DIM, 2) matrix whose columns are orthogonal exactly in float32: entries +-1/2,
    the second column's signs those of the first times a random arrangement of three +1
    and three -1. Every product in its Gram matrix is +-1/4 and every partial sum a
    multiple of 1/4, so no summation order rounds (a QR factor's Gram matrix is diagonal
    only to rounding, which differs between CPUs: 6e-8 on one Xeon)."""
    signs = torch.randint(0, 2, (X_DIM,), generator=generator) * 2.0 - 1.0
    flips = torch.tensor([1.0, -1.0]).repeat_interleave(X_DIM // 2)
    flips = flips[torch.randperm(X_DIM, generator=generator)]
    return torch.stack([signs, signs * flips], dim=-1) / 2


def ppca(guide="normal", widen=1.0, guide_kwargs=None):
    """A PPCA VAE with orthogonal decoder columns, data drawn from it, and exact log p(x)."""
    generator = torch.Generator().manual_seed(1)
    weight = exactly_orthogonal_columns(generator) * torch.tensor([2.0, 1.0])
    bias = torch.randn(X_DIM, generator=generator)
    vae = VAE((X_DIM,), z_dim=Z_DIM, guide=guide, likelihood="gaussian-fixed",
              likelihood_kwargs={"scale": SIGMA},
              guide_kwargs={"min_scale": 0.0, **(guide_kwargs or {})},
              decoder=LinearDecoder(weight, bias),
              encoder=PosteriorEncoder(weight, bias, SIGMA, widen))
    marginal = dist.MultivariateNormal(bias, weight @ weight.T + SIGMA**2 * torch.eye(X_DIM))
    x = marginal.sample((50,))
    return vae, x, marginal.log_prob(x).double()


@pytest.mark.parametrize("guide,guide_kwargs", [
    ("normal", None), ("laplace", None), ("student-t", {"df": 4.0, "learn_df": False})])
def test_matches_closed_form_ppca_within_three_standard_errors(guide, guide_kwargs):
    vae, x, exact = ppca(guide, widen=1.5, guide_kwargs=guide_kwargs)
    estimate = log_likelihood(vae, x, 2000)
    error = estimate.log_px - exact
    se = estimate.mc_se
    assert (se > 0).all()
    assert abs(float(error.mean())) < 3 * float(se.square().sum().sqrt()) / len(x)
    assert (error.abs() < 5 * se).all()
    assert (estimate.elbo <= estimate.log_px).all()


def test_exact_posterior_guide_gives_equal_weights():
    vae, x, exact = ppca("normal")
    num_samples = 1000
    estimate = log_likelihood(vae, x, num_samples)
    torch.testing.assert_close(estimate.log_px, exact, atol=1e-4, rtol=0)
    torch.testing.assert_close(estimate.elbo, exact, atol=1e-4, rtol=0)
    assert (estimate.ess > num_samples * (1 - 1e-6)).all()
    assert (estimate.mc_se < 1e-4).all()
    assert (estimate.khat < 0.5).all()


def test_log_weights_sum_to_pyros_vectorized_importance_weights(binary_digits):
    vae = VAE(binary_digits.x_shape, z_dim=3, hidden=(32,))
    x = binary_digits.test[:16]
    pyro.set_rng_seed(3)
    ours = log_weights(vae.model, vae.guide, x, 7)
    pyro.set_rng_seed(3)
    pyros, _, _ = vectorized_importance_weights(vae.model, vae.guide, x, num_samples=7,
                                                max_plate_nesting=1)
    assert ours.shape == (7, 16)
    # the same float32 site log-probs (3 sites x 16 datapoints) summed in another order: within
    # n eps32 of the sum of their sizes, which is at most twice the total (log q is small)
    n_terms = 3 * x.shape[0]
    torch.testing.assert_close(ours.sum(-1), pyros, atol=0,
                               rtol=2 * n_terms * torch.finfo(torch.float32).eps)


@pytest.mark.parametrize("guide", ["normal", "laplace"])
def test_result_is_bit_identical_for_any_memory_bound(binary_digits, guide):
    vae = VAE(binary_digits.x_shape, z_dim=3, guide=guide, hidden=(32,))
    x = binary_digits.test[:150]
    results = [log_likelihood(vae, x, 100, max_elements=m) for m in (1024, 3000, 2**20)]
    for other in results[1:]:
        for field in ("log_px", "ess", "mc_se", "khat", "elbo"):
            assert torch.equal(getattr(results[0], field), getattr(other, field)), field
    first_block = log_likelihood(vae, x[:64], 100)
    assert torch.equal(first_block.log_px, results[0].log_px[:64])
    reseeded = log_likelihood(vae, x, 100, seed=1)
    assert not torch.equal(reseeded.log_px, results[0].log_px)
    assert_agree_within_noise(reseeded, results[0])


def test_two_stream_guide_agrees_within_noise_for_any_memory_bound(binary_digits):
    vae = VAE(binary_digits.x_shape, z_dim=3, guide="student-t", hidden=(32,))
    x = binary_digits.test[:150]
    small, large = (log_likelihood(vae, x, 100, max_elements=m) for m in (1024, 2**20))
    assert_agree_within_noise(small, large)


def assert_agree_within_noise(a, b):
    assert ((a.log_px - b.log_px).abs() < 5 * (a.mc_se.square() + b.mc_se.square()).sqrt()).all()


def test_estimate_lies_above_elbo_and_iwae_bound_rises_with_k(binary_digits):
    vae = VAE(binary_digits.x_shape, z_dim=4, hidden=(32,))
    estimate = log_likelihood(vae, binary_digits.test[:32], 5000, keep_log_weights=True)
    summary = estimate.summary()
    assert -summary["nll"] > summary["elbo"]
    bounds = iwae_bounds(estimate.log_weights)
    values = [bounds[k] for k in (1, 10, 100, 1000, 5000)]
    assert values == sorted(values)
    assert bounds[5000] == pytest.approx(float(estimate.log_px.mean()), abs=1e-9)
    assert bounds[1] == pytest.approx(summary["elbo"], abs=1e-9)


def test_summary_statistics(binary_digits):
    vae = VAE(binary_digits.x_shape, z_dim=4, hidden=(32,))
    estimate = log_likelihood(vae, binary_digits.test[:40], 200)
    summary = estimate.summary()
    nll = -estimate.log_px
    # float64 statistics of 40 values: another summation order moves them by ~40 eps64 times
    # the spread's condition (mean / std ~ 10), far below 1e-9
    assert summary["nll"] == pytest.approx(float(nll.mean()), rel=1e-9)
    assert summary["nll_se"] == pytest.approx(float(nll.std()) / math.sqrt(40), rel=1e-9)
    assert summary["khat_frac_above_0_7"] == pytest.approx(float((estimate.khat > 0.7).double().mean()))
    assert ((1 <= estimate.ess) & (estimate.ess <= 200 + 1e-9)).all()
    # the delta-method standard error, from the weights themselves
    w = torch.exp(log_weights_of(vae, binary_digits.test[:40], 200) - estimate.log_px)
    # float64 both ways; k / ess - 1 >= 0.4 here (unequal weights), so nothing cancels and the
    # two routes agree to ~|log w| eps64 ~ 1e-14 relative
    assert (estimate.ess < 0.7 * 200).all()
    torch.testing.assert_close(estimate.mc_se, w.std(0) / math.sqrt(200), rtol=1e-10, atol=0)


def test_ess_is_the_squared_sum_over_the_sum_of_squares_of_the_kept_weights(binary_digits):
    vae = VAE(binary_digits.x_shape, z_dim=4, hidden=(32,))
    num_samples = 200
    estimate = log_likelihood(vae, binary_digits.test[:40], num_samples, keep_log_weights=True)
    lw = estimate.log_weights
    assert lw.dtype == torch.float64 and lw.shape == (num_samples, 40)
    w = torch.exp(lw - lw.max(0).values)  # the largest weight 1: ESS does not see the scale
    expected = w.sum(0) ** 2 / w.square().sum(0)
    assert (expected < 0.9 * num_samples).all()  # unequal weights: the formula matters
    # float64: exp of a log weight of size |lw| is within |lw| eps64, a sum of K positive
    # terms within K eps64, both doubled by the squares, on either side
    rtol = 4 * (num_samples + float(lw.abs().max())) * torch.finfo(torch.float64).eps
    torch.testing.assert_close(estimate.ess, expected, rtol=rtol, atol=0)


def log_weights_of(vae, x, num_samples):
    return log_likelihood(vae, x, num_samples, keep_log_weights=True).log_weights


def test_bad_input_is_refused(binary_digits):
    vae = VAE(binary_digits.x_shape, z_dim=2, hidden=(16,))
    with pytest.raises(PyrovaeError, match="num_samples"):
        log_likelihood(vae, binary_digits.test[:4], 0)
    with pytest.raises(PyrovaeError, match="max_elements"):
        log_likelihood(vae, binary_digits.test[:4], 10, max_elements=100)
    with pytest.raises(PyrovaeError, match="shape"):
        log_likelihood(vae, binary_digits.test[:4].reshape(4, -1), 10)

    def model_with_global_latent(x):
        scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("x", dist.Normal(0.0, scale), obs=x)

    def guide_with_global_latent(x):
        pyro.sample("scale", dist.LogNormal(0.0, 1.0))

    with pytest.raises(PyrovaeError, match="outside the data plate"):
        log_weights(model_with_global_latent, guide_with_global_latent, torch.zeros(3), 2)


def test_few_samples_warn_and_give_nan_khat(binary_digits):
    vae = VAE(binary_digits.x_shape, z_dim=2, hidden=(16,))
    with pytest.warns(UserWarning, match="k-hat"):
        estimate = log_likelihood(vae, binary_digits.test[:4], 10)
    assert torch.isnan(estimate.khat).all()
    assert torch.isfinite(estimate.log_px).all()


@pytest.mark.slow
def test_evaluate_command_writes_json_and_figures(tmp_path):
    run = tmp_path / "run"
    data_config = TrainConfig(dataset="digits", epochs=1, batch_size=256, device="cpu")
    from pyrovae.data import load_dataset

    data = load_dataset("digits", binarize="dynamic", seed=0)
    Trainer(VAE(data.x_shape, z_dim=4, hidden=(32,)), data, data_config, out=run,
            progress=False).fit()
    code = main(["evaluate", str(run), "--num-samples", "100", "--num-images", "50",
                 "--subset-size", "5", "--no-progress"])
    assert code == 0
    summary = json.loads((run / EVALUATION_FILE).read_text())
    for key in ("num_samples", "nll", "nll_se", "elbo", "ess_mean", "khat_frac_above_0_7",
                "active_units", "mutual_information"):
        assert math.isfinite(summary[key]), key
    assert len(summary["kl_per_dim"]) == 4 and 0 <= summary["active_units"] <= 4
    assert summary["num_samples"] == 100 and summary["num_datapoints"] == 50
    assert summary["nll"] < -summary["elbo"]
    assert set(summary["iwae_bound"]) == {"1", "10", "100", "1000", "5000"}
    for name in (KHAT_FIGURE, IWAE_FIGURE):
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
