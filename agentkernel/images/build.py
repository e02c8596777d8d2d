"""Offline image builders and engine import (used by scripts/setup.sh and ``agentkernel images``)."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time

from .. import paths
from ..errors import AgentKernelError

PATH_ENV = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SANDBOX_UID = 1000
RECIPE_VERSION = "3"  # bump when a recipe changes: engines re-import, caches rebuild

PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    f"sandbox:x:{SANDBOX_UID}:{SANDBOX_UID}:sandbox:/home/sandbox:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
)
GROUP = f"root:x:0:\nsandbox:x:{SANDBOX_UID}:\nnogroup:x:65534:\n"


class Progress:
    """A one-line ticker on stderr for slow steps ("==> building ... 12 s")."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._tty = sys.stderr.isatty()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        last = -1
        while not self._stop.wait(1.0):
            secs = int(time.monotonic() - self._t0)
            if self._tty:
                sys.stderr.write(f"\r    {self.label} ... {secs} s")
                sys.stderr.flush()
            elif secs // 15 != last:
                last = secs // 15
                sys.stderr.write(f"    {self.label} ... {secs} s\n")
                sys.stderr.flush()

    def __enter__(self) -> Progress:
        sys.stderr.write(f"    {self.label}\n" if not self._tty else f"    {self.label} ...")
        sys.stderr.flush()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        secs = time.monotonic() - self._t0
        if self._tty:
            sys.stderr.write(f"\r    {self.label} ... done in {secs:.1f} s\n")
        else:
            sys.stderr.write(f"    {self.label}: done in {secs:.1f} s\n")
        sys.stderr.flush()


def _sh(*args: str, input: bytes | None = None, quiet: bool = True) -> str:
    r = subprocess.run(args, input=input, capture_output=True)
    if r.returncode != 0:
        raise AgentKernelError(f"{' '.join(args[:3])} failed: {r.stderr.decode(errors='replace').strip()[-800:]}")
    return r.stdout.decode(errors="replace")


# ---- busybox -------------------------------------------------------------------------------------------


def _busybox_binary() -> str:
    for cand in ("/bin/busybox", "/usr/bin/busybox"):
        if os.path.exists(cand):
            out = subprocess.run([cand, "--list-full"], capture_output=True)
            if out.returncode == 0:
                return cand
    raise AgentKernelError("busybox-static is not installed", hint="apt-get install -y busybox-static")


def busybox_recipe() -> str:
    with open(_busybox_binary(), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return hashlib.sha256(f"busybox:{RECIPE_VERSION}:{digest}".encode()).hexdigest()[:16]


def build_busybox_tar(out_path: str) -> None:
    """A busybox rootfs as a tar, built in memory with exact owners and modes (no root needed)."""
    bb = _busybox_binary()
    applets = subprocess.run([bb, "--list-full"], capture_output=True, text=True, check=True).stdout.split()
    tmp = f"{out_path}.{os.getpid()}.tmp"
    with tarfile.open(tmp, "w") as tar:

        def add_dir(name: str, mode: int = 0o755, uid: int = 0) -> None:
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode, ti.uid, ti.gid, ti.mtime = tarfile.DIRTYPE, mode, uid, uid, 0
            tar.addfile(ti)

        def add_file(name: str, data: bytes, mode: int = 0o644) -> None:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), mode, 0
            tar.addfile(ti, io.BytesIO(data))

        for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "dev", "proc", "sys", "run", "var",
                  "home", "mnt", "opt"):
            add_dir(d)
        add_dir("tmp", 0o1777)
        add_dir("var/tmp", 0o1777)
        add_dir("root", 0o700)
        add_dir("home/sandbox", 0o755, SANDBOX_UID)
        add_dir("workspace", 0o755, SANDBOX_UID)
        with open(bb, "rb") as f:
            add_file("bin/busybox", f.read(), 0o755)
        for a in applets:
            if a == "bin/busybox":
                continue
            ti = tarfile.TarInfo(a)
            ti.type, ti.linkname, ti.mode, ti.mtime = tarfile.SYMTYPE, "/bin/busybox", 0o777, 0
            tar.addfile(ti)
        add_file("etc/passwd", PASSWD.encode())
        add_file("etc/group", GROUP.encode())
        add_file("etc/os-release", b'NAME="agentkernel busybox"\nID=busybox\n')
    os.replace(tmp, out_path)


# ---- debian --------------------------------------------------------------------------------------------

DEBIAN_SUITE = "bookworm"
DEBIAN_INCLUDE = ("python3", "ca-certificates")


def debian_recipe() -> str:
    return hashlib.sha256(
        f"debian:{RECIPE_VERSION}:{DEBIAN_SUITE}:{','.join(DEBIAN_INCLUDE)}".encode()
    ).hexdigest()[:16]


def apt_mirror() -> str:
    """The Debian mirror this machine's apt already uses (deb822 or one-line sources)."""
    try:
        with open("/etc/apt/sources.list.d/debian.sources") as f:
            for line in f:
                if line.startswith("URIs:"):
                    for uri in line.split()[1:]:
                        if not uri.rstrip("/").endswith("-security"):
                            return uri
    except OSError:
        pass
    try:
        with open("/etc/apt/sources.list") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[0] == "deb" and "security" not in parts[1]:
                    return parts[1] if not parts[1].startswith("[") else parts[2]
    except OSError:
        pass
    raise AgentKernelError("cannot find a Debian mirror in /etc/apt/sources.list(.d)")


def build_debian_tar(out_path: str) -> None:
    if not shutil.which("debootstrap"):
        raise AgentKernelError("debootstrap is not installed", hint="apt-get install -y debootstrap")
    work = tempfile.mkdtemp(prefix="ak-debootstrap-", dir=os.path.dirname(out_path))
    root = os.path.join(work, "rootfs")
    try:
        with Progress(f"debootstrap --variant=minbase {DEBIAN_SUITE} (+{', '.join(DEBIAN_INCLUDE)})"):
            r = subprocess.run(
                ["debootstrap", "--variant=minbase", f"--include={','.join(DEBIAN_INCLUDE)}", DEBIAN_SUITE,
                 root, apt_mirror()], capture_output=True, text=True)
            if r.returncode != 0:
                raise AgentKernelError("debootstrap failed: " + (r.stdout + r.stderr).strip()[-1500:])
        with open(os.path.join(root, "etc/passwd"), "a") as f:
            f.write(f"sandbox:x:{SANDBOX_UID}:{SANDBOX_UID}:sandbox:/home/sandbox:/bin/sh\n")
        with open(os.path.join(root, "etc/group"), "a") as f:
            f.write(f"sandbox:x:{SANDBOX_UID}:\n")
        for d in ("home/sandbox", "workspace"):
            p = os.path.join(root, d)
            os.makedirs(p, exist_ok=True)
            os.chown(p, SANDBOX_UID, SANDBOX_UID)
        for d in ("var/cache/apt/archives", "var/lib/apt/lists"):
            p = os.path.join(root, d)
            for fn in os.listdir(p):
                fp = os.path.join(p, fn)
                if os.path.isfile(fp):
                    os.unlink(fp)
        with Progress("packing the debian rootfs"):
            _sh("tar", "-C", root, "--numeric-owner", "-cf", out_path + ".tmp", ".")
        os.replace(out_path + ".tmp", out_path)
    finally:
        subprocess.run(["rm", "-rf", work])


# ---- engines ------------------------------------------------------------------------------------------

IMAGES = {
    "agentkernel/busybox": (busybox_recipe, build_busybox_tar),
    "agentkernel/debian": (debian_recipe, build_debian_tar),
}


def _engine_recipe(engine: str, image: str) -> str | None:
    r = subprocess.run([engine, "image", "inspect", "--format", '{{index .Config.Labels "agentkernel.recipe"}}',
                        image], capture_output=True, text=True)
    if r.returncode != 0:
        return None
    return r.stdout.strip()


def engines() -> list[str]:
    out = []
    if shutil.which("podman"):
        out.append("podman")
    if shutil.which("docker") and subprocess.run(["docker", "version"], capture_output=True).returncode == 0:
        out.append("docker")
    return out


def tar_path(image: str, recipe: str) -> str:
    d = os.path.join(paths.cache_dir(), "images")
    os.makedirs(d, exist_ok=True)
    return os.path.join(d, f"{image.replace('/', '_')}-{recipe}.tar")


def ensure_tar(image: str) -> tuple[str, str]:
    recipe_fn, build_fn = IMAGES[image]
    recipe = recipe_fn()
    path = tar_path(image, recipe)
    if not os.path.exists(path):
        sys.stderr.write(f"==> building {image}\n")
        build_fn(path)
    return path, recipe


def ensure_image(image: str, engine_list: list[str] | None = None) -> None:
    recipe_fn, _ = IMAGES[image]
    recipe = recipe_fn()
    for engine in engine_list if engine_list is not None else engines():
        if _engine_recipe(engine, image) == recipe:
            sys.stderr.write(f"    {image} in {engine}: up to date\n")
            continue
        path, recipe = ensure_tar(image)
        with Progress(f"importing {image} into {engine}"):
            changes = ['CMD ["/bin/sh"]', f"ENV PATH={PATH_ENV}", "WORKDIR /workspace",
                       f"LABEL agentkernel.recipe={recipe}"]
            args = [engine, "import"]
            for c in changes:
                args += ["--change", c]
            if engine == "podman":
                args.append("--quiet")
            _sh(*args, path, f"{image}:latest")


def build_all(only: list[str] | None = None) -> None:
    for image in IMAGES:
        if only and image not in only and image.split("/")[-1] not in only:
            continue
        ensure_image(image)
