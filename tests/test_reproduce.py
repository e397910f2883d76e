"""benchmarks/reproduce.py: every preset end to end in its smoke mode, and the report."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "reproduce.py"


def load_script():
    spec = importlib.util.spec_from_file_location("reproduce", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


reproduce = load_script()
REQUIRED_KEYS = {"nll", "train_seconds", "dataset", "binarize", "device"}


def test_list_shows_every_preset_with_its_command():
    listed = subprocess.run([sys.executable, str(SCRIPT), "--list"], capture_output=True,
                            text=True, check=True).stdout
    for name, preset in reproduce.PRESETS.items():
        assert name in listed
        assert reproduce.command(["train", *preset.train_flags()]) in listed


def test_the_burda_presets_fix_burdas_set_up():
    for name in ("dmnist-vae", "dmnist-iwae5", "dmnist-iwae50"):
        flags = reproduce.PRESETS[name].train_flags()
        assert flags[flags.index("--lr-schedule") + 1] == "burda"
        assert flags[flags.index("--epochs") + 1] == "3280"
        assert flags[flags.index("--arch") + 1] == "burda-1layer"
        assert flags[flags.index("--binarize") + 1] == "dynamic"
    iwae5 = reproduce.PRESETS["dmnist-iwae5"].train_flags()
    assert iwae5[iwae5.index("--num-particles") + 1] == "5"
    static = reproduce.PRESETS["smnist-vae"].train_flags()
    assert static[static.index("--val-size") + 1] == "official"


@pytest.mark.parametrize("name", list(reproduce.PRESETS))
def test_every_preset_runs_end_to_end_in_smoke_mode(name, shared_data_dir, tmp_path):
    result = reproduce.reproduce(name, tmp_path / "runs", tmp_path / "results", smoke=True)
    written = json.loads((tmp_path / "results" / f"{name}.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert REQUIRED_KEYS <= set(written)
    assert written["smoke"] is True and written["epochs"] == 1
    preset = reproduce.PRESETS[name]
    assert (written["dataset"], written["device"]) == (preset.dataset, "cpu")
    assert written["binarize"] == ("none" if preset.binarize == "static" else preset.binarize)
    assert written["checkpoint"] == ("best" if preset.val_size else "last")
    for key in ("nll", "nll_se", "ais_nll", "elbo", "train_seconds"):
        assert math.isfinite(written[key]), key
    # the IWAE bound and the ELBO are lower bounds of log p(x), so -ELBO >= the NLL
    # estimate of the same samples, whose mean it is
    assert -written["elbo"] >= written["nll"]
    # the gap is paired image by image: its mean is the difference of the two means
    assert written["is_minus_ais_on_ais_images"] == pytest.approx(
        written["is_nll_on_ais_images"] - written["ais_nll"], rel=1e-9, abs=1e-9)
    assert written["is_minus_ais_se"] > 0
    assert written["test_iwae_curve"] and written["test_iwae_curve"][-1]["epoch"] == 1
    assert written["commands"][0].startswith("pyrovae train --dataset ")


def test_report_tables_the_results_and_draws_the_curve(tmp_path, monkeypatch):
    results = tmp_path / "results"
    results.mkdir()
    base = {"smoke": False, "epochs": 10, "train_seconds": 600.0, "nll": 90.0, "nll_se": 0.25,
            "ais_nll": 89.0, "ais_images": 1000, "is_nll_on_ais_images": 89.5,
            "khat_frac_above_0_7": 0.9,
            "machine": {"cuda": None, "cores": 2}, "device": "cpu", "pythae": None}
    gpu = {"cuda": "NVIDIA H200", "cores": 16}
    trained_on_gpu = {"machine": gpu, "device": "cuda"}
    for name, nll, evaluated, where in (("dmnist-vae", 90.0, None, {}),
                                        ("dmnist-iwae5", 89.0, gpu, {}),
                                        ("dmnist-conv", 86.0, None, trained_on_gpu),
                                        ("smnist-vae", 91.0, None, {})):
        record = {**base, **where, "preset": name, "nll": nll,
                  "paper": reproduce.PRESETS[name].paper,
                  "time_budget_seconds": 600.0, "planned_epochs": 3280,
                  "evaluation_machine": evaluated,
                  "test_iwae_curve": [{"epoch": 5, "train_seconds": 300.0,
                                       "test_iwae_bound": -nll - 2},
                                      {"epoch": 10, "train_seconds": 600.0,
                                       "test_iwae_bound": -nll - 1}]}
        (results / f"{name}.json").write_text(json.dumps(record))
    (results / "smoke.json").write_text(json.dumps({**base, "preset": "x", "smoke": True}))
    drawn, draw = [], reproduce.plot_time_to_quality
    monkeypatch.setattr(reproduce, "plot_time_to_quality",
                        lambda curves, *args: drawn.append((sorted(curves), args))
                        or draw(curves, *args))
    table = reproduce.report(results).splitlines()
    assert len(table) == 6  # the header, its rule and the four real results, not the smoke
    assert ("| `dmnist-vae` | `reproduce.py dmnist-vae --time-budget 600` | 10 | "
            "600 s, 2-core CPU | 90.00 ± 0.25 |") in table[2]
    # trained on the CPU, evaluated on a GPU: the row says both
    assert "600 s, 2-core CPU; evaluated on NVIDIA H200 | 89.00 ± 0.25 |" in table[3]
    assert "| 89.00 (89.50 on the first 1000) | 90.0 % |" in table[2]
    assert "86.76" in table[2]
    # trained on a GPU: the command says so, and so does its curve, whose seconds are
    # not the CPU's
    assert "| `reproduce.py dmnist-conv --time-budget 600 --device cuda` |" in table[5]
    assert "600 s, NVIDIA H200 |" in table[5]
    assert table[4].startswith("| `smnist-vae` |")  # the presets' order: the GPU rows last
    # one figure per test set, each with its own paper's VAE as the line to beat
    assert drawn == [
        (["dmnist-conv (NVIDIA H200)", "dmnist-iwae5 (2-core CPU)", "dmnist-vae (2-core CPU)"],
         (86.76, "Burda, Grosse & Salakhutdinov (2016), Table 1, VAE after 3280 epochs")),
        (["smnist-vae (2-core CPU)"], (88.71, "Burda, Grosse & Salakhutdinov (2016), Table 3, VAE"))]
    for figure, _ in reproduce.FIGURES.values():
        assert (results / figure).stat().st_size > 0


@pytest.mark.parametrize("argv,message", [
    (["no-such-preset"], "unknown"),
    (["dmnist-vae", "--epochs", "0"], "--epochs must be a positive"),
    (["dmnist-vae", "--time-budget", "-5"], "--time-budget must be a positive"),
])
def test_bad_arguments_are_refused_before_any_work(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        reproduce.main(argv + ["--runs-dir", str(tmp_path / "runs")])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_evaluate_only_evaluates_a_run_trained_before_and_refuses_others(shared_data_dir,
                                                                         tmp_path):
    runs = tmp_path / "runs"
    first = reproduce.reproduce("dmnist-vae", runs, tmp_path / "a", smoke=True)
    run = runs / "dmnist-vae"
    # as after an AIS that was stopped: the IS it finished is kept, the AIS runs again
    (run / "evaluation_ais.json").unlink()
    is_written = (run / "evaluation.json").stat().st_mtime_ns
    again = reproduce.reproduce("dmnist-vae", runs, tmp_path / "b", smoke=True,
                                evaluate_only=True)
    assert (run / "evaluation.json").stat().st_mtime_ns == is_written
    # a run trained but never evaluated (the evaluation ran elsewhere, or the process
    # stopped before it): no file and no record of one is not a step finished
    (run / "evaluation.json").unlink()
    (run / "evaluation_ais.json").unlink()
    record = runs / "dmnist-vae.training.json"
    record.write_text(json.dumps({k: v for k, v in json.loads(record.read_text()).items()
                                  if k != "evaluated"}))
    reproduce.reproduce("dmnist-vae", runs, tmp_path / "b", smoke=True, evaluate_only=True)
    assert (run / "evaluation.json").is_file() and (run / "evaluation_ais.json").is_file()
    # an evaluation file changed since (by hand, say) is evaluated again
    changed = (run / "evaluation.json").read_text() + " "
    (run / "evaluation.json").write_text(changed)
    reproduce.reproduce("dmnist-vae", runs, tmp_path / "b", smoke=True, evaluate_only=True)
    assert (run / "evaluation.json").read_text() != changed
    # the same checkpoint, evaluated with the same seeds (same machine, same process)
    for key in ("nll", "ais_nll", "elbo", "train_seconds", "train_command_seconds",
                "commands", "epochs", "machine"):
        assert again[key] == first[key], key
    # the training's machine is the record's, kept apart from the evaluation's
    record = runs / "dmnist-vae.training.json"
    assert again["machine"] == json.loads(record.read_text())["machine"]
    assert again["evaluation_machine"]["cores"] == again["machine"]["cores"]
    # a record without its machine cannot say where the row trained
    record.write_text(json.dumps({k: v for k, v in json.loads(record.read_text()).items()
                                  if k != "machine"}))
    with pytest.raises(reproduce.PyrovaeError, match=r"lacks \['machine'\]"):
        reproduce.reproduce("dmnist-vae", runs, tmp_path / "d", evaluate_only=True)
    (runs / "dmnist-iwae5").mkdir()
    with pytest.raises(reproduce.PyrovaeError, match="holds no dmnist-iwae5.training.json"):
        reproduce.reproduce("dmnist-iwae5", runs, tmp_path / "c", evaluate_only=True)
    assert not (tmp_path / "c").exists()


class ProcessStopped(BaseException):
    """What a training's process sees of a session's end: nothing it can catch."""


@pytest.mark.parametrize("stop,raised,message", [
    (ProcessStopped, ProcessStopped, None),  # the process ended: the training never returned
    # Ctrl-C, or SIGTERM, which pyrovae train turns into one: it saved and returned
    (KeyboardInterrupt, reproduce.PyrovaeError, "stopped by Ctrl-C or SIGTERM.*--resume")])
def test_resume_continues_a_training_stopped_with_its_process(shared_data_dir, tmp_path,
                                                                monkeypatch, capsys, stop,
                                                                raised, message):
    import pyrovae.training
    runs, results = tmp_path / "runs", tmp_path / "results"
    diagnose, calls = pyrovae.training.collapse_diagnostics, []

    def stopped_in_the_second_epoch(*args, **kwargs):
        # the presets' diagnostics come every 10 epochs and in the last: epoch 2's is the first
        calls.append(1)
        if len(calls) == 1:
            raise stop
        return diagnose(*args, **kwargs)

    monkeypatch.setattr(pyrovae.training, "collapse_diagnostics", stopped_in_the_second_epoch)
    with pytest.raises(raised, match=message):
        reproduce.reproduce("dmnist-vae", runs, results, epochs=2, smoke=True)
    monkeypatch.undo()
    record = json.loads((runs / "dmnist-vae.training.json").read_text())
    # written before the training: it says what ran, and that it did not end; a command
    # that saved its run on Ctrl-C returned, and its seconds are known
    saved_on_ctrl_c = stop is KeyboardInterrupt
    assert record["trained"] is False
    first = record["commands"][0]
    assert (first["seconds"] > 0) if saved_on_ctrl_c else first["seconds"] is None
    assert first.get("stopped", False) is saved_on_ctrl_c
    assert record["commands"][0]["command"].startswith("pyrovae train --dataset ")
    assert not results.exists()
    with pytest.raises(reproduce.PyrovaeError, match="not trained to its end.*--resume"):
        reproduce.reproduce("dmnist-vae", runs, results, smoke=True, evaluate_only=True)
    with pytest.raises(reproduce.PyrovaeError, match="exists: --resume continues"):
        reproduce.reproduce("dmnist-vae", runs, results, epochs=2, smoke=True)

    row = reproduce.reproduce("dmnist-vae", runs, results, smoke=True, resume=True)
    assert row["epochs"] == 2 and [c["epoch"] for c in row["test_iwae_curve"]] == [2]
    assert row["commands"][0] == record["commands"][0]["command"]  # the training's flags
    assert [c["command"].split()[:3] for c in row["train_commands"]] == [
        ["pyrovae", "train", "--dataset"], ["pyrovae", "train", "--resume"]]
    # a command that ended with its process has no seconds; its epochs' are in the metrics
    assert row["train_command_seconds"] == (
        pytest.approx(sum(c["seconds"] for c in row["train_commands"])) if saved_on_ctrl_c
        else None)
    assert row["train_commands"][1]["seconds"] > 0 and row["train_epochs_seconds"] > 0
    with pytest.raises(reproduce.PyrovaeError, match="trained to its end: --evaluate-only"):
        reproduce.reproduce("dmnist-vae", runs, results, smoke=True, resume=True)
    (results / "dmnist-vae.json").write_text(json.dumps({**row, "smoke": False}))
    assert "| `reproduce.py dmnist-vae --epochs 2`, then `--resume` |" in \
        reproduce.report(results)


@pytest.mark.parametrize("argv,message", [
    (["--resume", "--time-budget", "60"], "--resume goes on with a run as it was started: "
                                          "--time-budget would change it"),
    (["--evaluate-only", "--epochs", "3"], "--evaluate-only goes on with a run as it was "
                                           "started: --epochs would change it"),
    (["--resume", "--overwrite"], "--overwrite would change it"),
    (["--resume", "--evaluate-only"], "give one"),
])
def test_resume_and_evaluate_only_refuse_flags_that_would_change_the_run(argv, message,
                                                                         tmp_path, capsys):
    with pytest.raises(SystemExit):
        reproduce.main(["dmnist-vae", *argv, "--runs-dir", str(tmp_path / "runs")])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_record_written_before_records_held_their_commands_reads_as_one_finished_command(
        tmp_path):
    record = tmp_path / "dmnist-vae.training.json"
    flags = ["train", "--dataset", "mnist", "--out", "runs/dmnist-vae"]
    record.write_text(json.dumps({"flags": flags, "command_seconds": 5142.0,
                                  "time_budget": 3600.0, "machine": {"cores": 2}}))
    training = reproduce.read_record(record, trained=True)
    assert training["trained"] is True and "command_seconds" not in training
    assert training["commands"] == [{"command": "pyrovae train --dataset mnist --out "
                                                "runs/dmnist-vae", "seconds": 5142.0,
                                     "machine": {"cores": 2}}]
    with pytest.raises(reproduce.PyrovaeError, match="trained to its end"):
        reproduce.read_record(record, trained=False)
