"""Kubernetes backend: one hardened pod per sandbox on a real cluster (extra ``agentkernel[k8s]``).

- Connection: kubeconfig (``[orchestrator] kubeconfig`` / ``context``, else $KUBECONFIG / ~/.kube/config)
  or the in-cluster service account; namespace from ``[orchestrator] namespace``.
- create: the sandbox's NetworkPolicy first (ingress denied; egress: none denies all, open allows every
  address but metadata, link-local and the cluster's ranges plus DNS to kube-dns), then the pod
  (``_kube_manifest``); start: wait for Ready with a bound, failing fast with the cluster's reason on
  image pull errors, unschedulable pods, OOM kills or a failed container.
- allowlist and secrets (a NetworkPolicy cannot name hosts): a per-sandbox egress gateway pod + Service
  (``_kube_gateway``, ``_kube_egress``; ``[orchestrator] egress_gateway_image``); the sandbox's
  NetworkPolicy allows egress only to it, its DNS is the gateway, secrets live only in the gateway pod.
  Such sandboxes are never taken from warm pools (a pod's DNS cannot change after creation).
- exec: the exec websocket (v5 with stdin EOF, v4 fallback), exact exit codes from the status channel;
  cwd/env/timeout through ``_remote_exec.wrap`` (argv only, no shell strings); files as tar streams.
- stop kills every process of the sandbox but the pod's idle PID 1 and marks the pod stopped (its
  files stay; start clears the mark); a pod that is gone is re-created under the kept NetworkPolicy
  (the sandbox's record) by start; remove deletes both, pod first.
- warm pools (``warm_pool_size``): pre-created pods labelled ``agentkernel.pool=<spec key>``; a claim is a
  merge patch carrying the observed ``resourceVersion``, so of many concurrent claimers of one pod
  exactly one wins (the others get 409 Conflict and try the next pod).
- where the kubernetes-sigs/agent-sandbox CRDs are installed (discovery), sandboxes are SandboxClaims on
  a SandboxWarmPool of a SandboxTemplate per spec, and the cluster's controller keeps the pool warm.
- owner death: every object carries the owner labels (``gc`` reaps provably dead owners' sandboxes);
  in-cluster, objects also get an ownerReference to the server's own pod, so the cluster's garbage
  collector deletes them when that pod goes away.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from ..config import orchestrator_settings
from ..errors import BackendUnavailable, InvalidState, PolicyNotEnforceable, SandboxError
from ..spec import SandboxSpec
from . import _kube_egress as ke
from . import _kube_gateway, _remote_exec
from . import _kube_manifest as km
from ._orchestrator import OrchestratorBackend
from .base import (
    LABEL_ID,
    LABEL_MANAGED,
    LABEL_NAME,
    Availability,
    Capabilities,
    ExecRequest,
    ExecResult,
    OutputCollector,
    SandboxInfo,
    SandboxRef,
    check_policy,
    owner_labels,
)

K8S_CONTROLS = {
    "network_none", "network_full", "read_only_root", "memory", "cpu", "disk_tmpfs", "disk_rootfs",
    "seccomp_default", "cap_drop_all", "no_new_privileges", "non_root", "env",
}
ANNOTATION_SPEC = km.ANNOTATION_PREFIX + "spec"
ANNOTATION_ID = km.ANNOTATION_PREFIX + "sandbox-id"
ANNOTATION_STOPPED = km.ANNOTATION_PREFIX + "stopped"
# container waiting reasons that will not resolve by waiting
_FATAL_WAITING = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull",
                  "CreateContainerConfigError", "CreateContainerError", "RunContainerError", "CrashLoopBackOff"}


class KubernetesBackend(OrchestratorBackend):
    name = "kubernetes"
    capabilities = Capabilities(K8S_CONTROLS, {"exec", "files", "warm_pool", "remote"},
                                isolation="pod (node kernel shared; a RuntimeClass such as gVisor or Kata "
                                          "adds a boundary)")

    def __init__(self, options: dict[str, str] | None = None) -> None:
        super().__init__(options)
        self._agent_sandbox: bool | None = None
        self.on_request = None  # tests: called with (method, path) for every API call, in order

    # -- host checks --------------------------------------------------------------------------------------
    @classmethod
    def probe(cls) -> Availability:
        try:
            import httpx

            from ._kube_api import load_connection
        except ModuleNotFoundError as exc:
            return Availability(False, f"the Python package {exc.name!r} is missing",
                                fix="pip install 'agentkernel[k8s]'")
        try:
            settings = orchestrator_settings(backend="kubernetes")
            conn = load_connection(settings.get("kubeconfig"), settings.get("context"))
        except Exception as exc:
            return Availability(False, str(exc),
                                fix="point KUBECONFIG (or [orchestrator] kubeconfig) at a cluster, e.g. kind")
        try:
            ctx = conn.ssl_context()
            r = httpx.get(conn.host + "/version", headers=conn.headers(), verify=ctx if ctx else True, timeout=5)
            r.raise_for_status()
            version = r.json().get("gitVersion", "?")
        except Exception as exc:
            return Availability(False, f"the Kubernetes API at {conn.host} does not answer: {exc}")
        return Availability(True, f"Kubernetes {version} at {conn.host}",
                            details={"server": conn.host, "namespace": settings["namespace"]})

    def controls(self) -> set[str]:
        c = set(K8S_CONTROLS)
        if self.settings.get("egress_gateway_image"):
            c |= {"network_allowlist", "secret_injection"}
        if self.settings.get("pod_pids_limit"):
            c.add("pids")
        if self.settings.get("seccomp_localhost_profile"):
            c.add("seccomp_restrictive")
        return c

    def check(self, spec: SandboxSpec) -> None:
        try:
            check_policy(spec, Capabilities(self.controls()), self.name)
        except PolicyNotEnforceable as exc:
            hints = []
            if "pids (" in str(exc):
                # the Pod API has no pids limit: only the kubelet's podPidsLimit (node-wide setting) has one
                hints.append("Kubernetes limits processes per pod only through the kubelet's podPidsLimit: set "
                             "[orchestrator] pod_pids_limit (or -o pod_pids_limit=N) to your nodes' value")
            if "seccomp_restrictive" in str(exc):
                hints.append("install a seccomp profile on the nodes and name it in [orchestrator] "
                             "seccomp_localhost_profile")
            if "network_allowlist" in str(exc) or "secret_injection" in str(exc):
                hints.append("a NetworkPolicy cannot name hosts: allowlists and secrets run through a per-sandbox "
                             "egress gateway pod, which needs an image with python3 >= 3.11: set [orchestrator] "
                             "egress_gateway_image (or -o egress_gateway_image=IMAGE); else use --network none "
                             "or open")
            if hints:
                exc.hint = "; ".join(hints)
            raise
        if spec.policy.tls_intercept:
            raise PolicyNotEnforceable(
                "backend 'kubernetes' cannot enforce tls_intercept: the in-cluster egress gateway runs on the "
                "standard library only and never terminates TLS",
                hint="drop --tls-intercept: secrets still reach plain-HTTP hosts, and HTTPS hosts through "
                     "the proxy as http://HOST:443/ (the gateway speaks TLS to them, verifying certificates)")
        limit = self.settings.get("pod_pids_limit")
        if limit and spec.resources.pids is not None and int(limit) > spec.resources.pids:
            raise PolicyNotEnforceable(
                f"backend 'kubernetes' cannot enforce pids={spec.resources.pids}: the cluster's podPidsLimit "
                f"is {limit}", hint=f"ask for pids >= {limit} or unlimited")

    def planned_handle(self, sandbox_id: str) -> dict[str, Any]:
        # no pod name: a create may claim a warm pod of any name; remove() then finds the sandbox's
        # objects by its id label (and the name derived from the id)
        return {"namespace": self.namespace}

    # -- plumbing -------------------------------------------------------------------------------------------
    def _api(self):
        loop = asyncio.get_running_loop()
        if self._client is not None and self._client_loop is not loop:
            self._client = None  # connections belong to the loop that made them (e.g. a finished asyncio.run)
        if self._client is None:
            self._client_loop = loop
            from ._kube_api import KubeClient, load_connection

            conn = load_connection(self.settings.get("kubeconfig"), self.settings.get("context"))
            self._client = KubeClient(conn, on_request=self._trace)
        return self._client

    def _trace(self, method: str, path: str) -> None:
        if self.on_request:
            self.on_request(method, path)

    @property
    def namespace(self) -> str:
        return self.settings["namespace"]

    def _path(self, kind: str, name: str | None = None, ns: str | None = None) -> str:
        ns = ns or self.namespace
        base = {
            "pods": f"/api/v1/namespaces/{ns}/pods",
            "networkpolicies": f"/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies",
            "services": f"/api/v1/namespaces/{ns}/services",
            "configmaps": f"/api/v1/namespaces/{ns}/configmaps",
            "secrets": f"/api/v1/namespaces/{ns}/secrets",
            "sandboxes": f"/apis/{km.AGENTS_GROUP}/{km.AGENTS_VERSION}/namespaces/{ns}/sandboxes",
            "sandboxtemplates": f"/apis/{km.EXTENSIONS_GROUP}/{km.AGENTS_VERSION}/namespaces/{ns}/sandboxtemplates",
            "sandboxwarmpools": f"/apis/{km.EXTENSIONS_GROUP}/{km.AGENTS_VERSION}/namespaces/{ns}/sandboxwarmpools",
            "sandboxclaims": f"/apis/{km.EXTENSIONS_GROUP}/{km.AGENTS_VERSION}/namespaces/{ns}/sandboxclaims",
        }[kind]
        return f"{base}/{name}" if name else base

    def _owner_refs(self, ns: str) -> list[dict[str, Any]]:
        """In-cluster: the server's own pod owns what it creates (same namespace only; the deploy/
        manifests set these variables through the downward API)."""
        name, uid = os.environ.get("AGENTKERNEL_OWNER_POD_NAME"), os.environ.get("AGENTKERNEL_OWNER_POD_UID")
        if name and uid and os.environ.get("AGENTKERNEL_OWNER_POD_NAMESPACE") == ns:
            return [{"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid, "blockOwnerDeletion": False}]
        return []

    def _meta(self, spec: SandboxSpec, sandbox_id: str, owner: dict[str, Any]) -> tuple[dict, dict]:
        labels, annotations = km.labels_and_annotations(owner_labels(sandbox_id, owner, spec.name))
        annotations[ANNOTATION_ID] = sandbox_id
        annotations[ANNOTATION_SPEC] = spec.to_json()
        return labels, annotations

    async def _agent_sandbox_installed(self) -> bool:
        mode = self.settings.get("agent_sandbox", "auto")
        if mode == "off":
            return False
        if self._agent_sandbox is None:
            found = await self._api().request("GET", f"/apis/{km.EXTENSIONS_GROUP}/{km.AGENTS_VERSION}",
                                              allow=(404, 403))
            self._agent_sandbox = bool(found and any(r.get("name") == "sandboxclaims"
                                                     for r in found.get("resources", [])))
            if mode == "on" and not self._agent_sandbox:
                raise BackendUnavailable("agent_sandbox = on, but the cluster has no agent-sandbox CRDs "
                                         f"({km.EXTENSIONS_GROUP}/{km.AGENTS_VERSION})")
        return self._agent_sandbox

    # -- lifecycle --------------------------------------------------------------------------------------------
    async def create(self, spec: SandboxSpec, *, sandbox_id: str, owner: dict[str, Any]) -> SandboxRef:
        api, ns = self._api(), self.namespace
        await self._check_capacity()
        if ke.needed(spec):  # its own gateway: never a pre-made pod (pool or agent-sandbox claim)
            name = km.pod_name(sandbox_id)
            labels, annotations = self._meta(spec, sandbox_id, owner)
            await _kube_gateway.create(self, spec, sandbox_id=sandbox_id, name=name, labels=labels,
                                       annotations=annotations, ns=ns, owner_refs=self._owner_refs(ns))
            return SandboxRef(self.name, sandbox_id, {"namespace": ns, "pod": name}, spec)
        if await self._agent_sandbox_installed():
            return await self._claim_create(spec, sandbox_id, owner)
        if int(self.settings["warm_pool_size"]) > 0:
            ref = await self.claim(spec, sandbox_id=sandbox_id, owner=owner)
            self._background(self.fill_pool(spec))
            if ref is not None:
                return ref
        name = km.pod_name(sandbox_id)
        labels, annotations = self._meta(spec, sandbox_id, owner)
        await self._create_pod(spec, name, labels, annotations, ns)
        del api
        return SandboxRef(self.name, sandbox_id, {"namespace": ns, "pod": name}, spec)

    async def _create_pod(self, spec: SandboxSpec, name: str, labels: dict, annotations: dict, ns: str) -> None:
        api = self._api()
        refs = self._owner_refs(ns)
        # the NetworkPolicy exists before the pod does, so the pod never has a moment without it
        from ..spec import network_mode

        npol = km.network_policy(name=name, namespace=ns, mode=network_mode(spec.policy), labels=labels,
                                 annotations=annotations, owner_refs=refs, settings=self.settings)
        await api.request("POST", self._path("networkpolicies", ns=ns), body=npol)
        try:
            body = km.pod(spec, self.settings, name=name, namespace=ns, labels=labels, annotations=annotations,
                          owner_refs=refs)
            await api.request("POST", self._path("pods", ns=ns), body=body)
        except BaseException:
            await api.request("DELETE", self._path("networkpolicies", name, ns), allow=(404,))
            raise

    async def _check_capacity(self) -> None:
        cap = int(self.settings.get("max_sandboxes") or 0)
        if not cap:
            return
        pods = await self._api().request("GET", self._path("pods"),
                                         params={"labelSelector": f"{LABEL_MANAGED}=true"})
        live = [p for p in pods.get("items", []) if not p["metadata"].get("deletionTimestamp")]
        if len(live) >= cap:
            raise SandboxError(f"namespace {self.namespace!r} already has {len(live)} agentkernel sandboxes "
                               f"(max_sandboxes = {cap})", hint="remove some, or raise [orchestrator] max_sandboxes")

    async def start(self, ref: SandboxRef) -> None:
        api, ns = self._api(), ref.handle.get("namespace") or self.namespace
        if ref.handle.get("claim"):
            await self._claim_pod(ref)
        pod_name = ref.handle.get("pod") or km.pod_name(ref.id)
        pod = await api.request("GET", self._path("pods", pod_name, ns), allow=(404,))
        if pod is None or pod["metadata"].get("deletionTimestamp"):
            # stopped: a fresh pod under the sandbox's NetworkPolicy (which must still be there)
            npol = await api.request("GET", self._path("networkpolicies", pod_name, ns), allow=(404,))
            if npol is None:
                raise InvalidState(f"sandbox {ref.id} no longer exists in namespace {ns}")
            if pod is not None:
                await self._wait_gone(ns, pod_name)
            meta = npol["metadata"]
            extras = await _kube_gateway.sandbox_pod_extras(self, ref.spec, ref.id, ns, pod_name)
            body = km.pod(ref.spec, self.settings, name=pod_name, namespace=ns, labels=meta.get("labels", {}),
                          annotations=meta.get("annotations", {}), owner_refs=self._owner_refs(ns), **extras)
            pod = await api.request("POST", self._path("pods", ns=ns), body=body)
        elif (pod["metadata"].get("annotations") or {}).get(ANNOTATION_STOPPED):
            if ke.needed(ref.spec):
                await _kube_gateway.ensure_gateway(self, ns, ke.gateway_name(pod_name), bool(ref.spec.policy.secrets))
            pod = await api.request("PATCH", self._path("pods", pod_name, ns),
                                    body={"metadata": {"annotations": {ANNOTATION_STOPPED: None}}},
                                    content_type="application/merge-patch+json")
        await self._wait_ready(ns, pod_name, pod)

    async def _wait_ready(self, ns: str, name: str, pod: dict[str, Any] | None = None) -> dict[str, Any]:
        api = self._api()
        deadline = time.monotonic() + float(self.settings["ready_timeout_s"])
        if pod is None:
            pod = await api.request("GET", self._path("pods", name, ns))
        while True:
            if _pod_verdict(pod, name):
                return pod
            left = deadline - time.monotonic()
            if left <= 0:
                raise SandboxError(f"pod {ns}/{name} was not ready within {self.settings['ready_timeout_s']} s "
                                   f"({_pod_summary(pod)})", hint="kubectl describe pod shows the cluster's view")
            params = {"fieldSelector": f"metadata.name={name}", "resourceVersion": pod["metadata"]["resourceVersion"],
                      "timeoutSeconds": str(max(1, int(left)))}
            try:
                async with asyncio.timeout(left):
                    async for kind, obj in api.watch(self._path("pods", ns=ns), params):
                        if kind == "DELETED":
                            raise SandboxError(f"pod {ns}/{name} was deleted while starting")
                        pod = obj
                        if _pod_verdict(pod, name):
                            return pod
            except TimeoutError:
                pass
            except SandboxError as exc:
                if getattr(exc, "status", None) == 410:  # watch expired: re-read and watch again
                    pod = await api.request("GET", self._path("pods", name, ns))
                    continue
                raise

    async def _wait_gone(self, ns: str, name: str, kind: str = "pods", timeout: float = 60.0) -> None:
        api = self._api()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            obj = await api.request("GET", self._path(kind, name, ns), allow=(404,))
            if obj is None:
                return
            params = {"fieldSelector": f"metadata.name={name}", "resourceVersion": obj["metadata"]["resourceVersion"],
                      "timeoutSeconds": str(max(1, int(deadline - time.monotonic())))}
            try:
                async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                    async for ev, _ in api.watch(self._path(kind, ns=ns), params):
                        if ev == "DELETED":
                            return
            except TimeoutError:
                break
        raise SandboxError(f"{kind[:-1]} {ns}/{name} still exists {timeout:.0f} s after deletion")

    # -- exec ----------------------------------------------------------------------------------------------------
    async def exec(self, ref: SandboxRef, req: ExecRequest) -> ExecResult:
        from ._kube_api import V4

        self._check_exec_user(ref, req, "the pod's")
        api = self._api()
        ns, pod = ref.handle.get("namespace") or self.namespace, await self._pod_of(ref)
        collector = OutputCollector(req.output_limit)
        sink = req.on_output or collector
        stdin = req.stdin

        def argv_for(proto: str) -> list[str]:
            length = None
            if proto == V4 and stdin is not None:
                if not isinstance(stdin, bytes | bytearray):
                    raise SandboxError("this API server speaks only v4.channel.k8s.io, which cannot end a "
                                       "streamed stdin", hint="pass stdin as bytes, or use Kubernetes >= 1.30")
                length = len(stdin)
            return _remote_exec.wrap(req.argv, cwd=req.cwd or ref.spec.workdir, env=req.env, timeout=req.timeout,
                                     stdin_length=length)

        async def start() -> int | None:
            return await api.exec(ns, pod, km.CONTAINER, argv_for, stdin=stdin, on_output=sink, tty=req.tty,
                                  tty_size=req.tty_size)

        return await _remote_exec.run(start, req, collector, lambda r: self.exec(ref, r), ref)

    # -- stop / remove / status / list ---------------------------------------------------------------------
    async def stop(self, ref: SandboxRef) -> None:
        """Every process of the sandbox but the pod's idle PID 1 is killed and the pod is marked stopped;
        the pod and its filesystem stay (a pod cannot be paused), so start resumes with the files kept."""
        if ref.handle.get("claim"):
            raise InvalidState("a sandbox claimed from an agent-sandbox warm pool cannot be stopped, only removed")
        ns, name = ref.handle.get("namespace") or self.namespace, ref.handle.get("pod") or km.pod_name(ref.id)
        pod = await self._api().request("GET", self._path("pods", name, ns), allow=(404,))
        if pod is None or pod["metadata"].get("deletionTimestamp"):
            return  # gone already: start makes a fresh pod under the kept NetworkPolicy
        if _pod_state(pod) == "running":
            # kill(-1) reaches every process of the sandbox's user except PID 1 and the caller
            await self.exec(ref, ExecRequest(["sh", "-c", "kill -KILL -1"], cwd="/", timeout=30))
        await self._api().request("PATCH", self._path("pods", name, ns),
                                  body={"metadata": {"annotations": {ANNOTATION_STOPPED: "true"}}},
                                  content_type="application/merge-patch+json")

    async def remove(self, ref: SandboxRef) -> None:
        api = self._api()
        ns = ref.handle.get("namespace") or self.namespace
        if ref.handle.get("claim"):
            await api.request("DELETE", self._path("sandboxclaims", ref.handle["claim"], ns), allow=(404,))
            return
        names = [ref.handle["pod"]] if ref.handle.get("pod") else await self._names_of(ref.id, ns)
        for name in names:
            gone = await api.request("DELETE", self._path("pods", name, ns), body={"gracePeriodSeconds": 0},
                                     allow=(404,))
            if gone is not None:
                # the policy goes only after the pod has: a dying pod is never left without it
                await self._wait_gone(ns, name)
            if ke.needed(ref.spec) or not ref.handle.get("pod"):  # by id alone (gc): its spec may be unknown
                await _kube_gateway.delete(self, ns, name, audit_to=ref.id)
            await api.request("DELETE", self._path("networkpolicies", name, ns), allow=(404,))
        if not ref.handle.get("pod") and await self._agent_sandbox_installed():
            await api.request("DELETE", self._path("sandboxclaims", km.pod_name(ref.id), ns), allow=(404,))

    async def network_events(self, ref: SandboxRef) -> list[dict[str, Any]]:
        """A running sandbox's egress decisions so far, from its gateway's log ([] without a gateway;
        they reach the local audit log when the sandbox is removed)."""
        if not ke.needed(ref.spec):
            return []
        ns, pod = ref.handle.get("namespace") or self.namespace, ref.handle.get("pod") or km.pod_name(ref.id)
        return await _kube_gateway.read_events(self, ns, ke.gateway_name(pod))

    async def _names_of(self, sandbox_id: str, ns: str) -> list[str]:
        """Pods/policies of a sandbox known only by id (e.g. reaping from the ownership journal)."""
        sel = {"labelSelector": f"{LABEL_ID}={km.label_value(sandbox_id)}"}
        names = {km.pod_name(sandbox_id)}
        for kind in ("pods", "networkpolicies"):
            found = await self._api().request("GET", self._path(kind, ns=ns), params=sel)
            names.update(o["metadata"]["name"] for o in found.get("items", [])
                         if ke.LABEL_GATEWAY not in (o["metadata"].get("labels") or {}))  # gateways go with them
        return sorted(names)

    async def status(self, ref: SandboxRef) -> str:
        api, ns = self._api(), ref.handle.get("namespace") or self.namespace
        if ref.handle.get("claim"):
            claim = await api.request("GET", self._path("sandboxclaims", ref.handle["claim"], ns), allow=(404,))
            if claim is None:
                return "missing"
        name = ref.handle.get("pod") or km.pod_name(ref.id)
        pod = await api.request("GET", self._path("pods", name, ns), allow=(404,))
        if pod is not None:
            return _pod_state(pod)
        npol = await api.request("GET", self._path("networkpolicies", name, ns), allow=(404,))
        return "stopped" if npol is not None else ("created" if ref.handle.get("claim") else "missing")

    async def list(self) -> list[SandboxInfo]:
        api, ns = self._api(), self.namespace
        sel = {"labelSelector": f"{LABEL_MANAGED}=true"}
        pods = (await api.request("GET", self._path("pods"), params=sel)).get("items", [])
        npols = (await api.request("GET", self._path("networkpolicies"), params=sel)).get("items", [])
        out: dict[str, SandboxInfo] = {}
        for obj, state in [(p, _pod_state(p)) for p in pods] + [(n, "stopped") for n in npols]:
            meta = obj["metadata"]
            if meta["name"] in out or ke.LABEL_GATEWAY in (meta.get("labels") or {}):
                continue
            labels = dict(meta.get("labels") or {})
            ann = meta.get("annotations") or {}
            for k, v in ann.items():  # raw owner values that did not fit in a label
                if k.startswith(km.ANNOTATION_PREFIX) and k[len(km.ANNOTATION_PREFIX):] in labels:
                    labels[k[len(km.ANNOTATION_PREFIX):]] = v
            sid = ann.get(ANNOTATION_ID) or labels.get(LABEL_ID, meta["name"])
            out[meta["name"]] = SandboxInfo(self.name, sid, labels.get(LABEL_NAME), state,
                                            {"namespace": ns, "pod": meta["name"]}, labels)
        return list(out.values())

    # -- warm pools of plain pods ---------------------------------------------------------------------------
    def _pool_labels(self, spec: SandboxSpec) -> dict[str, str]:
        return {km.LABEL_POOL: spec.pool_key(), LABEL_MANAGED: "true"}

    async def fill_pool(self, spec: SandboxSpec, size: int | None = None) -> int:
        """Create free pods until the spec's pool has ``size`` (default warm_pool_size); returns how many
        were created. Bounded by max_pool_size pods per pool."""
        api, ns = self._api(), self.namespace
        want = int(self.settings["warm_pool_size"] if size is None else size)
        key = spec.pool_key()
        found = await api.request("GET", self._path("pods"), params={"labelSelector": f"{km.LABEL_POOL}={key}"})
        members = [p for p in found.get("items", []) if not p["metadata"].get("deletionTimestamp")]
        free = [p for p in members if p["metadata"]["labels"].get(km.LABEL_POOL_STATE) == "free"]
        n = max(0, min(want - len(free), int(self.settings["max_pool_size"]) - len(free)))
        from ..owner import current_owner

        async def one() -> None:
            pid = f"pool-{os.urandom(5).hex()}"
            name = km.pod_name(pid)
            labels, annotations = self._meta(spec, pid, current_owner())
            labels.update({km.LABEL_POOL: key, km.LABEL_POOL_STATE: "free"})
            await self._create_pod(spec, name, labels, annotations, ns)

        await asyncio.gather(*(one() for _ in range(n)))
        return n

    async def claim(self, spec: SandboxSpec, *, sandbox_id: str, owner: dict[str, Any]) -> SandboxRef | None:
        """Take one free pod of the spec's pool, or None when there is none. Atomic: the label update
        carries the resourceVersion we read, so a concurrent claimer of the same pod gets 409."""
        from ._kube_api import ApiError

        api, ns = self._api(), self.namespace
        sel = f"{km.LABEL_POOL}={spec.pool_key()},{km.LABEL_POOL_STATE}=free"
        found = await api.request("GET", self._path("pods"), params={"labelSelector": sel})
        pods = [p for p in found.get("items", []) if not p["metadata"].get("deletionTimestamp")]
        pods.sort(key=lambda p: (p.get("status", {}).get("phase") != "Running", os.urandom(2)))
        labels, annotations = self._meta(spec, sandbox_id, owner)
        labels[km.LABEL_POOL_STATE] = "claimed"
        for p in pods:
            meta = p["metadata"]
            won = False
            for _ in range(5):
                patch = {"metadata": {"resourceVersion": meta["resourceVersion"], "labels": labels,
                                      "annotations": annotations}}
                try:
                    await api.request("PATCH", self._path("pods", meta["name"], ns), body=patch,
                                      content_type="application/merge-patch+json")
                    won = True
                    break
                except ApiError as exc:
                    if exc.status == 404:
                        break
                    if exc.status != 409:
                        raise
                # the pod changed since we read it: a claim by someone else, or only its status (the
                # kubelet's updates bump resourceVersion too). Re-read; still free -> try again.
                fresh = await api.request("GET", self._path("pods", meta["name"], ns), allow=(404,))
                if fresh is None or fresh["metadata"].get("deletionTimestamp") or \
                        (fresh["metadata"].get("labels") or {}).get(km.LABEL_POOL_STATE) != "free":
                    break
                meta = fresh["metadata"]
            if not won:
                continue
            # the policy's labels follow, so list() and reaping see the new owner
            await api.request("PATCH", self._path("networkpolicies", meta["name"], ns),
                              body={"metadata": {"labels": labels, "annotations": annotations}},
                              content_type="application/merge-patch+json", allow=(404,))
            return SandboxRef(self.name, sandbox_id, {"namespace": ns, "pod": meta["name"]}, spec)
        return None

    # -- agent-sandbox CRDs ----------------------------------------------------------------------------------
    async def _claim_create(self, spec: SandboxSpec, sandbox_id: str, owner: dict[str, Any]) -> SandboxRef:
        api, ns = self._api(), self.namespace
        key = f"ak-{spec.pool_key()}"
        base = {LABEL_MANAGED: "true", km.LABEL_POOL: spec.pool_key()}
        tmpl = km.sandbox_template(spec, self.settings, name=key, namespace=ns, labels=base)
        await api.request("POST", self._path("sandboxtemplates", ns=ns), body=tmpl, allow=(409,))
        pool = km.sandbox_warm_pool(name=key, namespace=ns, template=key,
                                    replicas=max(0, int(self.settings["warm_pool_size"])), labels=base)
        await api.request("POST", self._path("sandboxwarmpools", ns=ns), body=pool, allow=(409,))
        labels, annotations = self._meta(spec, sandbox_id, owner)
        name = km.pod_name(sandbox_id)
        claim = km.sandbox_claim(name=name, namespace=ns, warm_pool=key, labels=labels, annotations=annotations)
        await api.request("POST", self._path("sandboxclaims", ns=ns), body=claim)
        return SandboxRef(self.name, sandbox_id, {"namespace": ns, "claim": name}, spec)

    async def _claim_pod(self, ref: SandboxRef) -> str:
        """The pod behind a SandboxClaim: claim -> status.sandbox.name -> Sandbox -> pod name."""
        if ref.handle.get("pod"):
            return ref.handle["pod"]
        api, ns = self._api(), ref.handle.get("namespace") or self.namespace
        deadline = time.monotonic() + float(self.settings["ready_timeout_s"])
        claim = await api.request("GET", self._path("sandboxclaims", ref.handle["claim"], ns))
        while not (claim.get("status") or {}).get("sandbox", {}).get("name"):
            left = deadline - time.monotonic()
            if left <= 0:
                raise SandboxError(f"SandboxClaim {ns}/{ref.handle['claim']} got no sandbox within "
                                   f"{self.settings['ready_timeout_s']} s")
            params = {"fieldSelector": f"metadata.name={ref.handle['claim']}",
                      "resourceVersion": claim["metadata"]["resourceVersion"], "timeoutSeconds": str(int(left) + 1)}
            try:
                async with asyncio.timeout(left):
                    async for _, obj in api.watch(self._path("sandboxclaims", ns=ns), params):
                        claim = obj
                        if (claim.get("status") or {}).get("sandbox", {}).get("name"):
                            break
            except TimeoutError:
                pass
        sb_name = claim["status"]["sandbox"]["name"]
        sb = await api.request("GET", self._path("sandboxes", sb_name, ns))
        pod = (sb["metadata"].get("annotations") or {}).get(km.POD_NAME_ANNOTATION) or sb_name
        ref.handle["pod"] = pod
        return pod

    async def _pod_of(self, ref: SandboxRef) -> str:
        if ref.handle.get("claim"):
            return await self._claim_pod(ref)
        return ref.handle.get("pod") or km.pod_name(ref.id)



def _pod_state(pod: dict[str, Any]) -> str:
    if pod["metadata"].get("deletionTimestamp") or (pod["metadata"].get("annotations") or {}).get(ANNOTATION_STOPPED):
        return "stopped"
    phase = (pod.get("status") or {}).get("phase", "Pending")
    return {"Pending": "created", "Running": "running"}.get(phase, "stopped")


def _pod_verdict(pod: dict[str, Any], name: str) -> bool:
    """True when Ready; raises with the cluster's reason when the pod cannot become ready."""
    st = pod.get("status") or {}
    conds = {c.get("type"): c for c in st.get("conditions") or []}
    sched = conds.get("PodScheduled")
    if sched and sched.get("status") == "False" and sched.get("reason") == "Unschedulable":
        raise SandboxError(f"pod {name} cannot be scheduled: {sched.get('message', '')}",
                           hint="check [orchestrator] node_selector / tolerations / resources against the nodes")
    for cs in st.get("containerStatuses") or []:
        state = cs.get("state") or {}
        waiting, term = state.get("waiting") or {}, state.get("terminated") or {}
        if waiting.get("reason") in _FATAL_WAITING:
            what = "its image cannot be pulled" if "Image" in waiting["reason"] else "its container cannot start"
            raise SandboxError(f"pod {name}: {what}: {waiting['reason']}: {waiting.get('message', '')}".rstrip(": "),
                               hint="is the image reachable from the cluster's nodes?" if "Image" in waiting["reason"]
                               else None)
        if term:
            reason = term.get("reason", "")
            if reason == "OOMKilled":
                raise SandboxError(f"pod {name} was OOM-killed while starting (memory limit too low?)")
            raise SandboxError(f"pod {name}: its container exited ({reason or 'exit'} {term.get('exitCode')}): "
                               f"{term.get('message', '')}".rstrip(": "))
    if st.get("phase") in ("Failed", "Succeeded"):
        raise SandboxError(f"pod {name} ended ({st['phase']}): {st.get('reason', '')} {st.get('message', '')}".strip())
    ready = conds.get("Ready")
    return st.get("phase") == "Running" and bool(ready) and ready.get("status") == "True"


def _pod_summary(pod: dict[str, Any]) -> str:
    st = pod.get("status") or {}
    bits = [f"phase {st.get('phase', '?')}"]
    for c in st.get("conditions") or []:
        if c.get("status") != "True":
            bits.append(f"{c.get('type')}={c.get('status')} {c.get('reason', '')}".strip())
    return ", ".join(bits)
