"""Deprecated import path of the Python SDK: use ``agentkernel.sdk``.

The names the reference system's SDK uses (``AgentKernelError``, ``ValidationError``, ``RunResult``,
``SandboxInfo``) are kept here as aliases of ``sdk.APIError``, ``sdk.BadRequestError``,
``sdk.CommandResult`` and ``sdk.SandboxDetails``, so code written against either keeps working. Inside
agentkernel those names mean ``errors.AgentKernelError`` / ``errors.ValidationError`` and
``backends.base.SandboxInfo``; this module is the only place where they mean the SDK's.
"""

from .sdk import *  # noqa: F403
from .sdk import APIError as AgentKernelError
from .sdk import BadRequestError as ValidationError
from .sdk import CommandResult as RunResult
from .sdk import SandboxDetails as SandboxInfo
from .sdk import __all__ as _sdk_all

__all__ = [*_sdk_all, "AgentKernelError", "RunResult", "SandboxInfo", "ValidationError"]
