"""The CLI side of the daemon protocol. This is the warm path of ``agentkernel run``: it imports only
os/_socket/marshal/struct/select/_signal and the stdlib-only protocol modules (no asyncio); ``errors``
and ``outcome`` only when a run ends unusually (an error, a signal, a timeout, an OOM kill)."""

from __future__ import annotations

import _socket  # the C module: `socket` would add ~2 ms of enum/selectors imports to the warm path
import os
import sys

from .. import paths
from ..daemon import protocol as P

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..errors import AgentKernelError


def connect(timeout: float = 2.0):
    """A connection to the daemon, or None when none answers (no socket, stale socket, refused)."""
    path = paths.daemon_socket()
    if not os.path.exists(path):
        return None
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except OSError:
        s.close()
        return None
    return s


def peer_pid(s) -> int | None:
    """The pid of the process at the other end of unix socket ``s`` (SO_PEERCRED), or None."""
    try:
        creds = s.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)  # struct ucred: pid, uid, gid
    except OSError:
        return None
    pid = int.from_bytes(creds[:4], sys.byteorder, signed=True)
    return pid if pid > 0 else None


def _recv_frames(s, fr: P.FrameReader) -> list[tuple[int, bytes]]:
    while True:
        data = s.recv(1 << 18)
        if not data:
            raise ConnectionError("the daemon closed the connection")
        frames = fr.feed(data)
        if frames:
            return frames


def request(op: str, **fields) -> dict | None:
    """A one-shot request (status, stop, ping). None when no daemon answers."""
    s = connect()
    if s is None:
        return None
    try:
        s.sendall(P.oframe(P.REQUEST, {"v": P.PROTOCOL_VERSION, "op": op, **fields}))
        s.settimeout(30)
        fr = P.FrameReader()
        t, payload = _recv_frames(s, fr)[0]
        obj = P.decode(payload)
        if t == P.ERROR:
            from ..errors import AgentKernelError

            raise AgentKernelError(obj.get("message", "daemon error"), hint=obj.get("hint"))
        return obj
    except ValueError:
        return {"incompatible": True}
    except (ConnectionError, OSError):
        return None
    finally:
        s.close()


def _raise_error(payload: bytes) -> None:
    from .. import errors

    obj = P.decode(payload)
    cls = getattr(errors, obj.get("kind") or "", None)
    if not (isinstance(cls, type) and issubclass(cls, errors.AgentKernelError)):
        cls = errors.AgentKernelError
    raise cls(obj.get("message", "daemon error"), hint=obj.get("hint"))


def try_run(spec, command: list[str], timeout: float | None) -> int | None:
    """Run through the daemon's warm pool; None when no daemon answers (the caller goes cold)."""
    return try_run_resolved(spec.to_dict(), spec.backend, spec.resources.memory_mb, command, timeout)


def try_run_resolved(spec_dict: dict, backend: str, memory_mb: int | None, command: list[str],
                     timeout: float | None) -> int | None:
    """``try_run`` with the spec as its dict, backend and memory limit (a cached resolution:
    ``resolvedspec``), so the warm path needs no spec classes."""
    s = connect()
    if s is None:
        return None
    from ..termio import stdin_forwardable

    forward = stdin_forwardable()
    try:
        s.settimeout(None)
        request = {"v": P.PROTOCOL_VERSION, "op": "run", "spec": spec_dict, "argv": command,
                   "timeout": timeout, "stdin": forward}
        s.sendall(P.oframe(P.REQUEST, request))
        # while the daemon picks the member: import what running in it needs (~1 ms of CPU, off the
        # round trip's wall time); a proxy-mode reply (no agent socket: wasm) just does not use it
        from ..agent.sync_client import SyncAgentClient  # noqa: F401
        fr = P.FrameReader()
        frames = _recv_frames(s, fr)
    except (ConnectionError, OSError):
        s.close()
        return None
    t, payload = frames[0]
    try:
        if t == P.ERROR:
            s.close()
            _raise_error(payload)
        reply = P.decode(payload)
    except ValueError:  # a daemon from another version of agentkernel
        s.close()
        sys.stderr.write("agentkernel: note: the running daemon is from another version; running without it "
                         "(restart it: agentkernel daemon stop && agentkernel daemon start)\n")
        return None
    try:
        if reply.get("mode") == "lease":
            return _run_lease(s, reply, command, timeout, forward, backend, memory_mb)
        return _run_proxy(s, fr, frames[1:], forward, timeout, memory_mb)
    finally:
        s.close()


def sandbox_died(name: str) -> AgentKernelError:
    from ..errors import SandboxError

    return SandboxError(f"sandbox {name} died while the command ran (killed from outside, or its agent crashed)",
                        hint="agentkernel doctor; if it repeats, see the engine's logs")


def exit_code_of(code: int, sig: int, timed_out: bool, oom: bool, error: str | None, timeout,
                 memory_mb: int | None) -> int:
    """Shell-style exit code from an agent exit event, with the notes a user must see (the one renderer)."""
    note = error if error and code in (126, 127) else None
    if not (sig or timed_out or oom or note):  # nothing to say (``outcome.notes``): the code as it is
        return code
    from ..outcome import Outcome, render

    return render(Outcome(code, signal=sig or None, timed_out=bool(timed_out), oom=bool(oom), note=note),
                  timeout=timeout, memory_mb=memory_mb)


def exec_via_agent_socket(client, command: list[str], *, env, cwd, timeout, forward_stdin: bool, sandbox: str):
    """Run one command through a connected SyncAgentClient with our stdio, forwarding the signals a
    terminal user sends (Ctrl-C, ...) to the command. Returns the exit event tuple
    (exit_code, signal, timed_out, oom, error)."""
    import _signal as signal  # `signal` imports enum: ~1 ms more on the warm path

    old = {}

    def fwd(signum, frame):
        client.forward_signal(signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        try:
            old[sig] = signal.signal(sig, fwd)
        except (ValueError, OSError):
            pass
    try:
        return client.exec_stream(command, env=env, cwd=cwd, timeout=timeout, stdin_fd=0 if forward_stdin else None)
    except ConnectionError:
        raise sandbox_died(sandbox) from None
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
        client.close()


def _run_lease(s, reply: dict, command: list[str], timeout, forward: bool, backend: str, memory_mb) -> int:
    """The daemon lent us a warm sandbox: talk to its agent directly, then hand it back by closing."""
    from ..agent.sync_client import SyncAgentClient

    client = SyncAgentClient.connect_unix(reply["socket"])
    code, sig, timed_out, oom, error = exec_via_agent_socket(
        client, command, env=reply.get("env"), cwd=reply.get("cwd"), timeout=timeout, forward_stdin=forward,
        sandbox=reply.get("sandbox", "?"))
    rc = exit_code_of(code, sig, timed_out, oom, error, timeout, memory_mb)
    if reply.get("sandbox"):
        _hand_back(s, reply, backend)  # before DONE: the daemon removes it next
    try:
        s.sendall(P.oframe(P.DONE, {"exit_code": rc}))
    except OSError:
        pass
    return rc


def _hand_back(s, reply: dict, backend: str) -> None:
    """The member's journal entry goes back to the daemon (``owner.hand_back``): by the two names the
    daemon sent with the lease (the entry as lent to us, and as the daemon's), one rename and nothing to
    read; else (an older daemon, or the entry is not under that name) by the daemon's pid."""
    names = reply.get("journal")
    if type(names) is list and len(names) == 2 and all(
            type(n) is str and n.endswith(".json") and "/" not in n and n[0] != "." for n in names):
        d = paths.journal_path()  # entries of this journal only: plain names, never a path
        try:
            os.rename(os.path.join(d, names[0]), os.path.join(d, names[1]))
            return
        except (OSError, ValueError):
            pass
    daemon_pid = peer_pid(s)
    if daemon_pid is not None:
        from .. import owner

        owner.hand_back(str(reply["sandbox"]), daemon_pid, backend)


def _run_proxy(s, fr: P.FrameReader, pending, forward: bool, timeout, memory_mb) -> int:
    """The daemon runs the command and streams its output (backends without an agent socket)."""
    import select

    from ..termio import write_all

    poller = select.poll()
    poller.register(s.fileno(), select.POLLIN)
    stdin_open = forward
    if stdin_open:
        poller.register(0, select.POLLIN)
    frames = list(pending)
    while True:
        for t, payload in frames:
            if t == P.STDOUT:
                write_all(1, payload)
            elif t == P.STDERR:
                write_all(2, payload)
            elif t == P.EXIT:
                r = P.decode(payload)
                return exit_code_of(r["exit_code"], r.get("signal") or 0, r.get("timed_out"), r.get("oom_killed"), None,
                                    timeout, memory_mb)
            elif t == P.ERROR:
                _raise_error(payload)
        frames = []
        for fd, _ in poller.poll():
            if fd == 0:
                data = os.read(0, 1 << 16)
                if data:
                    s.sendall(P.frame(P.STDIN, data))
                else:
                    s.sendall(P.frame(P.STDIN_EOF))
                    poller.unregister(0)
            else:
                data = s.recv(1 << 18)
                if not data:
                    from ..errors import AgentKernelError

                    raise AgentKernelError("the daemon closed the connection before the command finished")
                frames = fr.feed(data)
