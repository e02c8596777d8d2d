"""File copy as tar streams through an exec'd ``tar`` (Kubernetes, Nomad): one member in, one member out.

``pack`` builds a one-file ustar archive (the path relative to ``/``, parents created by tar on
extraction); ``extract_argv`` / ``create_argv`` are the argvs that run inside the sandbox: paths are
arguments, never shell text. ``FileFromTar`` parses the archive ``tar c`` writes incrementally and yields
the file's bytes as they arrive (no buffering of the whole file).
"""

from __future__ import annotations

import asyncio
import io
import posixpath
import tarfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from ..errors import NotFound, SandboxError, ValidationError
from ..spec import check_sandbox_path
from .base import ExecRequest, ExecResult

# runs one request in the sandbox (a backend's exec, bound to its sandbox)
ExecFn = Callable[[ExecRequest], Awaitable[ExecResult]]


def split(path: str) -> tuple[str, str]:
    path = check_sandbox_path(path)
    parent, name = posixpath.split(posixpath.normpath(path))
    if not name:
        raise ValidationError(f"{path!r} names a directory, not a file")
    return parent or "/", name


def pack(path: str, data: bytes, mode: int) -> bytes:
    """A tar archive holding ``data`` at ``path`` (member name relative to /)."""
    check_sandbox_path(path)
    info = tarfile.TarInfo(posixpath.normpath(path).lstrip("/"))
    info.size = len(data)
    info.mode = mode & 0o7777
    info.mtime = int(time.time())
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def extract_argv() -> list[str]:
    # -o: do not restore owners (the sandbox user owns what it writes); members are relative to /
    return ["tar", "-x", "-o", "-f", "-", "-C", "/"]


def create_argv(path: str) -> list[str]:
    parent, name = split(path)
    return ["tar", "-c", "-f", "-", "-C", parent, "./" + name]


class FileFromTar:
    """Feed tar bytes with ``feed``; it returns the file content bytes found so far (first regular
    file member; a GNU long-name header is skipped)."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.remaining: int | None = None  # bytes of the current member still to come
        self.done = False
        self.kind: bytes | None = None

    def feed(self, data: bytes) -> bytes:
        self.buf += data
        out = bytearray()
        while not self.done:
            if self.remaining is None:
                if len(self.buf) < 512:
                    break
                hdr = bytes(self.buf[:512])
                del self.buf[:512]
                if hdr == b"\0" * 512:
                    self.done = True
                    break
                size = _octal(hdr[124:136])
                kind = hdr[156:157]
                if kind in (b"L", b"K", b"x", b"g"):  # long name / pax headers: skip their data
                    skip = size + (-size % 512)
                    self.remaining, self.kind = skip, b"skip"
                    continue
                if kind not in (b"0", b"\0", b"7"):
                    what = "a directory" if kind == b"5" else "not a regular file"
                    member = hdr[:100].rstrip(b"\0").decode(errors="replace")
                    raise ValidationError(f"cannot read {member!r}: {what}")
                self.remaining, self.kind = size, b"file"
                continue
            take = min(self.remaining, len(self.buf))
            if self.kind == b"file":
                out += self.buf[:take]
            del self.buf[:take]
            self.remaining -= take
            if self.remaining:
                break
            if self.kind == b"file":  # the one member we asked for is complete; the rest is padding
                self.done = True
                break
            self.remaining = None
        return bytes(out)


def _octal(field: bytes) -> int:
    if field[:1] == b"\x80":  # base-256 for huge files
        return int.from_bytes(field[1:], "big")
    s = field.rstrip(b"\0 ").strip()
    return int(s, 8) if s else 0


def read_error(path: str, exit_code: int, stderr: bytes) -> Exception:
    msg = stderr.decode(errors="replace").strip()
    if "No such file" in msg or "not found" in msg.lower() or "can't stat" in msg or "Cannot stat" in msg:
        return NotFound(f"no such file in the sandbox: {path}")
    return SandboxError(f"reading {path} failed (tar exit {exit_code}): {msg[-300:]}")


async def write_file(exec_fn: ExecFn, path: str, data: bytes | AsyncIterator[bytes], mode: int = 0o644) -> int:
    """Write ``data`` to ``path`` in the sandbox: one archive piped into an exec'd ``tar x``."""
    if not isinstance(data, bytes | bytearray):
        data = b"".join([bytes(c) async for c in data])
    archive = pack(path, bytes(data), mode)
    res = await exec_fn(ExecRequest(extract_argv(), stdin=archive, cwd="/"))
    if res.exit_code != 0:
        raise SandboxError(f"writing {path} failed: {res.stderr.decode(errors='replace').strip()[-300:]}")
    return len(data)


async def read_file(exec_fn: ExecFn, path: str) -> AsyncIterator[bytes]:
    """The bytes of ``path`` in the sandbox, streamed from an exec'd ``tar c`` as they arrive."""
    argv = create_argv(path)
    parser = FileFromTar()
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=16)
    stderr = bytearray()

    async def on_output(fd: int, data: bytes) -> None:
        if fd == 2:
            stderr.extend(data[:4096])
        elif chunk := parser.feed(data):
            await queue.put(chunk)

    async def run() -> ExecResult:
        try:
            return await exec_fn(ExecRequest(argv, cwd="/", on_output=on_output))
        finally:
            await queue.put(None)

    task = asyncio.create_task(run())
    try:
        while (chunk := await queue.get()) is not None:
            yield chunk
        res = await task
    finally:
        if not task.done():
            task.cancel()
    if res.exit_code != 0:
        raise read_error(path, res.exit_code, bytes(stderr))
    if not parser.done:
        raise SandboxError(f"reading {path}: the archive from the sandbox ended early")
