"""Atomic writes, the folder lock and the run folder's files."""

import errno
import json
import os
import subprocess
import sys

import pytest

from ssl_blood.errors import UserError
from ssl_blood.files import FolderLock, atomic_write, write_json, write_text
from ssl_blood.training.run_dir import RunDir


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a" / "result.json"
    write_json({"x": 1}, target)
    write_json({"x": 2}, target)
    assert json.loads(target.read_text()) == {"x": 2}
    assert leftovers(target.parent) == []


def test_failed_write_keeps_old_file_and_removes_temp(tmp_path):
    target = tmp_path / "result.json"
    write_text(target, "old")

    def half_then_fail(f):
        f.write(b"new but incomplete")
        raise RuntimeError("writer crashed")

    with pytest.raises(RuntimeError):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old" and leftovers(tmp_path) == []


def test_disk_full_is_one_clear_error_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint.pt"
    write_text(target, "previous checkpoint")
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(UserError, match=r"No space left on device.*free disk space"):
        write_text(target, "x" * 10_000)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert target.read_text() == "previous checkpoint" and leftovers(tmp_path) == []


def test_disk_full_on_a_real_small_filesystem(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        write_text(mount / "keep.txt", "kept")
        with pytest.raises(UserError, match="No space left"):
            write_text(mount / "big.bin", "x" * 200_000)
        assert (mount / "keep.txt").read_text() == "kept"
        assert sorted(p.name for p in mount.iterdir()) == ["keep.txt"]
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def test_read_only_folder_and_file_in_the_way(tmp_path):
    if os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o500)
        with pytest.raises(UserError, match="cannot write"):
            write_text(folder / "x.json", "{}")
    (tmp_path / "afile").write_text("I am a file")
    with pytest.raises(UserError, match="is a file, not a folder"):
        write_text(tmp_path / "afile" / "x.json", "{}")
    with pytest.raises(UserError, match="is a folder"):
        write_text(tmp_path, "{}")


def test_lock_refuses_a_second_writer_with_the_holder_pid(tmp_path):
    with FolderLock(tmp_path / "run"):
        assert (tmp_path / "run" / ".lock").read_text().strip() == str(os.getpid())
        with pytest.raises(UserError, match=rf"in use by another ssl-blood process \(pid {os.getpid()}\)"):
            FolderLock(tmp_path / "run").acquire()
    assert not (tmp_path / "run").exists()  # created by the lock, empty: removed again
    with FolderLock(tmp_path / "run"):  # free again
        pass


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from ssl_blood.files import FolderLock; "
        f"FolderLock({str(folder)!r}).acquire(); print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(UserError, match=f"pid {holder.pid}"):
        FolderLock(folder).acquire()
    holder.kill()
    holder.wait()
    assert (folder / ".lock").read_text().strip() == str(holder.pid)  # stale file left behind
    with FolderLock(folder):  # the kernel released the dead holder's flock
        assert (folder / ".lock").read_text().strip() == str(os.getpid())


def test_stale_lock_file_with_dead_pid_is_taken_over(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / ".lock").write_text("999999\n")  # left by a process that no longer exists
    with FolderLock(folder):
        assert (folder / ".lock").read_text().strip() == str(os.getpid())


def test_torn_metrics_line_is_ignored(tmp_path):
    run = RunDir(tmp_path)
    run.write_metrics([{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 1.5}])
    with open(run.metrics, "a") as f:
        f.write('{"epoch": 3, "lo')  # killed mid-append
    assert [r["epoch"] for r in run.read_metrics()] == [1, 2]


def test_run_folder_policy(tmp_path):
    run = RunDir(tmp_path / "run")
    run.check_new_or_resume(resume=False, overwrite=False)  # nothing there: fine
    with pytest.raises(UserError, match="no checkpoint.pt"):
        run.check_new_or_resume(resume=True, overwrite=False)
    run.path.mkdir()
    (run.path / "config.json").write_text("{}")  # killed before its first checkpoint
    run.check_new_or_resume(resume=False, overwrite=False)  # may simply be restarted
    run.checkpoint.write_bytes(b"ckpt")
    with pytest.raises(UserError, match="already holds a run"):
        run.check_new_or_resume(resume=False, overwrite=False)
    with pytest.raises(UserError, match="`resume` or `overwrite`, not both"):
        run.check_new_or_resume(resume=True, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        RunDir(tmp_path / "file").check_new_or_resume(False, False)
