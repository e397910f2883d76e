import dataclasses
import math

import matplotlib.image
import numpy as np
import pytest
import scipy.optimize
import scipy.stats
import torch

from pyrovae.cli import main
from pyrovae.errors import PyrovaeError
from pyrovae.plots import (
    FIGURE_FILES,
    QUANTILE_SAMPLES,
    pixel_size,
    plot_latent_bubbles,
    plot_manifold,
    plot_time_to_quality,
    prior_quantiles,
    save,
    write_figures,
)
from pyrovae.training import Trainer, TrainConfig
from pyrovae.vae import VAE


def assert_figures(paths, names):
    assert sorted(p.name for p in paths) == sorted(FIGURE_FILES[n] for n in names)
    for path in paths:
        height, width = matplotlib.image.imread(path).shape[:2]
        assert (width, height) == pixel_size(path.stem), path.name


def test_plot_command_writes_every_figure_of_a_trained_2d_run(binary_digits, tmp_path):
    run = tmp_path / "run"
    vae = VAE(binary_digits.x_shape, z_dim=2, hidden=(64,))
    config = TrainConfig(epochs=2, batch_size=500, device="cpu", binarize="static")
    Trainer(vae, binary_digits, config, out=run, progress=False).fit()
    assert main(["plot", str(run)]) == 0
    assert_figures(sorted(run.glob("*.png")), FIGURE_FILES)


def test_figures_for_a_larger_latent_without_labels_or_metrics(digits, tmp_path):
    unlabelled = dataclasses.replace(digits, train_labels=None, test_labels=None)
    vae = VAE(digits.x_shape, z_dim=5, likelihood="continuous-bernoulli", hidden=(32,))
    written = write_figures(tmp_path, vae, unlabelled, metrics=None)
    # no manifold (z_dim != 2), no training curves (no metrics); PCA for the scatter
    assert_figures(written, ["reconstructions", "prior_samples", "interpolation",
                             "latent_scatter", "kl_per_dim", "latent_bubbles"])


def test_figures_for_a_one_dimensional_latent(digits, tmp_path):
    vae = VAE(digits.x_shape, z_dim=1, prior="laplace", guide="laplace", likelihood="gaussian",
              hidden=(32,))
    assert_figures(write_figures(tmp_path, vae, digits), ["reconstructions", "prior_samples",
                   "interpolation", "latent_scatter", "kl_per_dim"])


def test_manifold_needs_a_2d_latent(digits):
    with pytest.raises(PyrovaeError, match="z_dim=2"):
        plot_manifold(VAE(digits.x_shape, z_dim=3))


LEVELS = torch.tensor([0.05, 0.5, 0.95])


@pytest.mark.parametrize("prior, kwargs, frozen", [
    ("normal", {"loc": 1.0, "scale": 2.0}, scipy.stats.norm(1.0, 2.0)),
    ("lognormal", {}, scipy.stats.lognorm(1.0)),
    ("exponential", {"rate": 2.0}, scipy.stats.expon(scale=0.5)),
])
def test_prior_quantiles_are_exact_through_icdf(prior, kwargs, frozen):
    exact = frozen.ppf(LEVELS.numpy())
    vae = VAE((4,), z_dim=2, prior=prior, prior_kwargs=kwargs,
              guide="lognormal" if prior != "normal" else "normal", likelihood="gaussian-fixed")
    quantiles, method = prior_quantiles(vae, LEVELS)
    assert method == "exact"
    expected = torch.as_tensor(exact, dtype=torch.float32).unsqueeze(-1).expand(3, 2)
    # float32 icdf: rounding its level transform (2u - 1, 1 - u) by up to eps32 moves the
    # quantile by eps32 / density; its own few operations and the cast add a few ulp of it
    tol = torch.finfo(torch.float32).eps * (1 / frozen.pdf(exact) + 8 * abs(exact))
    tol = torch.as_tensor(tol, dtype=torch.float32).unsqueeze(-1).expand(3, 2)
    assert ((quantiles - expected).abs() <= tol).all(), (quantiles, expected, tol)


@pytest.mark.parametrize("prior, kwargs, frozen", [
    ("student-t", {"df": 3.0}, scipy.stats.t(3.0)),
    ("gamma", {"concentration": 2.0, "rate": 1.0}, scipy.stats.gamma(2.0)),
])
def test_prior_quantiles_from_draws_where_torch_has_no_icdf(prior, kwargs, frozen):
    guide = "normal" if prior == "student-t" else "lognormal"
    vae = VAE((4,), z_dim=2, prior=prior, prior_kwargs=kwargs, guide=guide,
              likelihood="gaussian-fixed")
    quantiles, method = prior_quantiles(vae, LEVELS)
    assert method.startswith("from")
    # SE of a sample quantile: sqrt(u (1 - u) / n) / density at the quantile
    levels = LEVELS.numpy()
    exact = frozen.ppf(levels)
    se = (levels * (1 - levels) / QUANTILE_SAMPLES) ** 0.5 / frozen.pdf(exact)
    for dim in range(2):
        assert (abs(quantiles[:, dim].numpy() - exact) < 5 * se).all(), (quantiles, exact, se)
    assert math.isfinite(float(quantiles.sum()))


def test_prior_quantiles_of_a_mixture_are_its_marginals():
    vae = VAE((4,), z_dim=2, prior="mog", prior_kwargs={"components": 2},
              likelihood="gaussian-fixed")
    with torch.no_grad():  # two components, apart in the first dimension only
        vae.prior.locs.copy_(torch.tensor([[-2.0, 0.0], [2.0, 0.0]]))
        vae.prior.scale_unconstrained.fill_(0.0)  # softplus(0) + min_scale for every scale
    scale = math.log(2.0) + vae.prior.min_scale
    quantiles, method = prior_quantiles(vae, LEVELS)
    assert method.startswith("marginals from")
    levels = LEVELS.numpy()

    def mixture_cdf(v):
        return 0.5 * (scipy.stats.norm.cdf(v, -2, scale) + scipy.stats.norm.cdf(v, 2, scale))

    def mixture_pdf(v):
        return 0.5 * (scipy.stats.norm.pdf(v, -2, scale) + scipy.stats.norm.pdf(v, 2, scale))

    first = np.array([scipy.optimize.brentq(lambda v: mixture_cdf(v) - u, -10, 10)
                      for u in levels])
    second = scipy.stats.norm.ppf(levels, 0, scale)
    for dim, exact, pdf in ((0, first, mixture_pdf(first)),
                            (1, second, scipy.stats.norm.pdf(second, 0, scale))):
        # SE of a sample quantile: sqrt(u (1 - u) / n) / density at the quantile
        se = (levels * (1 - levels) / QUANTILE_SAMPLES) ** 0.5 / pdf
        assert (abs(quantiles[:, dim].numpy() - exact) < 5 * se).all(), (dim, quantiles, exact)


@pytest.mark.parametrize("guide,prior", [("full-normal", "normal"), ("iaf", "mog"),
                                         ("iaf", "vamp")])
def test_every_figure_of_a_2d_latent_with_the_expressive_families(binary_digits, tmp_path,
                                                                  guide, prior):
    vae = VAE(binary_digits.x_shape, z_dim=2, guide=guide, prior=prior, hidden=(32,),
              prior_kwargs={"components": 5} if prior != "normal" else None).eval()
    written = write_figures(tmp_path, vae, binary_digits)
    # no KL per dimension: q or p does not factorize over dimensions
    assert_figures(written, ["reconstructions", "prior_samples", "interpolation",
                             "latent_scatter", "manifold", "latent_bubbles"])


# ---------------------------------------------------------------- latent bubbles


def test_bubble_ellipse_is_the_mahalanobis_contour_of_its_covariance():
    from pyrovae.plots import _ellipse

    cov = np.array([[2.0, 1.2], [1.2, 1.0]])  # tilted: off-diagonal covariance
    centre = np.array([0.5, -1.0])
    for radius in (1.0, 2.0):
        angles = np.linspace(0, 2 * np.pi, 50)
        unit_circle = np.stack([np.cos(angles), np.sin(angles)], -1)
        # the patch maps the unit circle onto its ellipse
        points = _ellipse(centre, cov, radius).get_patch_transform().transform(unit_circle)
        offsets = points - centre
        distance = np.sqrt(np.einsum("ni,ij,nj->n", offsets, np.linalg.inv(cov), offsets))
        # float64 eigh of a 2x2 matrix of condition ~14 and one affine map: errors near 1e-15
        assert np.allclose(distance, radius, rtol=1e-9, atol=0)


def test_bubbles_of_a_diagonal_guide_in_2d_are_axis_aligned_with_its_scales(digits):
    from matplotlib.patches import Ellipse

    vae = VAE(digits.x_shape, z_dim=2, hidden=(16,))
    fig = plot_latent_bubbles(vae, digits.test, digits.test_labels, seed=3, points=5)
    ellipses = [p for p in fig.axes[0].patches if isinstance(p, Ellipse)]
    assert len(ellipses) == 2 * 5
    chosen = torch.randperm(len(digits.test), generator=torch.Generator().manual_seed(3))[:5]
    with torch.no_grad():
        scale = vae.encode(digits.test[chosen]).base_dist.scale.double().numpy()
    for i, radius in ((i, r) for i in range(5) for r in (1, 2)):
        patch = ellipses[2 * i + (radius - 1)]
        # axis-aligned: the major axis is along z1 or z2, and the widths are 2 r sigma
        assert patch.angle % 90 == pytest.approx(0, abs=1e-6) or \
            patch.angle % 90 == pytest.approx(90, abs=1e-6)
        axes = sorted([patch.width, patch.height])
        assert np.allclose(axes, sorted(2 * radius * scale[i]), rtol=1e-5)
    assert fig.axes[0].get_xlabel() == "z1"


def test_bubbles_of_a_larger_latent_are_drawn_in_the_principal_plane(digits):
    vae = VAE(digits.x_shape, z_dim=6, prior="laplace", guide="laplace", hidden=(16,))
    fig = plot_latent_bubbles(vae, digits.test, None, points=4)
    ax = fig.axes[0]
    assert ax.get_xlabel().startswith("PC1 of the posterior means")
    assert "draws of q(z|x)" in ax.get_title() and "kernel density" in ax.get_title()


def test_bubbles_need_two_latent_dimensions(digits):
    with pytest.raises(PyrovaeError, match="z_dim >= 2"):
        plot_latent_bubbles(VAE(digits.x_shape, z_dim=1), digits.test)


def test_time_to_quality_draws_each_runs_nll_bound_against_minutes(tmp_path):
    curves = {"a": [{"train_seconds": 60.0, "test_iwae_bound": -95.0},
                    {"train_seconds": 120.0, "test_iwae_bound": -90.0}],
              "b": [{"train_seconds": 30.0, "test_iwae_bound": -99.0}]}
    fig = plot_time_to_quality(curves, 86.76, "paper")
    lines = fig.axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["a", "b", "paper"]
    np.testing.assert_array_equal(lines[0].get_xdata(), [1.0, 2.0])  # minutes
    assert fig.axes[0].get_xscale() == "log"  # a few GPU minutes beside a CPU hour
    np.testing.assert_array_equal(lines[0].get_ydata(), [95.0, 90.0])  # -bound: NLL bound
    assert list(lines[2].get_ydata()) == [86.76, 86.76]
    save(fig, tmp_path / "time_to_quality.png")
    height, width = matplotlib.image.imread(tmp_path / "time_to_quality.png").shape[:2]
    assert (width, height) == pixel_size("time_to_quality")
    with pytest.raises(PyrovaeError, match="--iwae-every"):
        plot_time_to_quality({"a": []})


def test_tabular_data_gets_the_latent_figures_and_no_pictures(tmp_path, capsys):
    rows = np.random.default_rng(0).normal(size=(200, 6)).astype("float32")
    np.save(tmp_path / "table.npy", rows)
    out = tmp_path / "run"
    assert main(["train", "--dataset", str(tmp_path / "table.npy"), "--likelihood", "gaussian",
                 "--epochs", "1", "--z-dim", "2", "--out", str(out), "--no-progress"]) == 0
    assert "figures failed" not in capsys.readouterr().out
    names = ["latent_scatter", "kl_per_dim", "latent_bubbles", "training_curves"]
    assert_figures([out / FIGURE_FILES[n] for n in names], names)
    assert sorted(p.name for p in out.glob("*.png")) == sorted(FIGURE_FILES[n] for n in names)
