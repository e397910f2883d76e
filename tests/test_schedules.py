"""Learning-rate schedules (--lr-schedule), the periodic test IWAE bound (--iwae-every) and
collapse diagnostics (--diagnostics-every).

The schedules' values are checked against their formulas, Burda et al.'s to the
bit; a run stopped and resumed with a schedule gives the parameters of an
uninterrupted one to the bit (the same machine); the IWAE bound comes at the
epochs asked for, with the training time, and leaves the training as it was.
"""

import json
import math

import pyro
import pytest
import torch

from pyrovae import VAE, Trainer, TrainConfig, load_dataset
from pyrovae.cli.train import default_epochs
from pyrovae.errors import PyrovaeError
from pyrovae.run import BURDA_EPOCHS, CHECKPOINT_FILE, METRICS_FILE
from pyrovae.svi import FusedOptim, make_lr_schedule
from pyrovae.training import DIAGNOSTIC_KEYS

LR = 0.003


def scheduled_lrs(name, epochs, lr=LR, groups=1, **settings):
    """The learning rate of each epoch 1 ... epochs, read off the optimizer the trainer
    uses, stepped once per epoch as the trainer steps it."""
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(groups)]
    optim = FusedOptim(torch.optim.Adam, {"lr": lr, "fused": True},
                       schedule=make_lr_schedule(name, epochs, **settings))
    lrs = []
    for epoch in range(1, epochs + 1):
        # a second parameter group joins in epoch 2, as aggressive training adds one
        for p in params[: 1 if epoch == 1 else groups]:
            p.grad = torch.ones(2)
        optim(params[: 1 if epoch == 1 else groups])
        group_lrs = {group["lr"] for group in optim.optimizer.param_groups}
        assert len(group_lrs) == 1, f"the groups disagree in epoch {epoch}: {group_lrs}"
        lrs.append(optim.lr)
        optim.step_schedule()
    return lrs


def test_burda_schedule_is_the_papers_to_the_bit():
    assert BURDA_EPOCHS == 3280 == sum(3**i for i in range(8))
    lrs = scheduled_lrs("burda", BURDA_EPOCHS)
    # stage i (lr * 10**(-i/7)) lasts 3**i epochs: epoch 1 is stage 0, 2-4 stage 1,
    # 5-13 stage 2, ..., 1094-3280 stage 7
    expected_stage = {1: 0, 2: 1, 3: 1, 4: 1, 5: 2, 12: 2, 13: 2, 14: 3, 40: 3, 41: 4,
                      1093: 6, 1094: 7, 3280: 7}
    for epoch, stage in expected_stage.items():
        assert lrs[epoch - 1] == LR * 10 ** (-stage / 7), epoch
    boundaries = [1 + sum(3**j for j in range(i)) for i in range(8)]
    assert boundaries == [1, 2, 5, 14, 41, 122, 365, 1094]
    for first in boundaries[1:]:
        assert lrs[first - 1] < lrs[first - 2]  # each stage starts with a drop
    assert len(set(lrs)) == 8
    assert lrs[-1] == pytest.approx(LR / 10, rel=1e-15)


def test_burda_schedule_is_3280_epochs_by_default_and_refuses_more():
    assert default_epochs("burda") == BURDA_EPOCHS and default_epochs("constant") == 100
    TrainConfig(lr_schedule="burda", epochs=BURDA_EPOCHS).validate()
    with pytest.raises(PyrovaeError, match="burda ends after 3280 epochs"):
        TrainConfig(lr_schedule="burda", epochs=BURDA_EPOCHS + 1).validate()


def test_step_schedule_multiplies_by_gamma_every_step_epochs():
    lrs = scheduled_lrs("step", 10, step=3, gamma=0.5)
    for epoch, lr in enumerate(lrs, start=1):
        assert lr == pytest.approx(LR * 0.5 ** ((epoch - 1) // 3), rel=1e-12), epoch


def test_cosine_schedule_decays_from_lr_towards_lr_min_over_the_run():
    epochs, lr_min = 12, 2e-4
    lrs = scheduled_lrs("cosine", epochs, lr_min=lr_min)
    for epoch, lr in enumerate(lrs, start=1):
        formula = lr_min + (LR - lr_min) * (1 + math.cos(math.pi * (epoch - 1) / epochs)) / 2
        assert lr == pytest.approx(formula, rel=1e-12, abs=1e-18), epoch
    assert lrs[0] == LR and all(a > b > lr_min for a, b in zip(lrs, lrs[1:]))


def test_a_parameter_group_added_later_follows_the_schedule():
    lrs = scheduled_lrs("step", 6, groups=2, step=2, gamma=0.1)  # checks the groups agree
    assert lrs[-1] == pytest.approx(LR * 0.01, rel=1e-12)


def test_constant_schedule_builds_no_scheduler():
    assert make_lr_schedule("constant", 10) is None
    assert scheduled_lrs("constant", 3) == [LR] * 3


# ---------------------------------------------------------------- in training


def make_trainer(out, epochs=4, jit=True, **settings):
    config = TrainConfig(dataset="digits", binarize="dynamic", epochs=epochs, batch_size=256,
                         lr=LR, seed=5, device="cpu", jit=jit, **settings)
    data = load_dataset("digits", binarize=config.binarize, seed=config.seed)
    pyro.set_rng_seed(config.seed)
    vae = VAE(data.x_shape, z_dim=3, hidden=(24,))
    return Trainer(vae, data, config, out=out, progress=False)


def checkpoint(folder):
    return torch.load(folder / CHECKPOINT_FILE, weights_only=True)


def assert_same_run(a, b, metrics_a, metrics_b):
    """Parameters, Adam state and metrics identical to the bit (same machine)."""
    ca, cb = checkpoint(a), checkpoint(b)
    assert ca["epoch"] == cb["epoch"]
    for name in cb["model"]:
        assert torch.equal(ca["model"][name], cb["model"][name]), name
    for name, state in cb["optimizer"].items():
        for key, value in state["state"][0].items():
            assert torch.equal(ca["optimizer"][name]["state"][0][key], value), (name, key)
    timeless = [[{k: v for k, v in m.items() if k not in ("seconds", "train_seconds")}
                 for m in metrics] for metrics in (metrics_a, metrics_b)]
    assert timeless[0] == timeless[1]


@pytest.mark.parametrize("schedule,settings,jit", [
    ("step", {"lr_step": 1, "lr_gamma": 0.5}, True),
    ("cosine", {"lr_min": 1e-4}, False),
])
def test_a_resumed_run_with_a_schedule_is_the_uninterrupted_one(tmp_path, schedule, settings,
                                                                 jit):
    make_trainer(tmp_path / "a", epochs=2, jit=jit, lr_schedule=schedule, **settings).fit()
    config = json.loads((tmp_path / "a" / "config.json").read_text())["training"]
    assert config["lr_schedule"] == schedule
    resumed = Trainer.resume(tmp_path / "a", epochs=4, progress=False)
    assert resumed.config.lr_schedule == schedule and resumed.epoch == 2
    metrics_a = resumed.fit()
    metrics_b = make_trainer(tmp_path / "b", epochs=4, jit=jit, lr_schedule=schedule,
                             **settings).fit()
    if schedule == "step":
        assert [m["lr"] for m in metrics_b] == [LR * 0.5**k for k in range(4)]
        assert_same_run(tmp_path / "a", tmp_path / "b", metrics_a, metrics_b)
    else:
        # 2 epochs planned, then 4: the cosine schedule is recomputed over the new total
        # from epoch 3 on, so epochs 3 and 4 get the 4-epoch run's rates
        assert [m["lr"] for m in metrics_a[2:]] == [m["lr"] for m in metrics_b[2:]]


def test_a_run_stopped_and_resumed_at_its_planned_length_is_bit_identical(tmp_path):
    """The cosine schedule over 4 epochs, stopped after 2 (as Ctrl-C or a crash would) and
    resumed: the same parameters as 4 straight."""
    stopped = make_trainer(tmp_path / "a", epochs=4, lr_schedule="cosine", lr_min=1e-4)
    stopped.config.epochs = 2  # stop after epoch 2 without changing the saved schedule
    stopped.fit()
    resumed = Trainer.resume(tmp_path / "a", epochs=4, progress=False)
    metrics_a = resumed.fit()
    metrics_b = make_trainer(tmp_path / "b", epochs=4, lr_schedule="cosine",
                             lr_min=1e-4).fit()
    assert_same_run(tmp_path / "a", tmp_path / "b", metrics_a, metrics_b)
    assert metrics_b[0]["lr"] == LR and metrics_b[3]["lr"] < metrics_b[2]["lr"] < LR


def test_the_constant_schedule_records_the_lr_and_changes_nothing(tmp_path):
    metrics = make_trainer(tmp_path, epochs=2).fit()
    assert [m["lr"] for m in metrics] == [LR, LR]


# ---------------------------------------------------------------- the periodic IWAE bound


def test_the_iwae_bound_comes_every_e_epochs_and_in_the_last(tmp_path):
    metrics = make_trainer(tmp_path / "iwae", epochs=5, iwae_every=2, iwae_samples=20).fit()
    with_bound = [m["epoch"] for m in metrics if "test_iwae_bound" in m]
    assert with_bound == [2, 4, 5]
    seconds = [m["train_seconds"] for m in metrics if "test_iwae_bound" in m]
    assert 0 < seconds[0] < seconds[1] < seconds[2]
    # the training time leaves out the evaluation callbacks that each epoch's seconds hold
    assert seconds[-1] < sum(m["seconds"] for m in metrics)
    for m in metrics:
        if "test_iwae_bound" in m:
            assert m["iwae_samples"] == 20
            # the IWAE bound with K = 20 is tighter than the ELBO (K = 1) on average
            assert m["test_elbo"] < m["test_iwae_bound"] < 0
    assert json.loads((tmp_path / "iwae" / METRICS_FILE).read_text()) == metrics
    # and it leaves the training as it was, to the bit
    plain = make_trainer(tmp_path / "plain", epochs=5).fit()
    for name, value in checkpoint(tmp_path / "plain")["model"].items():
        assert torch.equal(checkpoint(tmp_path / "iwae")["model"][name], value), name
    assert [m["train_elbo"] for m in plain] == [m["train_elbo"] for m in metrics]


def test_the_diagnostics_come_every_e_epochs_and_in_the_last_as_an_every_epoch_run_has_them(
        tmp_path):
    sparse = make_trainer(tmp_path / "sparse", epochs=5, diagnostics_every=2).fit()
    assert [m["epoch"] for m in sparse if "active_units" in m] == [2, 4, 5]
    dense = make_trainer(tmp_path / "dense", epochs=5).fit()
    assert all(set(DIAGNOSTIC_KEYS) <= set(m) for m in dense)
    # their own RNG stream: the same values at the same epochs, and the training to the bit
    for a, b in zip(sparse, dense):
        assert {key: a[key] for key in a if key != "seconds"} == \
            {key: b[key] for key in a if key != "seconds"}
    for name, value in checkpoint(tmp_path / "dense")["model"].items():
        assert torch.equal(checkpoint(tmp_path / "sparse")["model"][name], value), name
    # a time budget that ends the run ends it with the diagnostics, as a last epoch has them
    [budget] = make_trainer(tmp_path / "budget", epochs=5, diagnostics_every=3,
                            time_budget=1e-6).fit()
    assert set(DIAGNOSTIC_KEYS) <= set(budget)


def test_the_training_time_goes_on_across_a_resume(tmp_path):
    make_trainer(tmp_path, epochs=2, iwae_every=2, iwae_samples=5).fit()
    before = json.loads((tmp_path / METRICS_FILE).read_text())[-1]["train_seconds"]
    metrics = Trainer.resume(tmp_path, epochs=4, progress=False).fit()
    assert metrics[-1]["train_seconds"] > before and metrics[1]["train_seconds"] == before
    assert json.loads((tmp_path / "config.json").read_text())["training"]["iwae_every"] == 2


@pytest.mark.parametrize("settings,message", [
    ({"lr_schedule": "linear"}, "--lr-schedule must be one of constant, burda, step, cosine"),
    ({"lr_schedule": "step"}, "--lr-schedule step needs --lr-step N"),
    ({"lr_schedule": "step", "lr_step": 0}, "--lr-step must be a positive integer, got 0"),
    ({"lr_schedule": "step", "lr_step": 2.5}, "--lr-step must be a positive integer"),
    ({"lr_schedule": "step", "lr_step": 2, "lr_gamma": 0},
     "--lr-gamma must be a positive finite number"),
    ({"lr_schedule": "step", "lr_step": 2, "lr_gamma": 2}, "--lr-gamma must be at most 1"),
    ({"lr_step": 2}, "--lr-step sets the step schedule, but --lr-schedule is constant"),
    ({"lr_min": 1e-5}, "--lr-min sets the cosine schedule"),
    ({"lr_schedule": "cosine", "lr_min": 1e-3}, "--lr-min (0.001) must be below --lr"),
    ({"lr_schedule": "cosine", "lr_min": -1.0}, "--lr-min must be a finite number of at least"),
    ({"iwae_every": -1}, "--iwae-every must be a non-negative integer"),
    ({"iwae_samples": 0}, "--iwae-samples must be a positive integer"),
    ({"diagnostics_every": 0}, "--diagnostics-every must be a positive integer, got 0"),
    ({"diagnostics_every": 2, "aggressive": True},
     "--aggressive decides after every epoch from I(x; z), which --diagnostics-every 2"),
])
def test_bad_schedule_and_iwae_settings_are_named(settings, message):
    with pytest.raises(PyrovaeError) as error:
        TrainConfig(lr=1e-3, **settings).validate()
    assert message in str(error.value)


# ---------------------------------------------------------------- the time budget


def test_a_time_budget_ends_the_run_after_the_epoch_that_spends_it(tmp_path):
    # any epoch's steps take more than a microsecond: the budget is spent in epoch 1
    trainer = make_trainer(tmp_path / "budget", epochs=5, iwae_every=10, iwae_samples=5,
                           time_budget=1e-6)
    metrics = trainer.fit()
    assert [m["epoch"] for m in metrics] == [1] and not trainer.interrupted
    # the last epoch of the run has the test IWAE bound, as a planned last epoch does
    assert metrics[0]["train_seconds"] == trainer.train_seconds >= 1e-6
    assert "test_iwae_bound" in metrics[0]
    assert checkpoint(tmp_path / "budget")["epoch"] == 1
    saved = json.loads((tmp_path / "budget" / "config.json").read_text())["training"]
    assert saved["time_budget"] == 1e-6 and saved["epochs"] == 5


def test_a_spent_budget_resumes_to_nothing_and_a_larger_one_goes_on_to_the_bit(tmp_path):
    make_trainer(tmp_path / "budget", epochs=3, time_budget=1e-6).fit()
    assert Trainer.resume(tmp_path / "budget", progress=False).fit()[-1]["epoch"] == 1
    resumed = Trainer.resume(tmp_path / "budget", progress=False, time_budget=1e6).fit()
    assert [m["epoch"] for m in resumed] == [1, 2, 3]
    whole = make_trainer(tmp_path / "whole", epochs=3).fit()
    assert_same_run(tmp_path / "budget", tmp_path / "whole", resumed, whole)


@pytest.mark.parametrize("budget", [0, -5.0, float("nan"), float("inf")])
def test_a_time_budget_must_be_a_positive_number_of_seconds(budget):
    with pytest.raises(PyrovaeError, match="--time-budget must be a positive finite number"):
        TrainConfig(time_budget=budget).validate()
