"""Flow guides: q(z|x) as a diagonal Gaussian pushed through learned bijections.

``iaf`` is the inverse autoregressive flow of Kingma et al. (2016): the
encoder gives a diagonal Gaussian's loc and scale and a context vector h, and
``flows`` steps of an autoregressive affine transform, each conditioned on h,
reshape the Gaussian's draws. Pyro has the pieces: ``ConditionalAffineAutoregressive``
(the step, in the paper's numerically stable form z' = s z + (1 - s) m, with
the gate s a sigmoid) over ``ConditionalAutoRegressiveNN`` (a MADE network
that also reads h). What pyrovae adds is written in ``IAFDistribution``: a
``log_prob`` that broadcasts like any distribution's, and a copy with every
parameter cut from the graph for the STL and DReG estimators.

Drawing z and scoring one's own draws is one network pass per step (the
transforms cache their inputs). Scoring any other z inverts each step, one
network pass per latent dimension: that is what a mixture prior over flow
components, the mutual information between x and z, and the STL and DReG
estimators pay.
"""

from __future__ import annotations

import numbers

import pyro.distributions as dist
import torch
from pyro.distributions.transforms import AffineAutoregressive, ConditionalAffineAutoregressive
from pyro.nn import ConditionalAutoRegressiveNN
from torch import nn

from pyrovae.errors import PyrovaeError
from pyrovae.families.base import check_count, positive
from pyrovae.families.latent import Guide, register_guide


class IAFDistribution(dist.TransformedDistribution):
    """The q(z|x) of a flow guide: Pyro's ``TransformedDistribution`` with two additions.

    ``log_prob`` first expands its value to the distribution's batch shape: the
    steps' networks read the context of each datapoint, and cannot broadcast a
    value that has a size-1 dimension where the batch has the datapoints (a
    mixture's components, the mutual information's pairs of z and x). A value
    of the full shape is left as it is, so that one's own draws stay cached.

    ``detach_parameters`` is the same distribution with the encoder's outputs and
    the flow's weights detached, which STL and DReG score z with; torch cannot
    rebuild a transformed distribution from its ``arg_constraints``, as it does
    the others (``pyrovae.objectives.elbos.detach_parameters``).
    """

    made_from: tuple | None = None  # (family, loc, scale, context), for detach_parameters

    def log_prob(self, value):
        shape = torch.broadcast_shapes(value.shape[:-1], self.batch_shape)
        if value.shape[:-1] != shape:
            value = value.expand(shape + self.event_shape)
        return super().log_prob(value)

    def expand(self, batch_shape, _instance=None):
        new = super().expand(batch_shape, _instance)
        new.made_from = self.made_from
        return new

    def detach_parameters(self) -> "IAFDistribution":
        family, loc, scale, context = self.made_from
        q = family.make_dist(loc.detach(), scale.detach(), context.detach(), detach_weights=True)
        return q.expand(self.batch_shape) if q.batch_shape != self.batch_shape else q


class _DetachedNet:
    """A step's autoregressive network conditioned on ``context``, its weights detached.

    ``torch.func.functional_call`` runs the module with detached copies of its
    weights each time the transform calls it, which it may do long after this
    object was made (an inversion runs when z is scored).
    """

    def __init__(self, net: ConditionalAutoRegressiveNN, context: torch.Tensor):
        self.net, self.context = net, context
        self.weights = {name: p.detach() for name, p in net.named_parameters()}
        self.permutation = net.permutation  # AffineAutoregressive inverts in this order

    def __call__(self, x):
        return torch.func.functional_call(self.net, self.weights, (x,), {"context": self.context})

    def get_permutation(self):
        return self.permutation


@register_guide
class IAFGuide(Guide):
    """Inverse autoregressive flow (Kingma et al. 2016) on a diagonal Gaussian.

    The encoder gives ``2 z_dim + context`` numbers: the Gaussian's loc and raw
    scale (``softplus + min_scale``), and the context h that every step reads.
    ``flows`` steps follow, each a MADE network with hidden layers ``hidden``
    (every size at least z_dim, which MADE needs to connect every output) that
    gives the step's shift m and gate s from z and h. Consecutive steps run the
    autoregressive order forwards and backwards, as Kingma et al. reverse the
    variables between steps; here it is the networks' own order (their
    ``permutation``), which needs no permutation transform between them.
    The networks are the family's parameters, registered with Pyro by the VAE.
    """

    name = "iaf"

    def __init__(self, z_dim: int, flows: int = 2, hidden=None, context: int | None = None,
                 min_scale: float = 1e-4):
        super().__init__(z_dim, min_scale)
        self.flows = check_count(
            flows, "iaf guide flows (--guide-param flows=N), the number of flow steps,")
        self.context = self.z_dim if context is None else check_count(
            context, "iaf guide context (--guide-param context=N), the size of the context "
                     "vector the encoder gives the flow,")
        self.hidden = (4 * self.z_dim,) if hidden is None else _sizes(hidden, self.z_dim)
        self._settings.update(flows=self.flows, hidden=list(self.hidden), context=self.context)
        orders = [torch.arange(self.z_dim), torch.arange(self.z_dim - 1, -1, -1)]
        self.steps = nn.ModuleList(
            ConditionalAffineAutoregressive(
                ConditionalAutoRegressiveNN(self.z_dim, self.context, list(self.hidden),
                                            permutation=orders[i % 2]),
                stable=True)
            for i in range(self.flows))

    @property
    def raw_shape(self) -> tuple[int, ...]:
        return (2 * self.z_dim + self.context,)

    @property
    def scoring_passes(self) -> int:
        return self.flows * self.z_dim

    def constrain(self, raw):
        loc, raw_scale, context = raw.split([self.z_dim, self.z_dim, self.context], dim=-1)
        return loc, positive(raw_scale, self.min_scale), context

    def make_dist(self, loc, scale, context, detach_weights: bool = False) -> IAFDistribution:
        base = dist.Normal(loc, scale, validate_args=False).to_event(1)
        if detach_weights:
            transforms = [AffineAutoregressive(_DetachedNet(step.nn, context), **step.kwargs)
                          for step in self.steps]
        else:
            transforms = [step.condition(context) for step in self.steps]
        for transform in transforms:
            transform._inverse = _in_dtype_of_value(transform._inverse)
        q = IAFDistribution(base, transforms, validate_args=False)
        q.made_from = (self, loc, scale, context)
        return q


def _in_dtype_of_value(inverse):
    """Pyro's inversion of a step starts from zeros of torch's default dtype, which a
    float64 flow cannot take: it runs here with the value's dtype as the default."""
    def inverse_in_dtype(y):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(y.dtype)
        try:
            return inverse(y)
        finally:
            torch.set_default_dtype(previous)
    return inverse_in_dtype


def _sizes(value, z_dim: int) -> tuple[int, ...]:
    """The flow networks' hidden sizes: a number, a list of numbers, or (from the CLI's
    --guide-param hidden=200,200) a comma-separated string of them."""
    what = "iaf guide hidden (--guide-param hidden=200 or hidden=200,200)"
    if isinstance(value, str):
        try:
            value = [float(part) for part in value.split(",")]
        except ValueError:
            raise PyrovaeError(f"{what} must be sizes separated by commas, got {value!r}.") \
                from None
    elif isinstance(value, numbers.Number):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise PyrovaeError(f"{what} must be one or more layer sizes, got {value!r}.")
    sizes = tuple(check_count(size, f"each size of {what}") for size in value)
    if min(sizes) < z_dim:
        raise PyrovaeError(
            f"{what} has a layer of {min(sizes)} units, fewer than z_dim={z_dim}: the "
            f"autoregressive (MADE) network cannot then connect every output. Give each "
            f"hidden layer at least z_dim units.")
    return sizes
