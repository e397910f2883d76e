"""SVI with less per-step overhead: one fused optimizer, parameters found once; and
the learning-rate schedules, which step that optimizer's learning rate per epoch.

Both give the loss, gradients and update of ``pyro.infer.SVI`` with
``pyro.optim.Adam`` to the bit; with ``{"fused": True}`` (torch's fused Adam
kernel, as the trainer uses it) the update agrees to float rounding
(tests/test_svi.py). benchmarks/train_speed.py measures what they save.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pyro
import torch
from pyro import poutine
from pyro.infer import SVI
from pyro.infer.util import torch_item
from pyro.optim import PyroOptim
from torch.optim import lr_scheduler

from pyrovae.run import BURDA_STAGES

# an optimizer -> its torch LR scheduler (``make_lr_schedule``)
Schedule = Callable[[torch.optim.Optimizer], lr_scheduler.LRScheduler]


class FusedOptim(PyroOptim):
    """A ``PyroOptim`` that steps one torch optimizer over all its parameters.

    ``pyro.optim.Adam`` builds one torch optimizer per parameter, so an SVI step
    of an MLP VAE runs eight optimizer steps, each with its Python overhead.
    torch's Adam keeps its state (step count, moments) per parameter, so one
    optimizer over all of them makes the same update; parameters left out of a
    call are skipped, as Pyro skips them. The state is saved in Pyro's format,
    one torch state dict per parameter name, so that checkpoints load either way.

    ``schedule`` (``make_lr_schedule``) builds a torch LR scheduler on the optimizer,
    and ``step_schedule`` steps it once per epoch. Pyro's ``PyroLRScheduler`` would
    build one scheduler per parameter's optimizer, and the optimizer here is one for
    all parameters, built in the first step (the parameters are not known before);
    so the schedule lives here, and every step that goes through this optimizer
    (compiled, eager, data-parallel) gets it. Its position is the count of
    ``step_schedule`` calls, ``schedule_steps`` (a resumed run sets it to the saved
    epoch): whenever the scheduler is (re)built, on a new optimizer or a new
    parameter group, it starts from the base learning rate and replays that many
    steps, which gives the values of an uninterrupted run to the bit.
    """

    def __init__(self, optim_constructor, optim_args: dict, schedule: Schedule | None = None):
        super().__init__(optim_constructor, optim_args)
        self.optimizer = None
        self.params: list[torch.Tensor] = []
        self.schedule = schedule
        self.scheduler: lr_scheduler.LRScheduler | None = None
        self.schedule_steps = 0

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
        if self.schedule is not None:  # a new group must follow the schedule too
            self._build_scheduler()
        store = pyro.get_param_store()
        for p in params:
            saved = self._state_waiting_to_be_consumed.pop(store.param_name(p), None)
            if saved is not None:
                self.optimizer.state[p] = {
                    key: self._placed(key, value, p) for key, value in saved["state"][0].items()}

    def _build_scheduler(self) -> None:
        # the step and cosine schedulers compute each value from the last, so every
        # group starts again from its base learning rate before the replay
        for group in self.optimizer.param_groups:
            group["lr"] = group.setdefault("initial_lr", self.pt_optim_args["lr"])
        self.scheduler = self.schedule(self.optimizer)
        with warnings.catch_warnings():
            # the replay steps the scheduler before this optimizer's first step, which torch
            # warns of (it would skip a value in a run that starts so); here none is skipped
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step")
            for _ in range(self.schedule_steps):
                self.scheduler.step()

    def step_schedule(self) -> None:
        """The end of an epoch: the next epoch's learning rate."""
        self.schedule_steps += 1
        if self.scheduler is not None:
            self.scheduler.step()

    @property
    def lr(self) -> float:
        """The learning rate of the last step and, until ``step_schedule``, the next; the
        base learning rate before the first step."""
        if self.optimizer is None:
            return self.pt_optim_args["lr"]
        return self.optimizer.param_groups[0]["lr"]

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


def burda_factor(epochs_done: int) -> float:
    """Burda et al. (2016)'s schedule as a factor of the base learning rate: 10**(-i/7)
    in stage i = 0 ... 7, which lasts 3**i epochs; ``epochs_done`` epochs are behind."""
    stage, end = 0, 1
    while epochs_done >= end and stage < BURDA_STAGES - 1:
        stage += 1
        end += 3**stage
    return 10 ** (-stage / 7)


def make_lr_schedule(name: str, epochs: int, step: int | None = None, gamma: float = 0.1,
                     lr_min: float = 0.0) -> Schedule | None:
    """The learning-rate schedule ``name`` (``run.LR_SCHEDULES``) as a torch scheduler's
    constructor, stepped once per epoch; None for "constant". torch's ``StepLR`` and
    ``CosineAnnealingLR`` are the step and cosine schedules; Burda's piecewise one has no
    torch scheduler, so it is a ``LambdaLR`` factor (``burda_factor``). The cosine
    schedule runs over the run's ``epochs``: epoch e (from 1) gets
    lr_min + (lr - lr_min) (1 + cos(pi (e - 1) / epochs)) / 2, so that no epoch is
    spent at lr_min itself."""
    if name == "constant":
        return None
    if name == "burda":
        return lambda optimizer: lr_scheduler.LambdaLR(optimizer, burda_factor)
    if name == "step":
        return lambda optimizer: lr_scheduler.StepLR(optimizer, step_size=step, gamma=gamma)
    if name == "cosine":
        return lambda optimizer: lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs,
                                                                eta_min=lr_min)
    raise ValueError(f"unknown learning-rate schedule {name!r}")


def param_names(fn, *args) -> set[str]:
    """The names of the Pyro params ``fn`` registers, found without touching the global RNG."""
    devices = [a.device for a in args if torch.is_tensor(a) and a.is_cuda]
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        trace = poutine.trace(fn, param_only=True).get_trace(*args)
    return set(trace.nodes)
