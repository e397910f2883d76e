"""The base of every distribution family, the name registries, and the softplus
that keeps scales positive.

A family is a small ``nn.Module``: it turns unconstrained numbers (network
outputs or its own parameters) into constrained distribution parameters and
builds the distribution. Being a module lets a family own learnable global
parameters (a learnable prior, a guide's degrees of freedom, a likelihood's
sigma) that move with ``.to(device)`` and are saved in the ``state_dict``.
"""

from __future__ import annotations

import math
import numbers
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import constraints

from pyrovae.errors import PyrovaeError, UnknownNameError


class Family(nn.Module):
    """A distribution family: a name, a support, and how to build its distribution.

    Most families only name their ``distribution`` class: ``make_dist(*params)``
    then calls it with the constrained parameters in its argument order. A family
    whose distribution needs more (keyword arguments, a fixed parameter of its
    own) overrides ``make_dist`` instead.
    """

    name: ClassVar[str] = ""
    support: ClassVar[constraints.Constraint] = constraints.real
    distribution: ClassVar[type | None] = None

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
        if self.distribution is None:
            raise NotImplementedError(
                f"{type(self).__name__} needs a class attribute `distribution` or its own make_dist.")
        # the parameters are constrained by construction; validating them costs every SVI step
        return self.distribution(*params, validate_args=False)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.settings.items())


def positive(raw: torch.Tensor, floor: float) -> torch.Tensor:
    # softplus rather than exp: an encoder output of 50 must not overflow to inf
    return F.softplus(raw) + floor


def positive_inverse(value: float, floor: float, shape) -> torch.Tensor:
    """The raw tensor of ``shape`` that ``positive(raw, floor)`` maps to ``value``."""
    # subtract before rounding to float32: value - floor is the number we mean, and
    # float32(value) - float32(floor) can miss it by a rounding step
    excess = torch.full(shape, float(value - floor))
    return excess + torch.log(-torch.expm1(-excess))


def check_positive_int(value, what: str) -> int:
    """``value`` as an int if it is a positive integer (a Python or numpy int, not a bool
    and not a float such as 2.7, which would be truncated without a word)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise PyrovaeError(f"{what} must be a positive integer, got {value!r}.")
    return int(value)


def check_count(value, what: str) -> int:
    """A positive integer, as ``check_positive_int``; a float that is a whole number is
    taken too, as the CLI's KEY=VALUE family parameters arrive as floats (flows=4 is 4.0)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return check_positive_int(value, what)


def check_number(value, what: str, above: float | None = None, at_least: float | None = None
                 ) -> float:
    """``value`` as a float if it is a finite real number (not a bool, not a string)
    above ``above`` (strictly) or at least ``at_least``; else a PyrovaeError naming ``what``."""
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise PyrovaeError(f"{what} must be a number, got {value!r} ({type(value).__name__}).")
    number = float(value)
    if not math.isfinite(number):
        raise PyrovaeError(f"{what} must be a finite number, got {value!r}.")
    if above is not None and not number > above:
        raise PyrovaeError(f"{what} must be greater than {above:g}, got {value!r}.")
    if at_least is not None and not number >= at_least:
        raise PyrovaeError(f"{what} must be at least {at_least:g}, got {value!r}.")
    return number


def check_flag(value, what: str) -> bool:
    """A True/False option: a bool (or numpy bool), never a string such as "false"."""
    if not isinstance(value, (bool, np.bool_)):
        raise PyrovaeError(f"{what} must be True or False, got {value!r}.")
    return bool(value)


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
