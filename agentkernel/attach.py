"""Interactive attach: a real PTY shell inside a named sandbox, through its agent.

``agentkernel attach NAME`` talks to the sandbox's agent directly (the same socket exec uses), or to a
remote ``agentkernel serve`` over its websocket route (``--url``). The local terminal is put in raw
mode, so every key (Ctrl-C, Ctrl-D, arrows) goes to the sandbox's PTY, whose line discipline turns
Ctrl-C into SIGINT for the sandbox's foreground process; window size changes (SIGWINCH) are forwarded
as resizes; the session ends when the shell exits and its exit code becomes ours.

Websocket protocol (``/sandboxes/{name}/attach?cmd=...&rows=..&cols=..&term=..``): binary messages
are terminal bytes (client -> stdin, server -> output); text messages are JSON controls:
client ``{"type": "resize", "rows": R, "cols": C}``, ``{"type": "signal", "signal": N}``,
``{"type": "eof"}``; server ``{"type": "exit", "exit_code": .., "signal": ..}`` (then close) or
``{"type": "error", "message": .., "status": ..}``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from typing import Any

DEFAULT_SHELL = ["/bin/sh"]
DEFAULT_TERM = "xterm-256color"


# ---- the sandbox side ----------------------------------------------------------------------------------


async def open_tty(manager, name: str, tenant: str | None, argv: list[str] | None = None, *, rows: int = 24,
                   cols: int = 80, term: str | None = None, env: dict[str, str] | None = None):
    """Start ``argv`` (default: a shell) on a PTY inside sandbox ``name``. Returns (client, process)."""
    from .backends._agentexec import exec_env
    from .errors import PolicyNotEnforceable
    from .spec import SandboxSpec

    rec = manager.get(name, tenant)
    client = await manager.open_agent(name, tenant)
    if client is None:
        raise PolicyNotEnforceable(f"backend {rec.backend!r} has no interactive attach (no in-sandbox agent)")
    spec = SandboxSpec.from_dict(rec.spec)
    env = exec_env((rec.handle or {}).get("env"), spec.env, {"TERM": term or DEFAULT_TERM, **(env or {})})
    try:
        proc = await client.start(list(argv or DEFAULT_SHELL), env=env, cwd=spec.workdir, tty=True,
                                  tty_size=(max(1, rows), max(1, cols)))
        await proc.started()
    except BaseException:
        await client.close()
        raise
    from . import audit

    audit.log("attach", sandbox=name, id=rec.id, argv=list(argv or DEFAULT_SHELL))
    return client, proc


def _exit_info(res) -> dict[str, Any]:
    return {"exit_code": res.exit_code, "signal": res.signal or None, "timed_out": bool(res.timed_out)}


async def serve_websocket(ws, svc, tenant: str, name: str) -> None:
    """The server half of the websocket attach route."""
    from starlette.websockets import WebSocketDisconnect

    from .errors import AgentKernelError

    q = ws.query_params
    argv = q.getlist("cmd") or None
    try:
        rows, cols = int(q.get("rows", 24)), int(q.get("cols", 80))
    except ValueError:
        rows, cols = 24, 80
    await ws.accept()
    try:
        from .spec import validate_name

        validate_name(name)
        client, proc = await open_tty(svc.manager, name, tenant, argv, rows=rows, cols=cols, term=q.get("term"))
    except AgentKernelError as exc:
        await ws.send_text(json.dumps({"type": "error", "message": exc.message, "status": exc.http_status}))
        await ws.close(code=4000 + exc.http_status)
        return

    async def pump_output() -> None:
        async for _fd, data in proc:
            await ws.send_bytes(data)

    async def pump_input() -> None:
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                raise WebSocketDisconnect(msg.get("code", 1000))
            if msg.get("bytes") is not None:
                await proc.write(msg["bytes"])
            elif msg.get("text") is not None:
                try:
                    ctl = json.loads(msg["text"])
                except ValueError:
                    continue
                kind = ctl.get("type")
                if kind == "resize":
                    await proc.resize(int(ctl.get("rows", 24)), int(ctl.get("cols", 80)))
                elif kind == "signal":
                    await proc.signal(int(ctl.get("signal", signal.SIGINT)))
                elif kind == "eof":
                    await proc.close_stdin()
                elif kind == "input" and isinstance(ctl.get("data"), str):
                    await proc.write(ctl["data"].encode())

    out_task = asyncio.create_task(pump_output())
    in_task = asyncio.create_task(pump_input())
    svc.active += 1
    try:
        done, _ = await asyncio.wait({out_task, in_task}, return_when=asyncio.FIRST_COMPLETED)
        if out_task in done and not out_task.exception():
            res = await proc.wait()
            await ws.send_text(json.dumps({"type": "exit", **_exit_info(res)}))
            await ws.close(code=1000)
        elif not proc.done:  # the client went away: kill what it left running
            await proc.kill()
    except Exception:
        if not proc.done:
            await proc.kill()
    finally:
        svc.active -= 1
        for t in (out_task, in_task):
            t.cancel()
        await asyncio.gather(out_task, in_task, return_exceptions=True)
        await client.close()


# ---- the terminal side -----------------------------------------------------------------------------------


def terminal_size(fd: int) -> tuple[int, int]:
    try:
        sz = os.get_terminal_size(fd)
        return sz.lines, sz.columns
    except OSError:
        return 24, 80


class _Channel:
    """What the terminal loop needs from a session: send input, resize, signal, and output + exit."""

    async def write(self, data: bytes) -> None: ...
    async def eof(self) -> None: ...
    async def resize(self, rows: int, cols: int) -> None: ...
    async def signal(self, sig: int) -> None: ...
    def output(self): ...
    async def result(self) -> dict[str, Any]: ...
    async def close(self) -> None: ...


class _AgentChannel(_Channel):
    def __init__(self, client, proc) -> None:
        self.client, self.proc = client, proc

    async def write(self, data: bytes) -> None:
        await self.proc.write(data)

    async def eof(self) -> None:
        await self.proc.close_stdin()

    async def resize(self, rows: int, cols: int) -> None:
        await self.proc.resize(rows, cols)

    async def signal(self, sig: int) -> None:
        await self.proc.signal(sig)

    async def output(self):
        async for _fd, data in self.proc:
            yield data

    async def result(self) -> dict[str, Any]:
        return _exit_info(await self.proc.wait())

    async def close(self) -> None:
        if not self.proc.done:
            await self.proc.kill()
        await self.client.close()


class _WebSocketChannel(_Channel):
    def __init__(self, ws) -> None:
        self.ws = ws
        self._result: dict[str, Any] | None = None

    async def write(self, data: bytes) -> None:
        await self.ws.send(data)

    async def eof(self) -> None:
        await self.ws.send(json.dumps({"type": "eof"}))

    async def resize(self, rows: int, cols: int) -> None:
        await self.ws.send(json.dumps({"type": "resize", "rows": rows, "cols": cols}))

    async def signal(self, sig: int) -> None:
        await self.ws.send(json.dumps({"type": "signal", "signal": int(sig)}))

    async def output(self):
        from websockets.exceptions import ConnectionClosed

        from .errors import AgentKernelError

        try:
            async for msg in self.ws:
                if isinstance(msg, bytes):
                    yield msg
                    continue
                ctl = json.loads(msg)
                if ctl.get("type") == "exit":
                    self._result = ctl
                    return
                if ctl.get("type") == "error":
                    raise AgentKernelError(ctl.get("message", "attach failed"))
        except ConnectionClosed:
            return

    async def result(self) -> dict[str, Any]:
        from .errors import SandboxError

        if self._result is None:
            raise SandboxError("the server closed the attach session without an exit status")
        return self._result

    async def close(self) -> None:
        await self.ws.close()


async def run_terminal(channel: _Channel, *, recorder=None, stdin_fd: int = 0, stdout_fd: int = 1) -> int:
    """Connect the local terminal to a session until it ends; returns the session's exit code."""
    import termios
    import tty

    loop = asyncio.get_running_loop()
    is_tty = os.isatty(stdin_fd)
    saved = termios.tcgetattr(stdin_fd) if is_tty else None
    stdin_done = asyncio.Event()
    pending: list[asyncio.Task] = []

    def on_stdin() -> None:
        try:
            data = os.read(stdin_fd, 65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(stdin_fd)
            stdin_done.set()
            pending.append(loop.create_task(channel.eof()))
            return
        if recorder is not None:
            recorder.input(data)
        pending.append(loop.create_task(channel.write(data)))

    def on_winch() -> None:
        rows, cols = terminal_size(stdout_fd if os.isatty(stdout_fd) else stdin_fd)
        if recorder is not None:
            recorder.resize(rows, cols)
        pending.append(loop.create_task(channel.resize(rows, cols)))

    def on_sigint() -> None:  # only without a tty: with one, Ctrl-C is a byte for the sandbox's PTY
        pending.append(loop.create_task(channel.signal(signal.SIGINT)))

    try:
        if is_tty:
            tty.setraw(stdin_fd, termios.TCSANOW)
        loop.add_reader(stdin_fd, on_stdin)
        loop.add_signal_handler(signal.SIGWINCH, on_winch)
        if not is_tty:
            loop.add_signal_handler(signal.SIGINT, on_sigint)
        async for data in channel.output():
            if recorder is not None:
                recorder.output(data)
            view = memoryview(data)
            while view:
                try:
                    n = os.write(stdout_fd, view)
                except BlockingIOError:
                    await asyncio.sleep(0.001)
                    continue
                view = view[n:]
            pending[:] = [t for t in pending if not t.done()]
        res = await channel.result()
    finally:
        loop.remove_reader(stdin_fd)
        loop.remove_signal_handler(signal.SIGWINCH)
        if not is_tty:
            loop.remove_signal_handler(signal.SIGINT)
        if saved is not None:
            termios.tcsetattr(stdin_fd, termios.TCSADRAIN, saved)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await channel.close()
        if recorder is not None:
            recorder.close()
    code = res.get("exit_code")
    return int(code) if code is not None else 125


async def attach_local(name: str, argv: list[str] | None = None, *, recorder=None, term: str | None = None,
                       env: dict[str, str] | None = None) -> int:
    from .manager import SandboxManager

    mgr = SandboxManager()
    try:
        rows, cols = terminal_size(1 if os.isatty(1) else 0)
        client, proc = await open_tty(mgr, name, None, argv, rows=rows, cols=cols,
                                      term=term or os.environ.get("TERM"), env=env)
        return await run_terminal(_AgentChannel(client, proc), recorder=recorder)
    finally:
        await mgr.aclose()


async def attach_remote(url: str, name: str, argv: list[str] | None = None, *, token: str | None = None,
                        recorder=None, term: str | None = None) -> int:
    from urllib.parse import quote, urlencode

    from websockets.asyncio.client import connect

    rows, cols = terminal_size(1 if os.isatty(1) else 0)
    base = url.rstrip("/")
    if base.startswith("http"):
        base = "ws" + base[4:]
    params = [("rows", rows), ("cols", cols), ("term", term or os.environ.get("TERM") or DEFAULT_TERM)]
    params += [("cmd", a) for a in (argv or [])]
    uri = f"{base}/sandboxes/{quote(name, safe='')}/attach?{urlencode(params)}"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    ws = await connect(uri, additional_headers=headers, max_size=None)
    return await run_terminal(_WebSocketChannel(ws), recorder=recorder)


def attach_main(args) -> int:
    """CLI glue for ``agentkernel attach``."""
    from .asciicast import Recorder

    argv = list(args.command or [])
    if argv and argv[0] == "--":
        argv = argv[1:]
    recorder = None
    if args.record:
        rows, cols = terminal_size(1 if os.isatty(1) else 0)
        recorder = Recorder(args.record, width=cols, height=rows, command=" ".join(argv or DEFAULT_SHELL),
                            title=f"agentkernel attach {args.name}", record_input=args.record_input)
    url = args.url or None
    env = dict(getattr(args, "env", None) or [])
    if url and env:
        from .errors import ValidationError

        raise ValidationError("attach --url does not pass -e/--env variables; set them at create instead")
    if url:
        token = os.environ.get("AGENTKERNEL_API_KEY") or None
        coro = attach_remote(url, args.name, argv or None, token=token, recorder=recorder)
    else:
        coro = attach_local(args.name, argv or None, recorder=recorder, env=env)
    try:
        return asyncio.run(coro)
    finally:
        if recorder is not None:
            recorder.close()
        sys.stdout.flush()
