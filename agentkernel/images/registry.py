"""A small client for the OCI distribution API (what registries speak), on the standard library only.

Why our own and not skopeo+umoci: the core package has no dependencies and skopeo/umoci are not on a
typical user's machine; a registry pull is four kinds of request (ping, token, manifest, blob), and doing
them ourselves lets us verify every digest while streaming, store blobs content-addressed so images
share layers, classify every failure exactly (registry error codes, not scraped text), and unpack layers
under our own rules (``layers.py``) instead of trusting an unpacker's.

Auth: anonymous first; on 401 the challenge decides: ``Basic`` (credentials sent to that registry only)
or ``Bearer`` (a token from the realm, with credentials when we have them; tokens are cached per scope).
Blob redirects to another host are followed without our Authorization header.
TLS: verified against the system CAs plus ``certs.d/HOST:PORT/*.crt`` (containers and docker
locations). Only registries configured as insecure skip verification (and may speak plain HTTP).
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import platform
import ssl
import urllib.parse

from .pullerrors import PullError

MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
INDEX_TYPES = MANIFEST_TYPES[:2]
CERTS_D = ("/etc/containers/certs.d", "/etc/docker/certs.d", os.path.expanduser("~/.config/containers/certs.d"))
MAX_MANIFEST = 4 << 20
TIMEOUT = 30.0


def _arch() -> str:
    m = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}.get(m, m)


def ssl_context(registry: str, insecure: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    for base in CERTS_D:
        d = os.path.join(base, registry)
        try:
            names = sorted(os.listdir(d))
        except OSError:
            continue
        for n in names:
            if n.endswith(".crt"):
                ctx.load_verify_locations(os.path.join(d, n))
    return ctx


class Response:
    def __init__(self, resp: http.client.HTTPResponse, conn: http.client.HTTPConnection) -> None:
        self.resp, self.conn = resp, conn
        self.status = resp.status

    def header(self, name: str) -> str:
        return self.resp.getheader(name) or ""

    def read(self, n: int = -1) -> bytes:
        return self.resp.read(n) if n >= 0 else self.resp.read()

    def close(self) -> None:
        self.resp.close()


class RegistryClient:
    def __init__(self, registry: str, *, credentials: tuple[str, str] | None = None, insecure: bool = False) -> None:
        self.registry = registry
        self.credentials = credentials
        self.insecure = insecure
        self.scheme = "https"
        self._ctx = ssl_context(registry, insecure)
        self._auth: dict[str, str] = {}  # scope -> Authorization header value
        self._conn: http.client.HTTPConnection | None = None

    # ---- transport -----------------------------------------------------------------------------------
    def _connect(self, host: str, scheme: str) -> http.client.HTTPConnection:
        if scheme == "https":
            return http.client.HTTPSConnection(host, timeout=TIMEOUT, context=self._ctx)
        return http.client.HTTPConnection(host, timeout=TIMEOUT)

    def _send(self, method: str, url: str, headers: dict[str, str]) -> Response:
        u = urllib.parse.urlsplit(url)
        own = u.netloc == self.registry
        path = u.path + (f"?{u.query}" if u.query else "")
        for attempt in (0, 1):
            if own:
                if self._conn is None:
                    self._conn = self._connect(self.registry, self.scheme)
                conn = self._conn
            else:
                conn = self._connect(u.netloc, u.scheme)
            try:
                conn.request(method, path, headers=headers)
                return Response(conn.getresponse(), conn)
            except ssl.SSLCertVerificationError as exc:
                raise PullError("insecure", f"registry {self.registry}: TLS certificate not trusted "
                                f"({exc.verify_message})") from None
            except ssl.SSLError as exc:
                if self.insecure and self.scheme == "https" and own and "WRONG_VERSION" in str(exc).upper():
                    self.scheme, self._conn = "http", None  # an insecure registry that speaks plain HTTP
                    return self._send(method, f"http://{self.registry}{path}", headers)
                raise PullError("unreachable", f"registry {self.registry}: TLS failed: {exc}") from None
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                conn.close()
                if own:
                    self._conn = None
                if attempt == 0:
                    continue  # a kept-alive connection the server had closed: once more on a fresh one
                raise PullError("unreachable", f"registry {self.registry}: connection lost: {exc}") from None
            except OSError as exc:
                conn.close()
                if own:
                    self._conn = None
                raise PullError("unreachable", f"registry {self.registry} is unreachable: "
                                f"{exc.strerror or exc}") from None
        raise AssertionError("unreachable")

    def request(self, method: str, path: str, *, scope: str, accept: tuple[str, ...] = (),
                follow: bool = True) -> Response:
        url = f"{self.scheme}://{self.registry}{path}"
        for _ in range(6):
            headers = {"User-Agent": "agentkernel"}
            if accept:
                headers["Accept"] = ", ".join(accept)
            if url.startswith(f"{self.scheme}://{self.registry}/") and scope in self._auth:
                headers["Authorization"] = self._auth[scope]
            resp = self._send(method, url, headers)
            if resp.status == 401 and "Authorization" not in headers:
                challenge = resp.header("WWW-Authenticate")
                resp.read()
                self._authenticate(challenge, scope)
                continue
            if resp.status in (301, 302, 303, 307, 308) and follow:
                loc = resp.header("Location")
                resp.read()
                url = urllib.parse.urljoin(url, loc)
                continue
            return resp
        raise PullError("failed", f"registry {self.registry}: too many redirects or auth rounds for {path}")

    def _authenticate(self, challenge: str, scope: str) -> None:
        kind, _, params = challenge.partition(" ")
        kind = kind.lower()
        if kind == "basic":
            if not self.credentials:
                raise PullError("auth-refused", f"registry {self.registry} requires credentials and none are "
                                "stored for it")
            tok = base64.b64encode(f"{self.credentials[0]}:{self.credentials[1]}".encode()).decode()
            self._auth[scope] = f"Basic {tok}"
            return
        if kind != "bearer":
            raise PullError("auth-refused", f"registry {self.registry}: unsupported auth challenge {challenge!r}")
        p = _parse_challenge(params)
        realm = p.get("realm")
        if not realm:
            raise PullError("auth-refused", f"registry {self.registry}: bearer challenge without a realm")
        q = {"scope": p.get("scope") or scope}
        if p.get("service"):
            q["service"] = p["service"]
        url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(q)
        headers = {"User-Agent": "agentkernel"}
        realm_host = urllib.parse.urlsplit(realm).netloc
        if self.credentials:
            tok = base64.b64encode(f"{self.credentials[0]}:{self.credentials[1]}".encode()).decode()
            headers["Authorization"] = f"Basic {tok}"
        resp = self._send("GET", url, headers)
        body = resp.read()
        if resp.status in (401, 403):
            raise PullError("auth-refused", f"registry {self.registry}: the token service {realm_host} refused "
                            "the credentials" if self.credentials else
                            f"registry {self.registry}: anonymous access refused by {realm_host}")
        if resp.status != 200:
            raise PullError("failed", f"registry {self.registry}: token service answered {resp.status}")
        try:
            d = json.loads(body)
            token = d.get("token") or d.get("access_token")
        except ValueError:
            token = None
        if not token:
            raise PullError("failed", f"registry {self.registry}: token service sent no token")
        self._auth[scope] = f"Bearer {token}"

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # ---- API -------------------------------------------------------------------------------------------
    def _fail(self, resp: Response, what: str, repo: str) -> PullError:
        body = resp.read(65536)
        codes = []
        try:
            codes = [e.get("code", "") for e in json.loads(body).get("errors", [])]
        except (ValueError, AttributeError):
            pass
        if resp.status in (401, 403) or "UNAUTHORIZED" in codes or "DENIED" in codes:
            return PullError("auth-refused", f"registry {self.registry} refused access to {repo} "
                             + ("with the stored credentials" if self.credentials else "(no credentials stored)"))
        if "NAME_UNKNOWN" in codes:
            return PullError("unknown-image", f"image {self.registry}/{repo} does not exist")
        if "MANIFEST_UNKNOWN" in codes or (resp.status == 404 and what.startswith("manifest")):
            return self._missing(repo, what)
        if resp.status == 404:
            return PullError("unknown-image", f"{self.registry}/{repo}: {what} not found")
        return PullError("failed", f"registry {self.registry}: {what} of {repo}: HTTP {resp.status} "
                         f"{','.join(codes)}")

    def _missing(self, repo: str, what: str) -> PullError:
        """A manifest the registry does not have: is it the tag, or the whole repository?"""
        resp = self.request("GET", f"/v2/{repo}/tags/list?n=20", scope=f"repository:{repo}:pull")
        body = resp.read(65536)
        tags: list[str] = []
        if resp.status == 200:
            try:
                tags = json.loads(body).get("tags") or []
            except (ValueError, AttributeError):
                tags = []
        if resp.status == 404 or (resp.status == 200 and not tags):
            return PullError("unknown-image", f"image {self.registry}/{repo} does not exist (the registry has no "
                             "such repository)")
        listed = f" (tags: {', '.join(tags[:10])}{', ...' if len(tags) > 10 else ''})" if tags else ""
        return PullError("unknown-tag", f"{self.registry}/{repo}: {what} not found{listed}")

    def manifest(self, repo: str, ref: str) -> tuple[str, str, bytes]:
        """(media type, digest, raw bytes) of one manifest, digest-verified when ``ref`` is a digest."""
        resp = self.request("GET", f"/v2/{repo}/manifests/{ref}", scope=f"repository:{repo}:pull",
                            accept=MANIFEST_TYPES)
        if resp.status != 200:
            raise self._fail(resp, f"manifest {ref}", repo)
        body = resp.read(MAX_MANIFEST + 1)
        if len(body) > MAX_MANIFEST:
            raise PullError("failed", f"{self.registry}/{repo}: manifest larger than {MAX_MANIFEST} bytes")
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if ref.startswith("sha256:") and digest != ref:
            raise PullError("digest-mismatch", f"{self.registry}/{repo}@{ref}: the registry served a manifest "
                            f"whose digest is {digest}")
        mtype = resp.header("Content-Type").split(";")[0].strip()
        try:
            doc = json.loads(body)
        except ValueError:
            raise PullError("failed", f"{self.registry}/{repo}: manifest is not JSON") from None
        mtype = doc.get("mediaType") or mtype
        return mtype, digest, body

    def image_manifest(self, repo: str, ref: str) -> tuple[str, dict]:
        """(digest of the reference's manifest, the image manifest for this platform)."""
        mtype, digest, body = self.manifest(repo, ref)
        doc = json.loads(body)
        if mtype in INDEX_TYPES or "manifests" in doc:
            want = _arch()
            chosen = None
            for m in doc.get("manifests") or []:
                plat = m.get("platform") or {}
                if plat.get("os", "linux") == "linux" and plat.get("architecture") == want:
                    chosen = m
                    break
            if chosen is None:
                raise PullError("unsupported", f"{self.registry}/{repo}:{ref} has no linux/{want} image")
            _, _, sub = self.manifest(repo, chosen["digest"])
            return digest, json.loads(sub)
        if doc.get("schemaVersion") != 2 or "layers" not in doc:
            raise PullError("unsupported", f"{self.registry}/{repo}:{ref}: unsupported manifest type {mtype!r}")
        return digest, doc

    def blob(self, repo: str, digest: str) -> Response:
        resp = self.request("GET", f"/v2/{repo}/blobs/{digest}", scope=f"repository:{repo}:pull")
        if resp.status != 200:
            raise self._fail(resp, f"blob {digest[:19]}", repo)
        return resp

    def ping(self) -> None:
        resp = self.request("GET", "/v2/", scope="")
        resp.read()


def _parse_challenge(params: str) -> dict[str, str]:
    out: dict[str, str] = {}
    i, n = 0, len(params)
    while i < n:
        while i < n and params[i] in " ,":
            i += 1
        eq = params.find("=", i)
        if eq < 0:
            break
        key = params[i:eq].strip().lower()
        i = eq + 1
        if i < n and params[i] == '"':
            end = params.find('"', i + 1)
            end = n if end < 0 else end
            out[key] = params[i + 1 : end]
            i = end + 1
        else:
            end = params.find(",", i)
            end = n if end < 0 else end
            out[key] = params[i:end].strip()
            i = end
    return out
