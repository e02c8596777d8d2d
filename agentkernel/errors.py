"""Errors that reach users. Each says what is wrong and, where there is one, how to fix it.

The CLI prints ``agentkernel: error: <message>`` (plus ``hint: ...``) and exits 125 for its own errors,
so a command's own exit codes (0-124, 126-255) are never confused with agentkernel failing.
"""

from __future__ import annotations


class AgentKernelError(Exception):
    """Base class. ``hint`` is a one-line suggestion shown under the message."""

    exit_code = 125
    http_status = 500

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


def print_error(exc: AgentKernelError) -> None:
    """``agentkernel: error: <message>`` and its hint on stderr (entry points outside the CLI)."""
    import sys

    print(f"agentkernel: error: {exc}", file=sys.stderr)
    if exc.hint:
        print(f"  hint: {exc.hint}", file=sys.stderr)


class ConfigError(AgentKernelError):
    """Malformed agentkernel.toml, unknown keys, bad flag or environment values."""

    http_status = 400


class ValidationError(AgentKernelError):
    """A value in a spec, name, image reference or path is not acceptable."""

    http_status = 400


class InvalidField(ValidationError):
    """A request field (HTTP API, MCP) is well-formed JSON but its value is not acceptable; the message
    starts with the field's name."""

    http_status = 422


class NotFound(AgentKernelError):
    """An unknown sandbox, backend, image or file."""

    http_status = 404


class AlreadyExists(AgentKernelError):
    http_status = 409


class InvalidState(AgentKernelError):
    """The sandbox exists but is not in a state that allows the operation (e.g. exec when stopped)."""

    http_status = 409


class BackendUnavailable(AgentKernelError):
    """The engine behind a backend is missing or not running on this host."""

    http_status = 503


class MissingExtra(BackendUnavailable):
    """A backend needs an optional dependency group that is not installed."""


class DaemonUnavailable(AgentKernelError):
    """No daemon answers (or its connection broke)."""


class PolicyNotEnforceable(AgentKernelError):
    """Fail closed: the backend cannot enforce a control the policy asks for."""

    http_status = 422


class NotPermitted(AgentKernelError):
    """The server's policy does not let this caller ask for that (a backend, profile, network, resources)."""

    http_status = 403


class TooManyRequests(AgentKernelError):
    """A limit on live sandboxes, concurrent runs or batch size: try again after ``retry_after`` seconds."""

    http_status = 429

    def __init__(self, message: str, *, retry_after: int = 1, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.retry_after = retry_after


class SandboxError(AgentKernelError):
    """The engine failed while doing what we asked."""
