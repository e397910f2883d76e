"""The encoders and decoders by name (``mlp``, ``conv``), the sizes of the stochastic
layers, and the papers' architectures by name (docs/networks.md).

The contract a user's own networks must also meet:

- ``encoder(x)`` maps ``batch + x_shape`` to ``batch + guide.raw_shape`` (a tuple; by
  default ``(num_params, z_dim)``, one number per parameter and latent dimension;
  a full-covariance or flow guide needs a flat vector, e.g. ``(2 z_dim + context,)``).
  Encoders are built as ``Encoder(x_shape, out_shape, ...)`` with ``out_shape`` that tuple;
- ``decoder(z)`` maps ``batch + (z_dim,)`` to ``batch + (likelihood.num_params,) + x_shape``.

``batch`` may hold a particle dimension in front of the data dimension.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from torch import nn

ACTIVATIONS = {
    "relu": nn.ReLU,
    "softplus": nn.Softplus,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "leaky-relu": nn.LeakyReLU,
    "gelu": nn.GELU,
}


def _is_sequence(value) -> bool:
    return not isinstance(value, (str, bytes)) and hasattr(value, "__iter__")


def _positive_ints(sizes) -> bool:
    return all(not isinstance(n, bool) and isinstance(n, numbers.Integral) and n >= 1
               for n in sizes)


def check_hidden(hidden) -> tuple[int, ...]:
    """The hidden layer sizes as a tuple of positive ints; ``()`` means no hidden layer
    (linear networks). A width of 0 would make the encoder's output constant."""
    from pyrovae.errors import PyrovaeError

    if not _is_sequence(hidden):
        raise PyrovaeError(
            f"hidden must be a list of layer sizes such as (400,) (--hidden 400), got {hidden!r}.")
    sizes = tuple(hidden)
    if not _positive_ints(sizes):
        raise PyrovaeError(
            f"--hidden sizes must be positive integers, got {list(sizes)!r} (hidden={hidden!r}); "
            f"give each hidden layer at least one unit, or () for none.")
    return tuple(int(n) for n in sizes)


def activation_class(activation: str) -> type[nn.Module]:
    if activation not in ACTIVATIONS:
        from pyrovae.errors import UnknownNameError

        raise UnknownNameError(
            f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}."
        )
    return ACTIVATIONS[activation]


def mlp(sizes: list[int], activation: str) -> nn.Sequential:
    act = activation_class(activation)
    check_hidden(sizes)
    layers = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


class MLPEncoder(nn.Module):
    """Maps ``batch + x_shape`` to ``batch + out_shape`` (the guide's ``raw_shape``)."""

    def __init__(self, x_shape, out_shape, hidden=(400,), activation="softplus"):
        super().__init__()
        self.x_shape = tuple(x_shape)
        self.out_shape = tuple(out_shape)
        self.net = mlp([math.prod(self.x_shape), *hidden, math.prod(self.out_shape)], activation)

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


# ---------------------------------------------------------------- convolutional networks

# A 4x4 kernel with stride 2 and padding 1 maps a side of n pixels to floor(n / 2), so
# that every layer halves the image; the transposed layer maps m to 2 m + output_padding.
CONV_KERNEL, CONV_STRIDE, CONV_PADDING = 4, 2, 1
# the default stack halves the image while its smaller side stays at least this
CONV_SMALLEST_SIDE = 4
CONV_NARROW, CONV_WIDE = 32, 64  # channels of the first and second half of the default stack


def image_layout(x_shape, what: str = "the conv network") -> tuple[int, tuple[int, int]]:
    """(channels, (height, width)) of a grey ``(H, W)`` or colour ``(C, H, W)`` image."""
    from pyrovae.errors import PyrovaeError

    x_shape = tuple(x_shape)
    if len(x_shape) == 2:
        return 1, x_shape
    if len(x_shape) == 3:
        return x_shape[0], x_shape[1:]
    raise PyrovaeError(
        f"{what} takes images of shape (H, W) or (C, H, W), but x_shape is {x_shape}; use "
        f"network='mlp' (--network mlp) for data of any other shape.")


def conv_sides(spatial: tuple[int, int], layers: int) -> list[tuple[int, int]]:
    """The (height, width) after each of ``layers`` halving convolutions, the input first.
    Refuses an image too small for them: every side must keep at least one pixel."""
    from pyrovae.errors import PyrovaeError

    smallest = CONV_STRIDE ** layers
    if min(spatial) < smallest:
        fits = int(math.log2(min(spatial))) if min(spatial) >= CONV_STRIDE else 0
        raise PyrovaeError(
            f"an image of {spatial[0]}x{spatial[1]} pixels is too small for {layers} "
            f"stride-2 convolutions, which need at least {smallest} pixels a side; give at "
            f"most {fits} channel widths (--channels), or use network='mlp'." if fits else
            f"an image of {spatial[0]}x{spatial[1]} pixels is too small for a stride-2 "
            f"convolution, which needs at least {CONV_STRIDE} pixels a side; use "
            f"network='mlp' (--network mlp).")
    sides = [tuple(spatial)]
    for _ in range(layers):
        sides.append(tuple(side // CONV_STRIDE for side in sides[-1]))
    return sides


def default_channels(x_shape) -> tuple[int, ...]:
    """One convolution per halving that keeps the smaller side at least
    ``CONV_SMALLEST_SIDE`` pixels (at least one): 28x28 gets two, to 7x7, with (32, 64)
    channels; 64x64 gets four, to 4x4, with (32, 32, 64, 64)."""
    _, spatial = image_layout(x_shape)
    layers, side = 0, min(spatial)
    while side // CONV_STRIDE >= CONV_SMALLEST_SIDE:
        side //= CONV_STRIDE
        layers += 1
    layers = max(layers, 1)
    return tuple(CONV_NARROW if layer < layers // 2 else CONV_WIDE for layer in range(layers))


def check_channels(channels, x_shape) -> tuple[int, ...]:
    """The channel widths as a tuple of positive ints, one per halving convolution;
    None means ``default_channels(x_shape)``."""
    from pyrovae.errors import PyrovaeError

    if channels is None:
        return default_channels(x_shape)
    if not _is_sequence(channels):
        raise PyrovaeError(f"channels must be a list of channel widths such as (32, 64) "
                           f"(--channels 32 64), got {channels!r}.")
    widths = tuple(channels)
    if not widths or not _positive_ints(widths):
        raise PyrovaeError(
            f"channels must be one or more positive integers, one per stride-2 convolution, "
            f"got {list(widths)!r}; e.g. (32, 64) for 28x28 images (--channels 32 64).")
    conv_sides(image_layout(x_shape)[1], len(widths))
    return tuple(int(n) for n in widths)


class ConvEncoder(nn.Module):
    """Strided convolutions that halve the image, then fully connected layers (``hidden``,
    possibly none) to ``out_shape``: ``batch + x_shape`` to ``batch + out_shape``."""

    def __init__(self, x_shape, out_shape, channels=None, hidden=(), activation="relu"):
        super().__init__()
        self.x_shape, self.out_shape = tuple(x_shape), tuple(out_shape)
        self.in_channels, spatial = image_layout(self.x_shape)
        self.channels = check_channels(channels, self.x_shape)
        act = activation_class(activation)
        height, width = conv_sides(spatial, len(self.channels))[-1]
        layers = []
        for c_in, c_out in zip((self.in_channels,) + self.channels[:-1], self.channels):
            layers += [nn.Conv2d(c_in, c_out, CONV_KERNEL, CONV_STRIDE, CONV_PADDING), act()]
        self.conv = nn.Sequential(*layers)
        self.head = mlp([self.channels[-1] * height * width, *check_hidden(hidden),
                         math.prod(self.out_shape)], activation)

    def forward(self, x):
        batch = x.shape[: x.dim() - len(self.x_shape)]
        # a particle dimension in front joins the batch: Conv2d takes one batch dimension
        images = x.reshape(-1, self.in_channels, *self.x_shape[-2:])
        return self.head(self.conv(images).flatten(1)).reshape(*batch, *self.out_shape)


class ConvDecoder(nn.Module):
    """The mirror of ``ConvEncoder``: fully connected layers from z to the smallest image,
    then transposed convolutions that double it back to ``x_shape``, with
    ``num_params`` outputs per pixel: ``batch + (z_dim,)`` to
    ``batch + (num_params,) + x_shape``. Sides that are odd on the way down get an
    output padding of one pixel on the way up, so that any size comes back exactly."""

    def __init__(self, x_shape, z_dim: int, num_params: int, channels=None, hidden=(),
                 activation="relu"):
        super().__init__()
        self.x_shape = tuple(x_shape)
        self.out_shape = (num_params, *self.x_shape)
        in_channels, spatial = image_layout(self.x_shape)
        self.channels = check_channels(channels, self.x_shape)
        act = activation_class(activation)
        sides = conv_sides(spatial, len(self.channels))
        self.smallest = (self.channels[-1], *sides[-1])
        self.head = nn.Sequential(
            mlp([z_dim, *check_hidden(hidden), math.prod(self.smallest)], activation), act())
        widths = (num_params * in_channels,) + self.channels  # width at each side, input first
        layers = []
        for level in reversed(range(len(self.channels))):
            padding = tuple(big - CONV_STRIDE * small
                            for big, small in zip(sides[level], sides[level + 1]))
            layers.append(nn.ConvTranspose2d(widths[level + 1], widths[level], CONV_KERNEL,
                                             CONV_STRIDE, CONV_PADDING, output_padding=padding))
            if level > 0:
                layers.append(act())
        self.deconv = nn.Sequential(*layers)

    def forward(self, z):
        batch = z.shape[:-1]
        features = self.head(z.reshape(-1, z.shape[-1])).reshape(-1, *self.smallest)
        return self.deconv(features).reshape(*batch, *self.out_shape)


NETWORKS = ("mlp", "conv")


def check_network(network: str, channels) -> None:
    from pyrovae.errors import PyrovaeError, UnknownNameError

    if network not in NETWORKS:
        raise UnknownNameError(f"unknown network {network!r}; choose one of {list(NETWORKS)}.")
    if network == "mlp" and channels is not None:
        raise PyrovaeError(f"channels={channels!r} (--channels) sets the widths of the conv "
                           f"network; pass network='conv' (--network conv) with it.")


def make_encoder(network: str, x_shape, out_shape, hidden, activation: str,
                 channels=None) -> nn.Module:
    """The encoder of ``network``, ``"mlp"`` (fully connected) or ``"conv"`` (strided
    convolutions, then the fully connected ``hidden``): ``batch + x_shape`` to
    ``batch + out_shape``."""
    check_network(network, channels)
    if network == "conv":
        return ConvEncoder(x_shape, out_shape, channels, hidden, activation)
    return MLPEncoder(x_shape, out_shape, hidden, activation)


def make_decoder(network: str, x_shape, z_dim: int, num_params: int, hidden, activation: str,
                 channels=None) -> nn.Module:
    """The decoder of ``network``: ``batch + (z_dim,)`` to ``batch + (num_params,) + x_shape``."""
    check_network(network, channels)
    if network == "conv":
        return ConvDecoder(x_shape, z_dim, num_params, channels, hidden, activation)
    return MLPDecoder(x_shape, z_dim, num_params, hidden, activation)


# ---------------------------------------------------------------- stochastic layers


def check_z_dims(z_dim) -> tuple[int, ...]:
    """The sizes of the stochastic layers, from the data upward, as a tuple: an int is
    one layer, a list of ints one layer each (``(100, 50)``: z1 of 100, z2 of 50)."""
    from pyrovae.errors import PyrovaeError

    sizes = (z_dim,) if isinstance(z_dim, numbers.Integral) else z_dim
    if not _is_sequence(sizes):
        raise PyrovaeError(f"--z-dim (z_dim) must be a positive integer, got {z_dim!r}; for "
                           f"several stochastic layers give one per layer from the data upward, "
                           f"e.g. (100, 50) (--z-dim 100 50).")
    sizes = tuple(sizes)
    if not sizes or not _positive_ints(sizes):
        raise PyrovaeError(
            f"--z-dim (z_dim): each stochastic layer's size must be a positive integer, got "
            f"{z_dim!r}; give one, or one per layer from the data upward, e.g. (100, 50) "
            f"(--z-dim 100 50).")
    return tuple(int(n) for n in sizes)


def check_layer_hidden(hidden, layers: int) -> tuple[tuple[int, ...], ...]:
    """The deterministic hidden sizes of each stochastic layer's block, one tuple per
    layer from the data upward: block 1 lies between x and z1, block l between
    z_{l-1} and z_l. A flat list such as ``(200, 200)`` is every block's;
    ``((200, 200), (100, 100))`` gives each block its own."""
    from pyrovae.errors import PyrovaeError

    if not _is_sequence(hidden):
        check_hidden(hidden)  # its message
    entries = tuple(hidden)
    nested = [not isinstance(n, numbers.Integral) and hasattr(n, "__iter__") for n in entries]
    if not any(nested):
        return (check_hidden(entries),) * layers
    if not all(nested) or len(entries) != layers:
        raise PyrovaeError(
            f"hidden={hidden!r}: give one list of hidden sizes for every block (the same for "
            f"all), or one list per stochastic layer ({layers} here, from the data upward), "
            f"e.g. ((200, 200), (100, 100)) (--hidden 200 200 --hidden 100 100).")
    return tuple(check_hidden(block) for block in entries)


# ---------------------------------------------------------------- named architectures


@dataclass(frozen=True)
class Architecture:
    """The sizes of a published network, by name (``VAE.from_arch``, ``--arch``).
    ``channels=None`` takes the conv stack's default for the image size."""

    name: str
    z_dim: int | tuple[int, ...]
    hidden: tuple
    activation: str
    network: str = "mlp"
    channels: tuple[int, ...] | None = None
    source: str = ""

    def settings(self) -> dict:
        """The VAE's keyword arguments for these sizes."""
        settings = {"z_dim": self.z_dim, "hidden": self.hidden, "activation": self.activation,
                    "network": self.network}
        if self.network == "conv":
            settings["channels"] = self.channels
        return settings


ARCHITECTURES = {arch.name: arch for arch in (
    Architecture(
        "kingma-welling", z_dim=20, hidden=(500,), activation="tanh",
        source="Kingma & Welling 2014, MNIST: one hidden layer of 500 tanh units in the "
               "encoder and in the decoder (section 5 and appendix C); they report latent "
               "sizes from 2 to 200, of which 20 is taken here"),
    Architecture(
        "burda-1layer", z_dim=50, hidden=(200, 200), activation="tanh",
        source="Burda et al. 2016, one stochastic layer: 784-200-200-50, tanh"),
    Architecture(
        "burda-2layer", z_dim=(100, 50), hidden=((200, 200), (100, 100)), activation="tanh",
        source="Burda et al. 2016, two stochastic layers: x-200-200-z1(100)-100-100-z2(50), "
               "tanh, the generative side mirrored"),
    Architecture(
        "conv", z_dim=32, hidden=(256,), activation="relu", network="conv",
        source="4x4 stride-2 convolutions (32, 64 channels for 28x28; 32, 32, 64, 64 for "
               "64x64) and one fully connected layer of 256, ReLU, in the style of the "
               "beta-VAE networks (Higgins et al. 2017)"),
)}


def lookup_architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        from pyrovae.errors import UnknownNameError

        raise UnknownNameError(
            f"unknown architecture {name!r}; known architectures are {sorted(ARCHITECTURES)}.")
    return ARCHITECTURES[name]
