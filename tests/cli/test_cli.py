"""Every bad-input path through the CLI: one line, exit code 2, nothing lost; library messages
reach the user with flags."""

import json
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from ssl_blood.cli import command_names, main
from ssl_blood.device import resolve_device, uses_bf16
from tests.helpers import assert_one_line_error, make_npz, run_cli, tree

TINY = ["--backbone", "cnn6", "--epochs", "1", "--batch-size", "16", "--set", "simclr.projection_hidden_dim=32",
        "--set", "simclr.projection_dim=16", "--knn-every", "-1", "--device", "cpu"]


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
    (["pretrain", "--backbone", "vgg11", "--npz", "{npz}"], r"invalid choice: 'vgg11'"),
    (["pretrain", "--npz", "{tmp}/missing.npz"], r"missing.npz: no such file"),
    (["pretrain", "--image-dir", "{tmp}/empty"], r"no images"),
    (["pretrain", "--npz", "{npz}", "--epochs", "0"], r"--epochs 0 must be at least 1"),
    (["pretrain", "--npz", "{npz}", "--lr", "inf"], r"--lr inf must be a finite positive number"),
    (["pretrain", "--npz", "{npz}", "--set", "augment.nonsense=1"], r"--set augment.nonsense: no such setting"),
    (["pretrain", "--npz", "{npz}", "--set", "epochs=abc"], r'--set epochs="abc" is not a valid int'),
    (["pretrain", "--npz", "{npz}", "--set", "dino.output_dim=5"], r"--set dino.output_dim: 'dino' is not a config section \(this run's method is simclr\)"),
    (["pretrain", "--npz", "{npz}", "--set", "augment.hflip=2"], r"--set augment.hflip=2 is a probability"),
    (["pretrain", "--npz", "{npz}", "--size", "300"], r"--size 300 is outside 16-256"),
    (["pretrain", "--data-root", "{tmp}/badroot"], r"MD5 .* download it again"),
    (["pretrain", "--data-root", "{tmp}/typo"], r"--data-root .*typo: no such folder"),
    (["pretrain", "--npz", "{npz}", "--out", "{npz}"], r"--out .*cells.npz is a file"),
    (["export", "--checkpoint", "{tmp}/missing.pt", "--out", "{tmp}/b.pt"], r"no such file"),
    (["export", "--checkpoint", "{npz}", "--out", "{tmp}/b.pt"], r"cannot read --checkpoint .*cells.npz"),
])
def test_bad_input_is_one_line_exit_2(capsys, tmp_path, synthetic_npz, argv, pattern):
    (tmp_path / "empty").mkdir()
    (tmp_path / "badroot").mkdir()
    (tmp_path / "badroot" / "bloodmnist.npz").write_bytes(synthetic_npz.read_bytes())
    argv = [a.format(tmp=tmp_path, npz=synthetic_npz) for a in argv]
    extra = TINY + ["--out", str(tmp_path / "run")] if argv[0] == "pretrain" else []
    before = synthetic_npz.read_bytes()
    code, _, err = run_cli(capsys, argv[0], *extra, *argv[1:])  # the case's flags win
    assert_one_line_error(code, err, pattern)
    assert not (tmp_path / "run").exists()  # a refused run leaves nothing behind
    assert not (tmp_path / "typo").exists() and synthetic_npz.read_bytes() == before


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
    before = tree(trained_run)
    code, _, err = run_cli(capsys, "pretrain", "--npz", synthetic_npz, "--out", trained_run, *TINY)
    assert_one_line_error(code, err, r"--out .* already holds a run .* --resume it, --overwrite it")
    assert tree(trained_run) == before


def test_resume_with_incompatible_config_refused_and_kept(capsys, trained_run):
    before = tree(trained_run)
    code, _, err = run_cli(capsys, "pretrain", "--out", trained_run, "--resume", "--batch-size", "8")
    assert_one_line_error(code, err, r"--resume with a different config \(batch_size: run has 16, asked 8\)")
    code, _, err = run_cli(capsys, "pretrain", "--out", trained_run, "--resume", "--precision", "fp32")
    if uses_bf16(resolve_device("auto"), "auto"):  # fp32 would change the results
        assert_one_line_error(code, err, r"--precision fp32 for a run trained in auto changes the results; .*--force")
    else:  # auto is fp32 on this CPU: the same computation, and the run is finished
        assert code == 0 and "error" not in err
    code, _, err = run_cli(capsys, "pretrain", "--out", trained_run.parent / "none", "--resume")
    assert_one_line_error(code, err, r"--resume: no checkpoint.pt in .*start a new run")
    assert tree(trained_run) == before


def test_resuming_a_finished_run_trains_nothing(capsys, trained_run, monkeypatch):
    """Training is bitwise reproducible, so equal bytes would not show that nothing ran: no
    training step may run and no run file may be rewritten (same inode and mtime)."""
    from ssl_blood.training import loop

    stats = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in trained_run.iterdir()}
    monkeypatch.setattr(loop, "_train_epoch", lambda *a: pytest.fail("a finished run trained"))
    code, out, err = run_cli(capsys, "pretrain", "--out", trained_run, "--resume")
    assert code == 0 and "epoch 1" in out
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in trained_run.iterdir()} == stats


def test_json_output_has_no_progress_bars(capsys, trained_run, tmp_path, monkeypatch):
    """On a terminal the same command draws bars (the control); with --json it draws none."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    code, _, err = run_cli(capsys, "linear-probe", "--checkpoint", trained_run / "checkpoint.pt",
                           "--out", tmp_path / "bars")
    assert code == 0 and "\r" in err
    code, out, err = run_cli(capsys, "linear-probe", "--checkpoint", trained_run / "checkpoint.pt",
                             "--json", "--out", tmp_path / "lp")
    assert code == 0 and json.loads(out)["test_acc"] >= 0 and "\r" not in err


def test_export_refuses_to_overwrite(capsys, trained_run, tmp_path):
    target = tmp_path / "backbone.pt"
    target.write_bytes(b"keep me")
    code, _, err = run_cli(capsys, "export", "--checkpoint", trained_run / "checkpoint.pt", "--out", target)
    assert_one_line_error(code, err, r"--out .*backbone.pt exists; set --overwrite")
    assert target.read_bytes() == b"keep me"
    code, out, _ = run_cli(capsys, "export", "--checkpoint", trained_run / "checkpoint.pt",
                           "--out", target, "--overwrite")
    assert code == 0 and "cnn6 (stem s1) state_dict" in out


def test_real_process_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ssl_blood", "pretrain", "--npz",
                           str(tmp_path / "nope.npz"), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()


def test_library_messages_name_parameters_and_the_cli_names_flags(tmp_path):
    from ssl_blood.cli import _subparser, build_parser
    from ssl_blood.cli.common import as_flags as _as_flags
    from ssl_blood.errors import UserError
    from ssl_blood.features.index import CellIndex

    with pytest.raises(UserError) as err:
        CellIndex.build(np.zeros((100, 8), np.float32), kind="ivf", nlist=500)
    assert str(err.value).startswith("`nlist` 500")  # what a Python caller passed
    parser = build_parser()
    assert _as_flags(err.value, _subparser(parser, "index")).startswith("--nlist 500")
    assert _as_flags(UserError("`augment.hue`=3 is too much"), _subparser(parser, "pretrain")) == \
        "--set augment.hue=3 is too much"
    assert _as_flags(UserError("`nlist` 5"), _subparser(parser, "knn")) == "nlist 5"  # no such flag


@pytest.mark.parametrize("command", command_names())
def test_every_command_has_help(capsys, command):
    """Each command's help, built on its own, documents every flag its parser accepts."""
    from ssl_blood.cli import _subparser, build_parser

    code, out, _ = run_cli(capsys, command, "--help")
    flags = [f for a in _subparser(build_parser(only=command), command)._actions for f in a.option_strings]
    assert code == 0 and out.startswith(f"usage: ssl-blood {command}") and len(flags) > 2
    assert [f for f in flags if f not in out] == []


def test_top_level_help_lists_every_command_without_loading_torch():
    """`ssl-blood --help` builds no command's flags, so none of the heavy libraries loads."""
    from ssl_blood.cli import command_names

    code = ("import sys; from ssl_blood.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('HEAVY', sorted(m for m in ('torch', 'faiss', 'umap', 'bokeh', 'sklearn') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip().endswith("HEAVY []"), done.stdout + done.stderr
    assert all(f"    {name}" in done.stdout for name in command_names())


def test_choices_come_from_the_registries(capsys):
    from ssl_blood.methods import method_names
    from ssl_blood.model.backbones import backbone_names

    _, out, _ = run_cli(capsys, "pretrain", "--help")
    assert all(m in out for m in method_names()) and all(b in out for b in backbone_names())


def test_file_size_limit_at_a_checkpoint_save_is_one_line(tmp_path):
    """`ulimit -f`: the checkpoint write fails with EFBIG; one line naming the limit, exit 1,
    no traceback, no partial checkpoint."""
    npz = make_npz(tmp_path / "cells.npz")
    script = (f"ulimit -f 64; exec {sys.executable} -m ssl_blood pretrain --npz {npz} --backbone "
              f"cnn6 --epochs 1 --batch-size 32 --device cpu --out {tmp_path / 'run'} --knn-every -1")
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stderr.strip().splitlines() if line.startswith("ssl-blood pretrain")]
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and len(lines) == 1
    assert re.search(r"File too large.*ulimit -f", lines[0]), lines
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_pretraining_says_how_to_resume_and_releases_the_folder(tmp_path, sig):
    """Ctrl-C and `kill` alike: exit 1, one line naming the signal and the resume command, the
    last checkpoint kept and loadable, no .lock or temporary file left."""
    npz = make_npz(tmp_path / "cells.npz")
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "ssl_blood", "pretrain", "--npz", str(npz), "--backbone", "cnn6",
            "--epochs", "400", "--batch-size", "16", "--device", "cpu", "--out", str(out),
            "--knn-every", "-1"]
    # as from a terminal: a suite started in the background (`pytest &`) passes its children
    # SIGINT ignored, and Python then never turns Ctrl-C into KeyboardInterrupt
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pt").is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (out / "checkpoint.pt").is_file(), child.communicate()[1]
    child.send_signal(sig)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 1, err
    lines = [line for line in err.strip().splitlines() if line.startswith("ssl-blood pretrain")]
    assert "Traceback" not in err and len(lines) == 1
    assert f"stopped by {sig.name}" in lines[0] and f"ssl-blood pretrain --out {out} --resume" in lines[0]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "config.json", "metrics.jsonl"]
    epochs = torch.load(out / "checkpoint.pt", weights_only=True)["epoch"]
    assert 1 <= epochs < 400


@pytest.mark.parametrize("command", [["linear-probe"], ["umap"], ["explore"]])
def test_unwritable_out_is_refused_before_any_work(command, tiny_embeddings, tmp_path, capsys, monkeypatch):
    """--out under a file: refused before the embeddings are even read (they used to be probed,
    or UMAP-embedded, for 40 s first)."""
    from ssl_blood.features.embeddings import Embeddings

    (tmp_path / "afile").write_text("x")
    monkeypatch.setattr(Embeddings, "load", classmethod(lambda *a, **k: pytest.fail("work started")))
    code, _, err = run_cli(capsys, *command, "--embeddings", tiny_embeddings, "--out",
                           tmp_path / "afile" / "out")
    assert_one_line_error(code, err, r"--out .*afile is a file, not a folder")
    assert (tmp_path / "afile").read_text() == "x"


def test_json_silences_progress_for_that_command_only(tmp_path, capsys):
    """main(..., --json) from Python must not leave later calls silent."""
    from ssl_blood import ui
    from ssl_blood.cli import main

    assert not ui.is_quiet()
    assert main(["knn", "--embeddings", str(tmp_path / "missing.npz"), "--json"]) == 2
    assert not ui.is_quiet()
    capsys.readouterr()


def test_notes_name_this_command_s_flags_and_python_keeps_parameter_names(tmp_path, capsys):
    """A note quoting a parameter reads as the command's flag on the command line (as errors
    do), and as the parameter again for a Python caller after the command."""
    from ssl_blood import ui
    from tests.helpers import write_png

    for i in range(4):
        write_png(tmp_path / "cells" / f"c{i}.png", np.full((20, 20, 3), 50 * i, np.uint8))
    assert main(["embed", "--baseline", "pixels", "--image-dir", str(tmp_path / "cells"), "--cache-dir",
                 "none", "--out", str(tmp_path / "e.npz")]) == 0
    assert "--size chooses another" in capsys.readouterr().err
    ui.note("`size` chooses another")
    assert "`size` chooses another" in capsys.readouterr().err
