"""User mistakes: the one exception type for them, and the one way every entry point ends on one."""

import sys
from typing import NoReturn


class UserError(Exception):
    """A mistake in the user's input (a path, an option, a file) that a message can explain."""


def exit_with(error: BaseException, debug: bool = False, message: str | None = None) -> NoReturn:
    """End the program with ``message`` (else ``error``'s own) as one line, ``error: ...``, exit status 1.

    With ``debug`` (the ``--debug`` flag), raise ``error`` instead, with its traceback and its cause.
    """
    if debug:
        raise error
    sys.exit(f"error: {' '.join((message or str(error)).split())}")
