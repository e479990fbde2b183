"""The pretraining loop: checkpoints, metrics, exact resume, the run folder's lock, crashes,
full disks, non-finite weights, DDP with global BatchNorm."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ssl_blood.model.checkpoint import export_backbone, load_backbone, load_checkpoint
from ssl_blood.training.config import PretrainConfig
from ssl_blood.errors import RunFailed, UserError
from ssl_blood.training.run_dir import RunDir
from ssl_blood.training.loop import pretrain
from tests.conftest import tiny_dino
from tests.helpers import REPO


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def lines(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def test_checkpoint_is_plain_and_loads_weights_only(tiny_config, tmp_path):
    result = pretrain(tiny_config, tmp_path / "run", progress=False)
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["format_version"] == 2 and ckpt["epoch"] == 2 and ckpt["kind"] == "pretrain"
    assert ckpt["dataset"]["num_classes"] == 4 and ckpt["dataset"]["image_size"] == 16
    assert ckpt["backbone_stem"] == "s1" and len(ckpt["history"]) == 2
    assert PretrainConfig.from_dict(ckpt["config"]) == tiny_config
    assert {"backbone", "method", "optimizer", "rng"} <= ckpt.keys()
    restored = load_backbone(tmp_path / "run" / "checkpoint.pt")
    assert state_equal(restored.model.state_dict(), result.backbone.state_dict())
    assert json.loads((tmp_path / "run" / "config.json").read_text())["epochs"] == 2
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint.pt", "config.json",
                                                                    "metrics.jsonl"]


def test_metrics_jsonl_per_epoch(tiny_config, tmp_path):
    pretrain(tiny_config, tmp_path, progress=False)
    records = lines(tmp_path)
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert r["loss"] > 0 and r["img_s"] > 0 and 0 <= r["knn_val_acc"] <= 1
    assert records[0]["lr"] > records[1]["lr"] == 0.0  # cosine decays to zero at the end


def test_lr_is_scaled_by_the_batch_that_runs(tiny_config, tmp_path, capsys):
    cfg = replace(tiny_config, batch_size=10_000, lr=0.6, warmup_epochs=1, epochs=2, knn_every=-1)
    result = pretrain(cfg, None, progress=False)
    assert result.history[0]["lr"] == pytest.approx(0.6 * 64 / 256)  # peak at the end of warm-up
    assert "batch_size 10000 runs as 64" in capsys.readouterr().err


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("method", ["simclr", "dino"])
def test_resume_equals_uninterrupted_run(tiny_config, tmp_path, method):
    cfg = replace(tiny_config if method == "simclr" else tiny_dino(tiny_config), epochs=3)
    straight = pretrain(cfg, tmp_path / "a", progress=False)

    def stop_after_first(epoch, record):
        if epoch == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        pretrain(cfg, tmp_path / "b", progress=False, on_epoch_end=stop_after_first)
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["epoch"] == 1
    resumed = pretrain(cfg, tmp_path / "b", resume=True, progress=False)
    assert state_equal(resumed.method.state_dict(), straight.method.state_dict())
    assert [r["loss"] for r in lines(tmp_path / "a")] == [r["loss"] for r in lines(tmp_path / "b")]


def test_resume_refuses_a_different_config_or_precision(tiny_config, tmp_path):
    pretrain(tiny_config, tmp_path, progress=False)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(UserError, match="epochs: run has 2, asked 5"):
        pretrain(replace(tiny_config, epochs=5), tmp_path, resume=True, progress=False)
    with pytest.raises(UserError, match="`precision` bf16 for a run trained in fp32 changes the results"):
        pretrain(replace(tiny_config, precision="bf16"), tmp_path, resume=True, progress=False)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    pretrain(replace(tiny_config, precision="bf16"), tmp_path, resume=True, force=True, progress=False)


def test_existing_run_is_not_overwritten(tiny_config, tmp_path):
    pretrain(tiny_config, tmp_path, progress=False)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(UserError, match="already holds a run"):
        pretrain(tiny_config, tmp_path, progress=False)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    pretrain(replace(tiny_config, seed=1), tmp_path, overwrite=True, progress=False)
    assert (tmp_path / "checkpoint.pt").read_bytes() != before


def test_run_killed_before_its_first_checkpoint_restarts_without_overwrite(tiny_config, tmp_path):
    def die(epoch, record):
        raise Interrupt

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")  # what a run killed in epoch 1 leaves
    (run / "metrics.jsonl").write_text('{"epoch": 1, "lo')
    pretrain(tiny_config, run, progress=False)
    assert [r["epoch"] for r in lines(run)] == [1, 2]


def test_non_finite_loss_stops_the_run(tiny_config, tmp_path):
    cfg = replace(tiny_config, optimizer="sgd", lr=1e30, warmup_epochs=0)
    with pytest.raises(RunFailed, match="non-finite.*lower `lr`"):
        pretrain(cfg, tmp_path, progress=False)
    assert not (tmp_path / "checkpoint.pt").exists()  # nothing written from a diverged epoch


def test_non_finite_weights_are_never_checkpointed(tiny_config, tmp_path, monkeypatch):
    import ssl_blood.training.loop as train

    runs = []
    real_setup = train._setup
    monkeypatch.setattr(train, "_setup", lambda *a, **k: runs.append(real_setup(*a, **k)) or runs[-1])

    def poison(epoch, record):
        if epoch == 1:  # a NaN the loss does not see (BN running statistics are unused in training)
            torch.nn.init.constant_(runs[0].method.backbone[1].running_var, float("nan"))

    with pytest.raises(RunFailed, match=r"weights became non-finite .*backbone.1.running_var.* last good"):
        pretrain(replace(tiny_config, epochs=3), tmp_path, progress=False, on_epoch_end=poison)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1  # the last good one


def test_a_checkpoint_with_non_finite_weights_is_refused(tiny_config, tmp_path):
    pretrain(tiny_config, tmp_path, progress=False)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    ckpt["backbone"]["0.weight"][0, 0, 0, 0] = float("inf")
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(UserError, match="weights became non-finite .*0.weight"):
        load_checkpoint(tmp_path / "bad.pt")


def test_disk_full_during_a_run_stops_it_and_keeps_the_last_checkpoint(tiny_config, tmp_path, monkeypatch):
    import errno

    cfg = replace(tiny_config, epochs=3)
    real = os.fsync

    def fill_disk(epoch, record):
        if epoch == 1:
            monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(
                OSError(errno.ENOSPC, "No space left on device")))

    with pytest.raises(RunFailed, match="stopped after epoch 2: cannot write .*No space left"):
        pretrain(cfg, tmp_path, progress=False, on_epoch_end=fill_disk)
    monkeypatch.setattr(os, "fsync", real)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_lost_or_torn_metrics_lines_are_repaired_on_resume(tiny_config, tmp_path):
    pretrain(tiny_config, tmp_path, progress=False)
    (tmp_path / "metrics.jsonl").write_text(
        (tmp_path / "metrics.jsonl").read_text().splitlines()[0] + '\n{"epoch": 2, "lo')
    pretrain(tiny_config, tmp_path, resume=True, progress=False)  # finished: nothing to train
    assert [r["epoch"] for r in lines(tmp_path)] == [1, 2]


_CHILD = """
import sys, time, torch
from ssl_blood.training import run_dir as runs
from ssl_blood.training.config import PretrainConfig
from ssl_blood.training.loop import pretrain
real = torch.save
def slow_save(obj, f, *a, **k):  # widen the window a kill can land in
    print("saving", flush=True)
    real(obj, f, *a, **k)
    time.sleep(0.3)
torch.save = slow_save
cfg = PretrainConfig.from_dict(__import__("json").loads(sys.argv[1]))
out = sys.argv[2]
pretrain(cfg, out, resume=runs.RunDir(out).has_checkpoint(), progress=False)
print("done", flush=True)
"""


def test_sigkill_mid_save_always_leaves_a_loadable_checkpoint(tiny_config, tmp_path):
    cfg = replace(tiny_config, epochs=12, knn_every=-1)
    out = tmp_path / "run"
    epochs = []
    for attempt in range(6):
        child = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(cfg.to_dict()), str(out)],
                                 stdout=subprocess.PIPE, text=True, cwd=REPO)
        for _ in range(attempt % 2 + 1):  # the first or the second save
            line = child.stdout.readline()
            if line.strip() != "saving":
                break
        time.sleep(0.05 * (attempt % 3))
        child.send_signal(signal.SIGKILL)
        child.wait()
        if RunDir(out).has_checkpoint():
            epochs.append(load_checkpoint(out / "checkpoint.pt")["epoch"])  # always loads
    assert epochs and epochs == sorted(epochs) and epochs[-1] >= 1
    final = pretrain(cfg, out, resume=True, progress=False)  # and the run can be finished
    assert final.history[-1]["epoch"] == 12 and [r["epoch"] for r in lines(out)] == list(range(1, 13))
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # stale temp files cleaned


def test_two_runs_on_one_folder_the_second_is_refused(tiny_config, tmp_path):
    cfg = replace(tiny_config, epochs=30, knn_every=-1)
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(cfg.to_dict()), str(out)],
                             stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert first.stdout.readline().strip() == "saving"  # it holds the folder
    second = subprocess.run([sys.executable, "-m", "ssl_blood", "pretrain", "--out", str(out),
                             "--resume"], capture_output=True, text=True, cwd=REPO)
    third = subprocess.run([sys.executable, "-m", "ssl_blood", "pretrain", "--out", str(out),
                            "--overwrite", "--npz", cfg.data["path"], "--epochs", "1"],
                           capture_output=True, text=True, cwd=REPO)
    first.kill()
    first.wait()
    for proc in (second, third):
        assert proc.returncode == 2 and f"in use by another ssl-blood process (pid {first.pid})" in proc.stderr
        assert proc.stderr.count("\n") == 1


def test_export_writes_a_plain_state_dict(tiny_config, tmp_path):
    from ssl_blood.model.backbones import PlainCNN

    pretrain(tiny_config, tmp_path / "run", progress=False)
    info = export_backbone(tmp_path / "run" / "checkpoint.pt", tmp_path / "backbone.pt")
    state = torch.load(tmp_path / "backbone.pt", weights_only=True)
    model = PlainCNN()  # what a user without ssl-blood would write (docs/user-guide.md)
    model.load_state_dict(state)
    assert info["backbone"] == "cnn6" and info["parameters"] == sum(p.numel() for p in state.values())


# ----------------------------------------------------------------------------- DDP (gloo, 2 CPU ranks)


def _ddp_rank(rank: int, world: int, init_file: str, cfg_dict: dict, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        result = pretrain(PretrainConfig.from_dict(cfg_dict), out, progress=False)
        bn = [type(m).__name__ for m in result.method.modules() if "BatchNorm" in type(m).__name__]
        torch.save({"state": result.method.state_dict(), "bn": bn}, Path(out) / f"rank{rank}.pt")
        dist.barrier()  # neither rank tears the group down while the other still talks to it
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", ["simclr", "dino"])
def test_ddp_ranks_end_with_identical_weights_and_global_bn(tiny_config, tmp_path, method):
    cfg = replace(tiny_config if method == "simclr" else tiny_dino(tiny_config), epochs=2, knn_every=-1)
    out = tmp_path / "run"
    mp.spawn(_ddp_rank, args=(2, str(tmp_path / "init"), cfg.to_dict(), str(out)), nprocs=2)
    rank0 = torch.load(out / "rank0.pt", weights_only=True)
    rank1 = torch.load(out / "rank1.pt", weights_only=True)
    assert state_equal(rank0["state"], rank1["state"])  # BN running statistics included
    assert rank0["bn"] and all(name.startswith("_GlobalBatchNorm") for name in rank0["bn"])
    ckpt = load_checkpoint(out / "checkpoint.pt")  # rank 0 wrote the run files
    assert ckpt["epoch"] == 2 and state_equal(ckpt["method"], rank0["state"])
    from ssl_blood.model.backbones import build_backbone

    torch.manual_seed(cfg.seed)  # and training moved the weights away from the initialisation
    assert not torch.equal(build_backbone(cfg.backbone).state_dict()["0.weight"], ckpt["backbone"]["0.weight"])


def test_global_batch_norm_equals_one_big_batch(tmp_path):
    """Two gloo ranks with half a batch each normalise exactly as one process with all of it."""
    x = torch.randn(8, 4, 5, 5)
    single = torch.nn.BatchNorm2d(4)
    expected = single(x)
    mp.spawn(_bn_rank, args=(str(tmp_path / "init"), x, str(tmp_path)), nprocs=2)
    halves = [torch.load(tmp_path / f"bn{r}.pt", weights_only=True) for r in (0, 1)]
    assert torch.allclose(torch.cat([h["out"] for h in halves]), expected, atol=1e-5)
    assert torch.allclose(halves[0]["running_var"], single.running_var, atol=1e-6)


def _bn_rank(rank: int, init_file: str, x: torch.Tensor, out: str) -> None:
    from ssl_blood.training.distributed import sync_batch_norm

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        bn = sync_batch_norm(torch.nn.Sequential(torch.nn.BatchNorm2d(4)))[0]
        y = bn(x[rank * 4:(rank + 1) * 4])
        y.sum().backward()
        torch.save({"out": y.detach(), "running_var": bn.running_var}, Path(out) / f"bn{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("optimizer", ["lars", "sgd"])
def test_weights_that_explode_while_the_loss_stays_finite_stop_the_run(tiny_config, tmp_path, optimizer):
    """lr 1e30: the normalised loss stays finite while the weights reach ~1e28; the run must stop
    (exit 1) rather than save weights whose features overflow, and advise only what is not set."""
    cfg = replace(tiny_config, lr=1e30, epochs=1, knn_every=-1, optimizer=optimizer,
                  batch_size=64)  # one step (in warm-up): its loss is computed before the update
    with pytest.raises(RunFailed, match=r"the weights (grew to|became non-finite).*lower `lr` \(now 1e\+30\)") as err:
        pretrain(cfg, tmp_path / "run", progress=False)
    assert ("use the lars optimizer" in str(err.value)) == (optimizer != "lars")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    with pytest.raises(RunFailed, match="the weights"):
        pretrain(cfg, None, progress=False)  # no run folder: the same check


def test_a_checkpoint_with_absurd_weights_is_refused(tiny_config, tmp_path):
    pretrain(replace(tiny_config, epochs=1, knn_every=-1), tmp_path / "run", progress=False)
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    name = next(k for k, v in ckpt["backbone"].items() if v.is_floating_point() and "running" not in k)
    ckpt["backbone"][name] = ckpt["backbone"][name] * 1e28
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(UserError, match=r"its weights grew to .*diverged run"):
        load_checkpoint(tmp_path / "bad.pt")


def test_minutes_sizes_epochs_from_the_measured_step_time(tiny_config, tmp_path, monkeypatch, capsys):
    """The budget is planned from what was measured here (a step time stubbed to 0.05 s so the
    plan is known): 64 training images, batch 16 -> 4 steps per epoch; a 1-minute budget
    leaves 0.95 x (60 s - the setup, done twice) for 0.2-s epochs."""
    from ssl_blood import ui
    from ssl_blood.training import loop

    monkeypatch.setattr(loop, "_time_steps", lambda run: 0.05)
    monkeypatch.setattr(loop, "_knn_monitor", lambda run: 0.0)
    ui.set_quiet(False)
    cfg = replace(tiny_config, minutes=1.0, knn_every=-1)
    sized = loop.size_to_minutes(cfg, loop.Distributed.setup("cpu"), started=time.monotonic())
    assert 0.95 * 30 / 0.2 <= sized.epochs <= 0.95 * 60 / 0.2 and sized.minutes == 1.0
    assert sized.warmup_epochs == round(tiny_config.warmup_epochs * sized.epochs / tiny_config.epochs)
    note = capsys.readouterr().err
    assert f"{sized.epochs} epochs of 4 steps" in note and "ends around" in note
    with pytest.raises(UserError, match=r"`minutes` 0.001 is too short for one epoch here .* give at least 1 minutes"):
        loop.size_to_minutes(replace(cfg, minutes=0.001), loop.Distributed.setup("cpu"), time.monotonic())
    with pytest.raises(UserError, match="`minutes` -1 must be a positive number"):
        loop.size_to_minutes(replace(cfg, minutes=-1.0), loop.Distributed.setup("cpu"), time.monotonic())


def test_a_run_with_minutes_records_its_budget_and_resumes_without_resizing(tiny_config, tmp_path, monkeypatch):
    from ssl_blood.training import loop

    monkeypatch.setattr(loop, "_time_steps", lambda run: 2.0)  # 8-s epochs in a 30-s budget
    monkeypatch.setattr(loop, "_replan", lambda *a: None)  # tested on its own below
    cfg = replace(tiny_config, minutes=0.5)
    result = pretrain(cfg, tmp_path / "run", progress=False)
    saved = PretrainConfig.load(tmp_path / "run" / "config.json")
    assert saved.minutes == 0.5 and saved.epochs == len(result.history) >= 1
    monkeypatch.setattr(loop, "_time_steps", lambda run: pytest.fail("a resumed run is not re-sized"))
    pretrain(saved, tmp_path / "run", resume=True, progress=False)  # finished: nothing to train


def test_minutes_and_epochs_together_are_refused(tmp_path, capsys):
    from tests.helpers import assert_one_line_error, make_npz, run_cli

    npz = make_npz(tmp_path / "c.npz")
    code, _, err = run_cli(capsys, "pretrain", "--npz", npz, "--minutes", "5", "--epochs", "3",
                           "--out", tmp_path / "run")
    assert_one_line_error(code, err, r"give --epochs or --minutes, not both")
    assert not (tmp_path / "run").exists()


def test_minutes_measures_real_steps_even_on_a_folder_smaller_than_its_batches(tiny_config):
    """4 steps per epoch, 10 steps to time: the measurement runs over several epochs' batches."""
    from ssl_blood.training import loop

    probe = loop._setup(replace(tiny_config, minutes=None), None, loop.Distributed.setup("cpu"), False, False)
    assert probe.steps_per_epoch < loop.MEASURE_STEPS + 2
    assert 0 < loop._time_steps(probe) < 60
    sized = loop.size_to_minutes(replace(tiny_config, minutes=10.0), loop.Distributed.setup("cpu"), time.monotonic())
    assert sized.epochs >= 1


def test_the_first_epochs_real_time_replans_the_rest(tmp_path):
    """Planned 27 epochs, but the first took 10 s with 100 s left: 1 + 0.95 x 100 // 10 = 10
    epochs; the schedule, the bar and config.json follow."""
    from types import SimpleNamespace

    from ssl_blood.training import loop

    cfg = replace(PretrainConfig(), epochs=27, warmup_epochs=3, minutes=15.0)
    run_dir = RunDir(tmp_path)
    run = SimpleNamespace(cfg=cfg, batch_size=256, steps_per_epoch=11, run_dir=run_dir,
                          ddp=SimpleNamespace(is_main=True), schedule=[0.0] * 297)
    bar = SimpleNamespace(total=297)
    loop._replan(run, time.monotonic() + 100.0, 10.0, bar)
    assert run.cfg.epochs == 10 and run.cfg.warmup_epochs == 3
    assert len(run.schedule) == bar.total == 110
    assert PretrainConfig.load(run_dir.config).epochs == 10
