"""The trainer's fast SVI step (FusedSVI + FusedOptim) against Pyro's plain SVI step."""

import pyro
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO

from pyrovae import VAE
from pyrovae.objectives import make_elbo
from pyrovae.svi import FusedOptim, FusedSVI

STEPS = 5


def binary_batch(binary_digits, n=64):
    return binary_digits.train[:n]


def run_steps(svi_class, optim, elbo, x, steps=STEPS):
    """Fresh VAE and param store, seed 0; the losses and the parameters after ``steps`` steps."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    vae = VAE((8, 8), z_dim=4, hidden=(32,))
    svi = svi_class(vae.model, vae.guide, optim, elbo)
    losses = [svi.step(x) for _ in range(steps)]
    return losses, {name: v.clone() for name, v in vae.state_dict().items()}, optim


@pytest.mark.parametrize("elbo", [Trace_ELBO, TraceMeanField_ELBO,
                                  lambda: make_elbo("meanfield"), lambda: make_elbo("trace")])
def test_fast_step_gives_the_loss_and_parameters_of_plain_svi(binary_digits, elbo):
    x = binary_batch(binary_digits)
    plain_losses, plain_params, _ = run_steps(SVI, pyro.optim.Adam({"lr": 1e-2}), elbo(), x)
    fast_losses, fast_params, _ = run_steps(
        FusedSVI, FusedOptim(torch.optim.Adam, {"lr": 1e-2}), elbo(), x)
    # bit for bit: the same floating-point operations in the same order
    assert fast_losses == plain_losses
    for name, value in plain_params.items():
        assert torch.equal(fast_params[name], value), name


@pytest.mark.parametrize("elbo", [lambda: make_elbo("trace"), lambda: make_elbo("meanfield")])
def test_fused_adam_agrees_with_pyro_adam_up_to_rounding(binary_digits, elbo):
    """The trainer's optimizer, torch's fused Adam, makes Pyro's Adam update in one kernel:
    the same to float rounding (1e-6 relative), not bit for bit."""
    x = binary_batch(binary_digits)
    plain_losses, plain_params, _ = run_steps(SVI, pyro.optim.Adam({"lr": 1e-2}), elbo(), x)
    fused_losses, fused_params, _ = run_steps(
        FusedSVI, FusedOptim(torch.optim.Adam, {"lr": 1e-2, "fused": True}), elbo(), x)
    assert fused_losses[0] == plain_losses[0]  # before any update: the same parameters
    assert fused_losses == pytest.approx(plain_losses, rel=1e-6)
    for name, value in plain_params.items():
        assert torch.allclose(fused_params[name], value, rtol=1e-5, atol=1e-6), name


def test_fused_optim_steps_only_the_parameters_it_is_given():
    """As pyro.optim.Adam: a parameter left out keeps its value, its Adam state and its grad."""
    a, b = torch.ones(3, requires_grad=True), torch.ones(2, requires_grad=True)
    pyro.param("a", a), pyro.param("b", b)
    optim = FusedOptim(torch.optim.Adam, {"lr": 0.1})
    a.grad, b.grad = torch.ones(3), torch.ones(2)
    optim([a])
    assert torch.equal(b.detach(), torch.ones(2)) and torch.equal(b.grad, torch.ones(2))
    assert not torch.equal(a.detach(), torch.ones(3))
    optim([a, b])
    state = optim.get_state()
    assert state["a"]["state"][0]["step"] == 2 and state["b"]["state"][0]["step"] == 1


@pytest.mark.parametrize("save_with,load_with", [("fused", "pyro"), ("pyro", "fused"),
                                                 ("fused", "fused")])
def test_optimizer_state_round_trips_between_pyro_and_fused(binary_digits, save_with, load_with):
    """A run saved with either optimizer resumes with either and continues exactly as a
    straight run."""
    x = binary_batch(binary_digits)
    make = {"pyro": lambda: pyro.optim.Adam({"lr": 1e-2}),
            "fused": lambda: FusedOptim(torch.optim.Adam, {"lr": 1e-2})}
    svi_class = {"pyro": SVI, "fused": FusedSVI}
    _, straight, _ = run_steps(SVI, make["pyro"](), make_elbo("trace"), x, steps=4)

    _, halfway, saved_optim = run_steps(svi_class[save_with], make[save_with](),
                                        make_elbo("trace"), x, steps=2)
    state, rng = saved_optim.get_state(), torch.get_rng_state()
    pyro.clear_param_store()
    vae = VAE((8, 8), z_dim=4, hidden=(32,))
    vae.load_state_dict(halfway)
    optim = make[load_with]()
    optim.set_state(state)
    torch.set_rng_state(rng)
    svi = svi_class[load_with](vae.model, vae.guide, optim, make_elbo("trace"))
    svi.step(x), svi.step(x)
    for name, value in vae.state_dict().items():
        assert torch.equal(value, straight[name]), name


def test_bernoulli_likelihood_matches_torch_bit_for_bit():
    """pyrovae's Bernoulli image log-likelihood (summed before it is negated, no unbind)
    against torch's Independent(Bernoulli): values and gradients, with a particle dim."""
    from pyrovae.families import make_likelihood

    likelihood = make_likelihood("bernoulli", (8, 8))
    x = torch.bernoulli(torch.full((5, 8, 8), 0.3))
    raw = torch.randn(3, 5, 1, 8, 8, requires_grad=True)
    ours = likelihood(raw).log_prob(x)
    (ours_grad,) = torch.autograd.grad(ours.sum(), raw)
    theirs = torch.distributions.Independent(
        torch.distributions.Bernoulli(logits=raw[:, :, 0]), 2).log_prob(x)
    (theirs_grad,) = torch.autograd.grad(theirs.sum(), raw)
    assert ours.shape == (3, 5)
    assert torch.equal(ours, theirs) and torch.equal(ours_grad, theirs_grad)
