"""The base of every error that is the user's to fix, not a bug."""

__all__ = ["UserError"]


class UserError(Exception):
    """Bad configuration, data or state; the CLI prints the message and exits 2."""
