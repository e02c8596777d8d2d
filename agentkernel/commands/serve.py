"""CLI glue for ``agentkernel serve`` (HTTP API), ``attach``, ``replay`` and ``mcp``. Everything heavy
(FastAPI, uvicorn, the mcp SDK) is imported here, only when one of these commands runs."""

from __future__ import annotations

import os
import sys


def add_parsers(sub, want) -> None:
    if want("serve"):
        p = sub.add_parser("serve", help="serve the HTTP API (and MCP at /mcp) with warm pools")
        p.add_argument("-H", "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; anything "
                       "beyond loopback needs a token: AGENTKERNEL_API_TOKENS)")
        p.add_argument("-p", "--port", type=int, default=18888)
        p.add_argument("--pool-min", type=int, metavar="N", help="warm members per pool")
        p.add_argument("--pool-max", type=int, metavar="N", help="members alive per pool, at most")
        p.add_argument("--warm", action="append", metavar="BACKEND[:IMAGE[:PROFILE]]",
                       help="keep a pool warm for this spec (repeatable)")
        p.add_argument("--no-mcp", action="store_true", help="do not serve MCP at /mcp")
        p.add_argument("--log-level", default=os.environ.get("AGENTKERNEL_LOG_LEVEL", "info"))
        p.add_argument("-c", "--config", help="agentkernel.toml to use")
    if want("attach"):
        p = sub.add_parser("attach", help="an interactive shell (PTY) inside a running named sandbox")
        p.add_argument("name")
        p.add_argument("--record", metavar="FILE", help="record the session as an asciicast v2 file")
        p.add_argument("--record-input", action="store_true", help="also record keystrokes (may contain secrets)")
        from ..cli_flags import Flag, add_to_argparse

        add_to_argparse(p, (Flag(("-e", "--env"), "env", "kv", "environment variable (repeatable)", "K=V"),))
        p.add_argument("--url", help="attach through a remote `agentkernel serve` (token: AGENTKERNEL_API_KEY)")
        p.add_argument("command", nargs="*", metavar="-- COMMAND...", help="what to run (default /bin/sh)")
    if want("replay"):
        p = sub.add_parser("replay", help="play an asciicast recording in this terminal")
        p.add_argument("file")
        p.add_argument("-s", "--speed", type=float, default=1.0)
        p.add_argument("--max-idle", type=float, default=2.0, metavar="SECONDS",
                       help="cap every pause at this many seconds (0: no cap)")
    if want("mcp", "mcp-server"):
        p = sub.add_parser("mcp", aliases=["mcp-server"], help="MCP server (stdio by default)")
        p.add_argument("--transport", choices=["stdio", "http"], default="stdio")
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=18889)
        p.add_argument("--pool-min", type=int, metavar="N")
        p.add_argument("--pool-max", type=int, metavar="N")
        p.add_argument("--warm", action="append", metavar="BACKEND[:IMAGE[:PROFILE]]")
        p.add_argument("-c", "--config", help="agentkernel.toml to use")


def _server_setup(args, host: str, *, with_tokens: bool = True):
    """config, tokens and the policy for remote callers, checked before anything listens (``with_tokens``
    False: MCP over stdio, where the caller is the local user and no token is used)."""
    from .. import config
    from ..api.auth import TokenSet, admin_names, check_bind, load_tokens, tenants
    from ..api.policy import ServerPolicy

    cfg_path = config.find_config(getattr(args, "config", None), os.getcwd())
    cfg = config.load_config(cfg_path)
    if not with_tokens:
        return cfg, TokenSet(), ServerPolicy.from_config(cfg, admin_names=admin_names(), local_tenant="local")
    tokens = load_tokens(config=cfg, config_path=cfg_path, cwd=os.getcwd())
    check_bind(host, tokens)
    policy = ServerPolicy.from_config(cfg, token_tenants=tenants(tokens) if tokens else None,
                                      admin_names=admin_names(), local_tenant=None if tokens else "local")
    return cfg, tokens, policy


def serve(args) -> int:
    import logging

    import uvicorn

    from ..api.app import Settings, serve_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg, tokens, policy = _server_setup(args, args.host)
    os.environ["AGENTKERNEL_NO_DAEMON"] = "1"  # this process is the owner of its pools
    from ..limits import raise_open_files_limit

    raise_open_files_limit()
    settings = Settings(tokens=tokens, config=cfg, pool_min=args.pool_min, pool_max=args.pool_max,
                        warm=args.warm, mcp=not args.no_mcp, bind_host=args.host, policy=policy)
    app = serve_app(settings)
    sys.stderr.write(f"agentkernel: serving on http://{args.host}:{args.port} "
                     f"({'token auth' if tokens else 'loopback only, no token'})\n")
    cfg_u = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level.lower(), lifespan="on",
                           timeout_graceful_shutdown=10, access_log=args.log_level.lower() == "debug",
                           **http_impl())
    server = quiet_exit_server(uvicorn)(cfg_u)
    server.run()
    return 0 if server.started else 125


def http_impl() -> dict[str, str]:
    """uvicorn's HTTP/1.1 parser: httptools (the ``api`` extra; C, faster per request) when importable,
    else uvicorn's default (h11)."""
    try:
        import httptools  # noqa: F401
    except ImportError:
        return {}
    return {"http": "httptools"}


def quiet_exit_server(uvicorn):
    """uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown (exit status 143/130); a server
    stopped on request has done its job: exit 0."""

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            self._captured_signals.clear()

    return Server


def attach(args) -> int:
    from ..attach import attach_main

    return attach_main(args)


def replay(args) -> int:
    from ..asciicast import replay as play

    play(args.file, speed=args.speed, max_idle=args.max_idle or None)
    return 0


def mcp(args) -> int:
    """``agentkernel mcp``: the MCP server over stdio (the local user), or streamable HTTP at /mcp. Over
    stdio the handshake is answered before the server's heavy imports (``api/mcp_stdio.py``)."""
    import asyncio
    import logging

    def service(transport: str):
        from ..api.service import Service

        logging.basicConfig(level=os.environ.get("AGENTKERNEL_LOG_LEVEL", "WARNING"),
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")
        cfg, tokens, policy = _server_setup(args, args.host, with_tokens=transport == "http")
        return Service(config=cfg, pool_min=args.pool_min, pool_max=args.pool_max, warm=args.warm,
                       policy=policy), tokens

    if args.transport == "stdio":
        from ..api import mcp_stdio

        return mcp_stdio.serve(lambda: service("stdio")[0])
    from ..api.mcp import http_app

    svc, tokens = service("http")
    import uvicorn

    app = http_app(svc, tokens, args.host)

    async def go() -> None:
        await svc.start()
        try:
            cfg_u = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", lifespan="on")
            await quiet_exit_server(uvicorn)(cfg_u).serve()
        finally:
            await svc.close()

    asyncio.run(go())
    return 0
