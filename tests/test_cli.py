"""The training script end to end, as a user runs it."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pyrovae import VAE

ROOT = Path(__file__).resolve().parents[1]


def train(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--no-progress",
                           "--hidden", "32", "--z-dim", "3", *args],
                          capture_output=True, text=True, cwd=ROOT)


def test_train_script_on_digits_writes_its_outputs(tmp_path):
    out = tmp_path / "run"
    result = train("--epochs", "2", "--out", str(out), "--prior", "laplace",
                   "--guide", "student-t", "--guide-param", "df=4", "--elbo", "meanfield",
                   "--num-particles", "2", "--eval-samples", "30")
    assert result.returncode == 0, result.stderr
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["num_samples"] == 30 and evaluation["dataset"] == "digits"
    assert evaluation["nll"] < -evaluation["elbo"]  # log p(x) estimate above the ELBO
    # per image, for paired comparisons; their mean is the NLL (float32 sums)
    per_image = evaluation["per_datapoint_log_px"]
    assert len(per_image) == len(evaluation["per_datapoint_khat"]) == evaluation["num_datapoints"]
    assert -sum(per_image) / len(per_image) == pytest.approx(evaluation["nll"], rel=1e-5)
    assert (out / "reconstructions.png").exists() and (out / "evaluation_khat.png").exists()
    assert "epoch 2/2" in result.stdout and "test ELBO" in result.stdout
    assert "KL: 'z' (StudentT || Laplace)" in result.stdout
    assert "step: compiled by pyro.ops.jit" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert {"epoch", "train_elbo", "test_elbo", "kl", "recon"} <= set(metrics[0])
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["guide"]["df"] == 4.0
    assert config["training"]["binarize"] == "threshold"  # the digits default (getting-started)
    assert VAE.load(out).guide_family.name == "student-t"

    refused = train("--epochs", "2", "--out", str(out))
    assert refused.returncode != 0 and "--resume" in refused.stderr

    resumed = train("--epochs", "3", "--out", str(out), "--resume", "--no-jit")
    assert resumed.returncode == 0, resumed.stderr
    assert "step: eager (jit is off)" in resumed.stdout
    assert [m["epoch"] for m in json.loads((out / "metrics.json").read_text())] == [1, 2, 3]


def test_sigterm_saves_the_training_in_progress_and_resume_goes_on(tmp_path):
    out = tmp_path / "run"
    flags = ["--no-progress", "--hidden", "32", "--z-dim", "3", "--out", str(out)]
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "train.py"), *flags, "--epochs", "100000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoint.pt").exists():  # epoch 1's steps are saved
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
    # 128 + SIGTERM, after saving: Python's default would end the process at once
    assert process.returncode == 143, stderr
    assert "interrupted" in stdout + stderr
    epoch = torch.load(out / "checkpoint.pt", weights_only=False)["epoch"]
    assert epoch >= 1
    resumed = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), *flags, "--resume",
         "--epochs", str(epoch + 1)], capture_output=True, text=True, cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert [m["epoch"] for m in metrics] == list(range(1, epoch + 2))


@pytest.mark.parametrize("args,message", [
    (["--likelihood", "bernoulli", "--binarize", "none"], "--binarize dynamic or static"),
    (["--guide", "lognormal"], "Combinations that work"),
    (["--prior-param", "scale"], "KEY=VALUE"),
])
def test_bad_flags_get_clear_errors(tmp_path, args, message):
    result = train("--epochs", "1", "--out", str(tmp_path / "run"), *args)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_expressive_guide_and_prior_train_and_evaluate_from_the_command_line(tmp_path):
    out = tmp_path / "run"
    result = train("--epochs", "1", "--out", str(out), "--guide", "iaf", "--guide-param",
                   "flows=3", "--guide-param", "hidden=12,12", "--prior", "vamp",
                   "--prior-param", "components=20")
    assert result.returncode == 0, result.stderr
    assert "not initialized" not in result.stderr  # the pseudo-inputs start from the data
    assert "KL: the 'trace' objective estimates the KL of 'z' by Monte Carlo" in result.stdout
    config = json.loads((out / "config.json").read_text())["model"]
    assert config["guide"] == {"name": "iaf", "min_scale": 1e-4, "flows": 3, "hidden": [12, 12],
                               "context": 3}
    assert config["prior"] == {"name": "vamp", "components": 20, "init": "data",
                               "init_std": 0.01, "flow_components": "base"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics[-1]["kl_per_dim"] is None
    evaluated = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "evaluate.py"), str(out), "--num-samples", "30",
         "--num-images", "20", "--subset-size", "2", "--no-progress"],
        capture_output=True, text=True, cwd=ROOT)
    assert evaluated.returncode == 0, evaluated.stderr
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["num_datapoints"] == 20 and evaluation["nll"] < -evaluation["elbo"]
