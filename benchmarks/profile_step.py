"""Where the Pyro tax goes: a ``torch.profiler`` view of one SVI step.

Profiles the hand-written PyTorch step of ``train_speed.py`` (fused Adam) and
pyrovae's compiled step, trace and meanfield ELBO, on the same batch of
binarized MNIST, and prints, per step: the operators' total self time, the
operators pyrovae runs more of or longer than the hand-written step, and the
time of each matrix product by shape, with the two products that make the
784 x 400 weight gradients also timed alone. It also counts the aten nodes of
the recorded graph. Profiler timings carry the profiler's own overhead; they show
where time goes, not how long a step takes (``train_speed.py`` says that).

    PYROVAE_DATA_DIR=/work/shared/data python benchmarks/profile_step.py --json profile.json
"""

from __future__ import annotations

import argparse
import json
import time

import pyro
import torch
from torch.profiler import ProfilerActivity, profile

from pyrovae import load_dataset, make_elbo
from pyrovae.svi import FusedSVI
from train_speed import HandWrittenVAE, environment, pyro_step


def profiled(step, x, steps: int) -> dict:
    """Operator self time (µs per step) and calls per step, keyed by operator and,
    for matrix products, by input shapes."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            step(x)
    ops = {}
    for event in prof.key_averages(group_by_input_shape=True):
        key = event.key
        if key in ("aten::mm", "aten::addmm"):
            key = f"{key} {event.input_shapes}"
        us, calls = ops.get(key, (0.0, 0.0))
        ops[key] = (us + event.self_cpu_time_total / steps, calls + event.count / steps)
    return ops


def weight_gradient_products_alone(batch: int, steps: int) -> dict:
    """µs of the two products that make the 784 x 400 weight gradients, run alone on
    tensors of the steps' shapes and strides (input transposed, as autograd has it)."""
    x, h = torch.rand(batch, 784), torch.rand(batch, 400)
    pairs = {"aten::mm [[784, 128], [128, 400]]": (x.t(), torch.randn(batch, 400)),
             "aten::mm [[400, 128], [128, 784]]": (h.t(), torch.randn(batch, 784))}
    times = {}
    for key, (a, b) in pairs.items():
        for _ in range(10):
            torch.mm(a, b)
        started = time.perf_counter()
        for _ in range(steps):
            torch.mm(a, b)
        times[key.replace("128", str(batch))] = 1e6 * (time.perf_counter() - started) / steps
    return times


def graph_nodes(objective) -> int:
    graph = next(iter(objective._graphs.values()))
    return sum(str(graph.compiled[key].graph).count("aten::") for key in graph.compiled)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=200, help="profiled steps per contender")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=15, help="operator rows to print")
    parser.add_argument("--json", help="write the results to this path")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.bernoulli(load_dataset("mnist", binarize="dynamic", seed=0).train[:args.batch])
    cpu = torch.device("cpu")

    store = pyro.get_param_store()
    results = {"environment": environment(args.threads), "batch": args.batch,
               "steps": args.steps}
    hand = HandWrittenVAE(fused=True).step
    for _ in range(20):
        hand(x)
    results["hand"] = profiled(hand, x, args.steps)
    for elbo in ("trace", "meanfield"):
        with store.scope():
            objective = make_elbo(elbo, jit=True)
            step = pyro_step(elbo, cpu, FusedSVI, fused_optim=True, fused_kernel=True,
                             objective=objective)
            for _ in range(20):
                step(x)
            results[elbo] = profiled(step, x, args.steps)
            results[f"{elbo}_graph_aten_nodes"] = graph_nodes(objective)

    results["weight_gradient_products_alone"] = weight_gradient_products_alone(args.batch,
                                                                               args.steps)
    hand_ops = results["hand"]
    print(json.dumps(results["environment"]))
    print(f"batch {args.batch}, {args.steps} profiled steps each, µs per step")
    print(f"  hand-written, fused Adam: {sum(us for us, _ in hand_ops.values()):8.0f} "
          "operator self time")
    for elbo in ("trace", "meanfield"):
        ops = results[elbo]
        print(f"\npyrovae, compiled {elbo} step: {sum(us for us, _ in ops.values()):8.0f} "
              f"operator self time; recorded graph: {results[f'{elbo}_graph_aten_nodes']} "
              "aten nodes")
        extra = sorted(((us - hand_ops.get(key, (0.0, 0.0))[0], key) for key, (us, _) in
                        ops.items() if not key.startswith("aten::mm") and
                        not key.startswith("aten::addmm")), reverse=True)
        print(f"  {'operator (not matrix products)':60} {'+µs':>8} {'calls':>13}")
        for more, key in extra[:args.top]:
            print(f"  {key[:60]:60} {more:8.1f} {ops[key][1]:6.1f} vs "
                  f"{hand_ops.get(key, (0, 0))[1]:4.1f}")
        print(f"  ... all other operators: "
              f"{sum(more for more, _ in extra[args.top:]):.1f} µs more")
        print(f"  {'matrix product':60} {'µs':>8} {'hand µs':>9}")
        for key in sorted(k for k in ops if k.startswith(("aten::mm", "aten::addmm"))):
            print(f"  {key[:60]:60} {ops[key][0]:8.1f} {hand_ops.get(key, (0, 0))[0]:9.1f}")
    print("\nthe two weight-gradient products run alone (µs each):")
    for key, us in results["weight_gradient_products_alone"].items():
        print(f"  {key:60} {us:8.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
