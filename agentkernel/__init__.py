"""agentkernel: run untrusted commands for AI agents in isolated sandboxes."""

__version__ = "0.1.0"


# The reference SDK's names (``from agentkernel import AgentKernel``), served by agentkernel.refsdk.
_REFSDK = frozenset((
    "AgentKernel", "AsyncAgentKernel", "SandboxSession", "AsyncSandboxSession", "AgentKernelError", "AuthError",
    "NotFoundError", "ValidationError", "ServerError", "NetworkError", "StreamError", "ConflictError",
    "PolicyError", "RateLimitedError", "RunOutput", "SandboxInfo", "RunOptions", "CreateSandboxOptions",
    "ExecOptions", "StreamEvent",
    "FileReadResponse", "BatchCommand", "BatchResult", "BatchRunResponse", "BatchFileWriteResponse",
    "DetachedCommand", "DetachedLogsResponse", "DetachedStatus", "ExtendTtlResponse", "SnapshotMeta",
    "SecurityProfile", "SandboxStatus", "StreamEventType",
))


def __getattr__(name: str):
    # lazy: `import agentkernel` stays free for the CLI's fast path
    if name == "Sandbox":
        from .sandbox import Sandbox

        return Sandbox
    if name in _REFSDK:
        # by name, on first use only: refsdk -> sdk -> this package (for __version__) is no import-time
        # cycle, since this module has finished loading before anyone asks for these names
        import importlib

        return getattr(importlib.import_module(f"{__name__}.refsdk"), name)
    raise AttributeError(f"module 'agentkernel' has no attribute {name!r}")
