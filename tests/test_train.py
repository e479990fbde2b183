import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ssl_blood.checkpoint import export_backbone, load_backbone, load_checkpoint
from ssl_blood.config import PretrainConfig
from ssl_blood.errors import RunFailed, UserError
from ssl_blood.train import CHECKPOINT, METRICS, Distributed, epoch_batches, lr_schedule, pretrain


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_is_plain_and_loads_weights_only(tiny_config, tmp_path):
    result = pretrain(tiny_config, tmp_path / "run", progress=False)
    ckpt = torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)
    assert ckpt["format_version"] == 1 and ckpt["epoch"] == 2
    assert ckpt["dataset"]["num_classes"] == 4 and ckpt["dataset"]["image_size"] == 16
    assert PretrainConfig.from_dict(ckpt["config"]) == tiny_config
    assert {"backbone", "method", "optimizer", "rng"} <= ckpt.keys()
    restored = load_backbone(tmp_path / "run" / CHECKPOINT)
    assert state_equal(restored.model.state_dict(), result.backbone.state_dict())
    assert json.loads((tmp_path / "run" / "config.json").read_text())["epochs"] == 2


def test_metrics_jsonl_per_epoch(tiny_config, tmp_path):
    pretrain(tiny_config, tmp_path, progress=False)
    lines = [json.loads(l) for l in (tmp_path / METRICS).read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2]
    for line in lines:
        assert line["loss"] > 0 and line["img_s"] > 0 and 0 <= line["knn_val_acc"] <= 1
    assert lines[0]["lr"] > lines[1]["lr"] == 0.0  # cosine decays to zero at the end


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("method", ["simclr", "dino"])
def test_resume_equals_uninterrupted_run(tiny_config, tmp_path, method):
    cfg = replace(tiny_config, method=method, epochs=3)
    straight = pretrain(cfg, tmp_path / "a", progress=False)

    def stop_after_first(epoch, record):
        if epoch == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        pretrain(cfg, tmp_path / "b", progress=False, on_epoch_end=stop_after_first)
    assert load_checkpoint(tmp_path / "b" / CHECKPOINT)["epoch"] == 1
    resumed = pretrain(cfg, tmp_path / "b", resume=True, progress=False)
    assert state_equal(resumed.method.state_dict(), straight.method.state_dict())
    losses = lambda d: [json.loads(l)["loss"] for l in (d / METRICS).read_text().splitlines()]
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_resume_refuses_a_different_config(tiny_config, tmp_path):
    pretrain(tiny_config, tmp_path, progress=False)
    before = (tmp_path / CHECKPOINT).read_bytes()
    with pytest.raises(UserError, match="epochs: run has 2, asked 5"):
        pretrain(replace(tiny_config, epochs=5), tmp_path, resume=True, progress=False)
    assert (tmp_path / CHECKPOINT).read_bytes() == before


def test_existing_run_is_not_overwritten(tiny_config, tmp_path):
    pretrain(tiny_config, tmp_path, progress=False)
    before = (tmp_path / CHECKPOINT).read_bytes()
    with pytest.raises(UserError, match="already holds a run"):
        pretrain(tiny_config, tmp_path, progress=False)
    assert (tmp_path / CHECKPOINT).read_bytes() == before
    pretrain(replace(tiny_config, seed=1), tmp_path, overwrite=True, progress=False)
    assert (tmp_path / CHECKPOINT).read_bytes() != before


def test_non_finite_loss_stops_the_run(tiny_config, tmp_path):
    cfg = replace(tiny_config, optimizer="sgd", lr=1e30, warmup_epochs=0)
    with pytest.raises(RunFailed, match="non-finite.*lower --lr"):
        pretrain(cfg, tmp_path, progress=False)
    assert not (tmp_path / CHECKPOINT).exists()  # nothing written from a diverged epoch


def test_lr_schedule_warmup_then_cosine(tiny_config):
    cfg = replace(tiny_config, epochs=10, warmup_epochs=2, batch_size=256, lr=0.5)
    lrs = lr_schedule(cfg, steps_per_epoch=5)
    assert len(lrs) == 50 and lrs[9] == pytest.approx(0.5)  # peak at the end of warm-up
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10])) and lrs[-1] == 0.0
    assert all(isinstance(x, float) for x in lrs)


def test_epoch_batches_are_disjoint_across_ranks():
    r0 = epoch_batches(100, 20, 3, 0, Distributed(0, 2))
    r1 = epoch_batches(100, 20, 3, 0, Distributed(1, 2))
    assert len(r0) == len(r1) == 5 and all(len(b) == 10 for b in r0 + r1)
    seen = torch.cat(r0 + r1)
    assert len(seen.unique()) == 100
    assert not torch.equal(torch.cat(epoch_batches(100, 20, 4, 0, Distributed())), torch.cat(r0 + r1))


def test_export_writes_a_plain_state_dict(tiny_config, tmp_path):
    from ssl_blood.models import PlainCNN

    pretrain(tiny_config, tmp_path / "run", progress=False)
    info = export_backbone(tmp_path / "run" / CHECKPOINT, tmp_path / "backbone.pt")
    state = torch.load(tmp_path / "backbone.pt", weights_only=True)
    model = PlainCNN()  # what a user without ssl-blood would write (docs/user-guide.md)
    model.load_state_dict(state)
    assert info["backbone"] == "cnn6" and info["parameters"] == sum(p.numel() for p in state.values())


def test_dino_collapse_is_detected():
    from ssl_blood.methods import DINO, DINOConfig
    from ssl_blood.models import build_backbone
    import math

    dino = DINO(build_backbone("cnn6"), DINOConfig(output_dim=64, hidden_dim=32, bottleneck_dim=16), 10)
    uniform = math.log(64)
    for epoch in (1, 2):
        dino._entropy_sums = torch.tensor([uniform, uniform, 1.0])
        dino.check_collapse(uniform, epoch)
    dino._entropy_sums = torch.tensor([uniform, uniform, 1.0])
    with pytest.raises(RunFailed, match="collapsed at epoch 3.*ln\\(output_dim=64\\)"):
        dino.check_collapse(uniform * 1.001, 3)
    healthy = DINO(build_backbone("cnn6"), DINOConfig(output_dim=64, hidden_dim=32, bottleneck_dim=16), 10)
    for epoch in range(1, 6):  # a sharp but diverse teacher is not collapse
        healthy._entropy_sums = torch.tensor([1.0, 3.5, 1.0])
        healthy.check_collapse(2.0, epoch)


# ----------------------------------------------------------------------------- DDP (gloo, 2 CPU ranks)


def _ddp_rank(rank: int, world: int, init_file: str, cfg_dict: dict, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        result = pretrain(PretrainConfig.from_dict(cfg_dict), out, progress=False)
        torch.save(result.method.state_dict(), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", ["simclr", "dino"])
def test_ddp_ranks_end_with_identical_weights(tiny_config, tmp_path, method):
    cfg = replace(tiny_config, method=method, epochs=2, knn_every=-1)
    out = tmp_path / "run"
    mp.spawn(_ddp_rank, args=(2, str(tmp_path / "init"), cfg.to_dict(), str(out)), nprocs=2)
    rank0 = torch.load(out / "rank0.pt", weights_only=True)
    rank1 = torch.load(out / "rank1.pt", weights_only=True)
    assert state_equal(rank0, rank1)
    ckpt = load_checkpoint(out / CHECKPOINT)  # rank 0 wrote the run files
    assert ckpt["epoch"] == 2 and state_equal(ckpt["method"], rank0)
    torch.manual_seed(cfg.seed)  # and training moved the weights away from the initialisation
    from ssl_blood.models import build_backbone

    initial = build_backbone(cfg.backbone).state_dict()
    assert not torch.equal(initial["0.weight"], ckpt["backbone"]["0.weight"])
