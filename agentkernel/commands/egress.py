"""``agentkernel secret set|get|list|rm NAME`` and ``agentkernel logs NAME --network``."""

from __future__ import annotations

import sys


def add_parsers(sub, want) -> None:
    if want("secret"):
        p = sub.add_parser("secret", help="store secrets the egress gateway substitutes for placeholders")
        p.add_argument("action", choices=["set", "get", "list", "rm", "delete"])
        p.add_argument("name", nargs="?")
    if want("logs"):
        p = sub.add_parser("logs", help="a sandbox's audit events (--network: its egress decisions)")
        p.add_argument("name", help="sandbox name or id")
        p.add_argument("--network", action="store_true", help="only network events (denials, secrets, DNS)")
        p.add_argument("-l", "--last", type=int, default=200)
        p.add_argument("--json", action="store_true")


def secret_cmd(args) -> int:
    import os

    from .. import config
    from ..egress import secrets

    cfg = config.load_config(config.find_config(None, os.getcwd()))
    backend = cfg.get("secrets", {}).get("backend")
    if backend and backend != "auto" and "AGENTKERNEL_SECRETS_BACKEND" not in os.environ:
        os.environ["AGENTKERNEL_SECRETS_BACKEND"] = backend

    if args.action == "list":
        for n in secrets.names():
            print(n)
        return 0
    if not args.name:
        sys.stderr.write(f"agentkernel: error: secret {args.action} needs a NAME\n")
        return 2
    if args.action == "set":
        value = sys.stdin.read()
        if value.endswith("\n"):
            value = value[:-1]
        where = secrets.put(args.name, value)
        how = "OS keyring" if where == "keyring" else "file, 0600, plain text"
        sys.stderr.write(f"agentkernel: secret {args.name} stored ({how})\n")
        return 0
    if args.action == "get":
        sys.stdout.write(secrets.get(args.name) + "\n")
        return 0
    secrets.remove(args.name)
    return 0


def logs_cmd(args) -> int:
    import json

    from .. import audit

    events = audit.read(args.name)
    if args.network:
        events = [e for e in events if str(e.get("event", "")).startswith("network.")]
    live = _live_denials(args.name) + _gateway_events(args.name) if args.network else []
    events = (events + live)[-args.last:] if args.last else events + live
    for e in events:
        if args.json:
            print(json.dumps(e, sort_keys=True))
            continue
        import time

        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(e.get("ts", 0)))
        ev = e.get("event")
        if ev == "network.denied":
            port = f":{e['port']}" if e.get("port") else ""
            print(f"{ts} DENY  {e.get('via')}: {e.get('dest')}{port}  ({e.get('rule')})")
        elif ev == "network.secret":
            print(f"{ts} SECRET {e.get('secret')} -> {e.get('host')}")
        elif ev == "network.secret_withheld":
            print(f"{ts} WITHHELD {e.get('secret')} (placeholder sent to unbound host {e.get('host')})")
        else:
            rest = {k: v for k, v in e.items() if k not in ("ts", "event", "pid", "uid")}
            print(f"{ts} {ev} {json.dumps(rest, sort_keys=True)}")
    return 0


def _gateway_events(name: str) -> list[dict]:
    """A live cluster sandbox's egress decisions, read from its own egress gateway (kubernetes: the
    gateway pod's log; copied into the audit log only when the sandbox is removed)."""
    import asyncio
    import sys

    from ..store import Store

    try:
        rec = Store(readonly=True).find(name)
    except Exception:
        return []
    if rec is None or rec.backend != "kubernetes":
        return []
    from ..backends import get_backend
    from ..backends.base import SandboxRef
    from ..spec import SandboxSpec

    backend = get_backend(rec.backend, (rec.spec or {}).get("options") or {})
    ref = SandboxRef(rec.backend, rec.id, rec.handle, SandboxSpec.from_dict(rec.spec))

    async def read() -> list[dict]:
        try:
            return await backend.network_events(ref)
        finally:
            await backend.aclose()

    try:
        return asyncio.run(read())
    except Exception as exc:
        sys.stderr.write(f"agentkernel: the egress gateway's events of {name} could not be read: {exc}\n")
        return []


def _live_denials(name: str) -> list[dict]:
    """Firewall refusals of a running sandbox, not yet logged (they are logged at its removal)."""
    import json
    import os

    from .. import paths
    from ..egress import netns

    d = os.path.join(paths.runtime_dir(), "egress", "sb")
    out = []
    try:
        regs = os.listdir(d)
    except OSError:
        return []
    for fn in regs:
        try:
            with open(os.path.join(d, fn)) as f:
                reg = json.load(f)
        except (OSError, ValueError):
            continue
        if name not in (reg.get("name"), reg.get("id")):
            continue
        for addr, port in netns.denied_in_netns(reg["id"]):
            out.append({"ts": 0, "event": "network.denied", "sandbox": name, "dest": addr, "port": port,
                        "via": "firewall", "rule": "direct connection outside the gateway (live)"})
    return out
