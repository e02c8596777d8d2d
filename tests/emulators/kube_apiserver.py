"""TEST TOOL: a small Kubernetes API server emulator. Nothing in agentkernel/ imports it.

Scope: exactly the calls the kubernetes backend makes (plus what kubectl needs for create/get/exec), on the
real wire protocol:
- discovery (/version, /api, /apis, /api/v1, /apis/G/V), JSON only;
- pods, networkpolicies (and, with ``agent_sandbox=True``, the agent-sandbox CRDs with a minimal
  controller): create (409 AlreadyExists), get, list with label/field selectors, watch (newline-delimited
  events, resourceVersion replay, timeoutSeconds), merge patch and update guarded by resourceVersion
  (409 Conflict), delete (pods terminate asynchronously; ownerReferences are garbage-collected);
- pods/exec over websocket with ``v5.channel.k8s.io`` (stdin close via channel 255) and
  ``v4.channel.k8s.io``, the exit status as a metav1.Status on channel 3;
- RBAC: with a Role loaded (from deploy/), requests with the service account's token are allowed only
  by its rules; the (group, resource, verb) triples used are recorded for the test that checks the Role
  has exactly the verbs the backend needs.

Pods really run: each is a podman container (``PodmanRunner``), the pod spec's security context mapped to
podman flags, configMap/secret volumes as read-only files, ``dnsConfig`` as ``--dns``, ``sysctls``, and a
``tcpSocket`` readiness probe really polled. Networking, decided at start from the NetworkPolicies
selecting the pod: a deny-egress policy gives ``--network none``; egress allowed only to pods puts it on
the emulator's internal network alone (no route out: what a CNI enforcing the policy does); ipBlock
rules (or no policy) the default bridge. A Service gets a clusterIP on the internal network, and the pod
it selects gets that address there (kube-proxy reduced to one backend with identical ports).
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import json
import os
import threading
import uuid
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from .podman_pods import ContainerError, PodmanRunner, instance_id, parse_quantity

ADMIN_TOKEN = "emulator-admin-token"
SA_TOKEN = "emulator-serviceaccount-token"

CORE = [("pods", "Pod", ["create", "delete", "get", "list", "patch", "update", "watch"]),
        ("pods/exec", "PodExecOptions", ["create", "get"]),
        ("pods/log", "Pod", ["get"]),
        ("services", "Service", ["create", "delete", "get", "list", "patch", "update", "watch"]),
        ("configmaps", "ConfigMap", ["create", "delete", "get", "list", "patch", "update", "watch"]),
        ("secrets", "Secret", ["create", "delete", "get", "list", "patch", "update", "watch"])]
NETWORKING = [("networkpolicies", "NetworkPolicy", ["create", "delete", "get", "list", "patch", "update", "watch"])]
AGENTS = [("sandboxes", "Sandbox", ["create", "delete", "get", "list", "patch", "watch"])]
EXTENSIONS = [(r, k, ["create", "delete", "get", "list", "patch", "watch"]) for r, k in
              (("sandboxtemplates", "SandboxTemplate"), ("sandboxwarmpools", "SandboxWarmPool"),
               ("sandboxclaims", "SandboxClaim"))]


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def status(code: int, reason: str, message: str, **details: Any) -> JSONResponse:
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}
    if details:
        body["details"] = details
    return JSONResponse(body, status_code=code)


def parse_selector(sel: str | None) -> list[tuple[str, str, str | None]]:
    """'a=b,c!=d,e,!f' -> [(key, op, value)]."""
    out = []
    for part in filter(None, (p.strip() for p in (sel or "").split(","))):
        if "!=" in part:
            k, v = part.split("!=", 1)
            out.append((k.strip(), "!=", v.strip()))
        elif "==" in part:
            k, v = part.split("==", 1)
            out.append((k.strip(), "=", v.strip()))
        elif "=" in part:
            k, v = part.split("=", 1)
            out.append((k.strip(), "=", v.strip()))
        elif part.startswith("!"):
            out.append((part[1:], "!", None))
        else:
            out.append((part, "exists", None))
    return out


def matches(values: dict[str, str], sel: list[tuple[str, str, str | None]]) -> bool:
    for k, op, v in sel:
        have = values.get(k)
        if (op == "=" and have != v) or (op == "!=" and have == v) or (op == "exists" and have is None) \
                or (op == "!" and have is not None):
            return False
    return True


def field_values(obj: dict[str, Any]) -> dict[str, str]:
    m = obj.get("metadata", {})
    return {"metadata.name": m.get("name", ""), "metadata.namespace": m.get("namespace", ""),
            "status.phase": (obj.get("status") or {}).get("phase", "")}


def merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


class Served:
    """Running an emulator whose workloads are podman containers (``self.runner``, a PodmanRunner) started
    by background tasks (``self.tasks``). ``START`` names the coroutine that starts one workload; drain
    waits for those, and then ``SETTLE_S`` for the other tasks (watchers) before cancelling them."""

    START = ""
    SETTLE_S = 0.0

    def serve_in_thread(self, **tls) -> ServerThread:
        return ServerThread(self, **tls)

    def close(self) -> None:
        self.runner.remove_all_sync()
        if getattr(self, "volume_root", None):
            import shutil

            shutil.rmtree(self.volume_root, ignore_errors=True)

    async def drain(self) -> None:
        """After the server stopped: let workload starts finish, remove every container, end the tasks."""
        starting = [t for t in self.tasks if self.START in repr(t.get_coro())]
        if starting:
            await asyncio.wait(starting, timeout=60)
        await asyncio.to_thread(self.runner.remove_all_sync)
        if self.SETTLE_S and self.tasks:
            await asyncio.wait(list(self.tasks), timeout=self.SETTLE_S)
        for t in list(self.tasks):
            t.cancel()


class Emulator(Served):
    START = "start_pod"
    SETTLE_S = 20.0

    def __init__(self, *, role_rules: list[dict[str, Any]] | None = None, agent_sandbox: bool = False,
                 protocols: tuple[str, ...] = ("v5.channel.k8s.io", "v4.channel.k8s.io"),
                 node_labels: dict[str, str] | None = None, pod_pids_limit: int = 256) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}  # (resource, ns, name) -> object
        self.rv = 1000
        self.history: list[tuple[int, str, str, dict[str, Any]]] = []  # (rv, resource, type, object)
        self.watchers: list[tuple[str, asyncio.Queue]] = []
        self.role_rules = role_rules
        self.used: set[tuple[str, str, str]] = set()  # (group, resource, verb) by the service account
        self.denied: list[tuple[str, str, str]] = []
        self.log: list[tuple[str, str, str]] = []  # (verb, resource, name) of every mutating call, in order
        self.agent_sandbox = agent_sandbox
        self.protocols = protocols
        self.node_labels = node_labels or {"kubernetes.io/os": "linux", "kubernetes.io/hostname": "emulator"}
        self.pod_pids_limit = pod_pids_limit
        self.runner = PodmanRunner(instance_id())
        import tempfile

        self.volume_root = tempfile.mkdtemp(prefix="akemu-volumes-")  # configMap/secret volumes, per pod uid
        self.next_ip = 0
        self.containers: dict[str, str] = {}  # pod uid -> container id
        self.tasks: set[asyncio.Task] = set()
        self.resources = {("", "v1"): CORE, ("networking.k8s.io", "v1"): NETWORKING}
        if agent_sandbox:
            self.resources[("agents.x-k8s.io", "v1beta1")] = AGENTS
            self.resources[("extensions.agents.x-k8s.io", "v1beta1")] = EXTENSIONS
        self.kinds = {r: k for grp in self.resources.values() for r, k, _ in grp}
        self.group_of = {r: g for (g, _), grp in self.resources.items() for r, _, _ in grp}
        self.app = self._app()

    # ---- bookkeeping -----------------------------------------------------------------------------------
    def _bump(self) -> str:
        self.rv += 1
        return str(self.rv)

    def _emit(self, resource: str, kind: str, obj: dict[str, Any]) -> None:
        self.history.append((int(obj["metadata"]["resourceVersion"]), resource, kind, copy.deepcopy(obj)))
        for res, q in list(self.watchers):
            if res == resource:
                q.put_nowait((kind, copy.deepcopy(obj)))

    def spawn(self, coro) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    def authorize(self, request: Request | WebSocket, group: str, resource: str, verb: str) -> JSONResponse | None:
        auth = request.headers.get("authorization", "")
        token = auth[7:] if auth.lower().startswith("bearer ") else ""
        if self.role_rules is None or token == ADMIN_TOKEN:
            return None
        if token != SA_TOKEN:
            return status(401, "Unauthorized", "Unauthorized")
        for rule in self.role_rules:
            if group in rule.get("apiGroups", []) and resource in rule.get("resources", []) \
                    and (verb in rule.get("verbs", []) or "*" in rule.get("verbs", [])):
                self.used.add((group, resource, verb))
                return None
        self.denied.append((group, resource, verb))
        return status(403, "Forbidden", f'{resource} is forbidden: User "system:serviceaccount:agentkernel:'
                      f'agentkernel" cannot {verb} resource "{resource}" in API group "{group}"')

    # ---- the app ---------------------------------------------------------------------------------------
    def _app(self) -> Starlette:
        routes = [
            Route("/version", self.version),
            Route("/api", self.api_versions),
            Route("/apis", self.api_groups),
            Route("/api/v1", self.resource_list),
            Route("/apis/{group}/{version}", self.resource_list),
            Route("/openapi/v3", self.openapi_index),
            Route("/openapi/v3/{gv:path}", self.openapi_doc),
            WebSocketRoute("/api/v1/namespaces/{ns}/pods/{name}/exec", self.exec_ws),
            Route("/api/v1/namespaces/{ns}/pods/{name}/log", self.pod_log),
            Route("/api/v1/namespaces/{ns}/pods/{name}/exec", self.exec_not_upgraded, methods=["GET", "POST"]),
            Route("/api/v1/namespaces/{ns}/{resource}", self.collection, methods=["GET", "POST"]),
            Route("/api/v1/namespaces/{ns}/{resource}/{name}", self.item, methods=["GET", "PUT", "PATCH", "DELETE"]),
            Route("/apis/{group}/{version}/namespaces/{ns}/{resource}", self.collection, methods=["GET", "POST"]),
            Route("/apis/{group}/{version}/namespaces/{ns}/{resource}/{name}", self.item,
                  methods=["GET", "PUT", "PATCH", "DELETE"]),
        ]
        return Starlette(routes=routes)

    async def version(self, request: Request) -> Response:
        return JSONResponse({"major": "1", "minor": "33", "gitVersion": "v1.33.0-agentkernel-emulator",
                             "platform": "linux/amd64"})

    async def api_versions(self, request: Request) -> Response:
        return JSONResponse({"kind": "APIVersions", "versions": ["v1"],
                             "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]})

    async def api_groups(self, request: Request) -> Response:
        groups = []
        for g, v in self.resources:
            if g:
                gv = {"groupVersion": f"{g}/{v}", "version": v}
                groups.append({"name": g, "versions": [gv], "preferredVersion": gv})
        return JSONResponse({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})

    async def resource_list(self, request: Request) -> Response:
        g, v = request.path_params.get("group", ""), request.path_params.get("version", "v1")
        if (g, v) not in self.resources:
            return status(404, "NotFound", "the server could not find the requested resource")
        res = [{"name": r, "singularName": "", "namespaced": True, "kind": k, "verbs": verbs}
               for r, k, verbs in self.resources[(g, v)]]
        return JSONResponse({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": f"{g}/{v}" if g else v,
                             "resources": res})

    # kubectl asks the OpenAPI v3 documents whether the server validates fields itself (it then sends
    # fieldValidation=Strict instead of validating client-side); only that much of them is served
    async def openapi_index(self, request: Request) -> Response:
        paths = {}
        for g, v in self.resources:
            gv = f"apis/{g}/{v}" if g else f"api/{v}"
            paths[gv] = {"serverRelativeURL": f"/openapi/v3/{gv}?hash=emulator"}
        return JSONResponse({"paths": paths})

    async def openapi_doc(self, request: Request) -> Response:
        gv = request.path_params["gv"]
        param = {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": True}}
        paths = {}
        for (g, v), res in self.resources.items():
            if gv == (f"apis/{g}/{v}" if g else f"api/{v}"):
                for r, kind, _ in res:
                    if "/" not in r:
                        op = {"parameters": [param], "x-kubernetes-group-version-kind": {"group": g, "version": v,
                                                                                          "kind": kind}}
                        base = f"/{gv}/namespaces/{{namespace}}/{r}"
                        paths[base] = {"post": op}
                        paths[base + "/{name}"] = {"patch": op, "put": op}
        if not paths:
            return status(404, "NotFound", "the server could not find the requested resource")
        return JSONResponse({"openapi": "3.0.0", "info": {"title": "Kubernetes (agentkernel emulator)",
                                                          "version": "v1.33.0"}, "paths": paths})

    def _resolve(self, request: Request) -> tuple[str, str, str] | None:
        g, v = request.path_params.get("group", ""), request.path_params.get("version", "v1")
        resource = request.path_params["resource"]
        if (g, v) not in self.resources or resource not in self.kinds or self.group_of[resource] != g:
            return None
        return g, v, resource

    async def collection(self, request: Request) -> Response:
        r = self._resolve(request)
        if r is None:
            return status(404, "NotFound", "the server could not find the requested resource")
        g, v, resource = r
        ns = request.path_params["ns"]
        q = request.query_params
        if request.method == "POST":
            if err := self.authorize(request, g, resource, "create"):
                return err
            return await self.create(resource, g, v, ns, await request.json())
        watching = q.get("watch") in ("1", "true")
        if err := self.authorize(request, g, resource, "watch" if watching else "list"):
            return err
        lsel, fsel = parse_selector(q.get("labelSelector")), parse_selector(q.get("fieldSelector"))
        if watching:
            return StreamingResponse(self.watch_stream(resource, ns, lsel, fsel, q.get("resourceVersion"),
                                                       float(q.get("timeoutSeconds") or 1800),
                                                       q.get("sendInitialEvents") == "true"),
                                     media_type="application/json")
        items = [copy.deepcopy(o) for (res, ons, _), o in sorted(self.objects.items())
                 if res == resource and ons == ns and self._selected(o, lsel, fsel)]
        return JSONResponse({"kind": self.kinds[resource] + "List", "apiVersion": f"{g}/{v}" if g else v,
                             "metadata": {"resourceVersion": str(self.rv)}, "items": items})

    def _selected(self, obj: dict[str, Any], lsel, fsel) -> bool:
        return matches(obj["metadata"].get("labels") or {}, lsel) and matches(field_values(obj), fsel)

    async def watch_stream(self, resource: str, ns: str, lsel, fsel, since: str | None, timeout: float,
                           initial_events: bool = False):
        q: asyncio.Queue = asyncio.Queue()
        entry = (resource, q)
        self.watchers.append(entry)
        try:
            seen = self.rv
            if not since or since == "0" or initial_events:
                for (res, ons, _), o in sorted(self.objects.items()):
                    if res == resource and ons == ns and self._selected(o, lsel, fsel):
                        yield json.dumps({"type": "ADDED", "object": o}).encode() + b"\n"
                if initial_events:  # streaming list (KEP-3157): a bookmark marks the end of the initial state
                    g = self.group_of[resource]
                    mark = {"kind": self.kinds[resource], "apiVersion": f"{g}/v1beta1" if g.startswith("agents")
                            or g.startswith("extensions") else (f"{g}/v1" if g else "v1"),
                            "metadata": {"resourceVersion": str(seen),
                                         "annotations": {"k8s.io/initial-events-end": "true"}}}
                    yield json.dumps({"type": "BOOKMARK", "object": mark}).encode() + b"\n"
            else:
                replay = [h for h in self.history if h[0] > int(since)]
                seen = max([int(since)] + [h[0] for h in replay])
                for _, res, kind, o in replay:
                    if res == resource and o["metadata"].get("namespace") == ns and self._selected(o, lsel, fsel):
                        yield json.dumps({"type": kind, "object": o}).encode() + b"\n"
            loop = asyncio.get_running_loop()
            end = loop.time() + timeout
            while True:
                left = end - loop.time()
                if left <= 0:
                    return
                try:
                    kind, o = await asyncio.wait_for(q.get(), left)
                except TimeoutError:
                    return
                if int(o["metadata"]["resourceVersion"]) <= seen:
                    continue  # already replayed from history
                if o["metadata"].get("namespace") == ns and self._selected(o, lsel, fsel):
                    yield json.dumps({"type": kind, "object": o}).encode() + b"\n"
        finally:
            self.watchers.remove(entry)

    async def item(self, request: Request) -> Response:
        r = self._resolve(request)
        if r is None:
            return status(404, "NotFound", "the server could not find the requested resource")
        g, _, resource = r
        ns, name = request.path_params["ns"], request.path_params["name"]
        verb = {"GET": "get", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}[request.method]
        if err := self.authorize(request, g, resource, verb):
            return err
        key = (resource, ns, name)
        # the body is read before the object: no await between reading the object and replacing it, so
        # the resourceVersion check and the update are atomic
        body = await request.json() if verb in ("patch", "update") else None
        obj = self.objects.get(key)
        if obj is None:
            return status(404, "NotFound", f'{resource}{"." + g if g else ""} "{name}" not found',
                          name=name, kind=resource)
        if verb == "get":
            return JSONResponse(obj)
        if verb == "delete":
            self.log.append(("delete", resource, name))
            return JSONResponse(await self.delete(resource, ns, name))
        if verb == "patch":
            ctype = request.headers.get("content-type", "").split(";")[0]
            if ctype not in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
                return status(415, "UnsupportedMediaType", f"the body of the request was in an unknown format: {ctype}")
            want_rv = (body.get("metadata") or {}).get("resourceVersion")
            new = merge_patch(obj, body)
        else:
            want_rv = (body.get("metadata") or {}).get("resourceVersion")
            new = body
            new["metadata"]["uid"] = obj["metadata"]["uid"]
            new["metadata"]["creationTimestamp"] = obj["metadata"]["creationTimestamp"]
            new.setdefault("status", obj.get("status"))
        if want_rv is not None and want_rv != obj["metadata"]["resourceVersion"]:
            return status(409, "Conflict", f'Operation cannot be fulfilled on {resource} "{name}": the object has '
                          "been modified; please apply your changes to the latest version and try again",
                          name=name, kind=resource)
        self.log.append((verb, resource, name))
        new["metadata"]["resourceVersion"] = self._bump()
        self.objects[key] = new
        self._emit(resource, "MODIFIED", new)
        if resource in ("sandboxwarmpools",):
            self.spawn(self.reconcile_pool(ns, name))
        return JSONResponse(new)

    # ---- create / delete ---------------------------------------------------------------------------------
    async def create(self, resource: str, g: str, v: str, ns: str, body: dict[str, Any]) -> Response:
        meta = body.setdefault("metadata", {})
        if meta.get("namespace", ns) != ns:
            return status(400, "BadRequest", "the namespace of the provided object does not match the namespace "
                          "sent on the request")
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + os.urandom(3).hex()[:5]
        name = meta.get("name")
        if not name:
            return status(422, "Invalid", f"{self.kinds[resource]} is invalid: metadata.name: Required value")
        if resource == "pods" and not (body.get("spec") or {}).get("containers"):
            return status(422, "Invalid", f'Pod "{name}" is invalid: spec.containers: Required value')
        if resource == "secrets":
            import base64
            import binascii

            for k, v in (body.get("data") or {}).items():
                try:
                    base64.b64decode(v, validate=True)
                except (binascii.Error, TypeError):
                    return status(422, "Invalid", f'Secret "{name}" is invalid: data[{k}]: Invalid value: '
                                  "illegal base64 data")
        key = (resource, ns, name)
        if key in self.objects:
            return status(409, "AlreadyExists", f'{resource}{"." + g if g else ""} "{name}" already exists',
                          name=name, kind=resource)
        meta.update(namespace=ns, uid=str(uuid.uuid4()), creationTimestamp=now(), generation=1)
        body.setdefault("apiVersion", f"{g}/{v}" if g else v)
        body.setdefault("kind", self.kinds[resource])
        if resource == "pods":
            body["status"] = {"phase": "Pending", "qosClass": "Guaranteed", "conditions": []}
            body["spec"].setdefault("nodeName", None)
        if resource == "services":
            self.next_ip += 1
            body.setdefault("spec", {})["clusterIP"] = await asyncio.to_thread(self.runner.service_ip, self.next_ip)
            body["spec"]["clusterIPs"] = [body["spec"]["clusterIP"]]
        meta["resourceVersion"] = self._bump()
        self.objects[key] = body
        self.log.append(("create", resource, name))
        self._emit(resource, "ADDED", body)
        if resource == "pods":
            self.spawn(self.start_pod(ns, name))
        elif resource == "sandboxwarmpools":
            self.spawn(self.reconcile_pool(ns, name))
        elif resource == "sandboxclaims":
            self.spawn(self.bind_claim(ns, name))
        return JSONResponse(body, status_code=201)

    async def delete(self, resource: str, ns: str, name: str) -> dict[str, Any]:
        key = (resource, ns, name)
        obj = self.objects[key]
        if resource == "pods":
            if not obj["metadata"].get("deletionTimestamp"):
                obj["metadata"]["deletionTimestamp"] = now()
                obj["metadata"]["deletionGracePeriodSeconds"] = 0
                obj["metadata"]["resourceVersion"] = self._bump()
                self._emit(resource, "MODIFIED", obj)
                self.spawn(self._terminate_pod(ns, name))
            return copy.deepcopy(obj)
        self._finalize_delete(key)
        return copy.deepcopy(obj)

    def _finalize_delete(self, key: tuple[str, str, str]) -> None:
        obj = self.objects.pop(key, None)
        if obj is None:
            return
        obj["metadata"]["resourceVersion"] = self._bump()
        self._emit(key[0], "DELETED", obj)
        uid = obj["metadata"]["uid"]
        # garbage collection: dependents whose owner is gone
        for dkey, dep in list(self.objects.items()):
            if any(r.get("uid") == uid for r in dep["metadata"].get("ownerReferences") or []):
                self.log.append(("gc", dkey[0], dkey[2]))
                if dkey[0] == "pods":
                    self.spawn(self.delete(*dkey))
                else:
                    self._finalize_delete(dkey)
        if key[0] == "sandboxclaims":
            sb = (obj.get("status") or {}).get("sandbox", {}).get("name")
            if sb and ("sandboxes", key[1], sb) in self.objects:
                self._finalize_delete(("sandboxes", key[1], sb))
                if ("pods", key[1], sb) in self.objects:
                    self.spawn(self.delete("pods", key[1], sb))

    async def _terminate_pod(self, ns: str, name: str) -> None:
        obj = self.objects.get(("pods", ns, name))
        if obj is None:
            return
        cid = self.containers.pop(obj["metadata"]["uid"], None)
        if cid:
            await self.runner.remove(cid)
        import shutil

        shutil.rmtree(os.path.join(self.volume_root, obj["metadata"]["uid"]), ignore_errors=True)
        self._finalize_delete(("pods", ns, name))

    def _set_status(self, ns: str, name: str, st: dict[str, Any]) -> None:
        obj = self.objects.get(("pods", ns, name))
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            return
        obj["status"] = st
        obj["metadata"]["resourceVersion"] = self._bump()
        self._emit("pods", "MODIFIED", obj)

    # ---- pods as podman containers ----------------------------------------------------------------------
    def _service_ip(self, pod: dict[str, Any], ns: str) -> str | None:
        """The clusterIP of a Service selecting this pod (its address on the internal network)."""
        labels = pod["metadata"].get("labels") or {}
        for (res, ons, _), svc in self.objects.items():
            sel = (svc.get("spec") or {}).get("selector") or {}
            if res == "services" and ons == ns and sel and all(labels.get(k) == v for k, v in sel.items()):
                return svc["spec"]["clusterIP"]
        return None

    async def _networks(self, pod: dict[str, Any], ns: str) -> tuple[list[str], str | None]:
        """(podman networks, clusterIP) per the NetworkPolicies selecting the pod and the Services selecting
        it; [] means no network at all. The objects are read on the loop (never from another thread)."""
        labels = pod["metadata"].get("labels") or {}
        rules, selected = [], False
        for (res, ons, _), np in self.objects.items():
            if res != "networkpolicies" or ons != ns:
                continue
            spec = np.get("spec") or {}
            want = (spec.get("podSelector") or {}).get("matchLabels") or {}
            if all(labels.get(k) == v for k, v in want.items()) and "Egress" in (spec.get("policyTypes") or []):
                selected = True
                rules += spec.get("egress") or []
        peers = [p for r in rules for p in r.get("to") or []]
        bridge = not selected or any("ipBlock" in p for p in peers)
        to_pods = any("podSelector" in p and "namespaceSelector" not in p for p in peers)
        svc_ip = self._service_ip(pod, ns)
        nets = []
        if svc_ip or to_pods:
            name, _ = await asyncio.to_thread(self.runner.service_network)
            nets.append(f"{name}:ip={svc_ip}" if svc_ip else name)
        if bridge:
            nets.append("podman")
        return nets, svc_ip

    def _volume_files(self, pod: dict[str, Any], ns: str) -> tuple[list[tuple[str, str]], str | None]:
        """configMap and secret volumes as read-only host directories: ([(dir, mountPath)], error)."""
        import base64

        spec = pod["spec"]
        c = spec["containers"][0]
        mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts") or []}
        fs_group = (spec.get("securityContext") or {}).get("fsGroup")
        binds = []
        for vol in spec.get("volumes") or []:
            if vol["name"] not in mounts or not ({"configMap", "secret"} & set(vol)):
                continue
            if "configMap" in vol:
                src, kind = vol["configMap"], "configmaps"
                obj = self.objects.get((kind, ns, src["name"]))
                data = dict((obj or {}).get("data") or {})
            else:
                src, kind = vol["secret"], "secrets"
                obj = self.objects.get((kind, ns, src["secretName"]))
                data = {k: base64.b64decode(v).decode() for k, v in ((obj or {}).get("data") or {}).items()}
                data.update((obj or {}).get("stringData") or {})
            if obj is None:
                return [], f'{kind[:-1]} "{src.get("name") or src.get("secretName")}" not found'
            d = os.path.join(self.volume_root, pod["metadata"]["uid"], vol["name"])
            os.makedirs(d, exist_ok=True)
            items = src.get("items") or [{"key": k, "path": k} for k in data]
            for it in items:
                if it["key"] not in data:
                    return [], f"configmap/secret key {it['key']!r} not found"
                path = os.path.join(d, it["path"])
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w") as f:
                    f.write(data[it["key"]])
                os.chmod(path, it.get("mode", src.get("defaultMode", 0o644)))
                if fs_group is not None:
                    os.chown(path, 0, fs_group)
            for root, dirs, _ in os.walk(d):
                for x in dirs:
                    os.chmod(os.path.join(root, x), 0o755)
            os.chmod(d, 0o755)
            binds.append((d, mounts[vol["name"]]))
        return binds, None

    async def _probe_ready(self, ip: str | None, probe: dict[str, Any], timeout: float = 60.0) -> bool:
        port = (probe.get("tcpSocket") or {}).get("port")
        if not port or not ip:
            return True
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while loop.time() < end:
            try:
                _, w = await asyncio.wait_for(asyncio.open_connection(ip, int(port)), 1.0)
                w.close()
                return True
            except (OSError, TimeoutError):
                await asyncio.sleep(float(probe.get("periodSeconds") or 1) / 2)
        return False

    async def start_pod(self, ns: str, name: str) -> None:
        pod = self.objects.get(("pods", ns, name))
        if pod is None:
            return
        spec = pod["spec"]
        sched = {"type": "PodScheduled", "status": "True", "lastTransitionTime": now()}
        selector = spec.get("nodeSelector") or {}
        if any(self.node_labels.get(k) != v for k, v in selector.items()):
            sched = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "lastTransitionTime": now(),
                     "message": "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector."}
            self._set_status(ns, name, {"phase": "Pending", "conditions": [sched], "qosClass": "Guaranteed"})
            return
        c = spec["containers"][0]
        psc, csc = spec.get("securityContext") or {}, c.get("securityContext") or {}
        uid = csc.get("runAsUser", psc.get("runAsUser"))
        gid = csc.get("runAsGroup", psc.get("runAsGroup"))
        base = {"phase": "Pending", "conditions": [sched], "qosClass": "Guaranteed", "hostIP": "127.0.0.1"}

        def waiting(reason: str, message: str) -> dict[str, Any]:
            return dict(base, containerStatuses=[{"name": c["name"], "image": c["image"], "imageID": "",
                                                  "ready": False, "restartCount": 0, "started": False,
                                                  "state": {"waiting": {"reason": reason, "message": message}}}])

        if csc.get("runAsNonRoot", psc.get("runAsNonRoot")) and not uid:
            self._set_status(ns, name, waiting("CreateContainerConfigError",
                                               "container has runAsNonRoot and image will run as root"))
            return
        self._set_status(ns, name, waiting("ContainerCreating", ""))
        limits = (c.get("resources") or {}).get("limits") or {}
        mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts") or []}
        tmpfs = []
        for vol in spec.get("volumes") or []:
            if "emptyDir" in vol and vol["name"] in mounts:
                size = parse_quantity((vol["emptyDir"] or {}).get("sizeLimit"))
                tmpfs.append((mounts[vol["name"]], int(size) if size else None))
        mem, cpu = parse_quantity(limits.get("memory")), parse_quantity(limits.get("cpu"))
        binds, missing = self._volume_files(pod, ns)
        if missing:
            self._set_status(ns, name, waiting("CreateContainerConfigError", missing))
            return
        nets, svc_ip = await self._networks(pod, ns)
        dns = None
        if spec.get("dnsPolicy") == "None":
            dc = spec.get("dnsConfig") or {}
            dns = {"servers": dc.get("nameservers") or [], "search": dc.get("searches") or [],
                   "options": [o["name"] + (f":{o['value']}" if o.get("value") else "")
                               for o in dc.get("options") or []]}
        sysctls = {x["name"]: x["value"] for x in psc.get("sysctls") or []}
        try:
            cid = await self.runner.run(
                f"akemu-{pod['metadata']['uid'][:13]}", c["image"],
                command=(c.get("command") or []) + (c.get("args") or []),
                user=f"{uid}:{gid if gid is not None else uid}" if uid is not None else None,
                env={e["name"]: e.get("value", "") for e in c.get("env") or []}, workdir=c.get("workingDir"),
                hostname=spec.get("hostname"),
                cap_drop_all="ALL" in ((csc.get("capabilities") or {}).get("drop") or []),
                no_new_privs=csc.get("allowPrivilegeEscalation") is False,
                read_only=bool(csc.get("readOnlyRootFilesystem")), tmpfs=tmpfs,
                memory_bytes=int(mem) if mem else None, cpus=cpu, pids=self.pod_pids_limit,
                network_none=not nets, extra_labels={"k8s-emulator-pod": f"{ns}.{name}"},
                networks=nets if nets not in ([], ["podman"]) else None, dns=dns, sysctls=sysctls, binds=binds)
        except ContainerError as exc:
            self._set_status(ns, name, waiting(exc.reason, exc.message))
            return
        pod = self.objects.get(("pods", ns, name))
        if pod is None or pod["metadata"].get("deletionTimestamp"):
            await self.runner.remove(cid)
            if pod is not None:
                self._finalize_delete(("pods", ns, name))
            return
        self.containers[pod["metadata"]["uid"]] = cid
        self.spawn(self._watch_container(ns, name, cid))
        pod_ip = svc_ip or await self.runner.ip_on(cid, "podman") or "10.88.0.2"
        if c.get("readinessProbe"):
            self._set_status(ns, name, dict(base, phase="Running", podIP=pod_ip, conditions=[sched, {
                "type": "Ready", "status": "False", "reason": "ContainersNotReady"}]))
            if not await self._probe_ready(pod_ip, c["readinessProbe"]):
                return  # Running, never Ready (as a kubelet whose probe keeps failing)
            pod = self.objects.get(("pods", ns, name))
            if pod is None or pod["metadata"].get("deletionTimestamp") or pod["status"].get("phase") != "Running":
                return
        t = now()
        conds = [sched] + [{"type": k, "status": "True", "lastTransitionTime": t}
                           for k in ("Initialized", "ContainersReady", "Ready")]
        self._set_status(ns, name, dict(base, phase="Running", startTime=t, conditions=conds, podIP=pod_ip,
                                        containerStatuses=[{"name": c["name"], "image": c["image"],
                                                            "imageID": c["image"], "containerID": f"podman://{cid}",
                                                            "ready": True, "started": True, "restartCount": 0,
                                                            "state": {"running": {"startedAt": t}}}]))

    async def _watch_container(self, ns: str, name: str, cid: str) -> None:
        """Report a container that died by itself (e.g. OOM-killed) as the kubelet would."""
        while True:
            proc = await asyncio.create_subprocess_exec("podman", "wait", cid, stdout=asyncio.subprocess.PIPE,
                                                        stderr=asyncio.subprocess.DEVNULL)
            out, _ = await proc.communicate()
            pod = self.objects.get(("pods", ns, name))
            if pod is None or pod["metadata"].get("deletionTimestamp") or self.containers.get(
                    pod["metadata"]["uid"]) != cid:
                return
            st = await self.runner.state(cid)
            if not st.get("Running"):  # `podman wait` can return early under load: only a stopped one counts
                break
            await asyncio.sleep(0.5)
        code = int(out.strip() or st.get("ExitCode") or 0)
        reason = "OOMKilled" if st.get("OOMKilled") else ("Completed" if code == 0 else "Error")
        status_ = copy.deepcopy(pod["status"])
        status_["phase"] = "Succeeded" if code == 0 else "Failed"
        for cond in status_.get("conditions", []):
            if cond["type"] in ("Ready", "ContainersReady"):
                cond["status"] = "False"
        for cs in status_.get("containerStatuses", []):
            cs["ready"] = False
            cs["state"] = {"terminated": {"exitCode": code, "reason": reason, "finishedAt": now()}}
        self._set_status(ns, name, status_)

    async def pod_log(self, request: Request) -> Response:
        ns, name = request.path_params["ns"], request.path_params["name"]
        if err := self.authorize(request, "", "pods/log", "get"):
            return err
        pod = self.objects.get(("pods", ns, name))
        if pod is None:
            return status(404, "NotFound", f'pods "{name}" not found', name=name, kind="pods")
        cid = self.containers.get(pod["metadata"]["uid"])
        if cid is None:
            return status(400, "BadRequest", f'container in pod "{name}" is waiting to start')
        return Response(await self.runner.logs(cid), media_type="text/plain")

    # ---- exec ------------------------------------------------------------------------------------------------
    async def exec_not_upgraded(self, request: Request) -> Response:
        return status(400, "BadRequest", "Upgrade request required")

    async def exec_ws(self, ws: WebSocket) -> None:
        ns, name = ws.path_params["ns"], ws.path_params["name"]
        offered = [p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
        proto = next((p for p in offered if p in self.protocols), None)
        deny = self.authorize(ws, "", "pods/exec", "create")
        pod = self.objects.get(("pods", ns, name))
        q = ws.query_params
        argv = q.getlist("command")
        if deny is not None or proto is None or pod is None or not argv:
            code, msg = ((deny.status_code, json.loads(deny.body)["message"]) if deny is not None else
                         (400, "no supported channel protocol (v5.channel.k8s.io, v4.channel.k8s.io)")
                         if proto is None else (404, f'pods "{name}" not found') if pod is None
                         else (400, "you must specify at least 1 command"))
            await ws.send_denial_response(status(code, "Forbidden" if code == 403 else "BadRequest", msg))
            return
        cid = self.containers.get(pod["metadata"]["uid"])
        if cid is None or pod["status"].get("phase") != "Running":
            await ws.send_denial_response(status(400, "BadRequest", f"pod {name} is not running"))
            return
        want_stdin = q.get("stdin") in ("1", "true")
        tty = q.get("tty") in ("1", "true")
        await ws.accept(subprotocol=proto)
        proc = await self.runner.exec(cid, argv, stdin=want_stdin, tty=tty)

        async def pump(stream, ch: int) -> None:
            while True:
                data = await stream.read(65536)
                if not data:
                    return
                await ws.send_bytes(bytes([ch]) + data)

        async def feed() -> None:
            try:
                while True:
                    msg = await ws.receive()
                    if msg["type"] == "websocket.disconnect":
                        return
                    data = msg.get("bytes") or (msg.get("text") or "").encode()
                    if not data:
                        continue
                    if data[0] == 0 and proc.stdin is not None:
                        proc.stdin.write(data[1:])
                        await proc.stdin.drain()
                    elif data[0] == 255 and proto.startswith("v5") and data[1:2] == b"\x00" and proc.stdin:
                        proc.stdin.close()
            except (WebSocketDisconnect, ConnectionError, RuntimeError):
                return

        feeder = asyncio.create_task(feed())
        pumps = [asyncio.create_task(pump(proc.stdout, 1))]
        if proc.stderr is not None:
            pumps.append(asyncio.create_task(pump(proc.stderr, 2)))
        try:
            await asyncio.gather(*pumps)
            rc = await proc.wait()
            if rc == 0:
                st = {"metadata": {}, "status": "Success"}
            else:
                st = {"metadata": {}, "status": "Failure", "reason": "NonZeroExitCode",
                      "message": f"command terminated with non-zero exit code: error executing command {argv}, "
                                 f"exit code {rc}",
                      "details": {"causes": [{"reason": "ExitCode", "message": str(rc)}]}}
            await ws.send_bytes(b"\x03" + json.dumps(st).encode())
            await ws.close(1000)
        except (WebSocketDisconnect, ConnectionError, RuntimeError):
            if proc.returncode is None:
                proc.kill()
        finally:
            feeder.cancel()

    # ---- agent-sandbox: a minimal controller ------------------------------------------------------------------
    def _sandbox_pod(self, ns: str, pool: dict[str, Any], name: str) -> None:
        tmpl = self.objects.get(("sandboxtemplates", ns, pool["spec"]["sandboxTemplateRef"]["name"]))
        if tmpl is None:
            return
        pt = tmpl["spec"]["podTemplate"]
        labels = dict((pt.get("metadata") or {}).get("labels") or {})
        labels.update({"agents.x-k8s.io/pool": pool["metadata"]["name"], "agents.x-k8s.io/sandbox": name})
        self._put("sandboxes", ns, {"apiVersion": "agents.x-k8s.io/v1beta1", "kind": "Sandbox",
                                    "metadata": {"name": name, "namespace": ns, "labels": labels},
                                    "spec": {"podTemplate": pt}})
        npspec = tmpl["spec"].get("networkPolicy")
        if npspec is not None:
            types = ["Ingress"] + (["Egress"] if "egress" in npspec else [])
            self._put("networkpolicies", ns, {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                                              "metadata": {"name": name, "namespace": ns, "labels": labels},
                                              "spec": {"podSelector": {"matchLabels": {
                                                  "agents.x-k8s.io/sandbox": name}},
                                                       "policyTypes": types, **npspec}})
        self._put("pods", ns, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns,
                                                                               "labels": labels},
                               "spec": copy.deepcopy(pt["spec"]), "status": {"phase": "Pending"}})
        self.spawn(self.start_pod(ns, name))

    def _put(self, resource: str, ns: str, obj: dict[str, Any]) -> None:
        obj["metadata"].update(uid=str(uuid.uuid4()), creationTimestamp=now(), resourceVersion=self._bump())
        self.objects[(resource, ns, obj["metadata"]["name"])] = obj
        self._emit(resource, "ADDED", obj)

    async def reconcile_pool(self, ns: str, name: str) -> None:
        pool = self.objects.get(("sandboxwarmpools", ns, name))
        if pool is None:
            return
        free = [o for (r, n, _), o in self.objects.items() if r == "sandboxes" and n == ns
                and o["metadata"]["labels"].get("agents.x-k8s.io/pool") == name
                and not o["metadata"]["labels"].get("agents.x-k8s.io/claimed")]
        for _ in range(int(pool["spec"].get("replicas") or 0) - len(free)):
            self._sandbox_pod(ns, pool, f"{name[:40]}-{os.urandom(3).hex()}")

    async def bind_claim(self, ns: str, name: str) -> None:
        await asyncio.sleep(0.3)  # a controller reconciles after the claim is stored, not within the request
        claim = self.objects.get(("sandboxclaims", ns, name))
        if claim is None:
            return
        pool_name = claim["spec"]["warmPoolRef"]["name"]
        pool = self.objects.get(("sandboxwarmpools", ns, pool_name))
        if pool is None:
            return
        free = [o for (r, n, _), o in self.objects.items() if r == "sandboxes" and n == ns
                and o["metadata"]["labels"].get("agents.x-k8s.io/pool") == pool_name
                and not o["metadata"]["labels"].get("agents.x-k8s.io/claimed")]
        if free:
            sb = free[0]
        else:
            sb_name = f"{pool_name[:40]}-{os.urandom(3).hex()}"
            self._sandbox_pod(ns, pool, sb_name)
            sb = self.objects[("sandboxes", ns, sb_name)]
        extra = claim["spec"].get("additionalPodMetadata") or {}
        pod = self.objects.get(("pods", ns, sb["metadata"]["name"]))
        if pod is not None:  # the claim's pod metadata goes onto the adopted pod
            pod["metadata"].setdefault("labels", {}).update(extra.get("labels") or {})
            pod["metadata"].setdefault("annotations", {}).update(extra.get("annotations") or {})
            pod["metadata"]["resourceVersion"] = self._bump()
            self._emit("pods", "MODIFIED", pod)
        sb["metadata"]["labels"]["agents.x-k8s.io/claimed"] = name
        sb["metadata"]["resourceVersion"] = self._bump()
        self._emit("sandboxes", "MODIFIED", sb)
        claim["status"] = {"sandbox": {"name": sb["metadata"]["name"]},
                           "conditions": [{"type": "Ready", "status": "True", "reason": "SandboxReady",
                                           "message": "", "lastTransitionTime": now()}]}
        claim["metadata"]["resourceVersion"] = self._bump()
        self._emit("sandboxclaims", "MODIFIED", claim)
        await self.reconcile_pool(ns, pool_name)



class ServerThread:
    """uvicorn on 127.0.0.1:<free port> in a daemon thread with its own event loop."""

    def __init__(self, emu, *, certfile: str | None = None, keyfile: str | None = None) -> None:
        import socket

        import uvicorn

        self.emu = emu
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"{'https' if certfile else 'http'}://127.0.0.1:{self.port}"
        self.ca_data: bytes | None = None
        config = uvicorn.Config(emu.app, log_level="warning", ws="websockets-sansio", lifespan="off",
                                ws_ping_interval=None, ssl_certfile=certfile, ssl_keyfile=keyfile)
        self.server = uvicorn.Server(config)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._run, args=(sock,), daemon=True)
        self.thread.start()
        import time

        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("emulator did not start")
            time.sleep(0.02)

    def _run(self, sock) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.server.serve(sockets=[sock]))
        self.loop.run_until_complete(self.emu.drain())

    def call(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.emu.close()

    def kubeconfig(self, path: str, token: str = ADMIN_TOKEN, namespace: str = "agentkernel") -> str:
        cfg = {
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url, **(
                {"certificate-authority-data": __import__("base64").b64encode(self.ca_data).decode()}
                if self.ca_data else {})}}],
            "users": [{"name": "emulator", "user": {"token": token}}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "emulator",
                                                          "namespace": namespace}}],
        }
        with open(path, "w") as f:
            json.dump(cfg, f)
        return path


def main() -> None:
    import argparse

    import uvicorn

    p = argparse.ArgumentParser(description="agentkernel's Kubernetes API emulator (a test tool)")
    p.add_argument("--port", type=int, default=6443)
    p.add_argument("--agent-sandbox", action="store_true")
    args = p.parse_args()
    emu = Emulator(agent_sandbox=args.agent_sandbox)
    try:
        uvicorn.run(emu.app, host="127.0.0.1", port=args.port, ws="websockets-sansio", ws_ping_interval=None)
    finally:
        emu.close()


if __name__ == "__main__":
    main()
