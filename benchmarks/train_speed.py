"""Training speed: pyrovae against a hand-written PyTorch VAE and Pyro's VAE example.

(a) The Pyro tax: the time of one pyrovae SVI step (``FusedSVI`` with
    ``FusedOptim`` and the compiled objective, as the trainer runs it; the
    eager objective beside it) over the time of one step of a
    hand-written PyTorch VAE with the same networks (784-400-20 MLPs with
    softplus, Bernoulli likelihood, analytic Gaussian KL), at batch 128 and
    1024, for the ``trace`` and the ``meanfield`` ELBO. The tax is taken
    against the hand-written step with the optimizer pyrovae's trainer uses
    (torch's fused Adam); the same step with torch's default Adam, as most
    hand-written loops have it, is timed beside it. Plain
    ``pyro.infer.SVI`` with ``pyro.optim.Adam`` on the same VAE is timed
    beside them, and (without ``--quick``) each of pyrovae's changes alone.
(b) One MNIST epoch of pyrovae's ``Trainer`` against Pyro's example pipeline
    (examples/vae/vae.py rebuilt here): torchvision MNIST through a
    ``DataLoader`` with ``ToTensor``, batch 256, a 784-400-50 MLP,
    ``Trace_ELBO``, ``pyro.optim.Adam({"lr": 1e-3})``. Both train on
    dynamically binarized MNIST (the example's transform draws each item's
    pixels with ``torch.bernoulli``, as pyrovae's ``--binarize dynamic`` does
    per batch) and both are scored on the same once-binarized test set.
(c) On a CUDA device: images per second of (a) and (b) at batch 128, 1024
    and 4096. Skipped when torch sees no CUDA device.
(d) The data check's cost (``--check-cost`` runs it alone): what the check of
    ``VAE.model`` and ``VAE.guide`` costs a step at batch 128 and 1024, with
    Pyro's validation on (every plain ``SVI`` step and ``FusedSVI``'s first:
    shape, dtype, device, and every value once for finiteness and the
    likelihood's support) and off (``FusedSVI``'s later steps: no pass over
    the values), against the plain SVI step and pyrovae's step.

Contenders alternate within one process (the order rotates every round), so
that load from other jobs hits them alike; the tables give medians, and each
ratio in (a) is the median over rounds of the ratio of the two times in a round.

    PYROVAE_DATA_DIR=/work/shared/data python benchmarks/train_speed.py --json train_speed.json
    PYROVAE_DATA_DIR=/work/shared/data python benchmarks/train_speed.py --quick
    PYROVAE_DATA_DIR=/work/shared/data python benchmarks/train_speed.py --check-cost
    PYROVAE_DATA_DIR=/work/shared/data python benchmarks/train_speed.py --networks

(e) The networks (``--networks`` runs it alone): pyrovae's step (as the trainer
    runs it, compiled) at batch 128 on MNIST for the default MLP, the conv network
    (``--network conv``), and the named architectures ``conv``, ``burda-1layer``
    and ``burda-2layer``, each with its ratio to the MLP step within a round.
(f) The data paths (``--data-paths`` runs it alone): images per second of the
    whole-tensor path and of the streaming path (a ``DataLoader`` reading a ``.npy``
    file through ``np.load(mmap_mode="r")``, or a folder of PNGs) on MNIST, with 0
    and 1 loader processes: reading an epoch's batches (dynamically binarized)
    alone, and training an epoch (compiled step, batch 128). The data are the first
    ``--data-images`` MNIST training images, written as a .npy file and as PNGs
    into a temporary folder of the cache folder.

    PYROVAE_DATA_DIR=/work/shared/data python benchmarks/train_speed.py --data-paths

(g) The families (``--families`` runs it alone): pyrovae's step (as the trainer runs
    it, compiled) on MNIST with 784-200-200-50 tanh networks at batch 100, for the
    normal guide and prior, the ``full-normal`` and ``iaf`` guides and the ``mog``
    and ``vamp`` priors (their defaults), and the ``iaf`` guide under the ``vamp``
    prior (its components the flow's Gaussian base), each with its ratio to the
    normal step within a round; and, timed alone for a few steps with the process's
    peak memory, the ``iaf`` guide under a ``vamp`` prior of 20 exact components.

    PYROVAE_DATA_DIR=/work/shared/data python benchmarks/train_speed.py --families
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.infer import SVI, JitTrace_ELBO, Trace_ELBO
from torch import nn

from pyrovae import VAE, load_dataset
from pyrovae.data import default_cache_dir
from pyrovae.families.likelihoods import BernoulliLikelihood
from pyrovae.objectives import make_elbo
from pyrovae.svi import FusedOptim, FusedSVI
from pyrovae.training import Trainer, TrainConfig

TAX_BATCHES = (128, 1024)
GPU_BATCHES = (128, 1024, 4096)
PIPELINE_BATCH = 256


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- (a) the Pyro tax


class HandWrittenVAE(nn.Module):
    """The step a PyTorch user writes: same layers as pyrovae's MLPs, one torch Adam
    (torch's default implementation, or with ``fused=True`` the one pyrovae's trainer uses)."""

    def __init__(self, z_dim: int = 20, hidden: int = 400, lr: float = 1e-3, fused: bool = False):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(784, hidden), nn.Softplus(),
                                     nn.Linear(hidden, 2 * z_dim))
        self.decoder = nn.Sequential(nn.Linear(z_dim, hidden), nn.Softplus(),
                                     nn.Linear(hidden, 784))
        self.optimizer = None
        self.lr = lr
        self.fused = fused

    def step(self, x: torch.Tensor) -> float:
        if self.optimizer is None:
            self.optimizer = torch.optim.Adam(self.parameters(), lr=self.lr, fused=self.fused)
        x = x.reshape(len(x), -1)
        loc, raw_scale = self.encoder(x).chunk(2, dim=-1)
        scale = F.softplus(raw_scale) + 1e-4  # pyrovae's normal guide
        z = loc + scale * torch.randn_like(loc)
        nll = F.binary_cross_entropy_with_logits(self.decoder(z), x, reduction="sum")
        kl = (0.5 * (loc**2 + scale**2 - 1) - scale.log()).sum()
        loss = nll + kl
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return loss.item()


class TorchBernoulli(BernoulliLikelihood):
    """pyrovae's bernoulli likelihood as it was before it was tuned: torch's
    ``Independent(Bernoulli)``, fed through ``unbind``."""

    def forward(self, raw):
        return self.make_dist(*raw.unbind(-3)).to_event(2)


def pyro_step(elbo_name: str, device, svi_class=SVI, fused_optim=False, validation=True,
              likelihood="bernoulli", fused_kernel=False, jit=False, objective=None):
    """An SVI step on pyrovae's VAE; the defaults are plain Pyro."""
    vae = VAE((28, 28), z_dim=20, hidden=(400,), likelihood=likelihood).to(device)
    optim = (FusedOptim(torch.optim.Adam, {"lr": 1e-3, "fused": fused_kernel}) if fused_optim
             else pyro.optim.Adam({"lr": 1e-3}))
    objective = objective or make_elbo(elbo_name, jit=jit)
    svi = svi_class(vae.model, vae.guide, optim, objective)

    def step(x):
        with pyro.validation_enabled(validation):
            return svi.step(x)
    return step


def tax_contenders(elbo_name: str, device, ablations: bool) -> dict:
    contenders = {
        "hand-written torch": HandWrittenVAE().to(device).step,
        "hand-written torch, fused Adam": HandWrittenVAE(fused=True).to(device).step,
        "plain pyro SVI": pyro_step(elbo_name, device),
        "pyrovae": pyro_step(elbo_name, device, FusedSVI, fused_optim=True, fused_kernel=True,
                             jit=True),
        "  pyrovae, eager step": pyro_step(elbo_name, device, FusedSVI, fused_optim=True,
                                           fused_kernel=True),
    }
    if ablations and elbo_name == "trace":
        # Pyro's JitTraceMeanField_ELBO is left out: on this VAE it runs the networks three
        # times a step (12 matrix products where 4 are needed), which says nothing of the JIT
        contenders["  pyrovae, Pyro's JitTrace_ELBO"] = pyro_step(
            elbo_name, device, FusedSVI, fused_optim=True, fused_kernel=True,
            objective=JitTrace_ELBO(max_plate_nesting=1, ignore_jit_warnings=True))
    if ablations:
        contenders.update({
            "  pyrovae, eager, default Adam": pyro_step(elbo_name, device, FusedSVI, True),
            "  SVI + validation off": pyro_step(elbo_name, device, validation=False),
            "  SVI + FusedOptim": pyro_step(elbo_name, device, fused_optim=True),
            "  FusedSVI + pyro.optim.Adam": pyro_step(elbo_name, device, FusedSVI),
            "  pyrovae, untuned likelihood": pyro_step(elbo_name, device, FusedSVI, True,
                                                       likelihood=TorchBernoulli((28, 28))),
            "  plain pyro SVI, untuned lik.": pyro_step(elbo_name, device,
                                                        likelihood=TorchBernoulli((28, 28))),
        })
    return contenders


def time_alternating(contenders: dict, x, device, rounds: int, steps: int,
                     warmup: int) -> dict[str, list[float]]:
    """Seconds per step of each contender, one value per round; the order rotates.

    The contenders' VAEs register the same param names, so each one runs in a param
    store of its own (Pyro's ``ParamStoreDict.scope``); else they would train one
    shared set, and a compiled step would read another contender's parameters.
    """
    store = pyro.get_param_store()
    scopes = {}
    for name, step in contenders.items():
        with store.scope() as scopes[name]:
            for _ in range(warmup):
                step(x)
    names = list(contenders)
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            with store.scope(scopes[name]):
                sync(device)
                started = time.perf_counter()
                for _ in range(steps):
                    contenders[name](x)
                sync(device)
            times[name].append((time.perf_counter() - started) / steps)
    return times


def measure_tax(batches, device, args, x_all) -> list[dict]:
    rows = []
    for batch in batches:
        x = x_all[:batch].to(device)
        steps = max(2, args.step_budget // batch)
        for elbo_name in ("trace", "meanfield"):
            torch.manual_seed(0)
            times = time_alternating(tax_contenders(elbo_name, device, not args.quick), x,
                                     device, args.rounds, steps, args.warmup)
            # the tax: against the hand-written step with the same (fused) optimizer. Each
            # ratio is the median over rounds of the ratio within a round, so that a slow
            # drift of the machine's speed over the run cancels
            hand = times["hand-written torch, fused Adam"]
            tutorial = times["hand-written torch"]
            for name, values in times.items():
                median = statistics.median(values)
                rows.append({"batch": batch, "elbo": elbo_name, "contender": name.strip(),
                             "ms_per_step": 1000 * median, "images_per_s": batch / median,
                             "ratio_to_hand": paired_ratio(values, hand),
                             "ratio_to_default_adam_hand": paired_ratio(values, tutorial),
                             "rounds": len(values),
                             "steps_per_round": steps})
    return rows


def paired_ratio(times: list[float], reference: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(times, reference))


# ---------------------------------------------------------------- (d) the data check


def measure_check_cost(batches, device, args, x_all) -> list[dict]:
    """Milliseconds a step spends in the data check of ``VAE.model`` and ``VAE.guide``,
    with Pyro's validation on and off, beside the plain SVI step (validation on, as
    the README's loop runs) and pyrovae's step (validation off after the first)."""
    rows = []
    for batch in batches:
        x = x_all[:batch].to(device)
        steps = max(2, args.step_budget // batch)
        vae = VAE((28, 28), z_dim=20, hidden=(400,)).to(device)

        def data_check(validation):
            def run(x):
                with pyro.validation_enabled(validation):
                    vae._last_checked = None  # a fresh batch, as every step gets
                    vae._check_step_data(x)  # the guide's: reads the values
                    vae._check_step_data(x)  # the model's: finds the same tensor checked
            return run

        torch.manual_seed(0)
        times = time_alternating({
            "plain pyro SVI": pyro_step("trace", device),
            "pyrovae": pyro_step("trace", device, FusedSVI, fused_optim=True, fused_kernel=True,
                                 jit=True),
            "check, validation on": data_check(True),
            "check, validation off": data_check(False),
        }, x, device, args.rounds, steps, args.warmup)
        on, off = times["check, validation on"], times["check, validation off"]
        rows.append({
            "batch": batch,
            "check_validation_on_ms": 1000 * statistics.median(on),
            "check_validation_off_ms": 1000 * statistics.median(off),
            "plain_svi_step_ms": 1000 * statistics.median(times["plain pyro SVI"]),
            "pyrovae_step_ms": 1000 * statistics.median(times["pyrovae"]),
            "on_over_plain_svi_step": paired_ratio(on, times["plain pyro SVI"]),
            "on_over_pyrovae_step": paired_ratio(on, times["pyrovae"]),
            "off_over_pyrovae_step": paired_ratio(off, times["pyrovae"]),
            "rounds": len(on), "steps_per_round": steps,
        })
    return rows


def print_check_cost(rows, title):
    print(f"\n{title}")
    print("  (on: shape, dtype, device, finiteness and support, as with Pyro's validation on; "
          "off: no pass over the values)")
    print(f"{'batch':>6} {'on ms':>8} {'off ms':>8} {'SVI ms':>8} {'pyrovae ms':>10} "
          f"{'on/SVI':>7} {'on/pyrovae':>10} {'off/pyrovae':>11}")
    for r in rows:
        print(f"{r['batch']:>6} {r['check_validation_on_ms']:8.3f} "
              f"{r['check_validation_off_ms']:8.3f} {r['plain_svi_step_ms']:8.2f} "
              f"{r['pyrovae_step_ms']:10.2f} {r['on_over_plain_svi_step']:7.2%} "
              f"{r['on_over_pyrovae_step']:10.2%} {r['off_over_pyrovae_step']:11.2%}")


# ---------------------------------------------------------------- (e) the networks

NETWORK_BATCH = 128
NETWORK_CONTENDERS = {  # name: the VAE's settings beyond x_shape
    "mlp (default)": {},
    "conv (--network conv)": {"network": "conv"},
    "arch conv": "conv",
    "arch burda-1layer": "burda-1layer",
    "arch burda-2layer": "burda-2layer",
}


def measure_networks(device, args, x_all) -> list[dict]:
    """Milliseconds per compiled trace-ELBO step of each network at batch 128, the
    contenders alternating within each round, and each one's ratio to the MLP step."""
    x = x_all[:NETWORK_BATCH].to(device)
    steps = max(2, args.step_budget // NETWORK_BATCH)
    contenders, sizes = {}, {}
    for name, settings in NETWORK_CONTENDERS.items():
        torch.manual_seed(0)
        vae = (VAE.from_arch(settings, (28, 28)) if isinstance(settings, str)
               else VAE((28, 28), **settings)).to(device)
        sizes[name] = sum(p.numel() for p in vae.parameters())
        optim = FusedOptim(torch.optim.Adam, {"lr": 1e-3, "fused": True})
        contenders[name] = FusedSVI(vae.model, vae.guide, optim, make_elbo("trace", jit=True)).step
    times = time_alternating(contenders, x, device, args.rounds, steps, args.warmup)
    mlp = times["mlp (default)"]
    return [{"contender": name, "batch": NETWORK_BATCH, "parameters": sizes[name],
             "ms_per_step": 1000 * statistics.median(values),
             "ratio_to_mlp": paired_ratio(values, mlp), "rounds": len(values),
             "steps_per_round": steps} for name, values in times.items()]


def print_networks(rows, title):
    print(f"\n{title}")
    print(f"{'network':<24} {'parameters':>10} {'ms/step':>8} {'x mlp':>6}")
    for r in rows:
        print(f"{r['contender']:<24} {r['parameters']:>10} {r['ms_per_step']:8.1f} "
              f"{r['ratio_to_mlp']:6.2f}")


# ---------------------------------------------------------------- (f) the data paths

DATA_PATH_BATCH = 128


def data_path_contenders(folder) -> dict:
    """name: how to load the data set of that path (grey values, dynamic binarization)."""
    npy, pngs = folder / "mnist.npy", folder / "pngs"

    def loader(path, stream, workers=0):
        return lambda: load_dataset(path, binarize="dynamic", seed=0, stream=stream,
                                    num_workers=workers)
    return {
        "whole tensor (.npy)": loader(npy, False),
        "stream .npy, 0 workers": loader(npy, True, 0),
        "stream .npy, 1 worker": loader(npy, True, 1),
        "stream PNGs, 0 workers": loader(pngs, True, 0),
        "stream PNGs, 1 worker": loader(pngs, True, 1),
    }


def write_mnist_files(folder, images: torch.Tensor) -> None:
    """MNIST's grey values as a .npy file, and as 8-bit PNGs (their values exactly)."""
    import numpy as np
    from PIL import Image

    np.save(folder / "mnist.npy", images.numpy())
    (folder / "pngs").mkdir()
    for i, image in enumerate((images * 255).round().to(torch.uint8).numpy()):
        Image.fromarray(image).save(folder / "pngs" / f"{i:05d}.png")


def measure_data_paths(args, images: torch.Tensor) -> list[dict]:
    """Images per second of each data path: an epoch of batches read alone, and an epoch
    of training (the second of two, so that the compiled graph is recorded already);
    the contenders alternate within each round, medians over the rounds."""
    import tempfile

    cache = default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as name:
        folder = Path(name)
        write_mnist_files(folder, images)
        contenders = data_path_contenders(folder)
        read, train = ({name: [] for name in contenders} for _ in range(2))
        names = list(contenders)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                data = contenders[name]()
                generator = torch.Generator().manual_seed(r)
                started = time.perf_counter()
                seen = sum(len(x) for x in data.train_batches(DATA_PATH_BATCH, generator))
                read[name].append(seen / (time.perf_counter() - started))
                pyro.set_rng_seed(0)
                vae = VAE(data.x_shape)
                config = TrainConfig(dataset=str(folder / "mnist.npy"), binarize="dynamic",
                                     epochs=2, batch_size=DATA_PATH_BATCH, device="cpu")
                metrics = Trainer(vae, data, config, progress=False, callbacks=[]).fit()
                train[name].append(seen / metrics[-1]["seconds"])
    whole = "whole tensor (.npy)"
    return [{"contender": name, "train_images": len(data.train), "batch": DATA_PATH_BATCH,
             "read_images_per_s": statistics.median(read[name]),
             "train_images_per_s": statistics.median(train[name]),
             "train_ratio_to_whole": statistics.median(
                 a / b for a, b in zip(train[name], train[whole])),
             "rounds": args.rounds} for name in names]


def print_data_paths(rows, title):
    print(f"\n{title}")
    print(f"{'path':<26} {'read img/s':>11} {'train img/s':>12} {'train x whole':>14}")
    for r in rows:
        print(f"{r['contender']:<26} {r['read_images_per_s']:11.0f} "
              f"{r['train_images_per_s']:12.0f} {r['train_ratio_to_whole']:14.3f}")


# ---------------------------------------------------------------- (b) the example pipeline


class ExampleEncoder(nn.Module):
    """examples/vae/vae.py (Pyro 1.9), unchanged."""

    def __init__(self, z_dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(784, hidden_dim)
        self.fc21 = nn.Linear(hidden_dim, z_dim)
        self.fc22 = nn.Linear(hidden_dim, z_dim)
        self.softplus = nn.Softplus()

    def forward(self, x):
        x = x.reshape(-1, 784)
        hidden = self.softplus(self.fc1(x))
        return self.fc21(hidden), torch.exp(self.fc22(hidden))


class ExampleDecoder(nn.Module):
    def __init__(self, z_dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(z_dim, hidden_dim)
        self.fc21 = nn.Linear(hidden_dim, 784)
        self.softplus = nn.Softplus()
        self.sigmoid = nn.Sigmoid()

    def forward(self, z):
        hidden = self.softplus(self.fc1(z))
        return self.sigmoid(self.fc21(hidden))


class ExampleVAE(nn.Module):
    def __init__(self, z_dim=50, hidden_dim=400):
        super().__init__()
        self.encoder = ExampleEncoder(z_dim, hidden_dim)
        self.decoder = ExampleDecoder(z_dim, hidden_dim)
        self.z_dim = z_dim

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z_loc = x.new_zeros(torch.Size((x.shape[0], self.z_dim)))
            z_scale = x.new_ones(torch.Size((x.shape[0], self.z_dim)))
            z = pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))
            loc_img = self.decoder(z)
            pyro.sample("obs", dist.Bernoulli(loc_img, validate_args=False).to_event(1),
                        obs=x.reshape(-1, 784))

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            z_loc, z_scale = self.encoder(x)
            pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))


class BinarizeEachItem:
    """The example's transform plus a Bernoulli draw of the pixels, item by item."""

    def __call__(self, x):
        return torch.bernoulli(x)


def example_loader(num_train: int | None, batch_size: int):
    from torchvision.datasets import MNIST
    from torchvision.transforms import Compose, ToTensor

    transform = Compose([ToTensor(), BinarizeEachItem()])
    data_dir = os.environ.get("PYROVAE_DATA_DIR")
    # the folder pyrovae's loader read from: data_dir when it holds the extracted
    # files, else the cache it extracted them into
    for root in ([data_dir] if data_dir else []) + [default_cache_dir()]:
        try:
            train = MNIST(root, train=True, transform=transform, download=False)
            break
        except RuntimeError:
            continue
    else:
        sys.exit("MNIST not found: set PYROVAE_DATA_DIR to the folder holding MNIST/raw.")
    if num_train is not None:
        train = torch.utils.data.Subset(train, range(num_train))
    return torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True, num_workers=0)


def example_epoch(loader, device, test: torch.Tensor) -> tuple[float, float]:
    """One epoch of the example's training loop; seconds, and the test ELBO after it."""
    pyro.clear_param_store()
    vae = ExampleVAE().to(device)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    sync(device)
    started = time.perf_counter()
    for x, _ in loader:
        svi.step(x.to(device))
    sync(device)
    seconds = time.perf_counter() - started
    with torch.no_grad():
        loss = sum(svi.evaluate_loss(x) for x in test.split(PIPELINE_BATCH))
    return seconds, -loss / len(test)


def pyrovae_epoch(data, device, batch_size: int) -> tuple[float, float, float]:
    """One epoch of pyrovae's Trainer; seconds of ``fit`` (its test ELBO and diagnostics
    included), seconds of the training steps alone, and the test ELBO."""
    vae = VAE((28, 28), z_dim=50, hidden=(400,))
    config = TrainConfig(dataset="mnist", binarize="dynamic", elbo="trace", epochs=1,
                         batch_size=batch_size, lr=1e-3, seed=int(torch.randint(2**31, ())),
                         device=str(device))
    trainer = Trainer(vae, data, config, progress=False)
    train_epoch, train_seconds = trainer._train_epoch, []

    def timed(*args):
        sync(device)
        started = time.perf_counter()
        result = train_epoch(*args)
        sync(device)
        train_seconds.append(time.perf_counter() - started)
        return result
    trainer._train_epoch = timed
    sync(device)
    started = time.perf_counter()
    metrics = trainer.fit()
    sync(device)
    return time.perf_counter() - started, train_seconds[0], metrics[-1]["test_elbo"]


def measure_pipeline(device, args, data, batch_size=PIPELINE_BATCH) -> dict:
    num_train = len(data.train)
    loader = example_loader(num_train if num_train < 60000 else None, batch_size)
    test = data.test.to(device)
    example, ours = [], []
    for r in range(args.epochs):
        order = [0, 1] if r % 2 == 0 else [1, 0]
        for which in order:
            torch.manual_seed(1000 + r)
            if which == 0:
                example.append(example_epoch(loader, device, test))
            else:
                ours.append(pyrovae_epoch(data, device, batch_size))
    example_s = statistics.median(s for s, _ in example)
    ours_fit = statistics.median(s for s, _, _ in ours)
    ours_train = statistics.median(s for _, s, _ in ours)
    return {
        "batch": batch_size, "train_images": num_train, "epochs_timed": args.epochs,
        "example_seconds": example_s, "pyrovae_fit_seconds": ours_fit,
        "pyrovae_train_seconds": ours_train,
        "speedup_train": example_s / ours_train, "speedup_fit": example_s / ours_fit,
        "example_test_elbo": [e for _, e in example],
        "pyrovae_test_elbo": [e for _, _, e in ours],
    }


# ---------------------------------------------------------------- (g) the families

FAMILY_BATCH = 100
FAMILY_NETWORK = {"z_dim": 50, "hidden": (200, 200), "activation": "tanh"}  # Burda et al.
FAMILY_CONTENDERS = {  # name: the VAE's families; the normal guide and prior first
    "normal guide, normal prior": {},
    "full-normal guide": {"guide": "full-normal"},
    "iaf guide (2 flows)": {"guide": "iaf"},
    "mog prior (10 components)": {"prior": "mog"},
    "vamp prior (500 components)": {"prior": "vamp"},
    "iaf guide, vamp prior (500 Gaussian-base components)": {"guide": "iaf", "prior": "vamp"},
}
# exact iaf components (flow_components="exact"): 500 ran out of memory (18.7 GB) on a
# 23 GB machine
FAMILY_IAF_VAMP_COMPONENTS = 20


def measure_families(device, args, x_all) -> list[dict]:
    """Milliseconds per SVI step, as the trainer runs it (compiled trace ELBO, fused
    Adam), of each guide and prior family on MNIST with Burda et al.'s one-layer
    networks (784-200-200-50, tanh) at batch 100, the contenders alternating within
    each round, and each one's ratio to the normal guide and prior within a round."""
    x = x_all[:FAMILY_BATCH].to(device)
    steps = max(2, args.step_budget // FAMILY_BATCH)
    contenders = {}
    for name, families in FAMILY_CONTENDERS.items():
        torch.manual_seed(0)
        vae = VAE((28, 28), **FAMILY_NETWORK, **families).to(device)
        vae.prior.initialize(x_all.to(device))
        optim = FusedOptim(torch.optim.Adam, {"lr": 1e-3, "fused": True})
        contenders[name] = FusedSVI(vae.model, vae.guide, optim, make_elbo("trace", jit=True)).step
    times = time_alternating(contenders, x, device, args.rounds, steps, args.warmup)
    normal = times["normal guide, normal prior"]
    rows = [{"contender": name, "batch": FAMILY_BATCH,
             "ms_per_step": 1000 * statistics.median(values),
             "ratio_to_normal": paired_ratio(values, normal), "rounds": len(values),
             "steps_per_round": steps} for name, values in times.items()]
    # vamp over iaf components inverts the flow for every pair of z and pseudo-input:
    # some hundred times the step, so a few steps alone (and its memory), not in the rounds
    pyro.clear_param_store()
    torch.manual_seed(0)
    vae = VAE((28, 28), **FAMILY_NETWORK, guide="iaf", prior="vamp",
              prior_kwargs={"components": FAMILY_IAF_VAMP_COMPONENTS,
                            "flow_components": "exact"}).to(device)
    vae.prior.initialize(x_all.to(device))
    step = FusedSVI(vae.model, vae.guide, FusedOptim(torch.optim.Adam, {"lr": 1e-3, "fused": True}),
                    make_elbo("trace", jit=True)).step
    for _ in range(2):
        step(x)
    sync(device)
    started = time.perf_counter()
    for _ in range(3):
        step(x)
    sync(device)
    seconds = (time.perf_counter() - started) / 3
    rows.append({"contender": f"iaf guide, vamp prior ({FAMILY_IAF_VAMP_COMPONENTS} exact "
                              f"components)",
                 "batch": FAMILY_BATCH, "ms_per_step": 1000 * seconds,
                 "ratio_to_normal": seconds / statistics.median(normal), "rounds": 1,
                 "steps_per_round": 3, "alone": True,
                 "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20})
    return rows


def print_families(rows, title):
    print(f"\n{title}")
    print(f"{'families':<40} {'ms/step':>8} {'x normal':>8}")
    for r in rows:
        alone = (f"  (3 steps alone; peak memory of the process {r['peak_rss_gb']:.1f} GB)"
                 if r.get("alone") else "")
        print(f"{r['contender']:<40} {r['ms_per_step']:8.1f} {r['ratio_to_normal']:8.2f}{alone}")


# ---------------------------------------------------------------- report


def write_json(path, results: dict) -> None:
    """The results as JSON at ``path``, where one was given (--json)."""
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=1)


def environment(threads: int) -> dict:
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__,
            "pyro": pyro.__version__, "python": platform.python_version(),
            "threads": threads, "load_average": os.getloadavg(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def print_tax(rows, title):
    print(f"\n{title}")
    print("  (/ hand: over the hand-written step with fused Adam, the Pyro tax; "
          "/ default: over the hand-written step with torch's default Adam)")
    print(f"{'batch':>6} {'elbo':>10}  {'contender':32} {'ms/step':>8} {'img/s':>9} "
          f"{'/ hand':>7} {'/ default':>9}")
    for row in rows:
        print(f"{row['batch']:>6} {row['elbo']:>10}  {row['contender']:32} "
              f"{row['ms_per_step']:8.2f} {row['images_per_s']:9.0f} {row['ratio_to_hand']:7.3f} "
              f"{row['ratio_to_default_adam_hand']:9.3f}")


def print_pipeline(result, title):
    print(f"\n{title}")
    print(f"  Pyro example pipeline: {result['example_seconds']:.2f} s per epoch "
          f"({result['train_images']} images, batch {result['batch']})")
    print(f"  pyrovae Trainer:       {result['pyrovae_train_seconds']:.2f} s of training steps, "
          f"{result['pyrovae_fit_seconds']:.2f} s for the whole fit (test ELBO, diagnostics)")
    print(f"  speed-up: {result['speedup_train']:.2f}x (training), "
          f"{result['speedup_fit']:.2f}x (whole fit)")
    print("  test ELBO after the epoch: example "
          + ", ".join(f"{e:.2f}" for e in result["example_test_elbo"]) + "; pyrovae "
          + ", ".join(f"{e:.2f}" for e in result["pyrovae_test_elbo"]))


def tax_ratio(rows, batch):
    """The worse of the two ELBOs: pyrovae's step time over the hand-written one's, both
    with torch's fused Adam, so that the ratio is what Pyro costs."""
    return max(r["ratio_to_hand"] for r in rows
               if r["batch"] == batch and r["contender"] == "pyrovae")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer rounds and a fifth of an epoch: under a minute on 2 cores")
    parser.add_argument("--json", help="write the results to this path")
    parser.add_argument("--device", default="cpu", help="cpu or cuda, for (a) and (b)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--rounds", type=int, help="rounds of (a) (default 15; quick 5)")
    parser.add_argument("--epochs", type=int, help="epochs of (b) per contender (default 3; "
                                                   "quick 1)")
    parser.add_argument("--check-cost", action="store_true",
                        help="run only (d), the cost of the model's data check per step "
                             "(about a minute on 2 cores)")
    parser.add_argument("--networks", action="store_true",
                        help="run only (e), the step time of the conv network and the named "
                             "architectures against the MLP at batch 128 (about two minutes "
                             "on 2 cores)")
    parser.add_argument("--data-paths", action="store_true",
                        help="run only (f), images per second of the whole-tensor and the "
                             "streaming data paths (about two minutes on 2 cores)")
    parser.add_argument("--families", action="store_true",
                        help="run only (g), the step time of the full-normal and iaf guides "
                             "and the mog and vamp priors against the normal ones on MNIST "
                             "(about three minutes on 2 cores)")
    parser.add_argument("--data-images", type=int, default=6000,
                        help="MNIST training images for (f) (default %(default)s)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device; use --device cpu.")
    args.rounds = args.rounds or (5 if args.quick or args.check_cost or args.networks
                                  or args.families else
                                  3 if args.data_paths else 15)
    args.epochs = args.epochs or 1 if args.quick else args.epochs or 3
    args.warmup = 3 if args.quick else 10
    args.step_budget = 1280 if args.quick else 5120  # images per contender per round
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = environment(args.threads)
    print(json.dumps(env))

    data = load_dataset("mnist", binarize="dynamic", seed=0)
    if args.quick:
        data = dataclasses.replace(data, train=data.train[:12000])
    torch.manual_seed(0)
    x_all = torch.bernoulli(data.train[:max(TAX_BATCHES)])

    # the separate measurements: each flag measures one thing, prints it under its title
    # (made from the rows) and writes its JSON
    rounds = f"median of {args.rounds} rounds"
    separate = {
        "data_paths": (
            lambda: measure_data_paths(args, data.train[:args.data_images]), print_data_paths,
            lambda rows: f"(f) the data paths on {args.data_images} MNIST images, "
                         f"{rows[0]['train_images']} of them trained on (cpu, {rounds})"),
        "families": (
            lambda: measure_families(device, args, x_all), print_families,
            lambda rows: f"(g) one compiled SVI step per family, batch {FAMILY_BATCH}, "
                         f"784-200-200-50 tanh ({device}, {rounds})"),
        "networks": (
            lambda: measure_networks(device, args, x_all), print_networks,
            lambda rows: f"(e) one compiled SVI step per network, batch {NETWORK_BATCH} "
                         f"({device}, {rounds})"),
    }
    for key, (measure, show, title) in separate.items():
        if getattr(args, key):
            rows = measure()
            show(rows, title(rows))
            results = {"environment": env, "rounds": args.rounds, key: rows}
            write_json(args.json, results)
            return results

    check_cost = measure_check_cost(TAX_BATCHES, device, args, x_all)
    print_check_cost(check_cost, f"(d) the data check of VAE.model and VAE.guide per step "
                                 f"({device}, median of {args.rounds} rounds)")
    if args.check_cost:
        results = {"environment": env, "rounds": args.rounds, "check_cost": check_cost}
        write_json(args.json, results)
        return results

    tax = measure_tax(TAX_BATCHES, device, args, x_all)
    print_tax(tax, f"(a) one SVI step against a hand-written torch step ({device}, "
                   f"median of {args.rounds} rounds)")
    pipeline = measure_pipeline(device, args, data)
    print_pipeline(pipeline, f"(b) one MNIST epoch against Pyro's example pipeline ({device})")

    gpu = None
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        x_gpu = torch.bernoulli(data.train[:max(GPU_BATCHES)])
        gpu = {"tax": measure_tax(GPU_BATCHES, cuda, args, x_gpu),
               "pipeline": [measure_pipeline(cuda, args, data, b) for b in GPU_BATCHES]}
        print_tax(gpu["tax"], "(c) GPU: one SVI step")
        for result in gpu["pipeline"]:
            print_pipeline(result, f"(c) GPU: one epoch at batch {result['batch']}")
    else:
        print("\n(c) GPU: skipped, torch sees no CUDA device.")

    results = {
        "environment": env, "quick": args.quick, "rounds": args.rounds,
        "tax_ratio_b128": tax_ratio(tax, 128), "tax_ratio_b1024": tax_ratio(tax, 1024),
        "pipeline_speedup": pipeline["speedup_train"],
        "pipeline_speedup_whole_fit": pipeline["speedup_fit"],
        "tax": tax, "pipeline": pipeline, "gpu": gpu, "check_cost": check_cost,
    }
    print(f"\ntax ratio: {results['tax_ratio_b128']:.3f} at batch 128 (target <= 1.10), "
          f"{results['tax_ratio_b1024']:.3f} at batch 1024 (target <= 1.05); pipeline "
          f"speed-up {results['pipeline_speedup']:.2f}x (target >= 2.5)")
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
