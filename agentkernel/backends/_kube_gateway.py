"""Create, restart and delete a sandbox's egress gateway on Kubernetes (the objects: ``_kube_egress``).

Order on create, so that no moment exists where the sandbox pod runs without its fence and nothing is
left that gc cannot find:

1. the sandbox's NetworkPolicy (egress only to the gateway pod; also the sandbox's durable record, so a
   crash after this point leaves a "stopped" sandbox that ``gc``/``rm`` clean up with everything below);
2. the gateway's Service (its clusterIP goes into the gateway's config and the sandbox's DNS), Secret
   (only when secrets are bound), ConfigMap, NetworkPolicy and Pod, each owned by the sandbox's
   NetworkPolicy (the cluster's garbage collector removes them with it);
3. wait until the gateway pod is Ready (its readiness probe: the proxy port accepts connections);
   if it is not, everything is deleted and the create fails (fail closed): no sandbox pod is made;
4. the sandbox pod, with the gateway as its resolver and proxy.

On removal the gateway's audit events (JSON lines on its stdout) are copied into the local audit log,
then its objects are deleted.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from ..errors import SandboxError
from ..spec import SandboxSpec
from . import _kube_egress as ke
from . import _kube_manifest as km

if TYPE_CHECKING:
    from .kubernetes import KubernetesBackend

GATEWAY_KINDS = ("services", "secrets", "configmaps", "networkpolicies")


def secret_values(spec: SandboxSpec) -> dict[str, str]:
    """The bound secrets' values from the local store (NotFound names a missing one)."""
    from ..egress import secrets as store
    from ..egress.rules import parse_binding

    values: dict[str, str] = {}
    for text in spec.policy.secrets:
        name = parse_binding(text).name
        if name not in values:
            values[name] = store.get(name)
    return values


async def create(be: KubernetesBackend, spec: SandboxSpec, *, sandbox_id: str, name: str, labels: dict[str, str],
                 annotations: dict[str, str], ns: str, owner_refs: list[dict[str, Any]]) -> None:
    """The sandbox pod ``name`` behind its own gateway (steps 1-4 above)."""
    from ..spec import network_mode

    api, s = be._api(), be.settings
    values = secret_values(spec)  # before anything exists: a missing secret creates nothing
    ca_pem = ke.extra_ca(s)
    gw = ke.gateway_name(name)
    egress = ke.sandbox_egress_rules(network_mode(spec.policy), gw, s, spec.policy.network_allow,
                                     spec.policy.network_block)
    npol = km.network_policy(name=name, namespace=ns, mode=network_mode(spec.policy), labels=labels,
                             annotations=annotations, owner_refs=owner_refs, settings=s, egress=egress)
    made = await api.request("POST", be._path("networkpolicies", ns=ns), body=npol)
    try:
        gw_labels = ke.gateway_labels(labels, name)
        owned = [{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "name": name,
                  "uid": made["metadata"]["uid"], "blockOwnerDeletion": False}] if made.get("metadata") else []
        svc = await api.request("POST", be._path("services", ns=ns),
                                body=ke.service(name=gw, ns=ns, labels=gw_labels, owner_refs=owned))
        cluster_ip = (svc.get("spec") or {}).get("clusterIP")
        if not cluster_ip or cluster_ip == "None":
            raise SandboxError(f"the egress gateway's Service {ns}/{gw} got no clusterIP")
        if ":" in cluster_ip:  # the gateway's resolver answers A records only
            raise SandboxError(f"the egress gateway's Service {ns}/{gw} got an IPv6 clusterIP ({cluster_ip}): "
                               "egress gateways need an IPv4 (or dual-stack) service network")
        if values:
            await api.request("POST", be._path("secrets", ns=ns),
                              body=ke.secret(name=gw, ns=ns, labels=gw_labels, values=values, owner_refs=owned))
        config = ke.gateway_config(spec, sandbox_id, advertise=cluster_ip, blocked=ke.cluster_blocked(s))
        await api.request("POST", be._path("configmaps", ns=ns),
                          body=ke.config_map(name=gw, ns=ns, labels=gw_labels, config=config, owner_refs=owned,
                                             ca_pem=ca_pem))
        await api.request("POST", be._path("networkpolicies", ns=ns),
                          body=ke.gateway_network_policy(s, name=gw, ns=ns, sandbox_pod=name, labels=gw_labels,
                                                         owner_refs=owned))
        await _wait_gateway(be, ns, gw, await _post_gateway(be, ns, gw, gw_labels, bool(values), owned))
        body = km.pod(spec, s, name=name, namespace=ns, labels=labels, annotations=annotations,
                      owner_refs=owner_refs, extra_env=ke.sandbox_env(spec, sandbox_id, cluster_ip),
                      extra_spec=ke.sandbox_dns(cluster_ip))
        await api.request("POST", be._path("pods", ns=ns), body=body)
    except BaseException:
        # the sandbox pod (if its create got through) goes first, the policy fencing it last
        if await api.request("DELETE", be._path("pods", name, ns), body={"gracePeriodSeconds": 0},
                             allow=(404,)) is not None:
            await be._wait_gone(ns, name)
        await delete(be, ns, name, audit_to=None)
        await api.request("DELETE", be._path("networkpolicies", name, ns), allow=(404,))
        raise


async def _post_gateway(be: KubernetesBackend, ns: str, gw: str, labels: dict[str, str], with_secrets: bool,
                        owned: list[dict[str, Any]]) -> dict[str, Any]:
    return await be._api().request("POST", be._path("pods", ns=ns),
                                   body=ke.gateway_pod(be.settings, name=gw, ns=ns, labels=labels,
                                                       with_secrets=with_secrets, owner_refs=owned))


async def _wait_gateway(be: KubernetesBackend, ns: str, gw: str, pod: dict[str, Any] | None) -> None:
    try:
        await be._wait_ready(ns, gw, pod)
    except SandboxError as exc:
        raise SandboxError(f"the sandbox's egress gateway did not become ready, so the sandbox was not created "
                           f"(fail closed): {exc}",
                           hint="the gateway needs python3 >= 3.11 in [orchestrator] egress_gateway_image; "
                                f"kubectl -n {ns} describe pod {gw} / kubectl logs {gw}") from None


async def sandbox_pod_extras(be: KubernetesBackend, spec: SandboxSpec, sandbox_id: str, ns: str,
                             name: str) -> dict[str, Any]:
    """For re-creating a stopped sandbox's pod: the gateway is running again (re-created if its pod is
    gone) and the pod gets its resolver and proxy. {} when the sandbox has no gateway."""
    if not ke.needed(spec):
        return {}
    api, gw = be._api(), ke.gateway_name(name)
    svc = await api.request("GET", be._path("services", gw, ns), allow=(404,))
    if svc is None:
        raise SandboxError(f"the egress gateway of sandbox {sandbox_id} is gone (Service {ns}/{gw}); "
                           "its network policy cannot be enforced", hint="remove the sandbox and create it again")
    await ensure_gateway(be, ns, gw, bool(spec.policy.secrets), svc)
    cluster_ip = svc["spec"]["clusterIP"]
    return {"extra_env": ke.sandbox_env(spec, sandbox_id, cluster_ip), "extra_spec": ke.sandbox_dns(cluster_ip)}


async def ensure_gateway(be: KubernetesBackend, ns: str, gw: str, with_secrets: bool,
                         svc: dict[str, Any] | None = None) -> None:
    """The gateway pod is Ready; re-created from its kept Service, ConfigMap and Secret when gone (the
    backend never reads a Secret back: ``with_secrets`` comes from the spec)."""
    api = be._api()
    pod = await api.request("GET", be._path("pods", gw, ns), allow=(404,))
    if pod is not None and pod["metadata"].get("deletionTimestamp"):
        await be._wait_gone(ns, gw)
        pod = None
    if pod is not None:
        await be._wait_ready(ns, gw, pod)
        return
    svc = svc or await api.request("GET", be._path("services", gw, ns))
    meta = svc["metadata"]
    pod = await _post_gateway(be, ns, gw, dict(meta.get("labels") or {}), with_secrets,
                              meta.get("ownerReferences") or [])
    await _wait_gateway(be, ns, gw, pod)


async def delete(be: KubernetesBackend, ns: str, name: str, *, audit_to: str | None) -> None:
    """Delete the gateway of sandbox pod ``name`` (pod first, then its Service, Secret, ConfigMap and
    NetworkPolicy); ``audit_to``: the sandbox id whose audit log gets the gateway's events first."""
    api, gw = be._api(), ke.gateway_name(name)
    if audit_to is not None:
        await import_audit(be, ns, gw)
    gone = await api.request("DELETE", be._path("pods", gw, ns), body={"gracePeriodSeconds": 0}, allow=(404,))
    if gone is not None:
        await be._wait_gone(ns, gw)
    for kind in GATEWAY_KINDS:
        await api.request("DELETE", be._path(kind, gw, ns), allow=(404,))


async def read_events(be: KubernetesBackend, ns: str, gw: str) -> list[dict[str, Any]]:
    """The gateway's audit events so far (JSON lines on its stdout), oldest first."""
    text = await be._api().text(be._path("pods", gw, ns) + "/log", params={"container": ke.CONTAINER},
                                allow=(400, 404))
    out = []
    for line in (text or "").splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if isinstance(ev, dict) and str(ev.get("event", "")).startswith("network."):
            out.append(ev)
    return out


async def import_audit(be: KubernetesBackend, ns: str, gw: str) -> int:
    """Copy the gateway's audit events into the local audit log; returns how many. Best effort: a
    gateway whose log cannot be read leaves a ``network.audit_lost`` event."""
    from .. import audit

    try:
        events = await read_events(be, ns, gw)
    except Exception as exc:
        audit.log("network.audit_lost", gateway=f"{ns}/{gw}", reason=str(exc))
        return 0
    for ev in events:
        event = ev.pop("event")
        ev["gateway_ts"] = ev.pop("ts", None)  # when the gateway saw it (ts: when it was copied here)
        audit.log(event, gateway=f"{ns}/{gw}", **ev)
    return len(events)
