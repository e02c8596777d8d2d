"""The ``agentkernel`` command.

Start-up cost is part of every sandboxed command's latency, so this module imports only argparse and
what each subcommand needs, when it needs it (asyncio, the store, backends are imported lazily; web
frameworks and cluster clients never on these paths). Exit codes: the command's own (128+N for a
signal), 124 on timeout, 125 for agentkernel's own errors, 2 for usage errors.
"""

from __future__ import annotations

import os
import sys

EXIT_ERROR = 125


def _err(msg: str, hint: str | None = None) -> None:
    sys.stderr.write(f"agentkernel: error: {msg}\n")
    if hint:
        sys.stderr.write(f"  hint: {hint}\n")


# ---- argument parsing ---------------------------------------------------------------------------------


def _add_spec_flags(p, *, run: bool) -> None:
    from .cli_flags import RUN_FLAGS, SPEC_FLAGS, add_to_argparse

    add_to_argparse(p.add_argument_group("sandbox"), RUN_FLAGS if run else SPEC_FLAGS)


COMMANDS = ("run", "create", "start", "stop", "rm", "remove", "exec", "cp", "list", "ls", "doctor", "gc",
            "images", "audit", "daemon", "serve", "attach", "replay", "mcp", "bench", "secret", "logs",
            "mcp-server", "setup", "status", "init", "agents", "plugin", "volume")


def build_parser(only: str | None = None):
    """The full parser, or (``only``) just the one subcommand's: building every subparser costs ~15 ms
    of start-up, paid on every sandboxed command otherwise."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="agentkernel",
        description="Run untrusted commands in isolated sandboxes.",
        epilog="Exit status: the command's own (128+N if killed by signal N), 124 on timeout, "
        "125 when agentkernel itself fails.",
    )
    parser.add_argument("-V", "--version", action="store_true", help="print the version")
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND")

    def want(*names: str) -> bool:
        return only is None or only in names

    if want("run"):
        _add_run(sub, argparse)
    if want("create"):
        p = sub.add_parser("create", help="create a named sandbox")
        p.add_argument("name")
        _add_spec_flags(p, run=False)
        p.add_argument("--start", action="store_true", help="start it right away")
        p.add_argument("-a", "--agent", choices=["claude", "codex", "gemini", "opencode"],
                       help="the coding agent this sandbox is for (its agent image when one is built)")
        p.add_argument("-v", "--volume", action="append", metavar="NAME:/PATH[:ro]",
                       help="mount a named volume (agentkernel volume create NAME); repeatable")
        p.add_argument("-d", "--dir", help="the project directory: read its agentkernel.toml and bind it "
                       "at /workspace with --mount-cwd (default: the current directory)")
    for name, helptext in (("start", "start a named sandbox"), ("stop", "stop a named sandbox")):
        if want(name):
            p = sub.add_parser(name, help=helptext)
            p.add_argument("name")
            if name == "start":
                p.add_argument("-B", "--backend", help="the backend the sandbox was created on (checked)")
    if want("rm", "remove"):
        p = sub.add_parser("rm", aliases=["remove"], help="remove a named sandbox and everything it holds")
        p.add_argument("names", nargs="+", metavar="name")
    if want("exec"):
        from .cli_flags import EXEC_FLAGS, add_to_argparse

        p = sub.add_parser("exec", help="run a command in a running named sandbox")
        p.add_argument("name")
        add_to_argparse(p, EXEC_FLAGS)
        # nargs="*", not REMAINDER: after the NAME positional, REMAINDER would swallow the options
        p.add_argument("command", nargs="*", metavar="-- COMMAND...")
    if want("cp"):
        p = sub.add_parser("cp", help="copy a file: NAME:/path <-> local path")
        p.add_argument("src")
        p.add_argument("dst")
    if want("list", "ls"):
        p = sub.add_parser("list", aliases=["ls"], help="list named sandboxes")
        p.add_argument("--json", action="store_true")
    if want("doctor"):
        p = sub.add_parser("doctor", help="which backends work on this host, and exactly why not")
        p.add_argument("--json", action="store_true")
    if want("gc"):
        p = sub.add_parser("gc", help="remove every agentkernel resource whose owner is provably dead")
        p.add_argument("--dry-run", action="store_true")
    if want("images"):
        from .commands.images import add_parser as _add_images

        _add_images(sub)
    if want("audit"):
        p = sub.add_parser("audit", help="show the audit log")
        p.add_argument("-s", "--sandbox")
        p.add_argument("-l", "--last", type=int, default=20)
        p.add_argument("--json", action="store_true")
        p.add_argument("--path", action="store_true", help="print where the audit log is, and exit")
    if want("daemon"):
        _add_daemon(sub)
    if want("serve", "attach", "replay", "mcp", "mcp-server"):
        from .commands.serve import add_parsers

        add_parsers(sub, want)
    if want("secret", "logs"):
        from .commands.egress import add_parsers as _add_egress

        _add_egress(sub, want)
    if want("setup", "status", "init", "agents", "plugin", "volume"):
        from .commands.refcli import add_parsers as _add_ref

        _add_ref(sub, want)
    if want("bench"):
        from .commands.bench import add_parser as _add_bench

        _add_bench(sub)
    return parser


def _add_run(sub, argparse) -> None:
    p = sub.add_parser("run", help="run a command in a fresh sandbox, then destroy it")
    _add_spec_flags(p, run=True)
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND...")


def _add_daemon(sub) -> None:
    p = sub.add_parser("daemon", help="the warm-pool daemon")
    p.add_argument("action", choices=["start", "stop", "status"])
    where = p.add_mutually_exclusive_group()
    where.add_argument("--foreground", action="store_true", help="start: run in this process")
    where.add_argument("-b", "--background", action="store_true",
                       help="start: in the background (the default; the reference system's flag)")
    p.add_argument("--pool-min", type=int, metavar="N", help="start: warm members per pool")
    p.add_argument("--pool-max", type=int, metavar="N",
                   help="start: members alive per pool, at most (default 32); the ready target adapts to demand "
                   "up to this")
    p.add_argument("--max-starts", type=int, metavar="N",
                   help="start: sandboxes started at once across all pools (default 4); each pool's refill "
                   "concurrency adapts to its demand up to this")
    p.add_argument("--warm", action="append", metavar="BACKEND[:IMAGE[:PROFILE]]",
                   help="start: keep a pool warm for this spec (repeatable; default: the default spec)")
    p.add_argument("--json", action="store_true", help="status: machine-readable")


def _exec_flags():
    from .cli_flags import EXEC_FLAGS

    return EXEC_FLAGS


def _strip_dashdash(cmd: list[str]) -> list[str]:
    return cmd[1:] if cmd and cmd[0] == "--" else cmd


def explain_run(args, argv: list[str]) -> int:
    """``run --explain``: which backend (named, or what ``auto`` picks here and why) and which image, from
    where, and why; nothing is pulled, built or run."""
    from . import config
    from .cli_flags import spec_flags
    from .images.settings import pull_policy
    from .imagesel import explain

    cfg_path = config.find_config(args.config, os.getcwd())
    cfg = config.load_config(cfg_path)
    spec = config.resolve_spec(spec_flags(args), config=cfg)
    _explain_backend(args, spec, cfg, cfg_path)
    policy = pull_policy(getattr(args, "pull", None), cfg)
    source = None
    if args.image:
        source = "--image"
    elif os.environ.get("AGENTKERNEL_IMAGE"):
        source = "AGENTKERNEL_IMAGE"
    elif cfg.get("sandbox", {}).get("image"):
        source = f"[sandbox] image in {cfg_path}"
    if source is None and cfg.get("build"):
        from .images.dockerbuild import planned_tag

        print(f"backend: {spec.backend}\nimage: {planned_tag(cfg, cfg_path)}\nwhy: built from the [build] table "
              f"of {cfg_path} (rebuilt only when the context or args change)")
        return 0
    print(explain(spec.backend, argv, image=spec.image if source else None, image_source=source,
                  cwd=os.getcwd() if spec.policy.mount_cwd else None, policy=policy, config=cfg,
                  options=spec.options))
    return 0


def _explain_backend(args, spec, cfg: dict, cfg_path) -> None:
    from . import config

    named = cfg.get("sandbox", {}).get("backend")
    if args.backend and args.backend != "auto":
        print(f"backend {spec.backend} (named by --backend)")
    elif os.environ.get("AGENTKERNEL_BACKEND") and os.environ["AGENTKERNEL_BACKEND"] != "auto":
        print(f"backend {spec.backend} (named by AGENTKERNEL_BACKEND)")
    elif named and named != "auto":
        print(f"backend {spec.backend} (named by [sandbox] backend in {cfg_path})")
    else:
        from .backends.auto import decide, explain_lines

        print("\n".join(explain_lines(decide(config.default_spec_for))))


# ---- main ---------------------------------------------------------------------------------------------


def entry() -> None:
    """The program's entry point (console script, ``python -m agentkernel``, the launcher): ``main`` with
    the process's arguments, then exit with its status. Embedders and tests call ``main`` instead."""
    exit_now(main())


def exit_now(rc: int) -> None:
    """``sys.exit(rc)`` without the interpreter's finalization (~7 ms of a one-shot's 60: module teardown,
    a full garbage collection) when nothing needs it: output is flushed here, and any atexit hook, an
    atexit hook of ``threading`` (concurrent.futures) or a live non-daemon thread means the regular exit."""
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    except (OSError, ValueError):
        sys.exit(rc)  # the regular exit reports a broken pipe as it always did
    atexit = sys.modules.get("atexit")  # never imported: nothing registered a hook (no import for asking)
    threading = sys.modules.get("threading")
    if (
        type(rc) is not int
        or (atexit is not None and atexit._ncallbacks())
        or (threading is not None and (threading._threading_atexits or any(
            not t.daemon for t in threading.enumerate() if t is not threading.main_thread())))
    ):
        sys.exit(rc)
    os._exit(rc & 0xFF)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv in (["--version"], ["-V"]):  # no argparse (~8 ms) to print one line
        from . import __version__

        print(f"agentkernel {__version__}")
        return 0
    cmd = argv[0] if argv and argv[0] in COMMANDS else None
    command: list[str] | None = None
    if cmd == "exec":  # everything after NAME is the command (options go before NAME)
        from .cli_flags import split_command

        head, command = split_command(argv[1:], _exec_flags())
        argv = [cmd, *head]
    if cmd in ("run", "exec"):  # the hot paths: no argparse unless something is unusual
        from .cli_flags import EXEC_FLAGS, RUN_FLAGS, fast_parse

        ns = fast_parse(argv[1:], RUN_FLAGS if cmd == "run" else EXEC_FLAGS, () if cmd == "run" else ("name",))
        if ns is not None and cmd == "exec" and command:
            ns.command = command
        if ns is not None and (ns.command or cmd == "run"):
            ns.cmd, ns.version = cmd, False
            return _main(ns)
    parser = build_parser(cmd)
    # Everything after the first "--" is the command, verbatim: split before argparse sees it (its
    # REMAINDER after a positional would otherwise swallow options such as `exec NAME --timeout 1 --`).
    if cmd == "run" and "--" in argv:
        i = argv.index("--")
        argv, command = argv[:i], argv[i + 1 :]
    args = parser.parse_args(argv)
    if command is not None:
        if args.command:
            parser.error(f"unexpected arguments before '--': {' '.join(args.command)}")
        args.command = command
    if args.version:
        from . import __version__

        print(f"agentkernel {__version__}")
        return 0
    if not args.cmd:
        parser.print_help()
        return 2
    return _main(args)


def _main(args) -> int:
    try:
        if args.cmd not in ("doctor", "images", "audit", "secret", "logs"):
            from .owner import reap_dead

            reap_dead()
        return _dispatch(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 141
    except Exception as exc:
        # ``errors`` is imported when something went wrong, not on every run's path
        from .errors import AgentKernelError

        if not isinstance(exc, AgentKernelError):
            raise
        _err(exc.message, exc.hint)
        return exc.exit_code


def _dispatch(args) -> int:
    cmd = args.cmd
    if cmd == "run":
        command = _strip_dashdash(args.command)
        if args.module:  # a wasm module's argv[0] is its own name, like a program's
            command = [os.path.basename(args.module), *command]
        if not command:
            _err("no command given", "agentkernel run -- echo hello")
            return 2
        if getattr(args, "explain", False):
            return explain_run(args, command)
        from .commands.run import run

        return run(args, command)
    if cmd == "exec":
        command = _strip_dashdash(args.command)
        if not command:
            _err("no command given", f"agentkernel exec {args.name} -- echo hello")
            return 2
        from .commands.exec_fast import try_exec_fast

        rc = try_exec_fast(args, command)
        if rc is not None:
            return rc
        from .commands.sandbox import exec_cmd

        return exec_cmd(args, command)
    if cmd in ("create", "start", "stop", "rm", "remove", "cp", "list", "ls"):
        from .commands import sandbox

        return getattr(sandbox, {"rm": "rm", "remove": "rm", "ls": "list_cmd", "list": "list_cmd"}.get(cmd, cmd))(args)
    if cmd == "doctor":
        from .commands.doctor import doctor

        return doctor(args)
    if cmd == "gc":
        from .commands.gc import gc

        return gc(args)
    if cmd == "images":
        from .commands.images import images_cmd

        return images_cmd(args)
    if cmd == "audit":
        from .commands.sandbox import audit_cmd

        return audit_cmd(args)
    if cmd == "daemon":
        from .commands.daemon import daemon_cmd

        return daemon_cmd(args)
    if cmd in ("serve", "attach", "replay", "mcp", "mcp-server"):
        from .commands import serve

        return getattr(serve, "mcp" if cmd == "mcp-server" else cmd)(args)
    if cmd in ("secret", "logs"):
        from .commands import egress

        return egress.secret_cmd(args) if cmd == "secret" else egress.logs_cmd(args)
    if cmd in ("setup", "status", "init", "agents", "plugin", "volume"):
        from .commands import refcli

        return getattr(refcli, cmd + "_cmd")(args)
    if cmd == "bench":
        from .commands.bench import bench_cmd

        return bench_cmd(args)
    raise AssertionError(cmd)


if __name__ == "__main__":
    sys.exit(main())
