"""``agentkernel run``: one command in a fresh sandbox.

Paths, fastest first:
- the daemon's warm pool (when the daemon runs and --no-daemon is not given);
- container backends without the daemon: one synchronous engine call (``podman run --rm``, the
  Docker API's create/attach/start/wait, or ``crun run``) with the caller's stdio passed straight
  through, and no asyncio import;
- every other backend: the generic asyncio path (create/start/exec/remove via the backend).
Every path claims the sandbox in the ownership journal before creating it, so a SIGKILLed CLI leaves
nothing behind once the next command runs.
"""

from __future__ import annotations

import os
import sys

from .. import audit, deathwatch, owner, paths
from ..backends import canonical, get_backend_class
from ..errors import AgentKernelError

EXIT_TIMEOUT = 124


def _note(msg: str) -> None:
    sys.stderr.write(f"agentkernel: {msg}\n")
    sys.stderr.flush()


def run(args, command: list[str]) -> int:
    from ..cli import resolve

    spec = resolve(args, command)
    backend_name = canonical(spec.backend)
    spec = spec.replace(backend=backend_name)
    if args.keep:
        return _run_keep(args, spec, command)
    if not args.no_daemon and os.environ.get("AGENTKERNEL_NO_DAEMON", "") in ("", "0"):
        from . import daemon_client

        rc = daemon_client.try_run(spec, command, args.timeout)
        if rc is not None:
            return rc
    cls = get_backend_class(backend_name)
    backend = cls(spec.options)
    backend.check(spec)
    if hasattr(backend, "oneshot_command"):
        return _run_engine_cli(backend, spec, command, args.timeout)
    if hasattr(backend, "run_attached_sync"):
        return _run_engine_api(backend, spec, command, args.timeout)
    if hasattr(backend, "run_oneshot_sync"):
        sid = owner.new_id("run")
        rc, msg = backend.run_oneshot_sync(spec, command, sandbox_id=sid, owner=owner.current_owner(),
                                           timeout=args.timeout, forward_stdin=_forward_stdin())
        if msg:
            _note(msg)
        audit.log("run", id=sid, backend=backend_name, image=spec.image, argv=command, exit_code=rc)
        return rc
    return _run_generic(spec, command, args.timeout)


def _forward_stdin() -> bool:
    """Attach our stdin unless it is /dev/null or closed (attaching costs a little)."""
    try:
        st = os.fstat(0)
    except OSError:
        return False
    import stat

    if stat.S_ISCHR(st.st_mode):
        try:
            dn = os.stat(os.devnull)
            if (st.st_rdev, st.st_ino) == (dn.st_rdev, dn.st_ino):
                return False
        except OSError:
            pass
    return True


def read_status(run_dir: str | None) -> dict | None:
    """The status file ``ak-agent exec --status-file`` writes: exact exit code, signal, OOM."""
    if not run_dir:
        return None
    from ..safefs import read_regular_or_none  # the sandbox can write its run dir: no links/FIFOs/huge

    data = read_regular_or_none(run_dir, "status", 4096)
    if data is None:
        return None
    text = data.decode("ascii", "replace")
    out: dict[str, int] = {}
    for part in text.split():
        k, _, v = part.partition("=")
        if v.lstrip("-").isdigit():
            out[k] = int(v)
    return out if "exit" in out else None


def report_status(status: dict | None, rc: int, spec) -> int:
    """Exit code to return, and the notes a user should see (OOM, signal)."""
    if status is None:
        return rc
    code = status["exit"]
    if status.get("oom"):
        _note(f"the command was killed by the out-of-memory killer (memory limit {spec.resources.memory_mb} MiB)")
    return code


def _prepare(backend, spec, command: list[str], interactive: bool):
    from ..backends import _container

    sid = owner.new_id("run")
    name = f"agentkernel-{sid}"
    o = owner.current_owner()
    owner.claim(spec.backend, sid, {"container": name, "run_dir": _container.sandbox_run_dir(sid)}, o)
    deathwatch.arm(spec.backend, sid)  # a SIGKILLed CLI takes its sandbox with it
    agent = paths.agent_binary()
    run_dir = _container.prepare_run_dir(sid, _container.resolve_user(spec)) if agent else None
    net = None
    if getattr(backend, "uses_egress", False) and spec.policy.network:
        try:
            net = _container.attach_network(spec, sid, getattr(backend, "egress_deferred", False))
        except BaseException:
            _finish(spec, sid, run_dir, command, 125, False)
            raise
    plan = _container.plan(spec, sandbox_id=sid, owner=o, container_name=name, argv=command, agent_bin=agent,
                           run_dir=run_dir, cwd=os.getcwd(), interactive=interactive,
                           pids_overhead=backend.pids_overhead, net=net)
    return sid, name, run_dir, plan


def _finish(spec, sid: str, run_dir: str | None, command: list[str], rc: int, timed_out: bool) -> None:
    if run_dir:
        from ..backends._container import remove_flat_dir

        remove_flat_dir(run_dir)
    if spec.policy.network:
        from ..backends._container import release_network

        release_network(sid)
    owner.release(spec.backend, sid)
    deathwatch.disarm(spec.backend, sid)
    audit.log("run", id=sid, backend=spec.backend, image=spec.image, argv=command, exit_code=rc,
              timed_out=timed_out)


def _run_engine_cli(backend, spec, command: list[str], timeout: float | None) -> int:
    """podman (and gVisor under podman): one ``podman run --rm`` with our stdio inherited."""
    from .._proc import Proc, WaitTimeout, which

    interactive = _forward_stdin()
    sid, name, run_dir, plan = _prepare(backend, spec, command, interactive)
    rc, timed_out = 0, False
    try:
        argv = backend.oneshot_command(plan)
        exe = which(argv[0])
        if exe is None:
            from ..errors import BackendUnavailable

            raise BackendUnavailable(f"{backend.binary} is not installed", hint="bash scripts/setup.sh")
        # conmon writes a file named `oom` into the client's working directory on an OOM kill: not the caller's
        proc = Proc([exe, *argv[1:]], stdin=None if interactive else -1, stdout=None, stderr=None,
                    cwd=run_dir or paths.runtime_dir())
        while True:
            try:
                rc = proc.wait(timeout)
                break
            except WaitTimeout:
                backend.force_remove_sync(name)
                proc.wait()
                timed_out, rc = True, EXIT_TIMEOUT
                _note(f"timed out after {timeout:g} s: the sandbox and every process in it were killed")
                break
            except KeyboardInterrupt:
                # The engine client is in our process group: it got the SIGINT too and proxies it to the
                # sandbox. Wait for the command to react; a second Ctrl-C kills the sandbox.
                timeout = 5.0
                continue
        proc.close()
        status = read_status(run_dir)
        if status is None and not timed_out:
            rc = _engine_failure(backend, spec, name, rc)
        elif not timed_out:
            rc = report_status(status, rc, spec)
        return rc
    finally:
        _finish(spec, sid, run_dir, command, rc, timed_out)


def _engine_failure(backend, spec, name: str, rc: int) -> int:
    """No status file: the engine failed before/around the command (or there is no agent)."""
    if paths.agent_binary() is None:
        return rc  # the command ran without the agent: the engine's code is all we have
    backend.force_remove_sync(name)
    if rc in (125, 126, 127):
        from ..imagesel import image_present, missing_image_error

        engine = getattr(backend, "binary", "podman")
        if not image_present(engine, spec.image):
            raise missing_image_error(engine, spec.image)
        raise AgentKernelError(f"{engine} could not run the sandbox (exit {rc}; its message is above)")
    return rc


def _run_engine_api(backend, spec, command: list[str], timeout: float | None) -> int:
    """docker: the Engine API's create/attach/start/wait over its socket, synchronously."""
    interactive = _forward_stdin()
    sid, _name, run_dir, plan = _prepare(backend, spec, command, interactive)
    rc, timed_out = 0, False
    try:
        code = backend.run_attached_sync(plan, timeout=timeout, forward_stdin=interactive)
        if code is None:
            timed_out, rc = True, EXIT_TIMEOUT
            _note(f"timed out after {timeout:g} s: the sandbox and every process in it were killed")
            return rc
        status = read_status(run_dir)
        rc = report_status(status, code, spec) if status else code
        return rc
    finally:
        _finish(spec, sid, run_dir, command, rc, timed_out)


# ---- generic asyncio path -----------------------------------------------------------------------------


def _write_all(fd: int, data: bytes) -> None:
    while data:
        n = os.write(fd, data)
        data = data[n:]


async def stdin_chunks():
    """Our stdin as an async iterator (pipes and ttys via the event loop, files read directly)."""
    import asyncio
    import stat

    st = os.fstat(0)
    if stat.S_ISREG(st.st_mode):
        while True:
            chunk = os.read(0, 1 << 16)
            if not chunk:
                return
            yield chunk
    loop = asyncio.get_running_loop()
    q: asyncio.Queue[bytes] = asyncio.Queue()

    def readable() -> None:
        try:
            data = os.read(0, 1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(0)
        q.put_nowait(data)

    os.set_blocking(0, False)
    loop.add_reader(0, readable)
    try:
        while True:
            chunk = await q.get()
            if not chunk:
                return
            yield chunk
    finally:
        loop.remove_reader(0)
        os.set_blocking(0, True)


def _run_generic(spec, command: list[str], timeout: float | None) -> int:
    import asyncio

    from ..backends.base import ExecRequest
    from ..manager import SandboxManager

    async def go() -> int:
        mgr = SandboxManager()
        req = ExecRequest(command, stdin=stdin_chunks() if _forward_stdin() else None, timeout=timeout,
                          on_output=lambda fd, data: _write_all(fd, data))
        try:
            result = await mgr.run(spec, req)
        finally:
            await mgr.aclose()
        return _result_code(result, timeout, spec)

    return asyncio.run(go())


def _result_code(result, timeout, spec) -> int:
    if result.timed_out:
        _note(f"timed out after {timeout:g} s: every process of the command was killed")
        return EXIT_TIMEOUT
    if result.oom_killed:
        _note(f"the command was killed by the out-of-memory killer (memory limit {spec.resources.memory_mb} MiB)")
    return result.exit_code


def _run_keep(args, spec, command: list[str]) -> int:
    """--keep: a named sandbox that outlives the command (left running)."""
    import asyncio

    from ..backends.base import ExecRequest
    from ..manager import SandboxManager

    name = args.name or owner.new_id("run")
    spec = spec.replace(name=name)

    async def go() -> int:
        mgr = SandboxManager()
        try:
            await mgr.create(spec, start=True)
            req = ExecRequest(command, stdin=stdin_chunks() if _forward_stdin() else None, timeout=args.timeout,
                              on_output=lambda fd, data: _write_all(fd, data))
            result = await mgr.exec(name, req)
        finally:
            await mgr.aclose()
        _note(f"sandbox kept: {name}  (agentkernel exec {name} -- CMD; agentkernel rm {name})")
        return _result_code(result, args.timeout, spec)

    return asyncio.run(go())
