"""The one exception type for user mistakes: the entry points print its message on one line and exit."""


class UserError(Exception):
    """A mistake in the user's input (a path, an option, a file) that a message can explain."""
