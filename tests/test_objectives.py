"""Objectives: the IWAE bound, STL and DReG gradients, the KL weight, aggressive training."""

import json
import logging
import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, RenyiELBO, Trace_ELBO, TraceMeanField_ELBO
from torch.distributions import constraints, kl_divergence

from pyrovae.errors import PyrovaeError, UnknownNameError
from pyrovae.objectives import (
    COMPILED,
    OBJECTIVES,
    DReG_IWAE_ELBO,
    IWAE_ELBO,
    KLWeightedELBO,
    STL_IWAE_ELBO,
    STL_Trace_ELBO,
    make_elbo,
)
from pyrovae.svi import FusedOptim, FusedSVI
from pyrovae.training import Trainer, TrainConfig
from pyrovae.vae import VAE

NUM_SE = 4.0


def small_vae(z_dim=2, **kwargs):
    return VAE((8, 8), z_dim=z_dim, hidden=(32,), **kwargs)


def grads_of(module, backward):
    module.zero_grad()
    backward()
    return torch.cat([p.grad.flatten() for p in module.parameters()])


# ---------------------------------------------------------------- IWAE


def independent_log_weights(vae, x, num_particles):
    """log p(x, z_k) - log q(z_k|x), shape (K, B), drawn as Pyro's vectorized guide draws."""
    q = vae.encode(x)
    z = q.expand((num_particles, x.shape[0])).rsample()
    return vae.prior(x).log_prob(z) + vae.decode(z).log_prob(x) - q.log_prob(z)


def test_renyi_elbo_is_the_per_datapoint_iwae_bound(binary_digits):
    vae, x, num_particles = small_vae(), binary_digits.train[:64], 8
    torch.manual_seed(1)
    pyro_loss = RenyiELBO(alpha=0, num_particles=num_particles, max_plate_nesting=1,
                          vectorize_particles=True).loss(vae.model, vae.guide, x)
    torch.manual_seed(1)
    with torch.no_grad():
        log_w = independent_log_weights(vae, x, num_particles)
    per_datapoint = (log_w.logsumexp(0) - math.log(num_particles)).sum()
    whole_batch = log_w.sum(1).logsumexp(0) - math.log(num_particles)
    assert pyro_loss == pytest.approx(-float(per_datapoint), rel=1e-6)
    assert abs(pyro_loss + float(whole_batch)) > 1.0  # the test tells the two apart


def test_iwae_elbo_matches_pyros_loss_and_gradient(binary_digits):
    vae, x = small_vae(), binary_digits.train[:32]
    renyi = RenyiELBO(alpha=0, num_particles=4, max_plate_nesting=1, vectorize_particles=True)
    iwae = make_elbo("iwae", 4)
    assert type(iwae) is IWAE_ELBO

    def pyro_step():
        torch.manual_seed(3)
        return renyi.loss_and_grads(vae.model, vae.guide, x)

    def our_step():
        torch.manual_seed(3)
        iwae.differentiable_loss(vae.model, vae.guide, x).backward()

    assert torch.allclose(grads_of(vae, pyro_step), grads_of(vae, our_step), atol=1e-5)
    assert seeded_loss(iwae, vae, x) == pytest.approx(
        seeded_loss(renyi, vae, x, differentiable=False), rel=1e-6)


def seeded_loss(objective, vae, x, seed=3, differentiable=True):
    torch.manual_seed(seed)
    if differentiable:
        return float(objective.differentiable_loss(vae.model, vae.guide, x).detach())
    return objective.loss(vae.model, vae.guide, x)


def test_iwae_records_the_elbo_of_the_same_particles(binary_digits):
    vae, x = small_vae(), binary_digits.train[:16]
    iwae = make_elbo("iwae", 5)
    torch.manual_seed(0)
    loss = iwae.differentiable_loss(vae.model, vae.guide, x)
    torch.manual_seed(0)
    with torch.no_grad():
        log_w = independent_log_weights(vae, x, 5)
    assert float(iwae.elbo_total) == pytest.approx(float(log_w.mean(0).sum()), rel=1e-5)
    assert -float(loss.detach()) >= float(iwae.elbo_total)  # Jensen, on the same particles


# ---------------------------------------------------------------- conjugate model

SIGMA = 0.5  # x | z ~ N(z, SIGMA^2), z ~ N(0, 1)
X_VALUE = 1.2


def conjugate_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, SIGMA), obs=x)


def conjugate_guide(x):
    loc = pyro.param("loc", lambda: torch.full_like(x, 0.3))
    scale = pyro.param("scale", lambda: torch.full_like(x, 0.9), constraint=constraints.positive)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(loc, scale))


def exact_posterior():
    return X_VALUE / (1 + SIGMA**2), math.sqrt(SIGMA**2 / (1 + SIGMA**2))


def guide_gradients(objective, num_draws, at_posterior=False):
    """Independent draws of the loss gradient with respect to (loc, log scale).

    Every datapoint has the same x and its own guide parameters, so datapoint b's
    gradient is a draw that depends only on its own particles: one call gives
    ``num_draws`` independent draws.
    """
    pyro.clear_param_store()
    x = torch.full((num_draws,), X_VALUE)
    if at_posterior:
        loc, scale = exact_posterior()
        pyro.param("loc", torch.full_like(x, loc))
        pyro.param("scale", torch.full_like(x, scale), constraint=constraints.positive)
    objective.loss_and_grads(conjugate_model, conjugate_guide, x)
    store = pyro.get_param_store()
    return torch.stack([store["loc"].unconstrained().grad,
                        store["scale"].unconstrained().grad], -1).double()


def exact_elbo_gradient():
    """d(-ELBO)/d(loc, log scale) at the guide's initial values, in closed form."""
    m, s = 0.3, 0.9
    d_loc = (X_VALUE - m) / SIGMA**2 - m
    d_log_scale = -(s**2) / SIGMA**2 - s**2 + 1
    return -torch.tensor([d_loc, d_log_scale], dtype=torch.float64)


def assert_same_mean(a, b):
    se = (a.var(0) / len(a) + b.var(0) / len(b)).sqrt()
    assert torch.all((a.mean(0) - b.mean(0)).abs() < NUM_SE * se), (a.mean(0), b.mean(0), se)


# ---------------------------------------------------------------- STL


@pytest.mark.parametrize("guide", ["normal", "full-normal", "iaf"])
def test_stl_keeps_the_loss_value(binary_digits, guide):
    vae, x = small_vae(guide=guide), binary_digits.train[:32]
    stl = make_elbo("trace", estimator="stl")
    assert type(stl) is STL_Trace_ELBO
    # the same draws and float32 operations (q re-scored with detached copies of its
    # parameters); rel 1e-6, 8 eps32, leaves room for the re-scored sums' order
    assert seeded_loss(stl, vae, x) == pytest.approx(seeded_loss(make_elbo("trace"), vae, x),
                                                     rel=1e-6)
    for estimator in ("stl", "dreg"):
        assert seeded_loss(make_elbo("iwae", 3, estimator=estimator), vae, x) == pytest.approx(
            seeded_loss(make_elbo("iwae", 3), vae, x), rel=1e-6)


def test_stl_gradient_is_unbiased():
    standard = guide_gradients(Trace_ELBO(max_plate_nesting=1), 20000)
    stl = guide_gradients(make_elbo("trace", estimator="stl"), 20000)
    assert_same_mean(stl, standard)
    for draws in (stl, standard):  # and both against the closed-form gradient
        se = draws.std(0) / math.sqrt(len(draws))
        assert torch.all((draws.mean(0) - exact_elbo_gradient()).abs() < NUM_SE * se)


def test_stl_gradient_vanishes_at_the_exact_posterior():
    standard = guide_gradients(Trace_ELBO(max_plate_nesting=1), 2000, at_posterior=True)
    stl = guide_gradients(make_elbo("trace", estimator="stl"), 2000, at_posterior=True)
    assert stl.var(0).max() < 1e-10 and stl.abs().max() < 1e-5
    assert standard.var(0).min() > 0.1


def seeded_backward(objective, vae, x):
    """A backward pass of ``objective`` on the same draws every time it is called."""
    def backward():
        torch.manual_seed(7)
        objective.loss_and_grads(vae.model, vae.guide, x)
    return backward


def test_stl_gradient_of_a_vae_matches_the_standard_one_for_the_decoder(binary_digits):
    # STL changes only the guide's gradient; the model's is the same draw for draw
    vae, x = small_vae(), binary_digits.train[:32]

    def step(objective):
        return seeded_backward(objective, vae, x)

    assert torch.allclose(grads_of(vae.decoder, step(make_elbo("trace"))),
                          grads_of(vae.decoder, step(make_elbo("trace", estimator="stl"))),
                          atol=1e-5)


# ---------------------------------------------------------------- DReG


def test_dreg_is_unbiased_and_has_lower_guide_variance():
    num_particles, num_draws = 8, 20000
    standard = guide_gradients(make_elbo("iwae", num_particles), num_draws)
    dreg = guide_gradients(make_elbo("iwae", num_particles, estimator="dreg"), num_draws)
    assert_same_mean(dreg, standard)
    ratio = standard.var(0) / dreg.var(0)
    print(f"IWAE K={num_particles}: guide-gradient variance, standard / DReG = "
          f"{ratio.tolist()} (loc, log scale)")
    assert torch.all(ratio > 2)


def test_dreg_gives_the_iwae_gradient_for_the_model(binary_digits):
    vae, x = small_vae(), binary_digits.train[:32]

    def step(objective):
        return seeded_backward(objective, vae, x)

    dreg = make_elbo("iwae", 6, estimator="dreg")
    assert type(dreg) is DReG_IWAE_ELBO
    assert torch.allclose(grads_of(vae.decoder, step(make_elbo("iwae", 6))),
                          grads_of(vae.decoder, step(dreg)), atol=1e-5)


def test_stl_is_biased_for_iwae_but_not_dreg():
    # Tucker et al. 2019: dropping the score term is biased once K > 1
    standard = guide_gradients(make_elbo("iwae", 8), 20000)
    stl = guide_gradients(make_elbo("iwae", 8, estimator="stl"), 20000)
    assert type(make_elbo("iwae", 8, estimator="stl")) is STL_IWAE_ELBO
    se = (standard.var(0) / len(standard) + stl.var(0) / len(stl)).sqrt()
    assert ((stl.mean(0) - standard.mean(0)).abs() > NUM_SE * se).any()


# ---------------------------------------------------------------- KL weight, free bits


@pytest.mark.parametrize("name,pyro_elbo", [("trace", Trace_ELBO), ("meanfield", TraceMeanField_ELBO)])
@pytest.mark.parametrize("families", [
    {}, dict(guide="full-normal"), dict(guide="iaf", prior="mog"),
    dict(prior="vamp", prior_kwargs={"components": 10})])
def test_kl_weight_one_is_the_elbo(binary_digits, name, pyro_elbo, families):
    vae, x = small_vae(**families), binary_digits.train[:32]
    weighted = make_elbo(name, kl_weighted=True)
    assert isinstance(weighted, KLWeightedELBO)

    def step(objective):
        def backward():
            torch.manual_seed(2)
            objective.loss_and_grads(vae.model, vae.guide, x)
        return backward

    assert torch.allclose(grads_of(vae, step(pyro_elbo(max_plate_nesting=1))),
                          grads_of(vae, step(weighted)), atol=1e-5)
    torch.manual_seed(2)
    expected = pyro_elbo(max_plate_nesting=1).loss(vae.model, vae.guide, x)
    torch.manual_seed(2)
    assert weighted.loss(vae.model, vae.guide, x) == pytest.approx(expected, rel=1e-6)


def test_beta_and_free_bits_follow_their_formula(binary_digits):
    vae, x, beta = small_vae(z_dim=6), binary_digits.train[:32], 0.3
    torch.manual_seed(4)
    with torch.no_grad():
        q = vae.encode(x)
        z = q.rsample()
        recon = vae.decode(z).log_prob(x).sum()
        kl_dims = kl_divergence(q.base_dist, vae.prior(x).base_dist)  # (batch, z_dim)
    free_bits = float(kl_dims.mean(0).median())  # some dimensions below it, some above
    clamped = kl_dims.mean(0).clamp(min=free_bits).sum() * x.shape[0]
    objective = make_elbo("meanfield", beta=beta, free_bits=free_bits)
    loss = seeded_loss(objective, vae, x, seed=4)
    assert loss == pytest.approx(-float(recon - beta * clamped), rel=1e-5)
    assert float(objective.elbo_total) == pytest.approx(float(recon - kl_dims.sum()), rel=1e-5)
    assert float(objective.recon_total) == pytest.approx(float(recon), rel=1e-5)


def test_free_bits_stop_the_kl_gradient_below_the_threshold(binary_digits):
    # with every dimension's KL below the threshold, the guide's gradient is the
    # reconstruction term's alone, as with beta = 0
    vae, x = small_vae(), binary_digits.train[:32]

    def step(objective):
        def backward():
            torch.manual_seed(9)
            objective.loss_and_grads(vae.model, vae.guide, x)
        return backward

    clamped = grads_of(vae.encoder, step(make_elbo("meanfield", free_bits=1e6)))
    no_kl = grads_of(vae.encoder, step(make_elbo("meanfield", beta=0.0)))
    with_kl = grads_of(vae.encoder, step(make_elbo("meanfield", kl_weighted=True)))
    assert torch.allclose(clamped, no_kl, atol=1e-6)
    assert not torch.allclose(clamped, with_kl, atol=1e-4)


def test_beta_schedule():
    config = TrainConfig(beta=0.8, kl_anneal=4, kl_anneal_start=0.2)
    assert [config.beta_at(e) for e in (1, 2, 3, 5, 9)] == pytest.approx([0.2, 0.35, 0.5, 0.8, 0.8])
    assert TrainConfig(beta=0.5).beta_at(1) == 0.5
    assert not TrainConfig().kl_weighted and TrainConfig(kl_anneal=2).kl_weighted


@pytest.mark.parametrize("kwargs,match", [
    (dict(name="trace", estimator="dreg"), "dreg is for --elbo iwae"),
    (dict(name="meanfield", estimator="stl"), "use --elbo trace --estimator stl"),
    (dict(name="iwae", num_particles=4, beta=0.5), "no separate KL term"),
    (dict(name="trace", free_bits=-1.0), "must be >= 0"),
])
def test_bad_combinations_name_the_fix(kwargs, match):
    with pytest.raises(PyrovaeError, match=match):
        make_elbo(**kwargs)


def test_unknown_estimator():
    with pytest.raises(UnknownNameError, match="reparam"):
        make_elbo("trace", estimator="score")


# ---------------------------------------------------------------- compiled steps


def train_steps(objective, svi_class, optim, batches, num_particles=1, **vae_kwargs):
    """Fresh VAE, param store and seed; the losses, recorded terms and parameters after
    one step on each batch."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    vae = small_vae(z_dim=3, **vae_kwargs)
    elbo = objective(num_particles=num_particles, max_plate_nesting=1)
    svi = svi_class(vae.model, vae.guide, optim, elbo)
    losses = [svi.step(x) for x in batches]
    terms = [float(elbo.recon_total), float(elbo.elbo_total)]
    return losses, terms, {name: v.clone() for name, v in vae.state_dict().items()}, elbo


@pytest.mark.parametrize("name", ["trace", "meanfield"])
@pytest.mark.parametrize("families", [
    dict(guide="normal", prior="normal", likelihood="bernoulli"),
    dict(guide="student-t", prior="laplace", likelihood="gaussian"),
    dict(guide="laplace", prior="student-t", likelihood="gaussian-fixed"),
    dict(guide="lognormal", prior="gamma", likelihood="continuous-bernoulli"),
    dict(guide="full-normal", prior="normal", likelihood="bernoulli"),
    dict(guide="iaf", prior="mog", likelihood="gaussian"),
    dict(guide="normal", prior="vamp", likelihood="bernoulli", prior_kwargs={"components": 10}),
])
def test_compiled_step_gives_the_loss_terms_and_parameters_of_plain_svi(
        binary_digits, name, families):
    """Against Pyro's own SVI step, batch sizes changing between steps: the same random
    draws, so the same losses to float rounding (the eager Trace_ELBO sums in double;
    while a graph is recorded, torch's Laplace draws u ~ U(-1, 1) as 2 rand - 1, not
    uniform_(eps - 1, 1)). Parameters agree to a thousandth of the step size, 1e-2."""
    x = binary_digits.train
    batches = [x[:64], x[64:101], x[101:165], x[165:202]]
    eager = train_steps(OBJECTIVES[name], SVI, pyro.optim.Adam({"lr": 1e-2}), batches,
                        **families)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = train_steps(COMPILED[name], FusedSVI,
                               FusedOptim(torch.optim.Adam, {"lr": 1e-2}), batches, **families)
    assert not [w for w in caught if "turned a tensor into a Python value" in str(w.message)]
    assert compiled[0] == pytest.approx(eager[0], rel=1e-6)
    assert compiled[1] == pytest.approx(eager[1], rel=1e-6)
    for param, value in eager[2].items():
        assert torch.allclose(compiled[2][param], value, rtol=0, atol=1e-5), param
    assert len(compiled[3]._graphs) == 2  # one graph per batch shape, reused


def test_compiled_step_records_again_after_the_param_store_is_cleared(binary_digits):
    x = binary_digits.train[:64]
    vae, elbo = small_vae(), make_elbo("trace", jit=True)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), elbo)
    svi.step(x)
    pyro.clear_param_store()
    pyro.set_rng_seed(5)
    eager = make_elbo("trace").loss(vae.model, vae.guide, x)  # before the step updates
    pyro.clear_param_store()
    pyro.set_rng_seed(5)
    assert svi.step(x) == pytest.approx(eager, rel=1e-6)
    assert len(elbo._graphs) == 1


class EncoderThatBranchesOnValues(torch.nn.Module):
    """A custom encoder whose Python branch depends on the data: a recorded graph
    would keep the branch taken on the first batch."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(64, 2 * 2)

    def forward(self, x):
        raw = self.net(x.reshape(x.shape[0], -1)).reshape(x.shape[0], 2, 2)
        if x.mean() > 0.5:
            raw = -raw
        return raw


def test_compiled_step_names_custom_code_that_turns_tensors_into_values(binary_digits):
    vae = small_vae(encoder=EncoderThatBranchesOnValues())
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), make_elbo("trace", jit=True))
    with pytest.warns(UserWarning, match=r"test_objectives\.py:\d+ turned a tensor into a "
                                         r"Python value \(Converting a tensor to a Python "
                                         r"boolean.*--no-jit") as caught:
        svi.step(binary_digits.train[:64])
    assert sum("turned a tensor" in str(w.message) for w in caught) == 1  # the branch alone


def test_compiled_step_with_vectorized_particles(binary_digits):
    batches = [binary_digits.train[:64]] * 3
    eager = train_steps(OBJECTIVES["trace"], SVI, pyro.optim.Adam({"lr": 1e-2}), batches,
                        num_particles=4)
    compiled = train_steps(COMPILED["trace"], SVI, pyro.optim.Adam({"lr": 1e-2}), batches,
                           num_particles=4)
    assert compiled[0] == pytest.approx(eager[0], rel=1e-6)
    assert compiled[1] == pytest.approx(eager[1], rel=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(name="iwae", num_particles=4), "only the trace and meanfield objectives"),
    (dict(name="trace", estimator="stl"), "only the reparam estimator"),
    (dict(name="meanfield", beta=0.5), "a KL weight or free bits"),
])
def test_make_elbo_refuses_to_compile_what_it_cannot(kwargs, match):
    with pytest.raises(PyrovaeError, match=f"cannot compile the step: {match}.*leave jit off"):
        make_elbo(jit=True, **kwargs)


# ---------------------------------------------------------------- trainer


def make_trainer(data, out=None, vae=None, **config):
    config = TrainConfig(binarize="static", batch_size=500, lr=3e-3, **config)
    pyro.set_rng_seed(config.seed)
    return Trainer(vae or small_vae(), data, config, out=out, progress=False)


def test_iwae_training_reports_the_true_elbo_and_the_bound(binary_digits):
    metrics = make_trainer(binary_digits, elbo="iwae", num_particles=5, estimator="dreg",
                           epochs=2).fit()
    last = metrics[-1]
    assert {"train_elbo", "test_elbo", "kl", "recon", "train_kl", "train_recon", "objective",
            "test_iwae", "seconds"} <= set(last)
    assert last["test_iwae"] > last["test_elbo"]
    assert last["objective"] > last["train_elbo"]  # the IWAE bound beats the ELBO it reports


def test_annealed_training_reports_beta_and_the_true_elbo(binary_digits):
    metrics = make_trainer(binary_digits, elbo="meanfield", beta=0.5, kl_anneal=2,
                           free_bits=0.1, epochs=3).fit()
    assert [m["beta"] for m in metrics] == pytest.approx([0.0, 0.25, 0.5])
    for m in metrics:  # objective = recon - beta * clamped KL is above the ELBO
        assert m["objective"] > m["train_elbo"]
        # train_kl is train_recon - train_elbo in float64: subtracting it back is exact to an
        # ulp or two of train_recon
        assert m["train_elbo"] == pytest.approx(m["train_recon"] - m["train_kl"], rel=1e-12)


@pytest.mark.slow
def test_aggressive_training_switches_itself_off(binary_digits, caplog):
    trainer = make_trainer(binary_digits, aggressive=True, aggressive_patience=1, epochs=8)
    with caplog.at_level(logging.INFO, logger="pyrovae"):
        metrics = trainer.fit()
    flags = [m.get("aggressive", False) for m in metrics]
    assert flags[0] and not flags[-1]
    off = flags.index(False)  # the epoch after the switch is the first plain one
    assert f"aggressive inference training off at epoch {off}: mutual information " \
           f"plateaued at" in caplog.text
    assert all("mutual_information" in m for m in metrics)


@pytest.mark.slow
def test_resume_replays_a_straight_run(binary_digits, tmp_path):
    settings = dict(aggressive=True, aggressive_patience=1, estimator="stl", kl_anneal=3,
                    free_bits=0.05, epochs=4)
    straight = make_trainer(binary_digits, out=tmp_path / "straight", **settings)
    straight.fit()
    first = make_trainer(binary_digits, out=tmp_path / "resumed", **{**settings, "epochs": 2})
    first.fit()
    resumed = Trainer.resume(tmp_path / "resumed", epochs=4, progress=False)
    resumed.fit()
    for a, b in zip(json.loads((tmp_path / "straight/metrics.json").read_text()),
                    json.loads((tmp_path / "resumed/metrics.json").read_text())):
        a.pop("seconds"), b.pop("seconds")
        assert a == b
    for (name, a), (_, b) in zip(straight.vae.state_dict().items(),
                                 resumed.vae.state_dict().items()):
        assert torch.equal(a, b), name
