"""The mixture priors: mog (a learnable mixture of Gaussians) and vamp (the VampPrior)."""

import copy
import math
import warnings

import pyro
import pytest
import torch
from pyro import poutine

from pyrovae import VAE, make_elbo
from pyrovae.collapse import collapse_diagnostics
from pyrovae.errors import PyrovaeError, SupportMismatchError, UnknownNameError
from pyrovae.evaluation import log_likelihood
from pyrovae.families import MixtureOfGaussiansPrior, VampPrior
from pyrovae.families.kl import describe_kl_methods, kl_methods


def small_vae(prior="vamp", z_dim=3, components=6, **kwargs):
    vae = VAE((8, 8), z_dim=z_dim, prior=prior, hidden=(32,),
              prior_kwargs={"components": components, **kwargs.pop("prior_kwargs", {})},
              **kwargs)
    return vae


def grid_integral(log_density, half_width=10.0, points=401):
    """The integral of exp(log_density) over a square grid in 2-D, by the trapezoidal rule
    (for a smooth density that has decayed at the edges, accurate far below 1e-6)."""
    axis = torch.linspace(-half_width, half_width, points, dtype=torch.float64)
    z = torch.cartesian_prod(axis, axis)
    with torch.no_grad():
        density = log_density(z.float()).double().exp().reshape(points, points)
    return float(torch.trapezoid(torch.trapezoid(density, axis), axis))


# ---------------------------------------------------------------- mog


def test_mog_log_prob_is_the_mixture_formula():
    torch.manual_seed(0)
    prior = MixtureOfGaussiansPrior(3, components=4)
    with torch.no_grad():
        prior.logits.copy_(torch.randn(4))
        prior.scale_unconstrained.copy_(torch.randn(4, 3))
    z = torch.randn(7, 3)
    locs = prior.locs.double()
    scales = torch.nn.functional.softplus(prior.scale_unconstrained.double()) + prior.min_scale
    log_weights = torch.log_softmax(prior.logits.double(), 0)
    per_component = (-0.5 * ((z.double()[:, None] - locs) / scales) ** 2 - scales.log()
                     - 0.5 * math.log(2 * math.pi)).sum(-1)
    expected = torch.logsumexp(log_weights + per_component, -1)
    # float32 against float64: relative rounding of terms of order 10, well below 1e-5
    torch.testing.assert_close(prior().log_prob(z).double(), expected, rtol=0, atol=1e-5)


def test_mog_density_integrates_to_one():
    torch.manual_seed(1)
    prior = MixtureOfGaussiansPrior(2, components=5)
    assert grid_integral(prior().log_prob) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("kwargs,match", [
    ({"components": 0}, "components.*positive integer"),
    ({"components": 2.5}, "components.*positive integer"),
    ({"min_scale": 0.0}, "min_scale.*greater than 0"),
    ({"min_scale": 1.5}, "below 1"),
])
def test_mog_bad_options_name_the_fix(kwargs, match):
    with pytest.raises(PyrovaeError, match=match):
        MixtureOfGaussiansPrior(2, **kwargs)


def test_mog_parameters_are_learned():
    vae = small_vae("mog")
    names = set(poutine.trace(vae.model).get_trace(torch.zeros(2, 8, 8)).param_nodes)
    assert {"prior$$$locs", "prior$$$scale_unconstrained", "prior$$$logits"} <= names


# ---------------------------------------------------------------- vamp


@pytest.mark.parametrize("guide,flow_components", [
    ("normal", "base"), ("full-normal", "base"), ("iaf", "exact"), ("iaf", "base")])
def test_vamp_log_prob_is_the_mean_of_the_encoded_pseudo_inputs(guide, flow_components):
    torch.manual_seed(2)
    vae = small_vae(guide=guide, prior_kwargs={"flow_components": flow_components}).eval()
    z = torch.randn(5, 3)

    def component(u):
        q = vae.encode(u[None])
        # "base" takes a flow's Gaussian before its steps; other guides have no base
        if flow_components == "base" and guide == "iaf":
            q = torch.distributions.Independent(
                torch.distributions.Normal(q.base_dist.base_dist.loc,
                                           q.base_dist.base_dist.scale), 1)
        return q

    with torch.no_grad():
        each = torch.stack([component(u).log_prob(z) for u in vae.prior.pseudo_inputs])
        expected = torch.logsumexp(each, 0) - math.log(6)
        got = vae.prior_distribution().log_prob(z)
    # the same component densities, batched or one by one (a flow inverts in float32 either
    # way); the logsumexp of six terms adds a few eps32
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_vamp_density_integrates_to_one():
    torch.manual_seed(3)
    vae = small_vae(z_dim=2).eval()
    assert grid_integral(vae.prior_distribution().log_prob) == pytest.approx(1.0, abs=1e-4)


def test_one_svi_step_moves_the_pseudo_inputs_and_reaches_the_encoder_through_the_prior(
        binary_digits):
    vae = small_vae()
    vae.prior.initialize(binary_digits.train)
    before = vae.prior.pseudo_inputs_unconstrained.detach().clone()
    # the encoder's gradient from the prior term alone: log p(z) at a fixed z
    vae.zero_grad()
    vae.prior_distribution().log_prob(torch.randn(4, 3)).sum().backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0
               for p in vae.encoder.parameters())
    svi = pyro.infer.SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), make_elbo("trace"))
    svi.step(binary_digits.train[:32])
    assert not torch.equal(vae.prior.pseudo_inputs_unconstrained.detach(), before)


def test_vamp_keeps_a_plain_reference_to_the_encoder(tmp_path, binary_digits):
    vae = small_vae()
    vae.prior.initialize(binary_digits.train)
    keys = list(vae.state_dict())
    assert "prior.pseudo_inputs_unconstrained" in keys
    assert not [k for k in keys if k.startswith("prior.") and "encoder" in k]  # saved once
    assert "prior" not in dict(vae.encoder.named_modules())
    twin = copy.deepcopy(vae)
    assert twin.prior._encode.__self__ is twin  # the copy encodes with its own encoder
    with torch.no_grad():
        twin.encoder.net[0].weight.add_(1.0)
    z = torch.randn(4, 3)
    with torch.no_grad():
        assert not torch.equal(twin.prior_distribution().log_prob(z),
                               vae.prior_distribution().log_prob(z))
    vae.save(tmp_path)
    loaded = VAE.load(tmp_path)
    assert loaded.config["prior"] == {"name": "vamp", "components": 6, "init": "data",
                                      "init_std": 0.01, "flow_components": "base"}
    with torch.no_grad():
        assert torch.equal(loaded.prior_distribution().log_prob(z),
                           vae.eval().prior_distribution().log_prob(z))


def test_pseudo_inputs_stay_in_the_datas_range(binary_digits, digits):
    bounded = small_vae()
    with torch.no_grad():
        bounded.prior.pseudo_inputs_unconstrained.mul_(100)
    inputs = bounded.prior.pseudo_inputs
    assert (inputs >= 0).all() and (inputs <= 1).all()
    free = small_vae(likelihood="gaussian")
    assert torch.equal(free.prior.pseudo_inputs, free.prior.pseudo_inputs_unconstrained)


def test_initialize_from_images_or_their_mean(binary_digits):
    x = binary_digits.train[:100]
    data = small_vae()
    torch.manual_seed(4)
    data.prior.initialize(x)
    inputs = data.prior.pseudo_inputs.detach()
    # each pseudo-input is a training image, its binary pixels moved 0.01 inside (0, 1):
    # sigmoid(logit(v)) returns v to a few eps32
    clamped = x.clamp(0.01, 0.99)
    nearest = (inputs[:, None] - clamped[None]).abs().amax((-2, -1)).min(1).values
    assert (nearest < 1e-6).all()
    mean = small_vae(prior_kwargs={"init": "mean", "init_std": 0.0})
    mean.prior.initialize(x)
    expected = x.mean(0).clamp(0.01, 0.99).expand(6, 8, 8)
    torch.testing.assert_close(mean.prior.pseudo_inputs.detach(), expected, rtol=0, atol=1e-6)


def test_vamp_refuses_bad_input():
    with pytest.raises(UnknownNameError, match="init='middle'.*'data', 'mean'"):
        VampPrior(3, init="middle")
    with pytest.raises(UnknownNameError, match="flow_components='flow'.*'base', 'exact'"):
        VampPrior(3, flow_components="flow")
    with pytest.raises(PyrovaeError, match="components"):
        VampPrior(3, components=0)
    with pytest.raises(PyrovaeError, match="build it inside a VAE"):
        VampPrior(3)()
    with pytest.raises(PyrovaeError, match=r"shape \(8, 8\).*got \(4, 64\)"):
        small_vae().prior.initialize(torch.zeros(4, 64))
    with pytest.raises(SupportMismatchError):
        small_vae(guide="lognormal")


def test_vamp_warns_once_when_trained_without_initialization(binary_digits):
    x = binary_digits.train[:8]
    with pytest.warns(UserWarning, match="not initialized from the data"):
        small_vae().model(x)
    initialized = small_vae()
    initialized.prior.initialize(binary_digits.train)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        initialized.model(x)


# ---------------------------------------------------------------- both, in the VAE


@pytest.mark.parametrize("prior", ["mog", "vamp"])
def test_meanfield_falls_back_to_monte_carlo_and_says_so(binary_digits, prior):
    vae = small_vae(prior)
    vae.prior.initialize(binary_digits.train)
    x = binary_digits.train[:16]
    sites = kl_methods(vae.model, vae.guide, x)
    assert [s.analytic for s in sites] == [False]
    assert "Monte Carlo, as torch has no closed form" in describe_kl_methods(sites, "meanfield")
    loss = make_elbo("meanfield").loss(vae.model, vae.guide, x)
    assert math.isfinite(loss)


@pytest.mark.parametrize("prior,guide", [("mog", "normal"), ("vamp", "normal"),
                                         ("vamp", "iaf")])
def test_collapse_diagnostics_and_importance_sampling(binary_digits, prior, guide):
    vae = small_vae(prior, guide=guide)
    vae.prior.initialize(binary_digits.train)
    diagnostics = collapse_diagnostics(vae, binary_digits.test[:50])
    assert diagnostics["kl_per_dim"] is None
    assert "the prior (LatentMixture) does not factorize" in diagnostics["kl_per_dim_method"]
    assert math.isfinite(diagnostics["mutual_information"])
    estimate = log_likelihood(vae, binary_digits.test[:10], 32)
    assert torch.isfinite(estimate.log_px).all() and (estimate.elbo <= estimate.log_px).all()


@pytest.mark.gpu
@pytest.mark.parametrize("prior,guide", [("mog", "full-normal"), ("vamp", "iaf")])
def test_moves_to_the_gpu_with_the_model(binary_digits, prior, guide):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    vae = small_vae(prior, guide=guide)
    vae.prior.initialize(binary_digits.train)
    vae = vae.to("cuda")
    x = binary_digits.train[:8].to("cuda")
    loss = make_elbo("trace").differentiable_loss(vae.model, vae.guide, x)
    assert loss.device.type == "cuda" and torch.isfinite(loss)
    p = vae.prior_distribution()
    assert p.sample((3,)).device.type == "cuda"
    assert all(t.is_cuda for t in vae.prior.parameters())


def test_mixture_log_prob_in_chunks_is_the_whole_computation(monkeypatch):
    torch.manual_seed(5)
    prior = MixtureOfGaussiansPrior(3, components=4)
    z = torch.randn(5, 7, 3)
    whole = prior().log_prob(z)
    # diagonal Gaussian components: one (value, component) intermediate per pair
    monkeypatch.setattr("pyrovae.families.mixtures.MIXTURE_CHUNK_ELEMENTS", 4 * 6)
    chunked = prior().log_prob(z)  # 35 values in chunks of 6
    assert chunked.shape == (5, 7)
    # the same float64 operations on the same rows, rounded to float32: BLAS may block
    # fewer rows otherwise, a float64 rounding (1e-15 here), far below float32's step
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)
    expanded = prior().expand((5, 7))  # as the data plate expands it
    torch.testing.assert_close(expanded.log_prob(z), whole, rtol=0, atol=1e-6)


def test_diagonal_mixture_density_keeps_its_digits_for_narrow_components():
    """The expanded quadratic form against the elementwise one, in float64, where
    cancellation would show: components of scale 1e-3 far from the origin, z near
    them (log densities of order 20, terms z^2 / sigma^2 of order 1e8)."""
    torch.manual_seed(6)
    prior = MixtureOfGaussiansPrior(4, components=3, min_scale=1e-4)
    with torch.no_grad():
        prior.locs.copy_(5 + torch.randn(3, 4))
        prior.scale_unconstrained.fill_(-7.0)  # softplus(-7) + 1e-4: about 1e-3
        prior.logits.copy_(torch.randn(3))
    p = prior()
    z = p.component_distribution.sample((50,))[:, 0] + 1e-3 * torch.randn(50, 4)
    elementwise = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=p.mixture_distribution.logits.double()),
        torch.distributions.Independent(torch.distributions.Normal(
            p.component_distribution.base_dist.loc.double(),
            p.component_distribution.base_dist.scale.double()), 1)).log_prob(z.double())
    got = p.log_prob(z)
    assert got.dtype == torch.float32 and (elementwise > 5).all()
    # float64 rounding of terms of 1e8 (1e-8) and then float32's (1e-6 at 25)
    torch.testing.assert_close(got.double(), elementwise, rtol=0, atol=1e-5)
