"""pyrovae: variational autoencoders written the Pyro way.

The flow of the package: ``families`` (priors, guides, likelihoods) -> ``vae``
(the Pyro model and guide) -> ``objectives`` (ELBOs) -> ``training`` (SVI) ->
``evaluation`` (log p(x), diagnostics) -> ``plots``.
"""

from pyrovae.data import Dataset, load_dataset
from pyrovae.families import (
    GUIDES,
    LIKELIHOODS,
    PRIORS,
    Guide,
    Likelihood,
    Prior,
    register_guide,
    register_likelihood,
    register_prior,
)
from pyrovae.objectives import make_elbo
from pyrovae.training import Trainer, TrainConfig
from pyrovae.vae import VAE

__version__ = "0.1.0"

__all__ = [
    "VAE", "Trainer", "TrainConfig", "Dataset", "load_dataset", "make_elbo",
    "Prior", "Guide", "Likelihood", "PRIORS", "GUIDES", "LIKELIHOODS",
    "register_prior", "register_guide", "register_likelihood",
]
