"""What each per-epoch extra of a training run costs beside its steps: the test ELBO, the
validation ELBO, the collapse diagnostics and the test IWAE bound, timed on the run's own
weights and data, against the median epoch of steps from its metrics.json. It says what
``--diagnostics-every`` and ``--iwae-every`` save (docs/results.md). It writes nothing
into the run folder.

    OMP_NUM_THREADS=2 PYROVAE_DATA_DIR=/work/shared/data python benchmarks/epoch_extras.py \\
        --run runs/smnist-vae --repeats 3 --json docs/benchmark_runs/epoch_extras_smnist_vae.json
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from pyrovae.run import read_metrics
from pyrovae.training import Trainer, default_callbacks
from train_speed import environment, write_json  # benchmarks/ is on sys.path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a trained run folder")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the table here")
    args = parser.parse_args(argv)
    trainer = Trainer.resume(args.run, progress=False, device="cpu")
    trainer.out = None  # ValidationELBO would write best.pt: this measures, it keeps nothing
    # every extra, due in every epoch (each reads its period from the config it is built with)
    config = dataclasses.replace(trainer.config, diagnostics_every=1, iwae_every=1)
    rows = {}
    for callback in default_callbacks(config):
        seconds = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            callback.on_epoch_end(trainer, {"epoch": trainer.epoch})
            seconds.append(time.perf_counter() - started)
        rows[type(callback).__name__] = statistics.median(seconds)
    metrics = read_metrics(args.run)
    timed = [m for m in metrics if "train_seconds" in m]
    # the steps' clock is kept at the IWAE bound's epochs: their differences over the epochs
    steps = statistics.median((b["train_seconds"] - a["train_seconds"]) / (b["epoch"] - a["epoch"])
                              for a, b in zip(timed, timed[1:]))
    print(f"{args.run}: threads {torch.get_num_threads()}, median of {args.repeats}")
    print(f"{'per epoch':<22}{'seconds':>9}{'share of the steps':>20}")
    print(f"{'steps (metrics.json)':<22}{steps:9.2f}{'':>20}")
    for name, seconds in rows.items():
        print(f"{name:<22}{seconds:9.2f}{seconds / steps:19.0%}")
    write_json(args.json, {"run": str(args.run), "repeats": args.repeats,
                           "environment": environment(torch.get_num_threads()),
                           "steps_seconds_per_epoch": steps, "extras_seconds": rows})


if __name__ == "__main__":
    main()
