"""`RunDir`: the files of one run folder (checkpoint, config, metrics log, eval and analysis
folders) and the rules for starting, resuming and overwriting a run in it."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from ssl_blood.errors import UserError
from ssl_blood.files import FolderLock, _write_error, write_text



class RunDir:
    """The files of one run folder (pretraining, supervised or fine-tuning)."""

    CHECKPOINT = "checkpoint.pt"
    CONFIG = "config.json"
    METRICS = "metrics.jsonl"
    EVAL = "eval"
    ANALYSIS = "analysis"
    REPORT = "report.html"
    SUPERVISED = "supervised.json"
    FINE_TUNE = "fine_tune.json"
    UNREADABLE = "unreadable_images.txt"  # images of the data that could not be read
    RUN_FILES = (CHECKPOINT, CONFIG, METRICS, UNREADABLE)

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def checkpoint(self) -> Path:
        return self.path / self.CHECKPOINT

    @property
    def config(self) -> Path:
        return self.path / self.CONFIG

    @property
    def metrics(self) -> Path:
        return self.path / self.METRICS

    @property
    def eval_dir(self) -> Path:
        return self.path / self.EVAL

    @property
    def analysis_dir(self) -> Path:
        return self.path / self.ANALYSIS

    @property
    def report(self) -> Path:
        return self.path / self.REPORT

    def lock(self) -> FolderLock:
        return FolderLock(self.path)

    def has_checkpoint(self) -> bool:
        return self.checkpoint.is_file()

    def check_new_or_resume(self, resume: bool, overwrite: bool) -> None:
        """Refuse to clobber a run: a folder holding a checkpoint needs `resume` or `overwrite`.
        A run killed before its first checkpoint holds no result and may simply be restarted."""
        if resume and overwrite:
            raise UserError("give `resume` or `overwrite`, not both", param=("resume", "overwrite"))
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"`out` {self.path} is a file; give a folder for the run", param="out")
        if resume:
            if not self.has_checkpoint():
                raise UserError(f"`resume`: no {self.CHECKPOINT} in {self.path}; start a new run "
                                f"(without resuming)", param="resume")
            return
        if self.has_checkpoint() and not overwrite:
            raise UserError(f"`out` {self.path} already holds a run ({self.CHECKPOINT}); `resume` "
                            f"it, `overwrite` it, or choose another folder",
                            param=("out", "resume", "overwrite"))

    def remove_stale_temps(self) -> None:
        """Temporary files a killed writer left (SIGKILL cannot be caught); call under the lock."""
        for tmp in self.path.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()

    def clear_run_files(self) -> None:
        """Remove the run files this folder holds (before a new run), nothing else."""
        for name in self.RUN_FILES:
            with contextlib.suppress(FileNotFoundError):
                (self.path / name).unlink()

    # -- metrics.jsonl: a readable log; the checkpoint's history is the truth -----------

    def write_metrics(self, history: list[dict]) -> None:
        write_text(self.metrics, _jsonl(history))

    def repair_metrics(self, history: list[dict]) -> None:
        """Rewrite metrics.jsonl only where it differs from `history` (lost or torn lines)."""
        expected = _jsonl(history)
        if not self.metrics.is_file() or self.metrics.read_text(errors="replace") != expected:
            write_text(self.metrics, expected)

    def append_metrics(self, record: dict) -> None:
        try:
            with open(self.metrics, "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise _write_error(self.metrics, exc) from None

    def read_metrics(self) -> list[dict]:
        """metrics.jsonl, ignoring a torn (partly written) last line."""
        if not self.metrics.is_file():
            return []
        records = []
        for line in self.metrics.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "epoch" in record:
                records.append(record)
        return records


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)
