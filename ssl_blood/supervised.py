"""Supervised end-to-end training of the same backbone: the upper reference for frozen features.

MedMNIST v2's protocol: cross-entropy, Adam lr 1e-3 decayed x0.1 at 50 % and 75 % of the
epochs (50 and 75 of 100), batch 128, no augmentation; the epoch with the best val ACC is the
model scored once on test. The core's batched augmentation can be switched on (`augment`).
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ssl_blood import __version__
from ssl_blood.augment import AugmentConfig, BatchAugment, eval_preprocess
from ssl_blood.checkpoint import FORMAT_VERSION, atomic_save, write_json
from ssl_blood.data import DataSource, channel_stats, load_split
from ssl_blood.device import describe_device, resolve_device
from ssl_blood.errors import UserError
from ssl_blood.evaluate import classification_metrics
from ssl_blood.models import build_backbone


@dataclass
class SupervisedConfig:
    backbone: str = "resnet18"
    epochs: int = 100
    batch_size: int = 128
    lr: float = 1e-3
    augment: bool = False
    augment_config: AugmentConfig = field(default_factory=AugmentConfig)
    data: dict = field(default_factory=lambda: {"kind": "bloodmnist", "path": "", "size": 28})
    limit: int | None = None
    seed: int = 0
    device: str = "auto"


class Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


@torch.no_grad()
def predict_scores(model: nn.Module, images: torch.Tensor, mean, std, size: int,
                   device: torch.device, batch_size: int = 1024) -> np.ndarray:
    model.eval()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    out = []
    for start in range(0, len(images), batch_size):
        x = eval_preprocess(images[start:start + batch_size].to(device), mean, std, size)
        with autocast:
            out.append(torch.softmax(model(x).float(), 1).cpu())
    return torch.cat(out).numpy()


def train_supervised(cfg: SupervisedConfig, out_dir: str | Path | None = None,
                     progress: bool | None = None) -> dict[str, Any]:
    """Train, pick the best-val epoch, score test once; optionally write supervised.json and
    a checkpoint.pt (same format as pretraining, so embed/probe/retrieve work on it)."""
    from tqdm.auto import tqdm

    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.lr <= 0:
        raise UserError("--epochs, --batch-size and --lr must be positive")
    device = resolve_device(cfg.device)
    source = DataSource.from_dict(cfg.data)
    train, val, test = (load_split(source, s, cfg.limit, cfg.seed) for s in ("train", "val", "test"))
    for part in (train, val, test):
        if not part.is_labeled:
            raise UserError(f"supervised training needs labels; the {part.split} split has none")
    mean, std = channel_stats(train.images)
    size = train.image_size
    torch.manual_seed(cfg.seed)
    model = Classifier(build_backbone(cfg.backbone, train.channels), train.num_classes).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    milestones = [int(0.5 * cfg.epochs), int(0.75 * cfg.epochs)]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
    augment = BatchAugment(cfg.augment_config, mean, std, size)
    images, labels = train.images.to(device), train.labels.to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    history, best = [], {"val_acc": -1.0}
    started = time.perf_counter()
    for epoch in tqdm(range(cfg.epochs), disable=progress is False, desc="supervised"):
        model.train()
        gen = torch.Generator(device).manual_seed(cfg.seed * 7919 + epoch)
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed + epoch))
        loss_sum = 0.0
        for start in range(0, len(perm), cfg.batch_size):
            index = perm[start:start + cfg.batch_size].to(device)
            x = (augment.view(images[index], gen, size, cfg.augment_config.crop_scale) if cfg.augment
                 else eval_preprocess(images[index], mean, std, size))
            with autocast:
                loss = nn.functional.cross_entropy(model(x).float(), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * len(index)
        scheduler.step()
        val_scores = predict_scores(model, val.images, mean, std, size, device)
        val_acc = float((val_scores.argmax(1) == val.labels.numpy()).mean())
        history.append({"epoch": epoch + 1, "loss": loss_sum / len(perm), "val_acc": val_acc})
        if val_acc > best["val_acc"]:
            best = {"val_acc": val_acc, "epoch": epoch + 1, "state": copy.deepcopy(model.state_dict())}
    model.load_state_dict(best["state"])
    test_metrics = classification_metrics(test.labels.numpy(),
                                          predict_scores(model, test.images, mean, std, size, device),
                                          train.class_names)
    result = {"backbone": cfg.backbone, "epochs": cfg.epochs, "best_epoch": best["epoch"],
              "val_acc": best["val_acc"], "test_acc": test_metrics["acc"],
              "test_auc": test_metrics["auc"], **{k: v for k, v in test_metrics.items()
                                                 if k not in ("acc", "auc")},
              "seconds": time.perf_counter() - started, "device": describe_device(device),
              "history": history}
    if out_dir is not None:
        _write(Path(out_dir), cfg, model, result, source, train, mean, std)
    return result


def _write(out: Path, cfg: SupervisedConfig, model: Classifier, result: dict, source: DataSource,
           train, mean, std) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cfg_dict = asdict(cfg)
    cfg_dict["method"] = "supervised"
    atomic_save({
        "format_version": FORMAT_VERSION, "ssl_blood_version": __version__, "config": cfg_dict,
        "dataset": {"name": source.name, "source": source.to_dict(), "num_classes": train.num_classes,
                    "class_names": list(train.class_names), "image_size": train.image_size,
                    "input_size": train.image_size, "channels": train.channels,
                    "mean": mean, "std": std},
        "backbone_name": cfg.backbone, "backbone": model.backbone.state_dict(),
        "method": model.state_dict(), "epoch": cfg.epochs, "history": result["history"],
    }, out / "checkpoint.pt")
    write_json(result, out / "supervised.json")
