import math

import pytest
import torch

from ssl_blood.augment import AugmentConfig, BatchAugment
from ssl_blood.data import channel_stats, load_split, resolve_source
from ssl_blood.methods import DINO, DINOConfig, SimCLR, SimCLRConfig, build_method
from ssl_blood.models import build_backbone
from ssl_blood.errors import UserError


def make(method: str):
    torch.manual_seed(0)
    backbone = build_backbone("cnn6")
    return build_method(method, backbone, SimCLRConfig(projection_hidden_dim=128, projection_dim=64),
                        DINOConfig(output_dim=256, hidden_dim=128, bottleneck_dim=64,
                                   momentum_start=0.9, freeze_last_layer_epochs=0), epochs=10)


@pytest.mark.parametrize("method", ["simclr", "dino"])
def test_a_few_steps_lower_the_loss(data_root, method):
    cells = load_split(resolve_source(str(data_root)), "train", limit=64)
    augment = BatchAugment(AugmentConfig(local_views=2), *channel_stats(cells.images), size=28)
    model = make(method)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    probe_views = augment.views(method, cells.images, torch.Generator().manual_seed(123))
    with torch.no_grad():
        before = float(model(probe_views, epoch=5))
    for step in range(25):
        views = augment.views(method, cells.images, torch.Generator().manual_seed(step))
        loss = model(views, epoch=5)
        optimizer.zero_grad()
        loss.backward()
        model.before_optimizer_step(5)
        optimizer.step()
        model.after_optimizer_step(step, 25)
    with torch.no_grad():
        after = float(model(probe_views, epoch=5))
    assert math.isfinite(after) and after < before - 0.05, (before, after)


def test_dino_views_go_to_teacher_and_student():
    model = make("dino")
    views = [torch.randn(4, 3, 28, 28)] * 2 + [torch.randn(4, 3, 12, 12)] * 3
    loss = model(views, epoch=0)
    assert loss.ndim == 0 and loss.requires_grad
    assert all(not p.requires_grad for p in model.teacher_backbone.parameters())
    assert model.eval_backbone() is model.teacher_backbone


def test_dino_teacher_starts_as_student_and_follows_by_ema():
    model = make("dino")
    for s, t in zip(model.student_head.state_dict().values(), model.teacher_head.state_dict().values()):
        assert torch.equal(s, t)
    with torch.no_grad():
        for p in model.student_backbone.parameters():
            p.add_(1.0)
    before = [p.clone() for p in model.teacher_backbone.parameters()]
    model.after_optimizer_step(0, 100)  # momentum 0.9 at step 0
    for old, new, student in zip(before, model.teacher_backbone.parameters(),
                                 model.student_backbone.parameters()):
        assert torch.allclose(new, 0.9 * old + 0.1 * student, atol=1e-6)


def test_simclr_uses_lightly_parts():
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead

    model = make("simclr")
    assert isinstance(model, SimCLR) and isinstance(model.criterion, NTXentLoss)
    assert isinstance(model.projection_head, SimCLRProjectionHead)
    assert model.eval_backbone() is model.backbone


def test_unknown_method():
    with pytest.raises(UserError, match="unknown method 'byol'"):
        build_method("byol", build_backbone("cnn6"), SimCLRConfig(), DINOConfig(), 1)
