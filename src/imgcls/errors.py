"""User mistakes: the one exception type for them, and the one way every entry point ends on one."""

import sys
from typing import NoReturn


class UserError(Exception):
    """A mistake in the user's input (a path, an option, a file) that a message can explain."""


class UsageError(UserError):
    """A command line that does not parse; it ends with exit status 2, argparse's for usage errors."""


def exit_with(error: BaseException, debug: bool = False, message: str | None = None) -> NoReturn:
    """End the program with ``message`` (else ``error``'s own) as one line, ``error: ...``, exit status 1 (2 for a
    ``UsageError``).

    With ``debug`` (the ``--debug`` flag), raise ``error`` instead, with its traceback and its cause.
    """
    if debug:
        raise error
    line = f"error: {' '.join((message or str(error)).split())}"
    if isinstance(error, UsageError):
        print(line, file=sys.stderr)
        sys.exit(2)
    sys.exit(line)
