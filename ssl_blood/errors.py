"""Exceptions the command line turns into one-line messages.

`UserError` is a problem with the user's input (a bad path, file, or argument): the CLI prints
its message on one line and exits with code 2. `RunFailed` is a run that stopped for a reason
the user can act on (a non-finite loss, a collapsed DINO head, a full disk): one line, exit
code 1. Everything else is a bug and keeps its traceback.

Library messages quote the Python parameters they are about in backticks ("`nlist` 5000
exceeds ..."), so a Python caller is told about the argument it passed; the CLI writes each as
its flag ("--nlist 5000 exceeds ..."). `params` lists them for programs.
"""

from __future__ import annotations


class SslBloodError(Exception):
    """Base class of the errors ssl-blood reports without a traceback."""

    exit_code = 1

    def __init__(self, message: str, param: str | tuple[str, ...] | None = None):
        super().__init__(message)
        self.params: tuple[str, ...] = (param,) if isinstance(param, str) else tuple(param or ())


class UserError(SslBloodError):
    """Bad input: the message names the problem and the fix."""

    exit_code = 2


class RunFailed(SslBloodError):
    """A run stopped on a condition the user can fix (learning rate, temperature, disk...)."""

    exit_code = 1
