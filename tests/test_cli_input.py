"""Refused input on the command line: a named error and exit code 2, before any work.

Each case runs ``pyrovae.cli.main`` in-process. Refused training flags must be
refused before the data set is loaded: ``load_dataset`` is replaced by a stub
that fails the test if it is called.
"""

import argparse
import importlib
import json
import math

import pytest

from pyrovae.cli import SUBCOMMANDS, main
from pyrovae.errors import PyrovaeError
from pyrovae.run import TrainConfig

TINY = ["--no-progress", "--hidden", "8", "--z-dim", "2"]


@pytest.fixture
def no_data(monkeypatch):
    """Loading the data set fails the test: the input must be refused before it."""
    def load_dataset(*args, **kwargs):
        raise AssertionError("the data set was loaded before the input was checked")

    monkeypatch.setattr("pyrovae.cli.train.load_dataset", load_dataset)


def refused(capsys, argv) -> str:
    """Run ``pyrovae ARGV``; check exit code 2 and no traceback; return stderr."""
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err


def train_refused(capsys, tmp_path, *args) -> str:
    out = tmp_path / "run"
    err = refused(capsys, ["train", *TINY, "--out", str(out), *args])
    assert not out.exists(), "a refused run must leave no folder"
    return err


# ---------------------------------------------------------------- training values


@pytest.mark.parametrize("args,message", [
    (["--epochs", "0"], "--epochs must be a positive integer, got 0"),
    (["--epochs", "-1"], "--epochs must be a positive integer, got -1"),
    (["--lr", "-0.001"], "--lr must be a positive finite number, got -0.001"),
    (["--lr", "nan"], "--lr must be a positive finite number, got nan"),
    (["--lr", "inf"], "--lr must be a positive finite number, got inf"),
    (["--lr", "0"], "--lr must be a positive finite number, got 0.0"),
    (["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
    (["--batch-size", "-8"], "--batch-size must be a positive integer, got -8"),
    (["--num-particles", "0"], "--num-particles must be a positive integer, got 0"),
    (["--beta", "-1"], "--beta must be a finite number of at least 0, got -1.0"),
    (["--beta", "nan"], "--beta must be a finite number of at least 0, got nan"),
    (["--kl-anneal", "-1"], "--kl-anneal must be a non-negative integer, got -1"),
    (["--kl-anneal-start", "-0.5"], "--kl-anneal-start must be a finite number of at least 0"),
    (["--free-bits", "-1"], "--free-bits must be a finite number of at least 0, got -1.0"),
    (["--aggressive", "--aggressive-patience", "0"],
     "--aggressive-patience must be a positive integer, got 0"),
    (["--seed", "-1"], "--seed must be a non-negative integer below 2**32, got -1"),
    (["--val-size", "-5"], "--val-size (val_size=) must be a non-negative integer"),
    (["--val-size", "0.2"], "--val-size (val_size=) must be a non-negative integer"),
    (["--val-size", "1500"], "--val-size (val_size=) 1500 would leave no training images"),
    (["--val-size", "official"], "only binarized-mnist has, not digits"),
    (["--lr-schedule", "step"], "--lr-schedule step needs --lr-step N"),
    (["--lr-schedule", "step", "--lr-step", "0"], "--lr-step must be a positive integer"),
    (["--lr-schedule", "step", "--lr-step", "2", "--lr-gamma", "0"],
     "--lr-gamma must be a positive finite number"),
    (["--lr-schedule", "cosine", "--lr-min", "0.01"], "--lr-min (0.01) must be below --lr"),
    (["--lr-min", "0.0001"], "--lr-min sets the cosine schedule"),
    (["--lr-schedule", "burda", "--epochs", "4000"], "burda ends after 3280 epochs"),
    (["--iwae-every", "-2"], "--iwae-every must be a non-negative integer, got -2"),
    (["--iwae-every", "5", "--iwae-samples", "0"], "--iwae-samples must be a positive integer"),
    (["--diagnostics-every", "0"], "--diagnostics-every must be a positive integer, got 0"),
])
def test_training_values_out_of_range_are_refused_before_the_data(
        capsys, tmp_path, no_data, args, message):
    err = train_refused(capsys, tmp_path, *args)
    assert err.startswith("pyrovae train: error: ")
    assert message in err


def test_train_config_validate_is_the_one_check_and_python_callers_get_it_too():
    assert TrainConfig().validate() == TrainConfig()
    assert TrainConfig(beta=0, kl_anneal=0, free_bits=0).validate().beta == 0  # documented: 0 is off
    for bad in ({"epochs": 2.5}, {"epochs": True}, {"lr": "0.1"}, {"lr": math.inf},
                {"batch_size": 0}, {"seed": 2**32}):
        with pytest.raises(PyrovaeError, match="must be"):
            TrainConfig(**bad).validate()


@pytest.mark.parametrize("args,message", [
    (["--z-dim", "0"], "argument --z-dim: must be a positive integer, got '0'"),
    (["--z-dim", "-3"], "argument --z-dim: must be a positive integer, got '-3'"),
    (["--hidden", "0"], "argument --hidden: must be a positive integer, got '0'"),
    (["--hidden", "-5"], "argument --hidden: must be a positive integer, got '-5'"),
    (["--hidden", "400", "0"], "argument --hidden: must be a positive integer, got '0'"),
    (["--eval-samples", "0"], "argument --eval-samples: must be a positive integer, got '0'"),
])
def test_sizes_and_counts_are_refused_by_the_parser(capsys, tmp_path, no_data, args, message):
    err = train_refused(capsys, tmp_path, *args)
    assert "usage: pyrovae train" in err and message in err


# ---------------------------------------------------------------- family parameters


@pytest.mark.parametrize("args,flag", [
    (["--prior-param", "scale=big"], "scale"),
    (["--prior-param", "scale=inf"], "scale"),
    (["--guide-param", "min_scale=-1"], "min_scale"),
])
def test_bad_family_parameters_are_refused_before_the_data(capsys, tmp_path, no_data, args, flag):
    err = train_refused(capsys, tmp_path, *args)
    assert err.startswith("pyrovae train: error: ") and flag in err


@pytest.mark.parametrize("args,message", [
    (["--prior-param", "scale"], "--prior-param takes KEY=VALUE"),
    (["--guide-param", "=5"], "--guide-param takes KEY=VALUE"),
    (["--likelihood-param", "scale="], "--likelihood-param takes KEY=VALUE"),
    (["--prior-param", "scale=1", "--prior-param", "scale=2"], "scale is given twice"),
])
def test_key_value_errors_exit_2(capsys, tmp_path, no_data, args, message):
    assert message in train_refused(capsys, tmp_path, *args)


# ---------------------------------------------------------------- run folder, data


def test_an_existing_run_is_refused_with_exit_2_before_the_data(capsys, tmp_path, no_data):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"")
    err = refused(capsys, ["train", *TINY, "--out", str(out)])
    assert "already holds a run" in err and "--resume" in err


def test_resume_without_out_exits_2(capsys, no_data):
    assert "--resume needs --out" in refused(capsys, ["train", "--resume"])


def test_binarized_mnist_refuses_dynamic_binarization_in_flag_words(capsys, tmp_path, no_data):
    err = train_refused(capsys, tmp_path, "--dataset", "binarized-mnist", "--binarize", "dynamic")
    assert "--binarize dynamic cannot apply to binarized-mnist" in err
    assert "--dataset mnist --binarize dynamic" in err
    assert "binarize='dynamic'" not in err


def test_data_that_are_already_binary_need_no_binarization_by_default():
    config = TrainConfig(dataset="binarized-mnist")
    assert config.resolved_binarize("bernoulli") == "static"
    assert config.resolved_binarize("gaussian") == "static"
    assert TrainConfig(dataset="mnist").resolved_binarize("bernoulli") == "dynamic"
    assert TrainConfig(dataset="mnist").resolved_binarize("gaussian") == "none"
    assert TrainConfig(dataset="mnist", binarize="static").resolved_binarize("bernoulli") == "static"


def test_the_readme_command_for_binarized_mnist_trains(capsys, tmp_path, shared_data_dir):
    out = tmp_path / "run"
    code = main(["train", *TINY, "--dataset", "binarized-mnist", "--data-dir",
                 str(shared_data_dir), "--epochs", "1", "--batch-size", "1000", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert config["training"]["binarize"] == "static"


# ---------------------------------------------------------------- evaluate and plot


@pytest.mark.parametrize("argv,message", [
    (["evaluate", "RUN", "--num-images", "-5"], "argument --num-images: must be a positive"),
    (["evaluate", "RUN", "--num-images", "0"], "argument --num-images: must be a positive"),
    (["evaluate", "RUN", "--subset-size", "0"], "argument --subset-size: must be a positive"),
    (["evaluate", "RUN", "--num-samples", "0"], "argument --num-samples: must be a positive"),
    (["evaluate", "RUN", "--max-elements", "0"], "argument --max-elements: must be a positive"),
    (["evaluate", "RUN", "--data-block", "0"], "argument --data-block: must be a positive"),
    (["evaluate", "RUN", "--seed", "-1"], "argument --seed: must be an integer from 0"),
    (["plot", "RUN", "--seed", "-1"], "argument --seed: must be an integer from 0"),
])
def test_evaluate_and_plot_counts_are_refused_by_the_parser(capsys, argv, message):
    assert message in refused(capsys, argv)


def test_evaluate_with_too_few_samples_for_khat_says_so(capsys, tmp_path):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    with pytest.warns(UserWarning, match="too few for PSIS k-hat"):
        assert main(["evaluate", str(out), "--num-samples", "1", "--num-images", "10",
                     "--subset-size", "2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "nan%" not in printed
    assert "no k-hat: it needs K >= 21 importance samples" in printed


def test_evaluate_data_block_reaches_ais_and_a_block_too_large_is_refused(capsys, tmp_path):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    ais = ["evaluate", str(out), "--method", "ais", "--num-images", "5", "--ais-steps", "3",
           "--num-samples", "2", "--no-progress"]
    err = refused(capsys, ais + ["--data-block", "100", "--max-elements", "1000"])
    assert "max_elements=1000 is below 16 chains x data_block=100" in err
    assert not (out / "evaluation_ais.json").exists()
    assert main(ais + ["--data-block", "2"]) == 0
    written = json.loads((out / "evaluation_ais.json").read_text())
    assert written["num_datapoints"] == 5 and len(written["per_datapoint_log_px"]) == 5


# ---------------------------------------------------------------- --help


def parsers() -> dict[str, argparse.ArgumentParser]:
    sub = argparse.ArgumentParser(prog="pyrovae").add_subparsers()
    return {name: importlib.import_module(f"pyrovae.cli.{name}").add_parser(sub)
            for name in SUBCOMMANDS}


@pytest.mark.parametrize("command", ["", *SUBCOMMANDS])
def test_help_has_no_rst_backticks(capsys, command):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"] if command else ["--help"])
    assert exit_.value.code == 0
    assert "`" not in capsys.readouterr().out


def test_every_flag_with_a_default_names_it_in_its_help():
    for name, parser in parsers().items():
        for action in parser._actions:
            if action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
                continue
            assert action.help and "default" in action.help, (name, action.option_strings)
    train = {a.dest: a for a in parsers()["train"]._actions}
    for dest in ("z_dim", "hidden", "batch_size", "lr", "seed", "num_particles", "epochs"):
        assert "default" in train[dest].help, dest


def test_the_run_folder_has_one_name_in_every_subcommand():
    found = parsers()
    for name in ("evaluate", "plot"):
        (positional,) = [a for a in found[name]._actions if not a.option_strings]
        assert positional.metavar == "RUN" and positional.dest == "run_folder"
    (out,) = [a for a in found["train"]._actions if "--out" in a.option_strings]
    assert out.metavar == "RUN"
