"""The Docker Engine API client (agentkernel.backends.docker_api) against the real dockerd.

Both drivers (blocking and asyncio) share one protocol core; these tests drive each against the engine:
error mapping, keep-alive reuse, chunked bodies, and the attach hijack with its multiplexed stream.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
import tempfile
import uuid

import pytest

from agentkernel.backends import docker_api
from agentkernel.backends.docker_api import AsyncClient, Demuxer, SyncClient
from agentkernel.errors import AlreadyExists, BackendUnavailable, InvalidState, NotFound, SandboxError
from tests.conftest import skip_unavailable

pytestmark = [pytest.mark.engine("docker"), pytest.mark.timeout(60)]

PREFIX = f"akdt-{uuid.uuid4().hex[:6]}"
TEST_IMAGE = "localhost/ak-docker-test:latest"


def _docker_up() -> str | None:
    try:
        with SyncClient(timeout=5) as c:
            c.request("GET", "/_ping")
        return None
    except Exception as exc:
        return str(exc)


def ensure_image() -> str:
    """agentkernel/busybox when the setup script imported it, else a throwaway busybox image."""
    with SyncClient() as c:
        for image in ("agentkernel/busybox", TEST_IMAGE):
            if c.request("GET", f"/images/{docker_api.quote(image)}/json", ok=(404,)).status == 200:
                return image
    bb = "/bin/busybox"
    if not os.path.exists(bb):
        skip_unavailable("docker", "no image: neither agentkernel/busybox nor busybox-static to build one")
    with tempfile.TemporaryDirectory() as d:
        os.makedirs(f"{d}/bin")
        os.makedirs(f"{d}/tmp", mode=0o1777)
        os.makedirs(f"{d}/workspace")
        os.makedirs(f"{d}/etc")
        subprocess.run(["cp", bb, f"{d}/bin/busybox"], check=True)
        applets = subprocess.run([f"{d}/bin/busybox", "--list"], capture_output=True,
                                 text=True).stdout.split()
        for a in applets:
            if a != "busybox":
                os.symlink("busybox", f"{d}/bin/{a}")
        os.chmod(f"{d}/tmp", 0o1777)
        tar = subprocess.Popen(["tar", "-C", d, "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(["docker", "import", "--change", 'CMD ["/bin/sh"]', "-", TEST_IMAGE], stdin=tar.stdout,
                       check=True, capture_output=True)
        tar.wait()
    return TEST_IMAGE


def docker_image_or_skip() -> str:
    why = _docker_up()
    if why:
        skip_unavailable("docker", f"dockerd is not reachable ({why}); start it: bash scripts/setup.sh")
    return ensure_image()


@pytest.fixture(scope="session")
def image():
    return docker_image_or_skip()


def _mine() -> list[str]:
    with SyncClient() as c:
        cs = c.json("GET", "/containers/json", params={"all": True, "filters": {"name": [PREFIX]}})
    return [n.lstrip("/") for x in cs for n in x.get("Names", [])]


@pytest.fixture(autouse=True)
def nothing_left_behind():
    yield
    left = _mine()
    with SyncClient() as c:
        for n in left:
            c.request("DELETE", f"/containers/{n}", params={"force": True}, ok=(404, 409))
    assert not left, f"containers left behind: {left}"


def _name() -> str:
    return f"{PREFIX}-{uuid.uuid4().hex[:8]}"


def _printf_all_bytes(reverse: bool = False) -> str:
    vals = range(255, -1, -1) if reverse else range(256)
    return "".join(f"\\{v:03o}" for v in vals)


ALL = bytes(range(256))


# ---- the sans-IO parts -----------------------------------------------------------------------------------


def test_demuxer_reassembles_frames_split_anywhere():
    frames = [(1, b"hello"), (2, b""), (2, bytes(range(256))), (1, b"x" * 70000), (0, b"in")]
    wire = b"".join(bytes([s, 0, 0, 0]) + struct.pack(">I", len(p)) + p for s, p in frames)
    for step in (1, 3, 7, 8, 9, 4096, len(wire)):
        d = Demuxer()
        got = []
        for i in range(0, len(wire), step):
            got += d.feed(wire[i:i + step])
        assert got == [(1, b"hello"), (2, b""), (2, bytes(range(256))), (1, b"x" * 70000), (1, b"in")]
        assert d.pending == 0


def test_target_quotes_query_values():
    t = docker_api.target("/containers/json", {"all": True, "filters": {"label": ["a=b"]}, "x": None})
    assert t == "/v1.41/containers/json?all=1&filters=%7B%22label%22%3A%5B%22a%3Db%22%5D%7D"


# ---- connection errors -------------------------------------------------------------------------------------


def test_missing_socket_is_backend_unavailable(tmp_path):
    with pytest.raises(BackendUnavailable) as ei:
        SyncClient(str(tmp_path / "nope.sock")).request("GET", "/_ping")
    assert "does not exist" in ei.value.message
    assert ei.value.hint == "start dockerd: bash scripts/setup.sh"
    with pytest.raises(BackendUnavailable):
        asyncio.run(AsyncClient(str(tmp_path / "nope.sock")).request("GET", "/_ping"))


def test_stale_socket_is_backend_unavailable(tmp_path):
    path = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.close()  # the file stays, nobody listens: connection refused
    with pytest.raises(BackendUnavailable) as ei:
        SyncClient(path).request("GET", "/_ping")
    assert "dockerd is not running" in ei.value.message
    assert "bash scripts/setup.sh" in ei.value.hint


def test_docker_host_must_be_unix(monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", "tcp://127.0.0.1:2375")
    with pytest.raises(BackendUnavailable, match="not a unix socket"):
        docker_api.socket_path()
    monkeypatch.setenv("DOCKER_HOST", "unix:///run/other.sock")
    assert docker_api.socket_path() == "/run/other.sock"


# ---- requests against the engine -----------------------------------------------------------------------


def test_sync_requests_reuse_one_connection_and_parse_chunked(image):
    with SyncClient() as c:
        assert c.request("GET", "/_ping").body == b"OK"
        first = c._idle
        info = c.request("GET", "/info")  # dockerd sends /info chunked
        assert info.headers.get("transfer-encoding") == "chunked"
        assert info.json()["ServerVersion"]
        assert c._idle is first
        # the engine closing an idle connection is retried once on a fresh one
        first.shutdown(socket.SHUT_RDWR)
        assert c.json("GET", "/version")["ApiVersion"]
        assert c._idle is not first


def test_api_errors_map_to_exceptions(image):
    name = _name()
    with SyncClient() as c:
        with pytest.raises(NotFound) as ei:
            c.json("POST", "/containers/create", params={"name": name},
                   body={"Image": "agentkernel/no-such-image:never"})
        assert "No such image" in ei.value.message and "images build" in ei.value.hint
        with pytest.raises(NotFound, match="No such container"):
            c.json("GET", "/containers/akdt-missing-container/json")
        c.json("POST", "/containers/create", params={"name": name}, body={"Image": image, "Cmd": ["true"]})
        try:
            with pytest.raises(AlreadyExists, match="already in use"):
                c.json("POST", "/containers/create", params={"name": name}, body={"Image": image})
            with pytest.raises(InvalidState, match="not running"):
                c.request("POST", f"/containers/{name}/kill")
            with pytest.raises(SandboxError) as ei:
                c.request("POST", "/containers/create", body={"Image": image, "HostConfig": {"Memory": -5}})
            assert ei.value.status >= 400
        finally:
            c.request("DELETE", f"/containers/{name}", params={"force": True})
        assert c.request("DELETE", f"/containers/{name}", ok=(404,)).status == 404


def test_async_errors_and_concurrent_requests(image):
    async def main():
        api = AsyncClient()
        try:
            with pytest.raises(NotFound, match="No such image"):
                await api.json("POST", "/containers/create", params={"name": _name()},
                               body={"Image": "agentkernel/no-such-image:never"})
            pings = await asyncio.gather(*(api.request("GET", "/_ping") for _ in range(12)))
            assert all(p.body == b"OK" for p in pings)
            assert 1 <= len(api._idle) <= api.max_idle
            assert (await api.json("GET", "/info"))["ServerVersion"]
        finally:
            await api.aclose()

    asyncio.run(main())


def test_sync_attach_demuxes_binary_streams(image):
    """All 256 byte values on stdout, reversed on stderr, no trailing newline, kept separate."""
    name = _name()
    cmd = f"printf '{_printf_all_bytes()}'; printf '{_printf_all_bytes(True)}' >&2"
    with SyncClient() as c:
        c.json("POST", "/containers/create", params={"name": name},
               body={"Image": image, "Entrypoint": ["sh", "-c", cmd], "Cmd": [], "AttachStdout": True,
                     "AttachStderr": True, "HostConfig": {"NetworkMode": "none"}})
        try:
            stream = c.attach(name, stdin=False)
            waiter = c.open_call("POST", f"/containers/{name}/wait", params={"condition": "next-exit"})
            c.request("POST", f"/containers/{name}/start")
            out = {1: b"", 2: b""}
            for fd, data in stream.take_pending():
                out[fd] += data
            while (frames := stream.read_frames()) is not None:
                for fd, data in frames:
                    out[fd] += data
            stream.close()
            assert out[1] == ALL
            assert out[2] == ALL[::-1]
            assert waiter.finish(timeout=30).json()["StatusCode"] == 0
            waiter.close()
        finally:
            c.request("DELETE", f"/containers/{name}", params={"force": True}, ok=(404,))


def test_async_attach_stdin_with_eof_and_exit_code(image):
    """Binary stdin goes in raw; the half-close is the container's EOF; the exit code comes back."""
    name = _name()
    payload = os.urandom(300_000) + ALL

    async def main():
        api = AsyncClient()
        try:
            await api.json("POST", "/containers/create", params={"name": name}, body={
                "Image": image, "Entrypoint": ["sh", "-c", "cat; printf done >&2; exit 42"], "Cmd": [],
                "OpenStdin": True, "StdinOnce": True, "AttachStdin": True, "AttachStdout": True,
                "AttachStderr": True, "HostConfig": {"NetworkMode": "none"}})
            stream = await api.attach(name, stdin=True)
            await api.request("POST", f"/containers/{name}/start")
            out = {1: bytearray(), 2: bytearray()}

            async def reader():
                while (frame := await stream.read()) is not None:
                    out[frame[0]] += frame[1]

            task = asyncio.create_task(reader())
            for i in range(0, len(payload), 65536):
                await stream.write(payload[i:i + 65536])
            await stream.close_stdin()
            await asyncio.wait_for(task, 30)
            stream.close()
            res = await api.json("POST", f"/containers/{name}/wait", timeout=30)
            return bytes(out[1]), bytes(out[2]), res["StatusCode"]
        finally:
            await api.request("DELETE", f"/containers/{name}", params={"force": True}, ok=(404,))
            await api.aclose()

    stdout, stderr, code = asyncio.run(main())
    assert stdout == payload
    assert stderr == b"done"
    assert code == 42


def test_async_client_outlives_an_event_loop(image):
    """A client (a backend object) used from two ``asyncio.run`` calls keeps its idle connection."""
    api = AsyncClient()
    assert asyncio.run(api.request("GET", "/_ping")).body == b"OK"
    assert len(api._idle) == 1
    first = api._idle[0]
    assert asyncio.run(api.request("GET", "/_ping")).body == b"OK"
    assert api._idle[0] is first
    asyncio.run(api.aclose())
    assert api._idle == [] and first.fileno() == -1
