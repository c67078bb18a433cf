"""Domain errors a caller can act on. No gRPC here: gateway/errors.py maps each class to a status code.

Every class subclasses the builtin a plain-Python caller would expect (a notebook using the store or
an encoder catches ``ValueError`` / ``KeyError`` / ``TimeoutError``), and pickles with its message
intact, since Ray carries them across processes.
"""

from __future__ import annotations


class FusionrecError(Exception):
    """Base of errors a caller can act on; ``message`` is what the caller is told."""

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)

    def __reduce__(self):  # survive pickling across Ray processes with the message intact
        return (type(self), (self.message,))


class InvalidArgument(FusionrecError, ValueError):
    """The request itself is wrong (bad id, attribute, vector, content); resending it cannot help."""


class NotFound(FusionrecError, KeyError):
    """A named user or item does not exist."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.message


class FailedPrecondition(FusionrecError):
    """The system is not in a state to do this (e.g. the store was written by another encoder)."""


class DeadlineExceeded(FusionrecError, TimeoutError):
    """The caller's deadline ran out before the answer was ready."""


class Unavailable(FusionrecError):
    """A dependency is restarting or gone; retrying later can succeed."""
