"""The conv encoder and decoder, the network option of the VAE, and the named architectures."""

import json
import math

import pyro
import pytest
import torch

from pyrovae import VAE, Trainer, TrainConfig
from pyrovae.cli import main
from pyrovae.data import Dataset
from pyrovae.errors import PyrovaeError, UnknownNameError
from pyrovae.evaluation import log_likelihood
from pyrovae.families import GUIDES, LIKELIHOODS, make_guide, make_likelihood
from pyrovae.networks import (
    ARCHITECTURES,
    ConvDecoder,
    ConvEncoder,
    check_channels,
    default_channels,
)
from pyrovae.run import CONFIG_FILE

from conftest import requires_cuda

# grey 28x28 (MNIST), grey 64x64, odd sides that halve unevenly, colour
IMAGE_SHAPES = [(28, 28), (64, 64), (27, 31), (3, 32, 32)]
LIKELIHOOD_SETTINGS = {"gaussian-per-datapoint": ("gaussian", {"sigma": "per-datapoint"})}


def likelihood_cases():
    cases = [(name, {}) for name in sorted(LIKELIHOODS)]
    return cases + list(LIKELIHOOD_SETTINGS.values())


def data_in_support(likelihood, shape, generator):
    grey = torch.rand(shape, generator=generator)
    return grey.round() if likelihood == "bernoulli" else grey


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize("x_shape", IMAGE_SHAPES)
def test_conv_shapes_with_a_particle_dimension_in_front(x_shape):
    encoder, decoder = ConvEncoder(x_shape, (2, 5)), ConvDecoder(x_shape, 5, 2)
    x = torch.rand(3, 4, *x_shape)  # particles, datapoints, image
    raw = encoder(x)
    assert raw.shape == (3, 4, 2, 5)
    assert decoder(raw[..., 0, :]).shape == (3, 4, 2, *x_shape)
    # no Python loop over the particles: the result is the batch's, image by image
    # (float32 convolutions of the same image in batches of other sizes may sum in
    # another order: a few ulps of outputs of order 1)
    torch.testing.assert_close(raw[1, 2], encoder(x[1, 2:3])[0], rtol=1e-5, atol=1e-5)


def test_default_channels_suit_mnist_and_64_pixel_images():
    assert default_channels((28, 28)) == (32, 64)  # 28 -> 14 -> 7
    assert default_channels((64, 64)) == (32, 32, 64, 64)  # 64 -> 32 -> 16 -> 8 -> 4
    assert default_channels((3, 32, 32)) == (32, 64, 64)  # the channel is not a side
    assert default_channels((8, 8)) == (64,)  # the digits: one halving, to 4x4


def test_odd_sides_come_back_exactly():
    decoder = ConvDecoder((27, 31), 3, 1, channels=(4, 4, 4))  # 27 -> 13 -> 6 -> 3
    paddings = [layer.output_padding for layer in decoder.deconv
                if isinstance(layer, torch.nn.ConvTranspose2d)]
    assert paddings == [(0, 1), (1, 1), (1, 1)]  # 3 -> 6 -> 13 -> 27, 3 -> 7 -> 15 -> 31
    assert decoder(torch.zeros(2, 3)).shape == (2, 1, 27, 31)


def test_sizes_that_do_not_fit_are_refused_with_the_sizes_that_work():
    with pytest.raises(PyrovaeError, match="at least 32 pixels a side; give at most 4"):
        check_channels((8, 8, 8, 8, 8), (28, 28))
    with pytest.raises(PyrovaeError, match=r"\(H, W\) or \(C, H, W\).*network='mlp'"):
        ConvEncoder((784,), (2, 5))
    with pytest.raises(PyrovaeError, match="too small for a stride-2 convolution"):
        ConvDecoder((1, 28), 5, 1)
    with pytest.raises(PyrovaeError, match="positive integers"):
        check_channels((32, 0), (28, 28))
    with pytest.raises(UnknownNameError, match="unknown activation"):
        ConvEncoder((28, 28), (2, 5), activation="swish")


@pytest.mark.parametrize("likelihood,settings", likelihood_cases(),
                         ids=[name for name, _ in likelihood_cases()])
@pytest.mark.parametrize("x_shape", [(28, 28), (3, 32, 32)])
def test_the_decoder_meets_every_likelihood(likelihood, settings, x_shape):
    family = make_likelihood(likelihood, x_shape, **settings)
    decoder = ConvDecoder(x_shape, 4, family.num_params)
    generator = torch.Generator().manual_seed(0)
    x = data_in_support(likelihood, (5, *x_shape), generator)
    p = family(decoder(torch.randn(3, 5, 4, generator=generator)))
    assert p.batch_shape == (3, 5) and p.event_shape == x_shape
    assert torch.isfinite(p.log_prob(x)).all()
    assert family.mean(decoder(torch.zeros(5, 4))).shape == (5, *x_shape)


@pytest.mark.parametrize("guide", sorted(GUIDES))
def test_the_encoder_meets_every_guide(guide):
    family = make_guide(guide, 3)
    encoder = ConvEncoder((28, 28), family.raw_shape)
    q = family(encoder(torch.rand(2, 5, 28, 28)))
    assert q.batch_shape == (2, 5) and q.event_shape == (3,)
    assert q.rsample().shape == (2, 5, 3)


def test_a_flat_raw_shape():
    assert ConvEncoder((3, 32, 32), (7,))(torch.rand(4, 3, 32, 32)).shape == (4, 7)


# ---------------------------------------------------------------- the VAE's network option


def test_conv_vae_trains_on_digits_and_loads_again(tmp_path, binary_digits):
    config = TrainConfig(dataset="digits", binarize="static", epochs=2, batch_size=256,
                         lr=3e-3, device="cpu", seed=2)
    pyro.set_rng_seed(2)
    vae = VAE(binary_digits.x_shape, z_dim=4, network="conv", channels=(8,), hidden=(32,))
    metrics = Trainer(vae, binary_digits, config, out=tmp_path, progress=False).fit()
    assert metrics[-1]["train_elbo"] > metrics[0]["train_elbo"]
    saved = json.loads((tmp_path / CONFIG_FILE).read_text())["model"]
    assert (saved["network"], saved["channels"], saved["encoder"]) == ("conv", [8], "conv")
    loaded = VAE.load(tmp_path)
    assert isinstance(loaded.encoder, ConvEncoder) and isinstance(loaded.decoder, ConvDecoder)
    for name, value in vae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_conv_vae_trains_on_a_colour_data_set(tmp_path):
    generator = torch.Generator().manual_seed(0)
    # colour images with structure to learn: a random colour per image, brighter in the middle
    colour = torch.rand(40, 3, 1, 1, generator=generator)
    ramp = torch.linspace(0, 1, 32).sub(0.5).abs().neg().add(1)
    images = (colour * ramp[None, None, :, None] * ramp[None, None, None, :]).clamp(0, 1)
    data = Dataset.from_tensors(images[:32], images[32:], name="colour")
    config = TrainConfig(dataset="digits", binarize="none", epochs=2, batch_size=16, lr=3e-3,
                         device="cpu", seed=0, jit=False)  # the compiled step: the digits test
    pyro.set_rng_seed(0)
    vae = VAE(data.x_shape, z_dim=3, network="conv", channels=(4, 4), hidden=(),
              likelihood="gaussian")
    assert vae.x_shape == (3, 32, 32)
    metrics = Trainer(vae, data, config, out=tmp_path, progress=False).fit()
    assert metrics[-1]["train_elbo"] > metrics[0]["train_elbo"]
    with vae.evaluating(0):
        assert vae.reconstruct(data.test).shape == (8, 3, 32, 32)
        assert vae.sample(5).shape == (5, 3, 32, 32)


@requires_cuda
@pytest.mark.parametrize("settings", [{"network": "conv"}, {"z_dim": (6, 3)}],
                         ids=["conv", "two-layers"])
def test_conv_and_layers_train_and_evaluate_on_the_gpu(tmp_path, binary_digits, settings):
    config = TrainConfig(dataset="digits", binarize="static", epochs=1, batch_size=256,
                         device="cuda", seed=0)
    vae = VAE(binary_digits.x_shape, hidden=(32,), **settings)
    metrics = Trainer(vae, binary_digits, config, out=tmp_path, progress=False).fit()
    assert math.isfinite(metrics[-1]["test_elbo"]) and vae.device.type == "cuda"
    estimate = log_likelihood(vae, binary_digits.test[:64], 64)
    assert torch.isfinite(estimate.log_px).all()


def test_the_network_option_is_checked():
    with pytest.raises(UnknownNameError, match="unknown network 'resnet'"):
        VAE((28, 28), network="resnet")
    with pytest.raises(PyrovaeError, match="pass network='conv'"):
        VAE((28, 28), channels=(32, 64))
    with pytest.raises(PyrovaeError, match=r"\(H, W\) or \(C, H, W\)"):
        VAE((784,), network="conv")


# ---------------------------------------------------------------- named architectures


def parameter_count(vae) -> int:
    return sum(p.numel() for p in vae.parameters())


def test_architecture_parameter_counts_are_the_papers():
    mnist = (28, 28)
    # Kingma & Welling 2014: 784-500-(20 means, 20 scales) and 20-500-784
    assert parameter_count(VAE.from_arch("kingma-welling", mnist)) == (
        (784 * 500 + 500) + (500 * 40 + 40)
        + (20 * 500 + 500) + (500 * 784 + 784))
    # Burda et al. 2016, one stochastic layer: 784-200-200-(50 + 50) and 50-200-200-784
    assert parameter_count(VAE.from_arch("burda-1layer", mnist)) == (
        (784 * 200 + 200) + (200 * 200 + 200) + (200 * 100 + 100)
        + (50 * 200 + 200) + (200 * 200 + 200) + (200 * 784 + 784))
    # two: q(z1|x) 784-200-200-(100 + 100), q(z2|z1) 100-100-100-(50 + 50);
    # p(z1|z2) 50-100-100-(100 + 100), p(x|z1) 100-200-200-784
    assert parameter_count(VAE.from_arch("burda-2layer", mnist)) == (
        (784 * 200 + 200) + (200 * 200 + 200) + (200 * 200 + 200)
        + (100 * 100 + 100) + (100 * 100 + 100) + (100 * 100 + 100)
        + (50 * 100 + 100) + (100 * 100 + 100) + (100 * 200 + 200)
        + (100 * 200 + 200) + (200 * 200 + 200) + (200 * 784 + 784))
    # conv on 28x28: 4x4 kernels 1->32->64 (28 -> 14 -> 7), 64*7*7-256-(32 + 32);
    # 32-256-64*7*7, transposed 4x4 kernels 64->32->1
    assert parameter_count(VAE.from_arch("conv", mnist)) == (
        (1 * 32 * 16 + 32) + (32 * 64 * 16 + 64) + (64 * 7 * 7 * 256 + 256) + (256 * 64 + 64)
        + (32 * 256 + 256) + (256 * 64 * 7 * 7 + 64 * 7 * 7)
        + (64 * 32 * 16 + 32) + (32 * 1 * 16 + 1))


def test_an_architecture_takes_overrides_and_records_its_name():
    vae = VAE.from_arch("burda-2layer", (8, 8), z_dim=(6, 3), likelihood="continuous-bernoulli")
    assert vae.z_dims == (6, 3) and vae.config["arch"] == "burda-2layer"
    assert vae.config["activation"] == "tanh" and vae.config["hidden"] == [[200, 200], [100, 100]]
    assert set(ARCHITECTURES) == {"kingma-welling", "burda-1layer", "burda-2layer", "conv"}
    with pytest.raises(UnknownNameError, match="known architectures"):
        VAE.from_arch("resnet", (28, 28))


# ---------------------------------------------------------------- the command line


@pytest.fixture
def no_figures(monkeypatch):
    """The figures of a run take longer than its training here, and have their own tests."""
    monkeypatch.setattr("pyrovae.plots.write_figures", lambda *args, **kwargs: [])


def train(tmp_path, *flags):
    out = tmp_path / "run"
    code = main(["train", "--dataset", "digits", "--epochs", "1", "--batch-size", "256",
                 "--no-progress", "--no-jit", "--device", "cpu", "--out", str(out), *flags])
    return code, out


def saved_model(out) -> dict:
    return json.loads((out / CONFIG_FILE).read_text())["model"]


def test_cli_arch_with_overrides_records_the_resolved_sizes(tmp_path, no_figures):
    code, out = train(tmp_path, "--arch", "burda-2layer", "--z-dim", "6", "3",
                      "--hidden", "32", "--hidden", "16")
    assert code == 0
    model = saved_model(out)
    assert (model["arch"], model["z_dim"], model["hidden"], model["activation"]) == (
        "burda-2layer", [6, 3], [[32], [16]], "tanh")
    # a resumed run may repeat the model flags, not change them
    assert main(["train", "--out", str(out), "--resume", "--no-progress", "--epochs", "1",
                 "--z-dim", "6", "3", "--hidden", "32", "--hidden", "16"]) == 0
    assert main(["train", "--out", str(out), "--resume", "--network", "conv"]) == 2


def test_cli_conv_network(tmp_path, capsys, no_figures):
    code, out = train(tmp_path, "--network", "conv", "--channels", "8", "--hidden", "16",
                      "--z-dim", "3")
    assert code == 0
    model = saved_model(out)
    assert (model["network"], model["channels"], model["hidden"]) == ("conv", [8], [16])
    code, _ = train(tmp_path / "other", "--network", "conv", "--channels", "8", "8", "8", "8")
    assert code == 2 and "too small for 4 stride-2 convolutions" in capsys.readouterr().err
