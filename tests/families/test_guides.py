"""The guide contract (raw_shape) and the guides that do not factorize: full-normal, iaf."""

import re

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from torch.nn.functional import softplus

from pyrovae import VAE, make_elbo
from pyrovae.errors import PyrovaeError
from pyrovae.evaluation import ais_log_likelihood, posterior_draws
from pyrovae.families import GUIDES, FullNormalGuide, IAFGuide
from pyrovae.families.kl import describe_kl_methods, kl_methods
from pyrovae.networks import MLPEncoder
from pyrovae.objectives import detach_parameters

EPS32 = torch.finfo(torch.float32).eps
EPS64 = torch.finfo(torch.float64).eps


def small_vae(guide, z_dim=3, **kwargs):
    return VAE((8, 8), z_dim=z_dim, guide=guide, hidden=(32,), **kwargs)


# ---------------------------------------------------------------- the contract


def test_raw_shapes():
    assert GUIDES["normal"](3).raw_shape == (2, 3)
    assert GUIDES["student-t"](3).raw_shape == (2, 3)
    assert FullNormalGuide(3).raw_shape == (3 + 3 + 3,)  # loc, diagonal, strict lower triangle
    assert IAFGuide(3, context=5).raw_shape == (3 + 3 + 5,)  # loc, scale, context
    assert IAFGuide(3).raw_shape == (3 + 3 + 3,)  # the context defaults to z_dim


@pytest.mark.parametrize("guide", ["normal", "full-normal", "iaf"])
def test_the_mlp_encoder_gives_the_raw_shape(guide):
    vae = small_vae(guide)
    raw = vae.encoder(torch.zeros(2, 5, 8, 8))  # a particle dimension in front of the data
    assert raw.shape == (2, 5) + vae.guide_family.raw_shape
    assert vae.encode(torch.zeros(5, 8, 8)).event_shape == (3,)


@pytest.mark.parametrize("guide", ["normal", "full-normal", "iaf"])
def test_an_encoder_of_the_wrong_shape_is_refused_naming_both_shapes(guide):
    family = GUIDES[guide](3)
    wrong = MLPEncoder((8, 8), (family.raw_shape[0] + 1,) + family.raw_shape[1:], hidden=(8,))
    vae = small_vae(guide, encoder=wrong)
    expected = re.escape(str(family.raw_shape))
    got = re.escape(str((4,) + wrong.out_shape))
    with pytest.raises(PyrovaeError, match=rf"shape {got}.*batch \+ {expected}.*out_shape"):
        vae.guide(torch.zeros(4, 8, 8))
    with pytest.raises(PyrovaeError, match=rf"shape {got}"):
        vae.encode(torch.zeros(4, 8, 8))


# ---------------------------------------------------------------- full-normal


def test_full_normal_builds_scale_tril_from_the_raw_output():
    z_dim, min_scale = 4, 0.01
    raw = torch.randn(5, z_dim + z_dim * (z_dim + 1) // 2)
    q = FullNormalGuide(z_dim, min_scale=min_scale)(raw)
    loc, raw_diagonal, lower = raw.split([z_dim, z_dim, 6], dim=-1)
    expected = torch.zeros(5, z_dim, z_dim)
    rows, cols = torch.tril_indices(z_dim, z_dim, offset=-1)
    expected[:, rows, cols] = lower  # row by row, as torch's vec_to_tril_matrix fills it
    expected = expected + torch.diag_embed(softplus(raw_diagonal) + min_scale)
    # the same elementwise operations, no reduction: equal to the bit
    assert torch.equal(q.loc, loc) and torch.equal(q.scale_tril, expected)
    assert q.batch_shape == (5,) and q.event_shape == (z_dim,)


def test_full_normal_with_one_dimension_is_a_normal():
    raw = torch.randn(6, 2)
    q = FullNormalGuide(1)(raw)
    normal = GUIDES["normal"](1)(raw.unsqueeze(-1))
    z = torch.randn(6, 1)
    # a 1x1 Cholesky factor: the same formula up to float32 rounding of a handful of terms
    torch.testing.assert_close(q.log_prob(z), normal.log_prob(z), rtol=0, atol=16 * EPS32 * 10)


# ---------------------------------------------------------------- iaf


def iaf_by_hand(family, loc, scale, context, z0):
    """The flow applied step by step from its networks, written out here: the stable
    IAF step z' = s z + (1 - s) m, (m, logit) = MADE(z, h), s = sigmoid(logit + 2)."""
    z = z0
    for step in family.steps:
        m, logit = step.nn(z, context=context)
        s = torch.sigmoid(logit + 2.0)
        z = s * z + (1 - s) * m
    return z


def change_of_variables(family, loc, scale, context, z0):
    """log q(z) = log N(z0; loc, scale) - log |det dz/dz0|, the Jacobian by autograd
    (one datapoint at a time) and its determinant by LU, independent of Pyro's flows."""
    base = torch.distributions.Normal(loc, scale).log_prob(z0).sum(-1)
    log_dets = []
    for i in range(len(z0)):
        jacobian = torch.autograd.functional.jacobian(
            lambda v: iaf_by_hand(family, loc[i], scale[i], context[i], v), z0[i])
        log_dets.append(torch.linalg.slogdet(jacobian).logabsdet)
    return base - torch.stack(log_dets)


def test_iaf_log_prob_of_its_own_draws_is_the_change_of_variables_formula():
    torch.manual_seed(0)
    family = IAFGuide(3, flows=3, hidden=(12,), context=2).double()
    raw = torch.randn(5, family.raw_shape[0], dtype=torch.float64)
    q = family(raw)
    z = q.rsample()
    loc, scale, context = family.constrain(raw)
    z0 = q.transforms[0]._cached_x_y[0]  # the base draw behind z: the first step's input
    torch.testing.assert_close(iaf_by_hand(family, loc, scale, context, z0), z,
                               rtol=0, atol=64 * EPS64)
    expected = change_of_variables(family, loc, scale, context, z0)
    # float64, a few hundred operations on numbers of order 10: well inside 1e-10
    torch.testing.assert_close(q.log_prob(z), expected, rtol=0, atol=1e-10)


def test_iaf_log_prob_of_any_point_inverts_the_flow():
    torch.manual_seed(1)
    family = IAFGuide(3, flows=2, hidden=(12,), context=2)
    raw = torch.randn(4, family.raw_shape[0])
    loc, scale, context = family.constrain(raw)
    z0 = loc + scale * torch.randn(4, 3)
    with torch.no_grad():
        z = iaf_by_hand(family, loc, scale, context, z0)
    fresh = family(raw)  # never drew z: its log_prob inverts each step
    expected = change_of_variables(family, loc, scale, context, z0)
    # float32: the inversion recovers z0 to a few eps32 relative per step, and log q moves
    # by |d log q / d z0| (of order 10 here) times that: well below 1e-4
    torch.testing.assert_close(fresh.log_prob(z), expected, rtol=0, atol=1e-4)


def test_a_float64_iaf_inverts_in_float64():
    torch.manual_seed(3)
    family = IAFGuide(3, hidden=(12,)).double()
    raw = torch.randn(4, family.raw_shape[0], dtype=torch.float64)
    q = family(raw)
    z = q.rsample()
    fresh = family(raw)  # scores z by inverting each step
    # float64 both ways: the inversion recovers the base draw to a few eps64
    torch.testing.assert_close(fresh.log_prob(z), q.log_prob(z), rtol=0, atol=1e-10)
    assert torch.get_default_dtype() == torch.float32


def test_iaf_log_prob_broadcasts_a_value_against_the_batch():
    torch.manual_seed(2)
    family = IAFGuide(3, hidden=(12,))
    q = family(torch.randn(4, family.raw_shape[0]))
    z = torch.randn(6, 1, 3)  # as a mixture or the mutual information scores it
    _, loc, scale, context = q.made_from
    with torch.no_grad():
        one_by_one = torch.tensor([[float(family.make_dist(loc[b], scale[b], context[b])
                                          .log_prob(z[n, 0])) for b in range(4)]
                                   for n in range(6)])
        broadcast = q.log_prob(z)
    # the same inversions on rows of another batch: float32 rounding only
    torch.testing.assert_close(broadcast, one_by_one, rtol=0, atol=1e-4)


def test_iaf_steps_alternate_their_autoregressive_order():
    family = IAFGuide(4, flows=3)
    forward, backward = torch.arange(4), torch.arange(3, -1, -1)
    for step, order in zip(family.steps, [forward, backward, forward]):
        assert torch.equal(step.nn.permutation, order)


def test_iaf_networks_are_parameters_registered_with_pyro():
    vae = small_vae("iaf")
    names = set(poutine.trace(vae.guide).get_trace(torch.zeros(2, 8, 8)).param_nodes)
    assert any(n.startswith("guide_family$$$steps.0.nn.layers") for n in names)
    assert any(n.startswith("guide_family$$$steps.1.nn.layers") for n in names)


def test_iaf_detached_copy_cuts_every_parameter_but_keeps_z():
    family = IAFGuide(3, hidden=(12,))
    raw = torch.randn(4, family.raw_shape[0], requires_grad=True)
    q = family(raw)
    z = q.rsample()
    detached = detach_parameters(q)
    log_q = detached.log_prob(z)
    # the same density, recomputed through the inversion: float32, as above
    torch.testing.assert_close(log_q, q.log_prob(z), rtol=0, atol=1e-4)
    log_q.sum().backward()
    weights = [p for p in family.parameters()]
    # z's path reaches the raw output and the weights; log q's own dependence does not
    assert raw.grad is not None and all(p.grad is not None for p in weights)
    # at a fixed z, log q depends on no parameter at all
    assert not detached.log_prob(z.detach()).requires_grad


@pytest.mark.parametrize("objective,estimator,particles", [
    ("trace", "stl", 1), ("iwae", "stl", 3), ("iwae", "dreg", 3)])
def test_flow_guide_under_stl_and_dreg_keeps_the_loss_with_finite_gradients(
        binary_digits, objective, estimator, particles):
    vae = small_vae("iaf")
    x = binary_digits.train[:16]
    losses = []
    for name in ("reparam", estimator):
        pyro.set_rng_seed(3)
        elbo = make_elbo(objective, particles, estimator=name)
        losses.append(elbo.differentiable_loss(vae.model, vae.guide, x))
    # the same draws; STL scores log q through the inverted flow: float32 rounding of 16
    # datapoints' log weights of order 50, within 1e-3 of their sum
    assert float(losses[1].detach()) == pytest.approx(float(losses[0].detach()), abs=1e-3)
    vae.zero_grad()
    losses[1].backward()
    grads = [p.grad for p in vae.guide_family.parameters()] + [
        p.grad for p in vae.encoder.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)


def test_meanfield_scores_the_flows_kl_by_monte_carlo_and_says_so(binary_digits):
    vae = small_vae("iaf")
    sites = kl_methods(vae.model, vae.guide, binary_digits.train[:4])
    assert [(s.guide, s.prior, s.analytic) for s in sites] == [
        ("IAFDistribution", "Normal", False)]
    assert "(IAFDistribution || Normal) Monte Carlo" in describe_kl_methods(sites, "meanfield")


@pytest.mark.parametrize("kwargs,match", [
    ({"flows": 0}, "flows.*positive integer"),
    ({"flows": 2.5}, "flows.*positive integer"),
    ({"context": -1}, "context.*positive integer"),
    ({"hidden": (2,)}, "fewer than z_dim=3"),
    ({"hidden": "12,x"}, "sizes separated by commas"),
    ({"hidden": []}, "one or more layer sizes"),
    ({"min_scale": -1.0}, "min_scale"),
])
def test_iaf_bad_options_name_the_fix(kwargs, match):
    with pytest.raises(PyrovaeError, match=match):
        IAFGuide(3, **kwargs)


def test_iaf_takes_the_clis_whole_floats_and_comma_separated_sizes():
    family = IAFGuide(3, flows=4.0, hidden="12,16", context=5.0)
    assert (family.flows, family.hidden, family.context) == (4, (12, 16), 5)
    assert family.settings == {"min_scale": 1e-4, "flows": 4, "hidden": [12, 16], "context": 5}


@pytest.mark.parametrize("guide,prior", [("full-normal", "normal"), ("iaf", "vamp")])
def test_annealed_importance_sampling_runs_with_them(binary_digits, guide, prior):
    vae = small_vae(guide, prior=prior,
                    prior_kwargs={"components": 5} if prior == "vamp" else None)
    vae.prior.initialize(binary_digits.train)
    estimate = ais_log_likelihood(vae, binary_digits.test[:3], num_steps=10, num_samples=4)
    assert torch.isfinite(estimate.log_px).all()


@pytest.mark.parametrize("guide", ["full-normal", "iaf"])
def test_the_arviz_export_holds_their_draws(binary_digits, guide):
    vae = small_vae(guide)
    draws = posterior_draws(vae, binary_digits.test[:5], num_draws=7, num_chains=2)
    assert draws.posterior["z"].shape == (2, 7, 5, 3)
    assert np.isfinite(draws.posterior["z"].values).all()


# ---------------------------------------------------------------- saving, devices


@pytest.mark.parametrize("guide,kwargs", [
    ("full-normal", {}), ("iaf", {"flows": 3, "hidden": [8, 8], "context": 2})])
def test_save_and_load_give_the_same_log_prob(tmp_path, binary_digits, guide, kwargs):
    vae = small_vae(guide, guide_kwargs=kwargs)
    vae.save(tmp_path)
    loaded = VAE.load(tmp_path)
    assert loaded.config["guide"] == {"name": guide, "min_scale": 1e-4, **kwargs}
    x = binary_digits.test[:5]
    draws = []
    for model in (vae, loaded):
        torch.manual_seed(4)
        q = model.encode(x)
        z = q.sample()
        draws.append((z, q.log_prob(z), q.log_prob(torch.zeros_like(z))))
    # the same weights, random numbers and operations: equal to the bit
    for a, b in zip(*draws):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("guide", ["full-normal", "iaf"])
def test_moves_to_the_gpu_with_the_model(guide, binary_digits):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    vae = small_vae(guide).to("cuda")
    x = binary_digits.train[:8].to("cuda")
    loss = make_elbo("iwae", 4).differentiable_loss(vae.model, vae.guide, x)
    assert loss.device.type == "cuda" and torch.isfinite(loss)
    q = vae.encode(x)
    assert q.sample().device.type == "cuda"
    assert torch.isfinite(q.log_prob(torch.zeros(8, 3, device="cuda"))).all()
