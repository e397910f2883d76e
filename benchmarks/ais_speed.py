"""AIS speed: pyrovae's ``ais_log_likelihood`` against the same AIS written in plain torch.

The model is a trained VAE from a run folder (``--run``, default the 784-200-200-50
tanh MLP of ``/work/runs/mnist-burda50``: normal prior, normal guide, Bernoulli
likelihood), scored on the first ``--num-images`` images of its test set.

Contenders, the same algorithm and the same amount of work:

* ``pyrovae``: ``ais_log_likelihood(vae, x, num_steps=T, num_samples=K,
  leapfrog_steps=L, seed=...)``, with its defaults otherwise (guide start,
  sigmoid schedule, pilot-chain step-size adaptation, HMC by
  ``pyro.ops.integrator.velocity_verlet``, log densities from traces of the
  VAE's Pyro ``model`` and ``guide``).
* ``hand-written``: the same AIS in plain torch, no Pyro, on the same
  ``vae.encoder`` and ``vae.decoder`` modules: log q(z|x) from the encoder's
  loc and softplus(raw) + min_scale scale, log p(z) standard normal,
  log p(x|z) = -BCE-with-logits summed over the pixels; gradients by
  ``torch.autograd.grad``, leapfrog and the MH test by hand. The same
  schedule (``annealing_schedule(T)``), K chains per image plus the same
  pilot chains, adapted by the same rule (each pilot: log eps += rate (a -
  target); the weighted chains take the geometric mean of their image's
  pilots), L leapfrog steps with one fresh gradient at the start of each
  transition (L + 1 gradient evaluations, as pyrovae's), all chains of all
  images of a data block (64) in one batch. The one liberty a torch user
  takes: the encoder runs once per pass (q's loc and scale are fixed), where
  pyrovae re-runs the guide at each density evaluation; that is part of what
  is measured.

Both give an estimate of the mean NLL with a Monte Carlo standard error (the
delta method of ``AISEstimate``); they draw different random numbers, so they
agree within Monte Carlo error, not exactly: the table gives the difference in
units of the combined MC SE.

Time: seconds per image per 1000 annealing steps, the median over ``--rounds``
rounds, the two contenders alternating within a round (the order rotates);
the ratio is the median over rounds of pyrovae / hand-written in a round
(target <= 1.5).

    PYROVAE_DATA_DIR=/work/shared/data python benchmarks/ais_speed.py --quick
    PYROVAE_DATA_DIR=/work/shared/data python benchmarks/ais_speed.py --json ais_speed.json
    python benchmarks/ais_speed.py --device cuda --num-images 512

Prints a table and writes JSON with ``--json PATH``. ``--device cpu cuda`` (the
default) runs on both; the CUDA part prints "skipped" when torch sees no CUDA device.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F

from pyrovae import load_run
from pyrovae.evaluation.ais import (
    DEFAULT_ADAPT_RATE,
    DEFAULT_PILOT_CHAINS,
    MAX_STEP_SIZE,
    MIN_STEP_SIZE,
    ais_log_likelihood,
    annealing_schedule,
)
from pyrovae.evaluation.marginal import DEFAULT_DATA_BLOCK
from train_speed import environment, write_json  # benchmarks/ is on sys.path

STEP_SIZE, TARGET_ACCEPT = 0.05, 0.65  # ais_log_likelihood's defaults


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- the hand-written AIS


class HandWrittenAIS:
    """AIS from q(z|x) to p(x, z) for a VAE with a normal guide, a standard normal prior
    and a Bernoulli likelihood, in plain torch on the VAE's encoder and decoder."""

    def __init__(self, encoder, decoder, min_scale: float, x_dims: int):
        self.encoder, self.decoder = encoder, decoder
        self.min_scale, self.x_dims = min_scale, x_dims

    def log_joint_terms(self, z, x, loc, scale):
        """log q(z|x) and log p(x, z) - log q(z|x), each (k, B)."""
        log_q = (-0.5 * ((z - loc) / scale).square() - scale.log()
                 - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_prior = (-0.5 * z.square() - 0.5 * math.log(2 * math.pi)).sum(-1)
        logits = self.decoder(z).squeeze(-self.x_dims - 1)
        log_lik = -F.binary_cross_entropy_with_logits(
            logits, x.expand(logits.shape), reduction="none").flatten(-self.x_dims).sum(-1)
        return log_q, log_prior + log_lik - log_q

    def anneal(self, x, betas, k, pilots, leapfrog_steps, step_size, target_accept, adapt_rate):
        """Log weights (k - pilots, B) in float64 and the summed acceptance (B,)."""
        raw = self.encoder(x)
        loc, raw_scale = raw.unbind(-2)
        scale = F.softplus(raw_scale) + self.min_scale
        z = loc + scale * torch.randn((k,) + loc.shape, dtype=loc.dtype, device=loc.device)
        batch = x.shape[0]
        f0, delta = self.log_joint_terms(z, x, loc, scale)
        log_w = torch.zeros(delta[pilots:].shape, dtype=torch.float64, device=x.device)
        pilot_step = torch.full((pilots, batch, 1), float(step_size), dtype=z.dtype,
                                device=z.device)
        accept_sum = torch.zeros(batch, dtype=torch.float64, device=x.device)
        num_steps = len(betas) - 1

        def density_and_grad(z, beta):
            z = z.detach().requires_grad_(True)
            g0, d = self.log_joint_terms(z, x, loc, scale)
            value = g0 + beta * d
            (grad,) = torch.autograd.grad(value.sum(), z)
            return value.detach(), grad, g0.detach(), d.detach()

        for t in range(1, num_steps + 1):
            log_w = log_w + (betas[t] - betas[t - 1]) * delta[pilots:].double()
            if t == num_steps:
                break
            beta = betas[t]
            if pilots:
                main_step = pilot_step.log().mean(0, keepdim=True).exp()
            else:
                main_step = torch.full((1, batch, 1), float(step_size), dtype=z.dtype,
                                       device=z.device)
            eps = torch.cat([pilot_step, main_step.expand(k - pilots, batch, 1)])
            with torch.enable_grad():
                log_p, grad, _, _ = density_and_grad(z, beta)
                momentum = torch.randn_like(z)
                z_new, r = z, momentum + 0.5 * eps * grad
                for i in range(leapfrog_steps):
                    z_new = z_new + eps * r
                    new_log_p, new_grad, new_f0, new_delta = density_and_grad(z_new, beta)
                    r = r + (0.5 if i == leapfrog_steps - 1 else 1.0) * eps * new_grad
            log_ratio = ((new_log_p - 0.5 * r.square().sum(-1))
                         - (log_p - 0.5 * momentum.square().sum(-1)))
            log_ratio = torch.where(torch.isnan(log_ratio), -math.inf, log_ratio)
            accept_prob = log_ratio.clamp(max=0).exp()
            accepted = torch.rand_like(accept_prob) < accept_prob
            z = torch.where(accepted[..., None], z_new.detach(), z)
            f0 = torch.where(accepted, new_f0, f0)
            delta = torch.where(accepted, new_delta, delta)
            accept_sum += accept_prob[pilots:].double().mean(0)
            pilot_step = (pilot_step * torch.exp(
                adapt_rate * (accept_prob[:pilots, :, None] - target_accept))
            ).clamp(MIN_STEP_SIZE, MAX_STEP_SIZE)
        return log_w, accept_sum

    def __call__(self, data, num_steps, num_samples, leapfrog_steps, seed,
                 step_size=STEP_SIZE, target_accept=TARGET_ACCEPT,
                 adapt_rate=DEFAULT_ADAPT_RATE, pilot_chains=DEFAULT_PILOT_CHAINS,
                 data_block=DEFAULT_DATA_BLOCK):
        """log p(x) (N,), its MC SE (N,) and the mean acceptance, as ``AISEstimate``'s."""
        betas = annealing_schedule(num_steps)
        pilots = pilot_chains if num_steps > 1 and adapt_rate > 0 else 0
        torch.manual_seed(seed)
        weights, accepts = [], []
        for first in range(0, len(data), data_block):
            x = data[first:first + data_block]
            lw, acc = self.anneal(x, betas, pilots + num_samples, pilots, leapfrog_steps,
                                  step_size, target_accept, adapt_rate)
            weights.append(lw.cpu())
            accepts.append((acc / max(num_steps - 1, 1)).cpu())
        return summarize(torch.cat(weights, -1), torch.cat(accepts))


def summarize(lw, accept) -> dict:
    """Mean NLL and its MC SE from the (K, N) log weights, as ``AISEstimate.summary``."""
    k, n = lw.shape
    lse = torch.logsumexp(lw, 0)
    ess = torch.exp(2 * lse - torch.logsumexp(2 * lw, 0))
    mc_se = ((k / ess - 1).clamp(min=0) / (k - 1)).sqrt()
    log_px = lse - math.log(k)
    return {"nll": float(-log_px.mean()), "nll_mc_se": float(mc_se.square().sum().sqrt() / n),
            "ess_mean": float(ess.mean()), "acceptance_rate": float(accept.mean())}


# ---------------------------------------------------------------- timing


def contenders(vae, x, args):
    """name -> a function(seed) that runs one AIS evaluation and returns its summary."""
    T, K, L = args.num_steps, args.num_samples, args.leapfrog_steps
    hand = HandWrittenAIS(vae.encoder, vae.decoder, vae.guide_family.min_scale,
                          len(vae.x_shape))

    def run_pyrovae(seed):
        s = ais_log_likelihood(vae, x, num_steps=T, num_samples=K, leapfrog_steps=L,
                               seed=seed).summary()
        return {key: s[key] for key in ("nll", "nll_mc_se", "ess_mean", "acceptance_rate")}

    def run_hand(seed):
        params = [p for p in vae.parameters() if p.requires_grad]
        for p in params:  # frozen, as ais_log_likelihood freezes them
            p.requires_grad_(False)
        try:
            return hand(x, T, K, L, seed)
        finally:
            for p in params:
                p.requires_grad_(True)

    return {"pyrovae": run_pyrovae, "hand-written": run_hand}


def measure(vae, x, args) -> dict:
    device = x.device
    runs = contenders(vae, x, args)
    warm_args = argparse.Namespace(**{**vars(args), "num_steps": 3})
    for fn in contenders(vae, x[:2], warm_args).values():  # warm-up: allocator, kernels
        fn(12345)
    names = list(runs)
    seconds = {name: [] for name in names}
    estimates = {name: [] for name in names}
    ratios = []
    for r in range(args.rounds):
        order = names[r % 2:] + names[:r % 2]
        for name in order:
            sync(device)
            started = time.perf_counter()
            est = runs[name](args.seed + r)
            sync(device)
            seconds[name].append(time.perf_counter() - started)
            estimates[name].append(est)
        ratios.append(seconds["pyrovae"][-1] / seconds["hand-written"][-1])
    per = len(x) * args.num_steps / 1000
    rows = {}
    for name in names:
        # the estimates of all rounds pooled: the mean NLL over rounds, its MC SE / sqrt(rounds)
        ests = estimates[name]
        nll = statistics.fmean(e["nll"] for e in ests)
        se = math.sqrt(sum(e["nll_mc_se"] ** 2 for e in ests)) / len(ests)
        rows[name] = {
            "seconds": seconds[name], "median_seconds": statistics.median(seconds[name]),
            "s_per_image_per_1000_steps": statistics.median(seconds[name]) / per,
            "nll": nll, "nll_mc_se": se,
            "ess_mean": statistics.fmean(e["ess_mean"] for e in ests),
            "acceptance_rate": statistics.fmean(e["acceptance_rate"] for e in ests),
            "rounds": ests,
        }
    diff = rows["pyrovae"]["nll"] - rows["hand-written"]["nll"]
    combined = math.hypot(rows["pyrovae"]["nll_mc_se"], rows["hand-written"]["nll_mc_se"])
    return {"device": str(device), "num_images": len(x), "num_steps": args.num_steps,
            "num_samples": args.num_samples, "leapfrog_steps": args.leapfrog_steps,
            "pilot_chains": DEFAULT_PILOT_CHAINS, "rounds": args.rounds,
            "contenders": rows, "ratio": statistics.median(ratios), "ratios": ratios,
            "nll_difference": diff, "nll_difference_in_mc_se": diff / combined}


def print_table(result, title):
    print(f"\n{title}")
    print(f"  {result['num_images']} images, T={result['num_steps']} annealing steps, "
          f"K={result['num_samples']} chains (+{result['pilot_chains']} pilots), "
          f"L={result['leapfrog_steps']} leapfrog steps, median of {result['rounds']} rounds")
    print(f"  {'contender':14} {'s/run':>8} {'s/img/1000 steps':>17} {'NLL':>9} "
          f"{'MC SE':>7} {'ESS':>6} {'accept':>7}")
    for name, row in result["contenders"].items():
        print(f"  {name:14} {row['median_seconds']:8.2f} "
              f"{row['s_per_image_per_1000_steps']:17.3f} {row['nll']:9.3f} "
              f"{row['nll_mc_se']:7.3f} {row['ess_mean']:6.2f} {row['acceptance_rate']:7.3f}")
    print(f"  ratio pyrovae / hand-written: {result['ratio']:.3f} (target <= 1.5; per round "
          + ", ".join(f"{r:.3f}" for r in result["ratios"]) + ")")
    print(f"  NLL difference pyrovae - hand-written: {result['nll_difference']:+.3f} nats "
          f"= {result['nll_difference_in_mc_se']:+.2f} combined MC SE")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="/work/runs/mnist-burda50", help="a trained run folder")
    parser.add_argument("--data-dir", help="folder holding the data (default $PYROVAE_DATA_DIR)")
    parser.add_argument("--device", nargs="+", default=["cpu", "cuda"], choices=["cpu", "cuda"],
                        help="where to run (default both; cuda is skipped when unavailable)")
    parser.add_argument("--num-images", type=int, help="test images (default 32; quick 8)")
    parser.add_argument("--num-steps", type=int, default=100, help="annealing steps T")
    parser.add_argument("--num-samples", type=int, default=16, help="chains per image K")
    parser.add_argument("--leapfrog-steps", type=int, default=10, help="leapfrog steps L")
    parser.add_argument("--rounds", type=int, help="timed rounds (default 3; quick 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--quick", action="store_true", help="8 images, 1 round")
    parser.add_argument("--json", help="write the results to this path")
    args = parser.parse_args(argv)
    args.num_images = args.num_images or (8 if args.quick else 32)
    args.rounds = args.rounds or (1 if args.quick else 3)
    torch.set_num_threads(args.threads)
    env = environment(args.threads)
    print(json.dumps(env))

    vae, data, _ = load_run(args.run, data_dir=args.data_dir)
    x_all = data.test[:args.num_images]
    results = {"environment": env, "run": args.run, "quick": args.quick, "devices": {}}
    for name in args.device:
        if name == "cuda" and not torch.cuda.is_available():
            print("\ncuda: skipped, torch sees no CUDA device.")
            results["devices"]["cuda"] = None
            continue
        device = torch.device(name)
        vae.to(device)
        result = measure(vae, x_all.to(device), args)
        if device.type == "cuda":
            result["gpu"] = torch.cuda.get_device_name(device)
        results["devices"][name] = result
        print_table(result, f"AIS on {name}: pyrovae against a hand-written torch AIS")
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
