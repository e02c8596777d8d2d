"""A writer for the "newc" cpio format the Linux kernel unpacks as an initramfs (no cpio binary needed)."""

from __future__ import annotations

import stat


class NewcWriter:
    """Entries are written in the order added; parents must be added before their children."""

    def __init__(self, f) -> None:
        self.f = f
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", *, rdev: tuple[int, int] = (0, 0),
               uid: int = 0, gid: int = 0, nlink: int = 1) -> None:
        nameb = name.encode() + b"\0"
        fields = (self.ino, mode, uid, gid, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(nameb), 0)
        self.ino += 1
        hdr = b"070701" + b"".join(b"%08X" % v for v in fields)
        self.f.write(hdr + nameb + b"\0" * (-(len(hdr) + len(nameb)) % 4))
        self.f.write(data + b"\0" * (-len(data) % 4))

    def dir(self, name: str, mode: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | mode, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def close(self) -> None:
        self._entry("TRAILER!!!", 0, nlink=1)
