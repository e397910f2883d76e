"""The base of every distribution family, and the name registries.

A family is a small ``nn.Module``: it turns unconstrained numbers (network
outputs or its own parameters) into constrained distribution parameters and
builds the distribution. Being a module lets a family own learnable global
parameters (a learnable prior, a guide's degrees of freedom, a likelihood's
sigma) that move with ``.to(device)`` and are saved in the ``state_dict``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from torch.distributions import biject_to, constraints

from pyrovae.errors import PyrovaeError, UnknownNameError


class Family(nn.Module):
    """A distribution family: a name, a support, and how to build its distribution."""

    name: ClassVar[str] = ""
    support: ClassVar[constraints.Constraint] = constraints.real

    def __init__(self):
        super().__init__()
        self._settings: dict = {}

    @property
    def settings(self) -> dict:
        """The JSON-able keyword arguments that rebuild this family (saved in config.json)."""
        return dict(self._settings)

    @property
    def has_parameters(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

    def make_dist(self, *params) -> torch.distributions.Distribution:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.settings.items())


class FixedOrLearnable(Family):
    """A family whose parameters are scalars or vectors set by the user, fixed or learned.

    Subclasses list ``param_constraints`` (name -> constraint) and ``defaults``.
    A learned parameter is stored unconstrained, through ``biject_to``, so that
    gradient steps can never leave its support.
    """

    param_constraints: ClassVar[dict[str, constraints.Constraint]] = {}
    defaults: ClassVar[dict[str, float]] = {}

    def __init__(self, size: int, learnable: bool | list[str] = False, **values):
        super().__init__()
        unknown = set(values) - set(self.param_constraints)
        if unknown:
            raise UnknownNameError(
                f"{self.name!r} has no parameter {sorted(unknown)}; "
                f"its parameters are {list(self.param_constraints)}."
            )
        if learnable is True:
            learnable = list(self.param_constraints)
        learnable = list(learnable or [])
        self._settings = {**values, "learnable": learnable}
        self._learned = []
        for pname, constraint in self.param_constraints.items():
            value = torch.as_tensor(values.get(pname, self.defaults[pname]), dtype=torch.float32)
            value = value.expand(size).clone() if value.dim() == 0 else value
            if not bool(constraint.check(value).all()):
                raise PyrovaeError(
                    f"{self.name!r} parameter {pname}={value.tolist()} is outside its "
                    f"support ({constraint}); pass a value inside it."
                )
            if pname in learnable:
                unconstrained = biject_to(constraint).inv(value)
                self.register_parameter(pname + "_unconstrained", nn.Parameter(unconstrained))
                self._learned.append(pname)
            else:
                self.register_buffer(pname, value)

    def param_values(self, like: torch.Tensor) -> list[torch.Tensor]:
        values = []
        for pname, constraint in self.param_constraints.items():
            if pname in self._learned:
                value = biject_to(constraint)(getattr(self, pname + "_unconstrained"))
            else:
                value = getattr(self, pname)
            values.append(value.to(like))  # a no-op when device and dtype already match
        return values


class Registry(dict):
    """Family classes by name; an unknown name is an error that lists the known ones."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, cls):
        if not cls.name:
            raise TypeError(f"{cls.__name__} needs a class attribute `name` to be registered.")
        self[cls.name] = cls
        return cls

    def lookup(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; known {self.kind}s are {sorted(self)}. "
                f"To add one, subclass and decorate it with register_{self.kind}."
            ) from None


def same_support(a: constraints.Constraint, b: constraints.Constraint) -> bool:
    """Constraint objects do not define equality; compare their type and bounds."""
    return type(a) is type(b) and vars(a) == vars(b)
