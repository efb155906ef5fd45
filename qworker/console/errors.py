"""What can go wrong in a console request, each with the HTTP status it answers with.

The API turns a :class:`ConsoleError` into ``{"error": message}`` with its status, the
pages into an error page; the message is one sentence a person can act on. Messages
may quote producer-controlled names: they are rendered escaped, never as markup.
"""

from __future__ import annotations


class ConsoleError(Exception):
    """A request the console cannot carry out; ``status`` is its HTTP status."""

    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Invalid(ConsoleError):
    """The request is malformed: a bad filter, a missing field, a wrong type."""

    status = 400


class Unprocessable(ConsoleError):
    """Well formed but refused: an edited body the handler could not decode."""

    status = 422


class Unauthorized(ConsoleError):
    """A change was asked for without a token or session."""

    status = 401


class Forbidden(ConsoleError):
    """A wrong token, a missing CSRF token, or a console started without a token."""

    status = 403


class NotFound(ConsoleError):
    """No such DLQ, message or job."""

    status = 404


class Busy(ConsoleError):
    """Another action holds the DLQ; try again when it ended (the job says when)."""

    status = 409


class Refused(ConsoleError):
    """Reading the DLQ was refused because it could make the broker drop dead letters."""

    status = 409


class Unavailable(ConsoleError):
    """The broker does not answer (the console retries with back-off, never in a loop)."""

    status = 503
