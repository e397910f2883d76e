"""Reproduce the literature's MNIST table: one named preset per row.

Each preset fixes the data, binarization, architecture, objective, learning-rate
schedule, epochs and seed, as ``pyrovae train`` flags. A run trains (its test
IWAE bound every few epochs feeds the time-to-quality figure), then evaluates the
checkpoint to report (the best validation epoch where the preset holds a
validation set out, else the last): importance sampling with K = 5000 on the whole
test set, and AIS on the first 1,000 test images. The result goes to
``docs/results/<preset>.json``.

    python benchmarks/reproduce.py --list
    python benchmarks/reproduce.py dmnist-vae --time-budget 3600   # one CPU hour of training
    python benchmarks/reproduce.py dmnist-vae --smoke              # a few steps, end to end
    python benchmarks/reproduce.py --report                        # the table and the figure

Every step is the ``pyrovae`` command that ``--list`` and the JSON show, run in
this process, so that a result can be rerun by hand. ``--time-budget S`` ends
the training after the epoch in which its steps' time reaches S seconds
(``pyrovae train --time-budget``), inside the preset's schedule, and evaluates
that. ``--smoke`` trains one epoch on the first few hundred images of the
preset's data, saved as ``.npy`` files in ``RUNS_DIR/<preset>.smoke-data`` (the
official validation file of static MNIST is then a held-out count), and
evaluates with few samples. ``--evaluate-only`` evaluates a run this script
trained, again, keeping a step it finished whose file is unchanged. ``--resume``
continues a training this script started whose process was stopped (a session's
end), within its time budget, then evaluates it. ``--report``
writes the table of docs/results.md and the figure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pyrovae import load_dataset
from pyrovae.cli import main as pyrovae
from pyrovae.cli.train import EXIT_INTERRUPTED, EXIT_TERMINATED
from pyrovae.atomic import atomic_write_json
from pyrovae.errors import PyrovaeError
from pyrovae.plots import plot_time_to_quality, save
from pyrovae.run import AIS_FILE, EVALUATION_FILE, read_json, read_metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared helpers
from train_speed import environment  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "docs" / "results"
# the time-to-quality figure of each data set's one-layer rows, with the paper's VAE of
# the preset named as the line to beat: one test set's NLL is no measure of another's
FIGURES = {"dmnist-vae": ("time_to_quality.png", "VAE after 3280 epochs"),
           "smnist-vae": ("time_to_quality_static.png", "VAE")}
TRAINING_RECORD_SUFFIX = ".training.json"  # how this script trained a run

IS_SAMPLES = 5000
AIS_IMAGES = 1000
# 8,800 model gradients per image (plus the pilot chains'): about 10 minutes for 1,000
# images of Burda's plain one-layer VAE on one CPU core (docs/marginal_likelihood.md
# measured 5,500 in 6); under an iaf guide the chains move in the flow's base space, one
# forward pass per density where scoring a moved z inverted the flow (100 passes);
# on one H200, IS and AIS of dmnist-best took 182 s together (docs/results.md)
AIS_STEPS = 100
AIS_CHAINS = 8
AIS_LEAPFROG = 10
IWAE_EVERY = 10  # epochs between the test IWAE bounds of the curve
# epochs between the collapse diagnostics: every epoch, they cost a quarter of a Burda
# epoch's steps on the 2-core CPU (benchmarks/epoch_extras.py); the training is the same
DIAGNOSTICS_EVERY = 10
SMOKE = {"train": 300, "test": 100, "is_samples": 25, "is_images": 50, "ais_images": 5,
         "ais_steps": 5, "ais_chains": 2, "val": 50}

# arXiv:1509.00519v4: Table 1 is dynamically binarized MNIST, Table 3 (appendix D) the
# static Larochelle split; both estimate the NLL with 5000 importance samples
BURDA = "Burda, Grosse & Salakhutdinov (2016), Table 1"
BURDA_STATIC = "Burda, Grosse & Salakhutdinov (2016), Table 3"
# clementchadebec/benchmark_VAE, examples/scripts/reproducibility/README.md
PYTHAE = "pythae's reproducibility table"
BURDA_1LAYER = ("--arch", "burda-1layer")
BURDA_2LAYER = ("--arch", "burda-2layer")
MNIST_DYNAMIC = ("--dataset", "mnist", "--binarize", "dynamic")
MNIST_STATIC = ("--dataset", "binarized-mnist")
# the learning-rate schedule of Burda et al.; a shortened run stops inside it
BURDA_SCHEDULE = ("--lr", "0.001", "--lr-schedule", "burda", "--batch-size", "100")
# VampPrior's tanh network collapsed to no active unit in our runs (docs/families.md):
# these presets keep Burda's sizes with ReLU units
VAMP = ("--prior", "vamp", "--activation", "relu")


@dataclass(frozen=True)
class Preset:
    """One row of the table: ``pyrovae train`` flags, and the paper's number to compare."""

    description: str
    data: tuple[str, ...]
    model: tuple[str, ...]
    objective: tuple[str, ...] = ("--elbo", "trace")
    schedule: tuple[str, ...] = BURDA_SCHEDULE
    epochs: int = 3280
    val_size: str | None = None  # --val-size: a count, "official", or None for none
    paper: dict = field(default_factory=dict)  # {"nll": ..., "source": ...}
    pythae: dict = field(default_factory=dict)
    one_layer: bool = True
    gpu_row: bool = False  # a row a CPU cannot reach in an hour: run it where a GPU is lent
    seed: int = 0

    @property
    def dataset(self) -> str:
        return self.data[self.data.index("--dataset") + 1]

    @property
    def binarize(self) -> str:
        return self.data[self.data.index("--binarize") + 1] if "--binarize" in self.data \
            else "static"

    def train_flags(self, epochs: int | None = None) -> list[str]:
        flags = [*self.data, *self.model, *self.objective, *self.schedule,
                 "--epochs", str(epochs or self.epochs), "--seed", str(self.seed),
                 "--iwae-every", str(IWAE_EVERY), "--diagnostics-every", str(DIAGNOSTICS_EVERY)]
        if self.val_size:
            flags += ["--val-size", str(self.val_size)]
        return flags


PRESETS = {
    "dmnist-vae": Preset(
        "dynamic MNIST, 1 stochastic layer, VAE (k = 1)", MNIST_DYNAMIC, BURDA_1LAYER,
        paper={"nll": 86.76, "source": BURDA}),
    "dmnist-iwae5": Preset(
        "dynamic MNIST, 1 stochastic layer, IWAE k = 5", MNIST_DYNAMIC, BURDA_1LAYER,
        objective=("--elbo", "iwae", "--num-particles", "5"),
        paper={"nll": 85.54, "source": BURDA}),
    "dmnist-vamp": Preset(
        "dynamic MNIST, 1 stochastic layer, VampPrior (500 pseudo-inputs), ReLU",
        MNIST_DYNAMIC, BURDA_1LAYER + VAMP),
    "dmnist-iaf": Preset(
        "dynamic MNIST, 1 stochastic layer, IAF guide (2 flows)", MNIST_DYNAMIC,
        BURDA_1LAYER + ("--guide", "iaf")),
    # the best one-layer combination of docs/families.md's 50-epoch MNIST runs
    "dmnist-best": Preset(
        "dynamic MNIST, 1 stochastic layer, IAF guide under the VampPrior, ReLU",
        MNIST_DYNAMIC, BURDA_1LAYER + VAMP + ("--guide", "iaf")),
    "dmnist-2layer-vae": Preset(
        "dynamic MNIST, 2 stochastic layers (100 + 50), VAE (k = 1)", MNIST_DYNAMIC,
        BURDA_2LAYER, paper={"nll": 85.33, "source": BURDA}, one_layer=False),
    "smnist-vae": Preset(
        "static MNIST, 1 stochastic layer, VAE (k = 1), early-stopped on the official "
        "validation set", MNIST_STATIC, BURDA_1LAYER, val_size="official",
        paper={"nll": 88.71, "source": BURDA_STATIC},
        pythae={"nll": 89.78, "source": PYTHAE + ", a 784-400-40 ReLU VAE, 200 samples"}),
    "smnist-best": Preset(
        "static MNIST, 1 stochastic layer, IAF guide under the VampPrior, ReLU, "
        "early-stopped on the official validation set", MNIST_STATIC,
        BURDA_1LAYER + VAMP + ("--guide", "iaf"), val_size="official",
        pythae={"nll": 85.79, "source": PYTHAE + ", VAMP"}),
    "dmnist-iwae50": Preset(
        "dynamic MNIST, 1 stochastic layer, IWAE k = 50", MNIST_DYNAMIC, BURDA_1LAYER,
        objective=("--elbo", "iwae", "--num-particles", "50"),
        paper={"nll": 84.78, "source": BURDA}, gpu_row=True),
    "dmnist-2layer-iwae50": Preset(
        "dynamic MNIST, 2 stochastic layers (100 + 50), IWAE k = 50", MNIST_DYNAMIC,
        BURDA_2LAYER, objective=("--elbo", "iwae", "--num-particles", "50"),
        paper={"nll": 82.90, "source": BURDA}, one_layer=False, gpu_row=True),
    "dmnist-conv": Preset(
        "dynamic MNIST, pyrovae's conv encoder and decoder (our design, no paper row)",
        MNIST_DYNAMIC, ("--arch", "conv"), gpu_row=True),
}


def command(flags: list[str]) -> str:
    return "pyrovae " + " ".join(flags)


def run_pyrovae(flags: list[str]) -> int:
    print(f"$ {command(flags)}", flush=True)
    return pyrovae(flags)


def smoke_data(preset: Preset, folder: Path) -> list[str]:
    """The first few hundred images of the preset's data as .npy files, and the data
    flags that train on them in the preset's place."""
    data = load_dataset(preset.dataset, binarize="none")
    folder.mkdir(parents=True, exist_ok=True)
    train, test = folder / "train.npy", folder / "test.npy"
    np.save(train, data.train[:SMOKE["train"]].numpy())
    np.save(test, data.test[:SMOKE["test"]].numpy())
    binarize = "none" if preset.binarize == "static" else preset.binarize
    return ["--dataset", str(train), "--test", str(test), "--binarize", binarize]


def reproduce(name: str, runs_dir: Path, results_dir: Path, epochs: int | None = None,
              time_budget: float | None = None, smoke: bool = False, device: str = "auto",
              overwrite: bool = False, evaluate_only: bool = False,
              resume: bool = False) -> dict:
    """Train the preset into ``runs_dir/name``, evaluate it, and write
    ``results_dir/name.json``; return what it holds. ``resume`` continues a training
    this script started that was stopped with its process (a session's end), by
    ``pyrovae train --resume``; ``evaluate_only`` evaluates a training this script
    finished (after an evaluation that failed or was stopped, or on another machine)."""
    preset = PRESETS[name]
    run = runs_dir / name
    # beside the run, not in it: the run folder is pyrovae.run's
    record = runs_dir / f"{name}{TRAINING_RECORD_SUFFIX}"
    if evaluate_only or resume:
        training = read_record(record, trained=evaluate_only)
        steps = [] if evaluate_only else [
            ["train", "--resume", "--out", str(run), "--device", device, "--no-progress"]]
    else:
        if run.exists() and not overwrite:
            raise PyrovaeError(f"{run} exists: --resume continues its training, "
                               f"--evaluate-only evaluates it, --overwrite replaces it.")
        epochs = epochs or (1 if smoke else None)
        flags = ["train", *preset.train_flags(epochs), "--out", str(run),
                 "--device", device, "--no-progress"] + (["--overwrite"] if overwrite else []) \
            + (["--time-budget", f"{time_budget:g}"] if time_budget else [])
        if smoke:  # the same flags, on a few hundred of the preset's images
            data = flags.index("--dataset")
            end = flags.index("--binarize", data) + 2 if "--binarize" in flags else data + 2
            flags[data:end] = smoke_data(preset, runs_dir / f"{name}.smoke-data")
            if preset.val_size:
                flags[flags.index("--val-size") + 1] = str(SMOKE["val"])
        # written before the training starts: a training stopped with its process still
        # says what it was, and --resume goes on with it
        training = {"flags": flags, "time_budget": time_budget,
                    "machine": environment(torch.get_num_threads()), "commands": [],
                    "trained": False}
        steps = [flags]
    for step in steps:
        # seconds stay None for a command whose process ended with it (killed, or the
        # session's end); one that Ctrl-C or SIGTERM stopped saved its run, and says so
        training["commands"].append({"command": command(step), "seconds": None,
                                     "machine": environment(torch.get_num_threads())})
        training = _write_record(record, training)
        started = time.perf_counter()
        code = run_pyrovae(step)
        if code in (EXIT_INTERRUPTED, EXIT_TERMINATED):
            training["commands"][-1].update(seconds=time.perf_counter() - started,
                                            stopped=True)
            _write_record(record, training)
            raise PyrovaeError(
                f"{name}: training stopped by Ctrl-C or SIGTERM; its checkpoint is saved, and "
                f"`python benchmarks/reproduce.py {name} --resume` goes on with it.")
        if code != 0:
            raise PyrovaeError(f"{name}: training failed; see above.")
        training["commands"][-1]["seconds"] = time.perf_counter() - started
        training["trained"] = True
        training = _write_record(record, training)
    checkpoint = "best" if preset.val_size else "last"
    evaluate = ["evaluate", str(run), "--checkpoint", checkpoint, "--device", device,
                "--no-progress"]
    is_flags = evaluate + ["--num-samples", str(SMOKE["is_samples"] if smoke else IS_SAMPLES)]
    if smoke:
        is_flags += ["--num-images", str(SMOKE["is_images"]), "--subset-size", "5"]
    ais_flags = evaluate + [
        "--method", "ais", "--num-images", str(SMOKE["ais_images"] if smoke else AIS_IMAGES),
        "--ais-steps", str(SMOKE["ais_steps"] if smoke else AIS_STEPS),
        "--num-samples", str(SMOKE["ais_chains"] if smoke else AIS_CHAINS),
        "--leapfrog-steps", str(AIS_LEAPFROG),
        # all images in one pass: AIS's steps are sequential, and on one H200 the default
        # block of 64 had not finished where one of 1,000 took minutes (docs/results.md)
        "--data-block", str(SMOKE["ais_images"] if smoke else AIS_IMAGES)]
    for step, file in ((is_flags, EVALUATION_FILE), (ais_flags, AIS_FILE)):
        # --evaluate-only keeps a step this script finished, while its file is unchanged:
        # an AIS stopped after a 30-minute IS does not cost the IS again
        done = training.get("evaluated", {}).get(command(step))
        if evaluate_only and done is not None and done == _digest(run / file):
            print(f"{name}: {run / file} is the output of `{command(step)}`; kept",
                  flush=True)
            continue
        if run_pyrovae(step) != 0:
            raise PyrovaeError(f"{name}: `{command(step)}` failed; see above.")
        training.setdefault("evaluated", {})[command(step)] = _digest(run / file)
        training = _write_record(record, training)
    result = summarize(name, preset, run, training, is_flags, ais_flags, smoke)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{name}: NLL {result['nll']:.2f} +- {result['nll_se']:.2f} (IS, K = "
          f"{result['is_samples']}), AIS {result['ais_nll']:.2f} on {result['ais_images']} "
          f"images; {result['epochs']} epochs, {result['train_seconds']:.0f} s of training "
          f"steps. Wrote {path}")
    return result


def summarize(name, preset, run, training, is_flags, ais_flags, smoke) -> dict:
    """The row's JSON; ``training`` is the record of its training (flags, command seconds,
    time budget, machine): the evaluation may have run on another machine."""
    evaluation = read_json(run / EVALUATION_FILE)
    ais = read_json(run / AIS_FILE)
    config = read_json(run / "config.json")["training"]
    metrics = read_metrics(run)
    curve = [{"epoch": m["epoch"], "train_seconds": m["train_seconds"],
              "test_iwae_bound": m["test_iwae_bound"]}
             for m in metrics if "test_iwae_bound" in m]
    # IS minus AIS on AIS's images (the first test images), paired image by image
    ais_log_px = np.array(ais["per_datapoint_log_px"], dtype=float)
    is_log_px = np.array(evaluation["per_datapoint_log_px"][:len(ais_log_px)], dtype=float)
    gap = ais_log_px - is_log_px
    return {
        "preset": name, "description": preset.description, "smoke": smoke,
        "dataset": preset.dataset, "binarize": config["binarize"],
        "device": config["device"] if config["device"] != "auto" else
        ("cuda" if training["machine"]["cuda"] else "cpu"),
        "commands": [command(flags) for flags in (training["flags"], is_flags, ais_flags)],
        "epochs": len(metrics), "planned_epochs": config["epochs"],
        # the steps' time, as the curve's; the command adds the data load, the per-epoch
        # evaluations, the checkpoints and the figures
        "time_budget_seconds": training["time_budget"],
        "train_seconds": metrics[-1]["train_seconds"],
        # None where a command's process ended with it, and was resumed; the epochs' own
        # wall time is in their metrics whichever process ran them
        "train_command_seconds": None if any(c["seconds"] is None for c in
                                             training["commands"])
        else sum(c["seconds"] for c in training["commands"]),
        "train_epochs_seconds": sum(m["seconds"] for m in metrics),
        "train_commands": training["commands"],
        "checkpoint": evaluation["checkpoint"], "checkpoint_epoch": evaluation["checkpoint_epoch"],
        "best_epoch": metrics[-1].get("best_epoch") if metrics else None,
        "nll": evaluation["nll"], "nll_se": evaluation["nll_se"],
        "is_samples": evaluation["num_samples"], "is_images": evaluation["num_datapoints"],
        "elbo": evaluation["elbo"], "khat_frac_above_0_7": evaluation["khat_frac_above_0_7"],
        "ess_mean": evaluation["ess_mean"], "active_units": evaluation.get("active_units"),
        "ais_nll": ais["nll"], "ais_nll_se": ais["nll_se"], "ais_images": ais["num_datapoints"],
        "ais_steps": ais["num_steps"], "ais_chains": ais["num_samples"],
        "is_nll_on_ais_images": float(-is_log_px.mean()),
        "is_minus_ais_on_ais_images": float(gap.mean()),
        "is_minus_ais_se": float(gap.std(ddof=1) / math.sqrt(len(gap))) if len(gap) > 1
        else None,
        "test_iwae_curve": curve, "paper": preset.paper or None, "pythae": preset.pythae or None,
        "machine": training["machine"],
        "evaluation_machine": environment(torch.get_num_threads()),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def report(results_dir: Path) -> str:
    """The markdown table of every result in ``results_dir``, and the time-to-quality
    figure of the one-layer presets beside them."""
    results = [json.loads(p.read_text()) for p in results_dir.glob("*.json")]
    order = list(PRESETS)  # the table's rows in the presets' order, unknown names last
    results = sorted((r for r in results if not r["smoke"]),
                     key=lambda r: (order.index(r["preset"]) if r["preset"] in order
                                    else len(order), r["preset"]))
    lines = ["| preset | command | epochs | training time, hardware | IS NLL ± SE (K = 5000) | "
             "AIS NLL (IS NLL on the same images) | k̂ > 0.7 | paper | pythae |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        hardware = _hardware(r["machine"])
        resumed = r.get("train_commands", [])[1:]
        resumed_on = {_hardware(c["machine"]) for c in resumed} - {hardware}
        if resumed_on:
            hardware += f"; resumed on {', '.join(sorted(resumed_on))}"
        evaluated = _hardware(r.get("evaluation_machine") or r["machine"])
        if evaluated != hardware:
            hardware += f"; evaluated on {evaluated}"
        paper = f"{r['paper']['nll']:.2f} ({r['paper']['source']})" if r["paper"] else "—"
        pythae = f"{r['pythae']['nll']:.2f} ({r['pythae']['source']})" if r["pythae"] else "—"
        flags = [r["preset"]]
        if r["preset"] in PRESETS and r.get("planned_epochs") not in (None,
                                                                      PRESETS[r["preset"]].epochs):
            flags += ["--epochs", str(r["planned_epochs"])]
        if r.get("time_budget_seconds"):
            flags += ["--time-budget", f"{r['time_budget_seconds']:g}"]
        if r["device"] != "cpu":
            flags += ["--device", r["device"]]
        then = f", then `--resume`{f' × {len(resumed)}' if len(resumed) > 1 else ''}" \
            if resumed else ""
        lines.append(
            f"| `{r['preset']}` | `reproduce.py {' '.join(flags)}`{then} | {r['epochs']} | "
            f"{r['train_seconds']:.0f} s, {hardware} | "
            f"{r['nll']:.2f} ± {r['nll_se']:.2f} | {r['ais_nll']:.2f} "
            f"({r['is_nll_on_ais_images']:.2f} on the first {r['ais_images']}) | "
            f"{100 * r['khat_frac_above_0_7']:.1f} % | "
            f"{paper} | {pythae} |")
    for reference, (figure, what) in FIGURES.items():
        data = (PRESETS[reference].dataset, PRESETS[reference].binarize)
        # seconds on a GPU and on the CPU are not the same clock: the label says which
        curves = {f"{r['preset']} ({_hardware(r['machine'])})": r["test_iwae_curve"]
                  for r in results
                  if r["preset"] in PRESETS and PRESETS[r["preset"]].one_layer
                  and (PRESETS[r["preset"]].dataset, PRESETS[r["preset"]].binarize) == data
                  and r["test_iwae_curve"]}
        if curves:
            target = PRESETS[reference].paper
            save(plot_time_to_quality(curves, target["nll"], f"{target['source']}, {what}"),
                 results_dir / figure)
    return "\n".join(lines)


def read_record(record: Path, trained: bool) -> dict:
    """The training record of a run this script started: finished (``trained``), for
    --evaluate-only, or stopped with its process, for --resume."""
    if not record.is_file():
        raise PyrovaeError(f"{record.parent} holds no {record.name}: --evaluate-only and "
                           f"--resume take a run this script started; run the preset "
                           f"without them.")
    training = read_json(record)
    if "command_seconds" in training and "commands" not in training:
        # written before records held their commands: one command, finished
        training["commands"] = [{"command": command(training["flags"]),
                                 "seconds": training.pop("command_seconds"),
                                 "machine": training["machine"]}]
        training["trained"] = True
    missing = {"flags", "time_budget", "machine", "commands", "trained"} - set(training)
    if missing:
        raise PyrovaeError(f"{record} lacks {sorted(missing)}: it was not written by this "
                           f"script; train the preset again.")
    run = record.parent / record.name.removesuffix(TRAINING_RECORD_SUFFIX)
    if trained and not training["trained"]:
        raise PyrovaeError(f"{run} was not trained to its end (its process was stopped): "
                           f"--resume continues it.")
    if not trained and training["trained"]:
        raise PyrovaeError(f"{run} was trained to its end: --evaluate-only evaluates it.")
    return training


def _write_record(record: Path, training: dict) -> dict:
    """Write the training record whole or not at all (it is rewritten after each
    evaluation step); return it as --evaluate-only will read it."""
    atomic_write_json(record, training)
    return read_json(record)


def _digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _hardware(machine: dict) -> str:
    return machine["cuda"] or f"{machine['cores']}-core CPU"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="*", metavar="PRESET", help="presets to run (--list)")
    parser.add_argument("--list", action="store_true", help="show the presets and exit")
    parser.add_argument("--report", action="store_true",
                        help="print the table of the results and write the figure")
    parser.add_argument("--smoke", action="store_true",
                        help="one epoch on a few hundred images, few samples: checks a preset")
    parser.add_argument("--epochs", type=int, help="stop the preset's schedule at this epoch")
    parser.add_argument("--time-budget", type=float, metavar="SECONDS",
                        help="stop the training after this many seconds (as Ctrl-C does)")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/reproduce"))
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier run of the preset in --runs-dir")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="evaluate the preset's run in --runs-dir, trained by this script "
                             "before, without training it again (after an evaluation that "
                             "failed or was stopped)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the preset's training in --runs-dir, started by this "
                             "script and stopped with its process, within its time budget; "
                             "then evaluate it")
    args = parser.parse_args(argv)
    if args.list:
        for name, preset in PRESETS.items():
            paper = f"  [paper: {preset.paper['nll']:.2f}, {preset.paper['source']}]" \
                if preset.paper else ""
            print(f"{name:22} {preset.description}{'  (a GPU row)' if preset.gpu_row else ''}"
                  f"{paper}\n{'':22} {command(['train', *preset.train_flags()])}")
        return 0
    if args.report:
        print(report(args.results_dir))
        return 0
    unknown = [name for name in args.presets if name not in PRESETS]
    if unknown or not args.presets:
        parser.error(f"give one or more presets of {list(PRESETS)} (unknown: {unknown}); "
                     f"--list shows them")
    if args.epochs is not None and args.epochs < 1:
        parser.error(f"--epochs must be a positive number of epochs, got {args.epochs}")
    for flag, given in (("--evaluate-only", args.evaluate_only), ("--resume", args.resume)):
        clash = [other for other, on in (("--epochs", args.epochs), ("--time-budget",
                                         args.time_budget), ("--overwrite", args.overwrite))
                 if on]
        if given and clash:
            parser.error(f"{flag} goes on with a run as it was started: {', '.join(clash)} "
                         f"would change it")
    if args.evaluate_only and args.resume:
        parser.error("--resume trains and then evaluates; --evaluate-only only evaluates: "
                     "give one")
    if args.time_budget is not None and not (args.time_budget > 0 and
                                             math.isfinite(args.time_budget)):
        parser.error(f"--time-budget must be a positive number of seconds, got "
                     f"{args.time_budget}")
    for name in args.presets:
        reproduce(name, args.runs_dir, args.results_dir, args.epochs, args.time_budget,
                  args.smoke, args.device, args.overwrite, args.evaluate_only, args.resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
