"""TEST TOOL: a small Nomad HTTP API emulator. Nothing in agentkernel/ imports it.

Scope: exactly the calls the nomad backend makes, on the real wire protocol: ``/v1/agent/self``, job
register (``PUT /v1/jobs``, ``PUT /v1/job/:id``), read, list (``prefix``, ``meta``), stop and purge
(``DELETE /v1/job/:id[?purge=true]``), allocations with blocking queries (``index``/``wait``,
``X-Nomad-Index``), evaluations (placement failures), parameterized dispatch, variables with
check-and-set (``cas``: 409 on conflict), and the exec websocket ``/v1/client/allocation/:id/exec``
(JSON frames, base64 data, ``exited`` + ``result.exit_code``). An ACL token, when set, is required on
every call (``X-Nomad-Token``). Allocations of docker-driver tasks really run, as podman containers.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import os
import time
import uuid
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from .kube_apiserver import Served
from .podman_pods import ContainerError, PodmanRunner, instance_id


class NomadEmulator(Served):
    START = "_run_alloc"

    def __init__(self, *, token: str | None = None, datacenter: str = "dc1") -> None:
        self.token = token
        self.datacenter = datacenter
        self.index = 10
        self.jobs: dict[tuple[str, str], dict[str, Any]] = {}  # (namespace, id) -> job
        self.allocs: dict[str, dict[str, Any]] = {}
        self.evals: dict[str, dict[str, Any]] = {}
        self.vars: dict[tuple[str, str], dict[str, Any]] = {}
        self.containers: dict[str, str] = {}  # alloc id -> container id
        self.changed = asyncio.Event()
        self.runner = PodmanRunner(instance_id())
        self.tasks: set[asyncio.Task] = set()
        self.log: list[tuple[str, str]] = []
        self.app = Starlette(routes=[
            Route("/v1/agent/self", self.agent_self),
            Route("/v1/jobs", self.jobs_route, methods=["GET", "PUT", "POST"]),
            Route("/v1/job/{rest:path}", self.job_route, methods=["GET", "PUT", "POST", "DELETE"]),
            Route("/v1/allocation/{id}", self.alloc_route),
            Route("/v1/vars", self.vars_list),
            Route("/v1/var/{path:path}", self.var_route, methods=["GET", "PUT", "DELETE"]),
            WebSocketRoute("/v1/client/allocation/{id}/exec", self.exec_ws),
        ])

    # ---- helpers -----------------------------------------------------------------------------------------
    def _bump(self) -> int:
        self.index += 1
        self.changed.set()
        self.changed = asyncio.Event()
        return self.index

    def spawn(self, coro) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    def denied(self, headers) -> Response | None:
        if self.token and headers.get("x-nomad-token") != self.token:
            return PlainTextResponse("Permission denied", status_code=403)
        return None

    def ns(self, request: Request | WebSocket) -> str:
        return request.query_params.get("namespace") or "default"

    def json(self, body: Any, status: int = 200) -> JSONResponse:
        return JSONResponse(body, status_code=status, headers={"X-Nomad-Index": str(self.index)})

    # ---- routes ------------------------------------------------------------------------------------------
    async def agent_self(self, request: Request) -> Response:
        if d := self.denied(request.headers):
            return d
        return self.json({"config": {"Version": {"Version": "1.10.0-agentkernel-emulator"},
                                     "Datacenter": self.datacenter, "Region": "global"},
                          "member": {"Name": "emulator"}})

    async def jobs_route(self, request: Request) -> Response:
        if d := self.denied(request.headers):
            return d
        ns = self.ns(request)
        if request.method == "GET":
            prefix = request.query_params.get("prefix", "")
            want_meta = request.query_params.get("meta") == "true"
            out = []
            for (jns, jid), job in sorted(self.jobs.items()):
                if jns == ns and jid.startswith(prefix):
                    stub = {"ID": jid, "ParentID": job.get("ParentID", ""), "Name": job["Name"], "Namespace": jns,
                            "Type": job["Type"], "Status": job["Status"], "Stop": job.get("Stop", False),
                            "ParameterizedJob": bool(job.get("ParameterizedJob")), "Datacenters": job["Datacenters"],
                            "CreateIndex": job["CreateIndex"], "ModifyIndex": job["ModifyIndex"]}
                    if want_meta:
                        stub["Meta"] = job.get("Meta") or {}
                    out.append(stub)
            return self.json(out)
        body = await request.json()
        return self.register(ns, body["Job"])

    def register(self, ns: str, job: dict[str, Any]) -> Response:
        job = copy.deepcopy(job)
        if job.get("Type") not in ("batch", "service", "sysbatch"):
            return PlainTextResponse("1 error occurred:\n\t* job type must be one of batch, service, sysbatch",
                                     status_code=400)
        if job.get("Namespace", ns) != ns:
            ns = job["Namespace"]
        old = self.jobs.get((ns, job["ID"]))
        idx = self._bump()
        job.update(Namespace=ns, CreateIndex=old["CreateIndex"] if old else idx, ModifyIndex=idx,
                   JobModifyIndex=idx, Version=(old["Version"] + 1) if old else 0, Stop=bool(job.get("Stop")),
                   Status="running")
        self.jobs[(ns, job["ID"])] = job
        self.log.append(("register", job["ID"]))
        eval_id = str(uuid.uuid4())
        self.evals[eval_id] = {"ID": eval_id, "JobID": job["ID"], "Namespace": ns, "Status": "complete",
                               "CreateIndex": idx, "ModifyIndex": idx}
        if not job.get("ParameterizedJob") and not job["Stop"]:
            for a in self._allocs(ns, job["ID"]):
                if a["DesiredStatus"] == "run":
                    self._stop_alloc(a)
            if self.datacenter not in (job.get("Datacenters") or []):
                self.evals[eval_id].update(Status="blocked", FailedTGAllocs={
                    g["Name"]: {"NodesEvaluated": 0, "NodesFiltered": 0, "ConstraintFiltered": {},
                                "DimensionExhausted": {}, "NodesAvailable": {self.datacenter: 1},
                                "ClassFiltered": {}, "QuotaExhausted": None}
                    for g in job["TaskGroups"]})
                job["Status"] = "pending"
            else:
                for g in job["TaskGroups"]:
                    self._new_alloc(ns, job, g, eval_id)
        return self.json({"EvalID": eval_id, "EvalCreateIndex": idx, "JobModifyIndex": idx, "Warnings": "",
                          "Index": idx})

    def _allocs(self, ns: str, jid: str) -> list[dict[str, Any]]:
        return [a for a in self.allocs.values() if a["Namespace"] == ns and a["JobID"] == jid]

    def _new_alloc(self, ns: str, job: dict[str, Any], group: dict[str, Any], eval_id: str) -> None:
        aid = str(uuid.uuid4())
        idx = self._bump()
        task = group["Tasks"][0]
        self.allocs[aid] = {
            "ID": aid, "EvalID": eval_id, "Name": f"{job['ID']}.{group['Name']}[0]", "Namespace": ns,
            "NodeID": "emulator-node", "JobID": job["ID"], "TaskGroup": group["Name"], "DesiredStatus": "run",
            "ClientStatus": "pending", "CreateIndex": idx, "ModifyIndex": idx,
            "TaskStates": {task["Name"]: {"State": "pending", "Failed": False, "Events": [
                {"Type": "Received", "DisplayMessage": "Task received by client"}]}},
        }
        self.spawn(self._run_alloc(aid, job, task, group))

    async def _run_alloc(self, aid: str, job: dict[str, Any], task: dict[str, Any], group: dict[str, Any]) -> None:
        alloc = self.allocs.get(aid)
        cfg = task.get("Config") or {}
        name = task["Name"]
        res = task.get("Resources") or {}
        net_none = any((n.get("Mode") == "none") for n in group.get("Networks") or []) or \
            cfg.get("network_mode") == "none"
        tmpfs = [(m["target"], (m.get("tmpfs_options") or {}).get("size")) for m in cfg.get("mount") or []
                 if m.get("type") == "tmpfs"]
        if task["Driver"] not in ("docker", "exec"):
            return self._fail(aid, name, "Driver Failure", f"driver {task['Driver']!r} is not available")
        image = cfg.get("image") if task["Driver"] == "docker" else "agentkernel/busybox"
        try:
            cid = await self.runner.run(
                f"aknomad-{aid[:12]}", image, command=[cfg.get("command", "/bin/sh"), *cfg.get("args", [])],
                user=task.get("User") or None, env=dict(task.get("Env") or {}), workdir=cfg.get("work_dir"),
                hostname=cfg.get("hostname"), cap_drop_all=[c.lower() for c in cfg.get("cap_drop") or []] == ["all"],
                no_new_privs="no-new-privileges" in (cfg.get("security_opt") or []),
                read_only=bool(cfg.get("readonly_rootfs")), tmpfs=tmpfs,
                memory_bytes=int(res.get("MemoryMB") or 300) * 1024 * 1024,
                cpus=(res.get("CPU") / 1000) if cfg.get("cpu_hard_limit") and res.get("CPU") else None,
                pids=cfg.get("pids_limit"), network_none=net_none, extra_labels={"nomad-emulator-alloc": aid})
        except ContainerError as exc:
            msg = f"Failed to pull `{image}`: {exc.message}" if exc.reason == "ErrImagePull" else exc.message
            return self._fail(aid, name, "Driver Failure", msg)
        if alloc is None or alloc["DesiredStatus"] != "run":
            await self.runner.remove(cid)
            return None
        self.containers[aid] = cid
        alloc["ClientStatus"] = "running"
        st = alloc["TaskStates"][name]
        st["State"] = "running"
        st["StartedAt"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        st["Events"].append({"Type": "Started", "DisplayMessage": "Task started by client"})
        alloc["ModifyIndex"] = self._bump()
        return None

    def _fail(self, aid: str, task: str, kind: str, msg: str) -> None:
        alloc = self.allocs.get(aid)
        if alloc is None:
            return
        alloc["ClientStatus"] = "failed"
        st = alloc["TaskStates"][task]
        st.update(State="dead", Failed=True)
        st["Events"].append({"Type": kind, "DisplayMessage": msg})
        alloc["ModifyIndex"] = self._bump()

    def _stop_alloc(self, alloc: dict[str, Any]) -> None:
        alloc["DesiredStatus"] = "stop"
        if alloc["ClientStatus"] in ("running", "pending"):
            alloc["ClientStatus"] = "complete"
        for st in alloc["TaskStates"].values():
            st["State"] = "dead"
        alloc["ModifyIndex"] = self._bump()
        cid = self.containers.pop(alloc["ID"], None)
        if cid:
            self.spawn(self.runner.remove(cid))

    async def job_route(self, request: Request) -> Response:
        if d := self.denied(request.headers):
            return d
        ns, rest = self.ns(request), request.path_params["rest"]
        for suffix in ("/allocations", "/evaluations", "/dispatch"):
            if rest.endswith(suffix):
                jid, sub = rest[: -len(suffix)], suffix[1:]
                break
        else:
            jid, sub = rest, ""
        job = self.jobs.get((ns, jid))
        if sub == "" and request.method in ("PUT", "POST"):
            return self.register(ns, (await request.json())["Job"])
        if job is None:
            return PlainTextResponse("job not found", status_code=404)
        if sub == "allocations":
            return await self._blocking(request, lambda: [self._alloc_stub(a) for a in self._allocs(ns, jid)])
        if sub == "evaluations":
            return self.json([e for e in self.evals.values() if e["JobID"] == jid and e["Namespace"] == ns])
        if sub == "dispatch":
            if not job.get("ParameterizedJob"):
                return PlainTextResponse("Specified job is not a parameterized job", status_code=400)
            body = await request.json()
            meta = body.get("Meta") or {}
            allowed = set(job["ParameterizedJob"].get("MetaOptional") or []) | \
                set(job["ParameterizedJob"].get("MetaRequired") or [])
            if set(meta) - allowed:
                bad = sorted(set(meta) - allowed)
                return PlainTextResponse(f"Dispatch did not provide the allowed meta keys: {bad}", status_code=400)
            child = copy.deepcopy(job)
            child.pop("ParameterizedJob")
            child["ID"] = child["Name"] = f"{jid}/dispatch-{int(time.time())}-{os.urandom(4).hex()}"
            child["ParentID"] = jid
            child["Meta"] = dict(job.get("Meta") or {}, **meta)
            child["Dispatched"] = True
            r = self.register(ns, child)
            out = json.loads(r.body)
            out["DispatchedJobID"] = child["ID"]
            return self.json(out)
        if request.method == "GET":
            return self.json(job)
        # DELETE: stop (kept as dead) or purge
        for a in self._allocs(ns, jid):
            if a["DesiredStatus"] == "run":
                self._stop_alloc(a)
        idx = self._bump()
        if request.query_params.get("purge") == "true":
            self.jobs.pop((ns, jid))
            for a in self._allocs(ns, jid):
                self.allocs.pop(a["ID"])
            self.log.append(("purge", jid))
        else:
            job.update(Stop=True, Status="dead", ModifyIndex=idx)
            self.log.append(("stop", jid))
        return self.json({"EvalID": str(uuid.uuid4()), "EvalCreateIndex": idx, "JobModifyIndex": idx})

    def _alloc_stub(self, a: dict[str, Any]) -> dict[str, Any]:
        return copy.deepcopy(a)

    async def _blocking(self, request: Request, produce) -> Response:
        index = int(request.query_params.get("index") or 0)
        wait = request.query_params.get("wait", "5m")
        secs = float(wait[:-1]) * (60 if wait.endswith("m") else 1) if wait[-1] in "sm" else float(wait)
        deadline = asyncio.get_running_loop().time() + min(secs, 300)
        while self.index <= index:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except TimeoutError:
                break
        return self.json(produce())

    async def alloc_route(self, request: Request) -> Response:
        if d := self.denied(request.headers):
            return d
        a = self.allocs.get(request.path_params["id"])
        return self.json(a) if a else PlainTextResponse("alloc not found", status_code=404)

    async def vars_list(self, request: Request) -> Response:
        if d := self.denied(request.headers):
            return d
        ns, prefix = self.ns(request), request.query_params.get("prefix", "")
        return self.json([{k: v for k, v in var.items() if k != "Items"}
                          for (vns, path), var in sorted(self.vars.items()) if vns == ns and path.startswith(prefix)])

    async def var_route(self, request: Request) -> Response:
        if d := self.denied(request.headers):
            return d
        key = (self.ns(request), request.path_params["path"])
        # the body first: no await between reading the variable and writing it (check-and-set is atomic)
        body = await request.json() if request.method == "PUT" else None
        have = self.vars.get(key)
        if request.method == "GET":
            return self.json(have) if have else PlainTextResponse("variable not found", status_code=404)
        if request.method == "DELETE":
            self.vars.pop(key, None)
            self._bump()
            return Response(status_code=204)
        cas = request.query_params.get("cas")
        if cas is not None and int(cas) != (have["ModifyIndex"] if have else 0):
            return self.json(have or {}, status=409)
        idx = self._bump()
        var = {"Namespace": key[0], "Path": key[1], "Items": body.get("Items") or {},
               "CreateIndex": have["CreateIndex"] if have else idx, "ModifyIndex": idx}
        self.vars[key] = var
        return self.json(var)

    async def exec_ws(self, ws: WebSocket) -> None:
        if self.denied(ws.headers):
            await ws.send_denial_response(PlainTextResponse("Permission denied", status_code=403))
            return
        aid = ws.path_params["id"]
        alloc, cid = self.allocs.get(aid), self.containers.get(aid)
        try:
            argv = json.loads(ws.query_params.get("command") or "[]")
        except ValueError:
            argv = []
        if alloc is None:
            await ws.send_denial_response(PlainTextResponse("alloc not found", status_code=404))
            return
        if cid is None or not argv or ws.query_params.get("task") not in alloc["TaskStates"]:
            await ws.send_denial_response(PlainTextResponse("task not running or bad command", status_code=400))
            return
        await ws.accept()
        proc = await self.runner.exec(cid, argv, stdin=True)

        async def pump(stream, key: str) -> None:
            while data := await stream.read(65536):
                await ws.send_text(json.dumps({key: {"data": base64.b64encode(data).decode()}}))
            await ws.send_text(json.dumps({key: {"close": True}}))

        async def feed() -> None:
            try:
                while True:
                    frame = json.loads(await ws.receive_text())
                    stdin = frame.get("stdin") or {}
                    if stdin.get("data"):
                        proc.stdin.write(base64.b64decode(stdin["data"]))
                        await proc.stdin.drain()
                    if stdin.get("close"):
                        proc.stdin.close()
            except (WebSocketDisconnect, ConnectionError, RuntimeError, ValueError):
                return

        feeder = asyncio.create_task(feed())
        try:
            await asyncio.gather(pump(proc.stdout, "stdout"), pump(proc.stderr, "stderr"))
            rc = await proc.wait()
            await ws.send_text(json.dumps({"exited": True, "result": {"exit_code": rc}}))
            await ws.close(1000)
        except (WebSocketDisconnect, ConnectionError, RuntimeError):
            if proc.returncode is None:
                proc.kill()
        finally:
            feeder.cancel()
