"""MLP encoder and decoder.

The contract a user's own networks must also meet:

- ``encoder(x)`` maps ``batch + x_shape`` to ``batch + (guide.num_params, z_dim)``;
- ``decoder(z)`` maps ``batch + (z_dim,)`` to ``batch + (likelihood.num_params,) + x_shape``.

``batch`` may hold a particle dimension in front of the data dimension.
"""

from __future__ import annotations

import math
import numbers

from torch import nn

ACTIVATIONS = {
    "relu": nn.ReLU,
    "softplus": nn.Softplus,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "leaky-relu": nn.LeakyReLU,
    "gelu": nn.GELU,
}


def check_hidden(hidden) -> tuple[int, ...]:
    """The hidden layer sizes as a tuple of positive ints; ``()`` means no hidden layer
    (linear networks). A width of 0 would make the encoder's output constant."""
    from pyrovae.errors import PyrovaeError

    if isinstance(hidden, (str, bytes)) or not hasattr(hidden, "__iter__"):
        raise PyrovaeError(
            f"hidden must be a list of layer sizes such as (400,) (--hidden 400), got {hidden!r}.")
    sizes = tuple(hidden)
    bad = [n for n in sizes
           if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1]
    if bad:
        raise PyrovaeError(
            f"--hidden sizes must be positive integers, got {list(sizes)!r} (hidden={hidden!r}); "
            f"give each hidden layer at least one unit, or () for none.")
    return tuple(int(n) for n in sizes)


def mlp(sizes: list[int], activation: str) -> nn.Sequential:
    if activation not in ACTIVATIONS:
        from pyrovae.errors import UnknownNameError

        raise UnknownNameError(
            f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}."
        )
    check_hidden(sizes)
    layers = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class MLPEncoder(nn.Module):
    def __init__(self, x_shape, z_dim: int, num_params: int, hidden=(400,), activation="softplus"):
        super().__init__()
        self.x_shape = tuple(x_shape)
        self.out_shape = (num_params, z_dim)
        self.net = mlp([math.prod(self.x_shape), *hidden, num_params * z_dim], activation)

    def forward(self, x):
        batch = x.shape[: x.dim() - len(self.x_shape)]
        return self.net(x.reshape(*batch, -1)).reshape(*batch, *self.out_shape)


class MLPDecoder(nn.Module):
    def __init__(self, x_shape, z_dim: int, num_params: int, hidden=(400,), activation="softplus"):
        super().__init__()
        self.out_shape = (num_params, *x_shape)
        self.net = mlp([z_dim, *hidden, math.prod(self.out_shape)], activation)

    def forward(self, z):
        return self.net(z).reshape(*z.shape[:-1], *self.out_shape)
