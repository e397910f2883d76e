"""Streaming from disk: the same batches as the whole-tensor path, exact resume, the size
threshold, and the checks of data that arrive batch by batch."""

import numpy as np
import pyro
import pytest
import torch
from PIL import Image

from pyrovae import VAE, Trainer, TrainConfig, load_dataset
from pyrovae import data as data_module
from pyrovae.data import DataError, StreamedDataset
from pyrovae.run import read_checkpoint

from conftest import requires_cuda


@pytest.fixture
def grey_npy(tmp_path):
    """103 grey 5x4 "images" in a .npy file."""
    path = tmp_path / "grey.npy"
    np.save(path, np.random.default_rng(0).random((103, 5, 4)).astype(np.float32))
    return path


@pytest.fixture
def png_folder(tmp_path):
    """60 grey 5x4 PNGs in two class folders."""
    pixels = np.random.default_rng(1).integers(0, 256, (60, 5, 4), dtype=np.uint8)
    for i, image in enumerate(pixels):
        folder = tmp_path / "pngs" / ("a" if i < 30 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:02d}.png")
    return tmp_path / "pngs"


def epoch(data, seed, batch_size=16, shard=None):
    generator = torch.Generator().manual_seed(seed)
    return [list(data.train_batches(batch_size, generator, shard=shard)) for _ in range(2)]


@pytest.mark.parametrize("source", ["grey_npy", "png_folder"])
@pytest.mark.parametrize("binarize", ["dynamic", "threshold", "none"])
def test_streamed_batches_are_the_whole_tensor_batches(request, source, binarize):
    path = request.getfixturevalue(source)
    whole = load_dataset(path, binarize=binarize, seed=4, stream=False)
    streamed = load_dataset(path, binarize=binarize, seed=4, stream=True, num_workers=0)
    assert type(whole).__name__ == "Dataset" and isinstance(streamed, StreamedDataset)
    assert streamed.x_shape == whole.x_shape and torch.equal(streamed.test, whole.test)
    assert torch.equal(streamed.train_labels, whole.train_labels) if source == "png_folder" \
        else streamed.train_labels is None
    for shard in (None, (1, 3)):  # a data-parallel rank's blocks too
        ours, theirs = epoch(streamed, seed=7, shard=shard), epoch(whole, seed=7, shard=shard)
        assert [len(b) for b in ours[0]] == [len(b) for b in theirs[0]]
        for a, b in zip(ours[0] + ours[1], theirs[0] + theirs[1], strict=True):
            assert torch.equal(a, b)
    assert not torch.equal(torch.cat(ours[0]), torch.cat(ours[1]))  # a new order each epoch


def test_loader_processes_read_the_same_batches(grey_npy):
    whole = load_dataset(grey_npy, binarize="dynamic", seed=4, stream=False)
    streamed = load_dataset(grey_npy, binarize="dynamic", seed=4, stream=True, num_workers=2)
    for a, b in zip(epoch(streamed, seed=3)[1], epoch(whole, seed=3)[1], strict=True):
        assert torch.equal(a, b)


def make_trainer(path, out, epochs, stream):
    data = load_dataset(path, binarize="dynamic", seed=5, stream=stream, num_workers=1)
    pyro.set_rng_seed(5)
    vae = VAE(data.x_shape, z_dim=2, hidden=(8,))
    config = TrainConfig(dataset=str(path), binarize="dynamic", epochs=epochs, batch_size=32,
                         seed=5, device="cpu", stream=stream, num_workers=1)
    return Trainer(vae, data, config, out=out, progress=False)


@pytest.mark.parametrize("stream_on_resume", [True, False])
def test_a_streamed_run_resumed_is_the_uninterrupted_whole_tensor_run(grey_npy, tmp_path,
                                                                       stream_on_resume):
    make_trainer(grey_npy, tmp_path / "streamed", epochs=1, stream=True).fit()
    resumed = Trainer.resume(tmp_path / "streamed", epochs=2, progress=False,
                             stream=stream_on_resume)  # --stream / --no-stream
    assert resumed.data.streamed == stream_on_resume
    resumed.fit()
    make_trainer(grey_npy, tmp_path / "whole", epochs=2, stream=False).fit()
    a, b = (read_checkpoint(tmp_path / name) for name in ("streamed", "whole"))
    assert a["epoch"] == b["epoch"] == 2
    for key, value in b["model"].items():
        assert torch.equal(a["model"][key], value), key


def test_the_size_threshold_chooses_the_path(grey_npy, monkeypatch):
    size = 103 * 5 * 4 * 4  # float32 bytes of the whole file
    monkeypatch.setattr(data_module, "STREAM_THRESHOLD_BYTES", size)
    assert not load_dataset(grey_npy).streamed
    monkeypatch.setattr(data_module, "STREAM_THRESHOLD_BYTES", size - 1)
    assert load_dataset(grey_npy).streamed
    assert not load_dataset(grey_npy, stream=False).streamed


@pytest.mark.parametrize("binarize, message", [
    ("dynamic", "a training batch of bad.npy holds 1 NaN or infinite values"),
    ("none", "training batch 1 of epoch 1 holds 1 NaN or infinite values"),
])
def test_streamed_batches_are_checked_as_they_arrive(tmp_path, binarize, message):
    values = np.random.default_rng(0).random((40, 3, 3)).astype(np.float32)
    values[17, 1, 1] = np.nan
    np.save(tmp_path / "bad.npy", values)
    data = load_dataset(tmp_path / "bad.npy", binarize=binarize, stream=True, num_workers=0,
                        test_size=1, seed=1)
    assert not torch.isnan(data.test).any()  # the NaN row is a training row
    vae = VAE(data.x_shape, z_dim=2, hidden=(4,),
              likelihood="bernoulli" if binarize == "dynamic" else "gaussian")
    config = TrainConfig(dataset=str(tmp_path / "bad.npy"), binarize=binarize, epochs=1,
                         batch_size=40, test_size=1, seed=1, stream=True, num_workers=0)
    with pytest.raises(DataError, match=message):
        Trainer(vae, data, config, progress=False).fit()


@requires_cuda
def test_streamed_batches_reach_the_gpu_as_the_whole_tensor_ones(grey_npy):
    whole = load_dataset(grey_npy, binarize="dynamic", seed=4, device="cuda")
    streamed = load_dataset(grey_npy, binarize="dynamic", seed=4, stream=True, num_workers=1,
                            device="cuda")
    for a, b in zip(*(list(d.train_batches(16, torch.Generator("cuda").manual_seed(2)))
                      for d in (streamed, whole)), strict=True):
        assert a.is_cuda and torch.equal(a, b)
