import numpy as np
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
