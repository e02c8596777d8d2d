"""Remove egress plumbing nobody owns any more (``agentkernel gc`` and the daemon's start-up scan).

What a killed owner can leave (a CLI SIGKILLed between attach and its engine's start, a runtime dir wiped
under a running installation, an engine that lost a container): registrations and address leases in
``<runtime dir>/egress``, network namespaces ``ak-<id>`` with their veth ``akv<id>`` on our bridge, and,
once nothing is attached, the bridge ``akeg<tag>`` and the two host tables ``agentkernel_egress_<tag>``.

Rules, all fail-safe (anything in doubt is kept):

- a registration is released when no backend lists its sandbox, the backend it was made for answered
  the scan, no process lives in its namespace, and it is older than ``GRACE`` seconds (an attach in
  progress has not reached its engine yet);
- a veth on our bridge (and its namespace) without any registration, older than ``GRACE``, goes too;
- with no registration and no lease left (checked under ``use.lock``, which every attach holds while it
  leases), the idle gateway is stopped and the bridge and host tables are removed;
- another installation's bridge (``/run/agentkernel-egress/<tag>.json`` names its runtime dir) whose
  runtime dir is gone is removed with its veths, namespaces and tables.
"""

from __future__ import annotations

import json
import os
import time

from . import netns
from .netns import INSTALLATIONS, Use

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator

GRACE = 60.0  # seconds: younger records may belong to an attach whose engine has not listed it yet
def _records(d: str) -> Iterator[tuple[str, dict, float]]:
    base = os.path.join(d, "by-id")
    for short in os.listdir(base):
        path = os.path.join(base, short)
        try:
            with open(path) as f:
                rec = json.load(f)
            age = time.time() - os.stat(path).st_mtime
        except (OSError, ValueError):
            continue
        yield short, rec, age


def _netns_has_processes(name: str) -> bool:
    r = netns._run(["ip", "netns", "pids", name], check=False)
    return bool(r.stdout.strip())


def _links() -> list[dict]:
    r = netns._run(["ip", "-j", "link", "show"], check=False)
    try:
        return json.loads(r.stdout or "[]")
    except ValueError:
        return []


def _age(path: str) -> float:
    try:
        return time.time() - os.stat(path).st_mtime
    except OSError:
        return GRACE + 1


def _drop_sandbox_plumbing(short: str, dry_run: bool, out: list[str]) -> None:
    name, veth = f"ak-{short}", f"akv{short}"
    if os.path.exists(os.path.join(netns.NETNS_DIR, name)):
        out.append(f"netns {name}")
        if not dry_run:
            netns._run(["ip", "netns", "del", name], check=False)
    if os.path.exists(f"/sys/class/net/{veth}"):
        out.append(f"link {veth}")
        if not dry_run:
            netns._run(["ip", "link", "del", veth], check=False)


def _drop_bridge(tag: str, bridge: str, dry_run: bool, out: list[str]) -> None:
    t = f"agentkernel_egress_{tag}"
    if os.path.exists(f"/sys/class/net/{bridge}"):
        out.append(f"bridge {bridge}")
        if not dry_run:
            netns._run(["ip", "link", "del", bridge], check=False)
    for fam in ("ip", "inet"):
        if netns._run(["nft", "list", "table", fam, t], check=False).returncode == 0:
            out.append(f"nft table {fam} {t}")
            if not dry_run:
                netns._run(["nft", "delete", "table", fam, t], check=False)


def sweep(listed: set[str], answered: set[str], all_answered: bool, dry_run: bool = False) -> list[str]:
    """Remove what no live sandbox uses; returns what was (or would be) removed. ``listed``: sandbox ids
    some backend listed; ``answered``: backends whose listing succeeded; ``all_answered``: every scanned
    backend answered (records without a backend name are only released then)."""
    from .. import paths
    from . import attach, gateway_ctl

    if os.geteuid() != 0 or not (os.path.isdir(os.path.join(paths.runtime_dir(), "egress"))
                                 or os.path.isdir(INSTALLATIONS)):
        return []
    out: list[str] = []
    d = netns.state_dir()
    kept: set[str] = set()
    for short, rec, age in _records(d):
        sid = rec.get("id", "")
        backend = rec.get("backend")
        gone = sid not in listed and (backend in answered if backend else all_answered)
        if gone and age > GRACE and not _netns_has_processes(f"ak-{short}"):
            out.append(f"egress {sid}")
            if not dry_run:
                attach.release(sid)
        else:
            kept.add(short)
    net = _our_net(d)
    links = _links()
    if net is not None:
        for link in links:
            ifname = link.get("ifname", "")
            if link.get("master") == net["bridge"] and ifname.startswith("akv"):
                short = ifname[3:]
                if short not in kept and _age(os.path.join(d, "by-id", short)) > GRACE \
                        and not _netns_has_processes(f"ak-{short}"):
                    _drop_sandbox_plumbing(short, dry_run, out)
        with Use(exclusive=True) as free:
            if free and not dry_run:
                leases = os.listdir(os.path.join(d, "leases"))
                if not kept and not leases and not list(_records(d)):
                    gateway_ctl.stop()
                    _drop_bridge(net["tag"], net["bridge"], dry_run, out)
                    try:
                        os.unlink(os.path.join(d, "net.json"))
                    except OSError:
                        pass
    out += _sweep_other_installations(links, dry_run)
    return out


def _our_net(d: str) -> dict | None:
    try:
        with open(os.path.join(d, "net.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _sweep_other_installations(links: list[dict], dry_run: bool) -> list[str]:
    from .. import paths

    out: list[str] = []
    try:
        names = os.listdir(INSTALLATIONS)
    except OSError:
        return out
    mine = os.path.realpath(paths.runtime_dir())
    for fn in names:
        if not fn.endswith(".json"):
            continue
        path = os.path.join(INSTALLATIONS, fn)
        try:
            with open(path) as f:
                inst = json.load(f)
        except (OSError, ValueError):
            continue
        rdir = inst.get("runtime_dir", "")
        if rdir == mine or os.path.exists(os.path.join(rdir, "egress", "net.json")):
            continue  # ours (handled above) or alive
        bridge = inst.get("bridge", "")
        for link in links:
            ifname = link.get("ifname", "")
            if link.get("master") == bridge and ifname.startswith("akv"):
                _drop_sandbox_plumbing(ifname[3:], dry_run, out)
        _drop_bridge(inst.get("tag", ""), bridge, dry_run, out)
        if not dry_run:
            try:
                os.unlink(path)
            except OSError:
                pass
    return out
