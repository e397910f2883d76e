"""How far importance sampling falls below AIS on a trained model, image by image,
and how that relates to PSIS k-hat.

For the first ``--num-images`` test images of a run: IS with K importance samples
(k-hat per image), AIS with about the same number of model evaluations per image
(chains x steps x (leapfrog steps + 1) ~= K), and AIS with a larger budget. AIS is
a stochastic lower bound of log p(x), so where it lies above IS, IS is too low by
at least that much (up to Monte Carlo error). Prints a table and writes JSON.

    python benchmarks/ais_vs_is.py --run RUN --num-images 100 --json out.json
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from pyrovae import load_run
from pyrovae.evaluation import ais_log_likelihood, log_likelihood
from train_speed import environment, write_json  # benchmarks/ is on sys.path

KHAT_BINS = ((-math.inf, 0.5), (0.5, 0.7), (0.7, 1.0), (1.0, math.inf))


def run_ais(vae, x, chains, steps, leapfrog, seed):
    started = time.perf_counter()
    estimate = ais_log_likelihood(vae, x, steps, chains, leapfrog_steps=leapfrog, seed=seed)
    return estimate, time.perf_counter() - started


def compare(is_estimate, ais_estimate) -> dict:
    """Mean of AIS - IS, overall and by k-hat bin, with the standard error over images."""
    difference = ais_estimate.log_px - is_estimate.log_px
    out = {"mean_ais_minus_is": float(difference.mean()),
           "se": float(difference.std() / math.sqrt(len(difference))),
           "correlation_with_khat": float(torch.corrcoef(torch.stack(
               [difference, is_estimate.khat.double()]))[0, 1]),
           "by_khat": {}}
    for low, high in KHAT_BINS:
        chosen = (is_estimate.khat > low) & (is_estimate.khat <= high)
        if chosen.any():
            out["by_khat"][f"({low}, {high}]"] = {
                "images": int(chosen.sum()), "mean_ais_minus_is": float(difference[chosen].mean())}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a run folder written by pyrovae train")
    parser.add_argument("--num-images", type=int, default=100)
    parser.add_argument("--is-samples", type=int, default=5000)
    parser.add_argument("--leapfrog-steps", type=int, default=10)
    parser.add_argument("--large", type=int, nargs=2, default=(16, 1000), metavar=("K", "T"),
                        help="chains and steps of the larger AIS budget (default 16 1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    vae, data, _ = load_run(args.run)
    x = data.test[: args.num_images]
    started = time.perf_counter()
    is_estimate = log_likelihood(vae, x, args.is_samples, seed=args.seed)
    is_seconds = time.perf_counter() - started
    # the same budget: chains x steps x (leapfrog + 1) model evaluations ~= IS samples
    steps = 100
    chains = max(1, round(args.is_samples / (steps * (args.leapfrog_steps + 1))))
    budgets = {"same": (chains, steps), "large": tuple(args.large)}
    rows, results = [], {"environment": environment(args.threads), "run": args.run,
                         "num_images": len(x), "is": {**is_estimate.summary(),
                                                      "seconds": is_seconds}}
    rows.append(("IS", f"K={args.is_samples}", args.is_samples, is_estimate.summary()["nll"],
                 is_seconds))
    for name, (k, t) in budgets.items():
        estimate, seconds = run_ais(vae, x, k, t, args.leapfrog_steps, args.seed)
        evaluations = k * t * (args.leapfrog_steps + 1)
        results[f"ais_{name}"] = {**estimate.summary(), "seconds": seconds,
                                  "model_evaluations_per_image": evaluations,
                                  **compare(is_estimate, estimate)}
        rows.append((f"AIS ({name} budget)", f"K={k} T={t} L={args.leapfrog_steps}",
                     evaluations, estimate.summary()["nll"], seconds))
    print(results["environment"])
    print(f"\n{len(x)} test images of {args.run}; k-hat > 0.7 for "
          f"{100 * results['is']['khat_frac_above_0_7']:.1f}% of them under IS")
    print(f"{'estimator':<20} {'settings':<20} {'evals/image':>12} {'NLL':>9} {'seconds':>8}")
    for name, settings, evaluations, nll, seconds in rows:
        print(f"{name:<20} {settings:<20} {evaluations:>12} {nll:>9.3f} {seconds:>8.1f}")
    for name in budgets:
        c = results[f"ais_{name}"]
        print(f"\nAIS ({name} budget) - IS: {c['mean_ais_minus_is']:+.3f} +- {c['se']:.3f} nats "
              f"per image; correlation with k-hat {c['correlation_with_khat']:+.2f}")
        for interval, row in c["by_khat"].items():
            print(f"  k-hat in {interval}: {row['images']} images, mean "
                  f"{row['mean_ais_minus_is']:+.3f}")
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
