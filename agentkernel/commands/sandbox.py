"""Named-sandbox commands: create, start, exec, cp, list, stop, rm, audit."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

from ..backends.base import ExecRequest
from ..errors import AgentKernelError, ValidationError
from ..manager import SandboxManager
from ..spec import validate_name
from ..termio import stdin_chunks, stdin_forwardable, write_all


def _with_manager(fn):
    async def go():
        mgr = SandboxManager()
        try:
            return await fn(mgr)
        finally:
            await mgr.aclose()

    return asyncio.run(go())


def create(args) -> int:
    from .. import config
    from ..cli_flags import spec_from_args

    validate_name(args.name)
    if getattr(args, "dir", None):  # the project directory: its agentkernel.toml, and /workspace with --mount-cwd
        if not os.path.isdir(args.dir):
            raise ValidationError(f"--dir {args.dir!r} is not a directory")
        os.chdir(args.dir)
    spec = spec_from_args(args, None).replace(name=args.name)
    cfg = config.load_config(config.find_config(args.config, os.getcwd()))
    if getattr(args, "volume", None):
        from ..volumes import parse_mounts

        parse_mounts(args.volume)
        spec = spec.replace(options={**spec.options, "volumes": ",".join(args.volume)})
    if getattr(args, "agent", None):
        from ..refcompat import agent_spec

        spec = agent_spec(spec, args.agent, explicit_image=bool(args.image or cfg.get("sandbox", {}).get("image")))

    async def go(mgr):
        rec = await mgr.create(spec, start=args.start)
        if cfg.get("files"):
            from ..refinject import after_create

            try:
                await after_create(mgr, rec.name, cfg, started=args.start)
            except BaseException:
                await mgr.remove(rec.name)
                raise
        print(rec.name)

    _with_manager(go)
    return 0


def start(args) -> int:
    async def go(mgr):
        if getattr(args, "backend", None):
            rec = mgr.get(args.name)
            if rec.backend != args.backend:
                raise ValidationError(f"sandbox {args.name} was created on backend {rec.backend!r}, "
                                      f"not {args.backend!r}", hint="a sandbox's backend is fixed at create")
        await mgr.start(args.name)

    _with_manager(go)
    return 0


def stop(args) -> int:
    _with_manager(lambda mgr: mgr.stop(args.name))
    return 0


def rm(args) -> int:
    failed = 0

    async def go(mgr):
        nonlocal failed
        for name in args.names:
            try:
                await mgr.remove(name)
            except AgentKernelError as exc:
                failed += 1
                sys.stderr.write(f"agentkernel: error: {exc.message}\n")

    _with_manager(go)
    return 125 if failed else 0


def exec_cmd(args, command: list[str]) -> int:
    async def go(mgr):
        rec = mgr.get(args.name)
        forward = stdin_forwardable()
        req = ExecRequest(command, env=dict(args.env), cwd=args.workdir,
                          stdin=stdin_chunks() if forward else None, timeout=args.timeout,
                          on_output=write_all)
        result = await mgr.exec(args.name, req)
        from ..outcome import from_result, render

        return render(from_result(result), timeout=args.timeout,
                      memory_mb=(rec.spec.get("resources") or {}).get("memory_mb"))

    return _with_manager(go)


def _parse_cp(arg: str) -> tuple[str | None, str]:
    """'NAME:/path' -> (NAME, /path); anything else is a local path. A local path with a ':' can be
    written as ./a:b."""
    if arg.startswith(("/", "./", "../", "~")) or ":" not in arg:
        return None, os.path.expanduser(arg)
    name, _, path = arg.partition(":")
    validate_name(name)
    return name, path


def cp(args) -> int:
    src_name, src = _parse_cp(args.src)
    dst_name, dst = _parse_cp(args.dst)
    if src_name and dst_name:
        raise ValidationError("cp copies between a sandbox and this host; sandbox-to-sandbox is not supported",
                              hint="copy to a local file first")
    if not src_name and not dst_name:
        raise ValidationError("one side of cp must be NAME:/path", hint="agentkernel cp ./file box:/workspace/file")

    async def upload(mgr):
        if os.path.isdir(src):
            raise ValidationError(f"{src} is a directory; cp copies single files")

        async def chunks():
            with open(src, "rb") as f:
                while True:
                    b = f.read(1 << 20)
                    if not b:
                        return
                    yield b

        try:
            mode = os.stat(src).st_mode & 0o777
        except FileNotFoundError:
            raise ValidationError(f"local file {src!r} does not exist") from None
        target = dst
        if target.endswith("/"):
            target += os.path.basename(src)
        await mgr.write_file(dst_name, target, chunks(), mode)

    async def download(mgr):
        target = dst
        if os.path.isdir(target):
            target = os.path.join(target, os.path.basename(src))
        from ..safefs import exclusive_temp

        # a random name created O_EXCL|O_NOFOLLOW next to the target: nothing another user planted is
        # written through; renamed over the target when complete
        fd, tmp = exclusive_temp(target)
        try:
            with os.fdopen(fd, "wb") as f:
                async for chunk in mgr.read_file(src_name, src):
                    f.write(chunk)
                umask = os.umask(0o022)
                os.umask(umask)
                os.fchmod(f.fileno(), 0o666 & ~umask)
            os.replace(tmp, target)
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass

    _with_manager(upload if dst_name else download)
    return 0


def list_cmd(args) -> int:
    rows = _with_manager(lambda mgr: mgr.list())
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no sandboxes")
        return 0
    hdr = ("NAME", "STATE", "BACKEND", "IMAGE", "PROFILE", "CREATED")
    table = [hdr] + [
        (r["name"], r["state"], r["backend"], r["image"] or "", r["profile"] or "",
         time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created_at"]))) for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(hdr))]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


def audit_cmd(args) -> int:
    from .. import audit

    if getattr(args, "path", False):
        from ..paths import audit_path

        print(audit_path())
        return 0
    events = audit.read(args.sandbox, args.last)
    for e in events:
        if args.json:
            print(json.dumps(e))
        else:
            ts = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.get("ts", 0)))
            rest = {k: v for k, v in e.items() if k not in ("ts", "event", "pid", "uid")}
            print(f"{ts}  {e.get('event', '?'):<18} {json.dumps(rest)}")
    return 0
