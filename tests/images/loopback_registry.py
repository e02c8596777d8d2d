"""A real registry on loopback for the image tests and the pull benchmark.

Debian's ``docker-registry`` (the CNCF distribution registry) on 127.0.0.1:<random port>, with TLS from a
throw-away CA and htpasswd (bcrypt) auth, filled with ``skopeo copy`` from the engines' local images.
The CA is trusted the way users trust a private registry's CA: ``/etc/containers/certs.d/HOST:PORT/ca.crt``
(podman, skopeo, agentkernel's oci client) and ``/etc/docker/certs.d/HOST:PORT/ca.crt`` (dockerd), both
removed again by ``stop()``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import warnings

USER, PASSWORD = "akuser", "ak-secret-pw"
CERTS_DIRS = ("/etc/containers/certs.d", "/etc/docker/certs.d")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bcrypt(pw: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt

    return crypt.crypt(pw, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))


def _make_certs(d: str) -> None:
    def ossl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
         "-subj", "/CN=agentkernel test CA")
    ossl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
         "-subj", "/CN=127.0.0.1")
    with open(os.path.join(d, "ext.cnf"), "w") as f:
        f.write("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")
    ossl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
         "-out", "server.crt", "-days", "2", "-extfile", "ext.cnf")


class LoopbackRegistry:
    def __init__(self, *, tls: bool = True, auth: bool = True, trust_ca: bool = True) -> None:
        self.tls, self.auth, self.trust_ca = tls, auth, trust_ca
        self.dir = tempfile.mkdtemp(prefix="ak-registry-")
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(self.dir, "registry.log")
        self.ca = os.path.join(self.dir, "ca.crt")
        self._trusted: list[str] = []
        self.user, self.password = USER, PASSWORD

    # ---- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> LoopbackRegistry:
        if self.tls and not os.path.exists(self.ca):
            _make_certs(self.dir)
        if self.auth and not os.path.exists(os.path.join(self.dir, "htpasswd")):
            with open(os.path.join(self.dir, "htpasswd"), "w") as f:
                f.write(f"{USER}:{_bcrypt(PASSWORD)}\n")
        cfg = ["version: 0.1", "log:", "  level: info", "  accesslog:", "    disabled: false",
               "storage:", f"  filesystem:\n    rootdirectory: {self.dir}/data", "  delete:\n    enabled: true",
               "http:", f"  addr: {self.host}"]
        if self.tls:
            cfg += ["  tls:", f"    certificate: {self.dir}/server.crt", f"    key: {self.dir}/server.key"]
        if self.auth:
            cfg += ["auth:", "  htpasswd:", "    realm: agentkernel-test", f"    path: {self.dir}/htpasswd"]
        with open(os.path.join(self.dir, "config.yml"), "w") as f:
            f.write("\n".join(cfg) + "\n")
        if self.tls and self.trust_ca and not self._trusted:
            for base in CERTS_DIRS:
                d = os.path.join(base, self.host)
                os.makedirs(d, exist_ok=True)
                shutil.copy(self.ca, os.path.join(d, "ca.crt"))
                self._trusted.append(d)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(["docker-registry", "serve", os.path.join(self.dir, "config.yml")],
                                         stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {self.read_log()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("docker-registry did not start listening")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        self.kill()
        for d in self._trusted:
            shutil.rmtree(d, ignore_errors=True)
        self._trusted = []
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LoopbackRegistry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- content --------------------------------------------------------------------------------------
    def ref(self, name: str) -> str:
        return f"{self.host}/{name}"

    def push(self, source: str, name: str) -> str:
        """skopeo copy a local image (``containers-storage:...``, ``docker-daemon:...``, ``oci-archive:...``)
        to ``HOST/name``; returns the pushed manifest digest."""
        dest = f"docker://{self.ref(name)}"
        digest_file = os.path.join(self.dir, "digest")
        args = ["skopeo", "copy", "--quiet", "--digestfile", digest_file]
        if self.tls:
            if not self.trust_ca:
                args += ["--dest-tls-verify=false"]
        else:
            args += ["--dest-tls-verify=false"]
        if self.auth:
            args += ["--dest-creds", f"{USER}:{PASSWORD}"]
        r = subprocess.run([*args, source, dest], capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise RuntimeError(f"skopeo copy {source} -> {dest} failed: {r.stderr.strip()}")
        with open(digest_file) as f:
            return f.read().strip()

    def read_log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def blob_gets(self, digest: str | None = None) -> int:
        """Completed GET requests for blobs (optionally one digest), from the registry's access log."""
        n = 0
        for line in self.read_log().splitlines():
            if ('"GET /v2/' in line and "/blobs/" in line and (digest is None or digest in line)
                    and ('" 200 ' in line or '" 307 ' in line)):
                n += 1
        return n

    def auth_file(self, path: str) -> str:
        """A containers-auth.json / docker config.json with this registry's credentials."""
        import base64
        import json

        os.makedirs(os.path.dirname(path), exist_ok=True)
        tok = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        with open(path, "w") as f:
            json.dump({"auths": {self.host: {"auth": tok}}}, f)
        return path


# ---- images made from scratch (unique layers, hostile layers) ----------------------------------------------

def tar_bytes(entries) -> bytes:
    """A tar of ``entries``: (name, kind, payload, extra) with kind file|dir|symlink|hardlink|chr|fifo."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for ent in entries:
            name, kind, payload = ent[0], ent[1], ent[2] if len(ent) > 2 else b""
            extra = ent[3] if len(ent) > 3 else {}
            ti = tarfile.TarInfo(name)
            ti.mode = extra.get("mode", 0o755 if kind in ("dir", "file") else 0o644)
            ti.uid = ti.gid = 0
            ti.mtime = 0
            if kind == "dir":
                ti.type = tarfile.DIRTYPE
                tar.addfile(ti)
            elif kind == "file":
                ti.size = len(payload)
                tar.addfile(ti, io.BytesIO(payload))
            elif kind in ("symlink", "hardlink"):
                ti.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
                ti.linkname = payload.decode() if isinstance(payload, bytes) else payload
                tar.addfile(ti)
            elif kind == "chr":
                ti.type, ti.devmajor, ti.devminor = tarfile.CHRTYPE, 1, 3
                tar.addfile(ti)
            elif kind == "fifo":
                ti.type = tarfile.FIFOTYPE
                tar.addfile(ti)
    return buf.getvalue()


def busybox_entries(extra_bytes: int = 0) -> list:
    """A runnable layer: static busybox, /bin/sh and /bin/echo, plus ``extra_bytes`` of random data (so
    the layer is unique: no engine has it yet)."""
    with open("/bin/busybox", "rb") as f:
        bb = f.read()
    ents = [("bin", "dir"), ("bin/busybox", "file", bb), ("bin/sh", "symlink", "busybox"),
            ("bin/echo", "symlink", "busybox"), ("tmp", "dir", b"", {"mode": 0o1777}), ("etc", "dir"),
            ("workspace", "dir", b"", {"mode": 0o777}),
            ("etc/passwd", "file", b"root:x:0:0:root:/root:/bin/sh\n", {"mode": 0o644})]
    if extra_bytes:
        ents.append(("random.bin", "file", os.urandom(extra_bytes), {"mode": 0o644}))
    return ents


def write_layout(path: str, layers: list[bytes], *, compress: bool = True) -> None:
    """An OCI image layout (what ``skopeo copy oci:PATH`` reads) of these layer tars."""
    import gzip
    import hashlib
    import json

    blobs = os.path.join(path, "blobs", "sha256")
    os.makedirs(blobs, exist_ok=True)

    def put(data: bytes) -> str:
        hx = hashlib.sha256(data).hexdigest()
        with open(os.path.join(blobs, hx), "wb") as f:
            f.write(data)
        return f"sha256:{hx}"

    descs, diff_ids = [], []
    for tar in layers:
        diff_ids.append("sha256:" + hashlib.sha256(tar).hexdigest())
        blob = gzip.compress(tar, compresslevel=1, mtime=0) if compress else tar
        descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if compress else ""),
                      "digest": put(blob), "size": len(blob)})
    cfg = json.dumps({"architecture": "amd64", "os": "linux",
                      "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"], "WorkingDir": "/"},
                      "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    cdesc = {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": put(cfg), "size": len(cfg)}
    man = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                      "config": cdesc, "layers": descs}).encode()
    mdesc = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": put(man), "size": len(man)}
    with open(os.path.join(path, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [mdesc]}, f)
    with open(os.path.join(path, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion": "1.0.0"}')


def push_layers(reg: LoopbackRegistry, name: str, layers: list[bytes]) -> str:
    d = tempfile.mkdtemp(prefix="ak-layout-", dir=reg.dir)
    write_layout(d, layers)
    return reg.push(f"oci:{d}", name)
