"""uvicorn glue shared by ``agentkernel serve`` and the MCP server's HTTP transport."""

from __future__ import annotations


def quiet_exit_server(uvicorn):
    """uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown (exit status 143/130); a server
    stopped on request has done its job: exit 0."""

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            self._captured_signals.clear()

    return Server
