"""--tensorboard: the event files hold the metrics of metrics.json and the image grids."""

import importlib.util
import json

import pyro
import pytest

from pyrovae import VAE, Trainer, TrainConfig, load_dataset
from pyrovae.errors import PyrovaeError
from pyrovae.run import TENSORBOARD_DIR, is_run_folder
from pyrovae.training import TensorBoard

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator",
    reason="the tensorboard package is not installed (pip install -e '.[dev]')")


def make_trainer(out, epochs):
    data = load_dataset("digits", binarize="dynamic", seed=2)
    pyro.set_rng_seed(2)
    vae = VAE(data.x_shape, z_dim=3, hidden=(16,))
    config = TrainConfig(dataset="digits", binarize="dynamic", epochs=epochs, batch_size=256,
                         seed=2, device="cpu", tensorboard=True)
    return Trainer(vae, data, config, out=out, progress=False)


def read_events(folder):
    events = event_accumulator.EventAccumulator(
        str(folder / TENSORBOARD_DIR), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def test_scalars_are_the_metrics_and_grids_are_drawn(tmp_path):
    make_trainer(tmp_path, epochs=2).fit()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    events = read_events(tmp_path)
    written = 0
    for key, tag in TensorBoard.SCALARS.items():
        if key not in metrics[0]:
            continue
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [1, 2], tag
        for scalar, epoch in zip(scalars, metrics):
            # TensorBoard keeps a float32: one rounding of the float64 in metrics.json
            assert abs(scalar.value - epoch[key]) <= abs(epoch[key]) * 2**-24, tag
        written += 1
    assert written == 9  # two ELBOs, KLs and reconstructions, the objective, units and MI
    assert [s.value for s in events.Scalars("train/beta")] == [1.0, 1.0]
    assert [s.value for s in events.Scalars("train/lr")] == [pytest.approx(1e-3, rel=2**-24)] * 2
    # 32 pairs of 8x8 digits, and 32 samples, 8 to a row with 2-pixel gaps
    reconstructions, samples = (events.Images(f"images/{name}")
                                for name in ("reconstructions", "samples"))
    assert [(i.step, i.width, i.height) for i in reconstructions] == [(1, 82, 82), (2, 82, 82)]
    assert [(i.step, i.width, i.height) for i in samples] == [(1, 82, 42), (2, 82, 42)]
    assert is_run_folder(tmp_path)  # --overwrite may clear it


def test_a_resumed_run_writes_each_epoch_once(tmp_path):
    make_trainer(tmp_path, epochs=1).fit()
    Trainer.resume(tmp_path, epochs=2, progress=False).fit()
    assert [s.step for s in read_events(tmp_path).Scalars("elbo/test")] == [1, 2]


def test_tensorboard_needs_its_package_and_a_run_folder(monkeypatch):
    data = load_dataset("digits", binarize="dynamic")
    config = TrainConfig(dataset="digits", epochs=1, tensorboard=True)
    with pytest.raises(PyrovaeError, match="give the Trainer out=RUN"):
        Trainer(VAE(data.x_shape, z_dim=2, hidden=(4,)), data, config, progress=False)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else find_spec(name, *a))
    with pytest.raises(PyrovaeError, match=r"pip install 'pyrovae\[tensorboard\]'"):
        config.validate()
