"""SVI with less per-step overhead: one fused optimizer, parameters found once.

Both give the loss, gradients and update of ``pyro.infer.SVI`` with
``pyro.optim.Adam`` to the bit; with ``{"fused": True}`` (torch's fused Adam
kernel, as the trainer uses it) the update agrees to float rounding
(tests/test_svi.py). benchmarks/train_speed.py measures what they save.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import torch
from pyro import poutine
from pyro.infer import SVI
from pyro.infer.util import torch_item
from pyro.optim import PyroOptim


class FusedOptim(PyroOptim):
    """A ``PyroOptim`` that steps one torch optimizer over all its parameters.

    ``pyro.optim.Adam`` builds one torch optimizer per parameter, so an SVI step
    of an MLP VAE runs eight optimizer steps, each with its Python overhead.
    torch's Adam keeps its state (step count, moments) per parameter, so one
    optimizer over all of them makes the same update; parameters left out of a
    call are skipped, as Pyro skips them. The state is saved in Pyro's format,
    one torch state dict per parameter name, so that checkpoints load either way.
    """

    def __init__(self, optim_constructor, optim_args: dict):
        super().__init__(optim_constructor, optim_args)
        self.optimizer = None
        self.params: list[torch.Tensor] = []

    def __call__(self, params, *args, **kwargs) -> None:
        params = list(params)
        known = {id(p) for p in self.params}
        new = [p for p in params if id(p) not in known]
        if new:
            self._add(new)
        stepped = {id(p) for p in params}
        skipped = [(p, p.grad) for p in self.params if id(p) not in stepped and p.grad is not None]
        for p, _ in skipped:
            p.grad = None  # torch optimizers skip a parameter without a gradient
        self.optimizer.step(*args, **kwargs)
        for p, grad in skipped:
            p.grad = grad

    def _add(self, params: list[torch.Tensor]) -> None:
        if self.optimizer is None:
            self.optimizer = self.pt_optim_constructor(params, **self.pt_optim_args)
        else:
            self.optimizer.add_param_group({"params": params})
        self.params.extend(params)
        store = pyro.get_param_store()
        for p in params:
            saved = self._state_waiting_to_be_consumed.pop(store.param_name(p), None)
            if saved is not None:
                self.optimizer.state[p] = {
                    key: self._placed(key, value, p) for key, value in saved["state"][0].items()}

    def _placed(self, key, value, param):
        # as torch's load_state_dict does: a fused optimizer keeps its step count
        # on the parameter's device as float32, the others keep it where it was
        if not torch.is_tensor(value):
            return value
        if key != "step":
            return value.to(param.device)
        if self.pt_optim_args.get("fused"):
            return value.to(device=param.device, dtype=torch.float32)
        return value

    def get_state(self) -> dict:
        store = pyro.get_param_store()
        state = {}
        for group in self.optimizer.param_groups if self.optimizer else ():
            settings = {key: value for key, value in group.items() if key != "params"}
            for p in group["params"]:
                if p in self.optimizer.state:
                    state[store.param_name(p)] = {"state": {0: self.optimizer.state[p]},
                                                  "param_groups": [{**settings, "params": [0]}]}
        return state


class FusedSVI(SVI):
    """``pyro.infer.SVI`` with less work per step, for a model and guide whose set of
    parameters stays the same from step to step (as a ``VAE``'s does). ``params``,
    a test on parameter names, restricts the update to some of them (aggressive
    training steps the guide's and the model's apart); every parameter's gradient
    is cleared after the step.

    ``SVI.step`` traces the params in every step, and zero-fills their
    gradients. This step finds them once, in its first step, which also runs
    Pyro's validation (model and guide sites agree, shapes fit the plates);
    later steps run with validation off and set the gradients to None. The
    loss, its gradients and the update are those of ``SVI.step``.
    """

    def __init__(self, model, guide, optim, loss, params: Callable[[str], bool] | None = None,
                 **kwargs):
        super().__init__(model, guide, optim, loss, **kwargs)
        self.keep = params
        self.params: list[torch.Tensor] | None = None  # the ones updated
        self.traced: list[torch.Tensor] = []  # all the step's, whose gradients it clears

    def step(self, *args, **kwargs) -> float:
        if self.params is None:
            with poutine.trace(param_only=True) as capture:
                loss = self.loss_and_grads(self.model, self.guide, *args, **kwargs)
            params = {name: site["value"].unconstrained()
                      for name, site in capture.trace.nodes.items()}
            self.traced = list(params.values())
            self.params = [p for name, p in params.items() if self.keep is None or self.keep(name)]
        else:
            with pyro.validation_enabled(False):
                loss = self.loss_and_grads(self.model, self.guide, *args, **kwargs)
        self.optim(self.params)
        for p in self.traced:
            p.grad = None
        return torch_item(loss)


def param_names(fn, *args) -> set[str]:
    """The names of the Pyro params ``fn`` registers, found without touching the global RNG."""
    devices = [a.device for a in args if torch.is_tensor(a) and a.is_cuda]
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        trace = poutine.trace(fn, param_only=True).get_trace(*args)
    return set(trace.nodes)
