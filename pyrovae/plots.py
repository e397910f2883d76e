"""Every figure of pyrovae: matplotlib PNGs with fixed names and pixel sizes.

``write_figures(run_folder, vae, dataset, metrics)`` writes a run's figures;
the evaluation's two (``plot_khat``, ``plot_iwae_bounds``) are written by
``pyrovae.pipelines``. Each ``plot_*`` function returns one ``Figure``. File
names, sizes and contents are listed in ``docs/figures.md``. Every figure is
``FIGURE_SIZES[name]`` inches at ``DPI`` dots per inch, saved without
``bbox_inches="tight"`` so that its size in pixels is fixed.

The figures are ``matplotlib.figure.Figure`` objects, never pyplot's: they
render with Agg whatever the backend, so importing pyrovae in a notebook
leaves the user's backend and open figures alone.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import scipy.stats
import torch
from matplotlib.figure import Figure
from torchvision.utils import make_grid

from pyrovae.atomic import atomic_write
from pyrovae.collapse import factorizes, kl_per_dim, layer_kl_per_dim
from pyrovae.data import is_image_shape
from pyrovae.errors import PyrovaeError
from pyrovae.evaluation.diagnostics import import_arviz
from pyrovae.evaluation.marginal import KHAT_THRESHOLD, MIN_SAMPLES_FOR_KHAT
from pyrovae.vae import posterior_centre

DPI = 100
FIGURE_SIZES = {  # inches; pixels are these times DPI
    "reconstructions": (6, 6),
    "prior_samples": (6, 6),
    "interpolation": (8, 6),
    "manifold": (6, 6),
    "latent_scatter": (6, 6),
    "training_curves": (12, 4),
    "kl_per_dim": (6, 4),
    "latent_bubbles": (7, 6),
}
FIGURE_FILES = {name: f"{name}.png" for name in FIGURE_SIZES}
EVALUATION_FIGURE_SIZES = {"evaluation_khat": (7, 4), "evaluation_iwae_bound": (6, 4)}
KHAT_FIGURE, IWAE_FIGURE = (f"{name}.png" for name in EVALUATION_FIGURE_SIZES)
# across runs: benchmarks/reproduce.py draws it from several runs' metrics
COMPARISON_FIGURE_SIZES = {"time_to_quality": (7, 4.5)}
ALL_FIGURE_SIZES = {**FIGURE_SIZES, **EVALUATION_FIGURE_SIZES, **COMPARISON_FIGURE_SIZES}

GRID_COLUMNS = 8
INTERPOLATION_PAIRS = 6
INTERPOLATION_STEPS = 10
MANIFOLD_SIZE = 15
MANIFOLD_QUANTILES = (0.05, 0.95)  # the outer quantiles: the tails decode to little
QUANTILE_SAMPLES = 100_000
ENCODE_BATCH = 1000
GRID_LINE_WIDTH = 1  # pixels of the image, between tiles
GRID_LINE_COLOUR = (0.55, 0.7, 0.9)  # RGB: light blue, neither white nor black


def pixel_size(name: str) -> tuple[int, int]:
    """(width, height) in pixels of the figure ``name``."""
    width, height = ALL_FIGURE_SIZES[name]
    return round(width * DPI), round(height * DPI)


def write_figures(run_folder, vae, dataset, metrics: list[dict] | None = None,
                  seed: int = 0) -> list[Path]:
    """Write every figure that applies into ``run_folder``; return their paths.

    The pictures of data (reconstructions, prior samples, interpolation, manifold)
    need image data (``is_image_shape``: not tabular rows); the manifold a 2-D
    latent, and the KL per dimension a prior and guide
    that factorize over dimensions; the training curves need
    ``metrics`` (the list in metrics.json). The test images to show are chosen with ``seed``;
    prior draws use a private RNG stream seeded with it too.
    """
    folder = Path(run_folder)
    folder.mkdir(parents=True, exist_ok=True)
    images = is_image_shape(vae.x_shape)
    figures = {
        "reconstructions": lambda: plot_reconstructions(vae, dataset.test, seed),
        "prior_samples": lambda: plot_prior_samples(vae, seed),
        "interpolation": lambda: plot_interpolation(vae, dataset.test, seed),
    } if images else {}
    figures["latent_scatter"] = lambda: plot_latent_scatter(vae, dataset.test,
                                                            dataset.test_labels)
    with vae.evaluating():
        factorized = factorizes(vae.prior_distribution()) and factorizes(
            vae.encode(dataset.test[:2].to(vae.device)))
    if factorized:
        figures["kl_per_dim"] = lambda: plot_kl_per_dim(vae, dataset.test, seed)
    # with several stochastic layers, q(z1|x) has no p(z1) in closed form to set it against
    one_layer = len(getattr(vae, "sites", "z")) == 1
    if images and one_layer and vae.z_dim == 2:  # the prior's quantiles: any prior and guide
        figures["manifold"] = lambda: plot_manifold(vae)
    if one_layer and vae.z_dim >= 2:
        figures["latent_bubbles"] = lambda: plot_latent_bubbles(
            vae, dataset.test, dataset.test_labels, seed)
    if metrics:
        figures["training_curves"] = lambda: plot_training_curves(metrics)
    written = []
    for name, make in figures.items():
        path = folder / FIGURE_FILES[name]
        save(make(), path)
        written.append(path)
    return written


def save(fig: Figure, path) -> None:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=DPI))


def _figure(name: str, **kwargs) -> Figure:
    return Figure(figsize=ALL_FIGURE_SIZES[name], dpi=DPI, **kwargs)


# ---------------------------------------------------------------- image grids


def plot_reconstructions(vae, x: torch.Tensor, seed: int = 0, rows: int = 4) -> Figure:
    """Rows of test inputs, each over the row of their reconstructions."""
    k = rows * GRID_COLUMNS
    chosen = x[_choose(len(x), k, seed, replacement=len(x) < k)].cpu()
    with vae.evaluating():
        recon = vae.reconstruct(chosen.to(vae.device)).cpu()
    pairs = torch.stack([chosen.reshape(rows, GRID_COLUMNS, *chosen.shape[1:]),
                         recon.reshape(rows, GRID_COLUMNS, *recon.shape[1:])], dim=1)
    return _image_figure("reconstructions", pairs.flatten(0, 2), GRID_COLUMNS,
                         "test inputs (odd rows) over their reconstructions")


def plot_prior_samples(vae, seed: int = 0, n: int = 64) -> Figure:
    """The mean image of p(x|z) for z drawn from the prior."""
    with vae.evaluating(seed):
        images = vae.sample(n).cpu()
    sites = getattr(vae, "sites", ("z",))
    title = "mean of p(x|z), z ~ p(z)" if len(sites) == 1 else (
        f"mean of p(x|{sites[0]}): top layer {sites[-1]} ~ p({sites[-1]}), then each layer "
        f"down to {sites[0]} from p(z_l|z_l+1)")
    return _image_figure("prior_samples", images, GRID_COLUMNS, title)


def plot_interpolation(vae, x: torch.Tensor, seed: int = 0, pairs: int = INTERPOLATION_PAIRS,
                       steps: int = INTERPOLATION_STEPS) -> Figure:
    """For random pairs of test images (chosen by ``seed``): each row shows the
    first image, the decoded straight line between their encodings, and the second."""
    if len(x) < 2:
        raise PyrovaeError("interpolation needs at least 2 test images.")
    chosen = x[_choose(len(x), 2 * pairs, seed, replacement=len(x) < 2 * pairs)].cpu()
    with vae.evaluating():
        z = posterior_centre(vae.encode(chosen, ENCODE_BATCH)).reshape(pairs, 2, -1)
        weight = torch.linspace(0, 1, steps, device=vae.device).reshape(1, steps, 1)
        line = (1 - weight) * z[:, :1] + weight * z[:, 1:]
        decoded = vae.decode_mean(line).cpu()
    ends = chosen.reshape(pairs, 2, *chosen.shape[1:])
    rows = torch.cat([ends[:, :1], decoded, ends[:, 1:]], dim=1)
    return _image_figure("interpolation", rows.flatten(0, 1), steps + 2,
                         "linear interpolation between encoded test images (ends: inputs)")


def plot_manifold(vae, size: int = MANIFOLD_SIZE) -> Figure:
    """The decoded 2-D latent space over a grid of prior quantiles (Kingma & Welling 2014,
    figure 4): column j, row i decodes z = (F1^-1(u_j), F2^-1(u_i)), with u from
    0.05 to 0.95 and the second coordinate increasing upwards."""
    if vae.z_dim != 2:
        raise PyrovaeError(f"the manifold figure needs z_dim=2, but this VAE has z_dim="
                           f"{vae.z_dim}; the latent scatter works for any z_dim.")
    with vae.evaluating(seed=0):
        levels = torch.linspace(*MANIFOLD_QUANTILES, size, device=vae.device)
        quantiles, method = prior_quantiles(vae, levels)  # (size, 2)
        z1, z2 = torch.meshgrid(quantiles[:, 0], quantiles[:, 1].flip(0), indexing="xy")
        z = torch.stack([z1, z2], dim=-1).reshape(-1, 2)
        images = vae.decode_mean(z).cpu()
    return _image_figure("manifold", images, size,
                         f"p(x|z) mean over prior quantiles {MANIFOLD_QUANTILES} ({method})")


def prior_quantiles(vae, levels: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Quantiles of each latent dimension's prior at ``levels``: (len(levels), z_dim).

    Exact through ``icdf`` where torch has it (Normal, Laplace, Exponential, and
    LogNormal through its transform); otherwise (StudentT, Gamma) estimated by
    sorting QUANTILE_SAMPLES prior draws, as torch has no inverse CDF for them. A
    prior that does not factorize (a mixture) gives each dimension's marginal
    quantiles, from QUANTILE_SAMPLES draws of the whole z.
    """
    prior = vae.prior_distribution()
    if not factorizes(prior):
        draws = prior.sample((QUANTILE_SAMPLES,))
        return (torch.quantile(draws, levels, dim=0),
                f"marginals from {QUANTILE_SAMPLES} draws")
    base = prior.base_dist
    try:
        return base.icdf(levels.unsqueeze(-1)), "exact"
    except NotImplementedError:
        draws = base.sample((QUANTILE_SAMPLES,))
        return torch.quantile(draws, levels, dim=0), f"from {QUANTILE_SAMPLES} draws"


def _image_figure(name: str, images: torch.Tensor, columns: int, title: str) -> Figure:
    return _draw_grid(name, image_grid(images, columns), title)


def image_grid(images: torch.Tensor, columns: int) -> torch.Tensor:
    """The (H', W', 3) RGB grid of ``images`` (values clamped to [0, 1]), ``columns`` a row,
    the tiles separated by lines of ``GRID_LINE_COLOUR``. The lines are coloured, not white
    or black, so that a white or black pixel at a tile's edge (the stroke of a binary digit)
    is not taken for the border, nor the border for a stroke."""
    tiles = _as_channels(images.cpu()).clamp(0, 1)
    grid = make_grid(tiles, nrow=columns, padding=GRID_LINE_WIDTH, pad_value=-1.0)
    border = grid[0] < 0  # no pixel is below 0 after the clamp
    colour = torch.tensor(GRID_LINE_COLOUR, dtype=grid.dtype).reshape(3, 1, 1)
    return torch.where(border, colour, grid).permute(1, 2, 0)


def _draw_grid(name: str, grid: torch.Tensor, title: str) -> Figure:
    fig = _figure(name)
    ax = fig.add_axes((0.02, 0.02, 0.96, 0.9))
    ax.imshow(grid.numpy(), interpolation="nearest")
    ax.set_axis_off()
    fig.suptitle(title, fontsize=10)
    return fig


def _as_channels(images: torch.Tensor) -> torch.Tensor:
    """make_grid takes (B, C, H, W); pyrovae's images are (B, H, W)."""
    if images.dim() == 3:
        return images.unsqueeze(1)
    if images.dim() == 4 and images.shape[1] in (1, 3):
        return images
    raise PyrovaeError(f"cannot draw images of shape {tuple(images.shape[1:])}: the figures "
                       f"take (H, W), (1, H, W) or (3, H, W) images.")


def _choose(n: int, k: int, seed: int, replacement: bool = False) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if replacement:
        return torch.randint(n, (k,), generator=generator)
    return torch.randperm(n, generator=generator)[:k]


# ---------------------------------------------------------------- plots


def plot_latent_scatter(vae, x: torch.Tensor, labels: torch.Tensor | None = None) -> Figure:
    """Encoded test means (medians for a lognormal guide), coloured by label: the
    two coordinates themselves for z_dim=2, the first two principal components
    for more, and the one coordinate against the label for z_dim=1."""
    with vae.evaluating():
        z = posterior_centre(vae.encode(x, ENCODE_BATCH)).cpu().numpy()
    size, sites = z.shape[-1], getattr(vae, "sites", ("z",))  # the bottom layer's, if several
    # coordinate names: z1, z2 for one layer; z1[1], z1[2] where z1 names the bottom layer
    names = ("z1", "z2") if len(sites) == 1 else (f"{sites[0]}[1]", f"{sites[0]}[2]")
    fig = _figure("latent_scatter")
    ax = fig.add_subplot()
    colours = dict(c="tab:blue") if labels is None else dict(
        c=labels.cpu().numpy(), cmap="tab10", vmin=-0.5, vmax=9.5)
    if size == 1:
        y = labels.cpu().numpy() if labels is not None else torch.zeros(len(z)).numpy()
        points = ax.scatter(z[:, 0], y, s=4, alpha=0.5, **colours)
        ax.set_xlabel(names[0])
        ax.set_ylabel("label" if labels is not None else "")
    elif size == 2:
        points = ax.scatter(z[:, 0], z[:, 1], s=4, alpha=0.6, **colours)
        ax.set_xlabel(names[0])
        ax.set_ylabel(names[1])
    else:
        from sklearn.decomposition import PCA

        pca = PCA(n_components=2, svd_solver="full").fit(z)
        projected = pca.transform(z)
        points = ax.scatter(projected[:, 0], projected[:, 1], s=4, alpha=0.6, **colours)
        share = pca.explained_variance_ratio_ * 100
        ax.set_xlabel(f"PC1 ({share[0]:.0f}% of variance)")
        ax.set_ylabel(f"PC2 ({share[1]:.0f}% of variance)")
    if labels is not None:
        fig.colorbar(points, ax=ax, ticks=range(10), label="label")
    ax.set_title(f"encoded test set, z_dim={size}" if len(sites) == 1 else
                 f"encoded test set: bottom layer {sites[0]} of {len(sites)}, z_dim={size}",
                 fontsize=10)
    fig.tight_layout()
    return fig


BUBBLE_POINTS = 36
BUBBLE_SAMPLES = 150  # draws per point for a guide without a closed-form covariance
PRIOR_KDE_DRAWS = 5000
CONTOUR_GRID = 80


def plot_latent_bubbles(vae, x: torch.Tensor, labels: torch.Tensor | None = None,
                        seed: int = 0, points: int = BUBBLE_POINTS) -> Figure:
    """q(z|x) for a few dozen test points, over the prior's contours, in a plane.

    The plane is z itself for z_dim=2, else that of the first two principal
    components of the test set's posterior means (the axes say which). A
    Gaussian guide is drawn as its 1- and 2-sigma ellipses (axis-aligned for a
    diagonal guide in z_dim=2, tilted for a full covariance); any other guide
    (a flow, a heavy tail) as a scatter of its own draws, since an ellipse would
    misstate its shape. The prior's contours are exact for a Gaussian prior and a
    kernel density estimate of its draws otherwise (a mixture, a VampPrior).
    """
    if vae.z_dim < 2:
        raise PyrovaeError(f"the latent bubbles need z_dim >= 2, but this VAE has z_dim="
                           f"{vae.z_dim}; the latent scatter works for any z_dim.")
    chosen = _choose(len(x), min(points, len(x)), seed)
    with vae.evaluating(seed):
        means = posterior_centre(vae.encode(x, ENCODE_BATCH)).cpu().double().numpy()
        q = vae.encode(x[chosen].to(vae.device))
        gaussian = _gaussian_moments(q)
        draws = None if gaussian else q.sample((BUBBLE_SAMPLES,)).cpu().double().numpy()
        prior = vae.prior_distribution()
        prior_gaussian = _gaussian_moments(prior)
        prior_draws = prior.sample((PRIOR_KDE_DRAWS,)).cpu().double().numpy()
    if prior_draws.shape[-1] != vae.z_dim or prior_draws.ndim != 2:
        raise PyrovaeError(f"the latent bubbles need a prior over the guide's z_dim={vae.z_dim} "
                           f"dimensions, got draws of shape {prior_draws.shape[1:]}.")
    if vae.z_dim == 2:
        centre, plane, axis_names = np.zeros(2), np.eye(2), ("z1", "z2")
    else:
        from sklearn.decomposition import PCA

        pca = PCA(n_components=2, svd_solver="full").fit(means)
        share = pca.explained_variance_ratio_ * 100
        centre, plane = pca.mean_, pca.components_  # rows orthonormal: a projection
        axis_names = tuple(f"PC{i + 1} of the posterior means ({share[i]:.0f}% of variance)"
                           for i in range(2))

    def project(z):
        return (z - centre) @ plane.T

    fig = _figure("latent_bubbles")
    ax = fig.add_subplot()
    colours = _point_colours(labels[chosen] if labels is not None else None, len(chosen))
    lows, highs = [], []
    if gaussian:
        loc, cov = (t.cpu().double().numpy() for t in gaussian)
        for i in range(len(chosen)):
            centre_i = project(loc[i])
            cov_i = plane @ cov[i] @ plane.T
            for radius, style in ((1, "-"), (2, ":")):
                ax.add_patch(_ellipse(centre_i, cov_i, radius, colours[i], style))
            spread = 2 * np.sqrt(np.diag(cov_i))
            lows.append(centre_i - spread)
            highs.append(centre_i + spread)
        drawn = "1-sigma (solid) and 2-sigma (dotted) ellipses of q(z|x)"
    else:
        for i in range(len(chosen)):
            projected = project(draws[:, i])
            ax.scatter(projected[:, 0], projected[:, 1], s=2, alpha=0.3, color=colours[i],
                       linewidths=0)
            lows.append(projected.min(0))
            highs.append(projected.max(0))
        drawn = f"{BUBBLE_SAMPLES} draws of q(z|x) per point"
    prior_projected = project(prior_draws)
    lows.append(np.quantile(prior_projected, 0.01, axis=0))
    highs.append(np.quantile(prior_projected, 0.99, axis=0))
    low, high = np.min(lows, axis=0), np.max(highs, axis=0)
    pad = 0.05 * (high - low)
    low, high = low - pad, high + pad
    grid = np.stack(np.meshgrid(*(np.linspace(low[d], high[d], CONTOUR_GRID)
                                  for d in range(2))), -1).reshape(-1, 2)
    if prior_gaussian:
        p_loc, p_cov = (t.cpu().double().numpy() for t in prior_gaussian)
        density = scipy.stats.multivariate_normal(project(p_loc), plane @ p_cov @ plane.T).pdf(grid)
        how = "exact"
    else:
        density = scipy.stats.gaussian_kde(prior_projected.T)(grid.T)
        how = f"kernel density of {PRIOR_KDE_DRAWS} draws"
    ax.contour(grid[:, 0].reshape(CONTOUR_GRID, -1), grid[:, 1].reshape(CONTOUR_GRID, -1),
               density.reshape(CONTOUR_GRID, -1), levels=6, colors="0.5", linewidths=0.8)
    ax.set_xlim(low[0], high[0])
    ax.set_ylim(low[1], high[1])
    ax.set_aspect("equal")  # a round bubble must look round, a tilted one tilted
    ax.set_xlabel(axis_names[0], fontsize=9)
    ax.set_ylabel(axis_names[1], fontsize=9)
    ax.set_title(f"{drawn}, {len(chosen)} test points;\nprior contours ({how})", fontsize=10)
    fig.tight_layout()
    return fig


def _gaussian_moments(d) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The mean and covariance of a Gaussian over z (a full covariance, or an
    Independent Normal); None for any other distribution."""
    if isinstance(d, torch.distributions.MultivariateNormal):
        return d.loc, d.covariance_matrix
    if (isinstance(d, torch.distributions.Independent) and d.reinterpreted_batch_ndims == 1
            and isinstance(d.base_dist, torch.distributions.Normal)):
        return d.mean, torch.diag_embed(d.variance)
    return None


def _ellipse(centre, cov, radius: float, colour="k", linestyle: str = "-"):
    """The ellipse {z : (z - centre)^T cov^-1 (z - centre) = radius^2}."""
    from matplotlib.patches import Ellipse

    eigenvalues, eigenvectors = np.linalg.eigh(cov)  # ascending: the last is the major axis
    angle = np.degrees(np.arctan2(eigenvectors[1, 1], eigenvectors[0, 1]))
    return Ellipse(centre, 2 * radius * np.sqrt(eigenvalues[1]),
                   2 * radius * np.sqrt(eigenvalues[0]), angle=angle, fill=False,
                   edgecolor=colour, linestyle=linestyle, alpha=0.8, linewidth=1)


def _point_colours(labels: torch.Tensor | None, n: int) -> list:
    """One colour a point: tab10 by label, or one blue without labels."""
    from matplotlib import colormaps

    if labels is None:
        return ["tab:blue"] * n
    return [colormaps["tab10"](int(label) % 10) for label in labels.cpu()]


CURVES = (  # panel title, train key, test key
    ("ELBO", "train_elbo", "test_elbo"),
    ("KL(q(z|x) || p(z))", "train_kl", "kl"),
    ("reconstruction E_q[log p(x|z)]", "train_recon", "recon"),
)


def plot_training_curves(metrics: list[dict]) -> Figure:
    """ELBO, KL and reconstruction term per epoch (nats per datapoint), train and test."""
    if not metrics:
        raise PyrovaeError("no metrics to plot: metrics.json is empty; train for an epoch first.")
    epochs = [m["epoch"] for m in metrics]
    fig = _figure("training_curves")
    axes = fig.subplots(1, len(CURVES))
    for ax, (title, train_key, test_key) in zip(axes, CURVES):
        marker = "o" if len(epochs) < 20 else None
        ax.plot(epochs, [m[train_key] for m in metrics], label="train", marker=marker)
        ax.plot(epochs, [m[test_key] for m in metrics], label="test", marker=marker)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("nats per datapoint")
    axes[0].legend()
    fig.tight_layout()
    return fig


def plot_kl_per_dim(vae, x: torch.Tensor, seed: int = 0) -> Figure:
    """E_x KL(q(z_u|x) || p(z_u)) per latent dimension u on ``x``, largest first; with
    several stochastic layers, each layer's share of the ELBO's KL per dimension
    (``layer_kl_per_dim``), layer by layer from the bottom, in a colour each."""
    sites = getattr(vae, "sites", ("z",))
    with vae.evaluating(seed):
        if len(sites) == 1:
            kl, method = kl_per_dim(vae.encode(x, ENCODE_BATCH), vae.prior_distribution())
            layers = [("", kl.cpu())]
        else:
            method = "monte-carlo"
            layers = [(f"{site}:", torch.tensor(values)) for site, values in
                      zip(sites, layer_kl_per_dim(vae, x, batch_size=ENCODE_BATCH))
                      if values is not None]
    fig = _figure("kl_per_dim")
    ax = fig.add_subplot()
    start, ticks = 0, []
    for index, (prefix, layer_kl) in enumerate(layers):
        order = layer_kl.argsort(descending=True)
        ax.bar(range(start, start + len(order)), layer_kl[order].numpy(),
               color=f"C{index}", label=prefix.rstrip(":") or None)
        ticks += [f"{prefix}{int(u) + 1}" for u in order]
        start += len(order)
    kl = torch.cat([layer_kl for _, layer_kl in layers])
    if len(layers) > 1:
        ax.legend(fontsize=8)
    ax.set_xticks(range(len(kl)), ticks,
                  fontsize=8 if len(kl) <= 32 else 5, rotation=0 if len(kl) <= 32 else 90)
    ax.set_xlabel("latent dimension (sorted)")
    ax.set_ylabel("KL (nats)")
    ax.set_title(f"KL per latent dimension on the test set ({method}); "
                 f"total {float(kl.sum()):.2f}", fontsize=10)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- the evaluation's figures


def plot_khat(khat: np.ndarray, num_samples: int) -> Figure:
    """ArviZ's k-hat plot of the PSIS k-hat per test datapoint."""
    import xarray as xr
    from matplotlib import MatplotlibDeprecationWarning

    az = import_arviz()
    fig = _figure("evaluation_khat", layout="constrained")
    ax = fig.add_subplot()
    finite = np.isfinite(khat)
    if finite.any():
        # ELPDData rather than a bare array, which plot_khat deprecates
        khats = az.ELPDData(data=[xr.DataArray(np.where(finite, khat, np.nan), dims=["datapoint"]),
                                  KHAT_THRESHOLD], index=["pareto_k", "good_k"])
        with warnings.catch_warnings():
            # arviz 0.23 calls a matplotlib helper that matplotlib 3.11 deprecates
            warnings.simplefilter("ignore", MatplotlibDeprecationWarning)
            az.plot_khat(khats, show_hlines=True, ax=ax)
        ax.set_title(f"PSIS k-hat per datapoint, K={num_samples}: "
                     f"{np.mean(khat[finite] > KHAT_THRESHOLD):.1%} above {KHAT_THRESHOLD}")
    else:
        ax.set_title(f"no k-hat: K={num_samples} < {MIN_SAMPLES_FOR_KHAT}")
    ax.set_xlabel("test datapoint")
    ax.set_ylabel("PSIS k-hat")
    return fig


def plot_iwae_bounds(bounds: dict[int, float], subset_size: int, dataset: str) -> Figure:
    """The IWAE bound against the number of importance samples K."""
    fig = _figure("evaluation_iwae_bound", layout="constrained")
    ax = fig.add_subplot()
    ks = sorted(bounds)
    ax.plot(ks, [bounds[k] for k in ks], marker="o")
    ax.set_xscale("log")
    ax.set_xlabel("K (importance samples)")
    ax.set_ylabel("IWAE bound (nats per datapoint)")
    ax.set_title(f"IWAE bound as K grows: {subset_size} {dataset} test images")
    ax.grid(True, alpha=0.3)
    return fig


def plot_time_to_quality(curves: dict[str, list[dict]], target: float | None = None,
                         target_label: str = "target") -> Figure:
    """Test NLL against training time, one line per run.

    ``curves`` maps a run's name to its points, each a dict with ``train_seconds``
    (cumulative training time) and ``test_iwae_bound`` (the test set's IWAE bound,
    whose negative is an upper bound on the NLL). ``target`` draws an NLL to reach
    as a dashed line.
    """
    if not curves or not all(curves.values()):
        raise PyrovaeError("plot_time_to_quality needs at least one point per run: train "
                           "with --iwae-every N to record the test IWAE bound.")
    fig = _figure("time_to_quality", layout="constrained")
    ax = fig.add_subplot()
    for name, points in curves.items():
        ax.plot([p["train_seconds"] / 60 for p in points],
                [-p["test_iwae_bound"] for p in points], marker=".", label=name)
    if target is not None:
        ax.axhline(target, color="k", linestyle="--", linewidth=1, label=target_label)
    # runs of a few GPU minutes and of a CPU hour share the axis
    ax.set_xscale("log")
    ax.set_xlabel("training time (minutes, log scale)")
    ax.set_ylabel("test NLL bound, -IWAE bound (nats)")
    ax.set_title("Test NLL against training time")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return fig
