"""The egress gateway of one Kubernetes sandbox, run in a pod of its own (standard library only).

The kubernetes backend ships this file and the modules it imports in a ConfigMap (``SHIPPED``) and
runs it with the ``egress_gateway_image``'s ``python3`` (3.11+; nothing else is needed)::

    python3 -S -B -E -m agentkernel.egress.pod_gateway --config /etc/agentkernel-egress/config.json

The same ``Gateway`` as on a host (forward proxy on 3128, transparent HTTP/TLS on 80/443, a resolver on
53/udp answering only allowed names), with three differences:

- one sandbox per gateway: every client is that sandbox (the gateway pod's NetworkPolicy admits only
  the sandbox pod), its rules come from ``config.json``;
- secret values are files of a Kubernetes Secret mounted only in this pod (``--secrets DIR``, one file
  per secret name); the sandbox has only the placeholders;
- audit events are JSON lines on stdout (``kubectl logs``); the backend copies them into the local
  audit log when the sandbox is removed.

config.json: ``{"id", "name", "mode", "allow", "block", "advertise" (the Service's clusterIP, what
allowed names resolve to), "blocked" (CIDRs refused whatever the rules: the cluster's ranges), "secrets":
[{"name", "host", "header", "placeholder"}]}``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

from .gateway import DNSProtocol, Gateway, Sandbox
from .rules import always_blocked

TCP_PORTS = (3128, 80, 443)
DNS_PORT = 53


class PodGateway(Gateway):
    def __init__(self, config: dict, secrets_dir: str | None) -> None:
        super().__init__("/nonexistent", "0.0.0.0")
        secrets = []
        for s in config.get("secrets", []):
            with open(os.path.join(secrets_dir or "/nonexistent", s["name"])) as f:
                secrets.append(dict(s, value=f.read().strip("\r\n")))
        reg = {"id": config["id"], "name": config.get("name"), "ip": "*", "mode": config["mode"],
               "allow": config.get("allow", []), "block": config.get("block", []), "secrets": secrets}
        self.only = Sandbox(reg, 0.0)
        self.advertise = config["advertise"]
        self.blocked = always_blocked(list(config.get("blocked", [])))

    def sandbox(self, ip: str) -> Sandbox:
        return self.only

    def refresh_blocked(self) -> None:
        """Fixed for the pod's lifetime (the cluster's ranges come with the config)."""

    def audit(self, event: str, **fields: object) -> None:
        line = json.dumps({"ts": round(time.time(), 6), "event": event, **fields}, default=str)
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    async def serve(self, ready_fd: int | None = None) -> None:
        loop = asyncio.get_running_loop()
        for port in TCP_PORTS:
            await asyncio.start_server(lambda r, w, p=port: self.handle(r, w, p), "0.0.0.0", port,
                                       reuse_address=True, backlog=512)
        await loop.create_datagram_endpoint(lambda: DNSProtocol(self), local_addr=("0.0.0.0", DNS_PORT))
        self.audit("network.gateway_ready", id=self.only.id, sandbox=self.only.label, mode=self.only.mode)
        await asyncio.Event().wait()


def main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="agentkernel-pod-egress-gateway")
    ap.add_argument("--config", required=True)
    ap.add_argument("--secrets")
    a = ap.parse_args(argv)
    with open(a.config) as f:
        config = json.load(f)
    try:
        asyncio.run(PodGateway(config, a.secrets).serve())
    except OSError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
