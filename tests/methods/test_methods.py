"""The method contract and registry, SimCLR and DINO (lightly's parts), and a toy third method
that needs nothing but its own class and config section."""

import math
from dataclasses import dataclass, replace

import pytest
import torch
from torch import nn

from ssl_blood import methods
from ssl_blood.model.augment import AugmentConfig, BatchAugment, ViewGroup
from ssl_blood.data import channel_stats, load_split, resolve_source
from ssl_blood.errors import UserError
from ssl_blood.methods import Method, MethodSetup, build_method, method_names, register
from ssl_blood.methods.dino import DINO, DINOConfig
from ssl_blood.methods.simclr import SimCLR, SimCLRConfig
from ssl_blood.model.backbones import build_backbone

SETUP = MethodSetup(epochs=10, input_size=28, crop_scale=(0.14, 1.0))


def make(method: str, **dino):
    torch.manual_seed(0)
    backbone = build_backbone("cnn6")
    cfg = (SimCLRConfig(projection_hidden_dim=128, projection_dim=64) if method == "simclr" else
           DINOConfig(output_dim=256, hidden_dim=128, bottleneck_dim=64, momentum_start=0.9,
                      freeze_last_layer_epochs=0, local_views=2, **dino))
    return build_method(method, backbone, cfg, SETUP)


@pytest.mark.parametrize("method", ["simclr", "dino"])
def test_a_few_steps_lower_the_loss(data_root, method):
    cells = load_split(resolve_source(str(data_root)), "train", limit=64)
    augment = BatchAugment(AugmentConfig(), *channel_stats(cells.images))
    model = make(method)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    probe_views = augment.views(model.view_spec(), cells.images, torch.Generator().manual_seed(123))
    with torch.no_grad():
        before = float(model(probe_views, epoch=5))
    for step in range(25):
        views = augment.views(model.view_spec(), cells.images, torch.Generator().manual_seed(step))
        loss = model(views, epoch=5)
        optimizer.zero_grad()
        loss.backward()
        model.before_optimizer_step(5)
        optimizer.step()
        model.after_optimizer_step(step, 25)
    with torch.no_grad():
        after = float(model(probe_views, epoch=5))
    assert math.isfinite(after) and after < before - 0.05, (before, after)


def test_view_specs_follow_the_input_size():
    assert make("simclr").view_spec() == [ViewGroup(2, 28, (0.14, 1.0))]
    assert make("dino").view_spec() == [ViewGroup(2, 28, (0.14, 1.0)), ViewGroup(2, 12, (0.05, 0.3))]
    big = build_method("dino", build_backbone("cnn6"), DINOConfig(output_dim=64), replace(SETUP, input_size=64))
    assert big.view_spec()[1].size == 27  # 3/7 of the input size


def test_dino_views_go_to_teacher_and_student():
    model = make("dino")
    views = [torch.randn(4, 3, 28, 28)] * 2 + [torch.randn(4, 3, 12, 12)] * 3
    loss = model(views, epoch=0)
    assert loss.ndim == 0 and loss.requires_grad
    assert all(not p.requires_grad for p in model.teacher_backbone.parameters())
    assert model.eval_backbone() is model.teacher_backbone


def test_dino_loss_centring_and_teacher_temperature():
    """The loss is DINO's cross-entropy between the centred, sharpened teacher of each global
    view and the student of every other view; the centre then moves by EMA of teacher means."""
    model = make("dino", warmup_teacher_temp=0.07, teacher_temp=0.04, warmup_teacher_temp_epochs=4)
    assert model.teacher_temperature(0) == pytest.approx(0.07)
    assert model.teacher_temperature(2) == pytest.approx(0.07 + (0.04 - 0.07) * 2 / 3)
    assert model.teacher_temperature(5) == pytest.approx(0.04)
    model.eval()  # fixed BN statistics: the manual computation below sees the same outputs
    with torch.no_grad():
        model.criterion.center.copy_(torch.randn_like(model.criterion.center) * 0.1)
        views = [torch.randn(3, 3, 28, 28) for _ in range(2)] + [torch.randn(3, 3, 12, 12) for _ in range(2)]
        center = model.criterion.center.clone()
        teacher = [model._project(model.teacher_head, model.teacher_backbone(v)) for v in views[:2]]
        student = [model._project(model.student_head, model.student_backbone(v)) for v in views]
        t_temp, s_temp = model.teacher_temperature(2), model.cfg.student_temp
        terms = [-(torch.softmax((t - center) / t_temp, -1) * torch.log_softmax(s / s_temp, -1)).sum(-1).mean()
                 for i, t in enumerate(teacher) for j, s in enumerate(student) if i != j]
        expected = torch.stack(terms).mean()
        loss = model(views, epoch=2)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    batch_mean = torch.cat(teacher).mean(0, keepdim=True)
    assert torch.allclose(model.criterion.center, 0.9 * center + 0.1 * batch_mean, atol=1e-6)


def test_dino_last_layer_and_loss_in_float32_under_bf16():
    model = make("dino")
    views = [torch.randn(4, 3, 28, 28)] * 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = model.student_backbone(views[0])
        out = model._project(model.student_head, feats)
        loss = model(views, epoch=1)
        z = model.student_head.layers(feats).float()
    assert out.dtype == torch.float32 and loss.dtype == torch.float32
    exact = model.student_head.last_layer(nn.functional.normalize(z, dim=-1))
    assert torch.allclose(out, exact, atol=1e-6)


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


def test_dino_collapse_is_detected_and_counted_in_the_state_dict():
    from ssl_blood.errors import RunFailed

    dino = make("dino")
    uniform = math.log(256)
    for epoch in (1, 2):
        dino._entropy_sums = torch.tensor([uniform, uniform, 1.0])
        dino.check_collapse(uniform, epoch)
    assert int(dino.state_dict()["collapsed_epochs"]) == 2  # survives a resume
    dino._entropy_sums = torch.tensor([uniform, uniform, 1.0])
    with pytest.raises(RunFailed, match="collapsed at epoch 3.*ln\\(output_dim=256\\)"):
        dino.check_collapse(uniform * 1.001, 3)
    healthy = make("dino")
    for epoch in range(1, 6):  # a sharp but diverse teacher is not collapse
        healthy._entropy_sums = torch.tensor([1.0, 3.5, 1.0])
        healthy.check_collapse(2.0, epoch)
    averaged = make("dino")  # decided on the all-reduced numbers
    averaged._entropy_sums = torch.tensor([uniform, uniform, 1.0])
    stats = averaged.check_collapse(2.0, 1, mean=lambda t: t * torch.tensor([0.5, 0.5, 1.0]))
    assert stats["teacher_entropy"] == pytest.approx(uniform / 2)


def test_simclr_uses_lightly_parts():
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead

    model = make("simclr")
    assert isinstance(model, SimCLR) and isinstance(model.criterion, NTXentLoss)
    assert isinstance(model.projection_head, SimCLRProjectionHead)
    assert model.eval_backbone() is model.backbone


def test_registry():
    assert {"simclr", "dino"} <= set(method_names())
    assert isinstance(make("dino"), DINO) and isinstance(make("dino"), Method)
    with pytest.raises(UserError, match="unknown method 'byol'"):
        build_method("byol", build_backbone("cnn6"), None, SETUP)


# ----------------------------------------------------------------------------- a third method


@dataclass
class ToyConfig:
    """The toy method's config section ("toy": {...} in config.json)."""

    projection_dim: int = 16
    variance_weight: float = 1.0


class Toy(Method):
    """Aligns the projections of three views, keeps their per-dimension variance up."""

    name = "toy"
    Config = ToyConfig

    def __init__(self, backbone, cfg, setup):
        super().__init__(backbone, cfg, setup)
        self.backbone = backbone
        self.head = nn.Linear(backbone.num_features, cfg.projection_dim)

    def view_spec(self):
        return [ViewGroup(3, self.setup.input_size, tuple(self.setup.crop_scale))]

    def forward(self, views, epoch):
        z = [nn.functional.normalize(self.head(self.backbone(v)), dim=1) for v in views]
        align = sum(((a - b) ** 2).sum(1).mean() for a, b in zip(z, z[1:]))
        variance = sum(torch.relu(1 - v.std(0)).mean() for v in z)
        return align + self.cfg.variance_weight * variance

    def eval_backbone(self):
        return self.backbone


def test_a_third_method_needs_only_its_class_and_config(tiny_config, tmp_path):
    from ssl_blood.training.config import PretrainConfig, apply_settings
    from ssl_blood.features.embeddings import embed_checkpoint
    from ssl_blood.training.loop import pretrain

    register(Toy)
    try:
        cfg = apply_settings(replace(tiny_config, method="toy", method_config=ToyConfig()),
                             {"toy.variance_weight": 0.5})
        assert cfg.to_dict()["toy"] == {"projection_dim": 16, "variance_weight": 0.5}
        assert PretrainConfig.from_dict(cfg.to_dict()) == cfg
        result = pretrain(cfg, tmp_path / "run", progress=False)
        assert [r["epoch"] for r in result.history] == [1, 2]
        assert math.isfinite(result.history[-1]["loss"])
        emb = embed_checkpoint(tmp_path / "run" / "checkpoint.pt")
        assert emb.dim == result.backbone.num_features
        # presets: a method without recipes of its own gets the generic ones, not DINO's
        from ssl_blood.training.config import preset_config

        quick, dino = preset_config("quick", "toy"), preset_config("quick", "dino")
        assert quick.method == "toy" and quick.method_config == ToyConfig()
        assert quick.backbone == "cnn6" and quick.augment.crop_scale != dino.augment.crop_scale
        assert preset_config("full", "toy").backbone == "resnet18"
    finally:
        methods.base._METHODS.pop("toy")


def test_method_presets_and_migrations_live_with_the_method():
    from ssl_blood.methods.dino import DINO
    from ssl_blood.training.config import PretrainConfig, preset_config

    simclr, dino = preset_config("standard", "simclr"), preset_config("standard", "dino")
    assert (simclr.backbone, simclr.epochs, simclr.method_config.temperature) == ("cnn6-wide", 72, 0.1)
    assert (dino.backbone, dino.epochs, tuple(dino.augment.crop_scale)) == ("cnn6", 84, (0.35, 1.0))
    old = {**preset_config("quick", "dino").to_dict()}
    old["augment"] = {**old["augment"], "local_views": 4}  # format 1 kept it in augment
    old["dino"] = {k: v for k, v in old["dino"].items() if k != "local_views"}
    assert PretrainConfig.from_dict(old).method_config.local_views == 4
    assert "collapsed_epochs" in DINO.migrate_state({})
