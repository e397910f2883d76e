"""The compiled step: ``Trace_ELBO`` and ``TraceMeanField_ELBO`` recorded as TorchScript
graphs, one per input shape, that return the terms the trainer records, and the
check of what code turned a tensor into a Python value while a graph was recorded.
"""

from __future__ import annotations

import os
import warnings
from functools import partial

import pyro.ops.jit
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.util import torch_item

from pyrovae.objectives.elbos import Terms, log_prob_sum, observed_log_prob
from pyrovae.sites import sample_sites


class CompiledTerms(Terms):
    """Mixin for ``Trace_ELBO`` and ``TraceMeanField_ELBO``: ``loss_and_grads`` runs a
    TorchScript graph of the step that ``pyro.ops.jit.trace`` records once per
    input shape, as Pyro's ``JitTrace_ELBO`` does, so that later steps skip
    Pyro's tracing of the model and guide in Python (benchmarks/train_speed.py
    measures what that saves).

    Pyro's JIT ELBOs return the loss alone and key their graph on the number of
    arguments, so a smaller last batch would replay a graph recorded for another
    batch size. Here the graph also returns the terms the trainer records, and
    there is one graph per shape, dtype and device of the inputs. The graph is
    recorded under a forked RNG, so that the steps draw the random numbers the
    eager steps draw; the loss is that of the eager objective up to float
    rounding (tests/test_objectives.py).

    The model and guide must have static structure: no Python branch on a
    tensor's value, which the recorded graph would keep as it went the first time.
    Code outside torch, Pyro and pyrovae that turns a tensor into a Python value
    while a graph is recorded gets a warning naming its file and line.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._graphs = {}

    def loss_and_grads(self, model, guide, *args, **kwargs):
        graph = self._graph(model, guide, args, kwargs)
        # unoptimized, the graph's backward is torch's eager kernels; TorchScript's own
        # derivatives (softplus through exp and where) were no faster (docs/benchmarks.md)
        with torch.jit.optimized_execution(False):
            loss, surrogate_loss, recon = graph(*args, **kwargs)
        surrogate_loss.backward()
        self.recon_total = self.recon_total + recon
        self.elbo_total = self.elbo_total - loss
        return torch_item(loss)

    def _graph(self, model, guide, args, kwargs):
        key = (model, guide) + tuple(
            (a.shape, a.dtype, a.device) if torch.is_tensor(a) else a for a in args)
        graph = self._graphs.get(key)
        # the graph reads its parameters from the param store by name: after the store
        # was cleared it is recorded again, which registers them again
        if graph is None or not all(name in pyro.get_param_store()
                                    for name in graph._param_names):
            graph = pyro.ops.jit.trace(partial(self._step_terms, model, guide))
            devices = [a.device for a in args if torch.is_tensor(a) and a.is_cuda]
            with torch.random.fork_rng(devices=devices), \
                    warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                graph(*args, **kwargs)
            _report_recording_warnings(caught)
            self._graphs[key] = graph
        return graph

    def _step_terms(self, model, guide, *args, **kwargs):
        loss, surrogate_loss, recon = 0.0, 0.0, 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            loss_particle, surrogate_particle = self._differentiable_loss_particle(
                model_trace, guide_trace)
            loss = loss + loss_particle / self.num_particles
            surrogate_loss = surrogate_loss + surrogate_particle / self.num_particles
            recon = recon + observed_log_prob(model_trace) / self.num_particles
        return loss, surrogate_loss, recon


class CompiledTrace_ELBO(CompiledTerms, Trace_ELBO):
    """``Trace_ELBO`` (recording its terms) with the step compiled."""

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        # Trace_ELBO reads the loss off with .item(), which the graph would keep as a
        # constant; TraceMeanField_ELBO returns it as a tensor while a graph is recorded
        _, surrogate_loss = super()._differentiable_loss_particle(model_trace, guide_trace)
        elbo = log_prob_sum(sample_sites(model_trace)) - log_prob_sum(sample_sites(guide_trace))
        return -elbo.detach(), surrogate_loss


class CompiledTraceMeanField_ELBO(CompiledTerms, TraceMeanField_ELBO):
    """``TraceMeanField_ELBO`` (recording its terms) with the step compiled."""


# code whose conversions of traced tensors to Python values pyrovae has checked: they
# read shapes, constant within a graph as it is keyed on the shape, or (Trace_ELBO's
# .item()) the loss value, which CompiledTrace_ELBO replaces by a tensor. pyrovae's is
# the whole package (the model and guide in vae.py, the families), one folder up from
# this one; the package itself is not imported here, as it imports every stage
_PYROVAE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CHECKED_CODE = tuple(os.path.dirname(module.__file__) + os.sep for module in (torch, pyro)) \
    + (_PYROVAE_DIR + os.sep,)


def _report_recording_warnings(caught) -> None:
    """While a graph is recorded, a tensor turned into a Python value becomes a
    constant of the graph. Code outside torch, Pyro and pyrovae (a custom family
    or network) may do it with values, which would be wrong in every later step,
    so it is named. Other warnings pass on."""
    named = set()
    for w in caught:
        if issubclass(w.category, torch.jit.TracerWarning):
            if not w.filename.startswith(_CHECKED_CODE) and (w.filename, w.lineno) not in named:
                named.add((w.filename, w.lineno))
                warnings.warn(
                    f"while the compiled step was recorded, {w.filename}:{w.lineno} turned a "
                    f"tensor into a Python value ({str(w.message).split('.')[0]}). The graph "
                    f"keeps the value it had then: if it depends on the data or the "
                    f"parameters, the compiled step is wrong. Train with --no-jit "
                    f"(TrainConfig(jit=False), make_elbo(..., jit=False)) if it does.",
                    UserWarning)
        elif not (issubclass(w.category, FutureWarning) and "torch.jit.trace" in str(w.message)):
            # torch marks torch.jit.trace deprecated, but it is what pyro.ops.jit records
            # with; tests/test_objectives.py checks the graphs it records
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
