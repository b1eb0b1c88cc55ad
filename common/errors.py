"""The exceptions of the one-line error contract (``common.cli.run`` prints a ``UserError`` as one line and exits
with status 2). They live below every other module of common/, so that any of them, ``common.dist`` included,
can raise one without importing ``common.cli``, which imports ``common.dist``.
"""


class UserError(Exception):
    """An error in the user's input: printed as one line, no traceback."""


class Unavailable(UserError):
    """An external resource the run needs (e.g. downloadable weights) cannot be had here: the run is
    reported as skipped, with the reason, rather than as failed."""
