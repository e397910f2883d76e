"""The VAE: building every combination, the Pyro sites, training steps, saving, bad input."""

import itertools

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI
from pyro import poutine
from torch import nn
from torch.distributions import constraints

from pyrovae import VAE, Guide, Likelihood, Prior, make_elbo
from pyrovae.errors import DataError, SupportMismatchError, UnknownNameError
from pyrovae.families import LIKELIHOODS, compatible_pairs

PAIRS = [(g, p) for g, priors in compatible_pairs().items() for p in priors]
# the families that do not factorize over z's dimensions meet the likelihoods through the
# decoder alone, as every other family does: one likelihood for each of their pairs
EXPRESSIVE = {"full-normal", "iaf", "mog", "vamp"}
COMBINATIONS = [(g, p, lik) for (g, p), lik in itertools.product(PAIRS, sorted(LIKELIHOODS))
                if not {g, p} & EXPRESSIVE or lik == "bernoulli"]


def data_for(likelihood, binary_digits, digits):
    return (binary_digits if likelihood == "bernoulli" else digits).train[:256]


def small_vae(guide="normal", prior="normal", likelihood="bernoulli", **kwargs):
    if prior in ("vamp", "mog"):  # a few components: the suites step every combination
        kwargs.setdefault("prior_kwargs", {"components": 5})
    return VAE((8, 8), z_dim=4, prior=prior, guide=guide, likelihood=likelihood,
               hidden=(64,), **kwargs)


def elbo_estimate(vae, x, particles=64):
    elbo = make_elbo("trace", num_particles=particles)
    with torch.no_grad():
        return -elbo.loss(vae.model, vae.guide, x) / len(x)


class TestBuild:
    def test_registered_pairs_cover_both_supports(self):
        assert ("normal", "normal") in PAIRS and ("lognormal", "gamma") in PAIRS
        assert ("lognormal", "normal") not in PAIRS and ("normal", "lognormal") not in PAIRS

    @pytest.mark.slow
    @pytest.mark.parametrize("guide,prior,likelihood", COMBINATIONS)
    def test_every_combination_trains(self, guide, prior, likelihood, binary_digits, digits):
        x = data_for(likelihood, binary_digits, digits)
        vae = small_vae(guide, prior, likelihood)
        before = elbo_estimate(vae, x)
        svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), make_elbo("trace"))
        for _ in range(40):
            svi.step(x)
        after = elbo_estimate(vae, x)
        # 64 particles on 256 points: the estimates' noise is far below a nat per datapoint
        assert after > before + 1.0, (before, after)

    def test_sites_and_shapes(self, binary_digits):
        vae = small_vae()
        x = binary_digits.train[:5]
        guide_trace = poutine.trace(vae.guide).get_trace(x)
        model_trace = poutine.trace(poutine.replay(vae.model, guide_trace)).get_trace(x)
        z, obs = model_trace.nodes["z"], model_trace.nodes["x"]
        assert z["fn"].event_shape == (4,) and z["fn"].batch_shape == (5,)
        assert obs["fn"].event_shape == (8, 8) and obs["fn"].batch_shape == (5,)
        assert obs["is_observed"] and torch.equal(obs["value"], x)
        assert [f.name for f in z["cond_indep_stack"]] == ["data"]
        params = {n for n, s in model_trace.nodes.items() if s["type"] == "param"}
        assert any(n.startswith("decoder$$$") for n in params)
        guide_params = {n for n, s in guide_trace.nodes.items() if s["type"] == "param"}
        assert any(n.startswith("encoder$$$") for n in guide_params)

    def test_learnable_families_are_registered_with_pyro(self):
        vae = small_vae("student-t", "normal", "gaussian", prior_kwargs={"learnable": True})
        x = torch.rand(3, 8, 8)
        names = set(poutine.trace(vae.model).get_trace(x).param_nodes)
        names |= set(poutine.trace(vae.guide).get_trace(x).param_nodes)
        assert {"prior$$$loc_unconstrained", "prior$$$scale_unconstrained",
                "likelihood$$$scale_unconstrained",
                "guide_family$$$df_unconstrained"} <= names

    def test_vectorized_particles_broadcast(self, binary_digits):
        vae = small_vae("student-t", "laplace")
        loss = make_elbo("meanfield", num_particles=7).loss(
            vae.model, vae.guide, binary_digits.train[:9])
        assert torch.isfinite(torch.tensor(loss))

    def test_float64_data_builds_float64_prior(self):
        vae = small_vae().double()
        x = torch.bernoulli(torch.full((4, 8, 8), 0.5, dtype=torch.float64))
        trace = poutine.trace(vae.model).get_trace(x)
        assert trace.nodes["z"]["value"].dtype == torch.float64


class TestBadInput:
    def test_unknown_names(self):
        for kwargs, word in [({"prior": "cauchy"}, "prior"), ({"guide": "gamma"}, "guide"),
                             ({"likelihood": "poisson"}, "likelihood")]:
            with pytest.raises(UnknownNameError, match=f"unknown {word}.*known {word}s are"):
                small_vae(**{"prior": "normal", **kwargs})
        with pytest.raises(UnknownNameError, match="activation"):
            small_vae(activation="swishy")

    @pytest.mark.parametrize("guide,prior", [("lognormal", "normal"), ("normal", "lognormal"),
                                             ("student-t", "gamma")])
    def test_support_mismatch_lists_working_combinations(self, guide, prior):
        with pytest.raises(SupportMismatchError) as err:
            small_vae(guide, prior)
        message = str(err.value)
        assert "must match" in message and "guide 'lognormal' with prior" in message
        assert "'gamma'" in message and "'laplace'" in message

    def test_wrong_shape(self):
        vae = small_vae()
        with pytest.raises(DataError, match=r"shape \(4, 64\).*\(N, 8, 8\)"):
            vae.check_data(torch.zeros(4, 64))
        with pytest.raises(DataError, match="shape"):
            vae.model(torch.zeros(4, 7, 8))

    def test_grey_values_for_bernoulli(self, digits):
        with pytest.raises(DataError, match="--binarize.*continuous-bernoulli"):
            small_vae().check_data(digits.train)

    def test_values_outside_unit_interval(self):
        with pytest.raises(DataError, match="outside"):
            small_vae(likelihood="continuous-bernoulli").check_data(torch.full((2, 8, 8), 1.5))

    def test_nan(self):
        x = torch.zeros(3, 8, 8)
        x[1, 2, 3] = float("nan")
        with pytest.raises(DataError, match="1 NaN or infinite"):
            small_vae(likelihood="gaussian").check_data(x)

    def test_parameter_outside_support(self):
        with pytest.raises(ValueError, match="scale.*outside its support"):
            small_vae(prior_kwargs={"scale": -1.0})
        with pytest.raises(UnknownNameError, match="no parameter"):
            small_vae(prior_kwargs={"sigma": 1.0})

    def test_student_t_df_floor(self):
        with pytest.raises(ValueError, match="min_df"):
            small_vae("student-t", guide_kwargs={"df": 2.0})


class TestSaveLoad:
    def test_roundtrip(self, tmp_path, binary_digits):
        vae = small_vae("student-t", "laplace", "gaussian",
                        prior_kwargs={"learnable": True, "scale": 2.0},
                        likelihood_kwargs={"sigma": "per-datapoint"})
        vae.save(tmp_path)
        loaded = VAE.load(tmp_path)
        assert loaded.config == vae.config
        for (name, a), (_, b) in zip(vae.state_dict().items(), loaded.state_dict().items()):
            assert torch.equal(a, b), name
        x = binary_digits.test[:4]
        torch.manual_seed(1)
        r1 = vae.reconstruct(x)
        torch.manual_seed(1)
        assert torch.equal(r1, loaded.reconstruct(x))

    def test_custom_network_must_be_passed_again(self, tmp_path):
        decoder = nn.Sequential(nn.Linear(4, 64), nn.Unflatten(-1, (1, 8, 8)))
        vae = small_vae(decoder=decoder)
        vae.save(tmp_path)
        with pytest.raises(ValueError, match="custom decoder.*pass it again"):
            VAE.load(tmp_path)
        loaded = VAE.load(tmp_path, decoder=nn.Sequential(nn.Linear(4, 64),
                                                          nn.Unflatten(-1, (1, 8, 8))))
        assert torch.equal(loaded.decoder[0].weight, decoder[0].weight)


# ---------------------------------------------------------------- custom parts
# The short examples of docs/families.md; MixturePrior is the registered mog prior's
# shape, written as a user's own, unregistered prior.


class MixturePrior(Prior):
    """A learnable mixture of Gaussians: no closed-form KL, so Monte Carlo is used."""

    name = "mixture"

    def __init__(self, z_dim, components=3):
        super().__init__(z_dim)
        self._settings = {"components": components}
        self.locs = nn.Parameter(torch.randn(components, z_dim))
        self.log_scales = nn.Parameter(torch.zeros(components, z_dim))
        self.logits = nn.Parameter(torch.zeros(components))

    def forward(self, like):
        mix = dist.Categorical(logits=self.logits)
        comp = dist.Normal(self.locs, self.log_scales.exp()).to_event(1)
        return dist.MixtureSameFamily(mix, comp)


class GumbelGuide(Guide):
    name = "gumbel"

    def make_dist(self, loc, scale):
        return dist.Gumbel(loc, scale)


class LaplaceLikelihood(Likelihood):
    name = "laplace-pixels"
    support = constraints.real

    def make_dist(self, loc):
        return dist.Laplace(loc, 0.1)


class TestCustomParts:
    def train_a_little(self, vae, x, steps=40):
        before = elbo_estimate(vae, x)
        svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), make_elbo("trace"))
        for _ in range(steps):
            svi.step(x)
        return before, elbo_estimate(vae, x)

    def test_custom_prior(self, binary_digits):
        vae = small_vae(prior=MixturePrior(4))
        before, after = self.train_a_little(vae, binary_digits.train[:128])
        assert after > before + 1.0
        assert vae.prior.locs.grad is not None  # learned through pyro.module

    def test_custom_guide_family(self, binary_digits):
        vae = small_vae(guide=GumbelGuide(4))
        before, after = self.train_a_little(vae, binary_digits.train[:128])
        assert after > before + 1.0

    def test_custom_likelihood(self, digits):
        vae = small_vae(likelihood=LaplaceLikelihood((8, 8)))
        before, after = self.train_a_little(vae, digits.train[:128])
        assert after > before + 1.0

    def test_custom_encoder_and_decoder(self, binary_digits):
        class ConvEncoder(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(1, 8, 3, padding=1)
                self.out = nn.Linear(8 * 64, 2 * 4)

            def forward(self, x):
                h = torch.relu(self.conv(x.unsqueeze(-3))).flatten(-3)
                return self.out(h).unflatten(-1, (2, 4))

        decoder = nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 64),
                                nn.Unflatten(-1, (1, 8, 8)))
        vae = small_vae(encoder=ConvEncoder(), decoder=decoder)
        before, after = self.train_a_little(vae, binary_digits.train[:128])
        assert after > before + 1.0

    def test_custom_family_saved_as_custom(self, tmp_path):
        vae = small_vae(prior=MixturePrior(4))
        assert vae.config["prior"] == {"name": "mixture", "custom": True}
        vae.save(tmp_path)
        with pytest.raises(ValueError, match="custom prior"):
            VAE.load(tmp_path)
        assert isinstance(VAE.load(tmp_path, prior=MixturePrior(4)).prior, MixturePrior)
