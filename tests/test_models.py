import pytest
import torch

from ssl_blood.errors import UserError
from ssl_blood.models import backbone_names, build_backbone, describe_backbones, output_dim


@pytest.mark.parametrize("name", backbone_names())
def test_every_backbone_reports_its_feature_size(name):
    model = build_backbone(name)
    assert output_dim(model, 3, 28) == model.num_features
    assert output_dim(build_backbone(name, in_channels=1), 1, 28) == model.num_features
    assert describe_backbones()[name]


def test_resnet18_small_stem_keeps_resolution_and_loads_into_torchvision():
    import torchvision

    model = build_backbone("resnet18")
    assert model.conv1.stride == (1, 1) and isinstance(model.maxpool, torch.nn.Identity)
    plain = torchvision.models.resnet18()
    plain.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    plain.maxpool, plain.fc = torch.nn.Identity(), torch.nn.Identity()
    plain.load_state_dict(model.state_dict())


def test_unknown_backbone():
    with pytest.raises(UserError, match="unknown backbone 'vgg'.*resnet18"):
        build_backbone("vgg")
