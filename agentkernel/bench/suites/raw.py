"""The raw engines we compare against, built for the same image and command as ours.

Per backend, the one-shot baselines (``echo hello`` in a fresh sandbox, new process per run):

| backend | raw baselines |
|---|---|
| podman | ``podman run --rm IMG echo hello`` (plain) and the same with our hardening flags |
| docker | ``docker run --rm IMG echo hello`` (plain) and the same with our hardening flags |
| gvisor | ``podman run --rm --runtime runsc --runtime-flag network=none --runtime-flag platform=ptrace IMG``
           (plain), the same with our flags, and ``runsc run`` on a plain OCI bundle |
| oci    | ``crun run`` on a plain OCI bundle (``crun spec`` defaults), and plain ``podman run --rm`` |
| wasm   | a new interpreter that imports wasmtime, loads the compiled shell from the disk cache,
           instantiates it and runs ``echo hello`` (``wasm_bench``'s cold child: no agentkernel CLI) |
| other  | whatever the backend class declares in ``bench_baselines()`` (e.g. a raw QEMU boot), else the
           row is "unavailable: <doctor's reason>" |

"Our flags" are rendered from the very plan our one-shot uses (``_container.plan`` of the default spec),
minus the agent bind mount, the name and the labels: network none, cap-drop all, no-new-privileges,
seccomp, user 1000, memory/cpu/pids limits, workdir.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from typing import Any

from ..harness import BenchContext, Cmd

RUNSC_PLAIN = ["--runtime", "/usr/bin/runsc", "--runtime-flag", "network=none", "--runtime-flag", "platform=ptrace"]


def _plan_args(ctx: BenchContext, backend: str) -> tuple[list[str], str, list[str]]:
    """(podman-style hardening flags, image, cmd) of our one-shot plan for ``backend``, without the agent,
    the container name and the labels."""
    from ...backends import _container

    spec = ctx.spec_for(backend)
    kw = {}
    try:
        from ...backends import get_backend_class

        runtime = getattr(get_backend_class(backend), "pids_runtime", "")
        if runtime:
            kw["pids_runtime"] = runtime
    except Exception:
        pass
    plan = _container.plan(spec, sandbox_id="akbench", owner={}, container_name="akbench",
                           argv=["echo", "hello"], agent_bin=None, **kw)
    args = _container.podman_args(plan)
    out: list[str] = []
    skip = False
    for a in args:
        if skip:
            skip = False
            continue
        if a in ("--name", "--label"):
            skip = True
            continue
        if a == "--entrypoint":  # our plan puts argv[0] in the entrypoint; raw runs pass the command plainly
            skip = True
            continue
        out.append(a)
    return out, plan.image, ["echo", "hello"]


def hardened_podman(ctx: BenchContext, backend: str = "podman") -> list[str]:
    flags, image, cmd = _plan_args(ctx, backend)
    return ["podman", "run", "--rm", *flags, image, *cmd]


def docker_flags(podman_flags: list[str], image_mb: int | None) -> list[str]:
    """Our podman-style hardening flags as the docker CLI takes them: no ``--read-only-tmpfs`` (podman
    only), and the disk cap podman applies with its prestart hook (``--hooks-dir`` + the cap annotation)
    given as docker's own ``--storage-opt size=`` of the cap plus the image (as the docker backend does)."""
    from ...diskquota import HOOK_ANNOTATION

    out: list[str] = []
    it = iter(podman_flags)
    for f in it:
        if f.startswith("--read-only-tmpfs"):
            continue
        if f == "--hooks-dir":
            next(it, None)
            continue
        if f == "--annotation":
            val = next(it, "")
            key, _, mb = val.partition("=")
            if key == HOOK_ANNOTATION:
                out += ["--storage-opt", f"size={int(mb) + (image_mb or 0) + 1}M"]
            else:
                out += [f, val]
            continue
        out.append(f)
    return out


def _docker_image_mb(image: str) -> int | None:
    import subprocess

    try:
        r = subprocess.run(["docker", "image", "inspect", "-f", "{{.Size}}", image], capture_output=True, text=True,
                           timeout=30)
        return int(r.stdout.strip()) >> 20 if r.returncode == 0 else None
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


def hardened_docker(ctx: BenchContext) -> list[str]:
    flags, image, cmd = _plan_args(ctx, "docker")
    return ["docker", "run", "--rm", *docker_flags(flags, _docker_image_mb(image)), image, *cmd]


def _which(name: str) -> str | None:
    for cand in (f"/usr/bin/{name}", f"/usr/sbin/{name}", f"/usr/local/bin/{name}"):
        if os.access(cand, os.X_OK):
            return cand
    return shutil.which(name)


# ---- plain OCI bundles for crun / runc / runsc run --------------------------------------------------


_counter = iter(range(1, 1 << 62))


def plain_bundle(ctx: BenchContext, runtime: str, image: str, args: list[str] | None = None,
                 tag: str = "") -> tuple[Callable[[], list[str]] | None, str | None]:
    """A plain bundle (``crun spec`` defaults, read-only root = the image's cached rootfs, ``echo hello``)
    and a function giving the argv that runs it once (a fresh container id each time, so concurrent runs
    never collide). (None, reason) when it cannot be made here."""
    exe = _which(runtime)
    if exe is None:
        return None, f"{runtime} is not installed"
    crun = _which("crun") or _which("runc")
    if crun is None:
        return None, "neither crun nor runc is installed (needed to generate a default config.json)"
    try:
        from ...oci import rootfs

        root = rootfs.resolve(image, quiet=True).path
    except Exception as exc:
        return None, f"cannot unpack {image} for a raw bundle: {exc}"
    base = os.path.join(ctx.tmp, "raw", runtime)
    bdir = os.path.join(base, "bundle" + tag)
    state = os.path.join(base, "state")
    os.makedirs(bdir, exist_ok=True)
    os.makedirs(state, exist_ok=True)
    if not os.path.exists(os.path.join(bdir, "config.json")):
        r = subprocess.run([crun, "spec"], cwd=bdir, capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            return None, f"{os.path.basename(crun)} spec failed: {r.stderr.strip()[:200]}"
        with open(os.path.join(bdir, "config.json")) as f:
            cfg = json.load(f)
        cfg["root"] = {"path": os.path.realpath(root), "readonly": True}
        cfg["process"]["terminal"] = False
        cfg["process"]["args"] = args or ["echo", "hello"]
        with open(os.path.join(bdir, "config.json"), "w") as f:
            json.dump(cfg, f)
    base_argv = [exe, "--root", state]
    if runtime == "runsc":
        base_argv += ["--network=none", "--platform=ptrace"]

    def argv() -> list[str]:
        return [*base_argv, "run", "--bundle", bdir, f"akbench-{ctx.run_id}-{runtime}{tag}-{next(_counter)}"]

    return argv, None


def runtime_base(ctx: BenchContext, runtime: str) -> list[str] | None:
    exe = _which(runtime)
    if exe is None:
        return None
    argv = [exe, "--root", os.path.join(ctx.tmp, "raw", runtime, "state")]
    if runtime == "runsc":
        argv += ["--network=none", "--platform=ptrace"]
    return argv


def raw_state_dirs(ctx: BenchContext) -> list[str]:
    base = os.path.join(ctx.tmp, "raw")
    return [os.path.join(base, rt, "state") for rt in ("crun", "runc", "runsc")]


# ---- wasm ---------------------------------------------------------------------------------------------


def _wasm_ok(out: bytes) -> bool:
    try:
        d = json.loads(out)
    except ValueError:
        return False
    return isinstance(d, dict) and "total_ms" in d


def wasm_raw(ctx: BenchContext) -> tuple[list[str] | None, str | None]:
    import sys

    try:
        from .. import wasm_bench

        aksh = wasm_bench._aksh()
        child = wasm_bench._COLD_CHILD
    except Exception as exc:
        return None, f"wasmtime baseline unavailable: {exc}"
    return [sys.executable, "-c", child, aksh], None


# ---- per backend ---------------------------------------------------------------------------------------


def oneshot_baselines(ctx: BenchContext, backend: str) -> tuple[list[Cmd], list[dict[str, Any]]]:
    """(commands to interleave with ours, unavailable rows {name, label, reason})."""
    image = ctx.image(backend) or "agentkernel/busybox"
    cmds: list[Cmd] = []
    missing: list[dict[str, Any]] = []

    def add(name: str, label: str, argv, reason: str | None = None, **kw) -> None:
        if argv is None:
            missing.append({"name": name, "label": label, "reason": reason})
        elif callable(argv):
            cmds.append(Cmd(name, argv(), label=label, backend=backend, mode="raw", image=image, argv_fn=argv, **kw))
        else:
            cmds.append(Cmd(name, argv, label=label, backend=backend, mode="raw", image=image, **kw))

    if backend in ("podman", "oci", "gvisor"):
        have = _which("podman")
        plain = ["podman", "run", "--rm", image, "echo", "hello"]
        if backend == "podman":
            add("raw_podman", "podman run --rm (plain)", plain if have else None, "podman is not installed")
            add("raw_podman_hardened", "podman run --rm + our flags",
                hardened_podman(ctx) if have else None, "podman is not installed")
        elif backend == "oci":
            argv, why = plain_bundle(ctx, "crun", image)
            add("raw_crun", "crun run (plain bundle)", argv, why)
            add("raw_podman", "podman run --rm (plain)", plain if have else None, "podman is not installed")
        else:
            runsc = _which("runsc")
            ok = have and runsc
            add("raw_podman_runsc", "podman run --rm --runtime runsc (plain)",
                ["podman", "run", "--rm", *RUNSC_PLAIN, image, "echo", "hello"] if ok else None,
                "podman or runsc is not installed")
            if ok:
                from ...backends.gvisor import GVisorBackend

                hard = hardened_podman(ctx, "gvisor")
                hard = [*hard[:3], *GVisorBackend().runtime_args(), *hard[3:]]
            add("raw_podman_runsc_hardened", "podman run --rm --runtime runsc + our flags",
                hard if ok else None, "podman or runsc is not installed")
            argv, why = plain_bundle(ctx, "runsc", image)
            add("raw_runsc", "runsc run (plain bundle)", argv, why)
    elif backend == "docker":
        have = _which("docker")
        add("raw_docker", "docker run --rm (plain)",
            ["docker", "run", "--rm", image, "echo", "hello"] if have else None, "docker is not installed")
        add("raw_docker_hardened", "docker run --rm + our flags", hardened_docker(ctx) if have else None,
            "docker is not installed")
    elif backend == "wasm":
        argv, why = wasm_raw(ctx)
        add("raw_wasmtime", "new process: import wasmtime + instantiate + run (no CLI)", argv, why, check=_wasm_ok)
    else:
        hook = _backend_hook(backend)
        if hook:
            for row in hook:
                add(row["name"], row["label"], row.get("argv"), row.get("reason"),
                    expect=row.get("expect", b"hello\n"))
        elif backend == "qemu":
            ok, reason = ctx.available("qemu")
            missing.append({"name": "raw_qemu_boot", "label": "raw QEMU boot to userspace (echo hello)",
                            "reason": reason or "the qemu backend declares no raw baseline"})
        elif backend == "firecracker":
            ok, reason = ctx.available("firecracker")
            missing.append({"name": "raw_firecracker", "label": "raw Firecracker boot (echo hello)",
                            "reason": reason or "no raw baseline"})
    return cmds, missing


def _backend_hook(backend: str) -> list[dict[str, Any]] | None:
    """A backend may declare ``bench_baselines() -> [{name, label, argv | reason, expect?}]``."""
    try:
        from ...backends import get_backend_class

        cls = get_backend_class(backend)
    except Exception:
        return None
    fn = getattr(cls, "bench_baselines", None)
    if fn is None:
        return None
    try:
        return list(fn())
    except Exception as exc:
        return [{"name": "raw", "label": f"{backend} raw baseline", "reason": f"bench_baselines failed: {exc}"}]


# ---- raw long-lived containers for exec baselines ------------------------------------------------------


class RawExecContainer:
    """``ENGINE run -d --name akbench-... IMG sleep 3600`` for ``ENGINE exec NAME echo hello``."""

    def __init__(self, ctx: BenchContext, engine: str, image: str, runtime_args: list[str] | None = None) -> None:
        self.ctx, self.engine, self.image = ctx, engine, image
        self.name = f"akbench-{ctx.run_id}-{engine}-exec" + ("-runsc" if runtime_args else "")
        self.runtime_args = runtime_args or []
        self.ok = False
        self.error: str | None = None

    def __enter__(self) -> RawExecContainer:
        r = self.ctx.run_quiet([self.engine, "run", "-d", "--name", self.name, *self.runtime_args, self.image,
                                "sleep", "3600"], timeout=120)
        self.ok = r.returncode == 0
        if not self.ok:
            self.error = (r.stderr or r.stdout).decode(errors="replace").strip()[-300:]
        return self

    def exec_argv(self) -> list[str]:
        return [self.engine, "exec", self.name, "echo", "hello"]

    def __exit__(self, *exc) -> None:
        self.ctx.run_quiet([self.engine, "rm", "-f", self.name], timeout=120)
