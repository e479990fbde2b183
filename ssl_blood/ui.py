"""What a long step shows a person: tqdm progress bars and one-line notes on stderr.

On a terminal a long step draws a tqdm bar. Off a terminal (a pipe, a log file, a scheduler)
it prints a plain line at most every PLAIN_EVERY seconds (what, how far, rate, time left, the
latest numbers), so a log shows progress without carriage returns. Nothing with `--json`
(`set_quiet(True)`), so scripted output stays clean; notes (a cache used, a file skipped, a
setting chosen for you) always go to stderr.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, Iterable

_quiet = False
_wording: Callable[[str], str] | None = None  # how notes name parameters (the CLI: as its flags)


def is_quiet() -> bool:
    return _quiet


def set_quiet(quiet: bool) -> None:
    """Turn progress bars off for the rest of the process (the CLI does this for --json)."""
    global _quiet
    _quiet = quiet


PLAIN_EVERY = 25.0  # seconds between progress lines off a terminal: 25 keeps gaps under 30 s with steps up to 5 s
ENV_PROGRESS_EVERY = "SSL_BLOOD_PROGRESS_EVERY"  # overrides PLAIN_EVERY (e.g. 5 for a busy log)


def bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
        unit: str = "it", enabled: bool | None = None, **kwargs: Any):
    """A tqdm bar on a terminal (or when `enabled` is True); off a terminal, with `enabled`
    None, plain progress lines (`PlainProgress`); nothing when quiet or `enabled` is False."""
    from tqdm.auto import tqdm

    if _quiet or enabled is False:
        return tqdm(iterable, total=total, disable=True)
    if enabled is None and not sys.stderr.isatty():
        return PlainProgress(iterable, total=total, desc=desc, unit=unit)
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True,
                **kwargs)


class PlainProgress:
    """tqdm's interface (iterate, update, set_description, set_postfix, close) as a line on
    stderr at most every PLAIN_EVERY seconds: written because tqdm off a terminal either prints
    nothing (disabled) or floods a log with carriage-return frames."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "",
                 unit: str = "it", every: float | None = None):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        if every is None:
            every = float(os.environ.get(ENV_PROGRESS_EVERY) or PLAIN_EVERY)
        self.every = every
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            self.total = len(iterable)  # type: ignore[arg-type]
        self.n, self.postfix = 0, ""
        self.started = self.last = time.monotonic()

    def __iter__(self):
        for item in self.iterable or ():
            yield item
            self.update(1)

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            print(f"ssl-blood: {self.line(now)}", file=sys.stderr, flush=True)

    def line(self, now: float) -> str:
        elapsed = max(now - self.started, 1e-9)
        rate = self.n / elapsed
        done = f"{self.n}/{self.total} {self.unit} ({self.n / self.total:.0%})" if self.total else f"{self.n} {self.unit}"
        left = ""
        if self.total and rate > 0:
            remaining = (self.total - self.n) / rate
            left = f", about {remaining / 60:.1f} min left (ends ~{time.strftime('%H:%M', time.localtime(time.time() + remaining))})"
        return f"{self.desc}: {done}, {rate:.2f} {self.unit}/s{left}{', ' + self.postfix if self.postfix else ''}"

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def close(self) -> None:
        pass


def set_wording(wording: Callable[[str], str] | None) -> Callable[[str], str] | None:
    """Rewrite every note with `wording` (the CLI writes the `parameters` a note quotes as its
    command's flags, as it does for errors); returns the one it replaces."""
    global _wording
    previous, _wording = _wording, wording
    return previous


def note(message: str) -> None:
    """One line on stderr, prefixed like every ssl-blood message."""
    print(f"ssl-blood: {_wording(message) if _wording else message}", file=sys.stderr, flush=True)
