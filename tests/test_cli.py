"""Every bad-input path of pretrain/export through the CLI: one line, exit code 2, nothing lost."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ssl_blood.cli import main
from tests.conftest import make_npz

TINY = ["--backbone", "cnn6", "--epochs", "1", "--batch-size", "16", "--set", "simclr.projection_hidden_dim=32",
        "--set", "simclr.projection_dim=16", "--knn-every", "-1", "--device", "cpu"]


def run_cli(capsys, *argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit:  # argparse errors
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, pattern):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    import re

    assert re.search(pattern, lines[0]), lines[0]


@pytest.fixture
def trained_run(tmp_path, synthetic_npz, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, "pretrain", "--npz", synthetic_npz, "--out", out, *TINY)
    assert code == 0, err
    assert "saved" in stdout
    return out


def test_pretrain_quick_run_and_python_m(trained_run):
    assert (trained_run / "checkpoint.pt").exists() and (trained_run / "config.json").exists()
    help_text = subprocess.run([sys.executable, "-m", "ssl_blood", "pretrain", "--help"],
                               capture_output=True, text=True, check=True).stdout
    assert "--method" in help_text and "--resume" in help_text


@pytest.mark.parametrize("argv, pattern", [
    (["pretrain", "--method", "byol"], r"invalid choice: 'byol'"),
    (["pretrain", "--preset", "huge"], r"invalid choice: 'huge'"),
    (["pretrain", "--backbone", "vgg11", "--npz", "{npz}"], r"unknown backbone 'vgg11'"),
    (["pretrain", "--npz", "{tmp}/missing.npz"], r"missing.npz: no such file"),
    (["pretrain", "--image-dir", "{tmp}/empty"], r"no images"),
    (["pretrain", "--npz", "{npz}", "--epochs", "0"], r"--epochs 0 must be at least 1"),
    (["pretrain", "--npz", "{npz}", "--set", "augment.nonsense=1"], r"no such setting"),
    (["pretrain", "--data-root", "{tmp}/badroot"], r"MD5 .* download it again"),
    (["export", "--checkpoint", "{tmp}/missing.pt", "--out", "{tmp}/b.pt"], r"no such file"),
    (["export", "--checkpoint", "{npz}", "--out", "{tmp}/b.pt"], r"cannot read checkpoint"),
])
def test_bad_input_is_one_line_exit_2(capsys, tmp_path, synthetic_npz, argv, pattern):
    (tmp_path / "empty").mkdir()
    (tmp_path / "badroot").mkdir()
    (tmp_path / "badroot" / "bloodmnist.npz").write_bytes(synthetic_npz.read_bytes())
    argv = [a.format(tmp=tmp_path, npz=synthetic_npz) for a in argv]
    extra = TINY + ["--out", str(tmp_path / "run")] if argv[0] == "pretrain" else []
    code, _, err = run_cli(capsys, argv[0], *extra, *argv[1:])  # the case's flags win
    assert_one_line_error(code, err, pattern)
    assert not (tmp_path / "run").exists()  # a refused run leaves nothing behind


@pytest.mark.parametrize("mutation, pattern", [
    ("truncate", r"truncated"),
    ("float", r"dtype float64; images must be uint8"),
    ("shape", r"expected \(N, H, W\) grayscale or \(N, H, W, 3\) RGB"),
])
def test_bad_npz_through_cli(capsys, tmp_path, mutation, pattern):
    path = make_npz(tmp_path / "cells.npz")
    if mutation == "truncate":
        path.write_bytes(path.read_bytes()[:2000])
    else:
        arrays = dict(np.load(path))
        images = arrays["train_images"]
        arrays["train_images"] = images / 255.0 if mutation == "float" else images[..., None, :2]
        np.savez(path, **arrays)
    code, _, err = run_cli(capsys, "pretrain", "--npz", path, "--out", tmp_path / "run", *TINY)
    assert_one_line_error(code, err, pattern)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_existing_run_refused_and_kept(capsys, trained_run, synthetic_npz):
    before = {p.name: p.read_bytes() for p in trained_run.iterdir()}
    code, _, err = run_cli(capsys, "pretrain", "--npz", synthetic_npz, "--out", trained_run, *TINY)
    assert_one_line_error(code, err, r"already holds a run .* --resume .* --overwrite")
    assert {p.name: p.read_bytes() for p in trained_run.iterdir()} == before


def test_resume_with_incompatible_config_refused_and_kept(capsys, trained_run):
    before = {p.name: p.read_bytes() for p in trained_run.iterdir()}
    code, _, err = run_cli(capsys, "pretrain", "--out", trained_run, "--resume", "--batch-size", "8")
    assert_one_line_error(code, err, r"--resume with a different config \(batch_size: run has 16, asked 8\)")
    code, _, err = run_cli(capsys, "pretrain", "--out", trained_run.parent / "none", "--resume")
    assert_one_line_error(code, err, r"no checkpoint.pt in .*drop --resume")
    assert {p.name: p.read_bytes() for p in trained_run.iterdir()} == before


def test_resume_continues_with_the_saved_config(capsys, trained_run):
    code, out, err = run_cli(capsys, "pretrain", "--out", trained_run, "--resume")
    assert code == 0 and "epoch 1" in out  # already finished: nothing more to train


def test_export_refuses_to_overwrite(capsys, trained_run, tmp_path):
    target = tmp_path / "backbone.pt"
    target.write_bytes(b"keep me")
    code, _, err = run_cli(capsys, "export", "--checkpoint", trained_run / "checkpoint.pt", "--out", target)
    assert_one_line_error(code, err, r"exists; add --overwrite")
    assert target.read_bytes() == b"keep me"
    code, out, _ = run_cli(capsys, "export", "--checkpoint", trained_run / "checkpoint.pt",
                           "--out", target, "--overwrite")
    assert code == 0 and "cnn6 state_dict" in out


def test_real_process_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ssl_blood", "pretrain", "--npz",
                           str(tmp_path / "nope.npz"), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()
