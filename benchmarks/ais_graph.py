"""What recording AIS's density as a graph would save: one evaluation of the path's
terms and their gradient with respect to the state, eager (Pyro traces the model and
guide each time, as ``pyrovae.evaluation.ais`` does) against ``torch.jit.trace`` of the
same function, on a trained run folder. Prints the milliseconds per evaluation and
checks that the outputs and gradients agree. Not part of pyrovae: it measures whether
compiling the density is worth doing (docs/marginal_likelihood.md).

    PYROVAE_DATA_DIR=/work/shared/data python benchmarks/ais_graph.py --run runs/dmnist-iwae50
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from pyrovae.evaluation.ais import _Path
from pyrovae.vae import load_run


def per_evaluation_ms(terms, u, repeats: int) -> tuple[float, torch.Tensor]:
    def once():
        v = u.clone().requires_grad_(True)
        g0, delta, log_jacobian = terms(v)
        (g0 + 0.5 * delta + log_jacobian).sum().backward()  # the density at beta = 1/2
        return v.grad
    for _ in range(3):
        grad = once()
    started = time.perf_counter()
    for _ in range(repeats):
        once()
    return (time.perf_counter() - started) / repeats * 1000, grad


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a trained run folder")
    parser.add_argument("--sizes", nargs="+", default=["1x1", "32x20"],
                        help="images x chains per evaluation")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    vae, data, _ = load_run(args.run)
    vae.eval()
    for p in vae.parameters():
        p.requires_grad_(False)
    print("images x chains   eager ms   graph ms   max |output diff|   max |grad diff|")
    for size in args.sizes:
        images, chains = (int(n) for n in size.split("x"))
        x = data.test[:images].float()
        with torch.no_grad():
            path = _Path(vae, x, chains, "guide")
        u = path.u0.clone()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on Pyro's Python branches
            graph = torch.jit.trace(path.terms, (u,), check_trace=False)
        eager_ms, eager_grad = per_evaluation_ms(path.terms, u, args.repeats)
        graph_ms, graph_grad = per_evaluation_ms(graph, u, args.repeats)
        outputs = max(float((a - b).abs().max()) for a, b in zip(path.terms(u), graph(u)))
        print(f"{size:>15}   {eager_ms:8.2f}   {graph_ms:8.2f}   {outputs:17.3g}   "
              f"{float((eager_grad - graph_grad).abs().max()):15.3g}")


if __name__ == "__main__":
    main()
