"""Pulls through the container engines: podman's CLI, and the Docker Engine API (``POST /images/create``
with an ``X-Registry-Auth`` header), each with the same credentials, TLS rules, progress display and
error kinds as the oci backend's own puller."""

from __future__ import annotations

import base64
import http.client
import json
import socket
import subprocess
import sys
import urllib.parse

from . import settings
from .auth import credentials, first_auth_file_with
from .progress import PullProgress
from .pullerrors import PullError, from_engine
from .reference import parse


def diagnose(engine: str, image: str, text: str, config: dict | None) -> PullError:
    """The engine's error, made exact where our own client can tell more (which of image/tag is missing,
    whether the credentials were refused: dockerd's answer for a refused loopback registry is a
    misleading HTTP/HTTPS message)."""
    err = from_engine(engine, image, text)
    if err.kind not in ("unknown-tag", "unknown-image", "failed", "insecure"):
        return err
    ref = parse(image)
    if not ref.registry:
        return err
    from .registry import RegistryClient

    client = RegistryClient(ref.registry, credentials=credentials(ref.registry),
                            insecure=ref.registry in settings.insecure_registries(config))
    try:
        client.image_manifest(ref.repository, ref.ref)
    except PullError as exc:
        return PullError(exc.kind, f"{engine}: {exc.message}")
    finally:
        client.close()
    return err


def podman_pull(image: str, *, config: dict | None = None, progress: bool | None = None,
                binary: str = "podman") -> None:
    ref = parse(image)
    args = [binary, "pull"]
    if ref.registry:
        if ref.registry in settings.insecure_registries(config):
            args.append("--tls-verify=false")
        authfile = first_auth_file_with(ref.registry)
        if authfile:
            args += ["--authfile", authfile]
    show = sys.stderr.isatty() if progress is None else progress
    if not show:
        args.append("--quiet")
    try:
        r = subprocess.run([*args, image], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=None if show else subprocess.PIPE, text=True)
    except FileNotFoundError:
        raise PullError("failed", f"{binary} is not installed") from None
    if r.returncode != 0:
        raise diagnose(binary, image, r.stderr or f"exit status {r.returncode} (its message is above)", config)


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self._path)
        except OSError:
            s.close()
            raise
        self.sock = s


def docker_pull(image: str, *, config: dict | None = None, progress: bool | None = None) -> None:
    from ..backends.docker_api import API_VERSION, socket_path

    ref = parse(image)
    headers = {}
    if ref.registry:
        creds = credentials(ref.registry)
        if creds:
            blob = json.dumps({"username": creds[0], "password": creds[1], "serveraddress": ref.registry})
            headers["X-Registry-Auth"] = base64.urlsafe_b64encode(blob.encode()).decode()
    name = f"{ref.registry}/{ref.repository}" if ref.registry else ref.repository
    q = urllib.parse.urlencode({"fromImage": name, "tag": ref.digest or ref.tag or "latest"})
    conn = _UnixHTTPConnection(socket_path(), timeout=600)
    prog = PullProgress(image, enabled=progress)
    try:
        try:
            conn.request("POST", f"/v{API_VERSION}/images/create?{q}", headers=headers)
            resp = conn.getresponse()
        except OSError as exc:
            raise PullError("failed", f"docker: cannot reach dockerd at {socket_path()}: {exc}",
                            hint="start dockerd: bash scripts/setup.sh") from None
        if resp.status != 200:
            body = resp.read().decode(errors="replace")
            try:
                body = json.loads(body).get("message", body)
            except (ValueError, AttributeError):
                pass
            raise diagnose("docker", image, body, config)
        layers: dict[str, tuple[int, int]] = {}
        while True:
            line = resp.readline()
            if not line:
                break
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if msg.get("error"):
                raise diagnose("docker", image, msg["error"], config)
            if str(msg.get("status", "")).startswith("Retrying in"):
                # the registry went away mid-download: dockerd would retry for ~50 s; report it now (the
                # layers it finished are kept, so the next pull resumes) and cancel the pull by hanging up
                raise PullError("unreachable", f"docker: the registry of {image!r} went away during the pull "
                                f"(dockerd: {msg.get('status')})")
            lid, detail = msg.get("id"), msg.get("progressDetail") or {}
            if lid and detail.get("total") and msg.get("status") == "Downloading":
                layers[lid] = (int(detail.get("current") or 0), int(detail["total"]))
            elif lid and msg.get("status") in ("Download complete", "Pull complete", "Already exists"):
                cur = layers.get(lid, (0, 0))
                layers[lid] = (cur[1], cur[1])
            prog.layers_total = len(layers)
            prog.layers_done = sum(1 for c, t in layers.values() if c >= t)
            prog.bytes_total = sum(t for _, t in layers.values())
            prog.bytes_done = sum(c for c, _ in layers.values())
            prog._draw()
        prog.done()
    except BaseException:
        prog.fail()
        raise
    finally:
        conn.close()
