"""Importance-sampled log p(x), one estimate per datapoint, at any number of samples.

    log p(x) ~= logsumexp_k [log p(x, z_k) - log q(z_k | x)] - log K,   z_k ~ q(z | x)

Pyro has no per-datapoint answer at scale: ``vectorized_importance_weights``
sums over the data plate (one weight per particle) and ``Importance`` runs the
particles one by one. Here the VAE's own Pyro ``model`` and ``guide`` are run
under an outer ``pyro.plate("particles", k, dim=-2)``, so each sample site's
``log_prob`` has shape ``(k, B)``: any prior, guide or likelihood is handled,
a user's own included, with no re-derived formula.

Memory. Work is cut into passes of at most ``max_elements`` (particle,
datapoint) pairs: ``data_block`` datapoints at a time, with as many particles
per pass as fit. PSIS needs all K log weights of a datapoint at once, so each
data block keeps a ``(K, data_block)`` buffer of log weights as well (K = 5000,
data_block = 64: 1.3 MB in float32). Peak memory is therefore about
``max_elements`` times the networks' activation bytes per sample, plus that
buffer, whatever K is.

Randomness. Each data block draws from its own RNG stream, seeded by
``(seed, index of the block)``, and its particle passes consume that stream in
order, in multiples of 16 particles. On CPU, for guides that draw one kind of
random number per sample (the normal, laplace and lognormal guides), the
estimates are therefore bit-identical for any ``max_elements`` (tested): they
depend on ``seed`` and ``data_block`` only, and the first n datapoints get the
same estimates whether or not more follow (n a multiple of ``data_block``).
A guide that draws two kinds in turn (the student-t guide: normals, then
chi-square variates) interleaves them differently when the passes change, and
on CUDA random streams do not split this way at all: there the estimates
agree within Monte Carlo noise.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import pyro
import torch
from pyro import poutine
from tqdm.auto import tqdm

from pyrovae.errors import DataError, PyrovaeError
from pyrovae.evaluation.diagnostics import import_arviz
from pyrovae.run import EVALUATION_FILE  # noqa: F401  (re-exported for one release)
from pyrovae.sites import sample_sites

DEFAULT_MAX_ELEMENTS = 2**14
DEFAULT_DATA_BLOCK = 64
# CPU Box-Muller fills normals in groups of 16: passes whose draw counts are
# multiples of 16 split one random stream exactly as a single pass would.
PARTICLE_ALIGNMENT = 16
# arviz's PSIS fits the Pareto tail to ceil(min(K/5, 3 sqrt(K))) weights and
# needs more than 4 of them.
MIN_SAMPLES_FOR_KHAT = 21
KHAT_THRESHOLD = 0.7
# float32 rounding of log p(x, z) - log q(z|x) for an exact guide stays far below this
CONSTANT_WEIGHTS_TOL = 1e-3
IWAE_CURVE_KS = (1, 10, 100, 1000, 5000)


@dataclass
class LogLikelihoodEstimate:
    """Per-datapoint results of importance sampling, float64 tensors of shape (N,).

    ``log_px``: the estimate of log p(x) in nats. ``ess``: effective sample size
    (sum w)^2 / sum w^2, between 1 and K. ``mc_se``: Monte Carlo standard error
    of ``log_px``. ``khat``: PSIS Pareto k-hat (NaN for K < 21). ``elbo``: the
    mean log weight, the ELBO estimated with K samples. ``log_weights``: the
    (K, N) log weights when asked for with ``keep_log_weights=True``.
    """

    num_samples: int
    log_px: torch.Tensor
    ess: torch.Tensor
    mc_se: torch.Tensor
    khat: torch.Tensor
    elbo: torch.Tensor
    log_weights: torch.Tensor | None = None

    def summary(self) -> dict:
        """Means over the data, in nats per datapoint, as plain floats."""
        khat = self.khat[~torch.isnan(self.khat)]
        finite_khat = khat[torch.isfinite(khat)]
        return {
            "num_samples": self.num_samples,
            **nll_summary(self.log_px, self.mc_se, self.ess),
            "elbo": float(self.elbo.mean()),
            "khat_mean": float(finite_khat.mean()) if len(finite_khat) else float("nan"),
            "khat_max": float(khat.max()) if len(khat) else float("nan"),
            "khat_frac_above_0_7": float((khat > KHAT_THRESHOLD).double().mean())
            if len(khat) else float("nan"),
        }


def nll_summary(log_px: torch.Tensor, mc_se: torch.Tensor, ess: torch.Tensor) -> dict:
    """The data means of an estimator's per-datapoint results, as plain floats: the NLL,
    its standard error over the data and its Monte Carlo one, and the ESS."""
    n = len(log_px)
    nll = -log_px
    return {
        "num_datapoints": n,
        "nll": float(nll.mean()),
        "nll_se": float(nll.std() / math.sqrt(n)) if n > 1 else float("nan"),
        "nll_mc_se": float(mc_se.square().sum().sqrt() / n),
        "ess_mean": float(ess.mean()),
        "ess_min": float(ess.min()),
    }


def data_plate_sites(trace):
    """The sample sites of ``trace``, each checked to lie in the data plate (dim -1), so
    that its log_prob holds one term per datapoint."""
    for site in sample_sites(trace):
        if not any(frame.dim == -1 for frame in site["cond_indep_stack"]):
            raise PyrovaeError(
                f"sample site {site['name']!r} lies outside the data plate (dim -1), so it is "
                f"not one value per datapoint and log p(x) does not split over the data; "
                f"put every latent of the model and guide inside the data plate.")
        yield site


def weight_statistics(lw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log p(x) = logsumexp - log K, the ESS and the Monte Carlo standard error of
    log p(x), per column of the log weights ``lw`` (K, B)."""
    k = lw.shape[0]
    lse = torch.logsumexp(lw, 0)
    ess = torch.exp(2 * lse - torch.logsumexp(2 * lw, 0))
    # Delta method: se(log mean w) ~= sd(w) / (sqrt(K) mean(w)), and with the
    # unbiased variance sd(w)^2 / mean(w)^2 = (K / ESS - 1) K / (K - 1).
    mc_se = ((k / ess - 1).clamp(min=0) / (k - 1)).sqrt() if k > 1 else torch.full_like(ess, math.nan)
    return lse - math.log(k), ess, mc_se


def log_weights(model, guide, x: torch.Tensor, num_particles: int) -> torch.Tensor:
    """log p(x, z_k) - log q(z_k | x) with z_k ~ guide, shape (num_particles, B).

    ``model`` and ``guide`` are Pyro functions of ``x`` whose data plate is at
    dim -1; they run vectorized under a particle plate at dim -2.
    """
    def in_particle_plate(fn):
        def vectorized(*args):
            with pyro.plate("particles", num_particles, dim=-2):
                return fn(*args)
        return vectorized

    guide_trace = poutine.trace(in_particle_plate(guide)).get_trace(x)
    model_trace = poutine.trace(
        poutine.replay(in_particle_plate(model), trace=guide_trace)).get_trace(x)
    total = x.new_zeros(num_particles, x.shape[0])
    for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
        trace.compute_log_prob()
        for site in data_plate_sites(trace):
            total = total + sign * site["log_prob"]
    return total


@torch.no_grad()
def log_likelihood(vae, data: torch.Tensor, num_samples: int = 5000, *,
                   max_elements: int = DEFAULT_MAX_ELEMENTS,
                   data_block: int = DEFAULT_DATA_BLOCK, seed: int = 0,
                   keep_log_weights: bool = False, progress: bool = False,
                   ) -> LogLikelihoodEstimate:
    """Estimate log p(x) of each datapoint with ``num_samples`` importance samples from q(z|x).

    ``vae`` is anything with Pyro ``model(x)`` and ``guide(x)`` methods and
    parameters on one device (a ``pyrovae.VAE``); ``data`` is a batch of shape
    (N, *x_shape), moved block by block to that device. See the module
    docstring for how ``max_elements`` bounds memory and how ``seed`` and
    ``data_block`` fix the result.
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise PyrovaeError(f"num_samples must be a positive integer, got {num_samples!r}.")
    if not isinstance(data_block, int) or data_block < 1:
        raise PyrovaeError(f"data_block must be a positive integer, got {data_block!r}.")
    if max_elements < PARTICLE_ALIGNMENT * data_block:
        raise PyrovaeError(
            f"max_elements={max_elements} is below {PARTICLE_ALIGNMENT} particles x "
            f"data_block={data_block}; raise max_elements or lower data_block.")
    if not isinstance(data, torch.Tensor):
        raise DataError(
            f"data is a {type(data).__module__}.{type(data).__name__}, not a torch.Tensor; "
            f"convert it with torch.as_tensor(x, dtype=torch.float32).")
    if len(data) == 0:
        raise PyrovaeError("data holds no datapoints; pass a batch of shape (N, *x_shape) with N > 0.")
    if hasattr(vae, "check_data"):
        vae.check_data(data)
    else:  # a model of the user's own: at least the dtype its parameters have
        param = next(vae.parameters(), None)
        if param is not None and data.dtype != param.dtype:
            raise DataError(
                f"data has dtype {data.dtype}, but the model's parameters are {param.dtype}; "
                f"convert the data with x.to({param.dtype}).")
    if num_samples < MIN_SAMPLES_FOR_KHAT:
        warnings.warn(f"num_samples={num_samples} is too few for PSIS k-hat (needs "
                      f"{MIN_SAMPLES_FOR_KHAT}); khat is NaN.", stacklevel=2)
    device = next(vae.parameters()).device
    particle_chunk = min(num_samples, max_elements // data_block
                         // PARTICLE_ALIGNMENT * PARTICLE_ALIGNMENT)
    was_training = vae.training
    vae.eval()
    parts = []
    starts = range(0, len(data), data_block)
    try:
        for block, start in enumerate(tqdm(starts, desc="log p(x)", disable=not progress)):
            x = data[start:start + data_block].to(device)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(_block_seed(seed, block))
                lw = torch.cat([log_weights(vae.model, vae.guide, x, min(particle_chunk, num_samples - k))
                                for k in range(0, num_samples, particle_chunk)])
            parts.append(_per_datapoint(lw.double(), keep_log_weights))
    finally:
        vae.train(was_training)
    fields = {key: torch.cat([p[key] for p in parts], dim=-1) for key in parts[0]}
    return LogLikelihoodEstimate(num_samples=num_samples, **fields)


def _block_seed(seed: int, block: int) -> int:
    return int(np.random.SeedSequence([seed, block]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _per_datapoint(lw: torch.Tensor, keep_log_weights: bool) -> dict:
    """Estimates from log weights of shape (K, B), all in float64."""
    log_px, ess, mc_se = weight_statistics(lw)
    out = {
        "log_px": log_px.cpu(),
        "ess": ess.cpu(),
        "mc_se": mc_se.cpu(),
        "khat": torch.from_numpy(pareto_khat(lw.cpu().numpy())),
        "elbo": lw.mean(0).cpu(),
    }
    if keep_log_weights:
        out["log_weights"] = lw.cpu()
    return out


def pareto_khat(log_weights: np.ndarray) -> np.ndarray:
    """ArviZ's PSIS k-hat of each column of ``log_weights`` (K, B); NaN for K < 21.

    Weights equal to within ``CONSTANT_WEIGHTS_TOL`` nats (an exact guide, up to
    float rounding) have no tail to fit, and arviz would call the fit failed
    (inf): their k-hat is reported as -inf, the limit of a bounded ratio.
    """
    num_samples, b = log_weights.shape
    if num_samples < MIN_SAMPLES_FOR_KHAT:
        return np.full(b, np.nan)
    spread = log_weights.max(0) - log_weights.min(0)
    _, khat = import_arviz().psislw(np.ascontiguousarray(log_weights.T), reff=1.0)
    return np.where(spread < CONSTANT_WEIGHTS_TOL, -np.inf, khat)


def iwae_bounds(log_weights: torch.Tensor, ks=IWAE_CURVE_KS) -> dict[int, float]:
    """Unbiased estimates of the IWAE bound E[log mean of k weights], averaged over data.

    ``log_weights`` (K, N) is cut into K // k disjoint groups of k particles for
    each k <= K; the bound of each group is averaged, so one set of K samples
    gives the whole curve. Ks above K are left out.
    """
    total = log_weights.shape[0]
    bounds = {}
    for k in ks:
        if k > total:
            continue
        groups = log_weights[: total // k * k].reshape(total // k, k, -1)
        bounds[int(k)] = float((torch.logsumexp(groups, 1) - math.log(k)).mean())
    return bounds
