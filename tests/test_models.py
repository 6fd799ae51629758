"""The model zoo adapts to every input shape; the pretrained ResNet-20 is the real one."""

import pytest
import torch

from fedsim.datasets import load_dataset, to_float
from fedsim.errors import FedsimError
from fedsim.federation import evaluate
from fedsim.models import MODELS, build_model, load_pretrained


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize(("shape", "classes"), [((1, 28, 28), 10), ((3, 32, 32), 100), ((1, 64, 64), 40)])
def test_every_model_fits_every_shape(name, shape, classes):
    model = build_model(name, shape, classes, seed=0)
    assert model(torch.rand(2, *shape)).shape == (2, classes)


def test_seeded_models_are_identical():
    a, b = build_model("lenet-dlg", (3, 32, 32), 10, seed=3), build_model("lenet-dlg", (3, 32, 32), 10, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_dlg_lenet_follows_the_paper():
    model = build_model("lenet-dlg", (3, 32, 32), 10, seed=0)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (12, (5, 5), (2, 2)),
        (12, (5, 5), (2, 2)),
        (12, (5, 5), (1, 1)),
    ]
    assert model.fc.in_features == 768
    weights = torch.cat([p.flatten() for p in model.parameters()])
    assert weights.min() >= -0.5 and weights.max() <= 0.5


def test_unknown_model():
    with pytest.raises(FedsimError, match="choose one of"):
        build_model("vgg", (3, 32, 32), 10)


def test_pretrained_resnet20_classifies_the_lossless_cifar_images(shared_data):
    model = build_model("resnet20", (3, 32, 32), 10)
    kept = load_pretrained(model, shared_data / "pretrained" / "resnet20_cifar10")
    assert kept == []
    data = load_dataset("sample-cifar10")
    assert evaluate(model, to_float(data.train_x), data.train_y)["test-accuracy"] == 1.0


def test_pretrained_into_another_head_keeps_only_fitting_tensors(shared_data):
    model = build_model("resnet20", (3, 32, 32), 100)
    kept = load_pretrained(model, shared_data / "pretrained" / "resnet20_cifar10")
    assert kept == ["linear.weight", "linear.bias"]


def test_checkpoint_errors(tmp_path):
    model = build_model("mlp", (1, 8, 8), 10)
    with pytest.raises(FedsimError, match="does not exist"):
        load_pretrained(model, tmp_path / "none.th")
    evil = tmp_path / "evil.th"
    import pickle

    evil.write_bytes(pickle.dumps(print))  # a pickle that references code: never unpickled
    with pytest.raises(FedsimError, match="cannot read checkpoint"):
        load_pretrained(model, evil)
