"""pyrovae: variational autoencoders written the Pyro way.

The flow of the package (``docs/architecture.md``): ``families`` (priors,
guides, likelihoods) -> ``vae`` (the Pyro model and guide; with ``data``,
``run`` and ``collapse`` beside it) -> ``objectives`` (ELBOs) -> ``training``
(SVI) -> ``evaluation`` (log p(x)) -> ``plots`` -> ``pipelines`` -> ``cli``.
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
from pyrovae.run import ModelConfig, TrainConfig
from pyrovae.training import Trainer
from pyrovae.vae import VAE, load_run

__version__ = "0.1.0"

__all__ = [
    "VAE", "Trainer", "TrainConfig", "ModelConfig", "load_run", "Dataset", "load_dataset", "make_elbo",
    "Prior", "Guide", "Likelihood", "PRIORS", "GUIDES", "LIKELIHOODS",
    "register_prior", "register_guide", "register_likelihood",
]
