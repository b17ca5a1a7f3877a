"""The one exception type users see as a one-line message (the CLI prints it without a traceback)."""


class UserError(Exception):
    """Bad input from the user: a file, a field or a value. str(e) is one line naming it."""


class Interrupted(UserError):
    """A Ctrl-C the command stopped for in good order (training: after saving its completed steps); str(e) is one
    line saying where it stopped and how to go on. The CLI exits with the interrupted status, as for a bare Ctrl-C."""


class TokenIdError(ValueError):
    """Token ids outside a model's vocabulary, raised where the model reads them (model/rwkv7.py); the CLI names its
    --tokenizer and --model beside the message."""
