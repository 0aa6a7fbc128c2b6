"""The base of every error that is the user's to fix, not a bug."""

__all__ = ["Interrupted", "UserError"]


class UserError(Exception):
    """Bad configuration, data or state; the CLI prints the message and exits 2."""


class Interrupted(KeyboardInterrupt):
    """Work stopped on request (Ctrl-C, SIGTERM) at a safe point; nothing was written."""
