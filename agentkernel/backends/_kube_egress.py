"""The per-sandbox egress gateway on Kubernetes: its objects as pure functions (no I/O).

A sandbox with network mode ``allowlist`` or with secret bindings gets its own gateway (no state shared
between tenants), all named ``<sandbox pod>-egress`` (or a hash when that is too long) and carrying the
sandbox's owner labels plus ``agentkernel.egress-gateway=<sandbox pod>``:

- ``ConfigMap``: the gateway's code (``SHIPPED`` modules, standard library only, so any image with
  ``python3`` >= 3.11 runs it: ``[orchestrator] egress_gateway_image``), ``config.json`` (the rules,
  the placeholders, the Service's clusterIP, the cluster's ranges) and ``ca.pem`` (``egress_gateway_ca_file``);
- ``Secret``: the bound secrets' values, mounted read-only in the gateway pod only;
- ``Service`` (ClusterIP) selecting the gateway pod: 3128/tcp proxy, 80 and 443/tcp transparent entry
  points, 53/udp DNS (the gateway's resolver answers over UDP only, as on a host);
- the gateway ``Pod``: non-root, all capabilities dropped, read-only root, no service-account token,
  ``net.ipv4.ip_unprivileged_port_start=0`` (a namespaced sysctl in the ``baseline`` Pod Security set)
  so it binds 53/80/443 without privileges, a TCP readiness probe on the proxy port;
- its ``NetworkPolicy``: ingress only from the sandbox pod on those ports; egress to the internet minus
  metadata, link-local and the cluster's ranges, plus DNS to the cluster resolver (as ``open`` mode).

The sandbox pod's NetworkPolicy then allows egress only to the gateway pod (``sandbox_egress_rules``;
``open`` mode with secrets keeps its open rules and adds the gateway), its DNS is the gateway
(``dnsPolicy: None``, nameserver = the Service's clusterIP) and it gets the proxy variables and the
secret placeholders (``sandbox_env``), never a value.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from typing import Any

from ..spec import SandboxSpec
from . import _kube_manifest as km

LABEL_GATEWAY = "agentkernel.egress-gateway"  # on every gateway object: the sandbox pod it serves
CONTAINER = "gateway"
GATEWAY_UID = 65532
CODE_DIR = "/opt/agentkernel-egress"
CONFIG_DIR = "/etc/agentkernel-egress"
SECRETS_DIR = "/run/agentkernel-egress/secrets"
PROXY_PORT = 3128
PORTS = [("proxy", "TCP", PROXY_PORT), ("http", "TCP", 80), ("https", "TCP", 443), ("dns", "UDP", 53)]
# the modules the gateway imports (relative to the agentkernel package), shipped in its ConfigMap
SHIPPED = ("__init__.py", "errors.py", "_model.py", "paths.py", "audit.py", "_fastjson.py", "egress/gateway.py",
           "egress/rules.py", "egress/netns.py", "egress/pod_gateway.py")


def needed(spec: SandboxSpec) -> bool:
    """A sandbox needs a gateway when a destination must be checked by name or a secret substituted."""
    from ..spec import network_mode

    return network_mode(spec.policy) == "allowlist" or bool(spec.policy.secrets)


def gateway_name(pod_name: str) -> str:
    name = f"{pod_name}-egress"
    if len(name) <= 63:
        return name
    return f"ak-egress-{hashlib.sha256(pod_name.encode()).hexdigest()[:20]}"


def gateway_labels(sandbox_labels: dict[str, str], pod_name: str) -> dict[str, str]:
    """The sandbox's owner labels (so gc finds them by owner and id) minus its pool labels, plus the
    gateway mark; ``agentkernel.managed`` is dropped so list() never shows a gateway as a sandbox."""
    from .base import LABEL_MANAGED

    keep = {k: v for k, v in sandbox_labels.items()
            if k not in (LABEL_MANAGED, km.LABEL_POD, km.LABEL_POOL, km.LABEL_POOL_STATE)}
    return dict(keep, **{LABEL_GATEWAY: pod_name, km.LABEL_POD: gateway_name(pod_name)})


def _meta(name: str, ns: str, labels: dict[str, str], owner_refs: list[dict[str, Any]] | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": ns, "labels": dict(labels)}
    if owner_refs:
        meta["ownerReferences"] = owner_refs
    return meta


def shipped_code() -> dict[str, str]:
    """ConfigMap key -> source text of every module the gateway imports."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = {}
    for rel in SHIPPED:
        with open(os.path.join(root, rel)) as f:
            out["code." + rel.replace("/", ".")] = f.read()
    return out


def gateway_config(spec: SandboxSpec, sandbox_id: str, *, advertise: str, blocked: list[str]) -> dict[str, Any]:
    from ..egress.attach import placeholder
    from ..egress.rules import parse_binding
    from ..spec import network_mode

    secrets = []
    for text in spec.policy.secrets:
        b = parse_binding(text)
        secrets.append({"name": b.name, "host": b.host, "header": b.header,
                        "placeholder": placeholder(b.name, sandbox_id)})
    return {"id": sandbox_id, "name": spec.name, "mode": network_mode(spec.policy),
            "allow": list(spec.policy.network_allow), "block": list(spec.policy.network_block),
            "advertise": advertise, "blocked": list(blocked), "secrets": secrets}


def cluster_blocked(settings: dict[str, Any]) -> list[str]:
    """What the gateway refuses whatever the rules, besides metadata/link-local/loopback: the cluster's
    pod, service and node ranges ([orchestrator] cluster_cidrs; default the private ranges)."""
    cluster = settings.get("cluster_cidrs")
    return list(km.DEFAULT_CLUSTER_CIDRS if cluster is None else cluster)


def extra_ca(settings: dict[str, Any]) -> str | None:
    """The PEM of ``egress_gateway_ca_file`` (CAs the gateway trusts besides its image's, for the TLS it
    originates itself: ``http://HOST:443/`` through the proxy), or None; a ConfigError names the key."""
    from ..errors import ConfigError

    path = settings.get("egress_gateway_ca_file")
    if not path:
        return None
    try:
        with open(os.path.expanduser(str(path))) as f:
            pem = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"[orchestrator] egress_gateway_ca_file: cannot read {path!r}: {exc}") from None
    if "-----BEGIN CERTIFICATE-----" not in pem:
        raise ConfigError(f"[orchestrator] egress_gateway_ca_file: {path!r} holds no PEM certificate")
    return pem


def config_map(*, name: str, ns: str, labels: dict[str, str], config: dict[str, Any],
               owner_refs: list[dict[str, Any]] | None = None, ca_pem: str | None = None) -> dict[str, Any]:
    data = shipped_code()
    data["config.json"] = json.dumps(config, indent=1, sort_keys=True)
    if ca_pem:
        data["ca.pem"] = ca_pem
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(name, ns, labels, owner_refs), "data": data}


def secret(*, name: str, ns: str, labels: dict[str, str], values: dict[str, str],
           owner_refs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "immutable": True,
            "metadata": _meta(name, ns, labels, owner_refs),
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in sorted(values.items())}}


def service(*, name: str, ns: str, labels: dict[str, str],
            owner_refs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(name, ns, labels, owner_refs),
            "spec": {"type": "ClusterIP", "selector": {km.LABEL_POD: name},
                     "ports": [{"name": n, "protocol": proto, "port": port, "targetPort": port}
                               for n, proto, port in PORTS]}}


def gateway_pod(settings: dict[str, Any], *, name: str, ns: str, labels: dict[str, str], with_secrets: bool,
                owner_refs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    items = [{"key": "code." + rel.replace("/", "."), "path": "agentkernel/" + rel} for rel in SHIPPED]
    config_items = [{"key": "config.json", "path": "config.json"}]
    if settings.get("egress_gateway_ca_file"):
        config_items.append({"key": "ca.pem", "path": "ca.pem"})
    volumes: list[dict[str, Any]] = [
        {"name": "code", "configMap": {"name": name, "items": items, "defaultMode": 0o444}},
        {"name": "config", "configMap": {"name": name, "items": config_items, "defaultMode": 0o444}},
    ]
    mounts = [{"name": "code", "mountPath": CODE_DIR, "readOnly": True},
              {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}]
    command = ["python3", "-S", "-B", "-E", "-m", "agentkernel.egress.pod_gateway",
               "--config", f"{CONFIG_DIR}/config.json"]
    if with_secrets:
        volumes.append({"name": "secrets", "secret": {"secretName": name, "defaultMode": 0o440}})
        mounts.append({"name": "secrets", "mountPath": SECRETS_DIR, "readOnly": True})
        command += ["--secrets", SECRETS_DIR]
    env = [{"name": "PYTHONUNBUFFERED", "value": "1"}]
    if settings.get("egress_gateway_dns"):
        env.append({"name": "AGENTKERNEL_EGRESS_DNS", "value": str(settings["egress_gateway_dns"])})
    if settings.get("egress_gateway_ca_file"):
        env.append({"name": "AGENTKERNEL_EGRESS_CA_FILE", "value": f"{CONFIG_DIR}/ca.pem"})
    seccomp = {"type": "RuntimeDefault"}
    limits = {"cpu": settings.get("egress_gateway_cpu") or "250m",
              "memory": settings.get("egress_gateway_memory") or "64Mi"}
    container = {
        "name": CONTAINER, "image": settings["egress_gateway_image"], "imagePullPolicy": "IfNotPresent",
        "command": command, "workingDir": CODE_DIR, "env": env, "volumeMounts": mounts,
        "ports": [{"name": n, "protocol": proto, "containerPort": port} for n, proto, port in PORTS],
        "readinessProbe": {"tcpSocket": {"port": PROXY_PORT}, "periodSeconds": 1, "failureThreshold": 3},
        "resources": {"limits": limits, "requests": dict(limits)},
        "securityContext": {"allowPrivilegeEscalation": False, "privileged": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True, "runAsUser": GATEWAY_UID,
                            "runAsGroup": GATEWAY_UID, "seccompProfile": seccomp},
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    ps: dict[str, Any] = {
        "containers": [container], "volumes": volumes, "restartPolicy": "Always",
        "automountServiceAccountToken": False, "enableServiceLinks": False, "terminationGracePeriodSeconds": 2,
        "securityContext": {"runAsNonRoot": True, "runAsUser": GATEWAY_UID, "runAsGroup": GATEWAY_UID,
                            "fsGroup": GATEWAY_UID, "seccompProfile": seccomp,
                            "sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}]},
    }
    if settings.get("node_selector"):
        ps["nodeSelector"] = dict(settings["node_selector"])
    tol = [km.parse_toleration(t) for t in settings.get("tolerations") or []]
    if tol:
        ps["tolerations"] = tol
    return {"apiVersion": "v1", "kind": "Pod", "metadata": _meta(name, ns, labels, owner_refs), "spec": ps}


def _port_list() -> list[dict[str, Any]]:
    return [{"protocol": proto, "port": port} for _, proto, port in PORTS]


def gateway_network_policy(settings: dict[str, Any], *, name: str, ns: str, sandbox_pod: str,
                           labels: dict[str, str], owner_refs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Ingress: the sandbox pod only, on the gateway's ports. Egress: as open mode (the internet minus
    metadata, link-local and the cluster's ranges; DNS to the cluster resolver)."""
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": _meta(name, ns, labels, owner_refs),
        "spec": {"podSelector": {"matchLabels": {km.LABEL_POD: name}}, "policyTypes": ["Ingress", "Egress"],
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {km.LABEL_POD: sandbox_pod}}}],
                              "ports": _port_list()}],
                 "egress": km.egress_rules("open", settings)},
    }


def sandbox_egress_rules(mode: str, gateway: str, settings: dict[str, Any],
                         allow: list[str] | tuple[str, ...] = (), block: list[str] | tuple[str, ...] = ()
                         ) -> list[dict[str, Any]]:
    """The sandbox pod's egress: the gateway pod (its ports); open mode keeps its open rules. CIDR
    entries of an allowlist (``203.0.113.0/24[:PORT]``) are routed straight, as on a host: an ipBlock
    (TCP and UDP to PORT when given) minus the always-blocked ranges, the cluster's ranges and the block
    entries inside it; one wholly inside those is left out (blocking wins)."""
    import ipaddress

    from ..egress.rules import ALWAYS_BLOCKED_V4, ALWAYS_BLOCKED_V6, parse_entries

    to_gateway = {"to": [{"podSelector": {"matchLabels": {km.LABEL_POD: gateway}}}], "ports": _port_list()}
    if mode == "open":
        return [*(km.egress_rules("open", settings) or []), to_gateway]
    rules = [to_gateway]
    fence = [ipaddress.ip_network(n) for n in (*ALWAYS_BLOCKED_V4, *ALWAYS_BLOCKED_V6, *cluster_blocked(settings))]
    fence += [e.net for e in parse_entries(list(block), "block") if e.net is not None]
    for e in parse_entries(list(allow), "allow"):
        if e.net is None or any(e.net.version == f.version and e.net.subnet_of(f) for f in fence):
            continue
        inside = sorted({str(f) for f in fence if f.version == e.net.version and f.subnet_of(e.net)})
        block_ = {"cidr": str(e.net), **({"except": inside} if inside else {})}
        rule: dict[str, Any] = {"to": [{"ipBlock": block_}]}
        if e.port is not None:
            rule["ports"] = [{"protocol": "TCP", "port": e.port}, {"protocol": "UDP", "port": e.port}]
        rules.append(rule)
    return rules


def sandbox_env(spec: SandboxSpec, sandbox_id: str, cluster_ip: str) -> dict[str, str]:
    """Proxy variables naming the gateway, and a placeholder per bound secret (never its value)."""
    from ..egress.attach import placeholder
    from ..egress.rules import parse_binding
    from ..spec import network_mode

    env: dict[str, str] = {}
    if network_mode(spec.policy) == "allowlist" or spec.policy.secrets:
        proxy = f"http://{cluster_ip}:{PROXY_PORT}"
        for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
            env[k] = proxy
        env["NO_PROXY"] = env["no_proxy"] = "localhost,127.0.0.1,::1"
    for text in spec.policy.secrets:
        b = parse_binding(text)
        env[b.name] = placeholder(b.name, sandbox_id)
    return env


def sandbox_dns(cluster_ip: str) -> dict[str, Any]:
    """PodSpec fields: the gateway is the sandbox's only resolver."""
    return {"dnsPolicy": "None", "dnsConfig": {"nameservers": [cluster_ip], "searches": [],
                                               "options": [{"name": "ndots", "value": "1"}]}}
