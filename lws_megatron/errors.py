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


def cli_entry(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a command-line main so that a UserError prints one line and exits with status 2,
    and a reader that stops early (`| head`) ends the output quietly, as for `cat`."""

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
        except BrokenPipeError:
            # Nothing more can reach the reader; the interpreter's final flush must not fail.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141  # 128 + SIGPIPE, what a shell reports for a command that met `head`

    return wrapper
