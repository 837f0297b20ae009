"""The one exception type for mistakes a user can fix (bad config, bad data, bad paths).

Commands print its message without a traceback and exit non-zero; anything else is a bug and
keeps its traceback.
"""


class TfkarpaError(Exception):
    """A problem with the user's input, stated so they can act on it."""
