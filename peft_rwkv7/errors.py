"""The one exception type users see as a one-line message (the CLI prints it without a traceback)."""


class UserError(Exception):
    """Bad input from the user: a file, a field or a value. str(e) is one line naming it."""


class TokenIdError(ValueError):
    """Token ids outside a model's vocabulary, raised where the model reads them (model/rwkv7.py); the CLI names its
    --tokenizer and --model beside the message."""
