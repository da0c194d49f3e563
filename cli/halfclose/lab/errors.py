"""The lab's one error type."""

from halfclose.errors import UserError


class LabError(UserError):
    """The lab cannot do what was asked: not root, a tool missing, a lab already up, ...

    A ``UserError``: the CLI prints it as one line and exits 2.  Raised before
    anything is changed where that is possible; when a build step fails
    half-way, ``Lab.up`` tears down what it made before raising it.
    """
