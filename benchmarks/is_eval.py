"""Benchmark of importance-sampled log p(x) (pyrovae.evaluation.log_likelihood).

Three measurements, on a trained run (``--run``) or a freshly initialised
784-400-20 Bernoulli VAE (timing does not depend on training), with the
MNIST test set binarized once (seed 0):

1. overhead: time of IS evaluation / time of the bare encoder and decoder
   forward passes over the same (particle, image) chunks (target <= 1.3), and
   / time of the same log weights written in plain torch without Pyro;
2. peak memory against K at a fixed ``--max-elements``, each K in a fresh
   process, as the rise of the resident set (Linux VmHWM after resetting it);
3. the full evaluation: ``--num-samples`` K on ``--num-images`` test images.

    PYROVAE_DATA_DIR=/work/shared/data python benchmarks/is_eval.py --json is_eval.json
    python benchmarks/is_eval.py --num-images 500 --skip-memory   # a smaller full run

Prints a table and writes JSON with ``--json PATH``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import pyro
import torch

from pyrovae import VAE, load_dataset
from pyrovae.evaluation.marginal import DEFAULT_DATA_BLOCK, DEFAULT_MAX_ELEMENTS, log_likelihood

MEMORY_KS = (1, 10, 100, 1000, 5000)


def build_model(run: str | None, device: torch.device) -> VAE:
    if run:
        return VAE.load(run, map_location=device).to(device)
    pyro.set_rng_seed(0)
    return VAE((28, 28), z_dim=20, hidden=(400,)).to(device).eval()


def mnist_test(data_dir: str | None, num_images: int) -> torch.Tensor:
    return load_dataset("mnist", data_dir, binarize="dynamic", seed=0).test[:num_images]


@torch.no_grad()
def bare_forward_seconds(vae: VAE, x: torch.Tensor, num_samples: int, max_elements: int) -> float:
    """The encoder once per data block and the decoder on every (particle, image) pair,
    in the same chunks log_likelihood uses, on z drawn beforehand."""
    particle_chunk = min(num_samples, max_elements // DEFAULT_DATA_BLOCK // 16 * 16)
    z = torch.randn(particle_chunk, DEFAULT_DATA_BLOCK, vae.z_dim, device=x.device)
    started = time.perf_counter()
    for start in range(0, len(x), DEFAULT_DATA_BLOCK):
        block = x[start:start + DEFAULT_DATA_BLOCK]
        vae.encoder(block)
        for k in range(0, num_samples, particle_chunk):
            vae.decoder(z[: min(particle_chunk, num_samples - k), : len(block)])
    synchronize(x.device)
    return time.perf_counter() - started


@torch.no_grad()
def direct_torch_seconds(vae: VAE, x: torch.Tensor, num_samples: int, max_elements: int) -> float:
    """The same log weights written directly in torch, without Pyro: sampling and the
    three log densities on top of the forward passes. IS / this = Pyro's own overhead."""
    particle_chunk = min(num_samples, max_elements // DEFAULT_DATA_BLOCK // 16 * 16)
    started = time.perf_counter()
    for start in range(0, len(x), DEFAULT_DATA_BLOCK):
        block = x[start:start + DEFAULT_DATA_BLOCK]
        for k in range(0, num_samples, particle_chunk):
            q = vae.encode(block)
            z = q.sample((min(particle_chunk, num_samples - k),))
            (vae.decode(z).log_prob(block) + vae.prior(z).log_prob(z) - q.log_prob(z)).logsumexp(0)
    synchronize(x.device)
    return time.perf_counter() - started


def is_seconds(vae, x, num_samples, max_elements) -> float:
    started = time.perf_counter()
    log_likelihood(vae, x, num_samples, max_elements=max_elements)
    synchronize(x.device)
    return time.perf_counter() - started


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def overhead(vae, x, num_samples, max_elements, rounds=5) -> dict:
    """Minimum times over ``rounds``; the three are interleaved in each round so that
    load from other processes on a shared machine hits them alike."""
    is_seconds(vae, x[:DEFAULT_DATA_BLOCK], 32, max_elements)  # warm-up: imports, allocator
    timers = {"bare_forward_seconds": bare_forward_seconds,
              "direct_torch_seconds": direct_torch_seconds, "is_seconds": is_seconds}
    best = {name: float("inf") for name in timers}
    for _ in range(rounds):
        for name, timer in timers.items():
            best[name] = min(best[name], timer(vae, x, num_samples, max_elements))
    return {"images": len(x), "num_samples": num_samples, "max_elements": max_elements, **best,
            "ratio": best["is_seconds"] / best["bare_forward_seconds"],
            "ratio_to_direct_torch": best["is_seconds"] / best["direct_torch_seconds"]}


def peak_memory_mb(num_samples: int, num_images: int, max_elements: int, device: str) -> float:
    """Run one evaluation in a fresh process; return its peak memory rise in MiB."""
    code = f"""
import sys; sys.path.insert(0, {os.getcwd()!r}); sys.argv = ['']
import torch, benchmarks.is_eval as b
from pyrovae.evaluation.marginal import pareto_khat
device = torch.device({device!r})
vae = b.build_model(None, device)
x = torch.bernoulli(torch.full(({num_images}, 28, 28), 0.13)).to(device)
pareto_khat(torch.randn(50, 2).double().numpy())  # import arviz before measuring
print(b.measure_peak(lambda: b.log_likelihood(vae, x, {num_samples}, max_elements={max_elements}),
                     device))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def measure_peak(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak resident set, to the current one
    fn()
    return (_status_kib("VmHWM") - before) / 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="a trained run folder (default: a fresh 784-400-20 VAE)")
    p.add_argument("--data-dir", help="folder holding MNIST/raw (default $PYROVAE_DATA_DIR)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-images", type=int, default=10000, help="images for the full run")
    p.add_argument("--num-samples", type=int, default=5000, help="K for the full run")
    p.add_argument("--max-elements", type=int, default=DEFAULT_MAX_ELEMENTS)
    p.add_argument("--overhead-images", type=int, default=128)
    p.add_argument("--overhead-samples", type=int, default=1000)
    p.add_argument("--memory-images", type=int, default=DEFAULT_DATA_BLOCK)
    p.add_argument("--skip-overhead", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-full", action="store_true")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    torch.set_grad_enabled(False)
    vae = build_model(args.run, device)
    x = mnist_test(args.data_dir, max(args.num_images, args.overhead_images)).to(device)
    results = {"device": str(device), "cpu": platform.processor() or platform.machine(),
               "threads": torch.get_num_threads(), "model": "trained run " + args.run if args.run
               else "fresh 784-400-20 bernoulli VAE", "torch": torch.__version__}
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(device)

    if not args.skip_overhead:
        o = overhead(vae, x[:args.overhead_images], args.overhead_samples, args.max_elements)
        results["overhead"] = o
        print(f"overhead: {o['images']} images x K={o['num_samples']}: IS {o['is_seconds']:.2f} s, "
              f"bare encoder+decoder {o['bare_forward_seconds']:.2f} s, ratio {o['ratio']:.2f}; "
              f"same log weights in plain torch {o['direct_torch_seconds']:.2f} s, ratio "
              f"{o['ratio_to_direct_torch']:.2f}")
    if not args.skip_memory:
        rows = []
        print(f"peak memory rise, {args.memory_images} images, max_elements={args.max_elements}:")
        print(f"{'K':>6} {'MiB':>8}")
        for k in MEMORY_KS:
            mb = peak_memory_mb(k, args.memory_images, args.max_elements, args.device)
            rows.append({"num_samples": k, "peak_mb": mb})
            print(f"{k:>6} {mb:>8.1f}")
        results["memory"] = {"images": args.memory_images, "max_elements": args.max_elements,
                             "rows": rows}
    if not args.skip_full:
        seconds = is_seconds(vae, x[:args.num_images], args.num_samples, args.max_elements)
        results["full"] = {"images": args.num_images, "num_samples": args.num_samples,
                           "max_elements": args.max_elements, "seconds": seconds}
        print(f"full: K={args.num_samples} on {args.num_images} MNIST test images: {seconds:.1f} s "
              f"({seconds / args.num_images * 1000:.1f} ms per image)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
