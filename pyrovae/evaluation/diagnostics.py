"""An ArviZ export of q(z|x)'s draws, and the posterior-collapse diagnostics.

The collapse diagnostics live in ``pyrovae.collapse`` (the trainer reports
them per epoch); their names are re-exported here, where they were before.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pyro
import torch
from pyro import poutine

from pyrovae.collapse import (  # noqa: F401  (re-exported for one release)
    ACTIVITY_THRESHOLD,
    KL_METHODS,
    active_units,
    collapse_diagnostics,
    factorizes,
    kl_per_dim,
    mutual_information,
    posterior_mean_variance,
)
from pyrovae.errors import PyrovaeError
from pyrovae.vae import VAE

DRAW_BATCH = 1000  # datapoints whose draws are made at once

def model_device(vae) -> "torch.device":  # noqa: F821
    """Kept for one release: use ``vae.device``."""
    return vae.device


def evaluating(vae, seed: int | None = None):
    """Kept for one release: use ``vae.evaluating(seed)``."""
    return VAE.evaluating(vae, seed)


def encode(vae, x, batch_size: int = 1000):
    """Kept for one release: use ``vae.encode(x, batch_size)``."""
    return VAE.encode(vae, x, batch_size)


# ---------------------------------------------------------------- ArviZ


def import_arviz():
    """ArviZ, without what it says on import: a FutureWarning about its coming
    refactor, and INFO lines on missing preview packages. Neither is the user's concern."""
    preview_log = logging.getLogger("arviz.preview")
    level = preview_log.level
    preview_log.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"\s*ArviZ is undergoing a major refactor",
                                    category=FutureWarning)
            import arviz
    finally:
        preview_log.setLevel(level)
    return arviz


def posterior_draws(vae, x: torch.Tensor, num_draws: int = 1000, num_chains: int = 4,
                    datapoints=None, seed: int = 0):
    """Draws of the latents from the guide q for the datapoints ``x``, as
    ``arviz.InferenceData``.

    The posterior group holds one variable per latent site, named as the model
    names it: ``z``, or ``z1``, ``z2``, ... with several stochastic layers (drawn
    together, each layer from q given the draw below it), with dims (chain, draw,
    datapoint, latent) (``latent1``, ``latent2``, ... for the layers).
    ``datapoints`` names the rows of ``x`` (default 0..N-1), e.g. their indices in
    the test set. The draws are independent, so every chain is an i.i.d. sample of
    q and ``az.summary`` reports r_hat near 1.
    """
    if num_draws < 1 or num_chains < 1:
        raise PyrovaeError(f"num_draws={num_draws} and num_chains={num_chains} must be >= 1.")
    n = len(x)
    datapoints = np.arange(n) if datapoints is None else np.asarray(datapoints)
    if datapoints.shape != (n,):
        raise PyrovaeError(f"datapoints names {datapoints.shape} rows, but x has {n}; "
                           f"pass one name per row of x.")
    draws = {site: [] for site in vae.sites}
    with vae.evaluating(seed), torch.no_grad():
        for chunk in x.split(DRAW_BATCH):
            # the guide itself, vectorized over the draws as the IS evaluator runs it: every
            # latent site, each layer drawn given the one below
            with pyro.plate("draws", num_chains * num_draws, dim=-2):
                trace = poutine.trace(vae.guide).get_trace(chunk.to(vae.device))
            for site in vae.sites:
                draws[site].append(trace.nodes[site]["value"].cpu())
    dims = {site: "latent" if site == "z" else f"latent{site[1:]}" for site in vae.sites}
    posterior = {site: torch.cat(values, dim=1).reshape(
        (num_chains, num_draws) + (n,) + values[0].shape[-1:]).numpy()
        for site, values in draws.items()}
    az = import_arviz()
    return az.from_dict(
        posterior=posterior,
        coords={"datapoint": datapoints,
                **{dims[site]: np.arange(value.shape[-1]) for site, value in posterior.items()}},
        dims={site: ["datapoint", dims[site]] for site in vae.sites},
        attrs={"guide": vae.guide_family.name, "source": "pyrovae q(z|x)"},
    )
