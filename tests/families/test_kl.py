"""Every analytic KL pyrovae uses, torch's and its own, against Monte Carlo."""

import math
from pathlib import Path

import pytest
import torch
from scipy import integrate, stats
from torch.distributions import Independent, kl_divergence

import pyrovae  # noqa: F401  (registers pyrovae.families.kl)
from pyrovae.families import GUIDES, PRIORS, compatible_pairs
from pyrovae.objectives import kl_methods, kl_table
from pyrovae.vae import VAE

Z_DIM = 4  # each latent dimension gets its own random parameters
NUM_SAMPLES = 10**6
NUM_SE = 4.0

# (guide, prior) pairs with a closed form; the rest of compatible_pairs() is Monte Carlo.
ANALYTIC = {
    ("normal", "normal"), ("normal", "laplace"), ("laplace", "normal"),
    ("laplace", "laplace"), ("lognormal", "lognormal"),
    ("student-t", "normal"), ("lognormal", "gamma"), ("lognormal", "exponential"),
    ("full-normal", "normal"),
}


def uniform(low, high, generator):
    return low + (high - low) * torch.rand(Z_DIM, generator=generator)


def random_prior(name, generator):
    values = {
        "normal": lambda: dict(loc=uniform(-1, 1, generator), scale=uniform(0.5, 2, generator)),
        "laplace": lambda: dict(loc=uniform(-1, 1, generator), scale=uniform(0.5, 2, generator)),
        "student-t": lambda: dict(df=uniform(3, 10, generator), loc=uniform(-1, 1, generator),
                                  scale=uniform(0.5, 2, generator)),
        "lognormal": lambda: dict(loc=uniform(-1, 1, generator), scale=uniform(0.5, 1.5, generator)),
        "gamma": lambda: dict(concentration=uniform(0.5, 3, generator),
                              rate=uniform(0.5, 2, generator)),
        "exponential": lambda: dict(rate=uniform(0.5, 2, generator)),
        "mog": dict, "vamp": dict,  # random by construction; vamp's encoder is attached below
    }[name]()
    prior = PRIORS[name](Z_DIM, **values).eval()
    normal = GUIDES["normal"](Z_DIM)
    prior.attach(lambda u: normal(torch.randn(len(u), 2, Z_DIM, generator=generator)),
                 x_shape=(1,), data_support=prior.support)
    return prior(torch.zeros(1))


def random_guide(name, generator):
    """q built by the registered guide family from random encoder outputs."""
    guide = GUIDES[name](Z_DIM)
    if name == "student-t":  # df > 4: the Monte Carlo estimate of E[z^2] needs a finite variance
        guide = GUIDES[name](Z_DIM, learn_df=False)
        guide.df_fixed = uniform(5, 15, generator)
    raw = torch.randn(guide.raw_shape, generator=generator)
    return guide(raw)


def per_dimension(q, p):
    """The per-dimension distributions where both factorize (a KL per latent dimension),
    else q and p whole (one KL)."""
    if isinstance(q, Independent) and isinstance(p, Independent):
        return q.base_dist, p.base_dist
    return q, p


def monte_carlo_kl(q, p):
    """Mean and standard error of log q(z) - log p(z), z ~ q, per latent dimension (or for
    the whole z where q or p does not factorize)."""
    z = q.sample((NUM_SAMPLES,))
    terms = (q.log_prob(z) - p.log_prob(z)).double()
    return terms.mean(0), terms.std(0) / math.sqrt(NUM_SAMPLES)


def all_pairs():
    return [(g, p) for g, priors in compatible_pairs().items() for p in priors]


def test_the_analytic_pairs_are_exactly_the_expected_ones():
    generator = torch.Generator().manual_seed(0)
    analytic = set()
    for guide, prior in all_pairs():
        try:
            kl_divergence(random_guide(guide, generator), random_prior(prior, generator))
            analytic.add((guide, prior))
        except NotImplementedError:
            pass
    assert analytic == ANALYTIC


@pytest.mark.parametrize("guide,prior", sorted(ANALYTIC))
def test_analytic_kl_matches_monte_carlo(guide, prior):
    generator = torch.Generator().manual_seed(1)
    torch.manual_seed(2)
    for _ in range(2):  # two random parameter sets of Z_DIM dimensions each
        q, p = per_dimension(random_guide(guide, generator), random_prior(prior, generator))
        kl = kl_divergence(q, p).double()
        mean, se = monte_carlo_kl(q, p)
        assert kl.shape == ((Z_DIM,) if guide != "full-normal" else ())
        assert torch.all((kl - mean).abs() < NUM_SE * se), (kl, mean, se)


def test_studentt_normal_is_infinite_for_df_at_most_two():
    df = torch.tensor([0.5, 1.0, 2.0, 2.5], requires_grad=True)
    q = torch.distributions.StudentT(df, torch.zeros(4), torch.ones(4))
    kl = kl_divergence(q, torch.distributions.Normal(0.0, 1.0))
    assert torch.isinf(kl[:3]).all() and torch.isfinite(kl[3])
    kl[3].backward()
    assert torch.isfinite(df.grad).all()  # the infinite branch leaks no nan into gradients


@pytest.mark.parametrize("df", [2.2, 3.0, 4.0])
def test_studentt_normal_matches_quadrature_where_monte_carlo_is_unreliable(df):
    # for 2 < df <= 4 the variance of log p(z) is infinite, so check by quadrature instead
    loc, scale, p_loc, p_scale = 0.3, 0.8, -0.5, 1.7
    q = stats.t(df, loc, scale)
    p = stats.norm(p_loc, p_scale)
    integrand = lambda z: q.pdf(z) * (q.logpdf(z) - p.logpdf(z))  # noqa: E731
    expected, _ = integrate.quad(integrand, -math.inf, math.inf, limit=500)
    kl = kl_divergence(torch.distributions.StudentT(torch.tensor(df), loc, scale),
                       torch.distributions.Normal(torch.tensor(p_loc), p_scale))
    assert float(kl) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("guide,prior,kwargs", [
    ("student-t", "normal", {}), ("lognormal", "gamma", {}), ("lognormal", "exponential", {}),
    ("full-normal", "normal", {}),
])
def test_trace_mean_field_uses_pyrovaes_closed_forms(guide, prior, kwargs):
    vae = VAE((8, 8), z_dim=3, hidden=(8,), guide=guide, prior=prior, guide_kwargs=kwargs)
    sites = kl_methods(vae.model, vae.guide, torch.zeros(2, 8, 8))
    assert [site.analytic for site in sites] == [True]


def test_kl_table_marks_every_compatible_pair():
    table = kl_table()
    for guide, prior in all_pairs():
        method = "analytic" if (guide, prior) in ANALYTIC else "Monte Carlo"
        assert f"| {guide} | {prior} | {method}" in table


def test_the_docs_hold_the_current_table():
    docs = Path(__file__).parents[2] / "docs" / "objectives.md"
    assert kl_table() in docs.read_text()
