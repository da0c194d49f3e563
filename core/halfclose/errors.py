"""Errors that are the user's to fix.

A ``UserError`` reaches the person as one line on stderr and exit status 2
(design.md §4); anything else is a bug and keeps its traceback.  Raise it
before changing anything, so bad input never leaves a half-done change.
"""


class UserError(Exception):
    """Bad input or an unusable environment: a missing netns, not root, ..."""

    exit_code = 2
