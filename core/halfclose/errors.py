"""Errors that are the user's (or the environment's) to fix.

A ``UserError`` reaches the person as one line on stderr and exit status 2
(docs/cli.md); anything else is a bug and keeps its traceback.  Raise it
before changing anything, so bad input never leaves a half-done change.

The kernel and API layers raise the typed subclasses below and callers keep
them as they are up to the entry point: the CLI prints one line, the agent
logs one line and counts ``halfclose_scan_errors_total{reason}`` with the
class's ``reason`` (one mapping, ``halfclose.agent.core.reasons``).  A
permission failure is therefore never mistaken for a pod that went away.
"""


class UserError(Exception):
    """Bad input or an unusable environment: a missing netns, not root, ..."""

    exit_code = 2
    reason = "user"  # the metric reason when a long-running program meets it


class EnvironmentFault(UserError):
    """The kernel or the API refused or lacks something (not the user's typing)."""

    reason = "os"


class NetnsGone(EnvironmentFault):
    """The network namespace (or the process holding it) no longer exists."""

    reason = "netns_gone"


class PermissionDenied(EnvironmentFault):
    """EPERM/EACCES: entering a netns, reading rules, writing a sysctl."""

    reason = "permission"


class RulesUnreadable(EnvironmentFault):
    """No NAT rule source of the netns could be read: capture cannot be shown."""

    reason = "rules_unreadable"


class ConntrackUnavailable(EnvironmentFault):
    """No conntrack table to prove a leak with (module not loaded, no access)."""

    reason = "conntrack_unavailable"


class ApiConflict(EnvironmentFault):
    """The API server refused a write as conflicting (409) more often than retried."""

    reason = "api_conflict"
