"""Every value is checked where it enters: the VAE's arguments, the families'
parameters, the data given to the model, the guide and the estimators, and the
data sets. Each bad input gets a pyrovae error that names the problem and the fix."""

import math
import os

import numpy as np
import pyro
import pytest
import torch
from pyro.infer import SVI

from pyrovae import VAE
from pyrovae.data import CACHE_DIR_ENV, Dataset, load_dataset
from pyrovae.errors import DataError, PyrovaeError, UnknownNameError
from pyrovae.evaluation.marginal import log_likelihood
from pyrovae.families import make_guide, make_likelihood, make_prior
from pyrovae.objectives import make_elbo

X_SHAPE = (4, 4)


def small_vae(**kwargs):
    return VAE(X_SHAPE, **{"z_dim": 3, "hidden": (8,), **kwargs})


def binary_batch(n=8):
    return torch.bernoulli(torch.full((n, *X_SHAPE), 0.5, dtype=torch.float32),
                           generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- 1. VAE arguments


@pytest.mark.parametrize("z_dim", [0, -3, 2.7, "3", True])
def test_z_dim_must_be_a_positive_integer(z_dim):
    with pytest.raises(PyrovaeError, match=r"--z-dim .*must be a positive integer, got"):
        small_vae(z_dim=z_dim)


def test_integral_numpy_z_dim_is_accepted():
    vae = small_vae(z_dim=np.int64(3))
    assert vae.z_dim == 3 and type(vae.z_dim) is int and vae.config["z_dim"] == 3


@pytest.mark.parametrize("hidden", [(0,), (-5,), (8, 0), (2.5,), 400, "400"])
def test_hidden_sizes_must_be_positive_integers(hidden):
    with pytest.raises(PyrovaeError, match="--hidden"):
        small_vae(hidden=hidden)


def test_no_hidden_layer_means_linear_networks():
    vae = small_vae(hidden=())
    assert list(vae.config["hidden"]) == []
    assert sum(isinstance(m, torch.nn.Linear) for m in vae.encoder.modules()) == 1


def test_x_shape_sizes_must_be_positive_integers():
    with pytest.raises(PyrovaeError, match="x_shape"):
        VAE((4, 0))
    with pytest.raises(PyrovaeError, match="x_shape"):
        VAE((4.5, 4))


# ---------------------------------------------------------------- 2. family parameters


@pytest.mark.parametrize("value, gist", [
    ("big", "not a number"),
    (float("inf"), "not finite"),
    (float("nan"), "not finite"),
    ([1.0, 2.0], "has 2 values, but z_dim is 3"),
    ([[1.0, 1.0, 1.0]], "not a number or a vector"),
    (None, "not a number"),
])
def test_bad_prior_parameter_is_named(value, gist):
    with pytest.raises(PyrovaeError, match=gist) as error:
        small_vae(prior_kwargs={"scale": value})
    assert "--prior-param scale=" in str(error.value)


def test_prior_parameter_vector_of_z_dim_and_numpy_values_keep_settings_json_able():
    import json

    vae = small_vae(prior_kwargs={"scale": np.array([1.0, 2.0, 3.0]), "loc": np.float32(0.5)})
    settings = vae.prior.settings
    json.dumps(settings)
    assert settings == {"scale": [1.0, 2.0, 3.0], "loc": 0.5, "learnable": []}
    # valid Python input is saved as given
    assert small_vae(prior_kwargs={"scale": 2.0}).prior.settings == {"scale": 2.0, "learnable": []}


@pytest.mark.parametrize("learnable, learned", [
    ("scale", ["scale"]),
    (["loc"], ["loc"]),
    (("loc", "scale"), ["loc", "scale"]),
    (True, ["loc", "scale"]),
    (False, []),
])
def test_learnable_takes_a_name_or_a_list_of_names(learnable, learned):
    prior = make_prior("normal", 3, learnable=learnable)
    assert prior.settings["learnable"] == learned
    assert sorted(n.removesuffix("_unconstrained") for n, _ in prior.named_parameters()) == learned


def test_learnable_string_is_not_split_into_characters():
    vae = small_vae(prior_kwargs={"learnable": "scale"})
    assert vae.config["prior"]["learnable"] == ["scale"]
    assert vae.prior.has_parameters


@pytest.mark.parametrize("learnable", ["sigma", ["scale", "sigma"]])
def test_unknown_learnable_name_lists_the_known_ones(learnable):
    with pytest.raises(UnknownNameError, match=r"sigma.*\['loc', 'scale'\]"):
        make_prior("normal", 3, learnable=learnable)


def test_learnable_of_another_type_is_refused():
    with pytest.raises(PyrovaeError, match="learnable"):
        make_prior("normal", 3, learnable=1.5)


@pytest.mark.parametrize("guide", ["normal", "laplace", "lognormal", "student-t", "full-normal",
                                   "iaf"])
@pytest.mark.parametrize("min_scale", [-1, -1e-4, float("nan"), float("inf"), "small", None])
def test_guide_min_scale_must_be_a_number_at_least_zero(guide, min_scale):
    with pytest.raises(PyrovaeError, match="min_scale"):
        make_guide(guide, 3, min_scale=min_scale)


def test_guide_min_scale_zero_means_no_floor():
    guide = make_guide("normal", 3, min_scale=0.0)
    raw = torch.stack([torch.zeros(3), torch.full((3,), -20.0)], -2)
    # softplus(raw) + 0.0 against softplus(raw): the same elementwise kernel, so a few ulp
    # at most (a SIMD path and a scalar one may round differently)
    torch.testing.assert_close(guide(raw).base_dist.scale, torch.nn.functional.softplus(raw[1]),
                               rtol=4 * torch.finfo(torch.float32).eps, atol=0.0)


@pytest.mark.parametrize("kwargs", [
    {"df": float("nan")}, {"df": float("inf")}, {"df": "five"},
    {"min_df": 0}, {"min_df": float("nan")}, {"learn_df": "false"},
])
def test_student_t_guide_parameters_are_checked(kwargs):
    with pytest.raises(PyrovaeError, match="--guide-param"):
        make_guide("student-t", 3, **kwargs)


@pytest.mark.parametrize("kwargs", [
    {"min_scale": 0}, {"min_scale": -0.1}, {"min_scale": float("nan")},
    {"init_scale": float("inf")}, {"init_scale": "one"},
])
def test_gaussian_likelihood_scales_are_checked(kwargs):
    with pytest.raises(PyrovaeError, match="--likelihood-param"):
        make_likelihood("gaussian", X_SHAPE, **kwargs)


@pytest.mark.parametrize("scale", [0, -1, float("inf"), float("nan"), "big"])
def test_gaussian_fixed_scale_is_checked(scale):
    with pytest.raises(PyrovaeError, match="scale"):
        make_likelihood("gaussian-fixed", X_SHAPE, scale=scale)


def test_valid_family_settings_keep_their_format():
    vae = small_vae(guide="student-t", likelihood="gaussian",
                    guide_kwargs={"df": 4.0, "learn_df": False})
    assert vae.config["guide"] == {"name": "student-t", "min_scale": 1e-4, "df": 4.0,
                                   "learn_df": False, "min_df": 2.1}
    assert vae.config["likelihood"] == {"name": "gaussian", "sigma": "per-pixel",
                                        "min_scale": 1e-2, "init_scale": 1.0}


# ---------------------------------------------------------------- 3. data into model and guide


def readme_svi(vae):
    return SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), make_elbo("trace"))


BAD_BATCHES = {
    "int": (lambda: binary_batch().long(), "dtype torch.int64; convert it with .float()"),
    "bool": (lambda: binary_batch().bool(), "dtype torch.bool"),
    "float64": (lambda: binary_batch().double(), "dtype torch.float64, but the VAE's parameters"),
    "empty": (lambda: torch.zeros(0, *X_SHAPE), "holds no datapoints"),
    "grey": (lambda: torch.full((8, *X_SHAPE), 0.3), "needs binary data"),
    "nan": (lambda: binary_batch().index_fill(0, torch.tensor([2]), math.nan), "NaN or infinite"),
    "inf": (lambda: binary_batch().index_fill(0, torch.tensor([2]), math.inf), "NaN or infinite"),
    "numpy": (lambda: binary_batch().numpy(), "torch.as_tensor(x, dtype=torch.float32)"),
    "shape": (lambda: binary_batch().reshape(8, 16), "has shape (8, 16)"),
}


@pytest.mark.parametrize("case", sorted(BAD_BATCHES))
def test_readme_svi_step_refuses_bad_data(case):
    make, gist = BAD_BATCHES[case]
    x = make()
    pyro.clear_param_store()
    vae = small_vae()
    with pytest.raises(DataError, match=gist.replace("(", r"\(").replace(")", r"\)")):
        readme_svi(vae).step(x)
    # the same error as check_data, which the Trainer uses, and from the model alone
    with pytest.raises(DataError, match=gist.replace("(", r"\(").replace(")", r"\)")):
        vae.check_data(x)
    with pytest.raises(DataError):
        vae.model(x)


def test_negative_values_with_continuous_bernoulli_are_refused():
    pyro.clear_param_store()
    vae = small_vae(likelihood="continuous-bernoulli")
    with pytest.raises(DataError, match=r"values in \[0, 1\]"):
        readme_svi(vae).step(-torch.rand(8, *X_SHAPE))


def test_value_checks_run_only_under_pyro_validation():
    pyro.clear_param_store()
    vae = small_vae(likelihood="continuous-bernoulli")
    x = torch.full((8, *X_SHAPE), 0.5)
    x[0, 0, 0] = 2.0
    with pyro.validation_enabled(False):
        vae.model(x)  # the values are not read with validation off
        with pytest.raises(DataError, match="dtype"):
            vae.model(x.double())  # the cheap checks still run
    with pytest.raises(DataError):
        vae.model(x)


def test_a_tensor_changed_in_place_is_checked_again():
    pyro.clear_param_store()
    vae = small_vae()
    x = binary_batch()
    vae.guide(x)
    vae.model(x)
    x[0, 0, 0] = 0.5
    with pytest.raises(DataError, match="grey"):
        vae.model(x)


def test_fused_svi_checks_the_first_step_and_trains_after():
    from pyrovae.svi import FusedOptim, FusedSVI

    pyro.clear_param_store()
    vae = small_vae()
    svi = FusedSVI(vae.model, vae.guide, FusedOptim(torch.optim.Adam, {"lr": 1e-3}),
                   make_elbo("trace", jit=True))
    with pytest.raises(DataError, match="grey"):
        svi.step(torch.full((8, *X_SHAPE), 0.3))
    x = binary_batch()
    assert math.isfinite(svi.step(x)) and math.isfinite(svi.step(x))


# ---------------------------------------------------------------- 4. dynamic binarization


@pytest.mark.parametrize("bad, gist", [
    (math.nan, "NaN or infinite"), (math.inf, "NaN or infinite"), (1.5, r"outside \[0, 1\]"),
    (-0.5, r"outside \[0, 1\]"),
])
def test_dynamic_binarization_refuses_values_bernoulli_cannot_draw(bad, gist):
    train = torch.rand(20, *X_SHAPE)
    train[3, 1, 1] = bad
    with pytest.raises(DataError, match=gist) as error:
        Dataset("mine", train, torch.rand(5, *X_SHAPE).round(), None, None, "dynamic")
    assert "torch.bernoulli" in str(error.value) and "--binarize none" in str(error.value)


def test_dynamic_binarization_refuses_integer_images():
    with pytest.raises(DataError, match="floating-point"):
        Dataset("mine", torch.ones(20, *X_SHAPE, dtype=torch.uint8), torch.ones(5, *X_SHAPE),
                None, None, "dynamic")


def test_trainer_names_the_bad_training_value():
    from pyrovae.training import TrainConfig, Trainer

    train = torch.rand(20, *X_SHAPE)
    train[0, 0, 0] = math.nan
    with pytest.raises(DataError, match="NaN"):
        data = Dataset("mine", train, torch.rand(5, *X_SHAPE).round(), None, None, "dynamic")
        Trainer(small_vae(), data, TrainConfig(binarize="dynamic", epochs=1, batch_size=8))


def test_dataset_refuses_an_unknown_binarize_mode():
    with pytest.raises(DataError, match="binarize"):
        Dataset("mine", torch.rand(4, 2, 2), torch.rand(4, 2, 2), None, None, "dinamic")


def test_grey_dataset_without_dynamic_binarization_is_not_value_checked():
    Dataset("mine", torch.full((4, 2, 2), 255.0), torch.rand(4, 2, 2), None, None, "none")


# ---------------------------------------------------------------- 5. estimators and helpers


def test_log_likelihood_refuses_numpy_and_float64():
    vae = small_vae()
    with pytest.raises(DataError, match=r"torch.as_tensor\(x, dtype=torch.float32\)"):
        log_likelihood(vae, binary_batch().numpy(), num_samples=2)
    with pytest.raises(DataError, match="float64"):
        log_likelihood(vae, binary_batch().double(), num_samples=2)


def test_reconstruct_refuses_a_wrong_shape_as_the_model_does():
    vae = small_vae()
    x = binary_batch().reshape(8, 16)
    with pytest.raises(DataError) as from_model:
        vae.model(x)
    with pytest.raises(DataError) as from_reconstruct:
        vae.reconstruct(x)
    assert str(from_reconstruct.value) == str(from_model.value).split("\n")[0]


# ---------------------------------------------------------------- 6. the cache folder


def test_unwritable_cache_folder_is_named_before_any_work(tmp_path, shared_data_dir):
    a_file = tmp_path / "afile"
    a_file.write_text("not a folder")
    cache = a_file / "cache"
    with pytest.raises(DataError, match=CACHE_DIR_ENV) as error:
        load_dataset("binarized-mnist", data_dir=shared_data_dir, cache_dir=cache)
    assert str(cache) in str(error.value)


def test_cache_folder_without_write_permission_is_named(tmp_path, monkeypatch):
    calls = []

    def no_write(path, mode):
        calls.append(path)
        return False

    monkeypatch.setattr(os, "access", no_write)
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv("PYROVAE_DATA_DIR", raising=False)
    # no data folder: mnist would be downloaded into the cache, which must be writable
    with pytest.raises(DataError, match="no write permission") as error:
        load_dataset("mnist", data_dir=None)
    assert CACHE_DIR_ENV in str(error.value) and calls


def test_default_cache_folder_under_an_unwritable_home(tmp_path, monkeypatch):
    a_file = tmp_path / "home"
    a_file.write_text("")
    monkeypatch.delenv(CACHE_DIR_ENV, raising=False)
    monkeypatch.delenv("PYROVAE_DATA_DIR", raising=False)
    monkeypatch.setenv("HOME", str(a_file))
    with pytest.raises(DataError, match=CACHE_DIR_ENV):
        load_dataset("mnist")
