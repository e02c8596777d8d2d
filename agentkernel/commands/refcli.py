"""The reference system's extra commands: ``setup``, ``status``, ``init``, ``agents``, ``plugin``,
``volume``. None of them is on a hot path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from .. import paths
from ..errors import AgentKernelError, ValidationError
from ..hostsetup import BACKENDS as BACKEND_CHOICES
from ..refcompat import AGENTS, agent_status


def add_parsers(sub, want) -> None:
    if want("setup"):
        p = sub.add_parser("setup", help="check, and install, what the chosen backends need")
        p.add_argument("--check", action="store_true", help="only report (exit 1 when something is missing)")
        p.add_argument("--dry-run", action="store_true", help="say what would change, change nothing")
        p.add_argument("-y", "--yes", action="store_true", help="do it without asking")
        p.add_argument("-q", "--quiet", action="store_true", help="do not list what is already in place")
        p.add_argument("-B", "--backend", action="append", metavar="NAME",
                       help=f"a backend to prepare (repeatable; {', '.join(BACKEND_CHOICES)}; default: podman)")
        p.add_argument("--all", action="store_true", help="every backend that runs here (all but firecracker)")
        p.add_argument("--image", action="append", metavar="IMAGE",
                       help="only these local images (busybox, debian; default: both)")
        p.add_argument("--vm-image", action="append", metavar="IMAGE", help="microVM guest images to build "
                       "(default: agentkernel/busybox)")
        p.add_argument("--dev", action="store_true",
                       help="also the development and test tools (and the Firecracker binary the tests start)")
        p.add_argument("--reference-clients", action="store_true",
                       help="also the reference system's published clients under build/ (compatibility tests)")
    if want("status"):
        p = sub.add_parser("status", help="installation status: backends, agent binary, images, daemon")
        p.add_argument("--json", action="store_true")
    if want("init"):
        p = sub.add_parser("init", help="write a commented agentkernel.toml in the current directory")
        p.add_argument("-n", "--name", help="sandbox name (default: the directory's name)")
        p.add_argument("-a", "--agent", default="claude", choices=list(AGENTS))
        p.add_argument("-f", "--force", action="store_true", help="overwrite an existing agentkernel.toml")
    if want("agents"):
        p = sub.add_parser("agents", help="which coding agents are installed and have their API keys set")
        p.add_argument("--json", action="store_true")
    if want("plugin"):
        p = sub.add_parser("plugin", help="make coding agents use agentkernel's MCP server")
        ps = p.add_subparsers(dest="action", metavar="ACTION", required=True)
        pi = ps.add_parser("install", help="install for an agent (claude, codex, gemini, opencode, mcp, all)")
        pi.add_argument("target", choices=["claude", "codex", "gemini", "opencode", "mcp", "all"])
        pi.add_argument("-g", "--global", dest="global_", action="store_true",
                        help="install for the user (under $HOME) instead of this project")
        pi.add_argument("-f", "--force", action="store_true", help="overwrite files edited since installed")
        pi.add_argument("--dry-run", action="store_true", help="say what would change, change nothing")
        pi.add_argument("--dir", default=".", help="the project directory (default: the current one)")
        pl = ps.add_parser("list", help="install status per agent")
        pl.add_argument("--dir", default=".")
        pl.add_argument("--json", action="store_true")
    if want("volume"):
        p = sub.add_parser("volume", help="named volumes: data that outlives sandboxes")
        vs = p.add_subparsers(dest="action", metavar="ACTION", required=True)
        vc = vs.add_parser("create", help="create a named volume")
        vc.add_argument("name")
        vl = vs.add_parser("list", aliases=["ls"], help="list volumes")
        vl.add_argument("--json", action="store_true")
        vi = vs.add_parser("info", help="a volume's details")
        vi.add_argument("name")
        vr = vs.add_parser("rm", aliases=["remove", "delete"], help="delete a volume and its data")
        vr.add_argument("names", nargs="+", metavar="name")


# ---- init ----------------------------------------------------------------------------------------------

INIT_TEMPLATE = """\
# agentkernel.toml: how `agentkernel run` and `agentkernel create` sandbox this project.
# Every key is optional; flags (-i, -p, --memory, ...) override what is set here.
# Reference of every key: docs/configuration.md; keys of the reference system: docs/migrating.md.

[sandbox]
name = "{name}"
# image = "agentkernel/debian"   # default: chosen from the command among local images
# backend = "podman"             # podman, docker, gvisor, oci, wasm (agentkernel doctor lists them)

[agent]
preferred = "{agent}"            # claude, codex, gemini, opencode

[resources]
vcpus = 1
memory_mb = 512
# pids = 256

[security]
profile = "moderate"             # permissive, moderate, restrictive
# moderate keeps the network off. To turn it on:
# network = true
# mount_cwd = true               # bind this directory at /workspace
# read_only = true               # read-only root filesystem

# Files copied into the sandbox when it is created:
# [[files]]
# source = ".env.sandbox"
# dest = "/workspace/.env"
# mode = "0600"
"""


def _default_name(directory: str) -> str:
    base = os.path.basename(os.path.abspath(directory)) or "sandbox"
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in base).strip("-_")[:63] or "sandbox"
    while "--" in name:
        name = name.replace("--", "-")
    return name


def init_cmd(args) -> int:
    from ..spec import validate_name

    path = os.path.join(os.getcwd(), "agentkernel.toml")
    if os.path.exists(path) and not args.force:
        raise ValidationError(f"{path} already exists", hint="agentkernel init --force overwrites it")
    name = validate_name(args.name or _default_name(os.getcwd()))
    text = INIT_TEMPLATE.format(name=name, agent=args.agent)
    with open(path, "w") as f:
        f.write(text)
    print(f"wrote {path}")
    return 0


# ---- agents --------------------------------------------------------------------------------------------


def agents_cmd(args) -> int:
    rows = [agent_status(a) for a in AGENTS.values()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'AGENT':<14}{'STATUS':<16}{'API KEY':<22}")
    for r in rows:
        status = "installed" if r["installed"] else "not installed"
        key = f"{r['api_key']} set" if r["api_key"] else f"{r['api_key_names'][0]} unset"
        print(f"{r['name']:<14}{status:<16}{key:<22}")
    for r in rows:
        if not r["installed"]:
            print(f"  install {r['name']}: {r['install']}")
    print("Use them with agentkernel: agentkernel plugin install all")
    return 0


# ---- status and setup -----------------------------------------------------------------------------------


def _backend_rows(backends: list[str]) -> list[dict]:
    from ..backends import get_backend_class

    out = []
    for name in backends:
        try:
            a = get_backend_class(name).probe()
            ok, detail, fix = a.available, a.reason, getattr(a, "fix", None)
        except AgentKernelError as exc:
            ok, detail, fix = False, exc.message, exc.hint
        out.append({"check": f"backend {name}", "ok": ok, "detail": detail, "fix": fix})
    return out


def _setup_options(args):
    from ..hostsetup import ALL_BACKENDS, Options

    backends = list(args.backend or [])
    for b in backends:
        if b not in BACKEND_CHOICES:
            raise ValidationError(f"setup: unknown backend {b!r} (known: {', '.join(BACKEND_CHOICES)})")
    if args.all:
        backends = [*ALL_BACKENDS, *(b for b in backends if b not in ALL_BACKENDS)]
    known = {"busybox", "debian", "agentkernel/busybox", "agentkernel/debian"}
    for i in args.image or []:
        if i not in known:
            raise ValidationError(f"setup: unknown local image {i!r} (known: busybox, debian)")
    opts = Options(backends=backends or ["podman"], images=list(args.image or []), dev=args.dev,
                   reference_clients=args.reference_clients)
    if args.vm_image:
        opts.vm_images = list(args.vm_image)
    return opts


def status_cmd(args) -> int:
    from .. import __version__
    from ..hostsetup import Options, check_all
    from .doctor import probe_all

    rows = probe_all()
    checks = [{"check": s.name, "ok": f.ok, "detail": f.detail, "fix": "; ".join(f.plan) or f.manual}
              for s, f in check_all(Options(backends=["podman", "docker"]))]
    sock = paths.daemon_socket()
    daemon = os.path.exists(sock)
    data = {"version": __version__, "backends": {r["backend"]: r["available"] for r in rows},
            "checks": checks, "daemon_socket": sock if daemon else None,
            "agents": [agent_status(a) for a in AGENTS.values()]}
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"agentkernel {__version__}")
    print("Backends: " + ", ".join(f"{b} {'ok' if ok else '--'}" for b, ok in data["backends"].items()))
    for c in checks:
        print(f"  {'ok' if c['ok'] else '--'}  {c['check']}: {c['detail']}")
    print(f"Daemon: {'running (' + sock + ')' if daemon else 'not running'}")
    print("Agents: " + ", ".join(f"{a['agent']} {'installed' if a['installed'] else 'missing'}"
                                 for a in data["agents"]))
    return 0


def setup_cmd(args) -> int:
    """Check every step the chosen backends need, say what would change, then (with consent) do it."""
    from ..hostsetup import SetupError, check_all

    opts = _setup_options(args)
    print(f"setup for: {', '.join(opts.backends)}")
    found = check_all(opts)
    todo = [(s, f) for s, f in found if not f.ok]
    for s, f in found:
        if not (f.ok and args.quiet):
            print(f"  {'ok' if f.ok else '--'}  {s.name}: {f.detail}")
    if not todo:
        probes = _backend_rows(opts.backends)
        for r in probes:
            if not (r["ok"] and args.quiet):
                print(f"  {'ok' if r['ok'] else '--'}  {r['check']}: {r['detail']}")
        bad = [r for r in probes if not r["ok"]]
        for r in bad:
            print(f"  to fix {r['check']}: {r['fix'] or r['detail']}")
        if not bad:
            print("setup: everything the chosen backends need is here")
        return 1 if bad else 0
    print("setup will run:" if not args.check else "setup would run:")
    for s, f in todo:
        print(f"  {s.name}:")
        for line in f.plan:
            print(f"    {line}")
        if f.manual:
            print(f"    cannot do it here: {f.manual}")
    if args.check or args.dry_run:
        return 1 if args.check else 0
    if not args.yes:
        if not sys.stdin.isatty():
            raise ValidationError("setup needs confirmation", hint="run it in a terminal, or pass -y")
        if input("Proceed? [y/N] ").strip().lower() not in ("y", "yes"):
            print("setup: nothing changed")
            return 1
    skipped = 0
    for s, f in todo:
        if f.manual:
            print(f"==> {s.name}: skipped ({f.manual})")
            skipped += 1
            continue
        now = s.check()  # an earlier step may have provided it
        if now.ok:
            print(f"==> {s.name}: {now.detail}")
            continue
        if now.manual:
            print(f"==> {s.name}: skipped ({now.manual})")
            skipped += 1
            continue
        print(f"==> {s.name}", flush=True)
        t0 = time.monotonic()
        try:
            done = s.apply()
        except (SetupError, AgentKernelError, OSError, subprocess.CalledProcessError) as exc:
            msg = exc.message if isinstance(exc, AgentKernelError) else str(exc)
            if s.optional:  # only tests use it: say so and go on
                print(f"setup: warning: {s.name} not done (its tests will be skipped): {msg}", file=sys.stderr)
                continue
            print(f"setup: error: {s.name}: {msg}", file=sys.stderr)
            return 1
        print(f"    {done} ({time.monotonic() - t0:.1f} s)", flush=True)
    bad = [r for r in _backend_rows(opts.backends) if not r["ok"]]
    for r in bad:
        print(f"  --  {r['check']}: {r['detail']}" + (f" (fix: {r['fix']})" if r["fix"] else ""))
    if skipped or bad:
        return 1
    print("setup: done")
    return 0

# ---- plugin -------------------------------------------------------------------------------------------


def plugin_cmd(args) -> int:
    from .. import plugins

    if args.action == "list":
        rows = plugins.status(os.path.abspath(args.dir))
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            for r in rows:
                print(f"{r['target']:<10}{r['scope']:<9}{r['state']:<11}{', '.join(r['files'])}")
        return 0
    changes = plugins.install(args.target, os.path.abspath(args.dir), global_=args.global_, force=args.force,
                              dry_run=args.dry_run)
    skipped = 0
    for c in changes:
        verb = c["action"]
        if args.dry_run and verb not in ("unchanged", "skipped"):
            verb = "would " + {"created": "create", "updated": "update", "overwrote": "overwrite"}[verb]
        print(f"{verb:<16}{c['path']}" + (f"  ({c['why']})" if c.get("why") else ""))
        skipped += c["action"] == "skipped"
    return 1 if skipped else 0


# ---- volume -------------------------------------------------------------------------------------------


def volume_cmd(args) -> int:
    from .. import volumes

    if args.action == "create":
        print(volumes.create(args.name)["name"])
    elif args.action in ("list", "ls"):
        vols = volumes.list_volumes()
        if args.json:
            print(json.dumps(vols, indent=2))
        else:
            print(f"{'NAME':<32}{'SIZE':>12}  CREATED")
            for v in vols:
                print(f"{v['name']:<32}{v['size_bytes']:>12}  {v['created_at']}")
    elif args.action == "info":
        print(json.dumps(volumes.info(args.name), indent=2))
    else:
        for n in args.names:
            volumes.remove(n)
    return 0
