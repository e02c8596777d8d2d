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


def hand_to_client(backend: str, ref, writer) -> None:
    """Re-claim ``ref`` in the journal for the peer process of ``writer`` (no-op if it cannot be told)."""
    pid = peer_pid(writer)
    if pid is None:
        return
    client = owner.owner_of_pid(pid)
    if client.get("start"):
        owner.claim(backend, ref.id, ref.handle, client)
