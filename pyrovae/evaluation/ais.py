"""Annealed importance sampling (Neal 2001) of log p(x), and BDMC (Grosse et al. 2015).

K independent chains per datapoint follow a geometric path from a normalized
start density f0 to the unnormalized posterior f1(z) = p(x, z):

    pi_b(z)  ∝  f0(z)^(1 - b) f1(z)^b,    0 = b_0 < b_1 < ... < b_T = 1,

with f0 = q(z|x) (``start="guide"``) or f0 = p(z) (``start="prior"``, so that
pi_b ∝ p(z) p(x|z)^b). With z_0 ~ f0, each chain accumulates

    log w = sum_{t=1..T} (b_t - b_{t-1}) [log f1(z_{t-1}) - log f0(z_{t-1})],

where z_t is drawn by an HMC transition that leaves pi_{b_t} invariant
(t = 1..T-1; with T = 1 there is none, and AIS is plain importance sampling).
E[w] = p(x), so log p(x) ~= logsumexp_k log w_k - log K, a stochastic lower
bound; its Monte Carlo standard error and the ESS of the final weights are
those of ``marginal.py``.

Densities. As in ``marginal.log_weights``, the VAE's own Pyro ``model`` and
``guide`` are run under an outer ``pyro.plate("particles", k, dim=-2)``, here
conditioned on the chains' latent values, and the sites' ``log_prob`` are
summed: any prior, guide or likelihood is handled, with no re-derived formula.
Gradients w.r.t. z come from ``torch.autograd.grad``; the networks' parameters
are frozen meanwhile. Latents with constrained support (the support of the
guide's distribution, ``site["fn"].support``) are moved in the unconstrained
space u, z = biject_to(support)(u), and the HMC target is pi_b(z(u)) |dz/du|;
the weights need no Jacobian, as it cancels in pi_b / pi_{b'}.

Flow guides. A guide whose distribution is a ``TransformedDistribution`` (the
``iaf`` guide: a Gaussian base eps pushed through z = T(eps)) scores its own
draws in one network pass per step, as its transforms cache their inputs, but
any other z by inverting each step, one pass per latent dimension. The chains
of such a site move in the base's unconstrained space instead: u maps to eps
by ``biject_to`` of the base's support, and eps to z by T, one forward pass,
and log q(z|x) = log base(eps) - log |dT/d eps| is read from that pass. The
path of densities is the same, only the coordinates the HMC moves in change,
so the weights are those of AIS in z. Under the guide start on MNIST (two flow
steps, z_dim = 50) this makes each density 2 network passes instead of 100.

Transitions. HMC with ``pyro.ops.integrator.velocity_verlet`` and unit mass,
all chains of all datapoints of a pass in one batch, with a step-size tensor of
one value per chain. Step sizes are adapted toward ``target_accept`` on
``pilot_chains`` extra chains per datapoint, whose weights are thrown away: each
pilot has its own step size, and after a transition with MH acceptance
probability a, log eps += adapt_rate (a - target_accept), for its next
transition only. The weighted chains of a datapoint take the geometric mean of
its pilots' step sizes. Their kernels thus depend on the pilots' past alone,
never on their own states, so each transition is an exact pi_b-invariant MH
kernel given that past and the weights stay unbiased. A chain adapted from its
own acceptances, even from past transitions only, is not: its step size then
carries information about where it is, and the estimate came out biased upward
(by about 0.1 nat, in the linear-Gaussian test with a poor guide, T = 50),
above the exact log p(x) that it should bound from below.

Memory and randomness as in ``marginal.py``: passes of at most
``max_elements`` (chain, datapoint) pairs (plus the pilots), ``data_block`` datapoints at a time;
each data block draws from its own RNG stream seeded by (seed, block). With
T = 1 and the guide start, the draws are those of ``log_likelihood`` with the
same ``seed``, ``data_block`` and ``max_elements`` (the same weights, tested).

BDMC (``bdmc``). On data simulated from the model, (z, x) ~ p(z) p(x|z), the
simulated z is an exact draw from p(z|x). AIS run backwards from it (b from 1
down to 0) has weights of mean 1/p(x), so minus the log of their mean is a
stochastic upper bound of log p(x); forward AIS gives a stochastic lower one.
Their gap bounds the error of either estimate on such data.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import pyro
import torch
from pyro import poutine
from pyro.ops.integrator import potential_grad, velocity_verlet
from pyro.distributions.util import scale_and_mask
from torch.distributions import ComposeTransform, TransformedDistribution, biject_to
from tqdm.auto import tqdm

from pyrovae.errors import DataError, PyrovaeError
from pyrovae.evaluation.marginal import (
    DEFAULT_DATA_BLOCK,
    DEFAULT_MAX_ELEMENTS,
    PARTICLE_ALIGNMENT,
    _block_seed,
    data_plate_sites,
    log_likelihood,
    nll_summary,
    weight_statistics,
)
from pyrovae.sites import latent_sites

SCHEDULES = ("sigmoid", "linear")
STARTS = ("guide", "prior")
SIGMOID_DELTA = 4.0  # Wu et al. 2017
DEFAULT_ADAPT_RATE = 0.1
DEFAULT_PILOT_CHAINS = 4
# per-chain step sizes stay in this range, whatever the acceptance history
MIN_STEP_SIZE, MAX_STEP_SIZE = 1e-4, 10.0


@dataclass
class AISEstimate:
    """Per-datapoint results of AIS, float64 tensors of shape (N,).

    ``log_px``: the estimate of log p(x) in nats (a stochastic lower bound).
    ``ess``: effective sample size (sum w)^2 / sum w^2 of the final weights,
    between 1 and K. ``mc_se``: delta-method Monte Carlo standard error of
    ``log_px``. ``acceptance``: the mean HMC acceptance probability of each
    datapoint's chains (NaN for T = 1, which has no transition);
    ``acceptance_rate``: its mean over the data. ``log_weights``: the (K, N)
    final log weights when asked for with ``keep_log_weights=True``.
    """

    num_samples: int
    num_steps: int
    log_px: torch.Tensor
    ess: torch.Tensor
    mc_se: torch.Tensor
    acceptance: torch.Tensor
    acceptance_rate: float
    log_weights: torch.Tensor | None = field(default=None, repr=False)

    def summary(self) -> dict:
        """Means over the data, in nats per datapoint, as plain floats."""
        return {"num_samples": self.num_samples, "num_steps": self.num_steps,
                **nll_summary(self.log_px, self.mc_se, self.ess),
                "acceptance_rate": self.acceptance_rate}


@dataclass
class HMCStep:
    """The result of ``hmc_transition`` for a batch of chains (shape ``batch``).

    ``u`` (batch + (D,)): the new states; ``log_density`` and ``grad``: the target's
    log density and its gradient there; ``aux``: the auxiliary output of the log
    density there (or None); ``accept_prob``: the MH acceptance probability of the
    proposal; ``accepted``: whether it was accepted.
    """

    u: torch.Tensor
    log_density: torch.Tensor
    grad: torch.Tensor
    aux: torch.Tensor | None
    accept_prob: torch.Tensor
    accepted: torch.Tensor


def annealing_schedule(num_steps: int, schedule: str = "sigmoid",
                       delta: float = SIGMOID_DELTA) -> list[float]:
    """b_0 = 0 < b_1 < ... < b_T = 1, as T + 1 Python floats.

    ``"sigmoid"``: b_t = s(delta (2t/T - 1)) rescaled to [0, 1] (Wu et al. 2017),
    dense at both ends; ``"linear"``: b_t = t / T.
    """
    _check_int(num_steps, "num_steps")
    if schedule not in SCHEDULES:
        raise PyrovaeError(f"schedule={schedule!r} is unknown; use one of {list(SCHEDULES)}.")
    if schedule == "linear":
        betas = [t / num_steps for t in range(num_steps + 1)]
    else:
        def sigmoid(a):
            return 1.0 / (1.0 + math.exp(-a))
        low, high = sigmoid(-delta), sigmoid(delta)
        betas = [(sigmoid(delta * (2 * t / num_steps - 1)) - low) / (high - low)
                 for t in range(num_steps + 1)]
    betas[0], betas[-1] = 0.0, 1.0
    return betas


def hmc_transition(log_density, u: torch.Tensor, step_size, num_steps: int = 10, *,
                   log_prob: torch.Tensor | None = None, grad: torch.Tensor | None = None,
                   aux: torch.Tensor | None = None) -> HMCStep:
    """One Hamiltonian Monte Carlo transition (unit mass) of a batch of independent chains.

    ``log_density(u)`` maps states ``u`` of shape batch + (D,) to the target's log
    density, shape ``batch`` (one value per chain, chains independent of each
    other), or to a pair (log density, aux) where ``aux`` (batch + anything) is
    carried along with the state (the AIS weights' terms). ``step_size``: a float
    or a tensor broadcastable to ``u`` (one step size per chain: batch + (1,)).
    ``num_steps`` leapfrog steps by ``pyro.ops.integrator.velocity_verlet``, then
    a Metropolis-Hastings accept or reject; a proposal whose log density is NaN
    is rejected. ``log_prob``, ``grad`` and ``aux`` at ``u``, where known (from the
    previous transition of the same target), save one evaluation.
    """
    _check_int(num_steps, "leapfrog_steps")
    u = u.detach()
    last = {}

    def potential(z):
        out = log_density(z["u"])
        value, extra = out if isinstance(out, tuple) else (out, None)
        last["log_prob"] = value.detach()
        last["aux"] = None if extra is None else extra.detach()
        return -value.sum()

    with torch.enable_grad():
        if log_prob is None or grad is None:
            grads, _ = potential_grad(potential, {"u": u})
            grad, log_prob, aux = -grads["u"], last["log_prob"], last["aux"]
        momentum = torch.randn_like(u)
        new, new_momentum, new_grads, _ = velocity_verlet(
            {"u": u}, {"u": momentum}, potential, _unit_mass_kinetic_grad, step_size,
            num_steps, z_grads={"u": -grad})
    proposal, new_log_prob, new_aux = new["u"].detach(), last["log_prob"], last["aux"]
    log_ratio = ((new_log_prob - 0.5 * new_momentum["u"].square().sum(-1))
                 - (log_prob - 0.5 * momentum.square().sum(-1)))
    log_ratio = torch.where(torch.isnan(log_ratio), -math.inf, log_ratio)
    accept_prob = log_ratio.clamp(max=0).exp()
    accepted = torch.rand_like(accept_prob) < accept_prob
    keep = accepted[..., None]
    return HMCStep(
        u=torch.where(keep, proposal, u),
        log_density=torch.where(accepted, new_log_prob, log_prob),
        grad=torch.where(keep, -new_grads["u"], grad),
        aux=None if aux is None else torch.where(
            accepted.reshape(accepted.shape + (1,) * (aux.dim() - accepted.dim())), new_aux, aux),
        accept_prob=accept_prob,
        accepted=accepted,
    )


def _unit_mass_kinetic_grad(r):
    return r


def ais_log_likelihood(vae, data: torch.Tensor, num_steps: int = 1000, num_samples: int = 16,
                       *, start: str = "guide", schedule: str = "sigmoid",
                       leapfrog_steps: int = 10, step_size: float = 0.05,
                       target_accept: float = 0.65, adapt_rate: float = DEFAULT_ADAPT_RATE,
                       pilot_chains: int = DEFAULT_PILOT_CHAINS,
                       max_elements: int = DEFAULT_MAX_ELEMENTS,
                       data_block: int = DEFAULT_DATA_BLOCK, seed: int = 0,
                       keep_log_weights: bool = False, progress: bool = False,
                       ) -> AISEstimate:
    """Estimate log p(x) of each datapoint by AIS with ``num_samples`` chains of
    ``num_steps`` annealing steps (see the module docstring).

    ``vae`` is anything with Pyro ``model(x)`` and ``guide(x)`` methods whose
    latent sites lie in the data plate at dim -1 (a ``pyrovae.VAE``); ``data`` a
    batch of shape (N, *x_shape). ``step_size`` is each chain's initial HMC step
    size, adapted toward ``target_accept`` at rate ``adapt_rate`` on ``pilot_chains``
    extra chains per datapoint and pass, whose weights are not used (see the module
    docstring; ``adapt_rate=0`` keeps ``step_size`` throughout, with no pilots).
    """
    betas = _check_arguments(vae, data, num_steps, num_samples, start, schedule,
                             leapfrog_steps, step_size, target_accept, adapt_rate,
                             pilot_chains, max_elements, data_block)
    lw, accept, _ = _run(vae, data, betas, num_samples, start=start, init=None,
                      leapfrog_steps=leapfrog_steps, step_size=step_size,
                      target_accept=target_accept, adapt_rate=adapt_rate,
                      pilot_chains=pilot_chains, max_elements=max_elements, data_block=data_block, seed=seed,
                      progress=progress, desc="AIS")
    return _estimate(lw, accept, num_steps, keep_log_weights)


def bdmc(vae, num_simulated: int = 16, num_steps: int = 1000, num_samples: int = 16, *,
         seed: int = 0, is_samples: int = 5000, start: str = "guide",
         schedule: str = "sigmoid", leapfrog_steps: int = 10, step_size: float = 0.05,
         target_accept: float = 0.65, adapt_rate: float = DEFAULT_ADAPT_RATE,
         pilot_chains: int = DEFAULT_PILOT_CHAINS,
         max_elements: int = DEFAULT_MAX_ELEMENTS, data_block: int = DEFAULT_DATA_BLOCK,
         progress: bool = False) -> dict:
    """Bidirectional Monte Carlo on ``num_simulated`` datapoints simulated from the VAE.

    Draws z ~ p(z) and x ~ p(x|z) (``vae.sample_latents``, ``vae.decode``; with
    several stochastic layers every layer, from the top down), then runs forward
    AIS (a stochastic lower bound of log p(x)), reverse AIS from the simulated
    latents (a stochastic upper bound), and importance sampling with the guide and
    ``is_samples`` samples (``log_likelihood``) on the same x.

    Returns a dict: ``x`` and ``z``, the simulated data (``z`` the layer next to
    x), and ``latents``, every latent site's draws by name; per-datapoint float64
    tensors ``lower``, ``upper``, ``gap`` (upper - lower), ``is`` (the IS estimate),
    ``is_below_lower`` (lower - IS, clamped at 0: how far IS falls under the
    interval), ``is_position`` ((IS - lower) / gap: 0 at the lower bound, 1 at
    the upper); ``forward`` and ``is_estimate``, the full estimates; and
    ``summary``, their means over the data as plain floats.
    """
    _check_int(num_simulated, "num_simulated")
    _check_int(is_samples, "is_samples")
    betas = _check_arguments(vae, None, num_steps, num_samples, start, schedule,
                             leapfrog_steps, step_size, target_accept, adapt_rate,
                             pilot_chains, max_elements, data_block)
    device = next(vae.parameters()).device
    was_training = vae.training
    vae.eval()
    try:
        with torch.no_grad(), _forked_rng(device):
            torch.manual_seed(seed)
            # every latent site, drawn ancestrally: with several stochastic layers the
            # reverse chains start from all of them
            latents = vae.sample_latents(num_simulated)
            x = vae.decode(latents[vae.sites[0]]).sample()
    finally:
        vae.train(was_training)
    common = dict(leapfrog_steps=leapfrog_steps, step_size=step_size,
                  target_accept=target_accept, adapt_rate=adapt_rate,
                  pilot_chains=pilot_chains, max_elements=max_elements,
                  data_block=data_block, progress=progress)
    forward_lw, forward_accept, forward_steps = _run(
        vae, x, betas, num_samples, start=start, init=None, seed=seed, desc="BDMC forward",
        **common)
    # the reverse chains start at the simulated z: step sizes tuned on chains started there
    # would depend on it, so they take the forward pilots' step size at each b (a function
    # of x and independent draws only)
    reverse_lw, _, _ = _run(vae, x, betas[::-1], num_samples, start=start, init=latents,
                            seed=seed + 1, desc="BDMC reverse", fixed_steps=forward_steps.flip(0),
                            **common)
    forward = _estimate(forward_lw, forward_accept, num_steps, False)
    reverse = _estimate(reverse_lw, torch.full_like(forward_accept, math.nan), num_steps, False)
    lower = forward.log_px
    upper = -reverse.log_px
    is_estimate = log_likelihood(vae, x, is_samples, max_elements=max_elements,
                                 data_block=data_block, seed=seed + 2)
    gap = upper - lower
    out = {
        "x": x.cpu(), "z": latents[vae.sites[0]].cpu(),
        "latents": {name: value.cpu() for name, value in latents.items()},
        "lower": lower, "upper": upper, "gap": gap, "is": is_estimate.log_px,
        "is_below_lower": (lower - is_estimate.log_px).clamp(min=0),
        "is_position": (is_estimate.log_px - lower) / gap,
        "lower_mc_se": forward.mc_se, "upper_mc_se": reverse.mc_se,
        "forward": forward, "is_estimate": is_estimate,
    }
    out["summary"] = {
        "num_simulated": num_simulated, "num_steps": num_steps, "num_samples": num_samples,
        "is_samples": is_samples,
        **{key: float(out[key].mean()) for key in ("lower", "upper", "gap", "is",
                                                    "is_below_lower")},
        "is_minus_lower": float((is_estimate.log_px - lower).mean()),
        "acceptance_rate": forward.acceptance_rate,
    }
    return out


# ---------------------------------------------------------------- the annealing


class _Path:
    """The terms of the path for one pass: k chains of each datapoint of ``x``.

    The latent sites (names, event shapes, supports) are read from one trace of
    the guide, whose values also start the chains for ``start="guide"``. A state
    is one flat tensor u of shape (k, B, D), the sites' unconstrained values side
    by side.
    """

    def __init__(self, vae, x, k, start, init=None):
        self.vae, self.x, self.k, self.start = vae, x, k, start
        guide_trace = poutine.trace(self._vectorized(vae.guide)).get_trace(x)
        sites = latent_sites(guide_trace)
        if not sites:
            raise PyrovaeError("the guide has no latent sample site; AIS needs one.")
        if init is not None:
            values = {name: value.expand((k,) + value.shape) for name, value in init.items()}
        elif start == "prior":
            model_trace = poutine.trace(self._vectorized(vae.model)).get_trace(x)
            values = {s["name"]: s["value"] for s in latent_sites(model_trace)}
        else:
            values = {s["name"]: s["value"] for s in sites}
        self.names = [s["name"] for s in sites]
        if set(values) != set(self.names):
            raise PyrovaeError(
                f"the latent sites {sorted(values)} differ from the guide's {self.names}; "
                f"model and guide must sample the same latents.")
        # per site: u -> the base's eps (all of the way to z where there is no flow), and
        # the flow eps -> z (None where there is none); the flow is the first guide trace's,
        # conditioned on x, which the guide would build again with the same weights
        self.transforms, self.flows, self.event_shapes, self.sizes = [], [], [], []
        for site in sites:
            value = site["value"]
            if value.shape[:2] != (k, x.shape[0]):
                raise PyrovaeError(
                    f"sample site {site['name']!r} has shape {tuple(value.shape)}, not "
                    f"(particles, datapoints, ...) = ({k}, {x.shape[0]}, ...); put every latent "
                    f"of the model and guide inside the data plate (dim -1).")
            fn = site["fn"]
            flow = ComposeTransform(fn.transforms) \
                if isinstance(fn, TransformedDistribution) and fn.transforms else None
            self.flows.append(flow)
            self.transforms.append(biject_to((fn.base_dist if flow else fn).support))
            self.event_shapes.append(value.shape[2:])
            self.sizes.append(int(math.prod(value.shape[2:])))
        # with the guide start, inverting the flow at its own draws hits its cache
        self.u0 = torch.cat([
            t.inv(values[name] if flow is None else flow.inv(values[name])
                  ).reshape(k, x.shape[0], -1)
            for name, t, flow in zip(self.names, self.transforms, self.flows)], -1).detach()

    def _vectorized(self, fn):
        k = self.k

        def vectorized(*args):
            with pyro.plate("particles", k, dim=-2):
                return fn(*args)
        return vectorized

    def terms(self, u):
        """(log f0, log f1 - log f0, log |dz/du|) at u, each of shape (k, B)."""
        values, log_jacobian, flow_terms = {}, 0.0, {}
        for name, t, flow, shape, part in zip(self.names, self.transforms, self.flows,
                                              self.event_shapes, u.split(self.sizes, -1)):
            part = part.reshape(u.shape[:2] + shape)
            z = t(part)
            ladj = _per_chain(t.log_abs_det_jacobian(part, z))
            if flow is not None:
                eps, z = z, flow(z)
                flow_ladj = _per_chain(flow.log_abs_det_jacobian(eps, z))
                flow_terms[name] = eps, flow_ladj
                ladj = ladj + flow_ladj
            values[name] = z
            log_jacobian = log_jacobian + ladj
        with pyro.validation_enabled(False):  # an overflowing proposal is rejected, not raised
            guide_trace = poutine.trace(poutine.condition(
                self._vectorized(self.vae.guide), data=values)).get_trace(self.x)
            model_trace = poutine.trace(poutine.condition(
                self._vectorized(self.vae.model), data=values)).get_trace(self.x)
        for name, (eps, flow_ladj) in flow_terms.items():
            # log q(z|x) from the forward pass; the trace's own log_prob would invert the flow
            site = guide_trace.nodes[name]
            base = site["fn"].base_dist
            site["unscaled_log_prob"] = _per_chain(base.log_prob(eps)) - flow_ladj
            site["log_prob"] = scale_and_mask(site["unscaled_log_prob"], site["scale"],
                                              site["mask"])
            site["log_prob_sum"] = site["log_prob"].sum()
        log_q = _site_sum(guide_trace, self.names, True)
        log_prior = _site_sum(model_trace, self.names, True)
        log_lik = _site_sum(model_trace, self.names, False)
        if self.start == "guide":
            return log_q, log_prior + log_lik - log_q, log_jacobian
        return log_prior, log_lik, log_jacobian


def _per_chain(terms):
    """Terms of shape (k, B, ...) summed to one value per chain and datapoint, (k, B)."""
    return terms.reshape(terms.shape[:2] + (-1,)).sum(-1)


def _site_sum(trace, names, latent):
    """The sum of the log_probs of the latent sites (``names``) or of the others."""
    with warnings.catch_warnings():  # a diverging proposal (z = inf) is rejected, not reported
        warnings.filterwarnings("ignore", message="Encountered NaN")
        trace.compute_log_prob()
    total = 0.0
    for site in data_plate_sites(trace):
        if (site["name"] in names) == latent:
            total = total + site["log_prob"]
    return total


def _anneal(path, betas, pilots, leapfrog_steps, step_size, target_accept, adapt_rate, bar,
            fixed_steps=None):
    """Anneal the chains of ``path``: the first ``pilots`` of them tune the step size, the
    others are weighted.

    Returns the main chains' log weights (k, B) in float64, their summed acceptance
    probabilities (B,) and the step size of each transition (T - 1, B).

    Step sizes. A pilot chain adapts its own step size from its own acceptances; the
    main chains of a datapoint all take the geometric mean of its pilots' current step
    sizes. A main chain's kernel therefore depends on the pilots' past only, never on
    its own states, and each of its transitions is an exact pi_b-invariant kernel
    given that past: the weights stay unbiased. (Adapting a chain from its own
    acceptances would tie its kernel to where it is; that biased log p(x) upward by
    about 0.1 nat in the linear-Gaussian test.) ``fixed_steps`` (T - 1, B) replaces
    the adaptation (BDMC's reverse chains take the forward chains' step sizes).
    """
    u = path.u0
    with torch.no_grad():
        f0, delta, _ = path.terms(u)
    num_steps = len(betas) - 1
    batch = u.shape[1]
    log_w = torch.zeros(delta[pilots:].shape, dtype=torch.float64, device=delta.device)
    pilot_step = torch.full((pilots, batch, 1), float(step_size), dtype=u.dtype, device=u.device)
    accept_sum = torch.zeros(batch, dtype=torch.float64, device=u.device)
    steps = []
    for t in range(1, num_steps + 1):
        log_w = log_w + (betas[t] - betas[t - 1]) * delta[pilots:].double()
        if t < num_steps:
            if fixed_steps is not None:
                main_step = fixed_steps[t - 1].to(u)[None, :, None]
            elif pilots:
                main_step = pilot_step.log().mean(0, keepdim=True).exp()
            else:
                main_step = torch.full((1, batch, 1), float(step_size), dtype=u.dtype,
                                       device=u.device)
            steps.append(main_step.reshape(batch))
            step = torch.cat([pilot_step, main_step.expand((len(u) - pilots, batch, 1))])

            def log_density(v, beta=betas[t]):
                g0, d, log_jacobian = path.terms(v)
                return g0 + beta * d + log_jacobian, torch.stack([g0, d], -1)

            moved = hmc_transition(log_density, u, step, leapfrog_steps)
            u = moved.u
            f0, delta = moved.aux.unbind(-1)
            accept_sum += moved.accept_prob[pilots:].double().mean(0)
            # for the pilots' next transition; this one already ran with the old step size
            pilot_step = (pilot_step * torch.exp(
                adapt_rate * (moved.accept_prob[:pilots, :, None] - target_accept))
            ).clamp(MIN_STEP_SIZE, MAX_STEP_SIZE)
        bar.update(1)
    steps = torch.stack(steps) if steps else u.new_zeros((0, batch))
    return log_w, accept_sum, steps


def _run(vae, data, betas, num_samples, *, start, init, leapfrog_steps, step_size,
         target_accept, adapt_rate, pilot_chains, max_elements, data_block, seed, progress,
         desc, fixed_steps=None):
    """Log weights (K, N) in float64, the mean acceptance probability of each datapoint,
    and the step sizes of its transitions (T - 1, N) (those of its first pass)."""
    device = next(vae.parameters()).device
    chunk = min(num_samples, max_elements // data_block
                // PARTICLE_ALIGNMENT * PARTICLE_ALIGNMENT)
    num_steps = len(betas) - 1
    adapting = num_steps > 1 and fixed_steps is None and adapt_rate > 0
    pilots = pilot_chains if adapting else 0
    starts = range(0, len(data), data_block)
    passes = len(starts) * math.ceil(num_samples / chunk)
    was_training = vae.training
    frozen = [p for p in vae.parameters() if p.requires_grad]
    vae.eval()
    for p in frozen:
        p.requires_grad_(False)
    weights, accepts, step_parts = [], [], []
    try:
        with tqdm(total=passes * num_steps, desc=desc, disable=not progress) as bar:
            for block, first in enumerate(starts):
                x = data[first:first + data_block].to(device)
                block_init = None if init is None else {
                    name: value[first:first + data_block].to(device)
                    for name, value in init.items()}
                block_steps = None if fixed_steps is None else \
                    fixed_steps[:, first:first + data_block]
                parts, accept, first_steps = [], 0.0, None
                with _forked_rng(device):
                    torch.manual_seed(_block_seed(seed, block))
                    for k in range(0, num_samples, chunk):
                        size = min(chunk, num_samples - k)
                        with torch.no_grad():
                            path = _Path(vae, x, pilots + size, start, block_init)
                        lw, acc, steps = _anneal(path, betas, pilots, leapfrog_steps, step_size,
                                                 target_accept, adapt_rate, bar, block_steps)
                        parts.append(lw)
                        accept = accept + acc * size
                        first_steps = steps if first_steps is None else first_steps
                weights.append(torch.cat(parts).cpu())
                step_parts.append(first_steps.cpu())
                accepts.append((accept / num_samples / (num_steps - 1)).cpu()
                               if num_steps > 1 else torch.full((len(x),), math.nan,
                                                                dtype=torch.float64))
    finally:
        for p in frozen:
            p.requires_grad_(True)
        vae.train(was_training)
    return torch.cat(weights, -1), torch.cat(accepts), torch.cat(step_parts, -1)


def _estimate(lw, accept, num_steps, keep_log_weights) -> AISEstimate:
    log_px, ess, mc_se = weight_statistics(lw)
    return AISEstimate(num_samples=lw.shape[0], num_steps=num_steps, log_px=log_px, ess=ess,
                       mc_se=mc_se, acceptance=accept,
                       acceptance_rate=float(accept.mean()),
                       log_weights=lw if keep_log_weights else None)


def _forked_rng(device):
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


# ---------------------------------------------------------------- checks


def _check_int(value, name):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PyrovaeError(f"{name} must be a positive integer, got {value!r}.")
    return value


def _check_arguments(vae, data, num_steps, num_samples, start, schedule, leapfrog_steps,
                     step_size, target_accept, adapt_rate, pilot_chains, max_elements,
                     data_block):
    _check_int(num_steps, "num_steps")
    _check_int(pilot_chains, "pilot_chains")
    _check_int(num_samples, "num_samples")
    _check_int(leapfrog_steps, "leapfrog_steps")
    _check_int(data_block, "data_block")
    if start not in STARTS:
        raise PyrovaeError(f"start={start!r} is unknown; use one of {list(STARTS)}.")
    betas = annealing_schedule(num_steps, schedule)
    if (isinstance(step_size, bool) or not isinstance(step_size, (int, float))
            or not math.isfinite(step_size) or step_size <= 0):
        raise PyrovaeError(f"step_size must be a positive number, got {step_size!r}.")
    if (isinstance(target_accept, bool) or not isinstance(target_accept, (int, float))
            or not 0 < target_accept < 1):
        raise PyrovaeError(
            f"target_accept must lie strictly between 0 and 1, got {target_accept!r}; "
            f"0.65 is usual for HMC.")
    if (isinstance(adapt_rate, bool) or not isinstance(adapt_rate, (int, float))
            or not math.isfinite(adapt_rate) or adapt_rate < 0):
        raise PyrovaeError(f"adapt_rate must be a number >= 0, got {adapt_rate!r}.")
    if isinstance(max_elements, bool) or not isinstance(max_elements, int) \
            or max_elements < PARTICLE_ALIGNMENT * data_block:
        raise PyrovaeError(
            f"max_elements={max_elements!r} is below {PARTICLE_ALIGNMENT} chains x "
            f"data_block={data_block}; raise max_elements or lower data_block.")
    if data is not None:
        if not isinstance(data, torch.Tensor):
            raise DataError(
                f"data is a {type(data).__module__}.{type(data).__name__}, not a torch.Tensor; "
                f"convert it with torch.as_tensor(x, dtype=torch.float32).")
        if len(data) == 0:
            raise PyrovaeError(
                "data holds no datapoints; pass a batch of shape (N, *x_shape) with N > 0.")
        if hasattr(vae, "check_data"):
            vae.check_data(data)
        else:
            param = next(vae.parameters(), None)
            if param is not None and data.dtype != param.dtype:
                raise DataError(
                    f"data has dtype {data.dtype}, but the model's parameters are "
                    f"{param.dtype}; convert the data with x.to({param.dtype}).")
    return betas
