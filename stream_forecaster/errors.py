"""The base of every error that is the user's to fix, not a bug."""

__all__ = ["BrokerUnavailable", "Interrupted", "UserError"]


class UserError(Exception):
    """Bad configuration, data or state; the CLI prints the message and exits 2."""


class Interrupted(KeyboardInterrupt):
    """Work stopped on request (Ctrl-C, SIGTERM) at a safe point; nothing was written."""


class BrokerUnavailable(UserError, RuntimeError):
    """No broker could be reached to set up a client; try again later, or fix ``kafka.bootstrap_servers``."""
