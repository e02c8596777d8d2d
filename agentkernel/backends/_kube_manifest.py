"""SandboxSpec -> Kubernetes objects (Pod, NetworkPolicy, agent-sandbox SandboxTemplate/WarmPool/Claim).

Pure functions, no I/O: the manifests are validated against the real OpenAPI schemas in tests
(``kubernetes-validate``). Every sandbox pod is hardened the same way whatever the profile:

- runs as the spec's uid/gid with ``runAsNonRoot`` (uid 0 only when the spec asks for it), all
  capabilities dropped, ``allowPrivilegeEscalation: false``, not privileged, seccomp ``RuntimeDefault``
  (a ``Localhost`` profile for ``seccomp = restrictive`` when the cluster has one installed),
- read-only root filesystem per the profile; ``emptyDir`` volumes at /tmp and the working directory
  (size-capped under a read-only root, where they are the only writable places),
- no service-account token, no service links, its own hostname, ``restartPolicy: Never``,
- CPU/memory requests = limits (Guaranteed QoS), ``ephemeral-storage`` limit for a writable root,
- an optional RuntimeClass (gVisor, Kata), node selector and tolerations.

Each sandbox also gets a NetworkPolicy named like its pod and selecting it by the pod-name label (which
never changes, even when a warm pod is claimed): ingress is always denied; egress too unless the policy
allows network. It is created before the pod and is also the sandbox's durable record while stopped.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

from ..spec import DEFAULT_TMPFS_MB, SandboxSpec

CONTAINER = "sandbox"
LABEL_POD = "agentkernel.pod"          # the pod's own name: what its NetworkPolicy selects
LABEL_POOL = "agentkernel.pool"        # pool key of a warm pod
LABEL_POOL_STATE = "agentkernel.pool-state"  # "free" or "claimed"
ANNOTATION_PREFIX = "agentkernel.dev/"
# PID 1 of every sandbox pod: sleeps, exits at once on SIGTERM (pod deletion is immediate)
IDLE_COMMAND = ["/bin/sh", "-c", "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done"]

_LABEL_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
_DNS_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")


def label_value(v: str) -> str:
    """A valid label value for v: v itself when it is one, else a stable hash (the raw value goes into an
    annotation)."""
    if v == "" or (len(v) <= 63 and set(v) <= _LABEL_CHARS and v[0].isalnum() and v[-1].isalnum()):
        return v
    return "h-" + hashlib.sha256(v.encode()).hexdigest()[:40]


def pod_name(sandbox_id: str) -> str:
    """DNS-1123 label (<= 63 chars) derived from the sandbox id, unique per id."""
    base = sandbox_id.lower().replace("_", "-")
    name = "ak-" + base
    if name == "ak-" + sandbox_id and len(name) <= 63 and set(base) <= _DNS_CHARS:
        return name
    digest = hashlib.sha256(sandbox_id.encode()).hexdigest()[:10]
    head = "".join(c for c in base if c in _DNS_CHARS)[:40].strip("-")
    return f"ak-{head}-{digest}" if head else f"ak-{digest}"


def labels_and_annotations(raw: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    labels = {k: label_value(v) for k, v in raw.items()}
    annotations = {ANNOTATION_PREFIX + k: v for k, v in raw.items() if labels[k] != v}
    return labels, annotations


def quantity_cpu(vcpus: float) -> str:
    return f"{max(1, math.ceil(vcpus * 1000))}m"


def resources(spec: SandboxSpec) -> dict[str, Any]:
    res = spec.resources
    limits: dict[str, str] = {}
    if res.vcpus is not None:
        limits["cpu"] = quantity_cpu(res.vcpus)
    if res.memory_mb is not None:
        limits["memory"] = f"{res.memory_mb}Mi"
    if res.disk_mb is not None and not spec.policy.read_only_root:
        limits["ephemeral-storage"] = f"{res.disk_mb}Mi"
    out: dict[str, Any] = {}
    if limits:
        out = {"limits": limits, "requests": dict(limits)}
    return out


def _user(spec: SandboxSpec) -> tuple[int, int]:
    uid, _, gid = spec.policy.user.partition(":")
    return int(uid), int(gid or uid)


def pod_spec(spec: SandboxSpec, settings: dict[str, Any]) -> dict[str, Any]:
    """The PodSpec of one sandbox (also the podTemplate of an agent-sandbox SandboxTemplate)."""
    uid, gid = _user(spec)
    seccomp: dict[str, Any] = {"type": "RuntimeDefault"}
    if spec.policy.seccomp == "restrictive":
        seccomp = {"type": "Localhost", "localhostProfile": settings["seccomp_localhost_profile"]}
    csc: dict[str, Any] = {
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": bool(spec.policy.read_only_root),
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": uid != 0,
        "runAsUser": uid,
        "runAsGroup": gid,
        "seccompProfile": seccomp,
    }
    # /tmp and the working directory are emptyDirs (writable by the sandbox user whatever the image's
    # ownership; under a read-only root the only writable places, each capped at disk_mb)
    volumes, mounts = [], []
    empty: dict[str, Any] = {}
    if spec.policy.read_only_root:
        empty = {"sizeLimit": f"{spec.resources.disk_mb or DEFAULT_TMPFS_MB}Mi"}
    for i, path in enumerate(dict.fromkeys(["/tmp", spec.workdir])):
        vname = f"scratch-{i}"
        volumes.append({"name": vname, "emptyDir": dict(empty)})
        mounts.append({"name": vname, "mountPath": path})
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image,
        "imagePullPolicy": "IfNotPresent",
        "command": list(IDLE_COMMAND),
        "workingDir": spec.workdir,
        "env": [{"name": k, "value": v} for k, v in spec.env.items()],
        "securityContext": csc,
        "resources": resources(spec),
        "volumeMounts": mounts,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    ps: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "hostname": spec.hostname,
        "terminationGracePeriodSeconds": 2,
        "securityContext": {
            "runAsNonRoot": uid != 0, "runAsUser": uid, "runAsGroup": gid, "fsGroup": gid,
            "seccompProfile": seccomp,
        },
    }
    if settings.get("runtime_class"):
        ps["runtimeClassName"] = settings["runtime_class"]
    if settings.get("service_account"):
        ps["serviceAccountName"] = settings["service_account"]
    if settings.get("node_selector"):
        ps["nodeSelector"] = dict(settings["node_selector"])
    tol = [parse_toleration(t) for t in settings.get("tolerations") or []]
    if tol:
        ps["tolerations"] = tol
    return ps


def parse_toleration(text: str) -> dict[str, str]:
    """"key=value:Effect", "key:Effect", "key=value" (NoSchedule) or "key" (Exists, NoSchedule)."""
    from ..errors import ConfigError

    body, _, effect = text.partition(":")
    key, eq, value = body.partition("=")
    effect = effect or "NoSchedule"
    if not key or effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute"):
        raise ConfigError(f"invalid toleration {text!r}: use key[=value][:NoSchedule|PreferNoSchedule|NoExecute]")
    t = {"key": key, "operator": "Equal" if eq else "Exists", "effect": effect}
    if eq:
        t["value"] = value
    return t


def pod(spec: SandboxSpec, settings: dict[str, Any], *, name: str, namespace: str, labels: dict[str, str],
        annotations: dict[str, str], owner_refs: list[dict[str, Any]] | None = None,
        extra_env: dict[str, str] | None = None, extra_spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """``extra_env`` / ``extra_spec``: what an egress gateway adds (proxy variables and secret
    placeholders; the gateway as the pod's resolver)."""
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": dict(labels, **{LABEL_POD: name}),
                            "annotations": dict(annotations)}
    if owner_refs:
        meta["ownerReferences"] = owner_refs
    ps = pod_spec(spec, settings)
    if extra_env:
        env = ps["containers"][0]["env"]
        env[:] = [e for e in env if e["name"] not in extra_env] + [{"name": k, "value": v}
                                                                   for k, v in extra_env.items()]
    ps.update(extra_spec or {})
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": ps}


# Destinations an open-mode pod never reaches (besides every sandbox pod's own ingress deny): cloud
# metadata and link-local, loopback, multicast/reserved, and the cluster's own ranges ([orchestrator]
# cluster_cidrs; default: the private ranges, where pod, service and node networks live).
OPEN_EXCEPT_V4 = ("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "168.63.129.16/32", "100.100.100.200/32",
                  "224.0.0.0/4", "240.0.0.0/4")
OPEN_EXCEPT_V6 = ("fe80::/10", "fd00:ec2::254/128", "ff00::/8", "::1/128")
DEFAULT_CLUSTER_CIDRS = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")
DNS_PORTS = [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]


def egress_rules(mode: str, settings: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The NetworkPolicy egress rules of a network mode: [] (deny all) for none; for open, the whole
    address space except OPEN_EXCEPT_* and the cluster's ranges, plus DNS to the cluster resolver
    (kube-dns pods, which sit inside those ranges). Allowlist has no NetworkPolicy of its own (``None``):
    a NetworkPolicy cannot name hosts, so the sandbox's egress goes to its gateway (``_kube_egress``)."""
    import ipaddress

    if mode == "none":
        return []
    if mode != "open":
        return None
    cluster = settings.get("cluster_cidrs")
    nets = [ipaddress.ip_network(n) for n in (DEFAULT_CLUSTER_CIDRS if cluster is None else cluster)]
    v4 = sorted({*OPEN_EXCEPT_V4, *(str(n) for n in nets if n.version == 4)})
    v6 = sorted({*OPEN_EXCEPT_V6, *(str(n) for n in nets if n.version == 6)})
    dns_ns = settings.get("cluster_dns_namespace") or "kube-system"
    dns_labels = settings.get("cluster_dns_labels") or {"k8s-app": "kube-dns"}
    return [
        {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": v4}}, {"ipBlock": {"cidr": "::/0", "except": v6}}]},
        {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": dns_ns}},
                 "podSelector": {"matchLabels": dict(dns_labels)}}],
         "ports": [dict(p) for p in DNS_PORTS]},
    ]


def network_policy(*, name: str, namespace: str, mode: str, labels: dict[str, str],
                   annotations: dict[str, str] | None = None, owner_refs: list[dict[str, Any]] | None = None,
                   settings: dict[str, Any] | None = None,
                   egress: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The sandbox pod's NetworkPolicy: all ingress denied; egress per network mode (``egress_rules``),
    or ``egress`` as given (to the sandbox's egress gateway: ``_kube_egress.sandbox_egress_rules``)."""
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": dict(labels),
                            "annotations": dict(annotations or {})}
    if owner_refs:
        meta["ownerReferences"] = owner_refs
    if egress is None:
        egress = egress_rules(mode, settings or {})
    if egress is None:
        raise ValueError(f"network mode {mode} has no NetworkPolicy mapping")
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": meta,
        "spec": {
            "podSelector": {"matchLabels": {LABEL_POD: name}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [],
            "egress": egress,
        },
    }


# ---- agent-sandbox (kubernetes-sigs/agent-sandbox) ----------------------------------------------------
AGENTS_GROUP = "agents.x-k8s.io"
EXTENSIONS_GROUP = "extensions.agents.x-k8s.io"
AGENTS_VERSION = "v1beta1"
POD_NAME_ANNOTATION = "agents.x-k8s.io/pod-name"


def sandbox_template(spec: SandboxSpec, settings: dict[str, Any], *, name: str, namespace: str,
                     labels: dict[str, str]) -> dict[str, Any]:
    from ..spec import network_mode

    np: dict[str, Any] = {"ingress": [], "egress": egress_rules(network_mode(spec.policy), settings)}
    return {
        "apiVersion": f"{EXTENSIONS_GROUP}/{AGENTS_VERSION}",
        "kind": "SandboxTemplate",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
        "spec": {
            "podTemplate": {"metadata": {"labels": dict(labels)}, "spec": pod_spec(spec, settings)},
            "networkPolicyManagement": "Managed",
            "networkPolicy": np,
        },
    }


def sandbox_warm_pool(*, name: str, namespace: str, template: str, replicas: int,
                      labels: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": f"{EXTENSIONS_GROUP}/{AGENTS_VERSION}",
        "kind": "SandboxWarmPool",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
        "spec": {"replicas": replicas, "sandboxTemplateRef": {"name": template}},
    }


def sandbox_claim(*, name: str, namespace: str, warm_pool: str, labels: dict[str, str],
                  annotations: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": f"{EXTENSIONS_GROUP}/{AGENTS_VERSION}",
        "kind": "SandboxClaim",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels), "annotations": dict(annotations)},
        "spec": {"warmPoolRef": {"name": warm_pool},
                 "additionalPodMetadata": {"labels": dict(labels), "annotations": dict(annotations)}},
    }
