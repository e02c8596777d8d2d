"""The hot-path flag parser gives exactly what argparse gives, and hands anything unusual to argparse."""

from __future__ import annotations

import pytest

from agentkernel.cli import build_parser
from agentkernel.cli_flags import EXEC_FLAGS, RUN_FLAGS, fast_parse, split_command

RUN_CASES = [
    ["--", "echo", "hello"],
    ["echo", "hello"],
    ["-B", "docker", "--image", "agentkernel/debian", "--", "python3", "-c", "print(1)"],
    ["--no-network", "--memory", "64", "--cpus", "0.5", "--pids=32", "-e", "A=1", "-e", "B=x=y", "--", "env"],
    ["--network", "--read-only", "--mount-cwd", "-w", "/tmp", "-o", "runtime=runsc", "-t", "2.5", "--", "ls", "-l"],
    ["-k", "-n", "box", "--no-daemon", "-p", "restrictive", "--", "sh", "-c", "exit 3"],
    ["--module", "app.wasm", "--func", "add", "--", "1", "2"],
    ["--", "echo", "--timeout", "-e", "--"],
]
EXEC_CASES = [
    ["box", "--", "echo", "hi"],
    ["box", "--timeout", "1", "-e", "K=V", "-w", "/w", "--", "sleep", "5"],
]


def _argparse(cmd: str, argv: list[str]) -> dict:
    full = [cmd, *argv]
    command = None
    if "--" in full:
        i = full.index("--")
        full, command = full[:i], full[i + 1 :]
    ns = build_parser(cmd).parse_args(full)
    d = vars(ns)
    if command is not None:
        d["command"] = command
    d.pop("cmd"), d.pop("version")
    return d


@pytest.mark.parametrize("argv", RUN_CASES)
def test_run_fast_parse_matches_argparse(argv):
    fast = vars(fast_parse(argv, RUN_FLAGS))
    assert fast == _argparse("run", argv)


@pytest.mark.parametrize("argv", EXEC_CASES)
def test_exec_fast_parse_matches_argparse(argv):
    fast = vars(fast_parse(argv, EXEC_FLAGS, ("name",)))
    assert fast == _argparse("exec", argv)


@pytest.mark.parametrize("argv", [
    ["-h"], ["--help"], ["--unknown", "--", "x"], ["--memory", "lots", "--", "x"], ["--timeout", "-1", "--", "x"],
    ["--network", "--no-network", "--", "x"], ["--memory"], ["-e", "novalue", "--", "x"], ["--read-only=1", "--", "x"],
])
def test_unusual_input_goes_to_argparse(argv):
    assert fast_parse(argv, RUN_FLAGS) is None


def test_exec_without_name_goes_to_argparse():
    assert fast_parse([], EXEC_FLAGS, ("name",)) is None


@pytest.mark.parametrize(("argv", "head", "command"), [
    (["box", "python3", "--version"], ["box"], ["python3", "--version"]),
    (["box", "python", "-m", "pytest", "-x"], ["box"], ["python", "-m", "pytest", "-x"]),
    (["-e", "K=V", "-t", "3", "box", "ls", "-la"], ["-e", "K=V", "-t", "3", "box"], ["ls", "-la"]),
    (["box", "--", "echo", "--"], ["box"], ["echo", "--"]),
    (["box", "--timeout", "1", "--", "sleep", "5"], ["box", "--timeout", "1"], ["sleep", "5"]),
    (["box", "sh", "-c", "a -- b"], ["box"], ["sh", "-c", "a -- b"]),
    (["box", "-e", "K=V", "./s.sh", "-e"], ["box", "-e", "K=V"], ["./s.sh", "-e"]),
    (["box", "--timeout=2", "ls", "--timeout"], ["box", "--timeout=2"], ["ls", "--timeout"]),
    (["box", "-la"], ["box"], ["-la"]),
    (["box"], ["box"], None),
])
def test_exec_takes_everything_after_name_as_the_command(argv, head, command):
    """The reference's form: `exec NAME CMD...` (options before NAME; `--` still accepted)."""
    assert split_command(argv, EXEC_FLAGS) == (head, command)
    if command is not None:
        ns = fast_parse(head, EXEC_FLAGS, ("name",))
        assert ns is not None and ns.name == "box" and ns.command == []


def test_version_fast_path_matches_argparse(capsys):
    from agentkernel import __version__
    from agentkernel.cli import main

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"agentkernel {__version__}\n"
    assert build_parser(None).parse_args(["--version"]).version is True


@pytest.mark.parametrize("hook", [True, False])
def test_exit_now_runs_atexit_hooks_when_there_are_any(hook):
    """``cli.exit_now`` skips the interpreter's finalization only when nothing needs it: an atexit hook
    (registered by whoever imported ``atexit``) still runs, and the exit status is kept either way."""
    import subprocess
    import sys

    code = ("import sys\n"
            + ("import atexit; atexit.register(lambda: print('hook ran', flush=True))\n" if hook else "")
            + "from agentkernel.cli import exit_now\nprint('out', end='')\nexit_now(7)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert r.returncode == 7
    assert r.stdout == (b"outhook ran\n" if hook else b"out")
