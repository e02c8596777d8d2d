"""The QMP client against a socket that behaves as QEMU's does at start-up: the path exists (bound) before
anything listens on it, so the first connects are refused. The client must wait, not fail."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

from agentkernel.vm.qmp import QMP


async def _serve_late(path: str, listen_after: float) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)  # the path exists now, but a connect is refused until listen()
    await asyncio.sleep(listen_after)
    s.listen(1)
    s.setblocking(False)
    loop = asyncio.get_running_loop()
    conn, _ = await loop.sock_accept(s)
    await loop.sock_sendall(conn, json.dumps({"QMP": {"version": {}}}).encode() + b"\n")
    await loop.sock_recv(conn, 4096)  # qmp_capabilities
    await loop.sock_sendall(conn, b'{"return": {}}\n')
    return conn


def test_connect_waits_for_a_bound_socket_to_listen(tmp_path):
    path = str(tmp_path / "qmp.sock")

    async def main():
        server = asyncio.create_task(_serve_late(path, 0.3))
        await asyncio.sleep(0.05)
        qmp = await QMP.connect(path, timeout=5.0)
        conn = await server
        await qmp.close()
        conn.close()

    asyncio.run(main())


def test_connect_gives_up_at_its_timeout(tmp_path):
    path = str(tmp_path / "qmp.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)  # never listens
    try:
        with pytest.raises(ConnectionRefusedError):
            asyncio.run(QMP.connect(path, timeout=0.3))
    finally:
        s.close()
