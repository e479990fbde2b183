"""Exceptions the command line turns into one-line messages.

`UserError` is a problem with the user's input (a bad path, file, or argument): the CLI prints
its message on one line and exits with code 2. `RunFailed` is a run that stopped for a reason
the user can act on (a non-finite loss, a collapsed DINO head): one line, exit code 1.
Everything else is a bug and keeps its traceback.
"""


class SslBloodError(Exception):
    """Base class of the errors ssl-blood reports without a traceback."""

    exit_code = 1


class UserError(SslBloodError):
    """Bad input: the message names the problem and the fix."""

    exit_code = 2


class RunFailed(SslBloodError):
    """Training stopped on a condition the user can fix (learning rate, temperature...)."""

    exit_code = 1
