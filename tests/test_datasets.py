"""Dataset loaders on real offline data, and clear errors when data is missing."""

import pytest
import torch

from fedsim.datasets import load_dataset
from fedsim.errors import FedsimError


def test_shipped_samples_load_offline():
    mnist = load_dataset("sample-mnist")
    assert mnist.input_shape == (1, 28, 28) and mnist.num_classes == 10
    assert mnist.train_y[:5].tolist() == [7, 2, 1, 0, 4]  # the first MNIST test labels
    cifar = load_dataset("sample-cifar10")
    assert cifar.input_shape == (3, 32, 32) and len(cifar.train_x) == 200
    assert cifar.train_x.dtype == torch.uint8


@pytest.mark.parametrize(
    ("name", "shape", "classes"),
    [
        ("mnist", (1, 28, 28), 10),
        ("fashion-mnist", (1, 28, 28), 10),
        ("cifar10", (3, 32, 32), 10),
        ("olivetti", (1, 64, 64), 40),
        ("orl", (1, 112, 92), 40),
    ],
)
def test_real_datasets_from_the_offline_copies(shared_data, name, shape, classes):
    data = load_dataset(name, str(shared_data))
    assert data.input_shape == shape and data.num_classes == classes
    assert len(data.train_x) > 0 and len(data.test_x) > 0
    assert set(data.test_y.unique().tolist()) <= set(range(classes))


def test_resize(shared_data):
    assert load_dataset("orl", str(shared_data), image_size=32).input_shape == (1, 32, 32)


def test_image_folder_of_own_photos(tmp_path):
    from PIL import Image

    for label in ("cats", "dogs"):
        (tmp_path / label).mkdir()
        for i in range(5):
            Image.new("RGB", (40, 30), (i * 40, 100, 200 if label == "cats" else 0)).save(tmp_path / label / f"{i}.png")
    data = load_dataset("imagefolder", str(tmp_path), image_size=16)
    assert data.classes == ["cats", "dogs"] and data.input_shape == (3, 16, 16)
    assert len(data.train_x) + len(data.test_x) == 10


@pytest.mark.parametrize("name", ["mnist", "cifar10", "cifar100", "olivetti", "orl", "imagefolder"])
def test_missing_data_names_the_folder_and_the_fix(tmp_path, name):
    with pytest.raises(FedsimError, match=r"(not found under|does not exist|cannot read).*--data-dir"):
        load_dataset(name, str(tmp_path / "nowhere"))
