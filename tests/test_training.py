"""The SVI trainer: metrics, the KL report, resume, and faults (NaN, crash mid-write, Ctrl-C)."""

import json
import logging
import math

import pyro
import pytest
import torch

import pyrovae.run
from pyrovae import VAE, Trainer, TrainConfig, load_dataset
from pyrovae.errors import NonFiniteLossError
from pyrovae.training import Callback, TestELBO
from pyrovae.vae import CHECKPOINT_FILE

from conftest import requires_cuda


def make_trainer(out, epochs=2, guide="normal", prior="normal", elbo="trace", seed=3,
                 likelihood="bernoulli", device="cpu", jit=True, estimator="reparam"):
    config = TrainConfig(dataset="digits", binarize="dynamic" if likelihood == "bernoulli"
                         else "none", elbo=elbo, epochs=epochs, batch_size=256, lr=3e-3,
                         seed=seed, device=device, jit=jit, estimator=estimator)
    data = load_dataset("digits", binarize=config.binarize, seed=seed)
    pyro.set_rng_seed(seed)
    vae = VAE(data.x_shape, z_dim=4, guide=guide, prior=prior, likelihood=likelihood,
              hidden=(32,))
    return Trainer(vae, data, config, out=out, progress=False)


def load_checkpoint(folder):
    return torch.load(folder / CHECKPOINT_FILE, weights_only=True)


def test_metrics_and_outputs(tmp_path):
    trainer = make_trainer(tmp_path, epochs=3)
    metrics = trainer.fit()
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert {"epoch", "train_elbo", "test_elbo", "kl", "recon"} <= set(m)
        # ELBO = recon - KL, per datapoint, and a KL is never negative
        assert m["test_elbo"] == pytest.approx(m["recon"] - m["kl"], abs=1e-4)
        assert m["kl"] > 0 and m["train_kl"] > 0
    assert metrics[-1]["train_elbo"] > metrics[0]["train_elbo"]
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["training"]["epochs"] == 3 and config["model"]["z_dim"] == 4
    loaded = VAE.load(tmp_path)
    for name, value in trainer.vae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value)


@pytest.mark.parametrize("guide,estimator,warned", [
    ("iaf", "stl", True), ("iaf", "reparam", False), ("normal", "stl", False)])
def test_building_a_trainer_warns_where_stl_inverts_a_flow(tmp_path, caplog, guide, estimator,
                                                           warned):
    with caplog.at_level(logging.INFO, logger="pyrovae"):
        make_trainer(tmp_path, epochs=1, guide=guide, estimator=estimator)
    slow = [r for r in caplog.records if "inverts the guide" in r.getMessage()]
    assert len(slow) == warned
    if warned:  # z_dim 4 and 2 flow steps
        assert slow[0].levelno == logging.WARNING and "8 network passes" in slow[0].getMessage()


def test_the_log_gives_the_mutual_informations_ceiling(tmp_path, caplog):
    trainer = make_trainer(tmp_path, epochs=1)
    with caplog.at_level(logging.INFO, logger="pyrovae"):
        [metrics] = trainer.fit()
    n = len(trainer.data.test)
    assert metrics["mutual_information_datapoints"] == n
    # the mixture over the N test images holds each image's own q(z|x): at most log N
    assert metrics["mutual_information"] <= math.log(n)
    assert f"MI {metrics['mutual_information']:.3f} (at most log {n} = {math.log(n):.3f})" \
        in caplog.text


def test_test_elbo_matches_a_direct_estimate(tmp_path):
    """The reported test ELBO is the ELBO: compare with many-particle estimates."""
    trainer = make_trainer(tmp_path, epochs=1)
    reported = trainer.fit()[-1]["test_elbo"]
    x = trainer.data.test
    from pyrovae import make_elbo
    with torch.no_grad():
        draws = torch.tensor([-make_elbo("trace", 1).loss(trainer.vae.model, trainer.vae.guide, x)
                              / len(x) for _ in range(200)])
    se = (draws.var() / len(draws) + draws.var()).sqrt()  # the report is itself one draw
    assert abs(reported - draws.mean()) < 4 * se


@pytest.mark.parametrize("guide,prior,expected", [
    ("normal", "normal", "'z' (Normal || Normal) analytic"),
    ("laplace", "student-t", "'z' (Laplace || StudentT) Monte Carlo, as torch has no closed form"),
])
def test_kl_methods_are_reported_once_per_run(tmp_path, caplog, guide, prior, expected):
    trainer = make_trainer(tmp_path, epochs=2, guide=guide, prior=prior, elbo="meanfield")
    with caplog.at_level(logging.INFO, logger="pyrovae"):
        trainer.fit()
    kl_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("KL:")]
    assert len(kl_lines) == 1 and expected in kl_lines[0]


def test_resume_is_deterministic(tmp_path):
    make_trainer(tmp_path / "a", epochs=2).fit()
    resumed = Trainer.resume(tmp_path / "a", epochs=4, progress=False)
    assert resumed.epoch == 2
    metrics_a = resumed.fit()
    metrics_b = make_trainer(tmp_path / "b", epochs=4).fit()
    a, b = load_checkpoint(tmp_path / "a"), load_checkpoint(tmp_path / "b")
    assert a["epoch"] == b["epoch"] == 4
    for name in b["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    drop_time = [{k: v for k, v in m.items() if k != "seconds"} for m in metrics_a]
    assert drop_time == [{k: v for k, v in m.items() if k != "seconds"} for m in metrics_b]


class ProcessStopped(BaseException):
    """What a training's process sees of a session's end: nothing it can catch."""


@pytest.mark.parametrize("where", ["in the extras", "before the metrics were written"])
def test_a_process_stopped_after_an_epochs_steps_resumes_as_if_never_stopped(
        tmp_path, monkeypatch, where):
    trainer = make_trainer(tmp_path / "a", epochs=3)
    if where == "in the extras":  # after the test ELBO, which draws from the global RNG
        class Stop(Callback):
            def on_epoch_end(self, trainer, metrics):
                if metrics["epoch"] == 2:
                    raise ProcessStopped
        assert any(isinstance(c, TestELBO) for c in trainer.callbacks)
        trainer.callbacks.append(Stop())
    else:  # the metrics of epoch 2 never reached the disk
        write_metrics = pyrovae.run.write_metrics

        def stopped(folder, metrics):
            if metrics[-1]["epoch"] == 2:
                raise ProcessStopped
            write_metrics(folder, metrics)
        monkeypatch.setattr(pyrovae.run, "write_metrics", stopped)
    with pytest.raises(ProcessStopped):
        trainer.fit()
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "a")["epoch"] == 2  # the steps of epoch 2 are saved
    assert [m["epoch"] for m in json.loads((tmp_path / "a/metrics.json").read_text())] == [1]
    # the resumed run first runs the extras of epoch 2, from the RNG state they began with
    metrics_a = Trainer.resume(tmp_path / "a", progress=False).fit()
    metrics_b = make_trainer(tmp_path / "b", epochs=3).fit()
    a, b = load_checkpoint(tmp_path / "a"), load_checkpoint(tmp_path / "b")
    assert a["epoch"] == b["epoch"] == 3 and a["epoch_end"] is None
    for name in b["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    drop_time = [{k: v for k, v in m.items() if k != "seconds"} for m in metrics_a]
    assert drop_time == [{k: v for k, v in m.items() if k != "seconds"} for m in metrics_b]
    assert json.loads((tmp_path / "a/metrics.json").read_text()) == metrics_a


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, epochs=1)
    trainer.fit()
    before = load_checkpoint(tmp_path)

    def torn_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr("pyrovae.atomic.torch.save", torn_save)
    trainer.config.epochs = 2
    with pytest.raises(OSError, match="disk full"):
        trainer.fit()
    monkeypatch.undo()
    after = load_checkpoint(tmp_path)
    assert after["epoch"] == 1
    for name in before["model"]:
        assert torch.equal(after["model"][name], before["model"][name])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "config.json",
                                                          "metrics.json"]


def break_decoder_after_first_epoch(trainer, make_output):
    """A forward hook: Python that a compiled step runs only while recording its graph,
    so the trainers given this run eagerly."""
    def hook(module, args, output):
        if trainer.epoch >= 1 and trainer.vae.training:
            return make_output(output)
    trainer.vae.decoder.register_forward_hook(hook)


def poison_decoder_after_first_epoch(trainer):
    """NaN weights once epoch 1 is saved: the compiled graph reads the parameters afresh."""
    save = trainer._save

    def save_then_poison(**kwargs):
        save(**kwargs)
        if trainer.epoch == 1:
            with torch.no_grad():
                trainer.vae.decoder.net[0].weight.fill_(float("nan"))
    trainer._save = save_then_poison


@pytest.mark.parametrize("jit", [False, True])
def test_nan_loss_stops_and_names_epoch_and_step(tmp_path, jit):
    trainer = make_trainer(tmp_path, epochs=3, jit=jit)
    if jit:
        poison_decoder_after_first_epoch(trainer)
    else:
        break_decoder_after_first_epoch(trainer, lambda out: out * float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"epoch 2 at step 1\..*checkpoint \(epoch 1\)"
                                                  r".*--lr"):
        trainer.fit()
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values())


def test_compiled_and_eager_training_agree(tmp_path, caplog):
    """The same run with the step compiled and eager: the same metrics to float rounding."""
    runs = {}
    for jit in (True, False):
        with caplog.at_level(logging.INFO, logger="pyrovae"):
            runs[jit] = make_trainer(tmp_path / str(jit), epochs=2, jit=jit).fit()
    for compiled, eager in zip(runs[True], runs[False]):
        for key in ("train_elbo", "test_elbo", "kl", "recon", "mutual_information"):
            assert compiled[key] == pytest.approx(eager[key], rel=1e-4), key
    assert "step: compiled by pyro.ops.jit, one graph per batch shape" in caplog.text
    assert "step: eager (jit is off)" in caplog.text


def test_ctrl_c_saves_a_checkpoint_and_returns(tmp_path):
    trainer = make_trainer(tmp_path, epochs=3, jit=False)
    calls = []

    def interrupt(out):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return out

    break_decoder_after_first_epoch(trainer, interrupt)
    metrics = trainer.fit()
    assert trainer.interrupted and len(metrics) == 1
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint["epoch"] == 1 and checkpoint["interrupted_at_step"] == 3
    # the saved parameters are the ones in memory at the interrupt, not epoch 1's
    for name, value in trainer.vae.state_dict().items():
        assert torch.equal(checkpoint["model"][name], value)


@requires_cuda
@pytest.mark.parametrize("guide,prior,likelihood", [
    ("normal", "normal", "bernoulli"), ("student-t", "laplace", "gaussian"),
    ("laplace", "student-t", "gaussian-fixed"), ("lognormal", "gamma", "continuous-bernoulli"),
    ("lognormal", "lognormal", "gaussian"), ("lognormal", "exponential", "bernoulli"),
    ("full-normal", "mog", "bernoulli"), ("iaf", "vamp", "gaussian"),
])
def test_trains_on_cuda(tmp_path, guide, prior, likelihood):
    trainer = make_trainer(tmp_path, epochs=1, guide=guide, prior=prior, likelihood=likelihood,
                           elbo="meanfield", device="cuda")
    metrics = trainer.fit()
    assert torch.isfinite(torch.tensor(metrics[-1]["test_elbo"]))
    assert all(p.is_cuda for p in trainer.vae.parameters())


def test_a_custom_mixture_prior_trains_with_diagnostics_and_figures(tmp_path):
    from test_vae import MixturePrior

    from pyrovae.plots import write_figures

    config = TrainConfig(dataset="digits", binarize="static", epochs=1, batch_size=256)
    data = load_dataset("digits", binarize="static")
    vae = VAE(data.x_shape, z_dim=2, prior=MixturePrior(2), hidden=(32,))
    metrics = Trainer(vae, data, config, out=tmp_path, progress=False).fit()
    # a mixture has no per-dimension KL: said, not faked
    assert metrics[-1]["kl_per_dim"] is None and metrics[-1]["active_units"] >= 0
    names = {p.name for p in write_figures(tmp_path, vae, data, metrics)}
    assert "kl_per_dim.png" not in names
    assert "manifold.png" in names  # over the mixture's marginal quantiles
    assert {"reconstructions.png", "training_curves.png"} <= names
