import numpy as np
import pytest
import torch

from ssl_blood.model.inference import frozen_for_inference, inference_batch, run_model
from ssl_blood.model.backbones import build_backbone


def test_folded_batch_norm_gives_the_same_features():
    torch.manual_seed(0)
    model = build_backbone("cnn6")
    with torch.no_grad():  # non-trivial BN statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    model.eval()
    images = torch.randint(0, 256, (20, 3, 28, 28), dtype=torch.uint8)
    args = ([0.5] * 3, [0.25] * 3, 28, torch.device("cpu"))
    plain = run_model(model, images, *args, precision="fp32")
    folded = frozen_for_inference(model)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules()) == 0
    np.testing.assert_allclose(run_model(folded, images, *args, precision="fp32"), plain, atol=1e-4)
    assert model.training is False and any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_batches_and_post():
    model = build_backbone("cnn6").eval()
    images = torch.randint(0, 256, (10, 3, 16, 16), dtype=torch.uint8)
    scores = run_model(torch.nn.Sequential(model, torch.nn.Linear(256, 3)), images, [0.5] * 3,
                       [0.25] * 3, 16, torch.device("cpu"), precision="fp32", batch_size=3,
                       post=lambda z: torch.softmax(z, 1))
    assert scores.shape == (10, 3) and np.allclose(scores.sum(1), 1, atol=1e-5)
    assert inference_batch(32) == 256 and inference_batch(128) == 16 and inference_batch(64) == 64


def test_dihedral_views_are_the_eight_symmetries_in_subset_order():
    from ssl_blood.errors import UserError
    from ssl_blood.model.inference import DIHEDRAL, VIEWS, dihedral_views

    x = torch.arange(2 * 1 * 3 * 3, dtype=torch.float32).reshape(2, 1, 3, 3)
    views = dihedral_views(x, 8).reshape(8, 2, 1, 3, 3)
    expected = [torch.rot90(x.flip(3) if mirror else x, turns, (2, 3)) for turns, mirror in DIHEDRAL]
    for got, want in zip(views, expected):
        assert torch.equal(got, want)
    assert len({tuple(v[0].flatten().tolist()) for v in views}) == 8  # all distinct
    # the first 2 are the identity and the half turn, the first 4 the quarter turns
    assert torch.equal(views[1], torch.rot90(x, 2, (2, 3)))
    assert {int(t) for t, m in DIHEDRAL[:4]} == {0, 1, 2, 3} and not any(m for _, m in DIHEDRAL[:4])
    assert torch.equal(dihedral_views(x, 1), x) and VIEWS == (1, 2, 4, 8)
    with pytest.raises(UserError, match="`views` 3 must be one of 1, 2, 4, 8"):
        dihedral_views(x, 3)


def test_eight_averaged_views_make_any_backbone_blind_to_orientation():
    """A backbone that sees orientation gives other features for a turned or mirrored cell;
    averaged over the 8 views it gives the same ones (the group average is invariant)."""
    torch.manual_seed(0)
    model = build_backbone("cnn6").eval()
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    turned = torch.rot90(images, 1, (2, 3)).flip(3).contiguous()
    args = ([0.5] * 3, [0.25] * 3, 16, torch.device("cpu"))
    one = run_model(model, images, *args, precision="fp32")
    assert np.abs(run_model(model, turned, *args, precision="fp32") - one).max() > 1e-3
    eight = run_model(model, images, *args, precision="fp32", views=8, batch_size=16)
    np.testing.assert_allclose(run_model(model, turned, *args, precision="fp32", views=8), eight, atol=1e-5)
    # the batch holds views: 16 views are 2 images a pass, the same numbers as one pass
    np.testing.assert_allclose(eight, run_model(model, images, *args, precision="fp32", views=8), atol=1e-5)
