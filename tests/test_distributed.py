"""Data-parallel training on CPU with gloo: two processes against one, resume under
torchrun, and each process's block of the batches.

The two-process runs are started once for the module, by forking this process
(``torch.multiprocessing.start_processes``), so that they skip importing torch and
Pyro again; the torchrun test starts the real launcher on the real command.
"""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.distributed
import torch.multiprocessing as mp

from pyrovae import VAE, Dataset, Trainer, TrainConfig, load_dataset
from pyrovae.cli.train import sigterm_as_ctrl_c
from pyrovae.families import Guide
from pyrovae.run import read_checkpoint, read_json, read_metrics
from pyrovae.svi import FusedOptim
from pyrovae.training import DataParallelStep

pytestmark = pytest.mark.skipif(
    sys.platform == "win32" or not torch.distributed.is_available(),
    reason="needs torch.distributed and the fork start method")

WORLD_SIZE = 2
TIMEOUT_S = 240  # the two processes together; a hang fails the test instead of the suite


class PointGuide(Guide):
    """q(z|x) a point mass at the encoder's output: the objective has no Monte Carlo
    noise, so that one process and two, which draw different noise, can be compared
    step by step. What remains to differ is the order of float sums."""

    name = "point"
    num_params = 1

    def constrain(self, raw):
        return (raw.squeeze(-2),)

    def make_dist(self, loc):
        return dist.Delta(loc, event_dim=1)


# the runs compared with one process: 205 rows in batches of 51 split 25 + 26 between the
# two processes, and a last batch of one row that leaves process 0 an empty block; 203
# rows in batches of 50 end with a batch of three, split 1 + 2
EXACT_RUNS = {
    "trace": dict(elbo="trace", num_particles=1, num_train=205, batch_size=51, epochs=2),
    "iwae": dict(elbo="iwae", num_particles=3, num_train=203, batch_size=50, epochs=2),
}
LR = 1e-2


def exact_trainer(out, elbo, num_particles, num_train, batch_size, epochs):
    digits = load_dataset("digits", binarize="threshold")
    data = Dataset.from_tensors(digits.train[:num_train].double(), digits.test[:40].double(),
                                name="digits")
    pyro.set_rng_seed(0)
    vae = VAE(data.x_shape, z_dim=3, guide=PointGuide(3), hidden=(16,)).double()
    config = TrainConfig(dataset="tensors", binarize="threshold", elbo=elbo,
                         num_particles=num_particles, epochs=epochs, batch_size=batch_size,
                         lr=LR, seed=0, device="cpu", jit=False)
    return Trainer(vae, data, config, out=out, progress=False, callbacks=[])


def resume_trainer(out, epochs):
    """The normal guide, with its noise, and the default callbacks, as pyrovae train runs."""
    data = load_dataset("digits", binarize="threshold")
    pyro.set_rng_seed(1)
    vae = VAE(data.x_shape, z_dim=2, hidden=(16,))
    config = TrainConfig(dataset="digits", binarize="threshold", epochs=epochs, batch_size=301,
                         lr=LR, seed=1, device="cpu")
    return Trainer(vae, data, config, out=out, progress=False)


@contextlib.contextmanager
def recorded_gradients():
    """The gradients that the optimizer gets, one list per step (what DDP hands it)."""
    steps = []
    step = FusedOptim.__call__

    def recording(self, params, *args, **kwargs):
        steps.append([p.grad.detach().clone() for p in params])
        return step(self, params, *args, **kwargs)

    FusedOptim.__call__ = recording
    try:
        yield steps
    finally:
        FusedOptim.__call__ = step


def _jobs(folder: Path):
    for name, run in EXACT_RUNS.items():
        with recorded_gradients() as gradients:
            exact_trainer(folder / name, **run).fit()
        if torch.distributed.get_rank() == 0:
            torch.save(gradients, folder / f"{name}-gradients.pt")
    resume_trainer(folder / "resumed", epochs=1).fit()
    Trainer.resume(folder / "resumed", epochs=2, progress=False).fit()
    resume_trainer(folder / "straight", epochs=2).fit()
    resume_trainer(folder / "for-torchrun", epochs=1).fit()
    _stopped_runs(folder)


STEPS_PER_EPOCH = 5  # 1500 digits in batches of 301


@contextlib.contextmanager
def signal_to_process(rank: int, signum: int, cls, method: str, when):
    """Process ``rank`` alone sends itself ``signum`` in ``cls.method`` once
    ``when(*args)`` holds; the other is never told, and learns of it from this one."""
    original = getattr(cls, method)

    def signalling(*args):
        if torch.distributed.get_rank() == rank and when(*args):
            # to this thread, the main one: its Python handler runs before the next call
            signal.pthread_kill(threading.get_ident(), signum)
        return original(*args)

    setattr(cls, method, signalling)
    try:
        yield
    finally:
        setattr(cls, method, original)


def _stopped_runs(folder: Path):
    """A signal to one process: Ctrl-C to process 1 in a step of epoch 2; SIGTERM to
    process 1, as ``pyrovae train`` handles it, just after the all-reduce of that
    epoch's last step; Ctrl-C to process 0 in its extras of epoch 2; SIGTERM to process
    1 while process 0 runs the extras of epoch 1. Each process keeps what its trainer
    held for the tests, then the runs are resumed to epoch 2."""
    rank = torch.distributed.get_rank()
    steps = iter(range(1, 100))
    in_a_step = signal_to_process(1, signal.SIGINT, DataParallelStep, "__call__",
                                  lambda *args: next(steps) == STEPS_PER_EPOCH + 2)
    # _check_loss comes after the step's all-reduce, here that of epoch 2's last step
    after_the_steps = signal_to_process(
        1, signal.SIGTERM, Trainer, "_check_loss",
        lambda trainer, loss, n, index: trainer.epoch == 1 and index == STEPS_PER_EPOCH)
    in_the_extras = signal_to_process(0, signal.SIGINT, Trainer, "_run_callback",
                                      lambda trainer, callback, metrics: trainer.epoch == 2)
    # process 1 has no extras to run, and goes on to wait for process 0's
    while_waiting = signal_to_process(1, signal.SIGTERM, Trainer, "_end_epoch",
                                      lambda trainer, metrics, started: metrics["epoch"] == 1)
    for name, stopping in (("stopped-in-a-step", in_a_step),
                           ("stopped-after-the-steps", after_the_steps),
                           ("stopped-in-the-extras", in_the_extras),
                           ("stopped-while-waiting", while_waiting)):
        trainer = resume_trainer(folder / name, epochs=2)
        with stopping, sigterm_as_ctrl_c():
            trainer.fit()
        torch.save({"interrupted": trainer.interrupted, "stop_signal": trainer.stop_signal,
                    "model": trainer.vae.state_dict()}, folder / f"{name}-process-{rank}.pt")
        if rank == 0:
            shutil.copy(folder / name / "checkpoint.pt", folder / f"{name}-at-stop.pt")
            shutil.copy(folder / name / "metrics.json", folder / f"{name}-metrics-at-stop.json")
        torch.distributed.barrier()
        Trainer.resume(folder / name, epochs=2, progress=False).fit()


def _process(rank: int, port: int, folder: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE))
    # one thread each: the two processes share the cores, and a forked process must not
    # use the OpenMP pool of its parent
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C as in a Python program
    torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=TIMEOUT_S))
    try:
        _jobs(folder)
    finally:
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """The runs of ``_jobs`` trained by two processes; a failure in either is raised
    here with its traceback."""
    folder = tmp_path_factory.mktemp("two-processes")
    # what the processes import on first use (scikit-learn's digits; torch._dynamo, which
    # torch's Adam imports) is imported once here, before they are forked
    load_dataset("digits")
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    context = mp.start_processes(_process, args=(free_port(), folder), nprocs=WORLD_SIZE,
                                 join=False, start_method="fork")
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the two training processes did not finish in {TIMEOUT_S} s")
    return folder


@pytest.mark.parametrize("name", list(EXACT_RUNS))
def test_two_processes_train_as_one(two_processes, tmp_path, name):
    """Same data order, global batch and seed: the same parameters and metrics as one
    process, up to the order of float64 sums.

    The tolerance: the two processes sum the gradient over the batch in another
    order, and DDP adds their sums, so the gradients differ by rounding, at most about
    n u sum_i |g_i| with u = 2**-53 and n <= 51 rows: below 1e-13 here. Adam divides
    by sqrt(v) + 1e-8, so a difference d in a gradient near zero moves a step by at most
    lr d / 1e-8 = 1e-7, and 10 steps by at most about 1e-6. A wrong block, weight or
    average moves the parameters by about lr = 1e-2 per step.
    """
    reference = exact_trainer(tmp_path, **EXACT_RUNS[name])
    with recorded_gradients() as gradients:
        reference.fit()
    # the gradient of every step (5 a epoch): DDP's average of the processes' losses, each
    # times 2, is the gradient of the whole batch's loss (a wrong weight, which Adam would
    # hide, shows here). Its float64 sums differ from one process's by rounding alone: at
    # most about k u sum_i |g_i|, with u = 2**-53, k ~ 100 additions deep (51 rows, 16
    # hidden units) and sum_i |g_i| <= 51 rows x 40 (the largest gradients here), 2e-11
    parallel_gradients = torch.load(two_processes / f"{name}-gradients.pt")
    assert len(parallel_gradients) == len(gradients) == 10
    for ours, theirs in zip(parallel_gradients, gradients):
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    parallel = read_checkpoint(two_processes / name)["model"]
    assert parallel.keys() == reference.vae.state_dict().keys()
    for key, value in reference.vae.state_dict().items():
        torch.testing.assert_close(parallel[key], value, rtol=0, atol=1e-6, msg=key)
    # the losses: sums of the same terms in another order, at parameters 1e-6 apart
    for ours, theirs in zip(read_metrics(two_processes / name), reference.metrics):
        for key in ("train_elbo", "train_kl", "train_recon", "objective"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-6, abs=1e-6), key
    # only rank 0 wrote, and only what one process writes
    assert sorted(p.name for p in (two_processes / name).iterdir()) == \
        ["checkpoint.pt", "config.json", "metrics.json"]


def test_a_resumed_data_parallel_run_is_the_uninterrupted_one(two_processes):
    resumed = read_checkpoint(two_processes / "resumed")
    straight = read_checkpoint(two_processes / "straight")
    assert resumed["epoch"] == straight["epoch"] == 2
    for key, value in straight["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    # each process's Monte Carlo stream was saved, and they differ
    streams = straight["rng"]["processes"]
    assert len(streams) == WORLD_SIZE and not torch.equal(streams[0]["torch"], streams[1]["torch"])
    drop_time = [{k: v for k, v in m.items() if k != "seconds"}
                 for m in read_metrics(two_processes / "resumed")]
    assert drop_time == [{k: v for k, v in m.items() if k != "seconds"}
                         for m in read_metrics(two_processes / "straight")]


def test_ctrl_c_on_one_process_stops_all_after_the_same_step_and_saves_it(two_processes):
    """Process 1 got Ctrl-C in the second step of epoch 2. Both processes stop after
    that step, as one, and save it: epoch 1 and step 2, with the weights that both
    hold. The run then resumes. Before, a KeyboardInterrupt in one process's step
    left the other waiting in the step's all-reduce, and nothing was saved."""
    held = held_at_stop(two_processes, "stopped-in-a-step")
    assert [h["stop_signal"] for h in held] == [None, signal.SIGINT]
    saved = torch.load(two_processes / "stopped-in-a-step-at-stop.pt")
    assert saved["epoch"] == 1 and saved["interrupted_at_step"] == 2
    for key, value in saved["model"].items():
        assert torch.equal(held[0]["model"][key], value), key
        assert torch.equal(held[1]["model"][key], value), key
    folder = two_processes / "stopped-in-a-step"
    assert [m["epoch"] for m in read_metrics(folder)] == [1, 2]
    assert read_checkpoint(folder)["epoch"] == 2


def test_sigterm_after_the_last_steps_all_reduce_stops_before_the_extras(two_processes):
    """Process 1 got SIGTERM, which ``pyrovae train`` turns into Ctrl-C, just after the
    all-reduce of epoch 2's last step: the processes learn of it together after the
    steps, save them and stop before the extras, which the resumed run runs.
    Resumed, it is the uninterrupted run."""
    held = held_at_stop(two_processes, "stopped-after-the-steps")
    assert [h["stop_signal"] for h in held] == [None, signal.SIGTERM]  # pyrovae exits 143
    for key, value in read_checkpoint(two_processes / "straight")["model"].items():
        assert torch.equal(held[0]["model"][key], value), key
    assert_resumed_is_straight(two_processes, "stopped-after-the-steps")


def test_ctrl_c_in_process_0s_extras_stops_both_with_the_steps_saved(two_processes):
    """Process 0 got Ctrl-C in its extras of epoch 2 (the test ELBO, the diagnostics),
    which it runs alone: it stops at once, and process 1, which waits for it, stops
    too. The checkpoint holds epoch 2's steps, whose extras the resumed run runs.
    Before, process 1 left with an error from its next step's all-reduce."""
    held = held_at_stop(two_processes, "stopped-in-the-extras")
    assert [h["stop_signal"] for h in held] == [signal.SIGINT, None]
    saved = torch.load(two_processes / "stopped-in-the-extras-at-stop.pt")
    assert saved["epoch"] == 2 and saved["epoch_end"]["metrics"]["epoch"] == 2
    metrics = read_json(two_processes / "stopped-in-the-extras-metrics-at-stop.json")
    assert [m["epoch"] for m in metrics] == [1, 2] and "test_elbo" not in metrics[-1]
    assert_resumed_is_straight(two_processes, "stopped-in-the-extras")


def test_sigterm_while_process_0_runs_the_extras_stops_both_after_the_epoch(two_processes):
    """Process 1 got SIGTERM while it waited for process 0's extras of epoch 1: the
    request is held, and both stop once the epoch, extras and all, is saved."""
    held = held_at_stop(two_processes, "stopped-while-waiting")
    assert [h["stop_signal"] for h in held] == [None, signal.SIGTERM]
    saved = torch.load(two_processes / "stopped-while-waiting-at-stop.pt")
    assert saved["epoch"] == 1 and saved["epoch_end"] is None
    metrics = read_json(two_processes / "stopped-while-waiting-metrics-at-stop.json")
    assert [m["epoch"] for m in metrics] == [1] and "test_elbo" in metrics[0]
    assert_resumed_is_straight(two_processes, "stopped-while-waiting")


def held_at_stop(folder: Path, name: str) -> list[dict]:
    """What each process's trainer held when it stopped; both stopped."""
    held = [torch.load(folder / f"{name}-process-{rank}.pt") for rank in range(WORLD_SIZE)]
    assert [h["interrupted"] for h in held] == [True, True]
    return held


def assert_resumed_is_straight(folder: Path, name: str) -> None:
    """The stopped run, resumed to epoch 2, is the uninterrupted run to the bit."""
    resumed, straight = read_checkpoint(folder / name), read_checkpoint(folder / "straight")
    assert resumed["epoch"] == straight["epoch"] == 2
    for key, value in straight["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    drop_time = [{k: v for k, v in m.items() if k != "seconds"}
                 for m in read_metrics(folder / name)]
    assert drop_time == [{k: v for k, v in m.items() if k != "seconds"}
                         for m in read_metrics(folder / "straight")]


@pytest.mark.slow
def test_torchrun_resumes_a_run(two_processes, tmp_path):
    """``torchrun -m pyrovae train --resume`` on a run of one epoch gives the parameters
    of two epochs straight; only rank 0 logs."""
    folder = two_processes / "for-torchrun"
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD_SIZE}",
               f"--master_port={free_port()}", "-m", "pyrovae", "train", "--out", str(folder),
               "--resume", "--epochs", "2", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, env=env,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("epoch 2/2") == 1 and done.stdout.count("resuming") == 1, \
        done.stdout
    resumed, straight = (read_checkpoint(f) for f in (folder, two_processes / "straight"))
    assert resumed["epoch"] == 2
    for key, value in straight["model"].items():
        assert torch.equal(resumed["model"][key], value), key


def test_the_blocks_of_the_processes_make_up_each_batch():
    """Every process draws the same order and the same dynamic-binarization noise and
    keeps its block: the blocks of all processes are the one-process batches."""
    grey = load_dataset("digits", binarize="dynamic")
    for world_size in (2, 3):
        whole = list(grey.train_batches(100, torch.Generator().manual_seed(5)))
        blocks = [list(grey.train_batches(100, torch.Generator().manual_seed(5),
                                          shard=(rank, world_size)))
                  for rank in range(world_size)]
        assert len(whole) == 15 and all(len(b) == len(whole) for b in blocks)
        for index, batch in enumerate(whole):
            parts = [b[index] for b in blocks]
            assert [len(p) for p in parts] == \
                [(r + 1) * len(batch) // world_size - r * len(batch) // world_size
                 for r in range(world_size)]
            assert torch.equal(torch.cat(parts), batch)


def test_data_parallel_training_refuses_what_it_cannot_split(tmp_path, monkeypatch):
    from pyrovae import distributed
    from pyrovae.errors import PyrovaeError

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    data = load_dataset("digits", binarize="threshold")
    vae = VAE(data.x_shape, z_dim=2, hidden=(8,))
    for setting, flag in ((dict(aggressive=True), "--aggressive"),
                          (dict(free_bits=0.5), "--free-bits")):
        config = TrainConfig(dataset="digits", epochs=1, **setting)
        with pytest.raises(PyrovaeError, match=flag):
            Trainer(vae, data, config, out=tmp_path / "run", progress=False)
        assert not (tmp_path / "run").exists()


def test_each_process_has_its_own_stream():
    from pyrovae.distributed import stream_seed

    assert stream_seed(7, 0) == 7  # one process trains as without torchrun
    seeds = {stream_seed(7, rank) for rank in range(8)}
    assert len(seeds) == 8 and all(0 <= s < 2**63 for s in seeds)
