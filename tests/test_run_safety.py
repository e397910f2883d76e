"""No run is lost, no file of the user's is overwritten, and resume does what was asked."""

import json
import logging
import os
from pathlib import Path

import pyro.distributions as dist
import pytest
import torch
from torch.distributions import transforms

from pyrovae import VAE, Guide, Trainer, TrainConfig, load_dataset
from pyrovae.cli import main
from pyrovae.errors import NonFiniteLossError, PyrovaeError
from pyrovae.run import CHECKPOINT_FILE, CONFIG_FILE, METRICS_FILE
from pyrovae.training import Callback


@pytest.fixture(scope="module")
def data():
    return load_dataset("digits", binarize="static", seed=0)


def trainer(data, out, vae=None, callbacks=None, **config):
    config = TrainConfig(dataset="digits", binarize="static", batch_size=500, device="cpu",
                         **{"epochs": 1, **config})
    return Trainer(vae or VAE(data.x_shape, z_dim=2, hidden=(16,)), data, config, out=out,
                   progress=False, callbacks=callbacks)


def train(*args):
    return main(["train", "--no-progress", "--hidden", "16", "--z-dim", "2", *args])


def saved_epoch(folder: Path) -> int:
    return torch.load(folder / CHECKPOINT_FILE, weights_only=True)["epoch"]


# ---------------------------------------------------------------- extras cannot lose an epoch


class Failing(Callback):
    def __init__(self, error):
        self.error = error

    def on_epoch_end(self, trainer, metrics):
        raise self.error


def test_a_failing_extra_is_logged_and_the_run_goes_on(data, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="pyrovae"):
        metrics = trainer(data, tmp_path, callbacks=[Failing(ValueError("no moments"))],
                          epochs=2).fit()
    assert [m["epoch"] for m in metrics] == [1, 2] and saved_epoch(tmp_path) == 2
    assert metrics[0]["failed_extras"] == {"Failing": "ValueError: no moments"}
    assert "Failing failed after epoch 1" in caplog.text and "no moments" in caplog.text


def test_ctrl_c_in_the_end_of_epoch_extras_keeps_the_epoch(data, tmp_path):
    run = trainer(data, tmp_path, callbacks=[Failing(KeyboardInterrupt())], epochs=3)
    metrics = run.fit()
    assert run.interrupted and [m["epoch"] for m in metrics] == [1]
    assert saved_epoch(tmp_path) == 1
    assert json.loads((tmp_path / METRICS_FILE).read_text())[0]["epoch"] == 1


class LogisticGuide(Guide):
    """A guide with no closed-form mean: a logistic, as a transformed uniform."""

    name = "logistic"

    def make_dist(self, loc, scale):
        uniform = dist.Uniform(torch.zeros_like(loc), torch.ones_like(loc), validate_args=False)
        return dist.TransformedDistribution(
            uniform, [transforms.SigmoidTransform().inv, transforms.AffineTransform(loc, scale)])


def test_a_guide_without_a_closed_form_mean_gets_monte_carlo_moments(data, tmp_path):
    from pyrovae.plots import write_figures

    vae = VAE(data.x_shape, z_dim=2, hidden=(16,), guide=LogisticGuide(2))
    with pytest.raises(NotImplementedError):
        vae.encode(data.test[:2]).mean  # the case: torch has no mean for it
    metrics = trainer(data, tmp_path, vae=vae).fit()
    assert metrics[0]["posterior_mean_method"] == \
        "monte carlo (32 draws per datapoint, less their noise)"
    assert metrics[0]["active_units"] >= 0 and (tmp_path / CONFIG_FILE).is_file()
    assert {p.name for p in write_figures(tmp_path, vae, data, metrics)} >= {
        "reconstructions.png", "latent_scatter.png"}


# ---------------------------------------------------------------- the user's files


def test_a_folder_of_the_users_is_never_written_into(tmp_path):
    (tmp_path / CONFIG_FILE).write_text('{"my": 1}')
    assert train("--epochs", "1", "--out", str(tmp_path)) == 2
    assert (tmp_path / CONFIG_FILE).read_text() == '{"my": 1}'
    assert train("--epochs", "1", "--out", str(tmp_path), "--overwrite") == 2  # not a run
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_FILE]


def test_a_run_without_its_checkpoint_is_not_reused_and_overwrite_clears_it(tmp_path, capsys):
    out = tmp_path / "run"
    assert train("--epochs", "1", "--out", str(out)) == 0
    (out / CHECKPOINT_FILE).unlink()
    (out / "evaluation.json").write_text("{}")  # an earlier evaluation, now stale
    assert train("--epochs", "1", "--out", str(out)) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert train("--epochs", "1", "--out", str(out), "--overwrite") == 0
    assert not (out / "evaluation.json").exists() and saved_epoch(out) == 1


@pytest.mark.parametrize("where", ["a file", "below a file"])
def test_an_unwritable_out_is_refused_before_training(tmp_path, capsys, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    out = blocker if where == "a file" else blocker / "run"
    assert train("--epochs", "1", "--out", str(out)) == 2
    error = capsys.readouterr()
    assert str(out) in error.err and "--out" in error.err and "epoch 1" not in error.out


def test_evaluate_and_plot_refuse_a_read_only_run_folder_before_working(tmp_path, capsys,
                                                                          monkeypatch):
    out = tmp_path / "run"
    assert train("--epochs", "1", "--out", str(out)) == 0
    capsys.readouterr()
    real_write = Path.write_bytes

    def read_only(path, data):  # root ignores file modes, so the file system is faked
        if path.parent == out:
            raise PermissionError(13, "Permission denied")
        return real_write(path, data)

    monkeypatch.setattr(Path, "write_bytes", read_only)
    for command in (["evaluate", str(out), "--num-samples", "8"], ["plot", str(out)]):
        assert main(command) == 2
        error = capsys.readouterr()
        assert f"cannot write into {out}" in error.err and "NLL" not in error.out


# ---------------------------------------------------------------- damaged run files


@pytest.fixture
def saved_run(data, tmp_path):
    trainer(data, tmp_path / "run").fit()
    return tmp_path / "run"


@pytest.mark.parametrize("damage,named", [
    (lambda run: (run / CHECKPOINT_FILE).write_bytes(
        (run / CHECKPOINT_FILE).read_bytes()[:300]), CHECKPOINT_FILE),
    (lambda run: (run / CHECKPOINT_FILE).write_bytes(os.urandom(2000)), CHECKPOINT_FILE),
    (lambda run: (run / CONFIG_FILE).write_text('{"model": {'), CONFIG_FILE),
    (lambda run: (run / CONFIG_FILE).write_text(
        (run / CONFIG_FILE).read_text().replace('"z_dim": 2', '"z_dim": 3')), CHECKPOINT_FILE),
])
def test_damaged_run_files_get_an_error_naming_the_file(saved_run, capsys, damage, named):
    damage(saved_run)
    with pytest.raises(PyrovaeError, match=named) as error:
        VAE.load(saved_run)
    assert "weights_only" not in str(error.value)
    assert main(["evaluate", str(saved_run), "--num-samples", "8"]) == 2
    message = capsys.readouterr().err
    assert named in message and "Traceback" not in message and "weights_only" not in message


# ---------------------------------------------------------------- resume and divergence


def test_resume_applies_changed_training_flags_and_logs_them(tmp_path, capsys):
    out = tmp_path / "run"
    assert train("--epochs", "1", "--lr", "0.05", "--out", str(out)) == 0
    # 0.001 is the default value: given on the command line, it still applies
    assert train("--resume", "--out", str(out), "--epochs", "2", "--lr", "0.001") == 0
    assert "lr 0.05 → 0.001 from epoch 2" in capsys.readouterr().out
    saved = json.loads((out / CONFIG_FILE).read_text())["training"]
    assert saved["lr"] == 0.001 and saved["epochs"] == 2 and saved_epoch(out) == 2


@pytest.mark.parametrize("flag", [["--z-dim", "3"], ["--prior", "laplace"], ["--seed", "1"],
                                  ["--dataset", "digits", "--binarize", "none"]])
def test_resume_refuses_flags_that_would_make_another_run(tmp_path, capsys, flag):
    out = tmp_path / "run"
    assert train("--epochs", "1", "--out", str(out)) == 0
    assert train("--resume", "--out", str(out), "--epochs", "2", *flag) == 2
    assert "cannot change when a run resumes" in capsys.readouterr().err
    assert saved_epoch(out) == 1


def test_a_nan_in_epoch_one_claims_no_checkpoint(data, tmp_path):
    run = trainer(data, tmp_path, jit=False)
    run.vae.decoder.register_forward_hook(lambda module, args, out: out * float("nan"))
    with pytest.raises(NonFiniteLossError, match="epoch 1 at step 1.*No checkpoint was written"):
        run.fit()
    assert not (tmp_path / CHECKPOINT_FILE).exists()


def test_a_loss_that_explodes_without_a_nan_stops_the_run(data, tmp_path):
    with pytest.raises(NonFiniteLossError, match="diverged to .* nats per datapoint.*--lr"):
        trainer(data, tmp_path, lr=1e6, epochs=5).fit()


def test_resume_refuses_an_impossible_value_before_loading_the_data(tmp_path, capsys,
                                                                     monkeypatch):
    out = tmp_path / "run"
    assert train("--epochs", "1", "--out", str(out)) == 0

    def no_data(*args, **kwargs):
        raise AssertionError("the data was loaded before the flags were checked")

    monkeypatch.setattr("pyrovae.vae.load_dataset", no_data)
    assert train("--resume", "--out", str(out), "--epochs", "0") == 2
    assert "--epochs must be a positive integer" in capsys.readouterr().err


def test_a_flag_counts_as_given_by_its_whole_name_or_an_abbreviation():
    import argparse

    from pyrovae.cli import given_flags

    parser = argparse.ArgumentParser()
    for flag in ("--kl-anneal", "--kl-anneal-start", "--lr"):
        parser.add_argument(flag)
    assert given_flags(parser, ["--kl-anneal", "3", "--lr=0.1"]) == {"kl_anneal", "lr"}
    assert given_flags(parser, ["--kl-anneal-s", "0.2"]) == {"kl_anneal_start"}


def test_evaluation_files_are_strict_json_with_nan_as_null(tmp_path):
    from pyrovae.run import EVALUATION_FILE, write_evaluation

    write_evaluation(tmp_path, {"nll": float("nan"), "khat_max": float("inf"), "elbo": -90.5,
                                "per_datapoint_khat": [0.5, float("nan"), float("-inf")]})
    # json.loads with parse_constant raising: NaN, Infinity or -Infinity in the file fail
    text = (tmp_path / EVALUATION_FILE).read_text()
    saved = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in {text}"))
    assert saved == {"nll": None, "khat_max": None, "elbo": -90.5,
                     "per_datapoint_khat": [0.5, None, None]}
