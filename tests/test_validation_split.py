"""The validation split (--val-size) and the best checkpoint (best.pt).

The held-out images are a seeded choice, rebuilt the same by evaluate and resume,
and never reach a training step; the best checkpoint is the epoch with the best
validation ELBO in metrics.json, and loads to that epoch's parameters.
"""

import json

import pyro
import pytest
import torch

from pyrovae import VAE, Trainer, TrainConfig, load_dataset
from pyrovae.data import Dataset
from pyrovae.errors import PyrovaeError
from pyrovae.pipelines import evaluate_run, load_run_checkpoint, load_vae
from pyrovae.run import BEST_CHECKPOINT_FILE, METRICS_FILE
from pyrovae.training import Callback, TestELBO, default_callbacks

DIGITS_TRAIN = 1500


def rows(x: torch.Tensor) -> set:
    return {tuple(row.flatten().tolist()) for row in x}


def test_the_split_is_seeded_and_takes_the_rows_out_of_training():
    whole = load_dataset("digits")
    split = load_dataset("digits", val_size=100, seed=3)
    assert len(split.valid) == 100 and len(split.train) == DIGITS_TRAIN - 100
    assert torch.equal(split.test, whole.test)
    # every training image is in one of the two, once: by the labels, which follow the rows
    merged = torch.cat([split.train_labels, split.valid_labels]).bincount()
    assert torch.equal(merged, whole.train_labels.bincount())
    again = load_dataset("digits", val_size=100, seed=3)
    assert torch.equal(again.valid, split.valid) and torch.equal(again.train, split.train)
    other = load_dataset("digits", val_size=100, seed=4)
    assert not torch.equal(other.valid, split.valid)


def test_the_validation_rows_are_disjoint_from_the_training_rows():
    data = Dataset.from_tensors(torch.randn(300, 6), torch.randn(30, 6))  # distinct rows
    split = data.hold_out_validation(60, seed=1)
    assert rows(split.valid).isdisjoint(rows(split.train))
    assert rows(split.valid) | rows(split.train) == rows(data.train)


def test_dynamic_binarization_binarizes_the_validation_set_once():
    split = load_dataset("digits", binarize="dynamic", val_size=50, seed=2)
    assert set(split.valid.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(split.valid, load_dataset("digits", binarize="dynamic", val_size=50,
                                                 seed=2).valid)


def gaussian_trainer(out, epochs=2, **settings):
    data = Dataset.from_tensors(torch.randn(240, 5), torch.randn(40, 5), name="tensors")
    config = TrainConfig(dataset="tensors", binarize="none", epochs=epochs, batch_size=32,
                         seed=2, device="cpu", **settings)
    pyro.set_rng_seed(2)
    vae = VAE(data.x_shape, z_dim=2, hidden=(8,), likelihood="gaussian")
    return Trainer(vae, data, config, out=out, progress=False)


def test_validation_images_never_reach_a_training_step(tmp_path, monkeypatch):
    import pyrovae.training as training

    seen = []
    step = training.PlainStep.__call__

    def recording(self, x):
        seen.append(x.clone())
        return step(self, x)

    monkeypatch.setattr(training.PlainStep, "__call__", recording)
    trainer = gaussian_trainer(tmp_path, epochs=3, val_size=48)
    trainer.fit()
    trained_on = rows(torch.cat(seen))
    assert len(trainer.data.valid) == 48
    assert trained_on.isdisjoint(rows(trainer.data.valid))
    assert trained_on == rows(trainer.data.train)  # the rest is trained on, every epoch
    assert len(torch.cat(seen)) == 3 * (240 - 48)


class Snapshots(Callback):
    """Each epoch's parameters, to compare the best checkpoint with."""

    def __init__(self):
        self.states = {}

    def on_epoch_end(self, trainer, metrics):
        self.states[metrics["epoch"]] = {k: v.clone() for k, v in
                                         trainer.vae.state_dict().items()}


def digits_trainer(out, epochs, callbacks=None, **settings):
    config = TrainConfig(dataset="digits", binarize="static", epochs=epochs, batch_size=128,
                         lr=3e-3, seed=1, device="cpu", val_size=200, **settings)
    data = load_dataset("digits", binarize="static", seed=1, val_size=200)
    pyro.set_rng_seed(1)
    vae = VAE(data.x_shape, z_dim=2, hidden=(16,))
    if callbacks is not None:
        callbacks = default_callbacks(config) + callbacks
    return Trainer(vae, data, config, out=out, progress=False, callbacks=callbacks)


def assert_state(vae, state):
    for name, value in state.items():
        assert torch.equal(vae.state_dict()[name], value), name


def test_the_best_checkpoint_is_the_best_validation_epoch(tmp_path, monkeypatch):
    """A scripted validation ELBO makes epoch 2 the best of 4, so that best.pt cannot be
    mistaken for the last checkpoint."""
    scripted = iter([-30.0, -20.0, -25.0, -40.0])
    measure = TestELBO.on_epoch_end

    def scripted_validation(self, trainer, metrics):
        measure(self, trainer, metrics)
        if self.split == "valid":
            metrics["val_elbo"] = next(scripted)

    monkeypatch.setattr(TestELBO, "on_epoch_end", scripted_validation)
    snapshots = Snapshots()
    digits_trainer(tmp_path, epochs=4, callbacks=[snapshots]).fit()
    metrics = json.loads((tmp_path / METRICS_FILE).read_text())
    assert [m["best_epoch"] for m in metrics] == [1, 2, 2, 2]
    assert [m["val_elbo"] for m in metrics] == [-30.0, -20.0, -25.0, -40.0]
    best = torch.load(tmp_path / BEST_CHECKPOINT_FILE, weights_only=True)
    assert best["epoch"] == 2 and best["val_elbo"] == -20.0
    assert_state(load_vae(tmp_path, "best"), snapshots.states[2])
    assert_state(load_vae(tmp_path), snapshots.states[4])
    vae, data, config, weights = load_run_checkpoint(tmp_path, "best")
    assert weights == {"checkpoint": "best", "checkpoint_epoch": 2}
    assert_state(vae, snapshots.states[2])
    assert config.val_size == 200 and len(data.valid) == 200  # rebuilt as trained


def test_a_real_run_keeps_its_best_epoch_and_evaluate_reads_it(tmp_path):
    metrics = digits_trainer(tmp_path, epochs=3).fit()
    best_epoch = max(metrics, key=lambda m: m["val_elbo"])["epoch"]
    assert metrics[-1]["best_epoch"] == best_epoch
    assert all(m["val_elbo"] == pytest.approx(m["val_recon"] - m["val_kl"]) for m in metrics)
    summary = evaluate_run(tmp_path, 25, checkpoint="best", subset_size=10, num_images=20,
                           progress=False, device="cpu")
    assert summary["checkpoint"] == "best" and summary["checkpoint_epoch"] == best_epoch


def test_resume_keeps_the_split_and_the_best_record(tmp_path):
    digits_trainer(tmp_path / "a", epochs=2).fit()
    resumed = Trainer.resume(tmp_path / "a", epochs=4, progress=False)
    assert resumed.best is not None and resumed.config.val_size == 200
    metrics_a = resumed.fit()
    metrics_b = digits_trainer(tmp_path / "b", epochs=4).fit()
    drop = [[{k: v for k, v in m.items() if k != "seconds"} for m in ms]
            for ms in (metrics_a, metrics_b)]
    assert drop[0] == drop[1]
    best_a, best_b = (torch.load(tmp_path / run / BEST_CHECKPOINT_FILE, weights_only=True)
                      for run in ("a", "b"))
    assert best_a["epoch"] == best_b["epoch"]
    for name, value in best_b["model"].items():
        assert torch.equal(best_a["model"][name], value), name


def test_a_run_without_a_validation_set_has_no_best_checkpoint(tmp_path):
    gaussian_trainer(tmp_path, epochs=1).fit()
    assert not (tmp_path / BEST_CHECKPOINT_FILE).exists()
    with pytest.raises(PyrovaeError, match="holds no best.pt.*--val-size"):
        load_vae(tmp_path, "best")


def test_official_binarized_mnist_validation_is_kept_out_of_training(shared_data_dir):
    official = load_dataset("binarized-mnist", shared_data_dir, val_size="official")
    together = load_dataset("binarized-mnist", shared_data_dir, include_valid=True)
    assert len(official.train) == 50_000 and len(official.valid) == 10_000
    # the validation file's images are exactly the valid set, and none of its rows is
    # among the training set's (the training set is the training file alone)
    assert torch.equal(official.train, together.train[:50_000])
    assert torch.equal(official.valid, together.train[50_000:])
    assert torch.equal(official.test, together.test)


@pytest.mark.parametrize("settings,message", [
    ({"val_size": -1}, "--val-size (val_size=) must be a non-negative integer"),
    ({"val_size": 2.5}, "--val-size (val_size=) must be a non-negative integer"),
    ({"val_size": "ten"}, "--val-size (val_size=) must be a non-negative integer"),
    ({"val_size": True}, "--val-size (val_size=) must be a non-negative integer"),
    ({"val_size": DIGITS_TRAIN}, "would leave no training images: digits has 1500"),
    ({"val_size": "official"}, "only binarized-mnist has, not digits"),
    ({"val_size": 100, "dataset": "mnist"}, None),
    ({"val_size": 60_000, "dataset": "mnist"}, "would leave no training images: mnist has"),
])
def test_bad_validation_sizes_are_named_before_any_data(settings, message):
    config = TrainConfig(**settings)
    if message is None:
        assert config.validate().val_size == 100
        return
    with pytest.raises(PyrovaeError) as error:
        config.validate()
    assert message in str(error.value)


def test_official_validation_of_data_passed_in_python_is_refused(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(PyrovaeError, match="load_dataset\\('binarized-mnist'"):
        Trainer(VAE((8, 8), z_dim=2, hidden=(8,)), load_dataset("digits", binarize="static"),
                TrainConfig(dataset="binarized-mnist", val_size="official"), out=out)
    assert not out.exists()
