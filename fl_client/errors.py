"""The one base of the errors a user causes, and the exit codes of the ``fedyolo`` command.

A user's mistake (a bad config value, a missing dataset, a refused plug-in, a hostile file) is
a ``UserError``: the command line prints its message as one line and exits with its
``exit_code``; anything else is a bug and raises with its traceback. Every package's user-error
classes (``ConfigError``, ``DataError``, ``ModelConfigError``, ``WireError``, ``DeployError``,
``TuningError`` ...) derive from it, keeping their old base (``ValueError``, ``RuntimeError``)
beside it so code that catches those still does. It lives in ``fl_client``, the bottom layer,
so every package may import it (as Optuna's ``OptunaError`` and Flower's ``ExitCode``).
"""

from __future__ import annotations

import errno
import os
from enum import IntEnum
from pathlib import Path


class ExitCode(IntEnum):
    """What ``fedyolo <command>`` returns to the shell."""

    OK = 0
    FAILED = 1  # it ran and the outcome is a failure (a run not completed, a rejected bundle)
    USER_ERROR = 2  # a UserError, a full disk, a command line argparse refused
    ISSUES_FOUND = 3  # ``fedyolo data check`` found bad images or labels
    INTERRUPTED = 130  # Ctrl-C


class UserError(Exception):
    """A mistake the user can fix; the message is one line naming the thing and what to do."""

    exit_code: ExitCode = ExitCode.USER_ERROR


class ModelConfigError(UserError, ValueError):
    """A model (setting or file) that cannot be found, loaded weights-only or built (here, not
    in ``fl_client.model``, so the Ultralytics adapter raises it without importing the model
    module that imports the adapter)."""


class MissingInput(UserError, FileNotFoundError):
    """A file or folder the user named does not exist (still a ``FileNotFoundError``; a
    ``FileNotFoundError`` that is not a ``MissingInput`` is a bug and raises)."""


def existing(path: Path) -> Path:
    """``path`` if it exists; else a ``MissingInput`` worded as the OS words it."""
    if not path.exists():
        raise MissingInput(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
    return path
