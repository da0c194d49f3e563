"""One failure -> one ``reason`` label of ``halfclose_scan_errors_total`` (docs/metrics.md).

The only place an exception is turned into a metric reason, so the alert
(``HalfcloseScanErrors``, which ignores only ``netns_gone``: pods that went
away) sees permission failures, unreadable rules and missing conntrack for
what they are.  Pure: it reads the exception, nothing else.
"""

from __future__ import annotations

import errno

from halfclose.errors import UserError

_GONE = frozenset({errno.ENOENT, errno.ESRCH, errno.EBADF, errno.EINVAL})
_DENIED = frozenset({errno.EPERM, errno.EACCES})
_BUSY = frozenset({errno.ENOBUFS, errno.EBUSY, errno.EAGAIN})


def error_reason(exc: BaseException) -> str:
    """The ``reason`` label for a failure the agent met (never raises)."""
    if isinstance(exc, UserError):
        if type(exc).reason != UserError.reason:
            return str(type(exc).reason)  # a typed fault says what it is
        # An untyped one from older code: its OSError context may still tell.
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, OSError) and cause.errno in _DENIED:
            return "permission"
        return "netns_gone" if isinstance(cause, OSError) else "user"
    if isinstance(exc, PermissionError):
        return "permission"
    if isinstance(exc, OSError):
        if exc.errno in _GONE:
            return "netns_gone"
        if exc.errno in _DENIED:
            return "permission"
        if exc.errno in _BUSY:
            return "netlink"
        return "netlink" if exc.errno else "os"
    return "internal"
