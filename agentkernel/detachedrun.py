"""The supervisor of one detached command (``python -m agentkernel.detachedrun STATE.json``): it forks into
a session of its own (the launcher exits at once), runs the command in its named sandbox through the
manager, and keeps the state file and the bounded output files (``agentkernel.detached``) up to date
until the command ends. SIGTERM kills the command."""

from __future__ import annotations

import os
import signal
import sys
import time

from . import detached, owner


def _supervise(path: str) -> int:
    import asyncio

    from .backends.base import ExecRequest
    from .errors import AgentKernelError
    from .manager import SandboxManager
    from .store import Store

    st = detached.load(path)
    if st is None:
        return 1
    d = os.path.dirname(path)
    st["supervisor"] = owner.current_owner()
    detached.save(path, st)
    files = {1: open(detached.output_path(d, st["id"], "stdout"), "wb"),  # noqa: SIM115 (closed at the end)
             2: open(detached.output_path(d, st["id"], "stderr"), "wb")}  # noqa: SIM115
    sizes = {1: 0, 2: 0}

    def on_output(fd: int, data: bytes) -> None:
        room = detached.OUTPUT_LIMIT - sizes[fd]
        if len(data) > room:
            data = data[:max(room, 0)]
            key = "stdout" if fd == 1 else "stderr"
            if not st["truncated"][key]:
                st["truncated"][key] = True
                detached.save(path, st)
        if data:
            files[fd].write(data)
            files[fd].flush()
            sizes[fd] += len(data)

    def on_start(pid: int) -> None:
        st["pid"], st["status"] = pid, "running"
        detached.save(path, st)

    def running_without_pid() -> None:  # a backend that runs commands without the agent reports no pid
        if st["status"] == "starting":
            st["status"] = "running"
            detached.save(path, st)

    async def main() -> None:
        mgr = SandboxManager(Store(st["store"]))
        req = ExecRequest(st["command"], env=st.get("env") or None, cwd=st.get("cwd"), timeout=st.get("timeout"),
                          on_output=on_output, output_limit=0, on_start=on_start)
        task = asyncio.get_running_loop().create_task(mgr.exec(st["sandbox"], req, st["tenant"]))

        def killed() -> None:
            st["error"] = "killed on request"
            task.cancel()

        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, killed)
        asyncio.get_running_loop().call_later(2.0, running_without_pid)
        try:
            r = await task
            st["exit_code"], st["signal"] = r.exit_code, r.signal
            st["timed_out"] = r.timed_out
            st["status"] = "completed" if r.exit_code == 0 else "failed"
        except asyncio.CancelledError:
            st["status"], st["exit_code"], st["signal"] = "failed", 137, 9
        except AgentKernelError as exc:
            st["status"], st["error"] = "failed", exc.message
        except Exception as exc:  # the state must say why it ended
            st["status"], st["error"] = "failed", f"internal error: {exc!r}"
        finally:
            await mgr.aclose()

    try:
        asyncio.run(main())
    finally:
        for f in files.values():
            f.close()
        st["ended_at"] = time.time()
        if st["status"] in ("starting", "running"):
            st["status"] = "failed"
        detached.save(path, st)
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0].endswith(".json"):
        print("usage: python -m agentkernel.detachedrun STATE.json", file=sys.stderr)
        return 2
    if os.fork():
        return 0  # the launcher: its caller waits for it, the supervisor lives on
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    code = 1
    try:
        code = _supervise(argv[0])
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
