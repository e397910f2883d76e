"""The sample sites of a Pyro trace, chosen in one place.

A plate with a ``subsample_size`` (as ``pyrovae.VAE``'s data plate has) records
its indices as a sample site of type "sample" whose distribution is Pyro's
``_Subsample``: it is no random variable of the model, so every filter here
leaves it out. Pyro's ELBOs prune those sites from their traces already; traces
taken with ``poutine.trace`` keep them. This module imports only Pyro, as
everything in pyrovae may read traces through it.
"""

from __future__ import annotations

from pyro.poutine.util import site_is_subsample


def sample_sites(trace) -> list[dict]:
    """The sample sites of ``trace``, observed and latent, in the order they ran."""
    return [site for site in trace.nodes.values()
            if site["type"] == "sample" and not site_is_subsample(site)]


def latent_sites(trace) -> list[dict]:
    """The sample sites that are not observed: z, in a VAE."""
    return [site for site in sample_sites(trace) if not site["is_observed"]]


def observed_sites(trace) -> list[dict]:
    """The observed sample sites: x, in a VAE."""
    return [site for site in sample_sites(trace) if site["is_observed"]]
