"""The one exception type users see as a one-line message (the CLI prints it without a traceback)."""


class UserError(Exception):
    """Bad input from the user: a file, a field or a value. str(e) is one line naming it."""
