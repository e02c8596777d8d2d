"""The CLI's resolved-spec cache (agentkernel/resolvedspec.py): a repeat `run` through the daemon reuses the
spec an identical run resolved, and any change to anything the resolution read resolves again.

Through the real CLI and a real daemon: what a run prints is what its (cached or fresh) spec says (the
config's [env] / pass_env, a -e flag), so a stale spec shows as wrong output. The cache's own guarantees
(corrupt or foreign files ignored, atomic writes, recorded checks re-made) are exercised on the module."""

from __future__ import annotations

import multiprocessing
import os
import stat

import pytest

from agentkernel import resolvedspec
from tests.conftest import ak, require_backend

ECHO = ["--", "sh", "-c", "echo ${FOO:-unset}"]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    require_backend("oci")
    run = tmp_path_factory.mktemp("run")
    env = {"AGENTKERNEL_DAEMON_SOCKET": str(run / "d.sock"), "AGENTKERNEL_NO_DAEMON": "",
           "AGENTKERNEL_RUNTIME_DIR": str(run)}
    r = ak("daemon", "start", "--warm", "oci", "--pool-min", "1", env=env)
    assert r.returncode == 0, r
    yield env
    ak("daemon", "stop", env=env)


def _cache_files(env) -> list[str]:
    d = os.path.join(env["AGENTKERNEL_RUNTIME_DIR"], f"resolved-{os.geteuid()}")
    return sorted(n for n in os.listdir(d) if not n.endswith(".tmp")) if os.path.isdir(d) else []


def _stamps(env) -> dict[str, int]:
    d = os.path.join(env["AGENTKERNEL_RUNTIME_DIR"], f"resolved-{os.geteuid()}")
    return {n: os.stat(os.path.join(d, n)).st_mtime_ns for n in _cache_files(env)}


def out(env, *args, cwd) -> str:
    r = ak("run", "-B", "oci", *args, *ECHO, env=env, cwd=str(cwd))
    assert r.returncode == 0, r
    return r.stdout.decode().strip()


def test_config_edits_in_place_new_config_and_cwd_re_resolve(daemon, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    assert out(daemon, cwd=a) == "unset"
    stored = _stamps(daemon)
    assert stored
    assert out(daemon, cwd=a) == "unset"
    assert _stamps(daemon) == stored  # a hit: nothing resolved, nothing rewritten
    # a config file appears in the working directory
    cfg = a / "agentkernel.toml"
    cfg.write_text('[env]\nFOO = "one"\n')
    assert out(daemon, cwd=a) == "one"
    assert out(daemon, cwd=a) == "one"
    # edited in place: same size, same mtime, same inode (what a stamp of the file could not tell apart)
    st = os.stat(cfg)
    with open(cfg, "r+b") as f:
        f.write(b'[env]\nFOO = "two"\n')
    os.utime(cfg, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(cfg).st_size == st.st_size and os.stat(cfg).st_ino == st.st_ino
    assert out(daemon, cwd=a) == "two"
    # another working directory with its own config, then back
    (b / "agentkernel.toml").write_text('[env]\nFOO = "bee"\n')
    assert out(daemon, cwd=b) == "bee"
    assert out(daemon, cwd=a) == "two"
    cfg.unlink()
    assert out(daemon, cwd=a) == "unset"


def test_flags_and_environment_re_resolve(daemon, tmp_path):
    assert out(daemon, "-e", "FOO=x", cwd=tmp_path) == "x"
    assert out(daemon, "-e", "FOO=y", cwd=tmp_path) == "y"
    # an environment variable the resolution reads: the config passes FOO through from the caller
    (tmp_path / "agentkernel.toml").write_text('[security]\npass_env = ["FOO"]\n')
    assert out({**daemon, "FOO": "first"}, cwd=tmp_path) == "first"
    assert out({**daemon, "FOO": "second"}, cwd=tmp_path) == "second"
    # the key is a digest: the caller's environment is not written out (only what the spec itself carries)
    assert out({**daemon, "AK_TEST_TOKEN": "tok-5f1e9a"}, cwd=tmp_path) == "unset"
    d = os.path.join(daemon["AGENTKERNEL_RUNTIME_DIR"], f"resolved-{os.geteuid()}")
    assert all(b"tok-5f1e9a" not in resolvedspec.read_file(os.path.join(d, n)) for n in _cache_files(daemon))
    # AGENTKERNEL_CONFIG names another file
    other = tmp_path / "other.toml"
    other.write_text('[env]\nFOO = "other"\n')
    assert out({**daemon, "AGENTKERNEL_CONFIG": str(other)}, cwd=tmp_path) == "other"


def test_the_daemon_socket_table_is_never_cached(daemon, tmp_path):
    """[daemon] socket acts as the config is read (where the CLI connects): a cache hit would skip it."""
    (tmp_path / "agentkernel.toml").write_text(f'[daemon]\nsocket = "{daemon["AGENTKERNEL_DAEMON_SOCKET"]}"\n')
    env = {**daemon, "AGENTKERNEL_DAEMON_SOCKET": ""}
    before = _cache_files(daemon)
    assert out(env, cwd=tmp_path) == "unset"
    assert _cache_files(daemon) == before


# ---- the module ------------------------------------------------------------------------------------------


@pytest.fixture
def runtime(tmp_path, monkeypatch):
    monkeypatch.setenv("AGENTKERNEL_RUNTIME_DIR", str(tmp_path / "run"))
    return tmp_path / "run" / f"resolved-{os.geteuid()}"


def test_store_load_round_trip_and_modes(runtime, tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    f = proj / "c.toml"
    f.write_bytes(b"x")
    checks = [("file", str(f), b"x"), ("isfile", str(proj / "none"), False),
              ("listdir", str(proj), sorted(os.listdir(proj)))]
    assert resolvedspec.store("k", checks, {"v": 1})
    assert resolvedspec.load("k") == {"v": 1}
    assert resolvedspec.load("other key") is None
    assert stat.S_IMODE(os.stat(runtime).st_mode) == 0o700
    (path,) = [runtime / n for n in os.listdir(runtime)]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    (proj / "new").write_bytes(b"")  # the listing changed
    assert resolvedspec.load("k") is None


def test_each_check_kind_misses_when_its_input_changes(runtime, tmp_path):
    f = tmp_path / "c.toml"
    f.write_bytes(b"aa")
    assert resolvedspec.store("k", [("file", str(f), b"aa")], 1)
    f.write_bytes(b"ab")
    assert resolvedspec.load("k") is None
    assert resolvedspec.store("k", [("isfile", str(tmp_path / "p"), False)], 2)
    (tmp_path / "p").write_bytes(b"")
    assert resolvedspec.load("k") is None
    # a call re-made on every hit (an image's presence, the auto backend's choice)
    assert resolvedspec.store("k", [("call", "os.path", "isdir", (str(tmp_path / "img"),), False)], 3)
    assert resolvedspec.load("k") == 3
    (tmp_path / "img").mkdir()
    assert resolvedspec.load("k") is None
    assert resolvedspec.store("k", [("call", "agentkernel.no_such_module", "f", (), 1)], 4)
    assert resolvedspec.load("k") is None  # a check that cannot be re-made is a miss


def _record_which(name: str, path: str) -> tuple[str | None, list]:
    from agentkernel.backends.auto import which

    resolvedspec.start()
    try:
        found = which(name, path)
    finally:
        checks = resolvedspec.stop()
    return found, checks


def _exe(path) -> None:
    path.write_bytes(b"#!/bin/sh\n")
    path.chmod(0o755)


def test_path_candidates_miss_when_one_appears_earlier_on_path(runtime, tmp_path, monkeypatch):
    """A PATH lookup's missing candidates are re-checked by their directory's stamp (one stat per directory):
    an executable created, renamed in or made executable earlier on PATH is seen on the next hit."""
    monkeypatch.setattr(resolvedspec, "_SETTLED_NS", 0)  # these directories were just made: count them settled
    a, b, c = (tmp_path / n for n in "abc")
    for d in (a, b, c):
        d.mkdir()
    _exe(c / "tool")
    path = f"{a}:{b}:{a}:{c}"
    found, checks = _record_which("tool", path)
    assert found == str(c / "tool")
    assert ("dirstamp", str(a), resolvedspec.dir_stamp(str(a))) in checks
    assert ("isexec", str(c / "tool"), True) in checks
    assert resolvedspec.store("k", checks, 1)
    assert resolvedspec.load("k") == 1
    _exe(tmp_path / "tool")
    os.rename(tmp_path / "tool", b / "tool")  # renamed into a directory earlier on PATH
    assert resolvedspec.load("k") is None
    os.unlink(b / "tool")
    # an entry that is there but not executable is checked itself: chmod changes no directory stamp
    (a / "tool").write_bytes(b"")
    found, checks = _record_which("tool", path)
    assert ("isexec", str(a / "tool"), False) in checks
    assert resolvedspec.store("k", checks, 2)
    assert resolvedspec.load("k") == 2
    (a / "tool").chmod(0o755)
    assert resolvedspec.load("k") is None
    # a directory that changed too recently to trust its stamp: each candidate is checked itself
    monkeypatch.setattr(resolvedspec, "_SETTLED_NS", 10**18)
    _, checks = _record_which("other", path)
    assert {c[0] for c in checks} == {"isexec"}


def _stored_checks(runtime) -> list:
    import marshal

    (path,) = [runtime / n for n in os.listdir(runtime) if not n.endswith(".tmp")]
    return marshal.loads(path.read_bytes()[8:])[1]


def test_a_settled_files_content_is_kept_as_its_stamp_and_any_edit_misses(runtime, tmp_path, monkeypatch):
    """A file that last changed long enough ago (no later edit can share its timestamp tick) is re-checked by
    one stat instead of a read while its stamp holds; a changed stamp compares the content's digest: an edit
    that keeps the size or a replacement misses, the same bytes rewritten still hit. A file changed just now
    keeps its content check; so does one whose size is not its content's (/proc)."""
    f = tmp_path / "c.toml"
    f.write_bytes(b"x = 1\n")
    monkeypatch.setattr(resolvedspec, "_SETTLED_NS", 10**18)  # nothing is settled: the content is kept
    assert resolvedspec.store("k", [("file", str(f), b"x = 1\n")], 1)
    assert _stored_checks(runtime) == [("file", str(f), b"x = 1\n")]
    monkeypatch.setattr(resolvedspec, "_SETTLED_NS", 0)
    assert resolvedspec.store("k", [("file", str(f), b"x = 0\n")], 1)  # not the content it holds: kept as is
    assert _stored_checks(runtime)[0][0] == "file"
    assert resolvedspec.store("k", [("file", str(f), b"x = 1\n"), ("file", "/proc/self/status", b"x")], 1)
    assert [c[0] for c in _stored_checks(runtime)] == ["fstamp", "file"]
    # an edit that keeps the size misses; so does a replacement with other bytes
    for change in (lambda: f.write_bytes(b"x = 2\n"), lambda: os.replace(tmp_path / "new", f)):
        (tmp_path / "new").write_bytes(b"x = 3\n")
        assert resolvedspec.store("k", [("file", str(f), f.read_bytes())], 1)
        assert resolvedspec.load("k") == 1
        change()
        assert resolvedspec.load("k") is None
    # a changed stamp with the same bytes (rewritten, replaced, chmod) still holds: the digest is compared
    for change in (lambda: f.write_bytes(f.read_bytes()), lambda: f.chmod(0o600),
                   lambda: os.replace(tmp_path / "new", f)):
        (tmp_path / "new").write_bytes(f.read_bytes())
        assert resolvedspec.store("k", [("file", str(f), f.read_bytes())], 1)
        change()
        assert resolvedspec.load("k") == 1


def test_checks_recorded_twice_are_stored_once(runtime, tmp_path):
    f = tmp_path / "c.toml"
    f.write_bytes(b"x")
    checks = [("file", str(f), b"x"), ("stamp", str(f), resolvedspec.stamp(str(f))), ("file", str(f), b"x")]
    assert resolvedspec.store("k", checks, 1)
    (path,) = [runtime / n for n in os.listdir(runtime)]
    import marshal

    assert marshal.loads(path.read_bytes()[8:])[1] == checks[:2]
    assert resolvedspec.load("k") == 1
    f.write_bytes(b"y")
    assert resolvedspec.load("k") is None


def test_an_image_removed_from_the_store_misses(runtime, tmp_path, monkeypatch):
    """The recorded presence of an image in the oci store is re-checked on every hit."""
    from agentkernel._fastjson import save
    from agentkernel.images import pull
    from agentkernel.oci import rootfs

    monkeypatch.setenv("AGENTKERNEL_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "rootfs"
    root.mkdir()
    save(rootfs._refs_path(), {"example/img": {"stamps": "registry", "rootfs": {
        "image": "example/img", "id": "x", "path": str(root), "env": [], "workdir": "/", "homes": {},
        "source": "registry"}}})
    resolvedspec.start()
    assert pull.present("oci", "example/img")
    checks = resolvedspec.stop()
    refs = rootfs._refs_path()
    assert ("isdir", str(root), True) in checks
    assert ("file", refs, resolvedspec.read_file(refs)) in checks
    assert resolvedspec.store("k", checks, "spec")
    assert resolvedspec.load("k") == "spec"
    root.rmdir()  # the unpacked image removed
    assert resolvedspec.load("k") is None
    root.mkdir()
    assert resolvedspec.load("k") == "spec"
    save(rootfs._refs_path(), {})  # the cache forgot it
    assert resolvedspec.load("k") is None


def test_an_image_appearing_in_an_engine_store_misses(runtime, tmp_path, monkeypatch):
    """An image not in the oci cache is looked up in podman's index: its content is what is re-checked."""
    from agentkernel.images import pull

    monkeypatch.setenv("AGENTKERNEL_CACHE", str(tmp_path / "cache"))
    graph = tmp_path / "graph"
    (graph / "vfs-images").mkdir(parents=True)
    index = graph / "vfs-images" / "images.json"
    index.write_text("[]")
    conf = tmp_path / "storage.conf"
    conf.write_text(f'[storage]\ndriver = "vfs"\ngraphroot = "{graph}"\n')
    monkeypatch.setenv("CONTAINERS_STORAGE_CONF", str(conf))
    resolvedspec.start()
    assert not pull.present("podman", "example/other")
    checks = resolvedspec.stop()
    assert resolvedspec.store("k", checks, "spec")
    assert resolvedspec.load("k") == "spec"
    index.write_text('[{"names": ["example/other:latest"]}]')
    assert resolvedspec.load("k") is None
    assert pull.present("podman", "example/other")


def test_volatile_resolutions_are_not_stored(runtime):
    from agentkernel import imagesel

    resolvedspec.start()
    imagesel.registry_unreachable_since("registry.invalid")  # expires with time
    checks = resolvedspec.stop()
    assert not resolvedspec.store("k", checks, 1)
    assert resolvedspec.load("k") is None


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "garbage"])
def test_a_corrupted_file_is_a_miss(runtime, damage):
    assert resolvedspec.store("k", [], {"spec": "x" * 100})
    (path,) = [runtime / n for n in os.listdir(runtime)]
    data = path.read_bytes()
    data = {"truncate": data[: len(data) // 2], "flip": data[:-5] + bytes([data[-5] ^ 1]) + data[-4:],
            "empty": b"", "garbage": b"AKRS" + os.urandom(64)}[damage]
    path.write_bytes(data)
    assert resolvedspec.load("k") is None


def test_files_and_directories_open_to_others_are_ignored(runtime):
    assert resolvedspec.store("k", [], 1)
    (path,) = [runtime / n for n in os.listdir(runtime)]
    os.chmod(path, 0o644)
    assert resolvedspec.load("k") is None
    os.chmod(path, 0o600)
    assert resolvedspec.load("k") == 1
    os.chmod(runtime, 0o755)
    assert resolvedspec.load("k") is None
    assert not resolvedspec.store("k", [], 2)  # nor written into


def _writer(n: int, value) -> None:
    for _ in range(n):
        assert resolvedspec.store("k", [], value)


def test_concurrent_writers_never_leave_a_torn_file(runtime):
    big = {"a": "x" * 200_000}
    other = {"b": "y" * 300_000}
    assert resolvedspec.store("k", [], big)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(40, v)) for v in (big, other, big)]
    for p in procs:
        p.start()
    seen = 0
    while any(p.is_alive() for p in procs):
        got = resolvedspec.load("k")
        assert got in (big, other)  # always a whole file: never a miss, never a mix
        seen += 1
    for p in procs:
        p.join()
        assert p.exitcode == 0
    assert seen and resolvedspec.load("k") in (big, other)
    assert not [n for n in os.listdir(runtime) if n.endswith(".tmp")]


def test_a_cache_of_another_user_is_never_read(runtime, tmp_path):
    """Files are per effective uid (a directory each, checked for owner and mode): another uid's file with
    the same key is not this user's cache."""
    if os.geteuid() != 0:
        pytest.skip("needs root to make a file owned by another uid")
    assert resolvedspec.store("k", [], "mine")
    (path,) = [runtime / n for n in os.listdir(runtime)]
    os.chown(path, 12345, 12345)
    assert resolvedspec.load("k") is None
    os.chown(path, 0, 0)
    os.chown(runtime, 12345, 12345)
    assert resolvedspec.load("k") is None


def test_the_key_follows_environment_changes_made_in_process(monkeypatch):
    """The key reads the environment as os.environ keeps it: a variable set, changed or removed by this
    process (an embedder, a test) changes the key."""
    from agentkernel.cli_flags import RUN_FLAGS, fast_parse

    args = fast_parse(["--", "echo"], RUN_FLAGS, ())
    monkeypatch.delenv("AK_KEY_PROBE", raising=False)
    k0 = resolvedspec.key(args, ["echo"])
    monkeypatch.setenv("AK_KEY_PROBE", "1")
    k1 = resolvedspec.key(args, ["echo"])
    monkeypatch.setenv("AK_KEY_PROBE", "2")
    k2 = resolvedspec.key(args, ["echo"])
    monkeypatch.delenv("AK_KEY_PROBE")
    assert len({k0, k1, k2}) == 3 and resolvedspec.key(args, ["echo"]) == k0
