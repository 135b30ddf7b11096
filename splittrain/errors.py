"""The exception a user's mistake raises: the command line prints its message as one line, without a traceback."""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in what the user gave (a setting, a file, an address, a token): not a bug in splittrain.

    ``python -m splittrain`` prints ``splittrain: error: <message>`` and exits with status 2; ``--debug`` (or
    ``SPLITTRAIN_DEBUG=1``) shows the traceback instead. A ``ValueError`` so that callers catching those still do.
    """
