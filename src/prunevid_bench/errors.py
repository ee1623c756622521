"""The one error type users can cause; the CLI prints it on one line and exits non-zero."""


class PruneVidError(Exception):
    """A problem with the user's input (file, config, model name) that they can fix.

    The message says what is wrong and what to do; it never needs a traceback.
    """
