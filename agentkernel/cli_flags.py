"""The flags of the hot commands (run, exec, create), declared once.

The same table builds the argparse parser (help, errors, every unusual case) and drives a tiny parser
that handles the common case of ``run``/``exec`` without importing argparse at all (argparse with
its re/gettext/shutil imports costs ~10 ms, which is a third of a warm sandboxed ``echo hello``).
Anything the tiny parser does not fully understand (-h, unknown or malformed flags) goes to argparse,
so users get argparse's messages.
"""

from __future__ import annotations

NETWORK_MODES = ("none", "allowlist", "open")


class Flag:
    __slots__ = ("dest", "help", "kind", "metavar", "names")

    def __init__(self, names: tuple[str, ...], dest: str, kind: str, help: str, metavar: str | None = None):
        self.names = names
        self.dest = dest
        self.kind = kind  # str int float pfloat kv list true false netmode
        self.help = help
        self.metavar = metavar


SPEC_FLAGS = (
    Flag(("-B", "--backend"), "backend", "str", "backend (auto, oci, podman, docker, gvisor, wasm, ...); default auto"),
    Flag(("-i", "--image"), "image", "str", "image (default: chosen from the command among local images)"),
    Flag(("-p", "--profile"), "profile", "str", "permissive, moderate (default) or restrictive"),
    Flag(("--no-network",), "network", "false", "no network except loopback (default unless the profile allows it)"),
    Flag(("--network",), "network", "netmode",
         "network mode: none, allowlist (only --allow-host destinations) or open (the outside world, never "
         "the host or other sandboxes); --network alone means open", "MODE"),
    Flag(("--allow-host",), "allow_host", "list",
         "allow egress to HOST[:PORT], *.DOMAIN or CIDR[:PORT] (repeatable; implies --network allowlist)",
         "HOST[:PORT]"),
    Flag(("--block-host",), "block_host", "list", "refuse egress to HOST, *.DOMAIN or CIDR (repeatable)", "HOST"),
    Flag(("--tls-intercept",), "tls_intercept", "true",
         "let the egress gateway terminate TLS to secret-bound hosts (CONNECT) with a per-sandbox CA, so "
         "secrets reach HTTPS APIs"),
    Flag(("--secret",), "secret", "list",
         "bind stored secret NAME to HOST: the sandbox sees a placeholder, the egress gateway puts the real "
         "value into HTTP requests to HOST only (repeatable)", "NAME:HOST[:HEADER]"),
    Flag(("--read-only",), "read_only", "true", "read-only root filesystem (writable tmpfs at /tmp and the workdir)"),
    Flag(("--mount-cwd",), "mount_cwd", "true", "bind the current directory at /workspace"),
    Flag(("--memory",), "memory_mb", "int", "memory limit in MiB", "MB"),
    Flag(("--cpus",), "vcpus", "float", "CPU quota in cores", "N"),
    Flag(("--pids",), "pids", "int", "max processes", "N"),
    Flag(("--disk",), "disk_mb", "int|unlimited",
         "writable storage cap in MiB (every profile sets one; 'unlimited' opts out)", "MB"),
    Flag(("-e", "--env"), "env", "kv", "environment variable (repeatable)", "K=V"),
    Flag(("-w", "--workdir"), "workdir", "str", "working directory inside the sandbox (default /workspace)"),
    Flag(("-o", "--option"), "option", "kv", "backend option, e.g. runtime=runsc (repeatable)", "K=V"),
    Flag(("--module",), "module", "str", "wasm: the module to run"),
    Flag(("--func",), "func", "str", "wasm: exported function to call"),
    Flag(("-c", "--config"), "config", "str", "agentkernel.toml to use (default ./agentkernel.toml)"),
    Flag(("--pull",), "pull", "str", "pull policy: missing (default), always or never", "POLICY"),
)
TIMEOUT = Flag(("-t", "--timeout"), "timeout", "pfloat", "kill the sandbox after this many seconds (exit 124)",
               "SECONDS")
RUN_FLAGS = (
    *SPEC_FLAGS,
    TIMEOUT,
    Flag(("-k", "--keep"), "keep", "true", "keep the sandbox afterwards (named, running)"),
    Flag(("-n", "--name"), "name", "str", "name for a kept sandbox (with --keep)"),
    Flag(("--no-daemon",), "no_daemon", "true", "do not use the daemon's warm pools"),
    Flag(("--explain",), "explain", "true",
         "print which backend and image would be used and why, then exit (runs nothing)"),
    Flag(("-F", "--fast"), "fast", "true", "use a warm pooled sandbox (the default whenever the daemon runs)"),
)
EXEC_FLAGS = (
    TIMEOUT,
    Flag(("-e", "--env"), "env", "kv", "environment variable (repeatable)", "K=V"),
    Flag(("-w", "--workdir"), "workdir", "str", "working directory inside the sandbox"),
)


SWITCHES = ("keep", "no_daemon", "explain", "fast")  # store_true flags that default to False (others default to None)


def split_command(argv: list[str], flags, npos: int = 1):
    """``exec``'s argv after the subcommand -> (options and NAME, the command or None).

    Everything after NAME is the command, verbatim (``exec box python -m pytest``); ``--`` ends the
    options. As with the reference's parser, exec's own flags right after NAME are still options
    (``exec box -e K=V -- ./script.sh``, ``exec box --timeout 1 cmd``); the first other word starts the
    command."""
    takes_value = {n for f in flags if f.kind not in ("true", "false") for n in f.names}
    known = {n for f in flags for n in f.names}
    i, pos, n = 0, 0, len(argv)
    while i < n:
        a = argv[i]
        if a == "--":
            return argv[:i], argv[i + 1 :]
        if pos >= npos:
            if a.partition("=")[0] in known:
                i += 2 if (a in takes_value) else 1
                continue
            return argv[:i], argv[i:]
        if a.startswith("-") and a != "-":
            i += 2 if (a in takes_value) else 1
            continue
        pos += 1
        i += 1
    return argv, None


def defaults(flags) -> dict:
    out: dict = {}
    for f in flags:
        if f.kind in ("kv", "list"):
            out[f.dest] = []
        elif f.kind == "true" and f.dest in SWITCHES:
            out[f.dest] = False
        else:
            out.setdefault(f.dest, None)
    return out


def convert(f: Flag, text: str):
    """Value of one flag, or raise ValueError with argparse-like wording."""
    if f.kind in ("str", "list"):
        return text
    if f.kind == "netmode":
        if text not in NETWORK_MODES:
            raise ValueError(f"invalid network mode {text!r} (choose none, allowlist or open)")
        return text
    if f.kind == "int":
        return int(text)
    if f.kind == "int|unlimited":
        return "unlimited" if text in ("unlimited", "unbounded") else int(text)
    if f.kind in ("float", "pfloat"):
        v = float(text)
        if f.kind == "pfloat":
            from .errors import ValidationError
            from .spec import validate_timeout

            try:
                return validate_timeout(v, f.names[-1])
            except ValidationError as exc:
                raise ValueError(exc.message) from None
        return v
    if f.kind == "kv":
        k, sep, v = text.partition("=")
        if not sep or not k:
            raise ValueError(f"expected KEY=VALUE, got {text!r}")
        return (k, v)
    raise AssertionError(f.kind)


def add_to_argparse(group, flags) -> None:
    import argparse

    def typed(f: Flag):
        def conv(text: str):
            try:
                return convert(f, text)
            except ValueError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None

        conv.__name__ = f.kind
        return conv

    net = None
    for f in flags:
        if f.kind in ("true", "false"):
            kw = {"action": "store_true" if f.kind == "true" else "store_false",
                  "default": False if f.dest in SWITCHES else None}
            if f.dest == "network":
                net = net or group.add_mutually_exclusive_group()
                net.add_argument(*f.names, dest=f.dest, help=f.help, **kw)
                continue
            group.add_argument(*f.names, dest=f.dest, help=f.help, **kw)
        elif f.kind in ("kv", "list"):
            group.add_argument(*f.names, dest=f.dest, action="append", type=typed(f), default=[],
                               metavar=f.metavar, help=f.help)
        elif f.kind == "netmode":
            net = net or group.add_mutually_exclusive_group()
            net.add_argument(*f.names, dest=f.dest, nargs="?", const="open", default=None, type=typed(f),
                             metavar=f.metavar, help=f.help)
        else:
            group.add_argument(*f.names, dest=f.dest, type=typed(f), metavar=f.metavar, help=f.help)


class ParsedArgs:
    """The attributes ``fast_parse`` found (argparse.Namespace's shape; ``types.SimpleNamespace`` would
    import ``types``: ~0.3 ms of the warm run)."""

    def __init__(self, **values) -> None:
        self.__dict__.update(values)

    def __repr__(self) -> str:
        return f"ParsedArgs({', '.join(f'{k}={v!r}' for k, v in self.__dict__.items())})"


def fast_parse(argv: list[str], flags, positionals: tuple[str, ...] = ()):
    """``argv`` after the subcommand -> a namespace with the same attributes argparse would give, or
    None when argparse must handle it. Everything after ``--`` (or after the positionals) is the
    command, verbatim."""
    by_name = {n: f for f in flags for n in f.names}
    values = defaults(flags)
    pos: list[str] = []
    i, n = 0, len(argv)
    command: list[str] = []
    while i < n:
        a = argv[i]
        if a == "--":
            command = argv[i + 1 :]
            break
        if a.startswith("-") and a != "-":
            name, eq, inline = a.partition("=")
            f = by_name.get(name)
            if f is None or (eq and f.kind in ("true", "false")):
                return None
            if f.kind in ("true", "false"):
                if f.dest == "network" and values["network"] is not None:
                    return None  # --network with --no-network: argparse reports the conflict
                values[f.dest] = f.kind == "true"
                i += 1
                continue
            if f.kind == "netmode":
                if values["network"] is not None:
                    return None
                if eq:
                    if inline not in NETWORK_MODES:
                        return None
                    values["network"] = inline
                elif i + 1 < n and argv[i + 1] in NETWORK_MODES:
                    values["network"] = argv[i + 1]
                    i += 1
                elif i + 1 < n and not argv[i + 1].startswith("-") and "--" in argv[i + 2:]:
                    return None  # `--network WORD ... -- CMD`: WORD was meant as a mode; argparse names it
                else:
                    values["network"] = "open"
                i += 1
                continue
            if not eq:
                i += 1
                if i >= n:
                    return None
                inline = argv[i]
            try:
                v = convert(f, inline)
            except ValueError:
                return None
            if f.kind in ("kv", "list"):
                values[f.dest].append(v)
            else:
                values[f.dest] = v
            i += 1
            continue
        if len(pos) < len(positionals):
            pos.append(a)
            i += 1
            continue
        command = argv[i:]
        break
    if len(pos) < len(positionals):
        return None
    values.update(zip(positionals, pos, strict=True))
    values["command"] = command
    return ParsedArgs(**values)


# ---- flags -> spec (every CLI command that makes a sandbox) ------------------------------------------


def spec_flags(args) -> dict:
    import os

    flags = {
        "backend": args.backend, "image": args.image, "profile": args.profile, "network": args.network,
        "read_only": args.read_only, "mount_cwd": args.mount_cwd, "memory_mb": args.memory_mb,
        "vcpus": args.vcpus, "pids": args.pids, "disk_mb": args.disk_mb, "workdir": args.workdir,
        "env": dict(args.env), "options": dict(args.option),
    }
    if getattr(args, "tls_intercept", None):
        flags["tls_intercept"] = True
    for dest in ("allow_host", "block_host", "secret"):
        if getattr(args, dest, None):
            flags[dest] = list(getattr(args, dest))
    if args.module:
        flags["options"]["module"] = os.path.abspath(args.module)
    if args.func:
        flags["options"]["func"] = args.func
    if getattr(args, "name", None):
        flags["name"] = args.name
    return flags


def spec_from_args(args, argv: list[str] | None):
    """Flags + env + config file -> SandboxSpec, the image by ``imagesel.resolve_for_command``."""
    return spec_and_files_from_args(args, argv)[0]


def spec_and_files_from_args(args, argv: list[str] | None, *, with_config: bool = False):
    """``spec_from_args`` and the config file's ``[[files]]`` (``[{source, dest, mode}]``, may be empty);
    ``with_config``: and the parsed config file (``{}`` without one) third."""
    import os

    from . import config

    cfg_path = config.find_config(args.config, os.getcwd())
    cfg = config.load_config(cfg_path)
    from .imagesel import resolve_for_command

    spec = resolve_for_command(spec_flags(args), argv, config=cfg, config_path=cfg_path,
                               pull=getattr(args, "pull", None), preflight=_backend_check)
    files = cfg.get("files") or []
    return (spec, files, cfg) if with_config else (spec, files)


def _backend_check(spec) -> None:
    """The chosen backend's refusal of ``spec`` (policy controls it cannot enforce), before an image pull."""
    from .backends import canonical, get_backend

    get_backend(canonical(spec.backend), spec.options).check(spec)
