"""User-facing errors: one clear line, no traceback."""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable


class UserError(Exception):
    """A mistake in the user's input (config, data, command line) that they can fix.

    The message names the file, key or layer, the offending value and the fix.
    """


class JobFailure(Exception):
    """A fault of the job, not of its input: a dead loader worker, a rank that stopped
    answering. One line, exit status 1, so that torchrun or SLURM starts the job again.

    `report`: whether this process prints the line (one per job: the lowest rank that is
    still alive, which is not always rank 0).
    """

    def __init__(self, message: str, report: bool | None = None) -> None:
        super().__init__(message)
        self.report = os.environ.get("RANK", "0") == "0" if report is None else report


def cli_entry(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a command-line main so that a UserError prints one line and exits with status 2,
    a JobFailure one line and status 1, and a reader that stops early (`| head`) ends the output
    quietly, as for `cat`."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except KeyboardInterrupt:  # Ctrl-C: one line, and the shell's status for SIGINT
            if os.environ.get("RANK", "0") == "0":
                print("interrupted (Ctrl-C)", file=sys.stderr)
            return 130
        except UserError as err:
            if os.environ.get("RANK", "0") == "0":  # one line per job, not one per process
                print(f"error: {err}", file=sys.stderr)
            return 2
        except JobFailure as err:
            if err.report:
                print(f"error: {err}", file=sys.stderr, flush=True)
            return 1
        except BrokenPipeError:
            # Nothing more can reach the reader; the interpreter's final flush must not fail.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141  # 128 + SIGPIPE, what a shell reports for a command that met `head`

    return wrapper
