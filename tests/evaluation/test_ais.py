"""AIS and BDMC (pyrovae/evaluation/ais.py) against exact answers: the closed-form
log p(x) of a linear-Gaussian VAE (PPCA), quadrature for a positive latent, exact
moments of a Gaussian for the HMC kernel."""

import math

import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.distributions.transforms import AffineAutoregressive

from pyrovae import VAE
from pyrovae.errors import PyrovaeError
from pyrovae.evaluation import (
    ais_log_likelihood,
    annealing_schedule,
    bdmc,
    hmc_transition,
    log_likelihood,
)
from pyrovae.evaluation.ais import _Path
from test_marginal import (  # the same linear-Gaussian model as the IS tests
    SIGMA,
    X_DIM,
    Z_DIM,
    LinearDecoder,
    PosteriorEncoder,
    exactly_orthogonal_columns,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """These runs are thousands of tiny batches: threads only contend (ten times slower
    on a busy two-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ppca(widen=1.0, shift=0.0, n=10):
    """A PPCA VAE, n datapoints drawn from it, and their exact log p(x) (float64)."""
    generator = torch.Generator().manual_seed(1)
    weight = exactly_orthogonal_columns(generator) * torch.tensor([2.0, 1.0])
    bias = torch.randn(X_DIM, generator=generator)
    vae = VAE((X_DIM,), z_dim=Z_DIM, likelihood="gaussian-fixed",
              likelihood_kwargs={"scale": SIGMA}, guide_kwargs={"min_scale": 0.0},
              decoder=LinearDecoder(weight, bias),
              encoder=PosteriorEncoder(weight, bias, SIGMA, widen, shift))
    marginal = ppca_marginal(vae)
    x = marginal.sample((n,))
    return vae, x, marginal.log_prob(x).double()


def ppca_marginal(vae):
    weight, bias = vae.decoder.linear.weight.detach(), vae.decoder.linear.bias.detach()
    return dist.MultivariateNormal(bias, weight @ weight.T + SIGMA**2 * torch.eye(X_DIM))


def mean_error_bound(*mc_ses):
    """Three standard errors of a mean over datapoints of the differences of estimates
    with these per-datapoint Monte Carlo standard errors."""
    n = len(mc_ses[0])
    return 3 * float(sum(se.square().sum() for se in mc_ses).sqrt()) / n


def test_schedules_run_from_zero_to_one():
    for schedule in ("sigmoid", "linear"):
        betas = annealing_schedule(50, schedule)
        assert len(betas) == 51 and betas[0] == 0.0 and betas[-1] == 1.0
        assert all(a < b for a, b in zip(betas, betas[1:]))
        assert annealing_schedule(1, schedule) == [0.0, 1.0]
    sigmoid = annealing_schedule(50)
    # denser at both ends than in the middle (Wu et al. 2017)
    assert sigmoid[1] - sigmoid[0] < 0.5 / 50 and sigmoid[26] - sigmoid[25] > 1 / 50
    assert annealing_schedule(4, "linear") == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_one_step_is_importance_sampling_with_the_same_draws():
    vae, x, _ = ppca(widen=1.5, n=20)
    ais = ais_log_likelihood(vae, x, 1, 100, seed=3, keep_log_weights=True)
    is_ = log_likelihood(vae, x, 100, seed=3, keep_log_weights=True)
    # the same z (the guide draws first, from the same stream) and the same float32 site
    # log-probs, summed in the same order: equal to float64 rounding at most
    torch.testing.assert_close(ais.log_weights, is_.log_weights, rtol=1e-12, atol=1e-12)
    for name in ("log_px", "ess", "mc_se"):
        torch.testing.assert_close(getattr(ais, name), getattr(is_, name), rtol=1e-10, atol=1e-12)
    assert math.isnan(ais.acceptance_rate)


def test_exact_guide_gives_equal_weights_for_any_number_of_steps():
    # with q = p(z|x), log p(x, z) - log q(z|x) = log p(x) wherever the chains are, so
    # every weight is sum_t (b_t - b_{t-1}) log p(x) = log p(x)
    vae, x, exact = ppca()
    estimate = ais_log_likelihood(vae, x, 10, 16, leapfrog_steps=3, step_size=0.1)
    torch.testing.assert_close(estimate.log_px, exact, atol=1e-4, rtol=0)
    assert (estimate.ess > 16 * (1 - 1e-6)).all()
    assert 0.3 < estimate.acceptance_rate <= 1


def test_poor_guide_ais_is_within_three_standard_errors_and_beats_is():
    vae, x, exact = ppca(widen=0.5, shift=2.0, n=10)
    chains, steps, leapfrog = 32, 50, 5
    ais = ais_log_likelihood(vae, x, steps, chains, leapfrog_steps=leapfrog, step_size=0.1)
    error = ais.log_px - exact
    assert (ais.mc_se > 0).all()
    assert abs(float(error.mean())) < mean_error_bound(ais.mc_se)
    assert (error.abs() < 5 * ais.mc_se).all()
    # plain IS with as many model evaluations: its estimate is off by far more
    is_ = log_likelihood(vae, x, chains * steps * (leapfrog + 1))
    is_error = is_.log_px - exact
    assert float(is_error.mean()) < -1.0
    assert float(is_error.abs().mean()) > 2 * float(error.abs().mean())


def test_prior_start_is_within_three_standard_errors():
    vae, x, exact = ppca(widen=0.5, shift=2.0, n=10)
    ais = ais_log_likelihood(vae, x, 60, 32, start="prior", leapfrog_steps=5, step_size=0.1)
    error = ais.log_px - exact
    assert abs(float(error.mean())) < mean_error_bound(ais.mc_se)
    assert (error.abs() < 5 * ais.mc_se).all()


def iaf_ppca():
    """The PPCA decoder under an untrained IAF guide (two flow steps): a poor guide of a
    model whose log p(x) is exact."""
    reference, x, exact = ppca(widen=0.5, shift=2.0, n=10)
    torch.manual_seed(0)
    vae = VAE((X_DIM,), z_dim=Z_DIM, likelihood="gaussian-fixed",
              likelihood_kwargs={"scale": SIGMA}, guide="iaf", hidden=(16,),
              decoder=reference.decoder)
    return vae, x, exact


@pytest.fixture
def flow_inversions(monkeypatch):
    """A list that grows by one each time an IAF step is inverted (the iaf guide's steps
    are Pyro's stable form, which inverts by ``_inverse_stable``)."""
    calls, invert = [], AffineAutoregressive._inverse_stable

    def counted(self, y):
        calls.append(1)
        return invert(self, y)
    monkeypatch.setattr(AffineAutoregressive, "_inverse_stable", counted)
    return calls


def test_flow_guide_chains_move_in_the_base_space_with_the_exact_log_q(flow_inversions):
    vae, x, _ = iaf_ppca()
    with torch.no_grad():
        path = _Path(vae, x, 8, "guide")
        assert not flow_inversions  # the guide's own draws: the flow's cache
        u = path.u0 + 0.5 * torch.randn_like(path.u0)  # z the guide did not draw
        log_q, _, log_jacobian = path.terms(u)
        assert not flow_inversions
        eps = u.reshape(8, len(x), Z_DIM)
        z = path.flows[0](eps)
        # the guide's own log_prob at z inverts the flow (the counter sees it)
        q = poutine.trace(path._vectorized(vae.guide)).get_trace(x).nodes["z"]["fn"]
        exact_log_q = q.log_prob(z.clone())
    assert flow_inversions
    # float32 sums of the same terms in another order: a few ulps of log q's size
    torch.testing.assert_close(log_q, exact_log_q, rtol=0, atol=1e-4)
    torch.testing.assert_close(log_jacobian, path.flows[0].log_abs_det_jacobian(eps, z),
                               rtol=0, atol=1e-5)


def test_flow_guide_ais_never_inverts_the_flow_and_is_within_three_standard_errors(
        flow_inversions):
    vae, x, exact = iaf_ppca()
    ais = ais_log_likelihood(vae, x, 50, 32, leapfrog_steps=5, step_size=0.1)
    assert not flow_inversions
    error = ais.log_px - exact
    assert abs(float(error.mean())) < mean_error_bound(ais.mc_se)
    assert (error.abs() < 5 * ais.mc_se).all()
    # from the prior the chains start at z the flow did not draw: it is inverted once
    from_prior = ais_log_likelihood(vae, x, 60, 32, start="prior", leapfrog_steps=5,
                                    step_size=0.1)
    error = from_prior.log_px - exact
    assert abs(float(error.mean())) < mean_error_bound(from_prior.mc_se)
    assert (error.abs() < 5 * from_prior.mc_se).all()
    # with one step AIS is importance sampling, the flow's log q read from its forward pass
    one_step = ais_log_likelihood(vae, x, 1, 64, seed=2, keep_log_weights=True)
    is_ = log_likelihood(vae, x, 64, seed=2, keep_log_weights=True)
    torch.testing.assert_close(one_step.log_weights, is_.log_weights, rtol=0, atol=1e-4)


def positive_latent_vae():
    """A gamma prior with a lognormal guide on 2 positive latents; a small random MLP."""
    torch.manual_seed(5)
    vae = VAE((3,), z_dim=2, prior="gamma", prior_kwargs={"concentration": 2.0, "rate": 1.0},
              guide="lognormal", likelihood="gaussian-fixed", likelihood_kwargs={"scale": 0.5},
              hidden=(8,))
    with torch.no_grad():
        z = vae.prior_distribution().sample((6,))
        x = vae.decode(z).sample()
    return vae, x


def quadrature_log_px(vae, x, lo=-12.0, hi=5.0, n=500):
    """log of the integral of p(z) p(x|z) over z in (0, inf)^2, in u = log z on a grid
    (the integrand, times the Jacobian e^{u1 + u2}, is smooth and negligible at the
    ends, so the Riemann sum is the trapezoid rule and converges fast)."""
    u = torch.linspace(lo, hi, n, dtype=torch.float64)
    h = float(u[1] - u[0])
    grid = torch.stack(torch.meshgrid(u, u, indexing="ij"), -1).reshape(-1, 2)
    z = grid.exp()
    with torch.no_grad():
        prior = dist.Gamma(torch.tensor(2.0, dtype=torch.float64), 1.0).log_prob(z).sum(-1)
        log_lik = vae.decode(z.float()[:, None, :]).log_prob(x).double()  # (n^2, N)
    integrand = prior[:, None] + log_lik + grid.sum(-1)[:, None]
    return torch.logsumexp(integrand, 0) + 2 * math.log(h)


def test_positive_latents_match_quadrature_and_importance_sampling():
    vae, x = positive_latent_vae()
    exact = quadrature_log_px(vae, x)
    ais = ais_log_likelihood(vae, x, 50, 32, leapfrog_steps=5, step_size=0.1)
    error = ais.log_px - exact
    assert abs(float(error.mean())) < mean_error_bound(ais.mc_se)
    assert (error.abs() < 5 * ais.mc_se).all()
    is_ = log_likelihood(vae, x, 20000)
    difference = ais.log_px - is_.log_px
    assert abs(float(difference.mean())) < mean_error_bound(ais.mc_se, is_.mc_se)
    assert (difference.abs() < 5 * (ais.mc_se.square() + is_.mc_se.square()).sqrt()).all()


@pytest.mark.slow
def test_bdmc_sandwiches_the_exact_value_and_the_gap_shrinks():
    vae, _, _ = ppca(widen=0.5, shift=2.0)
    results = {steps: bdmc(vae, 8, steps, 8, leapfrog_steps=5, step_size=0.1, is_samples=1000)
               for steps in (10, 200)}
    for steps, result in results.items():
        exact = ppca_marginal(vae).log_prob(result["x"]).double()
        bound = mean_error_bound(result["lower_mc_se"], result["upper_mc_se"])
        assert float((result["lower"] - exact).mean()) < bound, steps
        assert float((result["upper"] - exact).mean()) > -bound, steps
        torch.testing.assert_close(result["gap"], result["upper"] - result["lower"])
        assert result["summary"]["gap"] == float(result["gap"].mean())  # the same float64 mean
    short, long = results[10]["summary"]["gap"], results[200]["summary"]["gap"]
    # 0.87 and -0.05 nats with these seeds
    assert short > 0.5 and abs(long) < 0.2 and short > long + 0.5
    # the poor guide's IS estimate falls far below the interval
    assert results[200]["summary"]["is_below_lower"] > 1.0


def test_bdmc_returns_the_simulated_data_and_per_datapoint_fields():
    vae, _, _ = ppca(widen=1.5)
    result = bdmc(vae, 3, 3, 4, leapfrog_steps=2, is_samples=50, seed=2)
    assert result["x"].shape == (3, X_DIM) and result["z"].shape == (3, Z_DIM)
    for key in ("lower", "upper", "gap", "is", "is_below_lower", "is_position",
                "lower_mc_se", "upper_mc_se"):
        assert result[key].shape == (3,) and result[key].dtype == torch.float64, key
    again = bdmc(vae, 3, 3, 4, leapfrog_steps=2, is_samples=50, seed=2)
    assert torch.equal(again["lower"], result["lower"])
    assert torch.equal(again["upper"], result["upper"])


def test_hmc_kernel_leaves_a_correlated_gaussian_invariant():
    torch.manual_seed(0)
    mean = torch.tensor([1.0, -2.0])
    cov = torch.tensor([[1.0, 0.9], [0.9, 1.0]])
    target = dist.MultivariateNormal(mean, cov)
    chains = 4000
    # exact draws, one step size per chain, some near the leapfrog's stability limit
    # (2 sqrt(0.1) = 0.63) where the energy error is large and the MH test does the work
    u = target.sample((chains,))
    step = torch.empty(chains, 1).uniform_(0.2, 0.6)
    moved = 0
    for _ in range(20):
        result = hmc_transition(target.log_prob, u, step, 5)
        moved += result.accepted.double().mean()
        u = result.u
    assert 0.3 < moved / 20 < 0.99
    assert_gaussian_moments(u, mean, cov)
    # from far away, a long run forgets the start
    u = torch.full((1000, 2), 4.0)
    for _ in range(200):
        u = hmc_transition(target.log_prob, u, 0.3, 5).u
    assert_gaussian_moments(u, mean, cov)


def assert_gaussian_moments(u, mean, cov):
    """Mean and covariance of n independent draws within 4 standard errors (Gaussian:
    var of the sample mean cov / n; of the sample covariance (s_ij^2 + s_ii s_jj) / n)."""
    n = len(u)
    mean_se = (cov.diag() / n).sqrt()
    assert ((u.mean(0) - mean).abs() < 4 * mean_se).all(), u.mean(0)
    sample_cov = torch.cov(u.T)
    cov_se = ((cov.square() + torch.outer(cov.diag(), cov.diag())) / n).sqrt()
    assert ((sample_cov - cov).abs() < 4 * cov_se).all(), sample_cov


def test_same_seed_same_answer():
    vae, x, _ = ppca(widen=0.5, shift=1.0, n=4)
    first, again = (ais_log_likelihood(vae, x, 5, 8, leapfrog_steps=2, seed=1) for _ in range(2))
    assert torch.equal(first.log_px, again.log_px)
    other = ais_log_likelihood(vae, x, 5, 8, leapfrog_steps=2, seed=2)
    assert not torch.equal(first.log_px, other.log_px)
    summary = first.summary()
    assert summary["num_steps"] == 5 and summary["num_samples"] == 8
    # negation is exact and commutes with the float64 sum's rounding
    assert summary["nll"] == -float(first.log_px.mean())
    # parameters get their gradients back, and the VAE its mode
    assert all(p.requires_grad for p in vae.parameters()) and vae.training


def test_bad_input_is_refused():
    vae, x, _ = ppca(n=4)
    for kwargs, match in [
        ({"num_steps": 0}, "num_steps"), ({"num_samples": 0}, "num_samples"),
        ({"leapfrog_steps": 0}, "leapfrog_steps"), ({"step_size": 0.0}, "step_size"),
        ({"step_size": float("nan")}, "step_size"), ({"target_accept": 1.0}, "target_accept"),
        ({"target_accept": 0.0}, "target_accept"), ({"start": "posterior"}, "start"),
        ({"schedule": "cosine"}, "schedule"), ({"max_elements": 10}, "max_elements"),
        ({"pilot_chains": 0}, "pilot_chains"), ({"adapt_rate": -1.0}, "adapt_rate"),
    ]:
        with pytest.raises(PyrovaeError, match=match):
            ais_log_likelihood(vae, x, **{"num_steps": 2, "num_samples": 2, **kwargs})
    with pytest.raises(PyrovaeError, match="no datapoints"):
        ais_log_likelihood(vae, x[:0], 2, 2)
    with pytest.raises(PyrovaeError, match="shape"):
        ais_log_likelihood(vae, x[:, :3], 2, 2)
    with pytest.raises(PyrovaeError, match="num_simulated"):
        bdmc(vae, 0, 2, 2)


# ---------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from pyrovae.cli import main

    out = tmp_path_factory.mktemp("ais") / "run"
    assert main(["train", "--no-progress", "--epochs", "1", "--hidden", "16", "--z-dim", "2",
                 "--out", str(out)]) == 0
    return out


def test_evaluate_by_ais_writes_its_own_file(trained_run):
    import json

    from pyrovae.cli import main
    from pyrovae.run import AIS_FILE, EVALUATION_FILE

    assert main(["evaluate", str(trained_run), "--method", "ais", "--num-samples", "3",
                 "--ais-steps", "4", "--leapfrog-steps", "2", "--num-images", "5",
                 "--no-progress"]) == 0
    saved = json.loads((trained_run / AIS_FILE).read_text())
    assert saved["method"] == "ais" and saved["num_datapoints"] == 5
    assert saved["num_steps"] == 4 and saved["num_samples"] == 3 and saved["nll"] > 0
    # one log p(x) per image, whose mean is the NLL: float32 sums of 5 terms
    assert len(saved["per_datapoint_log_px"]) == 5
    assert -sum(saved["per_datapoint_log_px"]) / 5 == pytest.approx(saved["nll"], rel=1e-5)
    assert not (trained_run / EVALUATION_FILE).exists()  # the IS result is another file


def test_evaluate_by_bdmc_reports_both_bounds(trained_run, capsys):
    import json

    from pyrovae.cli import main
    from pyrovae.run import BDMC_FILE

    assert main(["evaluate", str(trained_run), "--method", "bdmc", "--num-samples", "2",
                 "--ais-steps", "3", "--leapfrog-steps", "2", "--num-simulated", "4",
                 "--no-progress"]) == 0
    saved = json.loads((trained_run / BDMC_FILE).read_text())
    assert len(saved["per_datapoint_lower"]) == 4 and "not on the test set" in saved["certifies"]
    assert saved["gap"] == pytest.approx(saved["upper"] - saved["lower"], rel=1e-9)
    assert "not on the test set" in capsys.readouterr().out


def test_importance_sampling_recommends_ais_when_k_hat_flags_it(trained_run, capsys,
                                                               monkeypatch):
    from pyrovae import pipelines
    from pyrovae.cli import main

    monkeypatch.setattr(pipelines, "AIS_ADVICE_SHARE", -1.0)  # any share is large
    assert main(["evaluate", str(trained_run), "--num-samples", "25", "--num-images", "4",
                 "--subset-size", "2", "--no-progress"]) == 0
    assert f"pyrovae evaluate {trained_run} --method ais" in capsys.readouterr().out
    monkeypatch.setattr(pipelines, "AIS_ADVICE_SHARE", 1.0)  # no share is
    assert main(["evaluate", str(trained_run), "--num-samples", "25", "--num-images", "4",
                 "--subset-size", "2", "--no-progress"]) == 0
    assert "--method ais" not in capsys.readouterr().out
