import pytest
import torch

from ssl_blood.errors import UserError
from ssl_blood.model.backbones import (backbone_names, build_backbone, describe_backbones, output_dim,
                              resolve_stem)


@pytest.mark.parametrize("name", backbone_names())
def test_every_backbone_reports_its_feature_size(name):
    model = build_backbone(name)
    assert output_dim(model, 3, 28) == model.num_features
    assert output_dim(build_backbone(name, in_channels=1), 1, 28) == model.num_features
    assert describe_backbones()[name]


@pytest.mark.parametrize("size, stem", [(16, "s1"), (28, "s1"), (47, "s1"), (48, "s2"), (64, "s2"),
                                        (95, "s2"), (96, "s4"), (128, "s4"), (256, "s4")])
def test_stem_by_size(size, stem):
    assert resolve_stem("auto", size) == stem


@pytest.mark.parametrize("name", ["cnn6", "resnet18"])
@pytest.mark.parametrize("size", [28, 64, 128])
def test_stems_end_on_a_small_map(name, size):
    """Every size reaches the pooling layer at about 4 px, as 28 px does with stem s1."""
    model = build_backbone(name, stem=resolve_stem("auto", size)).eval()
    maps = []
    pool = model[-2] if name == "cnn6" else model.avgpool
    pool.register_forward_hook(lambda m, inp, out: maps.append(inp[0].shape[-1]))
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    assert 2 <= maps[0] <= 4, (name, size, maps)


def test_resnet18_small_stem_keeps_resolution_and_loads_into_torchvision():
    import torchvision

    model = build_backbone("resnet18")
    assert model.conv1.stride == (1, 1) and isinstance(model.maxpool, torch.nn.Identity)
    plain = torchvision.models.resnet18()
    plain.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    plain.maxpool, plain.fc = torch.nn.Identity(), torch.nn.Identity()
    plain.load_state_dict(model.state_dict())
    imagenet = build_backbone("resnet18", stem="s4")  # the ImageNet stem loads into torchvision as is
    stock = torchvision.models.resnet18()
    stock.fc = torch.nn.Identity()
    stock.load_state_dict(imagenet.state_dict())


def test_unknown_backbone_and_stem():
    with pytest.raises(UserError, match="unknown backbone 'vgg'.*resnet18"):
        build_backbone("vgg")
    with pytest.raises(UserError, match="`stem` 's3'"):
        resolve_stem("s3", 28)
