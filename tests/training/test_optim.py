"""Optimiser, learning rate and batches: LARS adapts and decays the right parameters, the lr
follows the batch that really runs, no image of a step is dropped."""

import pytest
import torch

from ssl_blood.errors import UserError
from ssl_blood.methods import MethodSetup, build_method
from ssl_blood.methods.simclr import SimCLRConfig
from ssl_blood.model.backbones import build_backbone
from ssl_blood.training.optim import (build_optimizer, effective_batch, epoch_batches, lr_schedule,
                             peak_lr)


def simclr():
    torch.manual_seed(0)
    return build_method("simclr", build_backbone("cnn6"), SimCLRConfig(projection_hidden_dim=32,
                                                                       projection_dim=16),
                        MethodSetup(10, 28, (0.14, 1.0)))


def test_lars_adapts_and_decays_weights_but_not_biases_or_norms():
    """lightly's LARS: for the weight-decay group each step is lr * eta * |w| / (|g| + wd |w|)
    times (g + wd w); biases and BN parameters take plain momentum SGD, no decay."""
    model = simclr()
    optimizer = build_optimizer("lars", model, lr=0.5, weight_decay=0.1, trust_coefficient=0.01)
    decay, plain = optimizer.param_groups
    conv = model.backbone[0].weight
    bn_weight, bn_bias = model.backbone[1].weight, model.backbone[1].bias
    assert any(p is conv for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert any(p is bn_weight for p in plain["params"]) and any(p is bn_bias for p in plain["params"])
    assert plain["weight_decay"] == 0.0 and optimizer.defaults["trust_coefficient"] == 0.01
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.01)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer.step()
    params = dict(model.named_parameters())
    w, g = before["backbone.0.weight"], torch.full_like(conv, 0.01)
    trust = 0.01 * w.norm() / (g.norm() + 0.1 * w.norm() + 1e-8)
    expected = w - 0.5 * trust * (g + 0.1 * w)
    assert torch.allclose(params["backbone.0.weight"], expected, atol=1e-6)
    assert torch.allclose(params["backbone.1.bias"], before["backbone.1.bias"] - 0.5 * 0.01)
    assert torch.allclose(params["backbone.1.weight"], before["backbone.1.weight"] - 0.5 * 0.01)


def test_lr_follows_the_batch_that_runs():
    assert effective_batch(10_000, 64) == 64
    assert effective_batch(256, 11959) == 256
    assert effective_batch(255, 1000, world_size=2) == 254  # a multiple of the ranks
    assert peak_lr(0.6, effective_batch(10_000, 64)) == pytest.approx(0.15)
    with pytest.raises(UserError, match="too few"):
        effective_batch(256, 3, world_size=2)


def test_schedule_warmup_then_cosine():
    lrs = lr_schedule(0.5, epochs=10, warmup_epochs=2, final_ratio=0.0, steps_per_epoch=5)
    assert len(lrs) == 50 and lrs[9] == pytest.approx(0.5)  # peak at the end of warm-up
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10])) and lrs[-1] == 0.0
    assert all(isinstance(x, float) for x in lrs)


def test_epoch_batches_are_disjoint_and_drop_nothing_per_step():
    r0 = epoch_batches(100, 30, 3, 0, rank=0, world_size=3)
    r1 = epoch_batches(100, 30, 3, 0, rank=1, world_size=3)
    r2 = epoch_batches(100, 30, 3, 0, rank=2, world_size=3)
    assert len(r0) == 3 and all(len(b) == 10 for b in r0 + r1 + r2)  # 30 per step, all used
    assert len(torch.cat(r0 + r1 + r2).unique()) == 90
    assert not torch.equal(torch.cat(epoch_batches(100, 30, 4, 0)), torch.cat(epoch_batches(100, 30, 3, 0)))
    with pytest.raises(ValueError):
        epoch_batches(100, 31, 0, 0, world_size=2)
