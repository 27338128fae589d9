"""The project's error root and the few kinds every front end maps to its own status.

Everything granite-deploy raises on purpose derives from :class:`GraniteDeployError`.
A front end (the CLI, gRPC, HTTP) maps by class, never by message text:

| class            | CLI exit | gRPC                | HTTP |
|------------------|----------|---------------------|------|
| InvalidField     | 2        | INVALID_ARGUMENT    | 400  |
| TooLarge         | 2        | RESOURCE_EXHAUSTED  | 413  |
| NotFound         | 2        | NOT_FOUND           | 404  |
| Overloaded       | 1        | RESOURCE_EXHAUSTED  | 429  |
| Unavailable      | 1        | UNAVAILABLE         | 503  |
| EngineUnusable (an Unavailable) | 1 | UNAVAILABLE | 503 |
| VerificationFailed | 3      | FAILED_PRECONDITION | 500  |
| GraniteDeployError (other) | 1 | INTERNAL         | 500  |

This module imports nothing of the project, so every layer can use it.
"""

from __future__ import annotations


class GraniteDeployError(Exception):
    """Root of every error granite-deploy raises on purpose; the message is for the user."""

    exit_code = 1


class InvalidField(GraniteDeployError, ValueError):
    """Bad input; ``field`` names it as the caller spelled it (``messages[2].role``, ``--port``)."""

    exit_code = 2

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}" if field else problem)
        self.field, self.problem = field, problem

    def renamed(self, field: str) -> "InvalidField":
        """The same problem under the caller's name for the field (a wire path, a CLI option)."""
        return type(self)(field, self.problem)


class TooLarge(InvalidField):
    """Input over a configured size limit (bytes, items, rendered length)."""


class NotFound(GraniteDeployError):
    """A named thing (model, adapter, prefix) is not served here."""

    exit_code = 2


class Overloaded(GraniteDeployError):
    """The queue is full: retry later (RESOURCE_EXHAUSTED / 429)."""


class Unavailable(GraniteDeployError):
    """Not serving now (loading, draining, engine unusable): retry on another replica."""


class EngineUnusable(Unavailable):
    """The engine cannot generate any more (failed warm-up, repeated step failures): the server
    reports NOT_SERVING and ``serve`` exits with status 1 and this reason."""


class VerificationFailed(GraniteDeployError):
    """An artifact failed its checks (hashes, paths, signature, accuracy gate)."""

    exit_code = 3
