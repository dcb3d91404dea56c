"""Errors a user can cause. The CLI turns each into one line on stderr and exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user asked for (bad flag, unknown backend, missing file, bad config).

    ``exit_code`` is what the CLI exits with; the message must stand alone on one line.
    """

    exit_code = 2


class UnknownBackendError(UserError, KeyError):
    def __init__(self, name: str, known: list[str]):
        self.name, self.known = name, known
        super().__init__(f"unknown backend '{name}' (choose from: {', '.join(known) or 'none installed'})")

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


class BackendUnavailableError(UserError):
    def __init__(self, name: str, reason: str):
        super().__init__(f"backend '{name}' is not available here: {reason}")


class MissingOpError(UserError, LookupError):
    """Raised in strict mode when a backend has no native implementation of an op."""


class ConfigError(UserError, ValueError):
    """A configuration file or value that cannot be used."""


class RunError(UserError):
    """A run that cannot go on (a diverged loss, ...): one line on stderr, exit 1."""

    exit_code = 1
