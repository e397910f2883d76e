"""The user's own data: image folders, arrays, CSV files and tensors, their test split,
their refused forms, and a run on them that evaluate and plot can rebuild."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pyrovae import Dataset, load_dataset
from pyrovae.cli import main
from pyrovae.data import DEFAULT_TEST_SIZE, DataError
from pyrovae.run import CONFIG_FILE
from pyrovae.vae import load_run


def grey_images(count, height=6, width=5, seed=0):
    return torch.randint(0, 256, (count, 1, height, width), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def write_png(image: torch.Tensor, path: str) -> None:
    """A (C, H, W) uint8 tensor as a grey (C = 1) or colour PNG, through PIL."""
    array = image.permute(1, 2, 0).numpy()
    Image.fromarray(array[..., 0] if image.shape[0] == 1 else array).save(path)


def write_folder(folder, images, classes=None):
    """PNGs named in order; with ``classes``, in one subfolder per class."""
    for i, image in enumerate(images):
        where = folder / classes[i] if classes else folder
        where.mkdir(parents=True, exist_ok=True)
        write_png(image, str(where / f"{i:03d}.png"))
    return folder


# ---------------------------------------------------------------- image folders


def test_a_folder_of_grey_pngs_loads_as_k_over_255_with_class_labels_and_a_seeded_split(tmp_path):
    images = grey_images(20)
    classes = ["cat" if i % 2 else "dog" for i in range(20)]
    folder = write_folder(tmp_path / "pets", images, classes)
    data = load_dataset(folder, test_size=4, seed=3)
    assert data.x_shape == (6, 5) and (len(data.train), len(data.test)) == (16, 4)
    assert data.name == "pets" and data.train.dtype == torch.float32
    # every image once, as k/255, with the label of its class folder (sorted: cat 0, dog 1)
    expected = {tuple((images[i, 0].float() / 255).flatten().tolist()): classes[i]
                for i in range(20)}
    got = [tuple(x.flatten().tolist()) for x in torch.cat([data.train, data.test])]
    assert sorted(got) == sorted(expected)
    labels = torch.cat([data.train_labels, data.test_labels]).tolist()
    assert [["cat", "dog"][label] for label in labels] == [expected[x] for x in got]
    again = load_dataset(folder, test_size=4, seed=3)
    assert torch.equal(again.test, data.test)
    assert not torch.equal(load_dataset(folder, test_size=4, seed=4).test, data.test)
    assert len(load_dataset(folder).test) == round(DEFAULT_TEST_SIZE * 20)
    assert len(load_dataset(folder, test_size=0.25).test) == 5


def test_colour_images_are_channels_first_and_grey_ones_beside_them_become_colour(tmp_path):
    colour = torch.randint(0, 256, (3, 4, 4), dtype=torch.uint8)
    grey = torch.randint(0, 256, (1, 4, 4), dtype=torch.uint8)
    write_png(colour, str(tmp_path / "a.png"))
    write_png(grey, str(tmp_path / "b.png"))
    data = load_dataset(tmp_path, test_size=1, seed=0)
    assert data.x_shape == (3, 4, 4)
    every = {tuple(x.flatten().tolist()) for x in torch.cat([data.train, data.test])}
    assert every == {tuple((colour.float() / 255).flatten().tolist()),
                     tuple((grey.expand(3, 4, 4).float() / 255).flatten().tolist())}


def test_jpegs_load_and_image_size_resizes_images_of_several_sizes(tmp_path):
    write_png(grey_images(1, 6, 5)[0], str(tmp_path / "small.png"))
    Image.new("RGB", (7, 9), (128, 128, 128)).save(tmp_path / "big.jpg", quality=95)
    with pytest.raises(DataError) as error:
        load_dataset(tmp_path, test_size=1)
    message = str(error.value)
    assert "differ in size" in message and "--image-size" in message
    assert "small.png" in message and "big.jpg" in message
    data = load_dataset(tmp_path, test_size=1, image_size=[4])
    assert data.x_shape == (3, 4, 4)
    # JPEG is lossy: a flat grey of 128 comes back within a few levels
    jpeg = [x for x in torch.cat([data.train, data.test]) if x.std() < 0.01][0]
    assert abs(float(jpeg.mean()) - 128 / 255) < 3 / 255


def test_sixteen_bit_grey_pngs_are_divided_by_65535(tmp_path):
    values = np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000
    Image.fromarray(values).save(tmp_path / "deep.png")
    Image.fromarray(values).save(tmp_path / "deep2.png")
    data = load_dataset(tmp_path, test_size=1)
    assert data.x_shape == (3, 4)
    # the same float32 division as the loader's, so exactly equal
    assert torch.equal(data.train[0], torch.from_numpy(values.astype(np.float32) / 65535))


@pytest.mark.parametrize("files, message", [
    ({}, "holds no PNG or JPEG images"),
    ({"notes.txt": b"hello"}, "holds no PNG or JPEG images (*.png, *.jpg, *.jpeg, looked for "
                              "in its subfolders too; it holds 1 other files)"),
    ({"broken.png": b"not a png at all"}, "broken.png cannot be read as an image"),
])
def test_a_folder_that_gives_no_images_is_named(tmp_path, files, message):
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError) as error:
        load_dataset(tmp_path)
    assert message in str(error.value)


# ---------------------------------------------------------------- arrays and CSV


def test_arrays_load_their_values_as_float32(tmp_path):
    values = np.random.default_rng(0).random((30, 2, 3))
    np.save(tmp_path / "x.npy", values)
    np.savez(tmp_path / "x.npz", values)
    torch.save(torch.from_numpy(values), tmp_path / "x.pt")
    np.save(tmp_path / "counts.npy", np.arange(30 * 4).reshape(30, 4).astype(np.uint8))
    loaded = {suffix: load_dataset(tmp_path / f"x{suffix}", test_size=5, seed=1)
              for suffix in (".npy", ".npz", ".pt")}
    for data in loaded.values():
        assert data.x_shape == (2, 3) and data.train.dtype == torch.float32
        assert torch.equal(data.train, loaded[".npy"].train)
        assert torch.equal(data.test, loaded[".npy"].test)
    assert torch.equal(torch.cat([loaded[".npy"].train, loaded[".npy"].test]).sort(0).values,
                       torch.from_numpy(values).float().sort(0).values)
    counts = load_dataset(tmp_path / "counts.npy", test_size=1)
    assert counts.train.max() == 119  # integers stay as they are, not rescaled


@pytest.mark.parametrize("write, message", [
    (lambda p: np.save(p / "x.npy", np.arange(5.0)), "it needs shape (N, ...)"),
    (lambda p: np.save(p / "x.npy", np.array([{"a": 1}] * 3), allow_pickle=True),
     "cannot be read as .npy data"),
    (lambda p: np.savez(p / "x.npz", a=np.ones((3, 2)), b=np.ones((3, 2))),
     "holds 2 arrays (a, b)"),
    (lambda p: torch.save({"train": torch.ones(3, 2)}, p / "x.pt"), "holds a dict, not a tensor"),
    (lambda p: (p / "x.npy").write_bytes(b"garbage"), "cannot be read as .npy data"),
    (lambda p: (p / "x.bmp").write_bytes(b"BM"), "convert it to one of these"),
])
def test_bad_array_files_are_named(tmp_path, write, message):
    write(tmp_path)
    path = next(tmp_path.iterdir())
    with pytest.raises(DataError) as error:
        load_dataset(path)
    assert message in str(error.value) and str(path) in str(error.value)


def test_csv_with_and_without_header_and_chosen_columns(tmp_path):
    (tmp_path / "head.csv").write_text("a,b,city\n1,2,Rome\n3,4.5,Oslo\n5,6,Nice\n")
    (tmp_path / "bare.csv").write_text("1,2\n3,4.5\n5,6\n")
    chosen = load_dataset(tmp_path / "head.csv", csv_columns=["a", "b"], test_size=1, seed=0)
    bare = load_dataset(tmp_path / "bare.csv", test_size=1, seed=0)
    by_number = load_dataset(tmp_path / "head.csv", csv_columns=["0", "1"], test_size=1, seed=0)
    assert chosen.x_shape == (2,)
    for data in (bare, by_number):
        assert torch.equal(data.train, chosen.train) and torch.equal(data.test, chosen.test)
    assert sorted(torch.cat([chosen.train, chosen.test])[:, 1].tolist()) == [2, 4.5, 6]


@pytest.mark.parametrize("text, columns, message", [
    ("a,b\n1,2\n3,nan\n", None, "holds 1 missing, NaN or infinite values (the first in line 3, "
                                "column 'b')"),
    ("a,b\n1,2\n3,\n", None, "the first in line 3, column 'b'"),
    ("a,b,city\n1,2,Rome\n", None, "column 'city' is not numeric (e.g. 'Rome' in line 2"),
    ("a,b\n", None, "has a header line but no rows of data"),
    ("", None, "is empty"),
    ("a,b\n1,2\n", ["c"], "has no column 'c'; its columns are a, b"),
])
def test_bad_csv_files_are_named(tmp_path, text, columns, message):
    (tmp_path / "t.csv").write_text(text)
    with pytest.raises(DataError) as error:
        load_dataset(tmp_path / "t.csv", csv_columns=columns)
    assert message in str(error.value)


# ---------------------------------------------------------------- the test set and the options


def test_a_test_file_and_its_shape(tmp_path):
    np.save(tmp_path / "train.npy", np.zeros((10, 3)))
    np.save(tmp_path / "test.npy", np.ones((4, 3)))
    np.save(tmp_path / "wide.npy", np.ones((4, 5)))
    data = load_dataset(tmp_path / "train.npy", test=tmp_path / "test.npy")
    assert (len(data.train), len(data.test)) == (10, 4) and bool((data.test == 1).all())
    with pytest.raises(DataError, match=r"have shape \(5,\) per datapoint, the training data"):
        load_dataset(tmp_path / "train.npy", test=tmp_path / "wide.npy")


@pytest.mark.parametrize("name, options, message", [
    ("mnsit", {}, "did you mean 'mnist'?"),
    ("no/such/folder", {}, "no file or folder no/such/folder"),
    ("mnist", {"test_size": 0.2}, "--test-size (test_size=) apply to your own data"),
    ("x.npy", {"test_size": 1.5}, "must be a fraction between 0 and 1"),
    ("x.npy", {"test_size": 10}, "a test set of 10 of the 10 datapoints leaves no training"),
    ("x.npy", {"test_size": 2, "test": "x.npy"}, "not both"),
    ("x.npy", {"image_size": [4]}, "resizes the images of a folder"),
    ("x.npy", {"csv_columns": ["a"]}, "picks the columns of a .csv file"),
    ("x.npz", {"stream": True}, "Save the array with numpy.save as a .npy file to stream it"),
    ("x.npy", {"stream": True, "binarize": "static"}, "--binarize dynamic"),
])
def test_options_that_cannot_apply_are_refused(tmp_path, monkeypatch, name, options, message):
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((10, 3)))
    np.savez(tmp_path / "x.npz", np.zeros((10, 3)))
    with pytest.raises(DataError) as error:
        load_dataset(name, **options)
    assert message in str(error.value)


def test_from_tensors_splits_with_the_seed_and_keeps_labels():
    x, labels = torch.arange(40.0).reshape(20, 2), torch.arange(20)
    data = Dataset.from_tensors(x, test_size=0.25, seed=2, train_labels=labels)
    assert (len(data.train), len(data.test), data.x_shape) == (15, 5, (2,))
    assert torch.equal(data.train[:, 0] / 2, data.train_labels.float())
    assert torch.equal(data.test[:, 0] / 2, data.test_labels.float())
    assert torch.equal(Dataset.from_tensors(x, test_size=0.25, seed=2).test, data.test)
    given = Dataset.from_tensors(np.zeros((4, 3), dtype=np.int64), np.ones((2, 3)))
    assert given.train.dtype == torch.float32 and given.test.dtype == torch.float64
    with pytest.raises(DataError, match="the test data have shape"):
        Dataset.from_tensors(torch.zeros(4, 3), torch.zeros(2, 4))
    with pytest.raises(DataError, match="values outside"):
        Dataset.from_tensors(torch.full((4, 3), 2.0), binarize="dynamic")
    # a run on them names them "tensors", which nothing can reload from disk
    with pytest.raises(DataError, match=r"evaluate such a run in Python"):
        load_dataset("tensors")


# ---------------------------------------------------------------- a run on own data


def test_a_run_on_an_image_folder_is_rebuilt_by_evaluate(tmp_path):
    folder = write_folder(tmp_path / "faces", grey_images(30, 4, 4))
    out = tmp_path / "run"
    code = main(["train", "--dataset", str(folder), "--test-size", "6", "--image-size", "3",
                 "--epochs", "1", "--out", str(out), "--no-progress", "--hidden", "8",
                 "--z-dim", "2", "--seed", "5"])
    assert code == 0
    training = json.loads((out / CONFIG_FILE).read_text())["training"]
    assert training["dataset"] == str(folder.resolve())
    assert (training["test_size"], training["image_size"]) == (6, [3, 3])
    assert training["binarize"] == "dynamic"
    _, data, _ = load_run(out)
    fresh = load_dataset(folder, test_size=6, image_size=[3, 3], seed=5, binarize="dynamic")
    assert data.x_shape == (3, 3) and torch.equal(data.test, fresh.test)
    assert main(["evaluate", str(out), "--num-samples", "4", "--num-images", "3",
                 "--subset-size", "3", "--no-progress"]) == 0


@pytest.mark.parametrize("args, message", [
    (["--dataset", "mnsit"], "did you mean 'mnist'?"),
    (["--dataset", "{csv}"], "values outside [0, 1]"),  # a bernoulli likelihood on other values
    (["--dataset", "{folder}", "--binarize", "none"], "--binarize dynamic or static"),
])
def test_bad_own_data_gets_the_built_in_sets_errors(tmp_path, capsys, args, message):
    (tmp_path / "t.csv").write_text("a,b\n1,2\n3,4\n5,6\n")
    folder = write_folder(tmp_path / "grey", grey_images(6, 3, 3))
    args = [a.format(csv=tmp_path / "t.csv", folder=folder) for a in args]
    code = main(["train", *args, "--epochs", "1", "--out", str(tmp_path / "run"),
                 "--no-progress", "--hidden", "4", "--z-dim", "2"])
    assert code == 2
    assert message in capsys.readouterr().err
