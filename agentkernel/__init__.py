"""agentkernel: run untrusted commands for AI agents in isolated sandboxes."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # lazy: `import agentkernel` stays free for the CLI's fast path
    if name == "Sandbox":
        from .sandbox import Sandbox

        return Sandbox
    raise AttributeError(f"module 'agentkernel' has no attribute {name!r}")
