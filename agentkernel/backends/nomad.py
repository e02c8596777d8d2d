"""Nomad backend: one batch job per sandbox on a real Nomad cluster (extra ``agentkernel[nomad]``).

- Connection: ``[orchestrator] nomad_addr`` / ``nomad_token`` / TLS files (or NOMAD_ADDR, NOMAD_TOKEN,
  NOMAD_CACERT, NOMAD_CLIENT_CERT, NOMAD_CLIENT_KEY, NOMAD_REGION, NOMAD_NAMESPACE), namespace and region
  on every call, the ACL token as ``X-Nomad-Token``.
- A sandbox is a batch job ``ak-<id>``: one group (no restarts, no rescheduling), one task ``sandbox``
  on the docker driver (all capabilities dropped, no-new-privileges, ``network_mode = none`` and a
  group network of mode none unless the policy allows network, read-only root with tmpfs scratch, pids
  limit, hard CPU limit, memory) or the exec driver (fewer controls: see ``controls``).
- create registers the job; start waits for its allocation to run (blocking queries, bounded), failing
  with Nomad's own reason (placement failures, driver errors such as image pulls).
- exec through ``/v1/client/allocation/:id/exec``; cwd/env/timeout via ``_remote_exec.wrap``; files as
  tar streams through exec. stop kills the task's processes but its idle PID 1 and marks the sandbox
  stopped (a Nomad variable; files kept, start clears it); remove deregisters with ``purge=true``.
- pools (``warm_pool_size`` > 0): a parameterized job per spec is the pool's template; members are
  dispatched children, kept warm; a claim is a Nomad Variable created with check-and-set index 0
  (``cas=0``), so of many concurrent claimers of one member exactly one wins.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from typing import Any

from ..config import orchestrator_settings
from ..errors import InvalidState, PolicyNotEnforceable, SandboxError
from ..spec import DEFAULT_TMPFS_MB, SandboxSpec
from . import _remote_exec
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

TASK = "sandbox"
GROUP = "sandbox"
IDLE_ARGS = ["-c", "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done"]
# Network: only ``none`` (group network mode none, docker network_mode none). Nomad's bridge/host modes
# filter nothing on the way out, so a task could reach cloud metadata, the node and other allocations:
# open and allowlist are refused (fail closed) until a CNI egress filter joined to the gateway exists.
# disk_rootfs: the docker driver's storage_opt size (the client's dockerd enforces it: btrfs, or overlay2
# on XFS with pquota; a dockerd that cannot refuses the task, so the start fails closed)
DOCKER_CONTROLS = {"network_none", "read_only_root", "memory", "cpu", "pids", "disk_tmpfs", "disk_rootfs",
                   "seccomp_default", "cap_drop_all", "no_new_privileges", "non_root", "env"}
EXEC_CONTROLS = {"network_none", "memory", "cpu", "cap_drop_all", "no_new_privileges", "non_root",
                 "env", "seccomp_default"}
NETWORK_HINT = ("Nomad's bridge and host networks filter no egress (cloud metadata, the node and other "
                "allocations would be reachable) and Nomad has no NetworkPolicy to fence a task to an egress "
                "gateway, so allowlists and secrets could be bypassed by connecting to an IP: they are refused. "
                "Use --network none, or a backend that enforces egress (podman, docker, oci, gvisor; "
                "kubernetes with [orchestrator] egress_gateway_image)")
META_SPEC = "agentkernel.spec"
META_POOL = "agentkernel.pool"
VAR_PREFIX = "agentkernel/claims"


def job_id(sandbox_id: str) -> str:
    return "ak-" + sandbox_id


class NomadBackend(OrchestratorBackend):
    name = "nomad"
    capabilities = Capabilities(DOCKER_CONTROLS, {"exec", "files", "warm_pool", "remote"},
                                isolation="container on a Nomad client (docker driver) or chroot+cgroups (exec driver)")

    @classmethod
    def probe(cls) -> Availability:
        try:
            import httpx
            import websockets  # noqa: F401
        except ModuleNotFoundError as exc:
            return Availability(False, f"the Python package {exc.name!r} is missing",
                                fix="pip install 'agentkernel[nomad]'")
        s = orchestrator_settings(backend="nomad")
        headers = {"X-Nomad-Token": s["nomad_token"]} if s.get("nomad_token") else {}
        try:
            r = httpx.get(s["nomad_addr"].rstrip("/") + "/v1/agent/self", headers=headers, timeout=5,
                          verify=s.get("nomad_ca_cert") or True)
            r.raise_for_status()
            version = ((r.json().get("config") or {}).get("Version") or {}).get("Version", "?")
        except Exception as exc:
            return Availability(False, f"Nomad at {s['nomad_addr']} does not answer: {exc}",
                                fix="set NOMAD_ADDR (or [orchestrator] nomad_addr), e.g. nomad agent -dev")
        return Availability(True, f"Nomad {version} at {s['nomad_addr']}", details={"addr": s["nomad_addr"]})

    def controls(self) -> set[str]:
        return set(DOCKER_CONTROLS if self.settings["nomad_driver"] == "docker" else EXEC_CONTROLS)

    def check(self, spec: SandboxSpec) -> None:
        try:
            check_policy(spec, Capabilities(self.controls()), self.name)
        except PolicyNotEnforceable as exc:
            if "network_" in str(exc) or "secret_injection" in str(exc):
                exc.hint = NETWORK_HINT
            raise

    def planned_handle(self, sandbox_id: str) -> dict[str, Any]:
        return {}  # remove() by id alone finds its job, or the pool member it claimed

    def _api(self):
        from ._nomad_api import NomadClient

        loop = asyncio.get_running_loop()
        if self._client is not None and self._client_loop is not loop:
            self._client = None
        if self._client is None:
            s = self.settings
            self._client = NomadClient(s["nomad_addr"], token=s.get("nomad_token") or None, namespace=s["namespace"],
                                       region=s.get("nomad_region"), ca_cert=s.get("nomad_ca_cert"),
                                       client_cert=s.get("nomad_client_cert"), client_key=s.get("nomad_client_key"))
            self._client_loop = loop
        return self._client

    # -- the job ----------------------------------------------------------------------------------------------
    def task(self, spec: SandboxSpec) -> dict[str, Any]:
        pol, res = spec.policy, spec.resources
        uid, _, gid = pol.user.partition(":")
        driver = self.settings["nomad_driver"]
        if driver == "docker":
            cfg: dict[str, Any] = {
                "image": spec.image, "command": "/bin/sh", "args": list(IDLE_ARGS),
                "cap_drop": ["ALL"], "security_opt": ["no-new-privileges"],
                "readonly_rootfs": bool(pol.read_only_root), "work_dir": spec.workdir, "hostname": spec.hostname,
                "network_mode": "bridge" if pol.network else "none", "cpu_hard_limit": res.vcpus is not None,
                "force_pull": False,
            }
            if res.pids is not None:
                cfg["pids_limit"] = res.pids
            if res.disk_mb is not None and not pol.read_only_root:
                cfg["storage_opt"] = {"size": f"{res.disk_mb}M"}
            size = (res.disk_mb or DEFAULT_TMPFS_MB) * 1024 * 1024
            cfg["mount"] = [{"type": "tmpfs", "target": path, "readonly": False,
                             "tmpfs_options": {"size": size, "mode": 0o1777}}
                            for path in dict.fromkeys(["/tmp", spec.workdir])]
        else:
            cfg = {"command": "/bin/sh", "args": list(IDLE_ARGS), "cap_drop": ["all"], "work_dir": spec.workdir}
        return {
            "Name": TASK, "Driver": driver, "User": f"{uid}:{gid or uid}", "Config": cfg,
            "Env": dict(spec.env),
            "Resources": {"CPU": max(100, math.ceil((res.vcpus or 1.0) * 1000)),
                          "MemoryMB": max(10, res.memory_mb or 512)},
            "KillTimeout": 2_000_000_000,
            "LogConfig": {"MaxFiles": 1, "MaxFileSizeMB": 1},
        }

    def job(self, spec: SandboxSpec, jid: str, meta: dict[str, str], *, parameterized: bool = False) -> dict[str, Any]:
        group: dict[str, Any] = {
            "Name": GROUP, "Count": 1, "Tasks": [self.task(spec)],
            "RestartPolicy": {"Attempts": 0, "Mode": "fail"},
            "ReschedulePolicy": {"Attempts": 0, "Unlimited": False},
            "EphemeralDisk": {"SizeMB": max(10, spec.resources.disk_mb or 150)},
        }
        if not spec.policy.network:
            group["Networks"] = [{"Mode": "none"}]
        job: dict[str, Any] = {
            "ID": jid, "Name": jid, "Type": "batch", "Datacenters": [self.settings["nomad_datacenter"]],
            "Meta": dict(meta), "TaskGroups": [group],
        }
        if self._api().namespace:
            job["Namespace"] = self._api().namespace
        if self.settings.get("nomad_region"):
            job["Region"] = self.settings["nomad_region"]
        if parameterized:
            job["ParameterizedJob"] = {"Payload": "forbidden", "MetaOptional": sorted(meta_keys())}
        return job

    def _meta(self, spec: SandboxSpec, sandbox_id: str, owner: dict[str, Any]) -> dict[str, str]:
        meta = owner_labels(sandbox_id, owner, spec.name)
        meta[META_SPEC] = spec.to_json()
        return meta

    # -- lifecycle ------------------------------------------------------------------------------------------
    async def create(self, spec: SandboxSpec, *, sandbox_id: str, owner: dict[str, Any]) -> SandboxRef:
        await self._check_capacity()
        if int(self.settings["warm_pool_size"]) > 0:
            ref = await self.claim(spec, sandbox_id=sandbox_id, owner=owner)
            self._background(self.fill_pool(spec))
            if ref is not None:
                return ref
        jid = job_id(sandbox_id)
        job = self.job(spec, jid, self._meta(spec, sandbox_id, owner))
        await self._api().request("PUT", "/v1/jobs", body={"Job": job})
        return SandboxRef(self.name, sandbox_id, {"job": jid}, spec)

    async def _check_capacity(self) -> None:
        cap = int(self.settings.get("max_sandboxes") or 0)
        if cap and len([i for i in await self.list() if i.status != "stopped"]) >= cap:
            raise SandboxError(f"Nomad already runs {cap} agentkernel sandboxes (max_sandboxes = {cap})")

    async def start(self, ref: SandboxRef) -> None:
        api = self._api()
        jid = ref.handle.get("job") or job_id(ref.id)
        job, _ = await api.request("GET", f"/v1/job/{jid}", allow=(404,))
        if job is None:
            raise InvalidState(f"sandbox {ref.id} no longer exists (no Nomad job {jid})")
        if job.get("Stop"):
            job["Stop"] = False
            await api.request("PUT", f"/v1/job/{jid}", body={"Job": job})
        await api.request("DELETE", f"/v1/var/{stopped_var(jid)}", allow=(404,))
        ref.handle["alloc"] = await self._wait_running(jid)

    async def _wait_running(self, jid: str) -> str:
        api = self._api()
        limit = float(self.settings["ready_timeout_s"])
        deadline = time.monotonic() + limit
        index = 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise SandboxError(f"Nomad job {jid} had no running allocation within {limit:.0f} s")
            wait = max(1, min(int(left), 30))
            allocs, index = await api.request("GET", f"/v1/job/{jid}/allocations",
                                              params={"index": index, "wait": f"{wait}s"}, timeout=wait + 10)
            for a in sorted(allocs or [], key=lambda a: a.get("CreateIndex", 0), reverse=True):
                if a.get("DesiredStatus") != "run":
                    continue
                state = (a.get("TaskStates") or {}).get(TASK) or {}
                if a.get("ClientStatus") == "running" and state.get("State") == "running":
                    return a["ID"]
                if a.get("ClientStatus") in ("failed", "lost", "complete") or state.get("Failed"):
                    events = [e.get("DisplayMessage") or e.get("Type", "") for e in state.get("Events") or []]
                    raise SandboxError(f"Nomad allocation {a['ID'][:8]} of job {jid} {a.get('ClientStatus')}: "
                                       + "; ".join(e for e in events if e)[-400:],
                                       hint="is the image available to the Nomad clients' docker?")
            if not allocs:
                await self._placement_failure(jid)

    async def _placement_failure(self, jid: str) -> None:
        evals, _ = await self._api().request("GET", f"/v1/job/{jid}/evaluations")
        for ev in evals or []:
            failed = ev.get("FailedTGAllocs") or {}
            if failed:
                metric = next(iter(failed.values()))
                why = ", ".join(f"{k}: {v}" for k, v in (metric.get("ConstraintFiltered") or {}).items()) or \
                    ", ".join(f"{k}: {v}" for k, v in (metric.get("DimensionExhausted") or {}).items()) or \
                    f"{metric.get('NodesEvaluated', 0)} nodes evaluated, none fit"
                raise SandboxError(f"Nomad cannot place job {jid}: {why}",
                                   hint="check [orchestrator] nomad_datacenter and the resources asked for")

    async def _alloc_of(self, ref: SandboxRef) -> str:
        if ref.handle.get("alloc"):
            return ref.handle["alloc"]
        jid = ref.handle.get("job") or job_id(ref.id)
        allocs, _ = await self._api().request("GET", f"/v1/job/{jid}/allocations")
        for a in allocs or []:
            if a.get("ClientStatus") == "running":
                ref.handle["alloc"] = a["ID"]
                return a["ID"]
        raise InvalidState(f"sandbox {ref.id} is not running (start it first)")

    # -- exec / files ---------------------------------------------------------------------------------------
    async def exec(self, ref: SandboxRef, req: ExecRequest) -> ExecResult:
        self._check_exec_user(ref, req, "the task's")
        alloc = await self._alloc_of(ref)
        collector = OutputCollector(req.output_limit)
        argv = _remote_exec.wrap(req.argv, cwd=req.cwd or ref.spec.workdir, env=req.env, timeout=req.timeout)
        async def start() -> int | None:
            return await self._api().exec(alloc, TASK, argv, stdin=req.stdin, on_output=req.on_output or collector,
                                          tty=req.tty, tty_size=req.tty_size)

        return await _remote_exec.run(start, req, collector, lambda r: self.exec(ref, r), ref)

    # -- stop / remove / status / list ---------------------------------------------------------------------
    async def stop(self, ref: SandboxRef) -> None:
        """Every process of the task but its idle PID 1 is killed and the sandbox is marked stopped (a
        Nomad variable); the allocation and its files stay, so start resumes with the files kept."""
        jid = ref.handle.get("job") or job_id(ref.id)
        if await self.status(ref) == "running":
            await self.exec(ref, ExecRequest(["sh", "-c", "kill -KILL -1"], cwd="/", timeout=30))
            path = stopped_var(jid)
            await self._api().request("PUT", f"/v1/var/{path}", body={"Path": path, "Items": {"stopped": "true"}})

    async def remove(self, ref: SandboxRef) -> None:
        api = self._api()
        jid = ref.handle.get("job") or job_id(ref.id)
        await api.request("DELETE", f"/v1/job/{jid}", params={"purge": "true"}, allow=(404,))
        await api.request("DELETE", f"/v1/var/{stopped_var(jid)}", allow=(404,))
        if ref.handle.get("claim_var"):
            await api.request("DELETE", f"/v1/var/{ref.handle['claim_var']}", allow=(404,))
        elif not ref.handle.get("job"):  # known by id only (reaping): a pool member it may have claimed
            for info in await self.list():
                if info.id == ref.id and info.handle["job"] != jid:
                    await api.request("DELETE", f"/v1/job/{info.handle['job']}", params={"purge": "true"},
                                      allow=(404,))
                    await api.request("DELETE", f"/v1/var/{claim_var(info.handle['job'])}", allow=(404,))

    async def status(self, ref: SandboxRef) -> str:
        api = self._api()
        jid = ref.handle.get("job") or job_id(ref.id)
        job, _ = await api.request("GET", f"/v1/job/{jid}", allow=(404,))
        if job is None:
            return "missing"
        if job.get("Stop") or job.get("Status") == "dead":
            return "stopped"
        allocs, _ = await api.request("GET", f"/v1/job/{jid}/allocations")
        if any(a.get("ClientStatus") == "running" for a in allocs or []):
            mark, _ = await api.request("GET", f"/v1/var/{stopped_var(jid)}", allow=(404,))
            return "stopped" if mark is not None else "running"
        return "created"

    async def list(self) -> list[SandboxInfo]:
        api = self._api()
        stubs, _ = await api.request("GET", "/v1/jobs", params={"prefix": "ak-", "meta": "true"})
        marks, _ = await api.request("GET", "/v1/vars", params={"prefix": "agentkernel/stopped/"})
        stopped = {m.get("Path") for m in marks or []}
        out = []
        for stub in stubs or []:
            if stub.get("ParameterizedJob"):
                continue  # a pool's template, not a sandbox
            meta = stub.get("Meta")
            if meta is None:
                job, _ = await api.request("GET", f"/v1/job/{stub['ID']}", allow=(404,))
                meta = (job or {}).get("Meta") or {}
            if meta.get(LABEL_MANAGED) != "true":
                continue
            labels = {k: v for k, v in meta.items() if k != META_SPEC}
            state = "stopped" if stub.get("Stop") or stub.get("Status") == "dead" or \
                stopped_var(stub["ID"]) in stopped else ("running" if stub.get("Status") == "running" else "created")
            # a claimed pool member belongs to its claimer: the claim variable names it
            if meta.get(META_POOL):
                var, _ = await api.request("GET", f"/v1/var/{claim_var(stub['ID'])}", allow=(404,))
                if var is not None:
                    labels.update(var.get("Items") or {})
            out.append(SandboxInfo(self.name, labels.get(LABEL_ID, stub["ID"]), labels.get(LABEL_NAME), state,
                                   {"job": stub["ID"]}, labels))
        return out

    # -- pools: parameterized job dispatch + claims by check-and-set ----------------------------------------
    def _pool_job(self, spec: SandboxSpec) -> str:
        return f"ak-pool-{spec.pool_key()}"

    async def _ensure_template(self, spec: SandboxSpec) -> str:
        api, pid = self._api(), self._pool_job(spec)
        have, _ = await api.request("GET", f"/v1/job/{pid}", allow=(404,))
        if have is None:
            meta = {LABEL_MANAGED: "true", META_POOL: spec.pool_key(), META_SPEC: spec.to_json()}
            await api.request("PUT", "/v1/jobs", body={"Job": self.job(spec, pid, meta, parameterized=True)})
        return pid

    async def _members(self, spec: SandboxSpec) -> list[dict[str, Any]]:
        stubs, _ = await self._api().request("GET", "/v1/jobs", params={"prefix": self._pool_job(spec) + "/dispatch-"})
        return [s for s in stubs or [] if not s.get("Stop") and s.get("Status") != "dead"]

    async def fill_pool(self, spec: SandboxSpec, size: int | None = None) -> int:
        """Dispatch members until ``size`` (default warm_pool_size) are unclaimed; bounded by max_pool_size."""
        from ..owner import current_owner

        api = self._api()
        want = int(self.settings["warm_pool_size"] if size is None else size)
        pid = await self._ensure_template(spec)
        members = await self._members(spec)
        free = []
        for m in members:
            var, _ = await api.request("GET", f"/v1/var/{claim_var(m['ID'])}", allow=(404,))
            if var is None:
                free.append(m)
        n = max(0, min(want - len(free), int(self.settings["max_pool_size"]) - len(members)))

        async def one() -> None:
            meta = {k: v for k, v in owner_labels(f"pool-{os.urandom(5).hex()}", current_owner()).items()}
            meta[META_POOL] = spec.pool_key()
            await api.request("POST", f"/v1/job/{pid}/dispatch", body={"Meta": meta})

        await asyncio.gather(*(one() for _ in range(n)))
        return n

    async def claim(self, spec: SandboxSpec, *, sandbox_id: str, owner: dict[str, Any]) -> SandboxRef | None:
        from ._nomad_api import NomadError

        api = self._api()
        members = await self._members(spec)
        members.sort(key=lambda m: (m.get("Status") != "running", os.urandom(2)))
        items = owner_labels(sandbox_id, owner, spec.name)
        for m in members:
            path = claim_var(m["ID"])
            try:
                await api.request("PUT", f"/v1/var/{path}", params={"cas": "0"}, body={"Path": path, "Items": items})
            except NomadError as exc:
                if exc.status == 409:
                    continue  # claimed by someone else first
                raise
            return SandboxRef(self.name, sandbox_id, {"job": m["ID"], "claim_var": path}, spec)
        return None



def stopped_var(job: str) -> str:
    return f"agentkernel/stopped/{job.replace('/', '.')}"


def claim_var(job: str) -> str:
    return f"{VAR_PREFIX}/{job.replace('/', '.')}"


def meta_keys() -> list[str]:
    from .base import (
        LABEL_JOURNAL,
        LABEL_OWNER_BOOT,
        LABEL_OWNER_HOST,
        LABEL_OWNER_PID,
        LABEL_OWNER_START,
        LABEL_STORE,
        extra_labels,
    )

    return [LABEL_MANAGED, LABEL_ID, LABEL_NAME, LABEL_OWNER_HOST, LABEL_OWNER_BOOT, LABEL_OWNER_PID, LABEL_OWNER_START,
            LABEL_STORE, LABEL_JOURNAL, META_POOL, *extra_labels()]
