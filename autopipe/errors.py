"""The one exception type a user sees: a mistake in how autopipe was called."""


class UserError(Exception):
    """A problem with the model, the inputs or the options, explained in one line.

    The command line prints the message and exits non-zero instead of showing a traceback.
    """
