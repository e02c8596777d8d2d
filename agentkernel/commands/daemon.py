"""``agentkernel daemon start [--foreground] | stop | status``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from .. import paths
from ..errors import AgentKernelError
from . import daemon_client

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


def _daemon_args(args) -> list[str]:
    out = []
    for flag, val in (("--pool-min", args.pool_min), ("--pool-max", args.pool_max),
                      ("--max-concurrent-starts", args.max_starts)):
        if val is not None:
            out += [flag, str(val)]
    for w in args.warm or []:
        out += ["--warm", w]
    return out


def daemon_argv(args: list[str]) -> list[str]:
    """The daemon's command line. ``-P`` (Python 3.11+): ``-m`` would otherwise put the caller's working
    directory first on sys.path, and a file there named like a stdlib or agentkernel module (``asyncio.py``,
    ``agentkernel/``) would be imported by the daemon. The daemon keeps the caller's cwd: it reads the
    ``agentkernel.toml`` found from there."""
    return [sys.executable, "-P", "-m", "agentkernel.daemon", *args]


def _pid() -> int | None:
    try:
        with open(paths.daemon_socket() + ".pid") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def start(args) -> int:
    st = daemon_client.request("ping")
    if st is not None:
        if st.get("incompatible"):
            raise AgentKernelError("a daemon from another version of agentkernel is running",
                                   hint="agentkernel daemon stop, then start again")
        print(f"daemon already running (pid {st['pid']})")
        return 0
    if args.foreground:
        from ..daemon.server import main

        return main(_daemon_args(args))
    log_path = os.path.join(paths.data_dir(), "daemon.log")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(daemon_argv(_daemon_args(args)), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AgentKernelError(f"the daemon exited during start-up (status {proc.returncode})",
                                   hint=f"see {log_path}")
        st = daemon_client.request("status")
        if st is not None:
            pools = ", ".join(_pool_title(p) for p in st["pools"])
            print(f"daemon started (pid {st['pid']}, socket {st['socket']}); warming: {pools or 'nothing'}")
            return 0
        time.sleep(0.05)
    proc.kill()
    raise AgentKernelError(f"the daemon did not answer within {START_TIMEOUT_S:.0f} s", hint=f"see {log_path}")


def _pool_title(p: dict) -> str:
    if "module" in p:  # a wasm instance pool: pre-instantiated modules inside the daemon
        return f"{p['backend']} module {p['module']} size {p['config']['size']}"
    return f"{p['backend']}:{p['image']} min {p['config']['min']}"


def stop(args) -> int:
    pid = _pid()
    st = daemon_client.request("stop")
    if st is not None and st.get("incompatible") and pid:
        os.kill(pid, signal.SIGTERM)  # it cannot read our request: ask the old way
    if st is None and pid is None:
        print("daemon is not running")
        return 0
    if pid is None:
        pid = (st or {}).get("pid")
    # the daemon says how long destroying its pools may take (it grows with their size); an older one,
    # or one that could not answer, gets the fixed bound
    wait_s = (st or {}).get("stop_timeout_s") or STOP_TIMEOUT_S
    deadline = time.monotonic() + float(wait_s)
    while pid and time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            print("daemon stopped")
            return 0
        time.sleep(0.05)
    if pid:
        try:
            os.kill(pid, signal.SIGKILL)  # it did not drain in time; the next command reaps its sandboxes
        except ProcessLookupError:
            pass
        print("daemon killed after not stopping in time", file=sys.stderr)
    return 0


def status(args) -> int:
    st = daemon_client.request("status")
    if st is None:
        print("daemon is not running")
        return 3
    if st.get("incompatible"):
        print("a daemon from another version of agentkernel is running (restart it: agentkernel daemon stop)")
        return 3
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    print(f"daemon pid {st['pid']}, up {st['uptime_s']:.0f} s, socket {st['socket']}, runs {st['runs']}, "
          f"active {st['active_runs']}")
    for p in st["pools"]:
        m = p["metrics"]
        if "module" in p:
            print(f"  pool {_pool_title(p)} (key {p['key']}): ready {p['ready']}, in use {p['in_use']}")
        else:
            print(f"  pool {p['backend']}:{p['image']} ({p['profile']}, key {p['key']}): ready {p['ready']}, "
                  f"starting {p['starting']}, in use {p['in_use']}, min {p['config']['min']} "
                  f"max {p['config']['max']}")
        print(f"    hits {m['hits']}, misses {m['misses']}, hit rate {m['hit_rate']}, cold starts "
              f"{m['cold_starts']}, refill avg {m['refill_ms_avg']} ms (last {m['refill_ms_last']} ms), "
              f"destroyed {m['destroyed']}, failures {m['start_failures']}")
        if "demand_per_s" in m:
            print(f"    demand {m['demand_per_s']}/s, refill {m['refill_per_s']}/s (capacity {m['capacity_per_s']}/s), "
                  f"recent hit rate {m['recent_hit_rate']}, target ready {m['target_ready']}, "
                  f"starts at once {m['start_concurrency']}")
        if m.get("cannot_keep_up"):
            print(f"    cannot keep up: {m['cannot_keep_up']}")
        if m.get("last_error"):
            print(f"    last error: {m['last_error']}")
    return 0


def daemon_cmd(args) -> int:
    from .. import config

    config.load_config(config.find_config(None, os.getcwd()))  # its [daemon] socket, if any
    return {"start": start, "stop": stop, "status": status}[args.action](args)
