"""Who owns a leased pool member: the client that runs in it, not the daemon that lent it.

While a client (an ``agentkernel run`` process) holds a lease, the member's ownership-journal entry
names that client (its pid and start time, from the unix socket's peer credentials). If the daemon is
SIGKILLed meanwhile, the next daemon's start-up reaper sees a live owner and leaves the run alone (the
engine labels still name the dead daemon; ``gc`` lets a live journal owner win over labels). When the
lease ends normally the daemon destroys the member and drops the entry, as before; when the daemon died,
the member is reaped by the first command after the client itself has exited.
"""

from __future__ import annotations

import socket
import struct

from .. import owner


def peer_pid(writer) -> int | None:
    sock = writer.get_extra_info("socket")
    if sock is None:
        return None
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid, _uid, _gid = struct.unpack("3i", creds)
    return pid if pid > 0 else None


def hand_to_client(backend: str, ref, writer) -> dict | None:
    """The journal entry of ``ref`` goes to the peer process of ``writer`` (``owner.lend``: one rename; a
    new claim for it when the daemon's own entry is not where it should be). Returns that client as an
    owner (the member's entry is released under its name if it never hands it back), or None when it
    cannot be told (nothing changes)."""
    pid = peer_pid(writer)
    if pid is None:
        return None
    client = owner.owner_of_pid(pid)
    if not client.get("start"):
        return None
    if not owner.lend(backend, ref.id, client):
        owner.claim(backend, ref.id, ref.handle, client)
    return client


def hand_back_names(backend: str, ref, client: dict | None, daemon: dict) -> list[str] | None:
    """The member's journal entry as lent to ``client`` and as ``daemon``'s: the client renames the first to
    the second as its lease ends (``owner.hand_back`` without reading ``/proc`` or listing the journal)."""
    if client is None:
        return None
    return [owner.entry_name(backend, ref.id, client), owner.entry_name(backend, ref.id, daemon)]
