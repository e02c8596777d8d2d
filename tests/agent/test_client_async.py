"""The agent through the asyncio client: exec, concurrency, tty, signals, files."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import signal
import time

import pytest
from akagent_helpers import ENV, SECRET_ENV, group_members, procs_with, run, wait_until

from agentkernel.agent import protocol as P
from agentkernel.agent.client import AgentClient
from agentkernel.agent.protocol import AgentConnectionLost, AgentError
from agentkernel.agent.transport import UnixSocketTransport


async def _connect(agent) -> AgentClient:
    return await AgentClient.connect(UnixSocketTransport(agent.sock))


def test_basic_exec_and_codes(agent, tmp_path):
    noexec = tmp_path / "noexec"
    noexec.write_text("echo hi\n")
    noexec.chmod(0o644)

    async def main():
        async with await _connect(agent) as c:
            assert c.protocol_version == 1 and c.agent_version == "0.1.0"
            assert (await c.info()).pid == agent.pid
            assert await c.ping(b"abc") >= 0
            r = await c.exec(["sh", "-c", "echo out; echo err >&2; exit 42"], env=ENV)
            assert (r.exit_code, r.stdout, r.stderr, r.signal, r.timed_out, r.oom, r.error) == (
                42, b"out\n", b"err\n", 0, False, False, None)
            assert r.pid > 0 and r.duration > 0
            codes = await asyncio.gather(*[c.exec(["sh", "-c", f"exit {i}"], env=ENV) for i in range(0, 256, 5)])
            assert [x.exit_code for x in codes] == list(range(0, 256, 5))
            r = await c.exec(["sh", "-c", "kill -TERM $$"], env=ENV)
            assert (r.signal, r.exit_code) == (15, 143)
            r = await c.exec(["no-such-cmd-abc"], env=ENV)
            assert r.exit_code == 127 and "No such file" in r.error
            r = await c.exec([str(noexec)], env=ENV)
            assert r.exit_code == 126 and "Permission denied" in r.error
            r = await c.exec(["env"], env={"ONLY": "this"})
            assert r.stdout == b"ONLY=this\n" and SECRET_ENV.encode() not in r.stdout
            r = await c.exec(["pwd"], env=ENV, cwd="/tmp")
            assert r.stdout == b"/tmp\n"

    run(main())


def test_twenty_concurrent_execs(agent):
    async def main():
        async with await _connect(agent) as c:
            t = time.monotonic()
            rs = await asyncio.gather(*[
                c.exec(["sh", "-c", f"sleep 0.5; echo {i}; echo e{i} >&2; exit {i}"], env=ENV)
                for i in range(20)])
            elapsed = time.monotonic() - t
            for i, r in enumerate(rs):
                assert (r.exit_code, r.stdout, r.stderr) == (i, f"{i}\n".encode(), f"e{i}\n".encode())
            assert elapsed < 5, f"20 x 0.5 s took {elapsed:.1f} s: not concurrent"

    run(main())


def test_large_output_slow_consumer_and_binary(agent, tmp_path):
    block = os.urandom(1 << 20)
    (tmp_path / "block").write_bytes(block)
    want = hashlib.sha256(block * 64).hexdigest()

    async def main():
        async with await _connect(agent) as c:
            h = hashlib.sha256()
            n = [0, 0]

            async def on_output(fd, data):
                if fd == 1:
                    h.update(data)
                n[fd - 1] += len(data)
                if n[0] % (4 << 20) < len(data):
                    await asyncio.sleep(0.01)  # a slow consumer now and then

            r = await c.exec(["sh", "-c", "for i in $(seq 64); do cat block; done; printf end >&2"], env=ENV,
                             cwd=str(tmp_path), on_output=on_output)
            assert r.exit_code == 0 and n == [64 << 20, 3] and h.hexdigest() == want
            # a concurrent ping still answers on the same connection afterwards
            await c.ping()

    run(main())
    with open(f"/proc/{agent.pid}/status") as f:
        hwm_kb = int(next(line for line in f if line.startswith("VmHWM")).split()[1])
    assert hwm_kb < 16 * 1024


def test_stdin_bytes_and_async_iter(agent):
    data = os.urandom(8 << 20)

    async def gen():
        for i in range(0, len(data), 100_000):
            yield data[i:i + 100_000]
            if i % 1_000_000 == 0:
                await asyncio.sleep(0)

    async def main():
        async with await _connect(agent) as c:
            r = await c.exec(["cat"], env=ENV, stdin=data)
            assert r.stdout == data
            r = await c.exec(["sha256sum"], env=ENV, stdin=gen())
            assert r.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
            r = await c.exec(["head", "-c", "10"], env=ENV, stdin=data)  # command stops reading early
            assert r.exit_code == 0 and r.stdout == data[:10]

    run(main())


def test_timeout_kills_process_tree(agent):
    marker = "4323.25"

    async def main():
        async with await _connect(agent) as c:
            r = await c.exec(["sh", "-c", f"sleep {marker} & sleep {marker} & wait"], env=ENV, timeout=0.4)
            assert r.timed_out and r.signal == 9 and r.exit_code == 124
            return r.pid

    pid = run(main())
    assert wait_until(lambda: not group_members(pid) and not procs_with(marker), 3)


def test_disconnect_kills_command(agent):
    marker = "4324.25"

    async def main():
        c = await _connect(agent)
        proc = await c.start(["sh", "-c", f"sleep {marker}; echo never"], env=ENV, capture=True)
        pid = await proc.started()
        assert wait_until(lambda: procs_with(marker), 3)
        await c.close()
        with pytest.raises(AgentConnectionLost):
            await proc.wait()
        with pytest.raises(AgentConnectionLost):
            await c.ping()
        return pid

    pid = run(main())
    assert wait_until(lambda: not group_members(pid) and not procs_with(marker), 3)


def test_agent_death_fails_pending_operations(agent):
    async def main():
        c = await _connect(agent)
        proc = await c.start(["sleep", "30"], env=ENV, capture=True)
        await proc.started()
        pending = asyncio.ensure_future(proc.wait())
        agent.proc.kill()
        with pytest.raises(AgentConnectionLost):
            await asyncio.wait_for(pending, 5)
        with pytest.raises(AgentConnectionLost):
            await c.exec(["true"], env=ENV)
        await c.close()

    run(main())
    agent.proc.wait()
    agent.proc = _Restarted()


class _Restarted:
    """Stands in for the killed agent process so the fixture's liveness check passes."""

    def poll(self):
        return None

    def terminate(self):
        pass

    def wait(self, *a):
        return 0


def test_signal_forwarding_to_group(agent):
    async def main():
        async with await _connect(agent) as c:
            proc = await c.start(["sh", "-c", 'trap "echo got-usr1; exit 7" USR1; echo ready; '
                                  "while :; do sleep 0.05; done"], env=ENV)
            seen = b""
            async for _fd, data in proc:
                seen += data
                if b"ready" in seen and b"got" not in seen:
                    await proc.signal(signal.SIGUSR1)
            r = await proc.wait()
            assert b"got-usr1" in seen and r.exit_code == 7
            proc = await c.start(["sleep", "30"], env=ENV, capture=True)
            await proc.started()
            await c.signal(proc, signal.SIGINT)
            r = await proc.wait()
            assert r.signal == signal.SIGINT and r.exit_code == 130
            proc = await c.start(["sleep", "30"], env=ENV, capture=True)
            await proc.kill()
            assert (await proc.wait()).signal == 9

    run(main())


def test_tty_size_and_resize(agent):
    async def main():
        async with await _connect(agent) as c:
            r = await c.exec(["tty"], env=ENV, tty=True)
            assert r.stdout.startswith(b"/dev/pts/") and r.exit_code == 0
            proc = await c.start(["sh", "-c", "stty size; read x; stty size"], env=ENV, tty=True,
                                 tty_size=(33, 99))
            seen = b""
            resized = False
            async for _fd, data in proc:
                seen += data
                if b"33 99" in seen and not resized:
                    resized = True
                    await proc.resize(40, 120)
                    await proc.write(b"\n")
            r = await proc.wait()
            assert r.exit_code == 0 and b"33 99" in seen and b"40 120" in seen, seen
            # tty stdin + EOF (VEOF): cat ends on ^D
            r = await c.exec(["cat"], env=ENV, tty=True, stdin=b"hello\n")
            assert r.exit_code == 0 and b"hello" in r.stdout

    run(main())


def test_cancel_exec_coroutine_kills_command(agent):
    marker = "4325.25"

    async def main():
        async with await _connect(agent) as c:
            task = asyncio.ensure_future(c.exec(["sleep", marker], env=ENV))
            assert await asyncio.to_thread(wait_until, lambda: procs_with(marker), 3)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await asyncio.to_thread(wait_until, lambda: not procs_with(marker), 3)
            await c.ping()

    run(main())


def test_put_get_50mb_by_hash(agent, tmp_path):
    data = os.urandom(50 * 1000 * 1000)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    want = hashlib.sha256(data).hexdigest()

    async def main():
        async with await _connect(agent) as c:
            dest = str(tmp_path / "dest.bin")
            assert await c.put_file(dest, data, mode=0o640) == len(data)
            assert os.stat(dest).st_mode & 0o777 == 0o640
            h = hashlib.sha256()
            n = 0
            async for chunk in c.get_file(dest):
                h.update(chunk)
                n += len(chunk)
                if n % (8 << 20) < len(chunk):
                    await asyncio.sleep(0.01)
            assert n == len(data) and h.hexdigest() == want
            # from a local path, and concurrently with an exec
            dest2 = str(tmp_path / "dest2.bin")
            n2, r = await asyncio.gather(c.put_file(dest2, str(src)), c.exec(["echo", "hi"], env=ENV))
            assert n2 == len(data) and r.stdout == b"hi\n"
            r = await c.exec(["sha256sum", dest2], env=ENV)
            assert r.stdout.split()[0].decode() == want
            st = await c.stat(dest2)
            assert st.is_file and st.size == len(data)

    run(main())
    with open(f"/proc/{agent.pid}/status") as f:
        hwm_kb = int(next(line for line in f if line.startswith("VmHWM")).split()[1])
    assert hwm_kb < 16 * 1024


def test_file_errors_and_small_ops(agent, tmp_path):
    async def main():
        async with await _connect(agent) as c:
            with pytest.raises(FileNotFoundError) as ei:
                await c.read_file(str(tmp_path / "missing"))
            assert isinstance(ei.value, AgentError) and ei.value.errno == errno.ENOENT
            assert "missing" in ei.value.strerror
            with pytest.raises(IsADirectoryError):
                await c.read_file(str(tmp_path))
            # put into a missing directory: error without the flag, created with it
            target = tmp_path / "a" / "b" / "c.txt"
            with pytest.raises(FileNotFoundError):
                await c.put_file(str(target), b"x")
            assert await c.put_file(str(target), b"hello", make_parents=True) == 5
            assert target.read_bytes() == b"hello"
            assert await c.read_file(str(target)) == b"hello"
            assert (await c.stat(str(tmp_path / "a"))).is_dir
            assert not (await c.stat(str(tmp_path / "nope"))).exists
            await c.mkdir(str(tmp_path / "m" / "n"), 0o700)
            assert (tmp_path / "m" / "n").is_dir()
            await c.mkdir(str(tmp_path / "m" / "n"))  # exists: fine with parents
            with pytest.raises(FileExistsError):
                await c.mkdir(str(tmp_path / "m" / "n"), parents=False)
            await c.remove(str(tmp_path / "a"), recursive=True)
            assert not (tmp_path / "a").exists()
            with pytest.raises(FileNotFoundError):
                await c.remove(str(tmp_path / "a"))
            await c.remove(str(tmp_path / "a"), missing_ok=True)
            assert await c.put_file(str(tmp_path / "empty"), b"") == 0
            assert await c.read_file(str(tmp_path / "empty")) == b""
            # the connection is still fine after all those errors
            assert (await c.exec(["true"], env=ENV)).exit_code == 0

    run(main())


def test_failed_put_leaves_nothing(agent, tmp_path):
    class Boom(Exception):
        pass

    async def gen():
        yield b"x" * (1 << 20)
        await asyncio.sleep(0.05)
        raise Boom

    async def main():
        async with await _connect(agent) as c:
            (tmp_path / "keep.txt").write_bytes(b"original")
            with pytest.raises(Boom):
                await c.put_file(str(tmp_path / "keep.txt"), gen())
            await c.ping()  # CANCEL processed before this reply
            assert sorted(os.listdir(tmp_path)) == ["agent.sock", "keep.txt"]
            assert (tmp_path / "keep.txt").read_bytes() == b"original"
            # abandoning a download half way cancels it and keeps the connection usable
            await c.put_file(str(tmp_path / "big"), os.urandom(4 << 20))
            agen = c.get_file(str(tmp_path / "big"))
            async for _ in agen:
                break
            await agen.aclose()
            assert (await c.exec(["echo", "ok"], env=ENV)).stdout == b"ok\n"

    run(main())


def test_agent_error_on_bad_request(agent):
    async def main():
        async with await _connect(agent) as c:
            with pytest.raises(AgentError) as ei:
                await c.exec(["echo", "a\0b"], env=ENV)
            assert ei.value.errno == errno.EINVAL
            # unknown frame type: ENOSYS on that stream, connection stays up
            sid = c._new_stream()
            from agentkernel.agent.client import _Request

            req = _Request((P.R_OK,))
            c._register(sid, req)
            c._send(0x7E, sid)
            with pytest.raises(AgentError) as ei:
                await req.fut
            assert ei.value.errno == errno.ENOSYS
            await c.ping()

    run(main())
